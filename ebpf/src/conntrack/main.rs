//! `tp_btf/kfree_skb`: catches every packet netfilter drops, classifies
//! conntrack insert races, counts them per source and destination in kernel
//! maps, and sends race events (both tuples) to user space. Every other drop
//! (any other `enum skb_drop_reason`) is counted per endpoint, direction and
//! reason.
//!
//! Classification (see `__nf_conntrack_confirm` in net/netfilter/nf_conntrack_core.c,
//! Linux 6.18): a packet dropped with `SKB_DROP_REASON_NETFILTER_DROP` whose
//! conntrack entry is not `IPS_CONFIRMED` while `IPS_SRC_NAT_DONE` is already set
//! can only have been dropped by the confirm step, the drop the kernel counts as
//! `insert_failed`. Every other netfilter drop is `Other`.
#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns},
    macros::{btf_tracepoint, kretprobe, map},
    maps::{HashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{BtfTracePointContext, RetProbeContext},
};
use podnet_common::{
    conntrack::{
        classify, counter, direction, drop_counter, flow_drop_kind, maps as m, BudgetWindow,
        DestKey, DropKey, DropKind, FlowDrop, KernelOffsets, RaceEvent, RaceHook, ReasonKey, Tuple,
        FLOW_PORTS, NF_DROP,
    },
    family, AddrKey, ENDPOINTS_CAPACITY,
};
use podnet_ebpf::read;

/// Offsets into kernel structures, written by the loader from BTF.
#[no_mangle]
static KERNEL_OFFSETS: KernelOffsets = KernelOffsets {
    skb_nfct: u32::MAX,
    skb_head: u32::MAX,
    skb_network_header: u32::MAX,
    skb_dev: u32::MAX,
    dev_nd_net: u32::MAX,
    net_ns_inum: u32::MAX,
    ct_status: u32::MAX,
    ct_net: u32::MAX,
    ct_tuplehash: u32::MAX,
    tuplehash_size: u32::MAX,
    tuplehash_tuple: u32::MAX,
    tuple_src_addr: u32::MAX,
    tuple_src_port: u32::MAX,
    tuple_src_l3num: u32::MAX,
    tuple_dst_addr: u32::MAX,
    tuple_dst_port: u32::MAX,
    tuple_dst_protonum: u32::MAX,
    drop_reason_netfilter: u32::MAX,
    netns_filter: 0,
    event_budget_per_cpu: 0,
    race_hook: RaceHook::DropTracepoint as u32,
    skb_protocol: u32::MAX,
    flow_ports: [0; FLOW_PORTS],
};

#[map(name = "CT_DROPS")]
static CT_DROPS: PerCpuHashMap<DropKey, u64> = PerCpuHashMap::pinned(m::DROPS_CAPACITY, 0);

/// The node's endpoint addresses, written by the agent: drops from any other
/// source (the host, a spoofed address) count under one unknown key.
#[map(name = "CT_ENDPOINTS")]
static CT_ENDPOINTS: HashMap<AddrKey, u8> = HashMap::pinned(ENDPOINTS_CAPACITY, 0);

/// Drops of sources that left, moved here by user space (which alone writes
/// it); declared here so that it is created and pinned.
#[map(name = "CT_DEPARTED")]
static CT_DEPARTED: HashMap<DropKey, u64> = HashMap::pinned(64, 0);

/// Drops with any reason but `NETFILTER_DROP`, per endpoint, direction and reason.
#[map(name = "CT_DROP_REASONS")]
static CT_DROP_REASONS: PerCpuHashMap<ReasonKey, u64> =
    PerCpuHashMap::pinned(m::DROP_REASONS_CAPACITY, 0);

/// Drops by reason of endpoints that left, moved here by user space (which
/// alone writes it); declared here so that it is created and pinned.
#[map(name = "CT_REASONS_DEPARTED")]
static CT_REASONS_DEPARTED: HashMap<ReasonKey, u64> =
    HashMap::pinned(m::REASONS_DEPARTED_CAPACITY, 0);

