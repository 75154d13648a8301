//! The conntrack race tracer in the kernel: load, attach or adopt, read its
//! maps, and deliver its race events.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use aya::{
    maps::{MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{links::FdLink, BtfTracePoint, KProbe},
    Btf, Ebpf, EbpfLoader,
};
use podnet_common::conntrack::{
    counter, direction, drop_counter, maps as m, DestKey, DropKey, KernelOffsets, RaceHook,
    ReasonKey, CONFIRM_EXIT_PROGRAM, CONFIRM_FUNCTION, OFFSETS_GLOBAL, PROGRAM_NAME,
};

use super::{
    ctnetlink::ConntrackTable,
    events::{decode, Enricher},
    kernel_addr, DestinationCount, DropCount, DropKind, RaceLog, ReasonCount, TracerCounters,
    TracerSnapshot,
};
use crate::{
    bpf::{self, btf::KernelBtf, link::Attachment, ring::RingReader, BpfError},
    heartbeat,
};

/// Sub-directory of `--bpffs` holding the tracer's maps and links.
pub const PIN_SUBDIR: &str = "conntrack";
/// Base name of the pinned `tp_btf/kfree_skb` link.
pub const LINK_PIN: &str = "link_kfree_skb";
/// Base name of the pinned confirm kretprobe link.
pub const CONFIRM_EXIT_PIN: &str = "link_confirm_exit";
/// The tracepoint the tracer attaches to.
pub const TRACEPOINT: &str = "kfree_skb";
/// Present when the kernel can create kprobes (`CONFIG_KPROBES`): the kprobe
/// PMU registers itself in sysfs.
const KPROBE_PMU: &str = "/sys/bus/event_source/devices/kprobe/type";

/// Which hook counts insert races (`--race-hook`).
///
/// `auto` takes the confirm kretprobe where the kernel can create kprobes
/// (the kernel's own `NF_DROP` verdict) and the drop tracepoint elsewhere, or
/// when the probe cannot attach (logged as a warning). Both are exact on
/// every kernel tested (6.1 and 6.12 with either hook, 6.18 with the
/// tracepoint, which is all it allows).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RaceHookChoice {
    /// The confirm probe where kprobes exist, else the drop tracepoint.
    #[default]
    Auto,
    /// Always `tp_btf/kfree_skb`.
    Tracepoint,
    /// kprobe/kretprobe on `__nf_conntrack_confirm`; fails where kprobes are
    /// not available.
    Probe,
}

/// The hook in use, as `podnetctl status` and `podnet_build_info` name it.
pub fn hook_name(hook: RaceHook) -> &'static str {
    match hook {
        RaceHook::DropTracepoint => "tp_btf/kfree_skb",
        RaceHook::ConfirmProbe => "kretprobe/__nf_conntrack_confirm",
    }
}

/// True when this kernel can attach kprobes.
pub fn kprobes_available() -> bool {
    Path::new(KPROBE_PMU).exists()
}

/// The hook to set up for `choice` on a kernel that can (or cannot) create
/// kprobes, and the hook to fall back to if that fails.
fn candidate_hooks(
    choice: RaceHookChoice,
    kprobes: bool,
) -> Result<(RaceHook, Option<RaceHook>), String> {
    match (choice, kprobes) {
        (RaceHookChoice::Auto, true) => {
            Ok((RaceHook::ConfirmProbe, Some(RaceHook::DropTracepoint)))
        }
        (RaceHookChoice::Auto | RaceHookChoice::Tracepoint, _) => {
            Ok((RaceHook::DropTracepoint, None))
        }
        (RaceHookChoice::Probe, true) => Ok((RaceHook::ConfirmProbe, None)),
        (RaceHookChoice::Probe, false) => Err(format!(
            "this kernel cannot create kprobes ({KPROBE_PMU} is missing), so {CONFIRM_FUNCTION} cannot be probed"
        )),
    }
}

