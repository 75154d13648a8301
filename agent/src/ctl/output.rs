//! podnetctl's output formats: `table` (the default), `wide` (the table with
//! extra columns where a command has them), `json` and `yaml` (the agent's
//! answer as it is), and the lines of a followed stream.

use std::fmt::Write as _;

use serde_json::Value;

use super::Event;
use crate::{
    api::view::{table, time_of_day_utc},
    conntrack::{
        events::{RaceRecord, WinnerLookup},
        view::NO_RACES,
    },
    dns::{
        decode::{Outcome, QueryRecord},
        view::NO_SLOW_QUERIES,
    },
};

/// How podnetctl prints an answer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    #[default]
    Table,
    /// The table with extra columns (full dates, both ends of each flow).
    Wide,
    /// The agent's answer as JSON; a followed stream prints one object per line.
    Json,
    /// The agent's answer as YAML; a followed stream prints one document per event.
    Yaml,
}

/// Errors rendering structured output.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// JSON rendering failed.
    #[error("rendering JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// YAML rendering failed.
    #[error("rendering YAML: {0}")]
    Yaml(#[from] serde_norway::Error),
}

impl Output {
    /// True for `json` and `yaml`: the answer is printed as it is.
    pub fn is_structured(self) -> bool {
        matches!(self, Self::Json | Self::Yaml)
    }

    /// The answer as JSON (pretty) or YAML; `None` for the tables.
    pub fn structured(self, value: &Value) -> Result<Option<String>, OutputError> {
        Ok(match self {
            Self::Json => Some(serde_json::to_string_pretty(value)? + "\n"),
            Self::Yaml => Some(serde_norway::to_string(value)?),
            Self::Table | Self::Wide => None,
        })
    }

    /// One followed event: a JSON object on one line, a YAML document, or a
    /// table row (see [`follow_header`]).
    pub fn event_line(self, event: &Event) -> Result<String, OutputError> {
        Ok(match self {
            Self::Json => serde_json::to_string(event)? + "\n",
            Self::Yaml => format!("---\n{}", serde_norway::to_string(event)?),
            Self::Table => follow_row(event, false),
            Self::Wide => follow_row(event, true),
        })
    }
}

/// `YYYY-MM-DD HH:MM:SS.mmm` of a Unix time in milliseconds, in UTC.
pub fn date_time_utc(unix_ms: u64) -> String {
    let days = i64::try_from(unix_ms / 86_400_000).unwrap_or(0);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {}", time_of_day_utc(unix_ms))
}

fn winner(lookup: &WinnerLookup, wide: bool) -> String {
    match lookup {
        WinnerLookup::Found(w) if wide => format!("{} {}", w.pod, w.flow),
        WinnerLookup::Found(w) => format!("{} {}", w.pod, w.flow.src),
        WinnerLookup::Gone => "gone".to_owned(),
        WinnerLookup::Failed { error } => {
            format!("lookup failed: {}", error.replace(['\n', '\r'], " "))
        }
    }
}

/// `podnetctl conntrack races -o wide`: full dates, and the winner's whole flow.
pub fn races_wide(records: &[RaceRecord]) -> String {
    if records.is_empty() {
        return NO_RACES.to_owned();
    }
    let header = [
        "TIME (UTC)",
        "LOSER",
        "PROTO",
        "FLOW",
        "DESTINATION",
        "SNAT",
        "WINNER",
    ]
    .map(str::to_owned);
    let rows: Vec<[String; 7]> = records
        .iter()
        .map(|r| {
            [
                date_time_utc(r.time_unix_ms),
                r.loser.to_string(),
                r.proto.clone(),
                format!("{} -> {}", r.flow.src, r.flow.dst),
                r.destination.to_string(),
                r.snat.to_string(),
                winner(&r.winner, true),
            ]
        })
        .collect();
    table(std::iter::once(&header).chain(&rows))
}

fn outcome(o: Outcome) -> &'static str {
    o.label()
}

/// The detail of a followed DNS record: the query, and for a failure whose
/// cause fills the cause column, what the client saw.
fn dns_detail(r: &QueryRecord, wide: bool) -> String {
    let query = if wide {
        format!(
            "{} {} {} {} -> {} id {} {} ms",
            r.qtype,
            r.name,
            r.proto,
            r.client,
            r.server,
            r.id,
            latency_ms(r)
        )
    } else {
        format!(
            "{} {} server {} {} ms",
            r.qtype,
            r.name,
            r.server,
            latency_ms(r)
        )
    };
    match r.cause {
        Some(_) => format!("{query} ({}, sent {})", r.outcome.label(), r.sends),
        None => query,
    }
}

