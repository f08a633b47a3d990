//! Properties (Envoy "attributes") a plugin reads with `proxy_get_property`.
//!
//! Encodings follow Envoy: strings raw, integers 8-byte little-endian, bools one
//! byte, maps in the ABI's serialized-pairs format, paths split on NUL.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::abi::serialize_pairs;

/// One property value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PropValue {
    /// A string, returned raw.
    Str(String),
    /// An integer, returned as 8 bytes little-endian.
    Int(i64),
    /// A boolean, returned as one byte.
    Bool(bool),
    /// Opaque bytes (also what `proxy_set_property` stores).
    Bytes(Vec<u8>),
    /// A string map (e.g. `request.headers`), returned as serialized pairs;
    /// a further path segment selects one entry.
    Map(Vec<(String, String)>),
}

impl PropValue {
    /// The bytes the guest receives.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }

    /// [`PropValue::encode`], appended to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            PropValue::Str(s) => out.extend_from_slice(s.as_bytes()),
            PropValue::Int(i) => out.extend_from_slice(&i.to_le_bytes()),
            PropValue::Bool(b) => out.push(u8::from(*b)),
            PropValue::Bytes(b) => out.extend_from_slice(b),
            PropValue::Map(m) => out.extend_from_slice(&serialize_pairs(
                &m.iter()
                    .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
                    .collect::<Vec<_>>(),
            )),
        }
    }
}

/// A set of properties keyed by path segments.
///
/// Keys are stored as the ABI sends them (segments joined by NUL), so a
/// guest's `proxy_get_property` finds its value without splitting the path;
/// the map is shared copy-on-write, so giving every stream the same set
/// costs one reference count.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Properties {
    values: Arc<BTreeMap<Vec<u8>, PropValue>>,
}

impl Properties {
    /// No properties.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `dotted` (e.g. `"connection.mtls"`) to `value`.
    pub fn set(&mut self, dotted: &str, value: PropValue) -> &mut Self {
        Arc::make_mut(&mut self.values).insert(raw_of_dotted(dotted), value);
        self
    }

    /// Sets a string property.
    pub fn set_str(&mut self, dotted: &str, value: impl Into<String>) -> &mut Self {
        self.set(dotted, PropValue::Str(value.into()))
    }

    /// Sets an integer property.
    pub fn set_int(&mut self, dotted: &str, value: i64) -> &mut Self {
        self.set(dotted, PropValue::Int(value))
    }

    /// Sets a boolean property.
    pub fn set_bool(&mut self, dotted: &str, value: bool) -> &mut Self {
        self.set(dotted, PropValue::Bool(value))
    }

    /// Sets a property by its raw segments (what `proxy_set_property` does).
    pub fn set_path(&mut self, path: Vec<String>, value: PropValue) {
        Arc::make_mut(&mut self.values).insert(raw_of_segments(&path), value);
    }

    /// Looks a path up: an exact entry, or one entry of a map-valued prefix.
    pub fn get(&self, path: &[String]) -> Option<PropValue> {
        self.lookup(&raw_of_segments(path)).map(|v| v.into_owned())
    }

    /// Appends the encoded value at a raw, NUL-separated path (what the
    /// guest sends) to `out`; `false` when not found.
    pub fn encode_raw_into(&self, raw: &[u8], out: &mut Vec<u8>) -> bool {
        match self.lookup(raw) {
            Some(v) => {
                v.encode_into(out);
                true
            }
            None => false,
        }
    }

    fn lookup(&self, raw: &[u8]) -> Option<std::borrow::Cow<'_, PropValue>> {
        if let Some(v) = self.values.get(raw) {
            return Some(std::borrow::Cow::Borrowed(v));
        }
        let split = raw.iter().rposition(|b| *b == 0)?;
        let (prefix, last) = (raw.get(..split)?, raw.get(split + 1..)?);
        match self.values.get(prefix) {
            Some(PropValue::Map(entries)) => entries
                .iter()
                .find(|(k, _)| k.as_bytes().eq_ignore_ascii_case(last))
                .map(|(_, v)| std::borrow::Cow::Owned(PropValue::Str(v.clone()))),
            _ => None,
        }
    }

    /// Looks a dotted path up.
    pub fn get_dotted(&self, dotted: &str) -> Option<PropValue> {
        self.lookup(&raw_of_dotted(dotted)).map(|v| v.into_owned())
    }

    /// Adds every entry of `other`, replacing what is there.
    pub fn extend(&mut self, other: &Properties) {
        let values = Arc::make_mut(&mut self.values);
        for (k, v) in other.values.iter() {
            values.insert(k.clone(), v.clone());
        }
    }
}

fn raw_of_dotted(dotted: &str) -> Vec<u8> {
    dotted.replace('.', "\0").into_bytes()
}

fn raw_of_segments(path: &[String]) -> Vec<u8> {
    path.join("\0").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(s: &str) -> Vec<String> {
        s.split('.').map(str::to_owned).collect()
    }

    #[test]
    fn encodings_follow_envoy() {
        assert_eq!(PropValue::Str("a".into()).encode(), b"a");
        assert_eq!(PropValue::Int(443).encode(), 443i64.to_le_bytes());
        assert_eq!(PropValue::Bool(true).encode(), [1]);
        assert_eq!(PropValue::Bool(false).encode(), [0]);
    }

    #[test]
    fn map_entry_is_reachable_by_a_further_segment() {
        let mut p = Properties::new();
        p.set(
            "request.headers",
            PropValue::Map(vec![("x-a".into(), "1".into())]),
        );
        assert_eq!(
            p.get(&path("request.headers.X-A")),
            Some(PropValue::Str("1".into()))
        );
        assert_eq!(p.get(&path("request.headers.x-b")), None);
        assert_eq!(p.get(&path("request.nothing")), None);
    }
}