/// How the tracer is set up.
#[derive(Clone, Debug)]
pub struct TracerConfig {
    /// The agent's `--bpffs` directory.
    pub bpffs: PathBuf,
    /// Network namespace inode to observe (0: all).
    pub netns_inode: u32,
    /// Race events per CPU per second sent to user space (0: unlimited).
    pub event_budget_per_cpu: u32,
    /// Which hook counts races.
    pub race_hook: RaceHookChoice,
    /// Ports whose dropped packets are sent as flow drops (the DNS ports; at
    /// most [`podnet_common::conntrack::FLOW_PORTS`]).
    pub flow_ports: Vec<u16>,
}

/// The attached tracer and its maps.
///
/// It holds no program object: the links hold the programs. A link adopted
/// from a previous agent keeps the instance that agent loaded (the same
/// object and globals, by its fingerprint) and none is loaded beside it, so
/// a restart leaves one instance of each program in the kernel.
pub struct Tracer {
    /// Open handles on the attached links (race hook, confirm probe): they
    /// keep counting if the pins vanish under the agent (bpffs unmounted).
    _links: [Option<FdLink>; 2],
    drops: PerCpuHashMap<MapData, DropKey, u64>,
    destinations: PerCpuHashMap<MapData, DestKey, u64>,
    counters: PerCpuArray<MapData, u64>,
    events: Option<RingBuf<MapData>>,
    /// `CT_FLOW_DROPS`, until the flow-drop thread takes it.
    flow_drops: Option<RingBuf<MapData>>,
    endpoints: Option<aya::maps::HashMap<MapData, podnet_common::AddrKey, u8>>,
    /// `CT_DEPARTED`: drops of sources that left, under the unknown source
    /// (written by user space only; pinned, so they outlive the agent).
    departed: aya::maps::HashMap<MapData, DropKey, u64>,
    /// `CT_DROP_REASONS`: drops with other reasons per endpoint.
    reasons: PerCpuHashMap<MapData, ReasonKey, u64>,
    /// `CT_REASONS_DEPARTED`: those of endpoints that left (user space only).
    reasons_departed: aya::maps::HashMap<MapData, ReasonKey, u64>,
    drop_counters: PerCpuArray<MapData, u64>,
    /// `enum skb_drop_reason` of the running kernel: value → name.
    reason_names: HashMap<u32, String>,
    attachment: Attachment,
    program_id: u32,
    hook: RaceHook,
    pin_dir: PathBuf,
}

impl Tracer {
    /// Resolves kernel offsets, opens the pinned maps, and loads and
    /// attaches the programs (or adopts the pinned links of the same
    /// programs, loading nothing).
    pub fn start(config: &TracerConfig) -> Result<Self, BpfError> {
        let pin_dir = bpf::fs::prepare_pin_dir(&config.bpffs.join(PIN_SUBDIR))?;
        let btf = KernelBtf::load()?;
        let offsets = btf.conntrack_offsets()?;
        let reason_names = btf.drop_reason_names()?;
        let (hook, fallback) =
            candidate_hooks(config.race_hook, kprobes_available()).map_err(|why| {
                BpfError::program(CONFIRM_EXIT_PROGRAM, format!("--race-hook probe: {why}"))
            })?;
        let started = match (Self::start_with(config, &pin_dir, offsets, hook), fallback) {
            (Err(e), Some(fallback)) => {
                tracing::warn!(
                    error = %e,
                    hook = hook_name(hook),
                    fallback = hook_name(fallback),
                    "race hook could not be set up; using the fallback"
                );
                Self::start_with(config, &pin_dir, offsets, fallback)
            }
            (started, _) => started,
        };
        started.map(|tracer| Self {
            reason_names,
            ..tracer
        })
    }

