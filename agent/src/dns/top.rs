//! `dns.top`: per pod and server, the request rate, latency quantiles,
//! timeouts and error rate over the last minute.
//!
//! The kernel keeps cumulative counts; the DNS thread samples their per-(pod,
//! server) totals every few seconds, and a `dns.top` call compares the newest
//! totals with the oldest sample still held (about a minute old).

use std::{
    collections::{BTreeMap, VecDeque},
    net::IpAddr,
    time::Instant,
};

use podnet_common::dns::{scope, BUCKETS, BUCKET_BOUNDS_NS};
use serde::{Deserialize, Serialize};

use super::DnsSnapshot;
use crate::{
    endpoint::{PodRef, Registry},
    net::kernel_addr,
};

/// rcodes that are not errors for the error rate: NOERROR and NXDOMAIN
/// (NXDOMAIN is the normal answer to search-path expansions).
const NOT_ERRORS: [u16; 2] = [0, 3];

/// Cumulative totals of one (pod, server).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Queries.
    pub requests: u64,
    /// Answers, any rcode.
    pub responses: u64,
    /// Answers with an error rcode (not NOERROR or NXDOMAIN).
    pub errors: u64,
    /// Queries without an answer in time.
    pub timeouts: u64,
    /// Retransmitted queries.
    pub retransmits: u64,
    /// Answers per latency bucket (not cumulative).
    pub buckets: [u64; BUCKETS],
}

/// The (pod, server) a series belongs to.
pub type SeriesKey = (PodRef, IpAddr);

/// Aggregates a snapshot per (pod, server). Uplink series of addresses that a
/// pod owns are left out: that pod's own interface already counted them.
pub fn totals(snapshot: &DnsSnapshot, registry: &Registry) -> BTreeMap<SeriesKey, Totals> {
    let mut out: BTreeMap<SeriesKey, Totals> = BTreeMap::new();
    let series = |key: &podnet_common::dns::PeerKey| -> Option<SeriesKey> {
        let (client, server) = peer_addrs(key)?;
        let pod = registry.pod_for(client);
        if key.scope == scope::UPLINK && !pod.is_host() {
            return None;
        }
        Some((pod, server))
    };
    for l in &snapshot.latency {
        if let Some(k) = series(&l.key) {
            let t = out.entry(k).or_default();
            let n: u64 = l.buckets.iter().sum();
            t.responses += n;
            if !NOT_ERRORS.contains(&l.key.code) {
                t.errors += n;
            }
            for (sum, b) in t.buckets.iter_mut().zip(l.buckets) {
                *sum += b;
            }
        }
    }
    for r in &snapshot.requests {
        if let Some(k) = series(&r.key) {
            out.entry(k).or_default().requests += r.count;
        }
    }
    for r in &snapshot.timeouts {
        if let Some(k) = series(&r.key) {
            out.entry(k).or_default().timeouts += r.count;
        }
    }
    for r in &snapshot.retransmits {
        if let Some(k) = series(&r.key) {
            out.entry(k).or_default().retransmits += r.count;
        }
    }
    out
}

/// Client and server address of a statistics key.
pub fn peer_addrs(key: &podnet_common::dns::PeerKey) -> Option<(IpAddr, IpAddr)> {
    Some((
        kernel_addr(&key.client, key.family)?,
        kernel_addr(&key.server, key.family)?,
    ))
}

/// One row of `dns.top`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TopRow {
    /// The pod (empty for host traffic).
    pub pod: PodRef,
    /// DNS server address.
    pub server: IpAddr,
    /// Queries per second over the window.
    pub rate: f64,
    /// Median latency in milliseconds over the window (`None`: no answers).
    pub p50_ms: Option<f64>,
    /// 99th percentile latency in milliseconds over the window.
    pub p99_ms: Option<f64>,
    /// Timeouts in the window.
    pub timeouts: u64,
    /// Retransmits in the window.
    pub retransmits: u64,
    /// Share of queries in the window that failed (error rcode or timeout).
    pub error_rate: f64,
    /// Queries since the counts began.
    pub requests_total: u64,
    /// Window length in seconds.
    pub window_seconds: f64,
}

/// Samples of totals over time.
#[derive(Debug)]
pub struct History {
    samples: VecDeque<(Instant, BTreeMap<SeriesKey, Totals>)>,
    capacity: usize,
}

impl History {
    /// A history holding at most `capacity` samples (at least 1).
    pub fn new(capacity: usize) -> Self {
        Self {
            samples: VecDeque::new(),
            capacity: capacity.max(1),
        }
    }

    /// Records a sample taken at `at`.
    pub fn push(&mut self, at: Instant, totals: BTreeMap<SeriesKey, Totals>) {
        if self.samples.len() == self.capacity {
            self.samples.pop_front();
        }
        self.samples.push_back((at, totals));
    }

