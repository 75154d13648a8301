//! The rounds' figures as printed text and as JSON for `cargo xtask bench`.
//!
//! Every ratio is the median of the rounds' ratios (each round measures the
//! three paths back to back), which a burst of other work on the machine
//! during one round does not move; the ratio of the means is printed beside it.

use std::time::Duration;

use podnet_tests::bench::{median, MESSAGE};

use crate::bed;

/// One path's figures in one round.
#[derive(Clone, Copy, Debug, Default)]
pub struct Figures {
    /// sockperf average latency (µs, half round trip as sockperf reports it).
    pub latency_us: f64,
    /// Ping-pong requests per second.
    pub requests_per_s: f64,
    /// New connections per second (connect, request, response, close).
    pub connections_per_s: f64,
    /// New connections completed.
    pub connections: u64,
    /// New connections that failed.
    pub connections_failed: u64,
    /// iperf3 throughput (Gbit/s).
    pub gbit_per_s: f64,
}

/// What a fast-path program cost per run during one workload.
#[derive(Clone, Debug)]
pub struct Cost {
    /// `request/response`, `new connections` or `throughput`.
    pub workload: &'static str,
    /// `pod->ENI` or `ENI->pod`.
    pub program: &'static str,
    /// `run_time_ns / run_cnt` over the workload.
    pub ns_per_run: f64,
    /// Runs over the workload.
    pub runs: u64,
}

/// One round: the three paths back to back.
#[derive(Clone, Debug)]
pub struct Round {
    /// The kernel path.
    pub kernel: Figures,
    /// The fast path.
    pub fast: Figures,
    /// The direct veth.
    pub direct: Figures,
    /// Entries in the node's conntrack table as the kernel path's
    /// measurement began.
    pub conntrack_entries: u64,
    /// New flows that walked kube-proxy's Service rules, kernel path.
    pub kernel_lookups: u64,
    /// The same during the fast path's measurement (0: nothing reached
    /// netfilter).
    pub fast_lookups: u64,
    /// Egress packets the fast path redirected.
    pub steered: u64,
    /// Egress packets it left to the kernel.
    pub left_to_kernel: u64,
    /// The fast-path programs' cost per workload.
    pub costs: Vec<Cost>,
    /// Repair latency of a rule deleted by hand (first round only).
    pub repair: Option<Duration>,
}

/// The whole run.
pub struct Results {
    /// Every round.
    pub rounds: Vec<Round>,
    /// Seconds per workload and path.
    pub seconds: u64,
    /// The node the kernel path crosses.
    pub node: bed::Node,
    /// How long building that node took.
    pub built_in: Duration,
}

type Metric = fn(&Figures) -> f64;

const REQUESTS: Metric = |f| f.requests_per_s;
const CONNECTIONS: Metric = |f| f.connections_per_s;
const THROUGHPUT: Metric = |f| f.gbit_per_s;
const LATENCY: Metric = |f| f.latency_us;

fn mean(v: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = v.fold((0.0, 0u32), |(s, n), x| (s + x, n + 1));
    sum / f64::from(n)
}

type Path = fn(&Round) -> &Figures;

const KERNEL: Path = |r| &r.kernel;
const FAST: Path = |r| &r.fast;
const DIRECT: Path = |r| &r.direct;

impl Results {
    fn mean(&self, path: Path, metric: Metric) -> f64 {
        mean(self.rounds.iter().map(|r| metric(path(r))))
    }

    /// Median over the rounds of `a / b`.
    fn ratio(&self, a: Path, b: Path, metric: Metric) -> f64 {
        median(
            self.rounds
                .iter()
                .map(|r| metric(a(r)) / metric(b(r)))
                .collect(),
        )
    }

    fn ratio_of_means(&self, a: Path, b: Path, metric: Metric) -> f64 {
        self.mean(a, metric) / self.mean(b, metric)
    }

    /// Mean cost per run of `program` during `workload` over the rounds.
    fn cost(&self, workload: &str, program: &str) -> f64 {
        mean(
            self.rounds
                .iter()
                .flat_map(|r| &r.costs)
                .filter(|c| c.workload == workload && c.program == program)
                .map(|c| c.ns_per_run),
        )
    }

    fn repair(&self) -> Option<Duration> {
        self.rounds.iter().find_map(|r| r.repair)
    }
}

