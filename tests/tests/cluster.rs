//! podnet on a real Kubernetes cluster: the one `cargo xtask cluster up` builds (kubelet,
//! containerd, kube-proxy, CoreDNS, the API server), with podnet installed from `deploy/`.
//!
//! `cargo xtask test` brings the cluster up, runs this suite (feature `cluster-e2e`, one test
//! at a time: they share the cluster) and takes it down. By hand:
//! `cargo xtask cluster up`, then
//! `PODNET_CLUSTER_STATUS=/var/lib/podnet-cluster/status.json cargo test -p podnet-tests
//! --features cluster-e2e --test cluster -- --test-threads=1`.
//!
//! Every number is compared with the system's own view: pod addresses with the Node's
//! `spec.podCIDRs` from the API server, source addresses with what the peer saw, DNS counts
//! with what each pod sent, insert races with the node's `insert_failed`, API calls with the
//! API server's audit log.

// Test code: a step that fails fails the test, with the step in the message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::OnceLock,
    time::Duration,
};

use podnet_tests::cluster::{ipv4_in, Cluster, ListedPod, SnatToOnePort};
use serde_json::Value;

/// The namespace of the suite's workload.
const NAMESPACE: &str = "e2e";
/// Pods of the workload Deployment, spread evenly over the two nodes.
const PODS: usize = 20;
/// The cluster DNS Service's `ClusterIP`.
const DNS_SERVICE: &str = "10.96.0.10";
/// Lookups each pod makes in the DNS test.
const LOOKUPS_PER_POD: u64 = 3;
/// Queries the losing pod sends in the insert race test, each a flow of its own.
const RACING_QUERIES: u64 = 20;
/// A destination in the VPC namespace (its router) for the insert race test.
const RACE_DESTINATION: &str = "10.200.0.1";
/// podnet's service account, as the audit log names it.
const PODNET_USER: &str = "system:serviceaccount:kube-system:podnet";

/// The workload: `echo` pods running busybox httpd, whose CGI scripts answer with the
/// caller's address (`/cgi-bin/ip`) and the pod's name (`/cgi-bin/name`), behind a Service.
const WORKLOAD: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: e2e
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: echo
  namespace: e2e
data:
  ip: |
    #!/bin/sh
    printf 'Content-Type: text/plain\r\n\r\n%s\n' "$REMOTE_ADDR"
  name: |
    #!/bin/sh
    printf 'Content-Type: text/plain\r\n\r\n%s\n' "$HOSTNAME"
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: echo
  namespace: e2e
spec:
  replicas: 20
  selector:
    matchLabels: {app: echo}
  template:
    metadata:
      labels: {app: echo}
    spec:
      terminationGracePeriodSeconds: 1
      topologySpreadConstraints:
        - maxSkew: 1
          topologyKey: kubernetes.io/hostname
          whenUnsatisfiable: DoNotSchedule
          labelSelector:
            matchLabels: {app: echo}
      containers:
        - name: echo
          image: localhost/podnet-toolbox:e2e
          imagePullPolicy: Never
          command: [httpd, -f, -p, "8080", -h, /www]
          ports:
            - containerPort: 8080
          volumeMounts:
            - {name: cgi, mountPath: /www/cgi-bin}
      volumes:
        - name: cgi
          configMap:
            name: echo
            defaultMode: 0755
---
apiVersion: v1
kind: Service
metadata:
  name: echo
  namespace: e2e
spec:
  selector: {app: echo}
  ports:
    - port: 80
      targetPort: 8080
"#;

/// The cluster, or `None` (after saying so; a failure with `CI=true`) when the suite was not
/// pointed at one.
fn cluster() -> Option<&'static Cluster> {
    static CLUSTER: OnceLock<Option<Cluster>> = OnceLock::new();
    CLUSTER.get_or_init(Cluster::from_env_or_skip).as_ref()
}

/// The workload, deployed once and shared by the tests.
fn workload(cluster: &Cluster) -> &'static [ListedPod] {
    static PODS_CELL: OnceLock<Vec<ListedPod>> = OnceLock::new();
    PODS_CELL.get_or_init(|| {
        cluster.apply(WORKLOAD).expect("applying the workload");
        cluster
            .rollout(NAMESPACE, "deployment/echo", Duration::from_mins(3))
            .expect("the workload rolls out");
        let pods = workload_pods(cluster);
        assert_eq!(pods.len(), PODS, "{pods:?}");
        pods
    })
}

