//! The kernel side of the reconciler: dump links, routes, rules and proxy
//! entries of both families (IPv4 and IPv6), and apply changes, over
//! rtnetlink.
//!
//! The reconciler sees only the [`Netlink`] trait, so its logic is tested with
//! a fake; [`RtNetlink`] is the real implementation, tested as root in
//! `tests/`. Its requests block (no async runtime); it is meant to be owned by
//! one OS thread, which stays in the agent's network namespace.

use std::net::IpAddr;

use netlink_packet_core::{
    NetlinkMessage, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::{
    link::{LinkAttribute, LinkFlags, LinkMessage},
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage},
    route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteScope, RouteType},
    rule::{RuleAction, RuleAttribute, RuleMessage},
    AddressFamily, RouteNetlinkMessage,
};
use netlink_sys::protocols::NETLINK_ROUTE;

use super::{
    desired::{Link, ProxyNeigh, Route, Rule, RTPROT_PODNET},
    diff::{Change, Object, ObservedProxy, ObservedRoute, ObservedRule},
};
use crate::{
    net::{Cidr, MacAddr},
    sys::netlink::{NetlinkSocket, RequestError, DEFAULT_RECV_TIMEOUT},
};

/// A failed netlink request.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The socket could not be set up.
    #[error("rtnetlink setup: {0}")]
    Setup(std::io::Error),
    /// The kernel refused a request.
    #[error("{what}: {source}")]
    Kernel {
        /// What was asked.
        what: String,
        /// The kernel's answer.
        source: std::io::Error,
    },
    /// The request could not be sent or its answer not read.
    #[error("{what}: {message}")]
    Transport {
        /// What was asked.
        what: String,
        /// What went wrong.
        message: String,
    },
}

/// What the reconciler needs from the kernel.
pub trait Netlink {
    /// Every link.
    fn links(&mut self) -> Result<Vec<Link>, NetlinkError>;
    /// IPv4 and IPv6 unicast routes of every table.
    fn routes(&mut self) -> Result<Vec<ObservedRoute>, NetlinkError>;
    /// IPv4 and IPv6 `lookup` rules.
    fn rules(&mut self) -> Result<Vec<ObservedRule>, NetlinkError>;
    /// Proxy-ARP and proxy-NDP entries.
    fn proxies(&mut self) -> Result<Vec<ObservedProxy>, NetlinkError>;
    /// IPv4 and IPv6 unicast routes of `table` that leave through link
    /// `oif`: what a change for one pod's interface needs to see.
    fn routes_via(&mut self, table: u32, oif: u32) -> Result<Vec<ObservedRoute>, NetlinkError>;
    /// Applies one change.
    fn apply(&mut self, change: &Change) -> Result<(), NetlinkError>;
}

/// [`Netlink`] over blocking `NETLINK_ROUTE` sockets.
pub struct RtNetlink {
    socket: NetlinkSocket,
    /// A second socket with strict checking (`NETLINK_GET_STRICT_CHK`), on
    /// which the kernel filters route dumps by table and output interface
    /// (`ip_valid_fib_dump_req`, 6.x); the main socket keeps the lenient
    /// checking every other request was written for.
    filtered: NetlinkSocket,
}

impl RtNetlink {
    /// Opens the sockets in the calling thread's network namespace.
    pub fn open() -> Result<Self, NetlinkError> {
        let open = || {
            NetlinkSocket::open(NETLINK_ROUTE, DEFAULT_RECV_TIMEOUT).map_err(NetlinkError::Setup)
        };
        let (socket, filtered) = (open()?, open()?);
        filtered
            .set_strict_checking()
            .map_err(NetlinkError::Setup)?;
        Ok(Self { socket, filtered })
    }

    /// Sends one request and hands each answer to `on_answer`; an error
    /// answer fails.
    fn request(
        &mut self,
        what: impl Fn() -> String,
        message: RouteNetlinkMessage,
        flags: u16,
        on_answer: impl FnMut(RouteNetlinkMessage),
    ) -> Result<(), NetlinkError> {
        request_on(&mut self.socket, what, message, flags, on_answer)
    }

