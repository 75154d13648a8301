//! Conntrack metrics: insert races per pod and destination, netfilter drops,
//! the kernel's own conntrack statistics and table fill, and the tracer's
//! event losses.
//!
//! Every value is cumulative in the kernel (per-CPU maps, `/proc` counters),
//! so each scrape renders a fresh [`TracerSnapshot`]; nothing is accumulated
//! here except the sticky set of labelled destinations ([`TopDestinations`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;

use super::{
    proto_name,
    stats::{ConntrackStats, TableFill},
    DropKind, TracerSnapshot,
};
use crate::{
    endpoint::{PodRef, Registry},
    metrics::text::{Encoder, MetricType},
};

/// At most this many (destination, proto) series get their own
/// `destination` label; the rest are summed under `destination="other"`.
pub const TOP_DESTINATIONS: usize = 50;

/// The `destination` label value of races towards unlabelled destinations.
pub const OTHER_DESTINATION: &str = "other";

/// The `program` label value of the conntrack race tracer.
pub const PROGRAM: &str = "conntrack";

/// Which destinations have their own `destination` label, kept across scrapes.
///
/// The set is sticky: once a destination is labelled it stays labelled, and
/// new destinations enter (highest race count first) only while fewer than
/// [`TOP_DESTINATIONS`] are labelled. A destination summed under `other`
/// therefore never leaves it, so neither a labelled series nor `other` ever
/// decreases, which is what makes them valid counters. The price: on a
/// long-running agent the labelled set is the first busy destinations seen,
/// not necessarily today's busiest; `other` still counts the rest exactly.
#[derive(Clone, Debug)]
pub struct TopDestinations {
    limit: usize,
    labelled: BTreeSet<(SocketAddr, u8)>,
}

impl Default for TopDestinations {
    fn default() -> Self {
        Self::with_limit(TOP_DESTINATIONS)
    }
}

impl TopDestinations {
    /// A set that labels at most [`TOP_DESTINATIONS`] series.
    pub fn new() -> Self {
        Self::default()
    }

    /// A set that labels at most `limit` series.
    pub fn with_limit(limit: usize) -> Self {
        Self {
            limit,
            labelled: BTreeSet::new(),
        }
    }

    /// Admits new destinations from `counts` while there is room, highest
    /// count first (ties by address, so the choice is deterministic).
    fn admit(&mut self, counts: &HashMap<(SocketAddr, u8), u64>) {
        let room = self.limit.saturating_sub(self.labelled.len());
        if room == 0 {
            return;
        }
        let mut candidates: Vec<(&(SocketAddr, u8), &u64)> = counts
            .iter()
            .filter(|(key, races)| **races > 0 && !self.labelled.contains(key))
            .collect();
        candidates.sort_by(|a, b| b.1.cmp(a.1).then_with(|| a.0.cmp(b.0)));
        self.labelled
            .extend(candidates.into_iter().take(room).map(|(key, _)| *key));
    }

    /// True if `destination` has its own label.
    pub fn is_labelled(&self, destination: SocketAddr, proto: u8) -> bool {
        self.labelled.contains(&(destination, proto))
    }

    /// How many series have their own label.
    pub fn len(&self) -> usize {
        self.labelled.len()
    }

    /// True if no destination has been labelled yet.
    pub fn is_empty(&self) -> bool {
        self.labelled.is_empty()
    }
}

/// What one scrape of conntrack metrics reads.
#[derive(Clone, Copy, Debug)]
pub struct Sources<'a> {
    /// The tracer's maps.
    pub snapshot: &'a TracerSnapshot,
    /// The kernel's conntrack statistics; `None` omits `podnet_conntrack_stat_total`.
    pub stats: Option<&'a ConntrackStats>,
    /// Table fill; `None` omits `podnet_conntrack_entries` and `podnet_conntrack_max`.
    pub fill: Option<TableFill>,
}

