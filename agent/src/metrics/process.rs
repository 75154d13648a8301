//! The standard `process_*` families of the agent itself, read from `/proc/self` at each
//! scrape: CPU time, resident and virtual memory, start time, open and maximum file
//! descriptors. Names and units are the ones every Prometheus client library exports, so
//! generic dashboards and the agent-health panels work unchanged.
//!
//! Sources (proc(5)): `/proc/self/stat` (utime, stime, starttime in clock ticks),
//! `/proc/self/statm` (sizes in pages), `/proc/stat` (`btime`, boot time in seconds since
//! the epoch), `/proc/self/fd` (one entry per open descriptor) and `/proc/self/limits`.

use std::path::{Path, PathBuf};

use super::text::{Encoder, MetricType};

/// Where the process's own files are.
const PROC_SELF: &str = "/proc/self";
/// Where the boot time is.
const PROC_STAT: &str = "/proc/stat";

/// Errors reading the process's statistics.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// A `/proc` file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A `/proc` file did not have the expected format.
    #[error("parsing {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        message: &'static str,
    },
}

/// The agent process's statistics at one moment.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProcessStats {
    /// User plus system CPU time, seconds.
    pub cpu_seconds: f64,
    /// Resident set size, bytes.
    pub resident_bytes: u64,
    /// Virtual memory size, bytes.
    pub virtual_bytes: u64,
    /// Start time, seconds since the Unix epoch.
    pub start_time_seconds: f64,
    /// Open file descriptors.
    pub open_fds: u64,
    /// The soft limit on open file descriptors, if it is not unlimited.
    pub max_fds: Option<u64>,
}

/// Fields of `/proc/<pid>/stat`, in clock ticks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatTicks {
    /// Field 14, user-mode time.
    pub utime: u64,
    /// Field 15, kernel-mode time.
    pub stime: u64,
    /// Field 22, start time after boot.
    pub starttime: u64,
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) is in parentheses and may itself
/// contain spaces and parentheses, so the fields are counted after its last `)`.
pub fn parse_stat(text: &str) -> Option<StatTicks> {
    let (_, rest) = text.rsplit_once(')')?;
    // rest starts at field 3 (state): field N is at index N - 3.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse().ok();
    Some(StatTicks {
        utime: field(14)?,
        stime: field(15)?,
        starttime: field(22)?,
    })
}

/// Parses `/proc/<pid>/statm`: (total program size, resident set size), in pages.
pub fn parse_statm(text: &str) -> Option<(u64, u64)> {
    let mut fields = text.split_whitespace().map(str::parse::<u64>);
    let size = fields.next()?.ok()?;
    let resident = fields.next()?.ok()?;
    Some((size, resident))
}

/// Parses the `btime` line of `/proc/stat`: boot time, seconds since the epoch.
pub fn parse_btime(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix("btime "))
        .and_then(|value| value.trim().parse().ok())
}

/// Parses the soft limit of `Max open files` in `/proc/<pid>/limits`; `None` when the line
/// is missing or the limit is `unlimited`.
pub fn parse_max_fds(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|soft| soft.parse().ok())
}

/// Combines the parsed sources into [`ProcessStats`].
#[allow(clippy::cast_precision_loss)] // tick counts and boot times are far below 2^52
pub fn compute(
    ticks: StatTicks,
    statm_pages: (u64, u64),
    btime: u64,
    open_fds: u64,
    max_fds: Option<u64>,
    clock_ticks_per_second: u64,
    page_size: u64,
) -> ProcessStats {
    let hz = clock_ticks_per_second.max(1) as f64;
    ProcessStats {
        cpu_seconds: (ticks.utime + ticks.stime) as f64 / hz,
        resident_bytes: statm_pages.1.saturating_mul(page_size),
        virtual_bytes: statm_pages.0.saturating_mul(page_size),
        start_time_seconds: btime as f64 + ticks.starttime as f64 / hz,
        open_fds,
        max_fds,
    }
}

fn read(path: &Path) -> Result<String, ProcessError> {
    std::fs::read_to_string(path).map_err(|source| ProcessError::Read {
        path: path.to_owned(),
        source,
    })
}

fn parse_error(path: &Path, message: &'static str) -> ProcessError {
    ProcessError::Parse {
        path: path.to_owned(),
        message,
    }
}

/// A positive `sysconf` value, or `None`.
fn sysconf(name: libc::c_int) -> Option<u64> {
    // SAFETY: sysconf only reads a configuration value; any name is allowed and an
    // unknown one returns -1.
    let value = unsafe { libc::sysconf(name) };
    u64::try_from(value).ok().filter(|v| *v > 0)
}

