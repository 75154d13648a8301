//! The main job as a user runs it (`cargo xtask demo`): `podnet-demo` builds
//! a node, creates pods through CNI, makes insert races and DNS traffic, and
//! prints podnet's figures against the kernel's counters and the clients'.
//! It fails on any disagreement; this test also holds it to the exact set of
//! agreement lines and to leaving nothing behind.

// Test code: a step that fails fails the test, with the step in the message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use podnet_tests::{agent::binary, cni, require_root};

/// The agreement lines the demo prints, each with its verdict.
const EXPECTED_LINES: [(&str, &str); 10] = [
    ("IPAM addresses allocated", "exact"),
    ("routing objects not as desired", "exact"),
    ("insert races attributed to pods", "exact"),
    ("DNS queries", "exact"),
    ("DNS retransmits", "exact"),
    ("DNS timeouts", "exact"),
    ("DNS answers NOERROR", "exact"),
    ("DNS answers SERVFAIL", "exact"),
    ("DNS answers NXDOMAIN", "exact"),
    ("DNS latency, sum of answered (s)", "within"),
];

/// Entries of a directory whose names contain `needle`.
fn entries_containing(dir: &str, needle: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains(needle))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn demo_shows_three_jobs_in_exact_agreement() {
    if !require_root() || !cni::ready() {
        return;
    }
    let out = Command::new(binary("podnet-demo").unwrap())
        .args(["--seconds", "2"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "podnet-demo failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for (what, verdict) in EXPECTED_LINES {
        let line = stdout
            .lines()
            .find(|l| l.trim_start().starts_with(what))
            .unwrap_or_else(|| panic!("no agreement line {what:?}:\n{stdout}"));
        assert!(
            line.trim_end().ends_with("exact") == (verdict == "exact") && line.contains(verdict),
            "{what}: {line}"
        );
    }
    assert!(!stdout.contains("MISMATCH"), "{stdout}");
    for section in [
        "== Pods",
        "== Insert races per pod",
        "== Who held the port",
        "== DNS per pod",
        "== Slow, failed and unanswered queries",
    ] {
        assert!(
            stdout.contains(section),
            "no section {section:?}:\n{stdout}"
        );
    }
    // Four pods, each named with its address from the node CIDR.
    let pods = stdout
        .lines()
        .filter(|l| l.contains("gateway 10.244.7.1"))
        .count();
    assert_eq!(pods, 4, "{stdout}");
    // Nothing of the run is left: its namespaces and pins carry its PID.
    let tag = format!("-{}-", out_pid(&stdout));
    assert_eq!(entries_containing("/run/netns", &tag), Vec::<String>::new());
    assert_eq!(
        entries_containing("/sys/fs/bpf", &tag),
        Vec::<String>::new()
    );
}

/// The demo's PID, from the node namespace it names (`demo-node-<pid>-<n>`).
fn out_pid(stdout: &str) -> String {
    stdout
        .split("demo-node-")
        .nth(1)
        .and_then(|rest| rest.split('-').next())
        .map_or_else(
            || panic!("the demo names no node namespace:\n{stdout}"),
            str::to_owned,
        )
}
