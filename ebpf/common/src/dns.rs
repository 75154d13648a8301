//! DNS latency tracer: pending-query keys and values, statistics keys,
//! latency buckets, events and counters shared by the TC programs and the agent.
//!
//! The programs see a pod's queries and the answers to them on the pod's
//! host-side interface (and on uplinks for host-network pods), match each
//! answer to its query in an LRU hash ([`PendingKey`] → [`Pending`]) and count
//! latency, answers, requests and retransmits in per-CPU maps. Slow and failed
//! answers travel to user space as [`DnsEvent`]s with the query name.

use crate::impl_pod;

/// Longest domain name in wire format, terminating zero label included
/// (RFC 1035 §2.3.4); the name buffers are one byte larger.
pub const MAX_NAME_LEN: usize = 255;
/// Size of the name buffers (a power of two, so indexes can be masked).
pub const NAME_BUF_LEN: usize = 256;
/// Most labels a wire name of [`MAX_NAME_LEN`] bytes can have.
pub const MAX_LABELS: usize = 128;
/// Most server ports the programs watch.
pub const MAX_PORTS: usize = 8;

/// Upper bounds of the latency buckets in nanoseconds (a Prometheus histogram
/// from 0.5 ms to 10 s); one more bucket counts everything above the last.
pub const BUCKET_BOUNDS_NS: [u64; 14] = [
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];
/// Number of buckets in a [`Latency`] value (the bounds plus `+Inf`).
pub const BUCKETS: usize = BUCKET_BOUNDS_NS.len() + 1;

/// Where a program is attached, as recorded in statistics keys.
pub mod scope {
    /// The host side of a pod's interface: the pod is the client.
    pub const POD: u8 = 1;
    /// An uplink: the node (host-network pods) is the client.
    pub const UPLINK: u8 = 2;
}

/// Kinds of [`DnsEvent`].
pub mod event_kind {
    /// The answer came later than the slow threshold.
    pub const SLOW: u8 = 1;
    /// The answer's rcode is SERVFAIL, NXDOMAIN or REFUSED.
    pub const ERROR: u8 = 2;
    /// No answer before the timeout (found by user space, never sent by the kernel).
    pub const TIMEOUT: u8 = 3;
    /// Answered after the client had sent the query more than once
    /// ([`super::DnsEvent::sends`] > 1), whatever the latency and rcode.
    pub const RETRIED: u8 = 4;
}

/// Transport numbers as in the IP header.
pub mod proto {
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
}

/// Identifies one outstanding query: interface, client and server address and
/// port, transport and DNS id. Ports are in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PendingKey {
    /// Client address (IPv4 in the first 4 bytes).
    pub client: [u8; 16],
    /// Server address.
    pub server: [u8; 16],
    /// Interface the query was seen on.
    pub ifindex: u32,
    /// Client port.
    pub client_port: u16,
    /// Server port.
    pub server_port: u16,
    /// DNS message id.
    pub id: u16,
    /// Address family (`AF_INET`, `AF_INET6`).
    pub family: u8,
    /// Transport ([`proto`]).
    pub proto: u8,
}

const _: () = assert!(core::mem::size_of::<PendingKey>() == 44);

/// An outstanding query.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pending {
    /// `bpf_ktime_get_ns()` when the query was first sent (CLOCK_MONOTONIC).
    pub start_ns: u64,
    /// Query type.
    pub qtype: u16,
    /// Length of `name` in bytes (wire format, terminating zero included).
    pub name_len: u16,
    /// [`scope`] of the attachment that saw the query.
    pub scope: u8,
    /// [`pending_flags`]: how the query's client and server were counted,
    /// so its answer or timeout counts the same way.
    pub flags: u8,
    /// Copies of the query seen (1, then one more per retransmit; stops at 255).
    pub sends: u8,
    /// Explicit padding.
    pub _pad: u8,
    /// The query name in wire format (length-prefixed labels).
    pub name: [u8; NAME_BUF_LEN],
}

impl Pending {
    /// The client the query counts under: its address, or
    /// [`crate::AddrKey::UNKNOWN`] when it is not an endpoint; the scope is
    /// part of the key (a pod's query forwarded out of an uplink is counted
    /// apart from the same query on the pod's interface).
    #[inline(always)]
    pub fn counted_client(&self, key: &PendingKey) -> crate::AddrKey {
        client_key(
            if self.flags & pending_flags::UNKNOWN_CLIENT != 0 {
                crate::AddrKey::UNKNOWN
            } else {
                key.client
            },
            key.family,
            self.scope,
        )
    }

