//! Conntrack insert-race tracer: kernel offsets, map keys, events and counters.

use crate::impl_pod;

/// Offsets into kernel structures, resolved by user space from the running
/// kernel's BTF and handed to the program as the global `KERNEL_OFFSETS`.
///
/// All offsets are in bytes from the start of the named structure. A value of
/// [`KernelOffsets::ABSENT`] means the member does not exist on this kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `sk_buff._nfct` (conntrack pointer with ctinfo in the low 3 bits).
    pub skb_nfct: u32,
    /// `sk_buff.head`.
    pub skb_head: u32,
    /// `sk_buff.network_header` (u16 offset from `head`).
    pub skb_network_header: u32,
    /// `sk_buff.dev`.
    pub skb_dev: u32,
    /// `net_device.nd_net` (a `possible_net_t` holding `struct net *`).
    pub dev_nd_net: u32,
    /// `net.ns.inum`: the network namespace's inode number.
    pub net_ns_inum: u32,
    /// `nf_conn.status`.
    pub ct_status: u32,
    /// `nf_conn.ct_net` (a `possible_net_t`).
    pub ct_net: u32,
    /// `nf_conn.tuplehash[0]`.
    pub ct_tuplehash: u32,
    /// `sizeof(struct nf_conntrack_tuple_hash)`: stride to `tuplehash[1]`.
    pub tuplehash_size: u32,
    /// `nf_conntrack_tuple_hash.tuple`.
    pub tuplehash_tuple: u32,
    /// `nf_conntrack_tuple.src.u3` (address).
    pub tuple_src_addr: u32,
    /// `nf_conntrack_tuple.src.u` (port or ICMP id, network order).
    pub tuple_src_port: u32,
    /// `nf_conntrack_tuple.src.l3num` (address family).
    pub tuple_src_l3num: u32,
    /// `nf_conntrack_tuple.dst.u3` (address).
    pub tuple_dst_addr: u32,
    /// `nf_conntrack_tuple.dst.u` (port or ICMP type/code, network order).
    pub tuple_dst_port: u32,
    /// `nf_conntrack_tuple.dst.protonum`.
    pub tuple_dst_protonum: u32,
    /// Value of `SKB_DROP_REASON_NETFILTER_DROP` in `enum skb_drop_reason`.
    pub drop_reason_netfilter: u32,
    /// Inode number of the network namespace to observe; 0 observes all.
    pub netns_filter: u32,
    /// Most race events sent to user space per CPU per second; beyond it
    /// events are sampled out (and counted), while counts stay exact.
    pub event_budget_per_cpu: u32,
    /// Which program counts insert races, a [`RaceHook`] as a number. With
    /// [`RaceHook::ConfirmProbe`] the `kfree_skb` program counts only the
    /// other netfilter drops.
    pub race_hook: u32,
    /// `sk_buff.protocol` (the L3 protocol, an ethertype in network order).
    pub skb_protocol: u32,
    /// Ports (host order, 0 = unused) whose dropped UDP and TCP packets are
    /// sent to user space as [`FlowDrop`]s: the DNS ports, so a failed query
    /// can be given the drop that lost it.
    pub flow_ports: [u16; FLOW_PORTS],
}

/// Slots of [`KernelOffsets::flow_ports`].
pub const FLOW_PORTS: usize = crate::dns::MAX_PORTS;

impl KernelOffsets {
    /// Marker for a member that this kernel does not have.
    pub const ABSENT: u32 = u32::MAX;
}

const _: () = assert!(core::mem::size_of::<KernelOffsets>() == 104);

/// The kernel hook that counts insert races.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RaceHook {
    /// `tp_btf/kfree_skb`: netfilter drops classified by the entry's status.
    /// Works wherever BTF tracepoints do (no kprobes, no fentry needed).
    DropTracepoint = 0,
    /// kretprobe on `__nf_conntrack_confirm`: a race is exactly a confirm that
    /// returned `NF_DROP`, the kernel's own `insert_failed` path; the drop
    /// tracepoint then counts it like any other drop.
    ConfirmProbe = 1,
}

/// Return value of a netfilter hook that drops the packet (`NF_DROP`).
pub const NF_DROP: i32 = 0;
/// `IPS_CONFIRMED` from `enum ip_conntrack_status` (uapi, stable ABI).
pub const IPS_CONFIRMED: u64 = 1 << 3;
/// `IPS_SRC_NAT_DONE` from `enum ip_conntrack_status` (uapi, stable ABI).
pub const IPS_SRC_NAT_DONE: u64 = 1 << 7;

