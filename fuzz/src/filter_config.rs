//! `filter_config`: the filter's `pluginConfig` parser and compiler
//! (`Config::from_json`, `Policy::compile`), then the compiled policy's
//! decisions.
//!
//! Input: the config JSON, optionally followed by [`SEP`](crate::SEP) and
//! one request per line, `uriSan|authority|method|path|port|notBefore,notAfter`
//! (every field optional; `-` as URI SAN is a plaintext peer), decided on
//! top of a fixed set of peers and requests.
//!
//! A config must be accepted or refused the same by `Policy::from_json` and
//! by `Config::from_json` + `Policy::compile`; an accepted one must compile
//! again to a policy with the same rule count; and for every peer and
//! request, the compiled policy, its per-identity rules (directly and
//! through the cache) and the naive linear evaluator in `reference.rs` must
//! make exactly the same decision.

use meshward_filter::cert::{CertSource, CertValidity, PeerCert};
use meshward_filter::policy::PeerRulesCache;
use meshward_filter::{Config, Peer, Policy, Request, UnixTime, reference};

use crate::{NOW, parts};

const URIS: [Option<&str>; 7] = [
    None,
    Some(""),
    Some("spiffe://cluster.local/ns/default/sa/web"),
    Some("spiffe://cluster.local/ns/shop/sa/frontend"),
    Some("spiffe://Other.Example/ns/batch/sa/reporter"),
    Some("spiffe://cluster.local/ns//sa/x"),
    Some("spiffe://td/x"),
];

/// A peer and the request it makes.
struct Query<'a> {
    mtls: bool,
    uri: Option<&'a str>,
    cert: Option<PeerCert>,
    request: Request<'a>,
}

fn cert(not_before: i64, not_after: i64) -> Option<PeerCert> {
    let validity = CertValidity {
        not_before: UnixTime(not_before),
        not_after: UnixTime(not_after),
    };
    Some(crate::peer_cert(
        validity,
        CertSource::PeerCertificateProperty,
    ))
}

fn fixed_requests() -> Vec<Request<'static>> {
    vec![
        Request::http(
            Some("api.shop:8080"),
            Some("GET"),
            Some("/api/items?x=1"),
            Some(8080),
        ),
        Request::http(Some("API.SHOP"), Some("POST"), Some("/admin"), Some(80)),
        Request::http(None, None, None, None),
        Request::http(Some("a"), Some("GET"), Some("/a/../admin"), Some(443)),
        Request::tcp(Some(8080)),
        Request::tcp(None),
    ]
}

/// The target.
pub fn run(data: &[u8]) {
    let p = parts(data, 2);
    let config_json = p[0];
    let parsed = Config::from_json(config_json);
    let compiled = parsed
        .as_ref()
        .map_err(Clone::clone)
        .and_then(Policy::compile);
    let direct = Policy::from_json(config_json);
    match (&compiled, &direct) {
        (Ok(_), Ok(_)) => {}
        (Err(a), Err(b)) => assert_eq!(a, b),
        _ => panic!(
            "from_json and parse+compile disagree: {:?} vs {:?}",
            compiled.as_ref().err(),
            direct.as_ref().err()
        ),
    }
    // Errors are shown to the operator: they must format.
    if let Err(e) = &compiled {
        let _ = e.to_string();
    }
    let (Ok(config), Ok(policy)) = (parsed, compiled) else {
        return;
    };
    let again = Policy::compile(&config).expect("an accepted config compiles again");
    assert_eq!(again.rule_count(), policy.rule_count());
    assert_eq!(policy.rule_count(), config.rules.len());

    let extra = p
        .get(1)
        .and_then(|t| std::str::from_utf8(t).ok())
        .unwrap_or("");
    let mut queries = Vec::new();
    for (i, uri) in URIS.iter().enumerate() {
        for (j, request) in fixed_requests().into_iter().enumerate() {
            let validity = match (i + j) % 3 {
                0 => None,
                1 => cert(NOW - 600, NOW + 3600),
                _ => cert(NOW - 40 * 86_400, NOW + 60),
            };
            queries.push(Query {
                mtls: uri.is_some(),
                uri: *uri,
                cert: validity,
                request,
            });
        }
    }
    queries.extend(extra.lines().take(16).map(query));

    let cache = PeerRulesCache::default();
    for q in &queries {
        let peer = Peer::from_connection(q.mtls, q.uri, q.cert);
        let now = UnixTime(NOW);
        let expected = reference::authorize(&config, &peer, &q.request, now);
        let fast = policy.authorize(&peer, &q.request, now);
        assert_eq!(
            fast, expected,
            "compiled vs reference: {peer:?} {:?}",
            q.request
        );
        let rules = policy.peer_rules(&peer.identity);
        let with = policy.authorize_with(&peer, &rules, &q.request, now);
        assert_eq!(
            with, expected,
            "peer rules vs reference: {peer:?} {:?}",
            q.request
        );
        let cached = cache.authorize(&policy, &peer, &q.request, now);
        assert_eq!(
            cached, expected,
            "cached rules vs reference: {peer:?} {:?}",
            q.request
        );
        // Rules of the other compilation are never used for this one.
        let foreign = again.peer_rules(&peer.identity);
        let other = policy.authorize_with(&peer, &foreign, &q.request, now);
        assert_eq!(other, expected, "foreign rules: {peer:?} {:?}", q.request);
    }
}

fn query(line: &str) -> Query<'_> {
    let mut f = line.split('|');
    let mut next = || f.next().filter(|s| !s.is_empty());
    let uri = next();
    let (host, method, path) = (next(), next(), next());
    let port = next().and_then(|p| p.parse().ok());
    let validity = next().and_then(|v| {
        let (nb, na) = v.split_once(',')?;
        cert(nb.parse().ok()?, na.parse().ok()?)
    });
    let mtls = uri != Some("-");
    let request = if host.is_none() && method.is_none() && path.is_none() {
        Request::tcp(port)
    } else {
        Request::http(host, method, path, port)
    };
    Query {
        mtls,
        uri: uri.filter(|u| *u != "-"),
        cert: validity,
        request,
    }
}
