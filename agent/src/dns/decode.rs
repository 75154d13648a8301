//! Decoding what the kernel programs send: ring buffer records into
//! [`QueryRecord`]s, and wire-format names into dotted text.
//!
//! Everything here handles untrusted bytes (the names come from pods' packets)
//! and never panics: a bad record is an error, a strange name is escaped.

use std::{borrow::Cow, fmt::Write as _, net::SocketAddr};

use podnet_common::dns::{event_kind, proto, DnsEvent, PendingKey, NAME_BUF_LEN};
use serde::{Deserialize, Serialize};

use super::{
    cause::{Cause, Diagnosis},
    qtype_name, rcode_name,
};
use crate::{
    endpoint::{PodRef, Registry},
    flowdrops::RaceWinner,
    net::kernel_addr,
};

/// Errors decoding a ring buffer record.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The record does not have the size of a [`DnsEvent`].
    #[error("DNS event of {got} bytes, expected {expected}")]
    Size {
        /// Bytes received.
        got: usize,
        /// Bytes expected.
        expected: usize,
    },
    /// The key has an address family other than IPv4 or IPv6.
    #[error("DNS event with unknown address family {0}")]
    Family(u8),
    /// The event kind is unknown.
    #[error("DNS event of unknown kind {0}")]
    Kind(u8),
}

/// Decodes one ring buffer record.
pub fn decode(bytes: &[u8]) -> Result<DnsEvent, DecodeError> {
    let expected = std::mem::size_of::<DnsEvent>();
    if bytes.len() != expected {
        return Err(DecodeError::Size {
            got: bytes.len(),
            expected,
        });
    }
    // SAFETY: the length is exactly size_of::<DnsEvent>(), DnsEvent is
    // repr(C) plain old data (every bit pattern valid), and read_unaligned has
    // no alignment requirement.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<DnsEvent>()) })
}

/// Why a query is in the slow log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Answered, later than the slow threshold.
    Slow,
    /// Answered with SERVFAIL, NXDOMAIN or REFUSED.
    Error,
    /// Not answered before `--dns-timeout`.
    Timeout,
    /// Answered after the client had sent the query more than once.
    Retried,
}

impl Outcome {
    /// How tables name it.
    pub fn label(self) -> &'static str {
        match self {
            Self::Slow => "slow",
            Self::Error => "error",
            Self::Timeout => "timeout",
            Self::Retried => "retried",
        }
    }
}

/// One slow, failed or unanswered query, as `dns.slow` returns it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueryRecord {
    /// Wall-clock time of the answer (or of the timeout), Unix milliseconds.
    pub time_unix_ms: u64,
    /// What happened.
    pub outcome: Outcome,
    /// The pod that asked (empty for host traffic).
    pub pod: PodRef,
    /// Client address and port.
    pub client: SocketAddr,
    /// Server address and port.
    pub server: SocketAddr,
    /// `udp` or `tcp`.
    pub proto: Cow<'static, str>,
    /// DNS message id.
    pub id: u16,
    /// Query name, dotted, with a trailing dot.
    pub name: String,
    /// Query type mnemonic.
    pub qtype: Cow<'static, str>,
    /// Response code mnemonic; empty for timeouts.
    pub rcode: Cow<'static, str>,
    /// Latency in microseconds (time waited, for timeouts).
    pub latency_us: u64,
    /// Copies of the query the client sent (1 when it was not sent again).
    #[serde(default)]
    pub sends: u8,
    /// Why it failed (timeouts, retried and slow queries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<Cause>,
    /// The kernel's drop reason, for cause `dropped`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_reason: Option<String>,
    /// The flow that held the port, for cause `insert_race`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub winner: Option<RaceWinner>,
}

impl QueryRecord {
    /// What went wrong, as `--cause` filters it: the failure's [`Cause`]
    /// where it has one, else `timeout`, `slow`, or the response code in
    /// lower case (`servfail`, `nxdomain`, `refused`, ...).
    pub fn cause_label(&self) -> String {
        match self.cause {
            Some(cause) => cause.label().to_owned(),
            None => self.outcome_label(),
        }
    }

    /// What the client saw: `timeout`, `slow`, `retried`, or the response
    /// code in lower case. `--cause` matches this label too.
    pub fn outcome_label(&self) -> String {
        match self.outcome {
            Outcome::Timeout => "timeout".to_owned(),
            Outcome::Slow => "slow".to_owned(),
            Outcome::Retried => "retried".to_owned(),
            Outcome::Error => self.rcode.to_ascii_lowercase(),
        }
    }

