//! podnet's performance targets, checked against the figures of one
//! `cargo xtask bench` run and written to `docs/bench/summary.json`.
//!
//! Every figure is a ratio or a value next to the baseline measured in the
//! same run, so a reader sees what was compared and whether the target held.

use serde_json::{json, Value};

/// One figure of the run against its target.
#[derive(Clone, Debug, PartialEq)]
pub struct Figure {
    /// What was measured.
    pub name: &'static str,
    /// The measured value.
    pub value: f64,
    /// Its unit (`ratio`, `ns`, `KiB`, `ms`, `events`, `%`).
    pub unit: &'static str,
    /// What the value is compared with in the same run, if anything.
    pub baseline: Option<(&'static str, f64)>,
    /// The target, as text.
    pub target: &'static str,
    /// Whether the target held.
    pub met: bool,
}

impl Figure {
    /// As JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "name": self.name,
            "value": self.value,
            "unit": self.unit,
            "baseline": self.baseline.map(|(what, v)| json!({"what": what, "value": v})),
            "target": self.target,
            "met": self.met,
        })
    }
}

fn num(v: &Value) -> Option<f64> {
    v.as_f64()
}

/// The figures of every benchmark present; a benchmark not run adds none.
/// `results` maps a benchmark's name to its JSON (`conntrack`, `ipam`,
/// `agent`, `dns`, `cni`, `steer`).
pub fn figures(results: &dyn Fn(&str) -> Option<Value>) -> Vec<Figure> {
    let mut out = Vec::new();
    if let Some(agent) = results("agent") {
        agent_figures(&agent["agent"], &mut out);
    }
    if let Some(dns) = results("dns") {
        if let (Some(ns), Some(empty)) = (num(&dns["non_dns_ns"]), num(&dns["empty_program_ns"])) {
            out.push(Figure {
                name: "DNS programs: cost per non-DNS packet",
                value: ns,
                unit: "ns",
                baseline: Some(("an empty program on the same hooks", empty)),
                target: "< 100 ns",
                met: ns < 100.0,
            });
        }
        dns_figures(&dns, &mut out);
        if let (Some(r), Some(w)) = (
            num(&dns["throughput_ratio"]),
            num(&dns["without_gbit_per_s"]),
        ) {
            out.push(Figure {
                name: "DNS programs: iperf3 throughput with / without",
                value: r,
                unit: "ratio",
                baseline: Some(("Gbit/s without the programs", w)),
                target: ">= 0.97",
                met: r >= 0.97,
            });
        }
    }
    if let Some(steer) = results("steer") {
        steer_figures(&steer, &mut out);
    }
    if let Some(cni) = results("cni") {
        if let (Some(p99), Some(chain)) = (
            num(&cni["add_podnet"]["p99_ms"]),
            num(&cni["add_chain"]["p99_ms"]),
        ) {
            out.push(Figure {
                name: "CNI ADD: podnet's share, p99",
                value: p99,
                unit: "ms",
                baseline: Some(("whole ptp + podnet chain p99, ms", chain)),
                target: "< 20 ms",
                met: p99 < 20.0,
            });
        }
        if let (Some(p99), Some(chain)) = (
            num(&cni["del_podnet"]["p99_ms"]),
            num(&cni["del_chain"]["p99_ms"]),
        ) {
            out.push(Figure {
                name: "CNI DEL: podnet's share, p99",
                value: p99,
                unit: "ms",
                baseline: Some(("whole ptp + podnet chain p99, ms", chain)),
                target: "< 20 ms",
                met: p99 < 20.0,
            });
        }
    }
    if let Some(ct) = results("conntrack") {
        if let Some(rate) = num(&ct["conntrack"]["lossless_race_events_per_second"]) {
            out.push(Figure {
                name: "race events delivered without loss (one sender, budget off)",
                value: rate,
                unit: "events/s",
                baseline: None,
                target: ">= 10,000/s",
                met: rate >= 10_000.0,
            });
        }
    }
    out
}

