//! podnet-agent: the node agent (one per node, a privileged DaemonSet).
//!
//! Wires the subsystems together: the daemon (datapath and its state), the
//! metrics endpoint, the local API, and the endpoints file watcher. SIGTERM and
//! SIGINT stop user space and leave the datapath in place.

use std::{io::IsTerminal as _, sync::Arc};

use anyhow::Context as _;
use clap::Parser as _;
use podnet::{
    api::server::ApiServer,
    config::{defaults, AgentArgs, AgentConfig, LogFormat},
    daemon::{
        handler::{ApiHandler, MetricsRenderer},
        Daemon,
    },
    heartbeat,
    metrics::{
        continuity::Continuous,
        server::{MetricsServer, Readiness},
    },
};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::watch,
};

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

/// Resolves when `rx` turns true (or its sender is gone).
async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// A panic anywhere ends the process: a worker thread that died quietly
/// would leave the node half-served behind a healthy-looking agent. The
/// pinned datapath keeps working while the pod restarts.
fn abort_on_panic() {
    let print = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        print(info);
        let thread = std::thread::current();
        tracing::error!(
            thread = thread.name().unwrap_or("unnamed"),
            "{info}; aborting (the datapath stays pinned)"
        );
        std::process::abort();
    }));
}

/// Tests' fault hook ([`heartbeat::FAULTS_ENV`]): each SIGUSR1 applies the
/// next fault of the list. Without the variable, nothing is installed.
fn arm_fault_hook() -> anyhow::Result<()> {
    let Ok(list) = std::env::var(heartbeat::FAULTS_ENV) else {
        return Ok(());
    };
    let faults = heartbeat::parse_faults(&list).map_err(anyhow::Error::msg)?;
    let mut usr1 = signal(SignalKind::user_defined1()).context("SIGUSR1 handler")?;
    tracing::warn!(faults = %list, "fault hook armed: SIGUSR1 ends or panics a thread");
    tokio::spawn(async move {
        for (thread, fault) in faults {
            if usr1.recv().await.is_none() {
                return;
            }
            let found = heartbeat::registry().inject(&thread, fault);
            tracing::warn!(%thread, ?fault, found, "fault hook");
        }
    });
    Ok(())
}

fn main() -> anyhow::Result<()> {
    abort_on_panic();
    // Before the runtime's threads exist: each would otherwise get an arena.
    podnet::memory::limit_arenas();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let config = AgentConfig::resolve(AgentArgs::parse())?;
    init_tracing(config.log_format);
    if config.cleanup {
        return cleanup(&config);
    }
    arm_fault_hook()?;
    let readiness = Readiness::watching(heartbeat::registry().clone());
    // Bind the endpoints first: a busy port or socket fails fast, and
    // /healthz answers while the datapath loads.
    let source = Arc::new(LateSource::new(readiness.clone()));
    let http = MetricsServer::bind(config.metrics_addr, source.clone(), readiness.clone()).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let http = tokio::spawn(http.run(stopped(stop_rx.clone())));

    let config = learn_pod_cidrs(config, &readiness).await?;
    let daemon = tokio::task::spawn_blocking({
        let config = config.clone();
        move || Daemon::start(config)
    })
    .await
    .context("datapath start panicked")?
    .context("starting podnet-agent")?;
    // Counters the new agent restarted from zero continue from what the previous one
    // exposed; decided at this first render, before they grow again.
    let metrics = Arc::new(Continuous::new(
        MetricsRenderer::new(daemon.clone(), readiness.clone()),
        &config.state_dir,
    ));
    let _ = podnet::metrics::MetricsSource::render(metrics.as_ref());
    source.set(metrics.clone());
    tokio::spawn(save_metrics_periodically(metrics.clone()));
    // Start-up's BTF parsing is over: hand its freed memory back, and keep
    // doing so after bursts of work (endpoint churn, large scrapes).
    tokio::spawn(release_free_heap_periodically());
    let api = ApiServer::bind(&config.socket, Arc::new(ApiHandler(daemon.clone())))?
        .with_events(daemon.events().clone());
    let api = tokio::spawn(api.run(stopped(stop_rx.clone())));
    if let Some(path) = config.endpoints.clone() {
        tokio::spawn(podnet::endpoint::file::watch(
            path,
            daemon.registry().clone(),
        ));
    }
    readiness.set_ready();
    tracing::info!(metrics = %config.metrics_addr, socket = %config.socket.display(), "podnet-agent ready");
    let pins = tokio::spawn(watch_pin_dir(config.bpffs.clone(), readiness.clone()));

    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping; the datapath stays in place"),
        _ = int.recv() => tracing::info!("SIGINT: stopping; the datapath stays in place"),
    }
    pins.abort();
    readiness.set_not_ready("shutting down");
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(defaults::SHUTDOWN_GRACE, async {
        let _ = http.await;
        let _ = api.await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!("servers did not drain in time");
    }
    // Last, once no request is served and no scrape answered any more: what the next agent
    // continues from is exactly what was last exposed.
    let saved = tokio::task::spawn_blocking({
        let metrics = metrics.clone();
        move || metrics.save()
    })
    .await?;
    if let Err(e) = saved {
        tracing::warn!(error = %e, "saving the counters for the next agent");
    }
    tokio::task::spawn_blocking(move || daemon.stop()).await?;
    Ok(())
}

