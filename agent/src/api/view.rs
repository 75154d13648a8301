//! How podnetctl shows API results to people: plain-text tables and
//! `key: value` lines. Kept in the library so the output is unit-tested.

use std::fmt::Write as _;

use serde_json::Value;

use crate::conntrack::events::{RaceRecord, WinnerLookup};

/// The line printed instead of an empty race table.
pub const NO_RACES: &str = "No conntrack insert races recorded.\n";

/// Column titles of [`races_table`]; times are UTC.
const RACE_COLUMNS: [&str; 6] = [
    "TIME (UTC)",
    "LOSER",
    "FLOW",
    "DESTINATION",
    "SNAT",
    "WINNER",
];

/// One row per race, oldest first, columns aligned with two spaces between
/// them and no trailing blanks; [`NO_RACES`] when there are none.
pub fn races_table(records: &[RaceRecord]) -> String {
    if records.is_empty() {
        return NO_RACES.to_owned();
    }
    let rows: Vec<[String; 6]> = records
        .iter()
        .map(|r| {
            [
                time_of_day_utc(r.time_unix_ms),
                r.loser.to_string(),
                r.flow.to_string(),
                r.destination.to_string(),
                r.snat.to_string(),
                winner(&r.winner),
            ]
        })
        .collect();
    let header = RACE_COLUMNS.map(str::to_owned);
    table(std::iter::once(&header).chain(&rows))
}

fn winner(lookup: &WinnerLookup) -> String {
    match lookup {
        WinnerLookup::Found(w) => format!("{} {}", w.pod, w.flow.src),
        WinnerLookup::Gone => "gone".to_owned(),
        // Keep the row on one line whatever the error says.
        WinnerLookup::Failed { error } => {
            format!("lookup failed: {}", error.replace(['\n', '\r'], " "))
        }
    }
}

/// `HH:MM:SS.mmm` of a Unix time in milliseconds, in UTC.
pub fn time_of_day_utc(unix_ms: u64) -> String {
    let ms_of_day = unix_ms % 86_400_000;
    let (hours, rest) = (ms_of_day / 3_600_000, ms_of_day % 3_600_000);
    let (minutes, rest) = (rest / 60_000, rest % 60_000);
    let (seconds, millis) = (rest / 1000, rest % 1000);
    format!("{hours:02}:{minutes:02}:{seconds:02}.{millis:03}")
}

