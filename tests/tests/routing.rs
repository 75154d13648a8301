//! Native pod routing against a simulated VPC (see `podnet_tests::vpc`): the
//! real agent reconciles rules, routes and proxy-ARP entries through netlink,
//! installs its SNAT chain, and with `--fast-path` steers pod traffic to its
//! ENI in eBPF. Every assertion reads the kernel's own counters: interface
//! packet counts, iptables rule counters, conntrack statistics, and the fast
//! path's per-CPU map behind `podnet_steer_packets_total`.

// Test code: a step that fails fails the test, with the step in the message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use podnet_tests::{
    agent::endpoints_yaml,
    cni::{self, Attachment, CniEnv},
    forward6_rule_packets, forward_rule_packets, in_netns, iptables, require_root, spawn_in,
    udp_echo_server,
    vpc::{link_packets, Vpc, VpcPod, REMOTE, REMOTE6, VPC_CIDR, VPC_CIDR6},
    wait_for, Agent, Metrics, Netns, Topology,
};

/// Objects podnet installs per ENI (subnet and default route in its table).
const PER_ENI: usize = 2;
/// Objects per ENI-owned pod: host route, two rules, one proxy entry.
const PER_POD: usize = 4;
/// Echo requests per measured run.
const PINGS: u32 = 100;
/// Echo requests, 10 ms apart, across an agent restart.
const RESTART_PINGS: u32 = 500;
/// Comment of the counting rule tests add to FORWARD.
const COUNT_COMMENT: &str = "podnet-test-count";

/// The address family a check is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    /// The label value of `podnet_steer_packets_total{family}`, and
    /// conntrack's `-f`.
    fn label(self) -> &'static str {
        match self {
            Self::V4 => "ipv4",
            Self::V6 => "ipv6",
        }
    }

    /// `ip`'s family option.
    fn ip_option(self) -> &'static str {
        match self {
            Self::V4 => "-4",
            Self::V6 => "-6",
        }
    }

    /// The netfilter tool of the family.
    fn iptables(self) -> &'static str {
        match self {
            Self::V4 => "iptables",
            Self::V6 => "ip6tables",
        }
    }

    /// The VPC's remote host in this family.
    fn remote(self) -> IpAddr {
        match self {
            Self::V4 => REMOTE.into(),
            Self::V6 => REMOTE6.into(),
        }
    }

    /// A VPC pod's address of this family.
    fn pod_ip(self, pod: &VpcPod) -> IpAddr {
        match self {
            Self::V4 => pod.ip().into(),
            Self::V6 => pod.ip6().expect("a dual-stack VPC").into(),
        }
    }
}

/// The ENI file of a test; removed on drop.
struct EnisFile(PathBuf);

impl EnisFile {
    fn write(vpc: &Vpc) -> Result<Self> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "podnet-enis-{}-{}.yaml",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, vpc.enis_yaml())?;
        Ok(Self(path))
    }

    fn arg(&self) -> String {
        self.0.to_string_lossy().into_owned()
    }
}

impl Drop for EnisFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Families of `vpc`: 1, or 2 when it is dual-stack.
fn families(vpc: &Vpc) -> usize {
    if vpc.is_dual_stack() {
        2
    } else {
        1
    }
}

fn start(vpc: &Vpc, enis: &EnisFile, extra: &[&str]) -> Result<Agent> {
    let file = enis.arg();
    let cidrs = if vpc.is_dual_stack() {
        format!("{VPC_CIDR},{VPC_CIDR6}")
    } else {
        VPC_CIDR.to_owned()
    };
    let mut args = vec!["--enis", file.as_str(), "--vpc-cidrs", cidrs.as_str()];
    args.extend_from_slice(extra);
    let agent = Agent::start_with(vpc.node(), &vpc.endpoints(), &args)?;
    let expected = (PER_ENI * vpc.enis().len() + PER_POD * vpc.pods().len()) * families(vpc);
    agent.wait_routes_converged(expected)?;
    Ok(agent)
}

/// Pings `dst` from `pod` `count` times, 10 ms apart; returns replies.
fn ping(pod: &Netns, dst: impl Into<IpAddr>, count: u32) -> Result<u32> {
    podnet_tests::ping(pod, dst.into(), count, Duration::from_millis(10))
}

/// Sends `count` UDP datagrams from `src` to `dst` and waits for each echo.
fn udp_ping_pong(pod: &Netns, src: SocketAddr, dst: SocketAddr, count: u32) -> Result<u32> {
    udp_round_trips(pod, src, dst, count, |_| Ok(()))
}

/// An IPv6 destination options header with nothing in it but padding
/// (RFC 8200 4.6: next header and length 0 filled in by the kernel, then
/// `PadN` of 4 bytes).
const EMPTY_DESTINATION_OPTIONS: [u8; 8] = [0, 0, 1, 4, 0, 0, 0, 0];

/// Like [`udp_ping_pong`] from an IPv6 `src`, each datagram carrying an
/// IPv6 extension header (destination options).
fn udp_ping_pong_with_extension_header(
    pod: &Netns,
    src: SocketAddr,
    dst: SocketAddr,
    count: u32,
) -> Result<u32> {
    udp_round_trips(pod, src, dst, count, |socket| {
        use std::os::fd::AsRawFd as _;
        let len = libc::socklen_t::try_from(EMPTY_DESTINATION_OPTIONS.len())?;
        // SAFETY: the socket is open for the call; the option value is a
        // readable buffer of `len` bytes.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_IPV6,
                libc::IPV6_DSTOPTS,
                EMPTY_DESTINATION_OPTIONS.as_ptr().cast(),
                len,
            )
        };
        if rc != 0 {
            bail!("IPV6_DSTOPTS: {}", std::io::Error::last_os_error());
        }
        Ok(())
    })
}

/// Sends `count` UDP datagrams from `src` to `dst` on a socket `setup`
/// prepared, and waits for each echo; returns the echoes.
fn udp_round_trips(
    pod: &Netns,
    src: SocketAddr,
    dst: SocketAddr,
    count: u32,
    setup: impl FnOnce(&UdpSocket) -> Result<()> + Send,
) -> Result<u32> {
    in_netns(pod, || -> Result<u32> {
        let socket = UdpSocket::bind(src)?;
        setup(&socket)?;
        socket.set_read_timeout(Some(Duration::from_secs(1)))?;
        let mut echoed = 0;
        let mut buf = [0u8; 64];
        for i in 0..count {
            socket.send_to(&i.to_be_bytes(), dst)?;
            if socket.recv_from(&mut buf).is_ok() {
                echoed += 1;
            }
        }
        Ok(echoed)
    })?
}

