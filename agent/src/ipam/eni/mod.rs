//! ENI mode: pods get secondary addresses of the node's ENIs, from a warm
//! pool kept in the background.
//!
//! [`pool::EniPool`] is the allocator's address source (secondary addresses
//! of ENIs whose link is up; primaries never). A thread
//! ([`manager`]) reconciles the cloud against the warm pool targets
//! ([`warm`]): list the ENIs, bring their links up ([`link`]), plan the fewest
//! calls, apply them, and back off exponentially on errors and throttling.
//! Allocations and releases only wake it; they never wait for the cloud.

pub mod custom;
pub mod ipv6;
pub mod ledger;
pub mod link;
pub mod manager;
pub mod pool;
pub mod saved;
pub mod view;
pub mod warm;

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Condvar, Mutex, PoisonError,
    },
    thread::JoinHandle,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use self::{link::Links, pool::EniPool, warm::Targets};
use crate::{
    cloud::{ApiCalls, CloudProvider, InstanceLimits, SlotKind},
    heartbeat::{self, Heartbeat},
    metrics::text::{Encoder, MetricType},
    routing::eni::{Eni, EniStore},
};

/// How often the ENIs are listed again when nothing else wakes the thread.
pub const RESYNC_PERIOD: Duration = Duration::from_secs(30);
/// First wait after a failed reconcile; doubles up to [`BACKOFF_MAX`].
pub const BACKOFF_MIN: Duration = Duration::from_secs(1);
/// Longest wait between attempts while the cloud fails.
pub const BACKOFF_MAX: Duration = Duration::from_secs(16);
/// The ENI thread's name (and its heartbeat's).
pub const THREAD_NAME: &str = "podnet-eni";
/// Wait while an ENI's kernel link has not appeared yet.
pub const LINK_WAIT: Duration = Duration::from_millis(500);
/// Wait before listing again while a listing lacks podnet's latest changes.
pub const CONFIRM_WAIT: Duration = Duration::from_secs(1);

/// ENI mode settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EniSettings {
    /// Warm pool targets.
    pub targets: Targets,
    /// `--cloud-endpoint` (`None`: the region's EC2 endpoint).
    pub cloud_endpoint: Option<String>,
    /// `--imds-endpoint`.
    pub imds_endpoint: String,
    /// `--eni-leak-grace`.
    pub leak_grace: Duration,
    /// `--eni-configs` (custom networking).
    pub custom: custom::EniConfigs,
    /// `--eni-prefix-delegation`: ENIs hold `/28` prefixes.
    pub slots: SlotKind,
    /// `--eni-ipv6`: pods also get an address of an IPv6 prefix delegated to
    /// the primary ENI.
    pub ipv6: bool,
}

/// `--eni-leak-grace`: long enough that no agent is still between creating
/// and attaching the interface (the AWS VPC CNI waits as long).
pub const DEFAULT_LEAK_GRACE: Duration = Duration::from_mins(5);
/// The gateway every ENI-mode pod is given: link-local, so that no VPC
/// address is ever configured on the node for a pod (as the AWS VPC CNI).
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// How often the ENI thread looks for podnet's ENIs attached nowhere.
pub const SWEEP_PERIOD: Duration = Duration::from_mins(5);

impl Default for EniSettings {
    fn default() -> Self {
        Self {
            targets: Targets::default(),
            cloud_endpoint: None,
            imds_endpoint: crate::cloud::imds::DEFAULT_ENDPOINT.to_owned(),
            leak_grace: DEFAULT_LEAK_GRACE,
            custom: custom::EniConfigs::default(),
            slots: SlotKind::Address,
            ipv6: false,
        }
    }
}

/// The allocator's view the ENI thread needs: addresses allocated to pods,
/// and addresses cooling down.
pub type BusyFn = Arc<dyn Fn() -> (BTreeSet<IpAddr>, BTreeSet<IpAddr>) + Send + Sync>;

/// One ENI as last listed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EniRecord {
    /// `eni-...`.
    pub id: String,
    /// Attachment slot (0: primary).
    pub device_index: u32,
    /// Kernel link, once found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
    /// Whether podnet created it.
    pub managed: bool,
    /// Primary address (never a pod's).
    pub primary_ip: Option<Ipv4Addr>,
    /// Pod addresses: secondary addresses, or every address of its prefixes.
    pub ips: Vec<Ipv4Addr>,
    /// Its delegated prefixes (prefix delegation).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefixes: Vec<crate::net::Cidr>,
}

