//! What the node namespace holds besides podnet, so that the kernel path pays
//! what it pays on a real node: kube-proxy's iptables rules for 1,000
//! Services and a conntrack table with 100,000 entries.

use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use podnet_tests::{
    kube_proxy::{self, Ruleset, Services},
    vpc::{Vpc, VPC_CIDR},
    Netns,
};

/// Services kube-proxy has rules for.
pub const SERVICES: usize = 1000;
/// Endpoints per Service.
pub const ENDPOINTS: usize = 2;
/// Every this many Services one is a node port Service.
pub const NODE_PORT_EVERY: usize = 10;
/// Entries put in the node's conntrack table before the rounds.
pub const CONNTRACK_ENTRIES: u64 = 100_000;
/// Unreplied UDP entries live this long (s): longer than the whole bench.
const UDP_TIMEOUT_S: &str = "900";
/// Source ports of the datagrams that fill the table; each sends one
/// datagram to each of `CONNTRACK_ENTRIES / 2` destination ports.
const FILL_SOURCE_PORTS: [u16; 2] = [7000, 7001];
/// First destination port of those datagrams.
const FILL_FIRST_PORT: u16 = 10_000;

/// The node as built: kube-proxy's rule counts and the table's size.
#[derive(Clone, Debug)]
pub struct Node {
    /// The rules loaded.
    pub rules: Ruleset,
    /// Conntrack entries once the table was filled.
    pub conntrack_entries: u64,
}

/// Loads kube-proxy's rules into the VPC's node and fills its conntrack
/// table; checks both against the kernel's view.
pub fn build(vpc: &Vpc) -> Result<Node> {
    let node = vpc.node();
    let services = Services {
        count: SERVICES,
        endpoints: ENDPOINTS,
        node_port_every: NODE_PORT_EVERY,
        cluster_cidr: VPC_CIDR.into(),
        // Pods of other nodes in the VPC, away from the bench's addresses.
        first_endpoint: Ipv4Addr::new(10, 0, 32, 2),
    };
    let rules = services.ruleset()?;
    kube_proxy::load(node, &rules)?;
    let (nat, filter) = (
        kube_proxy::count_rules(node, "nat")?,
        kube_proxy::count_rules(node, "filter")?,
    );
    if nat != rules.nat_rules + rules.nat_jumps || filter != rules.filter_rules + rules.filter_jumps
    {
        bail!(
            "kube-proxy rules in the node: {nat} nat and {filter} filter, expected {} and {}",
            rules.nat_rules + rules.nat_jumps,
            rules.filter_rules + rules.filter_jumps
        );
    }
    let eni = vpc.enis().first().context("a VPC without ENIs")?;
    fill_conntrack(node, eni.primary(), eni.gateway())?;
    let conntrack_entries = entries(node)?;
    if conntrack_entries < CONNTRACK_ENTRIES {
        bail!("the node's conntrack table has {conntrack_entries} entries, expected at least {CONNTRACK_ENTRIES}");
    }
    Ok(Node {
        rules,
        conntrack_entries,
    })
}

/// One UDP datagram from the node's ENI address to each of
/// `CONNTRACK_ENTRIES / 2` ports of the VPC gateway, from each of two source
/// ports: one unreplied conntrack entry each, kept for [`UDP_TIMEOUT_S`].
fn fill_conntrack(node: &Netns, from: Ipv4Addr, to: Ipv4Addr) -> Result<()> {
    node.sysctl("net.netfilter.nf_conntrack_udp_timeout", UDP_TIMEOUT_S)?;
    let per_source = u16::try_from(CONNTRACK_ENTRIES / 2)?;
    podnet_tests::in_netns(node, move || -> Result<()> {
        for port in FILL_SOURCE_PORTS {
            let socket = UdpSocket::bind(SocketAddr::new(from.into(), port))
                .with_context(|| format!("binding {from}:{port}"))?;
            for offset in 0..per_source {
                let dst = SocketAddr::new(to.into(), FILL_FIRST_PORT + offset);
                // A full socket buffer refuses a datagram: send it again,
                // for at most 1 s.
                let mut tries = 0;
                while socket.send_to(b"ct", dst).is_err() {
                    tries += 1;
                    if tries > 10_000 {
                        bail!("sending to {dst} failed for 1 s");
                    }
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
        }
        Ok(())
    })?
}

/// Entries in `node`'s conntrack table (`conntrack -C`).
pub fn entries(node: &Netns) -> Result<u64> {
    let out = node.run_ok(&["conntrack", "-C"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .parse()
        .with_context(|| format!("conntrack -C printed {text:?}"))
}