/// Packets of the pod counted by the test's rules in nat PREROUTING and
/// POSTROUTING of `family` (the nat table sees the first packet of every
/// new flow).
fn nat_packets(node: &Netns, family: Family) -> Result<u64> {
    let mut total = 0;
    for chain in ["PREROUTING", "POSTROUTING"] {
        let out = node.run_ok(&[
            family.iptables(),
            "-w",
            "-t",
            "nat",
            "-L",
            chain,
            "-v",
            "-x",
            "-n",
        ])?;
        let text = String::from_utf8_lossy(&out.stdout);
        total += text
            .lines()
            .find(|l| l.contains(COUNT_COMMENT))
            .and_then(|l| l.split_whitespace().next()?.parse::<u64>().ok())
            .with_context(|| format!("no counting rule in nat {chain}:\n{text}"))?;
    }
    Ok(total)
}

/// Conntrack entries whose original source is `pod`, in the node.
fn conntrack_flows(node: &Netns, pod: IpAddr) -> Result<u64> {
    let family = if pod.is_ipv4() { "ipv4" } else { "ipv6" };
    let out = node.run_ok(&["conntrack", "-L", "-f", family, "-s", &pod.to_string()])?;
    Ok(String::from_utf8_lossy(&out.stdout).lines().count() as u64)
}

/// Forgets the node's conntrack entries of `pod` (none may exist).
fn flush_flows(node: &Netns, pod: IpAddr) -> Result<()> {
    let family = if pod.is_ipv4() { "ipv4" } else { "ipv6" };
    node.run(&["conntrack", "-D", "-f", family, "-s", &pod.to_string()])
        .map(drop)
}

/// The fast path's count of `family` (`ipv4`, `ipv6`) packets in
/// `direction` with `result`.
fn steer(m: &Metrics, family: &str, direction: &str, result: &str) -> u64 {
    m.count(
        "podnet_steer_packets_total",
        &[
            ("family", family),
            ("direction", direction),
            ("result", result),
        ],
    )
}

/// The node's kernel state that a forwarded packet would move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Snapshot {
    forward: u64,
    nat: u64,
    conntrack_flows: u64,
    eni1_tx: u64,
    eni2_tx: u64,
    egress_redirected: u64,
    ingress_redirected: u64,
}

/// Asserts that the first pod's `n` packets each way between `before` and
/// `after` were redirected by the fast path in both directions and left by
/// eni1, while netfilter (FORWARD, nat) and conntrack saw none of them.
fn assert_steered_past_the_kernel(before: &Snapshot, after: &Snapshot, n: u64) {
    assert_eq!(
        after.egress_redirected - before.egress_redirected,
        n,
        "{before:?} {after:?}"
    );
    assert_eq!(
        after.ingress_redirected - before.ingress_redirected,
        n,
        "{before:?} {after:?}"
    );
    assert_eq!(after.forward, before.forward, "FORWARD saw steered packets");
    assert_eq!(after.nat, before.nat, "nat saw steered packets");
    assert_eq!(
        (before.conntrack_flows, after.conntrack_flows),
        (0, 0),
        "conntrack saw steered packets"
    );
    assert_eq!(after.eni1_tx - before.eni1_tx, n, "{before:?} {after:?}");
}

/// The node's `family` state that a forwarded packet of the first pod
/// would move.
fn snapshot(vpc: &Vpc, agent: &Agent, family: Family) -> Result<Snapshot> {
    let node = vpc.node();
    let m = agent.metrics(node)?;
    let forward = match family {
        Family::V4 => forward_rule_packets(node, COUNT_COMMENT)?,
        Family::V6 => forward6_rule_packets(node, COUNT_COMMENT)?,
    };
    Ok(Snapshot {
        forward,
        nat: nat_packets(node, family)?,
        conntrack_flows: conntrack_flows(node, family.pod_ip(&vpc.pods()[0]))?,
        eni1_tx: link_packets(node, vpc.enis()[0].name())?.tx,
        eni2_tx: link_packets(node, vpc.enis()[1].name())?.tx,
        egress_redirected: steer(&m, family.label(), "egress", "redirected"),
        ingress_redirected: steer(&m, family.label(), "ingress", "redirected"),
    })
}

/// Counting rules (no target) for packets from `source` in FORWARD and in
/// nat PREROUTING and POSTROUTING of its family.
fn add_counting_rules(node: &Netns, source: IpAddr) -> Result<()> {
    let (src, tool) = match source {
        IpAddr::V4(_) => (format!("{source}/32"), "iptables"),
        IpAddr::V6(_) => (format!("{source}/128"), "ip6tables"),
    };
    for (table, chain) in [
        ("filter", "FORWARD"),
        ("nat", "PREROUTING"),
        ("nat", "POSTROUTING"),
    ] {
        node.run_ok(&[
            tool,
            "-w",
            "-t",
            table,
            "-I",
            chain,
            "1",
            "-s",
            &src,
            "-m",
            "comment",
            "--comment",
            COUNT_COMMENT,
        ])?;
    }
    Ok(())
}

/// Pings once from every pod so neighbour entries exist on every hop.
fn warm_up(vpc: &Vpc) -> Result<()> {
    warm_up_family(vpc, Family::V4)
}

/// Pings from every pod in `family` so neighbour entries of that family
/// exist on every hop (and none of the other, whose reachability probes
/// could land in a measurement).
fn warm_up_family(vpc: &Vpc, family: Family) -> Result<()> {
    for pod in vpc.pods() {
        let got = ping(pod.netns(), family.remote(), 2)?;
        if got != 2 {
            bail!(
                "warm-up ping from {} got {got}/2 replies",
                family.pod_ip(pod)
            );
        }
    }
    Ok(())
}

#[test]
fn pod_traffic_leaves_by_the_eni_that_owns_its_address() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let vpc = Vpc::builder().name("rt-eni").build()?;
    let enis = EnisFile::write(&vpc)?;
    let agent = start(&vpc, &enis, &[])?;
    warm_up(&vpc)?;
    let n_pings = PINGS;
    for (i, pod) in vpc.pods().iter().enumerate() {
        let before = [
            link_packets(vpc.node(), "eni1")?.tx,
            link_packets(vpc.node(), "eni2")?.tx,
        ];
        assert_eq!(ping(pod.netns(), REMOTE, n_pings)?, n_pings);
        let after = [
            link_packets(vpc.node(), "eni1")?.tx,
            link_packets(vpc.node(), "eni2")?.tx,
        ];
        let mut expected = [0, 0];
        expected[pod.eni()] = u64::from(n_pings);
        assert_eq!(
            [after[0] - before[0], after[1] - before[1]],
            expected,
            "pod {i} ({}) must leave by eni{} only",
            pod.ip(),
            pod.eni() + 1
        );
    }
    // SNAT: podnet's chain returns for the VPC and masquerades pods otherwise.
    let chain = iptables(vpc.node(), &["-t", "nat", "-S", "PODNET-SNAT"])?;
    let chain = String::from_utf8_lossy(&chain.stdout).into_owned();
    assert!(
        chain.contains("-A PODNET-SNAT -d 10.0.0.0/16 -j RETURN"),
        "{chain}"
    );
    assert!(
        chain.contains("-A PODNET-SNAT -s 10.0.1.0/24 -j MASQUERADE --random-fully"),
        "{chain}"
    );
    let masq = iptables(
        vpc.node(),
        &["-t", "nat", "-L", "PODNET-SNAT", "-v", "-x", "-n"],
    )?;
    let masq = String::from_utf8_lossy(&masq.stdout).into_owned();
    for line in masq.lines().filter(|l| l.contains("MASQUERADE")) {
        assert_eq!(
            line.split_whitespace().next(),
            Some("0"),
            "VPC traffic was masqueraded: {line}"
        );
    }
    let m = agent.metrics(vpc.node())?;
    assert_eq!(
        m.count("podnet_route_reconciles_total", &[("result", "error")]),
        0
    );
    // Fast path off: the family is declared (dashboards query it) but has
    // no samples.
    assert!(m.has_family("podnet_steer_packets_total"));
    assert!(
        !m.0.lines()
            .any(|l| l.starts_with("podnet_steer_packets_total{")),
        "steer samples without the fast path"
    );
    Ok(())
}