/// The ENI thread's view, for `podnetctl ipam`, metrics and errors.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EniState {
    /// `i-...`, once known.
    pub instance_id: Option<String>,
    /// Instance type, once known.
    pub instance_type: Option<String>,
    /// Subnet id and CIDR, once known.
    pub subnet: Option<String>,
    /// Interfaces the instance type can attach.
    pub max_enis: Option<u32>,
    /// IPv4 addresses per interface, primary included.
    pub ips_per_eni: Option<u32>,
    /// Attached ENIs by device index.
    pub enis: Vec<EniRecord>,
    /// Whether custom networking leaves the primary ENI to the node.
    #[serde(default)]
    pub primary_is_nodes: bool,
    /// Free addresses of the pods' subnet, as last read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet_free: Option<u64>,
    /// The last reconcile error, cleared by a success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Reconciles that failed in a row.
    pub failures: u32,
    /// What ENIs' slots hold.
    #[serde(default)]
    pub slot_kind: SlotKind,
    /// EC2 answers `InsufficientCidrBlocks` since start.
    #[serde(default)]
    pub insufficient_cidr_blocks: u64,
}

pub use podnet_api::ipam::{EniStatus, EniUsage};

#[derive(Default)]
pub(crate) struct Shared {
    pub(crate) state: Mutex<EniState>,
    pub(crate) woken: Mutex<bool>,
    pub(crate) wake: Condvar,
    pub(crate) stop: AtomicBool,
    pub(crate) routing: Mutex<Option<EniStore>>,
    /// What routing was given last (given again to a store that comes later).
    pub(crate) published: Mutex<Vec<Eni>>,
}

impl Shared {
    /// Sleeps up to `timeout`, returning early on a wake-up (when
    /// `wakeable`) or a stop, beating `heartbeat` at least every
    /// [`heartbeat::BEAT_EVERY`]. Returns whether to stop.
    pub(crate) fn sleep(&self, timeout: Duration, wakeable: bool, heartbeat: &Heartbeat) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut woken = self.woken.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if self.stop.load(Ordering::Relaxed) || !heartbeat.beat() {
                return true;
            }
            if wakeable && *woken {
                *woken = false;
                return false;
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return false;
            }
            woken = self
                .wake
                .wait_timeout(woken, (deadline - now).min(heartbeat::BEAT_EVERY))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    pub(crate) fn state(&self) -> std::sync::MutexGuard<'_, EniState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Gives routing `enis` now, or when its store comes.
    pub(crate) fn hand_to_routing(&self, enis: Vec<Eni>) {
        let routing = self.routing.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(store) = routing.as_ref() {
            store.replace(enis.clone());
        }
        *self
            .published
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = enis;
    }
}

/// ENI mode: the pool and the thread that keeps it warm.
pub struct EniIpam {
    pool: EniPool,
    /// The pods' IPv6 prefix (`--eni-ipv6`).
    pool6: ipv6::Ipv6Pool,
    shared: Arc<Shared>,
    calls: ApiCalls,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for EniIpam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EniIpam")
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

impl EniIpam {
    /// A pool with no thread yet; [`EniIpam::start`] starts it.
    pub fn new(calls: ApiCalls) -> Self {
        Self {
            pool: EniPool::new(),
            pool6: ipv6::Ipv6Pool::default(),
            shared: Arc::new(Shared::default()),
            calls,
            thread: Mutex::new(None),
        }
    }

    /// The allocator's address source.
    pub fn pool(&self) -> &EniPool {
        &self.pool
    }

    /// The allocator's IPv6 address source (`--eni-ipv6`).
    pub fn pool6(&self) -> &ipv6::Ipv6Pool {
        &self.pool6
    }

