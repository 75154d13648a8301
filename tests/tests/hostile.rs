//! Pods that try to exhaust the agent's kernel maps: one sprays DNS queries
//! at 20,000 servers and forged-source packets into a DROP rule, while a
//! well-behaved pod next to it queries and is dropped a known number of
//! times. The kernel's own counters (iptables rule counters) and what the
//! clients sent are compared with what podnet exposes, exactly.

// Test code: a step that fails fails the test, with the step in the message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::Result;
use podnet_tests::{
    dns_query_message, forward_rule_packets, in_netns, iptables, require_root, start_dns_responder,
    udp_send, udp_send_spoofed, wait_for, Agent, EndpointSpec, Metrics, Netns, Topology,
};

const REQUESTS: &str = "podnet_dns_requests_total";
const RESPONSES: &str = "podnet_dns_responses_total";
const TIMEOUTS: &str = "podnet_dns_timeouts_total";
const UNTRACKED: &str = "podnet_dns_queries_untracked_total";
const DROPS: &str = "podnet_netfilter_drops_total";

/// Distinct servers the hostile pod queries.
const SPRAY: usize = 20_000;
/// Forged-source packets the hostile pod sends into its DROP rule.
const SPOOFED: usize = 2_000;
/// Pending queries one client may have (`podnet_common::dns::PENDING_PER_CLIENT`).
const SHARE: u64 = 1_024;
/// Servers one client's series name (`podnet_common::dns::SERVERS_PER_CLIENT`).
const SERVERS: usize = 16;

/// Sends one query per server address from one socket, without waiting.
fn spray(pod: &Netns, servers: &[Ipv4Addr]) -> Result<()> {
    in_netns(pod, || -> Result<()> {
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        for (i, server) in servers.iter().enumerate() {
            let id = u16::try_from(i % 65_536)?;
            socket.send_to(
                &dns_query_message(id, "spray.test", 1),
                SocketAddr::new(IpAddr::V4(*server), 53),
            )?;
        }
        Ok(())
    })?
}

/// `n` queries answered by the responder, one after the other.
fn answered_queries(pod: &Netns, server: SocketAddr, n: u16) -> Result<u64> {
    in_netns(pod, || -> Result<u64> {
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        socket.connect(server)?;
        socket.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut answered = 0;
        let mut buf = [0u8; 512];
        for id in 0..n {
            socket.send(&dns_query_message(id, &format!("q{id}.cart.test"), 1))?;
            if socket.recv(&mut buf).is_ok_and(|len| len >= 12) {
                answered += 1;
            }
        }
        Ok(answered)
    })?
}

/// Sample lines of `/metrics` (no comments).
fn series(m: &Metrics) -> usize {
    m.0.lines().filter(|l| !l.starts_with('#')).count()
}

