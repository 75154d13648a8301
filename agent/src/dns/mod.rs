//! DNS latency per pod, measured in the kernel.
//!
//! TC programs on every pod's host-side interface (and on `--uplinks` for
//! host-network pods) match each DNS query to its answer and count latency
//! per (pod, server, rcode), queries per qtype and retransmits in per-CPU
//! maps; user space only reads them ([`tracer`]), keeps the attachments equal
//! to the endpoint registry ([`attach`]), turns unanswered queries into
//! timeouts ([`sweep`]), and keeps recent slow, failed and unanswered
//! queries with their names ([`QueryLog`], fed by [`decode`]).

pub mod attach;
pub mod cause;
pub mod decode;
pub mod metrics;
pub mod sweep;
pub mod top;
pub mod tracer;
pub mod view;
mod worker;

use std::{
    borrow::Cow,
    collections::BTreeMap,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard, PoisonError,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use podnet_common::dns::{Latency, PeerKey, BUCKETS};
use serde::Serialize;

use crate::{
    api::{
        call::Call,
        protocol::{method, ApiError},
    },
    bpf::BpfError,
    endpoint::Registry,
    metrics::{shared::SharedFamilies, text::Encoder},
    options::{duration_arg, duration_key, options},
    subsystem::{to_json, Subsystem},
};
use attach::{Attacher, ReconcileReport, Role};
use decode::QueryRecord;

/// Recent slow, failed and unanswered queries with their names, for
/// `podnetctl dns slow`.
pub type QueryLog = crate::recent::Recent<QueryRecord>;
/// Names of the kernel programs.
pub use podnet_common::dns::programs;
use tracer::{DnsTracer, ProgramSettings};

/// Samples kept: about a minute.
const SAMPLES: usize = 13;
/// Slow, failed and unanswered queries kept for `dns.slow`.
pub const LOG_CAPACITY: usize = 1024;

/// One latency histogram series, summed over CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LatencyCount {
    /// Client, server, scope and rcode (in `code`).
    pub key: PeerKey,
    /// Answers per bucket (not cumulative).
    pub buckets: [u64; BUCKETS],
    /// Sum of latencies in nanoseconds.
    pub sum_ns: u64,
}

/// One counter series, summed over CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCount {
    /// Client, server, scope and qtype (requests) or 0.
    pub key: PeerKey,
    /// The count.
    pub count: u64,
}

/// The programs' own counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DnsCounters {
    /// Queries recorded as pending.
    pub queries: u64,
    /// Answers matched to a query.
    pub responses: u64,
    /// Answers matching no pending query.
    pub unmatched: u64,
    /// Messages on a DNS port that failed to parse.
    pub malformed: u64,
    /// Events lost: the ring buffer was full.
    pub events_lost: u64,
    /// Statistics updates lost: a map was full.
    pub stats_full: u64,
    /// TCP segments not starting a message.
    pub tcp_skipped: u64,
    /// IP fragments and other packets not handled.
    pub unsupported: u64,
    /// Queries that could not be recorded as pending.
    pub pending_failed: u64,
}

/// Everything the DNS maps hold, at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DnsSnapshot {
    /// Latency histograms per (client, server, scope, rcode).
    pub latency: Vec<LatencyCount>,
    /// Queries per (client, server, scope, qtype).
    pub requests: Vec<PeerCount>,
    /// Retransmits per (client, server, scope).
    pub retransmits: Vec<PeerCount>,
    /// Timeouts per (client, server, scope).
    pub timeouts: Vec<PeerCount>,
    /// Queries not tracked because their client had its share of pending
    /// queries in flight, per counted client (address, family, scope).
    pub untracked: Vec<(podnet_common::AddrKey, u64)>,
    /// The programs' counters.
    pub counters: DnsCounters,
}

