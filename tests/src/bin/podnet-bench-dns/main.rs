//! podnet-bench-dns: what the DNS programs cost, measured on this machine.
//!
//! 1. Per-packet cost from the kernel's own statistics (`run_time_ns` /
//!    `run_cnt` of each program, `kernel.bpf_stats_enabled=1`, set and
//!    restored), separately for non-DNS UDP packets, DNS queries and DNS answers.
//! 2. iperf3 TCP throughput pod → server with and without the programs
//!    attached, alternating in the same run, as a ratio.
//! 3. podnet against a packet capture, in one run on the same queries: pods
//!    send queries at a steady rate to a server whose answers take 0 to 1 s,
//!    while `dumpcap` captures on the pods' host-side interfaces and the agent
//!    runs; then `tshark` sums `dns.time`. The clients' own latency sum,
//!    podnet's (`podnet_dns_request_duration_seconds_sum`) and tshark's are
//!    compared, and the CPU each side spent: the agent's user + system time
//!    plus its DNS programs' `run_time_ns`, against dumpcap's and tshark's.
//!
//! Usage (root): `podnet-bench-dns [--packets N] [--queries N] [--seconds S] [--rounds R]
//! [--capture-rate Q] [--capture-seconds S]`

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use podnet::dns::{
    attach::Direction,
    programs,
    tracer::{DnsTracer, ProgramSettings},
};
use podnet_tests::{
    agent::endpoints_yaml, in_netns, load::dns_query, require_root, spawn_in, wait_for, Agent,
    EndpointSpec, Netns, Topology,
};

use serde_json::Value;

mod capture;

const STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

struct Options {
    packets: usize,
    queries: usize,
    seconds: u32,
    rounds: usize,
    capture_rate: u64,
    capture_seconds: u64,
}

fn parse_options() -> Result<Options> {
    let mut o = Options {
        packets: 200_000,
        queries: 20_000,
        seconds: 5,
        rounds: 2,
        capture_rate: 4_000,
        capture_seconds: 3,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().context("missing value");
        match arg.as_str() {
            "--packets" => o.packets = value()?.parse()?,
            "--queries" => o.queries = value()?.parse()?,
            "--seconds" => o.seconds = value()?.parse()?,
            "--rounds" => o.rounds = value()?.parse()?,
            "--capture-rate" => o.capture_rate = value()?.parse()?,
            "--capture-seconds" => o.capture_seconds = value()?.parse()?,
            other => bail!("unknown argument {other:?}"),
        }
    }
    Ok(o)
}

/// Restores `kernel.bpf_stats_enabled` when dropped.
struct StatsGuard(String);

impl StatsGuard {
    fn enable() -> Result<Self> {
        let old = std::fs::read_to_string(STATS_SYSCTL)?.trim().to_owned();
        std::fs::write(STATS_SYSCTL, "1")?;
        Ok(Self(old))
    }
}

impl Drop for StatsGuard {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(STATS_SYSCTL, &self.0) {
            eprintln!("podnet-bench-dns: restoring {STATS_SYSCTL}: {e}");
        }
    }
}

/// (`run_time_ns`, `run_cnt`) of a program, from `bpftool prog show`.
fn prog_stats(id: u64) -> Result<(u64, u64)> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "prog", "show", "id", &id.to_string()])
        .output()
        .context("running bpftool")?;
    let v: Value = serde_json::from_slice(&out.stdout).context("bpftool output")?;
    Ok((
        v["run_time_ns"].as_u64().unwrap_or(0),
        v["run_cnt"].as_u64().unwrap_or(0),
    ))
}

/// The ids of the programs on the pod's hooks: (ingress, egress).
fn hook_programs(node: &Netns, ifname: &str) -> Result<(u64, u64)> {
    let ifname = ifname.to_owned();
    let ids = in_netns(node, move || -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        for d in podnet::dns::attach::Direction::BOTH {
            let on_hook = podnet::dns::attach::tcx_program_ids(&ifname, d)?;
            ids.push(*on_hook.first().context("no program on the hook")?);
        }
        Ok(ids)
    })??;
    Ok((u64::from(ids[0]), u64::from(ids[1])))
}

struct Cost {
    ns_per_run: f64,
    runs: u64,
}

#[allow(clippy::cast_precision_loss)] // counters far below 2^52
fn cost(before: (u64, u64), after: (u64, u64)) -> Cost {
    let runs = after.1 - before.1;
    let ns = after.0 - before.0;
    Cost {
        ns_per_run: if runs == 0 {
            0.0
        } else {
            ns as f64 / runs as f64
        },
        runs,
    }
}