/// The lines `ip <family> <args>` prints in `node`, blanks collapsed.
fn ip_lines(node: &Netns, family: Family, args: &[&str]) -> Result<Vec<String>> {
    let mut cmd = vec!["ip", family.ip_option()];
    cmd.extend_from_slice(args);
    let out = node.run_ok(&cmd)?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect())
}

fn rule_lines(node: &Netns) -> Result<Vec<String>> {
    ip_lines(node, Family::V4, &["rule", "show"])
}

fn route_lines(node: &Netns, table: &str) -> Result<Vec<String>> {
    ip_lines(node, Family::V4, &["route", "show", "table", table])
}

fn proxy_lines(node: &Netns) -> Result<Vec<String>> {
    ip_lines(node, Family::V4, &["neigh", "show", "proxy"])
}

/// Runs `delete` in the node and returns how long until `present` holds again.
fn repair_latency(
    node: &Netns,
    delete: &[&str],
    present: impl Fn() -> Result<bool>,
) -> Result<Duration> {
    assert!(present()?, "object not in place before {delete:?}");
    node.run_ok(delete)?;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        if present()? {
            return Ok(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    bail!("not repaired within 3 s after {delete:?}")
}

/// Deletes each kind of podnet object by hand, measures how long it takes to
/// come back, prints the figures and fails above one second.
fn measure_repairs(node: &Netns, pod: &VpcPod) -> Result<()> {
    let ip = pod.ip().to_string();

    let from_rule = format!("1536: from {ip} lookup 101 proto 176");
    let rule = repair_latency(
        node,
        &[
            "ip", "rule", "del", "priority", "1536", "from", &ip, "lookup", "101",
        ],
        || Ok(rule_lines(node)?.contains(&from_rule)),
    )?;
    let to_rule = format!("512: from all to {ip} lookup main proto 176");
    let rule2 = repair_latency(
        node,
        &[
            "ip", "rule", "del", "priority", "512", "to", &ip, "lookup", "main",
        ],
        || Ok(rule_lines(node)?.contains(&to_rule)),
    )?;
    let default = "default via 10.0.1.1 dev eni1 proto 176".to_owned();
    let route = repair_latency(
        node,
        &["ip", "route", "del", "default", "table", "101"],
        || Ok(route_lines(node, "101")?.contains(&default)),
    )?;
    let host = format!("{ip} dev {} proto 176 scope link", pod.host_if());
    let host_route = repair_latency(
        node,
        &["ip", "route", "del", &ip, "dev", pod.host_if()],
        || Ok(route_lines(node, "main")?.contains(&host)),
    )?;
    let proxy = format!("{ip} dev eni1 proxy");
    let neigh = repair_latency(
        node,
        &["ip", "neigh", "del", "proxy", &ip, "dev", "eni1"],
        || Ok(proxy_lines(node)?.iter().any(|l| l.starts_with(&proxy))),
    )?;
    eprintln!(
        "repair latency: from-rule {rule:?}, to-rule {rule2:?}, ENI default route {route:?}, \
         host route {host_route:?}, proxy entry {neigh:?}"
    );
    for (what, latency) in [
        ("rule", rule),
        ("rule", rule2),
        ("route", route),
        ("route", host_route),
        ("neigh", neigh),
    ] {
        assert!(
            latency < Duration::from_secs(1),
            "{what} took {latency:?} to come back"
        );
    }
    Ok(())
}

/// Foreign state: a rule below podnet's range, one inside it, routes in an
/// ENI table and in main.
fn add_foreign_state(node: &Netns) -> Result<()> {
    podnet_tests::vpc::add_foreign_rules(node)?;
    node.run_ok(&[
        "ip",
        "route",
        "add",
        "10.0.77.0/24",
        "dev",
        "eni1",
        "table",
        "101",
    ])?;
    node.run_ok(&["ip", "route", "add", "192.0.2.0/24", "dev", "eni1"])?;
    Ok(())
}

/// Fails unless every object of [`add_foreign_state`] is still there, unchanged.
fn check_foreign_state(node: &Netns) -> Result<()> {
    let rules = rule_lines(node)?;
    for want in [
        "300: from 10.0.1.99 lookup 101",
        "1000: from all to 10.7.0.0/16 lookup main",
    ] {
        assert!(
            rules.iter().any(|l| l == want),
            "foreign rule {want:?} gone: {rules:#?}"
        );
    }
    for (table, want) in [
        ("101", "10.0.77.0/24 dev eni1 scope link"),
        ("main", "192.0.2.0/24 dev eni1 scope link"),
    ] {
        let routes = route_lines(node, table)?;
        assert!(
            routes.iter().any(|l| l == want),
            "foreign route {want:?} gone: {routes:#?}"
        );
    }
    Ok(())
}

/// Routing passes of each scope so far: (full, changes).
fn passes(agent: &Agent, node: &Netns) -> Result<(u64, u64)> {
    let m = agent.metrics(node)?;
    let count = |scope| {
        m.count(
            "podnet_route_reconcile_duration_seconds_count",
            &[("scope", scope)],
        )
    };
    Ok((count("full"), count("changes")))
}

/// A pod's objects as `ip` prints them: host route, both rules, proxy entry.
fn pod_objects(node: &Netns, pod: &VpcPod, table: u32) -> Result<[bool; 4]> {
    let ip = pod.ip().to_string();
    let rules = rule_lines(node)?;
    Ok([
        route_lines(node, "main")?
            .contains(&format!("{ip} dev {} proto 176 scope link", pod.host_if())),
        rules.contains(&format!("512: from all to {ip} lookup main proto 176")),
        rules.contains(&format!("1536: from {ip} lookup {table} proto 176")),
        proxy_lines(node)?
            .iter()
            .any(|l| l.starts_with(&format!("{ip} dev eni1 proxy"))),
    ])
}

/// Rules, main and ENI table routes and proxy entries of both families, as
/// `ip` prints them, sorted.
fn kernel_state(node: &Netns, table: u32) -> Result<Vec<String>> {
    let table = table.to_string();
    let mut lines = Vec::new();
    for family in [Family::V4, Family::V6] {
        for args in [
            &["rule", "show"][..],
            &["route", "show", "table", "main"],
            &["route", "show", "table", &table],
            &["neigh", "show", "proxy"],
        ] {
            lines.extend(ip_lines(node, family, args)?);
        }
    }
    lines.sort();
    Ok(lines)
}

#[test]
fn a_pod_coming_and_going_is_one_pass_over_its_own_objects() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let vpc = Vpc::builder().name("rt-changes").ipv6(true).build()?;
    let node = vpc.node();
    let enis = EnisFile::write(&vpc)?;
    let agent = start(&vpc, &enis, &[])?;
    let all = vpc.endpoints();
    let (pod, table) = (&vpc.pods()[0], vpc.enis()[0].table());
    let installed = kernel_state(node, table)?;
    let without_pod: Vec<_> = all.iter().skip(1).cloned().collect();
    let per_family = |pods: usize| (PER_ENI * vpc.enis().len() + PER_POD * pods) * families(&vpc);

    // The pod goes: its objects leave the kernel in one pass over changes.
    let (full, changes) = passes(&agent, node)?;
    std::fs::write(agent.endpoints_file(), endpoints_yaml(&without_pod))?;
    agent.wait_routes_converged(per_family(vpc.pods().len() - 1))?;
    assert_eq!(pod_objects(node, pod, table)?, [false; 4]);
    // Its own deletions come back as notifications; they start no pass.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(passes(&agent, node)?, (full, changes + 1));

    // It comes back: the same, the other way.
    std::fs::write(agent.endpoints_file(), endpoints_yaml(&all))?;
    agent.wait_routes_converged(per_family(vpc.pods().len()))?;
    assert_eq!(pod_objects(node, pod, table)?, [true; 4]);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(passes(&agent, node)?, (full, changes + 2));

    // The kernel holds exactly what the first full pass installed.
    assert_eq!(kernel_state(node, table)?, installed);
    let table_text = agent.podnetctl(&["routes"])?;
    assert!(!table_text.contains("missing"), "{table_text}");
    Ok(())
}

#[test]
fn hand_deleted_state_is_repaired_within_a_second_and_foreign_state_survives() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let vpc = Vpc::builder().name("rt-heal").build()?;
    let node = vpc.node();
    add_foreign_state(node)?;
    let check_foreign = || check_foreign_state(node);
    let enis = EnisFile::write(&vpc)?;
    let mut agent = start(&vpc, &enis, &[])?;
    check_foreign()?;
    let pod = &vpc.pods()[0];
    let ip = pod.ip().to_string();
    measure_repairs(node, pod)?;
    let m = agent.metrics(node)?;
    assert_eq!(
        m.count("podnet_route_repairs_total", &[("kind", "rule")]),
        2
    );
    assert_eq!(
        m.count("podnet_route_repairs_total", &[("kind", "route")]),
        2
    );
    assert_eq!(
        m.count("podnet_route_repairs_total", &[("kind", "neigh")]),
        1
    );
    check_foreign()?;

    // An endpoint goes away: its state is removed, nothing foreign is touched.
    let mut endpoints = vpc.endpoints();
    let gone = endpoints.pop().context("two pods")?;
    std::fs::write(agent.endpoints_file(), endpoints_yaml(&endpoints))?;
    agent.wait_routes_converged(PER_ENI * 2 + PER_POD)?;
    let gone_ip = gone.ips[0].to_string();
    assert!(
        !rule_lines(node)?.iter().any(|l| l.contains(&gone_ip)),
        "rules of a removed pod stay"
    );
    check_foreign()?;
    let table = agent.podnetctl(&["routes"])?;
    assert!(
        table.contains(&format!("1536: from {ip} lookup 101")),
        "{table}"
    );
    assert!(!table.contains("missing"), "{table}");

    // A restart adopts everything: no change, no repair (the counter continues from the
    // previous agent's value and does not move), foreign state intact.
    let repairs_before = agent.metrics(node)?.count_sum("podnet_route_repairs_total");
    agent.restart(node)?;
    agent.wait_routes_converged(PER_ENI * 2 + PER_POD)?;
    check_foreign()?;
    let m = agent.metrics(node)?;
    assert_eq!(m.count_sum("podnet_route_repairs_total"), repairs_before);
    Ok(())
}

