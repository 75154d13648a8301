//! `cargo xtask bench`: runs podnet's benchmarks on this machine and writes
//! `docs/bench/<name>.json` (every benchmark's figures), `docs/bench/summary.json`
//! (each target with its figure and baseline) and `docs/PERFORMANCE.md`.
//!
//! The measuring happens in `podnet-bench` and `podnet-bench-<name>`
//! (tests/src/bin), built in release mode; every figure compares
//! configurations measured in the same run.

mod agent;
mod targets;

use std::{fmt::Write as _, path::Path};

use anyhow::{Context as _, Result};
use clap::Args;
use serde_json::Value;

use crate::{cmd, setup};

/// Options of `cargo xtask bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Benchmarks to run (default: all).
    pub names: Vec<String>,
    /// Measure nothing: write docs/PERFORMANCE.md and docs/bench/summary.json again from the
    /// figures already in docs/bench/ (after a change to how they are presented).
    #[arg(long, conflicts_with = "names")]
    pub render_only: bool,
}

/// Every benchmark: `conntrack`, `ipam` and `agent` run in `podnet-bench`
/// (JSON on stdout); the others are binaries of their own
/// (`podnet-bench-<name>`) that print their tables and write their figures
/// as JSON to `$PODNET_BENCH_JSON`.
const ALL: &[&str] = &["conntrack", "ipam", "agent", "dns", "cni", "steer"];

/// Benchmarks with a binary of their own, and what each measures.
const TEXT_BENCHES: &[(&str, &str)] = &[
    ("dns", "DNS programs: cost per packet (bpf_stats), iperf3 throughput with and without them, and podnet against a packet capture (latency sums and CPU)"),
    ("cni", "podnet-cni ADD/DEL latency through libcni over 200 pods: podnet's share and the whole chain"),
    ("steer", "ENI fast path versus kernel path versus a direct veth: sockperf latency and iperf3 throughput"),
];

/// What the fast-path figures can and cannot show on this test bed.
const STEER_BED_NOTE: &str =
    "On this bed the ENI is itself a veth into a namespace that plays the VPC, so the \
fast path's egress crosses two veth hops where the direct baseline crosses one, and the kernel \
path it is compared with pays only a short netfilter rule set and a conntrack entry per flow. \
The fast path/kernel ratio therefore swings between 1.04 and 1.17 from run to run here (target \
1.15); on a node with a real ENI the kernel path also pays the FIB, netfilter and conntrack \
for every packet on a NIC, which is the measurement still to make.";

/// Runs the benchmarks and writes the results.
pub fn run(args: &BenchArgs) -> Result<()> {
    if args.render_only {
        return write_reports(&cmd::workspace_root().join("docs/bench"));
    }
    setup::ensure()?;
    cmd::run(cmd::cargo().args([
        "build",
        "--release",
        "--workspace",
        "--exclude",
        "podnet-ebpf",
        "--bins",
    ]))?;
    let root = cmd::workspace_root();
    let names: Vec<&str> = if args.names.is_empty() {
        ALL.to_vec()
    } else {
        args.names.iter().map(String::as_str).collect()
    };
    let out_dir = root.join("docs/bench");
    std::fs::create_dir_all(&out_dir)?;
    for name in names {
        if TEXT_BENCHES.iter().any(|(n, _)| *n == name) {
            let bench = cmd::target_dir().join(format!("release/podnet-bench-{name}"));
            let output = cmd::stdout(
                std::process::Command::new(&bench)
                    .env("PODNET_BENCH_JSON", out_dir.join(format!("{name}.json")))
                    .stderr(std::process::Stdio::inherit()),
            )?;
            let path = out_dir.join(format!("{name}.txt"));
            std::fs::write(&path, output)?;
            println!("wrote {}", path.display());
            continue;
        }
        let bench = cmd::target_dir().join("release/podnet-bench");
        // Progress goes to stderr (shown); the JSON result comes on stdout.
        let output = cmd::stdout(
            std::process::Command::new(&bench)
                .arg(name)
                .stderr(std::process::Stdio::inherit()),
        )?;
        let value: Value = serde_json::from_str(&output)
            .with_context(|| format!("podnet-bench {name} printed no JSON"))?;
        let path = out_dir.join(format!("{name}.json"));
        std::fs::write(&path, serde_json::to_string_pretty(&value)? + "\n")?;
        println!("wrote {}", path.display());
    }
    write_reports(&out_dir)
}

