//! The DNS thread: drains events into the query log, sweeps timeouts,
//! keeps attachments equal to the registry, and samples totals for `top`.

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{atomic::Ordering, Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use aya::maps::{MapData, RingBuf};
use podnet_common::dns::DnsEvent;

use super::{
    attach::{Attacher, ReconcileReport, Role},
    cause::{self, FailureCounts},
    decode, desired_interfaces, lock, sweep, top,
    tracer::DnsTracer,
    DnsSettings, QueryLog, Shared,
};
use crate::{
    bpf::ring::RingReader,
    endpoint::{Changes, Follower, Registry},
    flowdrops::FlowDrops,
    heartbeat::{self, Heartbeat},
};

/// How often the attachments are compared with the registry even when it
/// did not change (interfaces may appear after their endpoint).
const RECONCILE_EVERY: Duration = Duration::from_secs(2);
/// Endpoint changes closer together than this are one reconcile (pod churn
/// on a busy node must not keep the thread listing interfaces).
const CHANGE_COALESCE: Duration = Duration::from_millis(20);
/// How often per-(pod, server) totals are sampled for `dns.top`.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// Longest wait between two drains of the ring buffer.
/// How often the maps are walked for departed clients while no pod left:
/// timeouts of a departed pod's last queries arrive after it left.
const FOLD_EVERY: Duration = Duration::from_secs(30);

/// When the maps are next walked for clients that left: at once when an
/// endpoint address went away, else every [`FOLD_EVERY`] (each walk lists
/// six maps, too much for every reconcile). A new address alone is no
/// reason: nothing of it can be in the maps as a departed client, and a new
/// pod's reconcile is what stands between its ADD and its programs.
#[derive(Default)]
struct Departures {
    live: std::collections::BTreeSet<podnet_common::AddrKey>,
    last: Option<Instant>,
}

impl Departures {
    fn due(&mut self, live: std::collections::BTreeSet<podnet_common::AddrKey>) -> bool {
        let left = !self.live.is_subset(&live);
        let due = left || self.last.is_none_or(|t| t.elapsed() >= FOLD_EVERY);
        if due {
            self.last = Some(Instant::now());
        }
        self.live = live;
        due
    }
}

/// The entries of `desired` that `previous` lacks, when that is all that
/// changed (no interface left or changed role); `None` otherwise.
fn only_added(
    previous: &BTreeMap<String, Role>,
    desired: &BTreeMap<String, Role>,
) -> Option<BTreeMap<String, Role>> {
    if previous
        .iter()
        .any(|(i, role)| desired.get(i) != Some(role))
    {
        return None;
    }
    Some(
        desired
            .iter()
            .filter(|(i, _)| !previous.contains_key(*i))
            .map(|(i, role)| (i.clone(), *role))
            .collect(),
    )
}

/// The DNS event thread's name (and its heartbeat's).
pub const EVENTS_THREAD: &str = "podnet-dns-ev";
/// The DNS upkeep thread's name (and its heartbeat's).
pub const UPKEEP_THREAD: &str = "podnet-dns";
const EVENT_POLL: Duration = Duration::from_millis(100);
/// Longest a failed query waits for the drop readers before it is logged
/// with the drops read so far (they read at least every 100 ms).
const DEFER_LIMIT: Duration = Duration::from_secs(1);
/// Most failed queries kept waiting for the drop readers; beyond, the oldest
/// is logged at once with the drops read so far (a pod that makes failures
/// faster than the readers catch up cannot grow the agent's memory).
const DEFER_CAPACITY: usize = 4096;

/// The DNS threads' shared state: one thread drains events, the other
/// sweeps timeouts, reconciles attachments and samples for `top`.
///
/// Two threads, so that events are drained while a sweep walks a large
/// pending map: measured at 20,000 NXDOMAIN answers/s with a server that
/// answered only 73 % of the queries, one thread lost 5,588 of 73,000 events.
#[derive(Clone)]
pub(super) struct Worker {
    pub(super) tracer: Arc<Mutex<DnsTracer>>,
    pub(super) attacher: Arc<Mutex<Attacher>>,
    pub(super) registry: Registry,
    pub(super) log: QueryLog,
    pub(super) hub: crate::api::follow::EventHub,
    pub(super) history: Arc<Mutex<top::History>>,
    pub(super) last_reconcile: Arc<Mutex<ReconcileReport>>,
    pub(super) shared: Arc<Shared>,
    pub(super) settings: DnsSettings,
    /// Recent drops of DNS flows, recorded by the conntrack subsystem.
    pub(super) drops: FlowDrops,
    /// `podnet_dns_failures_total`.
    pub(super) failures: Arc<FailureCounts>,
    /// Failed queries waiting until every drop before them has been read.
    pub(super) deferred: Arc<Mutex<VecDeque<(Instant, DnsEvent)>>>,
    /// Tells the registry which change each reconcile acted on.
    pub(super) follower: Arc<Follower>,
}

impl Worker {
    /// Drains the ring buffer until stopped: woken by the kernel when 64 KiB
    /// are pending, and at least every [`EVENT_POLL`].
    pub(super) fn run_events(self, ring: RingBuf<MapData>) {
        let heartbeat = heartbeat::registry().register(EVENTS_THREAD, heartbeat::SILENCE_LIMIT);
        let mut reader = RingReader::new(ring, EVENT_POLL);
        while !self.shared.stop.load(Ordering::Relaxed) && heartbeat.beat() {
            // One clock reading per batch of records, not per record.
            let mut clock = None;
            reader.read(|item| {
                let clock = *clock.get_or_insert_with(WallClock::now);
                self.on_event(item, clock);
            });
            self.flush_deferred(false);
        }
        let clock = WallClock::now();
        reader.drain(|item| self.on_event(item, clock));
        self.flush_deferred(true);
        self.retire_on_stop(heartbeat);
    }

    /// A requested stop is not a dead thread.
    fn retire_on_stop(&self, heartbeat: Heartbeat) {
        if self.shared.stop.load(Ordering::Relaxed) {
            heartbeat.retire();
        }
    }

    /// Sweeps timeouts, reconciles attachments and samples until stopped;
    /// reconciles at once when the registry changes.
    pub(super) fn run_upkeep(self, changes: &Changes) {
        // Sweep four times per timeout (at most every second), so a timeout
        // is counted at most a quarter late.
        let sweep_every =
            (self.settings.timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
        let (mut last_sweep, mut last_reconcile, mut last_sample) =
            (Instant::now(), Instant::now(), Instant::now());
        let mut pending = false;
        let mut departures = Departures::default();
        let mut previous = None;
        let heartbeat = heartbeat::registry().register(UPKEEP_THREAD, heartbeat::SILENCE_LIMIT);
        while !self.shared.stop.load(Ordering::Relaxed) && heartbeat.beat() {
            let wait = if pending {
                CHANGE_COALESCE.saturating_sub(last_reconcile.elapsed())
            } else {
                sweep_every.min(Duration::from_millis(100))
            };
            pending |= changes.wait(wait);
            if last_sweep.elapsed() >= sweep_every {
                last_sweep = Instant::now();
                self.sweep();
            }
            let since = last_reconcile.elapsed();
            let full = since >= RECONCILE_EVERY;
            if (pending && since >= CHANGE_COALESCE) || full {
                pending = false;
                last_reconcile = Instant::now();
                self.reconcile(&mut departures, &mut previous, full);
            }
            if last_sample.elapsed() >= SAMPLE_EVERY {
                last_sample = Instant::now();
                if let Ok(s) = lock(&self.tracer).snapshot() {
                    let totals = top::totals(&s, &self.registry);
                    lock(&self.history).push(Instant::now(), totals);
                }
            }
        }
        self.retire_on_stop(heartbeat);
    }

    fn on_event(&self, item: &[u8], clock: WallClock) {
        self.shared.received.fetch_add(1, Ordering::Relaxed);
        match decode::decode(item) {
            Ok(event) => self.log_event(&event, clock),
            Err(e) => {
                self.shared.decode_errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "skipping DNS event");
            }
        }
    }

    /// Logs `event`, or, when its cause depends on drops not read yet,
    /// keeps it until they are ([`Self::flush_deferred`]).
    fn log_event(&self, event: &DnsEvent, clock: WallClock) {
        if cause::is_failure(event) && !self.drops.settled(event.timestamp_ns) {
            let oldest = {
                let mut deferred = lock(&self.deferred);
                deferred.push_back((Instant::now(), *event));
                (deferred.len() > DEFER_CAPACITY)
                    .then(|| deferred.pop_front())
                    .flatten()
            };
            if let Some((_, oldest)) = oldest {
                self.finish(&oldest, clock);
            }
            return;
        }
        self.finish(event, clock);
    }

    /// Logs the deferred events whose drops have all been read, or that
    /// waited [`DEFER_LIMIT`] (a drop reader that stopped must not hold
    /// them); every one when `all`.
    fn flush_deferred(&self, all: bool) {
        loop {
            let next = {
                let mut deferred = lock(&self.deferred);
                match deferred.front() {
                    Some((since, event))
                        if all
                            || since.elapsed() >= DEFER_LIMIT
                            || self.drops.settled(event.timestamp_ns) =>
                    {
                        deferred.pop_front()
                    }
                    _ => None,
                }
            };
            let Some((_, event)) = next else {
                return;
            };
            self.finish(&event, WallClock::now());
        }
    }

    /// Gives `event` its cause, counts it when it is a failure, and logs and
    /// publishes its record.
    fn finish(&self, event: &DnsEvent, clock: WallClock) {
        let ms = clock.unix_ms(event.timestamp_ns);
        match decode::record_of(event, &self.registry, ms) {
            Ok(record) => {
                let record = record.with_diagnosis(cause::diagnose(event, &self.drops));
                if let (true, Some(c)) = (cause::is_failure(event), record.cause) {
                    self.failures.add(record.client.ip(), record.server.ip(), c);
                }
                self.hub.publish(|| record.clone());
                self.log.push(record);
            }
            Err(e) => {
                self.shared.decode_errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "skipping DNS event");
            }
        }
    }

    fn sweep(&self) {
        let events = {
            let mut tracer = lock(&self.tracer);
            sweep::sweep(
                &mut tracer.sweep_maps(),
                sweep::monotonic_ns(),
                self.settings.timeout,
            )
        };
        let clock = WallClock::now();
        for event in &events {
            self.log_event(event, clock);
        }
    }

    /// Brings the attachments in line with the registry: only the new
    /// interfaces' hooks when the change just added interfaces to
    /// `previous` (the desired set the last reconcile acted on), else (and
    /// when `full`) a pass over every hook of the node.
    fn reconcile(
        &self,
        departures: &mut Departures,
        previous: &mut Option<BTreeMap<String, Role>>,
        full: bool,
    ) {
        let started = Instant::now();
        let generation = self.registry.generation();
        let desired = desired_interfaces(&self.registry, &self.settings.uplinks);
        let live = self
            .registry
            .endpoints()
            .into_iter()
            .flat_map(|(_, e)| e.ips)
            .map(crate::bpf::endpoints::addr_key)
            .collect();
        let fold = departures.due(live);
        let added = match previous.as_ref() {
            Some(previous) if !full && !fold => only_added(previous, &desired),
            _ => None,
        };
        let result = {
            let mut tracer = lock(&self.tracer);
            let moved = if fold {
                let live_ips = departures
                    .live
                    .iter()
                    .filter_map(|k| crate::net::kernel_addr(&k.addr, k.family))
                    .collect();
                self.failures.fold_departed(&live_ips);
                tracer.fold_departed(&departures.live)
            } else {
                0
            };
            if moved > 0 {
                tracing::debug!(
                    keys = moved,
                    "DNS counts of departed pods moved to the host's"
                );
            }
            let mut attacher = lock(&self.attacher);
            match added.and_then(|added| attacher.attach_added(&mut tracer, &added)) {
                Some(report) => Ok(report),
                None => attacher.reconcile(&mut tracer, &desired),
            }
        };
        *previous = Some(desired);
        // Acted on, whatever the outcome: a hook that failed is retried by
        // later reconciles, and an ADD waiting for it would only wait longer.
        self.follower.caught_up(generation);
        match result {
            Ok(mut report) => {
                report.took_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                if !report.attached.is_empty()
                    || !report.removed.is_empty()
                    || !report.replaced.is_empty()
                {
                    tracing::info!(
                        attached = ?report.attached,
                        removed = ?report.removed,
                        replaced = ?report.replaced,
                        took_us = report.took_us,
                        "DNS attachments changed"
                    );
                }
                // The last reconcile that found something to do: the
                // periodic ones that find all in place would hide it.
                if !report.is_empty() {
                    *lock(&self.last_reconcile) = report;
                }
            }
            Err(e) => tracing::warn!(error = %e, "reconciling DNS attachments failed"),
        }
    }
}

