//! Recent drops of DNS flows on the node, by flow: the join between the
//! kernel's drop tracer and the DNS queries it lost.
//!
//! The conntrack subsystem records every insert race and every other drop of
//! a packet to or from a DNS port ([`FlowDrops::record`]); the DNS subsystem
//! asks, for a query that timed out or was sent again, whether a packet of its
//! flow was dropped while it was pending ([`FlowDrops::find`]). Both sides
//! name the flow as the client sees it: the conntrack entry's original
//! direction (before NAT), which is the query's source and destination on the
//! pod's interface.
//!
//! Drops reach user space through ring buffers that their readers drain at
//! least every 100 ms; each reader marks how far it has read
//! ([`ReadMark::read_until`]), so a query's cause is decided only once every
//! drop that could explain it has been read ([`FlowDrops::settled`]).

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, PoisonError,
    },
};

use serde::{Deserialize, Serialize};

use crate::endpoint::PodRef;

/// Flows remembered; the oldest drops are forgotten first.
pub const CAPACITY: usize = 8_192;
/// Drops remembered per flow (the newest).
const PER_FLOW: usize = 4;
/// Drops older than this are forgotten (no query waits longer).
pub const KEEP_NS: u64 = 120 * 1_000_000_000;

/// A flow as its client sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    /// The client's address and port.
    pub client: SocketAddr,
    /// The server's address and port.
    pub server: SocketAddr,
    /// IP protocol number.
    pub proto: u8,
}

/// The flow that held the contested port when a packet lost its insert race.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaceWinner {
    /// The pod that owns the winning flow's source address.
    pub pod: PodRef,
    /// The winning flow: `proto src -> dst`, original direction.
    pub flow: String,
}

/// Why a packet of a flow was dropped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DropCause {
    /// The packet's conntrack entry lost its insert race.
    InsertRace {
        /// The winner, when the conntrack table still held it.
        winner: Option<RaceWinner>,
    },
    /// Any other drop, with the kernel's `skb_drop_reason` name.
    Dropped {
        /// E.g. `NETFILTER_DROP`, `IP_NOROUTE`.
        reason: String,
    },
}

/// One remembered drop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowDropRecord {
    /// `CLOCK_MONOTONIC` nanoseconds of the drop.
    pub at_ns: u64,
    /// Why.
    pub cause: DropCause,
}

/// How far one drop reader has read: every drop before `read_until` (a
/// `CLOCK_MONOTONIC` time) is recorded.
#[derive(Clone, Debug, Default)]
pub struct ReadMark(Arc<AtomicU64>);