/// The DNS programs' cost per DNS packet and the comparison with a packet
/// capture (`capture` in the DNS benchmark's JSON).
fn dns_figures(dns: &Value, out: &mut Vec<Figure>) {
    if let (Some(query), Some(answer), Some(empty)) = (
        num(&dns["query_ns"]),
        num(&dns["answer_ns"]),
        num(&dns["empty_program_ns"]),
    ) {
        let worst = query.max(answer);
        out.push(Figure {
            name: "DNS programs: cost per DNS packet (query or answer, the dearer, gross)",
            value: worst,
            unit: "ns",
            baseline: Some(("an empty program on the same hooks", empty)),
            target: "< 300 ns",
            met: worst < 300.0,
        });
    }
    let c = &dns["capture"];
    if let (Some(err), Some(tshark)) = (num(&c["podnet_error_pct"]), num(&c["tshark_error_pct"])) {
        out.push(Figure {
            name: "DNS latency sum: podnet against the clients' own (relative error)",
            value: err,
            unit: "%",
            baseline: Some(("tshark dns.time against the clients, %", tshark)),
            target: "within 1 %",
            met: err.abs() <= 1.0,
        });
    }
    if let (Some(ratio), Some(capture)) = (num(&c["cpu_ratio"]), num(&c["capture_cpu_s"])) {
        out.push(Figure {
            name: "DNS latency: podnet's CPU / a packet capture's (dumpcap + tshark)",
            value: ratio,
            unit: "ratio",
            baseline: Some(("dumpcap + tshark CPU, s", capture)),
            target: "<= 0.05 (1/20)",
            met: ratio <= 0.05,
        });
    }
}

