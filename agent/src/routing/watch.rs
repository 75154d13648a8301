//! Kernel notifications that may mean podnet's routing state drifted: a
//! netlink socket subscribed to link, route and rule (IPv4 and IPv6) and
//! neighbour groups (what `ip monitor` listens to).
//!
//! Links appearing, changing or going keep the reconciler's link cache
//! current. Drift: any rule change, a route change whose protocol is
//! podnet's, a host route going whoever installed it, a proxy-neighbour
//! change, unless it is the echo of a change podnet itself just applied
//! ([`Echoes`]). Ordinary neighbour churn (ARP state changes) is ignored, so
//! it cannot cause reconcile storms.

use std::{
    collections::HashMap,
    io,
    os::fd::{AsRawFd as _, RawFd},
    time::Duration,
};

use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    neighbour::NeighbourFlags, route::RouteMessage, AddressFamily, RouteNetlinkMessage,
};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use super::{
    desired::RTPROT_PODNET,
    diff::{Change, Object},
    netlink::{parse_link, parse_proxy, parse_route, parse_rule},
    reconcile::LinkChange,
};

/// `RTNLGRP_LINK`.
const RTNLGRP_LINK: u32 = 1;
/// `RTNLGRP_NEIGH`.
const RTNLGRP_NEIGH: u32 = 3;
/// `RTNLGRP_IPV4_ROUTE`.
const RTNLGRP_IPV4_ROUTE: u32 = 7;
/// `RTNLGRP_IPV4_RULE`.
const RTNLGRP_IPV4_RULE: u32 = 8;
/// `RTNLGRP_IPV6_ROUTE`.
const RTNLGRP_IPV6_ROUTE: u32 = 11;
/// `RTNLGRP_IPV6_RULE`.
const RTNLGRP_IPV6_RULE: u32 = 19;
/// Receive buffer for notification bursts (pod churn on a busy node).
const RECV_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// A subscription to routing notifications in the calling thread's network
/// namespace.
pub struct Watcher {
    socket: Socket,
}

impl Watcher {
    /// Opens the socket and joins the groups.
    pub fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        let groups = [
            RTNLGRP_LINK,
            RTNLGRP_NEIGH,
            RTNLGRP_IPV4_ROUTE,
            RTNLGRP_IPV4_RULE,
            RTNLGRP_IPV6_ROUTE,
            RTNLGRP_IPV6_RULE,
        ]
        .iter()
        .fold(0u32, |mask, g| mask | (1 << (g - 1)));
        socket.bind(&SocketAddr::new(0, groups))?;
        socket.set_non_blocking(true)?;
        // A bigger buffer only lowers the chance of ENOBUFS; an overrun is
        // handled (treated as "something changed").
        if let Err(e) = socket.set_rx_buf_sz(RECV_BUFFER_BYTES) {
            tracing::debug!(error = %e, "netlink receive buffer not enlarged");
        }
        Ok(Self { socket })
    }

    /// Waits up to `timeout` for notifications, or for `also` (another
    /// descriptor the caller listens to) to become readable, and drains the
    /// notifications; the ones that come back from podnet's own changes
    /// (`echoes`) are no drift.
    pub fn wait(&self, timeout: Duration, also: RawFd, echoes: &mut Echoes) -> Notices {
        let mut notices = Notices::default();
        if !crate::sys::wait_readable_any(&[self.socket.as_raw_fd(), also], timeout) {
            return notices;
        }
        loop {
            match self.socket.recv_from_full() {
                Ok((buf, _)) if buf.is_empty() => break,
                Ok((buf, _)) => notices.read(&buf, echoes),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    // ENOBUFS: the kernel dropped notifications, echoes
                    // among them; resync.
                    tracing::debug!(error = %e, "netlink notifications lost; reconciling");
                    notices.drift = true;
                    echoes.clear();
                    break;
                }
            }
        }
        notices
    }
}

/// What the notifications of one wait said.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Notices {
    /// A route, rule or proxy entry changed and podnet did not change it
    /// (or a notification could not be read or was lost): only a full pass
    /// knows what the kernel has now.
    pub drift: bool,
    /// Links that appeared, changed or went, in order.
    pub links: Vec<LinkChange>,
}

