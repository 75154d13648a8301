//! What the cluster suites check on a node after podnet's cleanup: nothing of podnet left.

use podnet_tests::cluster::{Cluster, ClusterNode};

/// Files the kernel puts in every bpffs it mounts (`kernel/bpf/preload`).
const KERNEL_BPFFS_FILES: &[&str] = &["maps.debug", "progs.debug"];
/// The routing protocol number podnet marks its routes and rules with (0xb0).
const PODNET_PROTO: &str = "176";

/// The TC programs attached in `node`'s network namespace, as tcx links (the mode the agent
/// takes on this kernel), by `BPF_PROG_QUERY` on both hooks of every interface. (Debian's
/// bpftool 7.1 predates tcx and lists none of them.)
pub fn tc_programs(cluster: &Cluster, node: &ClusterNode) -> Vec<String> {
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
pub fn assert_node_clean(cluster: &Cluster, node: &ClusterNode) {
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
