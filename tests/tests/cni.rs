//! podnet-cni end to end: chains of Debian's reference plugins run through
//! libcni (as container runtimes run them), the real agent behind the socket.

// Test code: a step that fails fails the test, with the step in the message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{net::IpAddr, time::Duration};

use podnet_tests::{
    cni::{self, Attachment, CniEnv},
    iptables, udp_send, Agent, Netns, Topology,
};
use serde_json::{json, Value};

const NODE_CIDR: &str = "10.244.7.0/24";
/// Usable addresses of [`NODE_CIDR`] (network, gateway and broadcast taken).
const NODE_CIDR_USABLE: usize = 253;

/// Pods per chain test: 50, or `PODNET_TEST_CNI_PODS` (a multiple of 10 from
/// 10 to 250) where each pod costs more; `cargo xtask vm-test` uses 10 under
/// emulation. Every count below is derived from it.
fn pod_count() -> usize {
    let Ok(value) = std::env::var("PODNET_TEST_CNI_PODS") else {
        return 50;
    };
    match value.parse::<usize>() {
        Ok(n) if (10..=250).contains(&n) && n % 10 == 0 => n,
        _ => panic!("PODNET_TEST_CNI_PODS={value:?}: expected a multiple of 10 from 10 to 250"),
    }
}

fn ptp_conflist(env: &CniEnv, agent: &Agent) -> String {
    env.ptp_chain_text("podnet-ptp", &agent.socket())
}

fn ipam_counts(agent: &Agent, node: &Netns) -> (u64, u64, u64) {
    let m = agent.metrics(node).unwrap();
    (
        m.count("podnet_ipam_addresses", &[("state", "allocated")]),
        m.count("podnet_ipam_addresses", &[("state", "cooldown")]),
        m.count("podnet_ipam_addresses", &[("state", "free")]),
    )
}

fn ping(from: &Netns, to: IpAddr) -> bool {
    from.run(&["ping", "-c1", "-W1", &to.to_string()])
        .is_ok_and(|o| o.status.success())
}

fn pod_ip(result: &Value) -> IpAddr {
    let addr = result["ips"][0]["address"].as_str().unwrap();
    addr.split('/').next().unwrap().parse().unwrap()
}

