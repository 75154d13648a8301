//! Job 1: conntrack insert races. The pods send UDP datagrams at the same
//! moments through SNAT to four ports, so most new flows find every port
//! taken and lose the insert race; podnet names each loser and its winner.

use std::{
    collections::BTreeMap,
    net::{SocketAddr, UdpSocket},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Barrier,
    },
    time::{Duration, Instant},
};

use anyhow::{anyhow, Result};
use podnet_tests::{conntrack_stats, in_netns, iptables, Metrics};
use serde_json::{json, Value};

use crate::{
    node::{Node, NODE_CIDR},
    report::{self, Agreement},
    stopping,
};

/// Services on the server the pods talk to (UDP; not DNS, which has its own step).
const SERVICES: [u16; 3] = [8125, 5353, 9000];
/// SNAT port range: deliberately tiny so concurrent flows collide.
const SNAT_PORTS: (u16, u16) = (40_000, 40_003);
/// Pause between rounds.
const ROUND_GAP: Duration = Duration::from_millis(20);
/// Races listed per (loser, winner) pair.
const PAIRS_SHOWN: usize = 8;
/// Destinations listed.
const DESTINATIONS_SHOWN: usize = 5;

/// Runs the race traffic for `seconds` and prints what podnet saw.
pub fn run(node: &Node, seconds: u64, agreement: &mut Agreement) -> Result<()> {
    let to = format!(
        "{}:{}-{}",
        node.topo.node_ipv4_to_server(),
        SNAT_PORTS.0,
        SNAT_PORTS.1
    );
    let snat_rule = |action: &str, proto: &str| {
        iptables(
            node.topo.node(),
            &[
                "-t",
                "nat",
                action,
                "POSTROUTING",
                "-s",
                NODE_CIDR,
                "-p",
                proto,
                "-j",
                "SNAT",
                "--to-source",
                &to,
            ],
        )
    };
    for proto in ["udp", "tcp"] {
        snat_rule("-A", proto)?;
    }
    println!(
        "[3/{}] insert races: {} pods open UDP flows at the same moments through SNAT to ports {}-{}, for {seconds} s (Ctrl-C stops early)",
        report::STEPS,
        node.pods.borrow().len(),
        SNAT_PORTS.0,
        SNAT_PORTS.1
    );
    let before = conntrack_stats(node.topo.node())?;
    let sent = drive_traffic(node, seconds)?;
    let after = conntrack_stats(node.topo.node())?;
    // The next step's DNS queries must not race for the same four ports:
    // the rules go, and so do the entries holding the ports.
    for proto in ["udp", "tcp"] {
        snat_rule("-D", proto)?;
    }
    node.topo.node().run_ok(&["conntrack", "-F"])?;
    let metrics = node.agent.metrics(node.topo.node())?;
    let races = node
        .agent
        .api("conntrack.races", json!({ "limit": 1000 }))
        .map_err(|e| anyhow!("{e}"))?;
    print_races(node, &metrics, &races);
    let kernel = |c: &str| after.delta(&before, c).unwrap_or(0);
    println!(
        "  datagrams sent {sent}, kernel insert_failed {}, kernel drop {}",
        kernel("insert_failed"),
        kernel("drop")
    );
    agreement.exact(
        "insert races attributed to pods",
        metrics.count_sum("podnet_conntrack_insert_races_total"),
        "kernel insert_failed (conntrack -S)",
        kernel("insert_failed"),
    );
    Ok(())
}

