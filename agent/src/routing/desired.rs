//! The routing state podnet wants, built from the endpoint registry, the
//! node's ENIs and the links the kernel has.
//!
//! For every pod address on a host interface, IPv4 and IPv6 alike:
//! - `<pod>/32 dev <host if> scope link proto podnet` (IPv6: `<pod>/128 dev
//!   <host if> proto podnet`; the kernel keeps no scope for IPv6 routes) in
//!   the main table;
//! - when an ENI owns the address: `to <pod> lookup main` at
//!   [`PRIORITY_TO_POD`], `from <pod> lookup <ENI table>` at
//!   [`PRIORITY_FROM_POD`] (rules of the address's family), and a proxy
//!   entry for the pod on the ENI (proxy ARP, or proxy NDP for IPv6), so the
//!   subnet's hosts and gateway resolve the pod to the ENI's MAC.
//!
//! For every ENI whose link exists: its table holds the subnet route and a
//! default route via the subnet's gateway, both on the ENI; and, when the
//! ENI has an IPv6 subnet, the same two routes in IPv6.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    ops::RangeInclusive,
};

use serde::Serialize;

use super::eni::{eni_for, Eni};
use crate::{
    endpoint::Endpoint,
    net::{Cidr, MacAddr},
};

/// Route and rule protocol id that marks what podnet installed
/// (`RTPROT_*` ids above 0x80 are free for routing daemons; 0xb0 is podnet's).
pub const RTPROT_PODNET: u8 = 0xb0;
/// Priority of the `to <pod> lookup main` rules.
pub const PRIORITY_TO_POD: u32 = 512;
/// Priority of the `from <pod> lookup <ENI table>` rules.
pub const PRIORITY_FROM_POD: u32 = 1536;
/// Rule priorities podnet owns; together with [`RTPROT_PODNET`] they mark its
/// rules. Rules outside are never touched.
pub const OWNED_PRIORITIES: RangeInclusive<u32> = PRIORITY_TO_POD..=PRIORITY_FROM_POD;
/// The kernel's main table.
pub const MAIN_TABLE: u32 = 254;

/// A kernel link as the reconciler needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    /// Interface index.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// Hardware address, when the link has an Ethernet one.
    pub mac: Option<MacAddr>,
    /// Index of the link's master (`IFLA_MASTER`), e.g. the bridge a pod's
    /// veth is a port of.
    pub master: Option<u32>,
}

/// A unicast route of either family (identity: table and destination, whose
/// family is the route's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Route {
    /// Routing table.
    pub table: u32,
    /// Destination prefix.
    pub dst: Cidr,
    /// Output interface index.
    pub oif: u32,
    /// Gateway, for routes via a next hop (of the destination's family).
    pub gateway: Option<IpAddr>,
    /// `scope link` (directly reachable) rather than `scope global`; always
    /// false for IPv6, whose routes the kernel reports without a scope.
    pub scope_link: bool,
}

impl Route {
    /// What identifies the route in the kernel (with tos and metric 0).
    pub fn key(&self) -> (u32, Cidr) {
        (self.table, self.dst)
    }
}

/// A policy rule `[from SRC] [to DST] lookup TABLE` at a priority; its
/// family is its selectors'.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Rule {
    /// Priority (`pref`).
    pub priority: u32,
    /// Source selector.
    pub src: Option<Cidr>,
    /// Destination selector.
    pub dst: Option<Cidr>,
    /// Table to look up.
    pub table: u32,
}

/// A proxy entry: the node answers ARP (IPv4) or neighbour solicitations
/// (IPv6, proxy NDP) for `addr` on `ifindex`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ProxyNeigh {
    /// Interface the entry answers on.
    pub ifindex: u32,
    /// Address answered for.
    pub addr: IpAddr,
}

/// One pod address the fast path may steer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct SteerEntry {
    /// The pod's address.
    pub pod: IpAddr,
    /// The ENI's ifindex.
    pub eni_ifindex: u32,
    /// The ENI's table.
    pub eni_table: u32,
    /// The pod's host interface ifindex.
    pub host_ifindex: u32,
}

