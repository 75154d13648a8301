//! A simulated VPC for native-routing tests: a node with ENIs, pods whose
//! addresses are ENI secondary addresses, and the VPC behind the ENIs.
//!
//! ```text
//!  pod k netns                      node netns                       vpc netns
//!  eth0 10.0.<e>.<10+j>/32  ──veth──  <id>v<k> (no address)
//!  default via 169.254.1.1 (static neighbour: the host veth's MAC)
//!                                     eni<e> 10.0.<e>.5/24  ──veth──  gw<e> 10.0.<e>.1/24
//!                                     MAC 02:00:00:00:0<e>:01          lo 10.0.200.2/32 (remote host)
//! ```
//!
//! The node only has the links and the ENIs' primary addresses (what the
//! cloud and the OS give it); routes, rules and proxy-ARP entries for the pods
//! are podnet's job. IPv6 is off in every namespace so interface packet
//! counters only move for the traffic a test sends. The VPC's gateways reach
//! the pods through proxy ARP on the ENIs (`proxy_delay` 0, so the first
//! packet is not held back).
//!
//! With [`VpcBuilder::ipv6`] the VPC is dual-stack: every ENI also has the
//! subnet `fd00:10:0:<e>::/64` (gateway `::1`, the ENI's primary `::5`),
//! every pod also `fd00:10:0:<e>::<10+j>/128` with the default route via
//! `fe80::1` (a static neighbour: the host veth's MAC), and the remote host
//! also [`REMOTE6`]. Router solicitations, duplicate address detection and
//! repeated MLD reports are off, so that once the links are up, counters
//! move only for the traffic a test sends (and the neighbour discovery it
//! causes).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{bail, Context as _, Result};

use crate::{
    agent::EndpointSpec,
    netns::{unique_ifname, wait_link_up, Netns},
};

/// The VPC's range (for `--vpc-cidrs`).
pub const VPC_CIDR: &str = "10.0.0.0/16";
/// A host in the VPC, behind the gateways (on the VPC namespace's loopback).
pub const REMOTE: Ipv4Addr = Ipv4Addr::new(10, 0, 200, 2);
/// The VPC's IPv6 range (for `--vpc-cidrs`), with [`VpcBuilder::ipv6`].
pub const VPC_CIDR6: &str = "fd00:10::/48";
/// The remote host's IPv6 address, with [`VpcBuilder::ipv6`].
pub const REMOTE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0, 0xc8, 0, 0, 0, 2);
/// The pods' IPv6 default gateway, answered by a static neighbour entry.
const POD_GATEWAY6: &str = "fe80::1";
/// In a dual-stack VPC, the neighbour entries (ARP and NDP) of the ENIs and
/// the gateways stay reachable 5 to 15 minutes once resolved, and an entry
/// learnt from a solicitation (stale) is used 10 minutes before it is
/// probed: with the kernel's 15 to 45 s and 5 s, the node's probe of the
/// gateway and its answer to the gateway's probe (one solicitation and one
/// advertisement on each ENI, `nstat`'s `Icmp6OutNeighborSolicits` and
/// `Icmp6OutNeighborAdvertisements`) land in a measurement that starts more
/// than 5 s after the warm-up, as on emulated kernels.
const LONG_REACHABLE_MS: &str = "600000";
/// See [`LONG_REACHABLE_MS`]: `delay_first_probe_time`, in seconds.
const LONG_DELAY_S: &str = "600";
/// The pods' default gateway, answered by a static neighbour entry.
const POD_GATEWAY: &str = "169.254.1.1";
/// Most ENIs and pods per ENI.
const MAX_ENIS: usize = 9;
const MAX_PODS_PER_ENI: usize = 50;
/// How long links may take to come up.
const LINK_UP: std::time::Duration = std::time::Duration::from_secs(5);

/// Builds a [`Vpc`].
#[derive(Debug, Clone)]
pub struct VpcBuilder {
    name: String,
    enis: usize,
    pods_per_eni: usize,
    ipv6: bool,
}

