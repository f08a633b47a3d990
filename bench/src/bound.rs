//! The hardware bound from `openssl speed`: how many "verify one CSR
//! signature + sign one certificate" a single core can do for a key type.
//!
//! `openssl speed -mr` reports operations per second of *CPU time* of its one
//! thread (`+R<n>:<count>:<bits>:<cpu seconds>`), so its figures are per core
//! and hold even on a machine other processes are using.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

/// Sign and verify rates of one algorithm on one core.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Rates {
    /// Signatures per CPU-second.
    pub sign_per_s: f64,
    /// Verifications per CPU-second.
    pub verify_per_s: f64,
}

impl Rates {
    /// One verify plus one sign, per CPU-second: `1 / (1/sign + 1/verify)`.
    pub fn verify_and_sign_per_s(&self) -> f64 {
        1.0 / (1.0 / self.sign_per_s + 1.0 / self.verify_per_s)
    }
}

/// What `openssl speed` measured.
#[derive(Debug, Clone, Serialize)]
pub struct OpensslSpeed {
    /// `openssl version`.
    pub version: String,
    /// `-seconds` used per operation.
    pub seconds: u32,
    /// ECDSA P-256 (`ecdsap256`).
    pub p256: Rates,
    /// RSA-2048 (`rsa2048`).
    pub rsa2048: Rates,
}

/// Run `openssl speed -mr -seconds <seconds> ecdsap256 rsa2048`.
pub fn measure(seconds: u32) -> anyhow::Result<OpensslSpeed> {
    let version = Command::new("openssl")
        .arg("version")
        .output()
        .context("running `openssl version` (is openssl installed?)")?;
    let version = String::from_utf8_lossy(&version.stdout).trim().to_string();
    let out = Command::new("openssl")
        .args(["speed", "-mr", "-seconds", &seconds.to_string()])
        .args(["ecdsap256", "rsa2048"])
        .output()
        .context("running `openssl speed`")?;
    if !out.status.success() {
        bail!(
            "openssl speed failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Depending on the version the -mr lines go to stdout or stderr.
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let (p256, rsa2048) = parse_mr(&text)?;
    Ok(OpensslSpeed {
        version,
        seconds,
        p256,
        rsa2048,
    })
}

/// The signer's own crypto (ring, in this process, one thread): P-256 sign
/// and verify rates per CPU-second of the measuring thread, each timed for
/// about `seconds`. The signer verifies each CSR and signs each leaf with
/// exactly these calls, so `1 / verify_and_sign_per_s` is the crypto part of
/// a certificate's signer CPU.
pub fn ring_p256(seconds: f64) -> anyhow::Result<Rates> {
    std::thread::spawn(move || ring_p256_on_this_thread(seconds))
        .join()
        .map_err(|_| anyhow::anyhow!("the ring measuring thread panicked"))?
}

fn ring_p256_on_this_thread(seconds: f64) -> anyhow::Result<Rates> {
    use ring::rand::SystemRandom;
    use ring::signature::{
        ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair,
        UnparsedPublicKey,
    };
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
        .map_err(|_| anyhow::anyhow!("generating a P-256 key"))?;
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng)
        .map_err(|_| anyhow::anyhow!("loading the P-256 key"))?;
    // About the size of a leaf's TBSCertificate / a CSR's CertificationRequestInfo.
    let message = [0x5a_u8; 400];
    let signature = key
        .sign(&rng, &message)
        .map_err(|_| anyhow::anyhow!("signing"))?;
    let public = UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, key.public_key().as_ref());
    let budget = Duration::from_secs_f64(seconds.max(0.05));
    let sign_per_s = per_cpu_second(budget, || key.sign(&rng, &message).is_ok())?;
    let verify_per_s = per_cpu_second(budget, || {
        public.verify(&message, signature.as_ref()).is_ok()
    })?;
    Ok(Rates {
        sign_per_s,
        verify_per_s,
    })
}

