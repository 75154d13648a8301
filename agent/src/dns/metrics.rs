//! DNS metrics: latency histograms, requests, responses, timeouts and
//! retransmits per pod and server, and the programs' own counters.
//!
//! Series are keyed in the kernel by client address; a pod with several
//! addresses is summed here. Uplink series of an address a pod owns are left
//! out (the pod's own interface already counted them), as in `dns.top`.

use std::collections::BTreeMap;
use std::net::IpAddr;

use podnet_common::dns::{scope, BUCKET_BOUNDS_NS, OTHER_SERVER};

use super::{qtype_name, rcode_name, top::peer_addrs, DnsCounters, DnsSnapshot};
use crate::{
    endpoint::{PodRef, Registry},
    metrics::{
        shared::SharedFamilies,
        text::{Encoder, MetricType},
        Histogram,
    },
};

/// The `program` label value of the DNS programs.
pub const PROGRAM: &str = "dns";

type Series = (PodRef, IpAddr, String);

/// The `server` label: the address, or `other` for the servers a client's
/// series fold into beyond `podnet_common::dns::SERVERS_PER_CLIENT`.
fn server_label(server: &IpAddr) -> String {
    let other = match server {
        IpAddr::V4(v4) => v4.octets() == [0xff; 4],
        IpAddr::V6(v6) => v6.octets() == OTHER_SERVER,
    };
    if other {
        "other".to_owned()
    } else {
        server.to_string()
    }
}

/// [`BUCKET_BOUNDS_NS`] in seconds, the bounds of the latency histograms.
#[allow(clippy::cast_precision_loss)] // the bounds are exact in f64
const BUCKET_BOUNDS_SECONDS: [f64; BUCKET_BOUNDS_NS.len()] = {
    let mut seconds = [0.0; BUCKET_BOUNDS_NS.len()];
    let mut i = 0;
    while i < BUCKET_BOUNDS_NS.len() {
        seconds[i] = BUCKET_BOUNDS_NS[i] as f64 / 1e9;
        i += 1;
    }
    seconds
};

/// Groups `(key, value)` by (pod, server, label); `None` labels skip.
fn series_of(
    registry: &Registry,
    key: &podnet_common::dns::PeerKey,
    label: String,
) -> Option<Series> {
    let (client, server) = peer_addrs(key)?;
    let pod = registry.pod_for(client);
    if key.scope == scope::UPLINK && !pod.is_host() {
        return None;
    }
    Some((pod, server, label))
}

/// Renders every DNS family into `enc` (not `podnet_bpf_events_lost_total`:
/// the caller adds `snapshot.counters.events_lost` to that shared family).
pub fn render(enc: &mut Encoder, snapshot: &DnsSnapshot, registry: &Registry) {
    let hist = histograms(snapshot, registry);
    render_histograms(enc, &hist);
    render_requests(enc, snapshot, registry);
    render_responses(enc, &hist);
    render_peer_counts(enc, snapshot, registry);
    render_untracked(enc, snapshot, registry);
}

