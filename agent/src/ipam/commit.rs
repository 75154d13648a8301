//! Group commit of the node state: changes that arrive while the checkpoint
//! is being written wait, are applied together in memory, and are written
//! with one checkpoint write (one fsync, rename and directory fsync) for the
//! whole batch. Each caller is answered only once the write that holds its
//! change is on disk; a failed write rolls back exactly that batch and fails
//! its callers.
//!
//! There is no thread of its own: the first caller that finds no write in
//! flight leads one batch (everything queued by then) while the others wait
//! for their answers, so a lone change costs what it cost before and a burst
//! of N changes costs far fewer than N writes.
//!
//! Each change may carry its caller's deadline. One whose deadline has
//! passed when its batch starts is not applied (`IpamError::DeadlineExceeded`);
//! one that created something (an allocation, an endpoint) and whose caller
//! gave up while its batch was written is taken back with a second write
//! before anyone else can see it, so no allocation is left to an absent
//! caller.

use std::{
    collections::BTreeSet,
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc, Arc, Condvar, Mutex, MutexGuard, PoisonError,
    },
};

use super::{
    allocator::{Allocator, AttachmentKey},
    state::{Effect, Endpoints, NodeState, Undo},
    store::StoreError,
    Clock, IpamError,
};

/// Time the answer needs to reach a caller: a change whose caller's
/// deadline is closer than this once it is written is treated as one whose
/// caller is gone (podnet-cni stops reading at its deadline).
pub const ANSWER_MARGIN_MS: u64 = 50;

/// Writes of the checkpoint, for `podnet_ipam_checkpoint_*`.
#[derive(Debug, Default)]
pub struct CommitStats {
    /// Checkpoint writes that succeeded.
    pub writes_ok: AtomicU64,
    /// Checkpoint writes that failed (their batch was rolled back).
    pub writes_failed: AtomicU64,
    /// Changes made durable by the successful writes.
    pub changes: AtomicU64,
    /// Changes refused because their caller's deadline had passed.
    pub refused_late: AtomicU64,
    /// Changes written, then taken back because their caller had gone.
    pub undone_late: AtomicU64,
}

/// What a batch did, for whoever mirrors the state (the registry).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Changes made durable.
    pub changes: usize,
    /// Whether an endpoint changed.
    pub endpoints_changed: bool,
}

/// Called after each durable batch, with the state lock held.
pub type OnDurable = Box<dyn Fn(&NodeState, BatchOutcome) + Send + Sync>;

/// One queued change, its type erased.
trait Pending: Send {
    /// The caller's deadline (ms since the epoch).
    fn deadline(&self) -> Option<u64>;
    /// The attachment the change is about, if one.
    fn key(&self) -> Option<&AttachmentKey>;
    /// Applies the change to memory (its own failure rolls back only itself).
    fn apply(&mut self, state: &mut NodeState);
    /// What it did (`None` if it failed or was not applied).
    fn effect(&self) -> Option<&Effect>;
    /// Answers the caller.
    fn answer(self: Box<Self>, failure: Option<IpamError>);
}

struct Change<T, F> {
    f: Option<F>,
    deadline: Option<u64>,
    key: Option<AttachmentKey>,
    result: Option<Result<(T, Effect), IpamError>>,
    reply: mpsc::SyncSender<Result<T, IpamError>>,
}

impl<T, F> Pending for Change<T, F>
where
    T: Send,
    F: FnOnce(&mut Allocator, &mut Endpoints) -> Result<(T, Effect), IpamError> + Send,
{
    fn deadline(&self) -> Option<u64> {
        self.deadline
    }

    fn key(&self) -> Option<&AttachmentKey> {
        self.key.as_ref()
    }

    fn apply(&mut self, state: &mut NodeState) {
        if let Some(f) = self.f.take() {
            self.result = Some(state.apply(f));
        }
    }

    fn effect(&self) -> Option<&Effect> {
        match &self.result {
            Some(Ok((_, effect))) => Some(effect),
            _ => None,
        }
    }

    fn answer(self: Box<Self>, failure: Option<IpamError>) {
        let answer = match (failure, self.result) {
            (Some(e), _) => Err(e),
            (None, Some(result)) => result.map(|(out, _)| out),
            (None, None) => Err(IpamError::Inconsistent(
                "a change was answered before it was applied".into(),
            )),
        };
        // The caller waits on the receiver until it has its answer; a
        // capacity of one never blocks this single send.
        let _ = self.reply.send(answer);
    }
}

