//! `podnetctl --follow` against live traffic, and `podnetctl sysdump`: real
//! namespaces, real SNAT, a DNS responder, the real agent, podnetctl as a
//! child process. Every count is compared with the kernel's own counters
//! (`insert_failed`, the iptables rule's packets) or the client's own view
//! (the answers and timeouts it saw).

// Test code: a step that fails fails the test, with the step in the message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, SocketAddr, UdpSocket},
    os::unix::net::UnixStream,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use podnet_tests::{
    conntrack_stats, forward_rule_packets, in_netns, iptables, require_root, start_dns_responder,
    udp_send, udp_send_paced, wait_for, Agent, EndpointSpec, NsChild, Topology,
};
use serde_json::{json, Value};

/// The single SNAT port of the race traffic.
const SNAT_PORT: u16 = 40_000;
/// The destination port whose flows race.
const RACE_PORT: u16 = 7000;
/// The destination port an iptables rule drops pod `web/c`'s datagrams to.
const DROP_PORT: u16 = 7100;

/// Pods `shop/a` (holds the SNAT port), `shop/b` (loses races) and `web/c`
/// (asks DNS), the agent with a 1 s DNS timeout, and the DNS responder.
struct Bed {
    _responder: NsChild,
    agent: Agent,
    topo: Topology,
}

impl Bed {
    fn start(name: &str, agent_args: &[&str]) -> Self {
        let topo = Topology::builder().name(name).pods(3).build().unwrap();
        // Only the race traffic is source-NATed to one port: DNS and the
        // dropped datagrams go out unchanged.
        iptables(
            topo.node(),
            &[
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-s",
                topo.pods_cidr_v4(),
                "-p",
                "udp",
                "--dport",
                &RACE_PORT.to_string(),
                "-j",
                "SNAT",
                "--to-source",
                &format!("{}:{SNAT_PORT}-{SNAT_PORT}", topo.node_ipv4_to_server()),
            ],
        )
        .unwrap();
        iptables(
            topo.node(),
            &[
                "-A",
                "FORWARD",
                "-s",
                &topo.pod(2).ipv4().to_string(),
                "-p",
                "udp",
                "--dport",
                &DROP_PORT.to_string(),
                "-j",
                "DROP",
            ],
        )
        .unwrap();
        let endpoints: Vec<EndpointSpec> = [("shop", "a"), ("shop", "b"), ("web", "c")]
            .iter()
            .enumerate()
            .map(|(i, (ns, name))| {
                let pod = topo.pod(i);
                EndpointSpec::new(ns, name, &[IpAddr::V4(pod.ipv4())]).interface(pod.host_if())
            })
            .collect();
        let responder = start_dns_responder(topo.server(), &[topo.server_ipv4().into()]).unwrap();
        let mut args = vec!["--dns-timeout", "1s"];
        args.extend(agent_args);
        let agent = Agent::start_with(topo.node(), &endpoints, &args).unwrap();
        let bed = Self {
            _responder: responder,
            agent,
            topo,
        };
        // Three pod interfaces, both directions each.
        let linked = wait_for(
            || bed.status()["dns"]["links"].as_array().map(Vec::len) == Some(6),
            Duration::from_secs(10),
        );
        assert!(linked, "DNS links: {}", bed.status()["dns"]);
        bed
    }

    fn status(&self) -> Value {
        self.agent.api("status", Value::Null).unwrap()
    }

    fn followers(&self) -> usize {
        self.status()["follow"]["followers"]
            .as_array()
            .map_or(0, Vec::len)
    }

    fn insert_failed(&self) -> u64 {
        conntrack_stats(self.topo.node())
            .unwrap()
            .get("insert_failed")
            .unwrap()
    }

