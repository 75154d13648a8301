//! Race events from the kernel: decoding, and enrichment into [`RaceRecord`]s
//! (losing pod, winning flow and pod).

use std::{
    collections::HashMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use podnet_common::conntrack::{RaceEvent, Tuple};
use serde::{Deserialize, Serialize};

use super::{
    ctnetlink::{ConntrackTable, FlowTuple},
    kernel_addr, proto_name,
};
use crate::endpoint::{PodRef, Registry};

/// How long a winner lookup result is reused for races on the same reply
/// tuple. At 100k races/s on one contested port this keeps ctnetlink traffic
/// at one request per tuple per window.
pub const WINNER_CACHE_TTL: Duration = Duration::from_secs(1);
/// Most reply tuples remembered by the winner cache.
pub const WINNER_CACHE_CAPACITY: usize = 4096;

/// Errors decoding a ring buffer record.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The record does not have the size of a [`RaceEvent`].
    #[error("race event of {got} bytes, expected {expected}")]
    Size {
        /// Bytes received.
        got: usize,
        /// Bytes expected.
        expected: usize,
    },
    /// A tuple has an address family other than IPv4 or IPv6.
    #[error("race event with unknown address family {0}")]
    Family(u8),
}

/// Decodes one ring buffer record.
pub fn decode(bytes: &[u8]) -> Result<RaceEvent, DecodeError> {
    let expected = std::mem::size_of::<RaceEvent>();
    if bytes.len() != expected {
        return Err(DecodeError::Size {
            got: bytes.len(),
            expected,
        });
    }
    // SAFETY: the length is exactly size_of::<RaceEvent>(), RaceEvent is
    // repr(C) plain old data (every bit pattern valid), and read_unaligned has
    // no alignment requirement.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<RaceEvent>()) })
}

/// One direction of a flow, as user space shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Flow {
    /// Source address and port.
    pub src: SocketAddr,
    /// Destination address and port.
    pub dst: SocketAddr,
    /// IP protocol number.
    pub proto: u8,
}

impl Flow {
    /// Converts a kernel tuple (ports in network order).
    pub fn from_tuple(t: &Tuple) -> Result<Self, DecodeError> {
        let src = kernel_addr(&t.src_addr, t.family).ok_or(DecodeError::Family(t.family))?;
        let dst = kernel_addr(&t.dst_addr, t.family).ok_or(DecodeError::Family(t.family))?;
        Ok(Self {
            src: SocketAddr::new(src, u16::from_be(t.src_port)),
            dst: SocketAddr::new(dst, u16::from_be(t.dst_port)),
            proto: t.proto,
        })
    }

    /// The same flow as a ctnetlink tuple.
    pub fn to_ct_tuple(self) -> FlowTuple {
        FlowTuple {
            src: self.src.ip(),
            dst: self.dst.ip(),
            src_port: self.src.port(),
            dst_port: self.dst.port(),
            proto: self.proto,
        }
    }

    /// The flow read back from a ctnetlink tuple.
    pub fn from_ct_tuple(t: &FlowTuple) -> Self {
        Self {
            src: SocketAddr::new(t.src, t.src_port),
            dst: SocketAddr::new(t.dst, t.dst_port),
            proto: t.proto,
        }
    }
}

impl std::fmt::Display for Flow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} -> {}", proto_name(self.proto), self.src, self.dst)
    }
}

/// The entry that held the contested reply tuple when the race was seen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Winner {
    /// The pod that owns the winning flow's source address.
    pub pod: PodRef,
    /// The winning flow's original direction.
    pub flow: Flow,
}

/// Outcome of the winner lookup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum WinnerLookup {
    /// The winning entry was found.
    Found(Winner),
    /// No entry holds the reply tuple any more (it expired or was deleted).
    Gone,
    /// The lookup failed.
    Failed {
        /// Why.
        error: String,
    },
}

/// One insert race, enriched for people.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaceRecord {
    /// Wall-clock time of the drop, milliseconds since the Unix epoch.
    pub time_unix_ms: u64,
    /// `tcp`, `udp`, ...
    pub proto: String,
    /// The pod whose packet was dropped.
    pub loser: PodRef,
    /// The losing flow (original direction, before NAT).
    pub flow: Flow,
    /// Where the losing flow was going.
    pub destination: SocketAddr,
    /// The SNAT address and port both flows were given.
    pub snat: SocketAddr,
    /// The flow that holds the port.
    pub winner: WinnerLookup,
}

/// The cause a race record is filtered by.
pub const CAUSE: &str = "insert_race";

