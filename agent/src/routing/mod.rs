//! Native pod routing: pods with VPC addresses leave through the ENI that
//! owns their address, and the routing state heals itself.
//!
//! The desired state ([`desired`]) comes from the endpoint registry (pod
//! addresses and host interfaces) and the node's ENIs ([`eni::EniStore`],
//! filled from `--enis FILE` or by the ENI IPAM). A reconciler
//! ([`reconcile`]) compares it with what the kernel has ([`netlink`]) and
//! changes only what podnet owns ([`diff`]); it runs on start, on every
//! endpoint or ENI change, within milliseconds of a kernel notification that
//! may mean drift ([`watch`]), and every [`RESYNC_PERIOD`].
//!
//! Alongside: proxy NDP on ENIs that answer for IPv6 pods ([`proxy_ndp`]),
//! SNAT for traffic leaving the VPC ([`snat`]) and, with
//! `--fast-path`, the eBPF fast path ([`steer`]) fed from the same
//! desired state. Everything runs on one OS thread that stays in the agent's
//! network namespace. Stopping leaves all of it in place.

pub mod desired;
pub mod diff;
pub mod eni;
#[cfg(test)]
pub(crate) mod fake;
pub mod netlink;
pub mod pod_gateway;
mod proxy_ndp;
pub mod reconcile;
pub mod show;
pub mod snat;
pub mod steer;
pub mod watch;

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc, Mutex, PoisonError,
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime},
};

use self::{
    diff::Kind,
    eni::{Eni, EniStore},
    netlink::RtNetlink,
    reconcile::{Outcome, Reconciler, Stats},
    show::{Names, RoutesView},
    snat::SnatSpec,
    steer::Steer,
    watch::{Echoes, Watcher},
};
use crate::{
    api::{
        call::Call,
        protocol::{method, ApiError},
    },
    bpf::BpfError,
    endpoint::{Changes, Endpoint, Follower, Registry},
    heartbeat::{self, Heartbeat},
    metrics::{
        selfstats::RECONCILE_BUCKETS,
        shared::SharedFamilies,
        text::{Encoder, MetricType},
        Histogram,
    },
    net::Cidr,
    options::options,
    subsystem::{to_json, Subsystem},
};

/// Full reconcile (and SNAT check, and fast-path link re-check) period.
pub const RESYNC_PERIOD: Duration = Duration::from_secs(30);
/// Endpoint changes closer together than this are one reconcile.
const CHANGE_COALESCE: Duration = Duration::from_millis(20);
/// The routing thread's name (and its heartbeat's).
pub const THREAD_NAME: &str = "podnet-routing";
/// The routing subsystem's name among the registry's followers.
pub const FOLLOWER: &str = "routing";
/// Longest wait for a kernel notification before inputs are looked at again.
const POLL: Duration = Duration::from_millis(200);
/// How soon a reconcile that found a conflict is repeated (the foreign
/// object's removal is not among the notifications podnet reacts to).
pub const CONFLICT_RECHECK: Duration = Duration::from_secs(1);
/// Least time between two heap trims after reconciles (see [`HeapTrim`]).
const HEAP_TRIM_GAP: Duration = Duration::from_secs(1);

options! {
    /// Routing's section of the configuration.
    pub struct RoutingOptions {
        /// YAML list of this node's ENIs (`name`, `mac`, `table`, `subnet`,
        /// `gateway`, `ips`: the secondary addresses given to pods); re-read when
        /// it changes.
        #[arg(long, env = "PODNET_ENIS")]
        pub enis: Option<PathBuf>,
        /// Destinations that are not masqueraded and that the fast path may steer
        /// to, comma-separated, IPv4 and IPv6 [default: the ENIs' subnets, both
        /// families].
        #[arg(long, env = "PODNET_VPC_CIDRS", value_delimiter = ',')]
        pub vpc_cidrs: Option<Vec<Cidr>>,
        /// Service CIDRs, comma-separated: the fast path leaves them to the
        /// kernel (kube-proxy translates them).
        #[arg(long, env = "PODNET_SERVICE_CIDRS", value_delimiter = ',')]
        pub service_cidrs: Option<Vec<Cidr>>,
        /// Masquerade pod traffic leaving the VPC (`--snat=true|false`)
        /// [default: true when ENIs are configured].
        #[arg(long, env = "PODNET_SNAT", num_args = 0..=1, default_missing_value = "true")]
        pub snat: Option<bool>,
        /// Steer pod traffic to its ENI in eBPF, past netfilter and conntrack
        /// [default: false].
        #[arg(long, env = "PODNET_FAST_PATH", num_args = 0..=1, default_missing_value = "true")]
        pub fast_path: Option<bool>,
    }
}

