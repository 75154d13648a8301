//! Job 2: DNS latency per pod. Each pod resolves names against a server
//! whose names choose its behaviour (`podnet-dns-responder`): quick and
//! delayed answers, NXDOMAIN, SERVFAIL, a first copy lost (the client
//! retransmits) and, for one pod, a name that is never answered.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use anyhow::{anyhow, bail, Result};
use podnet_tests::{
    dns_client::{udp_dns_query, DnsQuery},
    start_dns_responder, wait_for, Metrics,
};
use serde_json::{json, Value};

use crate::{
    node::{DemoPod, Node, DNS_TIMEOUT},
    report::{self, Agreement},
};

/// Query type A.
const QTYPE_A: u16 = 1;
/// Delays (ms) of the answered, unremarkable queries each pod sends.
const QUICK_DELAYS_MS: [u64; 12] = [0, 0, 2, 5, 5, 10, 10, 20, 20, 40, 60, 80];
/// Delay (ms) of the queries over the slow threshold.
const SLOW_DELAY_MS: u64 = 300;
/// How long a client waits for an answer: longer than the agent's timeout.
const CLIENT_WAIT: Duration = Duration::from_millis(2_500);
/// When the client sends its second copy of a query whose first copy is lost.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// The pod (index into the node's pods) that also asks a name nobody answers.
const UNANSWERED_POD: usize = 2;
/// Records of `podnetctl dns slow` shown.
const FAILURES_SHOWN: usize = 12;
/// DNS response codes the demo's clients can see, by number.
const RCODES: [(u8, &str); 3] = [(0, "NOERROR"), (2, "SERVFAIL"), (3, "NXDOMAIN")];

/// What one pod's client saw.
#[derive(Default)]
struct ClientTally {
    queries: u64,
    retransmits: u64,
    unanswered: u64,
    by_rcode: BTreeMap<u8, u64>,
    latency_sum: Duration,
}

/// Runs the DNS step and prints per-pod latency and the failed queries.
pub fn run(node: &Node, agreement: &mut Agreement) -> Result<()> {
    let pods = node.pods.borrow();
    let responder = start_dns_responder(node.topo.server(), &[node.topo.server_ipv4().into()])?;
    wait_dns_links(node, 2 * pods.len())?;
    let server = SocketAddr::new(node.topo.server_ipv4().into(), 53);
    let tallies = report::step(
        4,
        &format!(
            "DNS: each pod resolves {} names against {server} (slow, NXDOMAIN, SERVFAIL, a lost first copy, one silent name)",
            QUICK_DELAYS_MS.len() + 5
        ),
        || {
            std::thread::scope(|scope| {
                let handles: Vec<_> = pods
                    .iter()
                    .enumerate()
                    .map(|(i, pod)| scope.spawn(move || resolve(pod, i, server)))
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().map_err(|_| anyhow!("a client thread panicked"))?)
                    .collect::<Result<Vec<ClientTally>>>()
            })
        },
    )?;
    let expected_timeouts: u64 = tallies.iter().map(|t| t.unanswered).sum();
    let expected_requests: u64 = tallies.iter().map(|t| t.queries).sum();
    // The agent counts a timeout once --dns-timeout has passed and its sweep
    // ran; wait (bounded) until every query is answered or timed out.
    let mut metrics = node.agent.metrics(node.topo.node())?;
    wait_for(
        || {
            node.agent.metrics(node.topo.node()).is_ok_and(|m| {
                let settled = m.count_sum("podnet_dns_requests_total") == expected_requests
                    && m.count_sum("podnet_dns_timeouts_total") == expected_timeouts;
                metrics = m;
                settled
            })
        },
        Duration::from_secs(10),
    );
    drop(responder);
    print_latency(&pods, &metrics);
    print_failures(node)?;
    agree(&pods, &tallies, &metrics, agreement);
    Ok(())
}

