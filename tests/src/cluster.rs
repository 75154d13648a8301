//! The Kubernetes cluster of `cargo xtask cluster up`, as the end-to-end suite sees it: the
//! status file `up` writes (nodes, their namespaces and addresses, kubectl and kubeconfig),
//! kubectl, commands in a node's network namespace, and podnet's metrics on each node.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use serde_json::Value;

use crate::{agent::Metrics, netfilter::ConntrackStats};

/// The environment variable that points the suite at the status file of `cluster up`.
pub const STATUS_ENV: &str = "PODNET_CLUSTER_STATUS";

/// One node of the cluster.
#[derive(Clone, Debug)]
pub struct ClusterNode {
    /// Kubernetes node name.
    pub name: String,
    /// Its network namespace (`/run/netns/<netns>`).
    pub netns: String,
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
    /// The nodes.
    pub nodes: Vec<ClusterNode>,
}

impl Cluster {
    /// The cluster that [`STATUS_ENV`] names; `None` when it is not set.
    pub fn from_env() -> Result<Option<Self>> {
        let Some(path) = std::env::var_os(STATUS_ENV) else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", PathBuf::from(&path).display()))?;
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
        Ok(Some(Self {
            kubectl: string(&status, "kubectl")?.into(),
            kubeconfig: string(&status, "kubeconfig")?.into(),
            vpc_netns: string(&status, "vpc_netns")?,
            audit_log: string(&status, "audit_log")?.into(),
            nodes,
        }))
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
        let addr: SocketAddr = node.metrics_addr.parse()?;
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            stream,
            "GET /metrics HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let (head, body) = response
            .split_once("\r\n\r\n")
            .ok_or_else(|| anyhow!("no HTTP header from {addr}"))?;
        if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
            bail!("GET {addr}/metrics: {}", head.lines().next().unwrap_or(""));
        }
        Ok(Metrics(body.to_owned()))
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

fn output_of(command: &mut Command) -> Result<String> {
    let line = format!("{command:?}");
    let output = command
        .output()
        .with_context(|| format!("starting {line}"))?;
    if !output.status.success() {
        bail!(
            "{line} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim(),
            String::from_utf8_lossy(&output.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
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
