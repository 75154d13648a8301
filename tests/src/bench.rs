//! Measurement helpers for `podnet-bench`: kernel program statistics and
//! paced traffic.

use std::{
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::netns::{in_netns, Netns};

/// `kernel.bpf_stats_enabled` set to 1 while alive, restored on drop.
#[derive(Debug)]
pub struct BpfStats {
    previous: String,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    /// Turns run-time accounting of BPF programs on.
    pub fn enable() -> Result<Self> {
        let previous = std::fs::read_to_string(BPF_STATS)
            .with_context(|| format!("reading {BPF_STATS}"))?
            .trim()
            .to_owned();
        std::fs::write(BPF_STATS, "1").with_context(|| format!("writing {BPF_STATS}"))?;
        Ok(Self { previous })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(BPF_STATS, &self.previous);
    }
}

/// Run time and run count of one program, as `bpftool prog show` reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProgStats {
    /// Total nanoseconds spent in the program.
    pub run_time_ns: u64,
    /// Number of runs.
    pub run_cnt: u64,
}

impl ProgStats {
    /// Reads the statistics of program `id`.
    pub fn read(id: u32) -> Result<Self> {
        let out = std::process::Command::new("bpftool")
            .args(["prog", "show", "id", &id.to_string(), "--json"])
            .output()
            .context("running bpftool")?;
        if !out.status.success() {
            bail!(
                "bpftool prog show id {id}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        Ok(Self {
            run_time_ns: v["run_time_ns"].as_u64().unwrap_or(0),
            run_cnt: v["run_cnt"].as_u64().unwrap_or(0),
        })
    }

    /// Nanoseconds per run between `earlier` and `self`.
    pub fn ns_per_run_since(&self, earlier: &Self) -> Option<f64> {
        let runs = self.run_cnt.checked_sub(earlier.run_cnt)?;
        let time = self.run_time_ns.checked_sub(earlier.run_time_ns)?;
        #[allow(clippy::cast_precision_loss)] // ratios of counts far below 2^52
        (runs > 0).then(|| time as f64 / runs as f64)
    }

    /// Runs between `earlier` and `self`.
    pub fn runs_since(&self, earlier: &Self) -> u64 {
        self.run_cnt.saturating_sub(earlier.run_cnt)
    }
}

/// The median of `values`: the mean of the two middle ones for an even
/// count, NaN for none. Benchmarks take the median of per-round ratios, which
/// a burst of other work on the machine during one round does not move.
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => f64::midpoint(values[n / 2 - 1], values[n / 2]),
    }
}

/// Sends UDP datagrams from `src` to `dst` inside `netns` at about `rate`
/// per second (0: as fast as possible) for `duration`. Returns how many were
/// sent and how long it took.
pub fn udp_flood(
    netns: &Netns,
    src: SocketAddr,
    dst: SocketAddr,
    rate: u64,
    duration: Duration,
) -> Result<(u64, Duration)> {
    in_netns(netns, || -> Result<(u64, Duration)> {
        let socket = UdpSocket::bind(src).with_context(|| format!("binding {src}"))?;
        let start = Instant::now();
        let mut sent = 0u64;
        while start.elapsed() < duration {
            if rate > 0 {
                // Pace in 1 ms slices: send what the elapsed time allows.
                let allowed = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX) * rate
                    / 1_000_000;
                if sent >= allowed {
                    std::thread::sleep(Duration::from_micros(200));
                    continue;
                }
            }
            // ENOBUFS and friends under load: the datagram was not sent; skip it.
            if socket.send_to(b"bench", dst).is_ok() {
                sent += 1;
            }
        }
        Ok((sent, start.elapsed()))
    })?
}

/// The port `sockperf server` listens on in the benchmarks.
pub const SOCKPERF_PORT: &str = "11111";
/// The port `iperf3 -s` listens on in the benchmarks.
pub const IPERF_PORT: &str = "5201";
/// sockperf message size (bytes).
pub const MESSAGE: &str = "64";

/// `sockperf ping-pong` over TCP from `pod` to `server` for `seconds`:
/// (average latency in µs, half a round trip as sockperf reports it;
/// requests per second).
pub fn sockperf(pod: &Netns, server: &str, seconds: u64) -> Result<(f64, f64)> {
    let out = pod.run_ok(&[
        "sockperf",
        "pp",
        "--tcp",
        "-i",
        server,
        "-p",
        SOCKPERF_PORT,
        "-m",
        MESSAGE,
        "-t",
        &seconds.to_string(),
    ])?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let latency: f64 = text
        .lines()
        .find_map(|l| l.split("Latency is ").nth(1))
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no latency in sockperf output:\n{text}"))?;
    let valid = text
        .lines()
        .find(|l| l.contains("[Valid Duration]"))
        .with_context(|| format!("no valid duration in sockperf output:\n{text}"))?;
    let field = |name: &str| -> Option<f64> {
        valid
            .split(name)
            .nth(1)?
            .split(|c: char| c == ';' || c.is_whitespace())
            .next()?
            .trim_end_matches("sec")
            .parse()
            .ok()
    };
    let runtime = field("RunTime=").context("RunTime")?;
    let received = field("ReceivedMessages=").context("ReceivedMessages")?;
    Ok((latency, received / runtime))
}

/// iperf3 TCP throughput from `pod` to `server` over `seconds`, Gbit/s.
pub fn iperf3(pod: &Netns, server: &str, seconds: u64) -> Result<f64> {
    let out = pod.run_ok(&[
        "iperf3",
        "-c",
        server,
        "-p",
        IPERF_PORT,
        "-t",
        &seconds.to_string(),
        "-J",
    ])?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .context("no throughput in iperf3 output")
}

/// The machine a benchmark ran on: kernel, CPUs, memory.
pub fn machine() -> serde_json::Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map_or("unknown", str::trim)
        .to_owned();
    serde_json::json!({
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "cpus": std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        "cpu": cpu,
        "memory_kib": read("/proc/meminfo").lines().next().and_then(|l| l.split_whitespace().nth(1)).unwrap_or("0"),
    })
}

/// Where a text benchmark writes its key figures as JSON: the path in
/// `PODNET_BENCH_JSON` (`cargo xtask bench` sets it), or nowhere.
pub const JSON_ENV: &str = "PODNET_BENCH_JSON";

/// Writes `figures` to the file named by [`JSON_ENV`], if set.
pub fn write_json_figures(figures: &serde_json::Value) -> Result<()> {
    if let Some(path) = std::env::var_os(JSON_ENV) {
        let text = serde_json::to_string_pretty(figures)? + "\n";
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert!((median(vec![3.0, 1.0, 2.0]) - 2.0).abs() < 1e-12);
        assert!((median(vec![4.0, 1.0]) - 2.5).abs() < 1e-12);
        assert!(median(Vec::new()).is_nan());
    }
}
