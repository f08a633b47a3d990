//! Just enough DER to wrap a fuzzed to-be-signed body into a signed
//! structure (`SEQUENCE { tbs, algorithm, BIT STRING signature }`), so the
//! checks after a signature verification are reached with mutated contents.

/// One TLV with a definite, minimal length.
pub fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
    out
}

/// A SEQUENCE of already-encoded elements.
pub fn seq(items: &[&[u8]]) -> Vec<u8> {
    tlv(0x30, &items.concat())
}

/// A BIT STRING with no unused bits.
pub fn bit_string(bytes: &[u8]) -> Vec<u8> {
    let mut content = vec![0];
    content.extend_from_slice(bytes);
    tlv(0x03, &content)
}

/// `AlgorithmIdentifier { id-Ed25519 }`.
pub fn ed25519_algorithm() -> Vec<u8> {
    seq(&[&tlv(0x06, &[0x2b, 0x65, 0x70])])
}

/// `SEQUENCE { tbs, id-Ed25519, signature }` signed by `key`: a signed
/// CSR or certificate whatever `tbs` holds.
pub fn sign_ed25519(tbs: &[u8], key: &ring::signature::Ed25519KeyPair) -> Vec<u8> {
    let signature = key.sign(tbs);
    seq(&[tbs, &ed25519_algorithm(), &bit_string(signature.as_ref())])
}

/// The first element inside the outer SEQUENCE of `signed` (the
/// to-be-signed part of a CSR or certificate), for making seeds.
pub fn first_inner(signed: &[u8]) -> Option<&[u8]> {
    let (_, content) = split_tlv(signed)?;
    let (tag_len, _) = split_tlv(content)?;
    content.get(..tag_len)
}

/// (total length of the first TLV, its content).
fn split_tlv(input: &[u8]) -> Option<(usize, &[u8])> {
    let first = *input.get(1)?;
    let (header, len) = if first < 0x80 {
        (2, usize::from(first))
    } else {
        let n = usize::from(first & 0x7f);
        let mut len = 0usize;
        for b in input.get(2..2 + n)? {
            len = len.checked_mul(256)?.checked_add(usize::from(*b))?;
        }
        (2 + n, len)
    };
    let content = input.get(header..header.checked_add(len)?)?;
    Some((header + len, content))
}
