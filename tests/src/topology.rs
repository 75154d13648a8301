//! A simulated node: pods and a server around a node namespace that forwards between them.
//!
//! ```text
//!  pod k netns                      node netns                      server netns
//!  eth0 10.99.a.b+2/30  ──veth──  pn<id>p<k> 10.99.a.b+1/30
//!       fd00:99:k::2/64                     fd00:99:k::1/64
//!  default via 10.99.a.b+1                  pn<id>s 10.98.0.1/24  ──veth──  eth0 10.98.0.2/24
//!                                                   fd00:98::1/64                fd00:98::2/64
//!                                                                  default via 10.98.0.1
//! ```
//!
//! Pod k's IPv4 link is the k-th /30 of 10.99.0.0/16 (`a.b` = 4k: pod 0 is 10.99.0.2, pod 1
//! 10.99.0.6, pod 64 10.99.1.2). Addresses are the same in every topology (namespaces do not share addresses), interface
//! names in the node namespace are unique per topology (`pn` + 6 hex digits).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{bail, Result};

use crate::netns::{unique_ifname, veth, Netns};

/// Most pods a topology can have (one /30 each under 10.99.0.0/16, not
/// counting the last block's broadcast address).
const MAX_PODS: usize = 16_383;
/// Pods' IPv4 links are /30 blocks of `10.99.0.0/16`: pod k's gateway is the
/// block's first address, the pod its second.
const POD_NET_V4: [u8; 2] = [10, 99];
/// Prefix length of a pod's IPv4 link.
const POD_LINK_V4_LEN: u8 = 30;
/// Pods' IPv6 addresses are `fd00:99:<k>::2`, their gateway `fd00:99:<k>::1`.
const POD_NET_V6: [u16; 2] = [0xfd00, 0x99];
/// The node–server link.
const SERVER_V4: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 2);
const NODE_TO_SERVER_V4: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 1);
const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x98, 0, 0, 0, 0, 0, 2);
const NODE_TO_SERVER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x98, 0, 0, 0, 0, 0, 1);
/// Interface name of the pods' and the server's end of their veth.
const INNER_IF: &str = "eth0";

/// Builds a [`Topology`]: `Topology::builder().name("race").pods(2).build()?`.
#[derive(Debug, Clone)]
pub struct TopologyBuilder {
    name: String,
    pods: usize,
}

impl TopologyBuilder {
    /// Prefix of the namespace names (`<name>-node-<pid>-<n>`, `<name>-pod0-...`); default
    /// `pn`. Use the test's name to tell leftovers apart.
    #[must_use]
    pub fn name(mut self, name: &str) -> Self {
        name.clone_into(&mut self.name);
        self
    }

    /// Number of pods (default 2, at most 16,383).
    #[must_use]
    pub fn pods(mut self, pods: usize) -> Self {
        self.pods = pods;
        self
    }

    /// Creates the namespaces and links. On error, whatever was created is removed again.
    pub fn build(self) -> Result<Topology> {
        if self.pods > MAX_PODS {
            bail!("a topology has at most {MAX_PODS} pods, not {}", self.pods);
        }
        let id = unique_ifname("");
        let node = Netns::new(&format!("{}-node", self.name))?;
        node.sysctl("net.ipv4.ip_forward", "1")?;
        node.sysctl("net.ipv6.conf.all.forwarding", "1")?;

        let server = Netns::new(&format!("{}-server", self.name))?;
        let node_server_if = format!("{id}s");
        veth(
            &server,
            INNER_IF,
            &[&format!("{SERVER_V4}/24"), &format!("{SERVER_V6}/64")],
            &node,
            &node_server_if,
            &[
                &format!("{NODE_TO_SERVER_V4}/24"),
                &format!("{NODE_TO_SERVER_V6}/64"),
            ],
        )?;
        default_routes(&server, NODE_TO_SERVER_V4, NODE_TO_SERVER_V6)?;

        let mut pods = Vec::with_capacity(self.pods);
        for index in 0..self.pods {
            // At most MAX_PODS, checked above, so the index fits 16 bits.
            let index = u16::try_from(index)?;
            let pod = Pod::new(index, &format!("{}-pod{index}", self.name), &id)?;
            veth(
                &pod.netns,
                INNER_IF,
                &[
                    &format!("{}/{POD_LINK_V4_LEN}", pod.ipv4()),
                    &format!("{}/64", pod.ipv6()),
                ],
                &node,
                &pod.host_if,
                &[
                    &format!("{}/{POD_LINK_V4_LEN}", pod.gateway_ipv4()),
                    &format!("{}/64", pod.gateway_ipv6()),
                ],
            )?;
            default_routes(&pod.netns, pod.gateway_ipv4(), pod.gateway_ipv6())?;
            pods.push(pod);
        }
        Ok(Topology {
            pods,
            server,
            node,
            node_server_if,
        })
    }
}

fn default_routes(netns: &Netns, via_v4: Ipv4Addr, via_v6: Ipv6Addr) -> Result<()> {
    netns.run_ok(&["ip", "route", "add", "default", "via", &via_v4.to_string()])?;
    netns.run_ok(&[
        "ip",
        "-6",
        "route",
        "add",
        "default",
        "via",
        &via_v6.to_string(),
    ])?;
    Ok(())
}

/// Pods, a node and a server, each in its own namespace (see the module docs for the
/// addresses). Dropping it removes every namespace and so every link.
#[derive(Debug)]
pub struct Topology {
    pods: Vec<Pod>,
    server: Netns,
    node: Netns,
    node_server_if: String,
}

