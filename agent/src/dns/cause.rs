//! Why a DNS query failed: each query that timed out, was sent again, or was
//! answered slowly gets a [`Cause`], from the drops the kernel saw of its
//! flow while it was pending ([`FlowDrops`]), and the failures are counted per
//! client, server and cause ([`FailureCounts`], `podnet_dns_failures_total`).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
    sync::{Mutex, PoisonError},
};

use podnet_common::dns::{event_kind, DnsEvent};
use serde::{Deserialize, Serialize};

use super::decode::endpoints_of;
use crate::flowdrops::{DropCause, FlowDrops, FlowKey, RaceWinner};

/// Why a query failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// A copy of the query (or its answer) lost its conntrack insert race.
    InsertRace,
    /// A copy of the query (or its answer) was dropped on the node for
    /// another reason (`drop_reason`).
    Dropped,
    /// No answer came and nothing of the flow was dropped on the node: the
    /// query was lost beyond it, or the server did not answer.
    Unanswered,
    /// The answer came after the client had already sent the query again,
    /// and nothing was dropped on the node.
    Late,
    /// Answered over the slow threshold, sent once, nothing dropped.
    Slow,
}

impl Cause {
    /// The `cause` label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::InsertRace => "insert_race",
            Self::Dropped => "dropped",
            Self::Unanswered => "unanswered",
            Self::Late => "late",
            Self::Slow => "slow",
        }
    }
}

/// A query's cause with the drop behind it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnosis {
    /// The cause.
    pub cause: Cause,
    /// The kernel's `skb_drop_reason` for [`Cause::Dropped`].
    pub drop_reason: Option<String>,
    /// The flow that held the port, for [`Cause::InsertRace`].
    pub winner: Option<RaceWinner>,
}

/// Whether `event` is a failure: it timed out or the client sent it more
/// than once. A failure counts in `podnet_dns_failures_total`, and its cause
/// depends on the drops of its flow, so it is decided once every drop up to
/// the event has been read.
pub fn is_failure(event: &DnsEvent) -> bool {
    matches!(event.kind, event_kind::TIMEOUT | event_kind::RETRIED)
}

/// The cause of `event`; `None` for answers that are only errors (SERVFAIL,
/// NXDOMAIN, REFUSED answered once in time).
pub fn diagnose(event: &DnsEvent, drops: &FlowDrops) -> Option<Diagnosis> {
    let quiet = |cause| Diagnosis {
        cause,
        drop_reason: None,
        winner: None,
    };
    let fallback = match event.kind {
        event_kind::TIMEOUT => Cause::Unanswered,
        event_kind::RETRIED => Cause::Late,
        event_kind::SLOW => return Some(quiet(Cause::Slow)),
        _ => return None,
    };
    let Ok((client, server)) = endpoints_of(&event.key) else {
        return Some(quiet(fallback));
    };
    let flow = FlowKey {
        client,
        server,
        proto: event.key.proto,
    };
    let start = event.timestamp_ns.saturating_sub(event.latency_ns);
    let Some(drop) = drops.find(&flow, start, event.timestamp_ns) else {
        return Some(quiet(fallback));
    };
    Some(match drop.cause {
        DropCause::InsertRace { winner } => Diagnosis {
            cause: Cause::InsertRace,
            drop_reason: None,
            winner,
        },
        DropCause::Dropped { reason } => Diagnosis {
            cause: Cause::Dropped,
            drop_reason: Some(reason),
            winner: None,
        },
    })
}

/// Keys of [`FailureCounts`] at most; beyond, failures count under the
/// unspecified client and the `other` server.
pub const FAILURE_KEYS: usize = 16_384;
/// Servers one client's failures name; further ones count as `other`.
#[allow(clippy::cast_possible_truncation)] // 16
pub const SERVERS_PER_CLIENT: usize = podnet_common::dns::SERVERS_PER_CLIENT as usize;
/// The `other` server, as the statistics maps fold it (rendered `other`).
pub const OTHER_SERVER: IpAddr = IpAddr::V4(Ipv4Addr::BROADCAST);
/// The client that departed and folded clients count under (the host's series).
pub const NO_CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::UNSPECIFIED);

/// `(client, server, cause)` → failed queries.
pub type FailureKey = (IpAddr, IpAddr, Cause);

/// Failed queries per client address, server and cause, in memory (a
/// restart starts them at zero, which `rate()` takes as a reset). Bounded:
/// [`SERVERS_PER_CLIENT`] per client, [`FAILURE_KEYS`] in all, and clients
/// that left fold into [`NO_CLIENT`].
#[derive(Debug, Default)]
pub struct FailureCounts {
    counts: Mutex<BTreeMap<FailureKey, u64>>,
}

