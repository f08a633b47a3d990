//! CA rotation for the built-in CA's data directory.
//!
//! **Intermediate rotation** (`ca rotate-intermediate`): a new intermediate
//! key and certificate signed by the same root replace `ca-key.pem`,
//! `ca-cert.pem`, `cert-chain.pem`. The root set does not change, so every
//! certificate already issued keeps verifying.
//!
//! **Root rotation** (`ca rotate-root --overlap D`) in three phases, each
//! step a pure decision of [`next_step`] on the persisted [`Phase`] and
//! `now`:
//!
//! 1. *Overlap*: a new root + intermediate are made in `next/`; the bundle
//!    now holds old and new root; issuance stays on the old CA until
//!    `switch_at = now + overlap`, so every relying party has time to learn
//!    the new root before any certificate chains to it.
//! 2. *Draining* (after [`Step::Switch`]): `next/` replaces the CA files,
//!    the old root is kept as `previous-root-cert.pem` and stays in the
//!    bundle; issuance uses the new CA.
//! 3. *Stable* (after [`Step::Retire`]): the old root leaves the bundle only
//!    once the longest certificate it vouches for has expired —
//!    [`retire_after`]: the later of the ledger's latest notAfter among
//!    certificates issued before the switch took effect, and
//!    `switched_at + reload_grace + max_ttl` (the policy bound, which also
//!    covers a pruned or disabled ledger).
//!
//! Every file write is atomic; a crash in the middle of a switch leaves
//! `rotation.json` in *Overlap* with part of `next/` moved, and the next
//! [`CaDir::tick`] finishes the moves (the built-in CA refuses to load a
//! mismatched key/certificate pair meanwhile, so nothing signs with half a
//! CA).

pub mod live;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::dir::write_atomic;
use crate::issuer::builtin::{BuiltinIssuer, BuiltinOptions, generate_ca_key};

/// The persisted rotation state file in the data directory.
pub const STATE_FILE: &str = "rotation.json";
/// Where the next CA waits during the overlap.
pub const NEXT_DIR: &str = "next";
/// The old root, kept in the bundle while draining.
pub const PREVIOUS_ROOT: &str = "previous-root-cert.pem";
/// The files the built-in CA keeps; moved from `next/` in this order (keys
/// first, so a certificate never lands without its key).
const CA_FILES: [&str; 5] = [
    "root-key.pem",
    "ca-key.pem",
    "root-cert.pem",
    "ca-cert.pem",
    "cert-chain.pem",
];

/// Where a root rotation stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "phase", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Phase {
    /// One root; no rotation in progress.
    #[default]
    Stable,
    /// New root published, issuance still on the old CA.
    Overlap {
        /// When `ca rotate-root` ran (Unix seconds).
        started_at: i64,
        /// When issuance switches to the new CA (Unix seconds).
        switch_at: i64,
    },
    /// Issuance on the new CA; old root still trusted.
    Draining {
        /// When the switch happened (Unix seconds).
        switched_at: i64,
    },
}

/// What [`next_step`] says to do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing is due.
    Wait,
    /// Move `next/` into place and start draining.
    Switch,
    /// Drop the old root from the bundle.
    Retire,
}

/// The pure decision: given the phase, `now`, and (while draining) when the
/// old root may go, what is due.
pub fn next_step(phase: &Phase, now: i64, retire_at: Option<i64>) -> Step {
    match phase {
        Phase::Stable => Step::Wait,
        Phase::Overlap { switch_at, .. } if now >= *switch_at => Step::Switch,
        Phase::Overlap { .. } => Step::Wait,
        Phase::Draining { .. } => match retire_at {
            Some(t) if now >= t => Step::Retire,
            _ => Step::Wait,
        },
    }
}

/// When the old root may leave the bundle: the later of the policy bound
/// (`switched_at + reload_grace + max_ttl`) and the latest notAfter the
/// ledger knows among certificates issued before the switch took effect.
pub fn retire_after(
    switched_at: i64,
    max_ttl: Duration,
    reload_grace: Duration,
    ledger_latest_not_after: Option<i64>,
) -> i64 {
    let secs = |d: Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
    let bound = switched_at
        .saturating_add(secs(reload_grace))
        .saturating_add(secs(max_ttl));
    ledger_latest_not_after.map_or(bound, |l| l.max(bound))
}

