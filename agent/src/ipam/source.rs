//! Where addresses come from. `node-cidr` hands out the node's pod CIDRs; the
//! ENI pool ([`super::eni::pool`]: secondary IPs of attached interfaces, never
//! the primary) sits behind the same trait.

use std::net::IpAddr;

use crate::net::{from_u128, to_u128, Cidr, Family};

/// A set of addresses the allocator may hand out, with the gateway pods use.
pub trait AddressSource: std::fmt::Debug + Send + Sync {
    /// How errors and `podnetctl ipam` name it, e.g. `node-cidr 10.244.1.0/24`.
    fn name(&self) -> String;
    /// The prefix a pod's address is configured with.
    fn prefix(&self) -> Cidr;
    /// The gateway pods route through; never handed out.
    fn gateway(&self) -> Option<IpAddr>;
    /// How many addresses it can hand out.
    fn capacity(&self) -> u128;
    /// Whether `ip` is one it hands out.
    fn is_usable(&self, ip: IpAddr) -> bool;
    /// The first usable address after `after` (the first of all when `None`),
    /// without wrapping around.
    fn next_after(&self, after: Option<IpAddr>) -> Option<IpAddr>;

    /// The address family.
    fn family(&self) -> Family {
        self.prefix().family()
    }
}

/// A node pod CIDR: every address except the network address, the gateway
/// (the first usable address) and the last address (IPv4 broadcast; kept
/// back in IPv6 as well, so both families follow one rule).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeCidr {
    cidr: Cidr,
}

/// Errors building a node CIDR source.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("node-cidr {cidr} is too small: it needs at least 4 addresses (network, gateway, one pod, broadcast)")]
pub struct TooSmall {
    /// The prefix.
    pub cidr: Cidr,
}

impl NodeCidr {
    /// A source over `cidr`; it must leave at least one pod address.
    pub fn new(cidr: Cidr) -> Result<Self, TooSmall> {
        if cidr.host_bits() < 2 {
            return Err(TooSmall { cidr });
        }
        Ok(Self { cidr })
    }

    fn first(&self) -> u128 {
        to_u128(self.cidr.network()) + 2
    }

    fn last(&self) -> u128 {
        to_u128(self.cidr.last()) - 1
    }
}

impl AddressSource for NodeCidr {
    fn name(&self) -> String {
        format!("node-cidr {}", self.cidr)
    }

    fn prefix(&self) -> Cidr {
        self.cidr
    }

    fn gateway(&self) -> Option<IpAddr> {
        self.cidr.nth(1)
    }

    fn capacity(&self) -> u128 {
        self.last() - self.first() + 1
    }

    fn is_usable(&self, ip: IpAddr) -> bool {
        self.cidr.contains(ip) && (self.first()..=self.last()).contains(&to_u128(ip))
    }

    fn next_after(&self, after: Option<IpAddr>) -> Option<IpAddr> {
        let next = match after {
            None => self.first(),
            Some(ip) if self.cidr.contains(ip) => (to_u128(ip) + 1).max(self.first()),
            Some(_) => return None,
        };
        (next <= self.last()).then(|| from_u128(self.cidr.family(), next))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserves_network_gateway_and_broadcast() {
        let s = NodeCidr::new("10.244.1.0/24".parse().unwrap()).unwrap();
        assert_eq!(s.capacity(), 253);
        assert_eq!(s.gateway().unwrap().to_string(), "10.244.1.1");
        assert_eq!(s.next_after(None).unwrap().to_string(), "10.244.1.2");
        assert_eq!(
            s.next_after(Some("10.244.1.253".parse().unwrap()))
                .unwrap()
                .to_string(),
            "10.244.1.254"
        );
        assert_eq!(s.next_after(Some("10.244.1.254".parse().unwrap())), None);
        assert!(!s.is_usable("10.244.1.0".parse().unwrap()));
        assert!(!s.is_usable("10.244.1.1".parse().unwrap()));
        assert!(!s.is_usable("10.244.1.255".parse().unwrap()));
        assert!(s.is_usable("10.244.1.2".parse().unwrap()));
        let small = NodeCidr::new("10.0.0.0/30".parse().unwrap()).unwrap();
        assert_eq!(small.capacity(), 1);
        assert!(NodeCidr::new("10.0.0.0/31".parse().unwrap()).is_err());
        let v6 = NodeCidr::new("fd00::/120".parse().unwrap()).unwrap();
        assert_eq!(v6.capacity(), 253);
        assert_eq!(v6.gateway().unwrap().to_string(), "fd00::1");
    }
}