#[allow(clippy::cast_precision_loss)] // latencies far below 2^52 µs
fn latency_ms(r: &QueryRecord) -> String {
    format!("{:.1}", r.latency_us as f64 / 1000.0)
}

/// `podnetctl dns slow -o wide`: full dates, the client and the message id.
pub fn slow_wide(records: &[QueryRecord]) -> String {
    if records.is_empty() {
        return NO_SLOW_QUERIES.to_owned();
    }
    let header = [
        "TIME (UTC)",
        "POD",
        "CLIENT",
        "SERVER",
        "PROTO",
        "ID",
        "OUTCOME",
        "RCODE",
        "MS",
        "QTYPE",
        "NAME",
    ]
    .map(str::to_owned);
    let rows: Vec<[String; 11]> = records
        .iter()
        .map(|r| {
            [
                date_time_utc(r.time_unix_ms),
                r.pod.to_string(),
                r.client.to_string(),
                r.server.to_string(),
                r.proto.to_string(),
                r.id.to_string(),
                outcome(r.outcome).to_owned(),
                if r.rcode.is_empty() {
                    "-".to_owned()
                } else {
                    r.rcode.to_string()
                },
                latency_ms(r),
                r.qtype.to_string(),
                r.name.clone(),
            ]
        })
        .collect();
    table(std::iter::once(&header).chain(&rows))
}

/// `podnetctl endpoints -o wide`: the whole container id, network and netns.
pub fn endpoints_wide(endpoints: &[podnet_api::endpoint::EndpointRecord]) -> String {
    if endpoints.is_empty() {
        return "No endpoints registered by podnet-cni.\n".to_owned();
    }
    let header = [
        "POD",
        "CONTAINER",
        "IF",
        "NETWORK",
        "NETNS",
        "HOST IF",
        "ADDRESSES",
    ]
    .map(str::to_owned);
    let rows: Vec<[String; 7]> = endpoints
        .iter()
        .map(|e| {
            [
                format!("{}/{}", e.namespace, e.pod),
                e.container_id.clone(),
                e.if_name.clone(),
                e.network.clone(),
                e.netns.clone(),
                e.interface.clone().unwrap_or_else(|| "-".into()),
                e.ips
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            ]
        })
        .collect();
    table(std::iter::once(&header).chain(&rows))
}

/// Column widths of followed rows: events arrive one by one, so the columns
/// are fixed rather than fitted.
const TIME_WIDTH: usize = 12;
const WIDE_TIME_WIDTH: usize = 23;
const CAUSE_WIDTH: usize = 14;
const POD_WIDTH: usize = 32;

/// The header printed before followed rows.
pub fn follow_header(wide: bool) -> String {
    let time = if wide { WIDE_TIME_WIDTH } else { TIME_WIDTH };
    format!(
        "{:time$}  {:CAUSE_WIDTH$}  {:POD_WIDTH$}  DETAIL\n",
        "TIME (UTC)", "CAUSE", "POD"
    )
}

