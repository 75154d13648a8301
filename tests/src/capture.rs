//! What an operator runs without podnet to see DNS latency: a packet capture
//! (`dumpcap`) on a pod's host-side interface, then `tshark`'s `dns.time`
//! (query to response time per answer) over the capture file. Benchmarks
//! compare podnet's figures and CPU with this.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{process::spawn_in, util::wait_for, Netns, NsChild};

/// The capture tools, from Debian's `tshark` package (`wireshark-common` brings
/// `dumpcap`); `cargo xtask setup` installs them.
pub const TOOLS: [&str; 2] = ["dumpcap", "tshark"];

/// How long `dumpcap` may take to open its interfaces.
const CAPTURE_START: Duration = Duration::from_secs(10);

/// The capture tools not found on `PATH` (empty when both are there).
pub fn missing_tools() -> Vec<&'static str> {
    TOOLS
        .into_iter()
        .filter(|tool| {
            !Command::new(tool)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .collect()
}

/// User + system CPU time of process `pid` so far, from `/proc/<pid>/stat`.
pub fn process_cpu(pid: u32) -> Result<Duration> {
    let ticks = crate::load::ProcSample::read(pid)?.cpu_ticks;
    // SAFETY: sysconf takes no pointers.
    let hz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) })
        .unwrap_or(100)
        .max(1);
    Ok(Duration::from_nanos(
        ticks.saturating_mul(1_000_000_000) / hz,
    ))
}

/// User + system CPU time of this process's children that have been waited for.
fn children_cpu() -> Result<Duration> {
    // SAFETY: an all-zero rusage is a valid value for getrusage to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &raw mut usage) } != 0 {
        bail!("getrusage: {}", std::io::Error::last_os_error());
    }
    let tv = |t: libc::timeval| {
        Duration::new(
            u64::try_from(t.tv_sec).unwrap_or(0),
            u32::try_from(t.tv_usec).unwrap_or(0) * 1_000,
        )
    };
    Ok(tv(usage.ru_utime) + tv(usage.ru_stime))
}

/// A running `dumpcap` writing every packet of some interfaces to a file.
pub struct Capture {
    child: NsChild,
    file: PathBuf,
}

impl Capture {
    /// Starts `dumpcap` in `netns` on `interfaces`, writing to `file`
    /// (pcapng), and waits until it captures.
    pub fn start(netns: &Netns, interfaces: &[&str], file: &Path) -> Result<Self> {
        let mut cmd = vec!["dumpcap", "-q"];
        for interface in interfaces {
            cmd.extend(["-i", interface]);
        }
        let path = file.to_str().context("capture path is not UTF-8")?;
        cmd.extend(["-w", path]);
        let child = spawn_in(netns, &cmd)?;
        let started = wait_for(
            || std::fs::metadata(file).is_ok_and(|m| m.len() > 0),
            CAPTURE_START,
        );
        if !started {
            bail!("dumpcap did not start capturing: {}", child.log());
        }
        Ok(Self {
            child,
            file: file.to_owned(),
        })
    }

    /// Stops the capture (SIGTERM: `dumpcap` writes out what it has) and
    /// returns the CPU it used, read just before.
    pub fn stop(self) -> Result<Duration> {
        let cpu = process_cpu(self.child.pid())?;
        let log = self.child.log();
        let status = self.child.stop()?;
        // dumpcap handles SIGTERM: it closes the file and exits with 0.
        if !status.success() {
            bail!("dumpcap ended with {status}: {log}");
        }
        Ok(cpu)
    }

    /// The capture file.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// The process id of `dumpcap`.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }
}

/// What `tshark` made of a capture's DNS answers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DnsTimes {
    /// Answers matched to their query (those with a `dns.time`).
    pub answers: u64,
    /// Sum of their `dns.time`, in seconds.
    pub sum_s: f64,
    /// CPU time `tshark` used (user + system).
    pub cpu: Duration,
    /// Wall-clock time it took.
    pub wall: Duration,
}

/// Runs `tshark` over `file` and sums `dns.time` over every answer it
/// matched to a query. Its CPU time is measured from this process's
/// waited-for children (call it while no other child is being reaped).
pub fn tshark_dns_time(file: &Path) -> Result<DnsTimes> {
    let path = file.to_str().context("capture path is not UTF-8")?;
    let before = children_cpu()?;
    let started = Instant::now();
    let out = Command::new("tshark")
        .args([
            "-n",
            "-r",
            path,
            "-Y",
            "dns.flags.response == 1 && dns.time",
            "-T",
            "fields",
            "-e",
            "dns.time",
        ])
        .output()
        .context("running tshark")?;
    let wall = started.elapsed();
    let cpu = children_cpu()?.saturating_sub(before);
    if !out.status.success() {
        bail!(
            "tshark failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (answers, sum_s) = sum_fields(&String::from_utf8_lossy(&out.stdout))?;
    Ok(DnsTimes {
        answers,
        sum_s,
        cpu,
        wall,
    })
}

/// Counts and sums one number per line (blank lines skipped).
fn sum_fields(text: &str) -> Result<(u64, f64)> {
    let mut n = 0;
    let mut sum = 0.0;
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let v: f64 = line
            .parse()
            .with_context(|| format!("tshark printed {line:?}, not a dns.time"))?;
        n += 1;
        sum += v;
    }
    Ok((n, sum))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_times_are_counted_and_summed() {
        let (n, sum) = sum_fields("0.5\n\n0.25\n0.000001\n").unwrap();
        assert_eq!(n, 3);
        assert!((sum - 0.750_001).abs() < 1e-12);
        assert!(sum_fields("0.5\nnot-a-number\n").is_err());
    }

    #[test]
    fn own_cpu_is_read_from_proc() {
        assert!(process_cpu(std::process::id()).is_ok());
    }
}
