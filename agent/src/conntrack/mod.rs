//! Conntrack insert races: the kernel tracer's counts and events, the winner
//! lookup, the kernel's own statistics, and the recent-race log.
//!
//! Counts are exact: the kernel program counts every drop in per-CPU maps and
//! user space only reads them. Per-race detail (both tuples and the winning
//! flow) travels over a ring buffer and may be sampled above a per-CPU budget;
//! every event not delivered is counted.

pub mod ctnetlink;
pub mod events;
pub mod log;
pub mod stats;
pub mod tracer;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

pub use podnet_common::conntrack::DropKind;
use podnet_common::family;
use serde::{Deserialize, Serialize};

/// Packets dropped by netfilter from one source address, by kind and protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DropCount {
    /// Source address of the flow's original direction.
    pub source: IpAddr,
    /// IP protocol number.
    pub proto: u8,
    /// Insert race or other.
    pub kind: DropKind,
    /// Packets, summed over CPUs.
    pub packets: u64,
}

/// Insert races towards one destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DestinationCount {
    /// Destination address and port (original direction, before NAT).
    pub destination: SocketAddr,
    /// IP protocol number.
    pub proto: u8,
    /// Races, summed over CPUs.
    pub races: u64,
}

/// The tracer's own counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TracerCounters {
    /// Netfilter drops seen in the observed namespace.
    pub netfilter_drops: u64,
    /// Insert races seen in the observed namespace.
    pub insert_races: u64,
    /// Race events lost because the ring buffer was full.
    pub events_lost: u64,
    /// Race events sampled out by the per-CPU budget.
    pub events_sampled_out: u64,
    /// Drops not counted per source: the drop map was full.
    pub drop_keys_full: u64,
    /// Races not counted per destination: the destination map was full.
    pub dest_keys_full: u64,
    /// Kernel reads that failed (packet skipped).
    pub read_errors: u64,
    /// Netfilter drops of non-IP packets.
    pub not_ip: u64,
    /// Confirm returns of `NF_DROP` the probe could not match to a call.
    pub probe_unmatched: u64,
}

/// Everything the tracer's kernel maps hold, at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TracerSnapshot {
    /// Drops per source address, kind and protocol.
    pub drops: Vec<DropCount>,
    /// Races per destination.
    pub destinations: Vec<DestinationCount>,
    /// The tracer's counters.
    pub counters: TracerCounters,
}

/// Protocol label value: `tcp`, `udp`, `icmp`, `icmpv6`, or the number.
pub fn proto_name(proto: u8) -> String {
    match proto {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        58 => "icmpv6".into(),
        132 => "sctp".into(),
        n => n.to_string(),
    }
}

/// Converts a kernel address (16 bytes, IPv4 in the first 4) to an `IpAddr`.
/// Unknown families yield `None`.
pub fn kernel_addr(addr: &[u8; 16], fam: u8) -> Option<IpAddr> {
    match fam {
        family::INET => Some(IpAddr::V4(Ipv4Addr::new(
            addr[0], addr[1], addr[2], addr[3],
        ))),
        family::INET6 => Some(IpAddr::V6(Ipv6Addr::from(*addr))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_labels() {
        assert_eq!(proto_name(6), "tcp");
        assert_eq!(proto_name(17), "udp");
        assert_eq!(proto_name(1), "icmp");
        assert_eq!(proto_name(47), "47");
    }

    #[test]
    fn kernel_addresses() {
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&[10, 1, 2, 3]);
        assert_eq!(
            kernel_addr(&a, family::INET),
            Some("10.1.2.3".parse().unwrap())
        );
        let v6: Ipv6Addr = "fd00::7".parse().unwrap();
        assert_eq!(
            kernel_addr(&v6.octets(), family::INET6),
            Some(IpAddr::V6(v6))
        );
        assert_eq!(kernel_addr(&a, 99), None);
    }
}
