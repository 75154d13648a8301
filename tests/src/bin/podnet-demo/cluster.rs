//! `--cluster STATUS`: the three jobs on the real cluster of `cargo xtask
//! cluster up` (kubelet, containerd, kube-proxy, CoreDNS, the API server),
//! with podnet installed from the shipped bundle. Pods are made by kubelet
//! and containerd through podnet-cni; the races and DNS queries are made
//! inside them with `kubectl exec`; podnet's figures are read from each
//! node's metrics and `podnetctl`, the kernel's from the node's own
//! namespace. The demo's namespace is deleted at the end.

use std::{path::Path, time::Duration};

use anyhow::{bail, Context as _, Result};
use podnet_tests::{
    cluster::{ipv4_in, Cluster, ListedPod, SnatToOnePort},
    Metrics,
};

use crate::{
    dns::{buckets_matching, milliseconds, quantile},
    report::{self, Agreement},
};

/// The demo's namespace on the cluster.
const NAMESPACE: &str = "podnet-demo";
/// Pods of the demo's Deployment, spread over the two nodes.
const PODS: usize = 4;
/// The cluster DNS Service's `ClusterIP`.
const DNS_SERVICE: &str = "10.96.0.10";
/// A name CoreDNS answers (fully qualified: one query per lookup).
const GOOD_NAME: &str = "kubernetes.default.svc.cluster.local.";
/// A name CoreDNS answers NXDOMAIN.
const MISSING_NAME: &str = "missing.podnet-demo.svc.cluster.local.";
/// Lookups of [`GOOD_NAME`] per pod.
const LOOKUPS_PER_POD: u64 = 5;
/// A destination in the VPC namespace (its router) whose DNS flows race.
const RACE_DESTINATION: &str = "10.200.0.1";
/// Parallel lookups of the losing pod, each a flow of its own.
const RACING_QUERIES: u64 = 20;

/// The demo's pods: busybox, idle, two per node.
const WORKLOAD: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: podnet-demo
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: client
  namespace: podnet-demo
spec:
  replicas: 4
  selector:
    matchLabels: {app: client}
  template:
    metadata:
      labels: {app: client}
    spec:
      terminationGracePeriodSeconds: 1
      topologySpreadConstraints:
        - maxSkew: 1
          topologyKey: kubernetes.io/hostname
          whenUnsatisfiable: DoNotSchedule
          labelSelector:
            matchLabels: {app: client}
      containers:
        - name: client
          image: localhost/podnet-toolbox:e2e
          imagePullPolicy: Never
          command: [sleep, "86400"]
"#;

/// Runs the cluster demo; the namespace is removed also when a step fails.
pub fn run(status: &Path, agreement: &mut Agreement) -> Result<()> {
    let cluster = report::step(
        1,
        "reading the cluster and checking podnet on every node",
        || {
            let cluster = Cluster::from_status_file(status)?;
            for node in &cluster.nodes {
                cluster
                    .agent_pod(&node.name)
                    .with_context(|| format!("podnet on {}", node.name))?;
            }
            Ok(cluster)
        },
    )?;
    let outcome = jobs(&cluster, agreement);
    let removed = report::step(
        5,
        &format!("deleting namespace {NAMESPACE} (pods through CNI DEL)"),
        || {
            cluster
                .kubectl(&[
                    "delete",
                    "namespace",
                    NAMESPACE,
                    "--wait=true",
                    "--timeout=120s",
                ])
                .map(drop)
        },
    );
    outcome.and(removed)
}

fn jobs(cluster: &Cluster, agreement: &mut Agreement) -> Result<()> {
    let pods = report::step(
        2,
        &format!("creating {PODS} pods (kubelet, containerd, podnet-cni)"),
        || {
            cluster.apply(WORKLOAD)?;
            cluster.rollout(NAMESPACE, "deployment/client", Duration::from_mins(3))?;
            cluster.pods(NAMESPACE, "app=client")
        },
    )?;
    print_pods(cluster, &pods, agreement)?;
    races(cluster, &pods, agreement)?;
    dns(cluster, &pods, agreement)
}