impl VpcBuilder {
    /// Prefix of the namespace names.
    #[must_use]
    pub fn name(mut self, name: &str) -> Self {
        name.clone_into(&mut self.name);
        self
    }

    /// Number of ENIs (default 2, at most 9).
    #[must_use]
    pub fn enis(mut self, enis: usize) -> Self {
        self.enis = enis;
        self
    }

    /// Pods on each ENI (default 1, at most 50).
    #[must_use]
    pub fn pods_per_eni(mut self, pods: usize) -> Self {
        self.pods_per_eni = pods;
        self
    }

    /// Dual-stack: IPv6 subnets on the ENIs, IPv6 addresses on the pods
    /// (default: IPv4 only, IPv6 off).
    #[must_use]
    pub fn ipv6(mut self, on: bool) -> Self {
        self.ipv6 = on;
        self
    }

    /// Creates the namespaces and links; on error whatever was created goes.
    pub fn build(self) -> Result<Vpc> {
        if self.enis == 0 || self.enis > MAX_ENIS || self.pods_per_eni > MAX_PODS_PER_ENI {
            bail!("a VPC has 1 to {MAX_ENIS} ENIs and at most {MAX_PODS_PER_ENI} pods per ENI");
        }
        let fabric = Netns::new(&format!("{}-vpc", self.name))?;
        let node = Netns::new(&format!("{}-node", self.name))?;
        for ns in [&fabric, &node] {
            quiet(ns, self.ipv6)?;
            ns.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
            ns.sysctl("net.ipv4.conf.default.rp_filter", "0")?;
            ns.sysctl("net.ipv4.ip_forward", "1")?;
            if self.ipv6 {
                ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
            }
        }
        fabric.run_ok(&["ip", "address", "add", &format!("{REMOTE}/32"), "dev", "lo"])?;
        if self.ipv6 {
            let remote6 = format!("{REMOTE6}/128");
            fabric.run_ok(&["ip", "-6", "address", "add", &remote6, "dev", "lo"])?;
        }
        let id = unique_ifname("");
        let mut vpc = Vpc {
            pods: Vec::new(),
            enis: Vec::new(),
            node,
            fabric,
            ipv6: self.ipv6,
        };
        for e in 1..=self.enis {
            let octet = u8::try_from(e)?;
            vpc.add_eni(octet)?;
            for j in 0..self.pods_per_eni {
                let host = u8::try_from(10 + j)?;
                let ip = Ipv4Addr::new(10, 0, octet, host);
                let ip6 = self.ipv6.then(|| subnet6_address(octet, u16::from(host)));
                vpc.add_pod(&self.name, &id, (ip, ip6), e - 1)?;
            }
        }
        Ok(vpc)
    }
}

/// Address `host` of ENI `octet`'s IPv6 subnet, `fd00:10:0:<octet>::<host>`.
fn subnet6_address(octet: u8, host: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10, 0, u16::from(octet), 0, 0, 0, host)
}

/// IPv6 off, so interface counters move only for the traffic a test sends;
/// or, with `ipv6`, on without the messages a host sends by itself once its
/// links are up: no router solicitations, no duplicate address detection,
/// MLD reports repeated within milliseconds rather than seconds (and the
/// links' neighbour entries stay reachable: [`LONG_REACHABLE_MS`]).
fn quiet(ns: &Netns, ipv6: bool) -> Result<()> {
    if !ipv6 {
        ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
        return ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1");
    }
    for scope in ["all", "default"] {
        ns.sysctl(&format!("net.ipv6.conf.{scope}.router_solicitations"), "0")?;
        ns.sysctl(&format!("net.ipv6.conf.{scope}.accept_dad"), "0")?;
        ns.sysctl(&format!("net.ipv6.conf.{scope}.accept_ra"), "0")?;
        ns.sysctl(
            &format!("net.ipv6.conf.{scope}.mldv2_unsolicited_report_interval"),
            "1",
        )?;
        ns.sysctl(
            &format!("net.ipv6.conf.{scope}.mldv1_unsolicited_report_interval"),
            "1",
        )?;
    }
    Ok(())
}

