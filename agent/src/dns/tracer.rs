//! The DNS programs in the kernel: load them with their pinned maps, write
//! their settings, and read their counts.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::SchedClassifier,
    Ebpf, EbpfLoader,
};
use podnet_common::{
    dns::{
        counter, departed_kind, maps as m, programs, ClientPending, ClientServer, DepartedKey,
        DnsConfig, Latency, PeerKey, Pending, PendingKey, MAX_PORTS, OTHER_SERVER,
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
    client_servers: HashMap<MapData, ClientServer, u8>,
    client_server_count: HashMap<MapData, AddrKey, u64>,
    departed: HashMap<MapData, DepartedKey, u64>,
    departed_latency: HashMap<MapData, PeerKey, Latency>,
    pin_dir: PathBuf,
}

/// `key` with its client replaced by the unknown client.
fn as_unknown(key: PeerKey) -> PeerKey {
    PeerKey {
        client: AddrKey::UNKNOWN,
        ..key
    }
}

/// Whether `addr` (of `family`) is a client that left: not unknown, not live.
fn departed(addr: &[u8; 16], family: u8, live: &BTreeSet<AddrKey>) -> bool {
    *addr != AddrKey::UNKNOWN
        && !live.contains(&AddrKey {
            addr: *addr,
            family,
            _pad: [0; 3],
        })
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
            client_servers: bpf::take_map(&mut ebpf, m::CLIENT_SERVERS)?,
            client_server_count: bpf::take_map(&mut ebpf, m::CLIENT_SERVER_COUNT)?,
            departed: bpf::take_map(&mut ebpf, m::DEPARTED)?,
            departed_latency: bpf::take_map(&mut ebpf, m::DEPARTED_LATENCY)?,
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

    /// Moves every count of clients that are no endpoint any more (pods that
    /// left) out of the kernel maps into the unknown client's, in pinned maps
    /// only user space writes (`DNS_DEPARTED*`, and `DNS_TIMEOUTS`), and
    /// forgets their per-client entries: the maps hold live pods' keys only,
    /// and no counter goes back, across agent restarts too. Returns the keys
    /// moved.
    pub fn fold_departed(&mut self, live: &BTreeSet<AddrKey>) -> usize {
        let mut moved = 0;
        let gone = |k: &PeerKey| departed(&k.client, k.family, live);
        for key in keys_where(&self.latency, gone) {
            let Ok(values) = self.latency.get(&key, 0) else {
                continue;
            };
            let sum = super::sum_latency(&values);
            if self.latency.remove(&key).is_ok() {
                add_latency(&mut self.departed_latency, as_unknown(key), &sum);
                moved += 1;
            }
        }
        for (kind, map) in [
            (departed_kind::REQUESTS, &mut self.requests),
            (departed_kind::RETRANSMITS, &mut self.retransmits),
        ] {
            for key in keys_where(map, gone) {
                let Ok(values) = map.get(&key, 0) else {
                    continue;
                };
                if map.remove(&key).is_ok() {
                    add_departed(
                        &mut self.departed,
                        kind,
                        as_unknown(key),
                        values.iter().sum(),
                    );
                    moved += 1;
                }
            }
        }
        let stale: Vec<PeerKey> = self
            .timeouts
            .keys()
            .filter_map(Result::ok)
            .filter(gone)
            .collect();
        for key in stale {
            let Ok(n) = self.timeouts.get(&key, 0) else {
                continue;
            };
            // User space alone writes this map: read, add, write is exact.
            let unknown = as_unknown(key);
            let old = self.timeouts.get(&unknown, 0).unwrap_or(0);
            if self.timeouts.insert(unknown, old + n, 0).is_ok()
                && self.timeouts.remove(&key).is_ok()
            {
                moved += 1;
            }
        }
        let gone_client = |k: &AddrKey| departed(&k.addr, k.family, live);
        let clients: Vec<AddrKey> = self
            .client_pending
            .keys()
            .filter_map(Result::ok)
            .filter(gone_client)
            .collect();
        for client in clients {
            if let Ok(counts) = self.client_pending.get(&client, 0) {
                if counts.refused > 0 {
                    let peer = PeerKey {
                        client: AddrKey::UNKNOWN,
                        server: [0; 16],
                        family: client.family,
                        scope: client._pad[0],
                        code: 0,
                    };
                    add_departed(
                        &mut self.departed,
                        departed_kind::UNTRACKED,
                        peer,
                        counts.refused,
                    );
                }
            }
            let _ = self.client_pending.remove(&client);
            let _ = self.client_expired.remove(&client);
            let _ = self.client_server_count.remove(&client);
            moved += 1;
        }
        let pairs: Vec<ClientServer> = self
            .client_servers
            .keys()
            .filter_map(Result::ok)
            .filter(|p| gone_client(&p.client))
            .collect();
        for pair in pairs {
            let _ = self.client_servers.remove(&pair);
        }
        moved
    }

    /// Reads every count from the kernel maps, summed over CPUs, with the
    /// counts of clients that left under the unknown client.
    pub fn snapshot(&self) -> Result<DnsSnapshot, BpfError> {
        let mut latency = Vec::new();
        for item in &self.departed_latency {
            let (key, l) = item.map_err(|e| BpfError::map(m::DEPARTED_LATENCY, e))?;
            latency.push(LatencyCount {
                key,
                buckets: l.buckets,
                sum_ns: l.sum_ns,
            });
        }
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
        let (mut requests, mut retransmits) = (Vec::new(), Vec::new());
        let mut untracked: Vec<(AddrKey, u64)> = Vec::new();
        for item in &self.departed {
            let (key, count) = item.map_err(|e| BpfError::map(m::DEPARTED, e))?;
            let peer = PeerCount {
                key: key.peer,
                count,
            };
            match key.kind {
                departed_kind::REQUESTS => requests.push(peer),
                departed_kind::RETRANSMITS => retransmits.push(peer),
                departed_kind::UNTRACKED => untracked.push((
                    podnet_common::dns::client_key(
                        AddrKey::UNKNOWN,
                        key.peer.family,
                        key.peer.scope,
                    ),
                    count,
                )),
                _ => {}
            }
        }
        requests.extend(per_cpu(&self.requests, m::REQUESTS)?);
        retransmits.extend(per_cpu(&self.retransmits, m::RETRANSMITS)?);
        let mut timeouts = Vec::new();
        for item in &self.timeouts {
            let (key, count) = item.map_err(|e| BpfError::map(m::TIMEOUTS, e))?;
            timeouts.push(PeerCount { key, count });
        }
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

/// The keys of `map` for which `pred` holds (read first: the map changes).
fn keys_where<V: aya::Pod>(
    map: &PerCpuHashMap<MapData, PeerKey, V>,
    pred: impl Fn(&PeerKey) -> bool,
) -> Vec<PeerKey> {
    map.keys()
        .filter_map(Result::ok)
        .filter(|k| pred(k))
        .collect()
}

/// Adds `n` to `kind` of `peer` in `DNS_DEPARTED` (user space alone writes
/// it); a full map takes the count under [`OTHER_SERVER`].
fn add_departed(map: &mut HashMap<MapData, DepartedKey, u64>, kind: u8, peer: PeerKey, n: u64) {
    for server in [peer.server, OTHER_SERVER] {
        let key = DepartedKey {
            peer: PeerKey { server, ..peer },
            kind,
            _pad: [0; 3],
        };
        let old = map.get(&key, 0).unwrap_or(0);
        if map.insert(key, old + n, 0).is_ok() {
            return;
        }
    }
    tracing::warn!(kind, "DNS_DEPARTED is full; counts of departed pods lost");
}

/// Adds `sum` to `peer`'s histogram in `DNS_DEPARTED_LATENCY`, as
/// [`add_departed`] does.
fn add_latency(map: &mut HashMap<MapData, PeerKey, Latency>, peer: PeerKey, sum: &Latency) {
    for server in [peer.server, OTHER_SERVER] {
        let key = PeerKey { server, ..peer };
        let mut acc = map.get(&key, 0).unwrap_or_default();
        for (a, b) in acc.buckets.iter_mut().zip(sum.buckets) {
            *a += b;
        }
        acc.sum_ns += sum.sum_ns;
        if map.insert(key, acc, 0).is_ok() {
            return;
        }
    }
    tracing::warn!("DNS_DEPARTED_LATENCY is full; latencies of departed pods lost");
}