impl crate::api::follow::Followed for RaceRecord {
    /// The loser's pod, the destination as the server, cause `insert_race`.
    fn matches(&self, filter: &crate::api::protocol::EventFilter) -> bool {
        crate::api::follow::matches_parts(
            filter,
            Some((&self.loser.namespace, &self.loser.pod)),
            Some(self.destination),
            CAUSE,
        )
    }

    fn to_line(&self) -> serde_json::Result<Vec<u8>> {
        crate::api::follow::tagged_line("race", self)
    }
}

/// Turns kernel race events into [`RaceRecord`]s, looking up the winner
/// through a [`ConntrackTable`] and pods through the endpoint [`Registry`].
pub struct Enricher<T> {
    registry: Registry,
    table: T,
    cache: HashMap<Tuple, (Instant, WinnerLookup)>,
    clock_offset_ns: i128,
}

impl<T: ConntrackTable> Enricher<T> {
    /// A new enricher.
    pub fn new(registry: Registry, table: T) -> Self {
        Self {
            registry,
            table,
            cache: HashMap::new(),
            clock_offset_ns: realtime_minus_monotonic_ns(),
        }
    }

    /// Enriches one event.
    pub fn enrich(&mut self, event: &RaceEvent) -> Result<RaceRecord, DecodeError> {
        let original = Flow::from_tuple(&event.original)?;
        let reply = Flow::from_tuple(&event.reply)?;
        let time_ns = i128::from(event.timestamp_ns) + self.clock_offset_ns;
        let time_unix_ms = u64::try_from(time_ns / 1_000_000).unwrap_or(0);
        let winner = self.winner(&event.reply, reply, time_unix_ms);
        Ok(RaceRecord {
            time_unix_ms,
            proto: proto_name(original.proto),
            // The pod that held the address when the packet was dropped, not
            // the one that may hold it now.
            loser: self.registry.pod_at(original.src.ip(), time_unix_ms),
            flow: original,
            destination: original.dst,
            snat: reply.dst,
            winner,
        })
    }

    fn winner(&mut self, key: &Tuple, reply: Flow, time_unix_ms: u64) -> WinnerLookup {
        let now = Instant::now();
        if let Some((at, found)) = self.cache.get(key) {
            if now.duration_since(*at) < WINNER_CACHE_TTL {
                return found.clone();
            }
        }
        let found = match self.table.get_by_reply(&reply.to_ct_tuple()) {
            Ok(Some(entry)) => {
                let flow = Flow::from_ct_tuple(&entry.original);
                WinnerLookup::Found(Winner {
                    pod: self.registry.pod_at(flow.src.ip(), time_unix_ms),
                    flow,
                })
            }
            Ok(None) => WinnerLookup::Gone,
            Err(e) => WinnerLookup::Failed {
                error: e.to_string(),
            },
        };
        if self.cache.len() >= WINNER_CACHE_CAPACITY {
            self.cache
                .retain(|_, (at, _)| now.duration_since(*at) < WINNER_CACHE_TTL);
            if self.cache.len() >= WINNER_CACHE_CAPACITY {
                self.cache.clear();
            }
        }
        self.cache.insert(*key, (now, found.clone()));
        found
    }
}

