//! podnet installed with its Helm chart (`deploy/helm/podnet`) on the cluster of `cargo xtask
//! cluster up`, after `cluster_uninstall` removed the kustomize install: `helm install` with
//! the image set to the cluster's imported one, both agents ready, a new pod on each node
//! addressed by podnet, the metrics port answering; then the documented cleanup (`helm
//! upgrade --set cleanup.enabled=true --wait`) leaves nothing of podnet on either node, and
//! `helm uninstall` leaves no object.

// Test code: a step that fails fails the test, with the step in the message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use podnet_tests::cluster::{ipv4_in, Cluster};
use serde_json::Value;

#[path = "common/node_clean.rs"]
mod node_clean;

/// The helm `cargo xtask setup` builds from its release module.
const HELM: &str = "/opt/podnet-tools/helm-v4.3.2/bin/helm";
/// The release and its namespace.
const RELEASE: &str = "podnet";
const NAMESPACE: &str = "kube-system";
/// The namespace of this suite's pods.
const PODS_NAMESPACE: &str = "podnet-helm";

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .join("deploy/helm/podnet")
}

/// `helm ARGS` against the cluster; its stdout.
fn helm(cluster: &Cluster, args: &[&str]) -> String {
    let started = Instant::now();
    let out = Command::new(HELM)
        .arg("--kubeconfig")
        .arg(cluster.kubeconfig())
        .args(args)
        .output()
        .expect("running helm");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "helm {args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("helm {}: {:.1} s", args[0], started.elapsed().as_secs_f64());
    stdout
}

/// The image `cluster up` imported and installed podnet with: `newName` and `newTag` of
/// the overlay's `images:` entry.
fn cluster_image(cluster: &Cluster) -> (String, String) {
    let path = cluster.podnet_overlay.join("kustomization.yaml");
    let text = std::fs::read_to_string(&path).expect("the overlay");
    let doc: Value = serde_norway::from_str(&text).expect("the overlay's YAML");
    let image = &doc["images"][0];
    (
        image["newName"].as_str().expect("newName").to_owned(),
        image["newTag"].as_str().expect("newTag").to_owned(),
    )
}

