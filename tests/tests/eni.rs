//! ENI mode end to end: the real agent against an EC2 emulator (moto) and a
//! fake instance metadata service, both on the node namespace's loopback.
//! moto does not create kernel links, so the harness creates a veth with each
//! attached ENI's MAC in the node namespace, as the cloud would.
//!
//! Every cloud call count is the agent's own `podnet_cloud_api_calls_total`;
//! every address and ENI is checked against what moto holds.

// Test code: a step that fails fails the test, with the step in the message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{collections::BTreeSet, time::Duration};

use anyhow::{bail, Context as _, Result};
use podnet_tests::{
    cloud::{links, moto_available, CredentialsEndpoint, Ec2World, Moto, ThrottleProxy},
    cni::{self, Attachment, CniEnv},
    iptables, ping, require_root,
    vpc::link_packets,
    Agent, Metrics, Netns,
};
use serde_json::{json, Value};

const CALLS: &str = "podnet_cloud_api_calls_total";
/// moto's port on the node namespace's loopback (the namespace is the test's own).
const MOTO_PORT: u16 = 5000;

fn secondaries(eni: &Value) -> BTreeSet<String> {
    eni["secondary_ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect()
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

/// A gauge's value as a whole number (counts of addresses and pods).
fn whole(m: &Metrics, family: &str, labels: &[(&str, &str)]) -> u64 {
    let v = m.value_or_zero(family, labels);
    // Counts of addresses, well below 2^52.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let n = v as u64;
    n
}

/// Asserts that the agent's gauge of `subnet`'s free addresses comes to
/// `free` (EC2's count) within 5 s: it is read when the pool settles.
fn assert_subnet_gauge(agent: &Agent, node: &Netns, subnet: &str, free: u64) {
    let agrees = podnet_tests::wait_for(
        || {
            agent.metrics(node).is_ok_and(|m| {
                whole(
                    &m,
                    "podnet_ipam_subnet_free_addresses",
                    &[("subnet", subnet)],
                ) == free
            })
        },
        Duration::from_secs(5),
    );
    assert!(agrees, "subnet free addresses: EC2 {free}\n{}", agent.log());
}

fn ipam_status(agent: &Agent) -> Result<Value> {
    agent.api("ipam.status", json!({}))
}

fn primaries(moto: &Moto, node: &Netns, instance: &str) -> Result<BTreeSet<String>> {
    Ok(primaries_cached(&moto.enis(node, instance)?))
}

/// Starts the agent in ENI mode with `--warm-ip-target` `warm`, the EC2 API at
/// `cloud` and the instance metadata service at `imds`.
fn start_agent(node: &Netns, warm: &str, cloud: &str, imds: &str) -> Result<Agent> {
    Agent::start_with(
        node,
        &[],
        &[
            "--ipam-mode",
            "eni",
            "--warm-ip-target",
            warm,
            "--cloud-endpoint",
            cloud,
            "--imds-endpoint",
            imds,
        ],
    )
}

#[test]
#[allow(clippy::too_many_lines)] // one scenario, step by step
fn warm_pool_eni_attach_outage_and_release() -> Result<()> {
    if !require_root() || !moto_available() {
        return Ok(());
    }
    let w = Ec2World::new(MOTO_PORT, "eni")?;
    let (node, moto, id, instance, imds) = (&w.node, &w.moto, &w.id, &w.instance, &w.imds);
    let eni0 = moto.enis(node, instance)?[0]["id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let ep = moto.endpoint();
    let imds_ep = imds.endpoint();

    // A. Fresh node, warm-ip-target 5: exactly one AssignPrivateIpAddresses of 5.
    let mut agent = start_agent(node, "5", &ep, &imds_ep)?;
    let ok = moto.plug_until(node, instance, Duration::from_secs(30), || {
        agent.ipam_free() == 5
    })?;
    if !ok {
        bail!(
            "pool never reached 5 free: {:?}\n{}",
            ipam_status(&agent)?,
            agent.log()
        );
    }
    let m = agent.metrics(node)?;
    assert_eq!(calls(&m, "AssignPrivateIpAddresses", None), 1);
    assert_eq!(calls(&m, "AssignPrivateIpAddresses", Some("success")), 1);
    assert_eq!(calls(&m, "CreateNetworkInterface", None), 0);
    assert_eq!(calls(&m, "DescribeInstanceTypes", Some("success")), 1);
    let list = moto.enis(node, instance)?;
    assert_eq!(list.len(), 1);
    assert_eq!(secondaries(&list[0]).len(), 5);
    // Capacity: 3 ENIs x 5 secondary addresses, none allocated; the subnet's
    // free addresses as EC2 counts them.
    assert_eq!(whole(&m, "podnet_ipam_pods_remaining", &[]), 15);
    let subnet = id["subnet_id"].as_str().unwrap_or_default().to_owned();
    let subnet_free = || -> Result<u64> {
        let v = moto.ec2(node, &["subnet", &subnet])?;
        v["available"].as_u64().context("no available count")
    };
    let free_in_subnet = subnet_free()?;
    assert_subnet_gauge(&agent, node, &subnet, free_in_subnet);
    println!(
        "A: warm-ip-target=5 on a fresh node: AssignPrivateIpAddresses={} (5 addresses), CreateNetworkInterface=0, DescribeNetworkInterfaces={}",
        calls(&m, "AssignPrivateIpAddresses", None),
        calls(&m, "DescribeNetworkInterfaces", None)
    );

    // B. One pod: 4 free, eni0 full -> exactly one new ENI (create + attach),
    // holding the one missing address; no further assign call.
    let ip1 = agent.ipam_allocate("c1")?;
    assert!(
        !primaries(moto, node, instance)?.contains(&ip1),
        "{ip1} is a primary address"
    );
    assert!(secondaries(&list[0]).contains(&ip1));
    let ok = moto.plug_until(node, instance, Duration::from_secs(30), || {
        agent.ipam_free() == 5 && moto.enis(node, instance).is_ok_and(|l| l.len() == 2)
    })?;
    if !ok {
        bail!("no second ENI: {:?}\n{}", ipam_status(&agent)?, agent.log());
    }
    let m = agent.metrics(node)?;
    assert_eq!(calls(&m, "CreateNetworkInterface", None), 1);
    assert_eq!(calls(&m, "AttachNetworkInterface", None), 1);
    assert_eq!(calls(&m, "AssignPrivateIpAddresses", None), 1);
    let list = moto.enis(node, instance)?;
    assert!(list[1]["managed"].as_bool().unwrap_or(false));
    assert_eq!(list[1]["device_index"].as_u64(), Some(1));
    assert_eq!(secondaries(&list[1]).len(), 1);
    let en1 = links(node)?
        .into_iter()
        .find(|l| l["ifname"] == "en1")
        .context("no en1")?;
    assert_eq!(en1["mtu"].as_u64(), Some(9001));
    assert!(en1["flags"]
        .as_array()
        .is_some_and(|f| f.iter().any(|x| x == "UP")));
    let m = agent.metrics(node)?;
    assert_eq!(whole(&m, "podnet_ipam_pods_remaining", &[]), 14);
    let free_in_subnet = subnet_free()?;
    assert_subnet_gauge(&agent, node, &subnet, free_in_subnet);
    let text = agent.podnetctl(&["ipam"])?;
    assert!(
        text.contains(&format!(
            "capacity: 14 more pods; subnet: {free_in_subnet} free addresses"
        )),
        "{text}"
    );
    println!("B: one pod on a full ENI: CreateNetworkInterface=1 AttachNetworkInterface=1 AssignPrivateIpAddresses=1 (total); en1 up, MTU 9001");

    // C. The cloud becomes unreachable: pods still get warm addresses, the
    // agent backs off, and catches up once the cloud is back.
    let port = moto.port().to_string();
    let reject = [
        "INPUT",
        "-p",
        "tcp",
        "--dport",
        &port,
        "-j",
        "REJECT",
        "--reject-with",
        "tcp-reset",
    ];
    let mut add = vec!["-I"];
    add.extend_from_slice(&reject);
    iptables(node, &add)?;
    let mut pod_ips = vec![ip1.clone()];
    for c in ["c2", "c3", "c4"] {
        pod_ips.push(agent.ipam_allocate(c)?);
    }
    let prim = primaries_cached(&list);
    for ip in &pod_ips {
        assert!(!prim.contains(ip), "{ip} is a primary address");
    }
    let failing = podnet_tests::wait_for(
        || {
            agent
                .metrics(node)
                .is_ok_and(|m| calls(&m, "DescribeNetworkInterfaces", Some("unreachable")) >= 1)
        },
        Duration::from_secs(10),
    );
    assert!(failing, "no failed call counted:\n{}", agent.log());
    std::thread::sleep(Duration::from_secs(6));
    let m = agent.metrics(node)?;
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
    iptables(node, &del)?;
    let ok = moto.plug_until(node, instance, Duration::from_secs(40), || {
        agent.ipam_free() == 5
    })?;
    if !ok {
        bail!("no recovery: {:?}\n{}", ipam_status(&agent)?, agent.log());
    }
    let m = agent.metrics(node)?;
    assert_eq!(
        calls(&m, "AssignPrivateIpAddresses", Some("success")),
        2,
        "{}",
        agent.log()
    );
    assert_eq!(calls(&m, "CreateNetworkInterface", None), 1);
    let list = moto.enis(node, instance)?;
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
    let foreign = moto.ec2(node, &["foreign", instance, &subnet, "2"])?;
    moto.plug_links(node, instance)?;
    let agent = start_agent(node, "1", &ep, &imds_ep)?;
    let ok = moto.plug_until(node, instance, Duration::from_secs(30), || {
        moto.enis(node, instance)
            .is_ok_and(|l| l.len() == 2 && secondaries(&l[0]).len() == 1)
            && agent.ipam_free() == 1
    })?;
    if !ok {
        bail!(
            "no release: {:?}\n{}",
            moto.enis(node, instance)?,
            agent.log()
        );
    }
    let m = agent.metrics(node)?;
    assert_eq!(calls(&m, "DetachNetworkInterface", None), 1);
    assert_eq!(calls(&m, "DeleteNetworkInterface", None), 1);
    assert_eq!(calls(&m, "UnassignPrivateIpAddresses", None), 1);
    assert_eq!(calls(&m, "AssignPrivateIpAddresses", None), 0);
    assert_eq!(calls(&m, "CreateNetworkInterface", None), 0);
    let list = moto.enis(node, instance)?;
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

/// Every secondary address moto holds for the world's instance now.
fn held(w: &Ec2World) -> Result<BTreeSet<String>> {
    Ok(w.moto
        .enis(&w.node, &w.instance)?
        .iter()
        .flat_map(secondaries)
        .collect())
}

/// How old the listings of the stale-listing test may be.
const LISTING_AGE: Duration = Duration::from_secs(4);

#[test]
fn listings_four_seconds_old_reach_the_targets_once_and_hand_out_only_held_addresses() -> Result<()>
{
    if !require_root() || !moto_available() {
        return Ok(());
    }
    let w = Ec2World::new(MOTO_PORT, "enistale")?;
    // EC2's listings lag its changes: the agent sees moto through a proxy
    // that answers every listing with moto's oldest answer of the last 4 s.
    let proxy = ThrottleProxy::start(&w.node, w.moto.port())?;
    proxy.serve_listings_up_to(LISTING_AGE);
    let agent = start_agent(&w.node, "5", &proxy.endpoint(), &w.imds.endpoint())?;

    // A. warm-ip-target 5: one assign of 5, and nothing more for two
    // listing ages after the pool is full.
    if !w.until(Duration::from_secs(30), || agent.ipam_free() == 5)? {
        bail!("pool never reached 5 free: {}", agent.log());
    }
    w.until(2 * LISTING_AGE, || false)?;
    let m = agent.metrics(&w.node)?;
    assert_eq!(
        calls(&m, "AssignPrivateIpAddresses", None),
        1,
        "{}",
        agent.log()
    );
    assert_eq!(calls(&m, "UnassignPrivateIpAddresses", None), 0);
    assert_eq!(calls(&m, "CreateNetworkInterface", None), 0);
    let list = w.moto.enis(&w.node, &w.instance)?;
    assert_eq!(list.len(), 1);
    assert_eq!(secondaries(&list[0]).len(), 5);
    assert_eq!(agent.ipam_free(), 5);
    let listings = proxy
        .calls()
        .iter()
        .filter(|c| c.action == "DescribeNetworkInterfaces")
        .count();
    println!("A: listings up to 4 s old, warm-ip-target 5: AssignPrivateIpAddresses=1 (5 addresses) over {listings} listings, 5 free");

    // B. One pod: one new ENI, created once, though for 4 s no listing
    // shows it.
    let ip1 = agent.ipam_allocate("c1")?;
    assert!(
        held(&w)?.contains(&ip1),
        "{ip1} is not held by the instance"
    );
    let settled = || {
        agent.ipam_free() == 5
            && w.moto
                .enis(&w.node, &w.instance)
                .is_ok_and(|l| l.len() == 2)
    };
    if !w.until(Duration::from_secs(30), settled)? {
        bail!("no second ENI: {}", agent.log());
    }
    w.until(2 * LISTING_AGE, || false)?;
    let m = agent.metrics(&w.node)?;
    assert_eq!(
        calls(&m, "CreateNetworkInterface", None),
        1,
        "{}",
        agent.log()
    );
    assert_eq!(calls(&m, "AttachNetworkInterface", None), 1);
    assert_eq!(calls(&m, "AssignPrivateIpAddresses", None), 1);
    assert_eq!(calls(&m, "UnassignPrivateIpAddresses", None), 0);
    let list = w.moto.enis(&w.node, &w.instance)?;
    assert_eq!(list.len(), 2);
    assert_eq!(secondaries(&list[1]).len(), 1);

    // C. Pods take every free address: each one the instance holds.
    let held_now = held(&w)?;
    let mut given = BTreeSet::from([ip1]);
    for c in ["c2", "c3", "c4", "c5", "c6"] {
        let ip = agent.ipam_allocate(c)?;
        assert!(held_now.contains(&ip), "{ip} is not held by the instance");
        given.insert(ip);
    }
    assert_eq!(given.len(), 6);
    println!("B/C: one new ENI (CreateNetworkInterface=1, AttachNetworkInterface=1), still AssignPrivateIpAddresses=1; 6 pods on 6 distinct held addresses");
    Ok(())
}

/// Inserts (`-I`) or deletes (`-D`) a rule that resets TCP connections to
/// `port` in `node`: the cloud endpoint behind it goes down.
fn reject_tcp(node: &Netns, op: &'static str, port: &str) -> Result<()> {
    iptables(
        node,
        &[
            op,
            "INPUT",
            "-p",
            "tcp",
            "--dport",
            port,
            "-j",
            "REJECT",
            "--reject-with",
            "tcp-reset",
        ],
    )
    .map(drop)
}

/// The port of an `http://host:port` endpoint.
fn port_of(endpoint: &str) -> String {
    endpoint.rsplit(':').next().unwrap_or_default().to_owned()
}

#[test]
fn an_agent_restarted_while_the_cloud_is_down_serves_its_saved_pool() -> Result<()> {
    if !require_root() || !moto_available() {
        return Ok(());
    }
    let w = Ec2World::new(MOTO_PORT, "enioutage")?;
    let mut agent = start_agent(&w.node, "3", &w.moto.endpoint(), &w.imds.endpoint())?;
    if !w.until(Duration::from_secs(30), || agent.ipam_free() == 3)? {
        bail!("pool never reached 3 free: {}", agent.log());
    }
    let ip1 = agent.ipam_allocate("c1")?;
    if !w.until(Duration::from_secs(30), || agent.ipam_free() == 3)? {
        bail!("pool never refilled: {}", agent.log());
    }
    let held_before = held(&w)?;
    assert_eq!(held_before.len(), 4);
    agent.stop()?;

    // EC2 and the metadata service become unreachable; the agent restarts.
    let imds_port = port_of(&w.imds.endpoint());
    let moto_port = w.moto.port().to_string();
    let rule = |op: &'static str, port: &str| reject_tcp(&w.node, op, port);
    rule("-I", &moto_port)?;
    rule("-I", &imds_port)?;
    let restarted = agent.start_again(&w.node);
    let outcome = (|| -> Result<()> {
        restarted?;
        let log = agent.log();
        assert!(
            log.contains("serving the saved ENI pool until the cloud API answers"),
            "{log}"
        );
        // Three ADDs succeed from the saved pool: the three free addresses.
        let mut given = BTreeSet::new();
        for c in ["c2", "c3", "c4"] {
            let ip = agent.ipam_allocate(c)?;
            assert!(held_before.contains(&ip), "{ip} was not held");
            assert_ne!(ip, ip1);
            given.insert(ip);
        }
        assert_eq!(given.len(), 3);
        println!("outage restart: 3 ADDs from the saved pool: {given:?}");
        Ok(())
    })();
    rule("-D", &moto_port)?;
    rule("-D", &imds_port)?;
    outcome?;

    // The cloud is back: the pool tops up to 3 free again.
    if !w.until(Duration::from_secs(40), || agent.ipam_free() == 3)? {
        bail!("no recovery: {}", agent.log());
    }
    assert_eq!(held(&w)?.len(), 7);
    Ok(())
}

#[test]
fn an_eni_left_between_create_and_attach_is_deleted_after_the_grace() -> Result<()> {
    if !require_root() || !moto_available() {
        return Ok(());
    }
    let w = Ec2World::new(MOTO_PORT, "enileak")?;
    let proxy = ThrottleProxy::start(&w.node, w.moto.port())?;
    let mut agent = Agent::start_with(
        &w.node,
        &[],
        &[
            "--ipam-mode",
            "eni",
            "--warm-ip-target",
            "5",
            "--cloud-endpoint",
            &proxy.endpoint(),
            "--imds-endpoint",
            &w.imds.endpoint(),
            "--eni-leak-grace",
            "3s",
        ],
    )?;
    if !w.until(Duration::from_secs(30), || agent.ipam_free() == 5)? {
        bail!("pool never reached 5 free: {}", agent.log());
    }
    let all_enis = |w: &Ec2World| -> Result<BTreeSet<String>> {
        Ok(w.moto
            .ec2(&w.node, &["all-enis"])?
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect())
    };
    let before = all_enis(&w)?;
    assert_eq!(before.len(), 1);

    // One pod makes the agent create an ENI; its attach never comes back,
    // and the agent dies (SIGKILL) while waiting for it.
    proxy.hold("AttachNetworkInterface");
    agent.ipam_allocate("c1")?;
    let attaching = podnet_tests::wait_for(
        || {
            proxy
                .calls()
                .iter()
                .any(|c| c.action == "AttachNetworkInterface")
        },
        Duration::from_secs(20),
    );
    assert!(attaching, "no attach call: {}", agent.log());
    agent.kill()?;
    proxy.release();
    let orphans: BTreeSet<String> = all_enis(&w)?.difference(&before).cloned().collect();
    assert_eq!(orphans.len(), 1, "{orphans:?}");
    assert_eq!(w.moto.enis(&w.node, &w.instance)?.len(), 1);

    // The next agent deletes it once it is 3 s old, and attaches a new one.
    agent.start_again(&w.node)?;
    let done = w.until(Duration::from_secs(40), || {
        all_enis(&w).is_ok_and(|all| orphans.iter().all(|o| !all.contains(o)))
            && w.moto
                .enis(&w.node, &w.instance)
                .is_ok_and(|l| l.len() == 2)
            && agent.ipam_free() == 5
    })?;
    if !done {
        bail!("orphan {orphans:?} not deleted: {}", agent.log());
    }
    let all = all_enis(&w)?;
    assert_eq!(all.len(), 2, "{all:?}");
    let log = agent.log();
    assert_eq!(
        log.matches("deleted a leaked ENI of this instance").count(),
        1,
        "{log}"
    );
    println!("leaked ENI {orphans:?} deleted by the next agent; the instance holds 2 ENIs, 2 in the account");
    Ok(())
}

/// The EC2 world's VPC router.
const VPC_ROUTER: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 1, 1));
/// Time between two pings of the gateway test.
const PING_GAP: Duration = Duration::from_millis(200);

fn mac_of(netns: &Netns, ifname: &str) -> Result<String> {
    let out = netns.run_ok(&["ip", "-j", "link", "show", ifname])?;
    let v: Value = serde_json::from_slice(&out.stdout)?;
    v[0]["address"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("{ifname} has no MAC"))
}

/// Every IPv4 address configured in `netns`, loopback's aside.
fn local_addresses(netns: &Netns) -> Result<BTreeSet<String>> {
    let out = netns.run_ok(&["ip", "-j", "-4", "addr", "show"])?;
    let v: Value = serde_json::from_slice(&out.stdout)?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter(|l| l["ifname"] != "lo")
        .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
        .filter_map(|a| a["local"].as_str().map(str::to_owned))
        .collect())
}

#[test]
#[allow(clippy::too_many_lines)] // one scenario, step by step
fn a_pods_packets_to_the_vpc_router_leave_by_its_eni_and_the_node_keeps_its_route() -> Result<()> {
    if !require_root() || !moto_available() || !cni::ready() {
        return Ok(());
    }
    let w = Ec2World::new(MOTO_PORT, "enigw")?;
    // No IPv6 chatter on the links whose packets are counted.
    for key in ["all", "default"] {
        w.node.run_ok(&[
            "sysctl",
            "-qw",
            &format!("net.ipv6.conf.{key}.disable_ipv6=1"),
        ])?;
    }
    // The VPC: the primary ENI's far end, with the VPC router 10.0.1.1.
    let vpc = Netns::new("enigwvpc")?;
    let id = w.moto.enis(&w.node, &w.instance)?;
    let primary = id[0]["primary_ip"].as_str().unwrap_or_default().to_owned();
    w.node
        .run_ok(&["ip", "link", "set", "en0p", "netns", vpc.name()])?;
    vpc.run_ok(&["ip", "addr", "add", "10.0.1.1/24", "dev", "en0p"])?;
    vpc.run_ok(&["ip", "link", "set", "en0p", "up"])?;
    w.node
        .run_ok(&["ip", "addr", "add", &format!("{primary}/24"), "dev", "en0"])?;
    w.node.run_ok(&["ip", "link", "set", "en0", "up"])?;
    // Neighbours fixed on both ends, so the counters see no ARP.
    let (en0, en0p) = (mac_of(&w.node, "en0")?, mac_of(&vpc, "en0p")?);
    w.node.run_ok(&[
        "ip",
        "neigh",
        "replace",
        "10.0.1.1",
        "lladdr",
        &en0p,
        "dev",
        "en0",
        "nud",
        "permanent",
    ])?;
    vpc.run_ok(&[
        "ip",
        "neigh",
        "replace",
        &primary,
        "lladdr",
        &en0,
        "dev",
        "en0p",
        "nud",
        "permanent",
    ])?;

    let agent = start_agent(&w.node, "2", &w.moto.endpoint(), &w.imds.endpoint())?;
    if !w.until(Duration::from_secs(30), || agent.ipam_free() == 2)? {
        bail!("pool never reached 2 free: {}", agent.log());
    }

    // A pod through the shipped chain: ptp, podnet-cni as IPAM, podnet-cni.
    let env = CniEnv::new()?;
    let list = env.ptp_chain("enigw", &agent.socket())?;
    let pod = Netns::new("enigwpod")?;
    let att = Attachment::pod("gw1", &pod, "web", "frontend");
    let result = env.run(&w.node, "ADD", &list, &att, None)?.json()?;
    let address = result["ips"][0]["address"].as_str().unwrap_or_default();
    let pod_ip = address.split('/').next().unwrap_or_default().to_owned();
    assert_eq!(result["ips"][0]["gateway"], "169.254.1.1", "{result}");
    assert!(
        result["routes"]
            .as_array()
            .is_some_and(|r| r.contains(&json!({"dst": "0.0.0.0/0", "gw": "169.254.1.1"}))),
        "{result}"
    );
    assert!(
        held(&w)?.contains(&pod_ip),
        "{pod_ip} is not the instance's"
    );
    // The pod routes everything through the link-local gateway ...
    let routes =
        String::from_utf8_lossy(&pod.run_ok(&["ip", "-4", "route", "show"])?.stdout).into_owned();
    assert!(
        routes.contains("default via 169.254.1.1 dev eth0"),
        "{routes}"
    );
    // ... and the node holds no VPC address but its own primary.
    let local = local_addresses(&w.node)?;
    assert_eq!(
        local,
        BTreeSet::from([primary.clone(), "169.254.1.1".to_owned()]),
        "node addresses"
    );
    vpc.run_ok(&[
        "ip",
        "neigh",
        "replace",
        &pod_ip,
        "lladdr",
        &en0,
        "dev",
        "en0p",
        "nud",
        "permanent",
    ])?;
    let rule = format!("from {pod_ip} lookup 100");
    let rule_in_place = podnet_tests::wait_for(
        || {
            w.node
                .run_ok(&["ip", "rule", "show"])
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&rule))
        },
        Duration::from_secs(10),
    );
    assert!(rule_in_place, "no `{rule}`: {}", agent.log());

    // The pod's pings to the VPC router leave through its ENI (eni0, the
    // ENI holding its address) and the router answers each.
    let (tx0, rx0) = (
        link_packets(&w.node, "en0")?.tx,
        link_packets(&vpc, "en0p")?.rx,
    );
    assert_eq!(ping(&pod, VPC_ROUTER, 3, PING_GAP)?, 3);
    let (tx1, rx1) = (
        link_packets(&w.node, "en0")?.tx,
        link_packets(&vpc, "en0p")?.rx,
    );
    assert_eq!((tx1 - tx0, rx1 - rx0), (3, 3), "en0 tx, VPC rx");

    // The node's own route to the VPC router works, and leaves by en0 too.
    w.node.run_ok(&[
        "ip", "route", "replace", "default", "via", "10.0.1.1", "dev", "en0",
    ])?;
    assert_eq!(ping(&w.node, VPC_ROUTER, 3, PING_GAP)?, 3);
    let tx2 = link_packets(&w.node, "en0")?.tx;
    assert_eq!(tx2 - tx1, 3, "en0 tx of the node's pings");
    println!(
        "pod {pod_ip}: gateway 169.254.1.1, 3 pings to the VPC router -> en0 tx +{}, VPC rx +{}, 3 answers; node: 3 pings -> en0 tx +{}, 3 answers; node addresses {local:?}",
        tx1 - tx0,
        rx1 - rx0,
        tx2 - tx1
    );
    env.run(&w.node, "DEL", &list, &att, None)?;
    Ok(())
}