/// Why a rotation step failed.
#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    /// File system trouble.
    #[error("CA data {path}: {reason}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The command does not fit the current phase.
    #[error("{0}")]
    WrongPhase(String),
    /// Key generation, signing or loading failed.
    #[error("CA material: {0}")]
    Ca(String),
}

fn io(path: &Path, e: impl std::fmt::Display) -> RotationError {
    RotationError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// A built-in CA data directory, as rotation sees it.
#[derive(Debug, Clone)]
pub struct CaDir {
    opts: BuiltinOptions,
}

/// What [`CaDir::tick`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TickOutcome {
    /// Nothing was due.
    Unchanged,
    /// Issuance switched to the new CA (reload the issuer, publish the bundle).
    Switched,
    /// The old root left the bundle (publish the bundle).
    Retired,
}

impl CaDir {
    /// The data directory `opts.data_dir` with the built-in CA's settings
    /// (used for new keys and certificates).
    pub fn new(opts: BuiltinOptions) -> Self {
        Self { opts }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.opts.data_dir.join(name)
    }

    /// The rotation state file (`rotation.json`).
    pub fn state_path(&self) -> PathBuf {
        self.path(STATE_FILE)
    }

    /// The persisted phase (`Stable` when there is no state file).
    pub fn phase(&self) -> Result<Phase, RotationError> {
        let p = self.path(STATE_FILE);
        match fs::read_to_string(&p) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| io(&p, format!("invalid: {e}"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Phase::Stable),
            Err(e) => Err(io(&p, e)),
        }
    }

    fn set_phase(&self, phase: &Phase) -> Result<(), RotationError> {
        let text =
            serde_json::to_string_pretty(phase).map_err(|e| RotationError::Ca(e.to_string()))?;
        write_atomic(&self.opts.data_dir, STATE_FILE, text.as_bytes())
            .map_err(|e| io(&self.path(STATE_FILE), e))
    }

