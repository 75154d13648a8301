//! podnet-bench: measures podnet on this machine and prints the figures as
//! JSON (run through `cargo xtask bench`, which writes docs/PERFORMANCE.md).
//!
//! Every figure compares configurations measured in the same run.

mod agent;
mod burst;

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::{anyhow, bail, Result};
use podnet_tests::{
    bench::{machine, udp_flood, BpfStats, ProgStats},
    conntrack_stats, iptables, require_root, udp_send, Agent, EndpointSpec, Topology,
};
use serde_json::{json, Value};

/// Race rates tried for the lossless-events figure (races/s; 0 = flat out).
const RACE_RATES: [u64; 5] = [10_000, 20_000, 50_000, 100_000, 0];
/// How long each rate runs.
const PHASE: Duration = Duration::from_secs(3);

fn main() -> std::process::ExitCode {
    match run() {
        Ok(report) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&report).unwrap_or_default()
            );
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("podnet-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<Value> {
    let which: Vec<String> = std::env::args().skip(1).collect();
    if !require_root() {
        bail!("benchmarks need root");
    }
    let mut report = serde_json::Map::new();
    report.insert("machine".into(), machine());
    for name in if which.is_empty() {
        vec!["conntrack".to_owned()]
    } else {
        which
    } {
        let value = match name.as_str() {
            "conntrack" => conntrack()?,
            "ipam" => ipam()?,
            "agent" => agent::run()?,
            other => bail!("unknown benchmark {other:?} (known: conntrack, ipam, agent)"),
        };
        report.insert(name, value);
    }
    Ok(Value::Object(report))
}

/// Race events per second the tracer delivers without loss, and the
/// program's cost per call on race drops and on other drops.
fn conntrack() -> Result<Value> {
    let _stats = BpfStats::enable()?;
    let topo = Topology::builder().name("bench").pods(2).build()?;
    topo.snat_pods_to_one_port("udp", false, 40_000)?;
    let endpoints: Vec<EndpointSpec> = [("bench", "a", 0), ("bench", "b", 1)]
        .iter()
        .map(|(ns, pod, i)| EndpointSpec::new(ns, pod, &[IpAddr::V4(topo.pod(*i).ipv4())]))
        .collect();
    // No event budget: every race is an event, to find the ring buffer's limit.
    let agent = Agent::start_with(topo.node(), &endpoints, &["--race-event-budget", "0"])?;
    let status = |agent: &Agent| agent.api("status", json!({}));
    let prog_id = u32::try_from(
        status(&agent)?["tracer_program_id"]
            .as_u64()
            .ok_or_else(|| anyhow!("no program id"))?,
    )?;
    let (a, b) = (topo.pod(0), topo.pod(1));
    let server = SocketAddr::new(topo.server_ipv4().into(), 7000);
    udp_send(a.netns(), SocketAddr::new(a.ipv4().into(), 5000), server, 1)?;
    let mut phases = Vec::new();
    let mut best_lossless = 0.0f64;
    for rate in RACE_RATES {
        let kernel_before = conntrack_stats(topo.node())?.get("insert_failed")?;
        let st_before = status(&agent)?;
        let prog_before = ProgStats::read(prog_id)?;
        let (sent, took) = udp_flood(
            b.netns(),
            SocketAddr::new(b.ipv4().into(), 5001),
            server,
            rate,
            PHASE,
        )?;
        // Let the event thread drain what is in the ring.
        std::thread::sleep(Duration::from_millis(500));
        let prog_after = ProgStats::read(prog_id)?;
        let st_after = status(&agent)?;
        let races = conntrack_stats(topo.node())?.get("insert_failed")? - kernel_before;
        let counter = |v: &Value, k: &str| v["counters"][k].as_u64().unwrap_or(0);
        let lost = counter(&st_after, "events_lost") - counter(&st_before, "events_lost");
        let attributed = counter(&st_after, "insert_races") - counter(&st_before, "insert_races");
        let received = st_after["events_received"].as_u64().unwrap_or(0)
            - st_before["events_received"].as_u64().unwrap_or(0);
        #[allow(clippy::cast_precision_loss)]
        let achieved = races as f64 / took.as_secs_f64();
        if lost == 0 && received == races {
            best_lossless = best_lossless.max(achieved);
        }
        eprintln!("rate {rate:>6}/s: sent {sent}, races {races} ({achieved:.0}/s), attributed {attributed}, events received {received}, lost {lost}, {:.0} ns/call", prog_after.ns_per_run_since(&prog_before).unwrap_or(0.0));
        phases.push(json!({
            "target_rate": rate, "sent": sent, "seconds": took.as_secs_f64(), "races_kernel": races,
            "races_attributed": attributed, "races_per_second": achieved,
            "events_received": received, "events_lost": lost,
            "program_runs": prog_after.runs_since(&prog_before),
            "ns_per_call": prog_after.ns_per_run_since(&prog_before),
        }));
    }
    let other = other_drops(&topo, &agent, prog_id)?;
    let snat = snat_scan(&topo, &agent)?;
    drop(agent);
    Ok(json!({
        "lossless_race_events_per_second": best_lossless,
        "phases": phases,
        "non_netfilter_drops": other,
        "snat_scan": snat,
    }))
}

