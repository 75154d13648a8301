//! Drop events from the tracer's drop counters: the kernel counts netfilter
//! drops per source, kind and protocol (no event per packet), so while
//! someone follows, a thread reads the counters every [`INTERVAL`] and
//! publishes what rose since the last read, per pod.
//!
//! Insert races are published one by one from their own events; only other
//! drops become drop events here.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};

use super::{DropCount, DropKind};
use crate::{
    api::{
        follow::{matches_parts, tagged_line, EventHub, Followed},
        protocol::EventFilter,
    },
    endpoint::{PodRef, Registry},
    net::proto_name,
};

/// The cause a drop record is filtered by.
pub const CAUSE: &str = "netfilter_drop";

/// Netfilter drops other than insert races from one source, counted over
/// one interval of the drop watcher; a `drop` line of `follow`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropRecord {
    /// Wall-clock time the drops were seen, Unix milliseconds.
    pub time_unix_ms: u64,
    /// The pod that sent the dropped packets (empty for host traffic).
    pub pod: PodRef,
    /// Source address of the dropped packets.
    pub source: IpAddr,
    /// `tcp`, `udp`, ...
    pub proto: String,
    /// Packets dropped since the previous drop record of this source.
    pub packets: u64,
}

impl Followed for DropRecord {
    fn matches(&self, filter: &EventFilter) -> bool {
        matches_parts(
            filter,
            Some((&self.pod.namespace, &self.pod.pod)),
            None,
            CAUSE,
        )
    }

    fn to_line(&self) -> serde_json::Result<Vec<u8>> {
        tagged_line("drop", self)
    }
}

/// How often the counters are read while someone follows.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// How often the thread looks at its stop flag.
const TICK: Duration = Duration::from_millis(100);

/// The thread's name.
pub const THREAD: &str = "podnet-follow-drops";

/// Drop counts of other drops by (source, protocol), as last read.
#[derive(Debug, Default)]
pub struct DropDiff {
    last: Option<HashMap<(IpAddr, u8), u64>>,
}

impl DropDiff {
    /// Forgets the last reading: the next one only sets the baseline.
    pub fn reset(&mut self) {
        self.last = None;
    }

    /// What rose since the last reading, per source and protocol; nothing on
    /// the first reading. Counts of a pod that left move to the unspecified
    /// source (the tracer's unknown key) and are not new drops: what
    /// vanished from departed sources is taken off that source's rise.
    pub fn update(&mut self, drops: &[DropCount]) -> Vec<(IpAddr, u8, u64)> {
        let now: HashMap<(IpAddr, u8), u64> = drops
            .iter()
            .filter(|d| d.kind == DropKind::Other)
            .fold(HashMap::new(), |mut m, d| {
                *m.entry((d.source, d.proto)).or_default() += d.packets;
                m
            });
        let Some(last) = self.last.replace(now.clone()) else {
            return Vec::new();
        };
        let mut moved: HashMap<u8, u64> = HashMap::new();
        for ((source, proto), before) in &last {
            let after = now.get(&(*source, *proto)).copied().unwrap_or(0);
            if after < *before {
                *moved.entry(*proto).or_default() += before - after;
            }
        }
        let mut rises: Vec<(IpAddr, u8, u64)> = now
            .iter()
            .filter_map(|((source, proto), after)| {
                let before = last.get(&(*source, *proto)).copied().unwrap_or(0);
                let mut rise = after.saturating_sub(before);
                if source.is_unspecified() {
                    let folded = moved.entry(*proto).or_default();
                    let taken = rise.min(*folded);
                    rise -= taken;
                    *folded -= taken;
                }
                (rise > 0).then_some((*source, *proto, rise))
            })
            .collect();
        rises.sort_unstable();
        rises
    }
}

/// Reads the drop counters every [`INTERVAL`] while someone follows and
/// publishes each pod's new drops, until `stop` is set.
pub fn run(
    hub: &EventHub,
    registry: &Registry,
    read: impl Fn() -> Option<Vec<DropCount>>,
    stop: &AtomicBool,
) {
    let mut diff = DropDiff::default();
    let mut last = std::time::Instant::now();
    while !stop.load(Ordering::Relaxed) {
        // Short naps, so stopping the agent does not wait a whole interval.
        std::thread::sleep(TICK);
        if last.elapsed() < INTERVAL {
            continue;
        }
        last = std::time::Instant::now();
        if !hub.has_followers() {
            diff.reset();
            continue;
        }
        let Some(drops) = read() else {
            continue;
        };
        let now = crate::api::protocol::now_unix_ms();
        for (source, proto, packets) in diff.update(&drops) {
            hub.publish(|| DropRecord {
                time_unix_ms: now,
                pod: registry.pod_for(source),
                source,
                proto: proto_name(proto),
                packets,
            });
        }
    }
}

/// Starts [`run`] on its own thread.
pub fn spawn(
    hub: EventHub,
    registry: Registry,
    read: impl Fn() -> Option<Vec<DropCount>> + Send + 'static,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name(THREAD.into())
        .spawn(move || run(&hub, &registry, read, &stop))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(source: &str, kind: DropKind, packets: u64) -> DropCount {
        DropCount {
            source: source.parse().unwrap(),
            proto: 6,
            kind,
            packets,
        }
    }

    #[test]
    fn rises_of_other_drops_per_source() {
        let mut diff = DropDiff::default();
        assert_eq!(diff.update(&[count("10.0.1.2", DropKind::Other, 5)]), []);
        let rises = diff.update(&[
            count("10.0.1.2", DropKind::Other, 8),
            count("10.0.1.2", DropKind::InsertRace, 40),
            count("10.0.1.3", DropKind::Other, 2),
        ]);
        assert_eq!(
            rises,
            [
                ("10.0.1.2".parse().unwrap(), 6, 3),
                ("10.0.1.3".parse().unwrap(), 6, 2)
            ]
        );
        // Nothing new, nothing published.
        assert_eq!(
            diff.update(&[
                count("10.0.1.2", DropKind::Other, 8),
                count("10.0.1.3", DropKind::Other, 2),
            ]),
            []
        );
        diff.reset();
        assert_eq!(diff.update(&[count("10.0.1.2", DropKind::Other, 9)]), []);
    }

    #[test]
    fn a_departed_pods_counts_moving_to_the_unknown_source_are_not_new() {
        let mut diff = DropDiff::default();
        diff.update(&[
            count("10.0.1.2", DropKind::Other, 8),
            count("0.0.0.0", DropKind::Other, 1),
        ]);
        // 10.0.1.2 left: its 8 moved to the unknown key, which also saw 2 new.
        let rises = diff.update(&[count("0.0.0.0", DropKind::Other, 11)]);
        assert_eq!(rises, [("0.0.0.0".parse().unwrap(), 6, 2)]);
    }
}
