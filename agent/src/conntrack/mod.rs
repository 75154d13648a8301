//! Conntrack insert races: the kernel tracer's counts and events, the winner
//! lookup, the kernel's own statistics, and the recent-race log.
//!
//! Counts are exact: the kernel program counts every drop in per-CPU maps and
//! user space only reads them. Per-race detail (both tuples and the winning
//! flow) travels over a ring buffer and may be sampled above a per-CPU budget;
//! every event not delivered is counted.

pub mod ctnetlink;
pub mod drops;
pub mod events;
pub mod flows;
pub mod metrics;
pub mod snat;
pub mod stats;
mod subsystem;
pub mod tracer;
pub mod view;

use std::net::{IpAddr, SocketAddr};

pub use podnet_common::conntrack::DropKind;
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

/// Packets the kernel dropped for a reason other than netfilter's, counted
/// under one endpoint (or none), direction and reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReasonCount {
    /// The endpoint's address; `None` for packets of no endpoint.
    pub endpoint: Option<IpAddr>,
    /// `egress` (the endpoint sent it), `ingress` (it was going to the
    /// endpoint) or `unknown`.
    pub direction: &'static str,
    /// The kernel's `enum skb_drop_reason` name without its prefix
    /// (`NO_SOCKET`, ...), or its number when this kernel has no name for it.
    pub reason: String,
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
    /// Drops of IP packets with a reason other than netfilter's, in the
    /// observed namespace.
    pub other_drops: u64,
    /// Such drops not counted per endpoint: the reason map was full.
    pub reason_keys_full: u64,
    /// Such drops skipped: not IPv4 or IPv6.
    pub other_not_ip: u64,
    /// Such drops skipped: the IP header could not be read.
    pub other_read_errors: u64,
    /// Such drops skipped: no device, so no known namespace.
    pub other_no_device: u64,
    /// Drops of DNS flows sent to user space (netfilter's and the others).
    pub flow_events: u64,
    /// Drops of DNS flows not sent: the ring buffer was full.
    pub flow_events_lost: u64,
}

/// Everything the tracer's kernel maps hold, at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TracerSnapshot {
    /// Drops per source address, kind and protocol.
    pub drops: Vec<DropCount>,
    /// Races per destination.
    pub destinations: Vec<DestinationCount>,
    /// Drops with other reasons, per endpoint, direction and reason.
    pub reasons: Vec<ReasonCount>,
    /// The tracer's counters.
    pub counters: TracerCounters,
}

pub use crate::net::{kernel_addr, proto_name};

/// Recent races, for `podnetctl conntrack races`.
pub type RaceLog = crate::recent::Recent<events::RaceRecord>;
pub use subsystem::{
    Conntrack, ConntrackError, ConntrackOptions, ConntrackSettings, ConntrackStatus, METHODS,
    RACE_EVENT_BUDGET_PER_CPU, RACE_LOG_CAPACITY,
};