#[map(name = "CT_DROP_COUNTERS")]
static CT_DROP_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(drop_counter::COUNT, 0);

#[map(name = "CT_RACE_DESTS")]
static CT_RACE_DESTS: PerCpuHashMap<DestKey, u64> =
    PerCpuHashMap::pinned(m::RACE_DESTS_CAPACITY, 0);

#[map(name = "CT_EVENTS")]
static CT_EVENTS: RingBuf = RingBuf::pinned(m::EVENTS_BYTES, 0);

/// Drops of flows on the configured ports (DNS), for user space to give a
/// failed query the drop that lost it.
#[map(name = "CT_FLOW_DROPS")]
static CT_FLOW_DROPS: RingBuf = RingBuf::pinned(m::FLOW_DROPS_BYTES, 0);

#[map(name = "CT_COUNTERS")]
static CT_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(counter::COUNT, 0);

#[map(name = "CT_BUDGET")]
static CT_BUDGET: PerCpuArray<BudgetWindow> = PerCpuArray::pinned(1, 0);

/// Per CPU: 1 when `__nf_conntrack_confirm` just returned `NF_DROP` and the
/// matching `kfree_skb` has not been seen yet. Pinned, so the kretprobe and
/// the `kfree_skb` program share it even when one of them was adopted from an
/// earlier agent and the other attached by this one.
#[map(name = "CT_CONFIRM_DROPPED")]
static CT_CONFIRM_DROPPED: PerCpuArray<u64> = PerCpuArray::pinned(1, 0);

/// IP protocol numbers of UDP and TCP.
const PROTO_UDP: u8 = 17;
const PROTO_TCP: u8 = 6;
/// Length of the fixed IPv6 header.
const IPV6_HLEN: usize = 40;
/// Mask of the conntrack pointer in `skb->_nfct` (`NFCT_PTRMASK`).
const NFCT_PTRMASK: usize = !7;
const NSEC_PER_SEC: u64 = 1_000_000_000;
/// `BPF_NOEXIST`: insert only if the key is new.
const BPF_NOEXIST: u64 = 1;

#[btf_tracepoint(function = "kfree_skb")]
pub fn podnet_kfree_skb(ctx: BtfTracePointContext) -> i32 {
    // SAFETY: KERNEL_OFFSETS is a read-only global set by the loader; a volatile
    // read keeps the compiler from folding in its placeholder value.
    let off = unsafe { core::ptr::read_volatile(&KERNEL_OFFSETS) };
    // TP_PROTO(struct sk_buff *skb, void *location, enum skb_drop_reason reason, ...)
    let reason: u64 = ctx.arg(2);
    let skb: usize = ctx.arg(0);
    if reason as u32 != off.drop_reason_netfilter {
        on_other_drop(&off, skb, reason as u32);
        return 0;
    }
    // Taken before any filtering, so a flag is never left for another drop.
    let confirm_dropped = off.race_hook == RaceHook::ConfirmProbe as u32 && take_confirm_drop();
    on_netfilter_drop(&off, skb, confirm_dropped);
    0
}

