//! String patterns as Istio writes them (`exact`, `prefix*`, `*suffix`, `*`) and
//! the indexed tables the hot path uses to match many of them at once.
//!
//! Literals are literals: `.`, `[`, `(`, `+`, `?` mean themselves. A `*` is
//! only allowed as the first or the last character; `*` alone means "present
//! and non-empty".

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use thiserror::Error;

/// A fixed, fast hash for the lookup tables (the Fx multiply-rotate hash
/// rustc uses). Deterministic — no WASI `random_get` needed — and keyless:
/// only the config author chooses a table's keys, so flooding a table with
/// collisions is not something a peer or a request can do; a request's
/// string only probes. SipHash here cost more than the rest of a decision
/// in wasm.
pub(crate) type FixedState = BuildHasherDefault<FxHasher>;

/// See [`FixedState`].
#[derive(Default, Clone, Copy)]
pub(crate) struct FxHasher {
    hash: u64,
}

const FX_SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(FX_SEED);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            for (d, b) in w.iter_mut().zip(rest) {
                *d = *b;
            }
            self.add(u64::from_le_bytes(w));
        }
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.hash
    }
}
type Table<V> = HashMap<Box<str>, V, FixedState>;

/// One parsed pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Pattern {
    Exact(Box<str>),
    Prefix(Box<str>),
    Suffix(Box<str>),
    /// `*`: the value is present and non-empty.
    Present,
}

/// Why a pattern string is not a pattern.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PatternError {
    #[error("is empty")]
    Empty,
    #[error(
        "has a `*` in the middle: only `prefix*`, `*suffix` and `*` are supported (no regex, no globs)"
    )]
    InnerWildcard,
    #[error("has `*` at both ends: only `prefix*`, `*suffix` and `*` are supported")]
    DoubleWildcard,
}

impl Pattern {
    /// Parses `exact`, `prefix*`, `*suffix` or `*`.
    pub fn parse(raw: &str) -> Result<Self, PatternError> {
        if raw.is_empty() {
            return Err(PatternError::Empty);
        }
        if raw == "*" {
            return Ok(Self::Present);
        }
        let starts = raw.starts_with('*');
        let ends = raw.ends_with('*');
        if starts && ends {
            return Err(PatternError::DoubleWildcard);
        }
        let literal = raw.trim_start_matches('*').trim_end_matches('*');
        if literal.contains('*') || literal.len() + 1 < raw.len() {
            return Err(PatternError::InnerWildcard);
        }
        Ok(if starts {
            Self::Suffix(literal.into())
        } else if ends {
            Self::Prefix(literal.into())
        } else {
            Self::Exact(literal.into())
        })
    }

    /// The literal part (empty for [`Pattern::Present`]).
    pub fn literal(&self) -> &str {
        match self {
            Self::Exact(s) | Self::Prefix(s) | Self::Suffix(s) => s,
            Self::Present => "",
        }
    }

    /// Rebuilds the pattern with a new literal of the same kind.
    pub fn with_literal(&self, literal: &str) -> Self {
        match self {
            Self::Exact(_) => Self::Exact(literal.into()),
            Self::Prefix(_) => Self::Prefix(literal.into()),
            Self::Suffix(_) => Self::Suffix(literal.into()),
            Self::Present => Self::Present,
        }
    }

    /// Matches one value (a plain scan; the tables below avoid scanning).
    pub fn matches(&self, value: &str) -> bool {
        match self {
            Self::Exact(s) => value == &**s,
            Self::Prefix(s) => value.starts_with(&**s),
            Self::Suffix(s) => value.ends_with(&**s),
            Self::Present => !value.is_empty(),
        }
    }
}

/// Many patterns, each carrying a value `V`, matched against one string in time
/// that does not grow with the number of patterns: one hash lookup for exact
/// patterns, and one lookup per *distinct literal length* for prefixes and
/// suffixes (sorted length buckets of hash tables).
#[derive(Debug, Clone)]
pub struct PatternMap<V> {
    exact: Table<V>,
    prefix: BTreeMap<usize, Table<V>>,
    suffix: BTreeMap<usize, Table<V>>,
    present: Option<V>,
    len: usize,
}

impl<V> Default for PatternMap<V> {
    fn default() -> Self {
        Self {
            exact: Table::default(),
            prefix: BTreeMap::new(),
            suffix: BTreeMap::new(),
            present: None,
            len: 0,
        }
    }
}

impl<V: Default> PatternMap<V> {
    /// The value stored for `pattern`, inserted with `V::default()` if new.
    pub fn entry(&mut self, pattern: &Pattern) -> &mut V {
        self.len += 1;
        match pattern {
            Pattern::Exact(s) => self.exact.entry(s.clone()).or_default(),
            Pattern::Prefix(s) => self
                .prefix
                .entry(s.len())
                .or_default()
                .entry(s.clone())
                .or_default(),
            Pattern::Suffix(s) => self
                .suffix
                .entry(s.len())
                .or_default()
                .entry(s.clone())
                .or_default(),
            Pattern::Present => self.present.get_or_insert_with(V::default),
        }
    }
}

impl<V> PatternMap<V> {
    /// Number of patterns inserted (duplicates counted).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no pattern was inserted.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Calls `f` with the value of every pattern that matches `value`.
    pub fn for_each_match(&self, value: &str, mut f: impl FnMut(&V)) {
        if let Some(v) = self.exact.get(value) {
            f(v);
        }
        for (len, table) in self.prefix.range(..=value.len()) {
            if let Some(v) = value.get(..*len).and_then(|head| table.get(head)) {
                f(v);
            }
        }
        for (len, table) in self.suffix.range(..=value.len()) {
            let start = value.len() - len;
            if let Some(v) = value.get(start..).and_then(|tail| table.get(tail)) {
                f(v);
            }
        }
        if let Some(v) = self.present.as_ref().filter(|_| !value.is_empty()) {
            f(v);
        }
    }