impl Vpc {
    fn add_eni(&mut self, octet: u8) -> Result<()> {
        let (node, fabric) = (&self.node, &self.fabric);
        let eni = EniLink {
            name: format!("eni{octet}"),
            mac: format!("02:00:00:00:{octet:02x}:01"),
            table: 100 + u32::from(octet),
            octet,
        };
        let gw_if = eni.gw_if();
        host(&[
            "ip",
            "link",
            "add",
            "name",
            &eni.name,
            "netns",
            node.name(),
            "address",
            &eni.mac,
            "type",
            "veth",
            "peer",
            "name",
            &gw_if,
            "netns",
            fabric.name(),
        ])?;
        node.sysctl(&format!("net.ipv4.neigh.{}.proxy_delay", eni.name), "0")?;
        let primary = format!("{}/24", eni.primary());
        node.run_ok(&["ip", "address", "add", &primary, "dev", &eni.name])?;
        let gateway = format!("{}/24", eni.gateway());
        fabric.run_ok(&["ip", "address", "add", &gateway, "dev", &gw_if])?;
        if self.ipv6 {
            node.sysctl(&format!("net.ipv6.neigh.{}.proxy_delay", eni.name), "0")?;
            for family in ["ipv4", "ipv6"] {
                for (ns, ifname) in [(node, &eni.name), (fabric, &gw_if)] {
                    let neigh = format!("net.{family}.neigh.{ifname}");
                    ns.sysctl(
                        &format!("{neigh}.base_reachable_time_ms"),
                        LONG_REACHABLE_MS,
                    )?;
                    ns.sysctl(&format!("{neigh}.delay_first_probe_time"), LONG_DELAY_S)?;
                }
            }
            let primary6 = format!("{}/64", subnet6_address(octet, 5));
            node.run_ok(&["ip", "-6", "address", "add", &primary6, "dev", &eni.name])?;
            let gateway6 = format!("{}/64", eni.gateway6());
            fabric.run_ok(&["ip", "-6", "address", "add", &gateway6, "dev", &gw_if])?;
        }
        node.run_ok(&["ip", "link", "set", &eni.name, "up"])?;
        fabric.run_ok(&["ip", "link", "set", &gw_if, "up"])?;
        wait_link_up(node, &eni.name, LINK_UP)?;
        wait_link_up(fabric, &gw_if, LINK_UP)?;
        self.enis.push(eni);
        Ok(())
    }

    fn add_pod(
        &mut self,
        prefix: &str,
        id: &str,
        (ip, ip6): (Ipv4Addr, Option<Ipv6Addr>),
        eni: usize,
    ) -> Result<()> {
        let index = self.pods.len();
        let pod = VpcPod {
            netns: Netns::new(&format!("{prefix}-pod{index}"))?,
            host_if: format!("{id}v{index}"),
            ip,
            ip6,
            eni,
        };
        let (node, ns) = (&self.node, &pod.netns);
        quiet(ns, self.ipv6)?;
        host(&[
            "ip",
            "link",
            "add",
            "name",
            "eth0",
            "netns",
            ns.name(),
            "type",
            "veth",
            "peer",
            "name",
            &pod.host_if,
            "netns",
            node.name(),
        ])?;
        node.run_ok(&["ip", "link", "set", &pod.host_if, "up"])?;
        ns.run_ok(&["ip", "address", "add", &format!("{ip}/32"), "dev", "eth0"])?;
        ns.run_ok(&["ip", "link", "set", "eth0", "up"])?;
        ns.run_ok(&[
            "ip",
            "route",
            "add",
            POD_GATEWAY,
            "dev",
            "eth0",
            "scope",
            "link",
        ])?;
        ns.run_ok(&[
            "ip",
            "route",
            "add",
            "default",
            "via",
            POD_GATEWAY,
            "dev",
            "eth0",
        ])?;
        let mac = link_mac(node, &pod.host_if)?;
        ns.run_ok(&[
            "ip",
            "neigh",
            "add",
            POD_GATEWAY,
            "lladdr",
            &mac,
            "dev",
            "eth0",
            "nud",
            "permanent",
        ])?;
        if let Some(ip6) = ip6 {
            let address = format!("{ip6}/128");
            ns.run_ok(&["ip", "-6", "address", "add", &address, "dev", "eth0"])?;
            ns.run_ok(&[
                "ip",
                "-6",
                "neigh",
                "add",
                POD_GATEWAY6,
                "lladdr",
                &mac,
                "dev",
                "eth0",
                "nud",
                "permanent",
            ])?;
            ns.run_ok(&[
                "ip",
                "-6",
                "route",
                "add",
                "default",
                "via",
                POD_GATEWAY6,
                "dev",
                "eth0",
            ])?;
        }
        wait_link_up(node, &pod.host_if, LINK_UP)?;
        wait_link_up(ns, "eth0", LINK_UP)?;
        self.pods.push(pod);
        Ok(())
    }
}

