//! podnet-demo: a simulated node with pods, a server, SNAT with a small port
//! range, and the real agent observing the conntrack insert races the traffic
//! causes. Run through `cargo xtask demo` (which builds everything first).
//!
//! Everything lives in network namespaces this program creates and removes,
//! also on Ctrl-C; traffic goes only to addresses inside them.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Barrier,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use podnet_tests::{
    conntrack_stats, in_netns, iptables, require_root, Agent, EndpointSpec, Metrics, Topology,
};
use serde_json::{json, Value};

/// Set by SIGINT/SIGTERM: stop the traffic, summarise, tear down.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// The demo's pods: (namespace, pod).
const PODS: [(&str, &str); 4] = [
    ("shop", "cart-7d9f"),
    ("shop", "checkout-5c2a"),
    ("web", "frontend-8b1e"),
    ("batch", "report-0f3d"),
];
/// Services on the server the pods talk to (UDP).
const SERVICES: [u16; 3] = [53, 8125, 5353];
/// SNAT port range: deliberately tiny so concurrent flows collide.
const SNAT_PORTS: (u16, u16) = (40_000, 40_003);

struct Options {
    seconds: u64,
}

fn options() -> Result<Options> {
    let mut seconds = 20;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--seconds" => {
                seconds = args
                    .next()
                    .context("--seconds needs a value")?
                    .parse()
                    .context("--seconds: not a number")?;
            }
            "-h" | "--help" => {
                println!("podnet-demo [--seconds N]  (default 20, at most 600)");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    if !(1..=600).contains(&seconds) {
        bail!("--seconds must be between 1 and 600");
    }
    Ok(Options { seconds })
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("podnet-demo: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let options = options()?;
    if !require_root() {
        bail!("the demo needs root (network namespaces, iptables, eBPF)");
    }
    // SAFETY: on_signal only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    println!(
        "podnet demo: building a node with {} pods, a server and SNAT to ports {}-{}",
        PODS.len(),
        SNAT_PORTS.0,
        SNAT_PORTS.1
    );
    let topo = Topology::builder().name("demo").pods(PODS.len()).build()?;
    let to = format!(
        "{}:{}-{}",
        topo.node_ipv4_to_server(),
        SNAT_PORTS.0,
        SNAT_PORTS.1
    );
    for proto in ["udp", "tcp"] {
        iptables(
            topo.node(),
            &[
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-s",
                topo.pods_cidr_v4(),
                "-p",
                proto,
                "-j",
                "SNAT",
                "--to-source",
                &to,
            ],
        )?;
    }
    let endpoints: Vec<EndpointSpec> = PODS
        .iter()
        .enumerate()
        .map(|(i, (ns, pod))| {
            let p = topo.pod(i);
            EndpointSpec::new(ns, pod, &[IpAddr::V4(p.ipv4())]).interface(p.host_if())
        })
        .collect();
    let agent = Agent::start(topo.node(), &endpoints)?;
    println!(
        "agent running in netns {} (pins in {})",
        topo.node().name(),
        agent.bpffs().display()
    );
    let kernel_before = conntrack_stats(topo.node())?;
    let sent = drive_traffic(&topo, &agent, options.seconds)?;
    let kernel_after = conntrack_stats(topo.node())?;
    let metrics = agent.metrics(topo.node())?;
    let races = agent
        .api("conntrack.races", json!({ "limit": 1000 }))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    summarise(
        &topo,
        &agent,
        &metrics,
        &races,
        sent,
        &kernel_before,
        &kernel_after,
    )?;
    println!("\ntearing down (namespaces, iptables rules, pins, agent)...");
    drop(agent);
    drop(topo);
    println!("done.");
    Ok(())
}