    /// Dumps `message`'s objects into `out`, keeping what `parse` makes of
    /// each answer. Answers are parsed as they arrive rather than collected
    /// first: a namespace with a thousand pod interfaces answers a link or
    /// route dump with megabytes of attributes podnet never reads. A
    /// `filtered` dump goes to the strict-checking socket.
    fn dump<T>(
        &mut self,
        what: &'static str,
        message: RouteNetlinkMessage,
        filtered: bool,
        out: &mut Vec<T>,
        parse: impl Fn(&RouteNetlinkMessage) -> Option<T>,
    ) -> Result<(), NetlinkError> {
        let socket = if filtered {
            &mut self.filtered
        } else {
            &mut self.socket
        };
        request_on(
            socket,
            || what.to_owned(),
            message,
            NLM_F_REQUEST | NLM_F_DUMP,
            |answer| out.extend(parse(&answer)),
        )
    }
}

/// One request on `socket`; an error answer fails, named by `what`.
fn request_on(
    socket: &mut NetlinkSocket,
    what: impl Fn() -> String,
    message: RouteNetlinkMessage,
    flags: u16,
    on_answer: impl FnMut(RouteNetlinkMessage),
) -> Result<(), NetlinkError> {
    let mut req = NetlinkMessage::from(message);
    req.header.flags = flags;
    socket
        .request(req, on_answer, |_| false)
        .map_err(|e| match e {
            RequestError::Kernel(source) => NetlinkError::Kernel {
                what: what(),
                source,
            },
            RequestError::Transport(message) => NetlinkError::Transport {
                what: what(),
                message,
            },
        })
}

impl RtNetlink {
    /// The routes of a dump of each family, `request` giving the family's
    /// request (a `filtered` one goes to the strict-checking socket).
    fn route_dumps(
        &mut self,
        what: &'static str,
        filtered: bool,
        request: impl Fn(AddressFamily) -> RouteMessage,
    ) -> Result<Vec<ObservedRoute>, NetlinkError> {
        let mut out = Vec::new();
        for family in FAMILIES {
            self.dump(
                what,
                RouteNetlinkMessage::GetRoute(request(family)),
                filtered,
                &mut out,
                |m| match m {
                    RouteNetlinkMessage::NewRoute(r) => parse_route(r),
                    _ => None,
                },
            )?;
        }
        Ok(out)
    }
}

/// A link with its MTU and administrative state (what ENI mode needs beside [`Link`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkState {
    /// Index, name, MAC.
    pub link: Link,
    /// Its MTU.
    pub mtu: u32,
    /// Whether it is administratively up (`IFF_UP`).
    pub up: bool,
}

impl RtNetlink {
    /// Every link with its MTU and state.
    pub fn link_states(&mut self) -> Result<Vec<LinkState>, NetlinkError> {
        let mut out = Vec::new();
        self.dump(
            "dump links",
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            false,
            &mut out,
            |m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(parse_link_state(l)),
                _ => None,
            },
        )?;
        Ok(out)
    }

    /// Sets link `index`'s MTU and brings it up, in one request (`ip link set mtu M up`).
    pub fn set_up_with_mtu(&mut self, index: u32, mtu: u32) -> Result<(), NetlinkError> {
        self.request(
            || format!("set link {index} mtu {mtu} up"),
            RouteNetlinkMessage::SetLink(up_with_mtu_message(index, mtu)),
            NLM_F_REQUEST | NLM_F_ACK,
            drop,
        )
    }
}

fn parse_link_state(l: &LinkMessage) -> LinkState {
    let mtu = l
        .attributes
        .iter()
        .find_map(|attr| match attr {
            LinkAttribute::Mtu(mtu) => Some(*mtu),
            _ => None,
        })
        .unwrap_or(0);
    LinkState {
        link: parse_link(l),
        mtu,
        up: l.header.flags.contains(LinkFlags::Up),
    }
}

fn up_with_mtu_message(index: u32, mtu: u32) -> LinkMessage {
    let mut message = LinkMessage::default();
    message.header.index = index;
    message.header.flags = LinkFlags::Up;
    message.header.change_mask = LinkFlags::Up;
    message.attributes.push(LinkAttribute::Mtu(mtu));
    message
}

impl Netlink for RtNetlink {
    fn links(&mut self) -> Result<Vec<Link>, NetlinkError> {
        Ok(self.link_states()?.into_iter().map(|s| s.link).collect())
    }

    fn routes(&mut self) -> Result<Vec<ObservedRoute>, NetlinkError> {
        self.route_dumps("dump routes", false, |family| {
            let mut msg = RouteMessage::default();
            msg.header.address_family = family;
            msg
        })
    }