/// Every round, all pods send one datagram at the same moment to the same
/// service from a fresh source port.
fn drive_traffic(node: &Node, seconds: u64) -> Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let pods = node.pods.borrow();
    let sent = Arc::new(AtomicU64::new(0));
    let barrier = Arc::new(Barrier::new(pods.len()));
    let server = node.topo.server_ipv4();
    std::thread::scope(|scope| -> Result<()> {
        for pod in pods.iter() {
            let (barrier, sent) = (Arc::clone(&barrier), Arc::clone(&sent));
            scope.spawn(move || {
                in_netns(&pod.netns, || {
                    let mut round: u32 = 0;
                    loop {
                        barrier.wait();
                        if stopping() || Instant::now() >= deadline {
                            break;
                        }
                        let service = SERVICES[round as usize % SERVICES.len()];
                        let sport = 20_000 + u16::try_from(round % 40_000).unwrap_or(0);
                        if let Ok(socket) = UdpSocket::bind(SocketAddr::new(pod.ip.into(), sport)) {
                            if socket
                                .send_to(b"demo", SocketAddr::new(server.into(), service))
                                .is_ok()
                            {
                                sent.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        round += 1;
                        std::thread::sleep(ROUND_GAP);
                    }
                })
            });
        }
        let mut last_print = Instant::now();
        while Instant::now() < deadline && !stopping() {
            std::thread::sleep(Duration::from_millis(100));
            if last_print.elapsed() >= Duration::from_secs(1) {
                last_print = Instant::now();
                let m = node.agent.metrics(node.topo.node())?;
                let kernel = conntrack_stats(node.topo.node())?.get("insert_failed")?;
                report::progress(&format!(
                    "  {:>5} datagrams sent | insert_failed (kernel) {:>5} | races attributed by podnet {:>5}",
                    sent.load(Ordering::Relaxed),
                    kernel,
                    m.count_sum("podnet_conntrack_insert_races_total")
                ));
            }
        }
        report::progress_done();
        Ok(())
    })?;
    Ok(sent.load(Ordering::Relaxed))
}

fn print_races(node: &Node, metrics: &Metrics, races: &Value) {
    report::section("Insert races per pod (podnet_conntrack_insert_races_total)");
    for pod in node.pods.borrow().iter() {
        let n = metrics.count(
            "podnet_conntrack_insert_races_total",
            &[
                ("namespace", pod.namespace),
                ("pod", pod.name),
                ("proto", "udp"),
            ],
        );
        println!("  {:<24} {n:>6}", format!("{}/{}", pod.namespace, pod.name));
    }
    report::section("Top destinations (podnet_conntrack_race_destinations_total)");
    let mut destinations: Vec<(String, f64)> = metrics
        .samples("podnet_conntrack_race_destinations_total")
        .into_iter()
        .filter_map(|(labels, value)| {
            let destination = labels.into_iter().find(|(k, _)| k == "destination")?.1;
            Some((destination, value))
        })
        .collect();
    destinations.sort_by(|a, b| b.1.total_cmp(&a.1));
    for (destination, n) in destinations.iter().take(DESTINATIONS_SHOWN) {
        println!("  {destination:<24} {n:>6}");
    }
    let recorded = races.as_array().map_or(&[][..], Vec::as_slice);
    report::section(&format!(
        "Who held the port (the winners of the last {} races, podnetctl conntrack races)",
        recorded.len()
    ));
    let pod = |v: &Value| {
        format!(
            "{}/{}",
            v["namespace"].as_str().unwrap_or(""),
            v["pod"].as_str().unwrap_or("")
        )
    };
    let mut pairs: BTreeMap<(String, String), u64> = BTreeMap::new();
    for race in recorded {
        let winner = match race["winner"]["state"].as_str() {
            Some("found") => pod(&race["winner"]["pod"]),
            Some(other) => format!("({other})"),
            None => "(unknown)".into(),
        };
        *pairs.entry((pod(&race["loser"]), winner)).or_default() += 1;
    }
    let mut pairs: Vec<_> = pairs.into_iter().collect();
    pairs.sort_by_key(|p| std::cmp::Reverse(p.1));
    for ((loser, winner), n) in pairs.iter().take(PAIRS_SHOWN) {
        println!("  {loser:<24} lost to {winner:<24} {n:>5}x");
    }
    if let Some(last) = recorded.last() {
        println!("  the last one in full: {}", one_race(last));
    }
}

/// One race as podnetctl prints it: loser, its flow, the winner's flow.
fn one_race(race: &Value) -> String {
    let flow = |v: &Value| {
        format!(
            "{} -> {}",
            v["src"].as_str().unwrap_or("?"),
            v["dst"].as_str().unwrap_or("?")
        )
    };
    format!(
        "{}/{} ({}) lost port {} to {}/{} ({})",
        race["loser"]["namespace"].as_str().unwrap_or(""),
        race["loser"]["pod"].as_str().unwrap_or(""),
        flow(&race["flow"]),
        race["snat"].as_str().unwrap_or("?"),
        race["winner"]["pod"]["namespace"].as_str().unwrap_or(""),
        race["winner"]["pod"]["pod"].as_str().unwrap_or(""),
        flow(&race["winner"]["flow"]),
    )
}