/// The rcode label value: the RFC mnemonic in upper case, else the number
/// (borrowed for the mnemonics: a record per DNS event allocates none).
pub fn rcode_name(rcode: u8) -> Cow<'static, str> {
    match rcode {
        0 => Cow::Borrowed("NOERROR"),
        1 => Cow::Borrowed("FORMERR"),
        2 => Cow::Borrowed("SERVFAIL"),
        3 => Cow::Borrowed("NXDOMAIN"),
        4 => Cow::Borrowed("NOTIMP"),
        5 => Cow::Borrowed("REFUSED"),
        6 => Cow::Borrowed("YXDOMAIN"),
        7 => Cow::Borrowed("YXRRSET"),
        8 => Cow::Borrowed("NXRRSET"),
        9 => Cow::Borrowed("NOTAUTH"),
        10 => Cow::Borrowed("NOTZONE"),
        n => Cow::Owned(n.to_string()),
    }
}

/// The qtype label value: the mnemonic in upper case, else the number
/// (borrowed for the mnemonics).
pub fn qtype_name(qtype: u16) -> Cow<'static, str> {
    let name = match qtype {
        1 => "A",
        2 => "NS",
        5 => "CNAME",
        6 => "SOA",
        12 => "PTR",
        13 => "HINFO",
        15 => "MX",
        16 => "TXT",
        28 => "AAAA",
        33 => "SRV",
        35 => "NAPTR",
        43 => "DS",
        46 => "RRSIG",
        48 => "DNSKEY",
        52 => "TLSA",
        64 => "SVCB",
        65 => "HTTPS",
        99 => "SPF",
        252 => "AXFR",
        255 => "ANY",
        257 => "CAA",
        // Types outside podnet_common::dns::COUNTED_QTYPES count as 0.
        0 => "other",
        n => return Cow::Owned(n.to_string()),
    };
    Cow::Borrowed(name)
}

options! {
    /// DNS's section of the configuration.
    pub struct DnsOptions {
        /// A DNS query with no answer by then is a timeout (e.g. `5s`, `500ms`)
        /// [default: 5s].
        #[arg(long, env = "PODNET_DNS_TIMEOUT", value_parser = duration_arg)]
        #[serde(default, deserialize_with = "duration_key")]
        pub dns_timeout: Option<Duration>,
        /// Host interfaces whose DNS traffic is traced too (host-network pods),
        /// comma-separated.
        #[arg(long, env = "PODNET_UPLINKS", value_delimiter = ',')]
        pub uplinks: Option<Vec<String>>,
        /// DNS server ports, comma-separated, at most 8 [default: 53].
        #[arg(long, env = "PODNET_DNS_PORTS", value_delimiter = ',')]
        pub dns_ports: Option<Vec<u16>>,
        /// DNS answers slower than this are logged with their query name
        /// (`podnetctl dns slow`) [default: 200ms].
        #[arg(long, env = "PODNET_DNS_SLOW_THRESHOLD", value_parser = duration_arg)]
        #[serde(default, deserialize_with = "duration_key")]
        pub dns_slow_threshold: Option<Duration>,
    }
}

/// `--dns-timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// `--dns-ports`.
pub const DEFAULT_PORTS: &[u16] = &[53];
/// `--dns-slow-threshold`.
pub const DEFAULT_SLOW_THRESHOLD: Duration = Duration::from_millis(200);

impl DnsOptions {
    /// The settings, defaults filled in and checked against what the kernel
    /// programs can hold; the programs pin below `bpffs`.
    pub fn settings(self, bpffs: &std::path::Path) -> Result<DnsSettings, String> {
        let ports = self.dns_ports.unwrap_or_else(|| DEFAULT_PORTS.to_vec());
        let max = podnet_common::dns::MAX_PORTS;
        if ports.is_empty() || ports.len() > max || ports.contains(&0) {
            return Err(format!(
                "--dns-ports must list 1 to {max} ports other than 0, not {ports:?}"
            ));
        }
        Ok(DnsSettings {
            bpffs: bpffs.to_owned(),
            timeout: self.dns_timeout.unwrap_or(DEFAULT_TIMEOUT),
            ports,
            slow_threshold: self.dns_slow_threshold.unwrap_or(DEFAULT_SLOW_THRESHOLD),
            uplinks: self.uplinks.unwrap_or_default(),
        })
    }
}

