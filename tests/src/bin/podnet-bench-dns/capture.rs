//! podnet against a packet capture, in one run on the same queries.
//!
//! Four pods send DNS queries at a steady rate in all to the test responder,
//! whose answers take 0 to 1 s (the query name chooses). The agent traces the
//! pods' interfaces while `dumpcap` captures on the same interfaces; after
//! the answers are in, `tshark` reads the capture and sums `dns.time`.
//! Latency: the clients' own sum (send to the kernel's receive timestamp),
//! podnet's `podnet_dns_request_duration_seconds_sum` and tshark's sum,
//! each as a relative error against the clients'. CPU over the same window:
//! the agent's user + system time plus its DNS programs' `run_time_ns`
//! (`bpf_stats`), against dumpcap's user + system time plus tshark's.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::{Context as _, Result};
use podnet_tests::{
    capture::{self, Capture},
    dns_paced,
    load::wait_dns_links,
    start_dns_responder, Agent, EndpointSpec, Topology,
};
use serde_json::{json, Value};

use super::{hook_programs, prog_stats, StatsGuard};

/// Pods sending queries (each stays well under the per-client pending limit
/// of 1,024 at 1,000 queries/s with answers taking 0.5 s on average).
const PODS: usize = 4;
/// Longest answer delay, ms.
const MAX_DELAY_MS: u64 = 1_000;

