//! The DNS programs in the kernel: load them with their pinned maps, write
//! their settings, and read their counts.

use std::path::{Path, PathBuf};

use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::SchedClassifier,
    Ebpf, EbpfLoader,
};
use podnet_common::{
    dns::{
        counter, maps as m, programs, ClientPending, DnsConfig, Latency, PeerKey, Pending,
        PendingKey, MAX_PORTS,
    },
    AddrKey,
};

use super::{DnsCounters, DnsSnapshot, LatencyCount, PeerCount};
use crate::bpf::{self, BpfError};

/// Sub-directory of `--bpffs` holding the DNS maps (links go below it).
pub const PIN_SUBDIR: &str = "dns";

/// Every entry point, by name (the agent attaches all but the baseline).
pub const PROGRAMS: [&str; 5] = [
    programs::POD_QUERIES,
    programs::POD_ANSWERS,
    programs::UPLINK_QUERIES,
    programs::UPLINK_ANSWERS,
    programs::BASELINE,
];

/// The loaded DNS programs and their maps.
pub struct DnsTracer {
    ebpf: Ebpf,
    pending: HashMap<MapData, PendingKey, Pending>,
    latency: PerCpuHashMap<MapData, PeerKey, Latency>,
    requests: PerCpuHashMap<MapData, PeerKey, u64>,
    retransmits: PerCpuHashMap<MapData, PeerKey, u64>,
    timeouts: HashMap<MapData, PeerKey, u64>,
    counters: PerCpuArray<MapData, u64>,
    events: Option<RingBuf<MapData>>,
    endpoints: Option<HashMap<MapData, AddrKey, u8>>,
    client_pending: HashMap<MapData, AddrKey, ClientPending>,
    client_expired: HashMap<MapData, AddrKey, u64>,
    pin_dir: PathBuf,
}

/// Settings of the programs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProgramSettings {
    /// Server ports (at most [`MAX_PORTS`]).
    pub ports: Vec<u16>,
    /// Answers slower than this are sent as events.
    pub slow_threshold: std::time::Duration,
}