/// Left-aligned columns, two spaces apart; the last column is not padded.
pub(crate) fn table<'a, const N: usize>(
    rows: impl Iterator<Item = &'a [String; N]> + Clone,
) -> String {
    let mut widths = [0usize; N];
    for row in rows.clone() {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, (cell, width)) in row.iter().zip(widths).enumerate() {
            if i + 1 == N {
                line.push_str(cell);
            } else {
                // Writing to a String cannot fail.
                let _ = write!(line, "{cell:<width$}  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// A JSON value as `key: value` lines: nested objects become dotted keys,
/// arrays of plain values a comma-separated list, other arrays indexed keys.
pub fn key_value_lines(value: &Value) -> String {
    let mut out = String::new();
    match value {
        Value::Object(_) => flatten(&mut out, "", value),
        other => {
            out.push_str(&scalar(other));
            out.push('\n');
        }
    }
    out
}

fn flatten(out: &mut String, key: &str, value: &Value) {
    let child = |name: &str| {
        if key.is_empty() {
            name.to_owned()
        } else {
            format!("{key}.{name}")
        }
    };
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (name, v) in map {
                flatten(out, &child(name), v);
            }
        }
        Value::Array(items) if items.iter().any(|v| v.is_object() || v.is_array()) => {
            for (i, v) in items.iter().enumerate() {
                flatten(out, &child(&i.to_string()), v);
            }
        }
        Value::Array(items) if !items.is_empty() => {
            let list: Vec<String> = items.iter().map(scalar).collect();
            let _ = writeln!(out, "{key}: {}", list.join(", "));
        }
        Value::Array(_) | Value::Object(_) => {
            let _ = writeln!(out, "{key}: (none)");
        }
        v => {
            let _ = writeln!(out, "{key}: {}", scalar(v));
        }
    }
}

fn scalar(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        v => v.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conntrack::events::{Flow, Winner};
    use crate::endpoint::PodRef;
    use serde_json::json;

    fn records() -> Vec<RaceRecord> {
        let loser = Flow {
            src: "10.0.2.2:5001".parse().unwrap(),
            dst: "10.98.0.2:7000".parse().unwrap(),
            proto: 17,
        };
        let winner = Flow {
            src: "10.0.1.2:5000".parse().unwrap(),
            ..loser
        };
        let tcp = Flow {
            src: "192.168.7.1:43210".parse().unwrap(),
            dst: "[fd00::80]:443".parse().unwrap(),
            proto: 6,
        };
        vec![
            RaceRecord {
                // 2026-11-26 09:31:02.007 UTC
                time_unix_ms: 1_795_685_462_007,
                proto: "udp".into(),
                loser: PodRef {
                    namespace: "shop".into(),
                    pod: "b".into(),
                },
                flow: loser,
                destination: loser.dst,
                snat: "10.98.0.1:40000".parse().unwrap(),
                winner: WinnerLookup::Found(Winner {
                    pod: PodRef {
                        namespace: "shop".into(),
                        pod: "a".into(),
                    },
                    flow: winner,
                }),
            },
            RaceRecord {
                time_unix_ms: 1_795_685_523_450,
                proto: "tcp".into(),
                loser: PodRef::host(),
                flow: tcp,
                destination: tcp.dst,
                snat: "[fd00::1]:40001".parse().unwrap(),
                winner: WinnerLookup::Failed {
                    error: "netlink: EPERM".into(),
                },
            },
        ]
    }

    #[test]
    fn race_table() {
        assert_eq!(
            races_table(&records()),
            "\
TIME (UTC)    LOSER   FLOW                                     DESTINATION     SNAT             WINNER
09:31:02.007  shop/b  udp 10.0.2.2:5001 -> 10.98.0.2:7000      10.98.0.2:7000  10.98.0.1:40000  shop/a 10.0.1.2:5000
09:32:03.450  (host)  tcp 192.168.7.1:43210 -> [fd00::80]:443  [fd00::80]:443  [fd00::1]:40001  lookup failed: netlink: EPERM
"
        );
    }

    #[test]
    fn gone_winner_and_empty_table() {
        let mut r = records();
        r.truncate(1);
        r[0].winner = WinnerLookup::Gone;
        assert!(races_table(&r)
            .lines()
            .nth(1)
            .unwrap()
            .ends_with("10.98.0.1:40000  gone"));
        assert_eq!(races_table(&[]), NO_RACES);
    }

    #[test]
    fn times_of_day() {
        assert_eq!(time_of_day_utc(0), "00:00:00.000");
        assert_eq!(time_of_day_utc(86_399_999), "23:59:59.999");
        assert_eq!(time_of_day_utc(86_400_000 + 3_723_004), "01:02:03.004");
    }

    #[test]
    fn status_as_key_value_lines() {
        let status = json!({
            "version": "0.1.0",
            "ready": true,
            "tracer": {"attached": true, "program_id": 42, "hook": null},
            "uplinks": ["eth0", "eth1"],
            "endpoints": [{"pod": "a"}],
            "warnings": []
        });
        assert_eq!(
            key_value_lines(&status),
            "\
endpoints.0.pod: a
ready: true
tracer.attached: true
tracer.hook: -
tracer.program_id: 42
uplinks: eth0, eth1
version: 0.1.0
warnings: (none)
"
        );
        assert_eq!(key_value_lines(&json!("ok")), "ok\n");
    }
}