/// Renders every conntrack family into `enc` (its samples of the shared
/// `podnet_bpf_*` families are added by the subsystem). Pods are looked up in
/// `registry` (an address no pod owns is host traffic: empty `namespace` and
/// `pod`); `top` is the sticky destination set held across scrapes.
pub fn render(
    enc: &mut Encoder,
    sources: &Sources<'_>,
    registry: &Registry,
    top: &mut TopDestinations,
) {
    let snapshot = sources.snapshot;
    render_drops(enc, snapshot, registry);
    render_drop_reasons(enc, snapshot, registry);
    render_destinations(enc, snapshot, top);

    if let Some(stats) = sources.stats {
        let mut family = enc.family(
            "podnet_conntrack_stat_total",
            MetricType::Counter,
            "Conntrack statistics of the kernel for the observed network namespace, summed over CPUs.",
        );
        for (stat, value) in stats.labelled() {
            family.sample(&[("stat", stat)], value);
        }
    }

    if let Some(fill) = sources.fill {
        enc.family(
            "podnet_conntrack_entries",
            MetricType::Gauge,
            "Entries in the conntrack table of the observed network namespace.",
        )
        .sample(&[], fill.entries);
        enc.family(
            "podnet_conntrack_max",
            MetricType::Gauge,
            "Size limit of the conntrack table (nf_conntrack_max).",
        )
        .sample(&[], fill.max);
    }

    let counters = &snapshot.counters;
    enc.family(
        "podnet_conntrack_races_counted_total",
        MetricType::Counter,
        "Insert races the kernel program counted in the observed network namespace, from every source: one series per node from the agent's start, to compare with the kernel's insert_failed.",
    )
    .sample(&[], counters.insert_races);
    enc.family(
        "podnet_bpf_events_sampled_total",
        MetricType::Counter,
        "Events a kernel program did not send above its per-CPU rate budget; counts stay exact while detail is sampled.",
    )
    .sample(&[("program", PROGRAM)], counters.events_sampled_out);
}

fn kind_label(kind: DropKind) -> &'static str {
    match kind {
        DropKind::InsertRace => "insert_race",
        DropKind::Other => "other",
    }
}

/// `podnet_conntrack_insert_races_total` and `podnet_netfilter_drops_total`.
fn render_drops(enc: &mut Encoder, snapshot: &TracerSnapshot, registry: &Registry) {
    let mut races: BTreeMap<(PodRef, String), u64> = BTreeMap::new();
    let mut drops: BTreeMap<(PodRef, &'static str), u64> = BTreeMap::new();
    for drop in &snapshot.drops {
        let pod = registry.pod_for(drop.source);
        if drop.kind == DropKind::InsertRace {
            *races
                .entry((pod.clone(), proto_name(drop.proto)))
                .or_default() += drop.packets;
        }
        *drops.entry((pod, kind_label(drop.kind))).or_default() += drop.packets;
    }

    let mut family = enc.family(
        "podnet_conntrack_insert_races_total",
        MetricType::Counter,
        "Packets dropped because their conntrack entry lost an insert race (insert_failed), by sending pod.",
    );
    for ((pod, proto), packets) in &races {
        family.sample(
            &[
                ("namespace", &pod.namespace),
                ("pod", &pod.pod),
                ("proto", proto),
            ],
            *packets,
        );
    }

    let mut family = enc.family(
        "podnet_netfilter_drops_total",
        MetricType::Counter,
        "Packets dropped by netfilter, by sending pod and kind (insert_race or other).",
    );
    for ((pod, kind), packets) in &drops {
        family.sample(
            &[
                ("namespace", &pod.namespace),
                ("pod", &pod.pod),
                ("kind", kind),
            ],
            *packets,
        );
    }
}

/// The reason label of netfilter's drops in `podnet_drops_total`: the
/// kernel's own name for an `Other` drop, and `insert_race` for a race.
fn netfilter_reason(kind: DropKind) -> &'static str {
    match kind {
        DropKind::InsertRace => "insert_race",
        DropKind::Other => "NETFILTER_DROP",
    }
}

