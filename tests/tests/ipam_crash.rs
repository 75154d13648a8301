//! IPAM survives `kill -9`: 500 allocations and releases driven through the
//! agent's API while the agent is killed twice and restarted; afterwards no
//! address is given twice and, after GC, none leaks.

// Test code: a step that fails fails the test, with the step in the message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::{BTreeMap, HashSet},
    path::Path,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use podnet::api::client;
use podnet_tests::{Agent, Topology};
use serde_json::{json, Value};

const ALLOCATIONS: usize = 260;
/// Each attachment is released this many allocations later: 240 releases.
const LIVE: usize = 20;
const ORPHANS: usize = 5;

/// Calls until the agent answers (it may be down for a restart).
fn call_retrying(socket: &Path, method: &str, params: &Value) -> Value {
    let deadline = Instant::now() + Duration::from_mins(1);
    loop {
        match client::call(socket, method, params.clone(), Duration::from_secs(2)) {
            Ok(v) => return v,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "{method}: agent did not come back: {e}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn key(i: usize) -> Value {
    json!({"command": "ADD", "containerId": format!("crash{i:03}"), "ifName": "eth0", "network": "n"})
}

#[test]
fn kill_nine_during_churn_loses_and_duplicates_nothing() {
    if !podnet_tests::require_root() {
        return;
    }
    let topo = Topology::builder()
        .name("ipamkill")
        .pods(0)
        .build()
        .unwrap();
    let node = topo.node();
    let mut agent = Agent::start_with(node, &[], &["--node-cidr", "10.246.0.0/23"]).unwrap();
    let socket = agent.socket();
    // Orphans: allocated, never released, not valid at GC time.
    for i in 0..ORPHANS {
        let mut k = key(900 + i);
        k["containerId"] = json!(format!("orphan{i}"));
        call_retrying(&socket, "ipam.allocate", &k);
    }
    let progress = Arc::new(AtomicUsize::new(0));
    let driver = std::thread::spawn({
        let socket = socket.clone();
        let progress = progress.clone();
        move || {
            let mut answers: BTreeMap<usize, String> = BTreeMap::new();
            for i in 0..ALLOCATIONS {
                let a = call_retrying(&socket, "ipam.allocate", &key(i));
                answers.insert(i, a["ips"][0]["ip"].as_str().unwrap().to_owned());
                progress.fetch_add(1, Ordering::SeqCst);
                if i >= LIVE {
                    let mut k = key(i - LIVE);
                    k["command"] = json!("DEL");
                    call_retrying(&socket, "ipam.release", &k);
                    answers.remove(&(i - LIVE));
                    progress.fetch_add(1, Ordering::SeqCst);
                }
            }
            answers
        }
    });
    let mut kills = 0;
    for at in [120, 330] {
        while progress.load(Ordering::SeqCst) < at && !driver.is_finished() {
            std::thread::sleep(Duration::from_millis(1));
        }
        agent.kill().unwrap();
        kills += 1;
        agent.start_again(node).unwrap();
    }
    let answers = driver.join().unwrap();
    assert_eq!(kills, 2);
    assert_eq!(
        progress.load(Ordering::SeqCst),
        ALLOCATIONS + (ALLOCATIONS - LIVE)
    );
    assert_eq!(answers.len(), LIVE);

    // What the checkpoint holds: no address twice; the live ones as answered.
    let text = std::fs::read_to_string(agent.state_dir().join("ipam.json")).unwrap();
    let cp: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(cp["version"], json!(1));
    let allocations = cp["allocations"].as_array().unwrap();
    let mut seen = HashSet::new();
    for a in allocations {
        for ip in a["ips"].as_array().unwrap() {
            assert!(
                seen.insert(ip["ip"].as_str().unwrap().to_owned()),
                "duplicate {ip}"
            );
        }
    }
    assert_eq!(allocations.len(), LIVE + ORPHANS);
    for (i, ip) in &answers {
        let s = agent
            .api(
                "ipam.status",
                json!({"containerId": format!("crash{i:03}"), "ifName": "eth0"}),
            )
            .unwrap();
        assert_eq!(s["allocation"]["ips"][0]["ip"], json!(ip), "crash{i:03}");
    }
    // GC with the live attachments frees the orphans and nothing else.
    let valid: Vec<Value> = answers
        .keys()
        .map(|i| json!({"containerId": format!("crash{i:03}"), "ifName": "eth0"}))
        .collect();
    let r = agent
        .api(
            "ipam.gc",
            json!({"command": "GC", "network": "n", "valid": valid}),
        )
        .unwrap();
    assert_eq!(r["removed"], json!(ORPHANS));
    let s = agent.api("ipam.status", Value::Null).unwrap();
    let pool = &s["pools"][0];
    assert_eq!(pool["allocated"], json!(LIVE));
    // Every release (240 + 5 orphans) is cooling down; nothing is lost.
    assert_eq!(pool["cooldown"], json!(ALLOCATIONS - LIVE + ORPHANS));
    assert_eq!(
        pool["free"],
        json!(509 - LIVE - (ALLOCATIONS - LIVE + ORPHANS))
    );
}