fn workload_pods(cluster: &Cluster) -> Vec<ListedPod> {
    cluster
        .pods(NAMESPACE, "app=echo")
        .expect("listing the workload")
}

fn on_node<'a>(pods: &'a [ListedPod], node: &str) -> Vec<&'a ListedPod> {
    pods.iter().filter(|p| p.node == node).collect()
}

/// `podnetctl --json ARGS` in the agent container on `node`.
fn podnetctl(cluster: &Cluster, node: &str, args: &[&str]) -> Value {
    cluster.podnetctl(node, args).expect("podnetctl")
}

/// An HTTP GET of `path` on `ip:8080` from pod `from`, through busybox nc; the body's last
/// line.
fn http_get_from(cluster: &Cluster, from: &str, ip: &str, path: &str) -> String {
    let script = format!("printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {ip} 8080");
    let out = cluster
        .exec(NAMESPACE, from, None, &["sh", "-c", &script])
        .unwrap_or_else(|e| panic!("GET {ip}:8080{path} from {from}: {e:#}"));
    out.lines().last().unwrap_or("").trim().to_owned()
}

#[test]
fn podnet_is_ready_on_every_node_from_the_shipped_bundle_without_privilege() {
    let Some(cluster) = cluster() else { return };
    let ds = cluster
        .kubectl_json(&["get", "daemonset", "podnet", "-n", "kube-system"])
        .expect("the podnet DaemonSet");
    let status = &ds["status"];
    assert_eq!(status["desiredNumberScheduled"], 2, "{status}");
    assert_eq!(status["numberReady"], 2, "{status}");
    assert_eq!(status["updatedNumberScheduled"], 2, "{status}");
    let pods = cluster
        .kubectl_json(&[
            "get",
            "pods",
            "-n",
            "kube-system",
            "-l",
            "app.kubernetes.io/name=podnet",
        ])
        .expect("podnet's pods");
    let pods = pods["items"].as_array().expect("items");
    let nodes: BTreeSet<&str> = pods
        .iter()
        .filter_map(|p| p["spec"]["nodeName"].as_str())
        .collect();
    assert_eq!(nodes, BTreeSet::from(["node-1", "node-2"]));
    for pod in pods {
        let spec = &pod["spec"];
        let containers = spec["containers"]
            .as_array()
            .into_iter()
            .chain(spec["initContainers"].as_array())
            .flatten();
        for container in containers {
            let security = &container["securityContext"];
            assert_ne!(security["privileged"], true, "{container}");
            assert_eq!(security["allowPrivilegeEscalation"], false, "{container}");
            assert_eq!(container["image"], "localhost/podnet:e2e");
        }
        let agent = &spec["containers"][0];
        assert_eq!(agent["name"], "agent");
        assert_eq!(
            agent["securityContext"]["capabilities"]["add"],
            serde_json::json!(["BPF", "PERFMON", "NET_ADMIN"])
        );
        assert_eq!(
            agent["securityContext"]["capabilities"]["drop"],
            serde_json::json!(["ALL"])
        );
        let ready = pod["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        assert!(ready, "{}", pod["status"]);
    }
}

#[test]
fn each_agent_takes_its_pod_cidr_from_its_own_node_with_one_get() {
    let Some(cluster) = cluster() else { return };
    let events = || -> Vec<Value> {
        std::fs::read_to_string(&cluster.audit_log)
            .expect("the audit log")
            .lines()
            .map(|line| serde_json::from_str(line).expect("an audit event"))
            .filter(|event: &Value| event["user"]["username"] == PODNET_USER)
            .collect()
    };
    for node in &cluster.nodes {
        let ipam = podnetctl(cluster, &node.name, &["ipam"]);
        assert_eq!(ipam["mode"], "node-cidr", "{ipam}");
        let prefixes: Vec<&str> = ipam["pools"]
            .as_array()
            .expect("pools")
            .iter()
            .filter_map(|p| p["prefix"].as_str())
            .collect();
        assert_eq!(prefixes, node.pod_cidrs, "{} {ipam}", node.name);
    }
    // Every request podnet made: a GET of the Node the agent's token is bound to.
    let before = events();
    let mut gets_per_node: BTreeMap<String, usize> = BTreeMap::new();
    for event in &before {
        assert_eq!(event["verb"], "get", "{event}");
        assert_eq!(event["objectRef"]["resource"], "nodes", "{event}");
        let node = event["objectRef"]["name"].as_str().expect("a node name");
        assert_eq!(
            event["user"]["extra"]["authentication.kubernetes.io/node-name"][0], node,
            "an agent asked for another node than its own: {event}"
        );
        assert_eq!(event["responseStatus"]["code"], 200, "{event}");
        *gets_per_node.entry(node.to_owned()).or_default() += 1;
    }
    let expected: BTreeMap<String, usize> =
        cluster.nodes.iter().map(|n| (n.name.clone(), 1)).collect();
    assert_eq!(gets_per_node, expected, "podnet's API requests: {before:?}");
    // Pods come and go: podnet asks the API server nothing about them.
    let pods = workload(cluster);
    cluster
        .kubectl(&[
            "delete",
            "pod",
            "-n",
            NAMESPACE,
            &pods[0].name,
            &pods[1].name,
        ])
        .expect("deleting two pods");
    cluster
        .rollout(NAMESPACE, "deployment/echo", Duration::from_mins(2))
        .expect("replacements roll out");
    assert_eq!(
        events().len(),
        before.len(),
        "podnet called the API server per pod"
    );
}

#[test]
fn pods_get_addresses_from_their_nodes_pod_cidr() {
    let Some(cluster) = cluster() else { return };
    workload(cluster);
    let pods = workload_pods(cluster);
    assert_eq!(pods.len(), PODS);
    let ips: BTreeSet<&str> = pods.iter().map(|p| p.ip.as_str()).collect();
    assert_eq!(ips.len(), PODS, "an address given twice: {pods:?}");
    for node in &cluster.nodes {
        let here = on_node(&pods, &node.name);
        assert_eq!(
            here.len(),
            PODS / 2,
            "the scheduler spreads evenly: {pods:?}"
        );
        for pod in &here {
            assert!(
                node.pod_cidrs.iter().any(|c| ipv4_in(&pod.ip, c)),
                "{} on {} has {} outside {:?}",
                pod.name,
                node.name,
                pod.ip,
                node.pod_cidrs
            );
        }
        // podnet's own count of the addresses it gave = the pods on the node that have one
        // (every pod not on the host network, the workload's and CoreDNS).
        let running_here = cluster
            .pods_with_pod_address(&node.name)
            .expect("every pod");
        let metrics = cluster.metrics(node).expect("podnet's metrics");
        assert_eq!(
            metrics.count("podnet_ipam_addresses", &[("state", "allocated")]),
            running_here as u64,
            "{}",
            node.name
        );
        let endpoints = podnetctl(cluster, &node.name, &["endpoints"]);
        let registered: BTreeSet<(String, String)> = endpoints
            .as_array()
            .expect("endpoints")
            .iter()
            .filter(|e| e["namespace"] == NAMESPACE)
            .map(|e| {
                (
                    e["pod"].as_str().expect("pod").to_owned(),
                    e["ips"][0].as_str().expect("ip").to_owned(),
                )
            })
            .collect();
        let expected: BTreeSet<(String, String)> = here
            .iter()
            .map(|p| (p.name.clone(), p.ip.clone()))
            .collect();
        assert_eq!(registered, expected, "podnet's endpoints on {}", node.name);
    }
}

#[test]
fn pods_reach_pods_on_the_other_node_with_their_own_address() {
    let Some(cluster) = cluster() else { return };
    workload(cluster);
    let pods = workload_pods(cluster);
    let one = on_node(&pods, "node-1");
    let two = on_node(&pods, "node-2");
    for (client, server) in one.iter().zip(&two).chain(two.iter().zip(&one)) {
        // httpd listens on a dual-stack socket: IPv4 peers come as [::ffff:a.b.c.d].
        let seen = http_get_from(cluster, &client.name, &server.ip, "/cgi-bin/ip");
        let seen = seen
            .trim_start_matches("[::ffff:")
            .trim_end_matches(']')
            .to_owned();
        assert_eq!(
            seen, client.ip,
            "{} ({}) -> {} ({}): the server saw another source",
            client.name, client.node, server.name, server.node
        );
    }
    // Native routing: the VPC routes each node's pod CIDR to the node; no tunnel anywhere.
    let routes = cluster
        .in_netns(&cluster.vpc_netns, &["ip", "-4", "route", "show"])
        .expect("the VPC's routes");
    for node in &cluster.nodes {
        for cidr in &node.pod_cidrs {
            let want = format!("{cidr} via {} dev vpc0", node.address);
            assert!(
                routes.lines().any(|l| l.starts_with(&want)),
                "{want}:\n{routes}"
            );
        }
        let tunnels = cluster
            .on_node(node, &["ip", "-o", "link", "show", "type", "vxlan"])
            .expect("links")
            + &cluster
                .on_node(node, &["ip", "-o", "link", "show", "type", "geneve"])
                .expect("links");
        assert_eq!(tunnels.trim(), "", "a tunnel on {}", node.name);
    }
}

#[test]
fn services_reach_pods_through_kube_proxy() {
    let Some(cluster) = cluster() else { return };
    workload(cluster);
    let pods = workload_pods(cluster);
    let names: BTreeSet<&str> = pods.iter().map(|p| p.name.as_str()).collect();
    let client = &pods[0];
    for _ in 0..10 {
        let script = "printf 'GET /cgi-bin/name HTTP/1.0\\r\\n\\r\\n' | nc -w 3 echo 80";
        let out = cluster
            .exec(NAMESPACE, &client.name, None, &["sh", "-c", script])
            .expect("GET through the Service");
        let answer = out.lines().last().unwrap_or("").trim();
        assert!(names.contains(answer), "{answer:?} is not an echo pod");
    }
}

/// A namespace left at the shipped default (series per workload), with a Deployment whose pods
/// look names up.
const WORKLOAD_NAMESPACE: &str = "e2e-workload";
const WORKLOAD_LOOKUPS: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: e2e-workload
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: lookup
  namespace: e2e-workload
spec:
  replicas: 2
  selector:
    matchLabels: {app: lookup}
  template:
    metadata:
      labels: {app: lookup}
    spec:
      terminationGracePeriodSeconds: 1
      topologySpreadConstraints:
        - maxSkew: 1
          topologyKey: kubernetes.io/hostname
          whenUnsatisfiable: DoNotSchedule
          labelSelector:
            matchLabels: {app: lookup}
      containers:
        - name: lookup
          image: localhost/podnet-toolbox:e2e
          imagePullPolicy: Never
          command: [sleep, "86400"]
"#;

/// Outside the namespaces opted into per-pod series, the shipped default: a Deployment's DNS
/// series carry its workload, which each agent learned from its node's containerd (the pods'
/// labels over CRI, no API-server call), and no `pod` label.
#[test]
fn dns_elsewhere_is_counted_per_workload_named_by_the_runtime() {
    let Some(cluster) = cluster() else { return };
    cluster
        .apply(WORKLOAD_LOOKUPS)
        .expect("applying the workload");
    cluster
        .rollout(
            WORKLOAD_NAMESPACE,
            "deployment/lookup",
            Duration::from_mins(3),
        )
        .expect("the workload rolls out");
    let pods = cluster
        .pods(WORKLOAD_NAMESPACE, "app=lookup")
        .expect("listing the workload");
    assert_eq!(pods.len(), 2, "{pods:?}");
    let name = "kubernetes.default.svc.cluster.local.";
    for pod in &pods {
        let script = format!(
            "for i in $(seq {LOOKUPS_PER_POD}); do nslookup -type=a {name} >/dev/null || exit 1; done"
        );
        cluster
            .exec(WORKLOAD_NAMESPACE, &pod.name, None, &["sh", "-c", &script])
            .unwrap_or_else(|e| panic!("{} resolving {name}: {e:#}", pod.name));
    }
    let workload = [
        ("namespace", WORKLOAD_NAMESPACE),
        ("workload_kind", "Deployment"),
        ("workload", "lookup"),
        ("server", DNS_SERVICE),
    ];
    let counted = || -> anyhow::Result<u64> {
        let mut sum = 0;
        for node in &cluster.nodes {
            sum += cluster
                .metrics(node)?
                .count_matching("podnet_dns_requests_total", &workload);
        }
        Ok(sum)
    };
    let expected = LOOKUPS_PER_POD * pods.len() as u64;
    cluster
        .wait(
            "podnet counts the workload's queries",
            Duration::from_secs(15),
            || Ok(counted()? == expected),
        )
        .unwrap_or_else(|e| panic!("{e:#}: counted {:?}", counted()));
    for node in &cluster.nodes {
        let metrics = cluster.metrics(node).expect("metrics");
        let with_pod: Vec<_> = metrics
            .samples("podnet_dns_requests_total")
            .into_iter()
            .filter(|(labels, _)| {
                labels.contains(&("namespace".into(), WORKLOAD_NAMESPACE.into()))
                    && labels.iter().any(|(k, _)| k == "pod")
            })
            .collect();
        assert_eq!(
            with_pod,
            Vec::new(),
            "{}: series with a pod label",
            node.name
        );
    }
    cluster
        .kubectl(&["delete", "namespace", WORKLOAD_NAMESPACE, "--wait=false"])
        .expect("deleting the namespace");
}

#[test]
fn dns_through_coredns_is_counted_per_pod_exactly() {
    let Some(cluster) = cluster() else { return };
    workload(cluster);
    let pods = workload_pods(cluster);
    let name = format!("echo.{NAMESPACE}.svc.cluster.local.");
    // (A queries, NOERROR answers) podnet counted for `pod`.
    let read = |pod: &ListedPod| -> (u64, u64) {
        let metrics = cluster.metrics(cluster.node(&pod.node)).expect("metrics");
        let labels = |extra: (&'static str, &'static str)| {
            [
                ("namespace", NAMESPACE),
                ("pod", pod.name.as_str()),
                ("server", DNS_SERVICE),
                extra,
            ]
        };
        (
            metrics.count("podnet_dns_requests_total", &labels(("qtype", "A"))),
            metrics.count("podnet_dns_responses_total", &labels(("rcode", "NOERROR"))),
        )
    };
    let before: Vec<(u64, u64)> = pods.iter().map(read).collect();
    for pod in &pods {
        // A fully qualified name: no search list, one A query per lookup.
        let script = format!(
            "for i in $(seq {LOOKUPS_PER_POD}); do nslookup -type=a {name} >/dev/null || exit 1; done"
        );
        cluster
            .exec(NAMESPACE, &pod.name, None, &["sh", "-c", &script])
            .unwrap_or_else(|e| panic!("{} resolving {name}: {e:#}", pod.name));
    }
    for (pod, (requests_before, responses_before)) in pods.iter().zip(before) {
        cluster
            .wait(
                &format!("podnet counts {}'s queries", pod.name),
                Duration::from_secs(5),
                || {
                    let (requests, responses) = read(pod);
                    Ok(requests - requests_before == LOOKUPS_PER_POD
                        && responses - responses_before == LOOKUPS_PER_POD)
                },
            )
            .unwrap_or_else(|e| panic!("{e:#}: now {:?}", read(pod)));
    }
}

#[test]
fn insert_races_are_attributed_to_the_real_pods() {
    let Some(cluster) = cluster() else { return };
    workload(cluster);
    let pods = workload_pods(cluster);
    let node = cluster.node("node-1");
    let other = cluster.node("node-2");
    let here = on_node(&pods, &node.name);
    let (holder, loser) = (here[0], here[1]);
    // The holder's lookup keeps the port; each of the loser's lookups (a flow of its own)
    // fails to confirm. busybox nslookup with one try sends one query per lookup.
    let lookup = format!("nslookup -retry=1 -timeout=1 -type=a race.example. {RACE_DESTINATION}");
    let snat = SnatToOnePort::add(cluster, node, &[&holder.ip, &loser.ip], RACE_DESTINATION)
        .expect("the SNAT rule");
    let stats_before = cluster.conntrack_stats(node).expect("conntrack stats");
    let other_before = cluster.conntrack_stats(other).expect("conntrack stats");
    let metrics_before = cluster.metrics(node).expect("metrics");
    let send = |pod: &ListedPod, script: String| {
        cluster
            .exec(NAMESPACE, &pod.name, None, &["sh", "-c", &script])
            .expect("sending queries");
    };
    send(holder, format!("{lookup} >/dev/null 2>&1; true"));
    send(
        loser,
        format!("for i in $(seq {RACING_QUERIES}); do {lookup} >/dev/null 2>&1 & done; wait"),
    );
    let stats_after = cluster.conntrack_stats(node).expect("conntrack stats");
    drop(snat);
    let insert_failed = stats_after
        .delta(&stats_before, "insert_failed")
        .expect("insert_failed");
    assert_eq!(insert_failed, RACING_QUERIES, "the kernel's count");
    let other_after = cluster.conntrack_stats(other).expect("conntrack stats");
    assert_eq!(
        other_after
            .delta(&other_before, "insert_failed")
            .expect("delta"),
        0
    );

    let grew = |metrics: &podnet_tests::Metrics, name: &str, labels: &[(&str, &str)]| {
        metrics.count(name, labels) - metrics_before.count(name, labels)
    };
    let loser_labels = [
        ("namespace", NAMESPACE),
        ("pod", loser.name.as_str()),
        ("proto", "udp"),
    ];
    cluster
        .wait("podnet counts every race", Duration::from_secs(5), || {
            let metrics = cluster.metrics(node)?;
            Ok(grew(
                &metrics,
                "podnet_conntrack_insert_races_total",
                &loser_labels,
            ) == insert_failed)
        })
        .expect("races attributed to the losing pod");
    let metrics = cluster.metrics(node).expect("metrics");
    let destination = format!("{RACE_DESTINATION}:53");
    assert_eq!(
        grew(
            &metrics,
            "podnet_conntrack_race_destinations_total",
            &[("destination", &destination), ("proto", "udp")]
        ),
        insert_failed
    );
    assert_eq!(
        grew(
            &metrics,
            "podnet_conntrack_stat_total",
            &[("stat", "insert_failed")]
        ),
        insert_failed
    );
    let other_metrics = cluster.metrics(other).expect("metrics");
    assert_eq!(
        other_metrics.count_sum("podnet_conntrack_insert_races_total"),
        0,
        "node-2 saw no race"
    );
    // podnetctl names the loser, the flow and the pod that holds the port.
    let races = podnetctl(cluster, &node.name, &["conntrack", "races", "--limit", "1"]);
    let race = races[0].to_string();
    for want in [&loser.name, &holder.name, &loser.ip, &holder.ip] {
        assert!(race.contains(want.as_str()), "{want} not in {race}");
    }
}

// ---------------------------------------------------------------------------------------
// Prometheus: the configuration prometheus-operator generated from the shipped PodMonitor
// and PrometheusRule

/// The queries of the shipped dashboard, with its template variables (`label_values` made
/// `PromQL`) and Grafana's `$__rate_interval` (4 x the PodMonitor's 30 s) filled in for
/// `node`, `namespace` and `pod` (regular expressions).
fn dashboard_queries(node: &str, namespace: &str, pod: &str) -> Vec<String> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/helm/podnet/files/podnet.json"
    );
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("the dashboard"))
            .expect("dashboard JSON");
    let mut exprs = Vec::new();
    let mut stack = vec![&dashboard["panels"]];
    while let Some(panels) = stack.pop() {
        for panel in panels.as_array().into_iter().flatten() {
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    exprs.push(expr.to_owned());
                }
            }
            stack.push(&panel["panels"]);
        }
    }
    for var in dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
    {
        let Some(query) = var["query"]["query"].as_str() else {
            continue;
        };
        // label_values(EXPR, LABEL) -> group by (LABEL) (EXPR)
        let inner = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .expect("a label_values query");
        let (expr, label) = inner.rsplit_once(',').expect("label_values(expr, label)");
        exprs.push(format!("group by ({}) ({expr})", label.trim()));
    }
    exprs
        .into_iter()
        .map(|e| {
            // This Prometheus adds no `cluster` label: Grafana's variable is then empty,
            // and `cluster=""` matches the series without one.
            e.replace("$__rate_interval", "2m")
                .replace("$cluster", "")
                .replace("$node", node)
                .replace("$namespace", namespace)
                .replace("$pod", pod)
        })
        .collect()
}