    /// Pod `shop/a` takes the SNAT port towards the race port, then pod
    /// `shop/b` sends `n` datagrams there, each losing the insert race.
    fn races(&self, n: usize, gap: Duration) {
        let server = SocketAddr::new(self.topo.server_ipv4().into(), RACE_PORT);
        let (a, b) = (self.topo.pod(0), self.topo.pod(1));
        udp_send(a.netns(), SocketAddr::new(a.ipv4().into(), 5000), server, 1).unwrap();
        udp_send_paced(
            b.netns(),
            SocketAddr::new(b.ipv4().into(), 5001),
            server,
            n,
            gap,
        )
        .unwrap();
    }

    /// One DNS query of `name` (type A) from pod `web/c`; the rcode, or
    /// `None` when no answer came within 1.5 s.
    fn dns(&self, id: u16, name: &str) -> Option<u8> {
        let server = SocketAddr::new(self.topo.server_ipv4().into(), 53);
        let msg = podnet_tests::dns_query_message(id, name, 1);
        in_netns(self.topo.pod(2).netns(), move || {
            let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
            socket.connect(server).unwrap();
            socket.send(&msg).unwrap();
            socket
                .set_read_timeout(Some(Duration::from_millis(1500)))
                .unwrap();
            let mut buf = [0u8; 1500];
            let n = socket.recv(&mut buf).ok()?;
            (n >= 12 && buf[..2] == id.to_be_bytes()).then_some(buf[3] & 0x0f)
        })
        .unwrap()
    }
}

