//! The Kubernetes cluster of `cargo xtask cluster up`, as the end-to-end suite sees it: the
//! status file `up` writes (nodes, their namespaces and addresses, kubectl and kubeconfig),
//! kubectl, commands in a node's network namespace, and podnet's metrics on each node.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::Value;

use crate::{agent::Metrics, netfilter::ConntrackStats, util::http_exchange};

/// The environment variable that points the suite at the status file of `cluster up`.
pub const STATUS_ENV: &str = "PODNET_CLUSTER_STATUS";

/// One node of the cluster.
#[derive(Clone, Debug)]
pub struct ClusterNode {
    /// Kubernetes node name.
    pub name: String,
    /// Its network namespace (`/run/netns/<netns>`).
    pub netns: String,
    /// The file its mount namespace is bound to.
    pub mount_ns: PathBuf,
    /// Its address on the VPC subnet.
    pub address: String,
    /// Its pod CIDRs (`spec.podCIDRs`).
    pub pod_cidrs: Vec<String>,
    /// podnet's metrics endpoint on it.
    pub metrics_addr: String,
}

/// A running cluster.
#[derive(Clone, Debug)]
pub struct Cluster {
    kubectl: PathBuf,
    kubeconfig: PathBuf,
    /// The "VPC" network namespace (router and control plane).
    pub vpc_netns: String,
    /// The API server's audit log (podnet's requests only).
    pub audit_log: PathBuf,
    /// The kustomize overlay podnet was installed from (`kubectl apply -k`).
    pub podnet_overlay: PathBuf,
    /// The Prometheus server's `host:port`.
    pub prometheus: String,
    /// The nodes.
    pub nodes: Vec<ClusterNode>,
}

impl Cluster {
    /// The cluster that [`STATUS_ENV`] names; `None` when it is not set.
    pub fn from_env() -> Result<Option<Self>> {
        let Some(path) = std::env::var_os(STATUS_ENV) else {
            return Ok(None);
        };
        Self::from_status_file(Path::new(&path)).map(Some)
    }

