//! What `up` recorded (daemons and their PIDs, mount points it made) and what `status` shows.

use std::{collections::BTreeMap, fs, path::PathBuf, process::Command};

use anyhow::{Context as _, Result};
use serde_json::{json, Value};

use super::{components, layout, system};
use crate::cmd;

/// The state file.
pub fn path() -> PathBuf {
    layout::cluster_path("state.json")
}

/// What `up` made that `down` must undo, beyond the fixed layout.
#[derive(Debug, Default)]
pub struct State {
    /// Daemon name -> PID.
    pub daemons: BTreeMap<String, u32>,
    /// Mount points `up` created on the machine.
    pub created_mount_points: Vec<String>,
}

impl State {
    /// Reads the state file; an empty state if there is none.
    pub fn load() -> Result<Self> {
        let Ok(text) = fs::read_to_string(path()) else {
            return Ok(Self::default());
        };
        let value: Value = serde_json::from_str(&text).context("reading the cluster state")?;
        let daemons = value
            .get("daemons")
            .and_then(Value::as_object)
            .map(|map| {
                map.iter()
                    .filter_map(|(name, pid)| {
                        Some((name.clone(), u32::try_from(pid.as_u64()?).ok()?))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let created_mount_points = value
            .get("created_mount_points")
            .and_then(Value::as_array)
            .map(|list| {
                list.iter()
                    .filter_map(|p| p.as_str().map(ToOwned::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Self {
            daemons,
            created_mount_points,
        })
    }

    /// Writes the state file.
    pub fn save(&self) -> Result<()> {
        let value = json!({
            "daemons": self.daemons,
            "created_mount_points": self.created_mount_points,
        });
        fs::write(path(), serde_json::to_vec_pretty(&value)?).context("writing the cluster state")
    }
}

/// `kubectl` of the cluster's Kubernetes release, with the admin kubeconfig.
pub fn kubectl() -> Command {
    let mut command = Command::new(components::KUBERNETES.bin("kubectl"));
    command.env("KUBECONFIG", layout::admin_kubeconfig());
    command
}

/// Each node's pod CIDRs as the API server has them.
pub fn pod_cidrs() -> Result<BTreeMap<String, Vec<String>>> {
    let text = cmd::stdout(kubectl().args(["get", "nodes", "-o", "json"]))?;
    let nodes: Value = serde_json::from_str(&text)?;
    Ok(nodes
        .get("items")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|node| {
            let name = node.pointer("/metadata/name")?.as_str()?.to_owned();
            let cidrs = node
                .pointer("/spec/podCIDRs")
                .and_then(Value::as_array)
                .map(|list| {
                    list.iter()
                        .filter_map(|c| c.as_str().map(ToOwned::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            Some((name, cidrs))
        })
        .collect())
}

/// The status document of `status --json`.
pub fn status() -> Result<Value> {
    let state = State::load()?;
    let daemons: BTreeMap<&str, Value> = state
        .daemons
        .iter()
        .map(|(name, pid)| {
            (
                name.as_str(),
                json!({"pid": pid, "running": system::alive(*pid)}),
            )
        })
        .collect();
    let cidrs = if layout::admin_kubeconfig().exists() {
        pod_cidrs().unwrap_or_default()
    } else {
        BTreeMap::new()
    };
    let nodes: Vec<Value> = layout::NODES
        .iter()
        .map(|node| {
            json!({
                "name": node.name,
                "netns": node.netns,
                "mount_ns": node.mount_ns(),
                "address": node.address.to_string(),
                "pod_cidrs": cidrs.get(node.name).cloned().unwrap_or_default(),
                "metrics_addr": node.metrics_addr(),
            })
        })
        .collect();
    let up = !state.daemons.is_empty() && state.daemons.values().all(|pid| system::alive(*pid));
    Ok(json!({
        "up": up,
        "kubeconfig": layout::admin_kubeconfig(),
        "kubectl": components::KUBERNETES.bin("kubectl"),
        "crictl": components::CRI_TOOLS.bin("crictl"),
        "api_server": layout::api_server_url(),
        "vpc_netns": layout::VPC_NETNS,
        "audit_log": layout::audit_log(),
        "podnet_overlay": layout::cluster_path("overlay"),
        "prometheus": format!("http://{}", super::monitoring::PROMETHEUS_ADDR),
        "nodes": nodes,
        "daemons": daemons,
    }))
}

/// Prints the status, as a table or as JSON.
pub fn print_status(as_json: bool) -> Result<()> {
    let status = status()?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    let up = status.get("up").and_then(Value::as_bool).unwrap_or(false);
    println!("cluster: {}", if up { "up" } else { "down" });
    println!(
        "{:<8} {:<12} {:<13} {:<16} METRICS",
        "NODE", "NETNS", "ADDRESS", "POD CIDR"
    );
    for node in status
        .get("nodes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let field = |key: &str| {
            node.get(key)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned()
        };
        let cidrs = node
            .get("pod_cidrs")
            .and_then(Value::as_array)
            .map(|l| {
                l.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default();
        println!(
            "{:<8} {:<12} {:<13} {:<16} {}",
            field("name"),
            field("netns"),
            field("address"),
            if cidrs.is_empty() {
                "-".to_owned()
            } else {
                cidrs
            },
            field("metrics_addr")
        );
    }
    for (name, daemon) in status
        .get("daemons")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        let running = daemon
            .get("running")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let pid = daemon.get("pid").and_then(Value::as_u64).unwrap_or(0);
        println!(
            "{name:<32} pid {pid:<8} {}",
            if running { "running" } else { "not running" }
        );
    }
    println!("KUBECONFIG={}", layout::admin_kubeconfig().display());
    Ok(())
}