/// Writes docs/bench/summary.json and docs/PERFORMANCE.md from the JSON in `out_dir`.
fn write_reports(out_dir: &Path) -> Result<()> {
    let root = cmd::workspace_root();
    let summary = summary(out_dir);
    let path = out_dir.join("summary.json");
    std::fs::write(&path, serde_json::to_string_pretty(&summary)? + "\n")?;
    println!("wrote {}", path.display());
    let doc = render(out_dir)?;
    let path = root.join("docs/PERFORMANCE.md");
    std::fs::write(&path, doc)?;
    println!("wrote {}", path.display());
    Ok(())
}

fn load(dir: &Path, name: &str) -> Option<Value> {
    let text = std::fs::read_to_string(dir.join(format!("{name}.json"))).ok()?;
    serde_json::from_str(&text).ok()
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// The machine (from the newest JSON benchmark that describes it) and every
/// target with its figure.
fn summary(dir: &Path) -> Value {
    let machine = ["agent", "conntrack", "ipam"]
        .iter()
        .find_map(|n| load(dir, n).map(|v| v["machine"].clone()))
        .unwrap_or(Value::Null);
    let figures = targets::figures(&|name| load(dir, name));
    serde_json::json!({
        "machine": machine,
        "figures": figures.iter().map(targets::Figure::to_json).collect::<Vec<_>>(),
        "targets_met": figures.iter().filter(|f| f.met).count(),
        "targets": figures.len(),
    })
}

/// Renders docs/PERFORMANCE.md from every `docs/bench/*.json` present.
fn render(dir: &Path) -> Result<String> {
    let mut doc = String::from(
        "# podnet performance\n\n\
         Generated by `cargo xtask bench` from `docs/bench/*.json`; every figure was measured on the\n\
         machine described with each benchmark, and comparisons are between configurations measured\n\
         in the same run. Do not edit by hand: re-run the benchmark.\n",
    );
    render_targets(&mut doc, &targets::figures(&|name| load(dir, name)))?;
    if let Some(agent) = load(dir, "agent") {
        agent::render(&mut doc, &agent)?;
    }
    if let Some(ct) = load(dir, "conntrack") {
        render_conntrack(&mut doc, &ct)?;
    }
    if let Some(ipam) = load(dir, "ipam") {
        render_ipam(&mut doc, &ipam)?;
    }
    for (name, what) in TEXT_BENCHES {
        if let Ok(text) = std::fs::read_to_string(dir.join(format!("{name}.txt"))) {
            writeln!(
                doc,
                "\n## {what}\n\nOutput of `target/release/podnet-bench-{name}` (release build), as printed:\n\n```text\n{}\n```",
                text.trim_end()
            )?;
            if *name == "steer" {
                writeln!(doc, "\n{STEER_BED_NOTE}")?;
            }
        }
    }
    Ok(doc)
}

fn render_targets(doc: &mut String, figures: &[targets::Figure]) -> Result<()> {
    writeln!(doc, "\n## Targets\n")?;
    writeln!(
        doc,
        "| figure | value | baseline (same run) | target | met |"
    )?;
    writeln!(doc, "|---|---|---|---|---|")?;
    for f in figures {
        let baseline = f
            .baseline
            .map_or_else(|| "-".to_owned(), |(what, v)| format!("{v:.2} ({what})"));
        writeln!(
            doc,
            "| {} | {:.3} {} | {baseline} | {} | {} |",
            f.name,
            f.value,
            f.unit,
            f.target,
            if f.met { "yes" } else { "**no**" }
        )?;
    }
    Ok(())
}

/// Source-NATed flows the conntrack benchmark puts in the table for the SNAT scan.
const SNAT_FLOWS: u64 = 100_000;

fn render_conntrack(doc: &mut String, v: &Value) -> Result<()> {
    let m = &v["machine"];
    let c = &v["conntrack"];
    writeln!(
        doc,
        "\n## Conntrack insert-race tracer (`tp_btf/kfree_skb`)\n"
    )?;
    writeln!(
        doc,
        "Machine: kernel {}, {} CPUs ({}), {} KiB memory.\n",
        m["kernel"].as_str().unwrap_or("?"),
        m["cpus"],
        m["cpu"].as_str().unwrap_or("?"),
        m["memory_kib"].as_str().unwrap_or("?")
    )?;
    writeln!(
        doc,
        "Set-up: two pods behind a node namespace whose SNAT maps every UDP flow to one port; pod A \
         holds the port, pod B sends datagrams at a target rate for 3 s, each one losing the insert \
         race. The agent runs with `--race-event-budget 0` (every race is a ring-buffer event). \
         `races (kernel)` is the node namespace's `insert_failed` delta; cost per call is \
         `run_time_ns / run_cnt` of the program with `kernel.bpf_stats_enabled=1`.\n"
    )?;
    writeln!(doc, "| target rate | races (kernel) | races/s | attributed | events received | events lost | ns per program call |")?;
    writeln!(doc, "|---|---|---|---|---|---|---|")?;
    for p in c["phases"].as_array().into_iter().flatten() {
        let target = match p["target_rate"].as_u64() {
            Some(0) => "flat out".to_owned(),
            Some(r) => format!("{r}/s"),
            None => "?".to_owned(),
        };
        writeln!(
            doc,
            "| {target} | {} | {:.0} | {} | {} | {} | {:.0} |",
            p["races_kernel"],
            num(&p["races_per_second"]),
            p["races_attributed"],
            p["events_received"],
            p["events_lost"],
            num(&p["ns_per_call"])
        )?;
    }
    writeln!(
        doc,
        "\nHighest race rate delivered with zero events lost: **{:.0} races/s** (the sender, one \
         thread, is the limit here).",
        num(&c["lossless_race_events_per_second"]),
    )?;
    writeln!(
        doc,
        "\nDrops that are not netfilter's, 50,000 UDP datagrams/s from pod A for 3 s: in another \
         namespace the program leaves at the namespace check; in the node's it counts the drop \
         per endpoint, direction and reason (`podnet_drops_total`), and on a DNS port it also \
         sends the flow to user space (`CT_FLOW_DROPS`), where failed DNS queries find their \
         cause.\n\n| drops in | program runs | ns per program call | flow drops sent |\n|---|---|---|---|"
    )?;
    for p in c["non_netfilter_drops"].as_array().into_iter().flatten() {
        writeln!(
            doc,
            "| {} | {} | {:.0} | {} |",
            p["drops"].as_str().unwrap_or("-"),
            p["program_runs"],
            num(&p["ns_per_call"]),
            p["flow_drop_events"]
        )?;
    }
    let snat = &c["snat_scan"];
    if !snat.is_null() {
        writeln!(
            doc,
            "\nSNAT port usage scan (`podnet_snat_port_usage_ratio`), with {} conntrack entries in \
             the node's table ({} source-NATed UDP flows): one scan (ctnetlink dump and count) \
             took **{:.3} s**, once a minute (`--snat-scan-interval` 60 s), so {:.2} % of one core; the \
             agent's whole CPU over the 60 s after it (one more scan and its other work at rest): \
             **{:.2} %** of one core.",
            snat["table_entries"],
            SNAT_FLOWS,
            num(&snat["scan_seconds"]),
            num(&snat["scan_seconds"]) / 60.0 * 100.0,
            num(&snat["agent_cpu_percent_60s"])
        )?;
    }
    writeln!(
        doc,
        "\nNote: the ring buffer is submitted with `BPF_RB_NO_WAKEUP` and wakes the consumer only \
         once 64 KiB are pending (user space also polls every 100 ms). Waking the consumer on every \
         event (the default adaptive mode while user space keeps up) cost 4.6 to 7.0 µs per race \
         call on this machine, against about 1 µs without."
    )?;
    Ok(())
}

fn render_ipam(doc: &mut String, v: &Value) -> Result<()> {
    let i = &v["ipam"];
    writeln!(doc, "\n## IPAM (node-cidr mode, through the agent's API)\n")?;
    writeln!(
        doc,
        "{} pods allocated then released one by one through `ipam.allocate` / `ipam.release`, as \
         podnet-cni calls them; every answer waits for the checkpoint to be written atomically \
         (temp file, fsync, rename, directory fsync).\n",
        i["pods"]
    )?;
    writeln!(
        doc,
        "| allocations/s | releases/s | ms per allocation | checkpoint size with all allocated | one checkpoint write of that size |"
    )?;
    writeln!(doc, "|---|---|---|---|---|")?;
    writeln!(
        doc,
        "| {:.0} | {:.0} | {:.2} | {} bytes | {:.2} ms |",
        num(&i["allocations_per_second"]),
        num(&i["releases_per_second"]),
        num(&i["ms_per_allocation"]),
        i["checkpoint_bytes_with_all_allocated"],
        num(&i["checkpoint_write_ms"])
    )?;
    writeln!(
        doc,
        "\nCloud API calls per pod in ENI mode are asserted exactly by `tests/tests/eni.rs` against \
         moto: a fresh node with `--warm-ip-target 5` makes 1 `AssignPrivateIpAddresses` call for \
         its first 5 pods (0.2 calls per pod) and 1 `DescribeInstanceTypes`; filling an ENI costs 1 \
         `CreateNetworkInterface` + 1 `AttachNetworkInterface` for the next ENI's worth of pods."
    )?;
    Ok(())
}