/// The program's cost on drops that are not netfilter's: in another
/// namespace (no socket on the server's port: it leaves at the namespace
/// check), in the node's (no socket on the node's own address: counted per
/// endpoint and reason), and there on a DNS port (also sent to user space as
/// a flow drop).
fn other_drops(topo: &Topology, agent: &Agent, prog_id: u32) -> Result<Vec<Value>> {
    let a = topo.pod(0);
    let status = |agent: &Agent| agent.api("status", json!({}));
    iptables(topo.node(), &["-t", "nat", "-F", "POSTROUTING"])?;
    let node_ip = a.gateway_ipv4();
    let mut other = Vec::new();
    for (what, dst, sport) in [
        (
            "another namespace",
            SocketAddr::new(topo.server_ipv4().into(), 9),
            5002,
        ),
        (
            "the node, closed port",
            SocketAddr::new(node_ip.into(), 7001),
            5003,
        ),
        (
            "the node, closed DNS port",
            SocketAddr::new(node_ip.into(), 53),
            5004,
        ),
    ] {
        let prog_before = ProgStats::read(prog_id)?;
        let flow_before = status(agent)?;
        let (sent, _) = udp_flood(
            a.netns(),
            SocketAddr::new(a.ipv4().into(), sport),
            dst,
            50_000,
            PHASE,
        )?;
        let prog_after = ProgStats::read(prog_id)?;
        let flow_after = status(agent)?;
        let flow = |v: &Value| v["counters"]["flow_events"].as_u64().unwrap_or(0);
        let phase = json!({
            "drops": what, "sent": sent, "program_runs": prog_after.runs_since(&prog_before),
            "ns_per_call": prog_after.ns_per_run_since(&prog_before),
            "flow_drop_events": flow(&flow_after) - flow(&flow_before),
        });
        eprintln!("non-netfilter drops: {phase}");
        other.push(phase);
    }
    Ok(other)
}

/// Conntrack entries the SNAT port usage scan is measured at.
const SNAT_SCAN_ENTRIES: u64 = 100_000;

