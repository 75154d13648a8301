//! Chaos: CNI ADD/DEL churn while the agent is killed with SIGKILL at random
//! moments and restarted. Afterwards the kernel and the agent agree, with
//! exact numbers: no address twice, none leaked after GC, host routes and
//! DNS tcx attachments exactly on the live pods, pinned counters continuous.
//!
//! Two kinds of pods churn side by side:
//! - *ptp* pods run the documented chain (ptp + podnet IPAM + podnet chained)
//!   through libcni, as a container runtime does; ptp installs the pod's host
//!   route itself, so podnet's routing leaves it alone (a foreign route);
//! - *direct* pods: the test plays the interface plugin (creates the veth,
//!   installs no route) and calls podnet-cni itself in both roles; podnet's
//!   routing then owns the pod's host route (protocol 176).
//!
//! A call that fails because the agent is down must fail with CNI code 100
//! (agent unreachable); the runtime then does what kubelet does: DEL the
//! attachment until that succeeds, and ADD again with a new sandbox id.
//!
//! `PODNET_SOAK=1` runs 1,000 operations and 30 kills instead of 100 and 5.
//! The seed is printed; `PODNET_CHAOS_SEED=<seed>` replays the same
//! operations and kill points (the moment a kill lands inside a call is a
//! wall-clock delay, so it is replayed as closely as timing allows).

// Test code: a step that fails fails the test, with the step in the message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use podnet_tests::{
    chaos::{self, Rng},
    cni::{self, Attachment, CniEnv},
    start_dns_responder, veth, wait_for, Agent, Metrics, Netns, NsChild, Topology,
};
use serde_json::{json, Value};

const NODE_CIDR: &str = "10.247.0.0/22";
const GATEWAY: &str = "10.247.0.1";
/// Usable addresses of [`NODE_CIDR`]: 1024 minus network, broadcast, gateway.
const CAPACITY: u64 = 1021;
const NETWORK: &str = "podnet-ptp";
const POD_NAMESPACE: &str = "chaos";
/// How long one operation may keep retrying (agent restarts included).
const OP_DEADLINE: Duration = Duration::from_secs(90);
/// Pause between a runtime's retries.
const RETRY_PAUSE: Duration = Duration::from_millis(50);
/// Attachments whose runtime "crashed" after IPAM ADD: only GC frees them.
const ORPHANS: usize = 3;
/// DNS queries the anchor pod sends before each kill and while the agent is down.
const QUERIES_BEFORE_KILL: u64 = 2;
const QUERIES_WHILE_DOWN: u64 = 2;

/// The size of a run.
struct Plan {
    ops: usize,
    kills: usize,
    slots: usize,
}

