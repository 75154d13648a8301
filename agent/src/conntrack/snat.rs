//! SNAT port usage: how many live flows share one translation range, the early
//! warning that insert races are coming.
//!
//! Every flow that source NAT gave the node's address to one destination
//! (address, port and protocol) needs its own source port of that address:
//! when the range runs full, new flows collide and lose their insert race. A
//! thread dumps the conntrack table over ctnetlink every `--snat-scan-interval`
//! ([`DEFAULT_SCAN_INTERVAL`]),
//! counts the source-NATed flows per (SNAT address, destination, protocol),
//! and keeps the [`TOP`] busiest destinations for
//! `podnet_snat_port_usage_ratio`.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, PoisonError,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use super::ctnetlink::{ConntrackEntry, NetlinkConntrack};
use crate::heartbeat;

/// Source ports NAT picks from when a rule gives no range and the flow's own
/// port is 1024 or above (`nf_nat_l4proto_unique_tuple`: 1024 to 65535).
pub const PORT_RANGE: u64 = 65_535 - 1_024 + 1;
/// Destinations reported.
pub const TOP: usize = 10;
/// `--snat-scan-interval`: a scan of 100,000 entries took 0.34 s on the
/// benchmark machine, so one a minute stays under 1 % of a core.
pub const DEFAULT_SCAN_INTERVAL: Duration = Duration::from_mins(1);
/// The scan thread's name (and its heartbeat's).
pub const SNAT_THREAD: &str = "podnet-ct-snat";
/// `IPS_SRC_NAT` from `enum ip_conntrack_status` (uapi).
const IPS_SRC_NAT: u32 = 1 << 4;
/// Longest the thread sleeps between two looks at its stop flag.
const TICK: Duration = Duration::from_millis(100);

/// The source-NATed flows of one destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnatUsage {
    /// Where the flows go (after DNAT: the reply's source).
    pub destination: SocketAddr,
    /// IP protocol number.
    pub proto: u8,
    /// The node's address they were given.
    pub snat: IpAddr,
    /// Live flows sharing the range.
    pub flows: u64,
}

impl SnatUsage {
    /// The share of [`PORT_RANGE`] in use.
    pub fn ratio(&self) -> f64 {
        #[allow(clippy::cast_precision_loss)] // counts far below 2^52
        let ratio = self.flows as f64 / PORT_RANGE as f64;
        ratio
    }
}

/// Counts source-NATed flows per (SNAT address, destination, protocol).
#[derive(Debug, Default)]
pub struct SnatCounter {
    flows: HashMap<(IpAddr, SocketAddr, u8), u64>,
}

impl SnatCounter {
    /// Counts `entry` if source NAT changed its source address or port (TCP
    /// and UDP only).
    pub fn add(&mut self, entry: &ConntrackEntry) {
        let (original, reply) = (&entry.original, &entry.reply);
        if entry.status & IPS_SRC_NAT == 0 || !matches!(original.proto, 6 | 17) {
            return;
        }
        let destination = SocketAddr::new(reply.src, reply.src_port);
        *self
            .flows
            .entry((reply.dst, destination, original.proto))
            .or_default() += 1;
    }

    /// The [`TOP`] busiest destinations, busiest first; a destination
    /// reached from several SNAT addresses appears with its busiest.
    pub fn busiest(self) -> Vec<SnatUsage> {
        let mut per_destination: HashMap<(SocketAddr, u8), SnatUsage> = HashMap::new();
        for ((snat, destination, proto), flows) in self.flows {
            let usage = SnatUsage {
                destination,
                proto,
                snat,
                flows,
            };
            per_destination
                .entry((destination, proto))
                .and_modify(|u| {
                    if flows > u.flows {
                        *u = usage.clone();
                    }
                })
                .or_insert(usage);
        }
        let mut all: Vec<SnatUsage> = per_destination.into_values().collect();
        all.sort_by(|a, b| {
            b.flows
                .cmp(&a.flows)
                .then(a.destination.cmp(&b.destination))
                .then(a.proto.cmp(&b.proto))
        });
        all.truncate(TOP);
        all
    }
}