    /// Gives the record its diagnosis.
    #[must_use]
    pub fn with_diagnosis(mut self, diagnosis: Option<Diagnosis>) -> Self {
        if let Some(d) = diagnosis {
            self.cause = Some(d.cause);
            self.drop_reason = d.drop_reason;
            self.winner = d.winner;
        }
        self
    }
}

impl crate::api::follow::Followed for QueryRecord {
    fn matches(&self, filter: &crate::api::protocol::EventFilter) -> bool {
        let pod = Some((&*self.pod.namespace, &*self.pod.pod));
        let matches =
            |cause: &str| crate::api::follow::matches_parts(filter, pod, Some(self.server), cause);
        matches(&self.cause_label()) || matches(&self.outcome_label())
    }

    fn to_line(&self) -> serde_json::Result<Vec<u8>> {
        crate::api::follow::tagged_line("dns", self)
    }
}

/// Client and server socket addresses of a pending-query key.
pub fn endpoints_of(key: &PendingKey) -> Result<(SocketAddr, SocketAddr), DecodeError> {
    let client = kernel_addr(&key.client, key.family).ok_or(DecodeError::Family(key.family))?;
    let server = kernel_addr(&key.server, key.family).ok_or(DecodeError::Family(key.family))?;
    Ok((
        SocketAddr::new(client, key.client_port),
        SocketAddr::new(server, key.server_port),
    ))
}

/// Transport label of a key.
pub fn proto_label(p: u8) -> Cow<'static, str> {
    match p {
        proto::UDP => Cow::Borrowed("udp"),
        proto::TCP => Cow::Borrowed("tcp"),
        n => Cow::Owned(n.to_string()),
    }
}

/// Turns a kernel event into a record; `time_unix_ms` is the wall-clock time
/// of the event (the kernel's clock is monotonic).
pub fn record_of(
    event: &DnsEvent,
    registry: &Registry,
    time_unix_ms: u64,
) -> Result<QueryRecord, DecodeError> {
    let outcome = match event.kind {
        event_kind::SLOW => Outcome::Slow,
        event_kind::ERROR => Outcome::Error,
        event_kind::TIMEOUT => Outcome::Timeout,
        event_kind::RETRIED => Outcome::Retried,
        k => return Err(DecodeError::Kind(k)),
    };
    let (client, server) = endpoints_of(&event.key)?;
    Ok(QueryRecord {
        time_unix_ms,
        outcome,
        pod: registry.pod_at(client.ip(), time_unix_ms),
        client,
        server,
        proto: proto_label(event.key.proto),
        id: event.key.id,
        name: name_from_wire(&event.name, usize::from(event.name_len)),
        qtype: qtype_name(event.qtype),
        rcode: if outcome == Outcome::Timeout {
            Cow::Borrowed("")
        } else {
            rcode_name(event.rcode)
        },
        latency_us: event.latency_ns / 1000,
        sends: event.sends,
        cause: None,
        drop_reason: None,
        winner: None,
    })
}

