//! Load: a node with 250 endpoints, every one with its DNS programs attached,
//! insert races at 10,000/s and DNS queries at 20,000/s (every answer an
//! NXDOMAIN, so every answer is a ring-buffer event) at the same time.
//!
//! Asserted exactly: every race the kernel counted is attributed and arrives
//! as an event, every query and answer is counted and every answer's event
//! arrives, nothing is lost. The normal suite runs 5 s of load; the soak
//! (`PODNET_SOAK=1`, `cargo xtask soak`) runs 120 s and also asserts that the
//! agent's memory stays flat.

// Test code: a step that fails fails the test, with the step in the message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use podnet_tests::{
    load::{dns_server, endpoints, race_rule, run_load, set_endpoints, LoadPlan, LoadReport},
    require_root, Agent, Topology,
};

const PODS: usize = 250;

fn soak() -> bool {
    std::env::var("PODNET_SOAK").is_ok_and(|v| v == "1")
}

/// RSS may grow this much from the first to the second half of a soak: the
/// allocator's working set settling, not a leak (a leak of one allocation per
/// event would be megabytes at these rates).
const FLAT_RSS_SLACK_KIB: u64 = 1024;

#[test]
fn races_and_dns_at_target_rates_lose_nothing() {
    if !require_root() {
        return;
    }
    let seconds = if soak() { 120 } else { 5 };
    let topo = Topology::builder()
        .name("load")
        .pods(PODS)
        .build()
        .expect("topology");
    race_rule(&topo).expect("race rule");
    let _dns = dns_server(&topo).expect("dnsmasq");
    let all = endpoints(&topo, PODS);
    let agent = Agent::start_with(topo.node(), &all, &["--dns-timeout", "1s"]).expect("agent");
    set_endpoints(&agent, &all, Duration::from_mins(2)).expect("500 DNS links");

    let report = run_load(
        &topo,
        &agent,
        &LoadPlan {
            race_rate: 10_000,
            dns_rate: 20_000,
            dns_clients: 4,
            duration: Duration::from_secs(seconds),
            dns_timeout: Duration::from_secs(1),
        },
    )
    .expect("load");
    eprintln!("{}", report.to_json());
    assert_exact(&report, seconds);
    if soak() {
        assert_memory_flat(&report);
    }
    // The agent is still the one that started, and still ready.
    assert!(agent.log().contains("podnet-agent ready"));
    assert_eq!(
        agent
            .api("status", serde_json::Value::Null)
            .expect("status")["endpoints"],
        PODS
    );
}

fn assert_exact(r: &LoadReport, seconds: u64) {
    // The senders reached the rates (within 5 %: paced in 1 ms slices, on
    // two cores shared with the agent, the DNS server and five senders).
    let (races_min, dns_min) = (10_000 * seconds * 95 / 100, 20_000 * seconds * 95 / 100);
    assert!(r.race_sent >= races_min, "races sent {}", r.race_sent);
    assert!(r.dns_sent >= dns_min, "queries sent {}", r.dns_sent);
    // Every datagram of pod B lost the insert race in the kernel...
    assert_eq!(r.kernel_insert_failed, r.race_sent);
    // ...and podnet attributed each one and received each one's event.
    assert_eq!(r.races_attributed, r.kernel_insert_failed);
    assert_eq!(r.race_events_received, r.kernel_insert_failed);
    assert_eq!(r.race_events_lost, 0);
    // Every query recorded; every answer that reached the pod's interface
    // matched and delivered as an event; every other query (should the DNS
    // server fall behind on a loaded machine) a timeout, exactly.
    assert_eq!(r.dns_queries_counted, r.dns_sent);
    assert_eq!(r.dns_events_received, r.dns_responses_counted);
    assert_eq!(r.dns_events_lost, 0);
    assert_eq!(r.dns_responses_counted + r.dns_timeouts, r.dns_sent);
    // The clients cannot have read more answers than crossed the interface.
    assert!(r.dns_answered <= r.dns_responses_counted, "{r:?}");
}

fn assert_memory_flat(r: &LoadReport) {
    let half = r.rss_samples_kib.len() / 2;
    let (first, second) = r.rss_samples_kib.split_at(half);
    let first_max = first.iter().copied().max().unwrap_or(0);
    let second_max = second.iter().copied().max().unwrap_or(0);
    assert!(
        second_max <= first_max + FLAT_RSS_SLACK_KIB,
        "RSS grew from {first_max} KiB to {second_max} KiB: {:?}",
        r.rss_samples_kib
    );
}