/// ptp + podnet IPAM + podnet chained: ADD, CHECK, DEL, GC for 50 pods
/// (see [`pod_count`]); pods reach each other and a server.
#[test]
#[allow(clippy::too_many_lines)] // one scenario, step by step
fn ptp_chain_fifty_pods() {
    if !cni::ready() {
        return;
    }
    let topo = Topology::builder().name("cniptp").pods(0).build().unwrap();
    let node = topo.node();
    let agent = Agent::start_with(node, &[], &["--node-cidr", NODE_CIDR]).unwrap();
    let env = CniEnv::new().unwrap();
    let list = env.conflist("ptp", &ptp_conflist(&env, &agent)).unwrap();

    let n = pod_count();
    let free = (NODE_CIDR_USABLE - n) as u64;
    let pods: Vec<Netns> = (0..n).map(|_| Netns::new("cnipod").unwrap()).collect();
    let atts: Vec<Attachment> = pods
        .iter()
        .enumerate()
        .map(|(i, ns)| Attachment::pod(&format!("ctr{i:03}"), ns, "shop", &format!("cart-{i}")))
        .collect();
    let mut ips = Vec::new();
    for att in &atts {
        let out = env.run(node, "ADD", &list, att, None).unwrap();
        let result = out.json().unwrap();
        assert_eq!(result["ips"][0]["gateway"], json!("10.244.7.1"), "{result}");
        assert!(result["ips"][0]["address"]
            .as_str()
            .unwrap()
            .ends_with("/24"));
        ips.push(pod_ip(&result));
    }
    let mut unique = ips.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), n, "every pod has its own address");
    assert_eq!(ips[0].to_string(), "10.244.7.2");
    assert_eq!(ips[n - 1].to_string(), format!("10.244.7.{}", n + 1));
    assert_eq!(ipam_counts(&agent, node), (n as u64, 0, free));

    // The registry knows every pod by the identity from CNI_ARGS, with its host veth.
    let eps = agent.api("endpoint.list", Value::Null).unwrap();
    let eps = eps.as_array().unwrap();
    assert_eq!(eps.len(), n);
    let ep0 = eps.iter().find(|e| e["containerId"] == "ctr000").unwrap();
    assert_eq!(ep0["namespace"], "shop");
    assert_eq!(ep0["pod"], "cart-0");
    assert_eq!(ep0["podUid"], "uid-ctr000");
    assert_eq!(ep0["ips"], json!(["10.244.7.2"]));
    let host_if = ep0["interface"].as_str().unwrap().to_owned();
    assert!(node.run_ok(&["ip", "link", "show", &host_if]).is_ok());
    let table = agent.podnetctl(&["endpoints"]).unwrap();
    assert!(table.contains("shop/cart-0"), "{table}");
    let ipam = agent.podnetctl(&["ipam"]).unwrap();
    assert!(
        ipam.contains(&format!(
            "node-cidr 10.244.7.0/24: {n}/253 addresses allocated, 0 cooling down"
        )),
        "{ipam}"
    );

    // Pods reach each other and the server.
    assert!(ping(&pods[0], ips[1]), "pod 0 -> pod 1");
    assert!(ping(&pods[n - 1], ips[0]), "last pod -> pod 0");
    assert!(ping(&pods[0], topo.server_ipv4().into()), "pod 0 -> server");

    for att in &atts {
        if let Err(e) = env.run(node, "CHECK", &list, att, None) {
            panic!("CHECK {}: {e:#}", att.container_id);
        }
    }
    // CHECK notices a host interface that disappeared (ptp notices first,
    // since the pod's end goes with it; podnet's own check says why too).
    node.run_ok(&["ip", "link", "del", &host_if]).unwrap();
    assert!(env.run(node, "CHECK", &list, &atts[0], None).is_err());
    let e = agent
        .api(
            "endpoint.check",
            json!({"containerId": "ctr000", "ifName": "eth0", "ips": ["10.244.7.2"], "interface": host_if}),
        )
        .unwrap_err();
    assert_eq!(
        format!("{e:#}"),
        format!("endpoint.check: the podnet agent failed endpoint.check: host interface {host_if} of endpoint ctr000/eth0 does not exist (mismatch)")
    );
    let e = agent
        .api(
            "endpoint.check",
            json!({"containerId": "ctr001", "ifName": "eth0", "ips": ["10.244.7.99"]}),
        )
        .unwrap_err();
    assert!(
        format!("{e:#}").contains("is registered with [10.244.7.3], the runtime has [10.244.7.99]"),
        "{e:#}"
    );

    // DEL the first half (twice: DEL is idempotent).
    let (half, kept_until) = (n / 2, n * 9 / 10);
    let (kept, gone) = ((kept_until - half) as u64, (n - kept_until + half) as u64);
    for att in &atts[..half] {
        env.run(node, "DEL", &list, att, None).unwrap();
        env.run(node, "DEL", &list, att, None).unwrap();
    }
    assert_eq!(ipam_counts(&agent, node), (half as u64, half as u64, free));
    // GC keeping pods half..9/10: the last tenth is released.
    let valid: Vec<Value> = atts[half..kept_until]
        .iter()
        .map(|a| json!({"containerID": a.container_id, "ifname": a.if_name}))
        .collect();
    let valid = serde_json::to_string(&valid).unwrap();
    env.run(node, "GC", &list, &atts[0], Some(&valid)).unwrap();
    assert_eq!(ipam_counts(&agent, node), (kept, gone, free));
    assert_eq!(
        agent
            .api("endpoint.list", Value::Null)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        kept_until - half
    );

    let m = agent.metrics(node).unwrap();
    // n ADDs, each one ipam.allocate and one endpoint.add; n/2 pods deleted
    // twice, each DEL one ipam.release and one endpoint.del.
    let twice_n = 2 * n as u64;
    assert_eq!(
        m.count(
            "podnet_cni_requests_total",
            &[("command", "ADD"), ("result", "success")]
        ),
        twice_n
    );
    assert_eq!(
        m.count(
            "podnet_cni_requests_total",
            &[("command", "DEL"), ("result", "success")]
        ),
        twice_n
    );
    assert_eq!(
        m.count(
            "podnet_cni_requests_total",
            &[("command", "GC"), ("result", "success")]
        ),
        2
    );
    assert_eq!(
        m.count(
            "podnet_cni_request_duration_seconds_count",
            &[("command", "ADD")]
        ),
        twice_n
    );
    assert_eq!(
        m.count("podnet_ipam_allocations_total", &[("result", "success")]),
        n as u64
    );

    // A restart keeps allocations and endpoints.
    let mut agent = agent;
    agent.restart(node).unwrap();
    assert_eq!(ipam_counts(&agent, node), (kept, gone, free));
    assert_eq!(
        agent
            .api("endpoint.list", Value::Null)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        kept_until - half
    );
    for att in &atts[half..kept_until] {
        env.run(node, "DEL", &list, att, None).unwrap();
    }
    assert_eq!(ipam_counts(&agent, node), (0, n as u64, free));
}