#[test]
fn custom_networking_puts_pods_on_secondary_enis_in_the_zones_subnet() -> Result<()> {
    if !require_root() || !moto_available() {
        return Ok(());
    }
    let w = Ec2World::new(MOTO_PORT, "enicustom")?;
    let (node, moto, id, instance) = (&w.node, &w.moto, &w.id, &w.instance);
    let proxy = ThrottleProxy::start(node, moto.port())?;
    let zone = id["availability_zone"].as_str().unwrap_or_default();
    let pods_subnet = id["pods_subnet_id"].as_str().unwrap_or_default();
    let pods_sg = id["pods_security_group"].as_str().unwrap_or_default();
    let configs = json!({ zone: {"subnet": pods_subnet, "securityGroups": [pods_sg]} }).to_string();
    let agent = Agent::start_with(
        node,
        &[],
        &[
            "--ipam-mode",
            "eni",
            "--warm-ip-target",
            "3",
            "--cloud-endpoint",
            &proxy.endpoint(),
            "--imds-endpoint",
            &w.imds.endpoint(),
            "--eni-configs",
            &configs,
        ],
    )?;
    if !w.until(Duration::from_secs(30), || agent.ipam_free() == 3)? {
        bail!("pool never reached 3 free: {}", agent.log());
    }
    // The primary ENI holds no pod address; one new ENI in the pods'
    // subnet holds the three.
    let list = moto.enis(node, instance)?;
    assert_eq!(list.len(), 2, "{list:?}");
    assert_eq!(secondaries(&list[0]).len(), 0);
    assert_eq!(list[0]["subnet_id"], id["subnet_id"]);
    assert_eq!(list[1]["subnet_id"].as_str(), Some(pods_subnet));
    // The interface was created with the zone's security group only (moto
    // reports an attached interface's groups together with the instance's,
    // so the request is what tells).
    let creates: Vec<Vec<(String, String)>> = proxy
        .calls()
        .into_iter()
        .filter(|c| c.action == "CreateNetworkInterface")
        .map(|c| c.params)
        .collect();
    assert_eq!(creates.len(), 1);
    let groups: Vec<&str> = creates[0]
        .iter()
        .filter(|(k, _)| k.starts_with("SecurityGroupId."))
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(groups, [pods_sg]);
    let subnet_param = creates[0].iter().find(|(k, _)| k == "SubnetId");
    assert_eq!(subnet_param.map(|(_, v)| v.as_str()), Some(pods_subnet));
    assert_eq!(secondaries(&list[1]).len(), 3);
    let m = agent.metrics(node)?;
    assert_eq!(calls(&m, "AssignPrivateIpAddresses", None), 0);
    assert_eq!(calls(&m, "CreateNetworkInterface", None), 1);
    // 2 ENIs for pods (of 3) x 5 secondary addresses.
    assert_eq!(whole(&m, "podnet_ipam_pods_remaining", &[]), 10);
    let ip = agent.ipam_allocate("c1")?;
    assert!(ip.starts_with("10.0.2."), "{ip}");
    assert!(secondaries(&list[1]).contains(&ip));
    let status = ipam_status(&agent)?;
    assert_eq!(status["pools"][0]["prefix"], "10.0.2.0/24", "{status}");
    println!("custom networking in {zone}: pods on {} in {pods_subnet} (10.0.2.0/24) with {pods_sg}, primary ENI left to the node; pod address {ip}; 10 more pods before the pod", list[1]["id"]);
    Ok(())
}