#[test]
fn fast_path_steers_past_netfilter_and_conntrack() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let vpc = Vpc::builder().name("rt-fast").build()?;
    let enis = EnisFile::write(&vpc)?;
    let agent = start(&vpc, &enis, &["--fast-path"])?;
    let pod = &vpc.pods()[0];
    add_counting_rules(vpc.node(), pod.ip().into())?;
    warm_up(&vpc)?;

    flush_flows(vpc.node(), pod.ip().into())?;
    let before = snapshot(&vpc, &agent, Family::V4)?;
    assert_eq!(ping(pod.netns(), REMOTE, PINGS)?, PINGS);
    let after = snapshot(&vpc, &agent, Family::V4)?;
    let n = u64::from(PINGS);
    assert_steered_past_the_kernel(&before, &after, n);
    assert_eq!(after.eni2_tx, before.eni2_tx);

    let server = udp_echo_server(vpc.vpc(), SocketAddr::from((REMOTE, 7007)))?;
    let src = SocketAddr::from((pod.ip(), 40100));
    let dst = server.addr();
    // One round trip first: the first datagram of the flow is ordinary traffic.
    assert_eq!(udp_ping_pong(pod.netns(), src, dst, 1)?, 1);
    flush_flows(vpc.node(), pod.ip().into())?;
    let before = snapshot(&vpc, &agent, Family::V4)?;
    assert_eq!(udp_ping_pong(pod.netns(), src, dst, PINGS)?, PINGS);
    let after = snapshot(&vpc, &agent, Family::V4)?;
    assert_eq!(server.stop(), u64::from(PINGS) + 1);
    assert_steered_past_the_kernel(&before, &after, n);

    // DNS is never steered: the DNS tracer on the pod's interface must see it.
    let dns = udp_echo_server(vpc.vpc(), SocketAddr::from((REMOTE, 53)))?;
    let before = snapshot(&vpc, &agent, Family::V4)?;
    assert_eq!(
        udp_ping_pong(
            pod.netns(),
            SocketAddr::from((pod.ip(), 40200)),
            dns.addr(),
            10
        )?,
        10
    );
    let after = snapshot(&vpc, &agent, Family::V4)?;
    assert_eq!(dns.stop(), 10);
    assert_eq!(after.egress_redirected, before.egress_redirected);
    assert_eq!(after.ingress_redirected, before.ingress_redirected);
    assert_eq!(after.forward - before.forward, 10);

    let m = agent.metrics(vpc.node())?;
    assert_eq!(steer(&m, "ipv4", "egress", "fib_miss"), 0);
    // Every redirect the helpers were asked for was set up.
    assert_eq!(steer(&m, "ipv4", "egress", "redirect_failed"), 0);
    assert_eq!(steer(&m, "ipv4", "ingress", "redirect_failed"), 0);
    let view = agent.podnetctl(&["routes"])?;
    assert!(view.contains("fast-path: on"), "{view}");
    Ok(())
}

