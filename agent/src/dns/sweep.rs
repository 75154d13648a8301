//! The timeout sweep: queries pending longer than `--dns-timeout` become
//! timeouts. The kernel cannot sweep its own LRU map, so user space walks it.
//!
//! Counting is exact: an entry counts as a timeout only if this sweep's
//! delete removes it. The kernel program deletes an entry before it counts
//! the answer, so each query ends as exactly one answer or one timeout. Counts
//! go into the pinned `DNS_TIMEOUTS` map (written by user space only), so they
//! survive agent restarts like every other count.

use std::time::Duration;

use aya::maps::{HashMap, MapData};
use podnet_common::{
    dns::{event_kind, DnsEvent, PeerKey, Pending, PendingKey},
    AddrKey,
};

/// What the sweep needs from the pending map and the timeout counts; a trait
/// so the sweep logic is tested without the kernel.
pub trait SweepMaps {
    /// Every pending entry (a copy; the map changes meanwhile).
    fn pending(&mut self) -> Vec<(PendingKey, Pending)>;
    /// Deletes one entry; false when it was already gone.
    fn delete(&mut self, key: &PendingKey) -> bool;
    /// Adds `n` to the timeout count of `peer`.
    fn add_timeouts(&mut self, peer: &PeerKey, n: u64);
    /// Adds `n` to the queries of `client` that left its pending share.
    fn add_expired(&mut self, client: &AddrKey, n: u64);
}

/// The real maps.
pub struct KernelMaps<'a> {
    /// `DNS_PENDING`.
    pub pending: &'a mut HashMap<MapData, PendingKey, Pending>,
    /// `DNS_TIMEOUTS`.
    pub timeouts: &'a mut HashMap<MapData, PeerKey, u64>,
    /// `DNS_CLIENT_EXPIRED`.
    pub expired: &'a mut HashMap<MapData, AddrKey, u64>,
}

impl SweepMaps for KernelMaps<'_> {
    fn pending(&mut self) -> Vec<(PendingKey, Pending)> {
        // Keys first, then values: an entry answered in between is skipped.
        let keys: Vec<PendingKey> = self.pending.keys().filter_map(Result::ok).collect();
        keys.into_iter()
            .filter_map(|k| self.pending.get(&k, 0).ok().map(|v| (k, v)))
            .collect()
    }

    fn delete(&mut self, key: &PendingKey) -> bool {
        self.pending.remove(key).is_ok()
    }

    fn add_timeouts(&mut self, peer: &PeerKey, n: u64) {
        let old = self.timeouts.get(peer, 0).unwrap_or(0);
        if let Err(e) = self.timeouts.insert(peer, old + n, 0) {
            tracing::warn!(error = %e, "recording DNS timeouts failed");
        }
    }

    fn add_expired(&mut self, client: &AddrKey, n: u64) {
        // User space is this map's only writer: read, add, write is exact.
        let old = self.expired.get(client, 0).unwrap_or(0);
        if let Err(e) = self.expired.insert(client, old + n, 0) {
            tracing::warn!(error = %e, "recording expired DNS queries failed");
        }
    }
}

