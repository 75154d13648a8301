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

use std::fmt::Write as _;

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
}

impl SampleValue for u64 {
    fn write_to(&self, out: &mut String) {
        // Writing to a String cannot fail.
        let _ = write!(out, "{self}");
    }
}

impl SampleValue for i64 {
    fn write_to(&self, out: &mut String) {
        let _ = write!(out, "{self}");
    }
}

impl SampleValue for f64 {
    fn write_to(&self, out: &mut String) {
        write_float(out, *self);
    }
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
#[derive(Debug, Default)]
pub struct Encoder {
    out: String,
}

impl Encoder {
    /// An empty exposition.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a family: writes its `# HELP` and `# TYPE` lines. Write its
    /// samples through the returned [`Family`] before starting the next one.
    ///
    /// `name` and label names are code constants; they are checked in debug
    /// builds only.
    pub fn family(&mut self, name: &'static str, kind: MetricType, help: &str) -> Family<'_> {
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
        }
    }

    /// The text written so far.
    pub fn as_str(&self) -> &str {
        &self.out
    }

    /// The finished exposition.
    pub fn finish(self) -> String {
        self.out
    }
}

/// The samples of one family, written right after its `# TYPE` line.
#[derive(Debug)]
pub struct Family<'a> {
    out: &'a mut String,
    name: &'static str,
    kind: MetricType,
}

impl Family<'_> {
    /// Writes one sample of a counter or gauge. Label pairs are written in
    /// the order given; callers must not repeat a label set.
    pub fn sample(&mut self, labels: &[(&str, &str)], value: impl SampleValue) -> &mut Self {
        debug_assert!(
            self.kind != MetricType::Histogram,
            "{}: use histogram()",
            self.name
        );
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
