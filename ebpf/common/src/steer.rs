//! The ENI fast path (`podnet-steer`): map layouts, counter indices and
//! program names shared by the TC programs and the agent.

use crate::impl_pod;

/// Program on the pod's host interface ingress: pod → its ENI.
pub const POD_PROGRAM: &str = "podnet_steer_pod";
/// Program on the ENI's ingress: ENI → local pod.
pub const ENI_PROGRAM: &str = "podnet_steer_eni";

/// Name of the [`SteerConfig`] global the loader writes.
pub const CONFIG_GLOBAL: &str = "STEER_CONFIG";
/// Most DNS ports [`SteerConfig`] holds: the same list as the DNS programs'.
pub const MAX_DNS_PORTS: usize = crate::dns::MAX_PORTS;

/// Settings written by the loader into the programs' read-only data.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SteerConfig {
    /// DNS server ports (host order; 0 = unused slot). DNS traffic is never
    /// steered, so the DNS tracer on the pod's interface sees both directions.
    pub dns_ports: [u16; MAX_DNS_PORTS],
    /// Flags of the pod program's `bpf_fib_lookup`: [`fib::DIRECT`] |
    /// [`fib::TBID`] (the pod's ENI table directly, Linux 6.5+), or 0 (the
    /// policy rules, which podnet's `from <pod> lookup <eni table>` rule
    /// resolves to the same table) where the kernel lacks `TBID`.
    pub fib_flags: u32,
}

const _: () = assert!(core::mem::size_of::<SteerConfig>() == 20);

/// `bpf_fib_lookup` flags (include/uapi/linux/bpf.h).
pub mod fib {
    /// `BPF_FIB_LOOKUP_DIRECT`: skip the policy rules, look up one table.
    pub const DIRECT: u32 = 1 << 0;
    /// `BPF_FIB_LOOKUP_TBID`: with DIRECT, the table is `params.tbid`
    /// (Linux 6.5+; older kernels refuse the flag with `EINVAL`).
    pub const TBID: u32 = 1 << 3;
}

/// Map names (pinned under `--bpffs/steer/`).
pub mod maps {
    /// Pod IPv4 address (network order) → [`super::PodRoute`].
    pub const PODS: &str = "STEER_PODS";
    /// Pod IPv6 address ([`super::PodAddr6`]) → [`super::PodRoute`].
    pub const PODS6: &str = "STEER_PODS6";
    /// The IPv6 twin of [`DESTS`] (keys [`super::DestAddr6`]).
    pub const DESTS6: &str = "STEER_DESTS6";
    /// Destinations the fast path may steer to (VPC CIDRs, action
    /// [`super::action::STEER`]) and exceptions inside them (service CIDRs,
    /// action [`super::action::KERNEL`]); longest prefix wins.
    pub const DESTS: &str = "STEER_DESTS";
    /// Per-CPU packet counters indexed by [`super::counter_index`].
    pub const COUNTERS: &str = "STEER_COUNTERS";
    /// Capacity of [`PODS`].
    pub const PODS_CAPACITY: u32 = 4096;
    /// Capacity of [`DESTS`].
    pub const DESTS_CAPACITY: u32 = 256;
}

/// Where a local pod's traffic goes: its ENI (egress) and its host
/// interface (ingress).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodRoute {
    /// Ifindex of the ENI the pod's address belongs to.
    pub eni_ifindex: u32,
    /// Routing table of that ENI (`bpf_fib_lookup` with `BPF_FIB_LOOKUP_TBID`).
    pub eni_table: u32,
    /// Ifindex of the pod's host-side interface.
    pub host_ifindex: u32,
    /// Explicit padding; always 0.
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<PodRoute>() == 16);

/// Key of the [`maps::DESTS`] LPM trie (after the prefix length): an IPv4
/// address in network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DestAddr {
    /// IPv4 address bytes, network order.
    pub addr: [u8; 4],
}

const _: () = assert!(core::mem::size_of::<DestAddr>() == 4);

/// Key of [`maps::PODS6`]: an IPv6 address in network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodAddr6 {
    /// IPv6 address bytes, network order.
    pub addr: [u8; 16],
}

const _: () = assert!(core::mem::size_of::<PodAddr6>() == 16);

/// Key of the [`maps::DESTS6`] LPM trie (after the prefix length): an IPv6
/// address in network order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DestAddr6 {
    /// IPv6 address bytes, network order.
    pub addr: [u8; 16],
}

const _: () = assert!(core::mem::size_of::<DestAddr6>() == 16);

/// Values of the [`maps::DESTS`] trie.
pub mod action {
    /// Leave to the kernel (e.g. a service CIDR that kube-proxy translates).
    pub const KERNEL: u32 = 0;
    /// May be steered.
    pub const STEER: u32 = 1;
}

/// Packet direction, first index of the counters.
pub mod direction {
    /// Pod → ENI (program on the pod's host interface).
    pub const EGRESS: u32 = 0;
    /// ENI → pod (program on the ENI).
    pub const INGRESS: u32 = 1;
    /// Number of directions.
    pub const COUNT: u32 = 2;
}

