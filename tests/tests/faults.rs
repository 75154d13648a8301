//! Faults under a real agent: the cloud API throttles, netlink refuses
//! changes, bpffs is missing or goes away, the race event ring buffer fills
//! up, the state directory's disk is full. For each: a clear error (log line,
//! metric, API view or CNI error naming the cause), no crash (the agent's PID
//! stays), and full service once the fault clears, checked with exact numbers
//! from the kernel's or the agent's own view.
//!
//! `PODNET_SOAK=1` runs longer variants (more throttled calls, more events
//! while the consumer is stopped).

// Test code: a step that fails fails the test, with the step in the message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _, Result};
use podnet_tests::{
    agent::{binary, http_get},
    cloud::{moto_available, Ec2World, ThrottleProxy},
    cni, conntrack_stats, require_root, spawn_in_with_env, udp_send,
    vpc::{Vpc, VPC_CIDR},
    wait_for, Agent, EndpointSpec, Metrics, Netns, Topology,
};
use serde_json::{json, Value};

/// Whether to run the long variants.
fn soak() -> bool {
    std::env::var("PODNET_SOAK").as_deref() == Ok("1")
}

/// Whether `pid` is alive and not a zombie (`/proc/<pid>/stat` state).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

fn agent_pid(agent: &Agent) -> Result<u32> {
    agent.pid().context("agent not running")
}

/// Asserts the agent still runs with the PID it started with.
fn assert_same_process(agent: &Agent, pid: u32) {
    assert_eq!(agent.pid(), Some(pid), "agent was replaced");
    assert!(alive(pid), "agent {pid} died:\n{}", agent.log());
}

fn signal(pid: u32, sig: libc::c_int) -> Result<()> {
    let pid = libc::pid_t::try_from(pid)?;
    // SAFETY: plain syscall on a child this test started and has not reaped.
    let rc = unsafe { libc::kill(pid, sig) };
    ensure!(rc == 0, "kill: {}", std::io::Error::last_os_error());
    Ok(())
}

/// A filesystem mounted for one test; unmounted (lazily if busy) and its
/// directory removed on drop.
struct Mount {
    dir: PathBuf,
    _holder: tempfile::TempDir,
}

impl Mount {
    fn new(fstype: &str, options: Option<&str>) -> Result<Self> {
        let holder = tempfile::Builder::new().prefix("podnet-fault-").tempdir()?;
        let dir = holder.path().join("mnt");
        std::fs::create_dir(&dir)?;
        let d = dir.to_string_lossy().into_owned();
        let mut cmd = vec!["mount", "-t", fstype];
        if let Some(o) = options {
            cmd.extend(["-o", o]);
        }
        cmd.extend([fstype, d.as_str()]);
        run_host(&cmd)?;
        Ok(Self {
            dir,
            _holder: holder,
        })
    }

    fn path(&self) -> &Path {
        &self.dir
    }

    fn unmount(&self) -> Result<()> {
        run_host(&["umount", &self.dir.to_string_lossy()])
    }

    fn mounted(&self) -> bool {
        is_mount_point(&self.dir)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.mounted() {
            let d = self.dir.to_string_lossy().into_owned();
            if run_host(&["umount", &d]).is_err() {
                let _ = run_host(&["umount", "-l", &d]);
            }
        }
    }
}

/// Whether something is mounted exactly at `dir` (`/proc/self/mountinfo`).
fn is_mount_point(dir: &Path) -> bool {
    let want = dir.to_string_lossy();
    std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|t| {
        t.lines()
            .any(|l| l.split_whitespace().nth(4) == Some(want.as_ref()))
    })
}