    /// The roots relying parties must trust now: the current root, plus the
    /// next one during the overlap, plus the previous one while draining.
    pub fn trust_roots(&self) -> Result<Vec<CertificateDer<'static>>, RotationError> {
        let mut roots = vec![read_cert(&self.path("root-cert.pem"))?];
        match self.phase()? {
            Phase::Stable => {}
            Phase::Overlap { .. } => {
                let next = self.opts.data_dir.join(NEXT_DIR).join("root-cert.pem");
                if next.exists() {
                    roots.push(read_cert(&next)?);
                }
                // Mid-switch crash: the old root may already be saved.
                let prev = self.path(PREVIOUS_ROOT);
                if prev.exists() {
                    roots.push(read_cert(&prev)?);
                }
            }
            Phase::Draining { .. } => roots.push(read_cert(&self.path(PREVIOUS_ROOT))?),
        }
        let mut unique: Vec<CertificateDer<'static>> = Vec::with_capacity(roots.len());
        for r in roots {
            if !unique.contains(&r) {
                unique.push(r);
            }
        }
        Ok(unique)
    }

    /// Replace the intermediate with a new one signed by the same root.
    /// Refused during a root rotation.
    pub fn rotate_intermediate(&self, now: OffsetDateTime) -> Result<(), RotationError> {
        if self.phase()? != Phase::Stable {
            return Err(RotationError::WrongPhase(
                "a root rotation is in progress; rotate the intermediate after it completes".into(),
            ));
        }
        let root_pem = read_string(&self.path("root-cert.pem"))?;
        let root_der = read_cert(&self.path("root-cert.pem"))?;
        let root_key = KeyPair::from_pem(&read_string(&self.path("root-key.pem"))?)
            .map_err(|e| RotationError::Ca(format!("root key: {e}")))?;
        let (_, root) = x509_parser::parse_x509_certificate(&root_der)
            .map_err(|e| RotationError::Ca(format!("root certificate: {e}")))?;
        let root_not_after = root.validity().not_after.to_datetime();
        let issuer = rcgen::Issuer::from_ca_cert_der(&root_der, root_key)
            .map_err(|e| RotationError::Ca(format!("root cannot sign: {e}")))?;
        let key = generate_ca_key(self.opts.key_algorithm)
            .map_err(|e| RotationError::Ca(e.to_string()))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, self.opts.organization.as_str());
        dn.push(DnType::CommonName, "meshward intermediate CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(crate::issuer::random_serial());
        params.use_authority_key_identifier_extension = true;
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = (now + self.opts.intermediate_ttl).min(root_not_after);
        if params.not_after <= now {
            return Err(RotationError::Ca(
                "the root has expired: rotate the root instead".into(),
            ));
        }
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(|e| RotationError::Ca(format!("signing the intermediate: {e}")))?;
        let dir = &self.opts.data_dir;
        let chain = format!("{}{}", cert.pem(), root_pem);
        // Key first: a crash after it leaves a key/cert mismatch the loader
        // refuses (never a certificate whose key is lost); rerun to finish.
        write_key(dir, "ca-key.pem", key.serialize_pem().as_bytes())?;
        write_atomic(dir, "ca-cert.pem", cert.pem().as_bytes()).map_err(|e| io(dir, e))?;
        write_atomic(dir, "cert-chain.pem", chain.as_bytes()).map_err(|e| io(dir, e))?;
        Ok(())
    }

    /// Start a root rotation: make the next CA in `next/` and publish its
    /// root alongside the current one; issuance switches at `now + overlap`.
    pub fn rotate_root(
        &self,
        now: OffsetDateTime,
        overlap: Duration,
    ) -> Result<Phase, RotationError> {
        if self.phase()? != Phase::Stable {
            return Err(RotationError::WrongPhase(
                "a root rotation is already in progress".into(),
            ));
        }
        let next_dir = self.opts.data_dir.join(NEXT_DIR);
        if next_dir.exists() {
            fs::remove_dir_all(&next_dir).map_err(|e| io(&next_dir, e))?;
        }
        let mut next = self.opts.clone();
        next.data_dir = next_dir;
        BuiltinIssuer::load_or_create(&next, now).map_err(|e| RotationError::Ca(e.to_string()))?;
        let t = now.unix_timestamp();
        let phase = Phase::Overlap {
            started_at: t,
            switch_at: t.saturating_add(i64::try_from(overlap.as_secs()).unwrap_or(i64::MAX)),
        };
        self.set_phase(&phase)?;
        Ok(phase)
    }

    /// Do what is due at `now`. `retire_at` is asked only while draining,
    /// with the switch time, and answers when the old root may go (see
    /// [`retire_after`]; the caller consults the ledger).
    pub fn tick(
        &self,
        now: OffsetDateTime,
        retire_at: impl FnOnce(i64) -> Option<i64>,
    ) -> Result<TickOutcome, RotationError> {
        let phase = self.phase()?;
        let retire = match &phase {
            Phase::Draining { switched_at } => retire_at(*switched_at),
            _ => None,
        };
        match next_step(&phase, now.unix_timestamp(), retire) {
            Step::Wait => Ok(TickOutcome::Unchanged),
            Step::Switch => {
                self.switch(now)?;
                Ok(TickOutcome::Switched)
            }
            Step::Retire => {
                let prev = self.path(PREVIOUS_ROOT);
                self.set_phase(&Phase::Stable)?;
                match fs::remove_file(&prev) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io(&prev, e)),
                }
                Ok(TickOutcome::Retired)
            }
        }
    }

    fn switch(&self, now: OffsetDateTime) -> Result<(), RotationError> {
        let dir = &self.opts.data_dir;
        let next_dir = dir.join(NEXT_DIR);
        let prev = self.path(PREVIOUS_ROOT);
        // Save the old root once (a rerun after a crash must not overwrite it
        // with the new one).
        if !prev.exists() {
            let old = read_string(&self.path("root-cert.pem"))?;
            write_atomic(dir, PREVIOUS_ROOT, old.as_bytes()).map_err(|e| io(&prev, e))?;
        }
        for f in CA_FILES {
            let from = next_dir.join(f);
            if from.exists() {
                fs::rename(&from, dir.join(f)).map_err(|e| io(&from, e))?;
            }
        }
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io(dir, e))?;
        if next_dir.exists() {
            fs::remove_dir_all(&next_dir).map_err(|e| io(&next_dir, e))?;
        }
        self.set_phase(&Phase::Draining {
            switched_at: now.unix_timestamp(),
        })
    }
}

