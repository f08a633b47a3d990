//! The proxy-wasm ABI's serialized header map, read in place: a
//! little-endian `u32` count N, then N × (`u32` name length, `u32` value
//! length), then every name and every value each followed by a NUL byte.
//! The shim asks the host for a request's whole header map in one call and
//! finds the few headers it needs here, without copying any of them.

use std::ops::Range;

/// The buffer does not follow the format (the host broke the ABI).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MalformedPairs(pub &'static str);

impl std::fmt::Display for MalformedPairs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed header map: {}", self.0)
    }
}

fn u32_at(buf: &[u8], at: usize) -> Result<usize, MalformedPairs> {
    let bytes = buf
        .get(at..at.checked_add(4).ok_or(MalformedPairs("size overflow"))?)
        .ok_or(MalformedPairs("truncated size table"))?;
    let mut le = [0u8; 4];
    le.copy_from_slice(bytes);
    usize::try_from(u32::from_le_bytes(le)).map_err(|_| MalformedPairs("size out of range"))
}

/// Calls `f(name, value)` with the byte ranges of every pair of `buf`, in
/// order. An empty buffer is an empty map. Every range is checked to lie
/// inside `buf` before `f` sees it, and the whole buffer must be used.
pub fn for_each_pair(
    buf: &[u8],
    mut f: impl FnMut(Range<usize>, Range<usize>),
) -> Result<(), MalformedPairs> {
    if buf.is_empty() {
        return Ok(());
    }
    let count = u32_at(buf, 0)?;
    // Each pair needs 8 bytes of sizes and 2 NULs: a count the buffer cannot
    // hold is refused before anything is read.
    if count > buf.len() / 10 {
        return Err(MalformedPairs("more pairs than the buffer can hold"));
    }
    let mut data = 4 + count * 8;
    for i in 0..count {
        let name_len = u32_at(buf, 4 + i * 8)?;
        let value_len = u32_at(buf, 8 + i * 8)?;
        let name = data..data
            .checked_add(name_len)
            .ok_or(MalformedPairs("size overflow"))?;
        let value_start = name.end + 1;
        let value = value_start
            ..value_start
                .checked_add(value_len)
                .ok_or(MalformedPairs("size overflow"))?;
        if buf.get(name.end) != Some(&0) || buf.get(value.end) != Some(&0) {
            return Err(MalformedPairs("name or value not NUL-terminated"));
        }
        data = value.end + 1;
        f(name, value);
    }
    if data != buf.len() {
        return Err(MalformedPairs("trailing bytes"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serialize(pairs: &[(&str, &str)]) -> Vec<u8> {
        let mut out = (pairs.len() as u32).to_le_bytes().to_vec();
        for (k, v) in pairs {
            out.extend_from_slice(&(k.len() as u32).to_le_bytes());
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        }
        for (k, v) in pairs {
            out.extend_from_slice(k.as_bytes());
            out.push(0);
            out.extend_from_slice(v.as_bytes());
            out.push(0);
        }
        out
    }

    fn collect(buf: &[u8]) -> Result<Vec<(String, String)>, MalformedPairs> {
        let mut out = Vec::new();
        for_each_pair(buf, |k, v| {
            out.push((
                String::from_utf8_lossy(&buf[k]).into_owned(),
                String::from_utf8_lossy(&buf[v]).into_owned(),
            ));
        })?;
        Ok(out)
    }

    #[test]
    fn pairs_are_read_in_order_with_empty_values() {
        let pairs = [(":path", "/a"), ("x-empty", ""), (":method", "GET")];
        let got = collect(&serialize(&pairs)).unwrap();
        let want: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect();
        assert_eq!(got, want);
        assert_eq!(collect(&[]).unwrap(), vec![]);
        assert_eq!(collect(&serialize(&[])).unwrap(), vec![]);
    }

    /// A host that breaks the format must produce an error (the request is
    /// denied), never a panic or a read outside the buffer.
    #[test]
    fn malformed_header_map_from_the_host_is_an_error_not_a_panic() {
        let good = serialize(&[(":path", "/a"), ("b", "c")]);
        // Every truncation and every single-byte corruption of a valid map.
        for cut in 1..good.len() {
            assert!(collect(&good[..cut]).is_err(), "truncated at {cut}");
        }
        for at in 0..good.len() {
            for byte in [0u8, 1, 0x7f, 0xff] {
                let mut bad = good.clone();
                bad[at] = byte;
                let _ = collect(&bad);
            }
        }
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(collect(&trailing).is_err());
        // Counts and sizes near u32::MAX.
        let mut huge = u32::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(&[0; 16]);
        assert!(collect(&huge).is_err());
        let mut huge_len = 1u32.to_le_bytes().to_vec();
        huge_len.extend_from_slice(&u32::MAX.to_le_bytes());
        huge_len.extend_from_slice(&u32::MAX.to_le_bytes());
        huge_len.extend_from_slice(&[0; 4]);
        assert!(collect(&huge_len).is_err());
    }
}