/// One pod pinned to each node, on the toolbox image.
fn pods_manifest(cluster: &Cluster) -> String {
    let mut text =
        format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {PODS_NAMESPACE}\n");
    for node in &cluster.nodes {
        let _ = write!(
            text,
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: helm-{node}\n  namespace: {PODS_NAMESPACE}\n\
             spec:\n  nodeName: {node}\n  terminationGracePeriodSeconds: 1\n  containers:\n\
             \x20   - name: sleep\n      image: localhost/podnet-toolbox:e2e\n      imagePullPolicy: Never\n\
             \x20     command: [sleep, \"3600\"]\n",
            node = node.name
        );
    }
    text
}

#[test]
fn helm_install_addresses_pods_and_its_cleanup_leaves_nothing() {
    let Some(cluster) = Cluster::from_env_or_skip() else {
        return;
    };
    let chart = chart();
    let chart = chart.to_str().expect("a UTF-8 path");
    let (repository, tag) = cluster_image(&cluster);
    let started = Instant::now();
    helm(
        &cluster,
        &[
            "install",
            RELEASE,
            chart,
            "--namespace",
            NAMESPACE,
            "--set",
            &format!("image.repository={repository}"),
            "--set",
            &format!("image.tag={tag}"),
            "--set",
            "image.pullPolicy=Never",
            "--wait",
            "--timeout",
            "180s",
        ],
    );
    assert_installed(&cluster, started);
    assert_pods_addressed(&cluster);
    cleanup_and_uninstall(&cluster, chart);
    eprintln!("helm suite: {:.1} s", started.elapsed().as_secs_f64());
}

/// Both agents ready, one per node, from the chart; the release deployed.
fn assert_installed(cluster: &Cluster, started: Instant) {
    // Both agents ready, one per node, from the chart.
    for node in &cluster.nodes {
        let pod = cluster.agent_pod(&node.name).expect("one agent per node");
        let status = cluster
            .kubectl_json(&["get", "pod", "-n", NAMESPACE, &pod])
            .expect("the agent pod");
        let ready = status["status"]["conditions"]
            .as_array()
            .expect("conditions")
            .iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        assert!(ready, "agent {pod} on {} not ready", node.name);
        assert_eq!(
            status["metadata"]["annotations"]["checksum/config"]
                .as_str()
                .map(str::len),
            Some(64),
            "{pod}"
        );
    }
    let releases: Value = serde_json::from_str(&helm(
        cluster,
        &["list", "--namespace", NAMESPACE, "--output", "json"],
    ))
    .expect("helm list's JSON");
    assert_eq!(releases[0]["name"], RELEASE);
    assert_eq!(releases[0]["status"], "deployed");
    eprintln!(
        "installed and ready in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// A new pod on each node gets its address from podnet, and the metrics port answers.
fn assert_pods_addressed(cluster: &Cluster) {
    // A new pod on each node gets its address from podnet: in the node's CIDR, registered
    // as the pod's endpoint by the agent there.
    cluster.apply(&pods_manifest(cluster)).expect("the pods");
    for node in &cluster.nodes {
        let name = format!("helm-{}", node.name);
        let mut ip = String::new();
        cluster
            .wait(&format!("{name} running"), Duration::from_mins(1), || {
                let pod = cluster.kubectl_json(&["get", "pod", "-n", PODS_NAMESPACE, &name])?;
                pod["status"]["podIP"]
                    .as_str()
                    .unwrap_or("")
                    .clone_into(&mut ip);
                Ok(pod["status"]["phase"] == "Running" && !ip.is_empty())
            })
            .expect("the pod runs");
        assert!(
            node.pod_cidrs.iter().any(|cidr| ipv4_in(&ip, cidr)),
            "{name}: {ip} not in {:?}",
            node.pod_cidrs
        );
        let endpoints = cluster
            .podnetctl(&node.name, &["endpoints"])
            .expect("podnetctl endpoints");
        let registered: Vec<&str> = endpoints
            .as_array()
            .expect("endpoints")
            .iter()
            .filter(|e| e["namespace"] == PODS_NAMESPACE)
            .filter_map(|e| e["ips"][0].as_str())
            .collect();
        assert_eq!(registered, [ip.as_str()], "podnet's endpoint of {name}");
        // The metrics port (the chart's default) answers from outside the node.
        let metrics = cluster.metrics(node).expect("the metrics port answers");
        assert_eq!(
            metrics.count_matching("podnet_build_info", &[]),
            1,
            "{}",
            node.name
        );
    }
    cluster
        .kubectl(&[
            "delete",
            "namespace",
            PODS_NAMESPACE,
            "--wait=true",
            "--timeout=60s",
        ])
        .expect("deleting the pods");
}

/// The documented cleanup, then `helm uninstall`: nothing of podnet left.
fn cleanup_and_uninstall(cluster: &Cluster, chart: &str) {
    // The documented cleanup: the DaemonSet runs `podnet-agent --cleanup` on every node and
    // is ready once every node is clean.
    helm(
        cluster,
        &[
            "upgrade",
            RELEASE,
            chart,
            "--namespace",
            NAMESPACE,
            "--reuse-values",
            "--set",
            "cleanup.enabled=true",
            "--wait",
            "--timeout",
            "180s",
        ],
    );
    for node in &cluster.nodes {
        let pod = cluster
            .agent_pod(&node.name)
            .expect("one cleanup pod per node");
        let log = cluster
            .kubectl(&["logs", "-n", NAMESPACE, &pod, "-c", "cleanup"])
            .expect("the cleanup's log");
        for want in [
            "/sys/fs/bpf/podnet",
            "/opt/cni/bin/podnet-cni",
            "/etc/cni/net.d/10-podnet.conflist",
        ] {
            assert!(
                log.contains(want),
                "{}: {want} not removed:\n{log}",
                node.name
            );
        }
        node_clean::assert_node_clean(cluster, node);
    }
    helm(
        cluster,
        &[
            "uninstall",
            RELEASE,
            "--namespace",
            NAMESPACE,
            "--wait",
            "--timeout",
            "120s",
        ],
    );
    let left = cluster
        .kubectl(&[
            "get",
            "daemonsets,configmaps,serviceaccounts,services,clusterroles,clusterrolebindings,podmonitors,prometheusrules",
            "--all-namespaces",
            "-l",
            "app.kubernetes.io/part-of=podnet",
            "-o",
            "name",
        ])
        .expect("kubectl get");
    assert_eq!(left.trim(), "", "objects left");
    for node in &cluster.nodes {
        node_clean::assert_node_clean(cluster, node);
    }
}