    fn rules(&mut self) -> Result<Vec<ObservedRule>, NetlinkError> {
        let mut out = Vec::new();
        for family in FAMILIES {
            let mut msg = RuleMessage::default();
            msg.header.family = family;
            self.dump(
                "dump rules",
                RouteNetlinkMessage::GetRule(msg),
                false,
                &mut out,
                |m| match m {
                    RouteNetlinkMessage::NewRule(r) => parse_rule(r),
                    _ => None,
                },
            )?;
        }
        Ok(out)
    }

    fn routes_via(&mut self, table: u32, oif: u32) -> Result<Vec<ObservedRoute>, NetlinkError> {
        self.route_dumps("dump routes of one interface", true, |family| {
            filtered_route_dump(family, table, oif)
        })
    }

    fn proxies(&mut self) -> Result<Vec<ObservedProxy>, NetlinkError> {
        let mut out = Vec::new();
        for family in FAMILIES {
            let mut msg = NeighbourMessage::default();
            msg.header.family = family;
            msg.header.flags = NeighbourFlags::Proxy;
            self.dump(
                "dump proxy neighbours",
                RouteNetlinkMessage::GetNeighbour(msg),
                false,
                &mut out,
                |m| match m {
                    RouteNetlinkMessage::NewNeighbour(n) => parse_proxy(n),
                    _ => None,
                },
            )?;
        }
        Ok(out)
    }

    fn apply(&mut self, change: &Change) -> Result<(), NetlinkError> {
        let create = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
        let delete = NLM_F_REQUEST | NLM_F_ACK;
        let (message, flags) = match *change {
            Change::Add(Object::Route(r)) => {
                (RouteNetlinkMessage::NewRoute(route_message(&r)), create)
            }
            Change::Replace(Object::Route(r)) => (
                RouteNetlinkMessage::NewRoute(route_message(&r)),
                NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
            ),
            Change::Delete(Object::Route(r)) => {
                (RouteNetlinkMessage::DelRoute(route_message(&r)), delete)
            }
            Change::Add(Object::Rule(r)) | Change::Replace(Object::Rule(r)) => {
                (RouteNetlinkMessage::NewRule(rule_message(&r)), create)
            }
            Change::Delete(Object::Rule(r)) => {
                (RouteNetlinkMessage::DelRule(rule_message(&r)), delete)
            }
            Change::Add(Object::Neigh(n)) | Change::Replace(Object::Neigh(n)) => {
                (RouteNetlinkMessage::NewNeighbour(proxy_message(n)), create)
            }
            Change::Delete(Object::Neigh(n)) => {
                (RouteNetlinkMessage::DelNeighbour(proxy_message(n)), delete)
            }
        };
        self.request(|| format!("{change:?}"), message, flags, drop)
    }
}

pub(crate) fn parse_link(l: &LinkMessage) -> Link {
    let mut link = Link {
        index: l.header.index,
        name: String::new(),
        mac: None,
        master: None,
    };
    for attr in &l.attributes {
        match attr {
            LinkAttribute::IfName(name) => link.name.clone_from(name),
            LinkAttribute::Address(bytes) => {
                link.mac = <[u8; 6]>::try_from(bytes.as_slice()).ok().map(MacAddr);
            }
            LinkAttribute::Controller(index) => link.master = Some(*index),
            _ => {}
        }
    }
    link
}

/// The families podnet manages, in the order they are dumped.
const FAMILIES: [AddressFamily; 2] = [AddressFamily::Inet, AddressFamily::Inet6];

/// The netlink family of an address.
fn family_of(ip: IpAddr) -> AddressFamily {
    if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

/// The address of a route attribute, when it is one of `family`.
fn route_ip(addr: &RouteAddress, family: AddressFamily) -> Option<IpAddr> {
    match (addr, family) {
        (RouteAddress::Inet(a), AddressFamily::Inet) => Some(IpAddr::V4(*a)),
        (RouteAddress::Inet6(a), AddressFamily::Inet6) => Some(IpAddr::V6(*a)),
        _ => None,
    }
}

/// A route dump request the kernel filters: `table`'s routes through `oif`
/// (a strict-checked dump accepts only `RTA_TABLE` and `RTA_OIF`, with a
/// zeroed header but for the family).
fn filtered_route_dump(family: AddressFamily, table: u32, oif: u32) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = family;
    m.attributes.push(RouteAttribute::Table(table));
    m.attributes.push(RouteAttribute::Oif(oif));
    m
}