fn read_string(path: &Path) -> Result<String, RotationError> {
    fs::read_to_string(path).map_err(|e| io(path, e))
}

fn read_cert(path: &Path) -> Result<CertificateDer<'static>, RotationError> {
    let text = read_string(path)?;
    let block = pem::parse(text.as_bytes()).map_err(|e| io(path, format!("not PEM: {e}")))?;
    Ok(CertificateDer::from(block.into_contents()))
}

fn write_key(dir: &Path, name: &str, data: &[u8]) -> Result<(), RotationError> {
    use std::os::unix::fs::PermissionsExt;
    write_atomic(dir, name, data).map_err(|e| io(dir, e))?;
    let p = dir.join(name);
    fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).map_err(|e| io(&p, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_switches_only_at_switch_time() {
        let p = Phase::Overlap {
            started_at: 0,
            switch_at: 100,
        };
        assert_eq!(next_step(&p, 99, None), Step::Wait);
        assert_eq!(next_step(&p, 100, None), Step::Switch);
        assert_eq!(next_step(&Phase::Stable, 1_000_000, Some(0)), Step::Wait);
    }

    #[test]
    fn old_root_is_kept_until_the_longest_issued_certificate_expired() {
        let d = Phase::Draining { switched_at: 1_000 };
        // Policy bound: 1000 + 60 grace + 86400 max TTL.
        let bound = retire_after(
            1_000,
            Duration::from_secs(86_400),
            Duration::from_secs(60),
            None,
        );
        assert_eq!(bound, 87_460);
        assert_eq!(next_step(&d, bound - 1, Some(bound)), Step::Wait);
        assert_eq!(next_step(&d, bound, Some(bound)), Step::Retire);
        // A ledger record outliving the bound (e.g. max_ttl lowered since) wins.
        let later = retire_after(
            1_000,
            Duration::from_secs(86_400),
            Duration::from_secs(60),
            Some(200_000),
        );
        assert_eq!(later, 200_000);
        assert_eq!(next_step(&d, 199_999, Some(later)), Step::Wait);
        // An unknown retire time never retires.
        assert_eq!(next_step(&d, i64::MAX, None), Step::Wait);
    }
}

/// `meshward-signer ca ...`: rotation commands run against the built-in
/// CA's data directory. A running signer notices within
/// `bundle.rotation_check_interval` and publishes the new bundle.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum CaCommand {
    /// Replace the intermediate with a new one signed by the same root.
    RotateIntermediate,
    /// Start a root rotation: publish a new root now, switch issuance to it
    /// after the overlap, drop the old root once every certificate it
    /// vouches for has expired.
    RotateRoot {
        /// How long both roots are published before issuance switches
        /// (default: `bundle.rotation_overlap`).
        #[arg(long, value_parser = humantime::parse_duration)]
        overlap: Option<Duration>,
    },
    /// Show the rotation phase and the trusted roots (with `ca.backend =
    /// "cacerts"`: what `check-cacerts` says of the configured directory;
    /// with `"vault"`: the Vault path, the login and the roots of
    /// `roots_file`).
    Status,
    /// Check a plugged-in CA directory (a new `cacerts` Secret, or istiod's
    /// `istio-ca-secret`) as the signer would load it, before rolling it
    /// out: the signing CA, its chain, the roots workloads will trust, or
    /// why it would be refused (non-zero exit). Default: `[ca.cacerts] dir`.
    CheckCacerts {
        /// The directory (the Secret's files).
        dir: Option<PathBuf>,
    },
    /// Check the configured `[ca.vault]` against the real Vault before a
    /// rollout: its files, a login with its credentials, and that the PKI
    /// mount's issuing CA chains to `roots_file` (non-zero exit otherwise).
    /// Signs nothing.
    CheckVault,
    #[command(flatten)]
    Revocation(crate::revocation::RevocationCommand),
}

