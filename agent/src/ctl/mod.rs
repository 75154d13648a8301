//! podnetctl's library side, kept here so it is unit-tested: the events of a
//! followed stream as podnetctl reads them ([`Event`]), filters applied to
//! answers the agent does not filter, output formats ([`output`]) and the
//! bug-report archive ([`sysdump`]).

pub mod output;
pub mod sysdump;

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::{
    api::{
        follow::{matches_parts, Followed},
        protocol::EventFilter,
    },
    conntrack::{drops::DropRecord, events::RaceRecord},
    dns::{decode::QueryRecord, top::TopRow},
};

/// One line of a `follow` stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// An insert race, as `conntrack.races` lists it.
    Race(RaceRecord),
    /// A slow, failed or unanswered DNS query, as `dns.slow` lists it.
    Dns(QueryRecord),
    /// Other netfilter drops of one source.
    Drop(DropRecord),
    /// Events this follower lost because it fell behind (counted before
    /// its filter).
    Lost {
        /// How many.
        events: u64,
    },
}

impl Event {
    /// The event's cause, as `--cause` names it (empty for `lost`).
    pub fn cause(&self) -> String {
        match self {
            Self::Race(_) => crate::conntrack::events::CAUSE.to_owned(),
            Self::Dns(r) => r.cause_label(),
            Self::Drop(_) => crate::conntrack::drops::CAUSE.to_owned(),
            Self::Lost { .. } => String::new(),
        }
    }

    /// Whether `filter` selects it (the agent already filtered; this is for
    /// events read from elsewhere). A `lost` notice always passes.
    pub fn matches(&self, filter: &EventFilter) -> bool {
        match self {
            Self::Race(r) => r.matches(filter),
            Self::Dns(r) => r.matches(filter),
            Self::Drop(r) => r.matches(filter),
            Self::Lost { .. } => true,
        }
    }
}

/// Errors of a filter that does not apply to a command.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("--{flag} does not apply to {command}")]
pub struct FilterNotApplicable {
    /// The flag.
    pub flag: &'static str,
    /// The command.
    pub command: &'static str,
}

/// `dns top` rows that pass `filter`: namespace, pod and server (its
/// address; a port given is ignored, rows are per server address).
pub fn filter_top(
    rows: Vec<TopRow>,
    filter: &EventFilter,
) -> Result<Vec<TopRow>, FilterNotApplicable> {
    if !filter.cause.is_empty() {
        return Err(FilterNotApplicable {
            flag: "cause",
            command: "dns top",
        });
    }
    let server = filter.server.as_deref().map(|s| {
        s.parse::<SocketAddr>()
            .map_or_else(|_| s.to_owned(), |a| a.ip().to_string())
    });
    let by_address = EventFilter {
        server,
        ..filter.clone()
    };
    Ok(rows
        .into_iter()
        .filter(|r| {
            matches_parts(
                &by_address,
                Some((&r.pod.namespace, &r.pod.pod)),
                Some(SocketAddr::new(r.server, 0)),
                "",
            )
        })
        .collect())
}