/// `podnetctl` running as a child process, its output lines collected by a
/// thread; killed (by its pid) when dropped.
struct Follower {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Follower {
    fn start(agent: &Agent, args: &[&str]) -> Self {
        let mut child = Command::new(podnetctl())
            .arg("--socket")
            .arg(agent.socket())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        Self { child, lines }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// The JSON events so far.
    fn events(&self) -> Vec<Value> {
        self.lines()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn podnetctl() -> std::path::PathBuf {
    podnet_tests::agent::binary("podnetctl").unwrap()
}

fn of_type<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["type"] == kind).collect()
}

fn pod_of(value: &Value) -> String {
    format!(
        "{}/{}",
        value["namespace"].as_str().unwrap(),
        value["pod"].as_str().unwrap()
    )
}

/// Drop packets in drop events.
fn dropped(events: &[Value]) -> u64 {
    of_type(events, "drop")
        .iter()
        .map(|e| e["packets"].as_u64().unwrap())
        .sum()
}

/// Races, DNS failures and drops made while two podnetctl followers run:
/// the unfiltered one prints exactly what was caused (the kernel's
/// `insert_failed`, the client's own answers and timeouts, the DROP rule's
/// packets), the one with `-n web` only `web/c`'s events.
#[test]
#[allow(clippy::too_many_lines)] // one scenario, step by step
fn follow_prints_exactly_the_races_dns_failures_and_drops_caused() {
    if !require_root() {
        return;
    }
    let bed = Bed::start("flw", &[]);
    let all = Follower::start(&bed.agent, &["--follow", "-o", "json"]);
    let web = Follower::start(&bed.agent, &["--follow", "-n", "web", "--json"]);
    let table = Follower::start(&bed.agent, &["--follow"]);
    assert!(
        wait_for(|| bed.followers() == 3, Duration::from_secs(5)),
        "followers: {}",
        bed.status()["follow"]
    );

    let kernel_before = bed.insert_failed();
    let races = 7;
    bed.races(races, Duration::ZERO);
    let kernel_races = bed.insert_failed() - kernel_before;
    assert_eq!(
        kernel_races, 7,
        "the kernel counts one insert_failed per datagram"
    );

    // DNS: answered queries must not show; failures and timeouts must.
    let asked = [
        (0x5001, "ok-1.test", Some(0)),
        (0x5002, "servfail-1.test", Some(2)),
        (0x5003, "ok-2.test", Some(0)),
        (0x5004, "nx-1.test", Some(3)),
        (0x5005, "servfail-2.test", Some(2)),
        (0x5006, "drop-1.test", None),
        (0x5007, "drop-2.test", None),
    ];
    for (id, name, expected) in asked {
        assert_eq!(bed.dns(id, name), expected, "{name}");
    }
    let client_timeouts = asked.iter().filter(|(_, _, r)| r.is_none()).count();
    let client_failures = asked
        .iter()
        .filter(|(_, _, r)| r.is_some_and(|c| c != 0))
        .count();

    // Datagrams the DROP rule drops.
    let c = bed.topo.pod(2);
    udp_send(
        c.netns(),
        SocketAddr::new(c.ipv4().into(), 5002),
        SocketAddr::new(bed.topo.server_ipv4().into(), DROP_PORT),
        4,
    )
    .unwrap();
    let rule = forward_rule_packets(bed.topo.node(), "DROP").unwrap();
    assert_eq!(rule, 4);

    let expected_dns = client_timeouts + client_failures;
    let complete = wait_for(
        || {
            let e = all.events();
            of_type(&e, "race").len() == races
                && of_type(&e, "dns").len() == expected_dns
                && dropped(&e) == rule
        },
        Duration::from_secs(15),
    );
    // Then nothing more comes: the drop watcher reads every second.
    std::thread::sleep(Duration::from_millis(2500));
    let events = all.events();
    assert!(complete, "events: {events:#?}");

    // Races: exactly the kernel's count, each naming loser, destination and winner,
    // the same records `podnetctl conntrack races` lists.
    let followed_races = of_type(&events, "race");
    assert_eq!(followed_races.len() as u64, kernel_races);
    for race in &followed_races {
        assert_eq!(pod_of(&race["loser"]), "shop/b");
        assert_eq!(
            race["destination"],
            json!(format!("{}:{RACE_PORT}", bed.topo.server_ipv4()))
        );
        assert_eq!(pod_of(&race["winner"]["pod"]), "shop/a");
    }
    let listed: Vec<Value> = serde_json::from_str(
        &bed.agent
            .podnetctl(&["conntrack", "races", "-o", "json"])
            .unwrap(),
    )
    .unwrap();
    let followed: Vec<Value> = followed_races
        .iter()
        .map(|r| {
            let mut r = (*r).clone();
            r.as_object_mut().unwrap().remove("type");
            r
        })
        .collect();
    assert_eq!(listed, followed);

    // DNS: the failures and timeouts the client saw, by name and cause.
    let mut dns: Vec<(String, String)> = of_type(&events, "dns")
        .iter()
        .map(|e| {
            let cause = match e["outcome"].as_str().unwrap() {
                "error" => e["rcode"].as_str().unwrap().to_ascii_lowercase(),
                other => other.to_owned(),
            };
            (e["name"].as_str().unwrap().to_owned(), cause)
        })
        .collect();
    dns.sort();
    let pair = |n: &str, c: &str| (n.to_owned(), c.to_owned());
    assert_eq!(
        dns,
        [
            pair("drop-1.test.", "timeout"),
            pair("drop-2.test.", "timeout"),
            pair("nx-1.test.", "nxdomain"),
            pair("servfail-1.test.", "servfail"),
            pair("servfail-2.test.", "servfail"),
        ]
    );
    assert!(of_type(&events, "dns")
        .iter()
        .all(|e| pod_of(&e["pod"]) == "web/c"));
    // Drops: the rule's packets, all from web/c.
    assert_eq!(dropped(&events), rule);
    assert!(of_type(&events, "drop")
        .iter()
        .all(|e| pod_of(&e["pod"]) == "web/c"));
    assert_eq!(
        events.len(),
        followed_races.len() + dns.len() + of_type(&events, "drop").len(),
        "no other lines: {events:#?}"
    );

    // `-n web`: web/c's DNS failures and drops, no race of shop/b.
    let web_events = web.events();
    assert_eq!(of_type(&web_events, "race").len(), 0);
    assert_eq!(of_type(&web_events, "dns").len(), expected_dns);
    assert_eq!(dropped(&web_events), rule);
    assert_eq!(
        web_events.len(),
        expected_dns + of_type(&web_events, "drop").len()
    );

    // The table follower: a header, then one row per event.
    let rows = table.lines();
    assert!(rows[0].starts_with("TIME (UTC)"), "{rows:#?}");
    assert_eq!(
        rows.iter().filter(|r| r.contains(" insert_race ")).count(),
        races
    );
    // Nothing on the node dropped them: the cause column says `unanswered`.
    assert_eq!(
        rows.iter()
            .filter(|r| r.contains(" unanswered ") && r.contains("(timeout, sent 1)"))
            .count(),
        client_timeouts,
        "{rows:#?}"
    );

    // The lists take the same filters.
    let count = |args: &[&str]| -> usize {
        let out = bed.agent.podnetctl(args).unwrap();
        serde_json::from_str::<Vec<Value>>(&out).unwrap().len()
    };
    assert_eq!(
        count(&["conntrack", "races", "--json", "-n", "shop", "--pod", "b"]),
        races
    );
    assert_eq!(count(&["conntrack", "races", "--json", "-n", "web"]), 0);
    assert_eq!(
        count(&["dns", "slow", "--json", "--cause", "timeout"]),
        client_timeouts
    );
    assert_eq!(
        count(&[
            "dns",
            "slow",
            "--json",
            "--cause",
            "servfail,nxdomain",
            "-n",
            "web"
        ]),
        client_failures
    );

    // The agent's own account: every follower was sent what it printed and lost nothing.
    let status = bed.status();
    for f in status["follow"]["followers"].as_array().unwrap() {
        assert_eq!(f["lost"], 0, "{f}");
    }
    let sent: Vec<u64> = status["follow"]["followers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["sent"].as_u64().unwrap())
        .collect();
    // Followers are listed by number, in the order the agent took them.
    let mut printed = [
        events.len() as u64,
        web_events.len() as u64,
        rows.len() as u64 - 1,
    ];
    printed.sort_unstable();
    let mut sent = sent;
    sent.sort_unstable();
    assert_eq!(sent, printed);
    // Closing a follower ends its follow in the agent.
    drop(all);
    drop(web);
    drop(table);
    assert!(
        wait_for(|| bed.followers() == 0, Duration::from_secs(5)),
        "{}",
        bed.status()["follow"]
    );
}

/// A follower that never reads: the agent goes on, another follower gets
/// every event, and the stuck one, once it reads, is told exactly how many
/// it lost.
#[test]
fn a_stuck_follower_blocks_neither_other_followers_nor_the_agent() {
    if !require_root() {
        return;
    }
    // Every race with full detail, so events published equal races counted.
    let bed = Bed::start("flwstuck", &["--race-event-budget", "0"]);
    let mut stuck = UnixStream::connect(bed.agent.socket()).unwrap();
    stuck
        .write_all(b"{\"version\":1,\"method\":\"follow\"}\n")
        .unwrap();
    assert!(wait_for(|| bed.followers() == 1, Duration::from_secs(5)));
    let live = Follower::start(&bed.agent, &["--follow", "-o", "json"]);
    assert!(wait_for(|| bed.followers() == 2, Duration::from_secs(5)));

    let kernel_before = bed.insert_failed();
    let races = 10_000;
    bed.races(races, Duration::from_micros(100));
    assert_eq!(bed.insert_failed() - kernel_before, races as u64);
    // The agent answers while the stuck follower holds its line.
    let status = bed.agent.podnetctl(&["status", "--json"]).unwrap();
    let status: Value = serde_json::from_str(&status).unwrap();
    let counters = &status["counters"];
    let published_expected = counters["insert_races"].as_u64().unwrap()
        - counters["events_lost"].as_u64().unwrap()
        - counters["events_sampled_out"].as_u64().unwrap();
    assert_eq!(counters["insert_races"], races);
    assert!(
        wait_for(
            || of_type(&live.events(), "race").len() as u64 == published_expected,
            Duration::from_secs(30)
        ),
        "live follower has {} of {published_expected}",
        live.events().len()
    );
    let status = bed.status();
    let follow = &status["follow"];
    assert_eq!(follow["published"], published_expected);
    let followers = follow["followers"].as_array().unwrap();
    let (stuck_status, live_status) = (&followers[0], &followers[1]);
    assert_eq!(live_status["lost"], 0);
    assert_eq!(live_status["sent"], published_expected);
    assert_eq!(live.events().len() as u64, published_expected);

    // The stuck follower now reads: what it gets and what it is told it lost
    // add up to every event, and match the agent's account of it.
    stuck
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(stuck.try_clone().unwrap());
    let mut text = String::new();
    reader.read_line(&mut text).unwrap();
    assert!(text.starts_with("{\"version\":1,\"ok\":true,"), "{text}");
    let (mut got, mut lost) = (0u64, 0u64);
    let mut reads = 0;
    while got + lost < published_expected && reads < 2 * races {
        text.clear();
        reader.read_line(&mut text).unwrap();
        reads += 1;
        let event: Value = serde_json::from_str(&text).unwrap();
        match event["type"].as_str().unwrap() {
            "lost" => lost += event["events"].as_u64().unwrap(),
            "race" => got += 1,
            other => panic!("unexpected {other}: {text}"),
        }
    }
    assert_eq!(got + lost, published_expected);
    assert!(lost > 0 && got > 0, "got {got}, lost {lost}");
    // The agent counts a line once its write returns, just after the
    // reader may have it.
    let accounted = || {
        let after = bed.status();
        let stuck_after = after["follow"]["followers"][0].clone();
        stuck_after["id"] == stuck_status["id"]
            && stuck_after["lost"] == lost
            && stuck_after["sent"] == got
    };
    assert!(
        wait_for(accounted, Duration::from_secs(2)),
        "{}",
        bed.status()["follow"]
    );
    println!(
        "stuck follower: {got} events written, {lost} lost, of {published_expected} published; \
         live follower: {} events, 0 lost",
        live.events().len()
    );
    // Nothing more is pending for it.
    let mut rest = [0u8; 1];
    stuck
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(stuck.read(&mut rest).is_err(), "more lines pending");
}

/// `podnetctl sysdump` in the node: the archive lists every part, and its
/// content is the kernel's and the agent's own (the pod's exact route, the
/// agent's pins, the CNI log and its rotation, the agent's version).
#[test]
#[allow(clippy::too_many_lines)] // one scenario, step by step
fn sysdump_archives_the_agent_and_the_kernels_view() {
    if !require_root() {
        return;
    }
    let bed = Bed::start("flwdump", &[]);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("cni.log");
    std::fs::write(&log, "ADD shop/a ok\n").unwrap();
    std::fs::write(dir.path().join("cni.log.1"), "ADD shop/b ok\n").unwrap();
    let archive = dir.path().join("dump.tar.gz");
    let node = bed.topo.node().path();
    let out = Command::new("nsenter")
        .arg(format!("--net={}", node.display()))
        .arg(podnetctl())
        .arg("--socket")
        .arg(bed.agent.socket())
        .args(["sysdump", "-f"])
        .arg(&archive)
        .args([
            "--metrics-url",
            &format!("http://{}/metrics", podnet_tests::agent::METRICS_ADDR),
            "--cni-log",
        ])
        .arg(&log)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut members = std::collections::BTreeMap::new();
    let file = std::fs::File::open(&archive).unwrap();
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
    for entry in tar.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().display().to_string();
        let (_, name) = path.split_once('/').unwrap();
        let mut text = String::new();
        entry.read_to_string(&mut text).unwrap();
        members.insert(name.to_owned(), text);
    }
    let names: Vec<&str> = members.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "agent/dns-slow.json",
            "agent/dns-top.json",
            "agent/endpoints.json",
            "agent/ipam.json",
            "agent/metrics.txt",
            "agent/races.json",
            "agent/routes.json",
            "agent/routes.txt",
            "agent/status.json",
            "index.json",
            "kernel/bpffs-pins.txt",
            "kernel/bpftool-net.txt",
            "kernel/bpftool-pins.txt",
            "kernel/conntrack-stats.txt",
            "kernel/ip-link.txt",
            "kernel/ip-neigh.txt",
            "kernel/ip-route.txt",
            "kernel/ip-rule.txt",
            "kernel/nf_conntrack-stat.txt",
            "kernel/tc-filters.txt",
            "logs/cni.log",
            "logs/cni.log.1",
            "uname.txt",
            "versions.json",
        ],
        "{}",
        members["index.json"]
    );
    let index: Value = serde_json::from_str(&members["index.json"]).unwrap();
    assert_eq!(index["failed"], 0, "{index:#}");

