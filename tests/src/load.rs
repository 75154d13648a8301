//! Sustained load on a simulated node: many endpoints, paced DNS queries and
//! paced insert races, and the agent's own resource use while it lasts.
//!
//! Shared by the agent benchmark (`podnet-bench-agent`) and the load part of
//! the reliability suite (`tests/tests/load.rs`), so both measure the same thing.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use serde_json::Value;

use crate::{
    agent::{endpoints_yaml, Agent, EndpointSpec},
    netns::in_netns,
    topology::Topology,
    util::wait_for,
};

/// How often pod A refreshes the flow that holds the SNAT port during a load.
const HOLDER_REFRESH: Duration = Duration::from_secs(5);

/// The destination port whose flows from pods 0 and 1 are SNAT'ed to one
/// source port by [`race_rule`]: every new flow from pod 1 loses the race.
pub const RACE_PORT: u16 = 7000;

/// Source-NATs UDP from pods 0 and 1 to the server's [`RACE_PORT`] onto the
/// node's single port 40000. Unlike [`Topology::snat_pods_to_one_port`] it
/// leaves every other flow (DNS among them) alone.
pub fn race_rule(topo: &Topology) -> Result<()> {
    let to = format!("{}:40000-40000", topo.node_ipv4_to_server());
    for pod in &topo.pods()[..2] {
        crate::iptables(
            topo.node(),
            &[
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-s",
                &pod.ipv4().to_string(),
                "-p",
                "udp",
                "--dport",
                &RACE_PORT.to_string(),
                "-j",
                "SNAT",
                "--to-source",
                &to,
            ],
        )?;
    }
    Ok(())
}

/// dnsmasq on the server's port 53, answering NXDOMAIN for every name under
/// `load.test` (what [`run_load`]'s clients ask), started and ready. A C
/// server keeps up with 20,000 queries/s on two shared cores; the test
/// responder, in a debug build, answered only 75 to 95 % of them.
pub fn dns_server(topo: &Topology) -> Result<crate::NsChild> {
    let listen = format!("--listen-address={}", topo.server_ipv4());
    let dnsmasq = crate::spawn_in(
        topo.server(),
        &[
            "dnsmasq",
            "--no-daemon",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--port=53",
            &listen,
            "--bind-interfaces",
            "--address=/load.test/",
        ],
    )?;
    if !wait_for(|| dnsmasq.log().contains("started"), Duration::from_secs(5)) {
        bail!("dnsmasq did not start: {}", dnsmasq.log());
    }
    Ok(dnsmasq)
}

/// One endpoint per pod of `topo`, the first `n` with their host interface
/// (so the DNS programs attach there).
pub fn endpoints(topo: &Topology, n: usize) -> Vec<EndpointSpec> {
    topo.pods()
        .iter()
        .enumerate()
        .map(|(i, pod)| {
            let spec = EndpointSpec::new("load", &format!("pod{i}"), &[IpAddr::V4(pod.ipv4())]);
            if i < n {
                spec.interface(pod.host_if())
            } else {
                spec
            }
        })
        .collect()
}

/// Rewrites the agent's endpoints file with `endpoints` and waits until the
/// DNS programs are attached on exactly the interfaces given (two links
/// each). Returns how long that took, including the file watcher's poll.
pub fn set_endpoints(
    agent: &Agent,
    endpoints: &[EndpointSpec],
    timeout: Duration,
) -> Result<Duration> {
    let want = 2 * endpoints.iter().filter(|e| e.interface.is_some()).count();
    let start = Instant::now();
    std::fs::write(agent.endpoints_file(), endpoints_yaml(endpoints))?;
    wait_dns_links(agent, want, timeout)?;
    Ok(start.elapsed())
}