    /// Rows comparing `now` (totals at `at`) with the oldest sample; busiest first.
    pub fn top(&self, at: Instant, now: &BTreeMap<SeriesKey, Totals>) -> Vec<TopRow> {
        let empty = BTreeMap::new();
        let (since, old) = self.samples.front().map_or((at, &empty), |(t, s)| (*t, s));
        let window = at.saturating_duration_since(since).as_secs_f64();
        let mut rows: Vec<TopRow> = now
            .iter()
            .map(|(key, t)| {
                let o = old.get(key).copied().unwrap_or_default();
                let d = delta(t, &o);
                let failed = d.errors + d.timeouts;
                let finished = d.responses + d.timeouts;
                #[allow(clippy::cast_precision_loss)] // counts far below 2^52
                TopRow {
                    pod: key.0.clone(),
                    server: key.1,
                    rate: if window > 0.0 {
                        d.requests as f64 / window
                    } else {
                        0.0
                    },
                    p50_ms: quantile(&d.buckets, 0.5).map(|s| s * 1000.0),
                    p99_ms: quantile(&d.buckets, 0.99).map(|s| s * 1000.0),
                    timeouts: d.timeouts,
                    retransmits: d.retransmits,
                    error_rate: if finished > 0 {
                        failed as f64 / finished as f64
                    } else {
                        0.0
                    },
                    requests_total: t.requests,
                    window_seconds: window,
                }
            })
            .collect();
        rows.sort_by(|a, b| {
            b.rate
                .total_cmp(&a.rate)
                .then_with(|| b.requests_total.cmp(&a.requests_total))
                .then_with(|| (&a.pod, a.server).cmp(&(&b.pod, b.server)))
        });
        rows
    }
}

fn delta(new: &Totals, old: &Totals) -> Totals {
    let mut buckets = [0; BUCKETS];
    for (i, b) in buckets.iter_mut().enumerate() {
        *b = new.buckets[i].saturating_sub(old.buckets[i]);
    }
    Totals {
        requests: new.requests.saturating_sub(old.requests),
        responses: new.responses.saturating_sub(old.responses),
        errors: new.errors.saturating_sub(old.errors),
        timeouts: new.timeouts.saturating_sub(old.timeouts),
        retransmits: new.retransmits.saturating_sub(old.retransmits),
        buckets,
    }
}

/// The `q` quantile in seconds, interpolated linearly inside its bucket as
/// Prometheus' `histogram_quantile` does; the `+Inf` bucket answers the last
/// finite bound. `None` without observations.
#[allow(clippy::cast_precision_loss)] // counts and bounds far below 2^52
pub fn quantile(buckets: &[u64; BUCKETS], q: f64) -> Option<f64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut seen = 0u64;
    let mut lower = 0.0;
    for (i, &n) in buckets.iter().enumerate() {
        let Some(&bound_ns) = BUCKET_BOUNDS_NS.get(i) else {
            return Some(lower);
        };
        let upper = bound_ns as f64 / 1e9;
        if n > 0 && (seen + n) as f64 >= rank {
            let into = (rank - seen as f64) / n as f64;
            return Some(lower + (upper - lower) * into);
        }
        seen += n;
        lower = upper;
    }
    Some(lower)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate() {
        let mut b = [0u64; BUCKETS];
        assert_eq!(quantile(&b, 0.5), None);
        // 10 answers in (0.05 s, 0.1 s].
        b[7] = 10;
        let p50 = quantile(&b, 0.5).unwrap();
        assert!((p50 - 0.075).abs() < 1e-9, "{p50}");
        // Beyond 10 s: the last bound.
        let mut b = [0u64; BUCKETS];
        b[BUCKETS - 1] = 3;
        assert!((quantile(&b, 0.99).unwrap() - 10.0).abs() < 1e-9);
    }

    #[test]
    fn rows_are_deltas_over_the_window() {
        let key: SeriesKey = (PodRef::host(), "10.0.0.10".parse().unwrap());
        let start = Instant::now();
        let mut h = History::new(3);
        let mut old = Totals {
            requests: 10,
            responses: 10,
            ..Totals::default()
        };
        old.buckets[0] = 10;
        h.push(start, BTreeMap::from([(key.clone(), old)]));
        let mut new = Totals {
            requests: 30,
            responses: 26,
            errors: 2,
            timeouts: 4,
            ..Totals::default()
        };
        new.buckets[0] = 26;
        let rows = h.top(
            start + std::time::Duration::from_secs(10),
            &BTreeMap::from([(key, new)]),
        );
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert!((r.rate - 2.0).abs() < 1e-9);
        assert_eq!(r.timeouts, 4);
        // (2 errors + 4 timeouts) / (16 answers + 4 timeouts)
        assert!((r.error_rate - 0.3).abs() < 1e-9);
        assert_eq!(r.requests_total, 30);
    }
}
