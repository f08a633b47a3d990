//! The compiled policy and its evaluation.
//!
//! Rules are split by action (DENY, ALLOW, AUDIT). Within each group, every
//! rule whose `from` can only match certain principals (or namespaces, or
//! trust domains) is indexed under those patterns, so finding the candidate
//! rules for a peer costs a few hash lookups, not a scan of every rule. Only
//! candidates are evaluated in full, in config order; the first full match
//! decides. Rules that cannot be indexed (no `from`, or `from` entries with
//! only `not*` fields) are candidates for every peer.

use crate::UnixTime;
use crate::cert::CertTimes;
use crate::config::{
    Config, ConfigError, FilterType, MAX_PATTERN_BYTES, MAX_RULE_NAME_BYTES, MAX_RULES, Mode,
    Operation, PortText, Rule, RuleAction, Source, UnknownCertAge, UpstreamConnect, When,
};
use crate::decision::{Decision, Reason, Verdict};
use crate::duration::parse_duration;
use crate::ledger::LedgerSettings;
use crate::pattern::{FixedState, Pattern, PatternMap, PatternSet};
use crate::peer::{Peer, PeerIdentity, SpiffeIdentity};
use crate::request::{Protocol, Request, host_without_port, path_is_ambiguous, path_without_query};
use spiffe::TrustDomain;
use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Istio's default trust domain; in patterns it stands for the configured one.
const ISTIO_DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// A validated, compiled policy. Build once per configuration, share for
/// every decision.
#[derive(Debug, Clone)]
pub struct Policy {
    mode: Mode,
    filter_type: FilterType,
    upstream_connect: UpstreamConnect,
    require_mtls: bool,
    unknown_cert_age: UnknownCertAge,
    trust_domain: String,
    deny: RuleSet,
    allow: RuleSet,
    audit: RuleSet,
    ledger: Option<LedgerSettings>,
    has_cert_conditions: bool,
    /// Unique per compilation: [`PeerRules`] made for one policy are never
    /// used with another.
    id: u64,
}

/// Source of [`Policy`] ids.
static NEXT_POLICY_ID: AtomicU64 = AtomicU64::new(1);

/// The rules of a policy with a `from` side that one peer identity
/// satisfies, per action, in config order (rules without `from` match every
/// peer and are kept once, in the policy). `from` depends only on the identity (principal,
/// namespace, trust domain), so this is computed once per identity and a
/// decision then evaluates only `to` and `when` of these rules — no pattern
/// table is probed for the peer on the request path. Tied to the policy and
/// the identity it was made for: [`Policy::authorize_with`] checks both.
#[derive(Debug)]
pub struct PeerRules {
    policy: u64,
    identity: Arc<PeerIdentity>,
    deny: Box<[u32]>,
    allow: Box<[u32]>,
    audit: Box<[u32]>,
}

impl PeerRules {
    /// True when these are `policy`'s rules (not a previous policy's).
    pub fn is_for(&self, policy: &Policy) -> bool {
        self.policy == policy.id
    }

    /// Rule indices kept (all actions): the cost of caching this entry.
    pub fn len(&self) -> usize {
        self.deny.len() + self.allow.len() + self.audit.len()
    }