/// Waits until the agent's DNS programs hold exactly `want` links (two per
/// interface: ingress and egress).
pub fn wait_dns_links(agent: &Agent, want: usize, timeout: Duration) -> Result<()> {
    if !wait_for(|| dns_links(agent).is_ok_and(|n| n == want), timeout) {
        bail!(
            "DNS links did not reach {want} in {timeout:?} (now {:?})",
            dns_links(agent).ok()
        );
    }
    Ok(())
}

fn dns_links(agent: &Agent) -> Result<usize> {
    let status = agent.api("status", Value::Null)?;
    status["dns"]["links"]
        .as_array()
        .map(Vec::len)
        .context("status has no dns.links")
}

/// A DNS query for `name` (type A) with this id.
pub fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut m = Vec::with_capacity(32 + name.len());
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        m.push(u8::try_from(label.len()).unwrap_or(0));
        m.extend_from_slice(label.as_bytes());
    }
    m.extend_from_slice(&[0, 0, 1, 0, 1]);
    m
}

/// What one DNS client sent and got back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsLoad {
    /// Queries sent.
    pub sent: u64,
    /// Answers received.
    pub answered: u64,
}

/// Sends DNS queries for `name` from `pod_netns` to `server` at `rate` per
/// second for `duration`, reading answers as they come, then waits up to
/// 500 ms for the last ones. Ids count up from 0 (at most 65,536 queries are
/// in flight at once, so no two pending queries share an id).
pub fn dns_flood(
    pod_netns: &crate::Netns,
    server: SocketAddr,
    name: &str,
    rate: u64,
    duration: Duration,
) -> Result<DnsLoad> {
    let name = name.to_owned();
    in_netns(pod_netns, move || -> Result<DnsLoad> {
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        socket.connect(server)?;
        socket.set_nonblocking(true)?;
        let mut load = DnsLoad::default();
        let mut buf = [0u8; 512];
        let mut drain = |socket: &UdpSocket, load: &mut DnsLoad| {
            while socket.recv(&mut buf).is_ok() {
                load.answered += 1;
            }
        };
        let start = Instant::now();
        while start.elapsed() < duration {
            let allowed =
                u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX) * rate / 1_000_000;
            if load.sent >= allowed {
                drain(&socket, &mut load);
                std::thread::sleep(Duration::from_micros(200));
                continue;
            }
            #[allow(clippy::cast_possible_truncation)] // ids wrap by design
            let id = load.sent as u16;
            // A full socket buffer: the query was not sent; try again later.
            if socket.send(&dns_query(id, &name)).is_ok() {
                load.sent += 1;
            }
        }
        let tail = Instant::now();
        while tail.elapsed() < Duration::from_millis(500) && load.answered < load.sent {
            drain(&socket, &mut load);
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(load)
    })?
}

/// Resident memory and CPU time of one process, from `/proc/<pid>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcSample {
    /// When it was read.
    pub at: Instant,
    /// `VmRSS`, KiB.
    pub rss_kib: u64,
    /// `VmHWM` (peak RSS), KiB.
    pub peak_rss_kib: u64,
    /// User + system time, clock ticks.
    pub cpu_ticks: u64,
}

impl ProcSample {
    /// Reads process `pid`.
    pub fn read(pid: u32) -> Result<Self> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("reading /proc/{pid}/status"))?;
        let kib = |key: &str| -> Result<u64> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .with_context(|| format!("no {key} in /proc/{pid}/status"))
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the command (which may hold spaces) start at state (3).
        let rest = stat.rsplit_once(')').map(|(_, r)| r).context("bad stat")?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| -> Result<u64> {
            fields
                .get(i - 3)
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("no field {i} in /proc/{pid}/stat"))
        };
        Ok(Self {
            at: Instant::now(),
            rss_kib: kib("VmRSS:")?,
            peak_rss_kib: kib("VmHWM:")?,
            cpu_ticks: ticks(14)? + ticks(15)?,
        })
    }

    /// CPU used between `earlier` and `self`, in percent of one core.
    pub fn cpu_percent_since(&self, earlier: &Self) -> f64 {
        // SAFETY: sysconf takes no pointers.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
        let secs = self.at.duration_since(earlier.at).as_secs_f64();
        #[allow(clippy::cast_precision_loss)] // tick counts far below 2^52
        let used = self.cpu_ticks.saturating_sub(earlier.cpu_ticks) as f64 / hz as f64;
        if secs > 0.0 {
            100.0 * used / secs
        } else {
            0.0
        }
    }
}

