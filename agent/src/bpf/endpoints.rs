//! The node's endpoint addresses in a kernel map (`CT_ENDPOINTS`,
//! `DNS_ENDPOINTS`): the programs count a source per pod only when it is
//! listed, and fold every other source into one key, so what a pod sends
//! (a spoofed address, a spray of servers) cannot fill a map.

use std::{collections::BTreeSet, net::IpAddr};

use aya::maps::{HashMap, MapData, MapError};
use podnet_common::{family, AddrKey};

/// The map key of `ip`.
pub fn addr_key(ip: IpAddr) -> AddrKey {
    let mut addr = [0u8; 16];
    let family = match ip {
        IpAddr::V4(v4) => {
            addr[..4].copy_from_slice(&v4.octets());
            family::INET
        }
        IpAddr::V6(v6) => {
            addr = v6.octets();
            family::INET6
        }
    };
    AddrKey {
        addr,
        family,
        _pad: [0; 3],
    }
}

/// What an [`AddressMap::sync`] changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Synced {
    /// Addresses added.
    pub added: usize,
    /// Addresses removed.
    pub removed: usize,
}

/// An endpoint address map and the keys it holds: the kernel's keys are
/// listed once, then each change is diffed against what was written, so it
/// costs its own updates only, not a walk of the map.
pub struct AddressMap {
    map: HashMap<MapData, AddrKey, u8>,
    held: BTreeSet<AddrKey>,
    name: &'static str,
}

impl AddressMap {
    /// Takes `map` (named `name` in logs) with the keys it holds now.
    pub fn new(map: HashMap<MapData, AddrKey, u8>, name: &'static str) -> Self {
        let held = map.keys().filter_map(Result::ok).collect();
        Self { map, held, name }
    }

    /// Makes the map list exactly `ips` (at most its capacity: beyond it,
    /// the rest count as unknown sources and the error says so).
    pub fn sync(&mut self, ips: impl IntoIterator<Item = IpAddr>) -> Result<Synced, MapError> {
        let want: BTreeSet<AddrKey> = ips.into_iter().map(addr_key).collect();
        let mut synced = Synced::default();
        for stale in self.held.difference(&want).copied().collect::<Vec<_>>() {
            match self.map.remove(&stale) {
                // Removed by another agent meanwhile: already as wanted.
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(e),
            }
            self.held.remove(&stale);
            synced.removed += 1;
        }
        for new in want.difference(&self.held).copied().collect::<Vec<_>>() {
            self.map.insert(new, 1, 0)?;
            self.held.insert(new);
            synced.added += 1;
        }
        Ok(synced)
    }

    /// [`AddressMap::sync`], a failure logged (counts then fold into the
    /// unknown source until the next change succeeds).
    pub fn sync_or_warn(&mut self, ips: &mut dyn Iterator<Item = IpAddr>) {
        if let Err(e) = self.sync(ips) {
            tracing::warn!(error = %e, map = self.name, "listing endpoint addresses");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_carry_the_family_and_the_address_bytes() {
        let v4 = addr_key("10.244.1.7".parse().unwrap());
        assert_eq!(v4.family, family::INET);
        assert_eq!(&v4.addr[..4], &[10, 244, 1, 7]);
        assert_eq!(&v4.addr[4..], &[0; 12]);
        let v6 = addr_key("fd00::7".parse().unwrap());
        assert_eq!(v6.family, family::INET6);
        assert_eq!(v6.addr[0], 0xfd);
        assert_eq!(v6.addr[15], 7);
    }
}
