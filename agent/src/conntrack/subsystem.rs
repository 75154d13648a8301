//! The running conntrack subsystem: the tracer in the kernel, the thread that
//! turns its race events into named pods and winning flows, the recent-race
//! log, and what it exposes (`conntrack.races`, the conntrack families).

use std::{
    path::PathBuf,
    sync::{atomic::Ordering, Arc, Mutex, MutexGuard, PoisonError},
    thread::JoinHandle,
};

use serde::Serialize;
use serde_json::Value;

use super::{
    ctnetlink::NetlinkConntrack,
    events::Enricher,
    flows::{self, DnsFlows},
    metrics::{self as render, Sources, TopDestinations, PROGRAM},
    snat, stats,
    tracer::{self, EventThreadHandle, RaceHookChoice, Tracer, TracerConfig},
    RaceLog, TracerCounters, TracerSnapshot,
};
use crate::{
    api::{
        call::Call,
        follow::{EventHub, Followed as _},
        protocol::{method, ApiError},
    },
    bpf::{self, link::Attachment, BpfError},
    endpoint::Registry,
    flowdrops::FlowDrops,
    heartbeat,
    metrics::{shared::SharedFamilies, text::Encoder},
    options::{duration_arg, duration_key, options},
    subsystem::{to_json, Subsystem},
};

/// The API methods conntrack serves.
pub const METHODS: &[&str] = &[method::CONNTRACK_RACES];

options! {
    /// Conntrack's section of the configuration.
    pub struct ConntrackOptions {
        /// Race events per CPU per second sent to user space with full detail;
        /// counts stay exact above it [default: 20000; 0 = unlimited].
        #[arg(long, env = "PODNET_RACE_EVENT_BUDGET")]
        pub race_event_budget: Option<u32>,
        /// Hook that counts insert races: `tracepoint` (the drop tracepoint),
        /// `probe` (adds a kretprobe on `__nf_conntrack_confirm`, where the kernel
        /// has kprobes), or `auto`: the probe where kprobes exist, else the
        /// tracepoint [default: auto].
        #[arg(long, env = "PODNET_RACE_HOOK", value_enum)]
        pub race_hook: Option<RaceHookChoice>,
        /// Time between two scans of the conntrack table for SNAT port usage
        /// (`podnet_snat_port_usage_ratio`); 0s turns the scan off [default: 60s].
        #[arg(long, env = "PODNET_SNAT_SCAN_INTERVAL", value_parser = duration_arg)]
        #[serde(default, deserialize_with = "duration_key")]
        pub snat_scan_interval: Option<std::time::Duration>,
    }
}

/// `--race-event-budget`.
pub const RACE_EVENT_BUDGET_PER_CPU: u32 = 20_000;
/// Recent races kept for `podnetctl conntrack races`.
pub const RACE_LOG_CAPACITY: usize = 1024;

impl ConntrackOptions {
    /// The settings, defaults filled in; the tracer pins below `bpffs`.
    pub fn settings(self, bpffs: &std::path::Path) -> ConntrackSettings {
        ConntrackSettings {
            bpffs: bpffs.to_owned(),
            event_budget_per_cpu: self.race_event_budget.unwrap_or(RACE_EVENT_BUDGET_PER_CPU),
            race_hook: self.race_hook.unwrap_or_default(),
            flow_ports: Vec::new(),
            snat_scan_interval: self
                .snat_scan_interval
                .unwrap_or(snat::DEFAULT_SCAN_INTERVAL),
        }
    }
}

/// What conntrack needs from the agent's configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConntrackSettings {
    /// `--bpffs`.
    pub bpffs: PathBuf,
    /// `--race-event-budget`: race events per CPU per second (0: unlimited).
    pub event_budget_per_cpu: u32,
    /// `--race-hook`.
    pub race_hook: RaceHookChoice,
    /// Ports whose flows' drops are handed to DNS (`--dns-ports`; none when
    /// DNS is off).
    pub flow_ports: Vec<u16>,
    /// `--snat-scan-interval` (zero: no scan).
    pub snat_scan_interval: std::time::Duration,
}

/// Errors starting conntrack.
#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    /// The tracer could not be put in place.
    #[error(transparent)]
    Bpf(#[from] BpfError),
    /// The agent's own network namespace could not be identified.
    #[error("reading the agent's network namespace: {0}")]
    Netns(std::io::Error),
    /// The event thread could not be started.
    #[error("starting the race event thread: {0}")]
    Thread(std::io::Error),
}

