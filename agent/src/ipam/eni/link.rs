//! ENI kernel links: found by MAC in the agent's network namespace and
//! brought up with the ENI MTU, through rtnetlink (behind a trait so the ENI
//! logic is tested without root).

use crate::{net::MacAddr, routing::netlink::RtNetlink};

/// MTU of ENIs inside a VPC (jumbo frames).
pub const ENI_MTU: u32 = 9001;

/// A kernel link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    /// Interface name.
    pub name: String,
    /// Its MTU.
    pub mtu: u32,
    /// Whether it is administratively up.
    pub up: bool,
}

/// The link operations ENI mode needs.
pub trait Links: Send + Sync {
    /// Every link by MAC.
    fn list(&self) -> Result<Vec<(MacAddr, LinkInfo)>, String>;
    /// Sets the MTU and brings the link up.
    fn bring_up(&self, name: &str, mtu: u32) -> Result<(), String>;
}

/// Links through rtnetlink in the agent's network namespace (no `ip` binary: the image
/// has none). A socket per call: the ENI thread calls rarely.
#[derive(Clone, Copy, Debug, Default)]
pub struct NetlinkLinks;

impl Links for NetlinkLinks {
    fn list(&self) -> Result<Vec<(MacAddr, LinkInfo)>, String> {
        let states = RtNetlink::open()
            .and_then(|mut netlink| netlink.link_states())
            .map_err(|e| e.to_string())?;
        Ok(states
            .into_iter()
            .filter_map(|state| {
                let mac = state.link.mac?;
                Some((
                    mac,
                    LinkInfo {
                        name: state.link.name,
                        mtu: state.mtu,
                        up: state.up,
                    },
                ))
            })
            .collect())
    }

    fn bring_up(&self, name: &str, mtu: u32) -> Result<(), String> {
        let mut netlink = RtNetlink::open().map_err(|e| e.to_string())?;
        let index = netlink
            .link_states()
            .map_err(|e| e.to_string())?
            .into_iter()
            .find(|state| state.link.name == name)
            .map(|state| state.link.index)
            .ok_or_else(|| format!("no link named {name}"))?;
        netlink
            .set_up_with_mtu(index, mtu)
            .map_err(|e| e.to_string())
    }
}