    /// The cluster a status file of `cargo xtask cluster status --json` describes.
    pub fn from_status_file(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let status: Value = serde_json::from_str(&text)?;
        let string = |value: &Value, key: &str| -> Result<String> {
            value
                .get(key)
                .and_then(Value::as_str)
                .map(ToOwned::to_owned)
                .ok_or_else(|| anyhow!("cluster status has no {key:?}"))
        };
        let nodes = status
            .get("nodes")
            .and_then(Value::as_array)
            .ok_or_else(|| anyhow!("cluster status has no nodes"))?
            .iter()
            .map(|node| {
                Ok(ClusterNode {
                    name: string(node, "name")?,
                    netns: string(node, "netns")?,
                    mount_ns: string(node, "mount_ns")?.into(),
                    address: string(node, "address")?,
                    pod_cidrs: node
                        .get("pod_cidrs")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .filter_map(|c| c.as_str().map(ToOwned::to_owned))
                        .collect(),
                    metrics_addr: string(node, "metrics_addr")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            kubectl: string(&status, "kubectl")?.into(),
            kubeconfig: string(&status, "kubeconfig")?.into(),
            vpc_netns: string(&status, "vpc_netns")?,
            audit_log: string(&status, "audit_log")?.into(),
            podnet_overlay: string(&status, "podnet_overlay")?.into(),
            prometheus: string(&status, "prometheus")?
                .trim_start_matches("http://")
                .to_owned(),
            nodes,
        })
    }

    /// The cluster [`STATUS_ENV`] names; when it names none, says so (a failure with
    /// `CI=true`) and returns `None`, so the test returns early.
    ///
    /// # Panics
    /// If the status file cannot be read.
    pub fn from_env_or_skip() -> Option<Self> {
        let cluster =
            Self::from_env().unwrap_or_else(|e| panic!("reading the cluster status: {e}"));
        if cluster.is_none() {
            crate::util::unavailable(
                "no cluster: run through `cargo xtask test`, or set PODNET_CLUSTER_STATUS \
                 after `cargo xtask cluster up`",
            );
        }
        cluster
    }

    /// The kubeconfig of the cluster's admin (for tools other than kubectl, e.g. helm).
    pub fn kubeconfig(&self) -> &std::path::Path {
        &self.kubeconfig
    }

    /// The node named `name`.
    ///
    /// # Panics
    /// If the cluster has no such node.
    pub fn node(&self, name: &str) -> &ClusterNode {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name} in the cluster"))
    }

    /// A kubectl command with the administrator's kubeconfig.
    pub fn kubectl_command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.kubectl);
        command
            .env("KUBECONFIG", &self.kubeconfig)
            .args(args)
            .stdin(Stdio::null());
        command
    }

    /// Runs kubectl and returns its stdout; fails with its stderr.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        output_of(&mut self.kubectl_command(args))
    }

    /// Runs kubectl with `-o json` appended and parses the answer.
    pub fn kubectl_json(&self, args: &[&str]) -> Result<Value> {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        Ok(serde_json::from_str(&self.kubectl(&all)?)?)
    }

    /// `kubectl apply -f -` of `manifests`.
    pub fn apply(&self, manifests: &str) -> Result<String> {
        let mut command = self.kubectl_command(&["apply", "-f", "-"]);
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().context("starting kubectl apply")?;
        child
            .stdin
            .take()
            .ok_or_else(|| anyhow!("kubectl has no stdin"))?
            .write_all(manifests.as_bytes())?;
        let output = child.wait_with_output()?;
        if !output.status.success() {
            bail!(
                "kubectl apply: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// `kubectl exec` of `command` in `namespace/pod` (container `container`, if given).
    pub fn exec(
        &self,
        namespace: &str,
        pod: &str,
        container: Option<&str>,
        command: &[&str],
    ) -> Result<String> {
        let mut args = vec!["exec", "-n", namespace, pod];
        if let Some(container) = container {
            args.extend(["-c", container]);
        }
        args.push("--");
        args.extend(command);
        self.kubectl(&args)
    }

    /// Runs `command` in `node`'s network namespace.
    pub fn on_node(&self, node: &ClusterNode, command: &[&str]) -> Result<String> {
        self.in_netns(&node.netns, command)
    }

    /// Runs `command` as on `node`'s shell: in its network and mount namespaces.
    pub fn on_node_shell(&self, node: &ClusterNode, command: &[&str]) -> Result<String> {
        output_of(
            Command::new("nsenter")
                .arg(format!("--net=/run/netns/{}", node.netns))
                .arg(format!("--mount={}", node.mount_ns.display()))
                .arg("--")
                .args(command)
                .stdin(Stdio::null()),
        )
    }

    /// Runs `command` in network namespace `netns`.
    pub fn in_netns(&self, netns: &str, command: &[&str]) -> Result<String> {
        output_of(
            Command::new("nsenter")
                .arg(format!("--net=/run/netns/{netns}"))
                .arg("--")
                .args(command)
                .stdin(Stdio::null()),
        )
    }

    /// The conntrack statistics of `node`'s network namespace (the kernel's own counters).
    pub fn conntrack_stats(&self, node: &ClusterNode) -> Result<ConntrackStats> {
        ConntrackStats::parse(&self.on_node(node, &["cat", "/proc/net/stat/nf_conntrack"])?)
    }

    /// podnet's metrics on `node`, scraped as Prometheus would (from outside the node).
    pub fn metrics(&self, node: &ClusterNode) -> Result<Metrics> {
        http_get(&node.metrics_addr, "/metrics").map(Metrics)
    }

    /// An instant query of the cluster's Prometheus (which scrapes the agents with the
    /// configuration prometheus-operator generated): the result vector.
    pub fn query(&self, expr: &str) -> Result<Vec<Value>> {
        let answer =
            self.prometheus_api(&format!("/api/v1/query?query={}", percent_encode(expr)))?;
        Ok(answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// A GET of Prometheus's HTTP API at `path`; the answer, which must say `success`.
    pub fn prometheus_api(&self, path: &str) -> Result<Value> {
        let answer: Value = serde_json::from_str(&http_get(&self.prometheus, path)?)?;
        if answer["status"] != "success" {
            bail!("GET {path}: {answer}");
        }
        Ok(answer)
    }

    /// Polls `condition` every 500 ms until it holds or `timeout` passes; the last error (or
    /// `what`) explains a failure.
    pub fn wait(
        &self,
        what: &str,
        timeout: Duration,
        mut condition: impl FnMut() -> Result<bool>,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        loop {
            match condition() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => last = Some(e),
            }
            if Instant::now() > deadline {
                return Err(match last {
                    Some(e) => e.context(format!("{what}: not within {timeout:?}")),
                    None => anyhow!("{what}: not within {timeout:?}"),
                });
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// `GET path` from `addr` (`host:port`) over HTTP/1.0; the body of a 200 answer.
fn http_get(addr: &str, path: &str) -> Result<String> {
    let (code, body) = http_exchange(
        addr.parse()?,
        &format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n"),
        Duration::from_secs(3),
        Duration::from_secs(10),
    )?;
    if code != 200 {
        bail!("GET {addr}{path}: HTTP {code}");
    }
    Ok(body)
}

/// Percent-encodes everything but unreserved characters (RFC 3986).
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn output_of(command: &mut Command) -> Result<String> {
    let output = crate::netns::run_checked(command, "the cluster")?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A pod as the API server lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListedPod {
    /// Its name.
    pub name: String,
    /// The node it runs on.
    pub node: String,
    /// Its address (empty until it has one).
    pub ip: String,
}

impl Cluster {
    /// The pods of `namespace` matching `selector`, without those being deleted.
    pub fn pods(&self, namespace: &str, selector: &str) -> Result<Vec<ListedPod>> {
        let list = self.kubectl_json(&["get", "pods", "-n", namespace, "-l", selector])?;
        Ok(list["items"]
            .as_array()
            .ok_or_else(|| anyhow!("no items in the pod list"))?
            .iter()
            .filter(|pod| pod["metadata"]["deletionTimestamp"].is_null())
            .map(|pod| ListedPod {
                name: pod["metadata"]["name"].as_str().unwrap_or("").to_owned(),
                node: pod["spec"]["nodeName"].as_str().unwrap_or("").to_owned(),
                ip: pod["status"]["podIP"].as_str().unwrap_or("").to_owned(),
            })
            .collect())
    }

    /// How many pods on `node` have an address from the node's pod network (every pod not on
    /// the host network that got one), by the API server's list.
    pub fn pods_with_pod_address(&self, node: &str) -> Result<usize> {
        let all = self.kubectl_json(&["get", "pods", "--all-namespaces"])?;
        Ok(all["items"]
            .as_array()
            .ok_or_else(|| anyhow!("no items in the pod list"))?
            .iter()
            .filter(|p| {
                p["spec"]["nodeName"] == node
                    && p["spec"]["hostNetwork"] != true
                    && p["status"]["podIP"].is_string()
            })
            .count())
    }

    /// podnet's agent pod on `node`.
    pub fn agent_pod(&self, node: &str) -> Result<String> {
        let agents: Vec<ListedPod> = self
            .pods("kube-system", "app.kubernetes.io/name=podnet")?
            .into_iter()
            .filter(|p| p.node == node)
            .collect();
        match agents.as_slice() {
            [agent] => Ok(agent.name.clone()),
            _ => bail!("{} podnet agents on {node}: {agents:?}", agents.len()),
        }
    }

    /// `podnetctl --json ARGS` in the agent container on `node`, parsed.
    pub fn podnetctl(&self, node: &str, args: &[&str]) -> Result<Value> {
        let pod = self.agent_pod(node)?;
        let mut command = vec!["podnetctl", "--json"];
        command.extend(args);
        let out = self.exec("kube-system", &pod, Some("agent"), &command)?;
        serde_json::from_str(&out).context("podnetctl's JSON")
    }

    /// `kubectl rollout status` of `kind/name` in `namespace`, waiting up to `timeout`.
    pub fn rollout(&self, namespace: &str, object: &str, timeout: Duration) -> Result<()> {
        let timeout = format!("--timeout={}s", timeout.as_secs());
        self.kubectl(&["rollout", "status", object, "-n", namespace, &timeout])
            .map(drop)
    }
}

/// An SNAT rule on a node that gives the UDP DNS flows of `sources` to `destination` the
/// node's one port 40000, so that concurrent flows lose conntrack's insert race; removed
/// on drop.
pub struct SnatToOnePort<'a> {
    cluster: &'a Cluster,
    node: &'a ClusterNode,
    rule: Vec<String>,
}

impl<'a> SnatToOnePort<'a> {
    /// Inserts the rule and deletes the flows that could already hold the port.
    pub fn add(
        cluster: &'a Cluster,
        node: &'a ClusterNode,
        sources: &[&str],
        destination: &str,
    ) -> Result<Self> {
        let rule = [
            "POSTROUTING",
            "-s",
            &sources.join(","),
            "-d",
            destination,
            "-p",
            "udp",
            "--dport",
            "53",
            "-j",
            "SNAT",
            "--to-source",
            &format!("{}:40000-40000", node.address),
        ]
        .map(str::to_owned)
        .to_vec();
        let guard = Self {
            cluster,
            node,
            rule,
        };
        guard.iptables("-I").context("adding the SNAT rule")?;
        // No earlier flow may hold the port (conntrack exits 1 when it deletes nothing).
        let _ = cluster.on_node(
            node,
            &[
                "conntrack",
                "-D",
                "-p",
                "udp",
                "-d",
                destination,
                "--dport",
                "53",
            ],
        );
        Ok(guard)
    }

    fn iptables(&self, action: &str) -> Result<String> {
        let mut args = vec!["iptables", "-t", "nat", action];
        args.extend(self.rule.iter().map(String::as_str));
        self.cluster.on_node(self.node, &args)
    }
}

impl Drop for SnatToOnePort<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.iptables("-D") {
            eprintln!("removing the SNAT rule on {}: {e:#}", self.node.name);
        }
    }
}

/// Whether `ip` (dotted IPv4) lies in `cidr` (`a.b.c.d/len`).
pub fn ipv4_in(ip: &str, cidr: &str) -> bool {
    let parse = |s: &str| s.parse::<std::net::Ipv4Addr>().ok().map(u32::from);
    let Some((network, len)) = cidr.split_once('/') else {
        return false;
    };
    match (parse(ip), parse(network), len.parse::<u32>()) {
        (Some(ip), Some(network), Ok(len)) if len <= 32 => {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            ip & mask == network & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_membership() {
        assert!(ipv4_in("10.244.1.7", "10.244.1.0/24"));
        assert!(!ipv4_in("10.244.2.7", "10.244.1.0/24"));
        assert!(ipv4_in("1.2.3.4", "0.0.0.0/0"));
        assert!(!ipv4_in("fd00::1", "10.244.1.0/24"));
        assert!(!ipv4_in("10.244.1.7", "10.244.1.0"));
    }
}
