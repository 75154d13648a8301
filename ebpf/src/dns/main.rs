//! TC programs that match DNS queries to their answers in the kernel.
//!
//! Four entry points share one parser: on a pod's host-side interface the
//! pod's queries arrive on ingress and the answers leave on egress; on an
//! uplink (host-network pods) queries leave on egress and answers arrive on
//! ingress. A query is recorded in `DNS_PENDING` under (ifindex, client and
//! server address and port, transport, DNS id); its answer is matched by the
//! same key, and the latency is counted per (client, server, rcode).
//!
//! Handled: Ethernet, IPv4 (no fragments) and IPv6 (no extension headers),
//! UDP, and TCP segments that start with a DNS message (the two-byte length
//! prefix followed by the header). Not handled, and counted: IP fragments,
//! TCP segments that continue a message or carry a length prefix alone.
//! Pipelined TCP messages: only the first of a segment is seen. Extended
//! rcodes (EDNS OPT) are not read: the header's 4-bit rcode is used.
//!
//! Every program always lets the packet through (`TCX_NEXT`).
#![no_std]
#![no_main]
// Atomic adds on map values shared by all CPUs: core's AtomicU64 has no
// read-modify-write methods on the BPF target, the intrinsic lowers to BPF's
// atomic add (the kernel programs are built with RUSTC_BOOTSTRAP=1, see build.rs).
#![allow(internal_features)]
#![feature(core_intrinsics)]

