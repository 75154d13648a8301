//! The node's IPAM and CNI endpoint state with its checkpoint: every change
//! is written to disk before it is answered, and a change whose write fails
//! is rolled back in memory, so memory and disk never disagree.
//!
//! A change is a function over the allocator and the endpoints ([`change`]);
//! [`NodeState::transact`] applies and writes one, and
//! `ipam::commit::GroupCommit` applies many and writes them together.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use super::{
    allocator::{Allocation, Allocator, AllocatorState, AttachmentKey},
    source::AddressSource,
    store::{Checkpoint, Store, StoreError, CHECKPOINT_VERSION},
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

    /// Releases the endpoints (and their attachments' allocations) of `keys`.
    pub fn release_attachments(
        keys: Vec<AttachmentKey>,
    ) -> impl FnOnce(&mut Allocator, &mut Endpoints) -> Result<((usize, usize), Effect), IpamError>
    {
        move |alloc, eps| {
            let endpoints = keys.iter().filter(|k| eps.remove(*k).is_some()).count();
            let allocations = keys.iter().filter(|k| alloc.release(k).is_some()).count();
            let effect = if endpoints + allocations == 0 {
                Effect::Unchanged
            } else {
                Effect::Changed
            };
            Ok(((endpoints, allocations), effect))
        }
    }
}

/// The memory state as it was at one moment, to roll back to.
#[derive(Debug)]
pub struct Snapshot {
    alloc: AllocatorState,
    endpoints: Endpoints,
}

/// How the state was restored at start when the checkpoint was damaged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovery {
    /// The file the state came from (the checkpoint's copy).
    pub from: PathBuf,
    /// The damaged checkpoint.
    pub damaged: PathBuf,
    /// Where the damaged checkpoint was moved for inspection, if it could be.
    pub kept_as: Option<PathBuf>,
    /// What was wrong with it.
    pub error: String,
}

/// Allocations, cooldowns and registered endpoints, persisted.
#[derive(Debug)]
pub struct NodeState {
    alloc: Allocator,
    endpoints: Endpoints,
    store: Store,
    recovery: Option<Recovery>,
}

impl NodeState {
    /// Opens the state, restoring the checkpoint when there is one. A
    /// checkpoint that is corrupt, contradicts itself or is missing while
    /// its copy exists is replaced by its copy ([`NodeState::recovery`]
    /// says so); when the copy is unusable too, or the checkpoint has an
    /// unknown version, opening fails and the files stay on disk.
    pub fn open(
        sources: Vec<Arc<dyn AddressSource>>,
        clock: Arc<dyn Clock>,
        cooldown: Duration,
        store: Store,
    ) -> Result<Self, IpamError> {
        let mut state = Self {
            alloc: Allocator::new(sources, clock, cooldown),
            endpoints: BTreeMap::new(),
            store,
            recovery: None,
        };
        // Why the checkpoint cannot be used: `None` when it does not exist.
        let path = state.store.path().to_owned();
        // Why the checkpoint cannot be used: `None` when it does not exist.
        let damage = match state.store.load() {
            Ok(None) => None,
            Ok(Some(cp)) => match state.restore_checkpoint(cp) {
                Ok(()) => return Ok(state),
                Err(e) => Some(e.to_string()),
            },
            Err(StoreError::Corrupt { message, .. }) => Some(format!("corrupt: {message}")),
            // A newer format is not damage (its copy has the same format), and
            // a file that cannot be read is the operator's to look at.
            Err(e) => return Err(e.into()),
        };
        let previous_path = state.store.previous_path().to_owned();
        let previous = match state.store.load_previous() {
            // A first start: neither file exists.
            Ok(None) if damage.is_none() => return Ok(state),
            Ok(None) => Err("it does not exist".to_owned()),
            Ok(Some(cp)) => state.restore_checkpoint(cp).map_err(|e| e.to_string()),
            Err(StoreError::Corrupt { message, .. }) => Err(format!("corrupt: {message}")),
            Err(e) => Err(e.to_string()),
        };
        if let Err(previous) = previous {
            return Err(StoreError::BothUnusable {
                path,
                current: damage.unwrap_or_else(|| "it does not exist".to_owned()),
                previous_path,
                previous,
            }
            .into());
        }
        let damaged = state.store.path().to_owned();
        let kept_as = match damage {
            None => None,
            Some(_) => match state.store.set_aside_corrupt() {
                Ok(p) => Some(p),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot move the damaged checkpoint aside; it is replaced");
                    None
                }
            },
        };
        // The recovered state becomes the checkpoint again.
        state.flush()?;
        state.recovery = Some(Recovery {
            from: previous_path,
            damaged,
            kept_as,
            error: damage.unwrap_or_else(|| "it does not exist".to_owned()),
        });
        Ok(state)
    }

    /// Restores memory from `cp`; on error memory is as it was.
    fn restore_checkpoint(&mut self, cp: Checkpoint) -> Result<(), IpamError> {
        self.alloc.restore(cp.ipam)?;
        self.endpoints = cp.endpoints.into_iter().map(|ep| (ep.key(), ep)).collect();
        Ok(())
    }

    /// How the state was recovered at start, if the checkpoint was damaged.
    pub fn recovery(&self) -> Option<&Recovery> {
        self.recovery.as_ref()
    }

    /// The checkpoint's path.
    pub fn checkpoint_path(&self) -> &Path {
        self.store.path()
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

    /// Allocates to a live endpoint the addresses it has, when its
    /// attachment has no allocation (in memory only; see
    /// [`Allocator::adopt`]).
    pub fn adopt(&mut self, ep: &EndpointRecord) -> Result<bool, IpamError> {
        self.alloc.adopt(&ep.key(), &ep.network, &ep.ips)
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
