//! The harness's own tests (as root): namespaces, topology, traffic, processes, and the
//! deterministic conntrack insert race from DESIGN.md, checked against the kernel's counters.

use std::{
    net::{SocketAddr, UdpSocket},
    path::Path,
    time::Duration,
};

use super::*;

/// How long to wait for packets to cross the namespaces.
const SETTLE: Duration = Duration::from_secs(5);

#[test]
fn netns_is_created_and_removed() {
    if !require_root() {
        return;
    }
    let netns = Netns::new("pnself").unwrap();
    let path = netns.path();
    assert!(path.exists());
    assert!(netns.name().starts_with("pnself-"));
    let out = netns.run_ok(&["ip", "-o", "link", "show", "lo"]).unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("UP"));
    assert!(netns.run_ok(&["false"]).is_err());
    assert!(!netns.run(&["false"]).unwrap().status.success());
    drop(netns);
    assert!(!path.exists(), "{} still exists", path.display());
}

#[test]
fn in_netns_sees_only_the_namespace() {
    if !require_root() {
        return;
    }
    let netns = Netns::new("pnself").unwrap();
    let links = in_netns(&netns, || {
        std::fs::read_to_string("/proc/thread-self/net/dev").unwrap()
    })
    .unwrap();
    let names: Vec<&str> = links
        .lines()
        .skip(2)
        .filter_map(|line| line.split(':').next())
        .map(str::trim)
        .collect();
    assert_eq!(names, ["lo"]);
}

#[test]
fn unique_ifnames_fit_the_kernel_limit() {
    let a = unique_ifname("p0");
    let b = unique_ifname("p0");
    assert_ne!(a, b);
    assert!(a.len() <= MAX_IFNAME_LEN && a.starts_with("pn"), "{a}");
}

#[test]
fn pods_reach_the_server_over_ipv4_and_ipv6() {
    if !require_root() {
        return;
    }
    let topo = Topology::builder().name("pnping").pods(2).build().unwrap();
    for pod in topo.pods() {
        pod.netns()
            .run_ok(&[
                "ping",
                "-c",
                "1",
                "-W",
                "1",
                &topo.server_ipv4().to_string(),
            ])
            .unwrap();
        pod.netns()
            .run_ok(&[
                "ping",
                "-6",
                "-c",
                "1",
                "-W",
                "1",
                &topo.server_ipv6().to_string(),
            ])
            .unwrap();
    }
    // The pod's host-side interface is in the node namespace.
    topo.node()
        .run_ok(&["ip", "link", "show", topo.pod(1).host_if()])
        .unwrap();
}

#[test]
fn two_topologies_coexist() {
    if !require_root() {
        return;
    }
    let first = Topology::builder().name("pntwo").pods(1).build().unwrap();
    let second = Topology::builder().name("pntwo").pods(1).build().unwrap();
    assert_ne!(first.pod(0).host_if(), second.pod(0).host_if());
    assert_ne!(first.node().name(), second.node().name());
    for topo in [&first, &second] {
        topo.pod(0)
            .netns()
            .run_ok(&[
                "ping",
                "-c",
                "1",
                "-W",
                "1",
                &topo.server_ipv4().to_string(),
            ])
            .unwrap();
    }
}

#[test]
fn udp_and_tcp_echo_through_the_node() {
    if !require_root() {
        return;
    }
    let topo = Topology::builder().name("pnecho").pods(1).build().unwrap();
    let pod = topo.pod(0);
    let udp = udp_echo_server(
        topo.server(),
        SocketAddr::new(topo.server_ipv6().into(), 7000),
    )
    .unwrap();
    let echoed = in_netns(pod.netns(), || {
        let socket = UdpSocket::bind(SocketAddr::new(pod.ipv6().into(), 5000)).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        socket.send_to(b"ping", udp.addr()).unwrap();
        let mut buf = [0u8; 16];
        let (len, from) = socket.recv_from(&mut buf).unwrap();
        (buf[..len].to_vec(), from)
    })
    .unwrap();
    assert_eq!(echoed, (b"ping".to_vec(), udp.addr()));
    assert_eq!(udp.stop(), 1);

    let tcp = tcp_echo_server(
        topo.server(),
        SocketAddr::new(topo.server_ipv4().into(), 7001),
    )
    .unwrap();
    tcp_connect(pod.netns(), tcp.addr(), Duration::from_secs(2)).unwrap();
    assert!(wait_for(|| tcp.accepted() == 1, SETTLE));
    assert_eq!(tcp.stop(), 1);
}