    // The pod's route, exactly as the kernel lists it in the node.
    let pod = bed.topo.pod(0);
    let routes = bed
        .topo
        .node()
        .run_ok(&["ip", "route", "show", "table", "main"])
        .unwrap();
    let routes = String::from_utf8_lossy(&routes.stdout).into_owned();
    let pod_route = routes
        .lines()
        .find(|l| l.starts_with(&format!("{} ", pod.ipv4())))
        .unwrap();
    assert!(
        pod_route.contains(&format!("dev {}", pod.host_if())),
        "{pod_route}"
    );
    assert!(pod_route.contains("proto 176"), "{pod_route}");
    assert!(
        members["kernel/ip-route.txt"]
            .lines()
            .any(|l| l == pod_route),
        "{}",
        members["kernel/ip-route.txt"]
    );
    // The agent's endpoints and status are its own answers.
    let endpoints: Value = serde_json::from_str(&members["agent/endpoints.json"]).unwrap();
    assert_eq!(
        endpoints,
        bed.agent.api("endpoint.list", Value::Null).unwrap()
    );
    let status: Value = serde_json::from_str(&members["agent/status.json"]).unwrap();
    assert_eq!(status["bpffs"], json!(bed.agent.bpffs()));
    // Every pin of the agent, and bpftool's view of each.
    let mut pins = Vec::new();
    let mut dirs = vec![bed.agent.bpffs().to_owned()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                dirs.push(e.path());
            } else {
                pins.push(e.path().display().to_string());
            }
        }
    }
    pins.sort();
    let listed: Vec<&str> = members["kernel/bpffs-pins.txt"].lines().collect();
    assert_eq!(listed, pins);
    let shown = &members["kernel/bpftool-pins.txt"];
    assert_eq!(
        shown.lines().filter(|l| l.starts_with("# ")).count(),
        pins.len()
    );
    assert!(!shown.contains("could not show"), "{shown}");
    // The DNS links of each of the three pod interfaces (both directions),
    // each shown by bpftool as a link.
    let mut kinds = std::collections::BTreeMap::new();
    let mut header: Option<&str> = None;
    for line in shown.lines() {
        if let Some(path) = line.strip_prefix("# /") {
            header = Some(path);
        } else if let Some(path) = header.take() {
            let kind = line.split(':').next().unwrap();
            kinds.insert(format!("/{path}"), kind.to_owned());
        }
    }
    assert_eq!(kinds.len(), pins.len(), "{shown}");
    for i in 0..3 {
        let host_if = bed.topo.pod(i).host_if().to_owned();
        let links: Vec<&String> = kinds
            .iter()
            .filter(|(p, _)| p.contains(&format!("/{host_if}@")))
            .map(|(_, k)| k)
            .collect();
        assert_eq!(links, ["link", "link"], "{shown}");
    }
    assert_eq!(members["logs/cni.log"], "ADD shop/a ok\n");
    assert_eq!(members["logs/cni.log.1"], "ADD shop/b ok\n");
    assert!(members["agent/metrics.txt"].contains("\npodnet_build_info{"));
    let versions: Value = serde_json::from_str(&members["versions.json"]).unwrap();
    assert_eq!(versions["agent"], status["version"]);
    assert_eq!(versions["podnetctl"], status["version"]);
    assert!(members["kernel/nf_conntrack-stat.txt"].starts_with("entries"));
}