fn run_host(cmd: &[&str]) -> Result<()> {
    let out = std::process::Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .with_context(|| format!("starting {}", cmd.join(" ")))?;
    ensure!(
        out.status.success(),
        "`{}` failed: {}",
        cmd.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// 1. Cloud API throttling (ENI mode)

const CALLS: &str = "podnet_cloud_api_calls_total";
const MOTO_PORT: u16 = 5000;

fn throttled_total(m: &Metrics) -> u64 {
    m.0.lines()
        .filter(|l| l.starts_with(CALLS) && l.contains("result=\"throttled\""))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
        .sum()
}

/// EC2 answers N calls with `RequestLimitExceeded`: the agent backs off
/// 1 s, 2 s, 4 s, ... between attempts (spacing measured at the proxy), counts
/// each as `result="throttled"`, keeps handing out warm addresses, and refills
/// the pool once the API answers again.
#[test]
#[allow(clippy::too_many_lines)] // one scenario, step by step
fn cloud_throttling_backs_off_serves_the_warm_pool_and_recovers() -> Result<()> {
    if !require_root() || !moto_available() {
        return Ok(());
    }
    let throttles: u32 = if soak() { 6 } else { 3 };
    let w = Ec2World::new(MOTO_PORT, "fthr")?;
    let (node, moto, instance) = (&w.node, &w.moto, &w.instance);
    let proxy = ThrottleProxy::start(node, moto.port())?;
    let (cloud, imds_ep) = (proxy.endpoint(), w.imds.endpoint());
    let agent = Agent::start_with(
        node,
        &[],
        &[
            "--ipam-mode",
            "eni",
            "--warm-ip-target",
            "5",
            "--cloud-endpoint",
            &cloud,
            "--imds-endpoint",
            &imds_ep,
        ],
    )?;
    let pid = agent_pid(&agent)?;
    let plugged = |timeout: Duration, cond: &dyn Fn() -> bool| -> Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            moto.plug_links(node, instance)?;
            if cond() {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    ensure!(
        plugged(Duration::from_secs(30), &|| agent.ipam_free() == 5)?,
        "pool never reached 5 free\n{}",
        agent.log()
    );
    // Let the agent settle (a round with no change), then throttle.
    std::thread::sleep(Duration::from_secs(1));
    let before = proxy.calls().len();
    let m0 = agent.metrics(node)?;
    assert_eq!(throttled_total(&m0), 0);
    proxy.throttle_next(throttles);

    // A pod takes a warm address: it wakes the ENI thread, whose calls are throttled.
    let t0 = Instant::now();
    let mut pods = vec![agent.ipam_allocate("c1")?];
    let served_first = t0.elapsed();
    let throttling = wait_for(
        || proxy.throttle_left() < throttles,
        Duration::from_secs(10),
    );
    ensure!(throttling, "no call after the allocation\n{}", agent.log());
    // While throttled, pods still get addresses from the warm pool, at once.
    for c in ["c2", "c3"] {
        let t = Instant::now();
        pods.push(agent.ipam_allocate(c)?);
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "{c} waited for the cloud"
        );
    }
    // The failure is the agent's last error, naming the cause (set once the
    // agent has read the 503, a moment after the proxy sent it).
    let mut status = Value::Null;
    let named = wait_for(
        || {
            status = agent.api("ipam.status", json!({})).unwrap_or_default();
            let last = &status["eni"]["lastError"];
            let last = if last.is_null() {
                &status["eni"]["last_error"]
            } else {
                last
            };
            last.as_str()
                .is_some_and(|e| e.contains("RequestLimitExceeded"))
        },
        Duration::from_secs(5),
    );
    assert!(named, "lastError names the cause: {status}");
    let recovered = plugged(Duration::from_secs(90), &|| {
        proxy.throttle_left() == 0 && agent.ipam_free() == 5
    })?;
    ensure!(
        recovered,
        "no recovery: {}\n{}",
        agent.api("ipam.status", json!({}))?,
        agent.log()
    );
    let recovery = t0.elapsed();
    let calls: Vec<_> = proxy.calls().into_iter().skip(before).collect();
    let refused: Vec<_> = calls.iter().filter(|c| c.throttled).collect();
    assert_eq!(refused.len(), throttles as usize);
    // The first call after the throttled ones is the retry that got through.
    let first_ok = calls
        .iter()
        .find(|c| !c.throttled && c.at > refused[refused.len() - 1].at)
        .context("no call after throttling")?;
    let mut attempts: Vec<Instant> = refused.iter().map(|c| c.at).collect();
    attempts.push(first_ok.at);
    let gaps: Vec<Duration> = attempts.windows(2).map(|w| w[1] - w[0]).collect();
    let mut expected = Duration::from_secs(1);
    for (i, gap) in gaps.iter().enumerate() {
        // The wait is a sleep: never shorter; the round's own work adds little.
        assert!(
            *gap >= expected.saturating_sub(Duration::from_millis(20))
                && *gap < expected + Duration::from_secs(2),
            "gap {i} was {gap:?}, backoff wanted {expected:?}; gaps {gaps:?}"
        );
        expected = (expected * 2).min(Duration::from_secs(16));
    }
    let m = agent.metrics(node)?;
    assert_eq!(throttled_total(&m), u64::from(throttles));
    let log = agent.log();
    assert!(
        log.contains("RequestLimitExceeded") && log.contains("ENI reconcile failed"),
        "{log}"
    );
    let status = agent.api("ipam.status", json!({}))?;
    assert_eq!(status["allocations"].as_u64(), Some(3));
    let actions: BTreeSet<&str> = refused.iter().map(|c| c.action.as_str()).collect();
    assert_same_process(&agent, pid);
    let line = format!(
        "throttling: {throttles} calls ({actions:?}) answered 503 RequestLimitExceeded; \
         attempt gaps {gaps:?}; first pod served in {served_first:?} from the warm pool; \
         pool back at 5 free {recovery:?} after the allocation that woke the agent; \
         agent metric throttled={}",
        throttled_total(&m)
    );
    println!("{line}");
    Ok(())
}

// ---------------------------------------------------------------------------
// 2. Netlink errors

const PER_ENI: usize = 2;
const PER_POD: usize = 4;

struct EnisFile(tempfile::NamedTempFile);

impl EnisFile {
    fn write(vpc: &Vpc) -> Result<Self> {
        let f = tempfile::Builder::new()
            .prefix("podnet-fault-enis-")
            .suffix(".yaml")
            .tempfile()?;
        std::fs::write(f.path(), vpc.enis_yaml())?;
        Ok(Self(f))
    }

    fn arg(&self) -> String {
        self.0.path().to_string_lossy().into_owned()
    }
}

fn dump(node: &Netns, cmd: &[&str]) -> Result<BTreeSet<String>> {
    let out = node.run_ok(cmd)?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect())
}

/// Podnet's routing state in the kernel: rules, routes of main and the ENI
/// tables, proxy neighbours, as `ip` dumps them.
fn routing_dump(node: &Netns) -> Result<BTreeSet<String>> {
    let mut all = BTreeSet::new();
    for (tag, cmd) in [
        ("rule", &["ip", "rule", "show"][..]),
        ("main", &["ip", "route", "show", "table", "main"][..]),
        ("101", &["ip", "route", "show", "table", "101"][..]),
        ("102", &["ip", "route", "show", "table", "102"][..]),
        ("proxy", &["ip", "neigh", "show", "proxy"][..]),
    ] {
        all.extend(dump(node, cmd)?.into_iter().map(|l| format!("{tag}: {l}")));
    }
    Ok(all)
}

fn routes_view(agent: &Agent) -> Result<Value> {
    agent.api("routes.show", Value::Null)
}

fn lines_in(view: &Value, state: &str) -> Vec<Value> {
    view["lines"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| l["state"] == state)
        .cloned()
        .collect()
}

/// (a) A foreign route holds the place of a pod's host route before the agent
/// starts: reported as a conflict (`routes.show`, `podnetctl routes`), left
/// alone, and replaced by podnet's own once it is removed. (b) An ENI link is
/// deleted under the running agent: its objects are reported, the agent keeps
/// running; once the link is back, the exact same routing state returns.
#[test]
#[allow(clippy::too_many_lines)] // one scenario, step by step
fn netlink_conflicts_and_vanished_links_are_reported_and_healed() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let vpc = Vpc::builder().name("fnl").build()?;
    let node = vpc.node();
    let pod = &vpc.pods()[0];
    let ip = pod.ip().to_string();
    node.run_ok(&["ip", "route", "add", &ip, "dev", "eni1"])?;
    let enis = EnisFile::write(&vpc)?;
    let file = enis.arg();
    let agent = Agent::start_with(
        node,
        &vpc.endpoints(),
        &["--enis", &file, "--vpc-cidrs", VPC_CIDR],
    )?;
    let pid = agent_pid(&agent)?;
    let expected = PER_ENI * vpc.enis().len() + PER_POD * vpc.pods().len();
    let mut view = Value::Null;
    let reported = wait_for(
        || {
            view = routes_view(&agent).unwrap_or_default();
            let n = view["lines"].as_array().map_or(0, Vec::len);
            n == expected && lines_in(&view, "ok").len() == expected - 1
        },
        Duration::from_secs(10),
    );
    assert!(reported, "{view:#}\n{}", agent.log());
    let conflicts = lines_in(&view, "conflict");
    assert_eq!(conflicts.len(), 1, "{view:#}");
    let host_route = format!("{ip} dev {} proto 176 scope link", pod.host_if());
    assert!(
        conflicts[0]["desired"]
            .as_str()
            .is_some_and(|d| d.contains(&ip) && d.contains(pod.host_if())),
        "{view:#}"
    );
    let table = agent.podnetctl(&["routes"])?;
    assert!(
        table
            .lines()
            .any(|l| l.contains("conflict") && l.contains(&ip)),
        "{table}"
    );
    // Left alone: the foreign route is still the kernel's, podnet's is absent.
    let main = dump(node, &["ip", "route", "show", "table", "main"])?;
    assert!(
        main.contains(&format!("{ip} dev eni1 scope link")),
        "{main:#?}"
    );
    assert!(!main.contains(&host_route), "{main:#?}");
    let t = Instant::now();
    node.run_ok(&["ip", "route", "del", &ip, "dev", "eni1"])?;
    agent.wait_routes_converged(expected)?;
    let conflict_healed = t.elapsed();
    let main = dump(node, &["ip", "route", "show", "table", "main"])?;
    assert!(main.contains(&host_route), "{main:#?}");
    assert_same_process(&agent, pid);
    let full = routing_dump(node)?;

    // (b) ENI 2 disappears (a hot-unplug); its peer in the VPC goes with it.
    let eni = vpc.enis()[1].clone();
    let m_before = agent.metrics(node)?;
    node.run_ok(&["ip", "link", "del", eni.name()])?;
    let mut view = Value::Null;
    let noticed = wait_for(
        || {
            view = routes_view(&agent).unwrap_or_default();
            view["lines"]
                .as_array()
                .is_some_and(|l| l.len() != expected)
                || lines_in(&view, "ok").len() != expected
                || view["problems"].as_array().is_some_and(|p| !p.is_empty())
                || view["errors"].as_array().is_some_and(|e| !e.is_empty())
        },
        Duration::from_secs(10),
    );
    assert!(noticed, "{view:#}\n{}", agent.log());
    std::thread::sleep(Duration::from_secs(2));
    let view = routes_view(&agent)?;
    let m = agent.metrics(node)?;
    println!(
        "ENI link deleted: routes.show lines={} ok={} problems={} errors={} reconciles error +{}",
        view["lines"].as_array().map_or(0, Vec::len),
        lines_in(&view, "ok").len(),
        view["problems"],
        view["errors"],
        m.count("podnet_route_reconciles_total", &[("result", "error")])
            - m_before.count("podnet_route_reconciles_total", &[("result", "error")]),
    );
    let problem = format!("no link named {} or with its MAC", eni.name());
    assert!(
        view["problems"].as_array().is_some_and(|p| p
            .iter()
            .any(|l| l.as_str().is_some_and(|l| l.contains(&problem)))),
        "{view:#}"
    );
    // What stays desired is all in place.
    let lines = view["lines"].as_array().map_or(0, Vec::len);
    assert_eq!(lines_in(&view, "ok").len(), lines, "{view:#}");
    let table = agent.podnetctl(&["routes"])?;
    assert!(table.contains(&problem), "{table}");
    assert_same_process(&agent, pid);
    // Pod 0's state (ENI 1) is untouched.
    let now = routing_dump(node)?;
    for l in full.iter().filter(|l| l.contains(&ip)) {
        assert!(now.contains(l), "{l} lost with another ENI's link");
    }
    // The link comes back (same name and MAC): the same state is rebuilt.
    let t = Instant::now();
    replug_eni(&vpc, &eni)?;
    agent.wait_routes_converged(expected)?;
    let relink_healed = t.elapsed();
    let back = routing_dump(node)?;
    assert_eq!(
        back.difference(&full).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "extra state after relink"
    );
    assert_eq!(
        full.difference(&back).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "state missing after relink"
    );
    assert_same_process(&agent, pid);
    println!(
        "netlink: conflict healed {conflict_healed:?} after the foreign route went; \
         ENI link back -> identical dump ({} lines) in {relink_healed:?}",
        full.len()
    );
    Ok(())
}

