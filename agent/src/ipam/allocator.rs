//! The allocator: one address per family per attachment, keyed by
//! (container id, interface name), with a cooldown before a released address
//! is handed out again.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use serde::{Deserialize, Serialize};

pub use podnet_api::{
    endpoint::AttachmentKey,
    ipam::{Allocation, Assigned, Cooldown, PoolUsage},
};

use super::{source::AddressSource, Clock, IpamError};
use crate::net::Family;

/// The allocator's persistent state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocatorState {
    /// Live allocations.
    pub allocations: Vec<Allocation>,
    /// Addresses cooling down.
    pub cooldowns: Vec<Cooldown>,
}

/// Hands out addresses from its sources.
#[derive(Debug)]
pub struct Allocator {
    sources: Vec<Arc<dyn AddressSource>>,
    clock: Arc<dyn Clock>,
    cooldown: Duration,
    allocations: BTreeMap<AttachmentKey, Allocation>,
    cooldowns: BTreeMap<IpAddr, u64>,
    /// Every allocated address and its owner.
    used: HashMap<IpAddr, AttachmentKey>,
    /// Where the next search of each source starts.
    cursors: Vec<Option<IpAddr>>,
}

impl Allocator {
    /// An empty allocator over `sources`.
    pub fn new(
        sources: Vec<Arc<dyn AddressSource>>,
        clock: Arc<dyn Clock>,
        cooldown: Duration,
    ) -> Self {
        let cursors = vec![None; sources.len()];
        Self {
            sources,
            clock,
            cooldown,
            allocations: BTreeMap::new(),
            cooldowns: BTreeMap::new(),
            used: HashMap::new(),
            cursors,
        }
    }

    /// Replaces the state with `state` (from a checkpoint). Fails when the
    /// state gives one address to two attachments or lists one key twice.
    pub fn restore(&mut self, state: AllocatorState) -> Result<(), IpamError> {
        let mut allocations = BTreeMap::new();
        let mut used = HashMap::new();
        for a in state.allocations {
            for ip in &a.ips {
                if let Some(other) = used.insert(ip.ip, a.key.clone()) {
                    return Err(IpamError::Inconsistent(format!(
                        "{} is given to both {other} and {}",
                        ip.ip, a.key
                    )));
                }
            }
            if allocations.contains_key(&a.key) {
                return Err(IpamError::Inconsistent(format!(
                    "{} is listed twice",
                    a.key
                )));
            }
            allocations.insert(a.key.clone(), a);
        }
        self.cooldowns = state
            .cooldowns
            .into_iter()
            .filter(|c| !used.contains_key(&c.ip))
            .map(|c| (c.ip, c.until_unix_ms))
            .collect();
        self.allocations = allocations;
        self.used = used;
        self.cursors = vec![None; self.sources.len()];
        Ok(())
    }

    /// The state to persist.
    pub fn state(&self) -> AllocatorState {
        AllocatorState {
            allocations: self.allocations.values().cloned().collect(),
            cooldowns: self
                .cooldowns
                .iter()
                .map(|(&ip, &until_unix_ms)| Cooldown { ip, until_unix_ms })
                .collect(),
        }
    }

    /// Addresses handed out outside every configured source (the node CIDR
    /// changed since they were allocated); they stay theirs until released.
    pub fn outside_sources(&self) -> Vec<IpAddr> {
        let mut out: Vec<IpAddr> = self
            .used
            .keys()
            .filter(|ip| !self.sources.iter().any(|s| s.is_usable(**ip)))
            .copied()
            .collect();
        out.sort_unstable();
        out
    }

    /// The allocation of `key`, if any.
    pub fn get(&self, key: &AttachmentKey) -> Option<&Allocation> {
        self.allocations.get(key)
    }

    /// Every allocation, ordered by key.
    pub fn allocations(&self) -> impl Iterator<Item = &Allocation> {
        self.allocations.values()
    }

    /// The address families the sources cover.
    pub fn families(&self) -> BTreeSet<Family> {
        self.sources.iter().map(|s| s.family()).collect()
    }

    /// Drops cooldowns that have run out. Returns whether any did.
    pub fn expire_cooldowns(&mut self) -> bool {
        let now = self.clock.now_unix_ms();
        let before = self.cooldowns.len();
        self.cooldowns.retain(|_, until| *until > now);
        before != self.cooldowns.len()
    }

    /// Allocates one address per family for `key`, or returns the addresses
    /// it already has (ADD is idempotent). Nothing is allocated on error.
    pub fn allocate(
        &mut self,
        key: &AttachmentKey,
        network: &str,
    ) -> Result<Allocation, IpamError> {
        if let Some(existing) = self.allocations.get(key) {
            return Ok(existing.clone());
        }
        if self.sources.is_empty() {
            return Err(IpamError::NoSources);
        }
        self.expire_cooldowns();
        let mut picked: Vec<(usize, Assigned)> = Vec::new();
        for family in self.families() {
            let found = (0..self.sources.len())
                .filter(|&i| self.sources[i].family() == family)
                .find_map(|i| self.find_free(i).map(|ip| (i, ip)));
            let Some((i, ip)) = found else {
                let pools = self
                    .usage()
                    .iter()
                    .filter(|u| u.prefix.family() == family)
                    .map(PoolUsage::describe)
                    .collect::<Vec<_>>()
                    .join("; ");
                return Err(IpamError::Exhausted { pools });
            };
            picked.push((
                i,
                Assigned {
                    ip,
                    prefix: self.sources[i].prefix(),
                    gateway: self.sources[i].gateway(),
                },
            ));
        }
        let allocation = Allocation {
            key: key.clone(),
            network: network.to_owned(),
            ips: picked.iter().map(|(_, a)| a.clone()).collect(),
            allocated_unix_ms: self.clock.now_unix_ms(),
        };
        for (i, a) in picked {
            self.cursors[i] = Some(a.ip);
            self.used.insert(a.ip, key.clone());
        }
        self.allocations.insert(key.clone(), allocation.clone());
        Ok(allocation)
    }

