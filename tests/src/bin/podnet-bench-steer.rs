//! podnet-bench-steer: what the ENI fast path buys, measured on one simulated
//! VPC in one run (run as root).
//!
//! The same pod talks to the same servers (sockperf TCP ping-pong, iperf3)
//! in the VPC namespace over three paths, round-robin:
//! - `kernel`: the agent without `--fast-path`: policy routing through the
//!   node, netfilter and conntrack (podnet's SNAT chain loads the nat table);
//! - `fast`: the agent with `--fast-path`: TC programs redirect between the
//!   pod's veth and the ENI;
//! - `direct`: a second veth straight from the pod into the VPC namespace, the
//!   physical limit of this test bed.
//!
//! Figures are reported as ratios from the same run. It also measures how
//! long the agent takes to put back a rule deleted by hand.
//!
//! Usage: `podnet-bench-steer [--rounds N] [--seconds S]`

use std::{
    fmt::Write as _,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use podnet_tests::{
    bench::{BpfStats, ProgStats},
    require_root, spawn_in,
    vpc::{Vpc, REMOTE, VPC_CIDR},
    wait_for, Agent, Netns,
};

/// The direct veth: pod side and VPC side.
const DIRECT_POD: &str = "10.0.250.1";
const DIRECT_SERVER: &str = "10.0.250.2";
use podnet_tests::bench::{iperf3, sockperf, IPERF_PORT, MESSAGE, SOCKPERF_PORT};

#[derive(Clone, Copy, Debug, Default)]
struct Figures {
    /// sockperf average latency (µs, half round trip as sockperf reports it).
    latency_us: f64,
    /// Ping-pong requests per second.
    requests_per_s: f64,
    /// iperf3 throughput (Gbit/s).
    gbit_per_s: f64,
}

fn args() -> Result<(usize, u64)> {
    let mut rounds = 2;
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

fn measure(pod: &Netns, server: &str, seconds: u64) -> Result<Figures> {
    let (latency_us, requests_per_s) = sockperf(pod, server, seconds)?;
    let gbit_per_s = iperf3(pod, server, seconds)?;
    Ok(Figures {
        latency_us,
        requests_per_s,
        gbit_per_s,
    })
}

fn start_agent(vpc: &Vpc, enis: &str, fast: bool) -> Result<Agent> {
    let mut args = vec!["--enis", enis, "--vpc-cidrs", VPC_CIDR];
    if fast {
        args.push("--fast-path");
    }
    let agent = Agent::start_with(vpc.node(), &vpc.endpoints(), &args)?;
    let converged = wait_for(
        || {
            agent
                .api("routes.show", serde_json::Value::Null)
                .is_ok_and(|v| {
                    let lines = v["lines"].as_array().cloned().unwrap_or_default();
                    !lines.is_empty() && lines.iter().all(|l| l["state"] == "ok")
                })
        },
        Duration::from_secs(10),
    );
    if !converged {
        bail!("routing did not converge:\n{}", agent.log());
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

/// Id of the most recently loaded program whose (truncated) name is `name`.
fn newest_program(name: &str) -> Result<u32> {
    let out = std::process::Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    v.as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["name"].as_str().is_some_and(|n| name.starts_with(n)))
        .filter_map(|p| u32::try_from(p["id"].as_u64()?).ok())
        .max()
        .with_context(|| format!("no loaded program {name}"))
}

fn mean(xs: &[Figures], f: impl Fn(&Figures) -> f64) -> f64 {
    #[allow(clippy::cast_precision_loss)] // a handful of rounds
    let n = xs.len() as f64;
    xs.iter().map(f).sum::<f64>() / n
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
    std::thread::sleep(Duration::from_millis(500));

    let rounds_result = run_rounds(&vpc, &enis_arg, rounds, seconds);
    let _ = std::fs::remove_file(&enis);
    let all = rounds_result?;
    summary(&all, rounds, seconds);
    podnet_tests::bench::write_json_figures(&figures(&all))
}

/// Figures of every round per path, the rounds' log, and the repair latency.
struct Results {
    kernel: Vec<Figures>,
    fast: Vec<Figures>,
    direct: Vec<Figures>,
    report: String,
    repair: Option<Duration>,
}

fn run_rounds(vpc: &Vpc, enis_arg: &str, rounds: usize, seconds: u64) -> Result<Results> {
    let pod = vpc.pods()[0].netns();
    let (mut kernel, mut fast, mut direct) = (Vec::new(), Vec::new(), Vec::new());
    let mut repair = None;
    let mut report = String::new();
    for round in 0..rounds {
        let mut agent = start_agent(vpc, enis_arg, false)?;
        let k = measure(pod, &REMOTE.to_string(), seconds)?;
        agent.stop()?;
        drop(agent);

        let mut agent = start_agent(vpc, enis_arg, true)?;
        let before = steered(&agent, vpc)?;
        let ids = [
            newest_program("podnet_steer_pod")?,
            newest_program("podnet_steer_eni")?,
        ];
        let stats = BpfStats::enable()?;
        let runs_before = [ProgStats::read(ids[0])?, ProgStats::read(ids[1])?];
        let f = measure(pod, &REMOTE.to_string(), seconds)?;
        let runs_after = [ProgStats::read(ids[0])?, ProgStats::read(ids[1])?];
        drop(stats);
        for (i, name) in ["pod->ENI", "ENI->pod"].iter().enumerate() {
            if let Some(ns) = runs_after[i].ns_per_run_since(&runs_before[i]) {
                let _ = writeln!(
                    report,
                    "round {round}: program {name}: {ns:.0} ns/run over {} runs",
                    runs_after[i].runs_since(&runs_before[i])
                );
            }
        }
        let after = steered(&agent, vpc)?;
        let (redirected, kernel_path) = (after.0 - before.0, after.1 - before.1);
        if round == 0 {
            repair = Some(repair_latency(vpc)?);
        }
        agent.stop()?;
        drop(agent);

        let d = measure(pod, DIRECT_SERVER, seconds)?;
        let _ = writeln!(
            report,
            "round {round}: kernel {k:.1?}\n         fast   {f:.1?} (pod->ENI: {redirected} packets steered, {kernel_path} left to the kernel)\n         direct {d:.1?}"
        );
        kernel.push(k);
        fast.push(f);
        direct.push(d);
    }
    Ok(Results {
        kernel,
        fast,
        direct,
        report,
        repair,
    })
}

/// The means per path and their ratios, as JSON.
fn figures(r: &Results) -> serde_json::Value {
    let path = |xs: &[Figures]| {
        serde_json::json!({
            "latency_us": mean(xs, |f| f.latency_us),
            "requests_per_s": mean(xs, |f| f.requests_per_s),
            "gbit_per_s": mean(xs, |f| f.gbit_per_s),
        })
    };
    let ratio = |a: &[Figures], b: &[Figures], f: fn(&Figures) -> f64| mean(a, f) / mean(b, f);
    serde_json::json!({
        "rounds": r.kernel.len(),
        "kernel": path(&r.kernel),
        "fast": path(&r.fast),
        "direct": path(&r.direct),
        "fast_over_kernel_requests": ratio(&r.fast, &r.kernel, |f| f.requests_per_s),
        "fast_over_kernel_throughput": ratio(&r.fast, &r.kernel, |f| f.gbit_per_s),
        "fast_over_direct_requests": ratio(&r.fast, &r.direct, |f| f.requests_per_s),
        "fast_over_direct_throughput": ratio(&r.fast, &r.direct, |f| f.gbit_per_s),
        "repair_ms": r.repair.map(|d| d.as_secs_f64() * 1e3),
    })
}

fn summary(r: &Results, rounds: usize, seconds: u64) {
    let (kernel, fast, direct, report, repair) =
        (&r.kernel, &r.fast, &r.direct, &r.report, r.repair);
    print!("{report}");
    let row = |name: &str, xs: &[Figures]| {
        format!(
            "{name:<8} {:>10.2} {:>12.0} {:>10.2}",
            mean(xs, |f| f.latency_us),
            mean(xs, |f| f.requests_per_s),
            mean(xs, |f| f.gbit_per_s)
        )
    };
    println!("\nmeans over {rounds} round(s) of {seconds} s, message {MESSAGE} B");
    println!(
        "{:<8} {:>10} {:>12} {:>10}",
        "path", "lat (us)", "req/s", "Gbit/s"
    );
    println!("{}", row("kernel", kernel));
    println!("{}", row("fast", fast));
    println!("{}", row("direct", direct));
    let ratio = |a: &[Figures], b: &[Figures], f: fn(&Figures) -> f64| mean(a, f) / mean(b, f);
    println!(
        "\nfast / kernel: request rate {:.3}x, throughput {:.3}x, latency {:.3}x",
        ratio(fast, kernel, |f| f.requests_per_s),
        ratio(fast, kernel, |f| f.gbit_per_s),
        ratio(fast, kernel, |f| f.latency_us)
    );
    println!(
        "fast / direct: request rate {:.3}x, throughput {:.3}x, latency {:.3}x",
        ratio(fast, direct, |f| f.requests_per_s),
        ratio(fast, direct, |f| f.gbit_per_s),
        ratio(fast, direct, |f| f.latency_us)
    );
    println!(
        "kernel / direct: request rate {:.3}x, throughput {:.3}x",
        ratio(kernel, direct, |f| f.requests_per_s),
        ratio(kernel, direct, |f| f.gbit_per_s)
    );
    // Per-round ratios and their medians: robust to a burst of load from
    // other work on the machine during one round.
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let per_round = |a: &[Figures], b: &[Figures], f: fn(&Figures) -> f64| -> Vec<f64> {
        a.iter().zip(b).map(|(x, y)| f(x) / f(y)).collect()
    };
    let rate = |f: &Figures| f.requests_per_s;
    let tput = |f: &Figures| f.gbit_per_s;
    println!(
        "median of per-round ratios: fast/kernel request rate {:.3}x, throughput {:.3}x; fast/direct request rate {:.3}x, throughput {:.3}x",
        median(per_round(fast, kernel, rate)),
        median(per_round(fast, kernel, tput)),
        median(per_round(fast, direct, rate)),
        median(per_round(fast, direct, tput)),
    );
    if let Some(r) = repair {
        println!("repair latency (rule deleted by hand, back in the kernel): {r:.1?}");
    }
}
