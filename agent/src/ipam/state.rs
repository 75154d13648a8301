//! The node's IPAM and CNI endpoint state with its checkpoint: every change
//! is written to disk before it is answered, and a change whose write fails
//! is rolled back in memory, so memory and disk never disagree.
//!
//! A change is a function over the allocator and the endpoints ([`change`]);
//! [`NodeState::transact`] applies and writes one, and
//! `ipam::commit::GroupCommit` applies many and writes them together.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use super::{
    allocator::{Allocation, Allocator, AllocatorState, AttachmentKey},
    source::AddressSource,
    store::{Checkpoint, Store, CHECKPOINT_VERSION},
    Clock, IpamError,
};
use podnet_api::endpoint::EndpointRecord;

/// The registered endpoints, by attachment.
pub type Endpoints = BTreeMap<AttachmentKey, EndpointRecord>;

/// What a change did to the state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Nothing: no write is needed for it.
    Unchanged,
    /// Something that the caller keeps even if it stops waiting (a release,
    /// a removal: repeating it is harmless).
    Changed,
    /// Something made for the caller that must not outlive a caller who
    /// stopped waiting: [`Undo`] takes it back.
    Created(Undo),
}

/// How to take back what a change created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Undo {
    /// Release the attachment's new allocation.
    Release(AttachmentKey),
    /// Put the endpoint back as it was (`None`: remove it).
    Endpoint(AttachmentKey, Option<Box<EndpointRecord>>),
}

impl Undo {
    /// The attachment it concerns.
    pub fn key(&self) -> &AttachmentKey {
        match self {
            Self::Release(k) | Self::Endpoint(k, _) => k,
        }
    }

    /// Takes the change back in memory.
    pub fn apply(&self, alloc: &mut Allocator, endpoints: &mut Endpoints) {
        match self {
            Self::Release(k) => {
                alloc.release(k);
            }
            Self::Endpoint(k, None) => {
                endpoints.remove(k);
            }
            Self::Endpoint(k, Some(previous)) => {
                endpoints.insert(k.clone(), (**previous).clone());
            }
        }
    }
}

/// The changes the IPAM service makes, as functions over the state.
pub mod change {
    use super::{
        Allocation, Allocator, AttachmentKey, BTreeSet, Effect, EndpointRecord, Endpoints,
        IpamError, Undo,
    };

    /// Allocates for `key` (idempotent: an existing allocation is returned
    /// unchanged).
    pub fn allocate(
        key: AttachmentKey,
        network: String,
    ) -> impl FnOnce(&mut Allocator, &mut Endpoints) -> Result<(Allocation, Effect), IpamError>
    {
        move |alloc, _| {
            let existed = alloc.get(&key).is_some();
            let a = alloc.allocate(&key, &network)?;
            let effect = if existed {
                Effect::Unchanged
            } else {
                Effect::Created(Undo::Release(key))
            };
            Ok((a, effect))
        }
    }

    /// Releases `key`'s addresses (`None` when it had none).
    pub fn release(
        key: AttachmentKey,
    ) -> impl FnOnce(&mut Allocator, &mut Endpoints) -> Result<(Option<Allocation>, Effect), IpamError>
    {
        move |alloc, _| {
            let released = alloc.release(&key);
            let effect = if released.is_some() {
                Effect::Changed
            } else {
                Effect::Unchanged
            };
            Ok((released, effect))
        }
    }

    /// Releases the allocations of `network` that are not in `valid`.
    pub fn gc_allocations(
        network: Option<String>,
        valid: BTreeSet<AttachmentKey>,
    ) -> impl FnOnce(&mut Allocator, &mut Endpoints) -> Result<(Vec<Allocation>, Effect), IpamError>
    {
        move |alloc, _| {
            let released = alloc.gc(network.as_deref(), &valid);
            let effect = if released.is_empty() {
                Effect::Unchanged
            } else {
                Effect::Changed
            };
            Ok((released, effect))
        }
    }

    /// Registers (or replaces) an endpoint. An address another attachment is
    /// registered with is refused: two owners would make the routing
    /// reconciler swap the pod's route between their interfaces.
    pub fn add_endpoint(
        record: EndpointRecord,
    ) -> impl FnOnce(&mut Allocator, &mut Endpoints) -> Result<((), Effect), IpamError> {
        move |_, eps| {
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
            if eps.get(&key) == Some(&record) {
                return Ok(((), Effect::Unchanged));
            }
            let previous = eps.insert(key.clone(), record).map(Box::new);
            Ok(((), Effect::Created(Undo::Endpoint(key, previous))))
        }
    }

    /// Removes an endpoint (idempotent).
    pub fn remove_endpoint(
        key: AttachmentKey,
    ) -> impl FnOnce(&mut Allocator, &mut Endpoints) -> Result<(Option<EndpointRecord>, Effect), IpamError>
    {
        move |_, eps| {
            let removed = eps.remove(&key);
            let effect = if removed.is_some() {
                Effect::Changed
            } else {
                Effect::Unchanged
            };
            Ok((removed, effect))
        }
    }

