//! The pod side of a link-local gateway.
//!
//! In ENI mode a pod's gateway is `169.254.1.1`, an address no VPC uses, so
//! that the node never holds a VPC address for a pod (the shipped chain's
//! `ptp` puts the gateway on the pod's host-side veth). `ptp` then routes
//! the gateway on the pod's interface and the pod's subnet through it, but
//! cannot add the default route: the runtime's IPAM helper adds result
//! routes before the gateway is reachable. The agent adds it when the
//! chained podnet-cni registers the pod, in the pod's namespace.

use std::{net::Ipv4Addr, path::Path};

use super::{
    desired::Route,
    diff::{Change, Object},
    netlink::{Netlink, RtNetlink},
};
use crate::net::Cidr;

/// The main routing table.
const MAIN_TABLE: u32 = 254;

/// Makes `default via gateway dev if_name` the default route of the network
/// namespace at `netns`. Returns whether it changed anything.
pub fn ensure_default_route(
    netns: &Path,
    if_name: &str,
    gateway: Ipv4Addr,
) -> Result<bool, String> {
    let if_name = if_name.to_owned();
    crate::sys::netns::run_in(netns, move || -> Result<bool, String> {
        let mut nl = RtNetlink::open().map_err(|e| e.to_string())?;
        let oif = nl
            .links()
            .map_err(|e| e.to_string())?
            .into_iter()
            .find(|l| l.name == if_name)
            .map(|l| l.index)
            .ok_or_else(|| format!("no interface {if_name}"))?;
        let default =
            Cidr::new(Ipv4Addr::UNSPECIFIED.into(), 0).map_err(|e| format!("0.0.0.0/0: {e}"))?;
        let route = Route {
            table: MAIN_TABLE,
            dst: default,
            oif,
            gateway: Some(gateway.into()),
            scope_link: false,
        };
        let present = nl
            .routes()
            .map_err(|e| e.to_string())?
            .into_iter()
            .find(|r| r.route.table == MAIN_TABLE && r.route.dst == default);
        let change = match present {
            Some(r) if r.route.gateway == Some(gateway.into()) && r.route.oif == oif => {
                return Ok(false)
            }
            Some(_) => Change::Replace(Object::Route(route)),
            None => Change::Add(Object::Route(route)),
        };
        nl.apply(&change).map_err(|e| e.to_string())?;
        Ok(true)
    })
    .map_err(|e| format!("entering {}: {e}", netns.display()))?
}