/// Why a netfilter drop was counted.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropKind {
    /// The conntrack entry was not confirmed while source NAT was already
    /// done: only `__nf_conntrack_confirm` can drop it then (`insert_failed`).
    InsertRace = 1,
    /// Any other netfilter drop (an iptables DROP, an invalid packet, ...).
    Other = 2,
}

/// Classifies a netfilter drop from the conntrack entry's `status` bits.
///
/// `__nf_conntrack_confirm` (net/netfilter/nf_conntrack_core.c, Linux 6.18) is
/// the only place that drops a packet whose entry is still unconfirmed after
/// source NAT ran (`nf_nat_inet_fn` sets `IPS_SRC_NAT_DONE` for every flow that
/// passes nat POSTROUTING, even with no matching rule): that drop is the one
/// the kernel counts as `insert_failed`. Any other combination is another
/// netfilter drop (a filter rule, an invalid packet, ...).
#[inline(always)]
pub const fn classify(status: u64) -> DropKind {
    if status & IPS_CONFIRMED == 0 && status & IPS_SRC_NAT_DONE != 0 {
        DropKind::InsertRace
    } else {
        DropKind::Other
    }
}

impl DropKind {
    /// Decodes the kind byte stored in map keys and events.
    pub const fn from_u8(value: u8) -> Option<Self> {
        match value {
            1 => Some(Self::InsertRace),
            2 => Some(Self::Other),
            _ => None,
        }
    }
}

/// A connection tuple as conntrack stores it. Ports are in network byte
/// order, addresses are 16 bytes (IPv4 uses the first 4).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Tuple {
    /// Source address.
    pub src_addr: [u8; 16],
    /// Destination address.
    pub dst_addr: [u8; 16],
    /// Source port (network order); ICMP id for ICMP.
    pub src_port: u16,
    /// Destination port (network order); ICMP type/code for ICMP.
    pub dst_port: u16,
    /// Address family (`AF_INET` or `AF_INET6`).
    pub family: u8,
    /// IP protocol number.
    pub proto: u8,
    /// Explicit padding.
    pub _pad: [u8; 2],
}

const _: () = assert!(core::mem::size_of::<Tuple>() == 40);

/// Key of the per-CPU drop counter map: who sent the dropped packet, and why.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DropKey {
    /// Source address of the flow's original direction (the pod).
    pub addr: [u8; 16],
    /// Address family.
    pub family: u8,
    /// IP protocol number.
    pub proto: u8,
    /// [`DropKind`] as a byte.
    pub kind: u8,
    /// Explicit padding.
    pub _pad: u8,
}

const _: () = assert!(core::mem::size_of::<DropKey>() == 20);

/// Key of the per-CPU race destination map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DestKey {
    /// Destination address of the original direction.
    pub addr: [u8; 16],
    /// Destination port, network order.
    pub port: u16,
    /// Address family.
    pub family: u8,
    /// IP protocol number.
    pub proto: u8,
}

const _: () = assert!(core::mem::size_of::<DestKey>() == 20);

/// Which way a dropped packet was going, seen from the endpoint it is counted under.
pub mod direction {
    /// Neither address belongs to an endpoint of the node.
    pub const UNKNOWN: u8 = 0;
    /// The endpoint sent it (its address is the source).
    pub const EGRESS: u8 = 1;
    /// It was going to the endpoint (its address is the destination).
    pub const INGRESS: u8 = 2;
}

/// Key of the per-CPU map of drops by the kernel's reason (`CT_DROP_REASONS`):
/// the endpoint (or [`crate::AddrKey::UNKNOWN`]), the direction, and the
/// `enum skb_drop_reason` value the kernel gave.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ReasonKey {
    /// The endpoint's address (source for egress, destination for ingress).
    pub addr: [u8; 16],
    /// `enum skb_drop_reason` value; its name comes from the kernel's BTF.
    pub reason: u32,
    /// Address family.
    pub family: u8,
    /// A [`direction`] value.
    pub direction: u8,
    /// Explicit padding.
    pub _pad: [u8; 2],
}

const _: () = assert!(core::mem::size_of::<ReasonKey>() == 24);

/// Indexes of the per-CPU counters of drops other than netfilter's
/// (`CT_DROP_COUNTERS`).
pub mod drop_counter {
    /// Drops with a reason other than `NETFILTER_DROP`, of IPv4 or IPv6
    /// packets, in the observed namespace.
    pub const COUNTED: u32 = 0;
    /// Such drops not counted per endpoint because `CT_DROP_REASONS` was full.
    pub const KEYS_FULL: u32 = 1;
    /// Such drops of packets that were not IPv4 or IPv6 (skipped).
    pub const NOT_IP: u32 = 2;
    /// Such drops whose IP header could not be read (skipped).
    pub const READ_ERRORS: u32 = 3;
    /// Such drops of packets without a device, so without a known network
    /// namespace, while one namespace is observed (skipped).
    pub const NO_DEVICE: u32 = 4;
    /// Flow drops (of any reason, netfilter's included) not sent because
    /// `CT_FLOW_DROPS` was full.
    pub const FLOW_EVENTS_LOST: u32 = 5;
    /// Flow drops sent to user space.
    pub const FLOW_EVENTS: u32 = 6;
    /// Number of counters.
    pub const COUNT: u32 = 7;
}