impl RoutingOptions {
    /// The settings, defaults filled in: the fast path pins below `bpffs`
    /// and never steers traffic to `dns_ports` (DNS's own setting).
    pub fn settings(
        self,
        bpffs: &std::path::Path,
        dns_ports: &[u16],
    ) -> Result<RoutingSettings, String> {
        Ok(RoutingSettings {
            enis_file: self.enis,
            vpc_cidrs: self.vpc_cidrs.unwrap_or_default(),
            service_cidrs: self.service_cidrs.unwrap_or_default(),
            snat: self.snat,
            fast_path: self.fast_path.unwrap_or(false),
            bpffs: bpffs.to_owned(),
            dns_ports: dns_ports.to_vec(),
        })
    }
}

/// How routing is set up.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoutingSettings {
    /// `--enis`: static ENI description.
    pub enis_file: Option<PathBuf>,
    /// `--vpc-cidrs`: destinations not masqueraded and steerable; empty means
    /// the ENIs' subnets.
    pub vpc_cidrs: Vec<Cidr>,
    /// `--service-cidrs`: destinations the fast path leaves to the kernel
    /// (kube-proxy translates them).
    pub service_cidrs: Vec<Cidr>,
    /// `--snat`: `None` means on when ENIs are configured.
    pub snat: Option<bool>,
    /// `--fast-path`.
    pub fast_path: bool,
    /// `--bpffs`.
    pub bpffs: PathBuf,
    /// `--dns-ports`: DNS traffic is never steered (the DNS tracer sees it).
    pub dns_ports: Vec<u16>,
}

/// The last routing reconcile, as `podnetctl status` shows it.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct LastReconcile {
    /// When it ended (Unix milliseconds; 0: none yet).
    pub unix_ms: u64,
    /// `success`, `error`, or `pending` before the first.
    pub result: &'static str,
    /// How long it took.
    pub duration_seconds: f64,
    /// Objects repaired since start (all kinds).
    pub repairs: u64,
    /// Errors of the last reconcile.
    pub errors: usize,
}

/// Errors starting the routing subsystem.
#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    /// The ENI file is unusable.
    #[error(transparent)]
    Enis(#[from] eni::EnisFileError),
    /// The fast path could not be loaded.
    #[error("fast path: {0}")]
    Steer(#[from] BpfError),
    /// Netlink could not be opened.
    #[error("routing netlink: {0}")]
    Netlink(String),
    /// The routing thread could not be started.
    #[error("starting the routing thread: {0}")]
    Thread(std::io::Error),
    /// The registry's change notifications could not be set up.
    #[error("subscribing to endpoint changes: {0}")]
    Subscribe(std::io::Error),
}

/// What a reconcile looked at: the whole namespace, or only what changed
/// since the last one (see [`Reconciler::reconcile_changes`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scope {
    Full,
    Changes,
}

impl Scope {
    /// The `scope` label value.
    fn label(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Changes => "changes",
        }
    }
}

/// Reconcile durations, by scope, and the last one.
struct Durations {
    full: Histogram,
    changes: Histogram,
    last: Option<Duration>,
}

struct Shared {
    stats: Stats,
    view: Mutex<RoutesView>,
    steer: Mutex<Option<Steer>>,
    stop: AtomicBool,
    durations: Mutex<Durations>,
}

impl Shared {
    /// Records how long a reconcile of `scope` took.
    fn observe(&self, scope: Scope, took: Duration) {
        let mut d = self
            .durations
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match scope {
            Scope::Full => d.full.observe(took),
            Scope::Changes => d.changes.observe(took),
        }
        d.last = Some(took);
    }
}

