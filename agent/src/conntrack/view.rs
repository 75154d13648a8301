//! How podnetctl shows recent insert races: one aligned row per race.

use super::events::{RaceRecord, WinnerLookup};
use crate::api::view::{table, time_of_day_utc};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conntrack::events::{Flow, Winner};
    use crate::endpoint::PodRef;

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
}
