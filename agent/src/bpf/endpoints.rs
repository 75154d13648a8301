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

/// What a [`sync`] changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Synced {
    /// Addresses added.
    pub added: usize,
    /// Addresses removed.
    pub removed: usize,
}

/// Makes `map` list exactly `ips` (at most the map's capacity: beyond it, the
/// rest count as unknown sources and the error says so).
pub fn sync(
    map: &mut HashMap<MapData, AddrKey, u8>,
    ips: impl IntoIterator<Item = IpAddr>,
) -> Result<Synced, MapError> {
    let want: BTreeSet<AddrKey> = ips.into_iter().map(addr_key).collect();
    let have: BTreeSet<AddrKey> = map.keys().filter_map(Result::ok).collect();
    let mut synced = Synced::default();
    for stale in have.difference(&want) {
        match map.remove(stale) {
            Ok(()) => synced.removed += 1,
            // Removed by another agent meanwhile: already as wanted.
            Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(e),
        }
    }
    for new in want.difference(&have) {
        map.insert(new, 1, 0)?;
        synced.added += 1;
    }
    Ok(synced)
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