/// `confirm_dropped`: with the confirm probe, whether `__nf_conntrack_confirm`
/// just returned `NF_DROP` for this skb.
#[inline(always)]
fn on_netfilter_drop(off: &KernelOffsets, skb: usize, confirm_dropped: bool) {
    let nfct: usize = read::at(skb, off.skb_nfct).unwrap_or(0);
    let ct = nfct & NFCT_PTRMASK;
    if ct == 0 {
        on_untracked_drop(off, skb);
        return;
    }
    let Some(netns) = ct_netns(off, ct) else {
        bump(counter::READ_ERRORS);
        return;
    };
    if off.netns_filter != 0 && netns != off.netns_filter {
        return;
    }
    let (Some(status), Some(original)) = (read::at::<u64>(ct, off.ct_status), tuple(off, ct, 0))
    else {
        bump(counter::READ_ERRORS);
        return;
    };
    bump(counter::NETFILTER_DROPS);
    // The confirm probe's verdict (confirm returned NF_DROP for this skb)
    // adds races the status bits cannot show (a clash without NAT); it
    // never removes one: a kprobe program is skipped while the CPU's
    // bpf_prog_active is held (e.g. during a map syscall interrupted by the
    // softirq), so the status classification still stands.
    let kind = if confirm_dropped {
        DropKind::InsertRace
    } else {
        classify(status)
    };
    count_drop(&original.src_addr, original.family, original.proto, kind);
    if kind != DropKind::InsertRace {
        send_flow_drop(
            off,
            &original,
            off.drop_reason_netfilter,
            flow_drop_kind::NETFILTER,
            true,
        );
        return;
    }
    bump(counter::INSERT_RACES);
    count_destination(&original);
    let Some(reply) = tuple(off, ct, 1) else {
        bump(counter::READ_ERRORS);
        return;
    };
    send_event(off, netns, status, original, reply);
}

/// `ETH_P_IP` and `ETH_P_IPV6` as `skb->protocol` holds them (network order
/// read on a little-endian CPU).
const PROTOCOL_IPV4: u16 = 0x0800_u16.to_be();
const PROTOCOL_IPV6: u16 = 0x86dd_u16.to_be();

/// A drop for any reason but netfilter's: counted per endpoint (the source
/// when it is one, else the destination when that is one, else the unknown
/// key), direction and reason. Packets that are not IPv4 or IPv6, and, while
/// one namespace is observed, packets without a device (whose namespace is
/// unknown) are skipped and counted.
#[inline(always)]
fn on_other_drop(off: &KernelOffsets, skb: usize, reason: u32) {
    let dev: usize = read::at(skb, off.skb_dev).unwrap_or(0);
    if off.netns_filter != 0 {
        if dev == 0 {
            bump_drop(drop_counter::NO_DEVICE);
            return;
        }
        let net: usize = read::at(dev, off.dev_nd_net).unwrap_or(0);
        let netns: u32 = read::at(net, off.net_ns_inum).unwrap_or(0);
        if netns != off.netns_filter {
            return;
        }
    }
    let protocol: u16 = read::at(skb, off.skb_protocol).unwrap_or(0);
    if protocol != PROTOCOL_IPV4 && protocol != PROTOCOL_IPV6 {
        bump_drop(drop_counter::NOT_IP);
        return;
    }
    let header = match ip_header(off, skb) {
        Ok(header) => header,
        Err(HeaderError::NotIp) => {
            bump_drop(drop_counter::NOT_IP);
            return;
        }
        Err(HeaderError::Unreadable) => {
            bump_drop(drop_counter::READ_ERRORS);
            return;
        }
    };
    bump_drop(drop_counter::COUNTED);
    let endpoint = |addr: [u8; 16]| {
        let key = AddrKey {
            addr,
            family: header.family,
            _pad: [0; 3],
        };
        CT_ENDPOINTS.get_ptr(&key).is_some()
    };
    let (addr, dir) = if endpoint(header.src) {
        (header.src, direction::EGRESS)
    } else if endpoint(header.dst) {
        (header.dst, direction::INGRESS)
    } else {
        (AddrKey::UNKNOWN, direction::UNKNOWN)
    };
    let key = ReasonKey {
        addr,
        reason,
        family: header.family,
        direction: dir,
        _pad: [0; 2],
    };
    if !increment(&CT_DROP_REASONS, &key) {
        bump_drop(drop_counter::KEYS_FULL);
    }
    let nfct: usize = read::at(skb, off.skb_nfct).unwrap_or(0);
    let ct = nfct & NFCT_PTRMASK;
    if ct != 0 {
        if let Some(original) = tuple(off, ct, 0) {
            send_flow_drop(off, &original, reason, flow_drop_kind::OTHER, true);
            return;
        }
    }
    if let Some(flow) = header_flow(&header) {
        send_flow_drop(off, &flow, reason, flow_drop_kind::OTHER, false);
    }
}