/// The last scan.
#[derive(Clone, Debug, Default)]
pub struct SnatScan {
    /// The busiest destinations.
    pub busiest: Vec<SnatUsage>,
    /// Conntrack entries read.
    pub entries: usize,
    /// How long the dump and the count took.
    pub took: Duration,
    /// Scans that failed since start.
    pub errors: u64,
}

/// Starts the thread that scans the table every `every` into `scan` until
/// `stop`.
pub fn spawn(
    scan: Arc<Mutex<SnatScan>>,
    every: Duration,
    stop: Arc<AtomicBool>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(SNAT_THREAD.into())
        .spawn(move || {
            let heartbeat = heartbeat::registry().register(SNAT_THREAD, heartbeat::SILENCE_LIMIT);
            let mut last: Option<Instant> = None;
            while !stop.load(Ordering::Relaxed) && heartbeat.beat() {
                if last.is_none_or(|t| t.elapsed() >= every) {
                    last = Some(Instant::now());
                    scan_once(&scan);
                }
                std::thread::sleep(TICK);
            }
            if stop.load(Ordering::Relaxed) {
                heartbeat.retire();
            }
        })
}

fn scan_once(scan: &Mutex<SnatScan>) {
    let started = Instant::now();
    let mut counter = SnatCounter::default();
    let dumped = NetlinkConntrack::open_with_timeout(Duration::from_secs(1))
        .and_then(|mut table| table.dump(|entry| counter.add(&entry)));
    let mut scan = scan.lock().unwrap_or_else(PoisonError::into_inner);
    match dumped {
        Ok(count) => {
            scan.busiest = counter.busiest();
            scan.entries = count.entries;
            scan.took = started.elapsed();
        }
        Err(e) => {
            scan.errors += 1;
            tracing::warn!(error = %e, "scanning the conntrack table for SNAT port usage failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conntrack::ctnetlink::FlowTuple;

    fn entry(pod_port: u16, dst: [u8; 4], snat_port: u16, status: u32) -> ConntrackEntry {
        let pod = IpAddr::from([10, 244, 1, 2]);
        let node = IpAddr::from([192, 168, 0, 10]);
        ConntrackEntry {
            original: FlowTuple {
                src: pod,
                dst: IpAddr::from(dst),
                src_port: pod_port,
                dst_port: 443,
                proto: 6,
            },
            reply: FlowTuple {
                src: IpAddr::from(dst),
                dst: if status & IPS_SRC_NAT != 0 { node } else { pod },
                src_port: 443,
                dst_port: snat_port,
                proto: 6,
            },
            status,
            id: None,
            timeout_secs: None,
            mark: None,
        }
    }

    #[test]
    fn counts_source_nated_flows_per_destination_busiest_first() {
        let mut counter = SnatCounter::default();
        for port in 0..300 {
            counter.add(&entry(
                30_000 + port,
                [203, 0, 113, 1],
                40_000 + port,
                IPS_SRC_NAT,
            ));
        }
        for port in 0..12 {
            counter.add(&entry(
                30_000 + port,
                [203, 0, 113, 2],
                41_000 + port,
                IPS_SRC_NAT,
            ));
        }
        // Not source-NATed: not counted.
        counter.add(&entry(50_000, [203, 0, 113, 3], 50_000, 0));
        let busiest = counter.busiest();
        let rows: Vec<(String, u64)> = busiest
            .iter()
            .map(|u| (u.destination.to_string(), u.flows))
            .collect();
        assert_eq!(
            rows,
            [
                ("203.0.113.1:443".to_owned(), 300),
                ("203.0.113.2:443".to_owned(), 12)
            ]
        );
        assert!((busiest[0].ratio() - 300.0 / 64_512.0).abs() < 1e-12);
    }

    #[test]
    fn keeps_the_top_destinations_only() {
        let mut counter = SnatCounter::default();
        for d in 1..=15u8 {
            for port in 0..u16::from(d) {
                counter.add(&entry(
                    30_000 + port,
                    [203, 0, 113, d],
                    40_000 + port,
                    IPS_SRC_NAT,
                ));
            }
        }
        let busiest = counter.busiest();
        assert_eq!(busiest.len(), TOP);
        assert_eq!(busiest[0].flows, 15);
        assert_eq!(busiest[TOP - 1].flows, 6);
    }
}