/// One followed event as a row under [`follow_header`].
pub fn follow_row(event: &Event, wide: bool) -> String {
    let (time_ms, pod, detail) = match event {
        Event::Race(r) => (
            r.time_unix_ms,
            r.loser.to_string(),
            if wide {
                format!(
                    "{} snat {} won by {}",
                    r.flow,
                    r.snat,
                    winner(&r.winner, true)
                )
            } else {
                format!("{} won by {}", r.flow, winner(&r.winner, false))
            },
        ),
        Event::Dns(r) => (r.time_unix_ms, r.pod.to_string(), dns_detail(r, wide)),
        Event::Drop(r) => (
            r.time_unix_ms,
            r.pod.to_string(),
            format!(
                "{} {} packets from {} dropped",
                r.packets, r.proto, r.source
            ),
        ),
        Event::Lost { events } => {
            return format!("({events} events lost: this follower fell behind)\n");
        }
    };
    let mut out = String::new();
    let time = if wide {
        format!("{:WIDE_TIME_WIDTH$}", date_time_utc(time_ms))
    } else {
        format!("{:TIME_WIDTH$}", time_of_day_utc(time_ms))
    };
    let _ = writeln!(
        out,
        "{time}  {:CAUSE_WIDTH$}  {pod:POD_WIDTH$}  {detail}",
        event.cause()
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conntrack::drops::DropRecord;
    use crate::ctl::tests::{query, race};
    use serde_json::json;

    #[test]
    fn dates() {
        assert_eq!(date_time_utc(0), "1970-01-01 00:00:00.000");
        assert_eq!(date_time_utc(1_795_685_462_007), "2026-11-26 09:31:02.007");
        assert_eq!(date_time_utc(951_782_400_000), "2000-02-29 00:00:00.000");
    }

    #[test]
    fn structured_answers() {
        let v = json!({"a": [1, 2], "b": {"c": "x"}});
        assert_eq!(Output::Table.structured(&v).unwrap(), None);
        assert_eq!(Output::Wide.structured(&v).unwrap(), None);
        assert_eq!(
            Output::Json.structured(&v).unwrap().unwrap(),
            "{\n  \"a\": [\n    1,\n    2\n  ],\n  \"b\": {\n    \"c\": \"x\"\n  }\n}\n"
        );
        assert_eq!(
            Output::Yaml.structured(&v).unwrap().unwrap(),
            "a:\n- 1\n- 2\nb:\n  c: x\n"
        );
    }

    #[test]
    fn followed_rows_and_lines() {
        let r = Event::Race(race("shop", "b"));
        assert_eq!(
            Output::Table.event_line(&r).unwrap(),
            "09:31:02.007  insert_race     shop/b                            udp 10.0.2.2:5001 -> 10.98.0.2:7000 won by gone\n"
        );
        assert_eq!(
            Output::Wide.event_line(&r).unwrap(),
            "2026-11-26 09:31:02.007  insert_race     shop/b                            udp 10.0.2.2:5001 -> 10.98.0.2:7000 snat 10.98.0.1:40000 won by gone\n"
        );
        let t = Event::Dns(query("web", Outcome::Timeout, ""));
        assert_eq!(
            Output::Table.event_line(&t).unwrap(),
            "09:31:03.100  timeout         web/web-1                         A cart.shop.svc.cluster.local. server 10.96.0.10:53 5000.0 ms\n"
        );
        assert_eq!(
            Output::Wide.event_line(&t).unwrap(),
            "2026-11-26 09:31:03.100  timeout         web/web-1                         A cart.shop.svc.cluster.local. udp 10.0.1.2:33000 -> 10.96.0.10:53 id 4242 5000.0 ms\n"
        );
        let d = Event::Drop(DropRecord {
            time_unix_ms: 1_000,
            pod: crate::endpoint::PodRef::host(),
            source: "10.0.9.9".parse().unwrap(),
            proto: "tcp".into(),
            packets: 3,
        });
        assert_eq!(
            Output::Table.event_line(&d).unwrap(),
            "00:00:01.000  netfilter_drop  (host)                            3 tcp packets from 10.0.9.9 dropped\n"
        );
        assert_eq!(
            Output::Table
                .event_line(&Event::Lost { events: 9 })
                .unwrap(),
            "(9 events lost: this follower fell behind)\n"
        );
        let line = Output::Json.event_line(&t).unwrap();
        assert_eq!(line.matches('\n').count(), 1);
        assert_eq!(serde_json::from_str::<Event>(&line).unwrap(), t);
        assert!(
            Output::Yaml.event_line(&Event::Lost { events: 9 }).unwrap()
                == "---\ntype: lost\nevents: 9\n"
        );
        assert_eq!(
            follow_header(false),
            "TIME (UTC)    CAUSE           POD                               DETAIL\n"
        );
    }

    #[test]
    fn wide_tables_have_the_extra_columns() {
        let races = races_wide(&[race("shop", "b")]);
        assert_eq!(
            races,
            "TIME (UTC)               LOSER   PROTO  FLOW                             DESTINATION     SNAT             WINNER\n\
             2026-11-26 09:31:02.007  shop/b  udp    10.0.2.2:5001 -> 10.98.0.2:7000  10.98.0.2:7000  10.98.0.1:40000  gone\n"
        );
        let slow = slow_wide(&[query("shop", Outcome::Error, "SERVFAIL")]);
        assert_eq!(
            slow.lines()
                .nth(1)
                .unwrap()
                .split_whitespace()
                .collect::<Vec<_>>(),
            [
                "2026-11-26",
                "09:31:03.100",
                "shop/web-1",
                "10.0.1.2:33000",
                "10.96.0.10:53",
                "udp",
                "4242",
                "error",
                "SERVFAIL",
                "5000.0",
                "A",
                "cart.shop.svc.cluster.local."
            ]
        );
        assert_eq!(races_wide(&[]), NO_RACES);
        assert_eq!(slow_wide(&[]), NO_SLOW_QUERIES);
    }
}
