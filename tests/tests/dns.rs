//! DNS latency per pod, end to end: a pod, a node running the real agent, and
//! a server namespace with a responder whose query names set its behaviour
//! (`podnet-dns-responder`) and dnsmasq. Clients are a Rust stub resolver in
//! the pod (exact ids, retransmits, client-side timing), dig, and glibc's
//! `getaddrinfo` (the parallel A/AAAA resolver). Every count is exact.

// Test code: a step that fails fails the test, with the step in the message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant, SystemTime},
};

use podnet_tests::{
    dns_client::{next_query_id, start_dns_responder, udp_dns_query, DnsAnswer, DnsQuery},
    forward6_rule_packets, forward_rule_packets, in_netns, ip6tables, iptables,
    read_conntrack_stat, require_root, spawn_in, wait_for, Agent, EndpointSpec, Metrics, Netns,
    NsChild, Topology,
};
use serde_json::{json, Value};

const DURATION: &str = "podnet_dns_request_duration_seconds";
const REQUESTS: &str = "podnet_dns_requests_total";
const RESPONSES: &str = "podnet_dns_responses_total";
const TIMEOUTS: &str = "podnet_dns_timeouts_total";
const RETRANSMITS: &str = "podnet_dns_retransmits_total";
const SKIPPED: &str = "podnet_bpf_skipped_packets_total";
const QTYPE_A: u16 = 1;
const QTYPE_AAAA: u16 = 28;
const QTYPE_SRV: u16 = 33;
/// The server address dnsmasq listens on (the responder has the topology's).
const DNSMASQ_V4: &str = "10.98.0.3";

/// One pod (`shop/cart`), the agent, and the responder on port 53 of the
/// server's IPv4 and IPv6 addresses.
struct Bed {
    responder: NsChild,
    agent: Agent,
    topo: Topology,
}

impl Bed {
    fn start(name: &str, agent_args: &[&str]) -> Self {
        Self::build(name, agent_args, false)
    }

    /// Like [`Bed::start`], with the node's interface towards the server as
    /// an uplink (`--uplinks`).
    fn start_with_uplink(name: &str, agent_args: &[&str]) -> Self {
        Self::build(name, agent_args, true)
    }

    fn build(name: &str, agent_args: &[&str], uplink: bool) -> Self {
        let topo = Topology::builder().name(name).pods(1).build().unwrap();
        let pod = topo.pod(0);
        let endpoints = [EndpointSpec::new(
            "shop",
            "cart",
            &[IpAddr::V4(pod.ipv4()), IpAddr::V6(pod.ipv6())],
        )
        .interface(pod.host_if())];
        let responder = start_dns_responder(
            topo.server(),
            &[topo.server_ipv4().into(), topo.server_ipv6().into()],
        )
        .unwrap();
        let mut args = agent_args.to_vec();
        let uplink_if = topo.node_server_if().to_owned();
        if uplink {
            args.extend(["--uplinks", &uplink_if]);
        }
        let agent = Agent::start_with(topo.node(), &endpoints, &args).unwrap();
        let bed = Self {
            responder,
            agent,
            topo,
        };
        bed.wait_links(if uplink { 4 } else { 2 });
        bed
    }

    fn pod(&self) -> &Netns {
        self.topo.pod(0).netns()
    }

    fn server_v4(&self) -> SocketAddr {
        SocketAddr::new(self.topo.server_ipv4().into(), 53)
    }

    fn server_v6(&self) -> SocketAddr {
        SocketAddr::new(self.topo.server_ipv6().into(), 53)
    }

    fn metrics(&self) -> Metrics {
        self.agent.metrics(self.topo.node()).unwrap()
    }

    fn status(&self) -> Value {
        self.agent.api("status", Value::Null).unwrap()
    }

    /// Waits until the agent reports `n` pinned DNS links.
    fn wait_links(&self, n: usize) {
        let ok = wait_for(
            || self.status()["dns"]["links"].as_array().map(Vec::len) == Some(n),
            Duration::from_secs(10),
        );
        assert!(ok, "expected {n} DNS links: {}", self.status()["dns"]);
    }

    /// Programs attached to the pod's host-side interface, per hook, as the kernel lists them.
    fn attached(&self) -> Vec<Vec<u32>> {
        let ifname = self.topo.pod(0).host_if().to_owned();
        in_netns(self.topo.node(), move || {
            podnet::dns::attach::Direction::BOTH
                .iter()
                .map(|d| podnet::dns::attach::hook_program_ids(&ifname, *d).unwrap())
                .collect()
        })
        .unwrap()
    }

    /// Waits until the program has answered or timed out every query it saw:
    /// the kernel's own counters.
    fn wait_settled(&self) {
        let settled = wait_for(
            || {
                let c = &self.status()["dns"]["counters"];
                let (q, r) = (c["queries"].as_u64(), c["responses"].as_u64());
                let m = self.metrics();
                let timeouts = m.count_sum(TIMEOUTS);
                q == r.map(|r| r + timeouts)
            },
            Duration::from_secs(10),
        );
        assert!(settled, "queries still pending: {}", self.status()["dns"]);
    }

    /// The slow-query log once it has settled: events reach user space
    /// within one poll of the ring buffer (100 ms; the kernel wakes the
    /// reader only once 64 KiB are pending), so read until two reads 250 ms
    /// apart agree.
    fn slow(&self) -> Vec<Value> {
        let read = || {
            self.agent
                .api("dns.slow", json!({"limit": 1000}))
                .unwrap()
                .as_array()
                .cloned()
                .unwrap()
        };
        let mut last = read();
        for _ in 0..8 {
            std::thread::sleep(Duration::from_millis(250));
            let now = read();
            if now == last {
                break;
            }
            last = now;
        }
        last
    }
}

fn labels<'a>(server: &'a str, key: &'a str, value: &'a str) -> [(&'a str, &'a str); 4] {
    [
        ("namespace", "shop"),
        ("pod", "cart"),
        ("server", server),
        (key, value),
    ]
}

fn peer(server: &str) -> [(&str, &str); 3] {
    [("namespace", "shop"), ("pod", "cart"), ("server", server)]
}

/// A DNS query message with one question.
fn query_message(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    podnet_tests::dns_query_message(id, name, qtype)
}

/// What the stub resolver saw.
type Answer = DnsAnswer;

/// Sends one query over UDP from the pod (`copies` times, `gap` apart, same
/// id and port) and waits up to `wait` for the answer.
fn udp_query(
    pod: &Netns,
    server: SocketAddr,
    name: &str,
    qtype: u16,
    copies: usize,
    gap: Duration,
    wait: Duration,
) -> Option<Answer> {
    udp_dns_query(
        pod,
        &DnsQuery::new(server, name, qtype, wait).retransmitted(copies, gap),
    )
    .unwrap()
}