/// Recreates a deleted ENI veth with its name, MAC and addresses.
fn replug_eni(vpc: &Vpc, eni: &podnet_tests::vpc::EniLink) -> Result<()> {
    let (node, fabric) = (vpc.node(), vpc.vpc());
    let gw = eni.gw_if();
    run_host(&[
        "ip",
        "link",
        "add",
        "name",
        eni.name(),
        "netns",
        node.name(),
        "address",
        eni.mac(),
        "type",
        "veth",
        "peer",
        "name",
        &gw,
        "netns",
        fabric.name(),
    ])?;
    node.sysctl(&format!("net.ipv4.neigh.{}.proxy_delay", eni.name()), "0")?;
    node.sysctl(&format!("net.ipv6.conf.{}.disable_ipv6", eni.name()), "1")?;
    fabric.sysctl(&format!("net.ipv6.conf.{gw}.disable_ipv6"), "1")?;
    let primary = format!("{}/24", eni.primary());
    node.run_ok(&["ip", "address", "add", &primary, "dev", eni.name()])?;
    let gateway = format!("{}/24", eni.gateway());
    fabric.run_ok(&["ip", "address", "add", &gateway, "dev", &gw])?;
    node.run_ok(&["ip", "link", "set", eni.name(), "up"])?;
    fabric.run_ok(&["ip", "link", "set", &gw, "up"])?;
    podnet_tests::wait_link_up(node, eni.name(), Duration::from_secs(5))?;
    Ok(())
}

