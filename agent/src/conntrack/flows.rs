//! Drops of DNS flows, handed to the DNS subsystem through [`FlowDrops`]:
//! insert races from the race event thread ([`DnsFlows::record_race`]), every
//! other drop from the `CT_FLOW_DROPS` ring buffer, read by its own thread
//! ([`spawn`]).

use std::{
    collections::HashMap,
    hash::BuildHasher,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use podnet_common::conntrack::{flow_drop_kind, FlowDrop};

use super::events::{DecodeError, Flow, RaceRecord, WinnerLookup};
use crate::{
    bpf::ring::RingReader,
    flowdrops::{DropCause, FlowDrops, FlowKey, RaceWinner, ReadMark},
    heartbeat,
};

/// The flow-drop thread's name (and its heartbeat's).
pub const FLOWS_THREAD: &str = "podnet-ct-flows";
/// Longest wait between two reads of the ring buffer.
const POLL: Duration = Duration::from_millis(100);

/// Where the race event thread puts the insert races of DNS flows.
#[derive(Clone)]
pub struct DnsFlows {
    drops: FlowDrops,
    ports: Arc<[u16]>,
    races: ReadMark,
}

impl DnsFlows {
    /// Records into `drops` the races of flows to or from one of `ports`.
    pub fn new(drops: &FlowDrops, ports: &[u16]) -> Self {
        Self {
            drops: drops.clone(),
            ports: ports.into(),
            races: drops.reader(),
        }
    }

    /// Records `race` (its drop at `at_ns`, `CLOCK_MONOTONIC`) when its flow
    /// is a DNS flow.
    pub fn record_race(&self, at_ns: u64, race: &RaceRecord) {
        let Some(key) = client_view(&race.flow, &self.ports) else {
            return;
        };
        let winner = match &race.winner {
            WinnerLookup::Found(w) => Some(RaceWinner {
                pod: w.pod.clone(),
                flow: w.flow.to_string(),
            }),
            _ => None,
        };
        self.drops
            .record(key, at_ns, DropCause::InsertRace { winner });
    }

    /// Every race before `mono_ns` has been read.
    pub fn races_read_until(&self, mono_ns: u64) {
        self.races.read_until(mono_ns);
    }
}

/// `flow` as its client sees it, when one of its ports is a DNS port: the
/// side on the DNS port is the server.
pub fn client_view(flow: &Flow, ports: &[u16]) -> Option<FlowKey> {
    if flow.proto != podnet_common::dns::proto::UDP && flow.proto != podnet_common::dns::proto::TCP
    {
        return None;
    }
    let (client, server) = if ports.contains(&flow.dst.port()) {
        (flow.src, flow.dst)
    } else if ports.contains(&flow.src.port()) {
        (flow.dst, flow.src)
    } else {
        return None;
    };
    Some(FlowKey {
        client,
        server,
        proto: flow.proto,
    })
}

/// Decodes one `CT_FLOW_DROPS` record.
pub fn decode(bytes: &[u8]) -> Result<FlowDrop, DecodeError> {
    let expected = std::mem::size_of::<FlowDrop>();
    if bytes.len() != expected {
        return Err(DecodeError::Size {
            got: bytes.len(),
            expected,
        });
    }
    // SAFETY: the length is exactly size_of::<FlowDrop>(), FlowDrop is
    // repr(C) plain old data (every bit pattern valid), and read_unaligned has
    // no alignment requirement.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<FlowDrop>()) })
}

/// The cause of one decoded drop, named with the running kernel's reasons.
pub fn cause_of<S: BuildHasher>(
    drop: &FlowDrop,
    reason_names: &HashMap<u32, String, S>,
) -> DropCause {
    let reason = match drop.kind {
        flow_drop_kind::NETFILTER => "NETFILTER_DROP".to_owned(),
        _ => reason_names
            .get(&drop.reason)
            .cloned()
            .unwrap_or_else(|| drop.reason.to_string()),
    };
    DropCause::Dropped { reason }
}

/// Starts the thread that reads `CT_FLOW_DROPS` into `drops` until `stop`.
pub fn spawn<S: BuildHasher + Send + 'static>(
    ring: RingBuf<MapData>,
    drops: FlowDrops,
    ports: Vec<u16>,
    reason_names: HashMap<u32, String, S>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<JoinHandle<()>> {
    let mark = drops.reader();
    std::thread::Builder::new()
        .name(FLOWS_THREAD.into())
        .spawn(move || {
            let heartbeat = heartbeat::registry().register(FLOWS_THREAD, heartbeat::SILENCE_LIMIT);
            let mut reader = RingReader::new(ring, POLL);
            while !stop.load(Ordering::Relaxed) && heartbeat.beat() {
                let began = crate::sys::monotonic_ns();
                reader.read(|item| on_record(item, &drops, &ports, &reason_names));
                mark.read_until(began);
            }
            if stop.load(Ordering::Relaxed) {
                heartbeat.retire();
            }
        })
}

fn on_record<S: BuildHasher>(
    item: &[u8],
    drops: &FlowDrops,
    ports: &[u16],
    names: &HashMap<u32, String, S>,
) {
    let decoded = decode(item).and_then(|d| Flow::from_tuple(&d.flow).map(|f| (d, f)));
    match decoded {
        Ok((drop, flow)) => {
            if let Some(key) = client_view(&flow, ports) {
                drops.record(key, drop.timestamp_ns, cause_of(&drop, names));
            }
        }
        Err(e) => tracing::debug!(error = %e, "skipping flow drop"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use podnet_common::conntrack::Tuple;
    use std::net::SocketAddr;

    fn flow(src: ([u8; 4], u16), dst: ([u8; 4], u16), proto: u8) -> Flow {
        Flow {
            src: SocketAddr::from(src),
            dst: SocketAddr::from(dst),
            proto,
        }
    }

    #[test]
    fn the_side_on_the_dns_port_is_the_server() {
        let query = flow(([10, 244, 1, 2], 40000), ([10, 96, 0, 10], 53), 17);
        let answer = flow(([10, 96, 0, 10], 53), ([10, 244, 1, 2], 40000), 17);
        let key = client_view(&query, &[53]).unwrap();
        assert_eq!(key.client, SocketAddr::from(([10, 244, 1, 2], 40000)));
        assert_eq!(client_view(&answer, &[53]), Some(key));
        assert_eq!(client_view(&query, &[5353]), None, "not a DNS port");
        let icmp = flow(([10, 244, 1, 2], 0), ([10, 96, 0, 10], 53), 1);
        assert_eq!(client_view(&icmp, &[53]), None);
    }

    #[test]
    fn names_the_reason_from_the_kernel_or_its_number() {
        let names = HashMap::from([(5, "IP_NOROUTE".to_owned())]);
        let mut drop = FlowDrop {
            reason: 5,
            kind: flow_drop_kind::OTHER,
            ..FlowDrop::default()
        };
        let reason = |c: DropCause| match c {
            DropCause::Dropped { reason } => reason,
            other @ DropCause::InsertRace { .. } => panic!("{other:?}"),
        };
        assert_eq!(reason(cause_of(&drop, &names)), "IP_NOROUTE");
        drop.reason = 77;
        assert_eq!(reason(cause_of(&drop, &names)), "77");
        drop.kind = flow_drop_kind::NETFILTER;
        assert_eq!(reason(cause_of(&drop, &names)), "NETFILTER_DROP");
    }

    #[test]
    fn decode_rejects_wrong_sizes_and_reads_a_record() {
        assert!(decode(&[0; 55]).is_err());
        let mut t = Tuple {
            proto: 17,
            family: 2,
            ..Tuple::default()
        };
        t.src_port = 40000u16.to_be();
        t.dst_port = 53u16.to_be();
        let drop = FlowDrop {
            timestamp_ns: 7,
            flow: t,
            reason: 2,
            kind: flow_drop_kind::OTHER,
            tracked: 1,
            _pad: [0; 2],
        };
        // SAFETY: FlowDrop is repr(C) plain old data; the slice covers it exactly.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&raw const drop).cast::<u8>(),
                std::mem::size_of::<FlowDrop>(),
            )
        };
        assert_eq!(decode(bytes).unwrap(), drop);
    }
}