fn iperf(pod: &Netns, server: IpAddr, seconds: u32) -> Result<f64> {
    let out = pod.run_ok(&[
        "iperf3",
        "-c",
        &server.to_string(),
        "-t",
        &seconds.to_string(),
        "-J",
    ])?;
    let v: Value = serde_json::from_slice(&out.stdout).context("iperf3 JSON")?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("no bits_per_second in iperf3 output")
}

fn set_interface(agent: &Agent, spec: &EndpointSpec, attached: bool) -> Result<()> {
    let mut spec = spec.clone();
    if !attached {
        spec.interface = None;
    }
    std::fs::write(agent.endpoints_file(), endpoints_yaml(&[spec]))?;
    let want = if attached { 2 } else { 0 };
    let ok = wait_for(
        || {
            agent
                .api("status", Value::Null)
                .is_ok_and(|s| s["dns"]["links"].as_array().map(Vec::len) == Some(want))
        },
        Duration::from_secs(10),
    );
    if !ok {
        bail!("links did not reach {want}");
    }
    Ok(())
}

#[allow(clippy::cast_precision_loss, clippy::too_many_lines)]
fn main() -> Result<()> {
    if !require_root() {
        bail!("podnet-bench-dns needs root");
    }
    let o = parse_options()?;
    let topo = Topology::builder().name("dnsbench").pods(1).build()?;
    let pod = topo.pod(0);
    let server_ip = IpAddr::V4(topo.server_ipv4());
    let responder_bin = podnet_tests::agent::binary("podnet-dns-responder")?;
    let responder = spawn_in(
        topo.server(),
        &[
            responder_bin.to_str().context("path")?,
            "--listen",
            &server_ip.to_string(),
        ],
    )?;
    let iperf_server = spawn_in(topo.server(), &["iperf3", "-s"])?;
    // UDP sink for the non-DNS packets.
    let sink_addr = SocketAddr::new(server_ip, 9999);
    let spec =
        EndpointSpec::new("bench", "pod", &[IpAddr::V4(pod.ipv4())]).interface(pod.host_if());
    let agent = Agent::start_with(
        topo.node(),
        std::slice::from_ref(&spec),
        &["--dns-timeout", "5s"],
    )?;
    set_interface(&agent, &spec, true)?;
    wait_for(|| responder.log().contains("ready"), Duration::from_secs(5));
    let (ingress, egress) = hook_programs(topo.node(), pod.host_if())?;
    // A program that does nothing, after ours on both hooks: its cost per run
    // is what the statistics themselves add, subtracted below.
    let baseline_pins = std::path::PathBuf::from(format!(
        "/sys/fs/bpf/podnet-bench-dns-{}",
        std::process::id()
    ));
    let baseline = {
        let (pins, ifname) = (baseline_pins.clone(), pod.host_if().to_owned());
        in_netns(topo.node(), move || -> Result<(DnsTracer, u64)> {
            let mut t = DnsTracer::load(
                &pins,
                &ProgramSettings {
                    ports: vec![53],
                    slow_threshold: Duration::from_millis(200),
                },
            )?;
            let mut id = 0;
            for d in Direction::BOTH {
                id = t.attach_unpinned(programs::BASELINE, &ifname, d)?;
            }
            Ok((t, u64::from(id)))
        })??
    };
    let base_id = baseline.1;
    let stats = StatsGuard::enable()?;

    // Non-DNS: UDP datagrams pod → server:9999 (a bound socket drains them).
    let sink = {
        let addr = sink_addr;
        std::thread::spawn({
            let path = topo.server().path();
            move || -> Result<u64> {
                let f = std::fs::File::open(path)?;
                // SAFETY: setns on this dedicated thread only.
                let rc =
                    unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
                if rc != 0 {
                    bail!("setns: {}", std::io::Error::last_os_error());
                }
                let s = UdpSocket::bind(addr)?;
                // Wait up to 5 s for the first datagram, then until 300 ms of quiet.
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                let mut buf = [0u8; 2048];
                let mut n = 0;
                while s.recv(&mut buf).is_ok() {
                    n += 1;
                    if n == 1 {
                        s.set_read_timeout(Some(Duration::from_millis(300)))?;
                    }
                }
                Ok(n)
            }
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let before = prog_stats(ingress)?;
    let base_before = prog_stats(base_id)?;
    let packets = o.packets;
    in_netns(pod.netns(), move || -> Result<()> {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        let payload = [0u8; 64];
        for _ in 0..packets {
            let _ = s.send_to(&payload, sink_addr);
        }
        Ok(())
    })??;
    let non_dns = cost(before, prog_stats(ingress)?);
    let floor_non_dns = cost(base_before, prog_stats(base_id)?);
    let received = sink
        .join()
        .map_err(|_| anyhow::anyhow!("sink panicked"))??;

    // DNS: queries answered by the responder, one at a time.
    let (bi, be, bb) = (
        prog_stats(ingress)?,
        prog_stats(egress)?,
        prog_stats(base_id)?,
    );
    let queries = o.queries;
    let dns_server = SocketAddr::new(server_ip, 53);
    let answered = in_netns(pod.netns(), move || -> Result<usize> {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.connect(dns_server)?;
        s.set_read_timeout(Some(Duration::from_secs(1)))?;
        let mut buf = [0u8; 512];
        let mut answered = 0;
        for n in 0..queries {
            let id = u16::try_from(n % 65_536).unwrap_or(0);
            s.send(&dns_query(id, &format!("ok-{n}.bench.test")))?;
            if s.recv(&mut buf).is_ok() {
                answered += 1;
            }
        }
        Ok(answered)
    })??;
    let dns_in = cost(bi, prog_stats(ingress)?);
    let dns_out = cost(be, prog_stats(egress)?);
    let floor_dns = cost(bb, prog_stats(base_id)?);
    drop(stats);
    drop(baseline);
    let _ = std::fs::remove_dir_all(&baseline_pins);

    // Throughput with and without the programs, alternating.
    let mut with = Vec::new();
    let mut without = Vec::new();
    let started = Instant::now();
    for _ in 0..o.rounds {
        set_interface(&agent, &spec, true)?;
        with.push(iperf(pod.netns(), server_ip, o.seconds)?);
        set_interface(&agent, &spec, false)?;
        without.push(iperf(pod.netns(), server_ip, o.seconds)?);
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (w, wo) = (mean(&with), mean(&without));

    println!("DNS program cost per packet (bpf_stats run_time_ns / run_cnt; net = minus an empty program on the same hooks):");
    println!(
        "  empty program (statistics overhead): {:>7.1} ns ({} runs, non-DNS phase), {:.1} ns (DNS phase)",
        floor_non_dns.ns_per_run, floor_non_dns.runs, floor_dns.ns_per_run
    );
    println!(
        "  non-DNS UDP, pod ingress:   {:>7.1} ns, net {:>6.1} ns  ({} runs; {packets} sent, {received} received)",
        non_dns.ns_per_run,
        non_dns.ns_per_run - floor_non_dns.ns_per_run,
        non_dns.runs
    );
    println!(
        "  DNS query, pod ingress:     {:>7.1} ns, net {:>6.1} ns  ({} runs; {queries} queries, {answered} answered)",
        dns_in.ns_per_run,
        dns_in.ns_per_run - floor_dns.ns_per_run,
        dns_in.runs
    );
    println!(
        "  DNS answer, pod egress:     {:>7.1} ns, net {:>6.1} ns  ({} runs)",
        dns_out.ns_per_run,
        dns_out.ns_per_run - floor_dns.ns_per_run,
        dns_out.runs
    );
    println!(
        "iperf3 TCP pod -> server, {} rounds of {} s ({:.0} s):",
        o.rounds,
        o.seconds,
        started.elapsed().as_secs_f64()
    );
    println!(
        "  with programs:    {:.2} Gbit/s {:?}",
        w / 1e9,
        with.iter()
            .map(|x| format!("{:.2}", x / 1e9))
            .collect::<Vec<_>>()
    );
    println!(
        "  without programs: {:.2} Gbit/s {:?}",
        wo / 1e9,
        without
            .iter()
            .map(|x| format!("{:.2}", x / 1e9))
            .collect::<Vec<_>>()
    );
    println!("  ratio with/without: {:.3}", w / wo);
    drop(iperf_server);
    drop(responder);
    drop(agent);
    drop(topo);
    let capture = capture::compare(o.capture_rate, o.capture_seconds)?;
    podnet_tests::bench::write_json_figures(&serde_json::json!({
        "empty_program_ns": floor_non_dns.ns_per_run,
        "non_dns_ns": non_dns.ns_per_run,
        "non_dns_net_ns": non_dns.ns_per_run - floor_non_dns.ns_per_run,
        "query_ns": dns_in.ns_per_run,
        "query_net_ns": dns_in.ns_per_run - floor_dns.ns_per_run,
        "answer_ns": dns_out.ns_per_run,
        "answer_net_ns": dns_out.ns_per_run - floor_dns.ns_per_run,
        "with_gbit_per_s": w / 1e9,
        "without_gbit_per_s": wo / 1e9,
        "throughput_ratio": w / wo,
        "capture": capture,
    }))?;
    Ok(())
}
