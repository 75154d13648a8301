//! podnet-bench-steer: what the ENI fast path buys, measured on one simulated
//! VPC in one run (run as root).
//!
//! The node namespace is a real node's: kube-proxy's iptables rules for 1,000
//! Services (2 endpoints each, every tenth a node port) and 100,000 entries in
//! its conntrack table ([`bed`]). The same pod talks to the same servers in
//! the VPC namespace over three paths, round-robin:
//! - `kernel`: the agent without `--fast-path`: policy routing through the
//!   node, netfilter (kube-proxy's chains, podnet's SNAT chain) and conntrack;
//! - `fast`: the agent with `--fast-path`: TC programs redirect between the
//!   pod's veth and the ENI;
//! - `direct`: a second veth straight from the pod into the VPC namespace, the
//!   physical limit of this test bed.
//!
//! Each path is measured for request/response (sockperf TCP ping-pong), new
//! connections (connect, one request and response, close: netperf's
//! `TCP_CRR`) and throughput (iperf3); for the fast path also the programs'
//! cost per packet (`bpf_stats`) during each. Figures are ratios from the same
//! run: the median of the rounds' ratios. It also measures how long the agent
//! takes to put back a rule deleted by hand.
//!
//! Usage: `podnet-bench-steer [--rounds N] [--seconds S]`

mod bed;
mod report;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use podnet_tests::{
    bench::{iperf3, sockperf, BpfStats, ProgStats, IPERF_PORT, SOCKPERF_PORT},
    crr::{crr_client, crr_server},
    kube_proxy, require_root, spawn_in,
    vpc::{Vpc, REMOTE, VPC_CIDR},
    wait_for, Agent, Netns,
};
use report::{Cost, Figures, Round};

/// The direct veth: pod side and VPC side.
const DIRECT_POD: &str = "10.0.250.1";
const DIRECT_SERVER: &str = "10.0.250.2";
/// The port of the connect/request/response/close server.
const CRR_PORT: u16 = 12_000;
/// How long the agent may take to converge, and to finish its first SNAT
/// scan of the busy table.
const AGENT_READY: Duration = Duration::from_secs(15);

fn args() -> Result<(usize, u64)> {
    let mut rounds = 3;
    let mut seconds = 5;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--rounds" => rounds = it.next().context("--rounds N")?.parse()?,
            "--seconds" => seconds = it.next().context("--seconds S")?.parse()?,
            other => bail!(
                "unknown argument {other}; usage: podnet-bench-steer [--rounds N] [--seconds S]"
            ),
        }
    }
    if rounds == 0 || seconds == 0 {
        bail!("--rounds and --seconds must be at least 1");
    }
    Ok((rounds, seconds))
}

