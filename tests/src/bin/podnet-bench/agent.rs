//! The agent as a whole on one node with 1,100 pods: its memory and CPU idle,
//! with 10, 100, 250 and 1,000 endpoints and under sustained DNS and race
//! load; the ring buffers at the target event rates; how soon a burst of 100
//! new pods gets its programs, with tcx links (also with the kernel's RCU
//! grace periods expedited) and with classic tc filters; and
//! what all of podnet's programs cost a pod's traffic against the same node
//! without them.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use podnet_tests::{
    bench::{iperf3, sockperf, BpfStats, ProgStats, IPERF_PORT, SOCKPERF_PORT},
    load::{
        dns_server, endpoints, race_rule, run_load, sample_process, set_endpoints, summarise,
        wait_dns_links, LoadPlan, ProcSummary,
    },
    spawn_in, udp_send, Agent, NsChild, Topology,
};
use serde_json::{json, Value};

use crate::burst;

/// Endpoint counts whose cost is compared; the last is the node's size
/// before a burst.
const ENDPOINT_STEPS: [usize; 4] = [10, 100, 250, 1000];
/// New pods registered at once on top of the largest step.
const BURST: usize = 100;
/// New pods registered one at a time before the burst, and how far apart.
const SINGLES: usize = 20;
const SINGLE_SPACING: Duration = Duration::from_millis(250);
/// Pods on the simulated node: the largest step and the burst.
const PODS: usize = ENDPOINT_STEPS[ENDPOINT_STEPS.len() - 1] + BURST;
/// Target rates: races per second and DNS queries per second.
const RACE_RATE: u64 = 10_000;
const DNS_RATE: u64 = 20_000;
/// DNS clients sharing [`DNS_RATE`] (pods 2.. so pods 0 and 1 can race).
const DNS_CLIENTS: usize = 4;
/// How long the sustained load runs.
const LOAD_SECONDS: u64 = 20;
/// Rounds and seconds per measurement of the all-programs comparison.
const ROUNDS: usize = 6;
const SECONDS: u64 = 5;

/// Runs the agent benchmark.
pub fn run() -> Result<Value> {
    let built = Instant::now();
    let topo = Topology::builder().name("agentb").pods(PODS).build()?;
    race_rule(&topo)?;
    let topology_seconds = built.elapsed().as_secs_f64();
    eprintln!("agent: {PODS} pods built in {topology_seconds:.1} s");
    let server_ip = topo.server_ipv4().to_string();
    let servers = Servers::start(&topo, &server_ip)?;

    let mut agent = Agent::start_with(topo.node(), &[], &["--dns-timeout", "1s"])?;
    let pid = agent.pid().context("agent has no pid")?;
    std::thread::sleep(Duration::from_secs(2));
    let idle = summarise(&sample_process(
        pid,
        Duration::from_secs(10),
        Duration::from_secs(1),
    )?);
    eprintln!("agent: idle {idle:?}");

    let mut steps = Vec::new();
    for n in ENDPOINT_STEPS {
        steps.push(endpoint_step(&topo, &agent, pid, n)?);
    }
    let load = sustained_load(&topo, &agent)?;
    let mut adds_tcx = add_series(&topo, &agent)?;
    // The same series with the kernel's grace periods expedited, which is
    // what each tcx attach waits for (an operator's choice, not podnet's).
    let adds_expedited = match burst::ExpeditedGracePeriods::enable()? {
        Some(_expedited) => add_series(&topo, &agent)?,
        None => Value::Null,
    };
    // And with each ADD answering only once its pod's programs are in place.
    agent.restart_with_args(topo.node(), &["--cni-add-wait", "5s"])?;
    let adds_waiting = add_series(&topo, &agent)?;
    drop(agent);
    // The links go with the agent's pins; each detach waits for the kernel
    // as each attach did, so the next agent starts only once they are gone.
    let largest: Vec<_> = topo.pods()[..ENDPOINT_STEPS[ENDPOINT_STEPS.len() - 1]]
        .iter()
        .collect();
    let detach = burst::wait_detached(&topo, &largest)?.as_secs_f64();
    eprintln!("agent: stopped; its links left the kernel in {detach:.2} s");
    adds_tcx["detach_all_seconds"] = json!(detach);
    let adds_tc = classic_tc_series(&topo)?;
    let overhead = all_programs_versus_none(&topo, &server_ip)?;
    drop(servers);
    Ok(json!({
        "pods": PODS,
        "topology_build_seconds": topology_seconds,
        "idle": proc_json(&idle),
        "endpoints": steps,
        "load": load,
        "adds": {
            "tcx": adds_tcx,
            "tcx_expedited": adds_expedited,
            "tcx_add_wait": adds_waiting,
            "tc": adds_tc,
        },
        "overhead": overhead,
    }))
}