/// `podnet_dns_failures_total`: queries that timed out or were sent again,
/// per pod, server and cause; clients that are no endpoint (any more) count
/// under the host's labels.
pub fn render_failures(
    enc: &mut Encoder,
    counts: &BTreeMap<super::cause::FailureKey, u64>,
    registry: &Registry,
) {
    let mut per_pod: BTreeMap<(PodRef, String, &'static str), u64> = BTreeMap::new();
    for ((client, server, cause), n) in counts {
        let key = (
            registry.pod_for(*client),
            server_label(server),
            cause.label(),
        );
        *per_pod.entry(key).or_default() += n;
    }
    let mut family = enc.family(
        "podnet_dns_failures_total",
        MetricType::Counter,
        "DNS queries that timed out or that the client sent again, by cause: insert_race (a copy lost its conntrack insert race), dropped (a copy was dropped on the node; see podnet_drops_total), unanswered (nothing dropped on the node, no answer), late (answered after the client had sent it again, nothing dropped). Counted by the agent since it started.",
    );
    for ((pod, server, cause), n) in &per_pod {
        family.sample(
            &[
                ("namespace", &pod.namespace),
                ("pod", &pod.pod),
                ("server", server),
                ("cause", cause),
            ],
            *n,
        );
    }
}

/// `podnet_dns_queries_untracked_total`: queries a pod sent while it had
/// `PENDING_PER_CLIENT` queries in flight; sources that are no endpoint count
/// under the host's labels.
fn render_untracked(enc: &mut Encoder, snapshot: &DnsSnapshot, registry: &Registry) {
    let mut per_pod: BTreeMap<PodRef, u64> = BTreeMap::new();
    for (client, n) in &snapshot.untracked {
        let pod = crate::net::kernel_addr(&client.addr, client.family)
            .map(|ip| registry.pod_for(ip))
            .unwrap_or_default();
        if client._pad[0] == scope::UPLINK && !pod.is_host() {
            continue;
        }
        *per_pod.entry(pod).or_default() += n;
    }
    let mut family = enc.family(
        "podnet_dns_queries_untracked_total",
        MetricType::Counter,
        "DNS queries not timed because the pod already had 1024 queries waiting for an answer (so one pod cannot push out another's); they count in no other DNS family.",
    );
    for (pod, n) in &per_pod {
        family.sample(&[("namespace", &pod.namespace), ("pod", &pod.pod)], *n);
    }
}

/// Latency histograms per (pod, server, rcode).
fn histograms(snapshot: &DnsSnapshot, registry: &Registry) -> BTreeMap<Series, Histogram> {
    let mut hist: BTreeMap<Series, Histogram> = BTreeMap::new();
    for l in &snapshot.latency {
        let rcode = u8::try_from(l.key.code).unwrap_or(u8::MAX);
        if let Some(k) = series_of(registry, &l.key, rcode_name(rcode).into_owned()) {
            hist.entry(k)
                .or_insert_with(|| Histogram::new(&BUCKET_BOUNDS_SECONDS))
                .add_counts(&l.buckets, l.sum_ns);
        }
    }
    hist
}

fn render_histograms(enc: &mut Encoder, hist: &BTreeMap<Series, Histogram>) {
    let mut family = enc.family(
        "podnet_dns_request_duration_seconds",
        MetricType::Histogram,
        "Time from a DNS query's first transmission to its answer, measured in the kernel on the pod's interface, by answer rcode.",
    );
    for ((pod, server, rcode), h) in hist {
        let server = server_label(server);
        h.write(
            &mut family,
            &[
                ("namespace", &pod.namespace),
                ("pod", &pod.pod),
                ("server", &server),
                ("rcode", rcode),
            ],
        );
    }
}

fn render_requests(enc: &mut Encoder, snapshot: &DnsSnapshot, registry: &Registry) {
    let mut requests: BTreeMap<Series, u64> = BTreeMap::new();
    for r in &snapshot.requests {
        if let Some(k) = series_of(registry, &r.key, qtype_name(r.key.code).into_owned()) {
            *requests.entry(k).or_default() += r.count;
        }
    }
    let mut family = enc.family(
        "podnet_dns_requests_total",
        MetricType::Counter,
        "DNS queries sent, by query type; a retransmission of the same query is counted in podnet_dns_retransmits_total instead.",
    );
    for ((pod, server, qtype), n) in &requests {
        family.sample(
            &[
                ("namespace", &pod.namespace),
                ("pod", &pod.pod),
                ("server", &server_label(server)),
                ("qtype", qtype),
            ],
            *n,
        );
    }
}

fn render_responses(enc: &mut Encoder, hist: &BTreeMap<Series, Histogram>) {
    let mut family = enc.family(
        "podnet_dns_responses_total",
        MetricType::Counter,
        "DNS answers matched to a query, by rcode.",
    );
    for ((pod, server, rcode), h) in hist {
        family.sample(
            &[
                ("namespace", &pod.namespace),
                ("pod", &pod.pod),
                ("server", &server_label(server)),
                ("rcode", rcode),
            ],
            h.count(),
        );
    }
}

/// `podnet_dns_timeouts_total` and `podnet_dns_retransmits_total`.
fn render_peer_counts(enc: &mut Encoder, snapshot: &DnsSnapshot, registry: &Registry) {
    for (name, help, counts) in [
        (
            "podnet_dns_timeouts_total",
            "DNS queries with no answer within --dns-timeout.",
            &snapshot.timeouts,
        ),
        (
            "podnet_dns_retransmits_total",
            "DNS queries sent again (same id, same client and server) before an answer.",
            &snapshot.retransmits,
        ),
    ] {
        let mut sums: BTreeMap<Series, u64> = BTreeMap::new();
        for c in counts {
            if let Some(k) = series_of(registry, &c.key, String::new()) {
                *sums.entry(k).or_default() += c.count;
            }
        }
        let mut family = enc.family(name, MetricType::Counter, help);
        for ((pod, server, _), n) in &sums {
            family.sample(
                &[
                    ("namespace", &pod.namespace),
                    ("pod", &pod.pod),
                    ("server", &server_label(server)),
                ],
                *n,
            );
        }
    }
}

/// The DNS samples of the shared `podnet_bpf_*` families: events lost;
/// full maps; packets skipped as malformed (truncated, bad label, compression
/// pointer in a question, name over 255 bytes, wrong counts or flags),
/// `tcp_continuation` (TCP segment not starting a message), unsupported (IP
/// fragment) or unmatched (an answer without a pending query).
pub fn shared_samples(shared: &mut SharedFamilies, c: &DnsCounters) {
    shared
        .events_lost(PROGRAM, c.events_lost)
        .map_full("dns_stats", c.stats_full)
        .map_full("dns_pending", c.pending_failed)
        .skipped(PROGRAM, "malformed", c.malformed)
        .skipped(PROGRAM, "tcp_continuation", c.tcp_skipped)
        .skipped(PROGRAM, "unsupported", c.unsupported)
        .skipped(PROGRAM, "unmatched", c.unmatched);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::{LatencyCount, PeerCount};
    use crate::endpoint::{Endpoint, Source};
    use podnet_common::dns::PeerKey;
    use podnet_common::family;

    fn key(client: [u8; 4], scope: u8, code: u16) -> PeerKey {
        let mut k = PeerKey {
            family: family::INET,
            scope,
            code,
            ..PeerKey::default()
        };
        k.client[..4].copy_from_slice(&client);
        k.server[..4].copy_from_slice(&[10, 98, 0, 2]);
        k
    }

    #[test]
    fn families_and_labels() {
        let registry = Registry::new();
        registry.replace_source(
            Source::File,
            vec![Endpoint {
                namespace: "shop".into(),
                pod: "cart".into(),
                ips: vec!["10.99.0.2".parse().unwrap()],
                interface: None,
                container_id: None,
                if_name: None,
            }],
        );
        let mut buckets = [0; podnet_common::dns::BUCKETS];
        buckets[6] = 2; // (25 ms, 50 ms]
        let snapshot = DnsSnapshot {
            latency: vec![
                LatencyCount {
                    key: key([10, 99, 0, 2], scope::POD, 3),
                    buckets,
                    sum_ns: 80_000_000,
                },
                // An uplink copy of the pod's query: left out.
                LatencyCount {
                    key: key([10, 99, 0, 2], scope::UPLINK, 3),
                    buckets,
                    sum_ns: 80_000_000,
                },
            ],
            requests: vec![
                PeerCount {
                    key: key([10, 99, 0, 2], scope::POD, 28),
                    count: 2,
                },
                PeerCount {
                    key: key([10, 98, 0, 1], scope::UPLINK, 1),
                    count: 1,
                },
            ],
            timeouts: vec![PeerCount {
                key: key([10, 99, 0, 2], scope::POD, 0),
                count: 4,
            }],
            ..DnsSnapshot::default()
        };
        let mut enc = Encoder::new();
        render(&mut enc, &snapshot, &registry);
        let text = enc.finish();
        let l = r#"namespace="shop",pod="cart",server="10.98.0.2""#;
        assert!(
            text.contains(&format!(
            "podnet_dns_request_duration_seconds_bucket{{{l},rcode=\"NXDOMAIN\",le=\"0.025\"}} 0\n"
        )),
            "{text}"
        );
        assert!(text.contains(&format!(
            "podnet_dns_request_duration_seconds_bucket{{{l},rcode=\"NXDOMAIN\",le=\"0.05\"}} 2\n"
        )));
        assert!(text.contains(&format!(
            "podnet_dns_request_duration_seconds_sum{{{l},rcode=\"NXDOMAIN\"}} 0.08\n"
        )));
        assert!(text.contains(&format!(
            "podnet_dns_request_duration_seconds_count{{{l},rcode=\"NXDOMAIN\"}} 2\n"
        )));
        assert!(text.contains(&format!(
            "podnet_dns_requests_total{{{l},qtype=\"AAAA\"}} 2\n"
        )));
        assert!(text.contains(
            "podnet_dns_requests_total{namespace=\"\",pod=\"\",server=\"10.98.0.2\",qtype=\"A\"} 1\n"
        ));
        assert!(text.contains(&format!(
            "podnet_dns_responses_total{{{l},rcode=\"NXDOMAIN\"}} 2\n"
        )));
        assert!(text.contains(&format!("podnet_dns_timeouts_total{{{l}}} 4\n")));
        assert!(text.contains("# TYPE podnet_dns_retransmits_total counter\n"));
    }
}
