//! A small encoder for the Prometheus text exposition format, version 0.0.4.
//!
//! podnet's metrics are read from kernel maps and `/proc` at scrape time, so
//! every scrape renders fresh values; there is no registry of live metric
//! objects. The encoder writes one family at a time: `# HELP` and `# TYPE`,
//! then its samples, so samples of a family are always contiguous.
//!
//! Escaping follows the format: in label values `\`, `"` and line feed become
//! `\\`, `\"` and `\n`; in HELP text `\` and line feed are escaped.
//! <https://prometheus.io/docs/instrumenting/exposition_formats/#text-based-format>
//!
//! Per-pod series are labelled in one place, here: subsystems write
//! `namespace` and `pod`, and an encoder given [`PodLabels`] turns `pod`
//! into `workload_kind` and `workload` where they say so, summing the
//! samples of a workload's pods into one series (counters and histograms
//! alike), so label cardinality follows workloads, not rollouts.

use std::{collections::HashMap, fmt::Write as _, sync::Arc};

/// The `Content-Type` of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The type of a metric family, as written on its `# TYPE` line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricType {
    /// A monotonically increasing count; its name ends in `_total`.
    Counter,
    /// A value that goes up and down.
    Gauge,
    /// Cumulative buckets with `_bucket`, `_sum` and `_count` series.
    Histogram,
}

impl MetricType {
    fn as_str(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
            Self::Histogram => "histogram",
        }
    }
}

/// A sample value: integers are written exactly, floats as Prometheus parses
/// them (`+Inf`, `-Inf`, `NaN` for the special values).
pub trait SampleValue: Copy {
    /// Appends the value to `out`.
    fn write_to(&self, out: &mut String);
    /// The value as a term of a workload's sum (integers stay exact).
    fn term(&self) -> SumTerm;
}

/// One term of the sum of a workload's samples.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SumTerm(Sum);

impl SampleValue for u64 {
    fn write_to(&self, out: &mut String) {
        // Writing to a String cannot fail.
        let _ = write!(out, "{self}");
    }

    fn term(&self) -> SumTerm {
        SumTerm(Sum::Unsigned(*self))
    }
}

impl SampleValue for i64 {
    fn write_to(&self, out: &mut String) {
        let _ = write!(out, "{self}");
    }

    fn term(&self) -> SumTerm {
        SumTerm(Sum::Signed(*self))
    }
}

impl SampleValue for f64 {
    fn write_to(&self, out: &mut String) {
        write_float(out, *self);
    }

    fn term(&self) -> SumTerm {
        SumTerm(Sum::Float(*self))
    }
}

/// A sample value kept for summing: integers stay exact.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Sum {
    Unsigned(u64),
    Signed(i64),
    Float(f64),
}

impl Sum {
    #[allow(clippy::cast_precision_loss)] // only a mix of integer and float sums, which no family writes
    fn as_f64(self) -> f64 {
        match self {
            Self::Unsigned(v) => v as f64,
            Self::Signed(v) => v as f64,
            Self::Float(v) => v,
        }
    }

    fn add(self, other: Self) -> Self {
        match (self, other) {
            (Self::Unsigned(a), Self::Unsigned(b)) => Self::Unsigned(a.saturating_add(b)),
            (Self::Signed(a), Self::Signed(b)) => Self::Signed(a.saturating_add(b)),
            (a, b) => Self::Float(a.as_f64() + b.as_f64()),
        }
    }

    fn write_to(self, out: &mut String) {
        match self {
            Self::Unsigned(v) => v.write_to(out),
            Self::Signed(v) => v.write_to(out),
            Self::Float(v) => v.write_to(out),
        }
    }
}

/// Where the `pod` label of per-pod series stays, and the workload that
/// replaces it elsewhere.
pub trait PodLabels: Send + Sync {
    /// `None` to keep the `pod` label of pod `pod` in `namespace`; else the
    /// workload's (kind, name), written as `workload_kind` and `workload`.
    fn workload(&self, namespace: &str, pod: &str) -> Option<(String, String)>;
}

fn write_float(out: &mut String, value: f64) {
    if value.is_nan() {
        out.push_str("NaN");
    } else if value.is_infinite() {
        out.push_str(if value > 0.0 { "+Inf" } else { "-Inf" });
    } else {
        // Rust's `Display` for f64 is the shortest exact round-trip form
        // without an exponent, which Prometheus parses.
        let _ = write!(out, "{value}");
    }
}

/// Builds one exposition text.
#[derive(Default)]
pub struct Encoder {
    out: String,
    pods: Option<Arc<dyn PodLabels>>,
    merged: Merged,
}

/// The workload series of the family being written and their sums, in order
/// of first appearance; written when the next family starts or at the end.
#[derive(Debug, Default)]
struct Merged {
    series: Vec<(String, Sum)>,
    index: HashMap<String, usize>,
}

