//! The kernel's conntrack statistics for the network namespace of the calling thread.
//!
//! The per-CPU counters come from `/proc/net/stat/nf_conntrack` (what `conntrack -S` also
//! shows), the table fill from `/proc/sys/net/netfilter/nf_conntrack_{count,max}`. Both are
//! per network namespace: procfs shows the namespace of the reading thread, so read them from
//! the thread (or process) that lives in the namespace to observe.
//!
//! The statistics file is written by `ct_cpu_seq_show()` in
//! `net/netfilter/nf_conntrack_standalone.c` (Linux 6.18): a header line of column names, then
//! one row per possible CPU with every value as 8 hex digits. Two column names differ from the
//! kernel's field names: `clashres` holds `clash_resolve` and `chainlength` holds
//! `chaintoolong`. Columns are looked up by name, because they have been added and removed
//! across kernel versions.

use std::fs;

use thiserror::Error;

/// The per-CPU statistics file of the calling thread's network namespace.
pub const STAT_FILE: &str = "/proc/net/stat/nf_conntrack";
/// Number of conntrack entries in the calling thread's network namespace.
pub const COUNT_FILE: &str = "/proc/sys/net/netfilter/nf_conntrack_count";
/// Maximum number of conntrack entries (`net.netfilter.nf_conntrack_max`).
pub const MAX_FILE: &str = "/proc/sys/net/netfilter/nf_conntrack_max";

/// Bad tokens are quoted in errors up to this many characters, so a garbage file cannot
/// produce a huge error message.
const MAX_TOKEN_IN_ERROR: usize = 40;

/// Errors while reading or parsing the conntrack statistics.
#[derive(Debug, Error)]
pub enum StatsError {
    /// The file could not be read.
    #[error("reading {file}: {source}")]
    Read {
        /// The file that failed.
        file: &'static str,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is empty: no header line.
    #[error("{file}: no header line")]
    MissingHeader {
        /// The file that failed.
        file: &'static str,
    },
    /// The header names none of the columns podnet knows.
    #[error("{file}: header {header:?} has none of the known columns")]
    UnknownHeader {
        /// The file that failed.
        file: &'static str,
        /// The header line (shortened).
        header: String,
    },
    /// The header names a column twice.
    #[error("{file}: column {column:?} appears twice in the header")]
    DuplicateColumn {
        /// The file that failed.
        file: &'static str,
        /// The repeated column name.
        column: String,
    },
    /// The header is followed by no per-CPU row.
    #[error("{file}: no per-CPU rows after the header")]
    NoRows {
        /// The file that failed.
        file: &'static str,
    },
    /// A row has a different number of values than the header has columns.
    #[error("{file} line {line}: {found} values, header has {expected} columns")]
    RowLength {
        /// The file that failed.
        file: &'static str,
        /// 1-based line number.
        line: usize,
        /// Number of header columns.
        expected: usize,
        /// Number of values on the row.
        found: usize,
    },
    /// A value is not a hexadecimal number (or does not fit in 64 bits).
    #[error("{file} line {line} column {column:?}: bad hex value {token:?}")]
    BadHex {
        /// The file that failed.
        file: &'static str,
        /// 1-based line number.
        line: usize,
        /// The column name from the header.
        column: String,
        /// The offending token (shortened).
        token: String,
    },
    /// A sysctl file does not hold a single decimal number.
    #[error("{file}: bad decimal value {token:?}")]
    BadDecimal {
        /// The file that failed.
        file: &'static str,
        /// The offending token (shortened).
        token: String,
    },
}

/// Conntrack statistics of one network namespace, summed over CPUs.
///
/// A counter whose column the running kernel does not print stays 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConntrackStats {
    /// Entries in the table (column `entries`; a global value repeated on every row).
    pub entries: u64,
    /// Lookups that found an entry (`found`).
    pub found: u64,
    /// Packets that conntrack could not track, e.g. bad TCP state (`invalid`).
    pub invalid: u64,
    /// Entries inserted into the table (`insert`; 0 on kernels that no longer count it).
    pub insert: u64,
    /// Entries that failed to confirm, usually an insert race on the reply tuple
    /// (`insert_failed`).
    pub insert_failed: u64,
    /// Packets dropped by conntrack, including failed confirms (`drop`).
    pub drop: u64,
    /// Entries evicted early because the table was full (`early_drop`).
    pub early_drop: u64,
    /// ICMP errors that matched no entry or were invalid (`icmp_error`).
    pub icmp_error: u64,
    /// Insert clashes that the kernel resolved by reusing the other entry (`clashres`).
    pub clash_resolve: u64,
    /// Inserts refused because a hash chain was too long (`chainlength`).
    pub chaintoolong: u64,
    /// Lookups restarted because the hash table changed under them (`search_restart`).
    pub search_restart: u64,
    /// Expectations created by helpers (`expect_new`).
    pub expect_new: u64,
    /// Expectations created through ctnetlink (`expect_create`).
    pub expect_create: u64,
    /// Expectations deleted (`expect_delete`).
    pub expect_delete: u64,
}