fn print_pods(cluster: &Cluster, pods: &[ListedPod], agreement: &mut Agreement) -> Result<()> {
    report::section("Pods (addresses from podnet's IPAM in each node's pod CIDR)");
    let mut in_cidr = 0;
    for pod in pods {
        let node = cluster.node(&pod.node);
        let inside = node.pod_cidrs.iter().any(|c| ipv4_in(&pod.ip, c));
        in_cidr += u64::from(inside);
        println!(
            "  {:<40} {:<8} {:<15} node pod CIDR {}",
            format!("{NAMESPACE}/{}", pod.name),
            pod.node,
            pod.ip,
            node.pod_cidrs.join(",")
        );
    }
    agreement.exact(
        "pods with an address in their node's CIDR",
        in_cidr,
        "pods the API server lists",
        pods.len() as u64,
    );
    for node in &cluster.nodes {
        let view = cluster.podnetctl(&node.name, &["routes"])?;
        let lines = view["lines"].as_array().map_or(&[][..], Vec::as_slice);
        let not_ok = lines
            .iter()
            .filter(|l| !matches!(l["state"].as_str(), Some("ok" | "provided")))
            .count();
        println!(
            "  {}: podnetctl routes lists {} objects, {not_ok} not as desired",
            node.name,
            lines.len()
        );
        agreement.exact(
            &format!("{}: routing objects not as desired", node.name),
            not_ok as u64,
            "(desired entries, all present)",
            0,
        );
    }
    Ok(())
}

/// Two pods on node-1 send DNS to the same destination through SNAT to one
/// port: the holder's flow keeps it, each of the loser's loses the race.
fn races(cluster: &Cluster, pods: &[ListedPod], agreement: &mut Agreement) -> Result<()> {
    let node = cluster.nodes.first().context("the cluster has no node")?;
    let here: Vec<&ListedPod> = pods.iter().filter(|p| p.node == node.name).collect();
    let [holder, loser, ..] = here.as_slice() else {
        bail!("{} needs two demo pods, has {}", node.name, here.len());
    };
    println!(
        "[3/{}] insert races on {}: {} and {} send DNS to {RACE_DESTINATION} through SNAT to one port",
        report::STEPS,
        node.name,
        holder.name,
        loser.name
    );
    let snat = SnatToOnePort::add(cluster, node, &[&holder.ip, &loser.ip], RACE_DESTINATION)?;
    let kernel_before = cluster.conntrack_stats(node)?;
    let metrics_before = cluster.metrics(node)?;
    let lookup = format!("nslookup -retry=1 -timeout=1 -type=a race.example. {RACE_DESTINATION}");
    cluster.exec(
        NAMESPACE,
        &holder.name,
        None,
        &["sh", "-c", &format!("{lookup} >/dev/null 2>&1; true")],
    )?;
    cluster.exec(
        NAMESPACE,
        &loser.name,
        None,
        &[
            "sh",
            "-c",
            &format!("for i in $(seq {RACING_QUERIES}); do {lookup} >/dev/null 2>&1 & done; wait"),
        ],
    )?;
    let kernel_after = cluster.conntrack_stats(node)?;
    drop(snat);
    let insert_failed = kernel_after.delta(&kernel_before, "insert_failed")?;
    let attributed = || -> Result<u64> {
        let now = cluster.metrics(node)?;
        Ok(grew(
            &now,
            &metrics_before,
            "podnet_conntrack_insert_races_total",
            &[],
        ))
    };
    // The agent reads the kernel's events within milliseconds; wait (bounded).
    let _ = cluster.wait(
        "podnet attributes every race",
        Duration::from_secs(5),
        || Ok(attributed()? == insert_failed),
    );
    let races = cluster.podnetctl(&node.name, &["conntrack", "races", "--limit", "1"])?;
    report::section("The last insert race, as podnetctl conntrack races names it");
    let race = &races[0];
    println!(
        "  {}/{} ({} -> {}) lost port {} to {}/{} ({} -> {})",
        race["loser"]["namespace"].as_str().unwrap_or(""),
        race["loser"]["pod"].as_str().unwrap_or(""),
        race["flow"]["src"].as_str().unwrap_or("?"),
        race["flow"]["dst"].as_str().unwrap_or("?"),
        race["snat"].as_str().unwrap_or("?"),
        race["winner"]["pod"]["namespace"].as_str().unwrap_or(""),
        race["winner"]["pod"]["pod"].as_str().unwrap_or(""),
        race["winner"]["flow"]["src"].as_str().unwrap_or("?"),
        race["winner"]["flow"]["dst"].as_str().unwrap_or("?"),
    );
    agreement.exact(
        &format!("{}: insert races attributed", node.name),
        attributed()?,
        "kernel insert_failed on the node",
        insert_failed,
    );
    Ok(())
}