    /// True when the identity satisfies no rule's `from`.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Most identities a [`PeerRulesCache`] keeps before starting over.
pub const PEER_RULES_CACHE_ENTRIES: usize = 1024;

/// Rule indices (all actions) above which an identity's [`PeerRules`] are
/// used for the decision at hand but not kept in a [`PeerRulesCache`]:
/// entries × this × 4 bytes bounds the cache (4 MiB).
pub const PEER_RULES_MAX_KEPT: usize = 1024;

/// [`PeerRules`] by SPIFFE principal, for one thread (a proxy-wasm VM is
/// single-threaded). A sidecar sees few distinct peer identities, each on
/// many connections and requests; the first decision for an identity
/// computes its rules, the next ones look them up. Bounded: emptied when
/// [`PEER_RULES_CACHE_ENTRIES`] are held, and entries of an older policy
/// are replaced when met.
#[derive(Debug, Default)]
pub struct PeerRulesCache {
    entries: RefCell<HashMap<Box<str>, Rc<PeerRules>, FixedState>>,
}

impl PeerRulesCache {
    /// [`Policy::authorize`], with the peer's rules from the cache. Peers
    /// without a valid SPIFFE ID are decided without it.
    pub fn authorize<'p>(
        &self,
        policy: &'p Policy,
        peer: &Peer,
        request: &Request<'_>,
        now: UnixTime,
    ) -> Decision<'p> {
        match self.rules(policy, &peer.identity) {
            Some(rules) => policy.authorize_with(peer, &rules, request, now),
            None => policy.authorize(peer, request, now),
        }
    }

    /// `policy`'s rules for `identity`, computed on first sight; `None` for
    /// an identity that is not a valid SPIFFE ID (not cached: such peers
    /// are decided without pattern lookups anyway).
    pub fn rules(&self, policy: &Policy, identity: &Arc<PeerIdentity>) -> Option<Rc<PeerRules>> {
        let PeerIdentity::Spiffe(id) = &**identity else {
            return None;
        };
        let cached = self.entries.borrow().get(id.principal()).cloned();
        Some(match cached {
            Some(rules) if rules.is_for(policy) => rules,
            _ => {
                let rules = Rc::new(policy.peer_rules(identity));
                // An identity matching very many rules is not kept: the
                // cache's memory stays bounded (≤ entries × this).
                if rules.len() <= PEER_RULES_MAX_KEPT {
                    let mut entries = self.entries.borrow_mut();
                    if entries.len() >= PEER_RULES_CACHE_ENTRIES {
                        entries.clear();
                    }
                    entries.insert(id.principal().into(), Rc::clone(&rules));
                }
                rules
            }
        })
    }

    /// Identities held.
    pub fn len(&self) -> usize {
        self.entries.borrow().len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets everything (a new policy was loaded).
    pub fn clear(&self) {
        self.entries.borrow_mut().clear();
    }
}

#[derive(Debug, Clone, Default)]
struct RuleSet {
    rules: Vec<CompiledRule>,
    by_principal: PatternMap<Vec<u32>>,
    by_namespace: PatternMap<Vec<u32>>,
    by_trust_domain: PatternMap<Vec<u32>>,
    /// Rules that are candidates for every peer, ascending.
    always: Vec<u32>,
    /// Rules without `from` (they match every peer), ascending: not copied
    /// into each identity's [`PeerRules`].
    universal: Vec<u32>,
}

#[derive(Debug, Clone)]
struct CompiledRule {
    name: Box<str>,
    from: Option<Vec<SourceMatch>>,
    to: Option<Vec<OperationMatch>>,
    when: WhenMatch,
}

#[derive(Debug, Clone, Default)]
struct SourceMatch {
    principals: Option<PatternSet>,
    not_principals: Option<PatternSet>,
    namespaces: Option<PatternSet>,
    not_namespaces: Option<PatternSet>,
    trust_domains: Option<PatternSet>,
}

#[derive(Debug, Clone, Default)]
struct OperationMatch {
    hosts: Option<PatternSet>,
    not_hosts: Option<PatternSet>,
    ports: Option<Vec<u16>>,
    not_ports: Option<Vec<u16>>,
    methods: Option<PatternSet>,
    not_methods: Option<PatternSet>,
    paths: Option<PatternSet>,
    not_paths: Option<PatternSet>,
}

#[derive(Debug, Clone, Copy, Default)]
struct WhenMatch {
    max_cert_age: Option<i64>,
    min_remaining: Option<i64>,
}

/// The request/peer attributes, normalized once per decision.
struct Attrs<'a> {
    principal: Option<&'a str>,
    namespace: Option<&'a str>,
    trust_domain: Option<&'a str>,
    protocol: Protocol,
    host: Option<Cow<'a, str>>,
    method: Option<&'a str>,
    path: Option<&'a str>,
    port: Option<u16>,
    cert: Option<CertTimes>,
}