#[test]
fn without_fast_path_the_kernel_path_carries_the_same_traffic() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let vpc = Vpc::builder().name("rt-kern").build()?;
    let enis = EnisFile::write(&vpc)?;
    let agent = start(&vpc, &enis, &[])?;
    let pod = &vpc.pods()[0];
    add_counting_rules(vpc.node(), pod.ip().into())?;
    warm_up(&vpc)?;
    flush_flows(vpc.node(), pod.ip().into())?;
    let before = snapshot(&vpc, &agent, Family::V4)?;
    assert_eq!(ping(pod.netns(), REMOTE, PINGS)?, PINGS);
    let after = snapshot(&vpc, &agent, Family::V4)?;
    let n = u64::from(PINGS);
    assert_eq!(after.forward - before.forward, n);
    // One new flow: its first packet passes nat PREROUTING and POSTROUTING.
    assert_eq!(after.nat - before.nat, 2);
    assert_eq!((before.conntrack_flows, after.conntrack_flows), (0, 1));
    assert_eq!(
        (
            after.eni1_tx - before.eni1_tx,
            after.eni2_tx - before.eni2_tx
        ),
        (n, 0)
    );
    assert_eq!((after.egress_redirected, after.ingress_redirected), (0, 0));
    assert!(!agent.bpffs().join("steer").exists());
    Ok(())
}

#[test]
fn agent_restart_loses_no_steered_ping() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let vpc = Vpc::builder().name("rt-rst").enis(2).build()?;
    let enis = EnisFile::write(&vpc)?;
    let mut agent = start(&vpc, &enis, &["--fast-path"])?;
    let pod = &vpc.pods()[0];
    add_counting_rules(vpc.node(), pod.ip().into())?;
    warm_up(&vpc)?;
    let before = snapshot(&vpc, &agent, Family::V4)?;
    let mut ping = spawn_in(
        pod.netns(),
        &[
            "ping",
            "-n",
            "-q",
            "-c",
            &RESTART_PINGS.to_string(),
            "-i",
            "0.01",
            "-W",
            "1",
            &REMOTE.to_string(),
        ],
    )?;
    std::thread::sleep(Duration::from_millis(1500));
    let restart = Instant::now();
    agent.restart(vpc.node())?;
    eprintln!(
        "agent restarted in {:?} during the ping run",
        restart.elapsed()
    );
    let done = wait_for(
        || ping.try_wait().is_ok_and(|s| s.is_some()),
        Duration::from_secs(30),
    );
    assert!(done, "ping did not finish");
    let log = ping.log();
    assert_eq!(
        podnet_tests::ping_received(&log),
        Some(RESTART_PINGS),
        "{log}"
    );
    let after = snapshot(&vpc, &agent, Family::V4)?;
    // Pinned maps keep counting across the restart: every echo was steered.
    assert_eq!(
        after.egress_redirected - before.egress_redirected,
        u64::from(RESTART_PINGS)
    );
    assert_eq!(
        after.ingress_redirected - before.ingress_redirected,
        u64::from(RESTART_PINGS)
    );
    assert_eq!(after.forward, before.forward);
    Ok(())
}

#[test]
fn fast_path_leaves_service_cidrs_and_local_pods_to_the_kernel() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let vpc = Vpc::builder().name("rt-svc").build()?;
    let enis = EnisFile::write(&vpc)?;
    // The remote host's range plays a service CIDR inside the VPC.
    let agent = start(
        &vpc,
        &enis,
        &["--fast-path", "--service-cidrs", "10.0.200.0/24"],
    )?;
    let (pod, other) = (&vpc.pods()[0], &vpc.pods()[1]);
    add_counting_rules(vpc.node(), pod.ip().into())?;
    warm_up(&vpc)?;
    for (dst, what) in [(REMOTE, "service CIDR"), (other.ip(), "local pod")] {
        let before = snapshot(&vpc, &agent, Family::V4)?;
        assert_eq!(ping(pod.netns(), dst, PINGS)?, PINGS);
        let after = snapshot(&vpc, &agent, Family::V4)?;
        assert_eq!(
            after.forward - before.forward,
            u64::from(PINGS),
            "{what}: the kernel forwards"
        );
        assert_eq!(
            after.egress_redirected, before.egress_redirected,
            "{what}: nothing steered"
        );
    }
    Ok(())
}

/// Lines of the nat table's rules (`iptables -t nat -S`).
fn nat_rules(node: &Netns) -> Result<Vec<String>> {
    let out = iptables(node, &["-t", "nat", "-S"])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect())
}

#[test]
fn snat_off_removes_only_podnets_chain() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let vpc = Vpc::builder().name("rt-snat").enis(1).build()?;
    let node = vpc.node();
    let foreign = "-A POSTROUTING -s 10.9.9.9/32 -j MASQUERADE";
    iptables(
        node,
        &[
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-s",
            "10.9.9.9",
            "-j",
            "MASQUERADE",
        ],
    )?;
    let enis = EnisFile::write(&vpc)?;
    let mut agent = start(&vpc, &enis, &[])?;
    let rules = nat_rules(node)?;
    let jumps = rules
        .iter()
        .filter(|l| l.starts_with("-A POSTROUTING") && l.ends_with("-j PODNET-SNAT"))
        .count();
    assert_eq!(jumps, 1, "{rules:#?}");
    // A second start changes nothing: every rule is checked before it is added.
    agent.restart(node)?;
    agent.wait_routes_converged(PER_ENI + PER_POD)?;
    assert_eq!(nat_rules(node)?, rules);
    agent.stop()?;
    drop(agent);

    let _agent = start(&vpc, &enis, &["--snat=false"])?;
    let after = nat_rules(node)?;
    assert!(
        !after.iter().any(|l| l.contains("PODNET-SNAT")),
        "{after:#?}"
    );
    assert!(after.iter().any(|l| l == foreign), "{after:#?}");
    Ok(())
}