/// The packet's flow from its IP header and the ports after it (IPv4 with
/// its header length, IPv6 without extension headers), for UDP and TCP only.
#[inline(always)]
fn header_flow(header: &IpHeader) -> Option<Tuple> {
    if header.proto != PROTO_UDP && header.proto != PROTO_TCP {
        return None;
    }
    let ports: [u16; 2] = read::at(header.l4, 0)?;
    Some(Tuple {
        src_addr: header.src,
        dst_addr: header.dst,
        src_port: ports[0],
        dst_port: ports[1],
        family: header.family,
        proto: header.proto,
        _pad: [0; 2],
    })
}

/// Sends `flow`'s drop to user space when either port is one of the flow
/// ports (UDP and TCP only); costs nothing more for other drops.
#[inline(always)]
fn send_flow_drop(off: &KernelOffsets, flow: &Tuple, reason: u32, kind: u8, tracked: bool) {
    if flow.proto != PROTO_UDP && flow.proto != PROTO_TCP {
        return;
    }
    let (sport, dport) = (u16::from_be(flow.src_port), u16::from_be(flow.dst_port));
    if !podnet_ebpf::port_listed(&off.flow_ports, dport)
        && !podnet_ebpf::port_listed(&off.flow_ports, sport)
    {
        return;
    }
    let Some(mut entry) = CT_FLOW_DROPS.reserve::<FlowDrop>(0) else {
        bump_drop(drop_counter::FLOW_EVENTS_LOST);
        return;
    };
    entry.write(FlowDrop {
        // SAFETY: bpf_ktime_get_ns has no preconditions.
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        flow: *flow,
        reason,
        kind,
        tracked: u8::from(tracked),
        _pad: [0; 2],
    });
    entry.submit(podnet_ebpf::submit_flags(&CT_FLOW_DROPS));
    bump_drop(drop_counter::FLOW_EVENTS);
}

/// The fields of a packet's IP header that the drop counts use.
struct IpHeader {
    family: u8,
    proto: u8,
    src: [u8; 16],
    dst: [u8; 16],
    /// Address of the header after the IP header (IPv6: without extension
    /// headers).
    l4: usize,
}

/// Why [`ip_header`] found no header.
enum HeaderError {
    /// A read of the skb or the header failed.
    Unreadable,
    /// The header is neither IPv4 nor IPv6.
    NotIp,
}

/// The skb's IP header, at `head + network_header`.
#[inline(always)]
fn ip_header(off: &KernelOffsets, skb: usize) -> Result<IpHeader, HeaderError> {
    let head: usize = read::at(skb, off.skb_head).ok_or(HeaderError::Unreadable)?;
    let nh: u16 = read::at(skb, off.skb_network_header).ok_or(HeaderError::Unreadable)?;
    let ip = head + nh as usize;
    let first: u8 = read::at(ip, 0).ok_or(HeaderError::Unreadable)?;
    let mut header = IpHeader {
        family: family::INET,
        proto: 0,
        src: [0; 16],
        dst: [0; 16],
        l4: ip + IPV6_HLEN,
    };
    match first >> 4 {
        4 => {
            header.l4 = ip + usize::from(first & 0x0f) * 4;
            header.src[..4]
                .copy_from_slice(&read::at::<[u8; 4]>(ip, 12).ok_or(HeaderError::Unreadable)?);
            header.dst[..4]
                .copy_from_slice(&read::at::<[u8; 4]>(ip, 16).ok_or(HeaderError::Unreadable)?);
            header.proto = read::at::<u8>(ip, 9).unwrap_or(0);
        }
        6 => {
            header.family = family::INET6;
            header.src = read::at(ip, 8).ok_or(HeaderError::Unreadable)?;
            header.dst = read::at(ip, 24).ok_or(HeaderError::Unreadable)?;
            header.proto = read::at::<u8>(ip, 6).unwrap_or(0);
        }
        _ => return Err(HeaderError::NotIp),
    }
    Ok(header)
}