/// Runs the comparison; `null` in the JSON (and a loud line) when the
/// capture tools are missing.
#[allow(clippy::cast_precision_loss, clippy::too_many_lines)]
pub fn compare(rate: u64, seconds: u64) -> Result<Value> {
    let missing = capture::missing_tools();
    if !missing.is_empty() {
        let msg = format!(
            "podnet against a packet capture: SKIPPED, {} not installed (run `cargo xtask setup`, \
             which installs Debian's tshark package)",
            missing.join(" and ")
        );
        println!("{msg}");
        eprintln!("podnet-bench-dns: {msg}");
        return Ok(json!({"missing": missing}));
    }
    let per_pod = u16::try_from(rate * seconds / PODS as u64)
        .context("too many queries per pod for distinct DNS ids (at most 65,535)")?;
    let topo = Topology::builder().name("dnscap").pods(PODS).build()?;
    let server_ip = IpAddr::V4(topo.server_ipv4());
    let responder = start_dns_responder(topo.server(), &[server_ip])?;
    let specs: Vec<EndpointSpec> = topo
        .pods()
        .iter()
        .enumerate()
        .map(|(i, pod)| {
            EndpointSpec::new("bench", &format!("pod-{i}"), &[IpAddr::V4(pod.ipv4())])
                .interface(pod.host_if())
        })
        .collect();
    let agent = Agent::start_with(topo.node(), &specs, &["--dns-timeout", "5s"])?;
    wait_dns_links(&agent, 2 * PODS, Duration::from_secs(10))?;
    let mut programs = BTreeSet::new();
    for pod in topo.pods() {
        let (ingress, egress) = hook_programs(topo.node(), pod.host_if())?;
        programs.extend([ingress, egress]);
    }
    let agent_pid = agent.pid().context("the agent is not running")?;
    let interfaces: Vec<&str> = topo.pods().iter().map(podnet_tests::Pod::host_if).collect();
    let file = std::env::temp_dir().join(format!("podnet-bench-dns-{}.pcapng", std::process::id()));
    let stats = StatsGuard::enable()?;
    let dump = Capture::start(topo.node(), &interfaces, &file)?;

    // (run_time_ns, run_cnt) summed over the programs.
    let run_time = |ids: &BTreeSet<u64>| -> Result<(u64, u64)> {
        ids.iter().try_fold((0, 0), |(ns, runs), id| {
            prog_stats(*id).map(|(n, r)| (ns + n, runs + r))
        })
    };
    let (agent_before, dump_before, progs_before) = (
        capture::process_cpu(agent_pid)?,
        capture::process_cpu(dump.pid())?,
        run_time(&programs)?,
    );
    let pods: Vec<_> = topo.pods().iter().map(podnet_tests::Pod::netns).collect();
    let server = SocketAddr::new(server_ip, 53);
    let clients = dns_paced::run(&pods, server, rate, per_pod, MAX_DELAY_MS)?;
    let agent_cpu = capture::process_cpu(agent_pid)?.saturating_sub(agent_before);
    let dump_cpu = capture::process_cpu(dump.pid())?.saturating_sub(dump_before);
    let progs_after = run_time(&programs)?;
    let progs_ns = progs_after.0.saturating_sub(progs_before.0);
    let progs_runs = progs_after.1.saturating_sub(progs_before.1);
    drop(stats);
    dump.stop()?;
    let metrics = agent.metrics(topo.node())?;
    let podnet_sum = metrics.sum("podnet_dns_request_duration_seconds_sum");
    let podnet_answers = metrics.sum("podnet_dns_request_duration_seconds_count");
    let capture_bytes = std::fs::metadata(&file).map_or(0, |m| m.len());
    let tshark = capture::tshark_dns_time(&file);
    let _ = std::fs::remove_file(&file);
    let tshark = tshark?;
    drop(agent);
    drop(responder);
    drop(topo);

    let client_sum = clients.latency_sum_s;
    let error = |sum: f64| 100.0 * (sum - client_sum) / client_sum;
    let programs_cpu = Duration::from_nanos(progs_ns);
    let podnet_cpu = agent_cpu + programs_cpu;
    let capture_cpu = dump_cpu + tshark.cpu;
    let ratio = podnet_cpu.as_secs_f64() / capture_cpu.as_secs_f64();
    let achieved = clients.sent as f64 / clients.sending_s;
    println!(
        "podnet against a packet capture (dumpcap on the {PODS} pods' host interfaces, tshark dns.time), one run:"
    );
    println!(
        "  queries: {} sent by {PODS} pods at {achieved:.0}/s over {:.1} s, answers delayed 0 to {MAX_DELAY_MS} ms; {} answered",
        clients.sent, clients.sending_s, clients.answered
    );
    println!("  latency sum of the answered queries:");
    println!(
        "    clients' own clocks:   {client_sum:>10.3} s  ({} answers)",
        clients.answered
    );
    println!(
        "    podnet (/metrics):     {podnet_sum:>10.3} s  ({podnet_answers:.0} answers)  error {:+.3} %",
        error(podnet_sum)
    );
    println!(
        "    tshark dns.time:       {:>10.3} s  ({} answers)  error {:+.3} %",
        tshark.sum_s,
        tshark.answers,
        error(tshark.sum_s)
    );
    println!("  CPU over the run (user + system):");
    println!(
        "    podnet: agent {:.3} s + DNS programs {:.3} s (bpf_stats: {progs_runs} runs, {:.0} ns each) = {:.3} s",
        agent_cpu.as_secs_f64(),
        programs_cpu.as_secs_f64(),
        progs_ns as f64 / progs_runs.max(1) as f64,
        podnet_cpu.as_secs_f64()
    );
    println!(
        "    capture: dumpcap {:.3} s + tshark {:.3} s ({:.2} s wall, {capture_bytes} B file) = {:.3} s",
        dump_cpu.as_secs_f64(),
        tshark.cpu.as_secs_f64(),
        tshark.wall.as_secs_f64(),
        capture_cpu.as_secs_f64()
    );
    println!(
        "    ratio podnet / capture: {ratio:.4} (1/{:.0})",
        1.0 / ratio
    );
    Ok(json!({
        "pods": PODS,
        "max_delay_ms": MAX_DELAY_MS,
        "target_rate": rate,
        "achieved_rate": achieved,
        "sent": clients.sent,
        "answered": clients.answered,
        "client_sum_s": client_sum,
        "podnet_sum_s": podnet_sum,
        "podnet_answers": podnet_answers,
        "podnet_error_pct": error(podnet_sum),
        "tshark_sum_s": tshark.sum_s,
        "tshark_answers": tshark.answers,
        "tshark_error_pct": error(tshark.sum_s),
        "agent_cpu_s": agent_cpu.as_secs_f64(),
        "programs_cpu_s": programs_cpu.as_secs_f64(),
        "program_runs": progs_runs,
        "program_ns_per_run": progs_ns as f64 / progs_runs.max(1) as f64,
        "podnet_cpu_s": podnet_cpu.as_secs_f64(),
        "dumpcap_cpu_s": dump_cpu.as_secs_f64(),
        "tshark_cpu_s": tshark.cpu.as_secs_f64(),
        "capture_cpu_s": capture_cpu.as_secs_f64(),
        "capture_bytes": capture_bytes,
        "cpu_ratio": ratio,
    }))
}