impl Merged {
    fn add(&mut self, series: String, term: Sum) {
        if let Some(&i) = self.index.get(&series) {
            self.series[i].1 = self.series[i].1.add(term);
        } else {
            self.index.insert(series.clone(), self.series.len());
            self.series.push((series, term));
        }
    }

    fn flush(&mut self, out: &mut String) {
        self.index.clear();
        for (series, sum) in self.series.drain(..) {
            out.push_str(&series);
            sum.write_to(out);
            out.push('\n');
        }
    }
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("out", &self.out.len())
            .field("pods", &self.pods.is_some())
            .field("merged", &self.merged)
            .finish()
    }
}

impl Encoder {
    /// An empty exposition; per-pod series keep their `pod` label.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty exposition whose per-pod series (those with `namespace` and
    /// `pod` labels) are labelled as `pods` says.
    pub fn with_pod_labels(pods: Arc<dyn PodLabels>) -> Self {
        Self {
            out: String::new(),
            pods: Some(pods),
            merged: Merged::default(),
        }
    }

    /// Starts a family: writes its `# HELP` and `# TYPE` lines. Write its
    /// samples through the returned [`Family`] before starting the next one.
    ///
    /// `name` and label names are code constants; they are checked in debug
    /// builds only.
    pub fn family(&mut self, name: &'static str, kind: MetricType, help: &str) -> Family<'_> {
        self.merged.flush(&mut self.out);
        debug_assert!(is_valid_name(name), "invalid metric name {name:?}");
        debug_assert!(
            kind != MetricType::Counter || name.ends_with("_total"),
            "counter {name} must end in _total"
        );
        self.out.push_str("# HELP ");
        self.out.push_str(name);
        self.out.push(' ');
        escape_help(&mut self.out, help);
        self.out.push_str("\n# TYPE ");
        self.out.push_str(name);
        self.out.push(' ');
        self.out.push_str(kind.as_str());
        self.out.push('\n');
        Family {
            out: &mut self.out,
            name,
            kind,
            pods: self.pods.as_deref(),
            merged: &mut self.merged,
        }
    }

    /// The text written so far (workload sums of the last family are written
    /// when the next family starts, or by [`Encoder::finish`]).
    pub fn as_str(&self) -> &str {
        &self.out
    }

    /// The finished exposition.
    pub fn finish(mut self) -> String {
        self.merged.flush(&mut self.out);
        self.out
    }
}

/// The samples of one family, written right after its `# TYPE` line.
/// Samples relabelled per workload are summed, and written after the others
/// when the next family starts.
pub struct Family<'a> {
    out: &'a mut String,
    name: &'static str,
    kind: MetricType,
    pods: Option<&'a dyn PodLabels>,
    merged: &'a mut Merged,
}

impl std::fmt::Debug for Family<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Family")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("merged", &self.merged.series.len())
            .finish_non_exhaustive()
    }
}

/// Label pairs with `pod` replaced by `workload_kind` and `workload`.
fn workload_labels<'l>(
    labels: &[(&'l str, &'l str)],
    workload: &'l (String, String),
) -> Vec<(&'l str, &'l str)> {
    let mut out = Vec::with_capacity(labels.len() + 1);
    for &(key, value) in labels {
        if key == "pod" {
            out.push(("workload_kind", workload.0.as_str()));
            out.push(("workload", workload.1.as_str()));
        } else {
            out.push((key, value));
        }
    }
    out
}