    /// The statistics key of the query's answer (`code` = rcode) or timeout
    /// (`code` 0): client and server as the query counted them.
    #[inline(always)]
    pub fn counted_peer(&self, key: &PendingKey, code: u16) -> PeerKey {
        PeerKey {
            client: self.counted_client(key).addr,
            server: if self.flags & pending_flags::OTHER_SERVER != 0 {
                OTHER_SERVER
            } else {
                key.server
            },
            family: key.family,
            scope: self.scope,
            code,
        }
    }
}

/// The key of a client in the per-client maps (`DNS_CLIENT_*`): the counted
/// address, its family, and the scope in the first padding byte.
#[inline(always)]
pub const fn client_key(addr: [u8; 16], family: u8, scope: u8) -> crate::AddrKey {
    crate::AddrKey {
        addr,
        family,
        _pad: [scope, 0, 0],
    }
}

/// Bits of [`Pending::flags`].
pub mod pending_flags {
    /// The client is not one of the node's endpoints: its query counts
    /// under [`crate::AddrKey::UNKNOWN`] (statistics and pending share).
    pub const UNKNOWN_CLIENT: u8 = 1;
    /// The client had used up its [`super::SERVERS_PER_CLIENT`]: the server
    /// counts as [`super::OTHER_SERVER`].
    pub const OTHER_SERVER: u8 = 2;
}

/// Distinct servers a client's statistics name; queries to further servers
/// count under [`OTHER_SERVER`], so one pod cannot fill the statistics maps.
pub const SERVERS_PER_CLIENT: u64 = 16;

/// The server address of series folded by [`SERVERS_PER_CLIENT`] (all ones:
/// no real server has it); user space labels it `other`.
pub const OTHER_SERVER: [u8; 16] = [0xff; 16];

/// Pending queries one client may have at a time; further queries are not
/// tracked (counted in [`ClientPending::refused`]) until some are answered or
/// time out, so one pod cannot evict another's queries.
pub const PENDING_PER_CLIENT: u64 = 1_024;

/// The query types counted by name; any other counts as 0 (`other`), so a
/// pod cannot create a series per type number.
pub const COUNTED_QTYPES: [u16; 17] = [
    1, 2, 5, 6, 12, 15, 16, 28, 33, 35, 43, 46, 48, 64, 65, 255, 257,
];

/// Whether `qtype` is in [`COUNTED_QTYPES`].
#[inline(always)]
pub fn counted_qtype(qtype: u16) -> bool {
    let mut i = 0;
    while i < COUNTED_QTYPES.len() {
        if COUNTED_QTYPES[i] == qtype {
            return true;
        }
        i += 1;
    }
    false
}

/// One client's pending queries, counted by the programs (atomically, all
/// CPUs share the value): in flight = `added − answered − expired`, with
/// `expired` from user space's `DNS_CLIENT_EXPIRED`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientPending {
    /// Queries recorded as pending.
    pub added: u64,
    /// Pending queries matched by their answer.
    pub answered: u64,
    /// Queries not tracked because the client had [`PENDING_PER_CLIENT`] in flight.
    pub refused: u64,
}

const _: () = assert!(core::mem::size_of::<ClientPending>() == 24);

/// What a [`DepartedKey`] counts.
pub mod departed_kind {
    /// Queries (`code` = qtype).
    pub const REQUESTS: u8 = 1;
    /// Retransmits.
    pub const RETRANSMITS: u8 = 2;
    /// Untracked queries (server and code 0).
    pub const UNTRACKED: u8 = 3;
}

/// Key of `DNS_DEPARTED`: the counts of clients that left, as the unknown
/// client's (written by user space only; pinned, so they outlive the agent).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DepartedKey {
    /// The series, client [`crate::AddrKey::UNKNOWN`].
    pub peer: PeerKey,
    /// [`departed_kind`].
    pub kind: u8,
    /// Explicit padding.
    pub _pad: [u8; 3],
}

const _: () = assert!(core::mem::size_of::<DepartedKey>() == 40);

/// A (client, server) pair whose series are counted by their own server
/// address (`DNS_CLIENT_SERVERS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ClientServer {
    /// The client, as counted ([`crate::AddrKey::UNKNOWN`] for non-endpoints).
    pub client: crate::AddrKey,
    /// The server address.
    pub server: [u8; 16],
}