/// `MASQUERADE` packets of podnet's chain in `binary`'s nat table.
fn masquerade_packets(node: &Netns, binary: &str) -> Result<u64> {
    let out = node.run_ok(&[
        binary,
        "-w",
        "-t",
        "nat",
        "-L",
        "PODNET-SNAT",
        "-v",
        "-x",
        "-n",
    ])?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find(|l| l.contains("MASQUERADE"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no MASQUERADE rule in {binary}'s chain:\n{text}"))
}

/// Source-NATed flows conntrack holds for `family` (`ipv4`, `ipv6`).
fn snat_flows(node: &Netns, family: &str) -> Result<usize> {
    let out = node.run(&["conntrack", "-L", "-f", family, "--src-nat"])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count())
}

#[test]
fn dual_stack_pods_are_masqueraded_in_both_families() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let topo = podnet_tests::Topology::builder()
        .name("rt6snat")
        .pods(1)
        .build()?;
    let node = topo.node();
    let pod = topo.pod(0);
    let endpoints = [podnet_tests::EndpointSpec::new(
        "web",
        "frontend",
        &[pod.ipv4().into(), pod.ipv6().into()],
    )
    .interface(pod.host_if())];
    // The pods' own networks are the "VPC": only the server is outside.
    let mut agent = Agent::start_with(
        node,
        &endpoints,
        &[
            "--snat=true",
            "--vpc-cidrs",
            &format!("{},{}", topo.pods_cidr_v4(), topo.pods_cidr_v6()),
        ],
    )?;
    let v6_rule = format!(
        "-A PODNET-SNAT -s {}/128 -j MASQUERADE --random-fully",
        pod.ipv6()
    );
    let in_place = wait_for(
        || {
            node.run_ok(&["ip6tables", "-w", "-t", "nat", "-S", "PODNET-SNAT"])
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&v6_rule))
        },
        Duration::from_secs(10),
    );
    assert!(in_place, "no `{v6_rule}`: {}", agent.log());
    let v6_chain = String::from_utf8_lossy(
        &node
            .run_ok(&["ip6tables", "-w", "-t", "nat", "-S", "PODNET-SNAT"])?
            .stdout,
    )
    .into_owned();
    assert!(
        v6_chain.contains(&format!(
            "-A PODNET-SNAT -d {} -j RETURN",
            topo.pods_cidr_v6()
        )),
        "{v6_chain}"
    );
    let v6_jump = String::from_utf8_lossy(
        &node
            .run_ok(&["ip6tables", "-w", "-t", "nat", "-S", "POSTROUTING"])?
            .stdout,
    )
    .lines()
    .filter(|l| l.ends_with("-j PODNET-SNAT"))
    .count();
    assert_eq!(v6_jump, 1);

    // One ping flow per family to the server: each is masqueraded once, to
    // the node's address towards the server, and every echo is answered.
    for (family, binary, dst) in [
        ("ipv4", "iptables", IpAddr::from(topo.server_ipv4())),
        ("ipv6", "ip6tables", IpAddr::from(topo.server_ipv6())),
    ] {
        let before = masquerade_packets(node, binary)?;
        assert_eq!(
            podnet_tests::ping(pod.netns(), dst, 3, Duration::from_millis(200))?,
            3,
            "{family}"
        );
        assert_eq!(masquerade_packets(node, binary)? - before, 1, "{family}");
        assert_eq!(snat_flows(node, family)?, 1, "{family}");
    }
    let flows = String::from_utf8_lossy(
        &node
            .run(&["conntrack", "-L", "-f", "ipv6", "--src-nat"])?
            .stdout,
    )
    .into_owned();
    assert!(
        flows.contains(&format!("dst={}", topo.node_ipv6_to_server())),
        "the reply goes to the node's address: {flows}"
    );
    agent.stop()?;
    drop(agent);

    // SNAT off: both families' chains and jumps go (at the agent's first
    // routing pass).
    let _agent = Agent::start_with(node, &endpoints, &["--snat=false"])?;
    let rules = |binary: &str| {
        node.run_ok(&[binary, "-w", "-t", "nat", "-S"])
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let gone = wait_for(
        || {
            ["iptables", "ip6tables"]
                .iter()
                .all(|b| !rules(b).contains("PODNET-SNAT"))
        },
        Duration::from_secs(10),
    );
    assert!(gone, "{}\n{}", rules("iptables"), rules("ip6tables"));
    Ok(())
}

/// Lines of `lines` that mention `ip` as a whole word.
fn mentioning(lines: &[String], ip: impl std::fmt::Display) -> Vec<String> {
    let ip = ip.to_string();
    lines
        .iter()
        .filter(|l| l.split(' ').any(|w| w == ip))
        .cloned()
        .collect()
}

/// Addresses of `family` in a CNI result.
fn result_ip(result: &serde_json::Value, ipv6: bool) -> Result<IpAddr> {
    result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str()?.split('/').next()?.parse().ok())
        .find(|ip: &IpAddr| ip.is_ipv6() == ipv6)
        .with_context(|| {
            format!(
                "no {} address in {result}",
                if ipv6 { "IPv6" } else { "IPv4" }
            )
        })
}