impl Family<'_> {
    /// The workload replacing the `pod` label of `labels`, if it is a
    /// per-pod series and the encoder's [`PodLabels`] says so.
    fn workload_of(&self, labels: &[(&str, &str)]) -> Option<(String, String)> {
        let pods = self.pods?;
        let label = |name: &str| labels.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
        pods.workload(label("namespace")?, label("pod")?)
    }

    fn merge(&mut self, series: String, term: Sum) {
        self.merged.add(series, term);
    }

    /// Writes one sample of a counter or gauge. Label pairs are written in
    /// the order given; callers must not repeat a label set.
    pub fn sample(&mut self, labels: &[(&str, &str)], value: impl SampleValue) -> &mut Self {
        debug_assert!(
            self.kind != MetricType::Histogram,
            "{}: use histogram()",
            self.name
        );
        if let Some(workload) = self.workload_of(labels) {
            let mut series = String::new();
            write_series(
                &mut series,
                self.name,
                "",
                &workload_labels(labels, &workload),
                None,
            );
            self.merge(series, value.term().0);
            return self;
        }
        write_series(self.out, self.name, "", labels, None);
        value.write_to(self.out);
        self.out.push('\n');
        self
    }

    /// Writes one histogram series: a `_bucket` line per upper bound (with a
    /// final `+Inf` bucket equal to `count`), then `_sum` and `_count`.
    /// `buckets` holds (upper bound, cumulative count) in increasing order of
    /// bound; a `+Inf` bound in it is skipped, since it is always written.
    pub fn histogram(
        &mut self,
        labels: &[(&str, &str)],
        buckets: &[(f64, u64)],
        sum: f64,
        count: u64,
    ) -> &mut Self {
        debug_assert!(
            self.kind == MetricType::Histogram,
            "{}: not a histogram",
            self.name
        );
        if let Some(workload) = self.workload_of(labels) {
            let labels = workload_labels(labels, &workload);
            let mut le = String::new();
            let mut buckets: Vec<(Option<f64>, u64)> = buckets
                .iter()
                .filter(|(b, _)| b.is_finite())
                .map(|&(b, c)| (Some(b), c))
                .collect();
            buckets.push((None, count));
            for (bound, cumulative) in buckets {
                le.clear();
                match bound {
                    Some(bound) => write_float(&mut le, bound),
                    None => le.push_str("+Inf"),
                }
                let mut series = String::new();
                write_series(&mut series, self.name, "_bucket", &labels, Some(&le));
                self.merge(series, Sum::Unsigned(cumulative));
            }
            for (suffix, term) in [("_sum", Sum::Float(sum)), ("_count", Sum::Unsigned(count))] {
                let mut series = String::new();
                write_series(&mut series, self.name, suffix, &labels, None);
                self.merge(series, term);
            }
            return self;
        }
        let mut le = String::new();
        for &(bound, cumulative) in buckets.iter().filter(|(b, _)| b.is_finite()) {
            le.clear();
            write_float(&mut le, bound);
            write_series(self.out, self.name, "_bucket", labels, Some(&le));
            cumulative.write_to(self.out);
            self.out.push('\n');
        }
        write_series(self.out, self.name, "_bucket", labels, Some("+Inf"));
        count.write_to(self.out);
        self.out.push('\n');
        write_series(self.out, self.name, "_sum", labels, None);
        sum.write_to(self.out);
        self.out.push('\n');
        write_series(self.out, self.name, "_count", labels, None);
        count.write_to(self.out);
        self.out.push('\n');
        self
    }
}

/// Writes `name{labels} ` (with `le` last when given), ready for the value.
fn write_series(
    out: &mut String,
    name: &str,
    suffix: &str,
    labels: &[(&str, &str)],
    le: Option<&str>,
) {
    out.push_str(name);
    out.push_str(suffix);
    let le = le.map(|v| ("le", v));
    let mut pairs = labels.iter().copied().chain(le).peekable();
    if pairs.peek().is_some() {
        out.push('{');
        for (i, (key, value)) in pairs.enumerate() {
            debug_assert!(
                is_valid_name(key) && !key.contains(':'),
                "invalid label name {key:?}"
            );
            if i > 0 {
                out.push(',');
            }
            out.push_str(key);
            out.push_str("=\"");
            escape_label_value(out, value);
            out.push('"');
        }
        out.push('}');
    }
    out.push(' ');
}

