//! What the vault backend counts: signings by outcome, logins, renewals, and
//! whether requests are currently failed fast.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Result of one signing through Vault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Vault signed and the result passed the checks.
    Signed,
    /// Vault (the role) refused the request.
    Refused,
    /// Vault down, slow, or the circuit open.
    Unavailable,
    /// Vault's answer was unusable or failed the checks.
    Failed,
}

impl Outcome {
    fn label(self) -> OutcomeLabel {
        OutcomeLabel {
            outcome: match self {
                Outcome::Signed => "signed",
                Outcome::Refused => "refused",
                Outcome::Unavailable => "unavailable",
                Outcome::Failed => "failed",
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

/// The vault backend's metrics; clones share the same values.
#[derive(Debug, Clone, Default)]
pub struct VaultMetrics {
    signings: Family<OutcomeLabel, Counter>,
    /// Logins (AppRole, Kubernetes auth) or token (re)reads.
    pub logins: Counter,
    /// Successful `renew-self` calls.
    pub renewals: Counter,
    /// Changed `roots_file` contents taken.
    pub roots_reloads: Counter,
    /// Changed `roots_file` contents refused (the current roots stay).
    roots_reload_failures: Counter,
    /// The last refusal's text, so an unchanged bad file is counted and
    /// logged once, not at every check.
    last_roots_failure: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    circuit_open: Gauge,
}

impl VaultMetrics {
    /// Counts one signing.
    pub fn record(&self, outcome: Outcome) {
        self.signings.get_or_create(&outcome.label()).inc();
    }

    /// Signings counted with `outcome`.
    pub fn count(&self, outcome: Outcome) -> u64 {
        self.signings.get_or_create(&outcome.label()).get()
    }

    /// Counts a refused `roots_file` once per distinct failure; returns
    /// whether it is new (worth a log line).
    pub fn note_roots_failure(&self, error: &str) -> bool {
        let mut last = match self.last_roots_failure.lock() {
            Ok(l) => l,
            Err(p) => p.into_inner(),
        };
        if last.as_deref() == Some(error) {
            return false;
        }
        *last = Some(error.to_owned());
        self.roots_reload_failures.inc();
        true
    }

    /// Records whether requests are being failed fast.
    pub fn set_circuit_open(&self, open: bool) {
        self.circuit_open.set(i64::from(open));
    }

    /// Adds the metrics to `registry` under `vault_` (in the signer:
    /// `meshward_signer_vault_signings_total{outcome}`, `..._logins_total`,
    /// `..._renewals_total`, `..._roots_reloads_total`,
    /// `..._roots_reload_failures_total`, `meshward_signer_vault_circuit_open`).
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("vault");
        r.register(
            "signings",
            "Signings through Vault by outcome",
            self.signings.clone(),
        );
        r.register("logins", "Vault logins / token reads", self.logins.clone());
        r.register(
            "renewals",
            "Vault token renewals (renew-self)",
            self.renewals.clone(),
        );
        r.register(
            "roots_reloads",
            "Changed Vault roots_file contents taken (the trust bundle follows)",
            self.roots_reloads.clone(),
        );
        r.register(
            "roots_reload_failures",
            "Changed Vault roots_file contents refused; the current roots stay",
            self.roots_reload_failures.clone(),
        );
        r.register(
            "circuit_open",
            "1 while Vault requests are failed fast after repeated failures",
            self.circuit_open.clone(),
        );
    }
}
