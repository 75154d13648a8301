//! The running agent: owns the subsystems and answers for them.
//!
//! [`Daemon::start`] brings the datapath up (endpoint registry, conntrack
//! tracer, event thread); the binary then serves [`Daemon`] through the
//! metrics endpoint and the local API. Stopping the daemon stops user space
//! only: pinned programs and maps stay in the kernel and keep counting.

use std::{
    path::PathBuf,
    sync::{atomic::Ordering, Arc, Mutex, PoisonError},
    thread::JoinHandle,
    time::Instant,
};

pub mod cleanup;
pub mod handler;

use serde::Serialize;

use crate::{
    bpf::{self, link::Attachment, tc::TcMode, BpfError},
    config::{defaults, AgentConfig},
    conntrack::{
        ctnetlink::NetlinkConntrack,
        events::Enricher,
        log::RaceLog,
        stats,
        tracer::{self, EventThreadHandle, Tracer, TracerConfig},
        TracerCounters,
    },
    endpoint::{self, Registry, Source},
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
    /// The agent's own network namespace could not be identified.
    #[error("reading the agent's network namespace: {0}")]
    Netns(std::io::Error),
    /// The event thread could not be started.
    #[error("starting the race event thread: {0}")]
    Thread(std::io::Error),
    /// IPAM or the CNI endpoint state could not be opened.
    #[error(transparent)]
    Ipam(#[from] crate::ipam::IpamError),
    /// The DNS subsystem could not be started.
    #[error(transparent)]
    Dns(#[from] crate::dns::DnsError),
    /// The routing subsystem could not be started.
    #[error(transparent)]
    Routing(#[from] crate::routing::RoutingError),
}

/// The running agent.
pub struct Daemon {
    config: AgentConfig,
    registry: Registry,
    tracer: Mutex<Tracer>,
    races: RaceLog,
    events: EventThreadHandle,
    event_thread: Mutex<Option<JoinHandle<()>>>,
    netns_inode: u32,
    started: Instant,
    tc_mode: TcMode,
    cni: crate::ipam::service::IpamService,
    dns: crate::dns::Dns,
    routing: crate::routing::Routing,
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
    pub tracer_attachment: Attachment,
    /// Kernel program id of the tracer loaded by this agent.
    pub tracer_program_id: u32,
    /// Pin directory of the tracer.
    pub tracer_pins: PathBuf,
    /// Inode of the observed network namespace.
    pub netns_inode: u32,
    /// Endpoints known.
    pub endpoints: usize,
    /// The tracer's kernel counters.
    pub counters: TracerCounters,
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
    /// Loads endpoints, puts the tracer in place and starts the event thread.
    pub fn start(config: AgentConfig) -> Result<Arc<Self>, DaemonError> {
        let registry = Registry::new();
        if let Some(path) = &config.endpoints {
            let endpoints = endpoint::file::load(path)?;
            tracing::info!(path = %path.display(), count = endpoints.len(), "endpoints loaded");
            registry.replace_source(Source::File, endpoints);
        }
        // Before anything is loaded: a bad checkpoint or a second agent stops the start.
        let cni = crate::ipam::service::IpamService::open(
            &config.state_dir,
            &crate::ipam::service::IpamConfig {
                mode: config.ipam_mode,
                node_cidrs: config.node_cidrs.clone(),
                eni: config.eni.clone(),
                ..Default::default()
            },
            registry.clone(),
        )?;
        let netns_inode = bpf::current_netns_inode().map_err(DaemonError::Netns)?;
        let mut tracer = Tracer::start(&TracerConfig {
            bpffs: config.bpffs.clone(),
            netns_inode,
            event_budget_per_cpu: config.race_event_budget,
            race_hook: config.race_hook,
        })?;
        let races = RaceLog::with_capacity(defaults::RACE_LOG_CAPACITY);
        let events = EventThreadHandle::default();
        let event_thread = match tracer.take_events() {
            Some(ring) => Some(spawn_event_thread(ring, &registry, &races, &events)?),
            None => None,
        };
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
        let routing = crate::routing::Routing::start(
            crate::routing::RoutingConfig {
                enis_file: config.enis.clone(),
                vpc_cidrs: config.vpc_cidrs.clone(),
                service_cidrs: config.service_cidrs.clone(),
                snat: config.snat,
                fast_path: config.fast_path,
                bpffs: config.bpffs.clone(),
                dns_ports: config.dns_ports.clone(),
                tc_mode,
            },
            registry.clone(),
        )?;
        cni.publish_enis_to(routing.enis().clone());
        let dns = crate::dns::Dns::start(
            crate::dns::DnsSettings {
                bpffs: config.bpffs.clone(),
                timeout: config.dns_timeout,
                ports: config.dns_ports.clone(),
                slow_threshold: config.dns_slow_threshold,
                uplinks: config.uplinks.clone(),
                tc_mode,
            },
            registry.clone(),
        )?;
        Ok(Arc::new(Self {
            cni,
            dns,
            routing,
            config,
            registry,
            tracer: Mutex::new(tracer),
            races,
            events,
            event_thread: Mutex::new(event_thread),
            netns_inode,
            started: Instant::now(),
            tc_mode,
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

    /// Recent races.
    pub fn races(&self) -> &RaceLog {
        &self.races
    }

    /// Reads the tracer's kernel maps.
    pub fn snapshot(&self) -> Result<crate::conntrack::TracerSnapshot, BpfError> {
        self.tracer().snapshot()
    }

    fn tracer(&self) -> std::sync::MutexGuard<'_, Tracer> {
        self.tracer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The hook that counts insert races, by name.
    pub fn status_race_hook(&self) -> &'static str {
        tracer::hook_name(self.tracer().hook())
    }

    /// How the DNS and fast-path programs attach.
    pub fn tc_mode(&self) -> TcMode {
        self.tc_mode
    }

    /// The agent's status.
    pub fn status(&self) -> Status {
        let tracer = self.tracer();
        let counters = tracer.snapshot().map(|s| s.counters).unwrap_or_default();
        let dns = self.dns.status();
        let events_lost = [
            (crate::conntrack::metrics::PROGRAM, counters.events_lost),
            (crate::dns::metrics::PROGRAM, dns.counters.events_lost),
        ]
        .into_iter()
        .collect();
        let (allocated, free, cooldown) = self.cni.address_counts();
        Status {
            version: env!("CARGO_PKG_VERSION"),
            kernel: kernel_release(),
            race_hook: tracer::hook_name(tracer.hook()),
            tc_attach: self.tc_mode,
            tracer_attachment: tracer.attachment(),
            tracer_program_id: tracer.program_id(),
            tracer_pins: tracer.pin_dir().to_owned(),
            netns_inode: self.netns_inode,
            endpoints: self.registry.endpoints().len(),
            counters,
            events_received: self.events.stats.received.load(Ordering::Relaxed),
            events_decode_errors: self.events.stats.decode_errors.load(Ordering::Relaxed),
            uptime_seconds: self.started.elapsed().as_secs(),
            dns,
            bpffs: self.config.bpffs.clone(),
            kernel_objects: crate::bpf::inventory::read(&self.config.bpffs),
            events_lost,
            ipam: IpamSummary {
                mode: match self.config.ipam_mode {
                    crate::ipam::IpamMode::NodeCidr => "node-cidr",
                    crate::ipam::IpamMode::Eni => "eni",
                },
                allocated,
                free,
                cooldown,
            },
            route_reconcile: self.routing.last_reconcile(),
        }
    }

    /// The kernel's conntrack statistics and table fill for this namespace.
    pub fn kernel_stats(&self) -> (Option<stats::ConntrackStats>, Option<stats::TableFill>) {
        let s = stats::read()
            .map_err(|e| tracing::warn!(error = %e, "conntrack statistics unavailable"))
            .ok();
        let f = stats::read_table_fill()
            .map_err(|e| tracing::debug!(error = %e, "conntrack table fill unavailable"))
            .ok();
        (s, f)
    }

    /// The DNS subsystem.
    pub fn dns(&self) -> &crate::dns::Dns {
        &self.dns
    }

    /// Native pod routing (policy routing, SNAT, fast path).
    pub fn routing(&self) -> &crate::routing::Routing {
        &self.routing
    }

    /// The CNI endpoint and IPAM service.
    pub fn cni(&self) -> &crate::ipam::service::IpamService {
        &self.cni
    }

    /// Stops user-space work. Pinned programs and maps stay in place.
    pub fn stop(&self) {
        self.cni.stop();
        self.dns.stop();
        self.routing.stop();
        self.events.stop.store(true, Ordering::Relaxed);
        let handle = self
            .event_thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(handle) = handle {
            if handle.join().is_err() {
                tracing::error!("race event thread panicked");
            }
        }
    }
}

fn spawn_event_thread(
    ring: aya::maps::RingBuf<aya::maps::MapData>,
    registry: &Registry,
    races: &RaceLog,
    events: &EventThreadHandle,
) -> Result<JoinHandle<()>, DaemonError> {
    let (registry, races, events) = (registry.clone(), races.clone(), events.clone());
    std::thread::Builder::new()
        .name("podnet-races".into())
        .spawn(move || {
            // The thread inherits the agent's network namespace, so ctnetlink
            // sees the same conntrack table the tracer filters on.
            let table = match NetlinkConntrack::open() {
                Ok(table) => table,
                Err(e) => {
                    tracing::error!(error = %e, "ctnetlink unavailable; races are counted but winners are not looked up");
                    return;
                }
            };
            let enricher = Enricher::new(registry, table);
            tracer::run_event_loop(ring, enricher, &races, &events.stats, &events.stop);
        })
        .map_err(DaemonError::Thread)
}

/// `uname -r`.
pub fn kernel_release() -> String {
    // SAFETY: utsname is plain data; uname fills it.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uts is a valid, writable utsname.
    if unsafe { libc::uname(&raw mut uts) } != 0 {
        return "unknown".into();
    }
    // SAFETY: uname NUL-terminates release within the array.
    let release = unsafe { std::ffi::CStr::from_ptr(uts.release.as_ptr()) };
    release.to_string_lossy().into_owned()
}
