//! The fixed keys, names and time the targets and their seeds share (also
//! compiled into `seedgen`, which writes the seeds and fixture files).

use crate::der;

/// Separates the parts of a multi-part input.
pub const SEP: &[u8] = b"\0--\0";

/// Joins parts with [`SEP`] (the seeds' inverse of `parts`).
pub fn join(parts: &[&[u8]]) -> Vec<u8> {
    parts.join(SEP)
}

/// "Now" for every target, Unix seconds (2030-03-17): inside the fixtures'
/// validity windows.
pub const NOW: i64 = 1_900_000_000;

/// The PKCS#8 v1 document of an Ed25519 key from its seed (what ring and
/// rcgen read).
pub fn ed25519_pkcs8(seed: &[u8; 32]) -> Vec<u8> {
    let mut out = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    out.extend_from_slice(seed);
    out
}

/// An Ed25519 key pair from a fixed seed (deterministic signatures).
pub fn ed25519(seed: &[u8; 32]) -> ring::signature::Ed25519KeyPair {
    ring::signature::Ed25519KeyPair::from_seed_unchecked(seed).expect("a 32-byte seed")
}

/// The SubjectPublicKeyInfo of an Ed25519 public key.
pub fn ed25519_spki(public: &[u8]) -> Vec<u8> {
    der::seq(&[
        &der::seq(&[&der::tlv(0x06, &[0x2b, 0x65, 0x70])]),
        &der::bit_string(public),
    ])
}

/// Seed of the key that signs CSRs in the `csr` target's signing mode.
pub const CSR_KEY_SEED: [u8; 32] = [0x11; 32];
/// Seed of the Vault fixture's root CA key.
pub const VAULT_ROOT_SEED: [u8; 32] = [0x21; 32];
/// Seed of the Vault fixture's intermediate CA key (it signs leaves).
pub const VAULT_INTERMEDIATE_SEED: [u8; 32] = [0x22; 32];
/// Seed of the key of the CSR the Vault fixture's leaves are issued for.
pub const VAULT_LEAF_SEED: [u8; 32] = [0x23; 32];
/// The SPIFFE ID the Vault fixture's leaves must carry.
pub const VAULT_SPIFFE_ID: &str = "spiffe://cluster.local/ns/default/sa/foo";
/// The DNS name a serving certificate from the Vault fixture carries.
pub const VAULT_DNS_NAME: &str = "meshward-signer.istio-system.svc";
