//! Plugin-defined metrics (`proxy_define_metric` and friends) and their
//! Prometheus text rendering, shaped like Envoy's `/stats/prometheus`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Mutex;

use super::abi::{MetricType, Status};

/// Envoy's default histogram bucket bounds.
pub const ENVOY_DEFAULT_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

#[derive(Debug, Clone)]
enum Value {
    Counter(u64),
    Gauge(i64),
    Histogram {
        counts: Vec<u64>,
        sum: u64,
        count: u64,
    },
}

#[derive(Debug, Clone)]
struct Metric {
    name: String,
    kind: MetricType,
    value: Value,
}

/// The metric store of one proxy; shared by every plugin instance it runs.
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    by_name: HashMap<(String, MetricType), u32>,
    metrics: Vec<Metric>,
}

impl Metrics {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Defines (or finds) a metric; the same name and type give the same id.
    pub fn define(&self, kind: MetricType, name: &str) -> u32 {
        let mut inner = self.lock();
        if let Some(id) = inner.by_name.get(&(name.to_owned(), kind)) {
            return *id;
        }
        let id = u32::try_from(inner.metrics.len()).unwrap_or(u32::MAX);
        let value = match kind {
            MetricType::Counter => Value::Counter(0),
            MetricType::Gauge => Value::Gauge(0),
            MetricType::Histogram => Value::Histogram {
                counts: vec![0; ENVOY_DEFAULT_BUCKETS.len()],
                sum: 0,
                count: 0,
            },
        };
        inner.metrics.push(Metric {
            name: name.to_owned(),
            kind,
            value,
        });
        inner.by_name.insert((name.to_owned(), kind), id);
        id
    }

    /// `proxy_increment_metric`: counters only go up.
    pub fn increment(&self, id: u32, delta: i64) -> Status {
        let mut inner = self.lock();
        let Some(m) = inner.metrics.get_mut(id as usize) else {
            return Status::NotFound;
        };
        match &mut m.value {
            Value::Counter(c) => {
                if delta < 0 {
                    return Status::BadArgument;
                }
                *c = c.saturating_add(delta.unsigned_abs());
            }
            Value::Gauge(g) => *g = g.saturating_add(delta),
            Value::Histogram { .. } => return Status::BadArgument,
        }
        Status::Ok
    }

    /// `proxy_record_metric`: sets a counter or gauge, records a histogram sample.
    pub fn record(&self, id: u32, value: u64) -> Status {
        let mut inner = self.lock();
        let Some(m) = inner.metrics.get_mut(id as usize) else {
            return Status::NotFound;
        };
        match &mut m.value {
            Value::Counter(c) => *c = value,
            Value::Gauge(g) => *g = i64::try_from(value).unwrap_or(i64::MAX),
            Value::Histogram { counts, sum, count } => {
                for (bound, slot) in ENVOY_DEFAULT_BUCKETS.iter().zip(counts.iter_mut()) {
                    if (value as f64) <= *bound {
                        *slot += 1;
                    }
                }
                *sum = sum.saturating_add(value);
                *count += 1;
            }
        }
        Status::Ok
    }

    /// `proxy_get_metric`: the value of a counter or gauge; for a histogram,
    /// its sample count.
    pub fn get(&self, id: u32) -> Result<u64, Status> {
        let inner = self.lock();
        let m = inner.metrics.get(id as usize).ok_or(Status::NotFound)?;
        Ok(match &m.value {
            Value::Counter(c) => *c,
            Value::Gauge(g) => u64::try_from(*g).unwrap_or(0),
            Value::Histogram { count, .. } => *count,
        })
    }

    /// Looks a counter or gauge up by the name the plugin gave it (tests, demo).
    pub fn value_by_name(&self, name: &str) -> Option<i64> {
        let inner = self.lock();
        inner
            .metrics
            .iter()
            .find(|m| m.name == name)
            .and_then(|m| match m.value {
                Value::Counter(c) => i64::try_from(c).ok(),
                Value::Gauge(g) => Some(g),
                Value::Histogram { count, .. } => i64::try_from(count).ok(),
            })
    }

    /// Every counter as (stat name, value), in definition order.
    pub fn counters(&self) -> Vec<(String, u64)> {
        let inner = self.lock();
        inner
            .metrics
            .iter()
            .filter_map(|m| match m.value {
                Value::Counter(c) => Some((m.name.clone(), c)),
                _ => None,
            })
            .collect()
    }