#[test]
#[allow(clippy::too_many_lines)] // one scenario, step by step
fn dual_stack_pods_of_the_shipped_chain_are_routed_in_both_families() -> Result<()> {
    if !cni::ready() {
        return Ok(());
    }
    let topo = Topology::builder().name("rt6cni").pods(0).build()?;
    let node = topo.node();
    let agent = Agent::start_with(
        node,
        &[],
        &["--node-cidr", "10.244.9.0/24,fd00:244:9::/120"],
    )?;
    let env = CniEnv::new()?;
    let list = env.ptp_chain("podnet-ptp", &agent.socket())?;
    let pods = [Netns::new("rt6cnipod")?, Netns::new("rt6cnipod")?];
    let atts: Vec<Attachment> = pods
        .iter()
        .enumerate()
        .map(|(i, ns)| Attachment::pod(&format!("ctr6{i}"), ns, "shop", &format!("cart-{i}")))
        .collect();
    let mut addrs = Vec::new();
    for att in &atts {
        let result = env.run(node, "ADD", &list, att, None)?.json()?;
        addrs.push((result_ip(&result, false)?, result_ip(&result, true)?));
    }
    assert_eq!(
        addrs,
        [
            ("10.244.9.2".parse()?, "fd00:244:9::2".parse()?),
            ("10.244.9.3".parse()?, "fd00:244:9::3".parse()?)
        ]
    );
    let endpoints = agent.api("endpoint.list", serde_json::Value::Null)?;
    let host_if = |container: &str| -> Result<String> {
        endpoints
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["containerId"] == container)
            .and_then(|e| e["interface"].as_str())
            .map(str::to_owned)
            .with_context(|| format!("no endpoint {container}: {endpoints}"))
    };
    let ifs = [host_if("ctr60")?, host_if("ctr61")?];
    // One host route per pod and family, which ptp installed first: podnet
    // finds them forwarding as it wants (`provided`), nothing to add.
    agent.wait_routes_converged(2 * 2)?;
    for ((v4, v6), ifname) in addrs.iter().zip(&ifs) {
        let main4 = ip_lines(node, Family::V4, &["route", "show", "table", "main"])?;
        assert_eq!(
            mentioning(&main4, v4),
            [format!("{v4} dev {ifname} scope host")]
        );
        let main6 = ip_lines(node, Family::V6, &["route", "show", "table", "main"])?;
        assert_eq!(
            mentioning(&main6, v6),
            [format!("{v6} dev {ifname} metric 1024 pref medium")]
        );
    }
    let view = agent.podnetctl(&["routes"])?;
    let v6_line = format!("{} dev {} table main", addrs[0].1, ifs[0]);
    assert!(
        view.lines()
            .any(|l| l.contains("provided") && l.contains(&v6_line)),
        "{view}"
    );

    // The IPv6 host route deleted by hand: podnet installs its own.
    let (pod0_v6, pod1_v6) = (addrs[0].1.to_string(), addrs[1].1.to_string());
    node.run_ok(&["ip", "-6", "route", "del", &pod0_v6, "dev", &ifs[0]])?;
    let ours = format!("{pod0_v6} dev {} proto 176 metric 1024 pref medium", ifs[0]);
    let back = wait_for(
        || {
            ip_lines(node, Family::V6, &["route", "show", "table", "main"])
                .is_ok_and(|l| mentioning(&l, &pod0_v6) == [ours.clone()])
        },
        Duration::from_secs(1),
    );
    assert!(back, "no `{ours}`: {}", agent.log());
    let m = agent.metrics(node)?;
    assert_eq!(
        m.count("podnet_route_repairs_total", &[("kind", "route")]),
        1
    );

    // IPv6 both ways between the pods, every echo forwarded by the node.
    node.run_ok(&[
        "ip6tables",
        "-w",
        "-I",
        "FORWARD",
        "-m",
        "comment",
        "--comment",
        COUNT_COMMENT,
    ])?;
    for (from, to) in [(&pods[0], &pod1_v6), (&pods[1], &pod0_v6)] {
        let before = forward6_rule_packets(node, COUNT_COMMENT)?;
        assert_eq!(ping(from, to.parse::<IpAddr>()?, PINGS)?, PINGS, "to {to}");
        // Each echo request and its reply cross the node.
        assert_eq!(
            forward6_rule_packets(node, COUNT_COMMENT)? - before,
            2 * u64::from(PINGS),
            "to {to}"
        );
    }

    // A pod deleted through the chain takes its routes of both families.
    env.run(node, "DEL", &list, &atts[1], None)?;
    agent.wait_routes_converged(2)?;
    let main4 = ip_lines(node, Family::V4, &["route", "show", "table", "main"])?;
    let main6 = ip_lines(node, Family::V6, &["route", "show", "table", "main"])?;
    assert_eq!(mentioning(&main4, addrs[1].0), Vec::<String>::new());
    assert_eq!(mentioning(&main6, &pod1_v6), Vec::<String>::new());
    assert_eq!(mentioning(&main6, &pod0_v6), std::slice::from_ref(&ours));
    env.run(node, "DEL", &list, &atts[0], None)?;
    agent.wait_routes_converged(0)?;
    let podnets = ip_lines(node, Family::V6, &["route", "show", "proto", "176"])?;
    assert_eq!(podnets, Vec::<String>::new());
    Ok(())
}

/// The dual-stack VPC's pods' IPv6 rules, ENI tables and proxy entries, as
/// `ip -6` prints them.
fn ipv6_state(vpc: &Vpc) -> Result<(Vec<String>, Vec<String>, Vec<String>)> {
    let node = vpc.node();
    let rules = ip_lines(node, Family::V6, &["rule", "show"])?;
    let mut tables = Vec::new();
    for eni in vpc.enis() {
        let table = eni.table().to_string();
        let mut lines = ip_lines(node, Family::V6, &["route", "show", "table", &table])?;
        lines.sort();
        tables.extend(lines.into_iter().map(|l| format!("{table}: {l}")));
    }
    let mut proxies = ip_lines(node, Family::V6, &["neigh", "show", "proxy"])?;
    proxies.sort();
    Ok((rules, tables, proxies))
}

#[test]
#[allow(clippy::too_many_lines)] // one scenario, step by step
fn ipv6_pods_get_rules_proxy_ndp_and_eni_tables_and_leave_by_their_eni() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let vpc = Vpc::builder().name("rt6eni").ipv6(true).build()?;
    let node = vpc.node();
    let enis = EnisFile::write(&vpc)?;
    let mut agent = start(&vpc, &enis, &[])?;
    let p: Vec<String> = vpc
        .pods()
        .iter()
        .map(|p| Family::V6.pod_ip(p).to_string())
        .collect();
    let (rules, tables, proxies) = ipv6_state(&vpc)?;
    assert_eq!(
        rules,
        [
            "0: from all lookup local".to_owned(),
            format!("512: from all to {} lookup main proto 176", p[0]),
            format!("512: from all to {} lookup main proto 176", p[1]),
            format!("1536: from {} lookup 101 proto 176", p[0]),
            format!("1536: from {} lookup 102 proto 176", p[1]),
            "32766: from all lookup main".to_owned(),
        ]
    );
    assert_eq!(
        tables,
        [
            "101: default via fd00:10:0:1::1 dev eni1 proto 176 metric 1024 pref medium",
            "101: fd00:10:0:1::/64 dev eni1 proto 176 metric 1024 pref medium",
            "102: default via fd00:10:0:2::1 dev eni2 proto 176 metric 1024 pref medium",
            "102: fd00:10:0:2::/64 dev eni2 proto 176 metric 1024 pref medium",
        ]
    );
    assert_eq!(
        proxies,
        [
            format!("{} dev eni1 proxy proto 176", p[0]),
            format!("{} dev eni2 proxy proto 176", p[1])
        ]
    );
    let main6 = ip_lines(node, Family::V6, &["route", "show", "table", "main"])?;
    for (pod, ip) in vpc.pods().iter().zip(&p) {
        assert_eq!(
            mentioning(&main6, ip),
            [format!(
                "{ip} dev {} proto 176 metric 1024 pref medium",
                pod.host_if()
            )]
        );
    }
    // The proxy entries answer only with proxy NDP on, which podnet set.
    for ifname in ["all", "eni1", "eni2"] {
        let path = format!("net.ipv6.conf.{ifname}.proxy_ndp");
        let out = node.run_ok(&["sysctl", "-n", &path])?;
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1", "{path}");
    }

    // Each pod's IPv6 packets leave by its own ENI only.
    warm_up_family(&vpc, Family::V6)?;
    for pod in vpc.pods() {
        let before = [
            link_packets(node, "eni1")?.tx,
            link_packets(node, "eni2")?.tx,
        ];
        assert_eq!(ping(pod.netns(), REMOTE6, PINGS)?, PINGS);
        let after = [
            link_packets(node, "eni1")?.tx,
            link_packets(node, "eni2")?.tx,
        ];
        let mut expected = [0, 0];
        expected[pod.eni()] = u64::from(PINGS);
        assert_eq!(
            [after[0] - before[0], after[1] - before[1]],
            expected,
            "pod {} must leave by eni{} only",
            Family::V6.pod_ip(pod),
            pod.eni() + 1
        );
    }
    let view = agent.podnetctl(&["routes"])?;
    for want in [
        format!("1536: from {} lookup 101", p[0]),
        format!("proxy {} dev eni1", p[0]),
        "default via fd00:10:0:1::1 dev eni1 table 101".to_owned(),
    ] {
        assert!(view.contains(&want), "no `{want}`: {view}");
    }

    // A pod goes: exactly its IPv6 rules, proxy entry and host route go.
    let mut endpoints = vpc.endpoints();
    endpoints.pop();
    std::fs::write(agent.endpoints_file(), endpoints_yaml(&endpoints))?;
    agent.wait_routes_converged((PER_ENI * 2 + PER_POD) * 2)?;
    let (rules_after, tables_after, proxies_after) = ipv6_state(&vpc)?;
    let without_pod1 = |lines: &[String]| -> Vec<String> {
        lines
            .iter()
            .filter(|l| mentioning(&[(*l).clone()], &p[1]).is_empty())
            .cloned()
            .collect()
    };
    assert_eq!(rules_after, without_pod1(&rules));
    assert_eq!(rules_after.len(), rules.len() - 2);
    assert_eq!(tables_after, tables);
    assert_eq!(
        proxies_after,
        [format!("{} dev eni1 proxy proto 176", p[0])]
    );
    let main6 = ip_lines(node, Family::V6, &["route", "show", "table", "main"])?;
    assert_eq!(mentioning(&main6, &p[1]), Vec::<String>::new());
    assert_eq!(mentioning(&main6, &p[0]).len(), 1);
    let m = agent.metrics(node)?;
    assert_eq!(
        m.count("podnet_route_reconciles_total", &[("result", "error")]),
        0
    );
    agent.stop()?;
    Ok(())
}