    /// Removes the endpoints of `network` that are not in `valid`.
    pub fn gc_endpoints(
        network: Option<String>,
        valid: BTreeSet<AttachmentKey>,
    ) -> impl FnOnce(&mut Allocator, &mut Endpoints) -> Result<(Vec<EndpointRecord>, Effect), IpamError>
    {
        move |_, eps| {
            let stale: Vec<AttachmentKey> = eps
                .values()
                .filter(|e| {
                    network
                        .as_deref()
                        .is_none_or(|n| e.network == n || e.network.is_empty())
                })
                .map(EndpointRecord::key)
                .filter(|k| !valid.contains(k))
                .collect();
            let removed: Vec<EndpointRecord> = stale.iter().filter_map(|k| eps.remove(k)).collect();
            let effect = if removed.is_empty() {
                Effect::Unchanged
            } else {
                Effect::Changed
            };
            Ok((removed, effect))
        }
    }
}

/// The memory state as it was at one moment, to roll back to.
#[derive(Debug)]
pub struct Snapshot {
    alloc: AllocatorState,
    endpoints: Endpoints,
}

/// Allocations, cooldowns and registered endpoints, persisted.
#[derive(Debug)]
pub struct NodeState {
    alloc: Allocator,
    endpoints: Endpoints,
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
        self.transact(change::allocate(key.clone(), network.to_owned()))
    }

    /// Releases `key`'s addresses (idempotent: `None` when it had none).
    pub fn release(&mut self, key: &AttachmentKey) -> Result<Option<Allocation>, IpamError> {
        self.transact(change::release(key.clone()))
    }

    /// Releases the allocations of `network` that are not in `valid`.
    pub fn gc_allocations(
        &mut self,
        network: Option<&str>,
        valid: &BTreeSet<AttachmentKey>,
    ) -> Result<Vec<Allocation>, IpamError> {
        self.transact(change::gc_allocations(
            network.map(str::to_owned),
            valid.clone(),
        ))
    }

    /// Registers (or replaces) an endpoint; see [`change::add_endpoint`].
    pub fn add_endpoint(&mut self, record: EndpointRecord) -> Result<(), IpamError> {
        self.transact(change::add_endpoint(record))
    }

    /// Removes an endpoint (idempotent).
    pub fn remove_endpoint(
        &mut self,
        key: &AttachmentKey,
    ) -> Result<Option<EndpointRecord>, IpamError> {
        self.transact(change::remove_endpoint(key.clone()))
    }

    /// Removes the endpoints of `network` that are not in `valid`.
    pub fn gc_endpoints(
        &mut self,
        network: Option<&str>,
        valid: &BTreeSet<AttachmentKey>,
    ) -> Result<Vec<EndpointRecord>, IpamError> {
        self.transact(change::gc_endpoints(
            network.map(str::to_owned),
            valid.clone(),
        ))
    }

    /// Writes the checkpoint as memory has it (e.g. to retry after a failure).
    pub fn flush(&self) -> Result<(), IpamError> {
        self.store.save(&self.checkpoint()).map_err(Into::into)
    }

    /// The memory state now.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            alloc: self.alloc.state(),
            endpoints: self.endpoints.clone(),
        }
    }

    /// Whether the endpoints differ from those at `snapshot`.
    pub fn endpoints_differ(&self, snapshot: &Snapshot) -> bool {
        self.endpoints != snapshot.endpoints
    }

    /// Puts memory back as it was at `snapshot`.
    pub fn roll_back(&mut self, snapshot: Snapshot) {
        // The saved state was valid a moment ago, so restoring it cannot fail.
        if let Err(e) = self.alloc.restore(snapshot.alloc) {
            tracing::error!(error = %e, "rolling back IPAM state failed");
        }
        self.endpoints = snapshot.endpoints;
    }

    /// Runs `f` in memory only, rolling back what it did when it fails.
    pub fn apply<T>(
        &mut self,
        f: impl FnOnce(&mut Allocator, &mut Endpoints) -> Result<(T, Effect), IpamError>,
    ) -> Result<(T, Effect), IpamError> {
        let saved = self.snapshot();
        let result = f(&mut self.alloc, &mut self.endpoints);
        if result.is_err() {
            self.roll_back(saved);
        }
        result
    }

    /// Takes back what a change created, in memory only.
    pub fn undo(&mut self, undo: &Undo) {
        undo.apply(&mut self.alloc, &mut self.endpoints);
    }

    /// Runs `f`; when it changed something, persists before returning, and
    /// rolls memory back when `f` or the write fails.
    pub fn transact<T>(
        &mut self,
        f: impl FnOnce(&mut Allocator, &mut Endpoints) -> Result<(T, Effect), IpamError>,
    ) -> Result<T, IpamError> {
        let saved = self.snapshot();
        let (out, effect) = self.apply(f)?;
        if effect != Effect::Unchanged {
            if let Err(e) = self.flush() {
                self.roll_back(saved);
                return Err(e);
            }
        }
        Ok(out)
    }
}