/// The ENI-mode flags of an agent that talks to EC2 through `proxy`.
fn eni_args<'a>(proxy: &'a str, imds: &'a str) -> Vec<&'a str> {
    vec![
        "--ipam-mode",
        "eni",
        "--warm-ip-target",
        "1",
        "--cloud-endpoint",
        proxy,
        "--imds-endpoint",
        imds,
    ]
}

/// The access keys that signed the EC2 calls through `proxy` from `from` on.
fn signing_keys(proxy: &ThrottleProxy, from: usize) -> BTreeSet<Option<String>> {
    proxy
        .calls()
        .iter()
        .skip(from)
        .filter(|c| c.action != "AssumeRoleWithWebIdentity")
        .map(|c| c.access_key.clone())
        .collect()
}

#[test]
fn irsa_and_pod_identity_credentials_sign_the_ec2_calls() -> Result<()> {
    if !require_root() || !moto_available() {
        return Ok(());
    }
    let w = Ec2World::new(MOTO_PORT, "enicreds")?;
    let proxy = ThrottleProxy::start(&w.node, w.moto.port())?;
    let (ep, imds) = (proxy.endpoint(), w.imds.endpoint());
    let dir = tempfile::tempdir()?;

    // IRSA: a projected service-account token and a role; STS is moto's,
    // through the proxy (AWS_ENDPOINT_URL_STS, as the SDKs read it).
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "eyJhbGciOiJSUzI1NiJ9.podnet-node.signature\n")?;
    let role = "arn:aws:iam::123456789012:role/podnet-node";
    let token_path = token_file.display().to_string();
    let mut agent = Agent::start_with_env(
        &w.node,
        &[],
        &eni_args(&ep, &imds),
        &[
            ("AWS_WEB_IDENTITY_TOKEN_FILE", &token_path),
            ("AWS_ROLE_ARN", role),
            ("AWS_ROLE_SESSION_NAME", "podnet-node"),
            ("AWS_ENDPOINT_URL_STS", &ep),
        ],
    )?;
    if !w.until(Duration::from_secs(30), || agent.ipam_free() == 1)? {
        bail!("pool never reached 1 free: {}", agent.log());
    }
    let proxied = proxy.calls();
    let sts: Vec<_> = proxied
        .iter()
        .filter(|c| c.action == "AssumeRoleWithWebIdentity")
        .collect();
    assert_eq!(
        sts.len(),
        1,
        "credentials are reused until shortly before expiry"
    );
    let param = |name: &str| {
        sts[0]
            .params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(param("RoleArn").as_deref(), Some(role));
    assert_eq!(
        param("WebIdentityToken").as_deref(),
        Some("eyJhbGciOiJSUzI1NiJ9.podnet-node.signature")
    );
    assert_eq!(
        sts[0].access_key, None,
        "AssumeRoleWithWebIdentity is unsigned"
    );
    let issued = sts[0]
        .answer
        .split("<AccessKeyId>")
        .nth(1)
        .and_then(|a| a.split("</AccessKeyId>").next())
        .context("no AccessKeyId in the STS answer")?
        .to_owned();
    // Every EC2 call was signed with the role's key, none with the
    // instance profile's (the fake metadata service offers one).
    assert_eq!(
        signing_keys(&proxy, 0),
        BTreeSet::from([Some(issued.clone())])
    );
    let m = agent.metrics(&w.node)?;
    assert_eq!(calls(&m, "AssumeRoleWithWebIdentity", Some("success")), 1);
    let ec2_calls = proxied.len() - 1;
    agent.stop()?;

    // EKS Pod Identity: the container credentials endpoint and its token.
    let endpoint = CredentialsEndpoint::start(&w.node, "pod-identity-token", "ASIAPODIDENTITY")?;
    let pod_token = dir.path().join("eks-pod-identity-token");
    std::fs::write(&pod_token, "pod-identity-token")?;
    let from = proxy.calls().len();
    let pod_token_path = pod_token.display().to_string();
    let uri = endpoint.uri();
    let agent = Agent::start_with_env(
        &w.node,
        &[],
        &eni_args(&ep, &imds),
        &[
            ("AWS_CONTAINER_CREDENTIALS_FULL_URI", &uri),
            ("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", &pod_token_path),
        ],
    )?;
    let signed = podnet_tests::wait_for(
        || proxy.calls().len() >= from + 3 && agent.ipam_free() == 1,
        Duration::from_secs(20),
    );
    assert!(signed, "no EC2 calls: {}", agent.log());
    assert_eq!(
        signing_keys(&proxy, from),
        BTreeSet::from([Some("ASIAPODIDENTITY".to_owned())])
    );
    assert_eq!(endpoint.served(), 1);
    println!(
        "IRSA: 1 AssumeRoleWithWebIdentity ({role}), {ec2_calls} EC2 calls signed with {issued}; Pod Identity: {} EC2 calls signed with ASIAPODIDENTITY, 1 credentials request",
        proxy.calls().len() - from
    );
    Ok(())
}

