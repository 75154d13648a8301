//! `cargo xtask cluster up|down|status`: a two-node Kubernetes cluster on this machine, with
//! podnet installed from `deploy/` as a user installs it.
//!
//! The nodes are network and mount namespaces (see [`layout`]); the control plane runs in the
//! "VPC" namespace that routes each node's pod CIDR to it. Every program is a real upstream
//! release ([`components`]): etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
//! and per node containerd (with Debian's runc), kubelet and kube-proxy (iptables mode);
//! CoreDNS is the cluster DNS. podnet's image is put together here ([`image`]) and imported
//! into each node's containerd, then `kubectl apply -k` of an overlay that only sets the image
//! installs the shipped bundle.

pub mod components;
pub mod config;
pub mod image;
pub mod layout;
mod monitoring;
mod network;
pub mod pki;
pub mod state;
pub mod system;
mod up;

use anyhow::Result;
use clap::{Args, Subcommand};

/// Options of `cargo xtask cluster`.
#[derive(Debug, Args)]
pub struct ClusterArgs {
    #[command(subcommand)]
    action: Action,
}

#[derive(Debug, Subcommand)]
enum Action {
    /// Build what is missing, start the cluster and install podnet; prints
    /// `KUBECONFIG=<path>` last.
    Up(up::UpArgs),
    /// Stop every process of the cluster and remove everything it made.
    Down,
    /// Each node with its network namespace, pod CIDR and agent metrics address.
    Status {
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write the pod sandbox image (`localhost/podnet-pause:e2e`) as an OCI
    /// archive for `ctr images import`, for a containerd outside the cluster.
    PauseImage {
        /// The archive to write.
        archive: std::path::PathBuf,
    },
}

/// `cluster up` with its defaults (the debug build), for the test command.
pub fn run_up() -> Result<()> {
    up::run(&up::UpArgs::default())
}

/// Whether the cluster's daemons are all running (`status` says `up`).
pub fn is_up() -> bool {
    state::status().is_ok_and(|s| s["up"] == true)
}

/// Writes the status document (`status --json`) to the cluster's `status.json`, which the
/// end-to-end suite and the cluster demo read; returns its path.
pub fn write_status() -> Result<std::path::PathBuf> {
    let path = layout::cluster_path("status.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&state::status()?)?)?;
    Ok(path)
}

/// `cluster down`.
pub fn down() -> Result<()> {
    up::down()
}

/// Copies the cluster's logs to `target/cluster-logs/` before `down` removes them.
pub fn keep_logs() {
    let from = layout::cluster_path("logs");
    let to = crate::cmd::workspace_root().join("target/cluster-logs");
    let _ = std::fs::remove_dir_all(&to);
    if std::fs::create_dir_all(&to).is_ok() {
        if let Ok(entries) = std::fs::read_dir(&from) {
            for entry in entries.flatten() {
                let _ = std::fs::copy(entry.path(), to.join(entry.file_name()));
            }
        }
        println!("cluster logs kept in {}", to.display());
    }
}

/// Runs `cargo xtask cluster ...`.
pub fn run(args: &ClusterArgs) -> Result<()> {
    match &args.action {
        Action::Up(up) => up::run(up),
        Action::Down => up::down(),
        Action::Status { json } => state::print_status(*json),
        Action::PauseImage { archive } => up::write_pause_image(archive),
    }
}