impl Policy {
    /// Parses and compiles `pluginConfig` JSON.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ConfigError> {
        Self::compile(&Config::from_json(bytes)?)
    }

    /// Validates and compiles a parsed config.
    pub fn compile(config: &Config) -> Result<Self, ConfigError> {
        let trust_domain = compile_trust_domain(&config.trust_domain)?;
        if config.rules.len() > MAX_RULES {
            return Err(ConfigError::invalid(
                "rules",
                &config.rules.len().to_string(),
                format!("more than {MAX_RULES} rules"),
            ));
        }
        let mut policy = Self {
            mode: config.mode,
            filter_type: config.filter_type,
            upstream_connect: config.upstream_connect,
            require_mtls: config.require_mtls,
            unknown_cert_age: config.unknown_cert_age,
            trust_domain,
            deny: RuleSet::default(),
            allow: RuleSet::default(),
            audit: RuleSet::default(),
            ledger: config
                .ledger
                .as_ref()
                .map(LedgerSettings::compile)
                .transpose()?,
            has_cert_conditions: config.rules.iter().any(|r| r.when.is_some()),
            id: NEXT_POLICY_ID.fetch_add(1, Ordering::Relaxed),
        };
        let mut names: HashSet<&str, FixedState> =
            HashSet::with_capacity_and_hasher(config.rules.len(), FixedState::default());
        for (i, rule) in config.rules.iter().enumerate() {
            let field = format!("rules[{i}]");
            check_rule_name(&format!("{field}.name"), &rule.name)?;
            if !names.insert(rule.name.as_str()) {
                return Err(ConfigError::invalid(
                    format!("{field}.name"),
                    &rule.name,
                    "duplicate rule name (names identify rules in decisions and metrics)",
                ));
            }
            let compiled = policy.compile_rule(&field, rule)?;
            let set = match rule.action {
                RuleAction::Deny => &mut policy.deny,
                RuleAction::Allow => &mut policy.allow,
                RuleAction::Audit => &mut policy.audit,
            };
            set.push(compiled);
        }
        Ok(policy)
    }

    /// `enforce` or `shadow`.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// HTTP or network filter.
    pub fn filter_type(&self) -> FilterType {
        self.filter_type
    }

    /// When a network filter lets the filters after it start.
    pub fn upstream_connect(&self) -> UpstreamConnect {
        self.upstream_connect
    }

    /// The configured trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The `ledger` settings, when lookups are configured.
    pub fn ledger(&self) -> Option<&LedgerSettings> {
        self.ledger.as_ref()
    }

    /// True when some rule has a `when` (certificate) condition.
    pub fn has_cert_conditions(&self) -> bool {
        self.has_cert_conditions
    }

    /// Number of rules (all actions).
    pub fn rule_count(&self) -> usize {
        self.deny.rules.len() + self.allow.rules.len() + self.audit.rules.len()
    }

    /// Decides one connection or request. Pure: same inputs, same decision.
    ///
    /// Order: an invalid peer identity is denied; with `requireMtls` a peer
    /// without a client certificate is denied; an ambiguous HTTP path is
    /// denied; then DENY rules (first match denies), then ALLOW rules (no
    /// ALLOW rules: allow; first match allows; none matching: deny). AUDIT
    /// rules only set [`Decision::audit`].
    pub fn authorize<'p>(
        &'p self,
        peer: &Peer,
        request: &Request<'_>,
        now: UnixTime,
    ) -> Decision<'p> {
        self.decide(peer, None, request, now)
    }

    /// The rules whose `from` `identity` satisfies (see [`PeerRules`]).
    pub fn peer_rules(&self, identity: &Arc<PeerIdentity>) -> PeerRules {
        let spiffe = match &**identity {
            PeerIdentity::Spiffe(id) => Some(id),
            _ => None,
        };
        let a = Attrs::new(spiffe, &Request::tcp(None), None);
        PeerRules {
            policy: self.id,
            identity: Arc::clone(identity),
            deny: self.deny.source_matching(&a),
            allow: self.allow.source_matching(&a),
            audit: self.audit.source_matching(&a),
        }
    }

    /// [`Policy::authorize`] with the peer's rules computed beforehand
    /// ([`Policy::peer_rules`]): the same decision, without matching the
    /// peer against the pattern tables. Rules made for another policy or
    /// another identity are not used (the decision is then made without them).
    pub fn authorize_with<'p>(
        &'p self,
        peer: &Peer,
        rules: &PeerRules,
        request: &Request<'_>,
        now: UnixTime,
    ) -> Decision<'p> {
        let same_peer =
            Arc::ptr_eq(&rules.identity, &peer.identity) || *rules.identity == *peer.identity;
        if rules.policy != self.id || !same_peer {
            return self.authorize(peer, request, now);
        }
        self.decide(peer, Some(rules), request, now)
    }

    fn decide<'p>(
        &'p self,
        peer: &Peer,
        rules: Option<&PeerRules>,
        request: &Request<'_>,
        now: UnixTime,
    ) -> Decision<'p> {
        let cert = peer.cert.map(|c| (c.validity.times_at(now), c.source));
        let decide = |verdict, rule: Option<&'p str>, reason, audit| Decision {
            verdict,
            rule,
            reason,
            audit,
            enforced: self.mode == Mode::Enforce,
            cert,
        };
        if matches!(*peer.identity, PeerIdentity::Invalid { .. }) {
            return decide(Verdict::Deny, None, Reason::InvalidPeerIdentity, None);
        }
        if self.require_mtls && !peer.mtls {
            return decide(Verdict::Deny, None, Reason::PlaintextPeer, None);
        }
        if let Some(revoked) = peer.cert.and_then(|c| c.revoked) {
            return decide(
                Verdict::Deny,
                None,
                Reason::RevokedCertificate(revoked),
                None,
            );
        }
        if request.protocol == Protocol::Http && request.path.is_some_and(path_is_ambiguous) {
            return decide(Verdict::Deny, None, Reason::AmbiguousPath, None);
        }
        let attrs = Attrs::new(peer.spiffe(), request, cert.map(|(t, _)| t));
        let unknown = self.unknown_cert_age;
        let first = |set: &'p RuleSet, known: Option<&[u32]>, action| match known {
            None => set.first_match(&attrs, action, unknown),
            Some(list) => set.first_of(list, &attrs, action, unknown),
        };
        let audit =
            first(&self.audit, rules.map(|r| &*r.audit), RuleAction::Audit).map(|r| &*r.name);
        if let Some(rule) = first(&self.deny, rules.map(|r| &*r.deny), RuleAction::Deny) {
            return decide(Verdict::Deny, Some(&rule.name), Reason::DenyRule, audit);
        }
        if self.allow.rules.is_empty() {
            return decide(Verdict::Allow, None, Reason::NoAllowRules, audit);
        }
        match first(&self.allow, rules.map(|r| &*r.allow), RuleAction::Allow) {
            Some(rule) => decide(Verdict::Allow, Some(&rule.name), Reason::AllowRule, audit),
            None => decide(Verdict::Deny, None, Reason::NoAllowRuleMatched, audit),
        }
    }

    fn compile_rule(&self, field: &str, rule: &Rule) -> Result<CompiledRule, ConfigError> {
        let from = match &rule.from {
            None => None,
            Some(list) => {
                non_empty(&format!("{field}.from"), list.len(), "any source")?;
                let mut out = Vec::with_capacity(list.len());
                for (j, src) in list.iter().enumerate() {
                    out.push(self.compile_source(&format!("{field}.from[{j}]"), src)?);
                }
                Some(out)
            }
        };
        let to = match &rule.to {
            None => None,
            Some(list) => {
                non_empty(&format!("{field}.to"), list.len(), "any operation")?;
                let mut out = Vec::with_capacity(list.len());
                for (j, op) in list.iter().enumerate() {
                    out.push(compile_operation(&format!("{field}.to[{j}]"), op)?);
                }
                Some(out)
            }
        };
        let when = match &rule.when {
            None => WhenMatch::default(),
            Some(w) => compile_when(&format!("{field}.when"), w)?,
        };
        Ok(CompiledRule {
            name: rule.name.as_str().into(),
            from,
            to,
            when,
        })
    }

    fn compile_source(&self, field: &str, src: &Source) -> Result<SourceMatch, ConfigError> {
        let out = SourceMatch {
            principals: self.patterns(
                field,
                "principals",
                src.principals.as_deref(),
                Kind::Principal,
            )?,
            not_principals: self.patterns(
                field,
                "notPrincipals",
                src.not_principals.as_deref(),
                Kind::Principal,
            )?,
            namespaces: self.patterns(
                field,
                "namespaces",
                src.namespaces.as_deref(),
                Kind::Namespace,
            )?,
            not_namespaces: self.patterns(
                field,
                "notNamespaces",
                src.not_namespaces.as_deref(),
                Kind::Namespace,
            )?,
            trust_domains: self.patterns(
                field,
                "trustDomains",
                src.trust_domains.as_deref(),
                Kind::TrustDomain,
            )?,
        };
        if out.principals.is_none()
            && out.not_principals.is_none()
            && out.namespaces.is_none()
            && out.not_namespaces.is_none()
            && out.trust_domains.is_none()
        {
            return Err(ConfigError::invalid(
                field,
                "{}",
                "has no fields: omit `from` to match any source",
            ));
        }
        Ok(out)
    }

    fn patterns(
        &self,
        field: &str,
        name: &str,
        list: Option<&[String]>,
        kind: Kind,
    ) -> Result<Option<PatternSet>, ConfigError> {
        compile_patterns(field, name, list, kind, &self.trust_domain)
    }
}