/// The SNAT port usage scan with [`SNAT_SCAN_ENTRIES`] source-NATed UDP flows
/// in the node's table (each pod sends one datagram to each of 50,000 ports
/// of the server): the last scan's duration and the agent's CPU over 60 s
/// (one scan a minute, the default).
fn snat_scan(topo: &Topology, agent: &Agent) -> Result<Value> {
    let node = topo.node();
    // Unanswered UDP entries live 30 s by default: not long enough for two
    // scans a minute apart.
    node.run_ok(&[
        "sysctl",
        "-qw",
        "net.netfilter.nf_conntrack_udp_timeout=300",
    ])?;
    topo.snat_pods("udp", false, None)?;
    let per_pod = u16::try_from(SNAT_SCAN_ENTRIES / 2)?;
    for (i, pod) in topo.pods().iter().enumerate().take(2) {
        let src = SocketAddr::new(pod.ipv4().into(), 6000 + u16::try_from(i)?);
        podnet_tests::in_netns(pod.netns(), move || -> Result<()> {
            let socket = std::net::UdpSocket::bind(src)?;
            for port in 0..per_pod {
                let dst =
                    SocketAddr::new(std::net::Ipv4Addr::new(10, 98, 0, 2).into(), 10_000 + port);
                // A full socket buffer drops a datagram: send it again.
                while socket.send_to(b"snat", dst).is_err() {
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
            Ok(())
        })??;
    }
    let count = node.run_ok(&["conntrack", "-C"])?;
    let table: u64 = String::from_utf8_lossy(&count.stdout).trim().parse()?;
    let scanned = |m: &podnet_tests::Metrics| m.count("podnet_snat_scan_entries", &[]);
    let deadline = std::time::Instant::now() + Duration::from_secs(75);
    while scanned(&agent.metrics(node)?) < SNAT_SCAN_ENTRIES {
        if std::time::Instant::now() > deadline {
            bail!("no SNAT scan of {SNAT_SCAN_ENTRIES} entries within 75 s (table: {table})");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let pid = agent.pid().ok_or_else(|| anyhow!("the agent has no pid"))?;
    let cpu = podnet_tests::load::summarise(&podnet_tests::load::sample_process(
        pid,
        Duration::from_mins(1),
        Duration::from_secs(1),
    )?);
    let m = agent.metrics(node)?;
    let report = json!({
        "table_entries": table,
        "scan_entries": scanned(&m),
        "scan_seconds": m.value_or_zero("podnet_snat_scan_duration_seconds", &[]),
        "agent_cpu_percent_60s": cpu.cpu_percent,
    });
    eprintln!("SNAT scan: {report}");
    node.run_ok(&["sysctl", "-qw", "net.netfilter.nf_conntrack_udp_timeout=30"])?;
    Ok(report)
}

/// Pods allocated and released by the IPAM benchmark.
const IPAM_PODS: usize = 1000;

/// IPAM through the agent's API, as podnet-cni calls it: allocations and
/// releases per second, each including the checkpoint written atomically
/// (temp file, fsync, rename, directory fsync) before the answer.
fn ipam() -> Result<Value> {
    let topo = Topology::builder().name("bipam").pods(0).build()?;
    let agent = Agent::start_with(topo.node(), &[], &["--node-cidr", "10.240.0.0/20"])?;
    let key = |i: usize, command: &str| json!({"command": command, "containerId": format!("bench{i:05}"), "ifName": "eth0", "network": "bench"});
    let start = std::time::Instant::now();
    for i in 0..IPAM_PODS {
        agent.api("ipam.allocate", key(i, "ADD"))?;
    }
    let allocate = start.elapsed();
    let checkpoint_path = agent.state_dir().join(podnet::ipam::store::CHECKPOINT_FILE);
    let checkpoint_bytes = std::fs::read(&checkpoint_path)?;
    let checkpoint = checkpoint_bytes.len();
    let write_ms = checkpoint_write_ms(&checkpoint_path, &checkpoint_bytes)?;
    let start = std::time::Instant::now();
    for i in 0..IPAM_PODS {
        agent.api("ipam.release", key(i, "DEL"))?;
    }
    let release = start.elapsed();
    #[allow(clippy::cast_precision_loss)]
    let per_second = |d: Duration| IPAM_PODS as f64 / d.as_secs_f64();
    let report = json!({
        "pods": IPAM_PODS,
        "allocations_per_second": per_second(allocate),
        "releases_per_second": per_second(release),
        "ms_per_allocation": 1000.0 / per_second(allocate),
        "checkpoint_bytes_with_all_allocated": checkpoint,
        "checkpoint_write_ms": write_ms,
    });
    eprintln!("ipam: {report}");
    Ok(report)
}

/// Writes of the checkpoint timed alone.
const CHECKPOINT_WRITES: u32 = 100;

/// Mean time of one atomic checkpoint write (serialise, temp file, fsync,
/// rename, directory fsync) of the agent's real checkpoint, in a scratch
/// directory on the same file system.
fn checkpoint_write_ms(path: &std::path::Path, bytes: &[u8]) -> Result<f64> {
    use podnet::ipam::store::{parse, RealFs, Store};
    let checkpoint = parse(path, bytes).map_err(|e| anyhow!("{e}"))?;
    let dir = path
        .parent()
        .ok_or_else(|| anyhow!("checkpoint without a directory"))?
        .join("bench-scratch");
    std::fs::create_dir_all(&dir)?;
    let store = Store::new(&dir, Box::new(RealFs::default()));
    let start = std::time::Instant::now();
    for _ in 0..CHECKPOINT_WRITES {
        store.save(&checkpoint).map_err(|e| anyhow!("{e}"))?;
    }
    let ms = start.elapsed().as_secs_f64() * 1000.0 / f64::from(CHECKPOINT_WRITES);
    std::fs::remove_dir_all(&dir)?;
    Ok(ms)
}