/// bridge + host-local + podnet chained, 50 pods (see [`pod_count`]).
#[test]
fn bridge_host_local_chain_fifty_pods() {
    bridge_chain(false);
}

/// The same, and a bridged pod reaches the server through the node.
#[test]
fn bridge_host_local_chain_reaches_the_server() {
    bridge_chain(true);
}

#[allow(clippy::too_many_lines)] // one scenario, step by step
fn bridge_chain(check_server: bool) {
    if !cni::ready() {
        return;
    }
    let topo = Topology::builder().name("cnibr").pods(0).build().unwrap();
    let node = topo.node();
    let agent = Agent::start(node, &[]).unwrap();
    let env = CniEnv::new().unwrap();
    let keys = env.keys(&agent.socket());
    let data = env.dir().join("host-local");
    let list = env
        .conflist(
            "bridge",
            &format!(
                r#"{{"cniVersion": "1.0.0", "name": "podnet-bridge", "plugins": [
                {{"type": "bridge", "bridge": "pnbr0", "isGateway": true, "ipMasq": false,
                  "ipam": {{"type": "host-local", "subnet": "10.245.0.0/24", "dataDir": {:?},
                           "routes": [{{"dst": "0.0.0.0/0"}}]}}}},
                {{"type": "podnet-cni", {keys}}}
            ]}}"#,
                data.display().to_string()
            ),
        )
        .unwrap();
    let n = pod_count();
    let (deleted, kept_until) = (n / 5, n * 4 / 5);
    let pods: Vec<Netns> = (0..n).map(|_| Netns::new("cnibrpod").unwrap()).collect();
    let atts: Vec<Attachment> = pods
        .iter()
        .enumerate()
        .map(|(i, ns)| Attachment::pod(&format!("br{i:03}"), ns, "web", &format!("front-{i}")))
        .collect();
    let mut ips = Vec::new();
    for att in &atts {
        let result = env
            .run(node, "ADD", &list, att, None)
            .unwrap()
            .json()
            .unwrap();
        ips.push(pod_ip(&result));
    }
    let eps = agent.api("endpoint.list", Value::Null).unwrap();
    let eps = eps.as_array().unwrap();
    assert_eq!(eps.len(), n);
    for (att, ip) in atts.iter().zip(&ips) {
        let ep = eps
            .iter()
            .find(|e| e["containerId"] == att.container_id.as_str())
            .unwrap();
        assert_eq!(ep["ips"], json!([ip.to_string()]));
        let host_if = ep["interface"].as_str().unwrap();
        assert_ne!(host_if, "pnbr0", "the veth, not the bridge");
        // The veth is enslaved to the bridge in the node.
        let link = node.run_ok(&["ip", "-o", "link", "show", host_if]).unwrap();
        assert!(String::from_utf8_lossy(&link.stdout).contains("master pnbr0"));
    }
    assert!(ping(&pods[0], ips[1]));
    if check_server && !ping(&pods[3], topo.server_ipv4().into()) {
        let r = |ns: &Netns, c: &[&str]| {
            String::from_utf8_lossy(&ns.run(c).unwrap().stdout).into_owned()
        };
        panic!(
            "pod 3 -> server failed\npod routes:\n{}\nnode routes:\n{}\nnode->pod: {}\npod->gw: {}\nserver routes:\n{}\nnode nft:\n{}",
            r(&pods[3], &["ip", "route"]),
            r(node, &["ip", "route"]),
            ping(node, ips[3]),
            ping(&pods[3], "10.245.0.1".parse().unwrap()),
            r(topo.server(), &["ip", "route"]),
            r(node, &["iptables-save"]),
        );
    }
    for att in &atts {
        env.run(node, "CHECK", &list, att, None).unwrap();
    }
    for att in &atts[..deleted] {
        env.run(node, "DEL", &list, att, None).unwrap();
    }
    let valid: Vec<Value> = atts[deleted..kept_until]
        .iter()
        .map(|a| json!({"containerID": a.container_id, "ifname": a.if_name}))
        .collect();
    env.run(
        node,
        "GC",
        &list,
        &atts[0],
        Some(&serde_json::to_string(&valid).unwrap()),
    )
    .unwrap();
    assert_eq!(
        agent
            .api("endpoint.list", Value::Null)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        kept_until - deleted
    );
    // host-local's addresses are not podnet's: the agent's IPAM stayed empty.
    let status = agent.api("ipam.status", Value::Null).unwrap();
    assert_eq!(status["allocations"], json!(0));
    for att in &atts[deleted..] {
        env.run(node, "DEL", &list, att, None).unwrap();
    }
    assert_eq!(
        agent
            .api("endpoint.list", Value::Null)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        0
    );
}