impl Plan {
    fn from_env() -> Self {
        if std::env::var("PODNET_SOAK").as_deref() == Ok("1") {
            Self {
                ops: 1000,
                kills: 30,
                slots: 24,
            }
        } else {
            Self {
                ops: 100,
                kills: 5,
                slots: 12,
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Ptp,
    Direct,
}

/// A live pod as the runtime knows it.
#[derive(Clone, Debug)]
struct Live {
    container_id: String,
    ip: Ipv4Addr,
    /// Host-side veth (from the agent's endpoint for ptp pods).
    host_if: Option<String>,
}

/// One pod sandbox place: a network namespace reused by successive pods.
struct Slot {
    index: usize,
    kind: Kind,
    netns: Netns,
    generation: u32,
    live: Option<Live>,
}

impl Slot {
    fn next_id(&mut self) -> String {
        self.generation += 1;
        format!("chaos{:02}g{}", self.index, self.generation)
    }

    fn attachment(&self, container_id: &str) -> Attachment {
        Attachment::pod(
            container_id,
            &self.netns,
            POD_NAMESPACE,
            &format!("pod-{}", self.index),
        )
    }

    /// Host-side veth of a direct pod (unique per generation).
    fn direct_host_if(&self) -> String {
        format!("pc{:02}g{}", self.index, self.generation)
    }
}

/// Failed calls seen by the runtime, by CNI error code (0: no code).
#[derive(Debug, Default)]
struct Errors(BTreeMap<u32, u64>);

impl Errors {
    fn record(&mut self, what: &str, text: &str) {
        let code = chaos::cni_error_code(text).unwrap_or(0);
        *self.0.entry(code).or_default() += 1;
        assert_eq!(
            code, 100,
            "{what} failed with something else than `agent unreachable` (100): {text}"
        );
    }

    fn total(&self) -> u64 {
        self.0.values().sum()
    }
}

/// The node: agent, CNI environment, configurations.
struct Bed<'a> {
    node: &'a Netns,
    env: CniEnv,
    list: PathBuf,
    socket: String,
    log: String,
}

impl Bed<'_> {
    fn ipam_conf(&self) -> String {
        format!(
            r#"{{"cniVersion":"1.0.0","name":"{NETWORK}","type":"chaos-veth","ipam":{{"type":"podnet-cni","socket":"{}","logFile":"{}","timeout":"5s"}}}}"#,
            self.socket, self.log
        )
    }

    fn chained_conf(&self, prev: Option<&Value>) -> String {
        let mut v = json!({
            "cniVersion": "1.0.0", "name": NETWORK, "type": "podnet-cni",
            "socket": self.socket, "logFile": self.log, "timeout": "5s",
        });
        if let Some(p) = prev {
            v["prevResult"] = p.clone();
        }
        v.to_string()
    }

    /// Runs podnet-cni directly for a direct pod; `Err` is its output.
    fn plugin(&self, command: &str, slot: &Slot, id: &str, stdin: &str) -> Result<String, String> {
        let netns = slot.netns.path().display().to_string();
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={POD_NAMESPACE};K8S_POD_NAME=pod-{};K8S_POD_UID=uid-{id}",
            slot.index
        );
        let env = [
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", id),
            ("CNI_NETNS", netns.as_str()),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/usr/lib/cni"),
            ("CNI_ARGS", args.as_str()),
        ];
        let plugin = self.env.bin_dir().join("podnet-cni");
        let (ok, out) = podnet_tests::cni::invoke_plugin_at(&plugin, &env, stdin.as_bytes())
            .map_err(|e| format!("{e:#}"))?;
        if ok {
            Ok(out)
        } else {
            Err(out)
        }
    }

    fn retry(what: &str, errors: &mut Errors, mut call: impl FnMut() -> Result<(), String>) {
        let deadline = Instant::now() + OP_DEADLINE;
        loop {
            match call() {
                Ok(()) => return,
                Err(e) => {
                    errors.record(what, &e);
                    assert!(Instant::now() < deadline, "{what}: still failing: {e}");
                    std::thread::sleep(RETRY_PAUSE);
                }
            }
        }
    }

    fn del(&self, slot: &Slot, id: &str, errors: &mut Errors) {
        match slot.kind {
            Kind::Ptp => {
                let att = slot.attachment(id);
                Self::retry(&format!("DEL {id}"), errors, || {
                    self.env
                        .run(self.node, "DEL", &self.list, &att, None)
                        .map(drop)
                        .map_err(|e| format!("{e:#}"))
                });
            }
            Kind::Direct => {
                // Reverse order of ADD: the chained entry, then the interface
                // plugin (its IPAM, then its veth).
                let chained = self.chained_conf(None);
                Self::retry(&format!("DEL {id} (chained)"), errors, || {
                    self.plugin("DEL", slot, id, &chained).map(drop)
                });
                let ipam = self.ipam_conf();
                Self::retry(&format!("DEL {id} (ipam)"), errors, || {
                    self.plugin("DEL", slot, id, &ipam).map(drop)
                });
                // Deleting the pod's end removes both ends of the pair.
                let _ = slot.netns.run(&["ip", "link", "del", "eth0"]);
            }
        }
    }