const _: () = assert!(core::mem::size_of::<ClientServer>() == 36);

impl Default for Pending {
    fn default() -> Self {
        Self {
            start_ns: 0,
            qtype: 0,
            name_len: 0,
            scope: 0,
            flags: 0,
            sends: 0,
            _pad: 0,
            name: [0; NAME_BUF_LEN],
        }
    }
}

const _: () = assert!(core::mem::size_of::<Pending>() == 272);

/// Client and server of a statistics series.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerKey {
    /// Client address (the pod, or the node on uplinks).
    pub client: [u8; 16],
    /// Server address.
    pub server: [u8; 16],
    /// Address family.
    pub family: u8,
    /// [`scope`] of the attachment.
    pub scope: u8,
    /// Query type (requests map) or rcode (latency map); 0 in the retransmit map.
    pub code: u16,
}

const _: () = assert!(core::mem::size_of::<PeerKey>() == 36);

/// A latency histogram (one per CPU in the map).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Latency {
    /// Answers per bucket (not cumulative); the last one is `+Inf`.
    pub buckets: [u64; BUCKETS],
    /// Sum of the latencies in nanoseconds.
    pub sum_ns: u64,
}

const _: () = assert!(core::mem::size_of::<Latency>() == 128);

/// Settings user space writes into `DNS_CONFIG` (read by the programs on
/// every packet, so a restart with new flags takes effect on adopted links).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsConfig {
    /// Answers slower than this are sent as events.
    pub slow_threshold_ns: u64,
    /// Server ports (host order); unused slots are 0.
    pub ports: [u16; MAX_PORTS],
}

const _: () = assert!(core::mem::size_of::<DnsConfig>() == 24);

/// A slow or failed query, sent to user space over the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsEvent {
    /// `bpf_ktime_get_ns()` of the answer.
    pub timestamp_ns: u64,
    /// Answer time minus first query time.
    pub latency_ns: u64,
    /// The query.
    pub key: PendingKey,
    /// Query type.
    pub qtype: u16,
    /// Response code (header rcode, 4 bits).
    pub rcode: u8,
    /// [`event_kind`].
    pub kind: u8,
    /// [`scope`].
    pub scope: u8,
    /// Copies of the query seen ([`Pending::sends`]).
    pub sends: u8,
    /// Length of `name` in bytes.
    pub name_len: u16,
    /// The query name in wire format.
    pub name: [u8; NAME_BUF_LEN],
    /// Explicit padding to the 8-byte alignment.
    pub _tail: [u8; 4],
}

const _: () = assert!(core::mem::size_of::<DnsEvent>() == 328);

impl Default for DnsEvent {
    fn default() -> Self {
        Self {
            timestamp_ns: 0,
            latency_ns: 0,
            key: PendingKey::default(),
            qtype: 0,
            rcode: 0,
            kind: 0,
            scope: 0,
            sends: 0,
            name_len: 0,
            name: [0; NAME_BUF_LEN],
            _tail: [0; 4],
        }
    }
}

/// Indexes of the per-CPU counter array (`DNS_COUNTERS`).
pub mod counter {
    /// Queries parsed and recorded as pending.
    pub const QUERIES: u32 = 0;
    /// Answers matched to a pending query.
    pub const RESPONSES: u32 = 1;
    /// Answers with no pending query (late, duplicate, or not seen leaving).
    pub const UNMATCHED: u32 = 2;
    /// Messages to or from a DNS port that failed to parse (skipped).
    pub const MALFORMED: u32 = 3;
    /// Events that could not be sent: the ring buffer was full.
    pub const EVENTS_LOST: u32 = 4;
    /// Updates of a statistics map that failed because it was full.
    pub const STATS_FULL: u32 = 5;
    /// TCP segments on a DNS port not starting a message (skipped, see docs).
    pub const TCP_SKIPPED: u32 = 6;
    /// Packets on a DNS port that are not handled (IP fragments, IPv6
    /// extension headers).
    pub const UNSUPPORTED: u32 = 7;
    /// Pending queries that could not be recorded.
    pub const PENDING_FAILED: u32 = 8;
    /// Number of counters.
    pub const COUNT: u32 = 9;
}