#[inline(always)]
fn bump_drop(index: u32) {
    if let Some(v) = CT_DROP_COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU array slot of this CPU; no other CPU writes it.
        unsafe { *v += 1 };
    }
}

/// A netfilter drop of a packet without a conntrack entry: counted as `Other`
/// under the source address read from the IP header.
#[inline(always)]
fn on_untracked_drop(off: &KernelOffsets, skb: usize) {
    let dev: usize = read::at(skb, off.skb_dev).unwrap_or(0);
    let net: usize = read::at(dev, off.dev_nd_net).unwrap_or(0);
    let netns: u32 = read::at(net, off.net_ns_inum).unwrap_or(0);
    if off.netns_filter != 0 && netns != off.netns_filter {
        return;
    }
    let header = match ip_header(off, skb) {
        Ok(header) => header,
        Err(HeaderError::NotIp) => {
            bump(counter::NOT_IP);
            return;
        }
        Err(HeaderError::Unreadable) => {
            bump(counter::READ_ERRORS);
            return;
        }
    };
    bump(counter::NETFILTER_DROPS);
    count_drop(&header.src, header.family, header.proto, DropKind::Other);
    if let Some(flow) = header_flow(&header) {
        send_flow_drop(
            off,
            &flow,
            off.drop_reason_netfilter,
            flow_drop_kind::NETFILTER,
            false,
        );
    }
}

#[inline(always)]
fn ct_netns(off: &KernelOffsets, ct: usize) -> Option<u32> {
    let net: usize = read::at(ct, off.ct_net)?;
    read::at(net, off.net_ns_inum)
}

/// Reads `ct->tuplehash[dir].tuple`.
#[inline(always)]
fn tuple(off: &KernelOffsets, ct: usize, dir: u32) -> Option<Tuple> {
    let base = ct + (off.ct_tuplehash + dir * off.tuplehash_size + off.tuplehash_tuple) as usize;
    let l3num: u16 = read::at(base, off.tuple_src_l3num)?;
    let mut t = Tuple {
        src_addr: read::at(base, off.tuple_src_addr)?,
        dst_addr: read::at(base, off.tuple_dst_addr)?,
        src_port: read::at(base, off.tuple_src_port)?,
        dst_port: read::at(base, off.tuple_dst_port)?,
        family: l3num as u8,
        proto: read::at(base, off.tuple_dst_protonum)?,
        _pad: [0; 2],
    };
    if t.family == family::INET {
        // union nf_inet_addr: only the first 4 bytes belong to an IPv4 address.
        t.src_addr[4..].fill(0);
        t.dst_addr[4..].fill(0);
    }
    Some(t)
}

#[inline(always)]
fn count_drop(addr: &[u8; 16], fam: u8, proto: u8, kind: DropKind) {
    let source = AddrKey {
        addr: *addr,
        family: fam,
        _pad: [0; 3],
    };
    let known = CT_ENDPOINTS.get_ptr(&source).is_some();
    let key = DropKey {
        addr: if known { *addr } else { AddrKey::UNKNOWN },
        family: fam,
        proto,
        kind: kind as u8,
        _pad: 0,
    };
    if !increment(&CT_DROPS, &key) {
        bump(counter::DROP_KEYS_FULL);
    }
}