/// A route the reconciler can compare, or `None` for what it never manages
/// (other families, non-unicast, multipath).
pub(crate) fn parse_route(r: &RouteMessage) -> Option<ObservedRoute> {
    let family = r.header.address_family;
    let unspecified = match family {
        AddressFamily::Inet => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        AddressFamily::Inet6 => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        _ => return None,
    };
    if r.header.kind != RouteType::Unicast {
        return None;
    }
    let mut table = u32::from(r.header.table);
    let mut dst = unspecified;
    let (mut oif, mut gateway) = (0, None);
    for attr in &r.attributes {
        match attr {
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Destination(a) => dst = route_ip(a, family)?,
            RouteAttribute::Oif(i) => oif = *i,
            RouteAttribute::Gateway(a) => gateway = Some(route_ip(a, family)?),
            RouteAttribute::MultiPath(_) => return None,
            _ => {}
        }
    }
    Some(ObservedRoute {
        route: Route {
            table,
            dst: Cidr::containing(dst, r.header.destination_prefix_length).ok()?,
            oif,
            gateway,
            scope_link: r.header.scope == RouteScope::Link,
        },
        protocol: r.header.protocol.into(),
    })
}

fn route_message(r: &Route) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = family_of(r.dst.network());
    m.header.destination_prefix_length = r.dst.prefix_len();
    m.header.table = u8::try_from(r.table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC);
    m.header.protocol = RTPROT_PODNET.into();
    m.header.scope = if r.scope_link {
        RouteScope::Link
    } else {
        RouteScope::Universe
    };
    m.header.kind = RouteType::Unicast;
    if r.dst.prefix_len() > 0 {
        m.attributes
            .push(RouteAttribute::Destination(r.dst.network().into()));
    }
    m.attributes.push(RouteAttribute::Table(r.table));
    m.attributes.push(RouteAttribute::Oif(r.oif));
    if let Some(gw) = r.gateway {
        m.attributes.push(RouteAttribute::Gateway(gw.into()));
    }
    m
}

/// A `lookup` rule with only the selectors podnet uses, or `None` for any
/// other rule (those never equal a desired rule, so never count as ours).
pub(crate) fn parse_rule(r: &RuleMessage) -> Option<ObservedRule> {
    let family = r.header.family;
    if !FAMILIES.contains(&family) || r.header.action != RuleAction::ToTable {
        return None;
    }
    let mut rule = Rule {
        priority: 0,
        src: None,
        dst: None,
        table: u32::from(r.header.table),
    };
    let mut protocol = 0;
    for attr in &r.attributes {
        match attr {
            RuleAttribute::Priority(p) => rule.priority = *p,
            RuleAttribute::Table(t) => rule.table = *t,
            RuleAttribute::Source(a) if family_of(*a) == family => {
                rule.src = Some(Cidr::containing(*a, r.header.src_len).ok()?);
            }
            RuleAttribute::Destination(a) if family_of(*a) == family => {
                rule.dst = Some(Cidr::containing(*a, r.header.dst_len).ok()?);
            }
            RuleAttribute::Protocol(p) => protocol = (*p).into(),
            RuleAttribute::SuppressPrefixLen(_)
            | RuleAttribute::SuppressIfGroup(_)
            | RuleAttribute::Other(_) => {}
            RuleAttribute::L3MDev(on) if !on => {}
            _ => return None,
        }
    }
    if r.header.tos != 0 {
        return None;
    }
    Some(ObservedRule { rule, protocol })
}

fn rule_message(r: &Rule) -> RuleMessage {
    let mut m = RuleMessage::default();
    // podnet's rules always have a selector; it gives the family.
    m.header.family = r
        .src
        .or(r.dst)
        .map_or(AddressFamily::Inet, |c| family_of(c.network()));
    m.header.action = RuleAction::ToTable;
    m.header.table = u8::try_from(r.table).unwrap_or(0);
    m.attributes.push(RuleAttribute::Priority(r.priority));
    m.attributes.push(RuleAttribute::Table(r.table));
    m.attributes
        .push(RuleAttribute::Protocol(RTPROT_PODNET.into()));
    if let Some(src) = r.src {
        m.header.src_len = src.prefix_len();
        m.attributes.push(RuleAttribute::Source(src.network()));
    }
    if let Some(dst) = r.dst {
        m.header.dst_len = dst.prefix_len();
        m.attributes.push(RuleAttribute::Destination(dst.network()));
    }
    m
}

