//! Property tests: the compiled, indexed policy decides exactly like the naive
//! linear evaluator (`reference`) on random policies, peers and requests:
//! same verdict, same deciding rule (so the same evaluation order), same
//! reason, same AUDIT mark.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use meshward_filter::cert::{CertSource, CertValidity, PeerCert, Revoked};
use meshward_filter::config::{FilterType, Operation, PortText, Rule, RuleAction, Source, When};
use meshward_filter::policy::PeerRulesCache;
use meshward_filter::{Config, Mode, Peer, Policy, Request, UnixTime, UnknownCertAge, reference};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use proptest::sample::select;

const NOW: i64 = 1_750_000_000;

fn list(pool: &'static [&'static str]) -> impl Strategy<Value = Option<Vec<String>>> {
    option::weighted(0.4, vec(select(pool).prop_map(str::to_string), 1..4))
}

const PRINCIPALS: &[&str] = &[
    "cluster.local/ns/a/sa/x",
    "spiffe://cluster.local/ns/b/sa/y",
    "other.org/ns/a/sa/y",
    "spiffe://other.org/ns/b/sa/x",
    "cluster.local/ns/a/*",
    "spiffe://cluster.local/*",
    "other.org/*",
    "*/sa/x",
    "*/ns/b/sa/y",
    "*",
];
const NAMESPACES: &[&str] = &["a", "b", "*", "a*", "*b"];
const TRUST_DOMAINS: &[&str] = &["cluster.local", "other.org", "*.org", "*", "cluster*"];
const HOSTS: &[&str] = &["a.example", "*.example", "B.Example", "*"];
const METHODS: &[&str] = &["GET", "POST", "*"];
const PATHS: &[&str] = &["/a", "/a/*", "*/x", "/", "*"];
const PORTS: &[&str] = &["80", "8080"];

fn source() -> impl Strategy<Value = Source> {
    (
        list(PRINCIPALS),
        list(PRINCIPALS),
        list(NAMESPACES),
        list(NAMESPACES),
        list(TRUST_DOMAINS),
    )
        .prop_map(
            |(principals, not_principals, namespaces, not_namespaces, trust_domains)| Source {
                principals,
                not_principals,
                namespaces,
                not_namespaces,
                trust_domains,
            },
        )
        .prop_filter("a source needs a field", |s| *s != Source::default())
}

fn operation() -> impl Strategy<Value = Operation> {
    let ports = || {
        option::weighted(
            0.3,
            vec(select(PORTS).prop_map(|p| PortText(p.to_string())), 1..3),
        )
    };
    (
        list(HOSTS),
        list(HOSTS),
        ports(),
        ports(),
        list(METHODS),
        list(METHODS),
        list(PATHS),
        list(PATHS),
    )
        .prop_map(
            |(hosts, not_hosts, ports, not_ports, methods, not_methods, paths, not_paths)| {
                Operation {
                    hosts,
                    not_hosts,
                    ports,
                    not_ports,
                    methods,
                    not_methods,
                    paths,
                    not_paths,
                }
            },
        )
        .prop_filter("an operation needs a field", |o| *o != Operation::default())
}

fn when() -> impl Strategy<Value = When> {
    (
        option::of(select(&["1h", "12h", "2d"][..])),
        option::of(select(&["30m", "6h"][..])),
    )
        .prop_map(|(a, r)| When {
            max_cert_age: a.map(str::to_string),
            min_remaining_validity: r.map(str::to_string),
        })
        .prop_filter("when needs a condition", |w| *w != When::default())
}

type RuleParts = (
    RuleAction,
    Option<Vec<Source>>,
    Option<Vec<Operation>>,
    Option<When>,
);

fn rule() -> impl Strategy<Value = RuleParts> {
    (
        select(&[RuleAction::Allow, RuleAction::Deny, RuleAction::Audit][..]),
        option::weighted(0.8, vec(source(), 1..3)),
        option::weighted(0.5, vec(operation(), 1..3)),
        option::weighted(0.3, when()),
    )
}

fn config() -> impl Strategy<Value = Config> {
    (
        select(&["cluster.local", "other.org"][..]),
        select(&[Mode::Enforce, Mode::Shadow][..]),
        any::<bool>(),
        select(&[UnknownCertAge::Deny, UnknownCertAge::Allow][..]),
        vec(rule(), 0..12),
    )
        .prop_map(|(td, mode, require_mtls, unknown_cert_age, rules)| Config {
            trust_domain: td.to_string(),
            mode,
            filter_type: FilterType::Http,
            upstream_connect: Default::default(),
            require_mtls,
            unknown_cert_age,
            ledger: None,
            rules: rules
                .into_iter()
                .enumerate()
                .map(|(i, (action, from, to, when))| Rule {
                    name: format!("r{i}"),
                    action,
                    from,
                    to,
                    when,
                })
                .collect(),
        })
}