#[inline(always)]
fn count_destination(original: &Tuple) {
    let key = DestKey {
        addr: original.dst_addr,
        port: original.dst_port,
        family: original.family,
        proto: original.proto,
    };
    if !increment(&CT_RACE_DESTS, &key) {
        bump(counter::DEST_KEYS_FULL);
    }
}

/// Adds one to `map[key]` on this CPU; false when the map is full.
#[inline(always)]
fn increment<K>(map: &PerCpuHashMap<K, u64>, key: &K) -> bool {
    if let Some(v) = map.get_ptr_mut(key) {
        // SAFETY: per-CPU value of this CPU; no other CPU writes it.
        unsafe { *v += 1 };
        return true;
    }
    if map.insert(key, &1, BPF_NOEXIST).is_ok() {
        return true;
    }
    // Another CPU created the key between our lookup and insert.
    match map.get_ptr_mut(key) {
        Some(v) => {
            // SAFETY: as above.
            unsafe { *v += 1 };
            true
        }
        None => false,
    }
}

#[inline(always)]
fn bump(index: u32) {
    if let Some(v) = CT_COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU array slot of this CPU; no other CPU writes it.
        unsafe { *v += 1 };
    }
}

/// True when this CPU may send one more event in the current second.
#[inline(always)]
fn within_budget(budget_per_cpu: u32, now: u64) -> bool {
    if budget_per_cpu == 0 {
        return true;
    }
    let Some(w) = CT_BUDGET.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: per-CPU array slot of this CPU; programs on one CPU do not nest
    // for the same tracepoint.
    let w = unsafe { &mut *w };
    if now.wrapping_sub(w.window_start_ns) >= NSEC_PER_SEC {
        w.window_start_ns = now;
        w.sent = 0;
    }
    if w.sent >= u64::from(budget_per_cpu) {
        return false;
    }
    w.sent += 1;
    true
}

#[inline(always)]
fn send_event(off: &KernelOffsets, netns: u32, status: u64, original: Tuple, reply: Tuple) {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if !within_budget(off.event_budget_per_cpu, now) {
        bump(counter::EVENTS_SAMPLED_OUT);
        return;
    }
    let Some(mut entry) = CT_EVENTS.reserve::<RaceEvent>(0) else {
        bump(counter::EVENTS_LOST);
        return;
    };
    entry.write(RaceEvent {
        timestamp_ns: now,
        ct_status: status,
        original,
        reply,
        netns,
        // SAFETY: bpf_get_smp_processor_id has no preconditions.
        cpu: unsafe { bpf_get_smp_processor_id() },
    });
    entry.submit(podnet_ebpf::submit_flags(&CT_EVENTS));
}

/// kretprobe on `__nf_conntrack_confirm`: a return of `NF_DROP` is the
/// kernel's `insert_failed` path (`nf_ct_resolve_clash` could not resolve the
/// clash). `nf_hook_slow` frees that skb right after the hook returns, on
/// this CPU, with `SKB_DROP_REASON_NETFILTER_DROP`: the flag tells the
/// `kfree_skb` program that the drop it sees next is that race.
#[kretprobe]
pub fn podnet_confirm_exit(ctx: RetProbeContext) -> u32 {
    let ret: i32 = ctx.ret();
    if ret != NF_DROP {
        return 0;
    }
    if let Some(flag) = CT_CONFIRM_DROPPED.get_ptr_mut(0) {
        // SAFETY: per-CPU slot of this CPU; no other CPU writes it.
        unsafe {
            if *flag != 0 {
                // The previous flag was never consumed by its drop.
                bump(counter::PROBE_UNMATCHED);
            }
            *flag = 1;
        }
    }
    0
}

/// Takes this CPU's "confirm returned `NF_DROP`" flag.
#[inline(always)]
fn take_confirm_drop() -> bool {
    let Some(flag) = CT_CONFIRM_DROPPED.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: per-CPU slot of this CPU; no other CPU writes it.
    unsafe {
        let set = *flag != 0;
        *flag = 0;
        set
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