/// `CLOCK_REALTIME - CLOCK_MONOTONIC` in ns: converts `bpf_ktime_get_ns()`.
fn realtime_minus_monotonic_ns() -> i128 {
    fn now(clock: libc::clockid_t) -> i128 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: ts is a valid, writable timespec; both clocks always exist.
        unsafe { libc::clock_gettime(clock, &raw mut ts) };
        i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
    }
    now(libc::CLOCK_REALTIME) - now(libc::CLOCK_MONOTONIC)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conntrack::ctnetlink::{ConntrackEntry, CtnetlinkError};
    use crate::endpoint::{Endpoint, Source};
    use podnet_common::family;

    fn v4(a: [u8; 4]) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..4].copy_from_slice(&a);
        out
    }

    fn tuple(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Tuple {
        Tuple {
            src_addr: v4(src),
            dst_addr: v4(dst),
            src_port: sport.to_be(),
            dst_port: dport.to_be(),
            family: family::INET,
            proto: 17,
            _pad: [0; 2],
        }
    }

    /// A race of pod B (10.0.2.2:5001 → 10.98.0.2:7000) `SNATed` to 10.98.0.1:40000.
    fn race() -> RaceEvent {
        RaceEvent {
            timestamp_ns: 1,
            ct_status: 0x180,
            original: tuple([10, 0, 2, 2], 5001, [10, 98, 0, 2], 7000),
            reply: tuple([10, 98, 0, 2], 7000, [10, 98, 0, 1], 40000),
            netns: 4_026_531_840,
            cpu: 1,
        }
    }

    struct Table {
        calls: usize,
        answer: Option<ConntrackEntry>,
    }

    impl ConntrackTable for Table {
        fn get_by_reply(
            &mut self,
            reply: &FlowTuple,
        ) -> Result<Option<ConntrackEntry>, CtnetlinkError> {
            self.calls += 1;
            assert_eq!(reply.src_port, 7000);
            assert_eq!(reply.dst_port, 40000);
            Ok(self.answer.clone())
        }
    }

    fn registry() -> Registry {
        let r = Registry::new();
        let ep = |pod: &str, ip: &str| Endpoint {
            namespace: "shop".into(),
            pod: pod.into(),
            ips: vec![ip.parse().unwrap()],
            interface: None,
            container_id: None,
            if_name: None,
        };
        r.replace_source(Source::File, vec![ep("a", "10.0.1.2"), ep("b", "10.0.2.2")]);
        r
    }

    #[test]
    fn decode_rejects_wrong_sizes() {
        assert_eq!(
            decode(&[0u8; 10]),
            Err(DecodeError::Size {
                got: 10,
                expected: 104
            })
        );
        let ev = race();
        // SAFETY: RaceEvent is repr(C) POD; viewing it as bytes is sound.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&raw const ev).cast::<u8>(),
                std::mem::size_of::<RaceEvent>(),
            )
        };
        assert_eq!(decode(bytes), Ok(ev));
    }

    #[test]
    fn names_loser_winner_and_snat_port() {
        let winner_flow = FlowTuple {
            src: "10.0.1.2".parse().unwrap(),
            dst: "10.98.0.2".parse().unwrap(),
            src_port: 5000,
            dst_port: 7000,
            proto: 17,
        };
        let table = Table {
            calls: 0,
            answer: Some(ConntrackEntry {
                original: winner_flow.clone(),
                reply: FlowTuple {
                    src: "10.98.0.2".parse().unwrap(),
                    dst: "10.98.0.1".parse().unwrap(),
                    src_port: 7000,
                    dst_port: 40000,
                    proto: 17,
                },
                status: 0x18e,
                id: Some(7),
                timeout_secs: Some(30),
                mark: None,
            }),
        };
        let mut e = Enricher::new(registry(), table);
        let rec = e.enrich(&race()).unwrap();
        assert_eq!(rec.loser.to_string(), "shop/b");
        assert_eq!(rec.destination.to_string(), "10.98.0.2:7000");
        assert_eq!(rec.snat.to_string(), "10.98.0.1:40000");
        assert_eq!(rec.proto, "udp");
        let WinnerLookup::Found(w) = &rec.winner else {
            panic!("{:?}", rec.winner)
        };
        assert_eq!(w.pod.to_string(), "shop/a");
        assert_eq!(w.flow.src.to_string(), "10.0.1.2:5000");
        // A second race on the same reply tuple is served from the cache.
        e.enrich(&race()).unwrap();
        assert_eq!(e.table.calls, 1);
    }

    #[test]
    fn a_race_names_the_pod_that_held_the_address_then_not_its_successor() {
        let table = Table {
            calls: 0,
            answer: None,
        };
        let r = Registry::new();
        let mut e = Enricher::new(r.clone(), table);
        // The race's wall-clock time, as the enricher computes it.
        let at_ms =
            u64::try_from((i128::from(race().timestamp_ns) + e.clock_offset_ns) / 1_000_000)
                .unwrap();
        let ep = |pod: &str| Endpoint {
            namespace: "shop".into(),
            pod: pod.into(),
            ips: vec!["10.0.2.2".parse().unwrap()],
            interface: None,
            container_id: None,
            if_name: None,
        };
        r.replace_source_at(Source::File, vec![ep("first")], at_ms - 10_000);
        r.replace_source_at(Source::File, vec![], at_ms + 1_000);
        r.replace_source_at(Source::File, vec![ep("successor")], at_ms + 2_000);
        assert_eq!(&*r.pod_for("10.0.2.2".parse().unwrap()).pod, "successor");
        let rec = e.enrich(&race()).unwrap();
        assert_eq!(rec.time_unix_ms, at_ms);
        assert_eq!(rec.loser.to_string(), "shop/first");
        // The same race one second after the first pod left: nobody held it.
        let mut later = race();
        later.timestamp_ns += 1_500_000_000;
        assert!(e.enrich(&later).unwrap().loser.is_host());
    }

    #[test]
    fn unknown_family_is_an_error_not_a_panic() {
        let mut ev = race();
        ev.original.family = 7;
        let mut e = Enricher::new(
            registry(),
            Table {
                calls: 0,
                answer: None,
            },
        );
        assert_eq!(e.enrich(&ev), Err(DecodeError::Family(7)));
    }
}