/// How the DNS subsystem runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsSettings {
    /// The agent's `--bpffs` directory.
    pub bpffs: PathBuf,
    /// `--dns-timeout`.
    pub timeout: Duration,
    /// `--dns-ports`.
    pub ports: Vec<u16>,
    /// `--dns-slow-threshold`.
    pub slow_threshold: Duration,
    /// `--uplinks`.
    pub uplinks: Vec<String>,
}

/// What `status` shows about DNS.
#[derive(Clone, Debug, Serialize)]
pub struct DnsStatus {
    /// Pinned links, by file name.
    pub links: Vec<String>,
    /// Kernel ids of the programs behind the links (for `bpftool prog show`).
    pub program_ids: Vec<u32>,
    /// The programs' counters.
    pub counters: DnsCounters,
    /// Events received by user space since start.
    pub events_received: u64,
    /// Events that could not be decoded.
    pub events_decode_errors: u64,
    /// The last reconcile of attachments that attached, adopted, replaced,
    /// removed or failed something (the first one at start otherwise).
    pub last_reconcile: ReconcileReport,
}

#[derive(Debug, Default)]
struct Shared {
    stop: AtomicBool,
    received: AtomicU64,
    decode_errors: AtomicU64,
}

/// The running DNS subsystem.
pub struct Dns {
    tracer: Arc<Mutex<DnsTracer>>,
    attacher: Arc<Mutex<Attacher>>,
    registry: Registry,
    log: QueryLog,
    history: Arc<Mutex<top::History>>,
    last_reconcile: Arc<Mutex<ReconcileReport>>,
    shared: Arc<Shared>,
    failures: Arc<cause::FailureCounts>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Errors starting the DNS subsystem.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// The kernel side could not be set up.
    #[error(transparent)]
    Bpf(#[from] BpfError),
    /// A DNS thread could not be started.
    #[error("starting the DNS thread: {0}")]
    Thread(std::io::Error),
    /// The registry's change notifications could not be set up.
    #[error("subscribing to endpoint changes: {0}")]
    Subscribe(std::io::Error),
}

/// The DNS subsystem's name among the registry's followers.
pub const FOLLOWER: &str = "dns";

/// The interfaces the programs should watch: every endpoint's `interface`
/// (role pod) and every uplink.
pub fn desired_interfaces(registry: &Registry, uplinks: &[String]) -> BTreeMap<String, Role> {
    let mut out = BTreeMap::new();
    for (_, ep) in registry.endpoints() {
        if let Some(i) = ep.interface {
            out.insert(i, Role::Pod);
        }
    }
    for u in uplinks {
        out.insert(u.clone(), Role::Uplink);
    }
    out
}

impl Dns {
    /// Loads the programs, attaches them to the registry's interfaces and the
    /// uplinks (adopting pinned links) as tcx links or classic tc filters,
    /// and starts the DNS threads; failed queries get their cause from
    /// `flow_drops`.
    pub fn start(
        settings: DnsSettings,
        tc_mode: crate::bpf::tc::TcMode,
        registry: Registry,
        hub: &crate::api::follow::EventHub,
        flow_drops: crate::flowdrops::FlowDrops,
    ) -> Result<Self, DnsError> {
        let mut tracer = DnsTracer::load(
            &settings.bpffs,
            &ProgramSettings {
                ports: settings.ports.clone(),
                slow_threshold: settings.slow_threshold,
            },
        )?;
        // Addresses first: a pod's queries count under its name from the
        // first one its interface's programs see.
        if let Some(map) = tracer.take_endpoints() {
            let map = Mutex::new(crate::bpf::endpoints::AddressMap::new(
                map,
                podnet_common::dns::maps::ENDPOINTS,
            ));
            registry.watch_addresses(move |ips| lock(&map).sync_or_warn(ips));
        }
        let mut attacher = Attacher::new(tracer.pin_dir(), tc_mode)?;
        // Subscribed and following before the first reconcile: a change
        // made while it runs wakes the upkeep thread, and a CNI ADD waiting
        // for its pod's programs waits for a reconcile that saw the pod.
        let changes = registry.subscribe().map_err(DnsError::Subscribe)?;
        let follower = Arc::new(registry.follow(FOLLOWER));
        let started = Instant::now();
        let generation = registry.generation();
        let mut report = attacher.reconcile(
            &mut tracer,
            &desired_interfaces(&registry, &settings.uplinks),
        )?;
        follower.caught_up(generation);
        report.took_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        tracing::info!(
            took_us = report.took_us,
            attached = report.attached.len(),
            adopted = report.adopted.len(),
            replaced = report.replaced.len(),
            removed = report.removed.len(),
            mode = %attacher.mode(),
            pins = %tracer.pin_dir().display(),
            "DNS programs in place"
        );
        let ring = tracer.take_events();
        let mut history = top::History::new(SAMPLES);
        if let Ok(snapshot) = tracer.snapshot() {
            history.push(Instant::now(), top::totals(&snapshot, &registry));
        }
        let dns = Self {
            tracer: Arc::new(Mutex::new(tracer)),
            attacher: Arc::new(Mutex::new(attacher)),
            registry,
            log: QueryLog::with_capacity(LOG_CAPACITY),
            history: Arc::new(Mutex::new(history)),
            last_reconcile: Arc::new(Mutex::new(report)),
            shared: Arc::new(Shared::default()),
            failures: Arc::new(cause::FailureCounts::default()),
            threads: Mutex::new(Vec::new()),
        };
        let worker = worker::Worker {
            tracer: dns.tracer.clone(),
            attacher: dns.attacher.clone(),
            registry: dns.registry.clone(),
            log: dns.log.clone(),
            hub: hub.clone(),
            history: dns.history.clone(),
            last_reconcile: dns.last_reconcile.clone(),
            shared: dns.shared.clone(),
            settings,
            drops: flow_drops,
            failures: dns.failures.clone(),
            deferred: Arc::default(),
            follower,
        };
        if let Some(ring) = ring {
            let events = worker.clone();
            let handle = std::thread::Builder::new()
                .name(worker::EVENTS_THREAD.into())
                .spawn(move || events.run_events(ring))
                .map_err(DnsError::Thread)?;
            lock(&dns.threads).push(handle);
        }
        let handle = std::thread::Builder::new()
            .name(worker::UPKEEP_THREAD.into())
            .spawn(move || worker.run_upkeep(&changes))
            .map_err(DnsError::Thread)?;
        lock(&dns.threads).push(handle);
        Ok(dns)
    }