use aya_ebpf::{
    bindings::tcx_action_base::TCX_NEXT,
    helpers::{bpf_ktime_get_ns, bpf_skb_load_bytes},
    macros::{classifier, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::TcContext,
};
use podnet_common::{
    dns::{
        counted_qtype, counter, event_kind, maps as m, pending_flags, proto, scope, ClientPending,
        ClientServer, DepartedKey, DnsConfig, DnsEvent, Latency, PeerKey, Pending, PendingKey,
        BUCKETS, BUCKET_BOUNDS_NS, MAX_LABELS, MAX_NAME_LEN, NAME_BUF_LEN, PENDING_PER_CLIENT,
        SERVERS_PER_CLIENT,
    },
    family, AddrKey, ENDPOINTS_CAPACITY,
};

#[map(name = "DNS_PENDING")]
static DNS_PENDING: LruHashMap<PendingKey, Pending> = LruHashMap::pinned(m::PENDING_CAPACITY, 0);

/// The statistics maps hold one entry per (client, server, rcode) series that has been
/// seen, far fewer than their capacity, and a per-CPU map keeps a copy of each entry for
/// every possible CPU: preallocated, `DNS_LATENCY` alone would take 2 MiB per possible CPU
/// (charged to the agent's memory cgroup). Allocated per entry instead (`BPF_F_NO_PREALLOC`;
/// TC programs may use such maps on every kernel), their memory follows the series in use.
const STATS_MAP_FLAGS: u32 = aya_ebpf::bindings::BPF_F_NO_PREALLOC;

#[map(name = "DNS_LATENCY")]
static DNS_LATENCY: PerCpuHashMap<PeerKey, Latency> =
    PerCpuHashMap::pinned(m::STATS_CAPACITY, STATS_MAP_FLAGS);

#[map(name = "DNS_REQUESTS")]
static DNS_REQUESTS: PerCpuHashMap<PeerKey, u64> =
    PerCpuHashMap::pinned(m::STATS_CAPACITY, STATS_MAP_FLAGS);

#[map(name = "DNS_RETRANSMITS")]
static DNS_RETRANSMITS: PerCpuHashMap<PeerKey, u64> =
    PerCpuHashMap::pinned(m::STATS_CAPACITY, STATS_MAP_FLAGS);

/// Written by user space only (timeouts found by its sweep); declared here so
/// that it is created and pinned with the others.
#[map(name = "DNS_TIMEOUTS")]
static DNS_TIMEOUTS: aya_ebpf::maps::HashMap<PeerKey, u64> =
    aya_ebpf::maps::HashMap::pinned(m::STATS_CAPACITY, STATS_MAP_FLAGS);

/// Counts of clients that left, moved here by user space (which alone
/// writes these); declared here so that they are created and pinned.
#[map(name = "DNS_DEPARTED")]
static DNS_DEPARTED: HashMap<DepartedKey, u64> =
    HashMap::pinned(m::DEPARTED_CAPACITY, STATS_MAP_FLAGS);

#[map(name = "DNS_DEPARTED_LATENCY")]
static DNS_DEPARTED_LATENCY: HashMap<PeerKey, Latency> =
    HashMap::pinned(m::DEPARTED_CAPACITY, STATS_MAP_FLAGS);

#[map(name = "DNS_COUNTERS")]
static DNS_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(counter::COUNT, 0);

#[map(name = "DNS_CONFIG")]
static DNS_CONFIG: Array<DnsConfig> = Array::pinned(1, 0);

#[map(name = "DNS_EVENTS")]
static DNS_EVENTS: RingBuf = RingBuf::pinned(m::EVENTS_BYTES, 0);

/// The node's endpoint addresses, written by the agent: queries from other
/// sources count under one unknown client.
#[map(name = "DNS_ENDPOINTS")]
static DNS_ENDPOINTS: HashMap<AddrKey, u8> = HashMap::pinned(ENDPOINTS_CAPACITY, 0);

/// Keys of the per-client maps: every endpoint address per scope, and the
/// unknown client per scope.
const CLIENTS_CAPACITY: u32 = 2 * ENDPOINTS_CAPACITY + 2;

#[map(name = "DNS_CLIENT_PENDING")]
static DNS_CLIENT_PENDING: HashMap<AddrKey, ClientPending> =
    HashMap::pinned(CLIENTS_CAPACITY, STATS_MAP_FLAGS);

/// Written by user space only (its timeout sweep).
#[map(name = "DNS_CLIENT_EXPIRED")]
static DNS_CLIENT_EXPIRED: HashMap<AddrKey, u64> =
    HashMap::pinned(CLIENTS_CAPACITY, STATS_MAP_FLAGS);

#[map(name = "DNS_CLIENT_SERVERS")]
static DNS_CLIENT_SERVERS: HashMap<ClientServer, u8> =
    HashMap::pinned(m::CLIENT_SERVERS_CAPACITY, STATS_MAP_FLAGS);

#[map(name = "DNS_CLIENT_SERVER_COUNT")]
static DNS_CLIENT_SERVER_COUNT: HashMap<AddrKey, u64> =
    HashMap::pinned(CLIENTS_CAPACITY, STATS_MAP_FLAGS);

/// Scratch space for the query being parsed (too large for the stack).
#[map(name = "DNS_SCRATCH")]
static DNS_SCRATCH: PerCpuArray<Pending> = PerCpuArray::with_max_entries(1, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPV6_HLEN: usize = 40;
const UDP_HLEN: usize = 8;
const DNS_HLEN: usize = 12;
/// `BPF_NOEXIST`.
const BPF_NOEXIST: u64 = 1;
/// `-EEXIST`, what a `BPF_NOEXIST` update of an existing key returns.
const EEXIST: i32 = -17;
/// rcodes sent to user space whatever the latency: SERVFAIL, NXDOMAIN, REFUSED.
const RCODE_SERVFAIL: u8 = 2;
const RCODE_NXDOMAIN: u8 = 3;
const RCODE_REFUSED: u8 = 5;

#[classifier]
pub fn podnet_dns_pod_ingress(ctx: TcContext) -> i32 {
    on_packet(&ctx, true, scope::POD);
    TCX_NEXT
}

#[classifier]
pub fn podnet_dns_pod_egress(ctx: TcContext) -> i32 {
    on_packet(&ctx, false, scope::POD);
    TCX_NEXT
}

#[classifier]
pub fn podnet_dns_uplink_egress(ctx: TcContext) -> i32 {
    on_packet(&ctx, true, scope::UPLINK);
    TCX_NEXT
}

#[classifier]
pub fn podnet_dns_uplink_ingress(ctx: TcContext) -> i32 {
    on_packet(&ctx, false, scope::UPLINK);
    TCX_NEXT
}

/// Does nothing. Never attached by the agent: benchmarks attach it next to
/// the real programs to measure what the kernel's run-time statistics add to
/// every program run, and subtract it.
#[classifier]
pub fn podnet_dns_baseline(_ctx: TcContext) -> i32 {
    TCX_NEXT
}

/// Addresses, ports and where the DNS message starts.
struct Flow {
    src: [u8; 16],
    dst: [u8; 16],
    sport: u16,
    dport: u16,
    family: u8,
    proto: u8,
    /// Offset of the DNS header in the packet.
    dns_off: usize,
    /// End of the DNS message: the IP or UDP length, never beyond the
    /// packet (so link-layer padding is not read as DNS).
    end: usize,
}

#[inline(always)]
fn on_packet(ctx: &TcContext, queries: bool, scope: u8) {
    let Some(cfg) = DNS_CONFIG.get(0) else {
        return;
    };
    let Some(flow) = parse_flow(ctx, cfg, queries) else {
        return;
    };
    if flow.dns_off + DNS_HLEN > flow.end {
        bump(counter::MALFORMED);
        return;
    }
    let Some(header) = read::<[u8; DNS_HLEN]>(ctx, flow.dns_off) else {
        bump(counter::MALFORMED);
        return;
    };
    let id = u16::from_be_bytes([header[0], header[1]]);
    let is_response = header[2] & 0x80 != 0;
    if queries {
        let opcode = (header[2] >> 3) & 0x0f;
        let qdcount = u16::from_be_bytes([header[4], header[5]]);
        if is_response || opcode != 0 || qdcount != 1 {
            bump(counter::MALFORMED);
            return;
        }
        on_query(ctx, &flow, id, scope);
    } else {
        if !is_response {
            bump(counter::MALFORMED);
            return;
        }
        on_answer(
            ctx,
            &flow,
            id,
            header[3] & 0x0f,
            scope,
            cfg.slow_threshold_ns,
        );
    }
}

#[inline(always)]
fn is_dns_port(cfg: &DnsConfig, port: u16) -> bool {
    podnet_ebpf::port_listed(&cfg.ports, port)
}

/// Reads `T` at `off` in the packet's linear area, if it lies there.
#[inline(always)]
fn peek<T: Copy>(ctx: &TcContext, off: usize) -> Option<T> {
    let start = ctx.data();
    if start + off + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    // SAFETY: the bounds check above keeps the read inside the packet's
    // linear data, which the verifier also checks; read_unaligned has no
    // alignment requirement.
    Some(unsafe { core::ptr::read_unaligned((start + off) as *const T) })
}

/// Reads `T` at `off` in the packet: straight from the linear area when it
/// lies there (no helper call), else through `bpf_skb_load_bytes`.
#[inline(always)]
fn read<T: Copy>(ctx: &TcContext, off: usize) -> Option<T> {
    // Every offset the parser passes is below 1 KiB (headers of bounded
    // length); the mask keeps that visible to the verifier. Single bytes go
    // through the helper: LLVM turns their bounds check into a form
    // (`pointer >= end`) from which the verifier learns no readable range.
    if core::mem::size_of::<T>() > 1 && off < 0x400 {
        if let Some(v) = peek::<T>(ctx, off & 0x3ff) {
            return Some(v);
        }
    }
    ctx.load::<T>(off).ok()
}

/// The fast path every packet takes: reads the headers directly from the
/// linear area and says whether the packet can be DNS (to a server port for
/// queries, from one for answers). Returns true when it cannot tell (headers
/// not linear); the full parse then decides with `bpf_skb_load_bytes`.
#[inline(always)]
fn may_be_dns(ctx: &TcContext, cfg: &DnsConfig, queries: bool) -> bool {
    let Some(eth_proto) = peek::<u16>(ctx, 12) else {
        return true;
    };
    let (l4proto, l4) = match u16::from_be(eth_proto) {
        ETH_P_IP => {
            let (Some(vihl), Some(p)) = (peek::<u8>(ctx, ETH_HLEN), peek::<u8>(ctx, ETH_HLEN + 9))
            else {
                return true;
            };
            (p, ETH_HLEN + usize::from(vihl & 0x0f) * 4)
        }
        ETH_P_IPV6 => {
            let Some(p) = peek::<u8>(ctx, ETH_HLEN + 6) else {
                return true;
            };
            (p, ETH_HLEN + IPV6_HLEN)
        }
        _ => return false,
    };
    if l4proto != proto::UDP && l4proto != proto::TCP {
        return false;
    }
    let Some(port) = peek::<u16>(ctx, l4 + if queries { 2 } else { 0 }) else {
        return true;
    };
    is_dns_port(cfg, u16::from_be(port))
}

/// Parses L2–L4 and returns the flow if it goes to (queries) or comes from
/// (answers) a DNS port; counts what it cannot handle.
#[inline(always)]
fn parse_flow(ctx: &TcContext, cfg: &DnsConfig, queries: bool) -> Option<Flow> {
    if !may_be_dns(ctx, cfg, queries) {
        return None;
    }
    let eth_proto = u16::from_be(read::<u16>(ctx, 12)?);
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    let (fam, l4proto, l4, fragment, ip_end) = match eth_proto {
        ETH_P_IP => {
            let ip = read::<[u8; 20]>(ctx, ETH_HLEN)?;
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            if ihl < 20 {
                return None;
            }
            // More-fragments flag or a fragment offset.
            let fragment = (u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff) != 0;
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            src[..4].copy_from_slice(&ip[12..16]);
            dst[..4].copy_from_slice(&ip[16..20]);
            (
                family::INET,
                ip[9],
                ETH_HLEN + ihl,
                fragment,
                ETH_HLEN + total,
            )
        }
        ETH_P_IPV6 => {
            let ip = read::<[u8; IPV6_HLEN]>(ctx, ETH_HLEN)?;
            let payload = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            src.copy_from_slice(&ip[8..24]);
            dst.copy_from_slice(&ip[24..40]);
            (
                family::INET6,
                ip[6],
                ETH_HLEN + IPV6_HLEN,
                false,
                ETH_HLEN + IPV6_HLEN + payload,
            )
        }
        _ => return None,
    };
    if l4proto != proto::UDP && l4proto != proto::TCP {
        return None;
    }
    let ports = read::<[u8; 4]>(ctx, l4)?;
    let sport = u16::from_be_bytes([ports[0], ports[1]]);
    let dport = u16::from_be_bytes([ports[2], ports[3]]);
    if !is_dns_port(cfg, if queries { dport } else { sport }) {
        return None;
    }
    if fragment {
        bump(counter::UNSUPPORTED);
        return None;
    }
    let skb_len = ctx.len() as usize;
    let mut len = if ip_end < skb_len { ip_end } else { skb_len };
    let dns_off = if l4proto == proto::UDP {
        let Some(udp_len) = read::<u16>(ctx, l4 + 4) else {
            bump(counter::MALFORMED);
            return None;
        };
        let udp_end = l4 + usize::from(u16::from_be(udp_len));
        if udp_end < len {
            len = udp_end;
        }
        l4 + UDP_HLEN
    } else {
        let doff = usize::from(read::<u8>(ctx, l4 + 12)? >> 4) * 4;
        let payload = l4 + doff;
        if len <= payload {
            // SYN, ACK, FIN: no data.
            return None;
        }
        let Some(msg_len) = read::<u16>(ctx, payload) else {
            bump(counter::TCP_SKIPPED);
            return None;
        };
        let msg_len = usize::from(u16::from_be(msg_len));
        // The segment must start a message: a length prefix, then at least
        // the header, and nothing beyond the announced message.
        if len < payload + 2 + DNS_HLEN || msg_len < DNS_HLEN || payload + 2 + msg_len < len {
            bump(counter::TCP_SKIPPED);
            return None;
        }
        payload + 2
    };
    Some(Flow {
        src,
        dst,
        sport,
        dport,
        family: fam,
        proto: l4proto,
        dns_off,
        end: len,
    })
}

/// Records a query as pending, or counts it as a retransmit of one that is.
///
/// The common case (a new query) costs one insert: a retransmit is found by
/// the insert failing on the existing key (`BPF_NOEXIST`), not by a lookup
/// before it. Only a client at its pending limit looks the key up first, so
/// that its retransmits still count as retransmits and not as refused.
#[inline(always)]
fn on_query(ctx: &TcContext, flow: &Flow, id: u16, scope: u8) {
    let Some(scratch) = DNS_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: per-CPU scratch slot of this CPU; TC programs do not nest on one CPU.
    let p = unsafe { &mut *scratch };
    let Some((name_len, qtype)) = read_question(ctx, flow.dns_off + DNS_HLEN, flow.end, p) else {
        bump(counter::MALFORMED);
        return;
    };
    let key = PendingKey {
        client: flow.src,
        server: flow.dst,
        // SAFETY: the context's skb pointer is valid for the program's run.
        ifindex: unsafe { (*ctx.skb.skb).ifindex },
        client_port: flow.sport,
        server_port: flow.dport,
        id,
        family: flow.family,
        proto: flow.proto,
    };
    let endpoint = AddrKey {
        addr: flow.src,
        family: flow.family,
        _pad: [0; 3],
    };
    let mut flags = 0;
    if DNS_ENDPOINTS.get_ptr(&endpoint).is_none() {
        flags |= pending_flags::UNKNOWN_CLIENT;
    }
    p.scope = scope;
    p.flags = flags;
    let client = p.counted_client(&key);
    let Some(share) = client_pending(&client) else {
        bump(counter::PENDING_FAILED);
        return;
    };
    // SAFETY: `share` is a live map value; other CPUs add to its fields atomically.
    let (added, answered) = unsafe { ((*share).added, (*share).answered) };
    let in_flight = added.saturating_sub(answered);
    // Expired queries only lower the count: user space's map is read only
    // when the client may be at its limit.
    if in_flight >= PENDING_PER_CLIENT {
        // SAFETY: the value is copied at once; only user space writes this map.
        let expired = unsafe { DNS_CLIENT_EXPIRED.get(&client) }
            .copied()
            .unwrap_or(0);
        if in_flight.saturating_sub(expired) >= PENDING_PER_CLIENT {
            if !retransmitted(&key, None) {
                // SAFETY: `refused` is a u64 inside a live map value.
                unsafe { atomic_add(&raw mut (*share).refused) };
            }
            return;
        }
    }
    if !server_counted(&client, &flow.dst) {
        p.flags |= pending_flags::OTHER_SERVER;
    }
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    p.start_ns = unsafe { bpf_ktime_get_ns() };
    p.qtype = qtype;
    p.name_len = name_len;
    p.sends = 1;
    p._pad = 0;
    match DNS_PENDING.insert(&key, &*p, BPF_NOEXIST) {
        Ok(()) => {}
        Err(EEXIST) => {
            // The same query again before an answer.
            retransmitted(&key, Some(&*p));
            return;
        }
        Err(_) => {
            bump(counter::PENDING_FAILED);
            return;
        }
    }
    // SAFETY: `added` is a u64 inside a live map value.
    unsafe { atomic_add(&raw mut (*share).added) };
    bump(counter::QUERIES);
    let code = if counted_qtype(qtype) { qtype } else { 0 };
    increment(&DNS_REQUESTS, &p.counted_peer(&key, code));
}

/// Counts a copy of a pending query: the entry (and its first send time)
/// stays; the retransmit counts like the query did, and the entry remembers
/// that the client sent it again (a plain write: two CPUs retransmitting the
/// same query at once may count one copy). Returns false when `key` is not
/// pending; with `fallback` (the copy's own counting, for an entry answered
/// in between) it still counts the retransmit then.
#[inline(always)]
fn retransmitted(key: &PendingKey, fallback: Option<&Pending>) -> bool {
    let peer = match DNS_PENDING.get_ptr_mut(key) {
        // SAFETY: a map value pointer stays valid for the program's run.
        Some(first) => unsafe {
            (*first).sends = (*first).sends.saturating_add(1);
            (*first).counted_peer(key, 0)
        },
        None => match fallback {
            Some(p) => p.counted_peer(key, 0),
            None => return false,
        },
    };
    increment(&DNS_RETRANSMITS, &peer);
    true
}

/// The pending-query counts of `client`, created at zero on its first query.
#[inline(always)]
fn client_pending(client: &AddrKey) -> Option<*mut ClientPending> {
    if let Some(share) = DNS_CLIENT_PENDING.get_ptr_mut(client) {
        return Some(share);
    }
    // Another CPU may create it in between: either way it exists after.
    let _ = DNS_CLIENT_PENDING.insert(client, &ClientPending::default(), BPF_NOEXIST);
    DNS_CLIENT_PENDING.get_ptr_mut(client)
}

/// Whether `client`'s series may name `server`: yes for the servers it
/// already has, and for new ones while it has fewer than
/// [`SERVERS_PER_CLIENT`] (CPUs adding at the same moment may each add one
/// more). Otherwise the server counts as [`OTHER_SERVER`].
#[inline(always)]
fn server_counted(client: &AddrKey, server: &[u8; 16]) -> bool {
    let pair = ClientServer {
        client: *client,
        server: *server,
    };
    if DNS_CLIENT_SERVERS.get_ptr(&pair).is_some() {
        return true;
    }
    let count = match DNS_CLIENT_SERVER_COUNT.get_ptr_mut(client) {
        Some(c) => c,
        None => {
            let _ = DNS_CLIENT_SERVER_COUNT.insert(client, &0, BPF_NOEXIST);
            match DNS_CLIENT_SERVER_COUNT.get_ptr_mut(client) {
                Some(c) => c,
                None => return false,
            }
        }
    };
    // SAFETY: a live map value; other CPUs add to it atomically.
    if unsafe { *count } >= SERVERS_PER_CLIENT {
        return false;
    }
    match DNS_CLIENT_SERVERS.insert(&pair, &1, BPF_NOEXIST) {
        Ok(()) => {
            // SAFETY: as above.
            unsafe { atomic_add(count) };
            true
        }
        // Another CPU added the same pair in between.
        Err(EEXIST) => true,
        Err(_) => false,
    }
}

/// Adds one to a u64 shared by every CPU (a map value of a plain hash).
///
/// # Safety
/// `counter` points into a live map value.
#[inline(always)]
unsafe fn atomic_add(counter: *mut u64) {
    // SAFETY: the caller passes a live, 8-byte aligned map value field;
    // BPF's atomic add is the only write any CPU makes to it.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            counter, 1,
        )
    };
}

