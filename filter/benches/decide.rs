//! Native decision time at 10, 1 000 and 10 000 rules: the compiled policy
//! against the naive linear scan (`meshward_filter::reference`).
//!
//! The policy mixes exact, prefix and suffix principals, namespaces and path
//! rules; the peer is matched by the *last* ALLOW rule, the worst case for a
//! linear scan.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use meshward_filter::{Config, Peer, Policy, Request, UnixTime, reference};
use std::hint::black_box;

fn config(rules: usize) -> Config {
    let mut list = Vec::with_capacity(rules);
    for i in 0..rules {
        let rule = match i % 5 {
            0 => format!(
                r#"{{"name":"deny-{i}","action":"DENY","from":[{{"principals":["cluster.local/ns/legacy-{i}/*"]}}]}}"#
            ),
            1 => format!(
                r#"{{"name":"suffix-{i}","action":"ALLOW","from":[{{"principals":["*/sa/batch-{i}"]}}],"to":[{{"methods":["GET"]}}]}}"#
            ),
            2 => format!(
                r#"{{"name":"ns-{i}","action":"ALLOW","from":[{{"namespaces":["team-{i}"]}}],"to":[{{"paths":["/api/{i}/*"]}}]}}"#
            ),
            _ => format!(
                r#"{{"name":"allow-{i}","action":"ALLOW","from":[{{"principals":["cluster.local/ns/app-{i}/sa/web"]}}],"to":[{{"paths":["/v1/*"],"methods":["GET","POST"]}}],"when":{{"maxCertAge":"24h"}}}}"#
            ),
        };
        list.push(rule);
    }
    // The peer below is matched only by the last rule.
    list.push(
        r#"{"name":"target","action":"ALLOW","from":[{"principals":["cluster.local/ns/shop/sa/web"]}],"to":[{"paths":["/v1/*"]}]}"#
            .to_string(),
    );
    let json = format!(r#"{{"rules":[{}]}}"#, list.join(","));
    Config::from_json(json.as_bytes()).unwrap()
}

fn bench(c: &mut Criterion) {
    let peer = Peer::from_connection(true, Some("spiffe://cluster.local/ns/shop/sa/web"), None);
    let request = Request::http(
        Some("shop.example"),
        Some("GET"),
        Some("/v1/cart?x=1"),
        Some(8080),
    );
    let now = UnixTime(1_750_000_000);
    let mut group = c.benchmark_group("decide");
    for n in [10usize, 1_000, 10_000] {
        let cfg = config(n - 1);
        let policy = Policy::compile(&cfg).unwrap();
        let expected = reference::authorize(&cfg, &peer, &request, now);
        assert_eq!(policy.authorize(&peer, &request, now), expected);
        assert_eq!(expected.rule, Some("target"));
        group.bench_with_input(BenchmarkId::new("compiled", n), &n, |b, _| {
            b.iter(|| {
                black_box(
                    policy
                        .authorize(black_box(&peer), black_box(&request), now)
                        .verdict,
                )
            })
        });
        group.bench_with_input(BenchmarkId::new("linear_reference", n), &n, |b, _| {
            b.iter(|| {
                black_box(
                    reference::authorize(&cfg, black_box(&peer), black_box(&request), now).verdict,
                )
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