    fn add(&self, slot: &mut Slot, errors: &mut Errors) -> Live {
        let deadline = Instant::now() + OP_DEADLINE;
        loop {
            let id = slot.next_id();
            let attempt = match slot.kind {
                Kind::Ptp => self.add_ptp(slot, &id),
                Kind::Direct => self.add_direct(slot, &id),
            };
            match attempt {
                Ok(live) => return live,
                Err(e) => {
                    errors.record(&format!("ADD {id}"), &e);
                    assert!(Instant::now() < deadline, "ADD {id}: still failing: {e}");
                    // What kubelet does with a sandbox whose setup failed.
                    self.del(slot, &id, errors);
                    std::thread::sleep(RETRY_PAUSE);
                }
            }
        }
    }

    fn add_ptp(&self, slot: &Slot, id: &str) -> Result<Live, String> {
        let att = slot.attachment(id);
        let out = self
            .env
            .run(self.node, "ADD", &self.list, &att, None)
            .map_err(|e| format!("{e:#}"))?;
        let result = out.json().map_err(|e| format!("{e:#}"))?;
        Ok(Live {
            container_id: id.to_owned(),
            ip: result_ip(&result),
            host_if: None,
        })
    }

    fn add_direct(&self, slot: &Slot, id: &str) -> Result<Live, String> {
        let out = self.plugin("ADD", slot, id, &self.ipam_conf())?;
        let result: Value = serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))?;
        let address = result["ips"][0]["address"].as_str().unwrap().to_owned();
        let host_if = slot.direct_host_if();
        veth(&slot.netns, "eth0", &[&address], self.node, &host_if, &[])
            .unwrap_or_else(|e| panic!("veth for {id}: {e:#}"));
        let prev = json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": host_if},
                {"name": "eth0", "sandbox": slot.netns.path()},
            ],
            "ips": [{"address": address, "gateway": GATEWAY, "interface": 1}],
        });
        self.plugin("ADD", slot, id, &self.chained_conf(Some(&prev)))?;
        Ok(Live {
            container_id: id.to_owned(),
            ip: result_ip(&result),
            host_if: Some(host_if),
        })
    }

    /// ADD or DEL, whichever the slot needs, retried until it succeeds.
    fn toggle(&self, slot: &mut Slot, errors: &mut Errors) {
        if let Some(live) = slot.live.take() {
            self.del(slot, &live.container_id, errors);
        } else {
            slot.live = Some(self.add(slot, errors));
        }
    }
}

fn result_ip(result: &Value) -> Ipv4Addr {
    let addr = result["ips"][0]["address"]
        .as_str()
        .unwrap_or_else(|| panic!("no address in {result}"));
    addr.split('/').next().unwrap().parse().unwrap()
}

/// The pod that never churns and sends DNS queries: its counters live in
/// pinned maps and must run on across kills, exactly.
struct Anchor<'a> {
    netns: &'a Netns,
    server: String,
    sent: u64,
}

impl Anchor<'_> {
    fn query(&mut self, n: u64) {
        for _ in 0..n {
            let name = format!("q{}.chaos.test", self.sent);
            let out = self
                .netns
                .run_ok(&[
                    "dig",
                    "+tries=1",
                    "+time=3",
                    "+short",
                    &format!("@{}", self.server),
                    &name,
                    "A",
                ])
                .unwrap();
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "192.0.2.1");
            self.sent += 1;
        }
    }

    fn requests(&self, m: &Metrics) -> u64 {
        m.count(
            "podnet_dns_requests_total",
            &[
                ("namespace", POD_NAMESPACE),
                ("pod", "anchor"),
                ("server", &self.server),
                ("qtype", "A"),
            ],
        )
    }

    fn responses(&self, m: &Metrics) -> u64 {
        m.count(
            "podnet_dns_responses_total",
            &[
                ("namespace", POD_NAMESPACE),
                ("pod", "anchor"),
                ("server", &self.server),
                ("rcode", "NOERROR"),
            ],
        )
    }
}