/// The wall clock against the kernel's monotonic clock (event timestamps),
/// read once and applied to a batch of records.
#[derive(Clone, Copy, Debug)]
struct WallClock {
    /// Unix time minus monotonic time, in nanoseconds.
    offset_ns: i128,
}

impl WallClock {
    /// Reads both clocks.
    fn now() -> Self {
        let monotonic = i128::from(sweep::monotonic_ns());
        let unix = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| i128::try_from(d.as_nanos()).unwrap_or(i128::MAX));
        Self {
            offset_ns: unix - monotonic,
        }
    }

    /// Unix milliseconds of a monotonic timestamp.
    fn unix_ms(self, monotonic_ns: u64) -> u64 {
        let unix_ns = i128::from(monotonic_ns) + self.offset_ns;
        u64::try_from(unix_ns / 1_000_000).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bpf::endpoints::addr_key;

    fn live(ips: &[&str]) -> std::collections::BTreeSet<podnet_common::AddrKey> {
        ips.iter().map(|ip| addr_key(ip.parse().unwrap())).collect()
    }

    #[test]
    fn only_a_change_that_adds_interfaces_is_attached_without_a_full_pass() {
        use super::super::attach::Role;
        let set = |entries: &[(&str, Role)]| -> std::collections::BTreeMap<String, Role> {
            entries.iter().map(|(i, r)| ((*i).to_owned(), *r)).collect()
        };
        let before = set(&[("eth0", Role::Uplink), ("vpod1", Role::Pod)]);
        assert_eq!(
            only_added(
                &before,
                &set(&[
                    ("eth0", Role::Uplink),
                    ("vpod1", Role::Pod),
                    ("vpod2", Role::Pod)
                ])
            ),
            Some(set(&[("vpod2", Role::Pod)]))
        );
        assert_eq!(only_added(&before, &before), Some(set(&[])), "nothing new");
        assert_eq!(
            only_added(&before, &set(&[("eth0", Role::Uplink)])),
            None,
            "vpod1 left"
        );
        assert_eq!(
            only_added(
                &before,
                &set(&[("eth0", Role::Uplink), ("vpod1", Role::Uplink)])
            ),
            None,
            "vpod1 changed role"
        );
    }

    #[test]
    fn maps_are_walked_when_an_address_leaves_not_when_one_arrives() {
        let mut departures = Departures::default();
        assert!(
            departures.due(live(&["10.0.0.2"])),
            "the first reconcile walks"
        );
        assert!(
            !departures.due(live(&["10.0.0.2", "10.0.0.3"])),
            "a new pod"
        );
        assert!(
            !departures.due(live(&["10.0.0.2", "10.0.0.3"])),
            "nothing changed"
        );
        assert!(departures.due(live(&["10.0.0.3"])), "10.0.0.2 left");
        assert!(
            !departures.due(live(&["10.0.0.3", "fd00::2"])),
            "a new address"
        );
        assert!(
            departures.due(live(&["10.0.0.2"])),
            "both 10.0.0.3 and fd00::2 left"
        );
    }

    #[test]
    fn a_batch_clock_turns_monotonic_timestamps_into_unix_milliseconds() {
        let clock = WallClock {
            offset_ns: 1_700_000_000_000_000_000,
        };
        assert_eq!(clock.unix_ms(2_500_000_000), 1_700_000_002_500);
        // Read now, a timestamp of now is now, to the millisecond.
        let clock = WallClock::now();
        let unix_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_millis();
        let got = u128::from(clock.unix_ms(sweep::monotonic_ns()));
        assert!(got.abs_diff(unix_ms) <= 1, "{got} against {unix_ms}");
    }
}
