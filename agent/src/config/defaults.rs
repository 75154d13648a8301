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
/// How often the agent hands freed heap back to the kernel (see
/// [`crate::memory`]).
pub const HEAP_TRIM_INTERVAL: std::time::Duration = std::time::Duration::from_mins(1);
/// How often the agent saves the counters it exposes, for the next agent (see
/// [`crate::metrics::continuity`]); also on SIGTERM.
pub const METRICS_SAVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(15);
/// How often the agent checks that its `--bpffs` directory is still on bpffs.
pub const PIN_DIR_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);
/// `--dns-timeout`.
pub const DNS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// `--dns-ports`.
pub const DNS_PORTS: &[u16] = &[53];
/// `--dns-slow-threshold`.
pub const DNS_SLOW_THRESHOLD: std::time::Duration = std::time::Duration::from_millis(200);
/// `--warm-eni-target` (as the AWS VPC CNI).
pub const WARM_ENI_TARGET: u32 = 1;
/// `--imds-endpoint`.
pub const IMDS_ENDPOINT: &str = crate::cloud::imds::DEFAULT_ENDPOINT;
/// `--cni-conf-dir`.
pub const CNI_CONF_DIR: &str = "/etc/cni/net.d";
/// `--cni-bin-dir`.
pub const CNI_BIN_DIR: &str = "/opt/cni/bin";
/// The CNI configuration podnet installs in `--cni-conf-dir`.
pub const CNI_CONFLIST: &str = "10-podnet.conflist";
/// The CNI plugin binary podnet installs in `--cni-bin-dir`.
pub const CNI_BINARY: &str = "podnet-cni";