/// What `podnetctl status` shows of conntrack.
#[derive(Clone, Debug, Serialize)]
pub struct ConntrackStatus {
    /// Which hook catches insert races.
    pub race_hook: &'static str,
    /// How the tracer was put in place on this start.
    pub tracer_attachment: Attachment,
    /// Kernel program id of the tracer loaded by this agent.
    pub tracer_program_id: u32,
    /// Pin directory of the tracer.
    pub tracer_pins: PathBuf,
    /// Inode of the observed network namespace.
    pub netns_inode: u32,
    /// The tracer's kernel counters.
    pub counters: TracerCounters,
    /// Race events received by user space since start.
    pub events_received: u64,
    /// Race events that could not be decoded.
    pub events_decode_errors: u64,
}

/// Conntrack insert races, running.
pub struct Conntrack {
    registry: Registry,
    tracer: Arc<Mutex<Tracer>>,
    races: RaceLog,
    events: EventThreadHandle,
    event_thread: Mutex<Option<JoinHandle<()>>>,
    drop_thread: Mutex<Option<JoinHandle<()>>>,
    flow_thread: Mutex<Option<JoinHandle<()>>>,
    snat: Arc<Mutex<snat::SnatScan>>,
    snat_thread: Mutex<Option<JoinHandle<()>>>,
    netns_inode: u32,
    top: Mutex<TopDestinations>,
}

impl Conntrack {
    /// Puts the tracer in place (or adopts its pins) for the agent's network
    /// namespace and starts the race event thread and the drop watcher, both
    /// publishing to `hub`, and the thread that records drops of DNS flows
    /// (races included) in `flow_drops`.
    pub fn start(
        settings: &ConntrackSettings,
        registry: Registry,
        hub: &EventHub,
        flow_drops: &FlowDrops,
    ) -> Result<Self, ConntrackError> {
        let netns_inode = bpf::current_netns_inode().map_err(ConntrackError::Netns)?;
        let mut tracer = Tracer::start(&TracerConfig {
            bpffs: settings.bpffs.clone(),
            netns_inode,
            event_budget_per_cpu: settings.event_budget_per_cpu,
            race_hook: settings.race_hook,
            flow_ports: settings.flow_ports.clone(),
        })?;
        let races = RaceLog::with_capacity(RACE_LOG_CAPACITY);
        let events = EventThreadHandle::default();
        list_endpoints(tracer.take_endpoints(), &registry);
        let dns = DnsFlows::new(flow_drops, &settings.flow_ports);
        let event_thread = match tracer.take_events() {
            Some(ring) => Some(spawn_event_thread(
                ring, &registry, &races, hub, &events, dns,
            )?),
            None => None,
        };
        let flow_thread = match tracer.take_flow_drops() {
            Some(ring) => Some(
                flows::spawn(
                    ring,
                    flow_drops.clone(),
                    settings.flow_ports.clone(),
                    tracer.reason_names(),
                    Arc::clone(&events.stop),
                )
                .map_err(ConntrackError::Thread)?,
            ),
            None => None,
        };
        let snat_scan = Arc::new(Mutex::new(snat::SnatScan::default()));
        let snat_thread = if settings.snat_scan_interval.is_zero() {
            None
        } else {
            Some(
                snat::spawn(
                    Arc::clone(&snat_scan),
                    settings.snat_scan_interval,
                    Arc::clone(&events.stop),
                )
                .map_err(ConntrackError::Thread)?,
            )
        };
        let tracer = Arc::new(Mutex::new(tracer));
        let drops = Arc::clone(&tracer);
        let drop_thread = super::drops::spawn(
            hub.clone(),
            registry.clone(),
            move || {
                let snapshot = drops
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .snapshot();
                snapshot
                    .map_err(|e| tracing::debug!(error = %e, "reading the drop counters"))
                    .ok()
                    .map(|s| s.drops)
            },
            Arc::clone(&events.stop),
        )
        .map_err(ConntrackError::Thread)?;
        Ok(Self {
            registry,
            tracer,
            races,
            events,
            event_thread: Mutex::new(event_thread),
            drop_thread: Mutex::new(Some(drop_thread)),
            flow_thread: Mutex::new(flow_thread),
            snat: snat_scan,
            snat_thread: Mutex::new(snat_thread),
            netns_inode,
            top: Mutex::new(TopDestinations::new()),
        })
    }

    fn tracer(&self) -> MutexGuard<'_, Tracer> {
        self.tracer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Recent races.
    pub fn races(&self) -> &RaceLog {
        &self.races
    }

    /// Reads the tracer's kernel maps; counts of pods that left are moved to
    /// the unknown source first.
    pub fn snapshot(&self) -> Result<TracerSnapshot, BpfError> {
        let live = self
            .registry
            .endpoints()
            .into_iter()
            .flat_map(|(_, e)| e.ips)
            .map(bpf::endpoints::addr_key)
            .collect();
        let mut tracer = self.tracer();
        if let Err(e) = tracer.fold_departed(&live) {
            tracing::warn!(error = %e, "moving the drop counts of departed pods");
        }
        tracer.snapshot()
    }

