//! Test harness for podnet's privileged integration tests.
//!
//! Tests build simulated nodes out of network namespaces: a [`Topology`] is a node namespace
//! with forwarding on, pods connected to it by veth pairs, and a server behind it. Every
//! namespace is an RAII guard ([`Netns`]) with a unique name, so tests run in parallel and
//! clean up after themselves, also when they fail.
//!
//! Namespaces are entered with `nsenter --net=` (commands) or `setns` on a dedicated thread
//! ([`in_netns`]), never with `ip netns exec`, which remounts `/sys` and hides `/sys/fs/bpf`.
//! Assertions compare against the kernel's own counters ([`conntrack_stats`]).
//!
//! Every privileged test starts with `if !podnet_tests::require_root() { return; }`.

pub mod agent;
pub mod bench;
pub mod capture;
pub mod chaos;
pub mod cloud;
pub mod cluster;
pub mod cni;
pub mod crr;
pub mod dns_client;
pub mod dns_paced;
pub mod kube_proxy;
pub mod load;
mod netfilter;
mod netns;
mod process;
mod topology;
mod traffic;
mod util;
pub mod vpc;

pub use agent::{Agent, EndpointSpec, Metrics};
pub use dns_client::start_dns_responder;
pub use netfilter::{
    conntrack_stats, forward6_rule_packets, forward_rule_packets, ip6tables, iptables,
    read_conntrack_stat, ConntrackStats,
};
pub use netns::{
    in_netns, in_netns_path, unique_ifname, veth, wait_link_up, Netns, MAX_IFNAME_LEN,
};
pub use process::{spawn_in, spawn_in_with_env, NsChild};
pub use topology::{Pod, Topology, TopologyBuilder};
pub use traffic::{
    dns_query_message, ping, ping_received, tcp_connect, tcp_echo_server, udp_echo_server,
    udp_send, udp_send_paced, udp_send_spoofed, TcpEchoServer, UdpEchoServer,
};
pub use util::{free_tcp_port, http_exchange, require_root, unavailable, wait_for};

#[cfg(test)]
mod selftest;