pub(crate) fn parse_proxy(n: &NeighbourMessage) -> Option<ObservedProxy> {
    if !FAMILIES.contains(&n.header.family) || !n.header.flags.contains(NeighbourFlags::Proxy) {
        return None;
    }
    let mut addr = None;
    let mut protocol = 0;
    for attr in &n.attributes {
        match attr {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => {
                addr = Some(IpAddr::V4(*a));
            }
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                addr = Some(IpAddr::V6(*a));
            }
            NeighbourAttribute::Protocol(p) => protocol = (*p).into(),
            _ => {}
        }
    }
    Some(ObservedProxy {
        proxy: ProxyNeigh {
            ifindex: n.header.ifindex,
            addr: addr?,
        },
        protocol,
    })
}

fn proxy_message(n: ProxyNeigh) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = family_of(n.addr);
    m.header.ifindex = n.ifindex;
    m.header.flags = NeighbourFlags::Proxy;
    let addr = match n.addr {
        IpAddr::V4(a) => NeighbourAddress::Inet(a),
        IpAddr::V6(a) => NeighbourAddress::Inet6(a),
    };
    m.attributes.push(NeighbourAttribute::Destination(addr));
    m.attributes
        .push(NeighbourAttribute::Protocol(RTPROT_PODNET.into()));
    m
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::desired::MAIN_TABLE;
    use super::*;

    /// The request podnet sends to add `route`.
    pub(crate) fn route_message_of(route: &Route) -> RouteMessage {
        route_message(route)
    }

    #[test]
    fn link_state_and_the_up_request() {
        let message = up_with_mtu_message(7, 9001);
        let state = parse_link_state(&message);
        assert_eq!((state.link.index, state.mtu, state.up), (7, 9001, true));
        assert_eq!(message.header.change_mask, LinkFlags::Up);
        let down = parse_link_state(&LinkMessage::default());
        assert_eq!((down.mtu, down.up), (0, false));
    }

    #[test]
    fn route_messages_round_trip() {
        let r = Route {
            table: 101,
            dst: Cidr::ANY_V4,
            oif: 7,
            gateway: Some("10.0.1.1".parse().unwrap()),
            scope_link: false,
        };
        let observed = parse_route(&route_message(&r)).unwrap();
        assert_eq!(observed.route, r);
        assert_eq!(observed.protocol, RTPROT_PODNET);
        let big = Route {
            table: 1000,
            dst: "10.0.1.10/32".parse().unwrap(),
            gateway: None,
            scope_link: true,
            ..r
        };
        let m = route_message(&big);
        assert_eq!(m.header.table, RouteHeader::RT_TABLE_UNSPEC);
        assert_eq!(parse_route(&m).unwrap().route, big);
    }

    #[test]
    fn rule_and_proxy_messages_round_trip() {
        let r = Rule {
            priority: 1536,
            src: Some("10.0.1.10/32".parse().unwrap()),
            dst: None,
            table: 101,
        };
        let o = parse_rule(&rule_message(&r)).unwrap();
        assert_eq!((o.rule, o.protocol), (r, RTPROT_PODNET));
        let mut with_iif = rule_message(&r);
        with_iif
            .attributes
            .push(RuleAttribute::Iifname("eth0".into()));
        assert_eq!(parse_rule(&with_iif), None);
        let n = ProxyNeigh {
            ifindex: 4,
            addr: "10.0.1.10".parse().unwrap(),
        };
        let o = parse_proxy(&proxy_message(n)).unwrap();
        assert_eq!((o.proxy, o.protocol), (n, RTPROT_PODNET));
    }

    #[test]
    fn ipv6_messages_round_trip_in_their_family() {
        let default = Route {
            table: 101,
            dst: Cidr::ANY_V6,
            oif: 7,
            gateway: Some("fe80::1".parse().unwrap()),
            scope_link: false,
        };
        let host = Route {
            table: MAIN_TABLE,
            dst: "fd00:10::10/128".parse().unwrap(),
            gateway: None,
            ..default
        };
        for r in [default, host] {
            let m = route_message(&r);
            assert_eq!(m.header.address_family, AddressFamily::Inet6);
            assert_eq!(parse_route(&m).unwrap().route, r);
        }
        let rule = Rule {
            priority: 512,
            src: None,
            dst: Some("fd00:10::10/128".parse().unwrap()),
            table: MAIN_TABLE,
        };
        let m = rule_message(&rule);
        assert_eq!(m.header.family, AddressFamily::Inet6);
        assert_eq!(parse_rule(&m).unwrap().rule, rule);
        let n = ProxyNeigh {
            ifindex: 4,
            addr: "fd00:10::10".parse().unwrap(),
        };
        let m = proxy_message(n);
        assert_eq!(m.header.family, AddressFamily::Inet6);
        assert_eq!(parse_proxy(&m).unwrap().proxy, n);
    }
}