#[test]
fn spawned_process_is_stopped_by_pid() {
    if !require_root() {
        return;
    }
    let netns = Netns::new("pnspawn").unwrap();
    let mut child = spawn_in(
        &netns,
        &[
            "sh",
            "-c",
            "echo started; cat /proc/thread-self/net/dev; exec sleep 30",
        ],
    )
    .unwrap();
    let pid = child.pid();
    let log_path = child.log_path().to_owned();
    assert!(wait_for(
        || child.log().contains("lo:"),
        Duration::from_secs(5)
    ));
    assert!(child.try_wait().unwrap().is_none());
    // The command itself runs in the namespace (nsenter execs it).
    let own = std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    let netns_inode = std::fs::metadata(netns.path()).unwrap();
    assert!(
        own.to_string_lossy()
            .contains(&std::os::unix::fs::MetadataExt::ino(&netns_inode).to_string()),
        "{own:?}"
    );
    drop(child);
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    assert!(!log_path.exists());
}

/// DESIGN.md's deterministic insert race: with SNAT of every pod to one port, pod A's flow
/// holds the reply tuple, and each datagram pod B sends to the same server port fails to
/// confirm, so `insert_failed` and `drop` rise by exactly one per datagram.
#[test]
fn deterministic_insert_race_counts_exactly() {
    if !require_root() {
        return;
    }
    let topo = Topology::builder().name("pnrace").pods(2).build().unwrap();
    let node = topo.node();
    let to_source = format!("{}:40000-40000", topo.node_ipv4_to_server());
    iptables(
        node,
        &[
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-s",
            topo.pods_cidr_v4(),
            "-p",
            "udp",
            "-j",
            "SNAT",
            "--to-source",
            &to_source,
        ],
    )
    .unwrap();
    let server = udp_echo_server(
        topo.server(),
        SocketAddr::new(topo.server_ipv4().into(), 7000),
    )
    .unwrap();
    let (a, b) = (topo.pod(0), topo.pod(1));
    let before = conntrack_stats(node).unwrap();

    udp_send(
        a.netns(),
        SocketAddr::new(a.ipv4().into(), 5000),
        server.addr(),
        1,
    )
    .unwrap();
    // Pod A's entry must be confirmed (its datagram delivered) before pod B sends.
    assert!(wait_for(|| server.received() == 1, SETTLE));

    udp_send(
        b.netns(),
        SocketAddr::new(b.ipv4().into(), 5001),
        server.addr(),
        5,
    )
    .unwrap();
    let delta = |column: &str| {
        conntrack_stats(node)
            .unwrap()
            .delta(&before, column)
            .unwrap()
    };
    assert!(
        wait_for(|| delta("insert_failed") >= 5, SETTLE),
        "insert_failed rose by {} only",
        delta("insert_failed")
    );
    // Give stray late packets a moment to show up before asserting exact numbers.
    std::thread::sleep(Duration::from_millis(200));
    let after = conntrack_stats(node).unwrap();
    eprintln!(
        "insert race: insert_failed +{}, drop +{}, clashres +{}, server received {}",
        after.delta(&before, "insert_failed").unwrap(),
        after.delta(&before, "drop").unwrap(),
        after.delta(&before, "clashres").unwrap(),
        server.received()
    );
    assert_eq!(after.delta(&before, "insert_failed").unwrap(), 5);
    assert_eq!(after.delta(&before, "drop").unwrap(), 5);
    assert_eq!(
        server.stop(),
        1,
        "pod B's datagrams must not reach the server"
    );
    // The pods' conntrack statistics (other namespaces) saw nothing of it.
    assert_eq!(read_conntrack_stat(b.netns(), "insert_failed").unwrap(), 0);
}
