//! The ENI fast path: two TC programs (tcx ingress) that move IPv4 and IPv6
//! packets between a pod's host interface and the ENI its address belongs
//! to, past the kernel's forwarding path (netfilter, conntrack, SNAT). IPv6
//! takes the same decisions in [`v6`], with its own maps and counters.
//!
//! - `podnet_steer_pod` (pod's host interface ingress): a packet from a known
//!   pod address, to a destination the agent marked steerable (VPC CIDRs,
//!   minus exceptions such as service CIDRs), is looked up in the ENI's own
//!   routing table (`bpf_fib_lookup` with `BPF_FIB_LOOKUP_DIRECT |
//!   BPF_FIB_LOOKUP_TBID`, Linux ≥ 6.5; before 6.5 through the policy
//!   rules, where podnet's `from <pod>` rule selects that table) and sent out
//!   of the ENI with `bpf_redirect_neigh`.
//! - `podnet_steer_eni` (ENI ingress): a packet for a local pod is looked up
//!   in the main table (where podnet's `to <pod> lookup main` rule sends it);
//!   when the route points at the pod's host
//!   interface and its neighbour is known, the MACs are rewritten and the
//!   packet enters the pod directly with `bpf_redirect_peer`; without a
//!   neighbour entry `bpf_redirect_neigh` resolves it.
//!
//! Anything else (neither IPv4 nor IPv6, IP options, fragments, DNS on the configured ports
//! — the DNS tracer on the pod's interface must see both directions —, unknown
//! pod, destination not steerable, TTL about to expire, FIB lookup not
//! `BPF_FIB_LKUP_RET_SUCCESS`, egress without a neighbour entry) returns `TCX_NEXT` unchanged: the next program or the
//! kernel handles it. Every decision is counted per CPU; a redirect counts as
//! redirected only when the helper returned `TC_ACT_REDIRECT`, as failed
//! otherwise.
//!
//! Both programs decrement the TTL like `ip_forward` does
//! (`ip_decrease_ttl` in include/net/ip.h, Linux 6.18).
#![no_std]
#![no_main]

mod v6;

use aya_ebpf::{
    helpers::generated::{bpf_fib_lookup, bpf_redirect_neigh, bpf_redirect_peer},
    macros::{classifier, map},
    maps::{lpm_trie::Key, HashMap, LpmTrie, PerCpuArray},
    programs::TcContext,
};
use podnet_common::steer::{
    action, counter_index, direction, maps as m, redirect_result, result, DestAddr, DestAddr6,
    PodAddr6, PodRoute, SteerConfig, COUNTERS,
};

/// Settings from the loader (DNS ports).
#[no_mangle]
static STEER_CONFIG: SteerConfig = SteerConfig {
    dns_ports: [53, 0, 0, 0, 0, 0, 0, 0],
    fib_flags: BPF_FIB_LOOKUP_DIRECT | BPF_FIB_LOOKUP_TBID,
};

#[map(name = "STEER_PODS")]
static STEER_PODS: HashMap<u32, PodRoute> = HashMap::pinned(m::PODS_CAPACITY, 0);

#[map(name = "STEER_DESTS")]
static STEER_DESTS: LpmTrie<DestAddr, u32> = LpmTrie::pinned(m::DESTS_CAPACITY, 0);

#[map(name = "STEER_PODS6")]
static STEER_PODS6: HashMap<PodAddr6, PodRoute> = HashMap::pinned(m::PODS_CAPACITY, 0);

#[map(name = "STEER_DESTS6")]
static STEER_DESTS6: LpmTrie<DestAddr6, u32> = LpmTrie::pinned(m::DESTS_CAPACITY, 0);

#[map(name = "STEER_COUNTERS")]
static STEER_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTERS, 0);

/// `TCX_NEXT`: continue with the next program, then the kernel.
const TCX_NEXT: i32 = -1;
/// `ETH_P_IP` in network order as read from the frame.
const ETH_P_IP_BE: u16 = 0x0800u16.to_be();
/// `ETH_P_IPV6` in network order as read from the frame.
const ETH_P_IPV6_BE: u16 = 0x86ddu16.to_be();
/// Length of the Ethernet header; its last two bytes are the EtherType.
const ETH_HLEN: usize = 14;
/// `AF_INET`.
const AF_INET: u8 = 2;
/// `BPF_FIB_LOOKUP_DIRECT`: skip the policy rules, look up one table.
const BPF_FIB_LOOKUP_DIRECT: u32 = podnet_common::steer::fib::DIRECT;
/// `BPF_FIB_LOOKUP_TBID`: with DIRECT, use `params.tbid` (Linux ≥ 6.5).
const BPF_FIB_LOOKUP_TBID: u32 = podnet_common::steer::fib::TBID;
/// `BPF_FIB_LKUP_RET_SUCCESS`.
const FIB_SUCCESS: i64 = 0;
/// `BPF_FIB_LKUP_RET_NO_NEIGH`.
const FIB_NO_NEIGH: i64 = 7;
/// `IPPROTO_TCP` and `IPPROTO_UDP`.
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
/// Version 4, header length 5 words: no options.
const IPV4_NO_OPTIONS: u8 = 0x45;
/// `IP_MF | IP_OFFSET` in network order as read from the header.
const IP_FRAGMENT_BE: u16 = 0x3fffu16.to_be();