/// Copies the question name (wire format) into `p.name` and walks its labels
/// with constant bounds. Returns its length (terminating zero included) and
/// the query type; `None` for a truncated question, a compression pointer or
/// reserved label type (a query's only name cannot point anywhere valid), or
/// a name longer than 255 bytes.
#[inline(always)]
fn read_question(ctx: &TcContext, off: usize, end: usize, p: &mut Pending) -> Option<(u16, u16)> {
    let avail = end.checked_sub(off)?;
    // At least the root name (1 byte), type and class (4 bytes).
    if avail < 5 {
        return None;
    }
    let copy = if avail > NAME_BUF_LEN {
        NAME_BUF_LEN
    } else {
        avail
    };
    // SAFETY: `p.name` is NAME_BUF_LEN bytes and `copy` is in 5..=NAME_BUF_LEN;
    // the helper checks the packet bounds itself.
    let rc = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            off as u32,
            p.name.as_mut_ptr().cast(),
            (copy as u32) & 0x1ff,
        )
    };
    if rc != 0 {
        return None;
    }
    let mut pos = 0usize;
    let mut labels = 0;
    while labels < MAX_LABELS {
        if pos >= copy {
            return None;
        }
        let len = usize::from(p.name[pos & (NAME_BUF_LEN - 1)]);
        if len == 0 {
            break;
        }
        if len & 0xc0 != 0 {
            return None;
        }
        pos += len + 1;
        // The terminating zero must still fit within MAX_NAME_LEN.
        if pos >= MAX_NAME_LEN {
            return None;
        }
        labels += 1;
    }
    if labels == MAX_LABELS {
        return None;
    }
    let name_len = pos + 1;
    if name_len + 4 > avail {
        return None;
    }
    let tail = read::<[u8; 4]>(ctx, off + name_len)?;
    Some((name_len as u16, u16::from_be_bytes([tail[0], tail[1]])))
}

