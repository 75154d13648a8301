//! ENI mode end to end: the real agent against an EC2 emulator (moto) and a
//! fake instance metadata service, both on the node namespace's loopback.
//! moto does not create kernel links, so the harness creates a veth with each
//! attached ENI's MAC in the node namespace, as the cloud would.
//!
//! Every cloud call count is the agent's own `podnet_cloud_api_calls_total`;
//! every address and ENI is checked against what moto holds.

use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use podnet_tests::{
    in_netns, iptables, require_root, spawn_in, unavailable, Agent, Metrics, Netns, NsChild,
};
use serde_json::{json, Value};

const CALLS: &str = "podnet_cloud_api_calls_total";
const PYTHON: &str = "/opt/podnet-tools/venv/bin/python";
const MOTO: &str = "/opt/podnet-tools/venv/bin/moto_server";
/// moto's port on the node namespace's loopback (the namespace is the test's own).
const MOTO_PORT: u16 = 5000;
const TOKEN: &str = "podnet-test-token";

fn helper() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/eni/ec2.py")
}

fn endpoint() -> String {
    format!("http://127.0.0.1:{MOTO_PORT}")
}

/// Runs the boto3 helper in the node namespace and parses its JSON output.
fn ec2(node: &Netns, args: &[&str]) -> Result<Value> {
    let helper = helper();
    let ep = endpoint();
    let mut cmd = vec![PYTHON, helper.to_str().unwrap_or_default(), ep.as_str()];
    cmd.extend_from_slice(args);
    let out = node.run(&cmd)?;
    if !out.status.success() {
        bail!(
            "ec2.py {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// This instance's ENIs as moto has them, by device index.
fn enis(node: &Netns, instance: &str) -> Result<Vec<Value>> {
    let mut list = ec2(node, &["enis", instance])?
        .as_array()
        .cloned()
        .unwrap_or_default();
    list.sort_by_key(|e| e["device_index"].as_u64());
    Ok(list)
}

fn secondaries(eni: &Value) -> BTreeSet<String> {
    eni["secondary_ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect()
}

/// Links by MAC in the node namespace (`ip -j link`).
fn links(node: &Netns) -> Result<Vec<Value>> {
    let out = node.run_ok(&["ip", "-j", "link", "show"])?;
    Ok(serde_json::from_slice::<Value>(&out.stdout)?
        .as_array()
        .cloned()
        .unwrap_or_default())
}

/// Creates a veth named `en<device index>` with the MAC of every attached ENI
/// that has no link yet, as the cloud would hot-plug the interface.
fn plug_links(node: &Netns, instance: &str) -> Result<usize> {
    let present: BTreeSet<String> = links(node)?
        .iter()
        .filter_map(|l| l["address"].as_str().map(str::to_owned))
        .collect();
    let mut added = 0;
    for e in enis(node, instance)? {
        let mac = e["mac"].as_str().unwrap_or_default().to_owned();
        if present.contains(&mac) {
            continue;
        }
        let name = format!("en{}", e["device_index"]);
        let peer = format!("{name}p");
        node.run_ok(&[
            "ip", "link", "add", &name, "address", &mac, "type", "veth", "peer", "name", &peer,
        ])?;
        node.run_ok(&["ip", "link", "set", &peer, "up"])?;
        added += 1;
    }
    Ok(added)
}

/// The fake instance metadata service (`IMDSv2` only).
struct FakeImds {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeImds {
    fn start(node: &Netns, identity: &Value) -> Result<Self> {
        let listener = in_netns(node, || TcpListener::bind("127.0.0.1:0"))??;
        let port = listener.local_addr()?.port();
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let id = identity.clone();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let id = id.clone();
                        std::thread::spawn(move || {
                            let _ = serve_imds(conn, &id);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(Self {
            port,
            stop,
            thread: Some(thread),
        })
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for FakeImds {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serves one keep-alive connection.
fn serve_imds(conn: TcpStream, id: &Value) -> Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut out = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let (method, path) = (
            parts.next().unwrap_or_default().to_owned(),
            parts.next().unwrap_or_default().to_owned(),
        );
        let (mut length, mut token) = (0usize, String::new());
        loop {
            let mut h = String::new();
            reader.read_line(&mut h)?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                match k.trim().to_ascii_lowercase().as_str() {
                    "content-length" => length = v.trim().parse().unwrap_or(0),
                    "x-aws-ec2-metadata-token" => v.trim().clone_into(&mut token),
                    _ => {}
                }
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
        let (status, text) = imds_answer(&method, &path, &token, id);
        write!(
            out,
            "HTTP/1.1 {status} X\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{text}",
            text.len()
        )?;
        out.flush()?;
    }
}

fn imds_answer(method: &str, path: &str, token: &str, id: &Value) -> (u16, String) {
    if method == "PUT" && path == "/latest/api/token" {
        return (200, TOKEN.to_owned());
    }
    if token != TOKEN {
        return (401, String::new());
    }
    let s = |k: &str| id[k].as_str().unwrap_or_default().to_owned();
    let mac = s("mac");
    let iface = format!("network/interfaces/macs/{mac}/");
    let Some(key) = path.strip_prefix("/latest/meta-data/") else {
        return (404, String::new());
    };
    let value = match key {
        "instance-id" => s("instance_id"),
        "instance-type" => s("instance_type"),
        "placement/region" => s("region"),
        "mac" => mac.clone(),
        "iam/security-credentials/" => "podnet-node".to_owned(),
        "iam/security-credentials/podnet-node" => json!({
            "Code": "Success", "AccessKeyId": "ASIATESTING", "SecretAccessKey": "testing",
            "Token": "testing", "Expiration": "2099-01-01T00:00:00Z"
        })
        .to_string(),
        k if k == format!("{iface}subnet-id") => s("subnet_id"),
        k if k == format!("{iface}subnet-ipv4-cidr-block") => s("subnet_cidr"),
        k if k == format!("{iface}security-group-ids") => id["security_groups"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join("\n"),
        _ => return (404, String::new()),
    };
    (200, value)
}

/// A cloud call count of the agent, any result when `result` is `None`.
fn calls(m: &Metrics, action: &str, result: Option<&str>) -> u64 {
    let v = match result {
        Some(r) => m.value_or_zero(CALLS, &[("action", action), ("result", r)]),
        None => ["success", "error", "throttled", "unreachable", "bad_answer"]
            .iter()
            .map(|r| m.value_or_zero(CALLS, &[("action", action), ("result", r)]))
            .sum(),
    };
    // Counts are whole numbers well below 2^52.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let n = v as u64;
    n
}

fn ipam_status(agent: &Agent) -> Result<Value> {
    agent.api("ipam.status", json!({}))
}

fn free(agent: &Agent) -> u64 {
    ipam_status(agent)
        .ok()
        .and_then(|s| s["pools"][0]["free"].as_u64())
        .unwrap_or(0)
}

fn allocate(agent: &Agent, container: &str) -> Result<String> {
    let a = agent.api(
        "ipam.allocate",
        json!({"containerId": container, "ifName": "eth0", "network": "podnet"}),
    )?;
    a["ips"][0]["ip"]
        .as_str()
        .map(str::to_owned)
        .context("allocation without address")
}

/// Polls `cond` every 300 ms for up to `timeout`, plugging links of newly
/// attached ENIs on each round.
fn wait_plugging(
    node: &Netns,
    instance: &str,
    timeout: Duration,
    mut cond: impl FnMut() -> bool,
) -> Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        plug_links(node, instance)?;
        if cond() {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn primaries(node: &Netns, instance: &str) -> Result<BTreeSet<String>> {
    Ok(enis(node, instance)?
        .iter()
        .filter_map(|e| e["primary_ip"].as_str().map(str::to_owned))
        .collect())
}

struct Moto(Option<NsChild>);

impl Drop for Moto {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            let _ = c.kill();
        }
    }
}

#[test]
#[allow(clippy::too_many_lines)] // one scenario, step by step
fn warm_pool_eni_attach_outage_and_release() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    if !Path::new(MOTO).exists() || !Path::new(PYTHON).exists() {
        unavailable(
            "moto[server] is not installed in /opt/podnet-tools/venv (run `cargo xtask setup`)",
        );
        return Ok(());
    }
    let node = Netns::new("eni")?;
    let _moto = Moto(Some(spawn_in(
        &node,
        &[MOTO, "-H", "127.0.0.1", "-p", &MOTO_PORT.to_string()],
    )?));
    let up = podnet_tests::wait_for(
        || ec2(&node, &["all-enis"]).is_ok(),
        Duration::from_secs(30),
    );
    if !up {
        bail!("moto did not come up");
    }
    let id = ec2(&node, &["setup"])?;
    let instance = id["instance_id"].as_str().unwrap_or_default().to_owned();
    let imds = FakeImds::start(&node, &id)?;
    plug_links(&node, &instance)?;
    let eni0 = enis(&node, &instance)?[0]["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let ep = endpoint();
    let imds_ep = imds.endpoint();

    // A. Fresh node, warm-ip-target 5: exactly one AssignPrivateIpAddresses of 5.
    let mut agent = Agent::start_with(
        &node,
        &[],
        &[
            "--ipam-mode",
            "eni",
            "--warm-ip-target",
            "5",
            "--cloud-endpoint",
            &ep,
            "--imds-endpoint",
            &imds_ep,
        ],
    )?;
    let ok = wait_plugging(&node, &instance, Duration::from_secs(30), || {
        free(&agent) == 5
    })?;
    if !ok {
        bail!(
            "pool never reached 5 free: {:?}\n{}",
            ipam_status(&agent)?,
            agent.log()
        );
    }
    let m = agent.metrics(&node)?;
    assert_eq!(calls(&m, "AssignPrivateIpAddresses", None), 1);
    assert_eq!(calls(&m, "AssignPrivateIpAddresses", Some("success")), 1);
    assert_eq!(calls(&m, "CreateNetworkInterface", None), 0);
    assert_eq!(calls(&m, "DescribeInstanceTypes", Some("success")), 1);
    let list = enis(&node, &instance)?;
    assert_eq!(list.len(), 1);
    assert_eq!(secondaries(&list[0]).len(), 5);
    println!(
        "A: warm-ip-target=5 on a fresh node: AssignPrivateIpAddresses={} (5 addresses), CreateNetworkInterface=0, DescribeNetworkInterfaces={}",
        calls(&m, "AssignPrivateIpAddresses", None),
        calls(&m, "DescribeNetworkInterfaces", None)
    );

    // B. One pod: 4 free, eni0 full -> exactly one new ENI (create + attach),
    // holding the one missing address; no further assign call.
    let ip1 = allocate(&agent, "c1")?;
    assert!(
        !primaries(&node, &instance)?.contains(&ip1),
        "{ip1} is a primary address"
    );
    assert!(secondaries(&list[0]).contains(&ip1));
    let ok = wait_plugging(&node, &instance, Duration::from_secs(30), || {
        free(&agent) == 5 && enis(&node, &instance).is_ok_and(|l| l.len() == 2)
    })?;
    if !ok {
        bail!("no second ENI: {:?}\n{}", ipam_status(&agent)?, agent.log());
    }
    let m = agent.metrics(&node)?;
    assert_eq!(calls(&m, "CreateNetworkInterface", None), 1);
    assert_eq!(calls(&m, "AttachNetworkInterface", None), 1);
    assert_eq!(calls(&m, "AssignPrivateIpAddresses", None), 1);
    let list = enis(&node, &instance)?;
    assert!(list[1]["managed"].as_bool().unwrap_or(false));
    assert_eq!(list[1]["device_index"].as_u64(), Some(1));
    assert_eq!(secondaries(&list[1]).len(), 1);
    let en1 = links(&node)?
        .into_iter()
        .find(|l| l["ifname"] == "en1")
        .context("no en1")?;
    assert_eq!(en1["mtu"].as_u64(), Some(9001));
    assert!(en1["flags"]
        .as_array()
        .is_some_and(|f| f.iter().any(|x| x == "UP")));
    println!("B: one pod on a full ENI: CreateNetworkInterface=1 AttachNetworkInterface=1 AssignPrivateIpAddresses=1 (total); en1 up, MTU 9001");

    // C. The cloud becomes unreachable: pods still get warm addresses, the
    // agent backs off, and catches up once the cloud is back.
    let reject = [
        "INPUT",
        "-p",
        "tcp",
        "--dport",
        "5000",
        "-j",
        "REJECT",
        "--reject-with",
        "tcp-reset",
    ];
    let mut add = vec!["-I"];
    add.extend_from_slice(&reject);
    iptables(&node, &add)?;
    let mut pod_ips = vec![ip1.clone()];
    for c in ["c2", "c3", "c4"] {
        pod_ips.push(allocate(&agent, c)?);
    }
    let prim = primaries_cached(&list);
    for ip in &pod_ips {
        assert!(!prim.contains(ip), "{ip} is a primary address");
    }
    let failing = podnet_tests::wait_for(
        || {
            agent
                .metrics(&node)
                .is_ok_and(|m| calls(&m, "DescribeNetworkInterfaces", Some("unreachable")) >= 1)
        },
        Duration::from_secs(10),
    );
    assert!(failing, "no failed call counted:\n{}", agent.log());
    std::thread::sleep(Duration::from_secs(6));
    let m = agent.metrics(&node)?;
    let failed = calls(&m, "DescribeNetworkInterfaces", Some("unreachable"));
    // Backoff 1 s, 2 s, 4 s: at most 4 attempts in about 7 s.
    assert!(
        (1..=4).contains(&failed),
        "{failed} failed attempts in ~7 s"
    );
    let status = ipam_status(&agent)?;
    assert_eq!(status["allocations"].as_u64(), Some(4));
    assert!(
        status["eni"]["lastError"].is_string() || status["eni"]["last_error"].is_string(),
        "{status}"
    );
    let mut del = vec!["-D"];
    del.extend_from_slice(&reject);
    iptables(&node, &del)?;
    let ok = wait_plugging(&node, &instance, Duration::from_secs(40), || {
        free(&agent) == 5
    })?;
    if !ok {
        bail!("no recovery: {:?}\n{}", ipam_status(&agent)?, agent.log());
    }
    let m = agent.metrics(&node)?;
    assert_eq!(calls(&m, "AssignPrivateIpAddresses", Some("success")), 2);
    assert_eq!(calls(&m, "CreateNetworkInterface", None), 1);
    let list = enis(&node, &instance)?;
    assert_eq!(secondaries(&list[1]).len(), 4);
    let status = ipam_status(&agent)?;
    assert_eq!(status["allocations"].as_u64(), Some(4));
    println!(
        "C: outage: {failed} DescribeNetworkInterfaces unreachable in ~7 s (backoff); 4 pods allocated; recovered with AssignPrivateIpAddresses of 3 (2 in total)"
    );
    let text = agent.podnetctl(&["ipam"])?;
    assert!(text.contains(&eni0), "{text}");
    println!("{text}");
    agent.stop()?;

    // D. Someone else's ENI at index 2; a new agent (no pods) with
    // warm-ip-target 1 releases 8 of 9 addresses: podnet's ENI (4) goes with
    // one detach + one delete, 4 addresses leave eni0 in one call, and the
    // foreign ENI and the primary stay.
    let subnet = id["subnet_id"].as_str().unwrap_or_default().to_owned();
    let foreign = ec2(&node, &["foreign", &instance, &subnet, "2"])?;
    plug_links(&node, &instance)?;
    let agent = Agent::start_with(
        &node,
        &[],
        &[
            "--ipam-mode",
            "eni",
            "--warm-ip-target",
            "1",
            "--cloud-endpoint",
            &ep,
            "--imds-endpoint",
            &imds_ep,
        ],
    )?;
    let ok = wait_plugging(&node, &instance, Duration::from_secs(30), || {
        enis(&node, &instance).is_ok_and(|l| l.len() == 2 && secondaries(&l[0]).len() == 1)
            && free(&agent) == 1
    })?;
    if !ok {
        bail!("no release: {:?}\n{}", enis(&node, &instance)?, agent.log());
    }
    let m = agent.metrics(&node)?;
    assert_eq!(calls(&m, "DetachNetworkInterface", None), 1);
    assert_eq!(calls(&m, "DeleteNetworkInterface", None), 1);
    assert_eq!(calls(&m, "UnassignPrivateIpAddresses", None), 1);
    assert_eq!(calls(&m, "AssignPrivateIpAddresses", None), 0);
    assert_eq!(calls(&m, "CreateNetworkInterface", None), 0);
    let list = enis(&node, &instance)?;
    assert_eq!(list[0]["id"].as_str(), Some(eni0.as_str()));
    assert_eq!(list[1]["id"], foreign["id"]);
    assert_eq!(secondaries(&list[1]).len(), 2);
    println!("D: release: DetachNetworkInterface=1 DeleteNetworkInterface=1 UnassignPrivateIpAddresses=1 (4 addresses); foreign ENI and primary kept");
    drop(agent);
    Ok(())
}

fn primaries_cached(list: &[Value]) -> BTreeSet<String> {
    list.iter()
        .filter_map(|e| e["primary_ip"].as_str().map(str::to_owned))
        .collect()
}
