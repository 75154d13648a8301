//! `cargo xtask demo`: podnet's main job on a simulated node.
//!
//! Builds everything, then runs `podnet-demo` (tests/src/bin/podnet-demo): a
//! node made of network namespaces with the real agent, pods created through
//! the CNI chain (podnet's addresses and routing), insert races through SNAT
//! to a few ports named with their winners, DNS latency per pod with its
//! failed queries, and podnet's figures against the kernel's counters and the
//! clients' own.

use anyhow::{bail, Result};
use clap::Args;

use crate::{cluster, cmd, setup};

/// Options of `cargo xtask demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How long to drive the race traffic, in seconds (1 to 600).
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    /// Run on the real cluster of `cargo xtask cluster up` (brought up first when it is
    /// not running, and left running).
    #[arg(long)]
    pub cluster: bool,
}

/// Runs the demo.
pub fn run(args: &DemoArgs) -> Result<()> {
    setup::ensure()?;
    cmd::run(cmd::cargo().args(["build", "--workspace", "--exclude", "podnet-ebpf", "--bins"]))?;
    let demo = cmd::workspace_root().join("target/debug/podnet-demo");
    let mut command = std::process::Command::new(&demo);
    command.args(["--seconds", &args.seconds.to_string()]);
    if args.cluster {
        if !cluster::is_up() {
            println!("the cluster is not running: cargo xtask cluster up");
            cluster::run_up()?;
        }
        command.arg("--cluster").arg(cluster::write_status()?);
    }
    let mut child = command.spawn()?;
    // Ctrl-C reaches the whole foreground group: the demo catches it, stops
    // its traffic and tears down; this process only waits for it.
    // SAFETY: setting SIGINT to SIG_IGN has no preconditions.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
    let status = child.wait()?;
    if !status.success() {
        bail!("podnet-demo failed ({status})");
    }
    Ok(())
}