/// dnsmasq, iperf3 and sockperf servers in the server namespace.
struct Servers {
    _children: Vec<NsChild>,
}

impl Servers {
    fn start(topo: &Topology, server_ip: &str) -> Result<Self> {
        let children = vec![
            dns_server(topo)?,
            spawn_in(topo.server(), &["iperf3", "-s", "-p", IPERF_PORT])?,
            spawn_in(
                topo.server(),
                &[
                    "sockperf",
                    "server",
                    "--tcp",
                    "-i",
                    server_ip,
                    "-p",
                    SOCKPERF_PORT,
                ],
            )?,
        ];
        Ok(Self {
            _children: children,
        })
    }
}

fn proc_json(p: &ProcSummary) -> Value {
    p.to_json()
}

/// The agent with `n` endpoints, each with its DNS programs attached: time
/// to attach, memory and CPU at rest, scrape cost, and the programs' cost
/// per non-DNS packet.
fn endpoint_step(topo: &Topology, agent: &Agent, pid: u32, n: usize) -> Result<Value> {
    let specs: Vec<_> = endpoints(topo, n).into_iter().take(n).collect();
    let attach = set_endpoints(agent, &specs, Duration::from_mins(2))?;
    std::thread::sleep(Duration::from_secs(2));
    let rest = summarise(&sample_process(
        pid,
        Duration::from_secs(5),
        Duration::from_secs(1),
    )?);
    let mut scrapes = Vec::new();
    let mut bytes = 0;
    for _ in 0..5 {
        let start = Instant::now();
        let (code, body) = podnet_tests::agent::http_get(topo.node(), "/metrics")?;
        if code != 200 {
            bail!("/metrics answered {code}");
        }
        scrapes.push(start.elapsed().as_secs_f64() * 1e3);
        bytes = body.len();
    }
    scrapes.sort_by(f64::total_cmp);
    let per_packet = dns_program_cost(topo, agent)?;
    eprintln!(
        "agent: {n} endpoints attached in {:.2} s; {rest:?}; scrape {:.2} ms ({bytes} B); {per_packet:.1} ns/packet",
        attach.as_secs_f64(),
        scrapes[2]
    );
    Ok(json!({
        "endpoints": n,
        "attach_seconds": attach.as_secs_f64(),
        "at_rest": proc_json(&rest),
        "scrape_ms_median": scrapes[2],
        "scrape_bytes": bytes,
        "dns_program_ns_per_packet": per_packet,
    }))
}

/// New pods registered through the API, as podnet-cni's ADDs, on top of the
/// largest step's endpoints: [`SINGLES`] of them [`SINGLE_SPACING`] apart,
/// then [`BURST`] back to back. Each pod is removed again after its series.
fn add_series(topo: &Topology, agent: &Agent) -> Result<Value> {
    let base = ENDPOINT_STEPS[ENDPOINT_STEPS.len() - 1];
    let pods: Vec<_> = topo.pods()[base..base + BURST].iter().collect();
    let routing_before = route_reconciles(topo, agent)?;
    let singles = burst::run(topo, agent, &pods[..SINGLES], SINGLE_SPACING)?;
    // The DNS thread's own share: its last reconcile that changed a hook
    // attached the last single pod.
    let status = agent.api("status", Value::Null)?;
    let reconcile_us = status["dns"]["last_reconcile"]["took_us"].clone();
    let routing = route_reconciles(topo, agent)?;
    eprintln!(
        "agent: {SINGLES} single ADDs at {base} endpoints: {}",
        singles.to_json()
    );
    burst::remove(topo, agent, &pods[..SINGLES])?;
    let burst = burst::run(topo, agent, &pods, Duration::ZERO)?;
    eprintln!(
        "agent: burst of {BURST} ADDs at {base} endpoints: {}",
        burst.to_json()
    );
    burst::remove(topo, agent, &pods)?;
    let mean_ms = |(sum, count): (f64, f64), (sum0, count0): (f64, f64)| {
        if count > count0 {
            1e3 * (sum - sum0) / (count - count0)
        } else {
            f64::NAN
        }
    };
    Ok(json!({
        "single": singles.to_json(),
        "burst": burst.to_json(),
        "dns_reconcile_us": reconcile_us,
        "route_reconciles": routing.full.1 - routing_before.full.1,
        "route_reconcile_ms_mean": mean_ms(routing.full, routing_before.full),
        "route_change_passes": routing.changes.1 - routing_before.changes.1,
        "route_change_pass_ms_mean": mean_ms(routing.changes, routing_before.changes),
    }))
}