impl RuleSet {
    fn push(&mut self, compiled: CompiledRule) {
        let Ok(index) = u32::try_from(self.rules.len()) else {
            return;
        };
        let mut always = false;
        match &compiled.from {
            None => {
                always = true;
                self.universal.push(index);
            }
            Some(sources) => {
                for src in sources {
                    let (map, set) = if let Some(set) = &src.principals {
                        (&mut self.by_principal, set)
                    } else if let Some(set) = &src.namespaces {
                        (&mut self.by_namespace, set)
                    } else if let Some(set) = &src.trust_domains {
                        (&mut self.by_trust_domain, set)
                    } else {
                        always = true;
                        continue;
                    };
                    set.for_each_pattern(|p| map.entry(p).push(index));
                }
            }
        }
        if always {
            self.always.push(index);
        }
        self.rules.push(compiled);
    }

    /// Calls `f` with every rule that could match the peer of `a` (indexed
    /// under its principal, namespace or trust domain, or a candidate for
    /// every peer), in config order, until `f` returns true.
    fn for_each_candidate(&self, a: &Attrs<'_>, mut f: impl FnMut(u32) -> bool) {
        let mut candidates: Vec<u32> = Vec::new();
        let mut collect = |v: &Vec<u32>| candidates.extend_from_slice(v);
        if let Some(p) = a.principal {
            self.by_principal.for_each_match(p, &mut collect);
        }
        if let Some(ns) = a.namespace {
            self.by_namespace.for_each_match(ns, &mut collect);
        }
        if let Some(td) = a.trust_domain {
            self.by_trust_domain.for_each_match(td, &mut collect);
        }
        candidates.sort_unstable();
        candidates.dedup();
        // Merge the two ascending lists.
        let (mut i, mut j) = (0, 0);
        loop {
            let next = match (candidates.get(i), self.always.get(j)) {
                (None, None) => return,
                (Some(&c), None) => {
                    i += 1;
                    c
                }
                (None, Some(&w)) => {
                    j += 1;
                    w
                }
                (Some(&c), Some(&w)) => {
                    if c <= w {
                        i += 1;
                        if c == w {
                            j += 1;
                        }
                        c
                    } else {
                        j += 1;
                        w
                    }
                }
            };
            if f(next) {
                return;
            }
        }
    }