impl Notices {
    /// Reads one datagram of notifications.
    pub fn read(&mut self, mut buf: &[u8], echoes: &mut Echoes) {
        while buf.len() >= 16 {
            let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
            if len < 16 || len > buf.len() {
                self.drift = true;
                return;
            }
            match NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[..len]) {
                Ok(msg) => {
                    if let NetlinkPayload::InnerMessage(inner) = msg.payload {
                        match classify(&inner, echoes) {
                            Notice::Ignore => {}
                            Notice::Link(change) => self.links.push(change),
                            Notice::Drift => self.drift = true,
                        }
                    }
                }
                // Unknown attributes of newer kernels: err on the side of reconciling.
                Err(_) => self.drift = true,
            }
            buf = &buf[len.next_multiple_of(4).min(buf.len())..];
        }
    }

    /// Whether anything worth a pass came.
    pub fn any(&self) -> bool {
        self.drift || !self.links.is_empty()
    }
}

/// Changes podnet applied whose notifications have not come back yet.
#[derive(Debug, Default)]
pub struct Echoes(HashMap<(bool, Object), u32>);

impl Echoes {
    /// Expects a notification for each change the kernel accepted.
    pub fn expect(&mut self, changes: &[Change]) {
        for change in changes {
            let added = !matches!(change, Change::Delete(_));
            *self.0.entry((added, *change.object())).or_default() += 1;
        }
    }

    /// Takes the echo of a notification that `object` was added (or
    /// deleted), if one was expected.
    fn take(&mut self, added: bool, object: Object) -> bool {
        let key = (added, object);
        match self.0.get_mut(&key) {
            Some(n) if *n > 1 => {
                *n -= 1;
                true
            }
            Some(_) => {
                self.0.remove(&key);
                true
            }
            None => false,
        }
    }

    /// Forgets every expected echo (notifications were lost, or a periodic
    /// full pass starts over).
    pub fn clear(&mut self) {
        self.0.clear();
    }

    /// How many notifications are still expected.
    #[cfg(test)]
    pub fn pending(&self) -> u32 {
        self.0.values().sum()
    }
}

/// What one notification means for routing.
#[derive(Debug, PartialEq, Eq)]
enum Notice {
    Ignore,
    Link(LinkChange),
    Drift,
}

/// Reads one notification: links are news for the link cache; a change to
/// a rule, to a route of podnet's or to a proxy entry is drift unless it is
/// the echo of podnet's own change; a host route going, whoever installed it,
/// is drift too: it may be one that stood in for podnet's (`provided`, e.g.
/// the route ptp installs for its pod), which podnet must now install
/// itself. Ordinary neighbour churn and foreign routes coming are ignored.
fn classify(msg: &RouteNetlinkMessage, echoes: &mut Echoes) -> Notice {
    let echo_or_drift = |echoes: &mut Echoes, added: bool, object: Option<Object>| match object {
        Some(o) if echoes.take(added, o) => Notice::Ignore,
        _ => Notice::Drift,
    };
    match msg {
        RouteNetlinkMessage::NewLink(l) => Notice::Link(LinkChange::Up(parse_link(l))),
        RouteNetlinkMessage::DelLink(l) => Notice::Link(LinkChange::Gone(l.header.index)),
        RouteNetlinkMessage::NewRule(r) | RouteNetlinkMessage::DelRule(r) => {
            let ours = parse_rule(r).filter(|o| o.protocol == RTPROT_PODNET);
            let added = matches!(msg, RouteNetlinkMessage::NewRule(_));
            echo_or_drift(echoes, added, ours.map(|o| Object::Rule(o.rule)))
        }
        RouteNetlinkMessage::NewRoute(r) | RouteNetlinkMessage::DelRoute(r)
            if u8::from(r.header.protocol) == RTPROT_PODNET =>
        {
            let added = matches!(msg, RouteNetlinkMessage::NewRoute(_));
            echo_or_drift(
                echoes,
                added,
                parse_route(r).map(|o| Object::Route(o.route)),
            )
        }
        RouteNetlinkMessage::DelRoute(r) if is_host_route(r) => Notice::Drift,
        RouteNetlinkMessage::NewNeighbour(n) | RouteNetlinkMessage::DelNeighbour(n)
            if n.header.flags.contains(NeighbourFlags::Proxy) =>
        {
            let ours = parse_proxy(n).filter(|o| o.protocol == RTPROT_PODNET);
            let added = matches!(msg, RouteNetlinkMessage::NewNeighbour(_));
            echo_or_drift(echoes, added, ours.map(|o| Object::Neigh(o.proxy)))
        }
        _ => Notice::Ignore,
    }
}