/// One pod's queries, in order; returns what its client saw.
fn resolve(pod: &DemoPod, index: usize, server: SocketAddr) -> Result<ClientTally> {
    let mut queries: Vec<DnsQuery> = QUICK_DELAYS_MS
        .iter()
        .enumerate()
        .map(|(n, ms)| name_query(server, &format!("delay-{ms}-q{n}.{}.demo", pod.name)))
        .collect();
    for n in 0..2 {
        queries.push(name_query(
            server,
            &format!("delay-{SLOW_DELAY_MS}-slow{n}.{}.demo", pod.name),
        ));
    }
    queries.push(name_query(server, &format!("nx-missing.{}.demo", pod.name)));
    queries.push(name_query(
        server,
        &format!("servfail-broken.{}.demo", pod.name),
    ));
    queries.push(
        name_query(server, &format!("dropfirst-retry.{}.demo", pod.name))
            .retransmitted(2, RETRY_AFTER),
    );
    if index == UNANSWERED_POD {
        queries.push(name_query(
            server,
            &format!("drop-silent.{}.demo", pod.name),
        ));
    }
    let mut tally = ClientTally::default();
    for query in &queries {
        tally.queries += 1;
        tally.retransmits += (query.copies - 1) as u64;
        match udp_dns_query(&pod.netns, query)? {
            Some(answer) => {
                *tally.by_rcode.entry(answer.rcode).or_default() += 1;
                tally.latency_sum += answer.elapsed;
            }
            None => tally.unanswered += 1,
        }
    }
    Ok(tally)
}

fn name_query(server: SocketAddr, name: &str) -> DnsQuery {
    DnsQuery::new(server, name, QTYPE_A, CLIENT_WAIT)
}

/// Waits until the agent has attached its DNS programs to `links` hooks.
fn wait_dns_links(node: &Node, links: usize) -> Result<()> {
    let mut status = Value::Null;
    let attached = wait_for(
        || {
            status = node.agent.api("status", Value::Null).unwrap_or(Value::Null);
            status["dns"]["links"].as_array().map(Vec::len) == Some(links)
        },
        Duration::from_secs(10),
    );
    if !attached {
        bail!(
            "expected {links} DNS links, the agent reports: {}",
            status["dns"]
        );
    }
    Ok(())
}

/// Per pod: queries, p50 and p99 from podnet's histogram, timeouts, retransmits, errors.
fn print_latency(pods: &[DemoPod], metrics: &Metrics) {
    report::section("DNS per pod, measured in the kernel (podnet_dns_*)");
    println!(
        "  {:<22} {:>7} {:>9} {:>9} {:>8} {:>11} {:>9} {:>8}",
        "pod", "queries", "p50", "p99", "timeouts", "retransmits", "NXDOMAIN", "SERVFAIL"
    );
    for pod in pods {
        let who = [("namespace", pod.namespace), ("pod", pod.name)];
        let rcode = |r: &str| {
            metrics.count_matching(
                "podnet_dns_responses_total",
                &[who[0], who[1], ("rcode", r)],
            )
        };
        let buckets = pod_buckets(metrics, pod.namespace, pod.name);
        println!(
            "  {:<22} {:>7} {:>9} {:>9} {:>8} {:>11} {:>9} {:>8}",
            format!("{}/{}", pod.namespace, pod.name),
            metrics.count_matching("podnet_dns_requests_total", &who),
            milliseconds(quantile(&buckets, 0.5)),
            milliseconds(quantile(&buckets, 0.99)),
            metrics.count_matching("podnet_dns_timeouts_total", &who),
            metrics.count_matching("podnet_dns_retransmits_total", &who),
            rcode("NXDOMAIN"),
            rcode("SERVFAIL"),
        );
    }
}

/// The pod's cumulative latency buckets (upper bound in seconds, count), all rcodes summed.
fn pod_buckets(metrics: &Metrics, namespace: &str, pod: &str) -> Vec<(f64, f64)> {
    buckets_matching(&[metrics], &[("namespace", namespace), ("pod", pod)])
}

/// The cumulative latency buckets of every series (of all `metrics`) whose labels include
/// `wanted`, summed per upper bound.
pub fn buckets_matching(metrics: &[&Metrics], wanted: &[(&str, &str)]) -> Vec<(f64, f64)> {
    let mut by_bound: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    let samples = metrics
        .iter()
        .flat_map(|m| m.samples("podnet_dns_request_duration_seconds_bucket"));
    for (labels, value) in samples {
        let label = |k: &str| labels.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        if !wanted.iter().all(|(k, v)| label(k) == Some(v)) {
            continue;
        }
        let bound = match label("le") {
            Some("+Inf") => f64::INFINITY,
            Some(le) => le.parse().unwrap_or(f64::INFINITY),
            None => continue,
        };
        by_bound.entry(bound.to_bits()).or_insert((bound, 0.0)).1 += value;
    }
    let mut buckets: Vec<(f64, f64)> = by_bound.into_values().collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

/// The `q` quantile of cumulative buckets, interpolated inside the bucket
/// as Prometheus' `histogram_quantile` does.
pub fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total == 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(bound, count) in buckets {
        if count >= rank {
            if bound.is_infinite() {
                return Some(lower.0);
            }
            let inside = count - lower.1;
            let share = if inside == 0.0 {
                1.0
            } else {
                (rank - lower.1) / inside
            };
            return Some(lower.0 + (bound - lower.0) * share);
        }
        lower = (bound, count);
    }
    None
}