    /// The first rule, in config order, that fully matches.
    fn first_match(
        &self,
        a: &Attrs<'_>,
        action: RuleAction,
        unknown: UnknownCertAge,
    ) -> Option<&CompiledRule> {
        if self.rules.is_empty() {
            return None;
        }
        let mut found = None;
        self.for_each_candidate(a, |i| {
            found = usize::try_from(i)
                .ok()
                .and_then(|i| self.rules.get(i))
                .filter(|rule| rule.matches(a, action, unknown));
            found.is_some()
        });
        found
    }

    /// The rules with a `from` that the peer of `a` satisfies, in config
    /// order (rules without `from` are [`RuleSet::universal`]).
    fn source_matching(&self, a: &Attrs<'_>) -> Box<[u32]> {
        let mut out = Vec::new();
        if self.rules.is_empty() {
            return out.into_boxed_slice();
        }
        self.for_each_candidate(a, |i| {
            if usize::try_from(i)
                .ok()
                .and_then(|i| self.rules.get(i))
                .is_some_and(|rule| rule.from.is_some() && rule.source_matches(a))
            {
                out.push(i);
            }
            false
        });
        out.into_boxed_slice()
    }

    /// The first rule, in config order, of `list` (rules whose `from` holds
    /// for this peer, from [`RuleSet::source_matching`]) and of the
    /// universal rules, whose `to` and `when` hold.
    fn first_of(
        &self,
        list: &[u32],
        a: &Attrs<'_>,
        action: RuleAction,
        unknown: UnknownCertAge,
    ) -> Option<&CompiledRule> {
        let (mut i, mut j) = (0, 0);
        loop {
            let next = match (list.get(i), self.universal.get(j)) {
                (None, None) => return None,
                (Some(&p), Some(&u)) if u < p => {
                    j += 1;
                    u
                }
                (Some(&p), _) => {
                    i += 1;
                    p
                }
                (None, Some(&u)) => {
                    j += 1;
                    u
                }
            };
            if let Some(rule) = self.rules.get(usize::try_from(next).ok()?)
                && rule.request_matches(a, action, unknown)
            {
                return Some(rule);
            }
        }
    }
}

impl CompiledRule {
    fn matches(&self, a: &Attrs<'_>, action: RuleAction, unknown: UnknownCertAge) -> bool {
        self.source_matches(a) && self.request_matches(a, action, unknown)
    }