impl DnsTracer {
    /// Loads the object with its maps pinned under `<bpffs>/dns`, loads the
    /// four programs (verifier) and writes `settings` into `DNS_CONFIG`.
    pub fn load(bpffs: &Path, settings: &ProgramSettings) -> Result<Self, BpfError> {
        let pin_dir = bpf::fs::prepare_pin_dir(&bpffs.join(PIN_SUBDIR))?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&pin_dir)
            .load(bpf::DNS_OBJECT)
            .map_err(|e| BpfError::Load {
                object: "podnet-dns",
                source: Box::new(e),
            })?;
        for name in PROGRAMS {
            let program: &mut SchedClassifier = bpf::program_mut(&mut ebpf, name)?;
            program
                .load()
                .map_err(|e| BpfError::program(name, format!("load (verifier): {e}")))?;
        }
        let mut config: Array<MapData, DnsConfig> = bpf::take_map(&mut ebpf, m::CONFIG)?;
        config
            .set(0, config_value(settings), 0)
            .map_err(|e| BpfError::map(m::CONFIG, e))?;
        let tracer = Self {
            pending: bpf::take_map(&mut ebpf, m::PENDING)?,
            latency: bpf::take_map(&mut ebpf, m::LATENCY)?,
            requests: bpf::take_map(&mut ebpf, m::REQUESTS)?,
            retransmits: bpf::take_map(&mut ebpf, m::RETRANSMITS)?,
            timeouts: bpf::take_map(&mut ebpf, m::TIMEOUTS)?,
            counters: bpf::take_map(&mut ebpf, m::COUNTERS)?,
            events: Some(bpf::take_map(&mut ebpf, m::EVENTS)?),
            endpoints: Some(bpf::take_map(&mut ebpf, m::ENDPOINTS)?),
            client_pending: bpf::take_map(&mut ebpf, m::CLIENT_PENDING)?,
            client_expired: bpf::take_map(&mut ebpf, m::CLIENT_EXPIRED)?,
            ebpf,
            pin_dir,
        };
        Ok(tracer)
    }

    /// The pin directory (`<bpffs>/dns`).
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// A loaded program by name.
    pub fn program_mut(&mut self, name: &str) -> Result<&mut SchedClassifier, BpfError> {
        bpf::program_mut(&mut self.ebpf, name)
    }

    /// Attaches `program` to a hook of `ifname` (in the calling thread's
    /// network namespace) without pinning: it stays attached while this
    /// tracer lives. For benchmarks (e.g. [`programs::BASELINE`]).
    pub fn attach_unpinned(
        &mut self,
        program: &str,
        ifname: &str,
        direction: super::attach::Direction,
    ) -> Result<u32, BpfError> {
        let p = self.program_mut(program)?;
        p.attach_with_options(
            ifname,
            direction.attach_type(),
            aya::programs::tc::TcAttachOptions::TcxOrder(aya::programs::LinkOrder::default()),
        )
        .map_err(|e| BpfError::program(program, format!("attach to {ifname}: {e}")))?;
        Ok(p.info().map_or(0, |i| i.id()))
    }

    /// Takes the ring buffer, to hand it to the event thread (once).
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    /// The pending-query map (for the timeout sweep).
    pub fn pending_mut(&mut self) -> &mut HashMap<MapData, PendingKey, Pending> {
        &mut self.pending
    }

    /// The maps the timeout sweep reads and writes.
    pub fn sweep_maps(&mut self) -> super::sweep::KernelMaps<'_> {
        super::sweep::KernelMaps {
            pending: &mut self.pending,
            timeouts: &mut self.timeouts,
            expired: &mut self.client_expired,
        }
    }

    /// Takes the endpoint address map, to hand it to the registry's address
    /// watcher (once).
    pub fn take_endpoints(&mut self) -> Option<HashMap<MapData, AddrKey, u8>> {
        self.endpoints.take()
    }

    /// Reads every count from the kernel maps, summed over CPUs.
    pub fn snapshot(&self) -> Result<DnsSnapshot, BpfError> {
        let mut latency = Vec::new();
        for item in &self.latency {
            let (key, values) = item.map_err(|e| BpfError::map(m::LATENCY, e))?;
            let sum = super::sum_latency(&values);
            latency.push(LatencyCount {
                key,
                buckets: sum.buckets,
                sum_ns: sum.sum_ns,
            });
        }
        let per_cpu = |map: &PerCpuHashMap<MapData, PeerKey, u64>,
                       name: &'static str|
         -> Result<Vec<PeerCount>, BpfError> {
            let mut out = Vec::new();
            for item in map {
                let (key, values) = item.map_err(|e| BpfError::map(name, e))?;
                out.push(PeerCount {
                    key,
                    count: values.iter().sum(),
                });
            }
            Ok(out)
        };
        let requests = per_cpu(&self.requests, m::REQUESTS)?;
        let retransmits = per_cpu(&self.retransmits, m::RETRANSMITS)?;
        let mut timeouts = Vec::new();
        for item in &self.timeouts {
            let (key, count) = item.map_err(|e| BpfError::map(m::TIMEOUTS, e))?;
            timeouts.push(PeerCount { key, count });
        }
        let mut untracked = Vec::new();
        for item in &self.client_pending {
            let (client, counts) = item.map_err(|e| BpfError::map(m::CLIENT_PENDING, e))?;
            if counts.refused > 0 {
                untracked.push((client, counts.refused));
            }
        }
        let count = |index: u32| -> Result<u64, BpfError> {
            let values = self
                .counters
                .get(&index, 0)
                .map_err(|e| BpfError::map(m::COUNTERS, e))?;
            Ok(values.iter().sum())
        };
        Ok(DnsSnapshot {
            latency,
            requests,
            retransmits,
            timeouts,
            untracked,
            counters: DnsCounters {
                queries: count(counter::QUERIES)?,
                responses: count(counter::RESPONSES)?,
                unmatched: count(counter::UNMATCHED)?,
                malformed: count(counter::MALFORMED)?,
                events_lost: count(counter::EVENTS_LOST)?,
                stats_full: count(counter::STATS_FULL)?,
                tcp_skipped: count(counter::TCP_SKIPPED)?,
                unsupported: count(counter::UNSUPPORTED)?,
                pending_failed: count(counter::PENDING_FAILED)?,
            },
        })
    }
}

/// The `DNS_CONFIG` value for `settings` (extra ports beyond [`MAX_PORTS`]
/// are ignored; the flag parser refuses them).
pub fn config_value(settings: &ProgramSettings) -> DnsConfig {
    let mut cfg = DnsConfig {
        slow_threshold_ns: u64::try_from(settings.slow_threshold.as_nanos()).unwrap_or(u64::MAX),
        ports: [0; MAX_PORTS],
    };
    for (slot, port) in cfg.ports.iter_mut().zip(&settings.ports) {
        *slot = *port;
    }
    cfg
}