    /// Starts the ENI thread over `cloud` and `links`; `busy` reads the
    /// allocator; the confirmed pool is saved in `state_dir` and served from
    /// there after a restart until the cloud answers.
    pub fn start(
        &self,
        settings: &EniSettings,
        cloud: Arc<dyn CloudProvider>,
        links: Arc<dyn Links>,
        busy: BusyFn,
        state_dir: Option<PathBuf>,
    ) -> std::io::Result<()> {
        let worker = manager::Worker {
            targets: settings.targets,
            kind: settings.slots,
            ipv6: settings.ipv6.then(|| self.pool6.clone()),
            ipv6_assigned: Mutex::default(),
            configs: settings.custom.clone(),
            net: Mutex::default(),
            cloud,
            links,
            busy,
            pool: self.pool.clone(),
            shared: self.shared.clone(),
            ledger: Mutex::default(),
            state_dir,
            saved: Mutex::default(),
            leak_grace: settings.leak_grace,
            first_seen_detached: Mutex::default(),
        };
        // Before the first allocation can look at the pool.
        worker.restore();
        let handle = std::thread::Builder::new()
            .name(THREAD_NAME.into())
            .spawn(move || worker.run())?;
        *self.thread.lock().unwrap_or_else(PoisonError::into_inner) = Some(handle);
        Ok(())
    }

    /// Publishes the ENIs with links to the routing subsystem from now on.
    pub fn publish_to(&self, store: EniStore) {
        let mut routing = self
            .shared
            .routing
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        store.replace(
            self.shared
                .published
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        );
        *routing = Some(store);
        drop(routing);
        self.wake();
    }

    /// Asks the thread to reconcile soon (after an allocation or release).
    pub fn wake(&self) {
        *self
            .shared
            .woken
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = true;
        self.shared.wake.notify_all();
    }

    /// Stops the thread; ENIs and addresses stay as they are.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.wake.notify_all();
        crate::heartbeat::join(&self.thread, "ENI");
    }

    /// The thread's view.
    pub fn state(&self) -> EniState {
        self.shared.state().clone()
    }

    /// Per-ENI use given the allocator's allocated and cooling addresses.
    pub fn status(&self, allocated: &BTreeSet<IpAddr>, cooling: &BTreeSet<IpAddr>) -> EniStatus {
        let s = self.state();
        // Slots taken by someone else's ENIs (and the node's primary under
        // custom networking) hold no pod.
        let foreign = s
            .enis
            .iter()
            .filter(|e| {
                if e.device_index == 0 {
                    s.primary_is_nodes
                } else {
                    !e.managed
                }
            })
            .count();
        let pods_max = s
            .max_enis
            .zip(s.ips_per_eni)
            .map(|(max_enis, ips_per_eni)| {
                InstanceLimits {
                    max_enis: max_enis.saturating_sub(u32::try_from(foreign).unwrap_or(u32::MAX)),
                    ips_per_eni,
                }
                .max_pods(s.slot_kind)
            });
        let pods_here = s
            .enis
            .iter()
            .flat_map(|e| e.ips.iter())
            .filter(|ip| allocated.contains(&IpAddr::V4(**ip)))
            .count();
        let pods_remaining =
            pods_max.map(|m| m.saturating_sub(u32::try_from(pods_here).unwrap_or(u32::MAX)));
        let enis = s
            .enis
            .iter()
            .map(|e| {
                let ips = || e.ips.iter().map(|ip| IpAddr::V4(*ip));
                let a = ips().filter(|ip| allocated.contains(ip)).count() as u64;
                let c = ips().filter(|ip| cooling.contains(ip)).count() as u64;
                let n = e.ips.len() as u64;
                EniUsage {
                    eni: e.id.clone(),
                    device_index: e.device_index,
                    link: e.link.clone(),
                    managed: e.managed,
                    primary_ip: e.primary_ip,
                    addresses: n,
                    prefixes: e.prefixes.iter().map(ToString::to_string).collect(),
                    allocated: a,
                    cooldown: c,
                    free: n.saturating_sub(a + c),
                }
            })
            .collect();
        EniStatus {
            instance_id: s.instance_id,
            instance_type: s.instance_type,
            subnet: s.subnet,
            max_enis: s.max_enis,
            max_pods: s
                .max_enis
                .zip(s.ips_per_eni)
                .map(|(max_enis, ips_per_eni)| {
                    InstanceLimits {
                        max_enis,
                        ips_per_eni,
                    }
                    .max_pods(s.slot_kind)
                }),
            prefix_delegation: s.slot_kind == SlotKind::Prefix,
            insufficient_cidr_blocks: s.insufficient_cidr_blocks,
            enis,
            last_error: s.last_error,
            pods_remaining,
            subnet_free: s.subnet_free,
        }
    }