    /// The peer side: depends only on the peer's identity.
    fn source_matches(&self, a: &Attrs<'_>) -> bool {
        self.from
            .as_ref()
            .is_none_or(|s| s.iter().any(|s| s.matches(a)))
    }

    /// The request and certificate side.
    fn request_matches(&self, a: &Attrs<'_>, action: RuleAction, unknown: UnknownCertAge) -> bool {
        self.to
            .as_ref()
            .is_none_or(|o| o.iter().any(|o| o.matches(a, action)))
            && self.when.holds(a.cert, action, unknown)
    }
}

/// A positive and a negative pattern field against one optional value.
/// An absent value matches no positive pattern, so `not*` fields hold for it.
fn field_matches(pos: &Option<PatternSet>, neg: &Option<PatternSet>, value: Option<&str>) -> bool {
    pos.as_ref()
        .is_none_or(|set| value.is_some_and(|v| set.any_match(v)))
        && neg
            .as_ref()
            .is_none_or(|set| !value.is_some_and(|v| set.any_match(v)))
}

fn ports_match(pos: &Option<Vec<u16>>, neg: &Option<Vec<u16>>, port: Option<u16>) -> bool {
    let hit = |list: &Vec<u16>| port.is_some_and(|p| list.binary_search(&p).is_ok());
    pos.as_ref().is_none_or(hit) && !neg.as_ref().is_some_and(hit)
}

impl SourceMatch {
    fn matches(&self, a: &Attrs<'_>) -> bool {
        field_matches(&self.principals, &self.not_principals, a.principal)
            && field_matches(&self.namespaces, &self.not_namespaces, a.namespace)
            && field_matches(&self.trust_domains, &None, a.trust_domain)
    }
}

impl OperationMatch {
    fn has_http_fields(&self) -> bool {
        self.hosts.is_some()
            || self.not_hosts.is_some()
            || self.methods.is_some()
            || self.not_methods.is_some()
            || self.paths.is_some()
            || self.not_paths.is_some()
    }

    /// On TCP, HTTP-only fields cannot be evaluated. As in Istio, an ALLOW (or
    /// AUDIT) entry using them never matches, and a DENY entry ignores them
    /// (denying more, not less).
    fn matches(&self, a: &Attrs<'_>, action: RuleAction) -> bool {
        if !ports_match(&self.ports, &self.not_ports, a.port) {
            return false;
        }
        if a.protocol == Protocol::Tcp {
            return action == RuleAction::Deny || !self.has_http_fields();
        }
        field_matches(&self.hosts, &self.not_hosts, a.host.as_deref())
            && field_matches(&self.methods, &self.not_methods, a.method)
            && field_matches(&self.paths, &self.not_paths, a.path)
    }
}

impl WhenMatch {
    fn holds(&self, cert: Option<CertTimes>, action: RuleAction, unknown: UnknownCertAge) -> bool {
        if self.max_cert_age.is_none() && self.min_remaining.is_none() {
            return true;
        }
        match cert {
            Some(t) => {
                self.max_cert_age.is_none_or(|max| t.age_secs <= max)
                    && self.min_remaining.is_none_or(|min| t.remaining_secs >= min)
            }
            // Unknown validity resolves towards `unknownCertAge`.
            None => match action {
                RuleAction::Allow => unknown == UnknownCertAge::Allow,
                RuleAction::Deny | RuleAction::Audit => unknown == UnknownCertAge::Deny,
            },
        }
    }
}

impl<'a> Attrs<'a> {
    fn new(id: Option<&'a SpiffeIdentity>, r: &Request<'a>, cert: Option<CertTimes>) -> Self {
        let host = r.host.map(|h| {
            let h = host_without_port(h);
            if h.bytes().any(|b| b.is_ascii_uppercase()) {
                Cow::Owned(h.to_ascii_lowercase())
            } else {
                Cow::Borrowed(h)
            }
        });
        Self {
            principal: id.map(SpiffeIdentity::principal),
            namespace: id.and_then(SpiffeIdentity::namespace),
            trust_domain: id.map(SpiffeIdentity::trust_domain),
            protocol: r.protocol,
            host,
            method: r.method,
            path: r.path.map(path_without_query),
            port: r.port,
            cert,
        }
    }
}

// ---- compiling fields -------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Principal,
    Namespace,
    TrustDomain,
    Host,
    Method,
    Path,
}

fn non_empty(field: &str, len: usize, meaning: &str) -> Result<(), ConfigError> {
    if len == 0 {
        return Err(ConfigError::invalid(
            field,
            "[]",
            format!(
                "empty list: omit the field to mean {meaning}; an empty list is refused so it cannot widen a rule by accident"
            ),
        ));
    }
    Ok(())
}

