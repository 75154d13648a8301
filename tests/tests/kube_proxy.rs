//! The kube-proxy rules the fast-path benchmark puts on its node: they load
//! as kube-proxy loads them, and they work as kube-proxy's do (a new
//! connection to a cluster IP walks them and is translated to its endpoint),
//! counted exactly by the kernel.

// Test code: a step that fails fails the test, with the step in the message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{net::SocketAddr, time::Duration};

use podnet_tests::{
    crr::{crr_client, crr_server},
    kube_proxy::{self, Services, FIRST_CLUSTER_IP, SERVICE_PORT, TARGET_PORT},
    require_root, Netns, Topology,
};

/// The packet counter of the nat rule whose `iptables-save -c` line contains
/// `needle`.
fn nat_rule_packets(node: &Netns, needle: &str) -> u64 {
    let out = node.run_ok(&["iptables-save", "-c", "-t", "nat"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text
        .lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no nat rule with {needle:?} in\n{text}"));
    // `[packets:bytes] -A CHAIN ...`
    line.trim_start_matches('[')
        .split(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no counter in {line:?}"))
}

#[test]
fn a_thousand_services_load_and_dnat_new_connections() {
    if !require_root() {
        return;
    }
    let topo = Topology::builder().name("kproxy").pods(1).build().unwrap();
    let node = topo.node();
    // One endpoint per Service, from the server's address on: Service 0's
    // endpoint is the server.
    let services = Services {
        count: 1000,
        endpoints: 1,
        node_port_every: 10,
        cluster_cidr: topo.pods_cidr_v4().into(),
        first_endpoint: topo.server_ipv4(),
    };
    let rules = services.ruleset().unwrap();
    kube_proxy::load(node, &rules).unwrap();
    assert_eq!(
        kube_proxy::count_rules(node, "nat").unwrap(),
        rules.nat_rules + rules.nat_jumps
    );
    assert_eq!(
        kube_proxy::count_rules(node, "filter").unwrap(),
        rules.filter_rules + rules.filter_jumps
    );
    // 1,000 x (cluster IP, masquerade, endpoint pick, 2 endpoint rules),
    // 100 NodePorts x 3, 4 fixed rules and the NodePorts tail rule.
    assert_eq!(rules.nat_rules, 1000 * 5 + 100 * 3 + 5);

    let endpoint = SocketAddr::new(topo.server_ipv4().into(), TARGET_PORT);
    let server = crr_server(topo.server(), endpoint).unwrap();
    let dnat = format!("--to-destination {endpoint}");
    let lookups = kube_proxy::service_lookups(node).unwrap();
    let dnat_before = nat_rule_packets(node, &dnat);
    let cluster_ip = SocketAddr::new(FIRST_CLUSTER_IP.into(), SERVICE_PORT);
    let run = crr_client(topo.pod(0).netns(), cluster_ip, Duration::from_secs(1)).unwrap();
    assert_eq!(run.failed, 0, "{run:?}");
    assert!(run.completed > 0, "{run:?}");
    assert_eq!(server.served(), run.completed);
    // Each new connection walked the Service rules once and was DNATed once.
    assert_eq!(
        kube_proxy::service_lookups(node).unwrap() - lookups,
        run.completed
    );
    assert_eq!(nat_rule_packets(node, &dnat) - dnat_before, run.completed);
}
