//! Default paths, ports and limits, in one place.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// `--metrics-addr`.
pub const METRICS_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 9965);
/// `--socket`.
pub const SOCKET: &str = "/run/podnet/agent.sock";
/// `--state-dir`.
pub const STATE_DIR: &str = "/var/lib/podnet";
/// `--bpffs`.
pub const BPFFS: &str = "/sys/fs/bpf/podnet";
/// `--race-event-budget`.
pub const RACE_EVENT_BUDGET_PER_CPU: u32 = 20_000;
/// Recent races kept for `podnetctl conntrack races`.
pub const RACE_LOG_CAPACITY: usize = 1024;
/// How long the agent waits for its tasks to drain on SIGTERM.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);