/// Every pod resolves a Service name and a missing name through CoreDNS.
fn dns(cluster: &Cluster, pods: &[ListedPod], agreement: &mut Agreement) -> Result<()> {
    let before: Vec<Metrics> = cluster
        .nodes
        .iter()
        .map(|n| cluster.metrics(n))
        .collect::<Result<_>>()?;
    report::step(
        4,
        &format!(
            "DNS: each pod looks up {GOOD_NAME} {LOOKUPS_PER_POD} times and {MISSING_NAME} once, through CoreDNS ({DNS_SERVICE})"
        ),
        || {
            for pod in pods {
                let script = format!(
                    "for i in $(seq {LOOKUPS_PER_POD}); do nslookup -type=a {GOOD_NAME} >/dev/null || exit 1; done; \
                     nslookup -type=a {MISSING_NAME} >/dev/null 2>&1; true"
                );
                cluster.exec(NAMESPACE, &pod.name, None, &["sh", "-c", &script])?;
            }
            Ok(())
        },
    )?;
    let server = [("server", DNS_SERVICE)];
    let counted = |metrics: &[Metrics], name: &str, extra: &[(&str, &str)]| -> u64 {
        cluster
            .nodes
            .iter()
            .zip(metrics)
            .zip(&before)
            .map(|((_, now), then)| {
                let mut labels = vec![("namespace", NAMESPACE), server[0]];
                labels.extend_from_slice(extra);
                grew(now, then, name, &labels)
            })
            .sum()
    };
    let queries = pods.len() as u64 * (LOOKUPS_PER_POD + 1);
    let mut now = Vec::new();
    let _ = cluster.wait("podnet counts every query", Duration::from_secs(5), || {
        now = cluster
            .nodes
            .iter()
            .map(|n| cluster.metrics(n))
            .collect::<Result<_>>()?;
        Ok(counted(&now, "podnet_dns_requests_total", &[]) == queries)
    });
    // Outside the namespaces opted into per-pod series, the shipped default keeps them per
    // workload: the agents named the Deployment from the pods' labels, read over CRI.
    report::section(
        "DNS per workload, measured in the kernel (podnet_dns_*, labels from the node's containerd)",
    );
    println!(
        "  {:<40} {:>7} {:>9} {:>9}",
        "workload", "queries", "p50", "p99"
    );
    let workload = [
        ("namespace", NAMESPACE),
        ("workload_kind", "Deployment"),
        ("workload", "client"),
    ];
    let buckets = buckets_matching(&now.iter().collect::<Vec<_>>(), &workload);
    let per_workload: u64 = now
        .iter()
        .zip(&before)
        .map(|(n, b)| grew(n, b, "podnet_dns_requests_total", &workload))
        .sum();
    println!(
        "  {:<40} {:>7} {:>9} {:>9}",
        format!("Deployment {NAMESPACE}/client ({} pods)", pods.len()),
        per_workload,
        milliseconds(quantile(&buckets, 0.5)),
        milliseconds(quantile(&buckets, 0.99)),
    );
    agreement.exact(
        "DNS queries of Deployment client",
        per_workload,
        "lookups its pods made",
        queries,
    );
    print_failures(cluster)?;
    agreement.exact(
        "DNS queries to CoreDNS",
        counted(&now, "podnet_dns_requests_total", &[]),
        "lookups the pods made",
        queries,
    );
    agreement.exact(
        "DNS answers NOERROR",
        counted(&now, "podnet_dns_responses_total", &[("rcode", "NOERROR")]),
        "lookups of the Service name",
        pods.len() as u64 * LOOKUPS_PER_POD,
    );
    agreement.exact(
        "DNS answers NXDOMAIN",
        counted(&now, "podnet_dns_responses_total", &[("rcode", "NXDOMAIN")]),
        "lookups of the missing name",
        pods.len() as u64,
    );
    Ok(())
}

/// The demo pods' failed and slow queries, as `podnetctl dns slow` lists them on each node.
fn print_failures(cluster: &Cluster) -> Result<()> {
    report::section(
        "Failed and slow queries of the demo's pods (podnetctl dns slow -n podnet-demo)",
    );
    for node in &cluster.nodes {
        let records = cluster.podnetctl(
            &node.name,
            &["dns", "slow", "--namespace", NAMESPACE, "--limit", "4"],
        )?;
        for r in records.as_array().map_or(&[][..], Vec::as_slice) {
            println!(
                "  {:<8} {:<40} {} {:<40} {} {}",
                node.name,
                format!("{NAMESPACE}/{}", r["pod"]["pod"].as_str().unwrap_or("")),
                r["qtype"].as_str().unwrap_or("?"),
                r["name"].as_str().unwrap_or("?"),
                r["outcome"].as_str().unwrap_or("?"),
                r["rcode"].as_str().unwrap_or(""),
            );
        }
    }
    Ok(())
}

/// How much the samples of `name` whose labels include `labels` grew.
fn grew(now: &Metrics, then: &Metrics, name: &str, labels: &[(&str, &str)]) -> u64 {
    now.count_matching(name, labels)
        .saturating_sub(then.count_matching(name, labels))
}
