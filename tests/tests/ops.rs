//! Operations: `podnet-agent --cleanup` removes exactly what podnet installed,
//! and the self-metrics (map fill, program run statistics) match the kernel.

// Test code: a step that fails fails the test, with the step in the message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result};
use podnet_tests::{
    agent::binary,
    iptables, require_root, udp_send,
    vpc::{Vpc, VPC_CIDR},
    wait_for, Agent, EndpointSpec, Metrics, Netns, Topology,
};
use serde_json::Value;

/// Objects podnet installs per ENI (subnet and default route in its table).
const PER_ENI: usize = 2;
/// Objects per ENI-owned pod: host route, two rules, one proxy entry.
const PER_POD: usize = 4;
/// podnet's route and rule protocol, as `ip -j` prints it.
const PODNET_PROTOCOL: &str = "176";
/// podnet's rule priorities.
const OWNED_PRIORITIES: std::ops::RangeInclusive<u64> = 512..=1536;
/// The conntrack tracer's program (`podnet_common::conntrack::PROGRAM_NAME`).
const CONNTRACK_PROGRAM: &str = "podnet_kfree_skb";
/// `max_entries` of `CT_DROPS` (`podnet_common::conntrack::maps::DROPS_CAPACITY`).
const CT_DROPS_CAPACITY: u32 = 16_384;
/// A foreign MASQUERADE rule (as `iptables -S` arguments after the chain).
const FOREIGN_MASQ: [&str; 4] = ["-s", "10.9.0.0/16", "-j", "MASQUERADE"];

/// A scratch directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("podnet-ops-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn arg(&self, name: &str) -> String {
        self.0.join(name).to_string_lossy().into_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn json_of(node: &Netns, cmd: &[&str]) -> Result<Vec<Value>> {
    let out = node.run_ok(cmd)?;
    let v: Value = serde_json::from_slice(&out.stdout).with_context(|| cmd.join(" "))?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

/// Rules with podnet's protocol inside its priority range.
fn podnet_rules(node: &Netns) -> Result<Vec<Value>> {
    Ok(json_of(node, &["ip", "-d", "-j", "rule"])?
        .into_iter()
        .filter(|r| {
            r["protocol"] == PODNET_PROTOCOL
                && r["priority"]
                    .as_u64()
                    .is_some_and(|p| OWNED_PRIORITIES.contains(&p))
        })
        .collect())
}

fn rules_at(node: &Netns, priority: u64) -> Result<usize> {
    Ok(json_of(node, &["ip", "-d", "-j", "rule"])?
        .iter()
        .filter(|r| r["priority"].as_u64() == Some(priority))
        .count())
}

/// Routes of every table with podnet's protocol.
fn podnet_routes(node: &Netns) -> Result<Vec<Value>> {
    Ok(
        json_of(node, &["ip", "-j", "route", "show", "table", "all"])?
            .into_iter()
            .filter(|r| r["protocol"] == PODNET_PROTOCOL)
            .collect(),
    )
}

fn proxies(node: &Netns) -> Result<usize> {
    Ok(json_of(node, &["ip", "-j", "neigh", "show", "proxy"])?.len())
}

fn bpftool_program_ids() -> Result<Vec<u64>> {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .context("bpftool")?;
    let v: Value = serde_json::from_slice(&out.stdout)?;
    Ok(v.as_array()
        .map(|a| a.iter().filter_map(|p| p["id"].as_u64()).collect())
        .unwrap_or_default())
}

struct Cleanup {
    code: i32,
    stdout: String,
}

fn run_cleanup(node: &Netns, args: &[&str]) -> Result<Cleanup> {
    let bin = binary("podnet-agent")?;
    let bin = bin.to_string_lossy().into_owned();
    let mut cmd = vec![bin.as_str(), "--cleanup"];
    cmd.extend_from_slice(args);
    let out = node.run(&cmd)?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!(
        "cleanup stdout:\n{stdout}stderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(Cleanup {
        code: out.status.code().unwrap_or(-1),
        stdout,
    })
}

/// Foreign state: a rule below podnet's range and one inside it, a route,
/// a MASQUERADE rule.
fn add_foreign_state(node: &Netns, eni: &str) -> Result<()> {
    podnet_tests::vpc::add_foreign_rules(node)?;
    node.run_ok(&["ip", "route", "add", "192.0.2.0/24", "dev", eni])?;
    let mut masq = vec!["-t", "nat", "-A", "POSTROUTING"];
    masq.extend(FOREIGN_MASQ);
    iptables(node, &masq)?;

    Ok(())
}

/// `podnetctl status` shows every section and every program.
fn assert_status_view(agent: &Agent) -> Result<()> {
    let view = agent.podnetctl(&["status"])?;
    eprintln!("{view}");
    for section in ["PROGRAMS", "MAPS", "EVENTS", "IPAM", "ROUTING", "ENDPOINTS"] {
        assert!(
            view.lines().any(|l| l == section),
            "{section} missing:\n{view}"
        );
    }
    for program in [
        "podnet_kfree_skb",
        "podnet_dns_pod_ingress",
        "podnet_dns_pod_egress",
        "podnet_steer_pod",
        "podnet_steer_eni",
    ] {
        assert!(view.contains(program), "{program} missing:\n{view}");
    }
    Ok(())
}