#[test]
#[allow(clippy::too_many_lines)] // one scenario, step by step
fn fast_path_steers_ipv6_past_netfilter_and_conntrack() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let vpc = Vpc::builder().name("rt6fast").ipv6(true).build()?;
    let enis = EnisFile::write(&vpc)?;
    let agent = start(&vpc, &enis, &["--fast-path"])?;
    let pod = &vpc.pods()[0];
    let pod_ip = Family::V6.pod_ip(pod);
    add_counting_rules(vpc.node(), pod_ip)?;
    warm_up_family(&vpc, Family::V6)?;
    let n = u64::from(PINGS);

    flush_flows(vpc.node(), pod_ip)?;
    let ipv4_counts =
        |m: &Metrics| ["egress", "ingress"].map(|dir| steer(m, "ipv4", dir, "redirected"));
    let before4 = ipv4_counts(&agent.metrics(vpc.node())?);
    let before = snapshot(&vpc, &agent, Family::V6)?;
    assert_eq!(ping(pod.netns(), REMOTE6, PINGS)?, PINGS);
    let after = snapshot(&vpc, &agent, Family::V6)?;
    let after4 = ipv4_counts(&agent.metrics(vpc.node())?);
    assert_steered_past_the_kernel(&before, &after, n);
    assert_eq!(after.eni2_tx, before.eni2_tx);
    // IPv4's counters did not move.
    assert_eq!(after4, before4);

    let server = udp_echo_server(vpc.vpc(), SocketAddr::from((REMOTE6, 7007)))?;
    let src = SocketAddr::from((pod_ip, 40100));
    let dst = server.addr();
    // One round trip first: the first datagram of the flow is ordinary traffic.
    assert_eq!(udp_ping_pong(pod.netns(), src, dst, 1)?, 1);
    flush_flows(vpc.node(), pod_ip)?;
    let before = snapshot(&vpc, &agent, Family::V6)?;
    assert_eq!(udp_ping_pong(pod.netns(), src, dst, PINGS)?, PINGS);
    let after = snapshot(&vpc, &agent, Family::V6)?;
    assert_eq!(server.stop(), n + 1);
    assert_steered_past_the_kernel(&before, &after, n);

    // DNS is never steered.
    let dns = udp_echo_server(vpc.vpc(), SocketAddr::from((REMOTE6, 53)))?;
    let before = snapshot(&vpc, &agent, Family::V6)?;
    assert_eq!(
        udp_ping_pong(
            pod.netns(),
            SocketAddr::from((pod_ip, 40200)),
            dns.addr(),
            10
        )?,
        10
    );
    let after = snapshot(&vpc, &agent, Family::V6)?;
    assert_eq!(dns.stop(), 10);
    assert_eq!(after.egress_redirected, before.egress_redirected);
    assert_eq!(after.ingress_redirected, before.ingress_redirected);
    assert_eq!(after.forward - before.forward, 10);

    // Extension headers are the kernel's: it forwards each datagram (the
    // FORWARD rule counts it) and the program counts it; the echoes, which
    // carry none, are steered.
    let server = udp_echo_server(vpc.vpc(), SocketAddr::from((REMOTE6, 7008)))?;
    let src = SocketAddr::from((pod_ip, 40300));
    let before_ext = steer(
        &agent.metrics(vpc.node())?,
        "ipv6",
        "egress",
        "extension_headers",
    );
    let before = snapshot(&vpc, &agent, Family::V6)?;
    assert_eq!(
        udp_ping_pong_with_extension_header(pod.netns(), src, server.addr(), PINGS)?,
        PINGS
    );
    let after = snapshot(&vpc, &agent, Family::V6)?;
    let after_ext = steer(
        &agent.metrics(vpc.node())?,
        "ipv6",
        "egress",
        "extension_headers",
    );
    assert_eq!(server.stop(), n);
    assert_eq!(after_ext - before_ext, n);
    assert_eq!(after.forward - before.forward, n);
    assert_eq!(after.egress_redirected, before.egress_redirected);
    assert_eq!(after.ingress_redirected - before.ingress_redirected, n);
    assert_eq!(after.eni1_tx - before.eni1_tx, n);

    // Neighbour discovery stays the kernel's: the gateway forgets the pod,
    // solicits it again, and the node's proxy entry answers; every echo
    // still comes back.
    vpc.vpc()
        .run_ok(&["ip", "-6", "neigh", "flush", "dev", "gw1"])?;
    let before = snapshot(&vpc, &agent, Family::V6)?;
    assert_eq!(ping(pod.netns(), REMOTE6, PINGS)?, PINGS);
    let after = snapshot(&vpc, &agent, Family::V6)?;
    assert_eq!(after.egress_redirected - before.egress_redirected, n);
    assert_eq!(after.ingress_redirected - before.ingress_redirected, n);

    let m = agent.metrics(vpc.node())?;
    assert_eq!(steer(&m, "ipv6", "egress", "fib_miss"), 0);
    assert_eq!(steer(&m, "ipv6", "egress", "redirect_failed"), 0);
    assert_eq!(steer(&m, "ipv6", "ingress", "redirect_failed"), 0);
    assert_eq!(steer(&m, "ipv6", "egress", "extension_headers"), n);
    assert_eq!(steer(&m, "ipv6", "ingress", "extension_headers"), 0);
    Ok(())
}
