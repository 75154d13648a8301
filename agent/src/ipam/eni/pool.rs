//! The ENI address source: the secondary addresses of ENIs whose kernel link
//! is up, shared between the allocator (which reads it) and the ENI thread
//! (which changes it). Primary addresses are never in it.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    ops::Bound,
    sync::{Arc, PoisonError, RwLock},
};

use crate::{ipam::source::AddressSource, net::Cidr};

#[derive(Debug, Default)]
struct Inner {
    subnet: Option<Cidr>,
    gateway: Option<IpAddr>,
    ready: BTreeSet<IpAddr>,
    label: String,
}

/// The pool. Cloning shares it.
#[derive(Clone, Debug, Default)]
pub struct EniPool {
    inner: Arc<RwLock<Inner>>,
}

impl EniPool {
    /// An empty pool that names itself as not ready yet.
    pub fn new() -> Self {
        let pool = Self::default();
        pool.set_label("ENI pool not ready yet (waiting for the cloud API)".into());
        pool
    }

    /// Sets the pods' subnet and gateway ([`super::POD_GATEWAY`]).
    pub fn set_subnet(&self, subnet: Cidr, gateway: Option<IpAddr>) {
        let mut inner = self.write();
        inner.subnet = Some(subnet);
        inner.gateway = gateway;
    }

    /// Replaces the addresses that may be handed out.
    pub fn set_ready(&self, ready: impl IntoIterator<Item = Ipv4Addr>) {
        self.write().ready = ready.into_iter().map(IpAddr::V4).collect();
    }

    /// Stops handing out `ip` (before it is released to the cloud).
    pub fn withdraw(&self, ip: Ipv4Addr) {
        self.write().ready.remove(&IpAddr::V4(ip));
    }

    /// Sets how errors and `podnetctl ipam` name the pool.
    pub fn set_label(&self, label: String) {
        self.write().label = label;
    }

    /// The addresses that may be handed out now.
    pub fn ready(&self) -> BTreeSet<IpAddr> {
        self.read().ready.clone()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Stand-in prefix before the subnet is known (the pool is empty then).
fn unknown() -> Cidr {
    // 0.0.0.0/32 has no host bits, so `new` cannot fail.
    Cidr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 32)
        .unwrap_or_else(|_| unreachable!("0.0.0.0/32 is a valid prefix"))
}

impl AddressSource for EniPool {
    fn name(&self) -> String {
        self.read().label.clone()
    }

    fn prefix(&self) -> Cidr {
        self.read().subnet.unwrap_or_else(unknown)
    }

    fn gateway(&self) -> Option<IpAddr> {
        self.read().gateway
    }

    fn capacity(&self) -> u128 {
        self.read().ready.len() as u128
    }

    fn is_usable(&self, ip: IpAddr) -> bool {
        self.read().ready.contains(&ip)
    }

    fn next_after(&self, after: Option<IpAddr>) -> Option<IpAddr> {
        let inner = self.read();
        match after {
            None => inner.ready.iter().next().copied(),
            Some(ip) => inner
                .ready
                .range((Bound::Excluded(ip), Bound::Unbounded))
                .next()
                .copied(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_the_ready_addresses() {
        let pool = EniPool::new();
        assert_eq!(pool.capacity(), 0);
        assert_eq!(pool.next_after(None), None);
        let ip = |n| Ipv4Addr::new(10, 0, 1, n);
        pool.set_ready([ip(9), ip(7)]);
        pool.set_subnet("10.0.1.0/24".parse().unwrap(), Some(IpAddr::V4(ip(1))));
        assert_eq!(pool.capacity(), 2);
        assert_eq!(pool.next_after(None), Some(IpAddr::V4(ip(7))));
        assert_eq!(
            pool.next_after(Some(IpAddr::V4(ip(7)))),
            Some(IpAddr::V4(ip(9)))
        );
        assert_eq!(pool.next_after(Some(IpAddr::V4(ip(9)))), None);
        assert!(!pool.is_usable(IpAddr::V4(ip(8))));
        pool.withdraw(ip(7));
        assert!(!pool.is_usable(IpAddr::V4(ip(7))));
        assert_eq!(pool.prefix().to_string(), "10.0.1.0/24");
    }
}