/// What the program did with a packet, second index of the counters. The
/// same results for IPv4 and IPv6; [`result::EXTENSION_HEADERS`] is IPv6's
/// alone.
pub mod result {
    /// Redirected past the kernel's forwarding path.
    pub const REDIRECTED: u32 = 0;
    /// The FIB result has no neighbour entry yet: left to the kernel.
    pub const NO_NEIGHBOUR: u32 = 1;
    /// The FIB lookup did not succeed or pointed elsewhere: left to the kernel.
    pub const FIB_MISS: u32 = 2;
    /// Not for the fast path (neither IPv4 nor IPv6, IPv4 options or a
    /// fragment, IPv6 next header not TCP, UDP or ICMPv6, neighbour
    /// discovery, not a known pod, destination not in the VPC or excluded,
    /// DNS, TTL or hop limit expiring): left to the kernel.
    pub const PASSED: u32 = 3;
    /// The redirect helper refused the packet (it returned `TC_ACT_SHOT`, not
    /// `TC_ACT_REDIRECT`): the program returns its verdict and the packet is
    /// dropped.
    pub const REDIRECT_FAILED: u32 = 4;
    /// Number of IPv4 results.
    pub const COUNT: u32 = 5;
    /// IPv6 with extension headers (hop-by-hop, routing, fragment,
    /// destination options, AH, ESP, ...): left to the kernel unchanged.
    pub const EXTENSION_HEADERS: u32 = 5;
    /// Number of IPv6 results.
    pub const COUNT_IPV6: u32 = 6;
}

/// `TC_ACT_REDIRECT` (include/uapi/linux/pkt_cls.h): what `bpf_redirect_neigh`
/// and `bpf_redirect_peer` return once the redirect is set up.
pub const TC_ACT_REDIRECT: i64 = 7;

/// The result to count for the return value of `bpf_redirect_neigh` or
/// `bpf_redirect_peer`: [`result::REDIRECTED`] for `TC_ACT_REDIRECT`, else
/// [`result::REDIRECT_FAILED`]. Both helpers return `TC_ACT_SHOT` when they
/// refuse their arguments (flags, or a nexthop shorter than
/// `struct bpf_redir_neigh`): `bpf_redirect_neigh` and `bpf_redirect_peer`
/// in net/core/filter.c, Linux 6.18.
#[inline(always)]
pub const fn redirect_result(rc: i64) -> u32 {
    if rc == TC_ACT_REDIRECT {
        result::REDIRECTED
    } else {
        result::REDIRECT_FAILED
    }
}

/// Number of IPv4 counters (the first ones, laid out as before IPv6 existed).
pub const COUNTERS_IPV4: u32 = direction::COUNT * result::COUNT;
/// Number of counters: IPv4's, then IPv6's.
pub const COUNTERS: u32 = COUNTERS_IPV4 + direction::COUNT * result::COUNT_IPV6;

/// Index of the IPv4 counter for `direction` and `result`.
#[inline(always)]
pub const fn counter_index(direction: u32, result: u32) -> u32 {
    direction * result::COUNT + result
}

/// Index of the IPv6 counter for `direction` and `result`: after every
/// IPv4 counter, so theirs keep their indices.
#[inline(always)]
pub const fn counter_index6(direction: u32, result: u32) -> u32 {
    COUNTERS_IPV4 + direction * result::COUNT_IPV6 + result
}

impl_pod!(PodRoute, DestAddr, PodAddr6, DestAddr6, SteerConfig);

#[cfg(test)]
mod tests {
    use super::*;

    /// `TC_ACT_OK` and `TC_ACT_SHOT` (include/uapi/linux/pkt_cls.h).
    const TC_ACT_OK: i64 = 0;
    const TC_ACT_SHOT: i64 = 2;

    #[test]
    fn only_tc_act_redirect_counts_as_redirected() {
        assert_eq!(redirect_result(TC_ACT_REDIRECT), result::REDIRECTED);
        assert_eq!(redirect_result(TC_ACT_SHOT), result::REDIRECT_FAILED);
        assert_eq!(redirect_result(TC_ACT_OK), result::REDIRECT_FAILED);
        assert_eq!(redirect_result(-1), result::REDIRECT_FAILED);
    }

    #[test]
    fn ipv6_counters_follow_the_ipv4_ones() {
        assert_eq!(COUNTERS, 22);
        assert_eq!(counter_index6(direction::EGRESS, result::REDIRECTED), 10);
        assert_eq!(
            counter_index6(direction::EGRESS, result::EXTENSION_HEADERS),
            15
        );
        assert_eq!(counter_index6(direction::INGRESS, result::REDIRECTED), 16);
        assert_eq!(
            counter_index6(direction::INGRESS, result::EXTENSION_HEADERS),
            COUNTERS - 1
        );
    }

    #[test]
    fn every_counter_has_its_own_slot() {
        assert_eq!(COUNTERS_IPV4, 10);
        assert_eq!(counter_index(direction::EGRESS, result::REDIRECTED), 0);
        assert_eq!(counter_index(direction::EGRESS, result::REDIRECT_FAILED), 4);
        assert_eq!(counter_index(direction::INGRESS, result::REDIRECTED), 5);
        assert_eq!(
            counter_index(direction::INGRESS, result::REDIRECT_FAILED),
            COUNTERS_IPV4 - 1
        );
    }
}