#[inline(always)]
fn on_answer(ctx: &TcContext, flow: &Flow, id: u16, rcode: u8, scope: u8, slow_ns: u64) {
    let key = PendingKey {
        client: flow.dst,
        server: flow.src,
        // SAFETY: the context's skb pointer is valid for the program's run.
        ifindex: unsafe { (*ctx.skb.skb).ifindex },
        client_port: flow.dport,
        server_port: flow.sport,
        id,
        family: flow.family,
        proto: flow.proto,
    };
    let Some(pending) = DNS_PENDING.get_ptr(&key) else {
        bump(counter::UNMATCHED);
        return;
    };
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: a map value pointer stays valid for the program's run; the
    // fields are copied before the delete below frees the entry.
    let (start, qtype, sends, peer, client) = unsafe {
        (
            (*pending).start_ns,
            (*pending).qtype,
            (*pending).sends,
            (*pending).counted_peer(&key, u16::from(rcode)),
            (*pending).counted_client(&key),
        )
    };
    let latency = now.saturating_sub(start);
    let wanted = latency >= slow_ns
        || sends > 1
        || rcode == RCODE_SERVFAIL
        || rcode == RCODE_NXDOMAIN
        || rcode == RCODE_REFUSED;
    // Reserve and fill the event before the delete: after it, the entry's
    // memory may be reused by another query.
    let mut entry = if wanted {
        let e = DNS_EVENTS.reserve::<DnsEvent>(0);
        if e.is_none() {
            bump(counter::EVENTS_LOST);
        }
        e
    } else {
        None
    };
    if let Some(e) = entry.as_mut() {
        let ev = e.as_mut_ptr();
        // SAFETY: `ev` points to a reserved ring buffer record of the right
        // size; `pending` is a live map value. Every field is written.
        unsafe {
            (*ev).timestamp_ns = now;
            (*ev).latency_ns = latency;
            (*ev).key = key;
            (*ev).qtype = qtype;
            (*ev).rcode = rcode;
            (*ev).kind = if sends > 1 {
                event_kind::RETRIED
            } else if latency >= slow_ns {
                event_kind::SLOW
            } else {
                event_kind::ERROR
            };
            (*ev).scope = scope;
            (*ev).sends = sends;
            (*ev).name_len = (*pending).name_len;
            (*ev).name = (*pending).name;
            (*ev)._tail = [0; 4];
        }
    }
    // Exactly one of this answer and the user-space timeout sweep deletes the
    // entry, and only that one counts it.
    if DNS_PENDING.remove(&key).is_err() {
        if let Some(e) = entry {
            e.discard(0);
        }
        bump(counter::UNMATCHED);
        return;
    }
    if let Some(e) = entry {
        e.submit(podnet_ebpf::submit_flags(&DNS_EVENTS));
    }
    if let Some(share) = DNS_CLIENT_PENDING.get_ptr_mut(&client) {
        // SAFETY: `answered` is a u64 inside a live map value.
        unsafe { atomic_add(&raw mut (*share).answered) };
    }
    bump(counter::RESPONSES);
    observe(&peer, latency);
}