/// What dropped a [`FlowDrop`]'s packet.
pub mod flow_drop_kind {
    /// A netfilter rule or verdict (`NETFILTER_DROP`), not an insert race
    /// (races reach user space as [`super::RaceEvent`]s).
    pub const NETFILTER: u8 = 1;
    /// Any other `enum skb_drop_reason`.
    pub const OTHER: u8 = 2;
}

/// One dropped packet of a flow on a [`KernelOffsets::flow_ports`] port, sent
/// to user space over `CT_FLOW_DROPS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowDrop {
    /// `bpf_ktime_get_ns()` at the drop (CLOCK_MONOTONIC).
    pub timestamp_ns: u64,
    /// The flow: the conntrack entry's original direction when the packet
    /// had one (the client's view, before NAT), else the IP header's.
    pub flow: Tuple,
    /// The `enum skb_drop_reason` value.
    pub reason: u32,
    /// [`flow_drop_kind`].
    pub kind: u8,
    /// 1 when `flow` was read from the conntrack entry.
    pub tracked: u8,
    /// Explicit padding.
    pub _pad: [u8; 2],
}

const _: () = assert!(core::mem::size_of::<FlowDrop>() == 56);

/// One insert race, sent to user space over the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RaceEvent {
    /// `bpf_ktime_get_ns()` at the drop (CLOCK_MONOTONIC).
    pub timestamp_ns: u64,
    /// The losing entry's `status` bits.
    pub ct_status: u64,
    /// Original direction: pod → destination, before NAT.
    pub original: Tuple,
    /// Reply direction: destination → the node's SNAT address and port.
    pub reply: Tuple,
    /// Network namespace inode of the conntrack entry.
    pub netns: u32,
    /// CPU that saw the drop.
    pub cpu: u32,
}

const _: () = assert!(core::mem::size_of::<RaceEvent>() == 104);

/// Indexes of the tracer's per-CPU counter array (`CT_COUNTERS`).
pub mod counter {
    /// Netfilter drops seen in the observed namespace.
    pub const NETFILTER_DROPS: u32 = 0;
    /// Insert races seen in the observed namespace.
    pub const INSERT_RACES: u32 = 1;
    /// Race events that could not be sent: the ring buffer was full.
    pub const EVENTS_LOST: u32 = 2;
    /// Race events not sent because the per-CPU event budget was spent.
    pub const EVENTS_SAMPLED_OUT: u32 = 3;
    /// Drops not counted per source because `CT_DROPS` was full.
    pub const DROP_KEYS_FULL: u32 = 4;
    /// Races not counted per destination because `CT_RACE_DESTS` was full.
    pub const DEST_KEYS_FULL: u32 = 5;
    /// Kernel reads that failed (the packet was skipped and counted here).
    pub const READ_ERRORS: u32 = 6;
    /// Netfilter drops whose packet was neither IPv4 nor IPv6.
    pub const NOT_IP: u32 = 7;
    /// Confirm returns of `NF_DROP` not followed by their netfilter drop
    /// before the next one (should stay 0).
    pub const PROBE_UNMATCHED: u32 = 8;
    /// Number of counters.
    pub const COUNT: u32 = 9;
}