fn query(pod: &Netns, server: SocketAddr, name: &str, qtype: u16) -> Option<Answer> {
    udp_query(
        pod,
        server,
        name,
        qtype,
        1,
        Duration::ZERO,
        Duration::from_secs(3),
    )
}

/// Reads from a TCP socket with `recvmsg`, returning the bytes read and the
/// kernel's receive time of the data (`SO_TIMESTAMPNS` must be on).
fn tcp_recv_timed(stream: &TcpStream, buf: &mut [u8]) -> (usize, Option<SystemTime>) {
    use std::os::fd::AsRawFd as _;
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = [0u64; 16];
    // SAFETY: msghdr is plain data; the fields set below point to live locals.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: `msg` describes valid buffers for the duration of the call.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &raw mut msg, 0) };
    let n = usize::try_from(n).unwrap_or(0);
    let mut time = None;
    // SAFETY: the CMSG_* helpers walk the control buffer the kernel filled,
    // within msg_controllen.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_TIMESTAMPNS
            {
                let ts = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::timespec>());
                time = Some(
                    SystemTime::UNIX_EPOCH
                        + Duration::new(
                            u64::try_from(ts.tv_sec).unwrap(),
                            u32::try_from(ts.tv_nsec).unwrap(),
                        ),
                );
            }
            cmsg = libc::CMSG_NXTHDR(&raw const msg, cmsg);
        }
    }
    (n, time)
}

/// One query over TCP (length prefix and message in one segment).
fn tcp_query(pod: &Netns, server: SocketAddr, name: &str, qtype: u16) -> Answer {
    let id = next_query_id();
    let msg = query_message(id, name, qtype);
    in_netns(pod, move || {
        let mut stream = TcpStream::connect_timeout(&server, Duration::from_secs(2)).unwrap();
        stream.set_nodelay(true).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        {
            use std::os::fd::AsRawFd as _;
            let on: libc::c_int = 1;
            // SAFETY: plain setsockopt with a valid int option value.
            let rc = unsafe {
                libc::setsockopt(
                    stream.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_TIMESTAMPNS,
                    (&raw const on).cast(),
                    4,
                )
            };
            assert_eq!(rc, 0);
        }
        let len = u16::try_from(msg.len()).unwrap().to_be_bytes();
        let start = Instant::now();
        let sent_at = SystemTime::now();
        stream.write_all(&[&len[..], &msg].concat()).unwrap();
        // The answer arrives in one segment; its receive time is the answer's.
        let mut buf = vec![0u8; 4096];
        let (mut got, received) = tcp_recv_timed(&stream, &mut buf);
        let elapsed = received
            .and_then(|t| t.duration_since(sent_at).ok())
            .unwrap_or_else(|| start.elapsed());
        assert!(got >= 2, "no answer over TCP");
        let want = 2 + usize::from(u16::from_be_bytes([buf[0], buf[1]]));
        while got < want {
            let n = stream.read(&mut buf[got..]).unwrap();
            assert!(n > 0, "connection closed mid-answer");
            got += n;
        }
        let reply = &buf[2..want];
        assert_eq!(reply[..2], id.to_be_bytes());
        Answer {
            rcode: reply[3] & 0x0f,
            elapsed,
        }
    })
    .unwrap()
}

/// Runs dig in the pod; returns its status line's rcode.
fn dig(pod: &Netns, args: &[&str]) -> String {
    let mut cmd = vec!["dig", "+tries=1", "+time=2"];
    cmd.extend_from_slice(args);
    let out = pod.run_ok(&cmd).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find_map(|l| l.split("status: ").nth(1))
        .and_then(|s| s.split(',').next())
        .unwrap_or_else(|| panic!("no status in dig output:\n{text}"))
        .to_owned()
}