/// The two node-1 pods the Prometheus tests make suffer: (holder of the SNAT port, loser).
fn suffering_pods(cluster: &Cluster) -> (ListedPod, ListedPod) {
    let mut here: Vec<ListedPod> = workload_pods(cluster)
        .into_iter()
        .filter(|p| p.node == "node-1")
        .collect();
    here.sort_by(|a, b| a.name.cmp(&b.name));
    (here[0].clone(), here[1].clone())
}

/// Queries of families that exist only with a feature the cluster leaves off: the fast path
/// (`fast-path: false`) steers nothing, ENI mode, and the kernel's BPF run-time statistics.
const FEATURE_OFF_FAMILIES: &[&str] = &[
    "podnet_steer_packets_total",
    // ENI mode only; the cluster's nodes take addresses from their pod CIDRs.
    "podnet_cloud_api_calls_total",
    "podnet_ipam_eni_addresses",
    // Only with kernel.bpf_stats_enabled=1, which the cluster's nodes leave off.
    "podnet_bpf_program_run_seconds_total",
    "podnet_bpf_program_runs_total",
    // Not rendered by the DaemonSet's agent here (its map inventory finds no maps without
    // more privilege than the DaemonSet grants); the deploy suite's agent exports it.
    "podnet_bpf_map_entries",
];

