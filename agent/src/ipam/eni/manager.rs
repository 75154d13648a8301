//! The ENI thread: learn the instance once, then reconcile: list the ENIs,
//! bring their links up, publish the ready addresses, plan against the warm
//! pool targets and apply, with exponential backoff while the cloud fails.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    sync::{atomic::Ordering, Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use super::{
    custom::{EniConfigs, PodNetwork},
    ipv6::Ipv6Pool,
    ledger::{Ledger, SETTLE},
    link::{Links, ENI_MTU},
    pool::EniPool,
    saved::{self, SavedPool},
    warm::{self, Action, EniView, Targets},
    BusyFn, EniRecord, Shared, BACKOFF_MAX, BACKOFF_MIN, CONFIRM_WAIT, LINK_WAIT, RESYNC_PERIOD,
    SWEEP_PERIOD,
};
use crate::{
    cloud::{CloudError, CloudProvider, EniInfo, InstanceIdentity, InstanceLimits, SlotKind},
    heartbeat::{self, Heartbeat},
    net::Cidr,
    routing::eni::Eni,
};

/// Attached by someone else (neither the primary nor podnet's), or the
/// primary when custom networking leaves it to the node: podnet does not use
/// its addresses and never changes it.
fn is_foreign(e: &EniInfo, net: &PodNetwork) -> bool {
    if e.device_index == 0 {
        net.primary_is_nodes
    } else {
        !e.managed
    }
}

/// Rounds in a row that may change something before the thread backs off
/// (a plan converges in two or three).
const MAX_CHANGING_ROUNDS: u32 = 5;

/// First routing table of ENIs: table = base + device index.
pub const TABLE_BASE: u32 = 100;

/// The routing table of the ENI at `device_index`; `None` past the last
/// table number (the cloud reports the index, podnet does not choose it).
pub fn table_of(device_index: u32) -> Option<u32> {
    TABLE_BASE.checked_add(device_index)
}

/// Exponential backoff.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { next: BACKOFF_MIN }
    }
}

impl Backoff {
    /// The wait before the next attempt; doubles each time up to the cap.
    pub fn next_wait(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        wait
    }

    /// After a success.
    pub fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }
}

/// An error of one reconcile.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// A cloud call failed.
    #[error(transparent)]
    Cloud(#[from] CloudError),
    /// Links could not be listed or set up.
    #[error("links: {0}")]
    Link(String),
}

/// What a reconcile found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Round {
    /// Cloud changes made.
    pub changes: usize,
    /// ENIs whose kernel link has not appeared yet.
    pub waiting_for_links: usize,
    /// podnet's changes the listing did not show yet.
    pub unconfirmed: usize,
}

pub(crate) struct Worker {
    pub(crate) targets: Targets,
    /// What an ENI's slots hold (`--eni-prefix-delegation`).
    pub(crate) kind: SlotKind,
    /// The pods' IPv6 prefix (`--eni-ipv6`).
    pub(crate) ipv6: Option<Ipv6Pool>,
    /// When podnet last delegated an IPv6 prefix that no listing showed yet.
    pub(crate) ipv6_assigned: Mutex<Option<Instant>>,
    /// `--eni-configs`.
    pub(crate) configs: EniConfigs,
    /// Where pods' addresses come from, once the instance is known.
    pub(crate) net: Mutex<Option<PodNetwork>>,
    pub(crate) cloud: Arc<dyn CloudProvider>,
    pub(crate) links: Arc<dyn Links>,
    pub(crate) busy: BusyFn,
    pub(crate) pool: EniPool,
    pub(crate) shared: Arc<Shared>,
    /// podnet's cloud changes a listing may not show yet.
    pub(crate) ledger: Mutex<Ledger>,
    /// Where the confirmed pool is saved (`None`: nowhere).
    pub(crate) state_dir: Option<PathBuf>,
    /// What was saved last.
    pub(crate) saved: Mutex<Option<SavedPool>>,
    /// `--eni-leak-grace`.
    pub(crate) leak_grace: Duration,
    /// When each detached ENI was first seen (unix seconds).
    pub(crate) first_seen_detached: Mutex<std::collections::BTreeMap<String, u64>>,
}

