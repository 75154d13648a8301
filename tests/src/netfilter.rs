//! iptables in a namespace, and the kernel's conntrack statistics of a namespace.

use std::{collections::BTreeMap, process::Output};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::netns::{in_netns, Netns};

/// The per-CPU conntrack statistics of the reading thread's network namespace. `/proc/net`
/// follows the process (its main thread), not a thread that called setns.
const NF_CONNTRACK_STAT: &str = "/proc/thread-self/net/stat/nf_conntrack";

/// Columns of the statistics that hold one namespace-wide value repeated on every CPU's row
/// instead of a per-CPU count.
const GLOBAL_COLUMNS: &[&str] = &["entries"];

/// Runs `iptables -w <args>` in `netns` (Debian's default, the `nf_tables` backend, which
/// works per namespace); fails with the output unless it exits 0. Rules go with the
/// namespace.
pub fn iptables(netns: &Netns, args: &[&str]) -> Result<Output> {
    let mut cmd = vec!["iptables", "-w"];
    cmd.extend_from_slice(args);
    netns.run_ok(&cmd)
}

/// The packets the kernel counted for the first rule of the filter table's FORWARD chain
/// whose listing line contains `needle` (a target such as `DROP`, or a comment).
pub fn forward_rule_packets(netns: &Netns, needle: &str) -> Result<u64> {
    rule_packets(
        &iptables(netns, &["-L", "FORWARD", "-v", "-x", "-n"])?,
        needle,
    )
}

/// Like [`forward_rule_packets`], for ip6tables' FORWARD chain.
pub fn forward6_rule_packets(netns: &Netns, needle: &str) -> Result<u64> {
    rule_packets(
        &ip6tables(netns, &["-L", "FORWARD", "-v", "-x", "-n"])?,
        needle,
    )
}

fn rule_packets(out: &Output, needle: &str) -> Result<u64> {
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    listing
        .lines()
        .find(|l| l.contains(needle))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("no FORWARD rule with {needle:?} in\n{listing}"))
}

/// Runs `ip6tables -w <args>` in `netns`, like [`iptables`].
pub fn ip6tables(netns: &Netns, args: &[&str]) -> Result<Output> {
    let mut cmd = vec!["ip6tables", "-w"];
    cmd.extend_from_slice(args);
    netns.run_ok(&cmd)
}

/// A snapshot of `/proc/net/stat/nf_conntrack` of one namespace: each column summed over
/// CPUs (`entries`, a namespace-wide value, taken once). Column names are the kernel's
/// header: `entries clashres found new invalid ignore delete chainlength insert insert_failed
/// drop early_drop icmp_error expect_new expect_create expect_delete search_restart`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConntrackStats {
    columns: BTreeMap<String, u64>,
}

impl ConntrackStats {
    /// Parses the file's text: a header of column names, then one row of hex numbers per CPU.
    pub fn parse(text: &str) -> Result<Self> {
        let mut lines = text.lines();
        let header: Vec<&str> = lines
            .next()
            .ok_or_else(|| anyhow!("empty conntrack statistics"))?
            .split_whitespace()
            .collect();
        let mut columns: BTreeMap<String, u64> =
            header.iter().map(|name| ((*name).to_owned(), 0)).collect();
        let mut rows = 0;
        for line in lines.filter(|line| !line.trim().is_empty()) {
            let values: Vec<&str> = line.split_whitespace().collect();
            if values.len() != header.len() {
                bail!(
                    "conntrack statistics row has {} values for {} columns: {line:?}",
                    values.len(),
                    header.len()
                );
            }
            for (name, value) in header.iter().zip(values) {
                let value = u64::from_str_radix(value, 16)
                    .with_context(|| format!("column {name}: {value:?} is not hex"))?;
                let total = columns.entry((*name).to_owned()).or_default();
                if GLOBAL_COLUMNS.contains(name) {
                    if rows == 0 {
                        *total = value;
                    }
                } else {
                    *total += value;
                }
            }
            rows += 1;
        }
        if rows == 0 {
            bail!("conntrack statistics without any CPU row");
        }
        Ok(Self { columns })
    }

    /// A column's value; fails for a column the kernel does not print.
    pub fn get(&self, column: &str) -> Result<u64> {
        self.columns.get(column).copied().ok_or_else(|| {
            anyhow!(
                "no conntrack statistic {column:?}; the kernel has {:?}",
                self.columns.keys().collect::<Vec<_>>()
            )
        })
    }

    /// How much a column grew since `earlier`, e.g. `after.delta(&before, "insert_failed")`.
    pub fn delta(&self, earlier: &ConntrackStats, column: &str) -> Result<u64> {
        Ok(self.get(column)?.saturating_sub(earlier.get(column)?))
    }
}

/// Reads the conntrack statistics of `netns` (the kernel's own counters).
pub fn conntrack_stats(netns: &Netns) -> Result<ConntrackStats> {
    let text = in_netns(netns, || std::fs::read_to_string(NF_CONNTRACK_STAT))?
        .with_context(|| format!("reading {NF_CONNTRACK_STAT} in netns {}", netns.name()))?;
    ConntrackStats::parse(&text)
}

/// Reads one column of the conntrack statistics of `netns`, e.g. `insert_failed` or `drop`,
/// summed over CPUs.
pub fn read_conntrack_stat(netns: &Netns, column: &str) -> Result<u64> {
    conntrack_stats(netns)?.get(column)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
entries  clashres found new invalid ignore delete chainlength insert insert_failed drop early_drop icmp_error  expect_new expect_create expect_delete search_restart
00000003  00000001 00000000 00000000 00000002 00000000 00000000 00000000 00000000 00000004 00000004 00000000 00000000  00000000 00000000 00000000 00000000
00000003  00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 0000000a 0000000b 00000000 00000000  00000000 00000000 00000000 00000001
";

    #[test]
    fn sums_per_cpu_rows_and_takes_entries_once() {
        let stats = ConntrackStats::parse(SAMPLE).unwrap();
        assert_eq!(stats.get("entries").unwrap(), 3);
        assert_eq!(stats.get("insert_failed").unwrap(), 14);
        assert_eq!(stats.get("drop").unwrap(), 15);
        assert_eq!(stats.get("clashres").unwrap(), 1);
        assert_eq!(stats.get("search_restart").unwrap(), 1);
        assert!(stats.get("no_such_column").is_err());
    }

    #[test]
    fn delta_between_snapshots() {
        let before = ConntrackStats::parse(SAMPLE).unwrap();
        let after = ConntrackStats::parse(&SAMPLE.replace("0000000a", "0000000f")).unwrap();
        assert_eq!(after.delta(&before, "insert_failed").unwrap(), 5);
        assert_eq!(after.delta(&before, "drop").unwrap(), 0);
    }

    #[test]
    fn rejects_malformed_text() {
        assert!(ConntrackStats::parse("").is_err());
        assert!(ConntrackStats::parse("entries drop\n").is_err());
        assert!(ConntrackStats::parse("entries drop\n1 2 3\n").is_err());
        assert!(ConntrackStats::parse("entries drop\n1 zz\n").is_err());
    }
}