/// The `/28` prefixes moto holds for `eni` (the test world adds prefix
/// delegation in front of moto: `tests/fixtures/eni/moto_server.py`).
fn prefixes(eni: &Value) -> Vec<String> {
    eni["prefixes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect()
}

/// Whether `ip` lies in one of the `/28` prefixes `held`.
fn in_prefixes(ip: &str, held: &[String]) -> bool {
    let Ok(ip) = ip.parse::<std::net::Ipv4Addr>() else {
        return false;
    };
    held.iter().any(|p| {
        p.split_once('/')
            .and_then(|(net, _)| net.parse::<std::net::Ipv4Addr>().ok())
            .is_some_and(|net| u32::from(ip) & !15 == u32::from(net))
    })
}

/// The ENI-mode flags of a prefix-delegation agent with `targets`.
fn prefix_args<'a>(cloud: &'a str, imds: &'a str, targets: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--ipam-mode",
        "eni",
        "--eni-prefix-delegation",
        "--cloud-endpoint",
        cloud,
        "--imds-endpoint",
        imds,
    ];
    args.extend_from_slice(targets);
    args
}

#[test]
fn prefix_delegation_reaches_the_ip_targets_in_prefixes_and_hands_out_their_addresses() -> Result<()>
{
    if !require_root() || !moto_available() {
        return Ok(());
    }
    let w = Ec2World::new(MOTO_PORT, "eniprefix")?;
    let (node, moto, instance) = (&w.node, &w.moto, &w.instance);
    let ep = moto.endpoint();
    let imds = w.imds.endpoint();
    let agent = Agent::start_with(
        node,
        &[],
        &prefix_args(
            &ep,
            &imds,
            &["--warm-ip-target", "5", "--minimum-ip-target", "20"],
        ),
    )?;
    // A. minimum-ip-target 20: two /28s (32 addresses) in one call.
    if !w.until(Duration::from_secs(30), || agent.ipam_free() == 32)? {
        bail!("pool never reached 32 free: {}", agent.log());
    }
    let m = agent.metrics(node)?;
    assert_eq!(calls(&m, "AssignPrivateIpAddresses", None), 1);
    assert_eq!(calls(&m, "CreateNetworkInterface", None), 0);
    let list = moto.enis(node, instance)?;
    assert_eq!(list.len(), 1);
    assert_eq!(prefixes(&list[0]).len(), 2, "{list:?}");
    assert_eq!(secondaries(&list[0]).len(), 0);
    // t3.medium: 3 ENIs x 5 prefixes x 16 addresses.
    assert_eq!(whole(&m, "podnet_ipam_pods_remaining", &[]), 240);
    assert_eq!(
        whole(&m, "podnet_eni_insufficient_cidr_blocks_total", &[]),
        0
    );
    let assign = w
        .moto
        .enis(node, instance)
        .map(|l| prefixes(&l[0]))
        .unwrap_or_default();
    println!("A: minimum-ip-target 20, warm-ip-target 5: 1 AssignPrivateIpAddresses, prefixes {assign:?}, 32 free, 240 more pods");

    // B. 28 pods: each on an address of a prefix EC2 holds for the node;
    // 4 free is below 5: a third prefix.
    let held = prefixes(&list[0]);
    let mut given = BTreeSet::new();
    for n in 0..28 {
        let ip = agent.ipam_allocate(&format!("c{n}"))?;
        assert!(in_prefixes(&ip, &held), "{ip} is not in {held:?}");
        given.insert(ip);
    }
    assert_eq!(given.len(), 28);
    if !w.until(Duration::from_secs(30), || agent.ipam_free() == 20)? {
        bail!("no third prefix: {}", agent.log());
    }
    let m = agent.metrics(node)?;
    assert_eq!(calls(&m, "AssignPrivateIpAddresses", None), 2);
    assert_eq!(calls(&m, "UnassignPrivateIpAddresses", None), 0);
    let list = moto.enis(node, instance)?;
    assert_eq!(prefixes(&list[0]).len(), 3, "{list:?}");
    assert_eq!(whole(&m, "podnet_ipam_pods_remaining", &[]), 240 - 28);
    let text = agent.podnetctl(&["ipam"])?;
    assert!(
        text.contains("prefix delegation: ENIs hold /28 prefixes of 16 addresses"),
        "{text}"
    );
    assert!(text.contains("max 240 pods"), "{text}");
    println!("B: 28 pods on 28 distinct addresses of the held prefixes; 4 free < 5: AssignPrivateIpAddresses=2, 3 prefixes, 20 free, 212 more pods");
    Ok(())
}