fn host(cmd: &[&str]) -> Result<()> {
    let out = std::process::Command::new(cmd[0])
        .args(&cmd[1..])
        .output()
        .with_context(|| format!("starting {}", cmd.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{}` failed: {}",
            cmd.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn link_json(netns: &Netns, ifname: &str) -> Result<serde_json::Value> {
    let out = netns.run_ok(&["ip", "-s", "-j", "link", "show", "dev", ifname])?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    v.get(0)
        .cloned()
        .with_context(|| format!("no link {ifname} in {}", netns.name()))
}

fn link_mac(netns: &Netns, ifname: &str) -> Result<String> {
    link_json(netns, ifname)?["address"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("{ifname} has no MAC"))
}

/// A link's packet counters, as the kernel counts them (`ip -s -j link`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkPackets {
    /// Packets received.
    pub rx: u64,
    /// Packets sent.
    pub tx: u64,
}

/// Rules of another owner in `node`: priority 300 (below podnet's 512–1536
/// range) `from 10.0.1.99 lookup 101`, and priority 1000 (inside it)
/// `to 10.7.0.0/16 lookup main`. podnet must never touch either.
pub fn add_foreign_rules(node: &Netns) -> Result<()> {
    node.run_ok(&[
        "ip",
        "rule",
        "add",
        "priority",
        "300",
        "from",
        "10.0.1.99",
        "lookup",
        "101",
    ])?;
    node.run_ok(&[
        "ip",
        "rule",
        "add",
        "priority",
        "1000",
        "to",
        "10.7.0.0/16",
        "lookup",
        "main",
    ])?;
    Ok(())
}

/// Reads `ifname`'s packet counters in `netns`.
pub fn link_packets(netns: &Netns, ifname: &str) -> Result<LinkPackets> {
    let v = link_json(netns, ifname)?;
    let stats = &v["stats64"];
    let get = |dir: &str| {
        stats[dir]["packets"]
            .as_u64()
            .with_context(|| format!("{ifname}: no {dir} packet count"))
    };
    Ok(LinkPackets {
        rx: get("rx")?,
        tx: get("tx")?,
    })
}

/// An ENI: the node end of a veth into the VPC namespace.
#[derive(Debug, Clone)]
pub struct EniLink {
    name: String,
    mac: String,
    table: u32,
    octet: u8,
}

impl EniLink {
    /// Interface name in the node namespace (`eni<e>`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its MAC.
    pub fn mac(&self) -> &str {
        &self.mac
    }

    /// Its routing table (100 + e).
    pub fn table(&self) -> u32 {
        self.table
    }

    /// Its subnet, `10.0.<e>.0/24`.
    pub fn subnet(&self) -> String {
        format!("10.0.{}.0/24", self.octet)
    }

    /// The subnet's gateway, `10.0.<e>.1`, in the VPC namespace.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, self.octet, 1)
    }

    /// Its IPv6 subnet, `fd00:10:0:<e>::/64` (with [`VpcBuilder::ipv6`]).
    pub fn subnet6(&self) -> String {
        format!("{}/64", subnet6_address(self.octet, 0))
    }

    /// The IPv6 subnet's gateway, `fd00:10:0:<e>::1`, in the VPC namespace.
    pub fn gateway6(&self) -> Ipv6Addr {
        subnet6_address(self.octet, 1)
    }

    /// The ENI's primary address, `10.0.<e>.5`.
    pub fn primary(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, self.octet, 5)
    }

    /// The gateway side's interface name in the VPC namespace.
    pub fn gw_if(&self) -> String {
        format!("gw{}", self.octet)
    }
}

/// A pod with an ENI secondary address.
#[derive(Debug)]
pub struct VpcPod {
    netns: Netns,
    host_if: String,
    ip: Ipv4Addr,
    ip6: Option<Ipv6Addr>,
    eni: usize,
}

impl VpcPod {
    /// The pod's namespace.
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// The host side of its veth, in the node namespace.
    pub fn host_if(&self) -> &str {
        &self.host_if
    }

    /// Its address (an ENI secondary address).
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// Its IPv6 address (in its ENI's IPv6 subnet), in a dual-stack VPC.
    pub fn ip6(&self) -> Option<Ipv6Addr> {
        self.ip6
    }

    /// Its addresses: IPv4, then IPv6 in a dual-stack VPC.
    pub fn ips(&self) -> Vec<IpAddr> {
        std::iter::once(IpAddr::V4(self.ip))
            .chain(self.ip6.map(IpAddr::V6))
            .collect()
    }

    /// Index of its ENI in [`Vpc::enis`].
    pub fn eni(&self) -> usize {
        self.eni
    }
}

/// The simulated VPC; dropping it removes every namespace.
#[derive(Debug)]
pub struct Vpc {
    pods: Vec<VpcPod>,
    enis: Vec<EniLink>,
    node: Netns,
    fabric: Netns,
    ipv6: bool,
}

impl Vpc {
    /// A builder: name `pn`, 2 ENIs, 1 pod per ENI, IPv4 only.
    pub fn builder() -> VpcBuilder {
        VpcBuilder {
            name: "pn".into(),
            enis: 2,
            pods_per_eni: 1,
            ipv6: false,
        }
    }

    /// Whether the VPC is dual-stack ([`VpcBuilder::ipv6`]).
    pub fn is_dual_stack(&self) -> bool {
        self.ipv6
    }

    /// The node namespace (run the agent here).
    pub fn node(&self) -> &Netns {
        &self.node
    }

    /// The VPC namespace (gateways and the remote host).
    pub fn vpc(&self) -> &Netns {
        &self.fabric
    }

    /// The ENIs.
    pub fn enis(&self) -> &[EniLink] {
        &self.enis
    }

    /// The pods, ENI by ENI.
    pub fn pods(&self) -> &[VpcPod] {
        &self.pods
    }

    /// The `--enis` file describing the ENIs and the pods' addresses.
    pub fn enis_yaml(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        for (i, e) in self.enis.iter().enumerate() {
            let ips: Vec<String> = self
                .pods
                .iter()
                .filter(|p| p.eni == i)
                .map(|p| p.ip.to_string())
                .collect();
            let ipv6 = if self.ipv6 {
                let ips6: Vec<String> = self
                    .pods
                    .iter()
                    .filter(|p| p.eni == i)
                    .filter_map(|p| p.ip6.map(|ip| format!("\"{ip}\"")))
                    .collect();
                format!(
                    ", subnet6: \"{}\", gateway6: \"{}\", ips6: [{}]",
                    e.subnet6(),
                    e.gateway6(),
                    ips6.join(", ")
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "- {{name: {}, mac: \"{}\", table: {}, subnet: {}, gateway: {}, ips: [{}]{ipv6}}}",
                e.name,
                e.mac,
                e.table,
                e.subnet(),
                e.gateway(),
                ips.join(", ")
            );
        }
        out
    }

    /// One endpoint per pod, with its host interface.
    pub fn endpoints(&self) -> Vec<EndpointSpec> {
        self.pods
            .iter()
            .enumerate()
            .map(|(i, p)| {
                EndpointSpec::new("vpc", &format!("pod{i}"), &p.ips()).interface(&p.host_if)
            })
            .collect()
    }
}