/// Ethernet and IPv4 headers as they sit in the frame.
#[repr(C, packed)]
#[derive(Clone, Copy)]
struct EthIp {
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    proto: u16,
    version_ihl: u8,
    tos: u8,
    tot_len: u16,
    id: u16,
    frag_off: u16,
    ttl: u8,
    protocol: u8,
    check: u16,
    saddr: [u8; 4],
    daddr: [u8; 4],
}

/// `struct bpf_fib_lookup` (include/uapi/linux/bpf.h, Linux 6.18), with the
/// unions flattened to the members used here: 64 bytes.
#[repr(C)]
struct FibParams {
    family: u8,
    l4_protocol: u8,
    sport: u16,
    dport: u16,
    /// In: `tot_len` for the MTU check; out: `mtu_result`.
    tot_len: u16,
    ifindex: u32,
    /// `tos` (IPv4) / `flowinfo` / `rt_metric`.
    tos: u32,
    src: [u32; 4],
    /// In: destination; out: the next hop's address.
    dst: [u32; 4],
    /// `tbid` (with `BPF_FIB_LOOKUP_TBID`), else the VLAN fields.
    tbid: u32,
    smac: [u8; 6],
    dmac: [u8; 6],
}

const _: () = assert!(core::mem::size_of::<FibParams>() == 64);

/// `struct bpf_redir_neigh`: 20 bytes.
#[repr(C)]
struct RedirNeigh {
    nh_family: u32,
    nh: [u32; 4],
}

const _: () = assert!(core::mem::size_of::<RedirNeigh>() == 20);

#[inline(always)]
fn count(dir: u32, res: u32) {
    count_at(counter_index(dir, res));
}

/// Adds one to the counter at `index`.
#[inline(always)]
fn count_at(index: u32) {
    if let Some(counter) = STEER_COUNTERS.get_ptr_mut(index) {
        // SAFETY: a per-CPU array slot is only touched by this CPU, and the
        // pointer comes from a successful lookup.
        unsafe { *counter += 1 };
    }
}

/// The frame's Ethernet and IPv4 headers, when the frame is long enough,
/// carries IPv4 without options, is not a fragment, and is not DNS.
#[inline(always)]
fn headers(ctx: &TcContext) -> Option<*mut EthIp> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + core::mem::size_of::<EthIp>() > end {
        return None;
    }
    let hdr = start as *mut EthIp;
    // SAFETY: the bounds check above covers the whole struct; it is packed,
    // so reads have no alignment requirement.
    let ip = unsafe { *hdr };
    if ip.proto != ETH_P_IP_BE
        || ip.version_ihl != IPV4_NO_OPTIONS
        || ip.frag_off & IP_FRAGMENT_BE != 0
    {
        return None;
    }
    if ip.protocol == IPPROTO_TCP || ip.protocol == IPPROTO_UDP {
        let ports = start + core::mem::size_of::<EthIp>();
        if ports + 4 > end {
            return None;
        }
        // SAFETY: bounds checked just above; read unaligned by value.
        let (sport, dport) = unsafe {
            (
                u16::from_be(core::ptr::read_unaligned(ports as *const u16)),
                u16::from_be(core::ptr::read_unaligned((ports + 2) as *const u16)),
            )
        };
        if is_dns(sport) || is_dns(dport) {
            return None;
        }
    }
    Some(hdr)
}

/// Whether `port` is one of the configured DNS ports.
#[inline(always)]
fn is_dns(port: u16) -> bool {
    // SAFETY: read-only global set by the loader; volatile so the compiler
    // does not fold in the placeholder.
    let config = unsafe { core::ptr::read_volatile(&STEER_CONFIG) };
    podnet_ebpf::port_listed(&config.dns_ports, port)
}

#[inline(always)]
fn addr_key(addr: [u8; 4]) -> u32 {
    u32::from_ne_bytes(addr)
}

