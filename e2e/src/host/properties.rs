//! Properties (Envoy "attributes") a plugin reads with `proxy_get_property`.
//!
//! Encodings follow Envoy: strings raw, integers 8-byte little-endian, bools one
//! byte, maps in the ABI's serialized-pairs format, paths split on NUL.

use std::collections::BTreeMap;

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
        match self {
            PropValue::Str(s) => s.as_bytes().to_vec(),
            PropValue::Int(i) => i.to_le_bytes().to_vec(),
            PropValue::Bool(b) => vec![u8::from(*b)],
            PropValue::Bytes(b) => b.clone(),
            PropValue::Map(m) => serialize_pairs(
                &m.iter()
                    .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
                    .collect::<Vec<_>>(),
            ),
        }
    }
}

/// A set of properties keyed by path segments.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Properties {
    values: BTreeMap<Vec<String>, PropValue>,
}

impl Properties {
    /// No properties.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `dotted` (e.g. `"connection.mtls"`) to `value`.
    pub fn set(&mut self, dotted: &str, value: PropValue) -> &mut Self {
        self.values.insert(split_dotted(dotted), value);
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
        self.values.insert(path, value);
    }

    /// Looks a path up: an exact entry, or one entry of a map-valued prefix.
    pub fn get(&self, path: &[String]) -> Option<PropValue> {
        if let Some(v) = self.values.get(path) {
            return Some(v.clone());
        }
        let (last, prefix) = path.split_last()?;
        match self.values.get(prefix) {
            Some(PropValue::Map(entries)) => entries
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(last))
                .map(|(_, v)| PropValue::Str(v.clone())),
            _ => None,
        }
    }

    /// Looks a dotted path up.
    pub fn get_dotted(&self, dotted: &str) -> Option<PropValue> {
        self.get(&split_dotted(dotted))
    }

    /// Adds every entry of `other`, replacing what is there.
    pub fn extend(&mut self, other: &Properties) {
        for (k, v) in &other.values {
            self.values.insert(k.clone(), v.clone());
        }
    }
}

fn split_dotted(dotted: &str) -> Vec<String> {
    dotted.split('.').map(str::to_owned).collect()
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