/// EC2's error code for a subnet with no free `/28` block.
const INSUFFICIENT_CIDR_BLOCKS: &str = "InsufficientCidrBlocks";

/// A reconcile error as people read it: EC2's `InsufficientCidrBlocks`
/// gets what it means and what to do.
fn explain(e: &ReconcileError) -> String {
    match e {
        ReconcileError::Cloud(c) if c.is_insufficient_cidr_blocks() => format!(
            "{c} (the pods' subnet has free addresses, but no free aligned /28 block for a \
             prefix: they are fragmented by single addresses; give pods a subnet with \
             contiguous free space, reserve a CIDR for prefixes in the subnet, or turn \
             --eni-prefix-delegation off)"
        ),
        _ => e.to_string(),
    }
}

/// The VPC router: the subnet's first address.
fn vpc_router(subnet: Cidr) -> Ipv4Addr {
    Ipv4Addr::from(subnet.network_v4().map_or(0, u32::from).wrapping_add(1))
}

impl Worker {
    pub(crate) fn run(self) {
        let heartbeat =
            heartbeat::registry().register(super::THREAD_NAME, heartbeat::CLOUD_SILENCE_LIMIT);
        self.run_rounds(&heartbeat);
        if self.shared.stop.load(Ordering::Relaxed) {
            heartbeat.retire();
        }
    }

    /// Rounds until stopped (or ended by the fault hook).
    fn run_rounds(&self, heartbeat: &Heartbeat) {
        let mut backoff = Backoff::default();
        let (identity, limits) = loop {
            match self.init() {
                Ok(x) => break x,
                Err(e) => {
                    let wait = backoff.next_wait();
                    self.failed(&e.to_string(), wait);
                    if self.shared.sleep(wait, false, heartbeat) {
                        return;
                    }
                }
            }
        };
        backoff.reset();
        let mut changing = 0u32;
        let mut next_sweep = Instant::now();
        let mut subnet_stale = true;
        loop {
            if Instant::now() >= next_sweep {
                let again = self.sweep(&identity.instance_id);
                next_sweep = Instant::now() + again.min(SWEEP_PERIOD);
                subnet_stale = true;
            }
            let wait = match self.reconcile(&identity, limits) {
                Ok(round) => {
                    if round.changes > 0 {
                        changing += 1;
                        subnet_stale = true;
                    } else {
                        changing = 0;
                        backoff.reset();
                        if subnet_stale {
                            self.read_subnet(&self.net(&identity).subnet_id);
                            subnet_stale = false;
                        }
                    }
                    if changing > MAX_CHANGING_ROUNDS {
                        // The cloud accepts changes that do not show: slow down.
                        backoff.next_wait()
                    } else if round.changes > 0 {
                        // See what the changes made before deciding more.
                        Duration::ZERO
                    } else if round.waiting_for_links > 0 {
                        LINK_WAIT
                    } else if round.unconfirmed > 0 {
                        // Addresses are handed out once a listing shows them.
                        CONFIRM_WAIT
                    } else {
                        RESYNC_PERIOD
                    }
                }
                Err(e) => {
                    let wait = backoff.next_wait();
                    self.failed(&explain(&e), wait);
                    if self.shared.sleep(wait, false, heartbeat) {
                        return;
                    }
                    continue;
                }
            };
            let wait = wait.min(next_sweep.saturating_duration_since(Instant::now()));
            if self.shared.stop.load(Ordering::Relaxed) || self.shared.sleep(wait, true, heartbeat)
            {
                return;
            }
        }
    }

    fn failed(&self, error: &str, wait: Duration) {
        let mut s = self.shared.state();
        s.failures += 1;
        s.last_error = Some(error.to_owned());
        if error.contains(INSUFFICIENT_CIDR_BLOCKS) {
            s.insufficient_cidr_blocks += 1;
        }
        tracing::warn!(
            error,
            failures = s.failures,
            retry_in_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
            "ENI reconcile failed; existing pod addresses are unaffected"
        );
        drop(s);
        self.relabel();
    }