#[inline(always)]
fn bucket_of(latency: u64) -> usize {
    let mut i = 0;
    while i < BUCKET_BOUNDS_NS.len() {
        if latency <= BUCKET_BOUNDS_NS[i] {
            return i;
        }
        i += 1;
    }
    BUCKETS - 1
}

#[inline(always)]
fn observe(peer: &PeerKey, latency: u64) {
    let bucket = bucket_of(latency) & 0x0f;
    if let Some(h) = DNS_LATENCY.get_ptr_mut(peer) {
        // SAFETY: per-CPU value of this CPU; no other CPU writes it.
        unsafe {
            if bucket < BUCKETS {
                (*h).buckets[bucket] += 1;
            }
            (*h).sum_ns += latency;
        }
        return;
    }
    let mut fresh = Latency::default();
    if bucket < BUCKETS {
        fresh.buckets[bucket] = 1;
    }
    fresh.sum_ns = latency;
    if DNS_LATENCY.insert(peer, &fresh, BPF_NOEXIST).is_ok() {
        return;
    }
    // Another CPU created the key in between, or the map is full.
    match DNS_LATENCY.get_ptr_mut(peer) {
        // SAFETY: as above.
        Some(h) => unsafe {
            if bucket < BUCKETS {
                (*h).buckets[bucket] += 1;
            }
            (*h).sum_ns += latency;
        },
        None => bump(counter::STATS_FULL),
    }
}

/// Adds one to `map[key]` on this CPU; counts a full map.
#[inline(always)]
fn increment(map: &PerCpuHashMap<PeerKey, u64>, key: &PeerKey) {
    if let Some(v) = map.get_ptr_mut(key) {
        // SAFETY: per-CPU value of this CPU; no other CPU writes it.
        unsafe { *v += 1 };
        return;
    }
    if map.insert(key, &1, BPF_NOEXIST).is_ok() {
        return;
    }
    match map.get_ptr_mut(key) {
        // SAFETY: as above.
        Some(v) => unsafe { *v += 1 },
        None => bump(counter::STATS_FULL),
    }
}

#[inline(always)]
fn bump(index: u32) {
    if let Some(v) = DNS_COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU array slot of this CPU; no other CPU writes it.
        unsafe { *v += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