/// Fast path against the kernel path (a node with kube-proxy's rules for
/// 1,000 Services and 100,000 conntrack entries) and against a direct veth:
/// medians of the rounds' ratios, for request rate and new connections.
fn steer_figures(steer: &Value, out: &mut Vec<Figure>) {
    let figures: [(&'static str, &str, &str, &'static str, &'static str, f64); 4] = [
        (
            "fast path: request rate over the kernel path (median of rounds)",
            "fast_over_kernel_requests",
            "requests_per_s",
            "kernel path requests/s",
            ">= 1.15",
            1.15,
        ),
        (
            "fast path: new connections/s over the kernel path (median of rounds)",
            "fast_over_kernel_connections",
            "connections_per_s",
            "kernel path connections/s",
            ">= 1.15",
            1.15,
        ),
        (
            "fast path: request rate over a direct veth (median of rounds)",
            "fast_over_direct_requests",
            "requests_per_s",
            "direct veth requests/s",
            ">= 0.93",
            0.93,
        ),
        (
            "fast path: new connections/s over a direct veth (median of rounds)",
            "fast_over_direct_connections",
            "connections_per_s",
            "direct veth connections/s",
            ">= 0.93",
            0.93,
        ),
    ];
    for (name, ratio, baseline, what, target, at_least) in figures {
        let Some(r) = num(&steer[ratio]) else {
            continue;
        };
        let path = if ratio.contains("kernel") {
            "kernel"
        } else {
            "direct"
        };
        out.push(Figure {
            name,
            value: r,
            unit: "ratio",
            baseline: Some((what, num(&steer[path][baseline]).unwrap_or(f64::NAN))),
            target,
            met: r >= at_least,
        });
    }
}

fn agent_figures(a: &Value, out: &mut Vec<Figure>) {
    let o = &a["overhead"];
    if let (Some(r), Some(none)) = (
        num(&o["throughput_ratio"]),
        num(&o["none"]["mean_gbit_per_s"]),
    ) {
        out.push(Figure {
            name: "all programs attached: iperf3 throughput / none (median of rounds)",
            value: r,
            unit: "ratio",
            baseline: Some(("Gbit/s with no program", none)),
            target: ">= 0.97 (at most 3 % cost)",
            met: r >= 0.97,
        });
    }
    if let (Some(r), Some(none)) = (num(&o["latency_ratio"]), num(&o["none"]["mean_latency_us"])) {
        out.push(Figure {
            name: "all programs attached: sockperf latency / none (median of rounds)",
            value: r,
            unit: "ratio",
            baseline: Some(("µs with no program", none)),
            target: "<= 1.03",
            met: r <= 1.03,
        });
    }
    let idle = num(&a["idle"]["rss_kib"]);
    let steps = a["endpoints"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let largest = steps.iter().max_by_key(|s| s["endpoints"].as_u64());
    if let Some(rss) = largest.and_then(|s| num(&s["at_rest"]["rss_kib"])) {
        out.push(Figure {
            name: "agent RSS with 1,000 endpoints, at rest",
            value: rss,
            unit: "KiB",
            baseline: idle.map(|i| ("RSS idle, no endpoint (KiB)", i)),
            target: "< 40 MiB (40960 KiB)",
            met: rss < 40_960.0,
        });
    }
    let load = &a["load"];
    if let Some(rss) = num(&load["agent"]["rss_max_kib"]) {
        out.push(Figure {
            name: "agent RSS with 1,000 endpoints under DNS and race load (max)",
            value: rss,
            unit: "KiB",
            baseline: idle.map(|i| ("RSS idle, no endpoint (KiB)", i)),
            target: "< 40 MiB (40960 KiB)",
            met: rss < 40_960.0,
        });
    }
    if let Some(cpu) = num(&load["agent"]["cpu_percent"]) {
        out.push(Figure {
            name: "agent CPU with 1,000 endpoints under DNS and race load",
            value: cpu,
            unit: "% of a core",
            baseline: largest
                .and_then(|s| num(&s["at_rest"]["cpu_percent"]))
                .map(|c| ("% of a core at rest, same endpoints", c)),
            target: "< 3 %",
            met: cpu < 3.0,
        });
    }
    let smallest = steps.iter().min_by_key(|s| s["endpoints"].as_u64());
    if let Some(ms) = largest.and_then(|s| num(&s["scrape_ms_median"])) {
        out.push(Figure {
            name: "/metrics scrape with 1,000 endpoints (median of 5)",
            value: ms,
            unit: "ms",
            baseline: smallest
                .and_then(|s| num(&s["scrape_ms_median"]))
                .map(|b| ("ms with 10 endpoints", b)),
            target: "< 5 ms",
            met: ms < 5.0,
        });
    }
    add_figures(&a["adds"], out);
    for (kind, label, target_rate) in [
        ("races", "race events lost at 10,000 races/s", 10_000.0),
        (
            "dns",
            "DNS events lost at 20,000 queries/s (every answer an event)",
            20_000.0,
        ),
    ] {
        let l = &load[kind];
        if let (Some(lost), Some(rate)) = (num(&l["events_lost"]), num(&l["per_second"])) {
            let received = num(&l["events_received"]).unwrap_or(0.0);
            out.push(Figure {
                name: label,
                value: lost,
                unit: "events",
                baseline: Some(("events received", received)),
                target: "0 lost, at >= 95 % of the target rate",
                met: lost == 0.0 && rate >= 0.95 * target_rate && received > 0.0,
            });
        }
    }
}

/// Time from a new pod's ADD to its programs in place, per attach mode.
fn add_figures(adds: &Value, out: &mut Vec<Figure>) {
    for (mode, single, burst) in [
        (
            "tcx",
            "new pod's DNS programs attached after its ADD, p99 (tcx, 1,000 endpoints)",
            "burst of 100 ADDs: programs attached after each ADD, p99 (tcx, 1,000 endpoints)",
        ),
        (
            "tcx_expedited",
            "new pod's DNS programs attached after its ADD, p99 (tcx, rcu_expedited=1, 1,000 endpoints)",
            "burst of 100 ADDs: programs attached after each ADD, p99 (tcx, rcu_expedited=1, 1,000 endpoints)",
        ),
        (
            "tcx_add_wait",
            "new pod's DNS programs attached after its ADD, p99 (tcx, --cni-add-wait, 1,000 endpoints)",
            "burst of 100 ADDs: programs attached after each ADD, p99 (tcx, --cni-add-wait, 1,000 endpoints)",
        ),
        (
            "tc",
            "new pod's DNS programs attached after its ADD, p99 (classic tc, 1,000 endpoints)",
            "burst of 100 ADDs: programs attached after each ADD, p99 (classic tc, 1,000 endpoints)",
        ),
    ] {
        let adds = &adds[mode];
        for (name, series) in [(single, "single"), (burst, "burst")] {
            if let Some(p99) = num(&adds[series]["attach_ms"]["p99"]) {
                out.push(Figure {
                    name,
                    value: p99,
                    unit: "ms",
                    baseline: num(&adds[series]["call_ms"]["p99"])
                        .map(|c| ("endpoint.add call p99 (ms)", c)),
                    target: "< 50 ms",
                    met: p99 < 50.0,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_judged_from_the_figures() {
        let agent = json!({"agent": {
            "idle": {"rss_kib": 16000},
            "endpoints": [{"endpoints": 10, "scrape_ms_median": 1.5},
                          {"endpoints": 1000, "at_rest": {"rss_kib": 41000}, "scrape_ms_median": 4.0}],
            "overhead": {"throughput_ratio": 0.98, "latency_ratio": 1.01,
                         "none": {"mean_gbit_per_s": 18.0, "mean_latency_us": 30.0}},
            "adds": {"tcx": {"single": {"attach_ms": {"p99": 40.0}, "call_ms": {"p99": 5.0}},
                             "burst": {"attach_ms": {"p99": 900.0}}}},
            "load": {"agent": {"rss_max_kib": 30000, "cpu_percent": 3.5},
                     "races": {"events_lost": 0, "per_second": 9999.0, "events_received": 5},
                     "dns": {"events_lost": 3, "per_second": 20000.0, "events_received": 5}},
        }});
        let got = figures(&|name| (name == "agent").then(|| agent.clone()));
        let met: Vec<(&str, bool)> = got.iter().map(|f| (f.name, f.met)).collect();
        assert_eq!(
            met,
            [
                (
                    "all programs attached: iperf3 throughput / none (median of rounds)",
                    true
                ),
                (
                    "all programs attached: sockperf latency / none (median of rounds)",
                    true
                ),
                ("agent RSS with 1,000 endpoints, at rest", false),
                (
                    "agent RSS with 1,000 endpoints under DNS and race load (max)",
                    true
                ),
                ("agent CPU with 1,000 endpoints under DNS and race load", false),
                ("/metrics scrape with 1,000 endpoints (median of 5)", true),
                (
                    "new pod's DNS programs attached after its ADD, p99 (tcx, 1,000 endpoints)",
                    true
                ),
                (
                    "burst of 100 ADDs: programs attached after each ADD, p99 (tcx, 1,000 endpoints)",
                    false
                ),
                ("race events lost at 10,000 races/s", true),
                (
                    "DNS events lost at 20,000 queries/s (every answer an event)",
                    false
                ),
            ]
        );
        assert_eq!(
            got[2].baseline,
            Some(("RSS idle, no endpoint (KiB)", 16000.0))
        );
    }

    #[test]
    fn dns_targets_are_judged_from_the_figures() {
        let dns = json!({
            "non_dns_ns": 70.0, "empty_program_ns": 58.0,
            "query_ns": 280.0, "answer_ns": 310.0,
            "capture": {"podnet_error_pct": -0.4, "tshark_error_pct": 0.02,
                        "cpu_ratio": 0.01, "capture_cpu_s": 3.2},
        });
        let got = figures(&|name| (name == "dns").then(|| dns.clone()));
        let met: Vec<(&str, f64, bool)> = got.iter().map(|f| (f.name, f.value, f.met)).collect();
        assert_eq!(
            met,
            [
                ("DNS programs: cost per non-DNS packet", 70.0, true),
                (
                    "DNS programs: cost per DNS packet (query or answer, the dearer, gross)",
                    310.0,
                    false
                ),
                (
                    "DNS latency sum: podnet against the clients' own (relative error)",
                    -0.4,
                    true
                ),
                (
                    "DNS latency: podnet's CPU / a packet capture's (dumpcap + tshark)",
                    0.01,
                    true
                ),
            ]
        );
    }

    #[test]
    fn fast_path_targets_take_request_and_connection_ratios() {
        let steer = json!({
            "kernel": {"requests_per_s": 40000.0, "connections_per_s": 6000.0},
            "direct": {"requests_per_s": 45000.0, "connections_per_s": 9000.0},
            "fast_over_kernel_requests": 1.2,
            "fast_over_kernel_connections": 1.1,
            "fast_over_direct_requests": 0.95,
            "fast_over_direct_connections": 0.93,
        });
        let got = figures(&|name| (name == "steer").then(|| steer.clone()));
        let met: Vec<(f64, bool)> = got.iter().map(|f| (f.value, f.met)).collect();
        assert_eq!(met, [(1.2, true), (1.1, false), (0.95, true), (0.93, true)]);
        assert_eq!(got[1].baseline, Some(("kernel path connections/s", 6000.0)));
        assert_eq!(got[3].baseline, Some(("direct veth connections/s", 9000.0)));
    }

    #[test]
    fn absent_benchmarks_add_no_figure() {
        assert!(figures(&|_| None).is_empty());
    }
}