/// Names of the tracer's maps, as user space opens and pins them.
pub mod maps {
    /// Per-CPU hash: [`super::DropKey`] → packets.
    pub const DROPS: &str = "CT_DROPS";
    /// Per-CPU hash: [`super::DestKey`] → insert races.
    pub const RACE_DESTS: &str = "CT_RACE_DESTS";
    /// Ring buffer of [`super::RaceEvent`].
    pub const EVENTS: &str = "CT_EVENTS";
    /// Per-CPU array of counters, indexed by [`super::counter`].
    pub const COUNTERS: &str = "CT_COUNTERS";
    /// Per-CPU array: event budget window per CPU.
    pub const BUDGET: &str = "CT_BUDGET";
    /// Hash written by user space: the node's endpoint addresses
    /// ([`crate::AddrKey`] → 1). Drops from other sources count under
    /// [`crate::AddrKey::UNKNOWN`].
    pub const ENDPOINTS: &str = "CT_ENDPOINTS";
    /// Hash written by user space only: drops of sources that left
    /// ([`super::DropKey`] with the unknown address → packets); pinned, so
    /// they outlive the agent.
    pub const DEPARTED: &str = "CT_DEPARTED";
    /// Per-CPU hash: [`super::ReasonKey`] → packets dropped with a reason
    /// other than `NETFILTER_DROP`.
    pub const DROP_REASONS: &str = "CT_DROP_REASONS";
    /// Hash written by user space only: drops by reason of endpoints that
    /// left ([`super::ReasonKey`] with the unknown address → packets).
    pub const REASONS_DEPARTED: &str = "CT_REASONS_DEPARTED";
    /// Per-CPU array of counters, indexed by [`super::drop_counter`].
    pub const DROP_COUNTERS: &str = "CT_DROP_COUNTERS";
    /// Capacity of `CT_DROP_REASONS`: preallocated per CPU (a tracing
    /// program's map), so kept small enough for the memory formula at 256
    /// CPUs; a pod has a few reasons, and a full map is counted and alerted on.
    pub const DROP_REASONS_CAPACITY: u32 = 2_048;
    /// Capacity of `CT_REASONS_DEPARTED`: every reason, both families and
    /// directions of the unknown key.
    pub const REASONS_DEPARTED_CAPACITY: u32 = 2_048;
    /// Capacity of `CT_DROPS`.
    pub const DROPS_CAPACITY: u32 = 16_384;
    /// Capacity of `CT_RACE_DESTS`.
    pub const RACE_DESTS_CAPACITY: u32 = 4_096;
    /// Size of `CT_EVENTS` in bytes.
    pub const EVENTS_BYTES: u32 = 1 << 20;
    /// Ring buffer of [`super::FlowDrop`].
    pub const FLOW_DROPS: &str = "CT_FLOW_DROPS";
    /// Size of `CT_FLOW_DROPS` in bytes: 4,681 drops between two reads.
    pub const FLOW_DROPS_BYTES: u32 = 1 << 18;
}

/// The per-CPU event budget window (`CT_BUDGET`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BudgetWindow {
    /// Start of the current one-second window (ns).
    pub window_start_ns: u64,
    /// Events sent in the current window.
    pub sent: u64,
}

const _: () = assert!(core::mem::size_of::<BudgetWindow>() == 16);

/// Name of the global holding [`KernelOffsets`].
pub const OFFSETS_GLOBAL: &str = "KERNEL_OFFSETS";
/// Name of the program attached to `tp_btf/kfree_skb`.
pub const PROGRAM_NAME: &str = "podnet_kfree_skb";
/// Name of the kretprobe on `__nf_conntrack_confirm`.
pub const CONFIRM_EXIT_PROGRAM: &str = "podnet_confirm_exit";
/// The kernel function the precise hook probes.
pub const CONFIRM_FUNCTION: &str = "__nf_conntrack_confirm";

impl_pod!(
    KernelOffsets,
    Tuple,
    DropKey,
    DestKey,
    ReasonKey,
    RaceEvent,
    FlowDrop,
    BudgetWindow
);

#[cfg(test)]
mod tests {
    use super::*;

    /// `IPS_SEEN_REPLY`, `IPS_ASSURED`, `IPS_DST_NAT_DONE` (uapi), for realistic status words.
    const SEEN_REPLY: u64 = 1 << 1;
    const ASSURED: u64 = 1 << 2;
    const DST_NAT_DONE: u64 = 1 << 8;

    #[test]
    fn unconfirmed_after_snat_is_an_insert_race() {
        assert_eq!(classify(IPS_SRC_NAT_DONE), DropKind::InsertRace);
        assert_eq!(
            classify(IPS_SRC_NAT_DONE | DST_NAT_DONE),
            DropKind::InsertRace
        );
    }

    #[test]
    fn everything_else_is_other() {
        // Dropped by a filter rule before nat POSTROUTING ran.
        assert_eq!(classify(0), DropKind::Other);
        assert_eq!(classify(DST_NAT_DONE), DropKind::Other);
        // An established, confirmed flow dropped later (e.g. by a rule).
        assert_eq!(
            classify(IPS_CONFIRMED | IPS_SRC_NAT_DONE | SEEN_REPLY | ASSURED),
            DropKind::Other
        );
        assert_eq!(classify(IPS_CONFIRMED), DropKind::Other);
    }

    #[test]
    fn kind_bytes_round_trip() {
        for kind in [DropKind::InsertRace, DropKind::Other] {
            assert_eq!(DropKind::from_u8(kind as u8), Some(kind));
        }
        assert_eq!(DropKind::from_u8(0), None);
        assert_eq!(DropKind::from_u8(3), None);
    }
}