#[derive(Default)]
struct Queue {
    pending: Vec<Box<dyn Pending>>,
    leading: bool,
}

/// The node state behind group commit.
pub struct GroupCommit {
    state: Arc<Mutex<NodeState>>,
    queue: Mutex<Queue>,
    turn: Condvar,
    clock: Arc<dyn Clock>,
    stats: CommitStats,
    on_durable: OnDurable,
}

impl std::fmt::Debug for GroupCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit")
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl GroupCommit {
    /// Group commit over `state`; `on_durable` runs after every batch that
    /// was written (and after none that failed).
    pub fn new(state: NodeState, clock: Arc<dyn Clock>, on_durable: OnDurable) -> Self {
        Self {
            state: Arc::new(Mutex::new(state)),
            queue: Mutex::new(Queue::default()),
            turn: Condvar::new(),
            clock,
            stats: CommitStats::default(),
            on_durable,
        }
    }

    /// The state, for reading. Everything read through it is on disk: a
    /// batch holds the lock from its first change to the end of its write.
    pub fn state(&self) -> MutexGuard<'_, NodeState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The shared state (the ENI thread reads the allocator through it).
    pub fn shared(&self) -> &Arc<Mutex<NodeState>> {
        &self.state
    }

    /// The write counters.
    pub fn stats(&self) -> &CommitStats {
        &self.stats
    }

    /// Changes waiting for the write in flight to end.
    pub fn queued(&self) -> usize {
        self.queue().pending.len()
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes the change `f` (about the attachment `key`, if one) for a
    /// caller who waits until `deadline_unix_ms` (`None`: without limit), and
    /// returns once it is on disk (or failed).
    pub fn run<T, F>(
        &self,
        deadline_unix_ms: Option<u64>,
        key: Option<AttachmentKey>,
        f: F,
    ) -> Result<T, IpamError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Allocator, &mut Endpoints) -> Result<(T, Effect), IpamError>
            + Send
            + 'static,
    {
        if let Some(late_ms) = late_by(deadline_unix_ms, self.clock.now_unix_ms()) {
            self.stats.refused_late.fetch_add(1, Ordering::Relaxed);
            return Err(IpamError::DeadlineExceeded { late_ms });
        }
        let (reply, answer) = mpsc::sync_channel(1);
        let mut queue = self.queue();
        queue.pending.push(Box::new(Change {
            f: Some(f),
            deadline: deadline_unix_ms,
            key,
            result: None,
            reply,
        }));
        loop {
            if let Ok(result) = answer.try_recv() {
                return result;
            }
            if queue.leading {
                queue = self
                    .turn
                    .wait(queue)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            // No write in flight: lead a batch of everything queued so far
            // (this caller's change among it, unless an earlier batch took it).
            queue.leading = true;
            let batch = std::mem::take(&mut queue.pending);
            drop(queue);
            self.commit(batch);
            queue = self.queue();
            queue.leading = false;
            self.turn.notify_all();
        }
    }

    /// Applies `batch`, writes it once, answers each caller.
    fn commit(&self, batch: Vec<Box<dyn Pending>>) {
        if batch.is_empty() {
            return;
        }
        let mut state = self.state();
        let before = state.snapshot();
        let now = self.clock.now_unix_ms();
        let mut applied: Vec<Box<dyn Pending>> = Vec::with_capacity(batch.len());
        for mut change in batch {
            if let Some(late_ms) = late_by(change.deadline(), now) {
                self.stats.refused_late.fetch_add(1, Ordering::Relaxed);
                change.answer(Some(IpamError::DeadlineExceeded { late_ms }));
                continue;
            }
            change.apply(&mut state);
            applied.push(change);
        }
        let changes = applied
            .iter()
            .filter_map(|c| c.effect())
            .filter(|e| **e != Effect::Unchanged)
            .count();
        let mut outcome = BatchOutcome {
            changes,
            endpoints_changed: false,
        };
        if outcome.changes == 0 {
            for change in applied {
                change.answer(None);
            }
            return;
        }
        if let Err(e) = state.flush() {
            self.stats.writes_failed.fetch_add(1, Ordering::Relaxed);
            state.roll_back(before);
            tracing::warn!(error = %e, changes = outcome.changes, "checkpoint write failed; the batch is rolled back");
            // Every change of the batch is undone, and so is what later
            // changes of it read (e.g. an idempotent ADD of an allocation
            // made earlier in the batch): all of them fail alike.
            for change in applied {
                let failed = change.effect().is_some().then(|| copy_error(&e));
                change.answer(failed);
            }
            return;
        }
        self.stats.writes_ok.fetch_add(1, Ordering::Relaxed);
        self.stats
            .changes
            .fetch_add(outcome.changes as u64, Ordering::Relaxed);
        self.take_back_late(&mut state, &mut applied);
        outcome.endpoints_changed = state.endpoints_differ(&before);
        (self.on_durable)(&state, outcome);
        drop(state);
        for change in applied {
            change.answer(None);
        }
    }

    /// Takes back, with one more write, what the batch created for callers
    /// whose deadline has passed (or is closer than [`ANSWER_MARGIN_MS`]), and
    /// answers those callers with `DeadlineExceeded`. An attachment another
    /// change of the batch answers for (e.g. a retried ADD that found the
    /// allocation) is left alone: that caller holds it now.
    fn take_back_late(&self, state: &mut NodeState, applied: &mut Vec<Box<dyn Pending>>) {
        let now = self.clock.now_unix_ms().saturating_add(ANSWER_MARGIN_MS);
        let late: Vec<usize> = applied
            .iter()
            .enumerate()
            .filter(|(_, c)| matches!(c.effect(), Some(Effect::Created(_))))
            .filter(|(_, c)| late_by(c.deadline(), now).is_some())
            .map(|(i, _)| i)
            .collect();
        if late.is_empty() {
            return;
        }
        let answered_for: BTreeSet<&AttachmentKey> = applied
            .iter()
            .enumerate()
            .filter(|(i, c)| !late.contains(i) && c.effect().is_some())
            .filter_map(|(_, c)| c.key())
            .collect();
        let undos: Vec<(usize, Undo)> = late
            .iter()
            .filter_map(|&i| match applied[i].effect() {
                Some(Effect::Created(u)) if !answered_for.contains(u.key()) => Some((i, u.clone())),
                _ => None,
            })
            .collect();
        let before = state.snapshot();
        for (_, undo) in &undos {
            state.undo(undo);
        }
        let written = if undos.is_empty() {
            Ok(())
        } else {
            state.flush()
        };
        match written {
            Ok(()) if undos.is_empty() => {}
            Ok(()) => {
                self.stats.writes_ok.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .undone_late
                    .fetch_add(undos.len() as u64, Ordering::Relaxed);
                tracing::info!(
                    undone = undos.len(),
                    "changes written after their callers' deadlines were taken back"
                );
            }
            Err(e) => {
                // What stays is released by the runtime's DEL or CNI GC.
                self.stats.writes_failed.fetch_add(1, Ordering::Relaxed);
                state.roll_back(before);
                tracing::warn!(error = %e, changes = undos.len(), "cannot take back changes made for callers that gave up; CNI GC will release them");
            }
        }
        // Answer the late callers (their answer says what happened), highest
        // index first so the indices stay valid.
        let mut late = late;
        late.sort_unstable_by(|a, b| b.cmp(a));
        for i in late {
            let change = applied.remove(i);
            let late_ms = change
                .deadline()
                .map_or(0, |d| self.clock.now_unix_ms().saturating_sub(d));
            change.answer(Some(IpamError::DeadlineExceeded { late_ms }));
        }
    }
}

/// How far `now` is past `deadline` (`None`: not past, or no deadline).
fn late_by(deadline: Option<u64>, now: u64) -> Option<u64> {
    deadline.filter(|d| now >= *d).map(|d| now - d)
}

/// The same write error for another caller of the batch (`io::Error` is not
/// `Clone`; the OS error code and message are what callers see).
fn copy_error(e: &IpamError) -> IpamError {
    match e {
        IpamError::Store(StoreError::Write { path, source }) => {
            IpamError::Store(StoreError::Write {
                path: path.clone(),
                source: source.raw_os_error().map_or_else(
                    || std::io::Error::new(source.kind(), source.to_string()),
                    std::io::Error::from_raw_os_error,
                ),
            })
        }
        other => IpamError::Inconsistent(other.to_string()),
    }
}