/// Everything podnet wants in the kernel, at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// Routes (host routes and ENI tables).
    pub routes: BTreeSet<Route>,
    /// Policy rules.
    pub rules: BTreeSet<Rule>,
    /// Proxy-ARP and proxy-NDP entries.
    pub proxies: BTreeSet<ProxyNeigh>,
    /// Pod addresses for the fast path.
    pub steer: BTreeSet<SteerEntry>,
    /// Host interfaces of steerable pods: name → ifindex.
    pub pod_links: BTreeMap<String, u32>,
    /// ENI links: name → ifindex.
    pub eni_links: BTreeMap<String, u32>,
    /// What could not be turned into kernel state, for people.
    pub problems: Vec<String>,
}

/// The link of an ENI: by MAC when the description has one, else by name.
pub fn eni_link<'a>(eni: &Eni, links: &'a [Link]) -> Option<&'a Link> {
    eni.mac
        .and_then(|mac| links.iter().find(|l| l.mac == Some(mac)))
        .or_else(|| links.iter().find(|l| l.name == eni.name))
}

/// The routes of an ENI's table on link `oif`: per family it has a subnet
/// for, the subnet on-link and the default via the subnet's gateway.
fn eni_routes(eni: &Eni, oif: u32) -> impl Iterator<Item = Route> {
    let v4 = [
        Route {
            table: eni.table,
            dst: eni.subnet,
            oif,
            gateway: None,
            scope_link: true,
        },
        Route {
            table: eni.table,
            dst: Cidr::ANY_V4,
            oif,
            gateway: Some(IpAddr::V4(eni.gateway)),
            scope_link: false,
        },
    ];
    let subnet6 = eni.subnet6.map(|subnet| Route {
        table: eni.table,
        dst: subnet,
        oif,
        gateway: None,
        scope_link: false,
    });
    let default6 = eni.subnet6.and(eni.gateway6).map(|gw| Route {
        table: eni.table,
        dst: Cidr::ANY_V6,
        oif,
        gateway: Some(IpAddr::V6(gw)),
        scope_link: false,
    });
    v4.into_iter().chain(subnet6).chain(default6)
}