#[test]
fn requests_per_qtype_and_responses_per_rcode_are_exact() {
    if !require_root() {
        return;
    }
    let bed = Bed::start("dnscount", &["--dns-timeout", "1s"]);
    let (pod, v4) = (bed.pod(), bed.server_v4());
    for (name, qtype, rcode) in [
        ("ok-1.test", QTYPE_A, 0),
        ("ok-2.test", QTYPE_A, 0),
        ("ok-3.test", QTYPE_A, 0),
        ("ok-4.test", QTYPE_AAAA, 0),
        ("ok-5.test", QTYPE_AAAA, 0),
        ("ok-6.test", QTYPE_SRV, 0),
        ("nx-1.test", QTYPE_A, 3),
        ("nx-2.test", QTYPE_A, 3),
        ("servfail-1.test", QTYPE_A, 2),
        ("refused-1.test", QTYPE_AAAA, 5),
    ] {
        assert_eq!(query(pod, v4, name, qtype).unwrap().rcode, rcode, "{name}");
    }
    let server = v4.ip().to_string();
    assert_eq!(
        dig(pod, &[&format!("@{server}"), "ok-dig.test", "MX"]),
        "NOERROR"
    );
    assert_eq!(
        dig(pod, &[&format!("@{server}"), "nx-dig.test", "A"]),
        "NXDOMAIN"
    );
    bed.wait_settled();
    let m = bed.metrics();
    let s = server.as_str();
    assert_eq!(m.count(REQUESTS, &labels(s, "qtype", "A")), 7);
    assert_eq!(m.count(REQUESTS, &labels(s, "qtype", "AAAA")), 3);
    assert_eq!(m.count(REQUESTS, &labels(s, "qtype", "SRV")), 1);
    assert_eq!(m.count(REQUESTS, &labels(s, "qtype", "MX")), 1);
    assert_eq!(m.count_sum(REQUESTS), 12);
    assert_eq!(m.count(RESPONSES, &labels(s, "rcode", "NOERROR")), 7);
    assert_eq!(m.count(RESPONSES, &labels(s, "rcode", "NXDOMAIN")), 3);
    assert_eq!(m.count(RESPONSES, &labels(s, "rcode", "SERVFAIL")), 1);
    assert_eq!(m.count(RESPONSES, &labels(s, "rcode", "REFUSED")), 1);
    assert_eq!(
        m.count(
            &format!("{DURATION}_count"),
            &labels(s, "rcode", "NXDOMAIN")
        ),
        3
    );
    assert_eq!(m.count_sum(TIMEOUTS), 0);
    assert_eq!(m.count_sum(RETRANSMITS), 0);
    assert_eq!(
        m.count(SKIPPED, &[("program", "dns"), ("reason", "malformed")]),
        0
    );
    assert_eq!(
        m.count(SKIPPED, &[("program", "dns"), ("reason", "unmatched")]),
        0
    );
    // Failed answers are logged with their names and rcodes.
    let slow = bed.slow();
    let mut failed: Vec<(String, String, String)> = slow
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap().to_owned(),
                r["rcode"].as_str().unwrap().to_owned(),
                r["outcome"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    failed.sort();
    let e = |n: &str, r: &str| (n.to_owned(), r.to_owned(), "error".to_owned());
    assert_eq!(
        failed,
        vec![
            e("nx-1.test.", "NXDOMAIN"),
            e("nx-2.test.", "NXDOMAIN"),
            e("nx-dig.test.", "NXDOMAIN"),
            e("refused-1.test.", "REFUSED"),
            e("servfail-1.test.", "SERVFAIL"),
        ]
    );
    assert!(slow.iter().all(|r| r["pod"]["pod"] == "cart"));
    let table = bed.agent.podnetctl(&["dns", "slow"]).unwrap();
    assert!(table.contains("servfail-1.test."), "{table}");
    let top = bed.agent.podnetctl(&["dns", "top"]).unwrap();
    assert!(
        top.contains("shop/cart") && top.contains("10.98.0.2"),
        "{top}"
    );
    let rows = bed.agent.api("dns.top", Value::Null).unwrap();
    assert_eq!(rows[0]["requests_total"], 12, "{rows}");
    drop(bed.responder);
}

/// Extra seconds the client's own timing may differ from the kernel's:
/// `PODNET_TEST_TIME_SLACK_MS` (0 unless set). Under software emulation
/// (`cargo xtask vm-test`) a client's syscalls around the exchange take
/// milliseconds, which the kernel's hook-to-hook latency rightly excludes.
fn client_slack() -> f64 {
    std::env::var("PODNET_TEST_TIME_SLACK_MS")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .map_or(0.0, |ms| f64::from(ms) / 1000.0)
}

#[test]
fn latency_matches_what_the_client_measured() {
    if !require_root() {
        return;
    }
    let bed = Bed::start(
        "dnslat",
        &["--dns-timeout", "3s", "--dns-slow-threshold", "100ms"],
    );
    let (pod, v4) = (bed.pod(), bed.server_v4());
    let sum_name = format!("{DURATION}_sum");
    let l = labels("10.98.0.2", "rcode", "NOERROR");
    let mut before = 0.0;
    // Each answer's latency as the kernel measured it: the histogram and the
    // slow log must place exactly these (under emulation a "0 ms" answer can
    // take tens of milliseconds, so buckets follow the measurements).
    let mut measured = Vec::new();
    for delay_ms in [0u64, 50, 250, 1200] {
        let answer = query(pod, v4, &format!("delay-{delay_ms}-x.test"), QTYPE_A).unwrap();
        bed.wait_settled();
        let sum = bed.metrics().value_or_zero(&sum_name, &l);
        let kernel = sum - before;
        before = sum;
        measured.push((delay_ms, kernel));
        let client = answer.elapsed.as_secs_f64();
        let tolerance = (client * 0.05).max(0.001) + client_slack();
        println!("delay {delay_ms} ms: client {client:.6} s, kernel {kernel:.6} s");
        assert!(
            (kernel - client).abs() <= tolerance,
            "delay {delay_ms} ms: kernel {kernel} s vs client {client} s"
        );
        #[allow(clippy::cast_precision_loss)]
        let floor = delay_ms as f64 / 1000.0;
        assert!(kernel >= floor, "kernel {kernel} s below the delay");
    }
    let m = bed.metrics();
    let bucket = |le: &str| {
        m.count(
            &format!("{DURATION}_bucket"),
            &[
                ("namespace", "shop"),
                ("pod", "cart"),
                ("server", "10.98.0.2"),
                ("rcode", "NOERROR"),
                ("le", le),
            ],
        )
    };
    let within = |le: f64| measured.iter().filter(|(_, k)| *k <= le).count() as u64;
    assert_eq!(bucket("0.025"), within(0.025), "{measured:?}");
    assert_eq!(bucket("0.1"), within(0.1), "{measured:?}");
    assert_eq!(bucket("0.5"), within(0.5), "{measured:?}");
    assert_eq!(bucket("2.5"), 4);
    assert_eq!(bucket("+Inf"), 4);
    // Over the 100 ms threshold (on this machine: the 250 and 1200 ms
    // answers), with their names.
    let slow = bed.slow();
    let names: Vec<&str> = slow.iter().map(|r| r["name"].as_str().unwrap()).collect();
    let expected: Vec<String> = measured
        .iter()
        .filter(|(_, k)| *k > 0.1)
        .map(|(d, _)| format!("delay-{d}-x.test."))
        .collect();
    assert_eq!(names, expected);
    assert_eq!(
        names[names.len() - 2..],
        ["delay-250-x.test.", "delay-1200-x.test."]
    );
    assert!(slow.iter().all(|r| r["outcome"] == "slow"));
    let us = slow[slow.len() - 1]["latency_us"].as_u64().unwrap();
    assert!((1_200_000..1_260_000).contains(&us), "{us}");
}

#[test]
fn unanswered_queries_become_exactly_one_timeout_each() {
    if !require_root() {
        return;
    }
    let bed = Bed::start("dnsto", &["--dns-timeout", "1s"]);
    let (pod, v4) = (bed.pod(), bed.server_v4());
    let k = 3;
    for i in 0..k {
        let wait = Duration::from_millis(50);
        let name = format!("drop-{i}.test");
        assert!(udp_query(pod, v4, &name, QTYPE_A, 1, Duration::ZERO, wait).is_none());
    }
    assert!(query(pod, v4, "ok-1.test", QTYPE_A).is_some());
    assert!(query(pod, v4, "ok-2.test", QTYPE_AAAA).is_some());
    let s = "10.98.0.2";
    let counted = wait_for(
        || bed.metrics().count(TIMEOUTS, &peer(s)) == k,
        Duration::from_secs(5),
    );
    assert!(counted, "{}", bed.metrics().0);
    // Another sweep period later, still exactly k.
    std::thread::sleep(Duration::from_millis(1500));
    let m = bed.metrics();
    assert_eq!(m.count(TIMEOUTS, &peer(s)), k);
    assert_eq!(m.count_sum(REQUESTS), k + 2);
    assert_eq!(m.count_sum(RESPONSES), 2);
    let slow = bed.slow();
    let mut timed_out: Vec<&str> = slow
        .iter()
        .filter(|r| r["outcome"] == "timeout")
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    timed_out.sort_unstable();
    assert_eq!(timed_out, ["drop-0.test.", "drop-1.test.", "drop-2.test."]);
    // An agent restart keeps the count (it lives in a pinned map).
    let mut bed = bed;
    bed.agent.restart(bed.topo.node()).unwrap();
    assert_eq!(bed.metrics().count(TIMEOUTS, &peer(s)), k);
}

#[test]
fn retransmits_are_counted_and_latency_runs_from_the_first_copy() {
    if !require_root() {
        return;
    }
    let bed = Bed::start("dnsre", &["--dns-timeout", "2s"]);
    let (pod, v4) = (bed.pod(), bed.server_v4());
    // The responder ignores the first copy; the second, 200 ms later, is answered.
    let answer = udp_query(
        pod,
        v4,
        "dropfirst-1.test",
        QTYPE_A,
        2,
        Duration::from_millis(200),
        Duration::from_secs(2),
    )
    .unwrap();
    // Three copies of another query 100 ms apart, each answered after
    // 300 ms: two retransmits, one matched answer, two late answers.
    let again = udp_query(
        pod,
        v4,
        "delay-300-re.test",
        QTYPE_AAAA,
        3,
        Duration::from_millis(100),
        Duration::from_secs(2),
    )
    .unwrap();
    assert_eq!((answer.rcode, again.rcode), (0, 0));
    println!("client: {answer:?} {again:?}");
    bed.wait_settled();
    let m = bed.metrics();
    let s = "10.98.0.2";
    assert_eq!(m.count(RETRANSMITS, &peer(s)), 3);
    assert_eq!(m.count_sum(REQUESTS), 2);
    assert_eq!(m.count(RESPONSES, &labels(s, "rcode", "NOERROR")), 2);
    assert_eq!(m.count_sum(TIMEOUTS), 0);
    assert!(
        wait_for(
            || bed
                .metrics()
                .count(SKIPPED, &[("program", "dns"), ("reason", "unmatched")])
                == 2,
            Duration::from_secs(2)
        ),
        "late answers are unmatched"
    );
    let sum = m.value_or_zero(&format!("{DURATION}_sum"), &labels(s, "rcode", "NOERROR"));
    let client = answer.elapsed.as_secs_f64() + again.elapsed.as_secs_f64();
    assert!(
        (sum - client).abs() <= 0.002 + client_slack(),
        "kernel {sum} vs client {client}"
    );
}

#[test]
fn ipv6_servers_and_dns_over_tcp() {
    if !require_root() {
        return;
    }
    let bed = Bed::start("dnsv6", &["--dns-timeout", "1s"]);
    let (pod, v4, v6) = (bed.pod(), bed.server_v4(), bed.server_v6());
    assert_eq!(query(pod, v6, "ok-1.test", QTYPE_AAAA).unwrap().rcode, 0);
    assert_eq!(query(pod, v6, "nx-1.test", QTYPE_A).unwrap().rcode, 3);
    let tcp4 = tcp_query(pod, v4, "delay-50-tcp.test", QTYPE_A);
    let tcp6 = tcp_query(pod, v6, "ok-tcp.test", QTYPE_AAAA);
    assert_eq!((tcp4.rcode, tcp6.rcode), (0, 0));
    assert_eq!(
        dig(pod, &["+tcp", "@fd00:98::2", "ok-dig.test", "A"]),
        "NOERROR"
    );
    bed.wait_settled();
    let m = bed.metrics();
    let (s4, s6) = ("10.98.0.2", "fd00:98::2");
    assert_eq!(m.count(REQUESTS, &labels(s6, "qtype", "AAAA")), 2);
    assert_eq!(m.count(REQUESTS, &labels(s6, "qtype", "A")), 2);
    assert_eq!(m.count(RESPONSES, &labels(s6, "rcode", "NOERROR")), 3);
    assert_eq!(m.count(RESPONSES, &labels(s6, "rcode", "NXDOMAIN")), 1);
    assert_eq!(m.count(REQUESTS, &labels(s4, "qtype", "A")), 1);
    assert_eq!(m.count(RESPONSES, &labels(s4, "rcode", "NOERROR")), 1);
    let sum = m.value_or_zero(&format!("{DURATION}_sum"), &labels(s4, "rcode", "NOERROR"));
    let client = tcp4.elapsed.as_secs_f64();
    assert!(
        (sum - client).abs() <= (client * 0.05).max(0.001),
        "TCP: kernel {sum} vs client {client}"
    );
    assert_eq!(m.count_sum(TIMEOUTS), 0);
    assert_eq!(
        m.count(SKIPPED, &[("program", "dns"), ("reason", "malformed")]),
        0
    );
}

/// Malformed messages to port 53, each counted once as malformed.
fn garbage() -> Vec<Vec<u8>> {
    let header = |qd: u16| {
        let mut h = vec![0x12, 0x34, 0x01, 0x00];
        h.extend_from_slice(&qd.to_be_bytes());
        h.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        h
    };
    let with = |qd: u16, rest: &[u8]| [header(qd), rest.to_vec()].concat();
    let mut long_name = Vec::new();
    for _ in 0..5 {
        long_name.push(63);
        long_name.extend_from_slice(&[b'a'; 63]);
    }
    long_name.extend_from_slice(&[0, 0, 1, 0, 1]);
    vec![
        // Shorter than a header.
        vec![0x12, 0x34, 0x01],
        // A header and nothing else.
        header(1),
        // No question.
        with(0, &[]),
        // Two questions.
        with(2, &[1, b'a', 0, 0, 1, 0, 1, 1, b'b', 0, 0, 1, 0, 1]),
        // A compression pointer to itself.
        with(1, &[0xc0, 12, 0, 1, 0, 1]),
        // A pointer after a label (loops back to the header).
        with(1, &[1, b'a', 0xc0, 12, 0, 1, 0, 1]),
        // Reserved label type.
        with(1, &[0x41, b'a', 0, 0, 1, 0, 1]),
        // A label running past the end.
        with(1, &[40, b'a', b'b']),
        // Name without type and class.
        with(1, &[1, b'a', 0]),
        // Name longer than 255 bytes.
        with(1, &long_name),
        // A response sent to the server port.
        [
            vec![0x12, 0x34, 0x81, 0x80],
            header(1)[4..].to_vec(),
            vec![0, 0, 1, 0, 1],
        ]
        .concat(),
    ]
}

#[test]
fn garbage_and_truncated_packets_are_counted_and_break_nothing() {
    if !require_root() {
        return;
    }
    let bed = Bed::start("dnsbad", &["--dns-timeout", "1s"]);
    let (pod, v4, v6) = (bed.pod(), bed.server_v4(), bed.server_v6());
    let packets = garbage();
    let sent = u64::try_from(packets.len() * 2).unwrap();
    in_netns(pod, || {
        for server in [v4, v6] {
            let bind = if server.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            };
            let socket = UdpSocket::bind(bind).unwrap();
            for p in &packets {
                socket.send_to(p, server).unwrap();
            }
        }
    })
    .unwrap();
    let malformed = || {
        bed.metrics()
            .count(SKIPPED, &[("program", "dns"), ("reason", "malformed")])
    };
    assert!(
        wait_for(|| malformed() == sent, Duration::from_secs(3)),
        "malformed = {}, sent {sent}",
        malformed()
    );
    // A valid query still works and is counted normally.
    assert_eq!(query(pod, v4, "ok-after.test", QTYPE_A).unwrap().rcode, 0);
    bed.wait_settled();
    let m = bed.metrics();
    assert_eq!(m.count_sum(REQUESTS), 1);
    assert_eq!(m.count_sum(RESPONSES), 1);
    assert_eq!(malformed(), sent);
    assert_eq!(bed.status()["dns"]["events_decode_errors"], 0);

    // Random messages: each one is exactly one of malformed, a query or a
    // retransmit, whatever its bytes.
    let before = bed.status()["dns"]["counters"].clone();
    let retransmits_before = bed.metrics().count_sum(RETRANSMITS);
    let random = random_messages(2000, 0x5eed_d15e);
    let count = u64::try_from(random.len()).unwrap();
    in_netns(pod, || {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        for (i, p) in random.iter().enumerate() {
            socket.send_to(p, v4).unwrap();
            if i % 100 == 99 {
                // Stay below the receive queues' limits.
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    })
    .unwrap();
    let accounted = || {
        let c = &bed.status()["dns"]["counters"];
        let d = |k: &str| c[k].as_u64().unwrap() - before[k].as_u64().unwrap();
        d("malformed")
            + d("queries")
            + d("pending_failed")
            + (bed.metrics().count_sum(RETRANSMITS) - retransmits_before)
    };
    assert!(
        wait_for(|| accounted() == count, Duration::from_secs(5)),
        "{} of {count} random messages accounted: {}",
        accounted(),
        bed.status()["dns"]
    );
}

/// `n` pseudo-random messages (fixed seed): random lengths up to 300 bytes,
/// half of them with a plausible query header so the name parser is reached.
fn random_messages(n: usize, seed: u64) -> Vec<Vec<u8>> {
    let mut x = seed;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..n)
        .map(|i| {
            let len = usize::try_from(next() % 300).unwrap();
            let mut m: Vec<u8> = (0..len).map(|_| next().to_le_bytes()[0]).collect();
            if i % 2 == 0 && m.len() >= 12 {
                m[2] = 0x01;
                m[3] = 0;
                m[4..6].copy_from_slice(&[0, 1]);
                // Mostly short labels, sometimes anything.
                for b in m.iter_mut().skip(12).step_by(4) {
                    *b %= 8;
                }
            }
            m
        })
        .collect()
}

#[test]
fn dnsmasq_and_glibc_getaddrinfo() {
    if !require_root() {
        return;
    }
    let bed = Bed::start("dnsglibc", &["--dns-timeout", "1s"]);
    let server = bed.topo.server();
    server
        .run_ok(&[
            "ip",
            "address",
            "add",
            &format!("{DNSMASQ_V4}/24"),
            "dev",
            "eth0",
        ])
        .unwrap();
    let dnsmasq = spawn_in(
        server,
        &[
            "dnsmasq",
            "--no-daemon",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--port=53",
            &format!("--listen-address={DNSMASQ_V4}"),
            "--bind-interfaces",
            "--address=/svc.test/10.1.2.3",
            "--address=/svc.test/fd00::5",
            "--address=/gone.test/",
        ],
    )
    .unwrap();
    let pod = bed.pod();
    assert!(
        wait_for(|| dnsmasq.log().contains("started"), Duration::from_secs(5)),
        "dnsmasq not started: {}",
        dnsmasq.log()
    );
    assert_eq!(
        dig(pod, &[&format!("@{DNSMASQ_V4}"), "web.svc.test", "A"]),
        "NOERROR"
    );
    assert_eq!(
        dig(pod, &[&format!("@{DNSMASQ_V4}"), "x.gone.test", "A"]),
        "NXDOMAIN"
    );
    // glibc's stub resolver with a resolv.conf of our own: a private mount
    // namespace bind-mounts it over /etc/resolv.conf for this one process.
    let dir = std::env::temp_dir().join(format!("podnet-dns-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let resolv = dir.join("resolv.conf");
    std::fs::write(
        &resolv,
        format!("nameserver {DNSMASQ_V4}\noptions timeout:2 attempts:1\n"),
    )
    .unwrap();
    let script = format!(
        "mount --bind {} /etc/resolv.conf && exec /usr/bin/python3 -c \
         'import socket; print(sorted({{a[4][0] for a in socket.getaddrinfo(\"api.svc.test\", 80, proto=socket.IPPROTO_TCP)}}))'",
        resolv.display()
    );
    let out = pod
        .run_ok(&["unshare", "--mount", "sh", "-c", &script])
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains("10.1.2.3") && printed.contains("fd00::5"),
        "getaddrinfo: {printed}"
    );
    bed.wait_settled();
    let m = bed.metrics();
    let s = DNSMASQ_V4;
    // dig: A twice; getaddrinfo: A and AAAA in parallel.
    println!(
        "{}",
        m.0.lines()
            .filter(|l| l.starts_with("podnet_dns") && !l.contains("_bucket"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    println!("{}", bed.status()["dns"]);
    assert_eq!(m.count(REQUESTS, &labels(s, "qtype", "A")), 3);
    assert_eq!(m.count(REQUESTS, &labels(s, "qtype", "AAAA")), 1);
    assert_eq!(m.count(RESPONSES, &labels(s, "rcode", "NOERROR")), 3);
    assert_eq!(m.count(RESPONSES, &labels(s, "rcode", "NXDOMAIN")), 1);
    assert_eq!(m.count_sum(RESPONSES), 4);
    assert_eq!(m.count_sum(TIMEOUTS), 0);
    assert_eq!(m.count_sum(RETRANSMITS), 0);
    drop(dnsmasq);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn restart_adopts_links_and_removed_endpoints_are_detached() {
    if !require_root() {
        return;
    }
    let mut bed = Bed::start("dnsadopt", &["--dns-timeout", "1s"]);
    adopted_on_restart_and_detached_with_the_endpoint(&mut bed);
}

/// One program per hook counts a query; after a restart each hook still
/// has one program (adopted, not attached twice), now the restarted agent's
/// instance while the previous one is gone from the kernel, and it counts
/// the next query; when the endpoint goes, its hooks are empty.
fn adopted_on_restart_and_detached_with_the_endpoint(bed: &mut Bed) {
    let before = bed.attached();
    assert_eq!(before.iter().map(Vec::len).collect::<Vec<_>>(), [1, 1]);
    assert_eq!(
        query(bed.pod(), bed.server_v4(), "ok-1.test", QTYPE_A)
            .unwrap()
            .rcode,
        0
    );
    bed.agent.restart(bed.topo.node()).unwrap();
    bed.wait_links(2);
    let after = bed.attached();
    assert_eq!(after.iter().map(Vec::len).collect::<Vec<_>>(), [1, 1]);
    for (old, new) in before.iter().flatten().zip(after.iter().flatten()) {
        assert_ne!(old, new, "the hook kept the previous agent's instance");
    }
    // A replaced classic filter's program is freed after an RCU grace
    // period, not by the replace itself.
    let outlived = || -> Vec<u32> {
        let loaded: Vec<u32> = aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .map(|p| p.id())
            .collect();
        before
            .iter()
            .flatten()
            .copied()
            .filter(|old| loaded.contains(old))
            .collect()
    };
    wait_for(|| outlived().is_empty(), Duration::from_secs(5));
    assert_eq!(
        outlived(),
        Vec::<u32>::new(),
        "programs outlived their agent"
    );
    assert_eq!(
        bed.status()["dns"]["last_reconcile"]["adopted"]
            .as_array()
            .map(Vec::len),
        Some(2)
    );
    assert_eq!(
        query(bed.pod(), bed.server_v4(), "ok-2.test", QTYPE_A)
            .unwrap()
            .rcode,
        0
    );
    bed.wait_settled();
    assert_eq!(
        bed.metrics()
            .count(RESPONSES, &labels("10.98.0.2", "rcode", "NOERROR")),
        2
    );
    std::fs::write(bed.agent.endpoints_file(), "[]\n").unwrap();
    bed.wait_links(0);
    assert_eq!(bed.attached(), [Vec::<u32>::new(), Vec::new()]);
}

#[test]
fn uplinks_trace_host_network_queries_and_pods_are_counted_once() {
    if !require_root() {
        return;
    }
    // The node's interface towards the server is the uplink; the pod's
    // queries cross it too (no SNAT here) and must not count twice.
    let bed = Bed::start_with_uplink("dnsup", &["--dns-timeout", "1s"]);
    let v4 = bed.server_v4();
    assert_eq!(
        query(bed.pod(), v4, "ok-pod.test", QTYPE_A).unwrap().rcode,
        0
    );
    assert_eq!(
        query(bed.topo.node(), v4, "nx-host.test", QTYPE_AAAA)
            .unwrap()
            .rcode,
        3
    );
    bed.wait_settled();
    let m = bed.metrics();
    let s = "10.98.0.2";
    assert_eq!(m.count(REQUESTS, &labels(s, "qtype", "A")), 1);
    assert_eq!(m.count(RESPONSES, &labels(s, "rcode", "NOERROR")), 1);
    let host = |k, v| [("namespace", ""), ("pod", ""), ("server", s), (k, v)];
    assert_eq!(m.count(REQUESTS, &host("qtype", "AAAA")), 1);
    assert_eq!(m.count(RESPONSES, &host("rcode", "NXDOMAIN")), 1);
    assert_eq!(m.count_sum(REQUESTS), 2);
    assert_eq!(m.count_sum(RESPONSES), 2);
    // The kernel saw the pod's query twice (pod interface and uplink).
    assert_eq!(bed.status()["dns"]["counters"]["queries"], 3);
}

/// The fallback for kernels without tcx (before 6.6), forced here with
/// `--tc-attach tc`: the programs run as podnet's classic filters (priority
/// 28760, handle 0x706e), count the same, are adopted after a restart, leave
/// with their endpoint, and a foreign filter on the same hook is untouched.
#[test]
fn classic_tc_filters_count_adopt_and_leave_foreign_filters() {
    if !require_root() {
        return;
    }
    let mut bed = Bed::start("dnstc", &["--dns-timeout", "1s", "--tc-attach", "tc"]);
    assert_eq!(bed.status()["tc_attach"], json!("tc"));
    let build = bed.metrics();
    let build = build
        .0
        .lines()
        .find(|l| l.starts_with("podnet_build_info{"))
        .unwrap()
        .to_owned();
    assert!(build.contains("tc_attach=\"tc\""), "{build}");
    let ifname = bed.topo.pod(0).host_if().to_owned();
    let node = bed.topo.node();
    let filters = |bed: &Bed, hook: &str| {
        let out = bed
            .topo
            .node()
            .run_ok(&["tc", "filter", "show", "dev", &ifname, hook])
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let ingress = filters(&bed, "ingress");
    assert!(
        ingress.contains("pref 28760 bpf")
            && ingress.contains("handle 0x706e podnet_dns_pod_ingress"),
        "{ingress}"
    );
    assert!(filters(&bed, "egress").contains("handle 0x706e podnet_dns_pod_egress"));
    // No tcx link (where the kernel has tcx): the classic filters only.
    let tcx = podnet::bpf::tc::tcx_supported();
    for d in podnet::dns::attach::Direction::BOTH
        .into_iter()
        .filter(|_| tcx)
    {
        let ifname = ifname.clone();
        let tcx = in_netns(node, move || {
            podnet::dns::attach::tcx_program_ids(&ifname, d)
        })
        .unwrap();
        assert_eq!(tcx.unwrap(), Vec::<u32>::new());
    }
    node.run_ok(&[
        "tc", "filter", "add", "dev", &ifname, "ingress", "pref", "100", "protocol", "all", "u32",
        "match", "u32", "0", "0",
    ])
    .unwrap();
    adopted_on_restart_and_detached_with_the_endpoint(&mut bed);
    let left = filters(&bed, "ingress");
    assert!(
        left.contains("pref 100 u32") && !left.contains("podnet_"),
        "{left}"
    );
}

const FAILURES: &str = "podnet_dns_failures_total";

/// Every `podnet_dns_failures_total` series: (pod, server, cause, count).
fn failures(m: &Metrics) -> Vec<(String, String, String, u64)> {
    let mut rows: Vec<_> = m
        .samples(FAILURES)
        .into_iter()
        .map(|(labels, v)| {
            let label = |k: &str| {
                labels
                    .iter()
                    .find(|(n, _)| n == k)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default()
            };
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            (label("pod"), label("server"), label("cause"), v as u64)
        })
        .collect();
    rows.sort();
    rows
}

/// The slow-log record of the query named `name`.
fn record<'a>(slow: &'a [Value], name: &str) -> &'a Value {
    slow.iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no record of {name}: {slow:#?}"))
}

/// Three pods (`shop/cart` holds a SNAT port, `web/frontend` loses its
/// race, `ops/probe` meets the other drops), the agent with a 2 s timeout
/// and a 300 ms slow threshold, and the responder on the server's IPv4.
struct WhyBed {
    topo: Topology,
    agent: Agent,
    _responder: NsChild,
    server: SocketAddr,
}

impl WhyBed {
    fn start() -> Self {
        let topo = Topology::builder().name("dnswhy").pods(3).build().unwrap();
        let names = [("shop", "cart"), ("web", "frontend"), ("ops", "probe")];
        let endpoints: Vec<EndpointSpec> = names
            .iter()
            .zip(topo.pods())
            .map(|((ns, name), pod)| {
                EndpointSpec::new(ns, name, &[IpAddr::V4(pod.ipv4()), IpAddr::V6(pod.ipv6())])
                    .interface(pod.host_if())
            })
            .collect();
        let responder = start_dns_responder(
            topo.server(),
            &[topo.server_ipv4().into(), topo.server_ipv6().into()],
        )
        .unwrap();
        let agent = Agent::start_with(
            topo.node(),
            &endpoints,
            &["--dns-timeout", "2s", "--dns-slow-threshold", "300ms"],
        )
        .unwrap();
        let server = SocketAddr::new(topo.server_ipv4().into(), 53);
        Self {
            topo,
            agent,
            _responder: responder,
            server,
        }
    }

    /// The responder's address of one family.
    fn server(&self, v6: bool) -> SocketAddr {
        if v6 {
            SocketAddr::new(self.topo.server_ipv6().into(), 53)
        } else {
            self.server
        }
    }

    /// `iptables` or `ip6tables` on the node.
    fn tables(&self, v6: bool, args: &[&str]) {
        if v6 {
            ip6tables(self.topo.node(), args).unwrap();
        } else {
            iptables(self.topo.node(), args).unwrap();
        }
    }

    fn holder(&self) -> &podnet_tests::Pod {
        self.topo.pod(0)
    }

    fn probe(&self) -> &Netns {
        self.topo.pod(2).netns()
    }

    /// Adds (`-A`) or deletes (`-D`) the rule that sends the holder's and
    /// the loser's DNS out of one address and port.
    fn snat_rule(&self, op: &str, v6: bool) {
        let snat = if v6 {
            format!("[{}]:40000-40000", self.topo.node_ipv6_to_server())
        } else {
            format!("{}:40000-40000", self.topo.node_ipv4_to_server())
        };
        let sources = format!("{},{}", self.holder().ip(v6), self.topo.pod(1).ip(v6));
        let args = [
            "-t",
            "nat",
            op,
            "POSTROUTING",
            "-s",
            &sources,
            "-p",
            "udp",
            "--dport",
            "53",
            "-j",
            "SNAT",
            "--to-source",
            &snat,
        ];
        self.tables(v6, &args);
    }

    /// The holder's query takes the port (its entry lives 30 s); the loser's
    /// first copy of `name` loses the race, and its second (same socket, same
    /// id), sent once the SNAT rule is gone, is answered: one insert race plus
    /// one retransmit, as the kernel counts it.
    fn lose_a_race_then_get_answered(&self, v6: bool, name: &str) {
        self.snat_rule("-A", v6);
        let insert_failed = || read_conntrack_stat(self.topo.node(), "insert_failed").unwrap();
        let before = insert_failed();
        let server = self.server(v6);
        assert!(query(self.holder().netns(), server, "hold.test", QTYPE_A).is_some());
        let bind: SocketAddr = if v6 {
            "[::]:0".parse().unwrap()
        } else {
            "0.0.0.0:0".parse().unwrap()
        };
        let socket = in_netns(self.topo.pod(1).netns(), move || {
            let socket = UdpSocket::bind(bind).unwrap();
            socket.connect(server).unwrap();
            socket
        })
        .unwrap();
        let message = query_message(next_query_id(), name, QTYPE_A);
        socket.send(&message).unwrap();
        // The first copy is dropped at once; nothing answers it.
        let lost = wait_for(|| insert_failed() == before + 1, Duration::from_secs(5));
        assert!(lost, "the first copy lost no race");
        self.snat_rule("-D", v6);
        socket.send(&message).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let mut answer = [0u8; 512];
        let n = socket
            .recv(&mut answer)
            .expect("the second copy is answered");
        assert!(n >= 12 && answer[..2] == message[..2], "the answer's id");
        assert_eq!(insert_failed() - before, 1, "the kernel's insert_failed");
    }

    /// A FORWARD rule drops the probe's one query `name` while it is in place.
    fn drop_by_rule(&self, v6: bool, name: &str) {
        let probe = self.topo.pod(2).ip(v6).to_string();
        let rule = |op: &str| {
            let args = [
                op, "FORWARD", "-s", &probe, "-p", "udp", "--dport", "53", "-j", "DROP",
            ];
            self.tables(v6, &args);
        };
        rule("-I");
        let lost = Duration::from_millis(500);
        let server = self.server(v6);
        let answer = udp_query(self.probe(), server, name, QTYPE_A, 1, Duration::ZERO, lost);
        assert!(answer.is_none());
        let node = self.topo.node();
        let packets = if v6 {
            forward6_rule_packets(node, "DROP")
        } else {
            forward_rule_packets(node, "DROP")
        };
        assert_eq!(packets.unwrap(), 1);
        rule("-D");
    }

    /// A blackhole route swallows the probe's query to another server; returns
    /// the metrics before and after.
    fn drop_into_blackhole(&self, hole: SocketAddr) -> (Metrics, Metrics) {
        let before = self.agent.metrics(self.topo.node()).unwrap();
        self.topo
            .node()
            .run_ok(&["ip", "route", "add", "blackhole", "10.97.0.0/24"])
            .unwrap();
        let lost = Duration::from_millis(500);
        let answer = udp_query(
            self.probe(),
            hole,
            "hole.test",
            QTYPE_A,
            1,
            Duration::ZERO,
            lost,
        );
        assert!(answer.is_none());
        self.topo
            .node()
            .run_ok(&["ip", "route", "del", "blackhole", "10.97.0.0/24"])
            .unwrap();
        (before, self.agent.metrics(self.topo.node()).unwrap())
    }

    /// No drop on the node, no answer; an answer 600 ms after each copy (so
    /// after the client sent the second, 300 ms after the first); a slow
    /// answer to a query sent once.
    fn unanswered_late_and_slow(&self) {
        let (probe, server) = (self.probe(), self.server);
        let lost = Duration::from_millis(500);
        assert!(udp_query(
            probe,
            server,
            "drop-silent.test",
            QTYPE_A,
            1,
            Duration::ZERO,
            lost
        )
        .is_none());
        let late = udp_query(
            probe,
            server,
            "delay-600-late.test",
            QTYPE_A,
            2,
            Duration::from_millis(300),
            Duration::from_secs(2),
        )
        .expect("answered");
        assert!(late.elapsed >= Duration::from_millis(600), "{late:?}");
        assert!(query(probe, server, "delay-500-slow.test", QTYPE_A).is_some());
    }

    fn slow_log(&self) -> Vec<Value> {
        self.agent
            .api("dns.slow", json!({"limit": 100}))
            .unwrap()
            .as_array()
            .cloned()
            .unwrap()
    }
}

/// Each query that timed out or was sent again gets the cause the kernel saw:
/// a copy that lost its insert race to another pod's flow (the winner named),
/// a copy dropped by a netfilter rule or into a blackhole route (the kernel's
/// reason, the same as `podnet_drops_total`'s), a query nothing on the node
/// dropped and nobody answered, and an answer that came after the client had
/// already sent the query again; a slow answer sent once is `slow` and no
/// failure. Counts equal what the clients saw and the kernel counted.
#[test]
fn every_failed_query_is_given_its_cause() {
    if !require_root() {
        return;
    }
    let bed = WhyBed::start();
    let hole: SocketAddr = "10.97.0.5:53".parse().unwrap();
    bed.lose_a_race_then_get_answered(false, "race.test");
    bed.drop_by_rule(false, "nf.test");
    bed.lose_a_race_then_get_answered(true, "race6.test");
    bed.drop_by_rule(true, "nf6.test");
    let hole_drops = bed.drop_into_blackhole(hole);
    bed.unanswered_late_and_slow();
    let server = bed.server.ip().to_string();
    let server6 = bed.server(true).ip().to_string();
    let row = |pod: &str, server: &str, cause: &str| {
        (pod.to_owned(), server.to_owned(), cause.to_owned(), 1)
    };
    let expected = vec![
        row("frontend", &server, "insert_race"),
        row("frontend", &server6, "insert_race"),
        row("probe", &hole.ip().to_string(), "dropped"),
        row("probe", &server, "dropped"),
        row("probe", &server, "late"),
        row("probe", &server, "unanswered"),
        row("probe", &server6, "dropped"),
    ];
    let node = bed.topo.node();
    let mut seen = Vec::new();
    wait_for(
        || {
            seen = failures(&bed.agent.metrics(node).unwrap());
            seen == expected
        },
        Duration::from_secs(6),
    );
    assert_eq!(seen, expected);
    let m = bed.agent.metrics(node).unwrap();
    assert_eq!(m.count_matching(TIMEOUTS, &[("pod", "probe")]), 4);
    assert_eq!(m.count_matching(RETRANSMITS, &[("pod", "frontend")]), 2);
    assert_eq!(m.count_matching(RETRANSMITS, &[("pod", "probe")]), 1);
    let winner_flow = check_records(&bed, &hole_drops);
    // podnetctl says it in words.
    let why = bed
        .agent
        .podnetctl(&["dns", "why", "web/frontend"])
        .unwrap();
    println!("{why}");
    let expected_why = format!(
        "A race.test. from web/frontend to {}: lost its conntrack insert race to shop/cart \
         ({winner_flow}), sent 2 times, answered after",
        bed.server
    );
    assert!(why.contains(&expected_why), "{why}");
    assert_eq!(why.lines().count(), 2, "the IPv4 and IPv6 races: {why}");
}

/// The slow log's records carry the causes, the winner and the kernel's
/// reasons; returns the IPv4 race's winning flow.
fn check_records(bed: &WhyBed, hole_drops: &(Metrics, Metrics)) -> String {
    let slow = bed.slow_log();
    let mut winner_flows = Vec::new();
    for (v6, race, nf) in [
        (false, "race.test.", "nf.test."),
        (true, "race6.test.", "nf6.test."),
    ] {
        let race = record(&slow, race);
        assert_eq!(
            (&race["outcome"], &race["cause"], &race["sends"]),
            (&json!("retried"), &json!("insert_race"), &json!(2))
        );
        assert_eq!(
            race["winner"]["pod"],
            json!({"namespace": "shop", "pod": "cart"})
        );
        let flow = race["winner"]["flow"].as_str().unwrap().to_owned();
        let holder = SocketAddr::new(bed.holder().ip(v6), 0).to_string();
        let holder = holder.strip_suffix(":0").unwrap();
        assert!(
            flow.starts_with(&format!("udp {holder}:"))
                && flow.ends_with(&format!(" -> {}", bed.server(v6))),
            "{flow}"
        );
        winner_flows.push(flow);
        let nf = record(&slow, nf);
        assert_eq!(
            (&nf["outcome"], &nf["cause"], &nf["drop_reason"]),
            (
                &json!("timeout"),
                &json!("dropped"),
                &json!("NETFILTER_DROP")
            )
        );
    }
    // The blackhole's reason is the one podnet_drops_total counted for the
    // probe while its query went into the hole: other drops of the probe's
    // packets may share that reason (on 6.1 one more was counted in a run).
    let hole = record(&slow, "hole.test.");
    let reason = hole["drop_reason"].as_str().unwrap();
    println!("a query into a blackhole route is dropped with reason {reason}");
    assert_eq!(hole["cause"], "dropped");
    assert_ne!(reason, "NETFILTER_DROP");
    let probe_drops = [
        ("pod", "probe"),
        ("direction", "egress"),
        ("reason", reason),
    ];
    let counted = |m: &Metrics| m.count_matching("podnet_drops_total", &probe_drops);
    assert_eq!(
        counted(&hole_drops.1) - counted(&hole_drops.0),
        1,
        "{reason}"
    );
    for (name, outcome, cause, sends) in [
        ("drop-silent.test.", "timeout", "unanswered", 1),
        ("delay-600-late.test.", "retried", "late", 2),
        ("delay-500-slow.test.", "slow", "slow", 1),
    ] {
        let r = record(&slow, name);
        let got = (
            r["outcome"].as_str(),
            r["cause"].as_str(),
            r["sends"].as_u64(),
        );
        assert_eq!(got, (Some(outcome), Some(cause), Some(sends)), "{r}");
    }
    winner_flows.swap_remove(0)
}