// ---------------------------------------------------------------------------
// 3. bpffs missing or unmounted

const SNAT_PORT: u16 = 40_000;
const RACES: &str = "podnet_conntrack_insert_races_total";

fn shop_endpoints(topo: &Topology) -> Vec<EndpointSpec> {
    ["a", "b"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let pod = topo.pod(i);
            EndpointSpec::new("shop", name, &[pod.ipv4().into()]).interface(pod.host_if())
        })
        .collect()
}

fn insert_failed(node: &Netns) -> Result<u64> {
    conntrack_stats(node)?.get("insert_failed")
}

fn races_b(m: &Metrics) -> u64 {
    m.count(
        RACES,
        &[("namespace", "shop"), ("pod", "b"), ("proto", "udp")],
    )
}

/// Pod A takes the single SNAT port towards `port`, then pod B sends `n`
/// datagrams to the same place: `n` races. Returns the kernel's delta.
fn races(topo: &Topology, port: u16, n: usize) -> Result<u64> {
    let (a, b) = (topo.pod(0), topo.pod(1));
    let server = SocketAddr::new(topo.server_ipv4().into(), port);
    let before = insert_failed(topo.node())?;
    udp_send(a.netns(), SocketAddr::new(a.ipv4().into(), 5000), server, 1)?;
    udp_send(b.netns(), SocketAddr::new(b.ipv4().into(), 5001), server, n)?;
    Ok(insert_failed(topo.node())? - before)
}