/// Seconds as milliseconds with one decimal; `-` for none.
pub fn milliseconds(seconds: Option<f64>) -> String {
    seconds.map_or_else(|| "-".into(), |s| format!("{:.1} ms", s * 1e3))
}

/// The slow, failed and unanswered queries podnet recorded, newest last.
fn print_failures(node: &Node) -> Result<()> {
    let records = node
        .agent
        .api("dns.slow", json!({ "limit": FAILURES_SHOWN }))
        .map_err(|e| anyhow!("{e}"))?;
    let records = records.as_array().map_or(&[][..], Vec::as_slice);
    report::section(&format!(
        "Slow, failed and unanswered queries (podnetctl dns slow; the newest {})",
        records.len()
    ));
    for r in records {
        let what = match r["outcome"].as_str() {
            Some("timeout") => format!(
                "no answer within {DNS_TIMEOUT} (waited {:.1} s)",
                micros(r) / 1e6
            ),
            Some("error") => format!(
                "answered {} after {:.1} ms",
                r["rcode"].as_str().unwrap_or("?"),
                micros(r) / 1e3
            ),
            _ => format!("slow: answered after {:.1} ms", micros(r) / 1e3),
        };
        println!(
            "  {:<22} {} {:<36} {what}",
            format!(
                "{}/{}",
                r["pod"]["namespace"].as_str().unwrap_or(""),
                r["pod"]["pod"].as_str().unwrap_or("")
            ),
            r["qtype"].as_str().unwrap_or("?"),
            r["name"].as_str().unwrap_or("?"),
        );
    }
    Ok(())
}

fn micros(record: &Value) -> f64 {
    record["latency_us"].as_f64().unwrap_or(0.0)
}

/// podnet's DNS figures against what the clients saw.
fn agree(pods: &[DemoPod], tallies: &[ClientTally], metrics: &Metrics, agreement: &mut Agreement) {
    let sum = |f: &dyn Fn(&ClientTally) -> u64| tallies.iter().map(f).sum::<u64>();
    agreement.exact(
        "DNS queries",
        metrics.count_sum("podnet_dns_requests_total"),
        "queries the clients sent",
        sum(&|t| t.queries),
    );
    agreement.exact(
        "DNS retransmits",
        metrics.count_sum("podnet_dns_retransmits_total"),
        "second copies the clients sent",
        sum(&|t| t.retransmits),
    );
    agreement.exact(
        "DNS timeouts",
        metrics.count_sum("podnet_dns_timeouts_total"),
        "queries the clients saw unanswered",
        sum(&|t| t.unanswered),
    );
    for (code, name) in RCODES {
        agreement.exact(
            &format!("DNS answers {name}"),
            metrics.count_matching("podnet_dns_responses_total", &[("rcode", name)]),
            &format!("{name} answers the clients got"),
            sum(&|t| t.by_rcode.get(&code).copied().unwrap_or(0)),
        );
    }
    let podnet_seconds: f64 = pods
        .iter()
        .map(|p| {
            metrics
                .samples("podnet_dns_request_duration_seconds_sum")
                .iter()
                .filter(|(labels, _)| {
                    labels.contains(&("namespace".into(), p.namespace.into()))
                        && labels.contains(&("pod".into(), p.name.into()))
                })
                .map(|(_, v)| v)
                .sum::<f64>()
        })
        .sum();
    let client_seconds: f64 = tallies.iter().map(|t| t.latency_sum.as_secs_f64()).sum();
    agreement.within(
        "DNS latency, sum of answered (s)",
        podnet_seconds,
        "the clients' own clocks (s)",
        client_seconds,
        LATENCY_TOLERANCE,
    );
}

/// How far podnet's latency sum may be from the clients' (relative): the
/// kernel stamps a packet at the pod's interface, the client at its socket.
const LATENCY_TOLERANCE: f64 = 0.01;
