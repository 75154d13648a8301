//! Default paths, ports and limits, in one place (a subsystem's own defaults
//! are declared beside its options and listed here).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// The port of `/metrics`, `/healthz` and `/readyz`. The agent runs in the host network, so
/// the port is bound on every node: 10310 is free in Prometheus' default port allocations
/// (its 9100–9999 exporter range is full; Hubble has 9965, the Cilium agent, operator and
/// proxy 9962–9964) and clear of the defaults of kubelet and kube-proxy (10248–10259),
/// Calico, the AWS VPC CNI and Retina (deploy/README.md, "Metrics port").
pub const METRICS_PORT: u16 = 10310;
/// `--metrics-addr`.
pub const METRICS_ADDR: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), METRICS_PORT);
/// `--socket`.
pub const SOCKET: &str = "/run/podnet/agent.sock";
/// `--state-dir`.
pub const STATE_DIR: &str = "/var/lib/podnet";
/// `--bpffs`.
pub const BPFFS: &str = "/sys/fs/bpf/podnet";
/// `--race-event-budget`.
pub use crate::conntrack::RACE_EVENT_BUDGET_PER_CPU;
/// Recent races kept for `podnetctl conntrack races`.
pub use crate::conntrack::RACE_LOG_CAPACITY;
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
/// `--imds-endpoint`.
pub use crate::cloud::imds::DEFAULT_ENDPOINT as IMDS_ENDPOINT;
/// `--dns-ports`.
pub use crate::dns::DEFAULT_PORTS as DNS_PORTS;
/// `--dns-slow-threshold`.
pub use crate::dns::DEFAULT_SLOW_THRESHOLD as DNS_SLOW_THRESHOLD;
/// `--dns-timeout`.
pub use crate::dns::DEFAULT_TIMEOUT as DNS_TIMEOUT;
/// `--warm-eni-target` (as the AWS VPC CNI).
pub use crate::ipam::service::DEFAULT_WARM_ENI_TARGET as WARM_ENI_TARGET;
/// `--cri-socket`.
pub use crate::pods::DEFAULT_CRI_SOCKET as CRI_SOCKET;
/// `--cri-refresh`.
pub use crate::pods::DEFAULT_REFRESH as CRI_REFRESH;
/// `--cni-conf-dir`.
pub const CNI_CONF_DIR: &str = "/etc/cni/net.d";
/// `--cni-bin-dir`.
pub const CNI_BIN_DIR: &str = "/opt/cni/bin";
/// The CNI configuration podnet installs in `--cni-conf-dir`.
pub const CNI_CONFLIST: &str = "10-podnet.conflist";
/// The CNI plugin binary podnet installs in `--cni-bin-dir`.
pub const CNI_BINARY: &str = "podnet-cni";
