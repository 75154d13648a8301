//! How `podnetctl dns top` and `podnetctl dns slow` show their results.

use std::fmt::Write as _;

use super::{
    cause::Cause,
    decode::{Outcome, QueryRecord},
    top::TopRow,
};
use crate::api::view::{table, time_of_day_utc};

/// Printed instead of an empty `dns top` table.
pub const NO_DNS_TRAFFIC: &str = "No DNS queries seen.\n";
/// Printed instead of an empty `dns slow` table.
pub const NO_SLOW_QUERIES: &str = "No slow, failed or unanswered DNS queries recorded.\n";

fn ms(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"))
}

/// One row per pod and server, busiest first.
pub fn top_table(rows: &[TopRow]) -> String {
    if rows.is_empty() {
        return NO_DNS_TRAFFIC.to_owned();
    }
    let header = [
        "POD", "SERVER", "REQ/S", "P50 MS", "P99 MS", "TIMEOUTS", "RETRANS", "ERRORS", "TOTAL",
    ]
    .map(str::to_owned);
    let body: Vec<[String; 9]> = rows
        .iter()
        .map(|r| {
            [
                r.pod.to_string(),
                r.server.to_string(),
                format!("{:.2}", r.rate),
                ms(r.p50_ms),
                ms(r.p99_ms),
                r.timeouts.to_string(),
                r.retransmits.to_string(),
                format!("{:.1}%", r.error_rate * 100.0),
                r.requests_total.to_string(),
            ]
        })
        .collect();
    let window = rows.first().map_or(0.0, |r| r.window_seconds);
    let mut out = table(std::iter::once(&header).chain(&body));
    let _ = writeln!(
        out,
        "(rates, quantiles, timeouts and errors over the last {window:.0} s; errors: SERVFAIL, REFUSED, other failures and timeouts)"
    );
    out
}

/// One row per query, oldest first.
pub fn slow_table(records: &[QueryRecord]) -> String {
    if records.is_empty() {
        return NO_SLOW_QUERIES.to_owned();
    }
    let header = [
        "TIME (UTC)",
        "POD",
        "SERVER",
        "PROTO",
        "OUTCOME",
        "CAUSE",
        "RCODE",
        "MS",
        "QTYPE",
        "NAME",
    ]
    .map(str::to_owned);
    let body: Vec<[String; 10]> = records
        .iter()
        .map(|r| {
            #[allow(clippy::cast_precision_loss)] // latencies far below 2^52 µs
            let latency = r.latency_us as f64 / 1000.0;
            [
                time_of_day_utc(r.time_unix_ms),
                r.pod.to_string(),
                r.server.to_string(),
                r.proto.to_string(),
                r.outcome.label().to_owned(),
                r.cause.map_or("-", Cause::label).to_owned(),
                if r.rcode.is_empty() {
                    "-".to_owned()
                } else {
                    r.rcode.to_string()
                },
                format!("{latency:.1}"),
                r.qtype.to_string(),
                r.name.clone(),
            ]
        })
        .collect();
    table(std::iter::once(&header).chain(&body))
}

/// Printed instead of an empty `dns why`.
pub const NO_FAILURES: &str = "No failed DNS queries recorded for this pod.\n";