/// A deterministic insert race between two CNI-created pods is labelled
/// with the namespace and pod from `CNI_ARGS`.
#[test]
fn races_between_cni_pods_carry_their_names() {
    if !cni::ready() {
        return;
    }
    let topo = Topology::builder().name("cnirace").pods(0).build().unwrap();
    let node = topo.node();
    let agent = Agent::start_with(node, &[], &["--node-cidr", NODE_CIDR]).unwrap();
    let env = CniEnv::new().unwrap();
    let list = env.conflist("ptp", &ptp_conflist(&env, &agent)).unwrap();
    let a_ns = Netns::new("cnira").unwrap();
    let b_ns = Netns::new("cnirb").unwrap();
    let a = Attachment::pod("racea", &a_ns, "dns", "resolver-a");
    let b = Attachment::pod("raceb", &b_ns, "dns", "resolver-b");
    let ip_a = pod_ip(
        &env.run(node, "ADD", &list, &a, None)
            .unwrap()
            .json()
            .unwrap(),
    );
    let ip_b = pod_ip(
        &env.run(node, "ADD", &list, &b, None)
            .unwrap()
            .json()
            .unwrap(),
    );
    let snat = format!("{}:40000-40000", topo.node_ipv4_to_server());
    iptables(
        node,
        &[
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-s",
            NODE_CIDR,
            "-p",
            "udp",
            "-j",
            "SNAT",
            "--to-source",
            &snat,
        ],
    )
    .unwrap();
    let server = std::net::SocketAddr::new(topo.server_ipv4().into(), 5353);
    udp_send(&a_ns, std::net::SocketAddr::new(ip_a, 5000), server, 1).unwrap();
    udp_send(&b_ns, std::net::SocketAddr::new(ip_b, 5001), server, 3).unwrap();
    let labels = [
        ("namespace", "dns"),
        ("pod", "resolver-b"),
        ("proto", "udp"),
    ];
    let ok = podnet_tests::wait_for(
        || {
            agent
                .metrics(node)
                .is_ok_and(|m| m.count("podnet_conntrack_insert_races_total", &labels) == 3)
        },
        Duration::from_secs(5),
    );
    let m = agent.metrics(node).unwrap();
    assert!(
        ok,
        "races: {}",
        m.0.lines()
            .filter(|l| l.contains("insert_races"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(
        m.count(
            "podnet_conntrack_insert_races_total",
            &[
                ("namespace", "dns"),
                ("pod", "resolver-a"),
                ("proto", "udp")
            ]
        ),
        0
    );
    env.run(node, "DEL", &list, &a, None).unwrap();
    env.run(node, "DEL", &list, &b, None).unwrap();
}

/// Bad inputs give the spec's codes and allocate nothing.
#[test]
fn bad_inputs_allocate_nothing() {
    if !podnet_tests::require_root() {
        return;
    }
    let topo = Topology::builder().name("cnibad").pods(0).build().unwrap();
    let node = topo.node();
    let agent = Agent::start_with(node, &[], &["--node-cidr", NODE_CIDR]).unwrap();
    let pod = Netns::new("cnibadpod").unwrap();
    let netns = pod.path().display().to_string();
    let socket = agent.socket().display().to_string();
    let log = std::env::temp_dir().join(format!("podnet-cni-bad-{}.log", std::process::id()));
    let log = log.display().to_string();
    let ipam_conf = format!(
        r#"{{"cniVersion":"1.0.0","name":"n","type":"ptp","ipam":{{"type":"podnet-cni","socket":"{socket}","logFile":"{log}"}}}}"#
    );
    let chained_conf = format!(
        r#"{{"cniVersion":"1.0.0","name":"n","type":"podnet-cni","socket":"{socket}","logFile":"{log}"}}"#
    );
    let base = cni::runtime_env("ADD", "bad1", &netns);
    let code = |env: &[(&str, &str)], stdin: &str| -> u64 {
        let (ok, out) = cni::invoke_plugin(env, stdin.as_bytes()).unwrap();
        assert!(!ok, "must fail: {out}");
        let v: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
        assert!(v["msg"].is_string() && v["details"].is_string(), "{v}");
        v["code"].as_u64().unwrap()
    };
    let without = |k: &str| {
        base.iter()
            .copied()
            .filter(|(n, _)| *n != k)
            .collect::<Vec<_>>()
    };
    assert_eq!(code(&base, "garbage{"), 6);
    assert_eq!(code(&base, &ipam_conf.replace("1.0.0", "9.9.9")), 1);
    assert_eq!(code(&without("CNI_NETNS"), &ipam_conf), 4);
    assert_eq!(code(&without("CNI_CONTAINERID"), &ipam_conf), 4);
    let bad_id = cni::runtime_env("ADD", "../etc", &netns);
    assert_eq!(code(&bad_id, &ipam_conf), 4);
    let mut bad_ifname = base.clone();
    bad_ifname[3] = ("CNI_IFNAME", "..");
    assert_eq!(code(&bad_ifname, &ipam_conf), 4);
    // Chained without prevResult.
    assert_eq!(code(&base, &chained_conf), 7);
    // Agent down.
    let down = ipam_conf.replace(&socket, "/nonexistent/podnet.sock");
    assert_eq!(code(&base, &down), 100);
    let status = cni::runtime_env("STATUS", "bad1", &netns);
    assert_eq!(code(&status, &down), 51);
    // Nothing was allocated or registered.
    let s = agent.api("ipam.status", Value::Null).unwrap();
    assert_eq!(s["allocations"], json!(0));
    assert_eq!(agent.api("endpoint.list", Value::Null).unwrap(), json!([]));
    // And a good call works, VERSION answers.
    let (ok, out) = cni::invoke_plugin(&base, ipam_conf.as_bytes()).unwrap();
    assert!(ok, "{out}");
    let (ok, out) =
        cni::invoke_plugin(&[("CNI_COMMAND", "VERSION")], br#"{"cniVersion":"1.1.0"}"#).unwrap();
    assert!(ok);
    assert_eq!(
        out.trim(),
        r#"{"cniVersion":"1.1.0","supportedVersions":["0.4.0","1.0.0","1.1.0"]}"#
    );
    let (ok, _) = cni::invoke_plugin(&status, ipam_conf.as_bytes()).unwrap();
    assert!(ok, "STATUS succeeds while addresses are free");
    let _ = std::fs::remove_file(&log);
}

/// With `--cni-add-wait`, a CNI ADD through libcni answers only once the
/// pod's DNS programs hold both hooks of its host interface: the kernel shows
/// exactly the agent's programs there the moment the ADD returns, for every
/// pod, and the agent counts each wait as in place.
#[test]
fn add_waits_until_the_pods_programs_are_attached() {
    use podnet::dns::attach::{hook_program_ids, Direction};
    const PODS: usize = 10;
    if !cni::ready() {
        return;
    }
    let topo = Topology::builder().name("cniwait").pods(0).build().unwrap();
    let node = topo.node();
    let agent = Agent::start_with(
        node,
        &[],
        &["--node-cidr", NODE_CIDR, "--cni-add-wait", "5s"],
    )
    .unwrap();
    let env = CniEnv::new().unwrap();
    let list = env.conflist("ptp", &ptp_conflist(&env, &agent)).unwrap();
    let pods: Vec<Netns> = (0..PODS)
        .map(|_| Netns::new("cniwaitpod").unwrap())
        .collect();
    for (i, ns) in pods.iter().enumerate() {
        let id = format!("wait{i:02}");
        let att = Attachment::pod(&id, ns, "shop", &format!("cart-{i}"));
        env.run(node, "ADD", &list, &att, None).unwrap();
        // The host interface, from the registry the ADD filled.
        let eps = agent.api("endpoint.list", Value::Null).unwrap();
        let host_if = eps
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["containerId"] == json!(id))
            .and_then(|e| e["interface"].as_str())
            .unwrap()
            .to_owned();
        let hooks = podnet_tests::in_netns(node, || {
            Direction::BOTH.map(|d| hook_program_ids(&host_if, d).unwrap())
        })
        .unwrap();
        // The programs behind the agent's own links.
        let status = agent.api("status", Value::Null).unwrap();
        let ours: Vec<u64> = status["dns"]["program_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        for (direction, ids) in Direction::BOTH.iter().zip(&hooks) {
            assert_eq!(ids.len(), 1, "pod {i} {direction:?}: {ids:?}");
            assert!(
                ours.contains(&u64::from(ids[0])),
                "pod {i} {direction:?}: program {} is not one of the agent's {ours:?}",
                ids[0]
            );
        }
    }
    let m = agent.metrics(node).unwrap();
    assert_eq!(
        m.count("podnet_cni_add_waits_total", &[("outcome", "in_place")]),
        PODS as u64
    );
    assert_eq!(
        m.count("podnet_cni_add_waits_total", &[("outcome", "timed_out")]),
        0
    );
    for (i, ns) in pods.iter().enumerate() {
        let att = Attachment::pod(&format!("wait{i:02}"), ns, "shop", &format!("cart-{i}"));
        env.run(node, "DEL", &list, &att, None).unwrap();
    }
}
