//! podnet-agent: the node agent (one per node, a privileged DaemonSet).
//!
//! Wires the subsystems together: the daemon (datapath and its state), the
//! metrics endpoint, the local API, and the endpoints file watcher. SIGTERM and
//! SIGINT stop user space and leave the datapath in place.

use std::{
    io::IsTerminal as _,
    sync::{atomic::AtomicBool, Arc},
};

use anyhow::Context as _;
use clap::Parser as _;
use podnet::{
    config::{AgentArgs, AgentConfig, LogFormat},
    daemon::Daemon,
};
use tokio::signal::unix::{signal, SignalKind};

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PODNET_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let config = AgentConfig::resolve(AgentArgs::parse())?;
    init_tracing(config.log_format);
    let daemon = Daemon::start(config.clone()).context("starting podnet-agent")?;
    let ready = Arc::new(AtomicBool::new(true));
    let _ = ready;
    if let Some(path) = config.endpoints.clone() {
        tokio::spawn(podnet::endpoint::file::watch(
            path,
            daemon.registry().clone(),
        ));
    }
    tracing::info!(metrics = %config.metrics_addr, socket = %config.socket.display(), "podnet-agent ready");
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping, datapath stays in place"),
        _ = int.recv() => tracing::info!("SIGINT: stopping, datapath stays in place"),
    }
    daemon.stop();
    Ok(())
}