    fn start_with(
        config: &TracerConfig,
        pin_dir: &Path,
        offsets: KernelOffsets,
        hook: RaceHook,
    ) -> Result<Self, BpfError> {
        let mut flow_ports = [0; podnet_common::conntrack::FLOW_PORTS];
        for (slot, port) in flow_ports.iter_mut().zip(&config.flow_ports) {
            *slot = *port;
        }
        let offsets = KernelOffsets {
            netns_filter: config.netns_inode,
            event_budget_per_cpu: config.event_budget_per_cpu,
            race_hook: hook as u32,
            flow_ports,
            ..offsets
        };
        tracing::debug!(?offsets, "kernel offsets from BTF");
        // Every global value is in the Debug rendering of the offsets struct.
        let globals = format!("{offsets:?}");
        let fingerprint = bpf::link::fingerprint(&[bpf::CONNTRACK_OBJECT, globals.as_bytes()]);
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .override_global(OFFSETS_GLOBAL, &offsets, true)
            .load(bpf::CONNTRACK_OBJECT)
            .map_err(|e| BpfError::Load {
                object: "podnet-conntrack",
                source: Box::new(e),
            })?;
        // The precise hook first: if it cannot attach, nothing else changed.
        let mut probe_link = None;
        if hook == RaceHook::ConfirmProbe {
            let (probe, link) = attach_probe(
                &mut ebpf,
                CONFIRM_EXIT_PROGRAM,
                CONFIRM_EXIT_PIN,
                pin_dir,
                fingerprint,
            )?;
            // The kretprobe hands its verdict to the kfree_skb program
            // through the pinned CT_CONFIRM_DROPPED map, whichever load each
            // of them comes from.
            tracing::info!(attachment = %probe, "confirm kretprobe in place");
            probe_link = Some(link);
        } else {
            // A probe of an earlier configuration would reclassify drops.
            bpf::link::remove_pinned(pin_dir, CONFIRM_EXIT_PIN)?;
        }
        let program: &mut BtfTracePoint = bpf::program_mut(&mut ebpf, PROGRAM_NAME)?;
        let (attachment, link) = bpf::link::attach_pinned(pin_dir, LINK_PIN, fingerprint, || {
            let btf = Btf::from_sys_fs()
                .map_err(|e| BpfError::program(PROGRAM_NAME, format!("kernel BTF: {e}")))?;
            program
                .load(TRACEPOINT, &btf)
                .map_err(|e| BpfError::program(PROGRAM_NAME, format!("load (verifier): {e}")))?;
            let id = program
                .attach()
                .map_err(|e| BpfError::program(PROGRAM_NAME, e))?;
            let link = program
                .take_link(id)
                .map_err(|e| BpfError::program(PROGRAM_NAME, e))?;
            Ok(FdLink::from(link))
        })?;
        // The program that runs: this load's, or the adopted link's.
        let program_id = link.info().map_or(0, |i| i.program_id());
        let drops = bpf::take_map(&mut ebpf, m::DROPS)?;
        let destinations = bpf::take_map(&mut ebpf, m::RACE_DESTS)?;
        let counters = bpf::take_map(&mut ebpf, m::COUNTERS)?;
        let events = bpf::take_map(&mut ebpf, m::EVENTS)?;
        let flow_drops = bpf::take_map(&mut ebpf, m::FLOW_DROPS)?;
        let endpoints = bpf::take_map(&mut ebpf, m::ENDPOINTS)?;
        let departed = bpf::take_map(&mut ebpf, m::DEPARTED)?;
        let reasons = bpf::take_map(&mut ebpf, m::DROP_REASONS)?;
        let reasons_departed = bpf::take_map(&mut ebpf, m::REASONS_DEPARTED)?;
        let drop_counters = bpf::take_map(&mut ebpf, m::DROP_COUNTERS)?;
        tracing::info!(%attachment, hook = hook_name(hook), pins = %pin_dir.display(), netns = config.netns_inode, "conntrack tracer in place");
        // What is left of the load (program objects, its read-only data map)
        // goes: the links hold what runs, and an unused copy would stay in
        // the kernel as long as the agent.
        drop(ebpf);
        Ok(Self {
            _links: [Some(link), probe_link],
            drops,
            destinations,
            counters,
            events: Some(events),
            flow_drops: Some(flow_drops),
            endpoints: Some(endpoints),
            departed,
            reasons,
            reasons_departed,
            drop_counters,
            reason_names: HashMap::new(),
            attachment,
            program_id,
            hook,
            pin_dir: pin_dir.to_owned(),
        })
    }

    /// The hook that counts insert races.
    pub fn hook(&self) -> RaceHook {
        self.hook
    }

    /// Whether the program was attached fresh, adopted, or replaced.
    pub fn attachment(&self) -> Attachment {
        self.attachment
    }