    /// Prometheus text exposition of every metric, grouped by family.
    ///
    /// Names are sanitized the way Envoy's exporter does (every character
    /// outside `[a-zA-Z0-9_:]` becomes `_`). A plugin may carry labels in the
    /// name Prometheus-style, `family{key="value",...}`; they are kept.
    pub fn prometheus(&self) -> String {
        let inner = self.lock();
        let mut families: Vec<Family<'_>> = Vec::new();
        for m in &inner.metrics {
            let (family, labels) = split_labels(&m.name);
            let family = sanitize(&family);
            match families
                .iter_mut()
                .find(|(f, k, _)| *f == family && *k == m.kind)
            {
                Some((_, _, members)) => members.push((labels, m)),
                None => families.push((family, m.kind, vec![(labels, m)])),
            }
        }
        families.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out = String::new();
        for (family, kind, mut members) in families {
            members.sort_by(|a, b| a.0.cmp(&b.0));
            let kind_name = match kind {
                MetricType::Counter => "counter",
                MetricType::Gauge => "gauge",
                MetricType::Histogram => "histogram",
            };
            let _ = writeln!(out, "# TYPE {family} {kind_name}");
            for (labels, m) in members {
                match &m.value {
                    Value::Counter(c) => {
                        let _ = writeln!(out, "{family}{} {c}", braces(&labels));
                    }
                    Value::Gauge(g) => {
                        let _ = writeln!(out, "{family}{} {g}", braces(&labels));
                    }
                    Value::Histogram { counts, sum, count } => {
                        for (bound, c) in ENVOY_DEFAULT_BUCKETS.iter().zip(counts) {
                            let le = format!("le=\"{bound}\"");
                            let _ = writeln!(
                                out,
                                "{family}_bucket{} {c}",
                                braces(&join_labels(&labels, &le))
                            );
                        }
                        let inf = join_labels(&labels, "le=\"+Inf\"");
                        let _ = writeln!(out, "{family}_bucket{} {count}", braces(&inf));
                        let _ = writeln!(out, "{family}_sum{} {sum}", braces(&labels));
                        let _ = writeln!(out, "{family}_count{} {count}", braces(&labels));
                    }
                }
            }
        }
        out
    }
}

/// Splits a stat name into its family and tags (see [`Metrics::prometheus`]
/// for the two spellings understood).
pub fn parse_stat_name(name: &str) -> (String, Vec<(String, String)>) {
    let mut tags = Vec::new();
    let mut rest = name;
    if name.contains(";.;") {
        while let Some((segment, tail)) = rest.split_once(";.;") {
            match segment.split_once("=.=") {
                Some((k, v)) => tags.push((k.to_owned(), v.to_owned())),
                None => break,
            }
            rest = tail;
        }
        return (rest.to_owned(), tags);
    }
    (split_labels(name).0, tags)
}

/// Splits a stat name into family and labels. Two spellings are understood:
/// Istio's tag encoding (`key=.=value;.;key2=.=value2;.;family`, which Envoy
/// turns into labels with Istio's tag-extraction regexes) and Prometheus'
/// own (`family{key="value"}`).
fn split_labels(name: &str) -> (String, String) {
    if name.contains(";.;") {
        let mut rest = name;
        let mut labels = Vec::new();
        while let Some((segment, tail)) = rest.split_once(";.;") {
            match segment.split_once("=.=") {
                Some((k, v)) => labels.push(format!("{}=\"{}\"", sanitize(k), escape(v))),
                None => break,
            }
            rest = tail;
        }
        return (rest.to_owned(), labels.join(","));
    }
    match (name.find('{'), name.strip_suffix('}')) {
        (Some(open), Some(without_close)) => (
            name.get(..open).unwrap_or(name).to_owned(),
            without_close.get(open + 1..).unwrap_or("").to_owned(),
        ),
        _ => (name.to_owned(), String::new()),
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Family name, type, and its series (labels, metric).
type Family<'a> = (String, MetricType, Vec<(String, &'a Metric)>);

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn braces(labels: &str) -> String {
    if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    }
}

fn join_labels(a: &str, b: &str) -> String {
    if a.is_empty() {
        b.to_owned()
    } else {
        format!("{a},{b}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_name_and_type_give_the_same_id() {
        let m = Metrics::new();
        let a = m.define(MetricType::Counter, "x");
        assert_eq!(m.define(MetricType::Counter, "x"), a);
        assert_ne!(m.define(MetricType::Gauge, "x"), a);
    }

    #[test]
    fn counter_cannot_be_decremented() {
        let m = Metrics::new();
        let id = m.define(MetricType::Counter, "c");
        assert_eq!(m.increment(id, 2), Status::Ok);
        assert_eq!(m.increment(id, -1), Status::BadArgument);
        assert_eq!(m.get(id), Ok(2));
        assert_eq!(m.get(99), Err(Status::NotFound));
        assert_eq!(m.increment(99, 1), Status::NotFound);
    }

    #[test]
    fn prometheus_text_groups_families_and_keeps_labels() {
        let m = Metrics::new();
        let a = m.define(MetricType::Counter, "decisions_total{action=\"allow\"}");
        let d = m.define(MetricType::Counter, "decisions_total{action=\"deny\"}");
        let h = m.define(MetricType::Histogram, "peer.cert_age_seconds");
        m.increment(a, 3);
        m.increment(d, 1);
        m.record(h, 7);
        let text = m.prometheus();
        assert_eq!(text.matches("# TYPE decisions_total counter").count(), 1);
        assert!(text.contains("decisions_total{action=\"allow\"} 3\n"));
        assert!(text.contains("decisions_total{action=\"deny\"} 1\n"));
        assert!(text.contains("# TYPE peer_cert_age_seconds histogram"));
        assert!(text.contains("peer_cert_age_seconds_bucket{le=\"5\"} 0\n"));
        assert!(text.contains("peer_cert_age_seconds_bucket{le=\"10\"} 1\n"));
        assert!(text.contains("peer_cert_age_seconds_count 1\n"));
        assert!(text.contains("peer_cert_age_seconds_sum 7\n"));
    }

    #[test]
    fn istio_tag_encoding_becomes_labels() {
        let m = Metrics::new();
        let id = m.define(
            MetricType::Counter,
            "action=.=deny;.;rule=.=legacy;.;mode=.=enforce;.;meshward_decisions_total",
        );
        m.increment(id, 2);
        assert!(m.prometheus().contains(
            "meshward_decisions_total{action=\"deny\",rule=\"legacy\",mode=\"enforce\"} 2\n"
        ));
    }
}
