//! IPv6 in the fast path: the decisions of the IPv4 path, with IPv6's
//! header, maps (`STEER_PODS6`, `STEER_DESTS6`) and counters.
//!
//! Only the fixed header is parsed: a packet whose next header is not TCP,
//! UDP or ICMPv6 is left to the kernel unchanged (extension headers counted
//! as [`result::EXTENSION_HEADERS`]). Neighbour discovery and router
//! messages (ICMPv6 types 133 to 137) are always the kernel's: the node
//! answers neighbour solicitations for its pods (proxy NDP) and must see
//! them. The hop limit is decremented like `ip6_forward` does
//! (net/ipv6/ip6_output.c, Linux 6.18), which has no checksum to patch.

use aya_ebpf::{maps::lpm_trie::Key, programs::TcContext};
use podnet_common::steer::{
    action, counter_index6, direction, redirect_result, result, DestAddr6, PodAddr6, PodRoute,
};

use crate::{
    fib_lookup, pod_fib_flags, redirect_into_pod, redirect_to_next_hop, FibParams,
    BPF_FIB_LOOKUP_DIRECT, FIB_NO_NEIGH, FIB_SUCCESS, IPPROTO_TCP, IPPROTO_UDP, STEER_DESTS6,
    STEER_PODS6, TCX_NEXT,
};

/// `AF_INET6`.
const AF_INET6: u8 = 10;
/// `IPPROTO_ICMPV6`.
const IPPROTO_ICMPV6: u8 = 58;
/// ICMPv6 router solicitation, the first neighbour discovery type
/// (RFC 4861: 133 router solicitation, 134 router advertisement, 135
/// neighbour solicitation, 136 neighbour advertisement, 137 redirect).
const ICMPV6_ND_FIRST: u8 = 133;
/// ICMPv6 redirect, the last neighbour discovery type.
const ICMPV6_ND_LAST: u8 = 137;
/// `IPV6_FLOWINFO_MASK` in network order: traffic class and flow label.
const FLOWINFO_MASK_BE: u32 = 0x0fff_ffffu32.to_be();

/// Ethernet and IPv6 fixed headers as they sit in the frame.
#[repr(C, packed)]
#[derive(Clone, Copy)]
struct EthIp6 {
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    proto: u16,
    /// Version, traffic class and flow label.
    version_flow: [u8; 4],
    payload_len: u16,
    next_header: u8,
    hop_limit: u8,
    saddr: [u8; 16],
    daddr: [u8; 16],
}

const _: () = assert!(core::mem::size_of::<EthIp6>() == 54);

#[inline(always)]
fn count(dir: u32, res: u32) {
    crate::count_at(counter_index6(dir, res));
}

/// The frame's Ethernet and IPv6 headers when the fast path may take the
/// packet: version 6, next header TCP, UDP or ICMPv6 (not neighbour
/// discovery), not DNS. Else the result to count as the kernel's.
#[inline(always)]
fn headers(ctx: &TcContext) -> Result<*mut EthIp6, u32> {
    let start = ctx.data();
    let end = ctx.data_end();
    let l4 = start + core::mem::size_of::<EthIp6>();
    if l4 > end {
        return Err(result::PASSED);
    }
    let hdr = start as *mut EthIp6;
    // SAFETY: the bounds check above covers the whole struct; it is packed,
    // so reads have no alignment requirement.
    let ip = unsafe { *hdr };
    if ip.version_flow[0] >> 4 != 6 {
        return Err(result::PASSED);
    }
    match ip.next_header {
        IPPROTO_TCP | IPPROTO_UDP => {
            if l4 + 4 > end {
                return Err(result::PASSED);
            }
            // SAFETY: bounds checked just above; read unaligned by value.
            let (sport, dport) = unsafe {
                (
                    u16::from_be(core::ptr::read_unaligned(l4 as *const u16)),
                    u16::from_be(core::ptr::read_unaligned((l4 + 2) as *const u16)),
                )
            };
            if crate::is_dns(sport) || crate::is_dns(dport) {
                return Err(result::PASSED);
            }
        }
        IPPROTO_ICMPV6 => {
            if l4 + 1 > end {
                return Err(result::PASSED);
            }
            // SAFETY: bounds checked just above; one byte read by value.
            let kind = unsafe { *(l4 as *const u8) };
            if (ICMPV6_ND_FIRST..=ICMPV6_ND_LAST).contains(&kind) {
                return Err(result::PASSED);
            }
        }
        // IANA's "IPv6 Extension Header Types": hop-by-hop, routing,
        // fragment, ESP, AH, destination options, mobility, HIP, shim6 and
        // the two experimental ones.
        0 | 43 | 44 | 50 | 51 | 60 | 135 | 139 | 140 | 253 | 254 => {
            return Err(result::EXTENSION_HEADERS)
        }
        _ => return Err(result::PASSED),
    }
    Ok(hdr)
}

/// An IPv6 address as the four words of `struct bpf_fib_lookup`.
#[inline(always)]
fn words(addr: [u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]]),
        u32::from_ne_bytes([addr[4], addr[5], addr[6], addr[7]]),
        u32::from_ne_bytes([addr[8], addr[9], addr[10], addr[11]]),
        u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]]),
    ]
}