    fn init(&self) -> Result<(InstanceIdentity, InstanceLimits), CloudError> {
        let identity = self.cloud.identity()?;
        let limits = self.cloud.limits(&identity.instance_type)?;
        let net = PodNetwork::resolve(&self.configs, &identity, self.cloud.as_ref())?;
        self.pool
            .set_subnet(net.subnet_cidr, Some(IpAddr::V4(super::POD_GATEWAY)));
        tracing::info!(
            instance = %identity.instance_id,
            instance_type = %identity.instance_type,
            zone = %identity.availability_zone,
            subnet = %format!("{} {}", net.subnet_id, net.subnet_cidr),
            security_groups = ?net.security_groups,
            primary_eni = if net.primary_is_nodes { "the node's (custom networking)" } else { "pods' too" },
            max_enis = limits.max_enis,
            ips_per_eni = limits.ips_per_eni,
            slots = self.kind.noun(),
            max_pods = limits.max_pods(self.kind),
            "ENI mode"
        );
        let mut s = self.shared.state();
        s.instance_id = Some(identity.instance_id.clone());
        s.instance_type = Some(identity.instance_type.clone());
        s.subnet = Some(format!("{} {}", net.subnet_id, net.subnet_cidr));
        s.primary_is_nodes = net.primary_is_nodes;
        drop(s);
        *self.net.lock().unwrap_or_else(PoisonError::into_inner) = Some(net);
        let mut s = self.shared.state();
        s.slot_kind = self.kind;
        s.max_enis = Some(limits.max_enis);
        s.ips_per_eni = Some(limits.ips_per_eni);
        Ok((identity, limits))
    }