/// Builds the desired state. Endpoints without a host interface are not
/// routed by podnet. An address
/// two endpoints claim is routed to the first of them only (the other is a
/// problem): two routes with one destination would replace each other in the
/// kernel on every pass.
pub fn build(endpoints: &[Endpoint], enis: &[Eni], links: &[Link]) -> Desired {
    let mut d = Desired::default();
    let mut owners: BTreeMap<IpAddr, &Endpoint> = BTreeMap::new();
    let mut eni_index = BTreeMap::new();
    for eni in enis {
        let Some(link) = eni_link(eni, links) else {
            d.problems.push(format!(
                "ENI {} (table {}): no link named {} or with its MAC",
                eni.name, eni.table, eni.name
            ));
            continue;
        };
        eni_index.insert(eni.table, link.index);
        d.eni_links.insert(link.name.clone(), link.index);
        d.routes.extend(eni_routes(eni, link.index));
    }
    // A node's links are thousands: each endpoint's is looked up by name.
    let by_name: HashMap<&str, &Link> = links.iter().map(|l| (l.name.as_str(), l)).collect();
    for ep in endpoints {
        let Some(ifname) = &ep.interface else {
            continue;
        };
        let Some(&host) = by_name.get(ifname.as_str()) else {
            d.problems.push(format!(
                "pod {}/{}: host interface {ifname} not found",
                ep.namespace, ep.pod
            ));
            continue;
        };
        if host.master.is_some() {
            // A bridge port: the bridge's own subnet route reaches the pod; a
            // host route via the port would send replies past the bridge.
            continue;
        }
        for &ip in &ep.ips {
            if let Some(owner) = owners.get(&ip) {
                d.problems.push(format!(
                    "pod {}/{}: {ip} is already routed to {}/{}",
                    ep.namespace, ep.pod, owner.namespace, owner.pod
                ));
                continue;
            }
            owners.insert(ip, ep);
            let pod = Cidr::host(ip);
            d.routes.insert(Route {
                table: MAIN_TABLE,
                dst: pod,
                oif: host.index,
                gateway: None,
                scope_link: ip.is_ipv4(),
            });
            let Some(eni) = eni_for(enis, ip) else {
                continue;
            };
            let Some(&eni_ifindex) = eni_index.get(&eni.table) else {
                continue;
            };
            d.rules.insert(Rule {
                priority: PRIORITY_TO_POD,
                src: None,
                dst: Some(pod),
                table: MAIN_TABLE,
            });
            d.rules.insert(Rule {
                priority: PRIORITY_FROM_POD,
                src: Some(pod),
                dst: None,
                table: eni.table,
            });
            d.proxies.insert(ProxyNeigh {
                ifindex: eni_ifindex,
                addr: ip,
            });
            d.steer.insert(SteerEntry {
                pod: ip,
                eni_ifindex,
                eni_table: eni.table,
                host_ifindex: host.index,
            });
            d.pod_links.insert(host.name.clone(), host.index);
        }
    }
    d
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::Path;

    pub(crate) fn links() -> Vec<Link> {
        vec![
            Link {
                index: 1,
                name: "lo".into(),
                mac: None,
                master: None,
            },
            Link {
                index: 5,
                name: "eni1".into(),
                mac: Some("02:00:00:00:01:01".parse().unwrap()),
                master: None,
            },
            Link {
                index: 6,
                name: "renamed".into(),
                mac: Some("02:00:00:00:02:02".parse().unwrap()),
                master: None,
            },
            Link {
                index: 10,
                name: "vpod0".into(),
                mac: None,
                master: None,
            },
            Link {
                index: 11,
                name: "vpod1".into(),
                mac: None,
                master: None,
            },
        ]
    }

    #[test]
    fn bridge_ports_get_no_host_route() {
        let mut links = links();
        links.push(Link {
            index: 20,
            name: "vbr0".into(),
            mac: None,
            master: Some(7),
        });
        let ep = endpoint("bridged", "10.244.7.9", Some("vbr0"));
        let d = build(&[ep], &[], &links);
        assert_eq!(d.routes.len(), 0, "{:?}", d.routes);
        assert_eq!(d.problems.len(), 0);
    }

    pub(crate) fn enis() -> Vec<Eni> {
        super::super::eni::parse(
            Path::new("e.yaml"),
            "- {name: eni1, mac: \"02:00:00:00:01:01\", table: 101, subnet: 10.0.1.0/24, gateway: 10.0.1.1, ips: [10.0.1.10],\n   \
                subnet6: \"fd00::10.0.1.0/120\", gateway6: \"fe80::1\", ips6: [\"fd00::10.0.1.10\"]}\n\
             - {name: eni2, mac: \"02:00:00:00:02:02\", table: 102, subnet: 10.0.2.0/24, gateway: 10.0.2.1, ips: [10.0.2.10]}\n\
             - {name: eni3, table: 103, subnet: 10.0.3.0/24, gateway: 10.0.3.1}\n",
        )
        .unwrap()
    }

    /// A dual-stack endpoint: `ip` and `fd00::<ip>`.
    pub(crate) fn endpoint(pod: &str, ip: &str, interface: Option<&str>) -> Endpoint {
        Endpoint {
            namespace: "ns".into(),
            pod: pod.into(),
            ips: vec![ip.parse().unwrap(), format!("fd00::{ip}").parse().unwrap()],
            interface: interface.map(Into::into),
            container_id: None,
            if_name: None,
        }
    }

    #[test]
    fn builds_pod_and_eni_state() {
        let eps = [
            endpoint("a", "10.0.1.10", Some("vpod0")),
            endpoint("b", "10.0.2.10", Some("vpod1")),
            endpoint("c", "10.9.0.1", Some("vpod1")),
            endpoint("d", "10.0.1.11", None),
            endpoint("e", "10.0.1.12", Some("gone0")),
        ];
        let d = build(&eps, &enis(), &links());
        // eni2 is found by MAC although its link has another name; eni3 has no link.
        assert_eq!(d.eni_links.get("renamed"), Some(&6));
        assert_eq!(d.problems.len(), 2, "{:?}", d.problems);
        assert!(d.problems[0].starts_with("ENI eni3 (table 103)"));
        assert_eq!(d.problems[1], "pod ns/e: host interface gone0 not found");
        // 2 routes per found ENI and family (eni1 has IPv6) + 3 host
        // routes per family.
        assert_eq!(d.routes.len(), 12);
        assert!(d.routes.contains(&Route {
            table: 101,
            dst: Cidr::ANY_V6,
            oif: 5,
            gateway: Some("fe80::1".parse().unwrap()),
            scope_link: false,
        }));
        assert!(d.routes.contains(&Route {
            table: 101,
            dst: "fd00::10.0.1.0/120".parse().unwrap(),
            oif: 5,
            gateway: None,
            scope_link: false,
        }));
        assert!(d.routes.contains(&Route {
            table: MAIN_TABLE,
            dst: "fd00::10.9.0.1/128".parse().unwrap(),
            oif: 11,
            gateway: None,
            scope_link: false,
        }));
        assert!(d.routes.contains(&Route {
            table: 102,
            dst: "0.0.0.0/0".parse().unwrap(),
            oif: 6,
            gateway: Some("10.0.2.1".parse().unwrap()),
            scope_link: false,
        }));
        assert!(d.routes.contains(&Route {
            table: MAIN_TABLE,
            dst: "10.9.0.1/32".parse().unwrap(),
            oif: 11,
            gateway: None,
            scope_link: true,
        }));
        // Rules and proxies only for the ENI-owned addresses: both of pod a
        // (eni1 has IPv6), pod b's IPv4 one (eni2 has no IPv6).
        assert_eq!(d.rules.len(), 6);
        assert!(d.rules.contains(&Rule {
            priority: PRIORITY_FROM_POD,
            src: Some("fd00::10.0.1.10/128".parse().unwrap()),
            dst: None,
            table: 101
        }));
        assert!(d.rules.contains(&Rule {
            priority: PRIORITY_TO_POD,
            src: None,
            dst: Some("fd00::10.0.1.10/128".parse().unwrap()),
            table: MAIN_TABLE
        }));
        assert!(d.proxies.contains(&ProxyNeigh {
            ifindex: 5,
            addr: "fd00::10.0.1.10".parse().unwrap(),
        }));
        assert!(d.rules.contains(&Rule {
            priority: PRIORITY_FROM_POD,
            src: Some("10.0.2.10/32".parse().unwrap()),
            dst: None,
            table: 102
        }));
        assert_eq!(d.proxies.len(), 3);
        assert_eq!(d.steer.len(), 3);
        assert_eq!(d.pod_links.len(), 2);
    }

    #[test]
    fn an_address_two_endpoints_claim_is_routed_to_the_first_only() {
        let eps = [
            endpoint("first", "10.0.1.10", Some("vpod0")),
            endpoint("second", "10.0.1.10", Some("vpod1")),
        ];
        let d = build(&eps, &enis(), &links());
        let host_routes: Vec<(Cidr, u32)> = d
            .routes
            .iter()
            .filter(|r| r.table == MAIN_TABLE)
            .map(|r| (r.dst, r.oif))
            .collect();
        assert_eq!(
            host_routes,
            [
                ("10.0.1.10/32".parse().unwrap(), 10),
                ("fd00::10.0.1.10/128".parse().unwrap(), 10)
            ]
        );
        assert_eq!(d.steer.len(), 2);
        assert!(d.steer.iter().all(|s| s.host_ifindex == 10));
        assert_eq!(
            d.problems[1..],
            [
                "pod ns/second: 10.0.1.10 is already routed to ns/first",
                "pod ns/second: fd00::a00:10a is already routed to ns/first"
            ]
        );
    }
}