/// Names of the maps, as user space opens and pins them.
pub mod maps {
    /// LRU hash: [`super::PendingKey`] → [`super::Pending`].
    pub const PENDING: &str = "DNS_PENDING";
    /// Per-CPU hash: [`super::PeerKey`] (code = rcode) → [`super::Latency`].
    pub const LATENCY: &str = "DNS_LATENCY";
    /// Per-CPU hash: [`super::PeerKey`] (code = qtype) → queries.
    pub const REQUESTS: &str = "DNS_REQUESTS";
    /// Per-CPU hash: [`super::PeerKey`] (code 0) → retransmits.
    pub const RETRANSMITS: &str = "DNS_RETRANSMITS";
    /// Hash written by user space only: [`super::PeerKey`] (code 0) → timeouts.
    pub const TIMEOUTS: &str = "DNS_TIMEOUTS";
    /// Per-CPU array of counters, indexed by [`super::counter`].
    pub const COUNTERS: &str = "DNS_COUNTERS";
    /// Array of one [`super::DnsConfig`].
    pub const CONFIG: &str = "DNS_CONFIG";
    /// Ring buffer of [`super::DnsEvent`].
    pub const EVENTS: &str = "DNS_EVENTS";
    /// Hash written by user space: the node's endpoint addresses
    /// ([`crate::AddrKey`] → 1).
    pub const ENDPOINTS: &str = "DNS_ENDPOINTS";
    /// Hash: client ([`crate::AddrKey`]) → [`super::ClientPending`].
    pub const CLIENT_PENDING: &str = "DNS_CLIENT_PENDING";
    /// Hash written by user space only: client → queries it found timed out.
    pub const CLIENT_EXPIRED: &str = "DNS_CLIENT_EXPIRED";
    /// Hash: [`super::ClientServer`] → 1, the servers each client's series name.
    pub const CLIENT_SERVERS: &str = "DNS_CLIENT_SERVERS";
    /// Hash: client → how many servers it has in `DNS_CLIENT_SERVERS`.
    pub const CLIENT_SERVER_COUNT: &str = "DNS_CLIENT_SERVER_COUNT";
    /// Hash written by user space only: [`super::DepartedKey`] → count.
    pub const DEPARTED: &str = "DNS_DEPARTED";
    /// Hash written by user space only: [`super::PeerKey`] (client unknown,
    /// code = rcode) → [`super::Latency`] of clients that left.
    pub const DEPARTED_LATENCY: &str = "DNS_DEPARTED_LATENCY";
    /// Capacity of each departed map; beyond it, servers fold into
    /// [`super::OTHER_SERVER`].
    pub const DEPARTED_CAPACITY: u32 = 4_096;
    /// Capacity of `DNS_CLIENT_SERVERS`: every endpoint's servers, and the
    /// unknown client's.
    pub const CLIENT_SERVERS_CAPACITY: u32 = 16_384;
    /// Capacity of `DNS_PENDING`.
    pub const PENDING_CAPACITY: u32 = 16_384;
    /// Capacity of each statistics map.
    pub const STATS_CAPACITY: u32 = 16_384;
    /// Size of `DNS_EVENTS` in bytes: 6,241 events of 336 bytes (record
    /// header included), 0.3 s of 20,000 failed answers per second. With
    /// 1 MiB (0.15 s at that rate), a consumer thread kept off the CPU on a
    /// loaded 2-core node lost events. The agent maps the data area twice
    /// (so records that wrap read contiguously), so its RSS grows by twice
    /// this size once the ring has wrapped: 4 MiB here, against 8 MiB for a
    /// 4 MiB ring (measured: 39.0 MiB RSS at the peak of the load benchmark).
    pub const EVENTS_BYTES: u32 = 1 << 21;
}

/// Names of the programs: (pod or uplink) × (query or response direction).
pub mod programs {
    /// On a pod's host-side interface, ingress (pod → host): queries.
    pub const POD_QUERIES: &str = "podnet_dns_pod_ingress";
    /// On a pod's host-side interface, egress (host → pod): answers.
    pub const POD_ANSWERS: &str = "podnet_dns_pod_egress";
    /// On an uplink, egress (node → network): queries.
    pub const UPLINK_QUERIES: &str = "podnet_dns_uplink_egress";
    /// On an uplink, ingress (network → node): answers.
    pub const UPLINK_ANSWERS: &str = "podnet_dns_uplink_ingress";
    /// Does nothing; benchmarks attach it to measure the statistics' own cost.
    pub const BASELINE: &str = "podnet_dns_baseline";
}

impl_pod!(
    PendingKey,
    Pending,
    PeerKey,
    Latency,
    DnsConfig,
    DnsEvent,
    ClientPending,
    ClientServer,
    DepartedKey
);