/// Runs `op` for about `budget` of wall time; operations per CPU-second of
/// this thread (`/proc/thread-self/stat`). Every call must succeed.
fn per_cpu_second(budget: Duration, mut op: impl FnMut() -> bool) -> anyhow::Result<f64> {
    let cpu = || crate::signer_proc::process_cpu_time("/proc/thread-self/stat");
    let (cpu0, t0) = (cpu()?, Instant::now());
    let mut done: u64 = 0;
    while t0.elapsed() < budget {
        for _ in 0..64 {
            if !op() {
                bail!("a ring operation failed while being timed");
            }
        }
        done += 64;
    }
    let used = cpu()?.saturating_sub(cpu0).as_secs_f64();
    // /proc counts in clock ticks (10 ms): a thread descheduled for the whole
    // budget would read 0.
    if used <= 0.0 {
        bail!("no CPU time measured for the ring operations");
    }
    Ok(done as f64 / used)
}

/// Parse the machine-readable summary lines of `openssl speed -mr`:
/// `+F2:<i>:<bits>:<sign/s>:<verify/s>` (RSA) and
/// `+F4:<i>:<bits>:<sign/s>:<verify/s>` (ECDSA). Returns (P-256, RSA-2048).
pub fn parse_mr(text: &str) -> anyhow::Result<(Rates, Rates)> {
    let mut p256 = None;
    let mut rsa = None;
    for line in text.lines() {
        let fields: Vec<&str> = line.trim().split(':').collect();
        let [tag, _index, bits, sign, verify, ..] = fields.as_slice() else {
            continue;
        };
        let slot = match (*tag, *bits) {
            ("+F2", "2048") => &mut rsa,
            ("+F4", "256") => &mut p256,
            _ => continue,
        };
        let rates = Rates {
            sign_per_s: sign
                .parse()
                .with_context(|| format!("sign rate in {line:?}"))?,
            verify_per_s: verify
                .parse()
                .with_context(|| format!("verify rate in {line:?}"))?,
        };
        if !(rates.sign_per_s > 0.0 && rates.verify_per_s > 0.0) {
            bail!("non-positive rate in {line:?}");
        }
        *slot = Some(rates);
    }
    match (p256, rsa) {
        (Some(p), Some(r)) => Ok((p, r)),
        (None, _) => bail!("no ECDSA P-256 summary line (+F4:…:256:…) in openssl speed output"),
        (_, None) => bail!("no RSA-2048 summary line (+F2:…:2048:…) in openssl speed output"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Real output of `openssl speed -mr -seconds 1 ecdsap256 rsa2048`
    /// (OpenSSL 3.0).
    const OPENSSL_3_0: &str = "+DTP:2048:private:rsa:1
+R1:1740:2048:0.44
+DTP:2048:public:rsa:1
+R2:30067:2048:0.50
+DTP:256:sign:ecdsa:1
+R5:24731:256:0.51
+DTP:256:verify:ecdsa:1
+R6:7527:256:0.46
+F2:2:2048:3954.545455:60134.000000
+F4:3:256:48492.156863:16363.043478
";

    #[test]
    fn parses_openssl_3_machine_readable_summary() {
        let (p256, rsa) = parse_mr(OPENSSL_3_0).unwrap();
        assert_eq!(p256.sign_per_s, 48492.156863);
        assert_eq!(p256.verify_per_s, 16363.043478);
        assert_eq!(rsa.sign_per_s, 3954.545455);
        assert_eq!(rsa.verify_per_s, 60134.0);
    }

    #[test]
    fn verify_plus_sign_is_the_harmonic_combination() {
        let r = Rates {
            sign_per_s: 1000.0,
            verify_per_s: 1000.0,
        };
        assert!((r.verify_and_sign_per_s() - 500.0).abs() < 1e-9);
    }

    #[test]
    fn missing_or_garbled_lines_are_errors_not_zero_rates() {
        assert!(parse_mr("+F4:3:256:48492.1:16363.0\n").is_err());
        assert!(parse_mr("+F2:2:2048:x:1\n+F4:3:256:1:1\n").is_err());
        assert!(parse_mr("+F2:2:2048:0:1\n+F4:3:256:1:1\n").is_err());
        assert!(parse_mr("").is_err());
    }
}