fn compile_trust_domain(text: &str) -> Result<String, ConfigError> {
    if text.contains(':') || text.contains('/') {
        return Err(ConfigError::invalid(
            "trustDomain",
            text,
            "must be a bare trust domain like `cluster.local`",
        ));
    }
    let td = TrustDomain::new(text).map_err(|e| ConfigError::invalid("trustDomain", text, e))?;
    if td.as_str() != text {
        return Err(ConfigError::invalid(
            "trustDomain",
            text,
            "must be lower case",
        ));
    }
    Ok(td.as_str().to_string())
}

fn check_rule_name(field: &str, name: &str) -> Result<(), ConfigError> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if name.is_empty() || name.len() > MAX_RULE_NAME_BYTES || !ok_chars || name.starts_with('_') {
        return Err(ConfigError::invalid(
            field,
            name,
            format!(
                "rule names are 1-{MAX_RULE_NAME_BYTES} of [A-Za-z0-9_-], not starting with `_`"
            ),
        ));
    }
    Ok(())
}

fn compile_patterns(
    field: &str,
    name: &str,
    list: Option<&[String]>,
    kind: Kind,
    trust_domain: &str,
) -> Result<Option<PatternSet>, ConfigError> {
    let Some(list) = list else {
        return Ok(None);
    };
    let field = format!("{field}.{name}");
    non_empty(&field, list.len(), "no constraint")?;
    let mut set = PatternSet::default();
    for (k, raw) in list.iter().enumerate() {
        let item = format!("{field}[{k}]");
        let pattern = compile_pattern(raw, kind, trust_domain)
            .map_err(|problem| ConfigError::invalid(item, raw, problem))?;
        set.entry(&pattern);
    }
    Ok(Some(set))
}

fn compile_pattern(raw: &str, kind: Kind, trust_domain: &str) -> Result<Pattern, String> {
    if raw.len() > MAX_PATTERN_BYTES {
        return Err(format!("longer than {MAX_PATTERN_BYTES} bytes"));
    }
    let pattern = Pattern::parse(raw).map_err(|e| e.to_string())?;
    let literal = pattern.literal();
    match kind {
        Kind::Principal => compile_principal(&pattern, trust_domain),
        Kind::Namespace => {
            if !literal.bytes().all(is_segment_byte) {
                return Err(
                    "a namespace may only contain [A-Za-z0-9._-]: this can never match".into(),
                );
            }
            Ok(pattern)
        }
        Kind::TrustDomain => {
            if !literal
                .bytes()
                .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'-' | b'_'))
            {
                return Err("a trust domain may only contain [a-z0-9._-] (lower case): this can never match".into());
            }
            Ok(alias_trust_domain(&pattern, literal, trust_domain))
        }
        Kind::Host => {
            if literal
                .bytes()
                .any(|b| b.is_ascii_control() || b == b' ' || b == b'/')
                || !literal.is_ascii()
            {
                return Err("hosts are ASCII without spaces, control characters or `/`".into());
            }
            Ok(pattern.with_literal(&literal.to_ascii_lowercase()))
        }
        Kind::Method => {
            if !literal
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err("methods are HTTP tokens like GET or POST".into());
            }
            Ok(pattern)
        }
        Kind::Path => {
            if literal.bytes().any(|b| b.is_ascii_control() || b == b' ') {
                return Err("paths cannot contain spaces or control characters".into());
            }
            if literal.contains(['?', '#']) {
                return Err(
                    "paths are matched without the query or fragment: this can never match".into(),
                );
            }
            if matches!(pattern, Pattern::Exact(_) | Pattern::Prefix(_))
                && !literal.starts_with('/')
            {
                return Err("exact and prefix paths start with `/`".into());
            }
            Ok(pattern)
        }
    }
}

fn is_segment_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')
}

/// `cluster.local` in a pattern means the configured trust domain.
fn alias_trust_domain(pattern: &Pattern, literal: &str, trust_domain: &str) -> Pattern {
    if trust_domain != ISTIO_DEFAULT_TRUST_DOMAIN
        && matches!(pattern, Pattern::Exact(_))
        && literal == ISTIO_DEFAULT_TRUST_DOMAIN
    {
        return pattern.with_literal(trust_domain);
    }
    pattern.clone()
}