#[inline(always)]
fn fib_params(hdr: &EthIp6, ifindex: u32) -> FibParams {
    FibParams {
        family: AF_INET6,
        l4_protocol: hdr.next_header,
        sport: 0,
        dport: 0,
        // 0: the helper checks the MTU itself (see the IPv4 twin).
        tot_len: 0,
        ifindex,
        // `flowinfo`: traffic class and flow label, as `ip6_flowinfo`.
        tos: u32::from_ne_bytes(hdr.version_flow) & FLOWINFO_MASK_BE,
        src: words(hdr.saddr),
        dst: words(hdr.daddr),
        tbid: 0,
        smac: [0; 6],
        dmac: [0; 6],
    }
}

/// Decrements the hop limit (no checksum in the IPv6 header).
#[inline(always)]
fn decrease_hop_limit(hdr: *mut EthIp6) {
    // SAFETY: `hdr` passed the bounds check in `headers`; packed fields are
    // read and written by value.
    unsafe { (*hdr).hop_limit -= 1 };
}

/// Counts a redirect helper's outcome and returns its verdict.
#[inline(always)]
fn redirected(dir: u32, rc: i64) -> i32 {
    count(dir, redirect_result(rc));
    rc as i32
}

/// Pod → ENI for an IPv6 frame, on the pod's host interface ingress.
#[inline(always)]
pub fn pod_to_eni(ctx: &TcContext) -> i32 {
    let hdr = match headers(ctx) {
        Ok(hdr) => hdr,
        Err(res) => {
            count(direction::EGRESS, res);
            return TCX_NEXT;
        }
    };
    // SAFETY: bounds checked in `headers`; copied out by value.
    let ip = unsafe { *hdr };
    // SAFETY: the context's skb pointer is valid for the program's run.
    let ingress = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: plain map lookup; the value is copied out.
    let Some(route) = (unsafe { STEER_PODS6.get(&PodAddr6 { addr: ip.saddr }) }) else {
        count(direction::EGRESS, result::PASSED);
        return TCX_NEXT;
    };
    let route: PodRoute = *route;
    // SAFETY: plain map lookup; only presence is used.
    let local_dest = unsafe { STEER_PODS6.get(&PodAddr6 { addr: ip.daddr }) }.is_some();
    let steerable = STEER_DESTS6
        .get(Key::new(128, DestAddr6 { addr: ip.daddr }))
        .is_some_and(|a| *a == action::STEER);
    if route.host_ifindex != ingress || local_dest || !steerable || ip.hop_limit <= 1 {
        count(direction::EGRESS, result::PASSED);
        return TCX_NEXT;
    }
    let mut params = fib_params(&ip, ingress);
    params.tbid = route.eni_table;
    let rc = fib_lookup(ctx, &mut params, pod_fib_flags());
    if rc == FIB_NO_NEIGH {
        count(direction::EGRESS, result::NO_NEIGHBOUR);
        return TCX_NEXT;
    }
    if rc != FIB_SUCCESS || params.ifindex != route.eni_ifindex {
        count(direction::EGRESS, result::FIB_MISS);
        return TCX_NEXT;
    }
    decrease_hop_limit(hdr);
    let rc = redirect_to_next_hop(params.ifindex, AF_INET6, params.dst);
    redirected(direction::EGRESS, rc)
}

/// ENI → pod for an IPv6 frame, on the ENI's ingress.
#[inline(always)]
pub fn eni_to_pod(ctx: &TcContext) -> i32 {
    let hdr = match headers(ctx) {
        Ok(hdr) => hdr,
        Err(res) => {
            count(direction::INGRESS, res);
            return TCX_NEXT;
        }
    };
    // SAFETY: bounds checked in `headers`; copied out by value.
    let ip = unsafe { *hdr };
    // SAFETY: plain map lookup; the value is copied out.
    let Some(route) = (unsafe { STEER_PODS6.get(&PodAddr6 { addr: ip.daddr }) }) else {
        count(direction::INGRESS, result::PASSED);
        return TCX_NEXT;
    };
    let route: PodRoute = *route;
    if ip.hop_limit <= 1 {
        count(direction::INGRESS, result::PASSED);
        return TCX_NEXT;
    }
    // SAFETY: the context's skb pointer is valid for the program's run.
    let ingress = unsafe { (*ctx.skb.skb).ifindex };
    let mut params = fib_params(&ip, ingress);
    // The main table directly, as for IPv4 (`to <pod> lookup main`).
    let rc = fib_lookup(ctx, &mut params, BPF_FIB_LOOKUP_DIRECT);
    if (rc != FIB_SUCCESS && rc != FIB_NO_NEIGH) || params.ifindex != route.host_ifindex {
        count(direction::INGRESS, result::FIB_MISS);
        return TCX_NEXT;
    }
    decrease_hop_limit(hdr);
    // SAFETY: `hdr` passed the bounds check in `headers`, its first 12 bytes
    // are the MACs, and no helper that moves packet data ran since.
    let rc = unsafe { redirect_into_pod(hdr.cast(), &params, rc, route.host_ifindex) };
    redirected(direction::INGRESS, rc)
}