/// (a) `--bpffs` on a directory with no bpffs (outside /sys/fs/bpf): the
/// agent mounts nothing there and exits non-zero with a message naming the
/// directory and the fix. (b) bpffs unmounted under a running agent: the
/// agent keeps running and counting (its programs hold their links by file
/// descriptor); a restart on a fresh bpffs pins everything again.
#[test]
#[allow(clippy::too_many_lines)] // one scenario, step by step
fn bpffs_missing_fails_clearly_and_an_unmount_keeps_counting() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let topo = Topology::builder().name("fbpf").pods(2).build()?;
    let node = topo.node();
    let plain = tempfile::Builder::new().prefix("podnet-nobpf-").tempdir()?;
    let pins = plain.path().join("pins");
    let (p, sock, state) = (
        pins.to_string_lossy().into_owned(),
        plain.path().join("s.sock").to_string_lossy().into_owned(),
        plain.path().join("state").to_string_lossy().into_owned(),
    );
    let bin = binary("podnet-agent")?.to_string_lossy().into_owned();
    let mut child = spawn_in_with_env(
        node,
        &[
            &bin,
            "--metrics-addr",
            "127.0.0.1:10310",
            "--socket",
            &sock,
            "--state-dir",
            &state,
            "--bpffs",
            &p,
        ],
        &[("PODNET_LOG", "info")],
    )?;
    let t = Instant::now();
    let mut status = None;
    wait_for(
        || {
            status = child.try_wait().ok().flatten();
            status.is_some()
        },
        Duration::from_secs(20),
    );
    let exited = t.elapsed();
    let log = child.log();
    let status = status.with_context(|| format!("agent kept running:\n{log}"))?;
    assert!(!status.success(), "{status}\n{log}");
    assert!(
        log.contains(&p) && log.contains("is not on a bpf filesystem (mount -t bpf bpf"),
        "{log}"
    );
    assert!(!is_mount_point(&pins), "the agent mounted something there");
    let first_error = log
        .lines()
        .find(|l| l.contains("bpf filesystem"))
        .unwrap_or_default()
        .to_owned();
    drop(child);

    // (b) A private bpffs, unmounted while the agent runs.
    topo.snat_pods_to_one_port("udp", false, SNAT_PORT)?;
    let bpffs = Mount::new("bpf", None)?;
    let dir = bpffs.path().join("podnet");
    let d = dir.to_string_lossy().into_owned();
    let mut agent = Agent::start_with(node, &shop_endpoints(&topo), &["--bpffs", &d])?;
    let pid = agent_pid(&agent)?;
    assert!(dir.join("conntrack").exists(), "nothing pinned under {d}");
    assert_eq!(races(&topo, 7000, 5)?, 5);
    wait_for(
        || agent.metrics(node).is_ok_and(|m| races_b(&m) == 5),
        Duration::from_secs(5),
    );
    bpffs.unmount()?;
    assert!(!dir.exists());
    let t = Instant::now();
    let mut readyz = (0, String::new());
    let reported = wait_for(
        || {
            readyz = http_get(node, "/readyz").unwrap_or_default();
            readyz.0 == 503
        },
        Duration::from_secs(10),
    );
    let noticed = t.elapsed();
    assert!(reported, "{readyz:?}\n{}", agent.log());
    assert!(
        readyz.1.contains(&d) && readyz.1.contains("bpffs unmounted"),
        "{readyz:?}"
    );
    assert_same_process(&agent, pid);
    assert_eq!(races(&topo, 7001, 7)?, 7);
    let m = agent.metrics(node)?;
    assert_eq!(races_b(&m), 12, "counting stopped with the unmount");
    let unmount_log: Vec<String> = agent
        .log()
        .lines()
        .filter(|l| l.contains("ERROR") && l.contains(&d))
        .map(str::to_owned)
        .collect();
    assert_eq!(unmount_log.len(), 1, "{}", agent.log());
    // The fault clears: bpffs back, agent restarted, pins and counting back.
    let remount = dir
        .parent()
        .context("no parent")?
        .to_string_lossy()
        .into_owned();
    run_host(&["mount", "-t", "bpf", "bpf", &remount])?;
    agent.restart(node)?;
    assert!(dir.join("conntrack").exists(), "not pinned again");
    assert_eq!(races(&topo, 7002, 3)?, 3);
    // The fresh bpffs counts from zero; the exposed counter continues from the 12 the
    // previous agent exposed (metrics continuity), so it never goes back.
    let ok = wait_for(
        || agent.metrics(node).is_ok_and(|m| races_b(&m) == 12 + 3),
        Duration::from_secs(5),
    );
    assert!(ok, "{}", agent.metrics(node)?.0);
    agent.stop()?;
    println!(
        "bpffs: missing -> exit {status} after {exited:?}: {first_error}\n\
         bpffs unmounted under the agent: PID {pid} kept running, /readyz 503 after {noticed:?}, \
         7/7 races counted after; logged: {unmount_log:?}; restart on a fresh bpffs counts again (3/3, exposed as 12 + 3)"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// 4. Full ring buffer

/// Bytes of one race event in the ring buffer: an 8-byte record header and
/// the 104-byte `RaceEvent`, rounded up to 8.
const RECORD_BYTES: u64 = 8 + 104;
/// The conntrack ring buffer's size (`EVENTS_BYTES`, 1 MiB).
const RING_BYTES: u64 = 1 << 20;

fn status_counters(agent: &Agent) -> Result<(u64, u64, u64, u64)> {
    let s = agent.api("status", json!({}))?;
    let c = &s["counters"];
    let get = |v: &Value, k: &str| v[k].as_u64().with_context(|| format!("no {k} in {s}"));
    Ok((
        get(c, "insert_races")?,
        get(c, "events_lost")?,
        get(c, "events_sampled_out")?,
        get(&s, "events_received")?,
    ))
}

/// The agent's consumer is stopped (SIGSTOP) while pods race: the ring
/// buffer fills, every event beyond its capacity is counted as lost, and the
/// per-pod race counters (kernel maps) still equal the kernel's
/// `insert_failed` delta exactly. After SIGCONT the agent drains the ring.
#[test]
fn a_full_ring_buffer_loses_events_but_never_counts() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let n: usize = if soak() { 100_000 } else { 15_000 };
    let topo = Topology::builder().name("fring").pods(2).build()?;
    topo.snat_pods_to_one_port("udp", false, SNAT_PORT)?;
    let node = topo.node();
    let agent = Agent::start_with(node, &shop_endpoints(&topo), &["--race-event-budget", "0"])?;
    let pid = agent_pid(&agent)?;
    assert_eq!(races(&topo, 7100, 10)?, 10);
    let drained = |agent: &Agent| {
        status_counters(agent)
            .is_ok_and(|(races, lost, sampled, received)| received + lost + sampled == races)
    };
    assert!(wait_for(|| drained(&agent), Duration::from_secs(10)));
    let (races0, lost0, sampled0, received0) = status_counters(&agent)?;
    let m0 = agent.metrics(node)?;

    signal(pid, libc::SIGSTOP)?;
    let stopped = Instant::now();
    let kernel = races(&topo, 7101, n);
    let held = stopped.elapsed();
    signal(pid, libc::SIGCONT)?;
    let kernel = kernel?;
    assert_eq!(kernel, n as u64, "the kernel counts one insert_failed each");
    let t = Instant::now();
    let ok = wait_for(|| drained(&agent), Duration::from_mins(1));
    assert!(ok, "{:?}", status_counters(&agent));
    let drain = t.elapsed();
    let (races1, lost1, sampled1, received1) = status_counters(&agent)?;
    let capacity = RING_BYTES / RECORD_BYTES;
    let lost = lost1 - lost0;
    assert_eq!(races1 - races0, kernel);
    assert_eq!(sampled1 - sampled0, 0, "budget 0 samples nothing");
    assert_eq!(lost, kernel - capacity, "the ring holds {capacity} events");
    assert_eq!(received1 - received0, capacity);
    let m = agent.metrics(node)?;
    let lost_metric = [("program", "conntrack")];
    assert_eq!(
        m.count("podnet_bpf_events_lost_total", &lost_metric)
            - m0.count("podnet_bpf_events_lost_total", &lost_metric),
        lost
    );
    assert_eq!(races_b(&m) - races_b(&m0), kernel);
    assert_eq!(
        m.count("podnet_conntrack_stat_total", &[("stat", "insert_failed")]),
        insert_failed(node)?
    );
    assert_same_process(&agent, pid);
    // And it keeps going.
    assert_eq!(races(&topo, 7102, 20)?, 20);
    assert!(wait_for(|| drained(&agent), Duration::from_secs(10)));
    let (races2, lost2, _, _) = status_counters(&agent)?;
    assert_eq!((races2 - races1, lost2 - lost1), (20, 0));
    println!(
        "ring buffer: {kernel} races in {held:?} with the agent stopped; {capacity} delivered, \
         {lost} lost (exact), drained in {drain:?} after SIGCONT; per-pod count = kernel delta"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// 5. Checkpoint on a full disk

const NODE_CIDR: &str = "10.244.9.0/24";

/// Fills the filesystem of `dir` with one file until it is full.
fn fill(dir: &Path) -> Result<PathBuf> {
    use std::io::Write as _;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path)?;
    let chunk = vec![0u8; 4096];
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(path)
}

fn allocations(agent: &Agent) -> Result<u64> {
    agent.api("ipam.status", Value::Null)?["allocations"]
        .as_u64()
        .context("no allocations")
}

/// Checkpoint writes fail with ENOSPC: CNI ADD gets code 11 (try again later)
/// naming the cause, nothing is allocated in memory; once space is freed,
/// allocation works and the checkpoint on disk holds exactly what the agent
/// has (also across a crash).
#[test]
fn a_full_state_disk_refuses_allocations_cleanly() -> Result<()> {
    if !cni::ready() {
        return Ok(());
    }
    let topo = Topology::builder().name("fdisk").pods(0).build()?;
    let node = topo.node();
    let disk = Mount::new("tmpfs", Some("size=256k,mode=0700"))?;
    let state = disk.path().to_string_lossy().into_owned();
    let mut agent = Agent::start_with(
        node,
        &[],
        &["--node-cidr", NODE_CIDR, "--state-dir", &state],
    )?;
    let pid = agent_pid(&agent)?;
    agent.ipam_allocate("before")?;
    let filler = fill(disk.path())?;

    let pod = Netns::new("fdiskpod")?;
    let netns = pod.path().display().to_string();
    let log = tempfile::Builder::new().prefix("podnet-cni-").tempfile()?;
    let conf = cni::ptp_ipam_conf(&agent.socket(), log.path());
    let env = cni::runtime_env("ADD", "full1", &netns);
    let err = cni::invoke_plugin_error(&env, conf.as_bytes())?;
    assert_eq!(err["code"], json!(11), "{err}");
    let details = err["details"].as_str().unwrap_or_default();
    assert!(
        details.contains("No space left on device") && details.contains("ipam.json"),
        "{err}"
    );
    let api_err = agent.ipam_allocate("full2").unwrap_err().to_string();
    assert!(api_err.contains("No space left on device"), "{api_err}");
    assert_eq!(allocations(&agent)?, 1, "nothing allocated in memory");
    let m = agent.metrics(node)?;
    assert_eq!(
        m.count("podnet_ipam_addresses", &[("state", "allocated")]),
        1
    );
    assert_same_process(&agent, pid);

    std::fs::remove_file(&filler)?;
    let t = Instant::now();
    let (ok, out) = cni::invoke_plugin(&env, conf.as_bytes())?;
    assert!(ok, "{out}");
    let freed = t.elapsed();
    agent.ipam_allocate("full2")?;
    assert_eq!(allocations(&agent)?, 3);
    let text = std::fs::read_to_string(disk.path().join("ipam.json"))?;
    for id in ["before", "full1", "full2"] {
        assert!(text.contains(&format!("\"{id}\"")), "{id} not in {text}");
    }
    // A crash right now loses nothing: the checkpoint is what memory held.
    agent.kill()?;
    agent.start_again(node)?;
    assert_eq!(allocations(&agent)?, 3);
    let (ok, out) = cni::invoke_plugin(&cni::runtime_env("DEL", "full1", &netns), conf.as_bytes())?;
    assert!(ok, "{out}");
    agent.stop()?;
    println!(
        "full disk: CNI ADD -> code {} ({}); 1 allocation in memory; after freeing space ADD \
         took {freed:?}; checkpoint holds all 3 after a crash",
        err["code"], details
    );
    Ok(())
}

// 7. Worker threads that die

/// Every file below `dir` (pins), sorted.
fn pins(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d)? {
            let path = entry?.path();
            if path.is_dir() {
                todo.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Waits up to 2 s for `/readyz` to answer 503 with exactly `reason`;
/// returns how long it took.
fn not_ready_within_2s(node: &Netns, agent: &Agent, reason: &str) -> Result<Duration> {
    let t0 = Instant::now();
    let want = (503, format!("not ready: {reason}\n"));
    let seen = wait_for(
        || http_get(node, "/readyz").is_ok_and(|r| r == want),
        Duration::from_secs(2),
    );
    ensure!(
        seen,
        "/readyz is {:?}, not {want:?}\n{}",
        http_get(node, "/readyz"),
        agent.log()
    );
    Ok(t0.elapsed())
}

/// A worker thread whose work ends (the fault hook makes its loop return)
/// turns `/readyz` to 503 naming it within 2 s, and `podnet_thread_up` and
/// `podnet_ready` to 0; a thread that panics aborts the process, whose pinned
/// programs stay.
#[test]
fn dead_threads_make_the_agent_unready_and_a_panic_aborts() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let threads = ["podnet-routing", "podnet-dns-ev", "podnet-dns"];
    let faults = "end:podnet-routing,end:podnet-dns-ev,end:podnet-dns,panic:podnet-races";
    let topo = Topology::builder().name("fthread").pods(2).build()?;
    let node = topo.node();
    let mut agent = Agent::start_with_env(
        node,
        &shop_endpoints(&topo),
        &[],
        &[("PODNET_FAULTS_ON_SIGUSR1", faults)],
    )?;
    let pid = agent_pid(&agent)?;
    let m = agent.metrics(node)?;
    assert_eq!(m.count("podnet_ready", &[]), 1);
    for thread in threads.iter().chain(&["podnet-races"]) {
        assert_eq!(
            m.count("podnet_thread_up", &[("thread", thread)]),
            1,
            "{thread}"
        );
    }
    let mut took = Vec::new();
    for (i, thread) in threads.iter().enumerate() {
        signal(pid, libc::SIGUSR1)?;
        // Named in the order of their names.
        let mut ended = threads[..=i].to_vec();
        ended.sort_unstable();
        let reason = ended
            .iter()
            .map(|t| format!("thread {t} ended"))
            .collect::<Vec<_>>()
            .join("; ");
        took.push(not_ready_within_2s(node, &agent, &reason)?);
        let m = agent.metrics(node)?;
        assert_eq!(
            m.count("podnet_thread_up", &[("thread", thread)]),
            0,
            "{thread}"
        );
        assert_eq!(m.count("podnet_ready", &[]), 0, "{thread}");
    }
    assert_same_process(&agent, pid);

    // A panic: the process aborts; the datapath stays pinned.
    let pinned = pins(agent.bpffs())?;
    let t0 = Instant::now();
    signal(pid, libc::SIGUSR1)?;
    let mut status = None;
    while status.is_none() && t0.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(20));
        status = agent.exited()?;
    }
    let aborted_after = t0.elapsed();
    let status = status.with_context(|| format!("still running after a panic\n{}", agent.log()))?;
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGABRT),
        "{status}"
    );
    let log = agent.log();
    assert!(
        log.contains("fault hook: this thread was told to panic")
            && log.contains("thread=\"podnet-races\"")
            && log.contains("aborting (the datapath stays pinned)"),
        "{log}"
    );
    assert_eq!(pins(agent.bpffs())?, pinned);
    println!(
        "dead threads: /readyz 503 after {took:?} (routing, dns events, dns upkeep); \
         a panic in podnet-races aborted the agent after {aborted_after:?} with SIGABRT, \
         {} pins kept",
        pinned.len()
    );
    Ok(())
}