/// A wire-format name (length-prefixed labels) as dotted text with a
/// trailing dot (`.` for the root). Reads at most `len` bytes of `wire`.
/// Bytes outside printable ASCII, dots and backslashes inside labels are
/// escaped as `\DDD` (RFC 4343 style); a label running past the end or a
/// compression pointer ends the name with `\?`.
pub fn name_from_wire(wire: &[u8], len: usize) -> String {
    let wire = &wire[..len.min(wire.len()).min(NAME_BUF_LEN)];
    let mut out = String::new();
    let mut pos = 0;
    while let Some(&label_len) = wire.get(pos) {
        if label_len == 0 {
            break;
        }
        let start = pos + 1;
        let end = start + usize::from(label_len);
        let Some(label) = (label_len & 0xc0 == 0)
            .then(|| wire.get(start..end))
            .flatten()
        else {
            out.push_str("\\?");
            return out;
        };
        for &b in label {
            match b {
                b'.' | b'\\' => {
                    out.push('\\');
                    out.push(char::from(b));
                }
                0x21..=0x7e => out.push(char::from(b)),
                _ => {
                    let _ = write!(out, "\\{b:03}");
                }
            }
        }
        out.push('.');
        pos = end;
    }
    if out.is_empty() {
        out.push('.');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use podnet_common::family;
    use proptest::prelude::*;

    fn wire(name: &str) -> Vec<u8> {
        let mut out = Vec::new();
        for label in name.split('.').filter(|l| !l.is_empty()) {
            out.push(u8::try_from(label.len()).unwrap());
            out.extend_from_slice(label.as_bytes());
        }
        out.push(0);
        out
    }

    #[test]
    fn names() {
        let w = wire("www.example.com");
        assert_eq!(name_from_wire(&w, w.len()), "www.example.com.");
        assert_eq!(name_from_wire(&[0], 1), ".");
        assert_eq!(name_from_wire(&[], 0), ".");
        assert_eq!(name_from_wire(&[3, b'a', b'.', 0xff, 0], 5), "a\\.\\255.");
        // Truncated label, compression pointer.
        assert_eq!(name_from_wire(&[5, b'a', b'b'], 3), "\\?");
        assert_eq!(name_from_wire(&[1, b'a', 0xc0, 0x0c], 4), "a.\\?");
        // Length beyond the buffer is clamped.
        assert_eq!(name_from_wire(&w, 10_000), "www.example.com.");
    }

    #[test]
    fn events_become_records() {
        let mut ev = DnsEvent {
            latency_ns: 251_000_000,
            qtype: 28,
            rcode: 3,
            kind: event_kind::ERROR,
            ..DnsEvent::default()
        };
        ev.key.family = family::INET;
        ev.key.proto = proto::UDP;
        ev.key.client[..4].copy_from_slice(&[10, 99, 0, 2]);
        ev.key.server[..4].copy_from_slice(&[10, 98, 0, 2]);
        ev.key.client_port = 40_000;
        ev.key.server_port = 53;
        ev.key.id = 7;
        let w = wire("nx.test");
        ev.name[..w.len()].copy_from_slice(&w);
        ev.name_len = u16::try_from(w.len()).unwrap();
        let r = record_of(&ev, &Registry::new(), 5).unwrap();
        assert_eq!(r.name, "nx.test.");
        assert_eq!(r.qtype, "AAAA");
        assert_eq!(r.rcode, "NXDOMAIN");
        assert_eq!(r.client.to_string(), "10.99.0.2:40000");
        assert_eq!(r.server.to_string(), "10.98.0.2:53");
        assert_eq!(r.latency_us, 251_000);
        assert!(r.pod.is_host());
        ev.kind = 9;
        assert_eq!(
            record_of(&ev, &Registry::new(), 5),
            Err(DecodeError::Kind(9))
        );
        ev.kind = event_kind::SLOW;
        ev.key.family = 77;
        assert_eq!(
            record_of(&ev, &Registry::new(), 5),
            Err(DecodeError::Family(77))
        );
    }

    #[test]
    fn a_failed_query_names_the_pod_that_held_the_client_address_then() {
        use crate::endpoint::{Endpoint, Source};
        let ep = |pod: &str| Endpoint {
            namespace: "shop".into(),
            pod: pod.into(),
            ips: vec!["10.99.0.2".parse().unwrap()],
            interface: None,
            container_id: None,
            if_name: None,
        };
        let r = Registry::new();
        r.replace_source_at(Source::File, vec![ep("first")], 1_000);
        r.replace_source_at(Source::File, vec![ep("successor")], 5_000);
        let mut ev = DnsEvent {
            kind: event_kind::TIMEOUT,
            ..DnsEvent::default()
        };
        ev.key.family = family::INET;
        ev.key.proto = proto::UDP;
        ev.key.client[..4].copy_from_slice(&[10, 99, 0, 2]);
        ev.key.server[..4].copy_from_slice(&[10, 98, 0, 2]);
        assert_eq!(&*record_of(&ev, &r, 4_999).unwrap().pod.pod, "first");
        assert_eq!(&*record_of(&ev, &r, 5_000).unwrap().pod.pod, "successor");
    }

    #[test]
    fn wrong_sizes_are_errors() {
        assert!(matches!(
            decode(&[0; 3]),
            Err(DecodeError::Size { got: 3, .. })
        ));
    }

    proptest! {
        #[test]
        fn any_bytes_decode_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            if let Ok(ev) = decode(&bytes) {
                let _ = record_of(&ev, &Registry::new(), 0);
            }
        }

        #[test]
        fn any_names_decode_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300), len in 0usize..400) {
            let name = name_from_wire(&bytes, len);
            prop_assert!(!name.is_empty());
        }

        #[test]
        fn valid_names_round_trip(labels in proptest::collection::vec("[a-z0-9-]{1,20}", 1..8)) {
            let dotted = labels.join(".");
            let w = wire(&dotted);
            prop_assert_eq!(name_from_wire(&w, w.len()), format!("{dotted}."));
        }

        #[test]
        fn full_events_decode(bytes in proptest::collection::vec(any::<u8>(), 328..=328)) {
            let ev = decode(&bytes).unwrap();
            let _ = record_of(&ev, &Registry::new(), 0);
        }
    }
}