/// Samples process `pid` every `every` for `duration`.
pub fn sample_process(pid: u32, duration: Duration, every: Duration) -> Result<Vec<ProcSample>> {
    let start = Instant::now();
    let mut samples = vec![ProcSample::read(pid)?];
    while start.elapsed() < duration {
        std::thread::sleep(every);
        samples.push(ProcSample::read(pid)?);
    }
    Ok(samples)
}

impl ProcSummary {
    /// As JSON, for benchmark reports.
    pub fn to_json(&self) -> Value {
        serde_json::json!({
            "rss_kib": self.rss_last_kib,
            "rss_first_kib": self.rss_first_kib,
            "rss_max_kib": self.rss_max_kib,
            "cpu_percent": self.cpu_percent,
        })
    }
}

/// Summary of process samples: RSS range and mean CPU.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProcSummary {
    /// RSS at the first sample, KiB.
    pub rss_first_kib: u64,
    /// RSS at the last sample, KiB.
    pub rss_last_kib: u64,
    /// Highest RSS sampled, KiB.
    pub rss_max_kib: u64,
    /// CPU over the whole span, percent of one core.
    pub cpu_percent: f64,
}

/// Summarises `samples` (at least one).
pub fn summarise(samples: &[ProcSample]) -> ProcSummary {
    let first = samples.first().copied();
    let last = samples.last().copied();
    match (first, last) {
        (Some(first), Some(last)) => ProcSummary {
            rss_first_kib: first.rss_kib,
            rss_last_kib: last.rss_kib,
            rss_max_kib: samples.iter().map(|s| s.rss_kib).max().unwrap_or(0),
            cpu_percent: last.cpu_percent_since(&first),
        },
        _ => ProcSummary {
            rss_first_kib: 0,
            rss_last_kib: 0,
            rss_max_kib: 0,
            cpu_percent: 0.0,
        },
    }
}

/// Sustained load: races and DNS queries at fixed rates, at the same time.
#[derive(Clone, Debug)]
pub struct LoadPlan {
    /// Insert races per second (pod 1 against pod 0, see [`race_rule`]).
    pub race_rate: u64,
    /// DNS queries per second, all answered NXDOMAIN (each answer is a
    /// ring-buffer event), shared by `dns_clients` pods from pod 2 on.
    pub dns_rate: u64,
    /// Pods sending DNS queries.
    pub dns_clients: usize,
    /// How long the load runs.
    pub duration: Duration,
    /// The agent's `--dns-timeout`: unanswered queries are counted as
    /// timeouts this long after they were sent.
    pub dns_timeout: Duration,
}

/// What a [`LoadPlan`] did, from the senders', the kernel's and the agent's
/// own counts.
#[derive(Clone, Debug)]
pub struct LoadReport {
    /// The plan that ran.
    pub plan: LoadPlan,
    /// Datagrams pod 1 sent towards the held port.
    pub race_sent: u64,
    /// The node's `insert_failed` delta.
    pub kernel_insert_failed: u64,
    /// Races the agent attributed (`status.counters.insert_races` delta).
    pub races_attributed: u64,
    /// Race events user space received.
    pub race_events_received: u64,
    /// Race events lost (ring buffer full).
    pub race_events_lost: u64,
    /// DNS queries sent.
    pub dns_sent: u64,
    /// DNS answers the clients received.
    pub dns_answered: u64,
    /// Queries the DNS programs recorded.
    pub dns_queries_counted: u64,
    /// Answers the DNS programs matched.
    pub dns_responses_counted: u64,
    /// DNS events user space received.
    pub dns_events_received: u64,
    /// DNS events lost (ring buffer full).
    pub dns_events_lost: u64,
    /// Queries the agent counted as timed out (never answered), read once
    /// every unanswered query has had time to time out.
    pub dns_timeouts: u64,
    /// The agent's RSS, sampled every second from the start of the load.
    pub rss_samples_kib: Vec<u64>,
    /// The agent's memory and CPU over the load.
    pub agent: ProcSummary,
}