/// Run a [`CaCommand`] for `config` at `now`; returns what to print.
pub fn run_ca_command(
    cmd: &CaCommand,
    config: &crate::config::Config,
    now: OffsetDateTime,
) -> Result<String, RotationError> {
    let plugged_in = |dir: Option<&Path>| {
        let dir = dir
            .or(config.ca.cacerts.as_ref().map(|c| c.dir.as_path()))
            .ok_or_else(|| {
                RotationError::WrongPhase(
                    "no directory given and no [ca.cacerts] dir configured".to_string(),
                )
            })?;
        crate::issuer::cacerts::describe(dir, now).map_err(|e| RotationError::Ca(e.to_string()))
    };
    match cmd {
        CaCommand::CheckVault | CaCommand::Revocation(_) => {
            return Err(RotationError::WrongPhase(
                "ca check-vault and the revocation commands are async: run them with the meshward-signer command"
                    .to_string(),
            ));
        }
        CaCommand::CheckCacerts { dir } => return plugged_in(dir.as_deref()),
        CaCommand::Status if config.ca.backend == "cacerts" => return plugged_in(None),
        CaCommand::Status if config.ca.backend == "vault" => {
            let vault = config.ca.vault.as_ref().ok_or_else(|| {
                RotationError::WrongPhase("ca.backend is vault but [ca.vault] is missing".into())
            })?;
            return crate::issuer::vault::describe(vault)
                .map_err(|e| RotationError::Ca(e.to_string()));
        }
        _ => {}
    }
    if config.ca.backend != "builtin" {
        return Err(RotationError::WrongPhase(format!(
            "ca.backend is {:?}: rotate a plugged-in or Vault CA where its keys live; these commands manage the built-in CA",
            config.ca.backend
        )));
    }
    let dir = CaDir::new(BuiltinOptions {
        data_dir: config.ca.data_dir.clone(),
        key_algorithm: config.ca.key_algorithm,
        organization: config.trust_domain.clone(),
        root_ttl: config.ca.root_ttl,
        intermediate_ttl: config.ca.intermediate_ttl,
    });
    // Make sure a CA exists (and is whole) before touching it.
    BuiltinIssuer::load_or_create(&dir.opts, now).map_err(|e| RotationError::Ca(e.to_string()))?;
    let mut out = String::new();
    match cmd {
        CaCommand::RotateIntermediate => {
            dir.rotate_intermediate(now)?;
            out.push_str(
                "intermediate rotated; a running signer switches at its next rotation check\n",
            );
        }
        CaCommand::RotateRoot { overlap } => {
            let overlap = overlap.unwrap_or(config.bundle.rotation_overlap);
            let phase = dir.rotate_root(now, overlap)?;
            out.push_str(&format!(
                "new root published; issuance switches after {} ({phase:?})\n",
                humantime::format_duration(overlap)
            ));
        }
        CaCommand::Status
        | CaCommand::CheckCacerts { .. }
        | CaCommand::CheckVault
        | CaCommand::Revocation(_) => {}
    }
    out.push_str(&format!("phase: {:?}\n", dir.phase()?));
    for r in dir.trust_roots()? {
        let (_, c) = x509_parser::parse_x509_certificate(&r)
            .map_err(|e| RotationError::Ca(e.to_string()))?;
        out.push_str(&format!(
            "trusted root: {} not after {} sha256 {}\n",
            c.subject(),
            c.validity().not_after,
            crate::ledger::CertDigest::of(&r)
        ));
    }
    Ok(out)
}