fn assert_no_podnet_routing_or_snat(node: &Netns) -> Result<()> {
    assert_eq!(podnet_rules(node)?, Vec::<Value>::new());
    assert_eq!(podnet_routes(node)?, Vec::<Value>::new());
    assert_eq!(proxies(node)?, 0);
    assert!(!node
        .run(&["iptables", "-w", "-t", "nat", "-S", "PODNET-SNAT"])?
        .status
        .success());
    Ok(())
}

fn assert_foreign_state_survives(node: &Netns) -> Result<()> {
    assert_eq!(rules_at(node, 300)?, 1);
    assert_eq!(rules_at(node, 1000)?, 1);
    let main = json_of(node, &["ip", "-j", "route", "show", "192.0.2.0/24"])?;
    assert_eq!(main.len(), 1);
    let mut check = vec!["-t", "nat", "-C", "POSTROUTING"];
    check.extend(FOREIGN_MASQ);
    assert!(iptables(node, &check)?.status.success());
    Ok(())
}

/// One SNAT port (every datagram of pod b after pod a's loses the insert
/// race) and an ordinary DROP for pod a towards port 9999.
fn race_and_drop_rules(topo: &Topology) -> Result<()> {
    let a = topo.pod(0);
    topo.snat_pods_to_one_port("udp", false, 40_000)?;
    // An ordinary DROP for pod a towards port 9999.
    let a_ip = a.ipv4().to_string();
    iptables(
        topo.node(),
        &[
            "-A", "FORWARD", "-s", &a_ip, "-p", "udp", "--dport", "9999", "-j", "DROP",
        ],
    )?;
    Ok(())
}

#[test]
fn cleanup_removes_what_podnet_installed_and_nothing_else() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let vpc = Vpc::builder().name("ops-cl").build()?;
    let node = vpc.node();
    let files = TempDir::new("cl")?;
    std::fs::write(files.path().join("enis.yaml"), vpc.enis_yaml())?;
    let (conf, bin) = (files.path().join("net.d"), files.path().join("bin"));
    std::fs::create_dir_all(&conf)?;
    std::fs::create_dir_all(&bin)?;
    std::fs::write(conf.join("10-podnet.conflist"), "{}")?;
    std::fs::write(conf.join("05-other.conflist"), "{}")?;
    std::fs::write(bin.join("podnet-cni"), "")?;
    std::fs::write(bin.join("ptp"), "")?;
    let (enis, conf_arg, bin_arg) = (
        files.arg("enis.yaml"),
        conf.to_string_lossy().into_owned(),
        bin.to_string_lossy().into_owned(),
    );
    let shared = [
        "--enis",
        enis.as_str(),
        "--vpc-cidrs",
        VPC_CIDR,
        "--fast-path",
        "--cni-conf-dir",
        conf_arg.as_str(),
        "--cni-bin-dir",
        bin_arg.as_str(),
    ];
    let mut agent = Agent::start_with(node, &vpc.endpoints(), &shared)?;
    agent.wait_routes_converged(PER_ENI * vpc.enis().len() + PER_POD * vpc.pods().len())?;

    add_foreign_state(node, vpc.enis()[0].name())?;

    let status = agent.api("status", Value::Null)?;
    let programs = status["kernel_objects"]["programs"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let ids: Vec<u64> = programs.iter().filter_map(|p| p["id"].as_u64()).collect();
    let subsystems: std::collections::BTreeSet<&str> = programs
        .iter()
        .filter_map(|p| p["subsystem"].as_str())
        .collect();
    assert_eq!(
        subsystems.into_iter().collect::<Vec<_>>(),
        ["conntrack", "dns", "steer"],
        "{status:#}"
    );
    assert!(ids.contains(&status["tracer_program_id"].as_u64().unwrap_or(0)));
    let before = (podnet_rules(node)?.len(), podnet_routes(node)?.len());
    assert_eq!(before.0, 2 * vpc.pods().len(), "podnet rules before");
    assert_eq!(
        before.1,
        PER_ENI * vpc.enis().len() + vpc.pods().len(),
        "podnet routes before"
    );
    // One proxy-ARP entry per pod, on the ENI that owns its address.
    assert_eq!(proxies(node)?, vpc.pods().len(), "proxy entries before");
    assert_status_view(&agent)?;
    let socket = agent.socket().to_string_lossy().into_owned();
    let bpffs = agent.bpffs().to_string_lossy().into_owned();
    agent.stop()?;
    assert!(bpftool_program_ids()?.iter().any(|id| ids.contains(id)));

    let mut args = vec!["--bpffs", bpffs.as_str(), "--socket", socket.as_str()];
    args.extend_from_slice(&shared);
    let first = run_cleanup(node, &args)?;
    assert_eq!(first.code, 0);
    assert!(
        first.stdout.contains("removed pin directory"),
        "{}",
        first.stdout
    );
    assert!(first.stdout.contains("PODNET-SNAT"), "{}", first.stdout);

    assert!(!Path::new(&bpffs).exists(), "pin directory still there");
    // Programs are freed once their last link is gone (after an RCU grace
    // period): give the kernel a moment.
    let mut left = Vec::new();
    let gone = wait_for(
        || {
            left = bpftool_program_ids()
                .unwrap_or_default()
                .into_iter()
                .filter(|id| ids.contains(id))
                .collect();
            left.is_empty()
        },
        Duration::from_secs(5),
    );
    assert!(gone, "programs still loaded: {left:?} of {ids:?}");
    assert_no_podnet_routing_or_snat(node)?;
    assert_foreign_state_survives(node)?;
    assert!(!conf.join("10-podnet.conflist").exists());
    assert!(!bin.join("podnet-cni").exists());
    assert!(conf.join("05-other.conflist").exists());
    assert!(bin.join("ptp").exists());
    assert!(!Path::new(&socket).exists());

    let second = run_cleanup(node, &args)?;
    assert_eq!(second.code, 0);
    assert_eq!(second.stdout, "nothing to remove\n");
    Ok(())
}