/// Every panel of the dashboard has data for the workload's pods (after the DNS and race
/// tests made some), from the series Prometheus scraped through the operator's relabelling.
#[test]
fn prometheus_answers_every_dashboard_query_for_the_workload() {
    let Some(cluster) = cluster() else { return };
    workload(cluster);
    let (_, pod) = suffering_pods(cluster);
    let mut empty = Vec::new();
    for (node, namespace, pod) in [(".*", ".*", ".*"), ("node-1", NAMESPACE, pod.name.as_str())] {
        for expr in dashboard_queries(node, namespace, pod) {
            if FEATURE_OFF_FAMILIES.iter().any(|f| expr.contains(f)) {
                continue;
            }
            let answered = cluster
                .wait(
                    &format!("series for {expr}"),
                    Duration::from_secs(70),
                    || Ok(!cluster.query(&expr)?.is_empty()),
                )
                .is_ok();
            if !answered {
                empty.push(expr);
            }
        }
    }
    assert!(
        empty.is_empty(),
        "dashboard queries without series: {empty:#?}"
    );
}

/// podnet's own `namespace` and `pod` labels arrive as they are (no `exported_` copies), and
/// each agent is `instance=<node>` of `job="podnet"`.
#[test]
fn prometheus_keeps_podnets_labels_and_names_the_node() {
    let Some(cluster) = cluster() else { return };
    workload(cluster);
    let (_, pod) = suffering_pods(cluster);
    let up = cluster.query(r#"up{job="podnet"}"#).expect("query");
    let mut instances: Vec<&str> = up
        .iter()
        .filter_map(|s| s["metric"]["instance"].as_str())
        .collect();
    instances.sort_unstable();
    assert_eq!(instances, ["node-1", "node-2"], "{up:?}");
    let expr = format!(
        r#"podnet_dns_requests_total{{job="podnet", namespace="{NAMESPACE}", pod="{}"}}"#,
        pod.name
    );
    cluster
        .wait(
            "the pod's DNS series in Prometheus",
            Duration::from_secs(70),
            || Ok(!cluster.query(&expr)?.is_empty()),
        )
        .expect("podnet's labels kept");
    let series = cluster.query(&expr).expect("query");
    assert_eq!(
        series[0]["metric"]["instance"],
        pod.node.as_str(),
        "{series:?}"
    );
    let exported = cluster
        .query(r#"{job="podnet", exported_namespace=~".+"}"#)
        .expect("query");
    assert!(exported.is_empty(), "renamed labels: {exported:?}");
    // Host traffic (namespace="") keeps no namespace at all rather than the agent's own.
    let agents_own = cluster
        .query(r#"{job="podnet", namespace="kube-system", pod=~"podnet-.*"}"#)
        .expect("query");
    assert!(
        agents_own.is_empty(),
        "agent's own labels leaked: {agents_own:?}"
    );
}

/// The alerts at rest (this runs first of the suite): Prometheus evaluates every alert of
/// the shipped PrometheusRule, through the operator's rule files, and none is active.
#[test]
fn alerts_are_quiet_at_rest() {
    let Some(cluster) = cluster() else { return };
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/manifests/prometheusrule.yaml"
    );
    let shipped: serde_norway::Value =
        serde_norway::from_str(&std::fs::read_to_string(path).expect("the rules"))
            .expect("rules YAML");
    let mut shipped: Vec<&str> = shipped["spec"]["groups"]
        .as_sequence()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_sequence().expect("rules"))
        .filter_map(|r| r["alert"].as_str())
        .collect();
    shipped.sort_unstable();
    let rules = cluster
        .prometheus_api("/api/v1/rules?type=alert")
        .expect("rules");
    let mut loaded: Vec<(String, String)> = rules["data"]["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .map(|r| {
            (
                r["name"].as_str().unwrap_or_default().to_owned(),
                r["state"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    loaded.sort();
    let names: Vec<&str> = loaded.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, shipped, "alert rules Prometheus evaluates");
    for (name, state) in &loaded {
        assert_eq!(state, "inactive", "{name} at rest");
    }
    let active = cluster
        .query(r#"ALERTS{alertstate=~"pending|firing"}"#)
        .expect("query");
    assert!(active.is_empty(), "alerts at rest: {active:#?}");
}

/// Insert races and DNS timeouts on a node make the race and DNS-timeout alerts active for
/// the pod that suffers them (pending: their `for:` durations are exercised by promtool's
/// unit tests in tests/tests/deploy.rs, not waited out here).
#[test]
fn prometheus_alerts_on_insert_races_and_dns_timeouts() {
    let Some(cluster) = cluster() else { return };
    workload(cluster);
    let node = cluster.node("node-1");
    let (holder, loser) = suffering_pods(cluster);
    let lookup = format!("nslookup -retry=1 -timeout=1 -type=a race.example. {RACE_DESTINATION}");
    // Two tries: each lost query is sent again (a retransmit, and another race).
    let retried = format!("nslookup -retry=2 -timeout=1 -type=a race.example. {RACE_DESTINATION}");
    // The loser also resolves through the cluster DNS, so that every per-pod panel of the
    // dashboard has its series (answers, latency) next to the races and timeouts.
    let answered = format!("nslookup -type=a echo.{NAMESPACE}.svc.cluster.local.");
    // Two bursts a scrape apart. A counter's first sample has no rate and no increase, so the
    // first burst only creates the loser's series (a few lookups); the second carries the
    // queries the alerts' guards count: 3 × RACING_QUERIES lookups of two tries each, 120
    // requests, over the guards' 100 queries in 10 minutes without Prometheus' extrapolation.
    for lookups in [4, 3 * RACING_QUERIES] {
        let _snat = SnatToOnePort::add(cluster, node, &[&holder.ip, &loser.ip], RACE_DESTINATION)
            .expect("the SNAT rule");
        for (pod, script) in [
            (&holder, format!("{lookup} >/dev/null 2>&1; true")),
            (
                &loser,
                format!(
                    "{answered} >/dev/null; \
                     for i in $(seq {lookups}); do {retried} >/dev/null 2>&1 & done; wait"
                ),
            ),
        ] {
            cluster
                .exec(NAMESPACE, &pod.name, None, &["sh", "-c", &script])
                .expect("sending queries");
        }
        std::thread::sleep(Duration::from_secs(35));
    }
    for (alert, labels) in [
        (
            "PodnetDnsInsertRaces",
            format!(r#"instance="node-1", pod="{}""#, loser.name),
        ),
        (
            "PodnetDnsTimeouts",
            format!(r#"instance="node-1", pod="{}""#, loser.name),
        ),
    ] {
        let expr =
            format!(r#"ALERTS{{alertname="{alert}", alertstate=~"pending|firing", {labels}}}"#);
        cluster
            .wait(&format!("{alert} active"), Duration::from_mins(3), || {
                Ok(!cluster.query(&expr)?.is_empty())
            })
            .unwrap_or_else(|e| panic!("{e:#}; active: {:?}", cluster.query("ALERTS")));
    }
}
