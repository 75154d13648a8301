//! Uninstalling podnet from the cluster of `cargo xtask cluster up` with the documented steps
//! (deploy/README.md, "Uninstall"), run last by `cargo xtask test`: `kubectl delete -k`, then
//! `podnet-agent --cleanup` on every node. Nothing of podnet may remain on a node: no pin, no
//! TC attachment, no rule or route with podnet's protocol, no iptables chain, no CNI file.

// Test code: a step that fails fails the test, with the step in the message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use podnet_tests::{agent::binary, cluster::Cluster};

#[path = "common/node_clean.rs"]
mod node_clean;

use node_clean::{assert_node_clean, tc_programs};

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
