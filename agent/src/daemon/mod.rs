//! The running agent: owns the subsystems and answers for them.
//!
//! [`Daemon::start`] fills the endpoint registry and starts each subsystem
//! (ipam, conntrack, routing, dns, pods) with its own settings; the binary then
//! serves [`Daemon`] through the metrics endpoint and the local API, which
//! loop over [`Daemon::subsystems`]. Stopping the daemon stops user space
//! only: pinned programs and maps stay in the kernel and keep counting.

use std::{path::PathBuf, sync::Arc, time::Instant};

pub mod cleanup;
pub mod handler;

use serde::Serialize;

use crate::{
    api::follow::{EventHub, HubStatus},
    bpf::{self, tc::TcMode, BpfError},
    config::AgentConfig,
    conntrack::{Conntrack, ConntrackError},
    dns::Dns,
    endpoint::{self, Registry, Source},
    flowdrops::FlowDrops,
    ipam::service::IpamService,
    pods::Pods,
    routing::Routing,
    subsystem::Subsystem,
};

/// Errors starting the daemon.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The endpoints file is unusable.
    #[error(transparent)]
    Endpoints(#[from] endpoint::file::EndpointsFileError),
    /// The kernel side could not be set up.
    #[error(transparent)]
    Bpf(#[from] BpfError),
    /// Conntrack could not be started.
    #[error(transparent)]
    Conntrack(#[from] ConntrackError),
    /// IPAM or the CNI endpoint state could not be opened.
    #[error(transparent)]
    Ipam(#[from] crate::ipam::IpamError),
    /// The DNS subsystem could not be started.
    #[error(transparent)]
    Dns(#[from] crate::dns::DnsError),
    /// The routing subsystem could not be started.
    #[error(transparent)]
    Routing(#[from] crate::routing::RoutingError),
    /// The pod metadata thread could not be started.
    #[error(transparent)]
    Pods(#[from] crate::pods::PodsError),
}

/// The running agent: the subsystems, started in order, and what they share.
pub struct Daemon {
    config: AgentConfig,
    registry: Registry,
    started: Instant,
    tc_mode: TcMode,
    ipam: Arc<IpamService>,
    routing: Arc<Routing>,
    dns: Arc<Dns>,
    conntrack: Arc<Conntrack>,
    hub: EventHub,
    /// The same four and pod metadata, in the order their metric families are written.
    subsystems: Vec<Arc<dyn Subsystem>>,
}

/// What `podnetctl status` shows.
#[derive(Debug, Serialize)]
pub struct Status {
    /// podnet version.
    pub version: &'static str,
    /// Kernel release.
    pub kernel: String,
    /// Which hook catches insert races.
    pub race_hook: &'static str,
    /// How the DNS and fast-path programs attach: `tcx` or `tc` (classic).
    pub tc_attach: TcMode,
    /// How the tracer was put in place on this start.
    pub tracer_attachment: crate::bpf::link::Attachment,
    /// Kernel program id of the tracer loaded by this agent.
    pub tracer_program_id: u32,
    /// Pin directory of the tracer.
    pub tracer_pins: PathBuf,
    /// Inode of the observed network namespace.
    pub netns_inode: u32,
    /// Endpoints known.
    pub endpoints: usize,
    /// The tracer's kernel counters.
    pub counters: crate::conntrack::TracerCounters,
    /// Race events received by user space since start.
    pub events_received: u64,
    /// Race events that could not be decoded.
    pub events_decode_errors: u64,
    /// Seconds since the agent started.
    pub uptime_seconds: u64,
    /// DNS programs: links, program ids, counters.
    pub dns: crate::dns::DnsStatus,
    /// `--bpffs`.
    pub bpffs: PathBuf,
    /// podnet's programs (behind its pinned links) and hash maps.
    pub kernel_objects: crate::bpf::inventory::Inventory,
    /// Events lost per program (ring buffer full).
    pub events_lost: std::collections::BTreeMap<&'static str, u64>,
    /// IPAM summary.
    pub ipam: IpamSummary,
    /// The last routing reconcile.
    pub route_reconcile: crate::routing::LastReconcile,
    /// Followers of `follow` and what each was sent and lost.
    pub follow: HubStatus,
}

/// Pod addresses of this node, for `podnetctl status`.
#[derive(Debug, Default, Serialize)]
pub struct IpamSummary {
    /// `node-cidr` or `eni`.
    pub mode: &'static str,
    /// Addresses given to pods.
    pub allocated: u64,
    /// Addresses ready to give.
    pub free: u64,
    /// Released addresses not given again yet.
    pub cooldown: u64,
}

impl Daemon {
    /// Loads endpoints, then starts IPAM (a bad checkpoint or a second agent
    /// stops the start before anything is loaded), conntrack, routing and DNS.
    pub fn start(config: AgentConfig) -> Result<Arc<Self>, DaemonError> {
        let registry = Registry::new();
        if let Some(path) = &config.endpoints {
            let endpoints = endpoint::file::load(path)?;
            tracing::info!(path = %path.display(), count = endpoints.len(), "endpoints loaded");
            registry.replace_source(Source::File, endpoints);
        }
        let ipam = Arc::new(IpamService::open(
            &config.state_dir,
            &config.ipam,
            registry.clone(),
        )?);
        let hub = EventHub::default();
        let flow_drops = FlowDrops::new();
        let conntrack = Arc::new(Conntrack::start(
            &config.conntrack,
            registry.clone(),
            &hub,
            &flow_drops,
        )?);
        let tc_mode = bpf::tc::resolve(config.tc_attach)?;
        tracing::info!(
            mode = %tc_mode,
            tcx_supported = bpf::tc::tcx_supported(),
            "TC programs attach as {}",
            match tc_mode {
                TcMode::Tcx => "tcx links",
                TcMode::Tc => "classic tc filters (clsact qdisc, direct-action bpf filter)",
            }
        );
        let routing = Arc::new(Routing::start(
            config.routing.clone(),
            tc_mode,
            registry.clone(),
        )?);
        ipam.publish_enis_to(routing.enis().clone());
        let dns = Arc::new(Dns::start(
            config.dns.clone(),
            tc_mode,
            registry.clone(),
            &hub,
            flow_drops,
        )?);
        let pods = Arc::new(Pods::start(config.pods.clone(), registry.clone())?);
        let subsystems: Vec<Arc<dyn Subsystem>> = vec![
            ipam.clone(),
            routing.clone(),
            dns.clone(),
            conntrack.clone(),
            pods,
        ];
        Ok(Arc::new(Self {
            config,
            registry,
            started: Instant::now(),
            tc_mode,
            ipam,
            routing,
            dns,
            conntrack,
            hub,
            subsystems,
        }))
    }

    /// The effective configuration.
    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    /// The endpoint registry.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The running subsystems, in the order their metric families are written.
    pub fn subsystems(&self) -> &[Arc<dyn Subsystem>] {
        &self.subsystems
    }

    /// Conntrack insert races.
    pub fn conntrack(&self) -> &Conntrack {
        &self.conntrack
    }

    /// The broadcast of races, DNS failures and drops that `follow` streams.
    pub fn events(&self) -> &EventHub {
        &self.hub
    }

    /// How the DNS and fast-path programs attach.
    pub fn tc_mode(&self) -> TcMode {
        self.tc_mode
    }

    /// The agent's status, each subsystem's part in its place.
    pub fn status(&self) -> Status {
        let conntrack = self.conntrack.status();
        let dns = self.dns.status();
        let events_lost = [
            (
                crate::conntrack::metrics::PROGRAM,
                conntrack.counters.events_lost,
            ),
            (crate::dns::metrics::PROGRAM, dns.counters.events_lost),
        ]
        .into_iter()
        .collect();
        let (allocated, free, cooldown) = self.ipam.address_counts();
        Status {
            version: env!("CARGO_PKG_VERSION"),
            kernel: crate::sys::kernel_release(),
            race_hook: conntrack.race_hook,
            tc_attach: self.tc_mode,
            tracer_attachment: conntrack.tracer_attachment,
            tracer_program_id: conntrack.tracer_program_id,
            tracer_pins: conntrack.tracer_pins,
            netns_inode: conntrack.netns_inode,
            endpoints: self.registry.endpoints().len(),
            counters: conntrack.counters,
            events_received: conntrack.events_received,
            events_decode_errors: conntrack.events_decode_errors,
            uptime_seconds: self.started.elapsed().as_secs(),
            dns,
            bpffs: self.config.bpffs.clone(),
            kernel_objects: crate::bpf::inventory::read(&self.config.bpffs, self.tc_mode),
            events_lost,
            ipam: IpamSummary {
                mode: match self.config.ipam.mode {
                    crate::ipam::IpamMode::NodeCidr => "node-cidr",
                    crate::ipam::IpamMode::Eni => "eni",
                },
                allocated,
                free,
                cooldown,
            },
            route_reconcile: self.routing.last_reconcile(),
            follow: self.hub.status(),
        }
    }

    /// Stops user-space work, subsystem by subsystem (none depends on
    /// another's threads). Pinned programs and maps stay in place.
    pub fn stop(&self) {
        for subsystem in &self.subsystems {
            tracing::debug!(subsystem = subsystem.name(), "stopping");
            subsystem.stop();
        }
    }
}