#[test]
fn a_fragmented_subnet_is_explained_in_the_add_error_and_counted() -> Result<()> {
    if !require_root() || !moto_available() {
        return Ok(());
    }
    let w = Ec2World::new(MOTO_PORT, "enifrag")?;
    let (node, moto) = (&w.node, &w.moto);
    let subnet = w.id["subnet_id"].as_str().unwrap_or_default();
    // One address in every /28 block of the node's subnet: free addresses
    // left, no free block for a prefix.
    let fragment = moto.ec2(node, &["fragment", subnet])?;
    let free_before = moto.ec2(node, &["subnet", subnet])?["available"]
        .as_u64()
        .unwrap_or(0);
    let proxy = ThrottleProxy::start(node, moto.port())?;
    let agent = Agent::start_with(
        node,
        &[],
        &prefix_args(
            &proxy.endpoint(),
            &w.imds.endpoint(),
            &["--warm-prefix-target", "1"],
        ),
    )?;
    let refused = |p: &ThrottleProxy| {
        p.calls()
            .iter()
            .filter(|c| c.answer.contains("<Code>InsufficientCidrBlocks</Code>"))
            .count() as u64
    };
    if !w.until(Duration::from_secs(30), || refused(&proxy) >= 2)? {
        bail!("EC2 never refused twice: {}", agent.log());
    }
    // The ADD fails with EC2's code and what it means.
    let err = agent.ipam_allocate("c1").unwrap_err().to_string();
    for part in [
        "InsufficientCidrBlocks",
        "no free aligned /28 block",
        "fragmented",
    ] {
        assert!(err.contains(part), "{part:?} not in {err}");
    }
    // The counter is exactly EC2's refusals (read between two equal reads:
    // the agent retries with backoff, seconds apart).
    let mut agreed = None;
    for _ in 0..5 {
        let before = whole(
            &agent.metrics(node)?,
            "podnet_eni_insufficient_cidr_blocks_total",
            &[],
        );
        let answers = refused(&proxy);
        let after = whole(
            &agent.metrics(node)?,
            "podnet_eni_insufficient_cidr_blocks_total",
            &[],
        );
        if before == after {
            assert_eq!(before, answers, "{}", agent.log());
            agreed = Some(answers);
            break;
        }
    }
    let Some(refusals) = agreed else {
        bail!("the counter kept moving");
    };
    println!("fragmented subnet ({free_before} free addresses, no free /28): {refusals} InsufficientCidrBlocks answers, counted {refusals}; ADD error: {err}");

    // Once the blocks are free again, the next retry (backoff at most 16 s)
    // gets a prefix and pods get its addresses.
    let id = fragment["id"].as_str().unwrap_or_default();
    moto.ec2(node, &["delete", id])?;
    if !w.until(Duration::from_secs(30), || agent.ipam_free() == 16)? {
        bail!("no prefix after the subnet was freed: {}", agent.log());
    }
    let list = moto.enis(node, &w.instance)?;
    let first = prefixes(&list[0]);
    assert_eq!(first.len(), 1, "{list:?}");
    let ip = agent.ipam_allocate("c1")?;
    assert!(in_prefixes(&ip, &first), "{ip} not in {first:?}");
    // warm-prefix-target 1: the only prefix is partly used now, so a second.
    if !w.until(Duration::from_secs(30), || agent.ipam_free() == 31)? {
        bail!("no second prefix: {}", agent.log());
    }
    let list = moto.enis(node, &w.instance)?;
    assert_eq!(prefixes(&list[0]).len(), 2, "{list:?}");
    let m = agent.metrics(node)?;
    assert_eq!(
        whole(&m, "podnet_eni_insufficient_cidr_blocks_total", &[]),
        refused(&proxy)
    );
    println!("after the blocks were freed: pod {ip} in {first:?}, then a second prefix (warm-prefix-target 1), 31 free");
    Ok(())
}