    /// Deletes podnet's ENIs of `instance_id` that are attached nowhere and
    /// older than the leak grace: left by a crash between create and attach,
    /// or a delete that failed after a detach. They hold subnet addresses
    /// the instance's listing never shows. A failure is logged and retried at
    /// the next sweep. Returns when to sweep again: when the youngest one
    /// left reaches the grace, else [`SWEEP_PERIOD`].
    pub(crate) fn sweep(&self, instance_id: &str) -> Duration {
        let detached = match self.cloud.list_detached_enis(instance_id) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "cannot look for leaked ENIs; trying again at the next sweep");
                return SWEEP_PERIOD;
            }
        };
        let mut again = SWEEP_PERIOD;
        let now = crate::sys::unix_now_s();
        let mut first_seen = self
            .first_seen_detached
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        first_seen.retain(|id, _| detached.iter().any(|d| &d.id == id));
        for eni in detached {
            // Without its creation tag (made by an older podnet), an
            // interface is as old as the first sweep that saw it.
            let created = match eni.created_unix_s {
                Some(c) => c,
                None => *first_seen.entry(eni.id.clone()).or_insert(now),
            };
            let age_s = now.saturating_sub(created);
            let grace_s = self.leak_grace.as_secs();
            if age_s < grace_s {
                tracing::info!(eni = %eni.id, age_s, "an ENI of this instance is attached nowhere; deleted if it still is after the grace");
                again = again.min(Duration::from_secs(grace_s - age_s));
                continue;
            }
            match self.cloud.delete_eni(&eni.id) {
                Ok(()) => {
                    tracing::warn!(eni = %eni.id, age_s, "deleted a leaked ENI of this instance (created, then attached nowhere)");
                }
                Err(e) => {
                    tracing::warn!(eni = %eni.id, error = %e, "deleting a leaked ENI failed; trying again at the next sweep");
                }
            }
        }
        again
    }

    /// Reads the pods' subnet's free addresses (once the pool settled after
    /// changes, and with each sweep).
    fn read_subnet(&self, subnet_id: &str) {
        match self.cloud.describe_subnet(subnet_id) {
            Ok(subnet) => self.shared.state().subnet_free = Some(subnet.free),
            Err(e) => {
                tracing::warn!(subnet = subnet_id, error = %e, "cannot read the subnet's free addresses");
            }
        }
    }

    /// Where pods' addresses come from: as resolved at start, else the
    /// instance's own subnet.
    fn net(&self, identity: &InstanceIdentity) -> PodNetwork {
        self.net
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .unwrap_or_else(|| PodNetwork::of_instance(identity))
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Serves the pool the previous agent saved until the cloud answers:
    /// the confirmed addresses of the saved ENIs whose links exist.
    pub(crate) fn restore(&self) {
        let Some(dir) = &self.state_dir else { return };
        let saved = match saved::load(dir) {
            Ok(Some(saved)) => saved,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the saved ENI pool; waiting for the cloud API");
                return;
            }
        };
        let links = match self.links.list() {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list links; the saved ENI pool is not used");
                return;
            }
        };
        let enis: Vec<Eni> = saved
            .enis
            .iter()
            .filter_map(|e| {
                let (_, link) = links.iter().find(|(mac, _)| Some(*mac) == e.mac)?;
                Some(Eni {
                    name: link.name.clone(),
                    ..e.clone()
                })
            })
            .collect();
        let ready: Vec<Ipv4Addr> = enis.iter().flat_map(|e| e.ips.iter().copied()).collect();
        self.pool
            .set_subnet(saved.subnet, saved.gateway.map(IpAddr::V4));
        self.pool.set_ready(ready.iter().copied());
        if let (Some(pool6), Some(prefix)) = (&self.ipv6, saved.ipv6_prefix) {
            pool6.set_prefix(prefix);
        }
        {
            let mut s = self.shared.state();
            s.instance_id = Some(saved.instance_id.clone());
            s.subnet = Some(saved.subnet.to_string());
        }
        tracing::info!(
            instance = %saved.instance_id,
            enis = enis.len(),
            addresses = ready.len(),
            file = %dir.join(saved::FILE).display(),
            "serving the saved ENI pool until the cloud API answers"
        );
        self.pool.set_label(format!(
            "saved ENI pool of {} ({} ENIs, cloud API not reached yet)",
            saved.instance_id,
            enis.len()
        ));
        self.shared.hand_to_routing(enis);
        *self.saved.lock().unwrap_or_else(PoisonError::into_inner) = Some(saved);
    }

    /// Saves the ENIs with links and their addresses that may be handed out,
    /// when that changed.
    fn save(&self, instance_id: &str, subnet: Cidr, enis: &[Eni]) {
        let Some(dir) = &self.state_dir else { return };
        let ready = self.pool.ready();
        let pool = SavedPool {
            instance_id: instance_id.to_owned(),
            subnet,
            gateway: Some(super::POD_GATEWAY),
            enis: enis
                .iter()
                .map(|e| Eni {
                    ips: e
                        .ips
                        .iter()
                        .filter(|ip| ready.contains(&IpAddr::V4(**ip)))
                        .copied()
                        .collect(),
                    ..e.clone()
                })
                .collect(),
            ipv6_prefix: self.ipv6.as_ref().and_then(Ipv6Pool::prefix),
        };
        let mut last = self.saved.lock().unwrap_or_else(PoisonError::into_inner);
        if last.as_ref() == Some(&pool) {
            return;
        }
        match saved::store(dir, &pool) {
            Ok(()) => *last = Some(pool),
            Err(e) => {
                tracing::warn!(error = %e, "cannot save the ENI pool; a restart during a cloud outage would start empty");
            }
        }
    }

    /// One round: list, correct with the ledger, links, publish, plan, apply.
    pub(crate) fn reconcile(
        &self,
        identity: &InstanceIdentity,
        limits: InstanceLimits,
    ) -> Result<Round, ReconcileError> {
        // From here on an ENI's `secondary_ips` are its slots of this
        // node's kind: addresses, or prefixes by first address.
        let listed = self
            .cloud
            .list_enis(&identity.instance_id)?
            .into_iter()
            .map(|e| EniInfo {
                secondary_ips: self.kind.slots(&e),
                ..e
            })
            .collect();
        let corrected = self.ledger().correct(listed, Instant::now());
        let enis = corrected.enis;
        let net = self.net(identity);
        let links = self.links.list().map_err(ReconcileError::Link)?;
        let mut records = Vec::new();
        let mut ready: Vec<Ipv4Addr> = Vec::new();
        let mut waiting = 0;
        for e in &enis {
            if is_foreign(e, &net) {
                records.push(EniRecord {
                    id: e.id.clone(),
                    device_index: e.device_index,
                    link: None,
                    managed: false,
                    primary_ip: Some(e.primary_ip),
                    ips: Vec::new(),
                    prefixes: Vec::new(),
                });
                continue;
            }
            let link = links.iter().find(|(mac, _)| *mac == e.mac).map(|(_, l)| l);
            if let Some(l) = link {
                // The primary interface belongs to the node; podnet leaves it alone.
                if e.device_index != 0 && (!l.up || l.mtu != ENI_MTU) {
                    self.links
                        .bring_up(&l.name, ENI_MTU)
                        .map_err(ReconcileError::Link)?;
                    tracing::info!(eni = %e.id, link = %l.name, mtu = ENI_MTU, "ENI link up");
                }
                // Only what EC2 has confirmed is handed out.
                ready.extend(
                    e.secondary_ips
                        .iter()
                        .filter(|slot| corrected.confirmed.contains(slot))
                        .flat_map(|slot| self.kind.addresses(*slot)),
                );
            } else {
                waiting += 1;
            }
            records.push(EniRecord {
                id: e.id.clone(),
                device_index: e.device_index,
                link: link.map(|l| l.name.clone()),
                managed: e.managed,
                primary_ip: Some(e.primary_ip),
                ips: self.addresses(&e.secondary_ips),
                prefixes: self
                    .prefixes(&e.secondary_ips)
                    .into_iter()
                    .chain(
                        e.ipv6_prefixes
                            .iter()
                            .copied()
                            .filter(|_| self.ipv6.is_some()),
                    )
                    .collect(),
            });
        }
        self.pool.set_ready(ready);
        {
            let mut s = self.shared.state();
            s.enis = records;
            s.last_error = None;
            s.failures = 0;
        }
        self.relabel();
        let mut round = Round {
            changes: 0,
            waiting_for_links: waiting,
            unconfirmed: corrected.unconfirmed,
        };
        self.reconcile_ipv6(&enis, &mut round)?;
        self.publish(identity, &enis);
        let views = self.views(&enis, &net);
        let actions = warm::plan(&self.targets, self.kind, &limits, &views);
        for action in actions {
            let applied = self.apply(identity, &enis, &action);
            // Withdrawn addresses leave the saved pool, even if the call failed.
            self.publish(identity, &enis);
            if applied? {
                round.changes += 1;
            }
        }
        Ok(round)
    }

    /// With `--eni-ipv6`: hands out the primary ENI's IPv6 prefix once a
    /// listing shows it, and delegates one when it has none (once per
    /// [`SETTLE`]: a listing may lag the call).
    fn reconcile_ipv6(&self, enis: &[EniInfo], round: &mut Round) -> Result<(), CloudError> {
        let Some(pool6) = &self.ipv6 else {
            return Ok(());
        };
        let Some(primary) = enis.iter().find(|e| e.device_index == 0) else {
            return Ok(());
        };
        let mut assigned = self
            .ipv6_assigned
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(prefix) = primary.ipv6_prefixes.first() {
            if pool6.prefix() != Some(*prefix) {
                tracing::info!(eni = %primary.id, %prefix, "pods get IPv6 addresses of this prefix");
                pool6.set_prefix(*prefix);
            }
            *assigned = None;
            return Ok(());
        }
        if assigned.is_some_and(|at| at.elapsed() < SETTLE) {
            round.unconfirmed += 1;
            return Ok(());
        }
        tracing::info!(eni = %primary.id, "delegating an IPv6 prefix");
        let prefix = self.cloud.assign_ipv6_prefix(&primary.id)?;
        tracing::info!(eni = %primary.id, %prefix, "IPv6 prefix delegated; handed out once a listing shows it");
        *assigned = Some(Instant::now());
        round.changes += 1;
        Ok(())
    }

    /// Every address of `slots`.
    fn addresses(&self, slots: &[Ipv4Addr]) -> Vec<Ipv4Addr> {
        slots
            .iter()
            .flat_map(|slot| self.kind.addresses(*slot))
            .collect()
    }

    /// `slots` as prefixes (none when slots are addresses).
    fn prefixes(&self, slots: &[Ipv4Addr]) -> Vec<Cidr> {
        if self.kind != SlotKind::Prefix {
            return Vec::new();
        }
        slots
            .iter()
            .filter_map(|slot| Cidr::new(IpAddr::V4(*slot), SlotKind::PREFIX_LEN).ok())
            .collect()
    }

    fn views(&self, enis: &[EniInfo], net: &PodNetwork) -> Vec<EniView> {
        let (allocated, cooling) = (self.busy)();
        let is_busy =
            |ip: Ipv4Addr| allocated.contains(&IpAddr::V4(ip)) || cooling.contains(&IpAddr::V4(ip));
        // Busy addresses of a slot.
        let busy_in = |slot: &Ipv4Addr| {
            u32::try_from(self.kind.addresses(*slot).filter(|ip| is_busy(*ip)).count())
                .unwrap_or(u32::MAX)
        };
        enis.iter()
            .map(|e| {
                let (busy, mut idle): (Vec<Ipv4Addr>, Vec<Ipv4Addr>) =
                    e.secondary_ips.iter().partition(|slot| busy_in(slot) > 0);
                // Release the highest slots first.
                idle.reverse();
                let partly_free = busy
                    .iter()
                    .map(|slot| self.kind.size().saturating_sub(busy_in(slot)))
                    .fold(0, u32::saturating_add);
                EniView {
                    id: e.id.clone(),
                    device_index: e.device_index,
                    managed: e.managed,
                    attachment_id: e.attachment_id.clone(),
                    ips: e.secondary_ips.clone(),
                    busy: u32::try_from(busy.len()).unwrap_or(u32::MAX),
                    idle,
                    partly_free,
                    foreign: is_foreign(e, net),
                }
            })
            .collect()
    }

    /// Withdraws the addresses of `slots` from the pool, then keeps the
    /// slots still wholly idle: an allocation that picked one before the
    /// withdrawal is visible now (both happen under the allocator's lock).
    fn withdraw(&self, slots: &[Ipv4Addr]) -> Vec<Ipv4Addr> {
        for ip in self.addresses(slots) {
            self.pool.withdraw(ip);
        }
        let (allocated, cooling) = (self.busy)();
        slots
            .iter()
            .filter(|slot| {
                self.kind.addresses(**slot).all(|ip| {
                    !allocated.contains(&IpAddr::V4(ip)) && !cooling.contains(&IpAddr::V4(ip))
                })
            })
            .copied()
            .collect()
    }

    /// Applies one action; `false` when it turned out unnecessary.
    fn apply(
        &self,
        identity: &InstanceIdentity,
        enis: &[EniInfo],
        action: &Action,
    ) -> Result<bool, CloudError> {
        match action {
            Action::Assign { eni, count } => {
                let kind = self.kind.noun();
                tracing::info!(eni, count, kind, "assigning slots");
                let slots = self.cloud.assign(eni, self.kind, *count)?;
                tracing::info!(eni, kind, slots = ?slots, "assigned; handed out once a listing shows them");
                self.ledger().assigned(eni, &slots, Instant::now());
            }
            Action::CreateEni {
                device_index,
                slots,
            } => {
                tracing::info!(
                    device_index,
                    slots,
                    kind = self.kind.noun(),
                    "creating and attaching an ENI"
                );
                let net = self.net(identity);
                let created = self.cloud.create_and_attach_eni(
                    &identity.instance_id,
                    &net.subnet_id,
                    &net.security_groups,
                    *device_index,
                    self.kind,
                    *slots,
                )?;
                let created = EniInfo {
                    secondary_ips: self.kind.slots(&created),
                    ..created
                };
                tracing::info!(eni = %created.id, device_index, slots = ?created.secondary_ips, "ENI attached");
                self.ledger().created(created, Instant::now());
            }
            Action::Unassign { eni, ips } => {
                let slots = self.withdraw(ips);
                if slots.is_empty() {
                    return Ok(false);
                }
                tracing::info!(eni, kind = self.kind.noun(), slots = ?slots, "releasing surplus slots");
                self.cloud.unassign(eni, self.kind, &slots)?;
                self.ledger().unassigned(&slots, Instant::now());
            }
            Action::DeleteEni { eni, attachment_id } => {
                let Some(info) = enis.iter().find(|e| &e.id == eni) else {
                    return Ok(false);
                };
                if !info.managed || info.device_index == 0 {
                    return Ok(false);
                }
                let left = self.withdraw(&info.secondary_ips);
                if left.len() != info.secondary_ips.len() {
                    // Something was allocated meanwhile: keep the ENI.
                    return Ok(false);
                }
                tracing::info!(eni, "detaching and deleting a surplus ENI");
                self.cloud.detach_and_delete_eni(eni, attachment_id)?;
                self.ledger()
                    .deleted(eni, &info.secondary_ips, Instant::now());
            }
        }
        Ok(true)
    }

    /// Names the pool for exhaustion errors: `2/3 ENIs attached (subnet ...)`.
    fn relabel(&self) {
        let s = self.shared.state();
        let label = match (s.max_enis, &s.subnet) {
            (Some(max), Some(subnet)) => {
                let mut l = format!("{}/{max} ENIs attached (subnet {subnet})", s.enis.len());
                let waiting = s.enis.iter().filter(|e| e.link.is_none()).count();
                if waiting > 0 {
                    let _ = write!(l, ", {waiting} waiting for its link");
                }
                if let Some(e) = &s.last_error {
                    let _ = write!(l, ", cloud API failing: {e}");
                }
                l
            }
            _ => format!(
                "ENI pool not ready: {}",
                s.last_error
                    .as_deref()
                    .unwrap_or("waiting for the cloud API")
            ),
        };
        drop(s);
        self.pool.set_label(label);
    }

    /// Gives the routing subsystem the ENIs whose links exist, and saves
    /// them with the addresses that may be handed out.
    fn publish(&self, identity: &InstanceIdentity, enis: &[EniInfo]) {
        let net = self.net(identity);
        let s = self.shared.state();
        let subnet = net.subnet_cidr;
        // IMDS gives IPv4 subnets only.
        let gateway = vpc_router(subnet);
        let list: Vec<Eni> = enis
            .iter()
            .filter(|e| !is_foreign(e, &net))
            .filter_map(|e| {
                let link = s.enis.iter().find(|r| r.id == e.id)?.link.clone()?;
                let Some(table) = table_of(e.device_index) else {
                    tracing::warn!(eni = %e.id, device_index = e.device_index, "no routing table for this device index; its addresses are not routed");
                    return None;
                };
                Some(Eni {
                    name: link,
                    mac: Some(e.mac),
                    table,
                    subnet,
                    gateway,
                    ips: self.addresses(&e.secondary_ips),
                    // Pods' IPv6 addresses (--eni-ipv6) are routed from the
                    // main table, as the AWS VPC CNI's IPv6 mode does.
                    subnet6: None,
                    gateway6: None,
                    ips6: Vec::new(),
                })
            })
            .collect();
        drop(s);
        self.save(&identity.instance_id, subnet, &list);
        self.shared.hand_to_routing(list);
    }
}

#[cfg(test)]
pub(crate) fn test_worker(
    targets: Targets,
    cloud: Arc<dyn CloudProvider>,
    links: Arc<dyn Links>,
    busy: BusyFn,
    pool: EniPool,
) -> (Worker, Arc<Shared>) {
    let shared = Arc::new(Shared::default());
    (
        Worker {
            targets,
            kind: SlotKind::Address,
            ipv6: None,
            ipv6_assigned: Mutex::default(),
            cloud,
            links,
            busy,
            pool,
            shared: shared.clone(),
            configs: EniConfigs::default(),
            net: Mutex::default(),
            ledger: Mutex::default(),
            state_dir: None,
            saved: Mutex::default(),
            leak_grace: super::DEFAULT_LEAK_GRACE,
            first_seen_detached: Mutex::default(),
        },
        shared,
    )
}