/// Decrements the TTL and patches the header checksum (RFC 1624), like
/// `ip_decrease_ttl`.
#[inline(always)]
fn decrease_ttl(hdr: *mut EthIp) {
    // SAFETY: `hdr` passed the bounds check in `headers`; packed fields are
    // read and written by value.
    unsafe {
        let mut check = u32::from((*hdr).check);
        check += u32::from(0x0100u16.to_be());
        (*hdr).check = (check + u32::from(check >= 0xFFFF)) as u16;
        (*hdr).ttl -= 1;
    }
}

#[inline(always)]
fn fib_params(hdr: &EthIp, ifindex: u32) -> FibParams {
    FibParams {
        family: AF_INET,
        l4_protocol: hdr.protocol,
        sport: 0,
        dport: 0,
        // 0: the helper checks the skb against the egress device's MTU
        // itself (`is_skb_forwardable`, GSO-aware); a non-zero `tot_len` would
        // fail every GSO packet with FRAG_NEEDED (`bpf_skb_fib_lookup` in
        // net/core/filter.c, Linux 6.18).
        tot_len: 0,
        ifindex,
        tos: u32::from(hdr.tos),
        src: [addr_key(hdr.saddr), 0, 0, 0],
        dst: [addr_key(hdr.daddr), 0, 0, 0],
        tbid: 0,
        smac: [0; 6],
        dmac: [0; 6],
    }
}

#[inline(always)]
fn fib_lookup(ctx: &TcContext, params: &mut FibParams, flags: u32) -> i64 {
    // SAFETY: `params` is a valid, writable 64-byte `struct bpf_fib_lookup`
    // for the duration of the call; the context is the program's own skb.
    unsafe {
        bpf_fib_lookup(
            ctx.skb.skb.cast(),
            core::ptr::from_mut(params).cast(),
            core::mem::size_of::<FibParams>() as i32,
            flags,
        )
    }
}

/// Whether the frame carries IPv6 (its EtherType, when the frame has one).
#[inline(always)]
fn is_ipv6(ctx: &TcContext) -> bool {
    let start = ctx.data();
    if start + ETH_HLEN > ctx.data_end() {
        return false;
    }
    // SAFETY: the bounds check above covers the EtherType; read unaligned
    // by value.
    let proto = unsafe { core::ptr::read_unaligned((start + ETH_HLEN - 2) as *const u16) };
    proto == ETH_P_IPV6_BE
}

/// The pod program's `bpf_fib_lookup` flags, as the loader chose them.
#[inline(always)]
fn pod_fib_flags() -> u32 {
    // SAFETY: read-only data written by the loader; read by value.
    unsafe { core::ptr::read_volatile(&STEER_CONFIG) }.fib_flags
}

/// Pod → ENI, on the pod's host interface ingress.
#[classifier]
pub fn podnet_steer_pod(ctx: TcContext) -> i32 {
    if is_ipv6(&ctx) {
        return v6::pod_to_eni(&ctx);
    }
    let Some(hdr) = headers(&ctx) else {
        count(direction::EGRESS, result::PASSED);
        return TCX_NEXT;
    };
    // SAFETY: bounds checked in `headers`; copied out by value.
    let ip = unsafe { *hdr };
    // SAFETY: the context's skb pointer is valid for the program's run.
    let ingress = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: plain map lookup; the value is copied out.
    let Some(route) = (unsafe { STEER_PODS.get(&addr_key(ip.saddr)) }) else {
        count(direction::EGRESS, result::PASSED);
        return TCX_NEXT;
    };
    let route = *route;
    // Only the pod's own interface may use its address; a local pod as
    // destination is the kernel's (the `to <pod> lookup main` rule).
    // SAFETY: plain map lookup; only presence is used.
    let local_dest = unsafe { STEER_PODS.get(&addr_key(ip.daddr)) }.is_some();
    let steerable = STEER_DESTS
        .get(Key::new(32, DestAddr { addr: ip.daddr }))
        .is_some_and(|a| *a == action::STEER);
    if route.host_ifindex != ingress || local_dest || !steerable || ip.ttl <= 1 {
        count(direction::EGRESS, result::PASSED);
        return TCX_NEXT;
    }
    let mut params = fib_params(&ip, ingress);
    params.tbid = route.eni_table;
    let rc = fib_lookup(&ctx, &mut params, pod_fib_flags());
    if rc == FIB_NO_NEIGH {
        count(direction::EGRESS, result::NO_NEIGHBOUR);
        return TCX_NEXT;
    }
    if rc != FIB_SUCCESS || params.ifindex != route.eni_ifindex {
        count(direction::EGRESS, result::FIB_MISS);
        return TCX_NEXT;
    }
    decrease_ttl(hdr);
    let rc = redirect_to_next_hop(params.ifindex, AF_INET, [params.dst[0], 0, 0, 0]);
    redirected(direction::EGRESS, rc)
}