/// Every round, all pods send one datagram at the same moment to the same
/// service from a fresh source port; with four SNAT ports, most new flows
/// find every port taken and lose the insert race.
fn drive_traffic(topo: &Topology, agent: &Agent, seconds: u64) -> Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let sent = Arc::new(AtomicU64::new(0));
    let barrier = Arc::new(Barrier::new(PODS.len()));
    let server = topo.server_ipv4();
    println!("driving traffic for {seconds} s (Ctrl-C stops early)...");
    std::thread::scope(|scope| -> Result<()> {
        for i in 0..PODS.len() {
            let (barrier, sent, pod) = (Arc::clone(&barrier), Arc::clone(&sent), topo.pod(i));
            scope.spawn(move || {
                in_netns(pod.netns(), || {
                    let mut round: u32 = 0;
                    loop {
                        barrier.wait();
                        if STOP.load(Ordering::SeqCst) || Instant::now() >= deadline {
                            break;
                        }
                        let service = SERVICES[round as usize % SERVICES.len()];
                        let sport = 20_000 + u16::try_from(round % 40_000).unwrap_or(0);
                        if let Ok(socket) =
                            UdpSocket::bind(SocketAddr::new(pod.ipv4().into(), sport))
                        {
                            if socket
                                .send_to(b"demo", SocketAddr::new(server.into(), service))
                                .is_ok()
                            {
                                sent.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        round += 1;
                        std::thread::sleep(Duration::from_millis(20));
                    }
                })
            });
        }
        let mut last_print = Instant::now();
        while Instant::now() < deadline && !STOP.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100));
            if last_print.elapsed() >= Duration::from_secs(1) {
                last_print = Instant::now();
                let m = agent.metrics(topo.node())?;
                let kernel = conntrack_stats(topo.node())?.get("insert_failed")?;
                println!(
                    "  {:>4} datagrams sent | insert_failed (kernel) {:>4} | races attributed by podnet {:>4}",
                    sent.load(Ordering::Relaxed),
                    kernel,
                    m.count_sum("podnet_conntrack_insert_races_total")
                );
            }
        }
        STOP.store(true, Ordering::SeqCst);
        Ok(())
    })?;
    Ok(sent.load(Ordering::Relaxed))
}

fn summarise(
    topo: &Topology,
    agent: &Agent,
    metrics: &Metrics,
    races: &Value,
    sent: u64,
    before: &podnet_tests::ConntrackStats,
    after: &podnet_tests::ConntrackStats,
) -> Result<()> {
    println!("\n== Insert races per pod (podnet_conntrack_insert_races_total)");
    for (ns, pod) in PODS {
        let n = metrics.value_or_zero(
            "podnet_conntrack_insert_races_total",
            &[("namespace", ns), ("pod", pod), ("proto", "udp")],
        );
        println!("  {:<24} {n:>6}", format!("{ns}/{pod}"));
    }
    println!("\n== Top destinations (podnet_conntrack_race_destinations_total)");
    let mut dests: Vec<(String, f64)> = metrics
        .0
        .lines()
        .filter(|l| l.starts_with("podnet_conntrack_race_destinations_total{"))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let dest = series.split("destination=\"").nth(1)?.split('"').next()?;
            Some((dest.to_owned(), value.parse().ok()?))
        })
        .collect();
    dests.sort_by(|a, b| b.1.total_cmp(&a.1));
    for (dest, n) in dests.iter().take(5) {
        println!("  {dest:<24} {n:>6}");
    }
    println!(
        "\n== Who held the port (winners of the last {} races recorded)",
        races.as_array().map_or(0, Vec::len)
    );
    let mut pairs: BTreeMap<(String, String), u64> = BTreeMap::new();
    for r in races.as_array().into_iter().flatten() {
        let pod = |v: &Value| {
            format!(
                "{}/{}",
                v["namespace"].as_str().unwrap_or(""),
                v["pod"].as_str().unwrap_or("")
            )
        };
        let winner = match r["winner"]["state"].as_str() {
            Some("found") => pod(&r["winner"]["pod"]),
            Some(other) => format!("({other})"),
            None => "(unknown)".into(),
        };
        *pairs.entry((pod(&r["loser"]), winner)).or_default() += 1;
    }
    let mut pairs: Vec<_> = pairs.into_iter().collect();
    pairs.sort_by_key(|p| std::cmp::Reverse(p.1));
    for ((loser, winner), n) in pairs.iter().take(8) {
        println!("  {loser:<24} lost to {winner:<24} {n:>5}x");
    }
    let kernel = |c: &str| after.delta(before, c).unwrap_or(0);
    let podnet_races = metrics.count_sum("podnet_conntrack_insert_races_total");
    println!("\n== Kernel counters vs podnet (this node's namespace, during the demo)");
    println!("  datagrams sent by pods           {sent:>8}");
    println!(
        "  kernel insert_failed             {:>8}",
        kernel("insert_failed")
    );
    println!("  kernel drop                      {:>8}", kernel("drop"));
    println!("  podnet races attributed to pods  {podnet_races:>8}");
    let matches = podnet_races == kernel("insert_failed");
    println!(
        "  agreement                        {:>8}",
        if matches { "exact" } else { "MISMATCH" }
    );
    println!("\n== Where to look");
    println!(
        "  metrics:  nsenter --net={} curl -s http://127.0.0.1:10310/metrics",
        topo.node().path().display()
    );
    println!(
        "  races:    podnetctl --socket {} conntrack races",
        agent.socket().display()
    );
    println!("  (both exist while the demo runs; they are removed on exit)");
    if !matches {
        bail!("podnet's race count differs from the kernel's insert_failed");
    }
    Ok(())
}
