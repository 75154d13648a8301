//! Uninstalling podnet from the cluster of `cargo xtask cluster up` with the documented steps
//! (deploy/README.md, "Uninstall"), run last by `cargo xtask test`: `kubectl delete -k`, then
//! `podnet-agent --cleanup` on every node. Nothing of podnet may remain on a node: no pin, no
//! TC attachment, no rule or route with podnet's protocol, no iptables chain, no CNI file.

// Test code: a step that fails fails the test, with the step in the message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use podnet_tests::{
    agent::binary,
    cluster::{Cluster, ClusterNode},
};

/// Files the kernel puts in every bpffs it mounts (`kernel/bpf/preload`).
const KERNEL_BPFFS_FILES: &[&str] = &["maps.debug", "progs.debug"];
/// The routing protocol number podnet marks its routes and rules with (0xb0).
const PODNET_PROTO: &str = "176";

#[test]
fn uninstall_with_the_documented_steps_leaves_nothing() {
    let Some(cluster) = Cluster::from_env_or_skip() else {
        return;
    };
    let overlay = cluster.podnet_overlay.display().to_string();
    cluster
        .kubectl(&["delete", "-k", &overlay, "--wait=true", "--timeout=120s"])
        .expect("kubectl delete -k");
    cluster
        .wait("podnet's pods are gone", Duration::from_mins(2), || {
            Ok(cluster
                .pods("kube-system", "app.kubernetes.io/name=podnet")?
                .is_empty())
        })
        .expect("agents stop");
    let agent = binary("podnet-agent").expect("the podnet-agent binary");
    let agent = agent.to_str().expect("a UTF-8 path");
    for node in &cluster.nodes {
        // With the agents gone, their pins still hold the DNS programs on every pod's
        // host-side interface (ingress and egress): the datapath outlives the DaemonSet.
        let pods_here = cluster
            .pods_with_pod_address(&node.name)
            .expect("every pod");
        assert_eq!(
            tc_programs(&cluster, node).len(),
            2 * pods_here,
            "DNS programs on {} before the cleanup",
            node.name
        );
        let removed = cluster
            .on_node_shell(node, &[agent, "--cleanup"])
            .unwrap_or_else(|e| panic!("cleanup on {}: {e:#}", node.name));
        eprintln!("{}: {removed}", node.name);
        for want in [
            "/sys/fs/bpf/podnet",
            "/opt/cni/bin/podnet-cni",
            "/etc/cni/net.d/10-podnet.conflist",
        ] {
            assert!(
                removed.contains(want),
                "{}: {want} not removed:\n{removed}",
                node.name
            );
        }
        assert_node_clean(&cluster, node);
        // A second run finds nothing.
        let again = cluster
            .on_node_shell(node, &[agent, "--cleanup"])
            .expect("a second cleanup");
        assert_eq!(again.trim(), "nothing to remove");
    }
    let left = cluster
        .kubectl(&[
            "get",
            "daemonsets,configmaps,serviceaccounts,services,clusterroles,clusterrolebindings",
            "--all-namespaces",
            "-l",
            "app.kubernetes.io/part-of=podnet",
            "-o",
            "name",
        ])
        .expect("kubectl get");
    assert_eq!(left.trim(), "", "objects left");
}

/// The TC programs attached in `node`'s network namespace, as tcx links (the mode the agent
/// takes on this kernel), by `BPF_PROG_QUERY` on both hooks of every interface. (Debian's
/// bpftool 7.1 predates tcx and lists none of them.)
fn tc_programs(cluster: &Cluster, node: &ClusterNode) -> Vec<String> {
    use aya::programs::{tc::TcAttachType, SchedClassifier};
    let links = cluster
        .on_node(node, &["ip", "-o", "link", "show"])
        .expect("ip link");
    let names: Vec<String> = links
        .lines()
        .filter_map(|line| line.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name).to_owned())
        .collect();
    let path = std::path::PathBuf::from("/run/netns").join(&node.netns);
    podnet_tests::in_netns_path(&path, move || {
        let mut attached = Vec::new();
        for name in &names {
            for hook in [TcAttachType::Ingress, TcAttachType::Egress] {
                let (_, programs) = SchedClassifier::query_tcx(name, hook)
                    .unwrap_or_else(|e| panic!("BPF_PROG_QUERY on {name}: {e}"));
                for program in programs {
                    attached.push(format!("{name} {hook:?} program {}", program.id()));
                }
            }
        }
        attached
    })
    .expect("entering the node's network namespace")
}
/// Nothing of podnet on `node`: pins, CNI files, routes and rules with podnet's protocol,
/// iptables chains, TC programs.
fn assert_node_clean(cluster: &Cluster, node: &ClusterNode) {
    let shell = |command: &[&str]| {
        cluster
            .on_node_shell(node, command)
            .unwrap_or_else(|e| panic!("{}: {command:?}: {e:#}", node.name))
    };
    // What is left in the node's bpffs is the kernel's own (bpf_preload's iterators).
    let pins: Vec<String> = shell(&["ls", "-A", "/sys/fs/bpf"])
        .lines()
        .filter(|name| !KERNEL_BPFFS_FILES.contains(name))
        .map(ToOwned::to_owned)
        .collect();
    assert!(pins.is_empty(), "pins left on {}: {pins:?}", node.name);
    for (what, dir) in [
        ("CNI binary", "/opt/cni/bin"),
        ("CNI config", "/etc/cni/net.d"),
    ] {
        let left = shell(&["ls", "-A", dir]);
        assert!(
            !left.contains("podnet"),
            "{} {what} left: {left}",
            node.name
        );
    }
    assert_eq!(
        shell(&["ip", "route", "show", "table", "all", "proto", PODNET_PROTO]).trim(),
        "",
        "podnet routes left on {}",
        node.name
    );
    let rules = shell(&["ip", "rule", "show"]);
    assert!(
        !rules.contains(&format!("proto {PODNET_PROTO}")),
        "podnet rules left on {}: {rules}",
        node.name
    );
    let nat = shell(&["iptables", "-t", "nat", "-S"]);
    assert!(!nat.contains("PODNET"), "{} chains left: {nat}", node.name);
    let attached = tc_programs(cluster, node);
    assert!(
        attached.is_empty(),
        "TC programs left on {}: {attached:?}",
        node.name
    );
}
