//! A rolling update of podnet's DaemonSet on the cluster of `cargo xtask cluster up` (run by
//! `cargo xtask test` after the `cluster` suite): the datapath stays while each agent is
//! replaced, so pods keep talking, DNS keeps being counted, and pods created meanwhile start.

// Test code: a step that fails fails the test, with the step in the message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use podnet_tests::cluster::{Cluster, ListedPod};

/// The namespace of this suite's pods.
const NAMESPACE: &str = "upgrade";
/// Pods before the update (one server and one client per node, spread).
const PODS: usize = 4;
/// Pods after scaling up during the update.
const PODS_DURING: usize = 8;
/// Pings of the cross-node stream, one every 100 ms: 45 s, longer than the rollout.
const PINGS: u32 = 450;
/// DNS lookups of the resolving pod, one every 200 ms or so.
const LOOKUPS: u64 = 150;
/// The tag the DaemonSet moves to: the same image under a second name (`cluster up` tags it
/// on every node).
const NEXT_IMAGE: &str = "localhost/podnet:e2e-next";

const PODS_YAML: &str = r"
apiVersion: v1
kind: Namespace
metadata:
  name: upgrade
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: sleeper
  namespace: upgrade
spec:
  replicas: 4
  selector:
    matchLabels: {app: sleeper}
  template:
    metadata:
      labels: {app: sleeper}
    spec:
      terminationGracePeriodSeconds: 1
      topologySpreadConstraints:
        - maxSkew: 1
          topologyKey: kubernetes.io/hostname
          whenUnsatisfiable: DoNotSchedule
          labelSelector:
            matchLabels: {app: sleeper}
      containers:
        - name: sleeper
          image: localhost/podnet-toolbox:e2e
          imagePullPolicy: Never
          command: [sleep, '100000']
";