/// The size of the process's descriptor table (`FDSize:` of `/proc/self/status`).
pub fn parse_fd_table_size(status: &str) -> Option<usize> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("FDSize:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Open descriptors among the first `table_size`: one `poll` over every slot
/// of the table, which reports a closed one as `POLLNVAL`. Listing
/// `/proc/self/fd` instead costs the kernel a dentry per descriptor, and the
/// agent holds one per attached link (4 ms a scrape with 2,000 links).
/// `None` when the kernel refuses (more slots than the descriptor limit).
fn count_open_fds(table_size: usize) -> Option<u64> {
    let mut slots: Vec<libc::pollfd> = (0..table_size)
        .map_while(|fd| {
            Some(libc::pollfd {
                fd: i32::try_from(fd).ok()?,
                events: 0,
                revents: 0,
            })
        })
        .collect();
    let count = libc::nfds_t::try_from(slots.len()).ok()?;
    // SAFETY: `slots` is a valid pollfd array of `count` entries for the
    // call's duration; a zero timeout never blocks.
    let rc = unsafe { libc::poll(slots.as_mut_ptr(), count, 0) };
    if rc < 0 {
        return None;
    }
    let open = slots
        .iter()
        .filter(|p| p.revents & libc::POLLNVAL == 0)
        .count();
    u64::try_from(open).ok()
}

/// Open descriptors by listing `<root>/fd`.
fn list_open_fds(root: &Path) -> Result<u64, ProcessError> {
    let fd_dir = root.join("fd");
    let listed = std::fs::read_dir(&fd_dir)
        .map_err(|source| ProcessError::Read {
            path: fd_dir.clone(),
            source,
        })?
        .count();
    // The directory handle read_dir held is counted in that listing; it is closed now.
    Ok(u64::try_from(listed.saturating_sub(1)).unwrap_or(u64::MAX))
}

/// Reads the calling process's statistics from `/proc`.
pub fn read_self() -> Result<ProcessStats, ProcessError> {
    let root = Path::new(PROC_SELF);
    let stat_path = root.join("stat");
    let ticks = parse_stat(&read(&stat_path)?)
        .ok_or_else(|| parse_error(&stat_path, "fewer than 22 numeric fields"))?;
    let statm_path = root.join("statm");
    let pages = parse_statm(&read(&statm_path)?)
        .ok_or_else(|| parse_error(&statm_path, "no size and resident fields"))?;
    let proc_stat = Path::new(PROC_STAT);
    let btime =
        parse_btime(&read(proc_stat)?).ok_or_else(|| parse_error(proc_stat, "no btime line"))?;
    let open_fds = match read(&root.join("status"))
        .ok()
        .as_deref()
        .and_then(parse_fd_table_size)
        .and_then(count_open_fds)
    {
        Some(count) => count,
        None => list_open_fds(root)?,
    };
    let max_fds = read(&root.join("limits"))
        .ok()
        .as_deref()
        .and_then(parse_max_fds);
    let hz = sysconf(libc::_SC_CLK_TCK).ok_or_else(|| parse_error(&stat_path, "no _SC_CLK_TCK"))?;
    let page =
        sysconf(libc::_SC_PAGESIZE).ok_or_else(|| parse_error(&statm_path, "no _SC_PAGESIZE"))?;
    Ok(compute(ticks, pages, btime, open_fds, max_fds, hz, page))
}

/// Writes the `process_*` families of `stats`.
pub fn render_stats(enc: &mut Encoder, stats: &ProcessStats) {
    enc.family(
        "process_cpu_seconds_total",
        MetricType::Counter,
        "Total user and system CPU time spent in seconds.",
    )
    .sample(&[], stats.cpu_seconds);
    enc.family(
        "process_resident_memory_bytes",
        MetricType::Gauge,
        "Resident memory size in bytes.",
    )
    .sample(&[], stats.resident_bytes);
    enc.family(
        "process_virtual_memory_bytes",
        MetricType::Gauge,
        "Virtual memory size in bytes.",
    )
    .sample(&[], stats.virtual_bytes);
    enc.family(
        "process_start_time_seconds",
        MetricType::Gauge,
        "Start time of the process since unix epoch in seconds.",
    )
    .sample(&[], stats.start_time_seconds);
    enc.family(
        "process_open_fds",
        MetricType::Gauge,
        "Number of open file descriptors.",
    )
    .sample(&[], stats.open_fds);
    if let Some(max) = stats.max_fds {
        enc.family(
            "process_max_fds",
            MetricType::Gauge,
            "Maximum number of open file descriptors.",
        )
        .sample(&[], max);
    }
}

/// Writes the `process_*` families of the calling process; on a `/proc` read error the
/// families are left out (logged), the rest of the scrape is unaffected.
pub fn render(enc: &mut Encoder) {
    match read_self() {
        Ok(stats) => render_stats(enc, &stats),
        Err(e) => tracing::warn!(error = %e, "reading /proc/self failed; process metrics omitted"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real line, with a command name holding a space and a parenthesis.
    const STAT: &str = "4242 (podnet (x) y) S 1 4242 4242 0 -1 4194560 2771 0 0 0 \
                        153 47 0 0 20 0 9 0 880050 1187299328 3871 18446744073709551615 \
                        1 1 0 0 0 0 0 4096 17666 0 0 0 17 1 0 0 0 0 0\n";

    #[test]
    fn stat_fields_are_counted_after_the_command_name() {
        assert_eq!(
            parse_stat(STAT),
            Some(StatTicks {
                utime: 153,
                stime: 47,
                starttime: 880_050
            })
        );
        assert_eq!(parse_stat("1 (a) S 1 2 3"), None);
        assert_eq!(parse_stat("no parenthesis"), None);
    }

    #[test]
    fn statm_btime_and_limits() {
        assert_eq!(
            parse_statm("289868 3871 2510 1247 0 40512 0\n"),
            Some((289_868, 3871))
        );
        assert_eq!(parse_statm("12"), None);
        assert_eq!(
            parse_btime("cpu  1 2 3\nintr 5\nbtime 1795000000\nprocesses 9\n"),
            Some(1_795_000_000)
        );
        assert_eq!(parse_btime("cpu 1\n"), None);
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             95236                95236                processes \n\
                      Max open files            1048576              1048576              files     \n";
        assert_eq!(parse_max_fds(limits), Some(1_048_576));
        assert_eq!(
            parse_max_fds(
                "Max open files            unlimited            unlimited            files\n"
            ),
            None
        );
    }

    #[test]
    fn computed_units_are_seconds_and_bytes() {
        let ticks = parse_stat(STAT).unwrap();
        let stats = compute(
            ticks,
            (289_868, 3871),
            1_795_000_000,
            9,
            Some(1024),
            100,
            4096,
        );
        assert_eq!(
            stats,
            ProcessStats {
                cpu_seconds: 2.0,
                resident_bytes: 3871 * 4096,
                virtual_bytes: 289_868 * 4096,
                start_time_seconds: 1_795_008_800.5,
                open_fds: 9,
                max_fds: Some(1024),
            }
        );
    }

    #[test]
    fn renders_the_standard_families() {
        let mut enc = Encoder::new();
        let stats = ProcessStats {
            cpu_seconds: 2.5,
            resident_bytes: 15_855_616,
            virtual_bytes: 1_187_299_328,
            start_time_seconds: 1_795_008_800.5,
            open_fds: 9,
            max_fds: None,
        };
        render_stats(&mut enc, &stats);
        let text = enc.finish();
        let samples: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            samples,
            [
                "process_cpu_seconds_total 2.5",
                "process_resident_memory_bytes 15855616",
                "process_virtual_memory_bytes 1187299328",
                "process_start_time_seconds 1795008800.5",
                "process_open_fds 9",
            ]
        );
        assert!(text.contains("# TYPE process_cpu_seconds_total counter\n"));
        assert!(text.contains("# TYPE process_open_fds gauge\n"));
    }

    #[test]
    fn reads_this_process() {
        let stats = read_self().unwrap();
        // This test process has at least stdin, stdout and stderr open and some memory.
        assert!(stats.open_fds >= 3, "{stats:?}");
        assert!(stats.resident_bytes > 0 && stats.virtual_bytes >= stats.resident_bytes);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(stats.start_time_seconds <= now + 1.0, "{stats:?}");
    }

    #[test]
    fn open_descriptors_are_counted_by_one_poll_like_the_fd_listing() {
        assert_eq!(parse_fd_table_size("Name:\tx\nFDSize:\t256\n"), Some(256));
        assert_eq!(parse_fd_table_size("Name:\tx\n"), None);
        let count = || {
            let status = std::fs::read_to_string("/proc/self/status").unwrap();
            count_open_fds(parse_fd_table_size(&status).unwrap()).unwrap()
        };
        // Other tests' threads open and close descriptors too: compare only
        // when the count did not move around the listing.
        for _ in 0..100 {
            let before = count();
            let listed = list_open_fds(Path::new(PROC_SELF)).unwrap();
            let files: Vec<_> = (0..3)
                .map(|_| std::fs::File::open("/proc/self/status").unwrap())
                .collect();
            let with_three = count();
            drop(files);
            if count() != before {
                continue;
            }
            assert_eq!(listed, before);
            assert_eq!(with_three, before + 3);
            return;
        }
        panic!("the descriptor count never held still for one comparison");
    }
}