/// Samples of counters across one kill.
#[derive(Debug)]
struct Continuity {
    dns_requests: (u64, u64),
    dns_responses: (u64, u64),
    conntrack_insert_failed: (u64, u64),
    /// A process counter: it restarts with the process (Prometheus counter
    /// semantics), which [`Continuity::start_time`] makes visible.
    ipam_allocations: (u64, u64),
    start_time: (f64, f64),
}

fn warnings(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .map(str::to_owned)
        .collect()
}

fn insert_failed(m: &Metrics) -> u64 {
    m.count("podnet_conntrack_stat_total", &[("stat", "insert_failed")])
}

fn allocations(m: &Metrics) -> u64 {
    m.count("podnet_ipam_allocations_total", &[("result", "success")])
}

fn ready() -> bool {
    if !cni::ready() {
        return false;
    }
    for tool in ["dig", "ip"] {
        let found = std::process::Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return !podnet_tests::unavailable(&format!("{tool} is not installed"));
        }
    }
    true
}

fn start_responder(topo: &Topology) -> NsChild {
    start_dns_responder(topo.server(), &[topo.server_ipv4().into()]).unwrap()
}

#[test]
#[allow(clippy::too_many_lines)] // one scenario, step by step
fn cni_churn_survives_agent_kills() {
    if !ready() {
        return;
    }
    let plan = Plan::from_env();
    let seed = chaos::seed();
    eprintln!(
        "chaos: seed {seed} (replay with {}={seed}); {} operations, {} kills, {} pod slots",
        chaos::SEED_ENV,
        plan.ops,
        plan.kills,
        plan.slots
    );
    let mut rng = Rng::new(seed);
    let started = Instant::now();

    let topo = Topology::builder().name("chaos").pods(0).build().unwrap();
    let node = topo.node();
    let _responder = start_responder(&topo);
    let mut agent = Agent::start_with(node, &[], &["--node-cidr", NODE_CIDR]).unwrap();
    let env = CniEnv::new().unwrap();
    let list = env.ptp_chain(NETWORK, &agent.socket()).unwrap();
    let bed = Bed {
        node,
        socket: agent.socket().display().to_string(),
        log: env.log_file().display().to_string(),
        env,
        list,
    };

    // The anchor pod, set up before any chaos.
    let anchor_ns = Netns::new("chaosanchor").unwrap();
    let anchor_att = Attachment::pod("chaosanchor", &anchor_ns, POD_NAMESPACE, "anchor");
    let anchor_ip = result_ip(
        &bed.env
            .run(node, "ADD", &bed.list, &anchor_att, None)
            .unwrap()
            .json()
            .unwrap(),
    );
    let mut anchor = Anchor {
        netns: &anchor_ns,
        server: topo.server_ipv4().to_string(),
        sent: 0,
    };
    assert!(
        wait_for(
            || agent
                .api("status", Value::Null)
                .is_ok_and(|s| s["dns"]["links"].as_array().is_some_and(|l| l.len() == 2)),
            Duration::from_secs(10)
        ),
        "the anchor's DNS links were not attached"
    );
    anchor.query(QUERIES_BEFORE_KILL);

    let mut slots: Vec<Slot> = (0..plan.slots)
        .map(|index| Slot {
            index,
            kind: if index % 3 == 2 {
                Kind::Direct
            } else {
                Kind::Ptp
            },
            netns: Netns::new(&format!("chaos{index}")).unwrap(),
            generation: 0,
            live: None,
        })
        .collect();

    // The whole schedule comes from the seed.
    let ops: Vec<usize> = (0..plan.ops).map(|_| rng.index(plan.slots)).collect();
    let kill_at: BTreeMap<usize, (Duration, Duration)> = rng
        .distinct_sorted(plan.kills, plan.ops)
        .into_iter()
        .map(|i| {
            let delay = Duration::from_millis(rng.below(150));
            let downtime = Duration::from_millis(rng.below(400));
            (i, (delay, downtime))
        })
        .collect();

    let mut errors = Errors::default();
    let mut kills = 0usize;
    let mut samples: Vec<Continuity> = Vec::new();
    let mut restart_time = Duration::ZERO;
    let mut adds = 0usize;
    // WARN and ERROR lines of every agent lifetime.
    let mut complaints: Vec<String> = Vec::new();
    // Undisturbed operations: (kind, is ADD) → (count, time).
    let mut timings: BTreeMap<(Kind, bool), (u32, Duration)> = BTreeMap::new();
    let churn_started = Instant::now();
    for (i, &s) in ops.iter().enumerate() {
        let slot = &mut slots[s];
        if slot.live.is_none() {
            adds += 1;
        }
        let Some(&(delay, downtime)) = kill_at.get(&i) else {
            let key = (slot.kind, slot.live.is_none());
            let t = Instant::now();
            bed.toggle(slot, &mut errors);
            let (n, total) = timings.entry(key).or_default();
            *n += 1;
            *total += t.elapsed();
            continue;
        };
        anchor.query(QUERIES_BEFORE_KILL);
        let before = agent.metrics(node).unwrap();
        let mut op_errors = Errors::default();
        std::thread::scope(|scope| {
            let op = scope.spawn(|| bed.toggle(slot, &mut op_errors));
            std::thread::sleep(delay);
            complaints.extend(warnings(&agent.log()));
            agent.kill().unwrap();
            kills += 1;
            std::thread::sleep(downtime);
            // The datapath keeps counting while nobody is there to read it.
            anchor.query(QUERIES_WHILE_DOWN);
            let t = Instant::now();
            agent.start_again(node).unwrap();
            restart_time += t.elapsed();
            let after = agent.metrics(node).unwrap();
            samples.push(Continuity {
                dns_requests: (anchor.requests(&before), anchor.requests(&after)),
                dns_responses: (anchor.responses(&before), anchor.responses(&after)),
                conntrack_insert_failed: (insert_failed(&before), insert_failed(&after)),
                ipam_allocations: (allocations(&before), allocations(&after)),
                start_time: (
                    before.value("process_start_time_seconds", &[]).unwrap(),
                    after.value("process_start_time_seconds", &[]).unwrap(),
                ),
            });
            op.join().unwrap();
        });
        for (code, n) in op_errors.0 {
            *errors.0.entry(code).or_default() += n;
        }
    }
    let churn = churn_started.elapsed();
    assert_eq!(kills, plan.kills);

    // Attachments whose runtime died right after IPAM ADD: leaks only GC finds.
    let orphan_ns = Netns::new("chaosorphan").unwrap();
    let mut orphan_slot = Slot {
        index: 99,
        kind: Kind::Direct,
        netns: orphan_ns,
        generation: 0,
        live: None,
    };
    for _ in 0..ORPHANS {
        let id = orphan_slot.next_id();
        bed.plugin("ADD", &orphan_slot, &id, &bed.ipam_conf())
            .unwrap();
    }

    // Final GC with the attachments the runtime knows.
    let live: Vec<(&Slot, &Live)> = slots
        .iter()
        .filter_map(|s| s.live.as_ref().map(|l| (s, l)))
        .collect();
    // Before it, the churn itself leaked nothing: the live pods, the anchor
    // and the orphans hold addresses, nobody else.
    let before_gc = agent.api("ipam.status", Value::Null).unwrap();
    assert_eq!(
        before_gc["allocations"],
        json!(live.len() + 1 + ORPHANS),
        "{before_gc:#}"
    );
    let mut valid: Vec<Value> = live
        .iter()
        .map(|(_, l)| json!({"containerID": l.container_id, "ifname": "eth0"}))
        .collect();
    valid.push(json!({"containerID": "chaosanchor", "ifname": "eth0"}));
    let valid = serde_json::to_string(&valid).unwrap();
    bed.env
        .run(node, "GC", &bed.list, &anchor_att, Some(&valid))
        .unwrap();
    let pods = live.len() + 1;

    // 1. No address twice: the pods' own view, the agent's, the checkpoint.
    let mut in_pods: BTreeMap<String, Ipv4Addr> = BTreeMap::new();
    for (slot, l) in &live {
        let in_netns = chaos::ipv4_addrs(&slot.netns, "eth0").unwrap();
        assert_eq!(in_netns, vec![l.ip], "{} eth0", l.container_id);
        in_pods.insert(l.container_id.clone(), l.ip);
    }
    assert_eq!(
        chaos::ipv4_addrs(&anchor_ns, "eth0").unwrap(),
        vec![anchor_ip]
    );
    in_pods.insert("chaosanchor".into(), anchor_ip);
    let distinct: BTreeSet<Ipv4Addr> = in_pods.values().copied().collect();
    assert_eq!(
        distinct.len(),
        pods,
        "an address is used twice: {in_pods:?}"
    );
    for (id, ip) in &in_pods {
        let s = agent
            .api("ipam.status", json!({"containerId": id, "ifName": "eth0"}))
            .unwrap();
        assert_eq!(
            s["allocation"]["ips"][0]["ip"],
            json!(ip.to_string()),
            "{id}"
        );
    }
    let text = std::fs::read_to_string(agent.state_dir().join("ipam.json")).unwrap();
    let checkpoint: Value = serde_json::from_str(&text).unwrap();
    let mut in_checkpoint: BTreeMap<String, String> = BTreeMap::new();
    for a in checkpoint["allocations"].as_array().unwrap() {
        let ips = a["ips"].as_array().unwrap();
        assert_eq!(ips.len(), 1, "{a}");
        let id = a["containerId"].as_str().unwrap().to_owned();
        in_checkpoint.insert(id, ips[0]["ip"].as_str().unwrap().to_owned());
    }
    let want: BTreeMap<String, String> = in_pods
        .iter()
        .map(|(id, ip)| (id.clone(), ip.to_string()))
        .collect();
    assert_eq!(in_checkpoint, want, "checkpoint versus the pods");

    // 2. None leaked: allocated == live pods, the rest adds up to capacity.
    let status = agent.api("ipam.status", Value::Null).unwrap();
    let pool = &status["pools"][0];
    let (allocated, cooldown, free) = (
        pool["allocated"].as_u64().unwrap(),
        pool["cooldown"].as_u64().unwrap(),
        pool["free"].as_u64().unwrap(),
    );
    assert_eq!(allocated, pods as u64, "{status:#}");
    assert_eq!(allocated + cooldown + free, CAPACITY, "{status:#}");
    assert_eq!(status["allocations"], json!(pods));
    let m = agent.metrics(node).unwrap();
    let gauge = |state: &str| m.count("podnet_ipam_addresses", &[("state", state)]);
    assert_eq!(gauge("allocated"), allocated);
    assert_eq!(
        gauge("allocated") + gauge("cooldown") + gauge("free"),
        CAPACITY
    );

    // The agent's endpoints are exactly the live pods, with their addresses.
    let endpoints = agent.api("endpoint.list", Value::Null).unwrap();
    let mut host_ifs: BTreeMap<String, String> = BTreeMap::new();
    let mut registered: BTreeMap<String, String> = BTreeMap::new();
    for ep in endpoints.as_array().unwrap() {
        let id = ep["containerId"].as_str().unwrap().to_owned();
        registered.insert(id.clone(), ep["ips"][0].as_str().unwrap().to_owned());
        host_ifs.insert(id, ep["interface"].as_str().unwrap().to_owned());
    }
    assert_eq!(registered, want, "endpoints versus the pods");
    for (_, l) in &live {
        if let Some(h) = &l.host_if {
            assert_eq!(&host_ifs[&l.container_id], h);
        }
    }

    // 3. Routes: every live pod's /32 on its host veth; podnet owns exactly
    //    the direct pods' (ptp's own routes are foreign and left alone).
    let by_ip: BTreeMap<Ipv4Addr, String> = in_pods
        .iter()
        .map(|(id, ip)| (*ip, host_ifs[id].clone()))
        .collect();
    let pod_net = |ip: &Ipv4Addr| ip.octets()[..2] == [10, 247];
    let pod_routes = || -> BTreeMap<Ipv4Addr, String> {
        chaos::host_routes(node, None)
            .unwrap()
            .into_iter()
            .filter(|(ip, _)| pod_net(ip))
            .collect()
    };
    // The last operation may have been an ADD the agent is still reconciling.
    let ok = wait_for(|| pod_routes() == by_ip, Duration::from_secs(5));
    assert!(
        ok,
        "pod host routes in the node {:?} != live pods {by_ip:?}; routes.show: {:#}",
        pod_routes(),
        agent.api("routes.show", Value::Null).unwrap()
    );
    let direct: BTreeSet<&str> = live
        .iter()
        .filter(|(s, _)| s.kind == Kind::Direct)
        .map(|(_, l)| l.container_id.as_str())
        .collect();
    let want_owned: BTreeMap<Ipv4Addr, String> = in_pods
        .iter()
        .filter(|(id, _)| direct.contains(id.as_str()))
        .map(|(id, ip)| (*ip, host_ifs[id].clone()))
        .collect();
    let ok = wait_for(
        || chaos::host_routes(node, Some("176")).is_ok_and(|r| r == want_owned),
        Duration::from_secs(5),
    );
    assert!(
        ok,
        "proto 176 routes {:?} != direct pods {want_owned:?}",
        chaos::host_routes(node, Some("176")).unwrap()
    );
    // The agent's view (as of its last reconcile) says the same.
    let want_states: BTreeMap<String, usize> = [
        ("provided".to_owned(), pods - direct.len()),
        ("ok".to_owned(), direct.len()),
    ]
    .into_iter()
    .filter(|(_, n)| *n > 0)
    .collect();
    let route_states = || -> (BTreeMap<String, usize>, Value) {
        let view = agent.api("routes.show", Value::Null).unwrap();
        let mut counts = BTreeMap::new();
        for l in view["lines"].as_array().unwrap() {
            *counts
                .entry(l["state"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
        (counts, view)
    };
    let converged = wait_for(|| route_states().0 == want_states, Duration::from_secs(5));
    let (route_counts, view) = route_states();
    assert!(
        converged,
        "route states {route_counts:?} != {want_states:?}: {view:#}"
    );

    // 4. DNS tcx attachments exactly on the live pods' host veths: one
    //    program per direction, each behind one of the agent's pinned links.
    //    (A restart adopts the links it finds and switches them to its own
    //    load, so every link runs the running agent's programs.)
    let want_ifs: BTreeSet<String> = host_ifs.values().cloned().collect();
    let tcx_matches = || -> Result<(), String> {
        let status = agent
            .api("status", Value::Null)
            .map_err(|e| e.to_string())?;
        let pinned: BTreeSet<u32> = status["dns"]["program_ids"]
            .as_array()
            .ok_or("no dns.program_ids")?
            .iter()
            .filter_map(|v| v.as_u64().and_then(|id| u32::try_from(id).ok()))
            .collect();
        let links = status["dns"]["links"].as_array().map_or(0, Vec::len);
        let tcx = chaos::tcx_attachments(node).map_err(|e| format!("{e:#}"))?;
        let ifs: BTreeSet<String> = tcx.keys().cloned().collect();
        let mut in_kernel = BTreeSet::new();
        for (name, (ingress, egress)) in &tcx {
            if ingress.len() != 1 || egress.len() != 1 {
                return Err(format!("{name}: ingress {ingress:?}, egress {egress:?}"));
            }
            in_kernel.extend([ingress[0], egress[0]]);
        }
        if ifs != want_ifs || in_kernel != pinned || links != 2 * want_ifs.len() {
            return Err(format!(
                "tcx {tcx:?} versus live pods {want_ifs:?}; pinned programs {pinned:?}, {links} links"
            ));
        }
        Ok(())
    };
    let ok = wait_for(|| tcx_matches().is_ok(), Duration::from_secs(5));
    assert!(ok, "DNS attachments: {:?}", tcx_matches());

    // 5. Counters kept in the kernel ran on across every kill, exactly.
    for (k, c) in samples.iter().enumerate() {
        assert_eq!(
            c.dns_requests.1,
            c.dns_requests.0 + QUERIES_WHILE_DOWN,
            "kill {k}: {c:?}"
        );
        assert_eq!(
            c.dns_responses.1,
            c.dns_responses.0 + QUERIES_WHILE_DOWN,
            "kill {k}: {c:?}"
        );
        assert!(
            c.conntrack_insert_failed.1 >= c.conntrack_insert_failed.0,
            "kill {k}: {c:?}"
        );
        // Process counters start again with the process; scrapers see the
        // reset because the start time moved on.
        assert!(c.start_time.1 > c.start_time.0, "kill {k}: {c:?}");
    }
    let m = agent.metrics(node).unwrap();
    assert_eq!(anchor.requests(&m), anchor.sent);
    assert_eq!(anchor.responses(&m), anchor.sent);

    complaints.extend(warnings(&agent.log()));
    eprintln!(
        "chaos: {} WARN/ERROR lines in the agents' logs",
        complaints.len()
    );
    for line in &complaints {
        eprintln!("  {line}");
    }
    for ((kind, add), (n, total)) in &timings {
        eprintln!(
            "chaos: {kind:?} {}: {n} undisturbed, {:.1?} each on average",
            if *add { "ADD" } else { "DEL" },
            *total / *n
        );
    }
    // Errors: only `agent unreachable`, each retried to success.
    let elapsed = started.elapsed();
    #[allow(clippy::cast_precision_loss)]
    let rate = plan.ops as f64 / churn.as_secs_f64();
    eprintln!(
        "chaos: seed {seed}: {} operations ({adds} ADD) in {churn:.1?} ({rate:.1} ops/s), {kills} kills, \
         restarts took {restart_time:.1?} in all; CNI errors by code {:?} ({} in all); \
         {} pods live, {} addresses cooling down; DNS queries {}; IPAM allocation counter before/after each kill {:?}; \
         whole test {elapsed:.1?}",
        plan.ops,
        errors.0,
        errors.total(),
        pods,
        cooldown,
        anchor.sent,
        samples.iter().map(|c| c.ipam_allocations).collect::<Vec<_>>(),
    );

    // Tear down through CNI, as the runtime would; nothing is left behind.
    for slot in &mut slots {
        if let Some(l) = slot.live.take() {
            bed.del(slot, &l.container_id, &mut errors);
        }
    }
    bed.env
        .run(node, "DEL", &bed.list, &anchor_att, None)
        .unwrap();
    let status = agent.api("ipam.status", Value::Null).unwrap();
    assert_eq!(status["allocations"], json!(0), "{status:#}");
    // Deleting a pod's veth takes its route along; the agent deleting the
    // same route a moment later is no failure.
    let m = agent.metrics(node).unwrap();
    assert_eq!(
        m.count("podnet_route_reconciles_total", &[("result", "error")]),
        0,
        "routing errors in the last agent lifetime: {:?}",
        warnings(&agent.log())
    );
    assert_eq!(agent.api("endpoint.list", Value::Null).unwrap(), json!([]));
    assert!(wait_for(
        || chaos::host_routes(node, Some("176")).is_ok_and(|r| r.is_empty()),
        Duration::from_secs(5)
    ));
    assert!(wait_for(
        || chaos::tcx_attachments(node).is_ok_and(|t| t.is_empty()),
        Duration::from_secs(5)
    ));
}
