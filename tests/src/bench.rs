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