/// Counts a redirect helper's outcome and returns its verdict: on failure
/// (`TC_ACT_SHOT`) the packet is dropped, its TTL already decremented.
#[inline(always)]
fn redirected(dir: u32, rc: i64) -> i32 {
    count(dir, redirect_result(rc));
    rc as i32
}

/// Sends the packet out of `ifindex` to the next hop `nh` of family
/// `family` (`bpf_redirect_neigh`, which resolves its neighbour entry);
/// returns the helper's answer.
#[inline(always)]
fn redirect_to_next_hop(ifindex: u32, family: u8, nh: [u32; 4]) -> i64 {
    let mut nh = RedirNeigh {
        nh_family: u32::from(family),
        nh,
    };
    // SAFETY: `nh` is a valid `struct bpf_redir_neigh` for the call.
    unsafe {
        bpf_redirect_neigh(
            ifindex,
            core::ptr::from_mut(&mut nh).cast(),
            core::mem::size_of::<RedirNeigh>() as i32,
            0,
        )
    }
}

/// The MAC addresses at the start of an Ethernet frame.
#[repr(C, packed)]
struct EthMacs {
    dst: [u8; 6],
    src: [u8; 6],
}

/// Sends the packet into the pod behind `host_ifindex`: straight into the
/// peer with the FIB result's MACs written at `macs` when the neighbour is
/// known (`rc` is `BPF_FIB_LKUP_RET_SUCCESS`), else through
/// `bpf_redirect_neigh`, which resolves the packet's own destination.
///
/// # Safety
/// `macs` points at the frame's first 12 bytes, bounds-checked, and no
/// helper that moves packet data ran since.
#[inline(always)]
unsafe fn redirect_into_pod(
    macs: *mut EthMacs,
    params: &FibParams,
    rc: i64,
    host_ifindex: u32,
) -> i64 {
    if rc == FIB_NO_NEIGH {
        // SAFETY: a null nexthop makes the helper resolve the packet's own
        // destination, the on-link pod.
        return unsafe { bpf_redirect_neigh(host_ifindex, core::ptr::null_mut(), 0, 0) };
    }
    // SAFETY: the caller guarantees `macs` is in bounds and still valid;
    // packed fields are written by value.
    unsafe {
        (*macs).dst = params.dmac;
        (*macs).src = params.smac;
    }
    // SAFETY: plain helper call; the target is a veth whose peer is the pod.
    // It returns TC_ACT_REDIRECT (or TC_ACT_SHOT for bad flags).
    unsafe { bpf_redirect_peer(host_ifindex, 0) }
}

/// ENI → pod, on the ENI's ingress.
#[classifier]
pub fn podnet_steer_eni(ctx: TcContext) -> i32 {
    if is_ipv6(&ctx) {
        return v6::eni_to_pod(&ctx);
    }
    let Some(hdr) = headers(&ctx) else {
        count(direction::INGRESS, result::PASSED);
        return TCX_NEXT;
    };
    // SAFETY: bounds checked in `headers`; copied out by value.
    let ip = unsafe { *hdr };
    // SAFETY: plain map lookup; the value is copied out.
    let Some(route) = (unsafe { STEER_PODS.get(&addr_key(ip.daddr)) }) else {
        count(direction::INGRESS, result::PASSED);
        return TCX_NEXT;
    };
    let route = *route;
    if ip.ttl <= 1 {
        count(direction::INGRESS, result::PASSED);
        return TCX_NEXT;
    }
    // SAFETY: the context's skb pointer is valid for the program's run.
    let ingress = unsafe { (*ctx.skb.skb).ifindex };
    let mut params = fib_params(&ip, ingress);
    // The main table directly: for a local pod it is what podnet's
    // `to <pod> lookup main` rule selects (rules podnet does not own that
    // match pod destinations ahead of it are not honoured here). Skipping the
    // rule walk cut the program's run time from about 730 to 490 ns here.
    let rc = fib_lookup(&ctx, &mut params, BPF_FIB_LOOKUP_DIRECT);
    if (rc != FIB_SUCCESS && rc != FIB_NO_NEIGH) || params.ifindex != route.host_ifindex {
        count(direction::INGRESS, result::FIB_MISS);
        return TCX_NEXT;
    }
    decrease_ttl(hdr);
    // SAFETY: `hdr` passed the bounds check in `headers`, its first 12 bytes
    // are the MACs, and no helper that moves packet data ran since.
    let rc = unsafe { redirect_into_pod(hdr.cast(), &params, rc, route.host_ifindex) };
    redirected(direction::INGRESS, rc)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