/// Restores `kernel.bpf_stats_enabled` on drop.
struct BpfStats(String);

impl BpfStats {
    const PATH: &'static str = "/proc/sys/kernel/bpf_stats_enabled";

    fn enable() -> Result<Self> {
        let old = std::fs::read_to_string(Self::PATH)?;
        std::fs::write(Self::PATH, "1")?;
        Ok(Self(old.trim().to_owned()))
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, &self.0);
    }
}

fn gauge(m: &Metrics, name: &str, map: &str) -> Option<u64> {
    m.value(name, &[("map", map)])
        .map(|_| m.count(name, &[("map", map)]))
}

#[test]
fn self_metrics_count_map_entries_exactly_and_program_runs() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let topo = Topology::builder().name("ops-m").pods(2).build()?;
    let (a, b) = (topo.pod(0), topo.pod(1));
    let endpoints: Vec<EndpointSpec> = [("a", a), ("b", b)]
        .iter()
        .map(|(name, pod)| EndpointSpec::new("shop", name, &[IpAddr::V4(pod.ipv4())]))
        .collect();
    race_and_drop_rules(&topo)?;
    let stats = BpfStats::enable()?;
    let agent = Agent::start(topo.node(), &endpoints)?;
    let before = agent.metrics(topo.node())?;
    assert!(
        before.has_family("podnet_bpf_program_runs_total"),
        "{}",
        before.0
    );
    assert_eq!(
        gauge(&before, "podnet_bpf_map_entries", "CT_DROPS"),
        Some(0)
    );
    assert_eq!(
        gauge(&before, "podnet_bpf_map_capacity", "CT_DROPS"),
        Some(u64::from(CT_DROPS_CAPACITY))
    );
    let runs = |m: &Metrics| {
        m.value(
            "podnet_bpf_program_runs_total",
            &[("program", CONNTRACK_PROGRAM)],
        )
        .unwrap_or(0.0)
    };
    let (races, drops) = (5_u32, 3_u32);
    let server = |port| SocketAddr::new(topo.server_ipv4().into(), port);
    udp_send(
        a.netns(),
        SocketAddr::new(a.ipv4().into(), 5000),
        server(7000),
        1,
    )?;
    udp_send(
        b.netns(),
        SocketAddr::new(b.ipv4().into(), 5001),
        server(7000),
        races as usize,
    )?;
    udp_send(
        a.netns(),
        SocketAddr::new(a.ipv4().into(), 5002),
        server(9999),
        drops as usize,
    )?;
    let after = agent.metrics(topo.node())?;
    let netfilter: u64 = ["a", "b"]
        .iter()
        .flat_map(|pod| {
            ["insert_race", "other"].map(|kind| {
                after.count(
                    "podnet_netfilter_drops_total",
                    &[("namespace", "shop"), ("pod", pod), ("kind", kind)],
                )
            })
        })
        .sum();
    assert_eq!(netfilter, u64::from(races + drops));
    // kfree_skb runs for every drop on the machine: at least ours.
    let ran = runs(&after) - runs(&before);
    assert!(ran >= f64::from(races + drops), "runs rose by {ran}");
    // Keys: (pod b, udp, race) and (pod a, udp, other); one race destination.
    assert_eq!(gauge(&after, "podnet_bpf_map_entries", "CT_DROPS"), Some(2));
    assert_eq!(
        gauge(&after, "podnet_bpf_map_entries", "CT_RACE_DESTS"),
        Some(1)
    );
    assert!(after
        .value(
            "podnet_bpf_program_run_seconds_total",
            &[("program", CONNTRACK_PROGRAM)]
        )
        .is_some());
    drop(stats);
    let off = agent.metrics(topo.node())?;
    if std::fs::read_to_string(BpfStats::PATH)?.trim() == "0" {
        assert!(!off.has_family("podnet_bpf_program_runs_total"));
    }
    Ok(())
}