    /// The hook that counts insert races, by name.
    pub fn race_hook(&self) -> &'static str {
        tracer::hook_name(self.tracer().hook())
    }

    /// What `podnetctl status` shows of conntrack.
    pub fn status(&self) -> ConntrackStatus {
        let tracer = self.tracer();
        ConntrackStatus {
            race_hook: tracer::hook_name(tracer.hook()),
            tracer_attachment: tracer.attachment(),
            tracer_program_id: tracer.program_id(),
            tracer_pins: tracer.pin_dir().to_owned(),
            netns_inode: self.netns_inode,
            counters: tracer.snapshot().map(|s| s.counters).unwrap_or_default(),
            events_received: self.events.stats.received.load(Ordering::Relaxed),
            events_decode_errors: self.events.stats.decode_errors.load(Ordering::Relaxed),
        }
    }
}

impl Subsystem for Conntrack {
    fn name(&self) -> &'static str {
        "conntrack"
    }

    fn methods(&self) -> &'static [&'static str] {
        METHODS
    }

    fn handle(&self, m: &str, params: Value) -> Result<Value, ApiError> {
        match Call::decode(m, params)? {
            Call::ConntrackRaces(params) => to_json(
                &self
                    .races
                    .recent_matching(params.limit, |r| r.matches(&params.filter)),
            ),
            other => Err(ApiError::unknown_method(other.method())),
        }
    }

    fn render_metrics(&self, enc: &mut Encoder, shared: &mut SharedFamilies) {
        let snapshot = match self.snapshot() {
            Ok(snapshot) => snapshot,
            Err(e) => {
                tracing::warn!(error = %e, "reading the tracer's maps failed; conntrack metrics omitted");
                return;
            }
        };
        let stats = stats::read()
            .map_err(|e| tracing::warn!(error = %e, "conntrack statistics unavailable"))
            .ok();
        let fill = stats::read_table_fill()
            .map_err(|e| tracing::debug!(error = %e, "conntrack table fill unavailable"))
            .ok();
        let mut top = self.top.lock().unwrap_or_else(PoisonError::into_inner);
        let sources = Sources {
            snapshot: &snapshot,
            stats: stats.as_ref(),
            fill,
        };
        render::render(enc, &sources, &self.registry, &mut top);
        render::render_snat(
            enc,
            &self.snat.lock().unwrap_or_else(PoisonError::into_inner),
        );
        let c = snapshot.counters;
        shared
            .events_lost(PROGRAM, c.events_lost + c.flow_events_lost)
            .map_full("conntrack_drops", c.drop_keys_full)
            .map_full("conntrack_race_destinations", c.dest_keys_full)
            .map_full("conntrack_drop_reasons", c.reason_keys_full)
            .skipped(PROGRAM, "read_error", c.read_errors + c.other_read_errors)
            .skipped(PROGRAM, "not_ip", c.not_ip + c.other_not_ip)
            .skipped(PROGRAM, "no_device", c.other_no_device);
    }

    fn stop(&self) {
        self.events.stop.store(true, Ordering::Relaxed);
        heartbeat::join(&self.event_thread, tracer::EVENTS_THREAD);
        heartbeat::join(&self.drop_thread, super::drops::THREAD);
        heartbeat::join(&self.flow_thread, flows::FLOWS_THREAD);
        heartbeat::join(&self.snat_thread, snat::SNAT_THREAD);
    }
}

/// Keeps `CT_ENDPOINTS` listing the registry's addresses, synchronously with
/// every change: drops from any other source count under one unknown key.
fn list_endpoints(
    map: Option<aya::maps::HashMap<aya::maps::MapData, podnet_common::AddrKey, u8>>,
    registry: &Registry,
) {
    let Some(map) = map else {
        return;
    };
    let map = Mutex::new(bpf::endpoints::AddressMap::new(
        map,
        podnet_common::conntrack::maps::ENDPOINTS,
    ));
    registry.watch_addresses(move |ips| {
        map.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .sync_or_warn(ips);
    });
}

fn spawn_event_thread(
    ring: aya::maps::RingBuf<aya::maps::MapData>,
    registry: &Registry,
    races: &RaceLog,
    hub: &EventHub,
    events: &EventThreadHandle,
    dns: DnsFlows,
) -> Result<JoinHandle<()>, ConntrackError> {
    let (registry, races, hub, events) =
        (registry.clone(), races.clone(), hub.clone(), events.clone());
    std::thread::Builder::new()
        .name(tracer::EVENTS_THREAD.into())
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
            tracer::run_event_loop(
                ring,
                enricher,
                &races,
                &hub,
                &events.stats,
                &events.stop,
                &dns,
            );
        })
        .map_err(ConntrackError::Thread)
}