/// Whether IPv6 `ip` lies in `prefix` (`net/len`).
fn in_ipv6_prefix(ip: &str, prefix: &str) -> bool {
    let parsed = prefix.split_once('/').and_then(|(net, len)| {
        Some((
            net.parse::<std::net::Ipv6Addr>().ok()?,
            len.parse::<u32>().ok().filter(|l| (1..=128).contains(l))?,
        ))
    });
    let (Ok(ip), Some((net, len))) = (ip.parse::<std::net::Ipv6Addr>(), parsed) else {
        return false;
    };
    let mask = u128::MAX << (128 - len);
    u128::from(ip) & mask == u128::from(net) & mask
}

/// The addresses of one `ipam.allocate` for `container`, IPv4 first.
fn allocate_both(agent: &Agent, container: &str) -> Result<(String, String)> {
    let a = agent.api(
        "ipam.allocate",
        json!({"containerId": container, "ifName": "eth0", "network": "podnet"}),
    )?;
    let ips: Vec<String> = a["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["ip"].as_str().map(str::to_owned))
        .collect();
    match &ips[..] {
        [v4, v6] if !v4.contains(':') && v6.contains(':') => Ok((v4.clone(), v6.clone())),
        _ => bail!("not one address per family: {a}"),
    }
}

#[test]
fn ipv6_mode_gives_every_pod_an_address_of_the_primary_enis_prefix() -> Result<()> {
    if !require_root() || !moto_available() {
        return Ok(());
    }
    let w = Ec2World::new(MOTO_PORT, "eniv6")?;
    let (node, moto, instance) = (&w.node, &w.moto, &w.instance);
    let subnet = w.id["subnet_id"].as_str().unwrap_or_default();
    let subnet_v6 = moto.ec2(node, &["ipv6", subnet])?["subnet_ipv6"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    // Listings up to 4 s old: the prefix is delegated once all the same.
    let proxy = ThrottleProxy::start(node, moto.port())?;
    proxy.serve_listings_up_to(LISTING_AGE);
    let mut agent = Agent::start_with(
        node,
        &[],
        &[
            "--ipam-mode",
            "eni",
            "--eni-ipv6",
            "--warm-ip-target",
            "2",
            "--cloud-endpoint",
            &proxy.endpoint(),
            "--imds-endpoint",
            &w.imds.endpoint(),
        ],
    )?;
    let v6_pool = |agent: &Agent| {
        ipam_status(agent).ok().and_then(|s| {
            s["pools"].as_array().and_then(|pools| {
                pools
                    .iter()
                    .find_map(|p| p["prefix"].as_str().filter(|p| p.ends_with("/80")))
                    .map(str::to_owned)
            })
        })
    };
    if !w.until(Duration::from_secs(30), || {
        agent.ipam_free() == 2 && v6_pool(&agent).is_some()
    })? {
        bail!("no IPv6 prefix: {}", agent.log());
    }
    w.until(2 * LISTING_AGE, || false)?;
    let m = agent.metrics(node)?;
    assert_eq!(calls(&m, "AssignIpv6Addresses", None), 1, "{}", agent.log());
    let list = moto.enis(node, instance)?;
    let listed: Vec<String> = list[0]["ipv6_prefixes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p.as_str().map(str::to_owned))
        .collect();
    assert_eq!(listed.len(), 1, "{list:?}");
    let prefix = listed[0].clone();
    assert_eq!(v6_pool(&agent).as_deref(), Some(prefix.as_str()));
    let prefix_net = prefix.split('/').next().unwrap_or_default();
    assert!(
        in_ipv6_prefix(prefix_net, &subnet_v6),
        "{prefix} not in {subnet_v6}"
    );
    let (v4, v6) = allocate_both(&agent, "c1")?;
    assert!(held(&w)?.contains(&v4), "{v4} is not held");
    assert!(in_ipv6_prefix(&v6, &prefix), "{v6} not in {prefix}");
    let text = agent.podnetctl(&["ipam"])?;
    assert!(text.contains(&prefix), "{text}");
    println!("IPv6 mode: subnet {subnet_v6}, primary ENI prefix {prefix} (1 AssignIpv6Addresses under listings up to 4 s old); pod c1 {v4} and {v6}");

    // Restarted while EC2 and IMDS are down: the saved pool serves both
    // families.
    agent.stop()?;
    let ports = [port_of(&proxy.endpoint()), port_of(&w.imds.endpoint())];
    for port in &ports {
        reject_tcp(node, "-I", port)?;
    }
    let outcome = agent
        .start_again(node)
        .and_then(|()| allocate_both(&agent, "c2"));
    for port in &ports {
        reject_tcp(node, "-D", port)?;
    }
    let (v4b, v6b) = outcome?;
    assert!(held(&w)?.contains(&v4b), "{v4b} is not held");
    assert!(in_ipv6_prefix(&v6b, &prefix), "{v6b} not in {prefix}");
    assert_ne!(v6b, v6);
    println!("restart with the cloud down: pod c2 {v4b} and {v6b} from the saved pool");
    Ok(())
}