impl Topology {
    /// Source-NATs every `proto` flow from the pods to the node's address
    /// towards the server, on the single port `port` (IPv6 with `v6`): the
    /// set-up in which every new flow to an address and port already held by
    /// another pod's flow loses the conntrack insert race.
    pub fn snat_pods_to_one_port(&self, proto: &str, v6: bool, port: u16) -> Result<()> {
        self.snat_pods(proto, v6, Some(port))
    }

    /// Source-NATs every `proto` flow from the pods to the node's address
    /// towards the server (IPv6 with `v6`), on `port` alone, or on the
    /// ports NAT picks itself without one.
    pub fn snat_pods(&self, proto: &str, v6: bool, port: Option<u16>) -> Result<()> {
        let ports = port.map(|p| format!(":{p}-{p}")).unwrap_or_default();
        let (cidr, to) = if v6 {
            (
                self.pods_cidr_v6(),
                format!("[{}]{ports}", self.node_ipv6_to_server()),
            )
        } else {
            (
                self.pods_cidr_v4(),
                format!("{}{ports}", self.node_ipv4_to_server()),
            )
        };
        let args = [
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-s",
            cidr,
            "-p",
            proto,
            "-j",
            "SNAT",
            "--to-source",
            &to,
        ];
        if v6 {
            crate::ip6tables(self.node(), &args)?;
        } else {
            crate::iptables(self.node(), &args)?;
        }
        Ok(())
    }

    /// A builder with the defaults: name `pn`, 2 pods.
    pub fn builder() -> TopologyBuilder {
        TopologyBuilder {
            name: "pn".to_owned(),
            pods: 2,
        }
    }

    /// The node namespace (forwarding on for IPv4 and IPv6); run the agent and the SNAT rules
    /// here.
    pub fn node(&self) -> &Netns {
        &self.node
    }

    /// The server namespace.
    pub fn server(&self) -> &Netns {
        &self.server
    }

    /// All pods, in index order.
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// Pod `index`.
    ///
    /// # Panics
    /// If there is no such pod.
    pub fn pod(&self, index: usize) -> &Pod {
        &self.pods[index]
    }

    /// The server's IPv4 address, 10.98.0.2.
    pub fn server_ipv4(&self) -> Ipv4Addr {
        SERVER_V4
    }

    /// The server's IPv6 address, `fd00:98::2`.
    pub fn server_ipv6(&self) -> Ipv6Addr {
        SERVER_V6
    }

    /// The node's IPv4 address towards the server, 10.98.0.1 (the SNAT source).
    pub fn node_ipv4_to_server(&self) -> Ipv4Addr {
        NODE_TO_SERVER_V4
    }

    /// The node's IPv6 address towards the server, `fd00:98::1`.
    pub fn node_ipv6_to_server(&self) -> Ipv6Addr {
        NODE_TO_SERVER_V6
    }

    /// The node's interface towards the server (in the node namespace).
    pub fn node_server_if(&self) -> &str {
        &self.node_server_if
    }

    /// The pods' IPv4 network, 10.99.0.0/16 (for `-s` in SNAT rules).
    pub fn pods_cidr_v4(&self) -> &'static str {
        "10.99.0.0/16"
    }

    /// The pods' IPv6 network, `fd00:99::/32`.
    pub fn pods_cidr_v6(&self) -> &'static str {
        "fd00:99::/32"
    }
}

/// A pod: a namespace whose `eth0` is a veth into the node namespace.
#[derive(Debug)]
pub struct Pod {
    index: u16,
    netns: Netns,
    host_if: String,
}

impl Pod {
    fn new(index: u16, prefix: &str, id: &str) -> Result<Self> {
        Ok(Pod {
            index,
            netns: Netns::new(prefix)?,
            host_if: format!("{id}p{index}"),
        })
    }

    /// The pod's index in its topology.
    pub fn index(&self) -> usize {
        usize::from(self.index)
    }

    /// Address `offset` (1 or 2) of the pod's IPv4 /30 link.
    fn link_v4(&self, offset: u32) -> Ipv4Addr {
        let base = u32::from(Ipv4Addr::new(POD_NET_V4[0], POD_NET_V4[1], 0, 0));
        Ipv4Addr::from(base + 4 * u32::from(self.index) + offset)
    }

    /// The pod's namespace.
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// The pod's interface name inside its namespace, `eth0`.
    pub fn if_name(&self) -> &'static str {
        INNER_IF
    }

    /// The host side of the pod's veth, in the node namespace (`pn<id>p<k>`, unique per
    /// topology); what an endpoints file names as the pod's `interface`.
    pub fn host_if(&self) -> &str {
        &self.host_if
    }

    /// The pod's IPv4 address, the second of its /30 (`10.99.0.2` for pod 0, `10.99.0.6`
    /// for pod 1).
    pub fn ipv4(&self) -> Ipv4Addr {
        self.link_v4(2)
    }

    /// The pod's IPv6 address, `fd00:99:<k>::2`.
    pub fn ipv6(&self) -> Ipv6Addr {
        Ipv6Addr::new(POD_NET_V6[0], POD_NET_V6[1], self.index, 0, 0, 0, 0, 2)
    }

    /// The pod's address of the given family.
    pub fn ip(&self, ipv6: bool) -> IpAddr {
        if ipv6 {
            self.ipv6().into()
        } else {
            self.ipv4().into()
        }
    }

    /// The pod's IPv4 gateway, the node's end of the veth, the first address of its /30.
    pub fn gateway_ipv4(&self) -> Ipv4Addr {
        self.link_v4(1)
    }

    /// The pod's IPv6 gateway, `fd00:99:<k>::1`.
    pub fn gateway_ipv6(&self) -> Ipv6Addr {
        Ipv6Addr::new(POD_NET_V6[0], POD_NET_V6[1], self.index, 0, 0, 0, 0, 1)
    }
}
