//! The one histogram behind every latency podnet exposes: fixed upper bounds
//! in seconds, per-bucket counts, and the sum kept in whole nanoseconds so
//! counts folded in from kernel maps add up exactly.

use std::time::Duration;

use super::text::Family;

/// Durations over fixed upper bounds (seconds, increasing); an implicit last
/// bucket is `+Inf`.
#[derive(Clone, Debug, PartialEq)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Observations per bucket, not cumulative; one more than `bounds`.
    counts: Vec<u64>,
    sum_ns: u64,
    last: Option<Duration>,
}

impl Histogram {
    /// An empty histogram over `bounds`.
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum_ns: 0,
            last: None,
        }
    }

    /// Records one duration.
    pub fn observe(&mut self, d: Duration) {
        let secs = d.as_secs_f64();
        let slot = self
            .bounds
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(self.bounds.len());
        self.counts[slot] += 1;
        self.sum_ns = self
            .sum_ns
            .saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        self.last = Some(d);
    }

    /// Folds in counts bucketed elsewhere (a kernel map over the same
    /// bounds, `+Inf` last) and their sum in nanoseconds; extra counts beyond
    /// this histogram's buckets are ignored.
    pub fn add_counts(&mut self, counts: &[u64], sum_ns: u64) {
        for (total, n) in self.counts.iter_mut().zip(counts) {
            *total += n;
        }
        self.sum_ns = self.sum_ns.saturating_add(sum_ns);
    }

    /// The most recent [`Histogram::observe`]d duration.
    pub fn last(&self) -> Option<Duration> {
        self.last
    }

    /// Observations in all buckets.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Writes the histogram as one series of `family` with `labels`.
    pub fn write(&self, family: &mut Family<'_>, labels: &[(&str, &str)]) {
        let mut cumulative = 0;
        let buckets: Vec<(f64, u64)> = self
            .bounds
            .iter()
            .zip(&self.counts)
            .map(|(&bound, n)| {
                cumulative += n;
                (bound, cumulative)
            })
            .collect();
        #[allow(clippy::cast_precision_loss)] // sums far below 2^52 ns
        let sum = self.sum_ns as f64 / 1e9;
        family.histogram(labels, &buckets, sum, self.count());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::text::{Encoder, MetricType};

    const BOUNDS: [f64; 3] = [0.001, 0.01, 0.1];

    #[test]
    fn observations_fall_in_cumulative_buckets() {
        let mut h = Histogram::new(&BOUNDS);
        h.observe(Duration::from_micros(300));
        h.observe(Duration::from_millis(10));
        h.observe(Duration::from_secs(2));
        assert_eq!(h.last(), Some(Duration::from_secs(2)));
        let mut enc = Encoder::new();
        h.write(
            &mut enc.family("x_seconds", MetricType::Histogram, "X."),
            &[],
        );
        assert_eq!(
            enc.finish(),
            "# HELP x_seconds X.\n# TYPE x_seconds histogram\n\
             x_seconds_bucket{le=\"0.001\"} 1\nx_seconds_bucket{le=\"0.01\"} 2\n\
             x_seconds_bucket{le=\"0.1\"} 2\nx_seconds_bucket{le=\"+Inf\"} 3\n\
             x_seconds_sum 2.0103\nx_seconds_count 3\n"
        );
    }

    #[test]
    fn kernel_counts_add_exactly() {
        let mut h = Histogram::new(&BOUNDS);
        h.add_counts(&[1, 0, 2, 1], 1_500_000_000);
        h.add_counts(&[0, 1, 0, 0, 9], 2_000_000);
        assert_eq!(h.count(), 5);
        let mut enc = Encoder::new();
        h.write(
            &mut enc.family("y_seconds", MetricType::Histogram, "Y."),
            &[("pod", "a")],
        );
        let text = enc.finish();
        assert!(
            text.contains("y_seconds_bucket{pod=\"a\",le=\"0.1\"} 4\n"),
            "{text}"
        );
        assert!(text.contains("y_seconds_sum{pod=\"a\"} 1.502\n"), "{text}");
    }
}