fn host(cmd: &[&str]) -> Result<()> {
    let out = std::process::Command::new(cmd[0])
        .args(&cmd[1..])
        .output()?;
    if !out.status.success() {
        bail!(
            "{}: {}",
            cmd.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// A veth from the pod straight into the VPC namespace.
fn direct_link(pod: &Netns, vpc: &Netns) -> Result<()> {
    host(&[
        "ip",
        "link",
        "add",
        "name",
        "eth1",
        "netns",
        pod.name(),
        "type",
        "veth",
        "peer",
        "name",
        "direct0",
        "netns",
        vpc.name(),
    ])?;
    pod.run_ok(&[
        "ip",
        "address",
        "add",
        &format!("{DIRECT_POD}/30"),
        "dev",
        "eth1",
    ])?;
    vpc.run_ok(&[
        "ip",
        "address",
        "add",
        &format!("{DIRECT_SERVER}/30"),
        "dev",
        "direct0",
    ])?;
    pod.run_ok(&["ip", "link", "set", "eth1", "up"])?;
    vpc.run_ok(&["ip", "link", "set", "direct0", "up"])?;
    podnet_tests::wait_link_up(pod, "eth1", Duration::from_secs(5))?;
    podnet_tests::wait_link_up(vpc, "direct0", Duration::from_secs(5))
}

/// The programs of the fast path, measured during each workload.
#[derive(Clone, Copy)]
struct Programs {
    pod_to_eni: u32,
    eni_to_pod: u32,
}

impl Programs {
    const NAMES: [&'static str; 2] = ["pod->ENI", "ENI->pod"];

    fn read(self) -> Result<[ProgStats; 2]> {
        Ok([
            ProgStats::read(self.pod_to_eni)?,
            ProgStats::read(self.eni_to_pod)?,
        ])
    }
}

/// Runs `workload`; with `programs`, also records what they cost per run
/// meanwhile.
fn with_costs<T>(
    programs: Option<Programs>,
    name: &'static str,
    costs: &mut Vec<Cost>,
    workload: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let Some(programs) = programs else {
        return workload();
    };
    let before = programs.read()?;
    let value = workload()?;
    let after = programs.read()?;
    for (i, program) in Programs::NAMES.iter().enumerate() {
        if let Some(ns) = after[i].ns_per_run_since(&before[i]) {
            costs.push(Cost {
                workload: name,
                program,
                ns_per_run: ns,
                runs: after[i].runs_since(&before[i]),
            });
        }
    }
    Ok(value)
}

/// Request/response, new connections and throughput from `pod` to `server`.
fn measure(
    pod: &Netns,
    server: &str,
    seconds: u64,
    programs: Option<Programs>,
    costs: &mut Vec<Cost>,
) -> Result<Figures> {
    let (latency_us, requests_per_s) = with_costs(programs, "request/response", costs, || {
        sockperf(pod, server, seconds)
    })?;
    let crr_dst = SocketAddr::new(server.parse()?, CRR_PORT);
    let crr = with_costs(programs, "new connections", costs, || {
        crr_client(pod, crr_dst, Duration::from_secs(seconds))
    })?;
    let gbit_per_s = with_costs(programs, "throughput", costs, || {
        iperf3(pod, server, seconds)
    })?;
    Ok(Figures {
        latency_us,
        requests_per_s,
        connections_per_s: crr.per_second(),
        connections: crr.completed,
        connections_failed: crr.failed,
        gbit_per_s,
    })
}

fn start_agent(vpc: &Vpc, enis: &str, fast: bool) -> Result<Agent> {
    let mut args = vec!["--enis", enis, "--vpc-cidrs", VPC_CIDR];
    if fast {
        args.push("--fast-path");
    }
    let agent = Agent::start_with(vpc.node(), &vpc.endpoints(), &args)?;
    // Converged routing, and the first SNAT scan of the busy table done
    // (0.3 s of a core at start, then once a minute), before measuring.
    let ready = wait_for(
        || {
            let converged = agent
                .api("routes.show", serde_json::Value::Null)
                .is_ok_and(|v| {
                    let lines = v["lines"].as_array().cloned().unwrap_or_default();
                    !lines.is_empty() && lines.iter().all(|l| l["state"] == "ok")
                });
            converged
                && agent
                    .metrics(vpc.node())
                    .is_ok_and(|m| m.value_or_zero("podnet_snat_scan_entries", &[]) >= 1.0)
        },
        AGENT_READY,
    );
    if !ready {
        bail!(
            "routing did not converge or no SNAT scan finished within {AGENT_READY:?}:\n{}",
            agent.log()
        );
    }
    // Neighbour entries on every hop, so the first measured packet is steady state.
    vpc.pods()[0].netns().run_ok(&[
        "ping",
        "-c",
        "3",
        "-i",
        "0.05",
        "-W",
        "1",
        &REMOTE.to_string(),
    ])?;
    Ok(agent)
}

/// Egress IPv4 packets redirected, and egress IPv4 packets left to the kernel.
fn steered(agent: &Agent, vpc: &Vpc) -> Result<(u64, u64)> {
    let m = agent.metrics(vpc.node())?;
    let count = |result| {
        m.count(
            "podnet_steer_packets_total",
            &[
                ("family", "ipv4"),
                ("direction", "egress"),
                ("result", result),
            ],
        )
    };
    Ok((
        count("redirected"),
        count("no_neighbour") + count("fib_miss") + count("passed"),
    ))
}

/// Id of the program the agent attached to `ifname` (tcx), from its pinned
/// link: never another agent's on this machine.
fn steer_program(agent: &Agent, ifname: &str) -> Result<u32> {
    use podnet::routing::steer::{link_pin_name, PIN_SUBDIR};
    let pin = agent.bpffs().join(PIN_SUBDIR).join(link_pin_name(ifname));
    let out = std::process::Command::new("bpftool")
        .args(["link", "show", "pinned"])
        .arg(&pin)
        .arg("--json")
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("bpftool link show pinned {}", pin.display()))?;
    v["prog_id"]
        .as_u64()
        .and_then(|id| u32::try_from(id).ok())
        .with_context(|| {
            format!(
                "no program behind the link pinned at {}: {v}",
                pin.display()
            )
        })
}

fn repair_latency(vpc: &Vpc) -> Result<Duration> {
    let node = vpc.node();
    let ip = vpc.pods()[0].ip().to_string();
    node.run_ok(&[
        "ip", "rule", "del", "priority", "1536", "from", &ip, "lookup", "101",
    ])?;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        let out = node.run_ok(&["ip", "rule", "show", "priority", "1536"])?;
        if String::from_utf8_lossy(&out.stdout).contains(&ip) {
            return Ok(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    bail!("rule not repaired within 3 s")
}

fn main() -> Result<()> {
    let (rounds, seconds) = args()?;
    if !require_root() {
        bail!("podnet-bench-steer needs root");
    }
    let vpc = Vpc::builder().name("bench-steer").enis(1).build()?;
    let pod = vpc.pods()[0].netns();
    direct_link(pod, vpc.vpc())?;
    let started = Instant::now();
    let node = bed::build(&vpc)?;
    let built_in = started.elapsed();
    let enis = std::env::temp_dir().join(format!("podnet-bench-enis-{}.yaml", std::process::id()));
    std::fs::write(&enis, vpc.enis_yaml())?;
    let enis_arg = enis.to_string_lossy().into_owned();
    let _sockperf = spawn_in(
        vpc.vpc(),
        &[
            "sockperf",
            "sr",
            "--tcp",
            "-i",
            "0.0.0.0",
            "-p",
            SOCKPERF_PORT,
        ],
    )?;
    let _iperf = spawn_in(vpc.vpc(), &["iperf3", "-s", "-p", IPERF_PORT])?;
    let _crr = crr_server(vpc.vpc(), SocketAddr::from(([0, 0, 0, 0], CRR_PORT)))?;
    std::thread::sleep(Duration::from_millis(500));

    let rounds_result = run_rounds(&vpc, &enis_arg, rounds, seconds);
    let _ = std::fs::remove_file(&enis);
    let results = report::Results {
        rounds: rounds_result?,
        seconds,
        node,
        built_in,
    };
    report::print(&results);
    podnet_tests::bench::write_json_figures(&report::json(&results))
}

/// Every round: kernel path, fast path, direct veth, back to back.
fn run_rounds(vpc: &Vpc, enis_arg: &str, rounds: usize, seconds: u64) -> Result<Vec<Round>> {
    let pod = vpc.pods()[0].netns();
    let node = vpc.node();
    let remote = REMOTE.to_string();
    let mut out = Vec::new();
    for index in 0..rounds {
        let mut costs = Vec::new();
        let mut agent = start_agent(vpc, enis_arg, false)?;
        let conntrack_entries = bed::entries(node)?;
        let lookups = kube_proxy::service_lookups(node)?;
        let kernel = measure(pod, &remote, seconds, None, &mut costs)?;
        let kernel_lookups = kube_proxy::service_lookups(node)? - lookups;
        agent.stop()?;
        drop(agent);

        let mut agent = start_agent(vpc, enis_arg, true)?;
        let before = steered(&agent, vpc)?;
        let programs = Programs {
            pod_to_eni: steer_program(&agent, vpc.pods()[0].host_if())?,
            eni_to_pod: steer_program(&agent, vpc.enis()[0].name())?,
        };
        let stats = BpfStats::enable()?;
        let lookups = kube_proxy::service_lookups(node)?;
        let fast = measure(pod, &remote, seconds, Some(programs), &mut costs)?;
        let fast_lookups = kube_proxy::service_lookups(node)? - lookups;
        drop(stats);
        let after = steered(&agent, vpc)?;
        let repair = if index == 0 {
            Some(repair_latency(vpc)?)
        } else {
            None
        };
        agent.stop()?;
        drop(agent);

        let direct = measure(pod, DIRECT_SERVER, seconds, None, &mut costs)?;
        out.push(Round {
            kernel,
            fast,
            direct,
            conntrack_entries,
            kernel_lookups,
            fast_lookups,
            steered: after.0 - before.0,
            left_to_kernel: after.1 - before.1,
            costs,
            repair,
        });
    }
    Ok(out)
}