/// Appends `value` escaped for a label value.
pub fn escape_label_value(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn escape_help(out: &mut String, help: &str) {
    for c in help.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*`
fn is_valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_with_help_type_and_labels() {
        let mut enc = Encoder::new();
        enc.family("podnet_x_total", MetricType::Counter, "Things.")
            .sample(&[("namespace", "shop"), ("pod", "a")], 5_u64)
            .sample(&[], 0_u64);
        assert_eq!(
            enc.finish(),
            "# HELP podnet_x_total Things.\n\
             # TYPE podnet_x_total counter\n\
             podnet_x_total{namespace=\"shop\",pod=\"a\"} 5\n\
             podnet_x_total 0\n"
        );
    }

    /// Pods `shop/cart-*` belong to Deployment `cart`; namespace `debug`
    /// keeps its pods.
    struct Cart;

    impl PodLabels for Cart {
        fn workload(&self, namespace: &str, pod: &str) -> Option<(String, String)> {
            match (namespace, pod) {
                ("debug", _) => None,
                ("", "") => Some((String::new(), String::new())),
                (_, p) if p.starts_with("cart-") => Some(("Deployment".into(), "cart".into())),
                (_, p) => Some(("Pod".into(), p.into())),
            }
        }
    }

    #[test]
    fn pod_series_are_summed_per_workload_where_pod_labels_say_so() {
        let mut enc = Encoder::with_pod_labels(Arc::new(Cart));
        enc.family("podnet_x_total", MetricType::Counter, "Things.")
            .sample(
                &[("namespace", "shop"), ("pod", "cart-1"), ("proto", "udp")],
                5_u64,
            )
            .sample(
                &[("namespace", "debug"), ("pod", "tool"), ("proto", "udp")],
                1_u64,
            )
            .sample(
                &[("namespace", "shop"), ("pod", "db"), ("proto", "udp")],
                2_u64,
            )
            .sample(
                &[("namespace", "shop"), ("pod", "cart-2"), ("proto", "udp")],
                7_u64,
            )
            .sample(
                &[("namespace", "shop"), ("pod", "cart-2"), ("proto", "tcp")],
                1_u64,
            )
            .sample(&[("namespace", ""), ("pod", ""), ("proto", "udp")], 3_u64)
            .sample(&[("stat", "drop")], 4_u64);
        enc.family("podnet_y_seconds", MetricType::Histogram, "Latency.")
            .histogram(
                &[("namespace", "shop"), ("pod", "cart-1")],
                &[(0.1, 1), (1.0, 2)],
                0.5,
                3,
            )
            .histogram(
                &[("namespace", "shop"), ("pod", "cart-2")],
                &[(0.1, 0), (1.0, 1)],
                2.25,
                4,
            );
        assert_eq!(
            enc.finish(),
            "# HELP podnet_x_total Things.\n\
             # TYPE podnet_x_total counter\n\
             podnet_x_total{namespace=\"debug\",pod=\"tool\",proto=\"udp\"} 1\n\
             podnet_x_total{stat=\"drop\"} 4\n\
             podnet_x_total{namespace=\"shop\",workload_kind=\"Deployment\",workload=\"cart\",proto=\"udp\"} 12\n\
             podnet_x_total{namespace=\"shop\",workload_kind=\"Pod\",workload=\"db\",proto=\"udp\"} 2\n\
             podnet_x_total{namespace=\"shop\",workload_kind=\"Deployment\",workload=\"cart\",proto=\"tcp\"} 1\n\
             podnet_x_total{namespace=\"\",workload_kind=\"\",workload=\"\",proto=\"udp\"} 3\n\
             # HELP podnet_y_seconds Latency.\n\
             # TYPE podnet_y_seconds histogram\n\
             podnet_y_seconds_bucket{namespace=\"shop\",workload_kind=\"Deployment\",workload=\"cart\",le=\"0.1\"} 1\n\
             podnet_y_seconds_bucket{namespace=\"shop\",workload_kind=\"Deployment\",workload=\"cart\",le=\"1\"} 3\n\
             podnet_y_seconds_bucket{namespace=\"shop\",workload_kind=\"Deployment\",workload=\"cart\",le=\"+Inf\"} 7\n\
             podnet_y_seconds_sum{namespace=\"shop\",workload_kind=\"Deployment\",workload=\"cart\"} 2.75\n\
             podnet_y_seconds_count{namespace=\"shop\",workload_kind=\"Deployment\",workload=\"cart\"} 7\n"
        );
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        let mut enc = Encoder::new();
        enc.family("podnet_y", MetricType::Gauge, "a \\ b\nc \"q\"")
            .sample(&[("pod", "say \"hi\"\\n\nend")], 1_u64);
        assert_eq!(
            enc.finish(),
            "# HELP podnet_y a \\\\ b\\nc \"q\"\n\
             # TYPE podnet_y gauge\n\
             podnet_y{pod=\"say \\\"hi\\\"\\\\n\\nend\"} 1\n"
        );
    }

    #[test]
    fn floats() {
        let mut out = String::new();
        for v in [
            0.005,
            1.0,
            2.5e-7,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
        ] {
            v.write_to(&mut out);
            out.push(' ');
        }
        assert_eq!(out, "0.005 1 0.00000025 +Inf -Inf NaN ");
    }

    #[test]
    fn histogram_series() {
        let mut enc = Encoder::new();
        enc.family("podnet_h_seconds", MetricType::Histogram, "Latency.")
            .histogram(
                &[("server", "10.0.0.10")],
                &[(0.001, 1), (0.5, 3), (f64::INFINITY, 4)],
                1.25,
                4,
            );
        assert_eq!(
            enc.finish(),
            "# HELP podnet_h_seconds Latency.\n\
             # TYPE podnet_h_seconds histogram\n\
             podnet_h_seconds_bucket{server=\"10.0.0.10\",le=\"0.001\"} 1\n\
             podnet_h_seconds_bucket{server=\"10.0.0.10\",le=\"0.5\"} 3\n\
             podnet_h_seconds_bucket{server=\"10.0.0.10\",le=\"+Inf\"} 4\n\
             podnet_h_seconds_sum{server=\"10.0.0.10\"} 1.25\n\
             podnet_h_seconds_count{server=\"10.0.0.10\"} 4\n"
        );
    }

    #[test]
    fn names() {
        assert!(is_valid_name("podnet_a:b_1"));
        assert!(!is_valid_name("1a"));
        assert!(!is_valid_name(""));
        assert!(!is_valid_name("a-b"));
    }
}