fn compile_principal(pattern: &Pattern, trust_domain: &str) -> Result<Pattern, String> {
    let alias = |lit: &str| -> String {
        match lit.strip_prefix(ISTIO_DEFAULT_TRUST_DOMAIN) {
            Some(rest) if rest.starts_with('/') && trust_domain != ISTIO_DEFAULT_TRUST_DOMAIN => {
                format!("{trust_domain}{rest}")
            }
            _ => lit.to_string(),
        }
    };
    match pattern {
        Pattern::Present => Ok(Pattern::Present),
        Pattern::Exact(lit) => {
            let uri = if lit.starts_with("spiffe://") {
                lit.to_string()
            } else {
                format!("spiffe://{lit}")
            };
            let id = SpiffeIdentity::parse(&uri).map_err(|e| format!("not a SPIFFE ID: {e}"))?;
            Ok(Pattern::Exact(alias(id.principal()).into()))
        }
        Pattern::Prefix(lit) | Pattern::Suffix(lit) => {
            let is_prefix = matches!(pattern, Pattern::Prefix(_));
            let lit = if is_prefix {
                lit.strip_prefix("spiffe://").unwrap_or(lit)
            } else {
                lit
            };
            if lit.is_empty() {
                return Ok(Pattern::Present);
            }
            if !lit.bytes().all(|b| is_segment_byte(b) || b == b'/') {
                return Err("a principal may only contain [A-Za-z0-9._-/] (write `spiffe://` only at the start): this can never match".into());
            }
            let td_part = lit.split('/').next().unwrap_or(lit);
            if td_part.bytes().any(|b| b.is_ascii_uppercase()) {
                return Err("the trust-domain part must be lower case".into());
            }
            Ok(if is_prefix {
                Pattern::Prefix(alias(lit).into())
            } else {
                Pattern::Suffix(lit.into())
            })
        }
    }
}

fn compile_ports(
    field: &str,
    name: &str,
    list: Option<&[PortText]>,
) -> Result<Option<Vec<u16>>, ConfigError> {
    let Some(list) = list else {
        return Ok(None);
    };
    let field = format!("{field}.{name}");
    non_empty(&field, list.len(), "no constraint")?;
    let mut ports = Vec::with_capacity(list.len());
    for (k, PortText(text)) in list.iter().enumerate() {
        let port = text
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0 && !text.starts_with('+'))
            .ok_or_else(|| {
                ConfigError::invalid(
                    format!("{field}[{k}]"),
                    text,
                    "a port is an integer 1-65535 (no wildcards)",
                )
            })?;
        ports.push(port);
    }
    ports.sort_unstable();
    ports.dedup();
    Ok(Some(ports))
}

fn compile_operation(field: &str, op: &Operation) -> Result<OperationMatch, ConfigError> {
    let p = |name, list: &Option<Vec<String>>, kind| {
        compile_patterns(field, name, list.as_deref(), kind, "")
    };
    let out = OperationMatch {
        hosts: p("hosts", &op.hosts, Kind::Host)?,
        not_hosts: p("notHosts", &op.not_hosts, Kind::Host)?,
        ports: compile_ports(field, "ports", op.ports.as_deref())?,
        not_ports: compile_ports(field, "notPorts", op.not_ports.as_deref())?,
        methods: p("methods", &op.methods, Kind::Method)?,
        not_methods: p("notMethods", &op.not_methods, Kind::Method)?,
        paths: p("paths", &op.paths, Kind::Path)?,
        not_paths: p("notPaths", &op.not_paths, Kind::Path)?,
    };
    if !out.has_http_fields() && out.ports.is_none() && out.not_ports.is_none() {
        return Err(ConfigError::invalid(
            field,
            "{}",
            "has no fields: omit `to` to match any operation",
        ));
    }
    Ok(out)
}

fn compile_when(field: &str, when: &When) -> Result<WhenMatch, ConfigError> {
    let d = |name: &str, text: &Option<String>| -> Result<Option<i64>, ConfigError> {
        text.as_deref()
            .map(|t| {
                parse_duration(t).map_err(|e| {
                    ConfigError::invalid(format!("{field}.{name}"), t, format!("duration {e}"))
                })
            })
            .transpose()
    };
    let out = WhenMatch {
        max_cert_age: d("maxCertAge", &when.max_cert_age)?,
        min_remaining: d("minRemainingValidity", &when.min_remaining_validity)?,
    };
    if out.max_cert_age.is_none() && out.min_remaining.is_none() {
        return Err(ConfigError::invalid(
            field,
            "{}",
            "has no conditions: omit `when`",
        ));
    }
    Ok(out)
}