/// The running routing subsystem.
pub struct Routing {
    shared: Arc<Shared>,
    enis: EniStore,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Routing {
    /// Loads the ENI description, prepares (or removes) the fast path, and
    /// starts the reconcile thread; returns once netlink is open.
    /// The fast path attaches as tcx links or classic tc filters (`tc_mode`).
    pub fn start(
        config: RoutingSettings,
        tc_mode: crate::bpf::tc::TcMode,
        registry: Registry,
    ) -> Result<Self, RoutingError> {
        let enis = EniStore::new();
        if let Some(path) = &config.enis_file {
            let list = eni::load(path)?;
            tracing::info!(path = %path.display(), count = list.len(), "ENIs loaded");
            enis.replace(list);
        }
        let steer = if config.fast_path {
            Some(Steer::load(&config.bpffs, &config.dns_ports, tc_mode)?)
        } else {
            if Steer::remove(&config.bpffs)? {
                tracing::info!("fast path off: removed its pinned links and maps");
            }
            None
        };
        let shared = Arc::new(Shared {
            stats: Stats::default(),
            view: Mutex::new(RoutesView {
                fast_path: config.fast_path,
                ..RoutesView::default()
            }),
            steer: Mutex::new(steer),
            stop: AtomicBool::new(false),
            durations: Mutex::new(Durations {
                full: Histogram::new(&RECONCILE_BUCKETS),
                changes: Histogram::new(&RECONCILE_BUCKETS),
                last: None,
            }),
        });
        let changes = registry.subscribe().map_err(RoutingError::Subscribe)?;
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(THREAD_NAME.into())
            .spawn({
                let (shared, enis) = (shared.clone(), enis.clone());
                move || {
                    let opened = RtNetlink::open()
                        .map_err(|e| e.to_string())
                        .and_then(|nl| Ok((nl, Watcher::open().map_err(|e| e.to_string())?)));
                    match opened {
                        Ok((nl, watcher)) => {
                            let _ = ready_tx.send(Ok(()));
                            let heartbeat = heartbeat::registry()
                                .register(THREAD_NAME, heartbeat::SILENCE_LIMIT);
                            Loop::new(config, registry, changes, enis, shared, watcher)
                                .run(nl, heartbeat);
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                }
            })
            .map_err(RoutingError::Thread)?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(RoutingError::Netlink(e)),
            Err(_) => return Err(RoutingError::Netlink("routing thread died".into())),
        }
        Ok(Self {
            shared,
            enis,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The ENI store (the ENI IPAM feeds it).
    pub fn enis(&self) -> &EniStore {
        &self.enis
    }

    /// Desired versus actual, as of the last reconcile.
    pub fn show(&self) -> RoutesView {
        self.shared
            .view
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The last reconcile, for `podnetctl status`.
    pub fn last_reconcile(&self) -> LastReconcile {
        let view = self.show();
        let s = &self.shared.stats;
        LastReconcile {
            unix_ms: view.reconciled_unix_ms,
            result: if view.reconciled_unix_ms == 0 {
                "pending"
            } else if view.errors.is_empty() {
                "success"
            } else {
                "error"
            },
            duration_seconds: self
                .shared
                .durations
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .last
                .map_or(0.0, |d| d.as_secs_f64()),
            repairs: Kind::ALL.iter().map(|k| s.repairs(*k)).sum(),
            errors: view.errors.len(),
        }
    }
}

/// The API methods routing serves.
pub const METHODS: &[&str] = &[method::ROUTES_SHOW];

impl Subsystem for Routing {
    fn name(&self) -> &'static str {
        "routing"
    }

    fn methods(&self) -> &'static [&'static str] {
        METHODS
    }

    fn handle(&self, m: &str, params: serde_json::Value) -> Result<serde_json::Value, ApiError> {
        match Call::decode(m, params)? {
            Call::RoutesShow => to_json(&self.show()),
            other => Err(ApiError::unknown_method(other.method())),
        }
    }

    /// Writes the routing and fast-path metric families.
    fn render_metrics(&self, enc: &mut Encoder, _shared: &mut SharedFamilies) {
        let s = &self.shared.stats;
        enc.family(
            "podnet_route_reconciles_total",
            MetricType::Counter,
            "Routing reconciles, by result: success applied every planned change, error failed to observe or to apply one.",
        )
        .sample(&[("result", "success")], s.success.load(Ordering::Relaxed))
        .sample(&[("result", "error")], s.error.load(Ordering::Relaxed));
        let mut family = enc.family(
            "podnet_route_repairs_total",
            MetricType::Counter,
            "Routing objects podnet put back after they were deleted or changed behind its back.",
        );
        for kind in Kind::ALL {
            family.sample(&[("kind", kind.as_str())], s.repairs(kind));
        }
        {
            let durations = self
                .shared
                .durations
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let mut family = enc.family(
                "podnet_route_reconcile_duration_seconds",
                MetricType::Histogram,
                "Time one routing reconcile takes: observe rules, routes and proxy entries, diff, apply; by scope (full: every link, route, rule and proxy entry of the namespace, on start, drift, ENI changes and every 30 s; changes: only what endpoint and link changes concern).",
            );
            durations
                .full
                .write(&mut family, &[("scope", Scope::Full.label())]);
            durations
                .changes
                .write(&mut family, &[("scope", Scope::Changes.label())]);
        }
        let steer = self
            .shared
            .steer
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // The family is declared even with the fast path off (no samples
        // then), so dashboards and alerts never query an unknown name.
        let mut family = enc.family(
            "podnet_steer_packets_total",
            MetricType::Counter,
            "Packets seen by the ENI fast path, by family (ipv4, ipv6), direction (egress: pod to ENI, ingress: ENI to pod) and result (redirected past the kernel path; left to it: no_neighbour, fib_miss, passed, and for IPv6 extension_headers; or redirect_failed: the redirect helper refused the packet, which is dropped).",
        );
        if let Some(steer) = steer.as_ref() {
            match steer.counts() {
                Ok(counts) => {
                    for s in counts.samples() {
                        family.sample(
                            &[
                                ("family", s.family),
                                ("direction", s.direction),
                                ("result", s.result),
                            ],
                            s.packets,
                        );
                    }
                }
                Err(e) => tracing::warn!(error = %e, "reading fast path counters failed"),
            }
        }
    }

    /// Stops the reconcile thread; routes, rules, SNAT and the fast path stay.
    fn stop(&self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        crate::heartbeat::join(&self.thread, "routing");
    }
}

/// Whether a desired proxy-ARP entry is gone. The kernel sends no
/// notification when a proxy entry is deleted (`pneigh_delete` in
/// net/core/neighbour.c, Linux 6.18), so the loop polls them: one small dump
/// per [`POLL`] while any are desired.
fn proxies_drifted(
    netlink: &mut impl netlink::Netlink,
    desired: &std::collections::BTreeSet<desired::ProxyNeigh>,
) -> bool {
    match netlink.proxies() {
        Ok(observed) => desired.iter().any(|want| {
            !observed
                .iter()
                .any(|o| o.proxy == *want && o.protocol == desired::RTPROT_PODNET)
        }),
        Err(_) => true,
    }
}

/// The reconcile thread's state.
struct Loop {
    config: RoutingSettings,
    registry: Registry,
    changes: Changes,
    enis: EniStore,
    shared: Arc<Shared>,
    watcher: Watcher,
    eni_stamp: Option<(SystemTime, u64)>,
    snat_active: Option<bool>,
    /// Tells the registry which change each reconcile acted on.
    follower: Follower,
}

impl Loop {
    fn new(
        config: RoutingSettings,
        registry: Registry,
        changes: Changes,
        enis: EniStore,
        shared: Arc<Shared>,
        watcher: Watcher,
    ) -> Self {
        let eni_stamp = config.enis_file.as_deref().and_then(eni::stamp);
        let follower = registry.follow(FOLLOWER);
        Self {
            follower,
            config,
            registry,
            changes,
            enis,
            shared,
            watcher,
            eni_stamp,
            snat_active: None,
        }
    }

    fn run(mut self, netlink: RtNetlink, heartbeat: Heartbeat) {
        let mut reconciler = Reconciler::new(netlink);
        let mut echoes = Echoes::default();
        let mut last_enis = None;
        let mut next_resync = Instant::now();
        let mut proxies = std::collections::BTreeSet::new();
        let (mut endpoints_changed, mut last_reconcile) = (false, Instant::now());
        let mut trim = HeapTrim::default();
        while !self.shared.stop.load(Ordering::Relaxed) && heartbeat.beat() {
            trim.run_if_due();
            // Woken at once by a kernel notification or an endpoint change;
            // changes closer together than CHANGE_COALESCE are one reconcile.
            let wait = if endpoints_changed {
                CHANGE_COALESCE.saturating_sub(last_reconcile.elapsed())
            } else {
                POLL
            };
            let notices = self.watcher.wait(wait, self.changes.fd(), &mut echoes);
            let links_changed = !notices.links.is_empty();
            for link in notices.links {
                reconciler.note_link(link);
            }
            let mut drift = notices.drift;
            if !drift && !proxies.is_empty() {
                drift = proxies_drifted(reconciler.netlink(), &proxies);
            }
            endpoints_changed |= self.changes.take();
            self.reload_enis();
            let enis_generation = self.enis.generation();
            let periodic = Instant::now() >= next_resync;
            let enis_changed = last_enis != Some(enis_generation);
            let changed =
                (endpoints_changed && last_reconcile.elapsed() >= CHANGE_COALESCE) || enis_changed;
            if !(drift || links_changed || periodic || changed) {
                continue;
            }
            endpoints_changed = false;
            last_reconcile = Instant::now();
            if periodic {
                next_resync = Instant::now() + RESYNC_PERIOD;
                echoes.clear();
            }
            last_enis = Some(enis_generation);
            let generation = self.registry.generation();
            let endpoints: Vec<Endpoint> = self
                .registry
                .endpoints()
                .into_iter()
                .map(|(_, e)| e)
                .collect();
            let enis = self.enis.enis();
            let mut errors = Vec::new();
            let only_changes = !(periodic || drift || enis_changed);
            let (scope, result) = self.pass(&mut reconciler, only_changes, &endpoints, &enis);
            let outcome = match result {
                Ok(o) => o,
                Err(e) => {
                    tracing::warn!(error = %e, scope = scope.label(), "routing reconcile failed");
                    errors.push(e.to_string());
                    Outcome::default()
                }
            };
            echoes.expect(&outcome.changed);
            if changed || periodic {
                errors.extend(self.sync_snat(&endpoints, &enis));
            }
            errors.extend(proxy_ndp::enable(&outcome.desired, &outcome.links));
            errors.extend(self.sync_steer(&outcome, &enis, periodic));
            proxies.clone_from(&outcome.desired.proxies);
            if outcome.has_conflicts() {
                next_resync = next_resync.min(Instant::now() + CONFLICT_RECHECK);
            }
            self.publish(&outcome, errors);
            self.follower.caught_up(generation);
            trim.request();
        }
        if self.shared.stop.load(Ordering::Relaxed) {
            heartbeat.retire();
        }
    }

    /// One reconcile, over the changes alone when `only_changes` and the
    /// reconciler can decide that way, else a full pass; timed by scope.
    fn pass(
        &self,
        reconciler: &mut Reconciler<RtNetlink>,
        only_changes: bool,
        endpoints: &[Endpoint],
        enis: &[Eni],
    ) -> (Scope, Result<Outcome, netlink::NetlinkError>) {
        let stats = &self.shared.stats;
        if only_changes {
            let began = Instant::now();
            match reconciler.reconcile_changes(endpoints, enis, stats) {
                Ok(Some(outcome)) => {
                    self.shared.observe(Scope::Changes, began.elapsed());
                    return (Scope::Changes, Ok(outcome));
                }
                Ok(None) => {}
                Err(e) => {
                    // A failed filtered dump: the full pass finds out more.
                    tracing::debug!(error = %e, "routing pass over changes failed; full pass");
                }
            }
        }
        let began = Instant::now();
        let result = reconciler.reconcile(endpoints, enis, stats);
        self.shared.observe(Scope::Full, began.elapsed());
        (Scope::Full, result)
    }

    fn reload_enis(&mut self) {
        let Some(path) = &self.config.enis_file else {
            return;
        };
        let now = eni::stamp(path);
        if now == self.eni_stamp {
            return;
        }
        self.eni_stamp = now;
        match eni::load(path) {
            Ok(list) => {
                tracing::info!(path = %path.display(), count = list.len(), "ENI file reloaded");
                self.enis.replace(list);
            }
            Err(e) => tracing::warn!(error = %e, "keeping previous ENIs"),
        }
    }

    fn vpc_cidrs(&self, enis: &[Eni]) -> Vec<Cidr> {
        if self.config.vpc_cidrs.is_empty() {
            enis.iter()
                .flat_map(|e| std::iter::once(e.subnet).chain(e.subnet6))
                .collect()
        } else {
            self.config.vpc_cidrs.clone()
        }
    }

    fn sync_snat(&mut self, endpoints: &[Endpoint], enis: &[Eni]) -> Option<String> {
        let enabled = self.config.snat.unwrap_or(!enis.is_empty());
        let result = if enabled {
            let pod_sources = if enis.is_empty() {
                endpoints
                    .iter()
                    .flat_map(|e| &e.ips)
                    .map(|ip| Cidr::host(*ip))
                    .collect()
            } else {
                enis.iter().map(|e| e.subnet).collect()
            };
            let spec = SnatSpec {
                vpc_cidrs: self.vpc_cidrs(enis),
                pod_sources,
            };
            snat::reconcile(&spec).map(|changed| {
                if changed {
                    tracing::info!(chain = snat::CHAIN, "SNAT rules installed");
                }
            })
        } else if self.snat_active != Some(false) {
            snat::remove().map(|removed| {
                if removed {
                    tracing::info!(chain = snat::CHAIN, "SNAT off: chain removed");
                }
            })
        } else {
            Ok(())
        };
        self.snat_active = Some(enabled);
        result.err().map(|e| {
            tracing::warn!(error = %e, "SNAT reconcile failed");
            e.to_string()
        })
    }

    fn sync_steer(&mut self, outcome: &Outcome, enis: &[Eni], recheck: bool) -> Vec<String> {
        let vpc = self.vpc_cidrs(enis);
        let mut steer = self
            .shared
            .steer
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(steer) = steer.as_mut() else {
            return Vec::new();
        };
        if recheck {
            steer.recheck();
        }
        let report = steer.sync(&outcome.desired, &vpc, &self.config.service_cidrs);
        for e in &report.errors {
            tracing::warn!(error = %e, "fast path sync failed");
        }
        report.errors
    }

    fn publish(&self, outcome: &Outcome, mut errors: Vec<String>) {
        errors.extend(outcome.errors.iter().cloned());
        let names = Names::new(&outcome.links);
        let view = RoutesView {
            reconciled_unix_ms: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            lines: show::lines(&outcome.statuses, &names),
            problems: outcome.desired.problems.clone(),
            errors,
            snat: self.snat_active == Some(true),
            fast_path: self.config.fast_path,
        };
        *self
            .shared
            .view
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = view;
    }
}

/// Hands the heap a reconcile freed back to the kernel.
///
/// A reconcile dumps every link and route of the namespace: with 1,100 pod
/// interfaces that is about 17 MB of short-lived allocations, which glibc
/// keeps resident (fragmented among live blocks) until `malloc_trim`.
/// Trimming soon after a reconcile, at most once per [`HEAP_TRIM_GAP`] so a
/// burst of endpoint changes pays for one, keeps the agent's resident memory
/// near what it really uses.
#[derive(Debug, Default)]
struct HeapTrim {
    pending: bool,
    last: Option<Instant>,
}

impl HeapTrim {
    /// A reconcile ran: trim at the next chance.
    fn request(&mut self) {
        self.pending = true;
        self.run_if_due();
    }

    /// Trims if a reconcile asked for it and the last trim is old enough.
    fn run_if_due(&mut self) {
        if self.pending && self.last.is_none_or(|t| t.elapsed() >= HEAP_TRIM_GAP) {
            crate::memory::release_free_heap();
            self.pending = false;
            self.last = Some(Instant::now());
        }
    }
}