/// The hostile pod sprays 20,000 DNS servers and 2,000 forged sources into a
/// DROP rule; the well-behaved pod's counts stay exact, the hostile pod's
/// are bounded (1,024 pending queries at a time, 16 named servers and
/// `other`), forged sources count under one unknown key, and `/metrics`
/// stays under a fixed number of samples.
#[test]
#[allow(clippy::too_many_lines)] // one scenario, step by step
fn a_hostile_pod_cannot_fill_the_maps_or_push_out_another_pods_counts() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let topo = Topology::builder().name("hstl").pods(2).build()?;
    let node = topo.node();
    let (cart, evil) = (topo.pod(0), topo.pod(1));
    let _responder = start_dns_responder(topo.server(), &[topo.server_ipv4().into()])?;
    for pod in [cart, evil] {
        iptables(
            node,
            &[
                "-A",
                "FORWARD",
                "-i",
                pod.host_if(),
                "-p",
                "udp",
                "--dport",
                "9",
                "-j",
                "DROP",
            ],
        )?;
    }
    let endpoints = [
        EndpointSpec::new("shop", "cart", &[cart.ipv4().into()]).interface(cart.host_if()),
        EndpointSpec::new("evil", "spray", &[evil.ipv4().into()]).interface(evil.host_if()),
    ];
    let agent = Agent::start_with(node, &endpoints, &["--dns-timeout", "8s"])?;
    let links = wait_for(
        || {
            agent
                .api("status", serde_json::Value::Null)
                .is_ok_and(|s| s["dns"]["links"].as_array().map(Vec::len) == Some(4))
        },
        Duration::from_secs(10),
    );
    anyhow::ensure!(links, "DNS programs not on both pods");
    let server = SocketAddr::new(topo.server_ipv4().into(), 53);
    let baseline = series(&agent.metrics(node)?);

    // The hostile pod: 20,000 servers within well under the 8 s timeout (long
    // enough for an emulated guest of the kernel matrix),
    // and forged sources into its DROP rule.
    let servers: Vec<Ipv4Addr> = (0..SPRAY)
        .map(|i| {
            let i = u32::try_from(i).unwrap_or(0);
            Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 1)) + i)
        })
        .collect();
    let t0 = Instant::now();
    spray(evil.netns(), &servers)?;
    let spray_took = t0.elapsed();
    anyhow::ensure!(
        spray_took < Duration::from_secs(6),
        "the spray took {spray_took:?}, longer than the timeout allows for exact counts"
    );
    udp_send_spoofed(
        evil.netns(),
        |i| {
            let i = u32::try_from(i).unwrap_or(0);
            Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 16, 0, 1)) + i * 7)
        },
        SocketAddrV4::new(topo.server_ipv4(), 9),
        SPOOFED,
    )?;
    // The well-behaved pod, meanwhile.
    let answered = answered_queries(cart.netns(), server, 50)?;
    udp_send(
        cart.netns(),
        SocketAddr::new(cart.ipv4().into(), 5009),
        SocketAddr::new(topo.server_ipv4().into(), 9),
        30,
    )?;

    // The kernel's view of the drops.
    assert_eq!(forward_rule_packets(node, evil.host_if())?, SPOOFED as u64);
    assert_eq!(forward_rule_packets(node, cart.host_if())?, 30);
    // Every tracked query of the hostile pod times out (8 s), once.
    let settled = wait_for(
        || {
            agent.metrics(node).is_ok_and(|m| {
                m.count_sum(TIMEOUTS) == SHARE
                    && m.count(UNTRACKED, &[("namespace", "evil"), ("pod", "spray")])
                        == SPRAY as u64 - SHARE
            })
        },
        Duration::from_secs(20),
    );
    let m = agent.metrics(node)?;
    assert!(settled, "{}", m.0);

    let cart_labels = [("namespace", "shop"), ("pod", "cart")];
    let sum_for = |name: &str, ns: &str, pod: &str| -> u64 {
        m.count_matching(name, &[("namespace", ns), ("pod", pod)])
    };
    // The well-behaved pod: exact.
    assert_eq!(answered, 50);
    assert_eq!(sum_for(REQUESTS, "shop", "cart"), 50);
    assert_eq!(sum_for(RESPONSES, "shop", "cart"), 50);
    assert_eq!(sum_for(TIMEOUTS, "shop", "cart"), 0);
    assert_eq!(m.count(UNTRACKED, &cart_labels), 0);
    assert_eq!(
        m.count(
            DROPS,
            &[("namespace", "shop"), ("pod", "cart"), ("kind", "other")]
        ),
        30
    );
    // The hostile pod: 1,024 tracked queries, each one timeout; the rest untracked.
    assert_eq!(sum_for(REQUESTS, "evil", "spray"), SHARE);
    assert_eq!(sum_for(TIMEOUTS, "evil", "spray"), SHARE);
    let mut named: Vec<String> = m
        .samples(REQUESTS)
        .iter()
        .filter(|(labels, _)| labels.contains(&("pod".to_owned(), "spray".to_owned())))
        .filter_map(|(labels, _)| {
            labels
                .iter()
                .find(|(k, _)| k == "server")
                .map(|(_, v)| v.clone())
        })
        .collect();
    named.sort();
    named.dedup();
    assert_eq!(named.len(), SERVERS + 1, "{named:?}");
    assert!(named.contains(&"other".to_owned()), "{named:?}");
    // Forged sources: one unknown key, labelled like host traffic.
    assert_eq!(
        m.count(DROPS, &[("namespace", ""), ("pod", ""), ("kind", "other")]),
        SPOOFED as u64
    );
    assert_eq!(
        m.count("podnet_bpf_map_entries", &[("map", "CT_DROPS")]),
        2,
        "one key for the pod, one for every forged source"
    );
    // The drop tracer ran for every drop: the kernel skipped none of its runs.
    assert_eq!(
        m.value(
            "podnet_bpf_program_recursion_misses_total",
            &[("program", "podnet_kfree_skb")]
        ),
        Some(0.0),
        "{}",
        m.0
    );
    let after = series(&m);
    assert!(
        after <= baseline + 120,
        "/metrics grew from {baseline} to {after} samples"
    );

    // Both pods leave: their keys leave the kernel maps, their counts move
    // to the host's series, and no total goes back.
    let totals = |m: &Metrics| [REQUESTS, TIMEOUTS, UNTRACKED, DROPS].map(|name| m.count_sum(name));
    let before = totals(&m);
    std::fs::write(agent.endpoints_file(), "[]\n")?;
    let host = [("namespace", ""), ("pod", "")];
    let moved = wait_for(
        || {
            agent.metrics(node).is_ok_and(|m| {
                m.count("podnet_bpf_map_entries", &[("map", "DNS_REQUESTS")]) == 0
                    && m.count_matching(REQUESTS, &host) == 50 + SHARE
            })
        },
        Duration::from_secs(10),
    );
    let gone = agent.metrics(node)?;
    assert!(moved, "{}", gone.0);
    assert_eq!(totals(&gone), before, "a total went back");
    assert_eq!(gone.count_matching(TIMEOUTS, &host), SHARE);
    assert_eq!(gone.count(UNTRACKED, &host), SPRAY as u64 - SHARE);
    assert_eq!(
        gone.count(DROPS, &[("namespace", ""), ("pod", ""), ("kind", "other")]),
        SPOOFED as u64 + 30
    );
    assert_eq!(
        gone.count("podnet_bpf_map_entries", &[("map", "CT_DROPS")]),
        1
    );
    assert_eq!(gone.count_matching(REQUESTS, &[("pod", "spray")]), 0);
    println!(
        "hostile pod: {SPRAY} servers sprayed in {spray_took:?} -> {SHARE} tracked (each one timeout), \
         {} untracked, {} server labels; {SPOOFED} forged sources -> 1 drop key; \
         well-behaved pod exact (50 requests, 50 responses, 30 drops); /metrics {baseline} -> {after} samples",
        SPRAY as u64 - SHARE,
        named.len()
    );
    Ok(())
}