impl FailureCounts {
    /// Counts one failure.
    pub fn add(&self, client: IpAddr, server: IpAddr, cause: Cause) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let mut key = (client, server, cause);
        if !counts.contains_key(&key) {
            let servers: BTreeSet<IpAddr> = counts
                .range((client, IpAddr::V4(Ipv4Addr::UNSPECIFIED), Cause::InsertRace)..)
                .take_while(|((c, _, _), _)| *c == client)
                .map(|((_, s, _), _)| *s)
                .collect();
            if !servers.contains(&server) && servers.len() >= SERVERS_PER_CLIENT {
                key.1 = OTHER_SERVER;
            }
            if !counts.contains_key(&key) && counts.len() >= FAILURE_KEYS {
                key = (NO_CLIENT, OTHER_SERVER, cause);
            }
        }
        *counts.entry(key).or_default() += 1;
    }

    /// Moves the counts of clients not in `live` to [`NO_CLIENT`]: no total
    /// goes back, and the keys follow the pods on the node.
    pub fn fold_departed(&self, live: &BTreeSet<IpAddr>) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let gone: Vec<FailureKey> = counts
            .keys()
            .filter(|(c, _, _)| *c != NO_CLIENT && !live.contains(c))
            .copied()
            .collect();
        for key in gone {
            if let Some(n) = counts.remove(&key) {
                *counts.entry((NO_CLIENT, OTHER_SERVER, key.2)).or_default() += n;
            }
        }
    }

    /// Every count.
    pub fn snapshot(&self) -> BTreeMap<FailureKey, u64> {
        self.counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use podnet_common::dns::PendingKey;
    use std::net::SocketAddr;

    const SECOND: u64 = 1_000_000_000;

    fn event(kind: u8, at_s: u64, latency_s: u64) -> DnsEvent {
        let mut key = PendingKey {
            client_port: 40000,
            server_port: 53,
            family: 2,
            proto: 17,
            ..PendingKey::default()
        };
        key.client[..4].copy_from_slice(&[10, 244, 1, 2]);
        key.server[..4].copy_from_slice(&[10, 96, 0, 10]);
        DnsEvent {
            timestamp_ns: at_s * SECOND,
            latency_ns: latency_s * SECOND,
            key,
            kind,
            ..DnsEvent::default()
        }
    }

    fn flow() -> FlowKey {
        FlowKey {
            client: SocketAddr::from(([10, 244, 1, 2], 40000)),
            server: SocketAddr::from(([10, 96, 0, 10], 53)),
            proto: 17,
        }
    }

    #[test]
    fn a_drop_while_pending_is_the_cause_else_the_outcome_is() {
        let drops = FlowDrops::new();
        let timeout = event(event_kind::TIMEOUT, 20, 5);
        assert_eq!(diagnose(&timeout, &drops).unwrap().cause, Cause::Unanswered);
        // A drop before the query was sent explains nothing.
        drops.record(
            flow(),
            14 * SECOND,
            DropCause::Dropped {
                reason: "NETFILTER_DROP".into(),
            },
        );
        assert_eq!(diagnose(&timeout, &drops).unwrap().cause, Cause::Unanswered);
        drops.record(
            flow(),
            16 * SECOND,
            DropCause::Dropped {
                reason: "IP_NOROUTE".into(),
            },
        );
        let d = diagnose(&timeout, &drops).unwrap();
        assert_eq!(d.cause, Cause::Dropped);
        assert_eq!(d.drop_reason.as_deref(), Some("IP_NOROUTE"));
        let retried = event(event_kind::RETRIED, 40, 2);
        assert_eq!(diagnose(&retried, &drops).unwrap().cause, Cause::Late);
        drops.record(
            flow(),
            38 * SECOND + 1,
            DropCause::InsertRace { winner: None },
        );
        assert_eq!(diagnose(&retried, &drops).unwrap().cause, Cause::InsertRace);
        assert_eq!(
            diagnose(&event(event_kind::SLOW, 40, 2), &drops)
                .unwrap()
                .cause,
            Cause::Slow
        );
        assert_eq!(diagnose(&event(event_kind::ERROR, 40, 0), &drops), None);
    }

    #[test]
    fn counts_are_bounded_per_client_and_fold_when_clients_leave() {
        let counts = FailureCounts::default();
        let client = IpAddr::from([10, 244, 1, 2]);
        for i in 0..20u8 {
            counts.add(client, IpAddr::from([192, 0, 2, i]), Cause::Unanswered);
        }
        counts.add(client, IpAddr::from([192, 0, 2, 0]), Cause::Late);
        let snap = counts.snapshot();
        assert_eq!(
            snap.get(&(client, OTHER_SERVER, Cause::Unanswered)),
            Some(&4)
        );
        assert_eq!(snap.len(), 18, "16 servers, other, one late");
        counts.fold_departed(&BTreeSet::new());
        let snap = counts.snapshot();
        assert_eq!(
            snap,
            BTreeMap::from([
                ((NO_CLIENT, OTHER_SERVER, Cause::Unanswered), 20),
                ((NO_CLIENT, OTHER_SERVER, Cause::Late), 1),
            ])
        );
    }
}