    /// Writes `podnet_ipam_eni_addresses` and `podnet_cloud_api_calls_total`.
    pub fn render_metrics(
        &self,
        enc: &mut Encoder,
        allocated: &BTreeSet<IpAddr>,
        cooling: &BTreeSet<IpAddr>,
    ) {
        let status = self.status(allocated, cooling);
        let mut fam = enc.family(
            "podnet_ipam_eni_addresses",
            MetricType::Gauge,
            "Secondary addresses of each attached ENI by state (allocated, cooldown, free).",
        );
        for e in &status.enis {
            fam.sample(&[("eni", &e.eni), ("state", "allocated")], e.allocated)
                .sample(&[("eni", &e.eni), ("state", "cooldown")], e.cooldown)
                .sample(&[("eni", &e.eni), ("state", "free")], e.free);
        }
        if let Some(n) = status.pods_remaining {
            enc.family(
                "podnet_ipam_pods_remaining",
                MetricType::Gauge,
                "More pods this node can address: the instance type's ENIs (less those attached by someone else) times their secondary addresses, less the addresses allocated.",
            )
            .sample(&[], u64::from(n));
        }
        if let (Some(n), Some(subnet)) = (status.subnet_free, &status.subnet) {
            let subnet = subnet.split(' ').next().unwrap_or(subnet);
            enc.family(
                "podnet_ipam_subnet_free_addresses",
                MetricType::Gauge,
                "Free addresses of the pods' subnet as EC2 reports them (availableIpAddressCount), read at start, after the pool changed, and every 5 minutes.",
            )
            .sample(&[("subnet", subnet)], n);
        }
        if status.prefix_delegation {
            enc.family(
                "podnet_eni_insufficient_cidr_blocks_total",
                MetricType::Counter,
                "EC2 answers InsufficientCidrBlocks: the pods' subnet has no free aligned /28 block for a prefix (its free addresses are fragmented).",
            )
            .sample(&[], status.insufficient_cidr_blocks);
        }
        let mut fam = enc.family(
            "podnet_cloud_api_calls_total",
            MetricType::Counter,
            "Cloud API calls by action and result (success, error, throttled, unreachable, bad_answer).",
        );
        for ((action, result), n) in self.calls.snapshot() {
            fam.sample(&[("action", &action), ("result", result)], n);
        }
    }
}

impl Drop for EniIpam {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The allocator's allocated and cooling addresses.
pub fn busy(alloc: &crate::ipam::allocator::Allocator) -> (BTreeSet<IpAddr>, BTreeSet<IpAddr>) {
    let allocated = alloc
        .allocations()
        .flat_map(|a| a.ips.iter().map(|x| x.ip))
        .collect();
    let cooling = alloc.cooldowns().into_iter().map(|c| c.ip).collect();
    (allocated, cooling)
}

/// Starts `eni`'s thread against EC2 and the metadata service of
/// `settings`, reading the allocator in `state`, saving the pool in
/// `state_dir`.
pub fn start_ec2(
    eni: &EniIpam,
    settings: &EniSettings,
    state: &Arc<Mutex<crate::ipam::state::NodeState>>,
    state_dir: &Path,
) -> Result<(), crate::ipam::IpamError> {
    let cloud = crate::cloud::ec2::Ec2::new(
        settings.cloud_endpoint.as_deref(),
        &settings.imds_endpoint,
        eni.calls.clone(),
    )
    .map_err(|e| crate::ipam::IpamError::Config(format!("ENI mode: {e}")))?;
    let weak = Arc::downgrade(state);
    let busy: BusyFn = Arc::new(move || {
        weak.upgrade().map_or_else(Default::default, |s| {
            busy(s.lock().unwrap_or_else(PoisonError::into_inner).allocator())
        })
    });
    eni.start(
        settings,
        Arc::new(cloud),
        Arc::new(link::NetlinkLinks),
        busy,
        Some(state_dir.to_path_buf()),
    )
    .map_err(|e| crate::ipam::IpamError::Config(format!("starting the ENI thread: {e}")))
}

#[cfg(test)]
mod tests;