/// A known column: its name in the file and the field it adds to.
type Column = (&'static str, fn(&mut ConntrackStats) -> &mut u64);

/// Columns that are summed over CPUs, by their name in the file.
const SUMMED_COLUMNS: [Column; 13] = [
    ("found", |s| &mut s.found),
    ("invalid", |s| &mut s.invalid),
    ("insert", |s| &mut s.insert),
    ("insert_failed", |s| &mut s.insert_failed),
    ("drop", |s| &mut s.drop),
    ("early_drop", |s| &mut s.early_drop),
    ("icmp_error", |s| &mut s.icmp_error),
    ("clashres", |s| &mut s.clash_resolve),
    ("chainlength", |s| &mut s.chaintoolong),
    ("search_restart", |s| &mut s.search_restart),
    ("expect_new", |s| &mut s.expect_new),
    ("expect_create", |s| &mut s.expect_create),
    ("expect_delete", |s| &mut s.expect_delete),
];

/// The column that holds a global value, repeated on every row.
const ENTRIES_COLUMN: &str = "entries";

impl ConntrackStats {
    /// The counters exported as `podnet_conntrack_stat_total{stat}`, as (label value, value).
    pub fn labelled(&self) -> [(&'static str, u64); 6] {
        [
            ("insert_failed", self.insert_failed),
            ("drop", self.drop),
            ("clash_resolve", self.clash_resolve),
            ("chaintoolong", self.chaintoolong),
            ("early_drop", self.early_drop),
            ("invalid", self.invalid),
        ]
    }
}

/// What each header column means to the parser.
#[derive(Clone, Copy)]
enum Slot {
    /// `entries`: taken from the first row only.
    Entries,
    /// A counter summed over rows.
    Summed(fn(&mut ConntrackStats) -> &mut u64),
    /// A column this parser does not know; its values are still checked to be hex.
    Ignored,
}

/// Parses the text of `/proc/net/stat/nf_conntrack`.
///
/// Counters are summed over the per-CPU rows, except `entries`, which is taken from the first
/// row. Blank lines are ignored. Any malformed line is an error; this never panics.
pub fn parse(text: &str) -> Result<ConntrackStats, StatsError> {
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(index, line)| (index + 1, line))
        .filter(|(_, line)| !line.trim().is_empty());

    let Some((_, header)) = lines.next() else {
        return Err(StatsError::MissingHeader { file: STAT_FILE });
    };
    let names: Vec<&str> = header.split_whitespace().collect();
    let mut slots = Vec::with_capacity(names.len());
    for (position, name) in names.iter().enumerate() {
        if names[..position].contains(name) {
            return Err(StatsError::DuplicateColumn {
                file: STAT_FILE,
                column: shorten(name),
            });
        }
        let slot = if *name == ENTRIES_COLUMN {
            Slot::Entries
        } else {
            SUMMED_COLUMNS
                .iter()
                .find(|(column, _)| column == name)
                .map_or(Slot::Ignored, |(_, field)| Slot::Summed(*field))
        };
        slots.push(slot);
    }
    if slots.iter().all(|slot| matches!(slot, Slot::Ignored)) {
        return Err(StatsError::UnknownHeader {
            file: STAT_FILE,
            header: shorten(header),
        });
    }

    let mut stats = ConntrackStats::default();
    let mut rows = 0usize;
    for (line_number, line) in lines {
        let tokens: Vec<&str> = line.split_whitespace().collect();
        if tokens.len() != names.len() {
            return Err(StatsError::RowLength {
                file: STAT_FILE,
                line: line_number,
                expected: names.len(),
                found: tokens.len(),
            });
        }
        for ((token, name), slot) in tokens.iter().zip(&names).zip(&slots) {
            let value = u64::from_str_radix(token, 16).map_err(|_| StatsError::BadHex {
                file: STAT_FILE,
                line: line_number,
                column: shorten(name),
                token: shorten(token),
            })?;
            match slot {
                Slot::Entries if rows == 0 => stats.entries = value,
                Slot::Summed(field) => {
                    let sum = field(&mut stats);
                    *sum = sum.saturating_add(value);
                }
                Slot::Entries | Slot::Ignored => {}
            }
        }
        rows += 1;
    }
    if rows == 0 {
        return Err(StatsError::NoRows { file: STAT_FILE });
    }
    Ok(stats)
}

/// Reads and parses [`STAT_FILE`] for the calling thread's network namespace.
pub fn read() -> Result<ConntrackStats, StatsError> {
    parse(&read_file(STAT_FILE)?)
}

/// How full the conntrack table is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableFill {
    /// Entries in the table now (`nf_conntrack_count`).
    pub entries: u64,
    /// The table's limit (`nf_conntrack_max`).
    pub max: u64,
}