    /// Reads the kernel maps.
    pub fn snapshot(&self) -> Result<DnsSnapshot, BpfError> {
        lock(&self.tracer).snapshot()
    }

    /// The newest `limit` slow, failed or unanswered queries that pass
    /// `filter`, oldest first.
    pub fn slow(
        &self,
        limit: usize,
        filter: &crate::api::protocol::EventFilter,
    ) -> Vec<QueryRecord> {
        self.log
            .recent_matching(limit, |r| crate::api::follow::Followed::matches(r, filter))
    }

    /// Per pod and server: rate, quantiles, timeouts and errors over about a minute.
    pub fn top(&self) -> Result<Vec<top::TopRow>, BpfError> {
        let snapshot = self.snapshot()?;
        let now = top::totals(&snapshot, &self.registry);
        Ok(lock(&self.history).top(Instant::now(), &now))
    }

    /// Links, program ids and counters.
    pub fn status(&self) -> DnsStatus {
        // The tracer first, then the attacher: the order the DNS thread takes
        // them in (the reverse could deadlock against a reconcile).
        let counters = self.snapshot().map(|s| s.counters).unwrap_or_default();
        let attacher = lock(&self.attacher);
        let links = attacher
            .links()
            .unwrap_or_default()
            .iter()
            .map(attach::PinName::file_name)
            .collect();
        DnsStatus {
            links,
            program_ids: attacher.program_ids().into_iter().collect(),
            counters,
            events_received: self.shared.received.load(Ordering::Relaxed),
            events_decode_errors: self.shared.decode_errors.load(Ordering::Relaxed),
            last_reconcile: lock(&self.last_reconcile).clone(),
        }
    }
}

/// The API methods DNS serves.
pub const METHODS: &[&str] = &[method::DNS_TOP, method::DNS_SLOW];

impl Subsystem for Dns {
    fn name(&self) -> &'static str {
        "dns"
    }