    /// Kernel id of the drop tracepoint's program: loaded by this agent, or
    /// adopted with its link.
    pub fn program_id(&self) -> u32 {
        self.program_id
    }

    /// The tracer's pin directory.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Takes the ring buffer, to hand it to the event thread (once).
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    /// Takes the flow-drop ring buffer, to hand it to its thread (once).
    pub fn take_flow_drops(&mut self) -> Option<RingBuf<MapData>> {
        self.flow_drops.take()
    }

    /// The running kernel's `enum skb_drop_reason`: value → name.
    pub fn reason_names(&self) -> HashMap<u32, String> {
        self.reason_names.clone()
    }

    /// Takes the endpoint address map, to hand it to the thread that keeps it
    /// in step with the registry (once).
    pub fn take_endpoints(
        &mut self,
    ) -> Option<aya::maps::HashMap<MapData, podnet_common::AddrKey, u8>> {
        self.endpoints.take()
    }

    /// Moves the drop counts of sources that are no endpoint any more (pods
    /// that left) out of `CT_DROPS` and `CT_DROP_REASONS`, into the unknown
    /// source's counts in `CT_DEPARTED` and `CT_REASONS_DEPARTED`: the maps
    /// hold only live pods' keys, and no counter goes back, across agent
    /// restarts too. Returns how many keys were moved.
    pub fn fold_departed(
        &mut self,
        live: &std::collections::BTreeSet<podnet_common::AddrKey>,
    ) -> Result<usize, BpfError> {
        let drops = fold_keys(
            &mut self.drops,
            &mut self.departed,
            [m::DROPS, m::DEPARTED],
            live,
            |k| (k.addr, k.family),
            |k| DropKey {
                addr: podnet_common::AddrKey::UNKNOWN,
                ..*k
            },
        )?;
        let reasons = fold_keys(
            &mut self.reasons,
            &mut self.reasons_departed,
            [m::DROP_REASONS, m::REASONS_DEPARTED],
            live,
            |k| (k.addr, k.family),
            |k| ReasonKey {
                addr: podnet_common::AddrKey::UNKNOWN,
                ..*k
            },
        )?;
        Ok(drops + reasons)
    }

    /// Reads every count from the kernel maps, summed over CPUs.
    pub fn snapshot(&self) -> Result<TracerSnapshot, BpfError> {
        let mut drops = Vec::new();
        for item in &self.departed {
            let (key, packets) = item.map_err(|e| BpfError::map(m::DEPARTED, e))?;
            drops.extend(drop_count(&key, packets));
        }
        for item in &self.drops {
            let (key, values) = item.map_err(|e| BpfError::map(m::DROPS, e))?;
            drops.extend(drop_count(&key, values.iter().sum()));
        }
        let mut destinations = Vec::new();
        for item in &self.destinations {
            let (key, values) = item.map_err(|e| BpfError::map(m::RACE_DESTS, e))?;
            let Some(addr) = kernel_addr(&key.addr, key.family) else {
                continue;
            };
            destinations.push(DestinationCount {
                destination: std::net::SocketAddr::new(addr, u16::from_be(key.port)),
                proto: key.proto,
                races: values.iter().sum(),
            });
        }
        let mut reasons = Vec::new();
        for item in &self.reasons_departed {
            let (key, packets) = item.map_err(|e| BpfError::map(m::REASONS_DEPARTED, e))?;
            reasons.extend(self.reason_count(&key, packets));
        }
        for item in &self.reasons {
            let (key, values) = item.map_err(|e| BpfError::map(m::DROP_REASONS, e))?;
            reasons.extend(self.reason_count(&key, values.iter().sum()));
        }
        let count = |index: u32| -> Result<u64, BpfError> {
            let values = self
                .counters
                .get(&index, 0)
                .map_err(|e| BpfError::map(m::COUNTERS, e))?;
            Ok(values.iter().sum())
        };
        let other = |index: u32| -> Result<u64, BpfError> {
            let values = self
                .drop_counters
                .get(&index, 0)
                .map_err(|e| BpfError::map(m::DROP_COUNTERS, e))?;
            Ok(values.iter().sum())
        };
        let counters = TracerCounters {
            netfilter_drops: count(counter::NETFILTER_DROPS)?,
            insert_races: count(counter::INSERT_RACES)?,
            events_lost: count(counter::EVENTS_LOST)?,
            events_sampled_out: count(counter::EVENTS_SAMPLED_OUT)?,
            drop_keys_full: count(counter::DROP_KEYS_FULL)?,
            dest_keys_full: count(counter::DEST_KEYS_FULL)?,
            read_errors: count(counter::READ_ERRORS)?,
            not_ip: count(counter::NOT_IP)?,
            probe_unmatched: count(counter::PROBE_UNMATCHED)?,
            other_drops: other(drop_counter::COUNTED)?,
            reason_keys_full: other(drop_counter::KEYS_FULL)?,
            other_not_ip: other(drop_counter::NOT_IP)?,
            other_read_errors: other(drop_counter::READ_ERRORS)?,
            other_no_device: other(drop_counter::NO_DEVICE)?,
            flow_events: other(drop_counter::FLOW_EVENTS)?,
            flow_events_lost: other(drop_counter::FLOW_EVENTS_LOST)?,
        };
        Ok(TracerSnapshot {
            drops,
            destinations,
            reasons,
            counters,
        })
    }