/// One sentence per failed query, oldest first: what was asked, by whom, why
/// it failed and what the client saw, e.g. `A api.example. from
/// web/frontend-8b1e to 10.96.0.10:53: lost its conntrack insert race to
/// shop/cart-7d9f (udp 10.244.1.2:41123 -> 10.96.0.10:53), sent 2 times,
/// answered after 5.0 s`.
pub fn why_lines(records: &[QueryRecord]) -> String {
    let mut out = String::new();
    for r in records.iter().filter(|r| r.cause.is_some()) {
        let what = match r.cause {
            Some(Cause::InsertRace) => match &r.winner {
                Some(w) => format!("lost its conntrack insert race to {} ({})", w.pod, w.flow),
                None => "lost its conntrack insert race (the winner was gone)".to_owned(),
            },
            Some(Cause::Dropped) => format!(
                "was dropped on the node ({})",
                r.drop_reason.as_deref().unwrap_or("unknown reason")
            ),
            Some(Cause::Unanswered) => {
                "got no answer, and nothing of it was dropped on the node".to_owned()
            }
            Some(Cause::Late) => {
                "was answered after the client had sent it again, nothing dropped".to_owned()
            }
            Some(Cause::Slow) | None => "was answered slowly, nothing dropped".to_owned(),
        };
        #[allow(clippy::cast_precision_loss)] // latencies far below 2^52 µs
        let seconds = r.latency_us as f64 / 1e6;
        let sent = if r.sends > 1 {
            format!("sent {} times, ", r.sends)
        } else {
            String::new()
        };
        let end = if r.outcome == Outcome::Timeout {
            format!("{sent}no answer after {seconds:.1} s")
        } else {
            format!("{sent}answered after {seconds:.1} s")
        };
        let _ = writeln!(
            out,
            "{} {} {} from {} to {}: {what}, {end}",
            time_of_day_utc(r.time_unix_ms),
            r.qtype,
            r.name,
            r.pod,
            r.server
        );
    }
    if out.is_empty() {
        return NO_FAILURES.to_owned();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::PodRef;

    #[test]
    fn tables() {
        assert_eq!(top_table(&[]), NO_DNS_TRAFFIC);
        assert_eq!(slow_table(&[]), NO_SLOW_QUERIES);
        let pod = PodRef {
            namespace: "shop".into(),
            pod: "cart".into(),
        };
        let top = top_table(&[TopRow {
            pod: pod.clone(),
            server: "10.98.0.2".parse().unwrap(),
            rate: 2.5,
            p50_ms: Some(0.4),
            p99_ms: None,
            timeouts: 1,
            retransmits: 0,
            error_rate: 0.25,
            requests_total: 40,
            window_seconds: 60.0,
        }]);
        let first = top.lines().nth(1).unwrap();
        assert_eq!(
            first.split_whitespace().collect::<Vec<_>>(),
            [
                "shop/cart",
                "10.98.0.2",
                "2.50",
                "0.4",
                "-",
                "1",
                "0",
                "25.0%",
                "40"
            ]
        );
        let record = QueryRecord {
            time_unix_ms: 1_000,
            outcome: Outcome::Timeout,
            pod,
            client: "10.99.0.2:5000".parse().unwrap(),
            server: "10.98.0.2:53".parse().unwrap(),
            proto: "udp".into(),
            id: 1,
            name: "drop.test.".into(),
            qtype: "A".into(),
            rcode: "".into(),
            latency_us: 1_250_000,
            sends: 1,
            cause: None,
            drop_reason: None,
            winner: None,
        };
        let slow = slow_table(std::slice::from_ref(&record));
        assert_eq!(
            slow.lines()
                .nth(1)
                .unwrap()
                .split_whitespace()
                .collect::<Vec<_>>(),
            [
                "00:00:01.000",
                "shop/cart",
                "10.98.0.2:53",
                "udp",
                "timeout",
                "-",
                "-",
                "1250.0",
                "A",
                "drop.test."
            ]
        );
        assert_eq!(why_lines(std::slice::from_ref(&record)), NO_FAILURES);
        let raced = QueryRecord {
            outcome: Outcome::Retried,
            sends: 2,
            latency_us: 5_004_000,
            cause: Some(Cause::InsertRace),
            winner: Some(crate::flowdrops::RaceWinner {
                pod: PodRef {
                    namespace: "shop".into(),
                    pod: "cart-7d9f".into(),
                },
                flow: "udp 10.244.1.2:41123 -> 10.96.0.10:53".into(),
            }),
            ..record.clone()
        };
        let dropped = QueryRecord {
            cause: Some(Cause::Dropped),
            drop_reason: Some("NETFILTER_DROP".into()),
            ..record
        };
        assert_eq!(
            why_lines(&[raced, dropped]),
            "00:00:01.000 A drop.test. from shop/cart to 10.98.0.2:53: lost its conntrack insert \
             race to shop/cart-7d9f (udp 10.244.1.2:41123 -> 10.96.0.10:53), sent 2 times, \
             answered after 5.0 s\n\
             00:00:01.000 A drop.test. from shop/cart to 10.98.0.2:53: was dropped on the node \
             (NETFILTER_DROP), no answer after 1.2 s\n"
        );
    }
}
