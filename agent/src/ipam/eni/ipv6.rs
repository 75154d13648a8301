//! ENI mode's IPv6 addresses (`--eni-ipv6`), as the AWS VPC CNI's IPv6 mode:
//! one `/80` prefix of the subnet is delegated to the primary ENI
//! (`AssignIpv6Addresses` with `Ipv6PrefixCount`), and every pod gets an
//! address of it beside its IPv4 one. EC2 routes the whole prefix to the
//! ENI, so one call serves the node for good; the prefix is handed out from
//! once a listing shows it, and saved with the pool.

use std::{
    net::{IpAddr, Ipv6Addr},
    sync::{Arc, PoisonError, RwLock},
};

use crate::{
    ipam::source::{AddressSource, NodeCidr},
    net::Cidr,
};

/// The pods' IPv6 prefix, once EC2 has confirmed it. Cloning shares it.
#[derive(Clone, Debug, Default)]
pub struct Ipv6Pool {
    prefix: Arc<RwLock<Option<NodeCidr>>>,
}

/// Stand-in prefix before the prefix is known: IPv6, so that the allocator
/// counts the family from the start (and hands out nothing in it).
fn unknown() -> Cidr {
    // ::/128 has no host bits, so `new` cannot fail.
    Cidr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 128)
        .unwrap_or_else(|_| unreachable!("::/128 is a valid prefix"))
}

impl Ipv6Pool {
    /// Hands out addresses of `prefix` from now on.
    pub fn set_prefix(&self, prefix: Cidr) {
        let source = NodeCidr::new(prefix).ok();
        *self.prefix.write().unwrap_or_else(PoisonError::into_inner) = source;
    }

    /// The prefix, once known.
    pub fn prefix(&self) -> Option<Cidr> {
        self.source().map(|s| s.prefix())
    }

    fn source(&self) -> Option<NodeCidr> {
        self.prefix
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl AddressSource for Ipv6Pool {
    fn name(&self) -> String {
        self.source().map_or_else(
            || "ENI IPv6 prefix not delegated yet (waiting for the cloud API)".into(),
            |s| format!("ENI IPv6 prefix {}", s.prefix()),
        )
    }

    fn prefix(&self) -> Cidr {
        self.source().map_or_else(unknown, |s| s.prefix())
    }

    fn gateway(&self) -> Option<IpAddr> {
        self.source().and_then(|s| s.gateway())
    }

    fn capacity(&self) -> u128 {
        self.source().map_or(0, |s| s.capacity())
    }

    fn is_usable(&self, ip: IpAddr) -> bool {
        self.source().is_some_and(|s| s.is_usable(ip))
    }

    fn next_after(&self, after: Option<IpAddr>) -> Option<IpAddr> {
        self.source().and_then(|s| s.next_after(after))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::Family;

    #[test]
    fn hands_out_nothing_until_the_prefix_is_known_then_its_addresses() {
        let pool = Ipv6Pool::default();
        assert_eq!(pool.family(), Family::V6);
        assert_eq!(pool.capacity(), 0);
        assert_eq!(pool.next_after(None), None);
        assert!(pool.name().contains("not delegated yet"), "{}", pool.name());
        pool.set_prefix("2600:1f18:1:100:7a8b::/80".parse().unwrap());
        assert_eq!(pool.capacity(), (1u128 << 48) - 3);
        assert_eq!(
            pool.next_after(None),
            Some("2600:1f18:1:100:7a8b::2".parse().unwrap())
        );
        assert_eq!(pool.name(), "ENI IPv6 prefix 2600:1f18:1:100:7a8b::/80");
    }
}