const IDS: &[&str] = &[
    "spiffe://cluster.local/ns/a/sa/x",
    "spiffe://cluster.local/ns/b/sa/y",
    "spiffe://cluster.local/ns/a/sa/y",
    "spiffe://other.org/ns/a/sa/y",
    "spiffe://other.org/ns/b/sa/x",
    "spiffe://other.org/billing/x",
    "spiffe://Cluster.Local/ns/a/sa/x",
    "spiffe://cluster.local/ns/../sa/x",
    "",
];

fn peer() -> impl Strategy<Value = Peer> {
    (
        any::<bool>(),
        option::weighted(0.9, select(IDS)),
        option::of((
            -200_000i64..0,
            0i64..200_000,
            option::weighted(0.1, 0u8..10),
        )),
    )
        .prop_map(|(mtls, id, cert)| {
            let cert = cert.map(|(age, rem, revoked)| PeerCert {
                validity: CertValidity {
                    not_before: UnixTime(NOW + age),
                    not_after: UnixTime(NOW + rem),
                },
                source: CertSource::XfccCert,
                revoked: revoked.map(|reason| Revoked {
                    at: UnixTime(NOW - 1),
                    reason,
                }),
            });
            Peer::from_connection(mtls, id, cert)
        })
}

#[derive(Debug, Clone)]
struct Req {
    http: bool,
    host: Option<&'static str>,
    method: Option<&'static str>,
    path: Option<&'static str>,
    port: Option<u16>,
}

fn request() -> impl Strategy<Value = Req> {
    (
        prop::bool::weighted(0.8),
        option::weighted(
            0.9,
            select(&["a.example", "A.EXAMPLE:8080", "b.example", "x.test"][..]),
        ),
        option::weighted(0.9, select(&["GET", "POST", "DELETE"][..])),
        option::weighted(
            0.9,
            select(&["/a", "/a/b", "/a/x?y=1", "/", "/b/x", "/a/../x", "/a%2fx"][..]),
        ),
        option::weighted(0.9, select(&[80u16, 8080, 443][..])),
    )
        .prop_map(|(http, host, method, path, port)| Req {
            http,
            host,
            method,
            path,
            port,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn compiled_policy_decides_exactly_like_the_linear_reference(
        cfg in config(),
        peers in vec(peer(), 1..6),
        reqs in vec(request(), 1..6),
    ) {
        let policy = Policy::compile(&cfg).unwrap();
        let cache = PeerRulesCache::default();
        for peer in &peers {
            let rules = policy.peer_rules(&peer.identity);
            for r in &reqs {
                let req = if r.http {
                    Request::http(r.host, r.method, r.path, r.port)
                } else {
                    Request::tcp(r.port)
                };
                let fast = policy.authorize(peer, &req, UnixTime(NOW));
                let slow = reference::authorize(&cfg, peer, &req, UnixTime(NOW));
                prop_assert_eq!(&fast, &slow, "peer {:?} request {:?}", peer, req);
                // The per-identity rules (computed here, and through the
                // cache, twice so the second is a hit) decide the same.
                let with = policy.authorize_with(peer, &rules, &req, UnixTime(NOW));
                prop_assert_eq!(&with, &slow, "peer rules: peer {:?} request {:?}", peer, req);
                for _ in 0..2 {
                    let cached = cache.authorize(&policy, peer, &req, UnixTime(NOW));
                    prop_assert_eq!(&cached, &slow, "cache: peer {:?} request {:?}", peer, req);
                }
            }
        }
    }

    /// Rules computed for one identity must never decide for another (a
    /// peer would borrow another workload's ALLOW rules).
    #[test]
    fn peer_rules_of_another_identity_are_not_used(
        cfg in config(),
        a in peer(),
        b in peer(),
        r in request(),
    ) {
        let policy = Policy::compile(&cfg).unwrap();
        let rules_of_a = policy.peer_rules(&a.identity);
        let req = if r.http {
            Request::http(r.host, r.method, r.path, r.port)
        } else {
            Request::tcp(r.port)
        };
        let slow = reference::authorize(&cfg, &b, &req, UnixTime(NOW));
        prop_assert_eq!(&policy.authorize_with(&b, &rules_of_a, &req, UnixTime(NOW)), &slow);
        // Nor rules of an older policy (a reconfigure).
        let newer = Policy::compile(&cfg).unwrap();
        prop_assert_eq!(&newer.authorize_with(&b, &policy.peer_rules(&b.identity), &req, UnixTime(NOW)), &slow);
    }
}
