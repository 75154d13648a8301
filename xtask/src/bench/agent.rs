//! The agent section of docs/PERFORMANCE.md: memory and CPU, endpoint
//! scaling, sustained load and the cost of all programs against none.

use std::fmt::Write as _;

use anyhow::Result;
use serde_json::Value;

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

fn mib(v: &Value) -> f64 {
    num(v) / 1024.0
}

/// Appends the section for `v`, the JSON of `podnet-bench agent`.
pub fn render(doc: &mut String, v: &Value) -> Result<()> {
    let m = &v["machine"];
    let a = &v["agent"];
    writeln!(doc, "\n## The agent on a node with {} pods\n", a["pods"])?;
    writeln!(
        doc,
        "Machine: kernel {}, {} CPUs ({}). Release build. One simulated node with {} pod \
         namespaces (built in {:.0} s); the agent runs with its defaults and `--dns-timeout 1s`. \
         RSS is `VmRSS` and CPU is user + system time from `/proc/<pid>`, sampled every second.\n",
        m["kernel"].as_str().unwrap_or("?"),
        m["cpus"],
        m["cpu"].as_str().unwrap_or("?"),
        a["pods"],
        num(&a["topology_build_seconds"]),
    )?;
    let idle = &a["idle"];
    writeln!(
        doc,
        "Idle, no endpoint: **{:.1} MiB** RSS, {:.2} % of one CPU over 10 s.\n",
        mib(&idle["rss_kib"]),
        num(&idle["cpu_percent"])
    )?;
    writeln!(
        doc,
        "| endpoints (DNS programs on each) | time to attach all | RSS at rest | CPU at rest | /metrics scrape (median of 5) | /metrics size | DNS program cost per non-DNS packet |"
    )?;
    writeln!(doc, "|---|---|---|---|---|---|---|")?;
    for s in a["endpoints"].as_array().into_iter().flatten() {
        writeln!(
            doc,
            "| {} | {:.2} s | {:.1} MiB | {:.2} % | {:.2} ms | {} B | {:.1} ns |",
            s["endpoints"],
            num(&s["attach_seconds"]),
            mib(&s["at_rest"]["rss_kib"]),
            num(&s["at_rest"]["cpu_percent"]),
            num(&s["scrape_ms_median"]),
            s["scrape_bytes"],
            num(&s["dns_program_ns_per_packet"])
        )?;
    }
    writeln!(
        doc,
        "\nTime to attach includes the endpoints file watcher's poll (1 s). The per-packet cost is \
         the sum of `run_time_ns` over the sum of `run_cnt` of every DNS program while one pod \
         sends 20,000 non-DNS datagrams (`kernel.bpf_stats_enabled=1`): the programs run per \
         packet on one interface, so their cost does not grow with the number of endpoints."
    )?;
    let largest = a["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["endpoints"].as_u64())
        .max()
        .unwrap_or(0);
    render_load(doc, &a["load"], largest)?;
    render_adds(doc, a, largest)?;
    render_overhead(doc, &a["overhead"])
}

/// The ADD series: single ADDs and a burst, with tcx links and classic filters.
fn render_adds(doc: &mut String, a: &Value, largest: u64) -> Result<()> {
    let adds = &a["adds"];
    if adds.is_null() {
        return Ok(());
    }
    let tcx_all = a["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["endpoints"].as_u64() == Some(largest))
        .map_or(f64::NAN, |s| num(&s["attach_seconds"]));
    writeln!(
        doc,
        "\n### New pods on a node with {largest} endpoints: from the CNI ADD to the programs in \
         place\n\nEach new pod is registered through the agent's API as podnet-cni does on ADD \
         (`endpoint.add`); a watcher in the node namespace asks the kernel every millisecond \
         whether both hooks of the pod's interface hold a program. First {} pods {} ms apart, \
         then {} back to back; each series is deleted again afterwards. Times in ms from the \
         start of the pod's `endpoint.add`.\n",
        adds["tcx"]["single"]["adds"],
        num(&adds["tcx"]["single"]["spacing_ms"]),
        adds["tcx"]["burst"]["adds"],
    )?;
    writeln!(
        doc,
        "| attach mode | all {largest} endpoints attached (2 hooks each) | single ADDs: p50 / p99 / max | burst: p50 / p99 / max | burst, first ADD to last pod attached | `endpoint.add` call p50 / p99 (burst) |"
    )?;
    writeln!(doc, "|---|---|---|---|---|---|")?;
    for (label, mode, all) in [
        ("tcx links", "tcx", Some(tcx_all)),
        (
            "tcx links, grace periods expedited (`rcu_expedited` = 1)",
            "tcx_expedited",
            None,
        ),
        (
            "tcx links, each ADD waits for its programs (`--cni-add-wait 5s`)",
            "tcx_add_wait",
            None,
        ),
        (
            "classic tc filters",
            "tc",
            Some(num(&adds["tc"]["attach_all_seconds"])),
        ),
    ] {
        let m = &adds[mode];
        if m.is_null() {
            continue;
        }
        let all = all.map_or_else(|| "not measured".to_owned(), |s| format!("{s:.2} s"));
        let trio = |v: &Value| {
            format!(
                "{:.1} / {:.1} / {:.1}",
                num(&v["p50"]),
                num(&v["p99"]),
                num(&v["max"])
            )
        };
        writeln!(
            doc,
            "| {label} | {all} | {} | {} | {:.0} ms | {:.1} / {:.1} |",
            trio(&m["single"]["attach_ms"]),
            trio(&m["burst"]["attach_ms"]),
            num(&m["burst"]["total_ms"]),
            num(&m["burst"]["call_ms"]["p50"]),
            num(&m["burst"]["call_ms"]["p99"]),
        )?;
    }
    explain_adds(doc, adds, largest, tcx_all)
}

/// What the ADD series' figures mean per hook, and why tcx is slower.
fn explain_adds(doc: &mut String, adds: &Value, largest: u64, tcx_all: f64) -> Result<()> {
    let links = 2.0 * f64::from(u32::try_from(largest).unwrap_or(0));
    let tcx_detach = num(&adds["tcx"]["detach_all_seconds"]);
    writeln!(
        doc,
        "\nPer hook, attaching all {largest} endpoints cost {:.1} ms as a tcx link and {:.1} ms as \
         a classic filter; when the tcx agent stopped, its {links:.0} links took {tcx_detach:.1} s \
         to leave the kernel ({:.1} ms each). The agent's own share is the DNS thread's reconcile \
         after each change, which attaches a new pod's hooks on their own (the pass over every \
         hook of the node runs every 2 s and when a pod left): the one that attached the last \
         single pod took {:.1} ms with tcx, its two grace periods included, and {:.1} ms with \
         classic filters (`podnetctl status`, last reconcile). The rest is the kernel's: \
         attaching or detaching a tcx link \
         swaps the hook's program array under RTNL and waits for an RCU grace period \
         (`tcx_entry_sync`, `synchronize_rcu`) before returning, so a pod's two hooks cost two \
         grace periods and a burst's attachments queue one after another behind the RTNL lock. A \
         classic `bpf` filter is published without waiting. A burst therefore gets its programs at \
         the kernel's pace, about one pod per two grace periods with tcx; see the README's notes \
         on `--tc-attach` for nodes that start pods in large bursts.",
        1e3 * tcx_all / links,
        1e3 * num(&adds["tc"]["attach_all_seconds"]) / links,
        1e3 * tcx_detach / links,
        num(&adds["tcx"]["dns_reconcile_us"]) / 1e3,
        num(&adds["tc"]["dns_reconcile_us"]) / 1e3,
    )?;
    render_reconciles(doc, adds)?;
    let expedited = &adds["tcx_expedited"];
    if !expedited.is_null() {
        writeln!(
            doc,
            "\nThe wait is the grace period itself: with the kernel's grace periods expedited \
             (`/sys/kernel/rcu_expedited` set to 1 for that series only, then put back), the same \
             tcx agent attached single ADDs' programs in p99 {:.1} ms and a burst's in p99 {:.1} ms \
             (first ADD to last pod attached {:.0} ms). An expedited grace period interrupts every \
             CPU of the node (an IPI each), which latency-sensitive workloads pay for; podnet leaves \
             that setting to the operator.",
            num(&expedited["single"]["attach_ms"]["p99"]),
            num(&expedited["burst"]["attach_ms"]["p99"]),
            num(&expedited["burst"]["total_ms"]),
        )?;
    }
    let waiting = &adds["tcx_add_wait"];
    if !waiting.is_null() {
        writeln!(
            doc,
            "\nWith `--cni-add-wait`, `endpoint.add` answers only once the pod's programs, rules \
             and routes are in the kernel, so the two grace periods are paid inside the ADD, before \
             the runtime starts the pod's containers: `endpoint.add` took p50 {:.1} / p99 {:.1} ms \
             for single ADDs (the programs in place p99 {:.1} ms after the ADD's start), and the \
             burst's back-to-back ADDs, each now waiting for its own pod, p99 {:.1} ms (programs \
             p99 {:.1} ms after each ADD; the burst took {:.0} ms in all). ADDs a runtime runs \
             concurrently still get their programs at the kernel's pace, each ADD answering when \
             its pod's turn came. What the wait adds beyond the programs is the routing \
             subsystem, which the ADD waits for too (its rules and routes): during the single \
             ADDs it ran {:.0} passes over the pods' own objects, {:.2} ms each on average, and \
             {:.0} full passes over every link, route and rule of the node.",
            num(&waiting["single"]["call_ms"]["p50"]),
            num(&waiting["single"]["call_ms"]["p99"]),
            num(&waiting["single"]["attach_ms"]["p99"]),
            num(&waiting["burst"]["call_ms"]["p99"]),
            num(&waiting["burst"]["attach_ms"]["p99"]),
            num(&waiting["burst"]["total_ms"]),
            num(&waiting["route_change_passes"]),
            num(&waiting["route_change_pass_ms_mean"]),
            num(&waiting["route_reconciles"]),
        )?;
    }
    Ok(())
}

/// Per single ADD, the DNS reconcile that attached the pod's hooks against
/// the time its programs took to appear (runs that recorded it).
fn render_reconciles(doc: &mut String, adds: &Value) -> Result<()> {
    let (tcx, tc) = (&adds["tcx"]["single"], &adds["tc"]["single"]);
    if tcx["slowest"].is_null() || tcx["reconcile_ms"]["p50"].is_null() {
        return Ok(());
    }
    writeln!(
        doc,
        "\nEach single ADD's reconcile (read from `podnetctl status` before the next ADD; its \
         attach calls and the kernel's waits included) took p50 {:.1} / max {:.1} ms with tcx and \
         p50 {:.1} / max {:.1} ms with classic filters. The slowest tcx ADD had its programs \
         {:.1} ms after its start, of which its reconcile took {:.1} ms; the other {:.1} ms were \
         its `endpoint.add` call ({:.1} ms, the reconcile may begin before the call answers), \
         the DNS thread waking for the change and the watcher's 1 ms polls.",
        num(&tcx["reconcile_ms"]["p50"]),
        num(&tcx["reconcile_ms"]["max"]),
        num(&tc["reconcile_ms"]["p50"]),
        num(&tc["reconcile_ms"]["max"]),
        num(&tcx["slowest"]["attach_ms"]),
        num(&tcx["slowest"]["reconcile_ms"]),
        num(&tcx["slowest"]["attach_ms"]) - num(&tcx["slowest"]["reconcile_ms"]),
        num(&tcx["slowest"]["call_ms"]),
    )?;
    Ok(())
}

fn render_load(doc: &mut String, l: &Value, endpoints: u64) -> Result<()> {
    let (r, d, agent) = (&l["races"], &l["dns"], &l["agent"]);
    writeln!(
        doc,
        "\n### Sustained load, {} s, {endpoints} endpoints\n\nInsert races (pod 1 against pod 0's held \
         SNAT port) and DNS queries from 4 pods to dnsmasq, every answer NXDOMAIN (so every \
         answer is a ring-buffer event), at the same time.\n",
        num(&l["seconds"])
    )?;
    writeln!(
        doc,
        "| stream | target/s | achieved/s | kernel count | podnet count | events received | events lost |"
    )?;
    writeln!(doc, "|---|---|---|---|---|---|---|")?;
    writeln!(
        doc,
        "| insert races | {} | {:.0} | {} (`insert_failed`) | {} attributed | {} | {} |",
        r["target_per_second"],
        num(&r["per_second"]),
        r["kernel_insert_failed"],
        r["attributed"],
        r["events_received"],
        r["events_lost"]
    )?;
    writeln!(
        doc,
        "| DNS queries | {} | {:.0} | {} sent, {} answered | {} queries, {} answers, {} timeouts | {} | {} |",
        d["target_per_second"],
        num(&d["per_second"]),
        d["sent"],
        d["answered"],
        d["queries_counted"],
        d["responses_counted"],
        d["timeouts"],
        d["events_received"],
        d["events_lost"]
    )?;
    let samples: Vec<String> = l["rss_samples_kib"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| format!("{:.1}", mib(v)))
        .collect();
    writeln!(
        doc,
        "\nAgent under this load: {:.1} % of one CPU; RSS {:.1} MiB at the start, {:.1} MiB at most, \
         {:.1} MiB at the end (MiB, every second: {}).",
        num(&agent["cpu_percent"]),
        mib(&agent["rss_first_kib"]),
        mib(&agent["rss_max_kib"]),
        mib(&agent["rss_kib"]),
        samples.join(", ")
    )?;
    Ok(())
}

fn render_overhead(doc: &mut String, o: &Value) -> Result<()> {
    writeln!(
        doc,
        "\n### All programs attached versus none\n\nPod 0 to the server: iperf3 (TCP \
         throughput) and sockperf ping-pong (TCP, 64 B), {} rounds of {} s each, alternating a \
         node with no podnet program and the same node with the agent running (conntrack tracer, \
         DNS programs on the pod's interface and on the uplink).\n",
        o["rounds"], o["seconds"]
    )?;
    writeln!(
        doc,
        "| configuration | Gbit/s (rounds) | latency µs (rounds) | requests/s (mean) |"
    )?;
    writeln!(doc, "|---|---|---|---|")?;
    for (name, key) in [("no program", "none"), ("all programs", "all")] {
        let c = &o[key];
        let list = |k: &str| -> String {
            c[k].as_array()
                .into_iter()
                .flatten()
                .map(|v| format!("{:.2}", num(v)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        writeln!(
            doc,
            "| {name} | {:.2} ({}) | {:.2} ({}) | {:.0} |",
            num(&c["mean_gbit_per_s"]),
            list("gbit_per_s"),
            num(&c["mean_latency_us"]),
            list("latency_us"),
            num(&c["mean_requests_per_s"])
        )?;
    }
    writeln!(
        doc,
        "\nRatios all / none, median of the rounds' ratios (each round measures both back to \
         back): throughput **{:.3}**, latency **{:.3}**, request rate {:.3}; ratio of the means: \
         throughput {:.3}, latency {:.3}.",
        num(&o["throughput_ratio"]),
        num(&o["latency_ratio"]),
        num(&o["requests_ratio"]),
        num(&o["throughput_ratio_of_means"]),
        num(&o["latency_ratio_of_means"])
    )?;
    writeln!(
        doc,
        "\nSingle rounds swing by up to 15 % on this 2-core VM, in both configurations alike. \
         What the programs do per packet is measured exactly above and in the DNS section (a \
         non-DNS packet costs under 100 ns per hook; the race tracer runs only on dropped \
         packets): at these packet rates (tens of thousands of GSO packets per second) that is \
         under 1 % of a core, below what the throughput comparison can resolve here."
    )?;
    Ok(())
}