/// Prints the bed, every round and the ratios.
pub fn print(r: &Results) {
    let n = &r.node;
    println!(
        "node: kube-proxy (iptables) rules for {} Services x {} endpoints ({} NodePorts): {} nat rules in {} chains, {} filter rules, {} jumps from built-in chains; {} conntrack entries (built in {:.1?})",
        bed::SERVICES,
        bed::ENDPOINTS,
        bed::SERVICES / bed::NODE_PORT_EVERY,
        n.rules.nat_rules,
        n.rules.nat_chains,
        n.rules.filter_rules,
        n.rules.filter_jumps + n.rules.nat_jumps,
        n.conntrack_entries,
        r.built_in,
    );
    for (i, round) in r.rounds.iter().enumerate() {
        for c in &round.costs {
            println!(
                "round {i}: program {}: {:.0} ns/run over {} runs ({})",
                c.program, c.ns_per_run, c.runs, c.workload
            );
        }
        let row = |name: &str, f: &Figures| {
            format!(
                "{name:<6} {:>6.1} us {:>8.0} req/s {:>7.0} conn/s ({} failed) {:>5.1} Gbit/s",
                f.latency_us,
                f.requests_per_s,
                f.connections_per_s,
                f.connections_failed,
                f.gbit_per_s
            )
        };
        println!(
            "round {i}: {} conntrack entries; {}; {} new flows through kube-proxy's Service rules ({} of them new connections)",
            round.conntrack_entries,
            row("kernel", &round.kernel),
            round.kernel_lookups,
            round.kernel.connections + round.kernel.connections_failed
        );
        println!(
            "         {}; {} new flows through them; pod->ENI: {} packets steered, {} left to the kernel",
            row("fast", &round.fast),
            round.fast_lookups,
            round.steered,
            round.left_to_kernel
        );
        println!("         {}", row("direct", &round.direct));
    }
    println!(
        "\nmeans over {} round(s) of {} s per workload, message {MESSAGE} B",
        r.rounds.len(),
        r.seconds
    );
    println!(
        "{:<8} {:>10} {:>10} {:>10} {:>8}",
        "path", "lat (us)", "req/s", "conn/s", "Gbit/s"
    );
    for (name, path) in [("kernel", KERNEL), ("fast", FAST), ("direct", DIRECT)] {
        println!(
            "{name:<8} {:>10.2} {:>10.0} {:>10.0} {:>8.2}",
            r.mean(path, LATENCY),
            r.mean(path, REQUESTS),
            r.mean(path, CONNECTIONS),
            r.mean(path, THROUGHPUT)
        );
    }
    println!("\nmedian of per-round ratios (ratio of means in brackets):");
    for (name, a, b) in [
        ("fast / kernel", FAST, KERNEL),
        ("fast / direct", FAST, DIRECT),
        ("kernel / direct", KERNEL, DIRECT),
    ] {
        let both = |m: Metric| {
            format!(
                "{:.3}x ({:.3}x)",
                r.ratio(a, b, m),
                r.ratio_of_means(a, b, m)
            )
        };
        println!(
            "{name:<16} request rate {}, new connections {}, throughput {}, latency {}",
            both(REQUESTS),
            both(CONNECTIONS),
            both(THROUGHPUT),
            both(LATENCY)
        );
    }
    println!("fast path programs, mean ns/run over the rounds:");
    for workload in ["request/response", "new connections", "throughput"] {
        println!(
            "  {workload:<17} pod->ENI {:.0}, ENI->pod {:.0}",
            r.cost(workload, "pod->ENI"),
            r.cost(workload, "ENI->pod")
        );
    }
    if let Some(d) = r.repair() {
        println!("repair latency (rule deleted by hand, back in the kernel): {d:.1?}");
    }
}

/// The figures `cargo xtask bench` keeps (docs/bench/steer.json).
pub fn json(r: &Results) -> serde_json::Value {
    let path = |p: Path| {
        serde_json::json!({
            "latency_us": r.mean(p, LATENCY),
            "requests_per_s": r.mean(p, REQUESTS),
            "connections_per_s": r.mean(p, CONNECTIONS),
            "gbit_per_s": r.mean(p, THROUGHPUT),
        })
    };
    let costs = |workload: &str| {
        serde_json::json!({
            "pod_to_eni_ns": r.cost(workload, "pod->ENI"),
            "eni_to_pod_ns": r.cost(workload, "ENI->pod"),
        })
    };
    let n = &r.node;
    serde_json::json!({
        "rounds": r.rounds.len(),
        "seconds": r.seconds,
        "node": {
            "services": bed::SERVICES,
            "endpoints_per_service": bed::ENDPOINTS,
            "node_ports": bed::SERVICES / bed::NODE_PORT_EVERY,
            "nat_rules": n.rules.nat_rules,
            "nat_chains": n.rules.nat_chains,
            "filter_rules": n.rules.filter_rules,
            "conntrack_entries": n.conntrack_entries,
            "conntrack_entries_min": r.rounds.iter().map(|x| x.conntrack_entries).min(),
        },
        "kernel": path(KERNEL),
        "fast": path(FAST),
        "direct": path(DIRECT),
        "fast_over_kernel_requests": r.ratio(FAST, KERNEL, REQUESTS),
        "fast_over_kernel_connections": r.ratio(FAST, KERNEL, CONNECTIONS),
        "fast_over_kernel_throughput": r.ratio(FAST, KERNEL, THROUGHPUT),
        "fast_over_direct_requests": r.ratio(FAST, DIRECT, REQUESTS),
        "fast_over_direct_connections": r.ratio(FAST, DIRECT, CONNECTIONS),
        "fast_over_direct_throughput": r.ratio(FAST, DIRECT, THROUGHPUT),
        "program_ns_per_run": {
            "request_response": costs("request/response"),
            "new_connections": costs("new connections"),
            "throughput": costs("throughput"),
        },
        "kernel_new_flows_through_service_rules": r.rounds.iter().map(|x| x.kernel_lookups).sum::<u64>(),
        "fast_new_flows_through_service_rules": r.rounds.iter().map(|x| x.fast_lookups).sum::<u64>(),
        "repair_ms": r.repair().map(|d| d.as_secs_f64() * 1e3),
    })
}