    /// The count of `key` with its reason named; `None` for an unknown family.
    fn reason_count(&self, key: &ReasonKey, packets: u64) -> Option<ReasonCount> {
        let endpoint = if key.addr == podnet_common::AddrKey::UNKNOWN {
            None
        } else {
            Some(kernel_addr(&key.addr, key.family)?)
        };
        Some(ReasonCount {
            endpoint,
            direction: direction_label(key.direction),
            reason: self
                .reason_names
                .get(&key.reason)
                .cloned()
                .unwrap_or_else(|| key.reason.to_string()),
            packets,
        })
    }
}

/// The race event thread's name (and its heartbeat's).
pub const EVENTS_THREAD: &str = "podnet-races";
/// How often the event thread looks at the ring buffer when the kernel did
/// not wake it: the kernel wakes it only once 64 KiB of events are pending,
/// so this bounds how late a race shows up in the race log.
pub const EVENT_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// User-space counters of the event thread.
#[derive(Debug, Default)]
pub struct EventStats {
    /// Events received from the ring buffer.
    pub received: AtomicU64,
    /// Records that could not be decoded (skipped).
    pub decode_errors: AtomicU64,
}

/// Moves every key of `from` whose endpoint (`endpoint(key)`: address and
/// family) is not in `live` into `into` under `unknown(key)`, adding its
/// per-CPU counts. User space alone writes `into`, so read, add, write is
/// exact. `names` are the two maps' names, for errors. Returns how many keys
/// were moved.
fn fold_keys<K: aya::Pod + Eq>(
    from: &mut PerCpuHashMap<MapData, K, u64>,
    into: &mut aya::maps::HashMap<MapData, K, u64>,
    names: [&'static str; 2],
    live: &std::collections::BTreeSet<podnet_common::AddrKey>,
    endpoint: impl Fn(&K) -> ([u8; 16], u8),
    unknown: impl Fn(&K) -> K,
) -> Result<usize, BpfError> {
    let keys: Vec<K> = from.keys().filter_map(Result::ok).collect();
    let mut moved = 0;
    for key in keys {
        let (addr, family) = endpoint(&key);
        let source = podnet_common::AddrKey {
            addr,
            family,
            _pad: [0; 3],
        };
        if addr == podnet_common::AddrKey::UNKNOWN || live.contains(&source) {
            continue;
        }
        let Ok(values) = from.get(&key, 0) else {
            continue;
        };
        let target = unknown(&key);
        let old = into.get(&target, 0).unwrap_or(0);
        into.insert(target, old + values.iter().sum::<u64>(), 0)
            .map_err(|e| BpfError::map(names[1], e))?;
        from.remove(&key).map_err(|e| BpfError::map(names[0], e))?;
        moved += 1;
    }
    Ok(moved)
}

/// The `direction` label of a [`ReasonKey`]'s direction byte.
fn direction_label(value: u8) -> &'static str {
    match value {
        direction::EGRESS => "egress",
        direction::INGRESS => "ingress",
        _ => "unknown",
    }
}