/// Endpoints that pass `filter` (namespace and pod only).
pub fn filter_endpoints(
    endpoints: Vec<podnet_api::endpoint::EndpointRecord>,
    filter: &EventFilter,
) -> Result<Vec<podnet_api::endpoint::EndpointRecord>, FilterNotApplicable> {
    for (set, flag) in [
        (filter.server.is_some(), "server"),
        (!filter.cause.is_empty(), "cause"),
    ] {
        if set {
            return Err(FilterNotApplicable {
                flag,
                command: "endpoints",
            });
        }
    }
    Ok(endpoints
        .into_iter()
        .filter(|e| matches_parts(filter, Some((&e.namespace, &e.pod)), None, ""))
        .collect())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{
        conntrack::events::{Flow, WinnerLookup},
        dns::{
            cause::{Cause, Diagnosis},
            decode::Outcome,
        },
        endpoint::PodRef,
    };

    pub(crate) fn pod(namespace: &str, name: &str) -> PodRef {
        PodRef {
            namespace: namespace.into(),
            pod: name.into(),
        }
    }

    pub(crate) fn race(namespace: &str, name: &str) -> RaceRecord {
        let flow = Flow {
            src: "10.0.2.2:5001".parse().unwrap(),
            dst: "10.98.0.2:7000".parse().unwrap(),
            proto: 17,
        };
        RaceRecord {
            time_unix_ms: 1_795_685_462_007,
            proto: "udp".into(),
            loser: pod(namespace, name),
            flow,
            destination: flow.dst,
            snat: "10.98.0.1:40000".parse().unwrap(),
            winner: WinnerLookup::Gone,
        }
    }

    pub(crate) fn query(namespace: &str, outcome: Outcome, rcode: &str) -> QueryRecord {
        QueryRecord {
            time_unix_ms: 1_795_685_463_100,
            outcome,
            pod: pod(namespace, "web-1"),
            client: "10.0.1.2:33000".parse().unwrap(),
            server: "10.96.0.10:53".parse().unwrap(),
            proto: "udp".into(),
            id: 4242,
            name: "cart.shop.svc.cluster.local.".into(),
            qtype: "A".into(),
            rcode: rcode.to_owned().into(),
            latency_us: 5_000_000,
            sends: 1,
            cause: None,
            drop_reason: None,
            winner: None,
        }
    }

    pub(crate) fn drop_record(namespace: &str, name: &str) -> DropRecord {
        DropRecord {
            time_unix_ms: 1_000,
            pod: pod(namespace, name),
            source: "10.0.3.2".parse().unwrap(),
            proto: "tcp".into(),
            packets: 3,
        }
    }

    fn filter(
        ns: Option<&str>,
        pod: Option<&str>,
        server: Option<&str>,
        cause: &[&str],
    ) -> EventFilter {
        EventFilter {
            namespace: ns.map(Into::into),
            pod: pod.map(Into::into),
            server: server.map(Into::into),
            cause: cause.iter().map(|c| (*c).to_owned()).collect(),
        }
    }

    #[test]
    fn causes_of_each_record_are_known_to_the_protocol() {
        let events = [
            (Event::Race(race("shop", "b")), "insert_race"),
            (Event::Dns(query("shop", Outcome::Timeout, "")), "timeout"),
            (Event::Dns(query("shop", Outcome::Slow, "NOERROR")), "slow"),
            (
                Event::Dns(query("shop", Outcome::Error, "SERVFAIL")),
                "servfail",
            ),
            (
                Event::Dns(query("shop", Outcome::Error, "NXDOMAIN")),
                "nxdomain",
            ),
            (
                Event::Dns(query("shop", Outcome::Error, "REFUSED")),
                "refused",
            ),
            (Event::Drop(drop_record("shop", "c")), "netfilter_drop"),
            (
                Event::Dns(query("shop", Outcome::Retried, "NOERROR")),
                "retried",
            ),
            (
                Event::Dns(
                    query("shop", Outcome::Timeout, "").with_diagnosis(Some(Diagnosis {
                        cause: Cause::InsertRace,
                        drop_reason: None,
                        winner: None,
                    })),
                ),
                "insert_race",
            ),
            (
                Event::Dns(
                    query("shop", Outcome::Timeout, "").with_diagnosis(Some(Diagnosis {
                        cause: Cause::Dropped,
                        drop_reason: Some("NETFILTER_DROP".into()),
                        winner: None,
                    })),
                ),
                "dropped",
            ),
        ];
        for (event, cause) in events {
            assert_eq!(event.cause(), cause);
            assert!(crate::api::protocol::CAUSES.contains(&cause), "{cause}");
        }
    }

    #[test]
    fn every_set_field_must_match() {
        let r = Event::Race(race("shop", "b"));
        let t = Event::Dns(query("web", Outcome::Timeout, ""));
        let d = Event::Drop(drop_record("shop", "c"));
        let cases: [(EventFilter, [bool; 3]); 11] = [
            (EventFilter::default(), [true, true, true]),
            (filter(Some("shop"), None, None, &[]), [true, false, true]),
            (
                filter(Some("shop"), Some("b"), None, &[]),
                [true, false, false],
            ),
            (filter(None, Some("web-1"), None, &[]), [false, true, false]),
            (
                filter(None, None, Some("10.96.0.10"), &[]),
                [false, true, false],
            ),
            (
                filter(None, None, Some("10.96.0.10:53"), &[]),
                [false, true, false],
            ),
            (
                filter(None, None, Some("10.96.0.10:54"), &[]),
                [false, false, false],
            ),
            (
                filter(None, None, Some("10.98.0.2:7000"), &[]),
                [true, false, false],
            ),
            (
                filter(None, None, None, &["timeout", "insert_race"]),
                [true, true, false],
            ),
            (
                filter(None, None, None, &["netfilter_drop"]),
                [false, false, true],
            ),
            (filter(Some(""), None, None, &[]), [false, false, false]),
        ];
        for (f, expected) in cases {
            assert_eq!(
                [r.matches(&f), t.matches(&f), d.matches(&f)],
                expected,
                "{f:?}"
            );
        }
        assert!(Event::Lost { events: 3 }.matches(&filter(Some("x"), None, None, &["slow"])));
    }

    #[test]
    fn agent_lines_decode_as_events() {
        let records: [Box<dyn Followed>; 3] = [
            Box::new(race("shop", "b")),
            Box::new(query("shop", Outcome::Error, "SERVFAIL")),
            Box::new(drop_record("shop", "c")),
        ];
        let expected = [
            Event::Race(race("shop", "b")),
            Event::Dns(query("shop", Outcome::Error, "SERVFAIL")),
            Event::Drop(drop_record("shop", "c")),
        ];
        for (record, event) in records.iter().zip(expected) {
            let line = record.to_line().unwrap();
            assert_eq!(serde_json::from_slice::<Event>(&line).unwrap(), event);
        }
        let line = crate::api::follow::lost_line(7);
        assert_eq!(
            String::from_utf8(line.clone()).unwrap(),
            r#"{"type":"lost","events":7}"#
        );
        assert_eq!(
            serde_json::from_slice::<Event>(&line).unwrap(),
            Event::Lost { events: 7 }
        );
        let dns = String::from_utf8(records[1].to_line().unwrap()).unwrap();
        assert!(
            dns.starts_with(r#"{"type":"dns","time_unix_ms":1795685463100,"outcome":"error","#),
            "{dns}"
        );
    }

    #[test]
    fn client_side_filters() {
        let row = |ns: &str, server: &str| TopRow {
            pod: pod(ns, "p"),
            server: server.parse().unwrap(),
            rate: 1.0,
            p50_ms: None,
            p99_ms: None,
            timeouts: 0,
            retransmits: 0,
            error_rate: 0.0,
            requests_total: 1,
            window_seconds: 60.0,
        };
        let rows = vec![
            row("a", "10.96.0.10"),
            row("b", "10.96.0.10"),
            row("a", "10.96.0.11"),
        ];
        let kept = filter_top(
            rows.clone(),
            &filter(Some("a"), None, Some("10.96.0.10:53"), &[]),
        )
        .unwrap();
        assert_eq!(kept, [row("a", "10.96.0.10")]);
        assert_eq!(
            filter_top(rows.clone(), &EventFilter::default())
                .unwrap()
                .len(),
            3
        );
        assert_eq!(
            filter_top(rows, &filter(None, None, None, &["slow"]))
                .unwrap_err()
                .to_string(),
            "--cause does not apply to dns top"
        );
        let ep = |ns: &str, name: &str| podnet_api::endpoint::EndpointRecord {
            container_id: "c".into(),
            if_name: "eth0".into(),
            network: String::new(),
            netns: String::new(),
            namespace: ns.into(),
            pod: name.into(),
            pod_uid: String::new(),
            interface: None,
            ips: vec![],
        };
        let eps = vec![ep("a", "x"), ep("a", "y"), ep("b", "x")];
        assert_eq!(
            filter_endpoints(eps.clone(), &filter(Some("a"), Some("y"), None, &[])).unwrap(),
            [ep("a", "y")]
        );
        assert_eq!(
            filter_endpoints(eps, &filter(None, None, Some("10.0.0.1"), &[]))
                .unwrap_err()
                .to_string(),
            "--server does not apply to endpoints"
        );
    }
}