/// `kubectl exec` of a shell script, started in the background.
fn spawn_exec(cluster: &Cluster, pod: &str, script: &str) -> Child {
    cluster
        .kubectl_command(&["exec", "-n", NAMESPACE, pod, "--", "sh", "-c", script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting kubectl exec")
}

fn finish(child: Child, what: &str) -> String {
    let out = child.wait_with_output().expect("waiting for kubectl exec");
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// podnet's count of `pod`'s A queries to the cluster DNS, from the agent on its node.
fn dns_requests(cluster: &Cluster, pod: &ListedPod) -> u64 {
    let metrics = cluster.metrics(cluster.node(&pod.node)).expect("metrics");
    metrics.count(
        "podnet_dns_requests_total",
        &[
            ("namespace", NAMESPACE),
            ("pod", &pod.name),
            ("server", "10.96.0.10"),
            ("qtype", "A"),
        ],
    )
}

/// The counters kept in pinned kernel maps, per node: they must never go back.
fn kernel_counters(cluster: &Cluster) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for node in &cluster.nodes {
        let metrics = cluster.metrics(node).expect("metrics");
        for family in [
            "podnet_dns_requests_total",
            "podnet_dns_responses_total",
            "podnet_conntrack_insert_races_total",
            "podnet_conntrack_stat_total",
        ] {
            out.push((format!("{} {family}", node.name), metrics.count_sum(family)));
        }
    }
    out
}

#[test]
fn rolling_update_keeps_traffic_counters_and_new_pods() {
    let Some(cluster) = Cluster::from_env_or_skip() else {
        return;
    };
    cluster.apply(PODS_YAML).expect("applying the pods");
    cluster
        .rollout(NAMESPACE, "deployment/sleeper", Duration::from_mins(2))
        .expect("pods ready");
    let pods = cluster.pods(NAMESPACE, "app=sleeper").expect("pods");
    assert_eq!(pods.len(), PODS);
    let on = |node: &str| {
        pods.iter()
            .find(|p| p.node == node)
            .expect("a pod per node")
    };
    let (client, server) = (on("node-1"), on("node-2"));
    let resolver = pods
        .iter()
        .find(|p| p.node == "node-1" && p.name != client.name)
        .expect("a second pod on node-1");
    let dns_before = dns_requests(&cluster, resolver);
    let counters_before = kernel_counters(&cluster);
    let agents_before: Vec<String> = cluster
        .nodes
        .iter()
        .map(|n| cluster.agent_pod(&n.name).expect("agent"))
        .collect();

    let ping = spawn_exec(
        &cluster,
        &client.name,
        &format!("ping -q -c {PINGS} -i 0.1 -W 2 {}", server.ip),
    );
    let lookups = spawn_exec(
        &cluster,
        &resolver.name,
        &format!(
            "failed=0; for i in $(seq {LOOKUPS}); do \
             nslookup -type=a kubernetes.default.svc.cluster.local. >/dev/null || failed=$((failed+1)); \
             sleep 0.2; done; echo failed=$failed"
        ),
    );
    std::thread::sleep(Duration::from_secs(2));
    let rollout = roll_to_next_image_while_scaling_up(&cluster);
    let rollout_done_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_secs();
    let ping = finish(ping, "ping across nodes");
    let summary = ping
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_default()
        .to_owned();
    assert!(
        summary.starts_with(&format!(
            "{PINGS} packets transmitted, {PINGS} packets received"
        )),
        "lost pings during a {rollout:?} rollout: {summary}"
    );
    let lookups = finish(lookups, "DNS lookups");
    assert!(lookups.contains("failed=0"), "{lookups}");

    // Every agent was replaced, by one running the new tag.
    for (node, before) in cluster.nodes.iter().zip(&agents_before) {
        let now = cluster.agent_pod(&node.name).expect("agent");
        assert_ne!(&now, before, "agent on {} not replaced", node.name);
        let pod = cluster
            .kubectl_json(&["get", "pod", "-n", "kube-system", &now])
            .expect("agent pod");
        assert_eq!(pod["spec"]["containers"][0]["image"], NEXT_IMAGE);
    }
    // The datapath counted while the agents were away: every lookup, exactly, and no
    // counter kept in the kernel went back.
    cluster
        .wait(
            "podnet counted every lookup",
            Duration::from_secs(5),
            || Ok(dns_requests(&cluster, resolver) - dns_before == LOOKUPS),
        )
        .unwrap_or_else(|e| panic!("{e:#}: {}", dns_requests(&cluster, resolver) - dns_before));
    for ((name, before), (_, after)) in counters_before.iter().zip(kernel_counters(&cluster)) {
        assert!(
            after >= *before,
            "{name} went back from {before} to {after}"
        );
    }
    assert_no_counter_went_back_in_prometheus(&cluster, rollout_done_at);
    eprintln!("rollout of 2 agents took {rollout:?}; {summary}");
}

/// Moves the DaemonSet to [`NEXT_IMAGE`] and, meanwhile, scales the pods up to
/// [`PODS_DURING`] (their CNI ADDs may be retried, none may fail for good); waits for both.
/// Returns how long the DaemonSet took.
fn roll_to_next_image_while_scaling_up(cluster: &Cluster) -> Duration {
    let started = Instant::now();
    cluster
        .kubectl(&[
            "set",
            "image",
            "-n",
            "kube-system",
            "daemonset/podnet",
            &format!("agent={NEXT_IMAGE}"),
            &format!("install-cni={NEXT_IMAGE}"),
        ])
        .expect("kubectl set image");
    cluster
        .kubectl(&[
            "scale",
            "-n",
            NAMESPACE,
            "deployment/sleeper",
            &format!("--replicas={PODS_DURING}"),
        ])
        .expect("scaling up");
    cluster
        .rollout("kube-system", "daemonset/podnet", Duration::from_mins(3))
        .expect("the DaemonSet rolls out");
    let rollout = started.elapsed();
    cluster
        .rollout(NAMESPACE, "deployment/sleeper", Duration::from_mins(3))
        .expect("pods created during the rollout start");
    assert_eq!(
        cluster.pods(NAMESPACE, "app=sleeper").expect("pods").len(),
        PODS_DURING
    );
    rollout
}

/// In Prometheus no podnet counter went back at all, those the agents keep in memory
/// included: once it has scraped each new agent after the rollout (which ended at
/// `rollout_done_at`, Unix seconds), no series shows a reset.
fn assert_no_counter_went_back_in_prometheus(cluster: &Cluster, rollout_done_at: u64) {
    cluster
        .wait(
            "Prometheus scraped the new agents",
            Duration::from_secs(70),
            || {
                let fresh = cluster.query(&format!(
                    r#"count(timestamp(up{{job="podnet"}}) > {rollout_done_at})"#
                ))?;
                Ok(fresh.first().and_then(|s| s["value"][1].as_str()) == Some("2"))
            },
        )
        .expect("scrapes of the new agents");
    // resets() drops the metric name, so one family at a time.
    let families = cluster
        .query(r#"group by (__name__) ({job="podnet", __name__=~"podnet_.+(_total|_bucket|_count|_sum)"})"#)
        .expect("query");
    assert!(families.len() > 10, "counter families: {families:?}");
    let mut went_back = Vec::new();
    for family in &families {
        let name = family["metric"]["__name__"].as_str().expect("a name");
        let resets = cluster
            .query(&format!(r#"resets({name}{{job="podnet"}}[10m]) > 0"#))
            .expect("query");
        if !resets.is_empty() {
            went_back.push((name.to_owned(), resets));
        }
    }
    assert!(
        went_back.is_empty(),
        "podnet counters that went back: {went_back:#?}"
    );
}