impl LoadReport {
    /// As JSON, for benchmark and soak reports.
    pub fn to_json(&self) -> Value {
        #[allow(clippy::cast_precision_loss)] // counts far below 2^52
        let per_second = |n: u64| n as f64 / self.plan.duration.as_secs_f64();
        serde_json::json!({
            "seconds": self.plan.duration.as_secs_f64(),
            "races": {
                "target_per_second": self.plan.race_rate,
                "sent": self.race_sent,
                "kernel_insert_failed": self.kernel_insert_failed,
                "per_second": per_second(self.kernel_insert_failed),
                "attributed": self.races_attributed,
                "events_received": self.race_events_received,
                "events_lost": self.race_events_lost,
            },
            "dns": {
                "target_per_second": self.plan.dns_rate,
                "sent": self.dns_sent,
                "answered": self.dns_answered,
                "per_second": per_second(self.dns_sent),
                "queries_counted": self.dns_queries_counted,
                "responses_counted": self.dns_responses_counted,
                "events_received": self.dns_events_received,
                "events_lost": self.dns_events_lost,
                "timeouts": self.dns_timeouts,
            },
            "agent": self.agent.to_json(),
            "rss_samples_kib": self.rss_samples_kib,
        })
    }
}

/// Runs `plan` against the agent on `topo` (pods 0 and 1 set up by
/// [`race_rule`], [`dns_server`] running) and reads every
/// count before and after.
pub fn run_load(topo: &Topology, agent: &Agent, plan: &LoadPlan) -> Result<LoadReport> {
    let pid = agent.pid().context("agent has no pid")?;
    let server = IpAddr::V4(topo.server_ipv4());
    let a = topo.pod(0);
    let race_dst = SocketAddr::new(server, RACE_PORT);
    // Pod A (re)opens the flow that holds the node's one SNAT port.
    crate::udp_send(
        a.netns(),
        SocketAddr::new(a.ipv4().into(), 5000),
        race_dst,
        1,
    )?;
    let status = || agent.api("status", Value::Null);
    let timeouts = || -> Result<u64> {
        Ok(agent
            .metrics(topo.node())?
            .count_sum("podnet_dns_timeouts_total"))
    };
    let before = status()?;
    let timeouts_before = timeouts()?;
    let kernel_before = crate::conntrack_stats(topo.node())?.get("insert_failed")?;
    let duration = plan.duration;
    let rss_sampler = std::thread::spawn(move || {
        sample_process(
            pid,
            duration + Duration::from_secs(1),
            Duration::from_secs(1),
        )
    });
    let (race_sent, dns) = send_load(topo, plan)?;
    // Both event threads poll at least every 100 ms; give them time to drain.
    std::thread::sleep(Duration::from_secs(1));
    let after = status()?;
    let samples = rss_sampler
        .join()
        .map_err(|_| anyhow::anyhow!("sampler panicked"))??;
    let kernel_insert_failed =
        crate::conntrack_stats(topo.node())?.get("insert_failed")? - kernel_before;
    let delta = |path: &[&str]| -> u64 {
        let get = |v: &Value| path.iter().fold(v, |v, k| &v[*k]).as_u64().unwrap_or(0);
        get(&after).saturating_sub(get(&before))
    };
    let dns_sent: u64 = dns.iter().map(|d| d.sent).sum();
    let unanswered = dns_sent.saturating_sub(delta(&["dns", "counters", "responses"]));
    // Every unanswered query times out once --dns-timeout has passed and a
    // sweep (four per timeout) has run.
    let timed_out = || timeouts().map_or(0, |t| t - timeouts_before);
    wait_for(
        || timed_out() >= unanswered,
        plan.dns_timeout + Duration::from_secs(3),
    );
    // A little longer: a count above `unanswered` would be a defect to see.
    std::thread::sleep(plan.dns_timeout / 2);
    let dns_timeouts = timed_out();
    Ok(LoadReport {
        plan: plan.clone(),
        race_sent,
        kernel_insert_failed,
        races_attributed: delta(&["counters", "insert_races"]),
        race_events_received: delta(&["events_received"]),
        race_events_lost: delta(&["counters", "events_lost"]),
        dns_sent,
        dns_answered: dns.iter().map(|d| d.answered).sum(),
        dns_queries_counted: delta(&["dns", "counters", "queries"]),
        dns_responses_counted: delta(&["dns", "counters", "responses"]),
        dns_events_received: delta(&["dns", "events_received"]),
        dns_events_lost: delta(&["dns", "counters", "events_lost"]),
        dns_timeouts,
        rss_samples_kib: samples.iter().map(|s| s.rss_kib).collect(),
        agent: summarise(&samples),
    })
}