/// The drop count of `key`, when its address family and kind are known.
fn drop_count(key: &DropKey, packets: u64) -> Option<DropCount> {
    Some(DropCount {
        source: kernel_addr(&key.addr, key.family)?,
        proto: key.proto,
        kind: DropKind::from_u8(key.kind)?,
        packets,
    })
}

/// Reads race events until `stop` is set, enriching each into the race log
/// and publishing it to followers. Runs on its own OS thread: winner lookups
/// are blocking netlink calls.
pub fn run_event_loop<T: ConntrackTable>(
    ring: RingBuf<MapData>,
    mut enricher: Enricher<T>,
    log: &RaceLog,
    hub: &crate::api::follow::EventHub,
    stats: &EventStats,
    stop: &AtomicBool,
    dns: &super::flows::DnsFlows,
) {
    let heartbeat = heartbeat::registry().register(EVENTS_THREAD, heartbeat::SILENCE_LIMIT);
    let mut reader = RingReader::new(ring, EVENT_POLL_INTERVAL);
    while !stop.load(Ordering::Relaxed) && heartbeat.beat() {
        let began = crate::sys::monotonic_ns();
        reader.read(|item| {
            stats.received.fetch_add(1, Ordering::Relaxed);
            let record = decode(item)
                .and_then(|event| enricher.enrich(&event).map(|r| (event.timestamp_ns, r)));
            match record {
                Ok((at_ns, record)) => {
                    dns.record_race(at_ns, &record);
                    hub.publish(|| record.clone());
                    log.push(record);
                }
                Err(e) => {
                    stats.decode_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(error = %e, "skipping race event");
                }
            }
        });
        dns.races_read_until(began);
    }
    if stop.load(Ordering::Relaxed) {
        heartbeat.retire();
    }
}

/// Shares the stop flag and stats between the agent and the event thread.
#[derive(Clone, Debug, Default)]
pub struct EventThreadHandle {
    /// Set to stop the thread.
    pub stop: Arc<AtomicBool>,
    /// The thread's counters.
    pub stats: Arc<EventStats>,
}

/// Loads and attaches the confirm kretprobe, or adopts its pinned link
/// (loading nothing).
fn attach_probe(
    ebpf: &mut Ebpf,
    name: &str,
    pin_base: &str,
    pin_dir: &Path,
    fingerprint: u64,
) -> Result<(Attachment, FdLink), BpfError> {
    let probe: &mut KProbe = bpf::program_mut(ebpf, name)?;
    bpf::link::attach_pinned(pin_dir, pin_base, fingerprint, || {
        probe
            .load()
            .map_err(|e| BpfError::program(name, format!("load (verifier): {e}")))?;
        let id = probe
            .attach(CONFIRM_FUNCTION, 0)
            .map_err(|e| BpfError::program(name, format!("attach to {CONFIRM_FUNCTION}: {e}")))?;
        let link = probe
            .take_link(id)
            .map_err(|e| BpfError::program(name, e))?;
        FdLink::try_from(link).map_err(|e| BpfError::program(name, format!("not a bpf link: {e}")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_prefers_the_probe_where_kprobes_exist_and_falls_back_to_the_tracepoint() {
        assert_eq!(
            candidate_hooks(RaceHookChoice::Auto, true),
            Ok((RaceHook::ConfirmProbe, Some(RaceHook::DropTracepoint)))
        );
        assert_eq!(
            candidate_hooks(RaceHookChoice::Auto, false),
            Ok((RaceHook::DropTracepoint, None))
        );
    }

    #[test]
    fn explicit_hooks_have_no_fallback() {
        assert_eq!(
            candidate_hooks(RaceHookChoice::Tracepoint, true),
            Ok((RaceHook::DropTracepoint, None))
        );
        assert_eq!(
            candidate_hooks(RaceHookChoice::Probe, true),
            Ok((RaceHook::ConfirmProbe, None))
        );
        assert_eq!(
            candidate_hooks(RaceHookChoice::Probe, false),
            Err(format!(
                "this kernel cannot create kprobes ({KPROBE_PMU} is missing), so __nf_conntrack_confirm cannot be probed"
            ))
        );
    }
}