/// The routing subsystem's reconcile time so far (seconds) and count, by
/// scope.
struct RoutePasses {
    full: (f64, f64),
    changes: (f64, f64),
}

/// The routing subsystem's passes so far.
fn route_reconciles(topo: &Topology, agent: &Agent) -> Result<RoutePasses> {
    let m = agent.metrics(topo.node())?;
    let scope = |s| {
        (
            m.value_or_zero(
                "podnet_route_reconcile_duration_seconds_sum",
                &[("scope", s)],
            ),
            m.value_or_zero(
                "podnet_route_reconcile_duration_seconds_count",
                &[("scope", s)],
            ),
        )
    };
    Ok(RoutePasses {
        full: scope("full"),
        changes: scope("changes"),
    })
}

/// The largest step again with the programs as classic tc filters (kernels
/// before 6.6): time to attach them all through the endpoints file, then the
/// same series of ADDs.
fn classic_tc_series(topo: &Topology) -> Result<Value> {
    let base = ENDPOINT_STEPS[ENDPOINT_STEPS.len() - 1];
    let specs: Vec<_> = endpoints(topo, base).into_iter().take(base).collect();
    let agent = Agent::start_with(
        topo.node(),
        &[],
        &["--dns-timeout", "1s", "--tc-attach", "tc"],
    )?;
    let attach = set_endpoints(&agent, &specs, Duration::from_mins(5))?.as_secs_f64();
    eprintln!("agent: classic tc, {base} endpoints attached in {attach:.2} s");
    let mut series = add_series(topo, &agent)?;
    series["attach_all_seconds"] = json!(attach);
    Ok(series)
}

/// Run time per run of the DNS programs (all of them, summed) while pod 0
/// sends 20,000 non-DNS datagrams, from the kernel's statistics.
fn dns_program_cost(topo: &Topology, agent: &Agent) -> Result<f64> {
    let status = agent.api("status", Value::Null)?;
    let ids: Vec<u32> = status["dns"]["program_ids"]
        .as_array()
        .context("status has no dns.program_ids")?
        .iter()
        .filter_map(|v| v.as_u64().and_then(|v| u32::try_from(v).ok()))
        .collect();
    let read_all = || -> Result<ProgStats> {
        let mut sum = ProgStats::default();
        for id in &ids {
            let s = ProgStats::read(*id)?;
            sum.run_cnt += s.run_cnt;
            sum.run_time_ns += s.run_time_ns;
        }
        Ok(sum)
    };
    let _stats = BpfStats::enable()?;
    let before = read_all()?;
    let pod = topo.pod(0);
    let sink = SocketAddr::new(topo.server_ipv4().into(), 9999);
    udp_send(
        pod.netns(),
        SocketAddr::new(pod.ipv4().into(), 5500),
        sink,
        20_000,
    )?;
    let after = read_all()?;
    after
        .ns_per_run_since(&before)
        .context("the DNS programs did not run")
}