/// In node-cidr mode without `--node-cidr`, reads the pod CIDRs of this Node from the API
/// server (retrying until it has them; `/readyz` says what it waits for meanwhile).
async fn learn_pod_cidrs(
    mut config: AgentConfig,
    readiness: &Readiness,
) -> anyhow::Result<AgentConfig> {
    let Some(node) = config
        .ipam
        .node_to_ask_for_pod_cidrs()
        .map(ToOwned::to_owned)
    else {
        if config.ipam.mode == podnet::ipam::IpamMode::NodeCidr && config.ipam.node_cidrs.is_empty()
        {
            tracing::warn!(
                "node-cidr mode without --node-cidr or --node-name: no pod addresses to give"
            );
        }
        return Ok(config);
    };
    let client = podnet::kube::InCluster::from_environment()
        .with_context(|| format!("reading the pod CIDRs of Node {node}"))?;
    let readiness = readiness.clone();
    let cidrs = tokio::task::spawn_blocking({
        let node = node.clone();
        move || {
            podnet::kube::wait_for_pod_cidrs(&client, &node, |reason| {
                tracing::warn!(node = %node, "waiting for the node's pod CIDRs: {reason}");
                readiness.set_not_ready(format!(
                    "waiting for the pod CIDRs of Node {node}: {reason}"
                ));
            })
        }
    })
    .await
    .context("reading the node's pod CIDRs panicked")?;
    tracing::info!(node = %node, cidrs = ?cidrs.iter().map(ToString::to_string).collect::<Vec<_>>(), "pod CIDRs from the Node object");
    config.ipam.node_cidrs = cidrs;
    Ok(config)
}

/// Watches the pin directory: when bpffs goes away under the agent, says so
/// (error log, `/readyz` 503 naming the cause); when it is back, ready again.
async fn watch_pin_dir(dir: std::path::PathBuf, readiness: Readiness) {
    let mut tick = tokio::time::interval(defaults::PIN_DIR_CHECK_INTERVAL);
    let mut problem: Option<String> = None;
    loop {
        tick.tick().await;
        let now = podnet::bpf::fs::pin_dir_problem(&dir);
        match (&problem, &now) {
            (None, Some(reason)) => {
                tracing::error!(path = %dir.display(), "{reason}");
                readiness.set_not_ready(reason.clone());
            }
            (Some(_), None) => {
                tracing::warn!(path = %dir.display(), "pin directory is on a bpf filesystem again; pins come back with an agent restart");
                readiness.set_ready();
            }
            _ => {}
        }
        problem = now;
    }
}

/// Saves the exposed counters for the next agent every
/// [`defaults::METRICS_SAVE_INTERVAL`] (a crash loses only what came after the last save).
async fn save_metrics_periodically(metrics: Arc<Continuous<MetricsRenderer>>) {
    let mut tick = tokio::time::interval(defaults::METRICS_SAVE_INTERVAL);
    loop {
        tick.tick().await;
        let metrics = metrics.clone();
        match tokio::task::spawn_blocking(move || metrics.save()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "saving the counters for the next agent"),
            Err(e) => tracing::warn!(error = %e, "saving the counters panicked"),
        }
    }
}

/// Returns freed heap to the kernel now and every
/// [`defaults::HEAP_TRIM_INTERVAL`].
async fn release_free_heap_periodically() {
    let mut tick = tokio::time::interval(defaults::HEAP_TRIM_INTERVAL);
    loop {
        tick.tick().await;
        let _ = tokio::task::spawn_blocking(podnet::memory::release_free_heap).await;
    }
}

/// `--cleanup`: removes what podnet installed, prints each removal, and
/// fails if any step failed (the other steps still ran).
fn cleanup(config: &AgentConfig) -> anyhow::Result<()> {
    // On a plain OS thread: netlink runs its own runtime, which cannot start
    // inside this one.
    let cleanup_config = config.into();
    let report = std::thread::spawn(move || podnet::daemon::cleanup::run(&cleanup_config))
        .join()
        .map_err(|_| anyhow::anyhow!("cleanup panicked"))?;
    if report.removed.is_empty() {
        println!("nothing to remove");
    }
    for line in &report.removed {
        println!("removed {line}");
    }
    for e in &report.errors {
        eprintln!("error: {e}");
    }
    if report.errors.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("cleanup incomplete: {} step(s) failed", report.errors.len())
    }
}

/// A metrics source set once the datapath is up; before, only `podnet_ready`
/// (0), so a start that hangs (waiting for the node's pod CIDRs) shows.
struct LateSource {
    source: std::sync::OnceLock<Arc<dyn podnet::metrics::MetricsSource>>,
    readiness: Readiness,
}

impl LateSource {
    fn new(readiness: Readiness) -> Self {
        Self {
            source: std::sync::OnceLock::new(),
            readiness,
        }
    }

    fn set(&self, source: Arc<dyn podnet::metrics::MetricsSource>) {
        let _ = self.source.set(source);
    }
}

impl podnet::metrics::MetricsSource for LateSource {
    fn render(&self) -> String {
        if let Some(source) = self.source.get() {
            return source.render();
        }
        let mut enc = podnet::metrics::text::Encoder::new();
        podnet::metrics::server::render_ready(&mut enc, &self.readiness);
        enc.finish()
    }
}