/// Sends the races and DNS queries of `plan`: (datagrams pod 1 sent, what
/// each DNS client sent and got back).
fn send_load(topo: &Topology, plan: &LoadPlan) -> Result<(u64, Vec<DnsLoad>)> {
    let server = IpAddr::V4(topo.server_ipv4());
    let (a, b) = (topo.pod(0), topo.pod(1));
    let race_dst = SocketAddr::new(server, RACE_PORT);
    let duration = plan.duration;
    std::thread::scope(|scope| -> Result<(u64, Vec<DnsLoad>)> {
        let src = SocketAddr::new(b.ipv4().into(), 5001);
        let race_sender = scope.spawn(move || {
            crate::bench::udp_flood(b.netns(), src, race_dst, plan.race_rate, duration)
        });
        // Pod A's flow is unreplied: conntrack forgets it after 30 s, and
        // pod B's flow would then take the port instead of losing races.
        // A datagram every 5 s keeps A's entry alive for any duration.
        scope.spawn(move || -> Result<()> {
            let started = Instant::now();
            while started.elapsed() + HOLDER_REFRESH < duration {
                std::thread::sleep(HOLDER_REFRESH);
                crate::udp_send(
                    a.netns(),
                    SocketAddr::new(a.ipv4().into(), 5000),
                    race_dst,
                    1,
                )?;
            }
            Ok(())
        });
        let clients: Vec<_> = (0..plan.dns_clients)
            .map(|i| {
                let pod = topo.pod(2 + i);
                let per_client = plan.dns_rate / plan.dns_clients as u64;
                scope.spawn(move || {
                    dns_flood(
                        pod.netns(),
                        SocketAddr::new(server, 53),
                        &format!("nx-{i}.load.test"),
                        per_client,
                        duration,
                    )
                })
            })
            .collect();
        let sent = race_sender
            .join()
            .map_err(|_| anyhow::anyhow!("race sender panicked"))??
            .0;
        let mut dns = Vec::new();
        for client in clients {
            dns.push(
                client
                    .join()
                    .map_err(|_| anyhow::anyhow!("DNS client panicked"))??,
            );
        }
        Ok((sent, dns))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_encodes_labels() {
        let q = dns_query(0x1234, "nx-1.load.test");
        assert_eq!(&q[..2], &[0x12, 0x34]);
        assert_eq!(&q[12..], b"\x04nx-1\x04load\x04test\x00\x00\x01\x00\x01");
    }

    #[test]
    fn own_process_sample_is_plausible() {
        let s = ProcSample::read(std::process::id()).unwrap();
        assert!(s.rss_kib > 0 && s.peak_rss_kib >= s.rss_kib, "{s:?}");
    }
}