impl ReadMark {
    /// Marks every drop before `mono_ns` as read.
    pub fn read_until(&self, mono_ns: u64) {
        self.0.fetch_max(mono_ns, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct Inner {
    by_flow: HashMap<FlowKey, VecDeque<FlowDropRecord>>,
    /// Flows in the order of their newest drop (may hold stale duplicates).
    order: VecDeque<(u64, FlowKey)>,
}

/// The recent drops, shared by clones.
#[derive(Clone, Default)]
pub struct FlowDrops {
    inner: Arc<Mutex<Inner>>,
    marks: Arc<Mutex<Vec<ReadMark>>>,
}

impl FlowDrops {
    /// An empty record.
    pub fn new() -> Self {
        Self::default()
    }

    /// A mark for one more reader; until it first reads, nothing is settled.
    pub fn reader(&self) -> ReadMark {
        let mark = ReadMark::default();
        self.marks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(mark.clone());
        mark
    }

    /// Whether every reader has read past `mono_ns` (true without readers:
    /// then no drop will ever be recorded).
    pub fn settled(&self, mono_ns: u64) -> bool {
        self.marks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .all(|m| m.0.load(Ordering::Relaxed) >= mono_ns)
    }

    /// Records a drop of `flow` at `at_ns`.
    pub fn record(&self, flow: FlowKey, at_ns: u64, cause: DropCause) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let drops = inner.by_flow.entry(flow).or_default();
        if drops.len() == PER_FLOW {
            drops.pop_front();
        }
        drops.push_back(FlowDropRecord { at_ns, cause });
        inner.order.push_back((at_ns, flow));
        let horizon = at_ns.saturating_sub(KEEP_NS);
        while inner.by_flow.len() > CAPACITY
            || inner.order.front().is_some_and(|(t, _)| *t < horizon)
        {
            let Some((_, oldest)) = inner.order.pop_front() else {
                break;
            };
            let stale = inner
                .by_flow
                .get(&oldest)
                .and_then(|d| d.back())
                .is_none_or(|newest| newest.at_ns < horizon || inner.by_flow.len() > CAPACITY);
            if stale {
                inner.by_flow.remove(&oldest);
            }
        }
        // Stale duplicates of live flows: keep the order queue bounded too.
        if inner.order.len() > 4 * CAPACITY {
            let Inner { by_flow, order } = &mut *inner;
            order.retain(|(t, k)| {
                by_flow
                    .get(k)
                    .and_then(|d| d.back())
                    .is_some_and(|newest| newest.at_ns == *t)
            });
        }
    }

    /// The newest drop of `flow` between `from_ns` and `until_ns`.
    pub fn find(&self, flow: &FlowKey, from_ns: u64, until_ns: u64) -> Option<FlowDropRecord> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner
            .by_flow
            .get(flow)?
            .iter()
            .rev()
            .find(|d| d.at_ns >= from_ns && d.at_ns <= until_ns)
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl FlowDrops {
        fn len(&self) -> usize {
            self.inner
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .by_flow
                .len()
        }
    }

    fn flow(port: u16) -> FlowKey {
        FlowKey {
            client: SocketAddr::from(([10, 244, 1, 2], port)),
            server: SocketAddr::from(([10, 96, 0, 10], 53)),
            proto: 17,
        }
    }

    fn dropped(reason: &str) -> DropCause {
        DropCause::Dropped {
            reason: reason.into(),
        }
    }

    #[test]
    fn finds_the_newest_drop_inside_the_window_only() {
        let drops = FlowDrops::new();
        drops.record(flow(1), 100, dropped("A"));
        drops.record(flow(1), 200, dropped("B"));
        drops.record(flow(2), 150, dropped("C"));
        assert_eq!(drops.find(&flow(1), 0, 1_000).unwrap().cause, dropped("B"));
        assert_eq!(drops.find(&flow(1), 0, 199).unwrap().cause, dropped("A"));
        assert_eq!(drops.find(&flow(1), 201, 1_000), None);
        assert_eq!(drops.find(&flow(3), 0, 1_000), None);
    }

    #[test]
    fn keeps_four_drops_per_flow_and_forgets_old_flows() {
        let drops = FlowDrops::new();
        for t in 1..=6 {
            drops.record(flow(1), t, dropped(&t.to_string()));
        }
        assert_eq!(drops.find(&flow(1), 0, 2), None, "the oldest two fell off");
        assert_eq!(drops.find(&flow(1), 0, 3).unwrap().cause, dropped("3"));
        // A drop two minutes later forgets the flow whose newest drop is older.
        drops.record(flow(2), KEEP_NS + 10, dropped("late"));
        assert_eq!(drops.len(), 1);
        assert_eq!(drops.find(&flow(1), 0, u64::MAX), None);
    }

    #[test]
    fn holds_at_most_its_capacity_of_flows() {
        let drops = FlowDrops::new();
        let key = |i: u32| FlowKey {
            client: SocketAddr::from((std::net::Ipv4Addr::from(0x0a00_0000 + i), 1000)),
            ..flow(1)
        };
        let flows = u32::try_from(CAPACITY + 100).unwrap();
        for i in 0..flows {
            drops.record(key(i), u64::from(i), dropped("X"));
        }
        let (first, last) = (key(0), key(flows - 1));
        assert_eq!(drops.len(), CAPACITY);
        // The oldest went first.
        assert_eq!(drops.find(&first, 0, u64::MAX), None);
        assert!(drops.find(&last, 0, u64::MAX).is_some());
    }

    #[test]
    fn settled_waits_for_every_reader() {
        let drops = FlowDrops::new();
        assert!(drops.settled(50), "no reader: nothing will come");
        let races = drops.reader();
        let others = drops.reader();
        races.read_until(100);
        assert!(!drops.settled(50));
        others.read_until(60);
        assert!(drops.settled(50));
        assert!(!drops.settled(70));
    }
}