/// Whether `r` is a route to one address (`/32`, `/128`).
fn is_host_route(r: &RouteMessage) -> bool {
    let len = r.header.destination_prefix_length;
    match r.header.address_family {
        AddressFamily::Inet => len == 32,
        AddressFamily::Inet6 => len == 128,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::NetlinkHeader;
    use netlink_packet_route::neighbour::NeighbourMessage;

    fn bytes(inner: RouteNetlinkMessage) -> Vec<u8> {
        let mut msg = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(inner));
        msg.finalize();
        let mut buf = vec![0; msg.buffer_len()];
        msg.serialize(&mut buf);
        buf
    }

    fn drifts(buf: &[u8]) -> bool {
        let mut notices = Notices::default();
        notices.read(buf, &mut Echoes::default());
        notices.drift
    }

    #[test]
    fn only_podnet_routes_and_proxy_neighbours_matter() {
        let mut ours = RouteMessage::default();
        ours.header.protocol = RTPROT_PODNET.into();
        let foreign = RouteMessage::default();
        let mut proxy = NeighbourMessage::default();
        proxy.header.flags = NeighbourFlags::Proxy;
        let arp = NeighbourMessage::default();
        assert!(drifts(&bytes(RouteNetlinkMessage::DelRoute(ours))));
        assert!(!drifts(&bytes(RouteNetlinkMessage::NewRoute(
            foreign.clone()
        ))));
        assert!(!drifts(&bytes(RouteNetlinkMessage::DelRoute(
            foreign.clone()
        ))));
        // A foreign host route going may have stood in for podnet's.
        for (family, len) in [(AddressFamily::Inet, 32), (AddressFamily::Inet6, 128)] {
            let mut host = foreign.clone();
            host.header.address_family = family;
            host.header.destination_prefix_length = len;
            assert!(drifts(&bytes(RouteNetlinkMessage::DelRoute(host.clone()))));
            assert!(!drifts(&bytes(RouteNetlinkMessage::NewRoute(host))));
        }
        assert!(drifts(&bytes(RouteNetlinkMessage::DelNeighbour(proxy))));
        assert!(!drifts(&bytes(RouteNetlinkMessage::NewNeighbour(
            arp.clone()
        ))));
        // Several messages in one datagram: one relevant is enough.
        let mut both = bytes(RouteNetlinkMessage::NewNeighbour(arp));
        both.extend(bytes(RouteNetlinkMessage::DelRule(
            netlink_packet_route::rule::RuleMessage::default(),
        )));
        assert!(drifts(&both));
        assert!(!drifts(&[]));
    }

    #[test]
    fn podnets_own_changes_come_back_as_echoes_once() {
        let route = crate::routing::desired::Route {
            table: 254,
            dst: "10.0.1.10/32".parse().unwrap(),
            oif: 7,
            gateway: None,
            scope_link: true,
        };
        let mut message = crate::routing::netlink::tests::route_message_of(&route);
        message.header.protocol = RTPROT_PODNET.into();
        let added = bytes(RouteNetlinkMessage::NewRoute(message.clone()));
        let deleted = bytes(RouteNetlinkMessage::DelRoute(message));
        let mut echoes = Echoes::default();
        echoes.expect(&[Change::Add(Object::Route(route))]);
        assert_eq!(echoes.pending(), 1);
        let mut notices = Notices::default();
        notices.read(&added, &mut echoes);
        assert!(!notices.drift);
        assert_eq!(echoes.pending(), 0);
        // The same notification again is not an echo: someone else did it.
        notices.read(&added, &mut echoes);
        assert!(notices.drift);
        // A delete is only the echo of a delete.
        echoes.expect(&[Change::Add(Object::Route(route))]);
        let mut notices = Notices::default();
        notices.read(&deleted, &mut echoes);
        assert!(notices.drift);
        assert_eq!(echoes.pending(), 1);
        echoes.clear();
        assert_eq!(echoes.pending(), 0);
    }

    #[test]
    fn links_are_news_for_the_cache_not_drift() {
        let mut link = netlink_packet_route::link::LinkMessage::default();
        link.header.index = 42;
        link.attributes
            .push(netlink_packet_route::link::LinkAttribute::IfName(
                "vpod9".into(),
            ));
        let mut notices = Notices::default();
        let mut echoes = Echoes::default();
        notices.read(
            &bytes(RouteNetlinkMessage::NewLink(link.clone())),
            &mut echoes,
        );
        notices.read(&bytes(RouteNetlinkMessage::DelLink(link)), &mut echoes);
        assert!(!notices.drift);
        assert!(notices.any());
        assert_eq!(
            notices.links,
            vec![
                LinkChange::Up(crate::routing::desired::Link {
                    index: 42,
                    name: "vpod9".into(),
                    mac: None,
                    master: None,
                }),
                LinkChange::Gone(42)
            ]
        );
    }
}