    /// Next-fit search from the source's cursor, wrapping once. Every address
    /// skipped is allocated or cooling, so a search takes at most that many
    /// steps plus one, whatever the prefix size.
    fn find_free(&self, i: usize) -> Option<IpAddr> {
        let source = &self.sources[i];
        let taken = self.used.keys().filter(|ip| source.is_usable(**ip)).count()
            + self
                .cooldowns
                .keys()
                .filter(|ip| source.is_usable(**ip))
                .count();
        if u128::try_from(taken).map_or(true, |t| t >= source.capacity()) {
            return None;
        }
        let is_free = |ip: &IpAddr| !self.used.contains_key(ip) && !self.cooldowns.contains_key(ip);
        let mut at = self.cursors[i];
        let mut wrapped = false;
        loop {
            match source.next_after(at) {
                Some(ip) if is_free(&ip) => return Some(ip),
                Some(ip) => at = Some(ip),
                None if wrapped => return None,
                None => {
                    wrapped = true;
                    at = None;
                }
            }
        }
    }

    /// Allocates to `key` exactly the addresses of `ips` that lie in a
    /// source (a live pod's, found without an allocation), unless `key` has
    /// an allocation already. Returns whether it allocated; an address
    /// another attachment holds is an error and nothing is allocated.
    pub fn adopt(
        &mut self,
        key: &AttachmentKey,
        network: &str,
        ips: &[IpAddr],
    ) -> Result<bool, IpamError> {
        if self.allocations.contains_key(key) {
            return Ok(false);
        }
        let mut assigned = Vec::new();
        for ip in ips {
            let Some(source) = self.sources.iter().find(|s| s.is_usable(*ip)) else {
                continue;
            };
            if let Some(other) = self.used.get(ip) {
                return Err(IpamError::Inconsistent(format!(
                    "{ip} of {key} is allocated to {other}"
                )));
            }
            assigned.push(Assigned {
                ip: *ip,
                prefix: source.prefix(),
                gateway: source.gateway(),
            });
        }
        if assigned.is_empty() {
            return Ok(false);
        }
        for a in &assigned {
            self.cooldowns.remove(&a.ip);
            self.used.insert(a.ip, key.clone());
        }
        self.allocations.insert(
            key.clone(),
            Allocation {
                key: key.clone(),
                network: network.to_owned(),
                ips: assigned,
                allocated_unix_ms: self.clock.now_unix_ms(),
            },
        );
        Ok(true)
    }

    /// Releases the addresses of `key` into cooldown. `None` when it had none
    /// (DEL is idempotent).
    pub fn release(&mut self, key: &AttachmentKey) -> Option<Allocation> {
        let allocation = self.allocations.remove(key)?;
        let until = self
            .clock
            .now_unix_ms()
            .saturating_add(u64::try_from(self.cooldown.as_millis()).unwrap_or(u64::MAX));
        for a in &allocation.ips {
            self.used.remove(&a.ip);
            if until > self.clock.now_unix_ms() {
                self.cooldowns.insert(a.ip, until);
            }
        }
        Some(allocation)
    }

    /// Releases every allocation of `network` (every one when `None`) whose
    /// key is not in `valid`. Returns what was released.
    pub fn gc(
        &mut self,
        network: Option<&str>,
        valid: &BTreeSet<AttachmentKey>,
    ) -> Vec<Allocation> {
        let stale: Vec<AttachmentKey> = self
            .allocations
            .values()
            .filter(|a| network.is_none_or(|n| a.network == n || a.network.is_empty()))
            .filter(|a| !valid.contains(&a.key))
            .map(|a| a.key.clone())
            .collect();
        stale.iter().filter_map(|k| self.release(k)).collect()
    }

    /// Use of every source, in configuration order.
    pub fn usage(&self) -> Vec<PoolUsage> {
        let now = self.clock.now_unix_ms();
        let sat = |n: u128| u64::try_from(n).unwrap_or(u64::MAX);
        self.sources
            .iter()
            .map(|s| {
                let allocated = self.used.keys().filter(|ip| s.is_usable(**ip)).count() as u64;
                let cooldown = self
                    .cooldowns
                    .iter()
                    .filter(|(ip, until)| **until > now && s.is_usable(**ip))
                    .count() as u64;
                let capacity = sat(s.capacity());
                PoolUsage {
                    name: s.name(),
                    prefix: s.prefix(),
                    gateway: s.gateway(),
                    capacity,
                    allocated,
                    cooldown,
                    free: capacity.saturating_sub(allocated + cooldown),
                }
            })
            .collect()
    }

    /// Addresses cooling down now, with the time they become free.
    pub fn cooldowns(&self) -> Vec<Cooldown> {
        let now = self.clock.now_unix_ms();
        self.cooldowns
            .iter()
            .filter(|(_, until)| **until > now)
            .map(|(&ip, &until_unix_ms)| Cooldown { ip, until_unix_ms })
            .collect()
    }

    /// Whether an ADD would fail now for lack of addresses.
    pub fn exhausted(&self) -> Option<String> {
        let usage = self.usage();
        for family in self.families() {
            let pools: Vec<&PoolUsage> = usage
                .iter()
                .filter(|u| u.prefix.family() == family)
                .collect();
            if pools.iter().all(|u| u.free == 0) {
                return Some(
                    pools
                        .iter()
                        .map(|u| u.describe())
                        .collect::<Vec<_>>()
                        .join("; "),
                );
            }
        }
        None
    }
}