    /// Calls `f` with every pattern inserted (each distinct pattern once).
    pub fn for_each_pattern(&self, mut f: impl FnMut(&Pattern)) {
        for k in self.exact.keys() {
            f(&Pattern::Exact(k.clone()));
        }
        for k in self.prefix.values().flat_map(|t| t.keys()) {
            f(&Pattern::Prefix(k.clone()));
        }
        for k in self.suffix.values().flat_map(|t| t.keys()) {
            f(&Pattern::Suffix(k.clone()));
        }
        if self.present.is_some() {
            f(&Pattern::Present);
        }
    }

    /// True when at least one pattern matches `value`.
    pub fn any_match(&self, value: &str) -> bool {
        if self.exact.contains_key(value) {
            return true;
        }
        if self.present.is_some() && !value.is_empty() {
            return true;
        }
        let prefix_hit = self.prefix.range(..=value.len()).any(|(len, table)| {
            value
                .get(..*len)
                .is_some_and(|head| table.contains_key(head))
        });
        prefix_hit
            || self.suffix.range(..=value.len()).any(|(len, table)| {
                value
                    .get(value.len() - len..)
                    .is_some_and(|tail| table.contains_key(tail))
            })
    }
}

/// A set of patterns: [`PatternMap`] without values.
pub type PatternSet = PatternMap<()>;

impl PatternSet {
    /// Builds a set from parsed patterns.
    pub fn from_patterns<'a>(patterns: impl IntoIterator<Item = &'a Pattern>) -> Self {
        let mut set = Self::default();
        for p in patterns {
            set.entry(p);
        }
        set
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_the_four_forms() {
        assert_eq!(Pattern::parse("a/b"), Ok(Pattern::Exact("a/b".into())));
        assert_eq!(Pattern::parse("a/*"), Ok(Pattern::Prefix("a/".into())));
        assert_eq!(Pattern::parse("*/b"), Ok(Pattern::Suffix("/b".into())));
        assert_eq!(Pattern::parse("*"), Ok(Pattern::Present));
    }

    #[test]
    fn glob_and_regex_shaped_patterns_are_refused_or_literal() {
        assert_eq!(Pattern::parse(""), Err(PatternError::Empty));
        assert_eq!(Pattern::parse("a*b"), Err(PatternError::InnerWildcard));
        assert_eq!(Pattern::parse("**"), Err(PatternError::DoubleWildcard));
        assert_eq!(Pattern::parse("*a*"), Err(PatternError::DoubleWildcard));
        assert_eq!(Pattern::parse("a**"), Err(PatternError::InnerWildcard));
        assert_eq!(Pattern::parse("**a"), Err(PatternError::InnerWildcard));
        // `.` and `+` are not regex operators here.
        let p = Pattern::parse("/api/v1.0+").unwrap_or(Pattern::Present);
        assert!(p.matches("/api/v1.0+"));
        assert!(!p.matches("/api/v100"));
        assert!(!p.matches("/api/v1.00"));
    }

    #[test]
    fn present_needs_a_non_empty_value() {
        let set = PatternSet::from_patterns(&[Pattern::Present]);
        assert!(set.any_match("x"));
        assert!(!set.any_match(""));
    }

    #[test]
    fn multibyte_values_do_not_split_characters() {
        let set = PatternSet::from_patterns(&[
            Pattern::Prefix("é".into()),
            Pattern::Suffix("ü".into()),
            Pattern::Prefix("a".into()),
        ]);
        assert!(set.any_match("éa"));
        assert!(set.any_match("aü"));
        assert!(set.any_match("ü"));
        assert!(!set.any_match("üb"));
        assert!(!set.any_match("\u{1F600}"));
    }

    fn pattern_strategy() -> impl Strategy<Value = Pattern> {
        let lit = "[ab/é]{0,4}";
        prop_oneof![
            lit.prop_filter("non-empty", |s: &String| !s.is_empty())
                .prop_map(|s| Pattern::Exact(s.into())),
            lit.prop_filter("non-empty", |s: &String| !s.is_empty())
                .prop_map(|s| Pattern::Prefix(s.into())),
            lit.prop_filter("non-empty", |s: &String| !s.is_empty())
                .prop_map(|s| Pattern::Suffix(s.into())),
            Just(Pattern::Present),
        ]
    }

    proptest! {
        #[test]
        fn table_lookup_equals_linear_scan(
            patterns in proptest::collection::vec(pattern_strategy(), 0..24),
            value in "[ab/é]{0,6}",
        ) {
            let mut map: PatternMap<Vec<usize>> = PatternMap::default();
            for (i, p) in patterns.iter().enumerate() {
                map.entry(p).push(i);
            }
            let mut hits = Vec::new();
            map.for_each_match(&value, |v| hits.extend_from_slice(v));
            hits.sort_unstable();
            let expected: Vec<usize> = patterns
                .iter()
                .enumerate()
                .filter(|(_, p)| p.matches(&value))
                .map(|(i, _)| i)
                .collect();
            prop_assert_eq!(&hits, &expected);
            prop_assert_eq!(map.any_match(&value), !expected.is_empty());
        }

        #[test]
        fn parse_never_panics_and_round_trips(raw in "[a*/.]{0,6}") {
            if let Ok(p) = Pattern::parse(&raw) {
                let text = match &p {
                    Pattern::Exact(s) => s.to_string(),
                    Pattern::Prefix(s) => format!("{s}*"),
                    Pattern::Suffix(s) => format!("*{s}"),
                    Pattern::Present => "*".to_string(),
                };
                prop_assert_eq!(text, raw);
            }
        }
    }
}