    fn methods(&self) -> &'static [&'static str] {
        METHODS
    }

    fn handle(&self, m: &str, params: serde_json::Value) -> Result<serde_json::Value, ApiError> {
        match Call::decode(m, params)? {
            Call::DnsTop => self
                .top()
                .map_err(|e| ApiError::internal(e.to_string()))
                .and_then(|rows| to_json(&rows)),
            Call::DnsSlow(params) => to_json(&self.slow(params.limit, &params.filter)),
            other => Err(ApiError::unknown_method(other.method())),
        }
    }

    fn render_metrics(&self, enc: &mut Encoder, shared: &mut SharedFamilies) {
        match self.snapshot() {
            Ok(snapshot) => {
                metrics::render(enc, &snapshot, &self.registry);
                metrics::render_failures(enc, &self.failures.snapshot(), &self.registry);
                metrics::shared_samples(shared, &snapshot.counters);
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading the DNS maps failed; DNS metrics omitted");
            }
        }
    }

    /// Stops the DNS threads. Links and maps stay pinned and keep counting.
    fn stop(&self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let threads = std::mem::take(&mut *lock(&self.threads));
        for handle in threads {
            if handle.join().is_err() {
                tracing::error!("a DNS thread panicked");
            }
        }
    }
}

/// Sums per-CPU latency values (used by the tracer and tests).
pub fn sum_latency(values: &[Latency]) -> Latency {
    let mut sum = Latency::default();
    for v in values {
        for i in 0..BUCKETS {
            sum.buckets[i] += v.buckets[i];
        }
        sum.sum_ns += v.sum_ns;
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::{Endpoint, Source};

    #[test]
    fn labels() {
        assert_eq!(rcode_name(0), "NOERROR");
        assert_eq!(rcode_name(3), "NXDOMAIN");
        assert_eq!(rcode_name(2), "SERVFAIL");
        assert_eq!(rcode_name(5), "REFUSED");
        assert_eq!(rcode_name(15), "15");
        assert_eq!(qtype_name(1), "A");
        assert_eq!(qtype_name(28), "AAAA");
        assert_eq!(qtype_name(33), "SRV");
        assert_eq!(qtype_name(12), "PTR");
        assert_eq!(qtype_name(4242), "4242");
    }

    #[test]
    fn desired_interfaces_come_from_endpoints_and_uplinks() {
        let r = Registry::new();
        r.replace_source(
            Source::File,
            vec![
                Endpoint {
                    namespace: "a".into(),
                    pod: "p".into(),
                    ips: vec![],
                    interface: Some("vpod1".into()),
                    container_id: None,
                    if_name: None,
                },
                Endpoint {
                    namespace: "a".into(),
                    pod: "q".into(),
                    ips: vec![],
                    interface: None,
                    container_id: None,
                    if_name: None,
                },
            ],
        );
        let d = desired_interfaces(&r, &["eth0".into()]);
        assert_eq!(
            d.into_iter().collect::<Vec<_>>(),
            vec![("eth0".into(), Role::Uplink), ("vpod1".into(), Role::Pod)]
        );
    }
}