/// Expires every entry older than `timeout` at monotonic time `now_ns`;
/// returns one event per timeout (kind [`event_kind::TIMEOUT`]) for the log.
pub fn sweep(maps: &mut impl SweepMaps, now_ns: u64, timeout: Duration) -> Vec<DnsEvent> {
    let timeout_ns = u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX);
    let mut events = Vec::new();
    for (key, value) in maps.pending() {
        let waited = now_ns.saturating_sub(value.start_ns);
        if waited < timeout_ns || !maps.delete(&key) {
            continue;
        }
        // Counted as the query was: its client and server as the program
        // folded them, and out of its client's pending share.
        maps.add_timeouts(&value.counted_peer(&key, 0), 1);
        maps.add_expired(&value.counted_client(&key), 1);
        events.push(DnsEvent {
            timestamp_ns: now_ns,
            latency_ns: waited,
            key,
            qtype: value.qtype,
            kind: event_kind::TIMEOUT,
            scope: value.scope,
            sends: value.sends,
            name_len: value.name_len,
            name: value.name,
            ..DnsEvent::default()
        });
    }
    events
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns()`.
pub use crate::sys::monotonic_ns;

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, HashMap as Map};

    #[derive(Default)]
    struct Fake {
        pending: Map<PendingKey, Pending>,
        timeouts: BTreeMap<PeerKey, u64>,
        expired: BTreeMap<AddrKey, u64>,
        /// Keys the "kernel" answers between the read and the delete.
        answered_meanwhile: Vec<PendingKey>,
    }

    impl SweepMaps for Fake {
        fn pending(&mut self) -> Vec<(PendingKey, Pending)> {
            let out = self.pending.iter().map(|(k, v)| (*k, *v)).collect();
            for k in &self.answered_meanwhile {
                self.pending.remove(k);
            }
            out
        }
        fn delete(&mut self, key: &PendingKey) -> bool {
            self.pending.remove(key).is_some()
        }
        fn add_timeouts(&mut self, peer: &PeerKey, n: u64) {
            *self.timeouts.entry(*peer).or_default() += n;
        }
        fn add_expired(&mut self, client: &AddrKey, n: u64) {
            *self.expired.entry(*client).or_default() += n;
        }
    }

    fn key(id: u16) -> PendingKey {
        PendingKey {
            id,
            family: 2,
            proto: 17,
            ..PendingKey::default()
        }
    }

    fn pending(start_ns: u64) -> Pending {
        Pending {
            start_ns,
            scope: 1,
            sends: 1,
            ..Pending::default()
        }
    }

    #[test]
    fn only_old_entries_time_out_and_each_once() {
        let mut f = Fake::default();
        f.pending.insert(key(1), pending(0));
        f.pending.insert(key(2), pending(4_000_000_000));
        f.pending.insert(key(3), pending(500));
        let events = sweep(&mut f, 5_000_000_500, Duration::from_secs(5));
        let mut ids: Vec<u16> = events.iter().map(|e| e.key.id).collect();
        ids.sort_unstable();
        assert_eq!(ids, vec![1, 3]);
        assert_eq!(f.timeouts.values().sum::<u64>(), 2);
        assert_eq!(f.pending.len(), 1);
        // A second sweep finds nothing new.
        assert!(sweep(&mut f, 5_000_000_600, Duration::from_secs(5)).is_empty());
        assert_eq!(f.timeouts.values().sum::<u64>(), 2);
    }

    #[test]
    fn an_entry_answered_meanwhile_is_not_a_timeout() {
        let mut f = Fake::default();
        f.pending.insert(key(1), pending(0));
        f.pending.insert(key(2), pending(0));
        f.answered_meanwhile.push(key(2));
        let events = sweep(&mut f, 10_000_000_000, Duration::from_secs(1));
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].key.id, 1);
        assert_eq!(events[0].kind, event_kind::TIMEOUT);
        assert_eq!(events[0].sends, 1, "the copies the client sent");
        assert_eq!(f.timeouts.values().sum::<u64>(), 1);
    }

    #[test]
    fn a_timeout_counts_as_its_query_did() {
        use podnet_common::dns::{client_key, pending_flags, OTHER_SERVER};
        let mut f = Fake::default();
        let mut spoofed = key(1);
        spoofed.client[..4].copy_from_slice(&[192, 0, 2, 9]);
        spoofed.server[..4].copy_from_slice(&[198, 51, 100, 1]);
        f.pending.insert(
            spoofed,
            Pending {
                flags: pending_flags::UNKNOWN_CLIENT | pending_flags::OTHER_SERVER,
                ..pending(0)
            },
        );
        let mut pod = key(2);
        pod.client[..4].copy_from_slice(&[10, 244, 1, 7]);
        f.pending.insert(pod, pending(0));
        sweep(&mut f, 10_000_000_000, Duration::from_secs(1));
        let unknown = client_key([0; 16], 2, 1);
        let mut pod_client = [0; 16];
        pod_client[..4].copy_from_slice(&[10, 244, 1, 7]);
        assert_eq!(
            f.expired,
            BTreeMap::from([(unknown, 1), (client_key(pod_client, 2, 1), 1)])
        );
        let folded = PeerKey {
            client: [0; 16],
            server: OTHER_SERVER,
            family: 2,
            scope: 1,
            code: 0,
        };
        assert_eq!(f.timeouts.get(&folded), Some(&1));
        assert_eq!(f.timeouts.len(), 2);
    }
}
