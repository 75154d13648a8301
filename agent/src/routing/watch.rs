//! Kernel notifications that may mean podnet's routing state drifted: a
//! netlink socket subscribed to link, route and rule (IPv4 and IPv6) and
//! neighbour groups (what `ip monitor` listens to).
//!
//! Relevant: any rule change, a route change whose protocol is podnet's, a
//! host route going whoever installed it, a proxy-neighbour change, any link
//! appearing or going. Ordinary neighbour
//! churn (ARP state changes) is ignored, so it cannot cause reconcile storms.

use std::{
    io,
    os::fd::{AsRawFd as _, RawFd},
    time::Duration,
};

use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    neighbour::NeighbourFlags, route::RouteMessage, AddressFamily, RouteNetlinkMessage,
};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use super::desired::RTPROT_PODNET;

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
    /// notifications; returns whether any was relevant (or notifications
    /// were lost).
    pub fn wait(&self, timeout: Duration, also: RawFd) -> bool {
        if !crate::sys::wait_readable_any(&[self.socket.as_raw_fd(), also], timeout) {
            return false;
        }
        let mut relevant = false;
        loop {
            match self.socket.recv_from_full() {
                Ok((buf, _)) if buf.is_empty() => break,
                Ok((buf, _)) => relevant |= any_relevant(&buf),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    // ENOBUFS: the kernel dropped notifications; resync.
                    tracing::debug!(error = %e, "netlink notifications lost; reconciling");
                    relevant = true;
                    break;
                }
            }
        }
        relevant
    }
}

/// Whether a datagram of notifications holds a relevant one.
pub fn any_relevant(mut buf: &[u8]) -> bool {
    let mut relevant = false;
    while buf.len() >= 16 {
        let len = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len < 16 || len > buf.len() {
            return true;
        }
        match NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[..len]) {
            Ok(msg) => {
                if let NetlinkPayload::InnerMessage(inner) = msg.payload {
                    relevant |= is_relevant(&inner);
                }
            }
            // Unknown attributes of newer kernels: err on the side of reconciling.
            Err(_) => relevant = true,
        }
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
    }
    relevant
}

/// Whether one notification may concern podnet's state.
pub fn is_relevant(msg: &RouteNetlinkMessage) -> bool {
    match msg {
        RouteNetlinkMessage::NewLink(_)
        | RouteNetlinkMessage::DelLink(_)
        | RouteNetlinkMessage::NewRule(_)
        | RouteNetlinkMessage::DelRule(_) => true,
        RouteNetlinkMessage::NewRoute(r) => u8::from(r.header.protocol) == RTPROT_PODNET,
        // A host route going, whoever installed it: it may be one that
        // stood in for podnet's (`provided`, e.g. the route ptp installs for
        // its pod), which podnet must now install itself.
        RouteNetlinkMessage::DelRoute(r) => {
            u8::from(r.header.protocol) == RTPROT_PODNET || is_host_route(r)
        }
        RouteNetlinkMessage::NewNeighbour(n) | RouteNetlinkMessage::DelNeighbour(n) => {
            n.header.flags.contains(NeighbourFlags::Proxy)
        }
        _ => false,
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

    #[test]
    fn only_podnet_routes_and_proxy_neighbours_matter() {
        let mut ours = RouteMessage::default();
        ours.header.protocol = RTPROT_PODNET.into();
        let foreign = RouteMessage::default();
        let mut proxy = NeighbourMessage::default();
        proxy.header.flags = NeighbourFlags::Proxy;
        let arp = NeighbourMessage::default();
        assert!(any_relevant(&bytes(RouteNetlinkMessage::DelRoute(ours))));
        assert!(!any_relevant(&bytes(RouteNetlinkMessage::NewRoute(
            foreign.clone()
        ))));
        assert!(!any_relevant(&bytes(RouteNetlinkMessage::DelRoute(
            foreign.clone()
        ))));
        // A foreign host route going may have stood in for podnet's.
        for (family, len) in [(AddressFamily::Inet, 32), (AddressFamily::Inet6, 128)] {
            let mut host = foreign.clone();
            host.header.address_family = family;
            host.header.destination_prefix_length = len;
            assert!(any_relevant(&bytes(RouteNetlinkMessage::DelRoute(
                host.clone()
            ))));
            assert!(!any_relevant(&bytes(RouteNetlinkMessage::NewRoute(host))));
        }
        assert!(any_relevant(&bytes(RouteNetlinkMessage::DelNeighbour(
            proxy
        ))));
        assert!(!any_relevant(&bytes(RouteNetlinkMessage::NewNeighbour(
            arp.clone()
        ))));
        // Several messages in one datagram: one relevant is enough.
        let mut both = bytes(RouteNetlinkMessage::NewNeighbour(arp));
        both.extend(bytes(RouteNetlinkMessage::DelRule(
            netlink_packet_route::rule::RuleMessage::default(),
        )));
        assert!(any_relevant(&both));
        assert!(!any_relevant(&[]));
    }
}