/// `podnet_drops_total`: every drop the kernel made in the observed
/// namespace, by endpoint, direction and the kernel's reason. Netfilter's
/// drops come from `CT_DROPS` (counted under the flow's original source, so
/// a pod's as `egress`), the others from `CT_DROP_REASONS`.
fn render_drop_reasons(enc: &mut Encoder, snapshot: &TracerSnapshot, registry: &Registry) {
    let mut counts: BTreeMap<(PodRef, &'static str, &str), u64> = BTreeMap::new();
    for drop in &snapshot.drops {
        let pod = registry.pod_for(drop.source);
        let direction = if pod.pod.is_empty() {
            "unknown"
        } else {
            "egress"
        };
        *counts
            .entry((pod, direction, netfilter_reason(drop.kind)))
            .or_default() += drop.packets;
    }
    for count in &snapshot.reasons {
        let pod = count
            .endpoint
            .map_or_else(PodRef::default, |ip| registry.pod_for(ip));
        *counts
            .entry((pod, count.direction, count.reason.as_str()))
            .or_default() += count.packets;
    }
    let mut family = enc.family(
        "podnet_drops_total",
        MetricType::Counter,
        "Packets the kernel dropped on the node, by pod, direction (egress: the pod sent it; ingress: it was going to the pod) and the kernel's drop reason (enum skb_drop_reason; insert_race for conntrack insert races).",
    );
    for ((pod, direction, reason), packets) in &counts {
        family.sample(
            &[
                ("namespace", &pod.namespace),
                ("pod", &pod.pod),
                ("direction", direction),
                ("reason", reason),
            ],
            *packets,
        );
    }
}

/// `podnet_conntrack_race_destinations_total`.
fn render_destinations(enc: &mut Encoder, snapshot: &TracerSnapshot, top: &mut TopDestinations) {
    let mut counts: HashMap<(SocketAddr, u8), u64> = HashMap::new();
    for d in &snapshot.destinations {
        *counts.entry((d.destination, d.proto)).or_default() += d.races;
    }
    top.admit(&counts);

    // Labelled series in address order, then `other` per protocol.
    let mut labelled: BTreeMap<(SocketAddr, u8), u64> = BTreeMap::new();
    let mut other: BTreeMap<u8, u64> = BTreeMap::new();
    for (&(destination, proto), &races) in &counts {
        if top.is_labelled(destination, proto) {
            labelled.insert((destination, proto), races);
        } else {
            *other.entry(proto).or_default() += races;
        }
    }

    let mut family = enc.family(
        "podnet_conntrack_race_destinations_total",
        MetricType::Counter,
        "Insert races by destination (ip:port before NAT); the first 50 destinations by count are labelled, the rest summed as other.",
    );
    for ((destination, proto), races) in &labelled {
        family.sample(
            &[
                ("destination", &destination.to_string()),
                ("proto", &proto_name(*proto)),
            ],
            *races,
        );
    }
    for (proto, races) in &other {
        family.sample(
            &[
                ("destination", OTHER_DESTINATION),
                ("proto", &proto_name(*proto)),
            ],
            *races,
        );
    }
}

/// `podnet_snat_port_usage_ratio` of the busiest destinations, and the last
/// scan's size and duration.
pub fn render_snat(enc: &mut Encoder, scan: &super::snat::SnatScan) {
    let mut family = enc.family(
        "podnet_snat_port_usage_ratio",
        MetricType::Gauge,
        "Source-NATed flows to a destination sharing one SNAT address, over the 64,512 source ports NAT picks from (1024-65535); the 10 busiest destinations, from the last conntrack scan (--snat-scan-interval, every minute by default). Near 1, new flows to it lose their insert race.",
    );
    for usage in &scan.busiest {
        family.sample(
            &[
                ("destination", &usage.destination.to_string()),
                ("proto", &proto_name(usage.proto)),
            ],
            usage.ratio(),
        );
    }
    enc.family(
        "podnet_snat_scan_entries",
        MetricType::Gauge,
        "Conntrack entries read by the last SNAT port usage scan.",
    )
    .sample(&[], u64::try_from(scan.entries).unwrap_or(u64::MAX));
    enc.family(
        "podnet_snat_scan_duration_seconds",
        MetricType::Gauge,
        "How long the last SNAT port usage scan took (ctnetlink dump and count).",
    )
    .sample(&[], scan.took.as_secs_f64());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conntrack::{DestinationCount, DropCount, ReasonCount, TracerCounters};
    use crate::endpoint::{Endpoint, Source};

    fn registry() -> Registry {
        let r = Registry::new();
        let ep = |ns: &str, pod: &str, ip: &str| Endpoint {
            namespace: ns.into(),
            pod: pod.into(),
            ips: vec![ip.parse().unwrap()],
            interface: None,
            container_id: None,
            if_name: None,
        };
        r.replace_source(
            Source::File,
            vec![
                ep("shop", "a", "10.0.1.2"),
                ep("shop", "b", "10.0.2.2"),
                ep("shop", "b", "fd00::2"),
                ep("we\"ird\\ns\n", "p", "10.0.3.3"),
            ],
        );
        r
    }

    fn drop(source: &str, proto: u8, kind: DropKind, packets: u64) -> DropCount {
        DropCount {
            source: source.parse().unwrap(),
            proto,
            kind,
            packets,
        }
    }

    fn reason(
        endpoint: Option<&str>,
        direction: &'static str,
        reason: &str,
        packets: u64,
    ) -> ReasonCount {
        ReasonCount {
            endpoint: endpoint.map(|e| e.parse().unwrap()),
            direction,
            reason: reason.into(),
            packets,
        }
    }

    fn dest(destination: &str, proto: u8, races: u64) -> DestinationCount {
        DestinationCount {
            destination: destination.parse().unwrap(),
            proto,
            races,
        }
    }

    fn snapshot() -> TracerSnapshot {
        TracerSnapshot {
            drops: vec![
                drop("10.0.2.2", 17, DropKind::InsertRace, 3),
                drop("fd00::2", 17, DropKind::InsertRace, 2),
                drop("10.0.2.2", 6, DropKind::InsertRace, 4),
                drop("10.0.2.2", 6, DropKind::Other, 7),
                drop("192.168.0.9", 17, DropKind::InsertRace, 1),
                drop("192.168.0.10", 1, DropKind::Other, 2),
                drop("10.0.3.3", 17, DropKind::Other, 1),
            ],
            destinations: vec![
                dest("10.98.0.2:7000", 17, 5),
                dest("[fd00::53]:53", 17, 1),
                dest("10.98.0.2:80", 6, 4),
            ],
            reasons: vec![
                reason(Some("10.0.1.2"), "egress", "NO_SOCKET", 20),
                reason(Some("10.0.1.2"), "ingress", "IP_INHDR", 15),
                reason(None, "unknown", "IP_INHDR", 10),
                reason(None, "egress", "NO_SOCKET", 4),
            ],
            counters: TracerCounters {
                events_lost: 9,
                events_sampled_out: 11,
                ..TracerCounters::default()
            },
        }
    }

    fn render_text(
        snapshot: &TracerSnapshot,
        stats: Option<&ConntrackStats>,
        fill: Option<TableFill>,
        top: &mut TopDestinations,
    ) -> String {
        let mut enc = Encoder::new();
        let sources = Sources {
            snapshot,
            stats,
            fill,
        };
        render(&mut enc, &sources, &registry(), top);
        enc.finish()
    }

    /// The sample lines (not HELP/TYPE) of one family.
    fn samples<'a>(text: &'a str, family: &str) -> Vec<&'a str> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.split(['{', ' ']).next() == Some(family))
            .collect()
    }

    #[test]
    fn races_and_drops_per_pod_with_host_traffic() {
        let text = render_text(&snapshot(), None, None, &mut TopDestinations::new());
        assert_eq!(
            samples(&text, "podnet_conntrack_insert_races_total"),
            [
                r#"podnet_conntrack_insert_races_total{namespace="",pod="",proto="udp"} 1"#,
                r#"podnet_conntrack_insert_races_total{namespace="shop",pod="b",proto="tcp"} 4"#,
                r#"podnet_conntrack_insert_races_total{namespace="shop",pod="b",proto="udp"} 5"#,
            ]
        );
        assert_eq!(
            samples(&text, "podnet_netfilter_drops_total"),
            [
                r#"podnet_netfilter_drops_total{namespace="",pod="",kind="insert_race"} 1"#,
                r#"podnet_netfilter_drops_total{namespace="",pod="",kind="other"} 2"#,
                r#"podnet_netfilter_drops_total{namespace="shop",pod="b",kind="insert_race"} 9"#,
                r#"podnet_netfilter_drops_total{namespace="shop",pod="b",kind="other"} 7"#,
                r#"podnet_netfilter_drops_total{namespace="we\"ird\\ns\n",pod="p",kind="other"} 1"#,
            ]
        );
    }

    /// Netfilter's drops (by kind) and the other reasons in one family; a
    /// departed pod's drops (no endpoint) under the host's labels with their
    /// direction kept.
    #[test]
    fn every_drop_by_pod_direction_and_reason() {
        let text = render_text(&snapshot(), None, None, &mut TopDestinations::new());
        let l = r#"podnet_drops_total{namespace="shop",pod="#;
        assert_eq!(
            samples(&text, "podnet_drops_total"),
            [
                r#"podnet_drops_total{namespace="",pod="",direction="egress",reason="NO_SOCKET"} 4"#.to_owned(),
                r#"podnet_drops_total{namespace="",pod="",direction="unknown",reason="IP_INHDR"} 10"#.to_owned(),
                r#"podnet_drops_total{namespace="",pod="",direction="unknown",reason="NETFILTER_DROP"} 2"#.to_owned(),
                r#"podnet_drops_total{namespace="",pod="",direction="unknown",reason="insert_race"} 1"#.to_owned(),
                format!(r#"{l}"a",direction="egress",reason="NO_SOCKET"}} 20"#),
                format!(r#"{l}"a",direction="ingress",reason="IP_INHDR"}} 15"#),
                format!(r#"{l}"b",direction="egress",reason="NETFILTER_DROP"}} 7"#),
                format!(r#"{l}"b",direction="egress",reason="insert_race"}} 9"#),
                r#"podnet_drops_total{namespace="we\"ird\\ns\n",pod="p",direction="egress",reason="NETFILTER_DROP"} 1"#.to_owned(),
            ]
        );
    }

    #[test]
    fn every_family_with_help_and_type() {
        let stats = ConntrackStats {
            insert_failed: 12,
            drop: 13,
            clash_resolve: 2,
            chaintoolong: 0,
            early_drop: 1,
            invalid: 6,
            found: 99,
            ..ConntrackStats::default()
        };
        let fill = TableFill {
            entries: 42,
            max: 262_144,
        };
        let text = render_text(
            &snapshot(),
            Some(&stats),
            Some(fill),
            &mut TopDestinations::new(),
        );
        let expected_tail = "\
# HELP podnet_conntrack_race_destinations_total Insert races by destination (ip:port before NAT); the first 50 destinations by count are labelled, the rest summed as other.
# TYPE podnet_conntrack_race_destinations_total counter
podnet_conntrack_race_destinations_total{destination=\"10.98.0.2:80\",proto=\"tcp\"} 4
podnet_conntrack_race_destinations_total{destination=\"10.98.0.2:7000\",proto=\"udp\"} 5
podnet_conntrack_race_destinations_total{destination=\"[fd00::53]:53\",proto=\"udp\"} 1
# HELP podnet_conntrack_stat_total Conntrack statistics of the kernel for the observed network namespace, summed over CPUs.
# TYPE podnet_conntrack_stat_total counter
podnet_conntrack_stat_total{stat=\"insert_failed\"} 12
podnet_conntrack_stat_total{stat=\"drop\"} 13
podnet_conntrack_stat_total{stat=\"clash_resolve\"} 2
podnet_conntrack_stat_total{stat=\"chaintoolong\"} 0
podnet_conntrack_stat_total{stat=\"early_drop\"} 1
podnet_conntrack_stat_total{stat=\"invalid\"} 6
# HELP podnet_conntrack_entries Entries in the conntrack table of the observed network namespace.
# TYPE podnet_conntrack_entries gauge
podnet_conntrack_entries 42
# HELP podnet_conntrack_max Size limit of the conntrack table (nf_conntrack_max).
# TYPE podnet_conntrack_max gauge
podnet_conntrack_max 262144
# HELP podnet_conntrack_races_counted_total Insert races the kernel program counted in the observed network namespace, from every source: one series per node from the agent's start, to compare with the kernel's insert_failed.
# TYPE podnet_conntrack_races_counted_total counter
podnet_conntrack_races_counted_total 0
# HELP podnet_bpf_events_sampled_total Events a kernel program did not send above its per-CPU rate budget; counts stay exact while detail is sampled.
# TYPE podnet_bpf_events_sampled_total counter
podnet_bpf_events_sampled_total{program=\"conntrack\"} 11
";
        assert!(text.ends_with(expected_tail), "{text}");
        assert!(text.starts_with(
            "# HELP podnet_conntrack_insert_races_total Packets dropped because their conntrack entry lost an insert race (insert_failed), by sending pod.\n\
             # TYPE podnet_conntrack_insert_races_total counter\n"
        ));
        // Every family appears exactly once.
        let types: Vec<&str> = text.lines().filter(|l| l.starts_with("# TYPE")).collect();
        assert_eq!(types.len(), 9);
    }

    #[test]
    fn optional_sources_omit_their_families() {
        let text = render_text(&snapshot(), None, None, &mut TopDestinations::new());
        assert!(!text.contains("podnet_conntrack_stat_total"));
        assert!(!text.contains("podnet_conntrack_entries"));
        assert!(!text.contains("podnet_conntrack_max"));
        // An empty snapshot still declares the families it always has.
        let text = render_text(
            &TracerSnapshot::default(),
            None,
            None,
            &mut TopDestinations::new(),
        );
        assert!(text.contains("# TYPE podnet_conntrack_insert_races_total counter\n"));
        assert!(text.contains("podnet_bpf_events_sampled_total{program=\"conntrack\"} 0\n"));
    }

    /// 60 destinations: 10.1.0.N:53 with N races, N = 1..=60.
    fn sixty() -> TracerSnapshot {
        TracerSnapshot {
            destinations: (1..=60u64)
                .map(|n| dest(&format!("10.1.0.{n}:53"), 17, n))
                .collect(),
            ..TracerSnapshot::default()
        }
    }

    #[test]
    fn top_fifty_and_other() {
        let mut top = TopDestinations::new();
        let text = render_text(&sixty(), None, None, &mut top);
        let lines = samples(&text, "podnet_conntrack_race_destinations_total");
        assert_eq!(lines.len(), 51);
        assert_eq!(top.len(), 50);
        // The 50 busiest (11..=60) are labelled; 1..=10 sum to 55.
        assert!(lines.contains(
            &r#"podnet_conntrack_race_destinations_total{destination="10.1.0.11:53",proto="udp"} 11"#
        ));
        assert!(!text.contains("\"10.1.0.10:53\""));
        assert_eq!(
            lines.last(),
            Some(
                &r#"podnet_conntrack_race_destinations_total{destination="other",proto="udp"} 55"#
            )
        );
    }

    #[test]
    fn labelled_destinations_are_sticky() {
        let mut top = TopDestinations::new();
        render_text(&sixty(), None, None, &mut top);
        // Now the formerly quiet destinations race a lot, and a new one appears.
        let mut later = sixty();
        for d in &mut later.destinations {
            if d.races <= 10 {
                d.races += 1000;
            }
        }
        later.destinations.push(dest("10.2.0.1:443", 6, 5000));
        let text = render_text(&later, None, None, &mut top);
        let lines = samples(&text, "podnet_conntrack_race_destinations_total");
        // Same 50 labelled series, values unchanged; the busy ones grow `other`.
        assert!(lines.contains(
            &r#"podnet_conntrack_race_destinations_total{destination="10.1.0.60:53",proto="udp"} 60"#
        ));
        assert!(!text.contains("\"10.1.0.1:53\""));
        assert!(!text.contains("10.2.0.1"));
        assert_eq!(
            &lines[50..],
            [
                r#"podnet_conntrack_race_destinations_total{destination="other",proto="tcp"} 5000"#,
                r#"podnet_conntrack_race_destinations_total{destination="other",proto="udp"} 10055"#,
            ]
        );
    }

    #[test]
    fn new_destinations_enter_while_there_is_room() {
        let mut top = TopDestinations::with_limit(2);
        let first = TracerSnapshot {
            destinations: vec![dest("10.0.0.1:53", 17, 1)],
            ..TracerSnapshot::default()
        };
        render_text(&first, None, None, &mut top);
        let second = TracerSnapshot {
            destinations: vec![
                dest("10.0.0.1:53", 17, 1),
                dest("10.0.0.2:53", 17, 2),
                dest("10.0.0.3:53", 17, 3),
            ],
            ..TracerSnapshot::default()
        };
        let text = render_text(&second, None, None, &mut top);
        assert_eq!(
            samples(&text, "podnet_conntrack_race_destinations_total"),
            [
                r#"podnet_conntrack_race_destinations_total{destination="10.0.0.1:53",proto="udp"} 1"#,
                r#"podnet_conntrack_race_destinations_total{destination="10.0.0.3:53",proto="udp"} 3"#,
                r#"podnet_conntrack_race_destinations_total{destination="other",proto="udp"} 2"#,
            ]
        );
    }
}
