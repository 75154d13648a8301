//! The node's IPAM and CNI endpoint state with its checkpoint: every change
//! is written to disk before it is answered, and a change whose write fails
//! is rolled back in memory, so memory and disk never disagree.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use super::{
    allocator::{Allocation, Allocator, AttachmentKey},
    source::AddressSource,
    store::{Checkpoint, Store, CHECKPOINT_VERSION},
    Clock, IpamError,
};
use podnet_api::endpoint::EndpointRecord;

/// Allocations, cooldowns and registered endpoints, persisted.
#[derive(Debug)]
pub struct NodeState {
    alloc: Allocator,
    endpoints: BTreeMap<AttachmentKey, EndpointRecord>,
    store: Store,
}

impl NodeState {
    /// Opens the state, restoring the checkpoint when there is one. A corrupt
    /// or unknown-version checkpoint is an error (and stays on disk).
    pub fn open(
        sources: Vec<Arc<dyn AddressSource>>,
        clock: Arc<dyn Clock>,
        cooldown: Duration,
        store: Store,
    ) -> Result<Self, IpamError> {
        let mut alloc = Allocator::new(sources, clock, cooldown);
        let mut endpoints = BTreeMap::new();
        if let Some(cp) = store.load()? {
            alloc.restore(cp.ipam).map_err(|e| {
                IpamError::Config(format!(
                    "checkpoint {}: {e}; the file is kept",
                    store.path().display()
                ))
            })?;
            for ep in cp.endpoints {
                endpoints.insert(ep.key(), ep);
            }
        }
        Ok(Self {
            alloc,
            endpoints,
            store,
        })
    }

    /// The allocator (read-only).
    pub fn allocator(&self) -> &Allocator {
        &self.alloc
    }

    /// Registered endpoints, ordered by key.
    pub fn endpoints(&self) -> impl Iterator<Item = &EndpointRecord> {
        self.endpoints.values()
    }

    /// The endpoint registered for `key`.
    pub fn endpoint(&self, key: &AttachmentKey) -> Option<&EndpointRecord> {
        self.endpoints.get(key)
    }

    /// What the checkpoint would hold now.
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint {
            version: CHECKPOINT_VERSION,
            ipam: self.alloc.state(),
            endpoints: self.endpoints.values().cloned().collect(),
        }
    }

    /// Allocates for `key` (idempotent).
    pub fn allocate(
        &mut self,
        key: &AttachmentKey,
        network: &str,
    ) -> Result<Allocation, IpamError> {
        self.transact(|alloc, _| {
            let existed = alloc.get(key).is_some();
            let a = alloc.allocate(key, network)?;
            Ok((a, !existed))
        })
    }

    /// Releases `key`'s addresses (idempotent: `None` when it had none).
    pub fn release(&mut self, key: &AttachmentKey) -> Result<Option<Allocation>, IpamError> {
        self.transact(|alloc, _| {
            let released = alloc.release(key);
            let changed = released.is_some();
            Ok((released, changed))
        })
    }

    /// Releases the allocations of `network` that are not in `valid`.
    pub fn gc_allocations(
        &mut self,
        network: Option<&str>,
        valid: &BTreeSet<AttachmentKey>,
    ) -> Result<Vec<Allocation>, IpamError> {
        self.transact(|alloc, _| {
            let released = alloc.gc(network, valid);
            let changed = !released.is_empty();
            Ok((released, changed))
        })
    }

    /// Registers (or replaces) an endpoint. An address another attachment is
    /// registered with is refused: two owners would make the routing
    /// reconciler swap the pod's route between their interfaces.
    pub fn add_endpoint(&mut self, record: EndpointRecord) -> Result<(), IpamError> {
        self.transact(|_, eps| {
            let key = record.key();
            if let Some((ip, holder)) = eps.values().filter(|e| e.key() != key).find_map(|e| {
                record
                    .ips
                    .iter()
                    .find(|ip| e.ips.contains(ip))
                    .map(|ip| (*ip, e))
            }) {
                return Err(IpamError::AddressConflict {
                    ip,
                    holder: format!("{}/{} ({})", holder.namespace, holder.pod, holder.key()),
                });
            }
            let changed = eps.get(&key) != Some(&record);
            eps.insert(key, record);
            Ok(((), changed))
        })
    }

    /// Removes an endpoint (idempotent).
    pub fn remove_endpoint(
        &mut self,
        key: &AttachmentKey,
    ) -> Result<Option<EndpointRecord>, IpamError> {
        self.transact(|_, eps| {
            let removed = eps.remove(key);
            let changed = removed.is_some();
            Ok((removed, changed))
        })
    }

    /// Removes the endpoints of `network` that are not in `valid`.
    pub fn gc_endpoints(
        &mut self,
        network: Option<&str>,
        valid: &BTreeSet<AttachmentKey>,
    ) -> Result<Vec<EndpointRecord>, IpamError> {
        self.transact(|_, eps| {
            let stale: Vec<AttachmentKey> = eps
                .values()
                .filter(|e| network.is_none_or(|n| e.network == n || e.network.is_empty()))
                .map(EndpointRecord::key)
                .filter(|k| !valid.contains(k))
                .collect();
            let removed: Vec<EndpointRecord> = stale.iter().filter_map(|k| eps.remove(k)).collect();
            let changed = !removed.is_empty();
            Ok((removed, changed))
        })
    }

    /// Writes the checkpoint as memory has it (e.g. to retry after a failure).
    pub fn flush(&self) -> Result<(), IpamError> {
        self.store.save(&self.checkpoint()).map_err(Into::into)
    }

    /// Runs `f`; when it changed something, persists before returning, and
    /// rolls memory back when `f` or the write fails.
    fn transact<T>(
        &mut self,
        f: impl FnOnce(
            &mut Allocator,
            &mut BTreeMap<AttachmentKey, EndpointRecord>,
        ) -> Result<(T, bool), IpamError>,
    ) -> Result<T, IpamError> {
        let saved_alloc = self.alloc.state();
        let saved_endpoints = self.endpoints.clone();
        let result = f(&mut self.alloc, &mut self.endpoints).and_then(|(out, changed)| {
            if changed {
                self.store.save(&self.checkpoint())?;
            }
            Ok(out)
        });
        if result.is_err() {
            // The saved state was valid a moment ago, so restoring it cannot fail.
            if let Err(e) = self.alloc.restore(saved_alloc) {
                tracing::error!(error = %e, "rolling back IPAM state failed");
            }
            self.endpoints = saved_endpoints;
        }
        result
    }
}