/// Reads [`COUNT_FILE`] and [`MAX_FILE`] for the calling thread's network namespace.
pub fn read_table_fill() -> Result<TableFill, StatsError> {
    Ok(TableFill {
        entries: parse_decimal(COUNT_FILE, &read_file(COUNT_FILE)?)?,
        max: parse_decimal(MAX_FILE, &read_file(MAX_FILE)?)?,
    })
}

fn read_file(file: &'static str) -> Result<String, StatsError> {
    fs::read_to_string(file).map_err(|source| StatsError::Read { file, source })
}

/// Parses a sysctl file holding one decimal number and a newline.
fn parse_decimal(file: &'static str, text: &str) -> Result<u64, StatsError> {
    let token = text.trim();
    token.parse().map_err(|_| StatsError::BadDecimal {
        file,
        token: shorten(token),
    })
}

fn shorten(token: &str) -> String {
    token.chars().take(MAX_TOKEN_IN_ERROR).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The header of Linux 6.18, with its double spaces.
    const HEADER: &str = "entries  clashres found new invalid ignore delete chainlength insert \
                          insert_failed drop early_drop icmp_error  expect_new expect_create \
                          expect_delete search_restart";

    fn row(values: [u32; 17]) -> String {
        let hex: Vec<String> = values.iter().map(|v| format!("{v:08x}")).collect();
        // The kernel prints two spaces after `entries` and after `icmp_error`.
        format!(
            "{}  {}  {}",
            hex[0],
            hex[1..13].join(" "),
            hex[13..].join(" ")
        )
    }

    #[test]
    fn sums_rows_of_the_real_header() {
        //          entries clash found new inval ign del chain ins ins_f drop early icmp en ec ed restart
        let cpu0 = row([42, 3, 100, 0, 7, 0, 0, 1, 0, 5, 6, 2, 1, 0, 0, 0, 9]);
        let cpu1 = row([42, 4, 0x1f0, 0, 1, 0, 0, 0, 0, 0xa, 0xb, 0, 0, 0, 0, 0, 1]);
        let cpu2 = row([42, 0, 1, 0, 0, 0, 0, 2, 0, 1, 1, 0, 0, 0, 0, 0, 0]);
        let text = format!("{HEADER}\n{cpu0}\n{cpu1}\n{cpu2}\n");

        let stats = parse(&text).unwrap();

        assert_eq!(
            stats,
            ConntrackStats {
                entries: 42,
                found: 100 + 0x1f0 + 1,
                invalid: 8,
                insert: 0,
                insert_failed: 5 + 0xa + 1,
                drop: 6 + 0xb + 1,
                early_drop: 2,
                icmp_error: 1,
                clash_resolve: 7,
                chaintoolong: 3,
                search_restart: 10,
                expect_new: 0,
                expect_create: 0,
                expect_delete: 0,
            }
        );
        assert_eq!(
            stats.labelled(),
            [
                ("insert_failed", 16),
                ("drop", 18),
                ("clash_resolve", 7),
                ("chaintoolong", 3),
                ("early_drop", 2),
                ("invalid", 8),
            ]
        );
    }

    #[test]
    fn entries_comes_from_the_first_row_only() {
        let text = "entries insert_failed\n0000000a 00000001\n0000000b 00000002\n";
        let stats = parse(text).unwrap();
        assert_eq!(stats.entries, 0xa);
        assert_eq!(stats.insert_failed, 3);
    }

    #[test]
    fn columns_are_found_by_name_in_any_order() {
        // An older or newer kernel: columns reordered, one unknown, several missing.
        let text = "drop future_counter insert_failed entries\n\
                    00000001 ffffffff 00000002 00000010\n\
                    00000001 00000000 00000003 00000010\n";
        let stats = parse(text).unwrap();
        assert_eq!(stats.drop, 2);
        assert_eq!(stats.insert_failed, 5);
        assert_eq!(stats.entries, 16);
        assert_eq!(stats.clash_resolve, 0);
        assert_eq!(stats.chaintoolong, 0);
    }

    #[test]
    fn reports_the_bad_token() {
        // Third value (`found`) of the first row is not hex.
        let mut tokens = vec!["00000000"; 17];
        tokens[2] = "0000zz00";
        let bad_row = tokens.join(" ");
        let text = format!("{HEADER}\n{bad_row}\n");
        let err = parse(&text).unwrap_err();
        match &err {
            StatsError::BadHex {
                line,
                column,
                token,
                ..
            } => {
                assert_eq!(*line, 2);
                assert_eq!(column, "found");
                assert_eq!(token, "0000zz00");
            }
            other => panic!("unexpected error {other:?}"),
        }
        let message = err.to_string();
        assert!(message.contains(STAT_FILE), "{message}");
        assert!(message.contains("0000zz00"), "{message}");
    }

    #[test]
    fn rejects_malformed_files() {
        let short = format!("{HEADER}\n00000001 00000002\n");
        assert!(matches!(
            parse(&short),
            Err(StatsError::RowLength {
                line: 2,
                expected: 17,
                found: 2,
                ..
            })
        ));
        let long = format!("{HEADER}\n{} 00000000\n", row([0; 17]));
        assert!(matches!(parse(&long), Err(StatsError::RowLength { .. })));
        assert!(matches!(parse(""), Err(StatsError::MissingHeader { .. })));
        assert!(matches!(
            parse("\n \n"),
            Err(StatsError::MissingHeader { .. })
        ));
        assert!(matches!(parse(HEADER), Err(StatsError::NoRows { .. })));
        assert!(matches!(
            parse("hello world\n1 2\n"),
            Err(StatsError::UnknownHeader { .. })
        ));
        assert!(matches!(
            parse("drop drop\n1 2\n"),
            Err(StatsError::DuplicateColumn { .. })
        ));
        // More than 64 bits.
        assert!(matches!(
            parse("drop\n1ffffffffffffffff\n"),
            Err(StatsError::BadHex { .. })
        ));
        assert!(matches!(
            parse("drop\n-1\n"),
            Err(StatsError::BadHex { .. })
        ));
    }

    #[test]
    fn sums_saturate_instead_of_overflowing() {
        let text = "drop\nffffffffffffffff\n00000002\n";
        assert_eq!(parse(text).unwrap().drop, u64::MAX);
    }

    #[test]
    fn parses_sysctl_numbers() {
        assert_eq!(parse_decimal(COUNT_FILE, "123\n").unwrap(), 123);
        assert!(matches!(
            parse_decimal(MAX_FILE, "12a\n"),
            Err(StatsError::BadDecimal { token, .. }) if token == "12a"
        ));
        assert!(parse_decimal(MAX_FILE, "").is_err());
    }

    #[test]
    fn reads_this_namespace() {
        // procfs is always there on Linux; this checks the real file parses with this parser.
        // Entries come and go between reads, so only that both files parse is asserted.
        read().unwrap();
        assert!(read_table_fill().unwrap().max > 0);
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_text(text in ".*") {
            let _ = parse(&text);
        }

        #[test]
        fn never_panics_on_header_like_text(
            rows in proptest::collection::vec("[0-9a-fA-Fx \\-]{0,40}", 0..5)
        ) {
            let text = format!("{HEADER}\n{}", rows.join("\n"));
            let _ = parse(&text);
        }

        #[test]
        fn sums_any_valid_rows(
            rows in proptest::collection::vec(proptest::array::uniform17(any::<u32>()), 1..8)
        ) {
            let text = format!(
                "{HEADER}\n{}\n",
                rows.iter().map(|r| row(*r)).collect::<Vec<_>>().join("\n")
            );
            let stats = parse(&text).unwrap();
            let column = |i: usize| rows.iter().map(|r| u64::from(r[i])).sum::<u64>();
            prop_assert_eq!(stats.entries, u64::from(rows[0][0]));
            prop_assert_eq!(stats.clash_resolve, column(1));
            prop_assert_eq!(stats.chaintoolong, column(7));
            prop_assert_eq!(stats.insert_failed, column(9));
            prop_assert_eq!(stats.drop, column(10));
            prop_assert_eq!(stats.early_drop, column(11));
        }
    }
}