/// The largest step's endpoints, races at [`RACE_RATE`] and DNS queries at [`DNS_RATE`]
/// (every answer NXDOMAIN, so every answer is a ring-buffer event) for
/// [`LOAD_SECONDS`]: events lost, counts against the kernel's, memory and CPU.
fn sustained_load(topo: &Topology, agent: &Agent) -> Result<Value> {
    let report = run_load(
        topo,
        agent,
        &LoadPlan {
            race_rate: RACE_RATE,
            dns_rate: DNS_RATE,
            dns_clients: DNS_CLIENTS,
            duration: Duration::from_secs(LOAD_SECONDS),
            dns_timeout: Duration::from_secs(1),
        },
    )?;
    eprintln!("agent: load {report:?}");
    Ok(report.to_json())
}

/// iperf3 throughput and sockperf latency from pod 0 to the server with
/// every program of podnet attached (the agent running: the conntrack
/// tracer, DNS programs on the pod's interface and on the uplink) against the
/// same node with none (the agent stopped and its pins removed), alternating.
fn all_programs_versus_none(topo: &Topology, server_ip: &str) -> Result<Value> {
    let pod = topo.pod(0);
    let spec = endpoints(topo, 1).remove(0);
    let uplink = topo.node_server_if().to_owned();
    let mut all = Vec::new();
    let mut none = Vec::new();
    for round in 0..ROUNDS {
        none.push(measure(pod.netns(), server_ip)?);
        let agent = Agent::start_with(
            topo.node(),
            std::slice::from_ref(&spec),
            &["--uplinks", &uplink],
        )?;
        // Ingress and egress on the pod's interface and on the uplink.
        wait_dns_links(&agent, 4, Duration::from_secs(20))?;
        // Let the agent's start-up work (reconciles, first samples) pass.
        std::thread::sleep(Duration::from_secs(2));
        all.push(measure(pod.netns(), server_ip)?);
        drop(agent);
        eprintln!(
            "overhead round {round}: none {:?}, all {:?}",
            none[round], all[round]
        );
    }
    let mean = |v: &[Figures], f: fn(&Figures) -> f64| {
        #[allow(clippy::cast_precision_loss)]
        let n = v.len() as f64;
        v.iter().map(f).sum::<f64>() / n
    };
    let gbit = |f: &Figures| f.gbit_per_s;
    let lat = |f: &Figures| f.latency_us;
    let rr = |f: &Figures| f.requests_per_s;
    let figures = |v: &[Figures]| {
        json!({
            "gbit_per_s": v.iter().map(gbit).collect::<Vec<_>>(),
            "latency_us": v.iter().map(lat).collect::<Vec<_>>(),
            "requests_per_s": v.iter().map(rr).collect::<Vec<_>>(),
            "mean_gbit_per_s": mean(v, gbit),
            "mean_latency_us": mean(v, lat),
            "mean_requests_per_s": mean(v, rr),
        })
    };
    Ok(json!({
        "rounds": ROUNDS,
        "seconds": SECONDS,
        "all": figures(&all),
        "none": figures(&none),
        // Each round measures both configurations back to back, so the
        // median of the rounds' ratios is robust to a burst of other load
        // during one round; the ratio of the means is kept next to it.
        "throughput_ratio": median_ratio(&all, &none, gbit),
        "latency_ratio": median_ratio(&all, &none, lat),
        "requests_ratio": median_ratio(&all, &none, rr),
        "throughput_ratio_of_means": mean(&all, gbit) / mean(&none, gbit),
        "latency_ratio_of_means": mean(&all, lat) / mean(&none, lat),
    }))
}

/// The median over rounds of `f(all) / f(none)`.
fn median_ratio(all: &[Figures], none: &[Figures], f: fn(&Figures) -> f64) -> f64 {
    podnet_tests::bench::median(all.iter().zip(none).map(|(a, n)| f(a) / f(n)).collect())
}

#[derive(Clone, Copy, Debug)]
struct Figures {
    gbit_per_s: f64,
    latency_us: f64,
    requests_per_s: f64,
}

fn measure(pod: &podnet_tests::Netns, server: &str) -> Result<Figures> {
    let (latency_us, requests_per_s) = sockperf(pod, server, SECONDS)?;
    Ok(Figures {
        gbit_per_s: iperf3(pod, server, SECONDS)?,
        latency_us,
        requests_per_s,
    })
}