/// The ENI thread (ENI mode only) is watched like the others: once its work
/// ends, `/readyz` answers 503 naming it within 2 s.
#[test]
fn the_eni_thread_ending_makes_the_agent_unready() -> Result<()> {
    if !require_root() || !moto_available() {
        return Ok(());
    }
    let w = Ec2World::new(MOTO_PORT, "fenith")?;
    let node = &w.node;
    let (cloud, imds_ep) = (w.moto.endpoint(), w.imds.endpoint());
    let agent = Agent::start_with_env(
        node,
        &[],
        &[
            "--ipam-mode",
            "eni",
            "--warm-ip-target",
            "1",
            "--cloud-endpoint",
            &cloud,
            "--imds-endpoint",
            &imds_ep,
        ],
        &[("PODNET_FAULTS_ON_SIGUSR1", "end:podnet-eni")],
    )?;
    let pid = agent_pid(&agent)?;
    assert_eq!(
        agent
            .metrics(node)?
            .count("podnet_thread_up", &[("thread", "podnet-eni")]),
        1
    );
    signal(pid, libc::SIGUSR1)?;
    let took = not_ready_within_2s(node, &agent, "thread podnet-eni ended")?;
    assert_eq!(
        agent
            .metrics(node)?
            .count("podnet_thread_up", &[("thread", "podnet-eni")]),
        0
    );
    assert_same_process(&agent, pid);
    println!("ENI thread ended: /readyz 503 after {took:?}");
    Ok(())
}
