//! The agent's configuration: command-line flags with `PODNET_*` environment
//! twins, an optional YAML file with the same keys (`--config`, a ConfigMap),
//! and defaults. Precedence: flag or environment, then file, then default.

pub mod defaults;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use clap::{Parser, ValueEnum};
use serde::Deserialize;

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// podnet-agent: eBPF node networking agent. Observes the network namespace
/// it runs in.
#[derive(Debug, Parser)]
#[command(name = "podnet-agent", version)]
pub struct AgentArgs {
    /// Address of /metrics, /healthz and /readyz [default: 0.0.0.0:9965].
    #[arg(long, env = "PODNET_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Unix socket of the local API for podnet-cni and podnetctl (mode 0600)
    /// [default: /run/podnet/agent.sock].
    #[arg(long, env = "PODNET_SOCKET")]
    pub socket: Option<PathBuf>,
    /// Directory of the IPAM checkpoint and endpoint registry
    /// [default: /var/lib/podnet].
    #[arg(long, env = "PODNET_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// bpffs directory for pinned maps and links [default: /sys/fs/bpf/podnet].
    #[arg(long, env = "PODNET_BPFFS")]
    pub bpffs: Option<PathBuf>,
    /// YAML file preloading the endpoint registry; re-read when it changes.
    #[arg(long, env = "PODNET_ENDPOINTS")]
    pub endpoints: Option<PathBuf>,
    /// Race events per CPU per second sent to user space with full detail;
    /// counts stay exact above it [default: 20000; 0 = unlimited].
    #[arg(long, env = "PODNET_RACE_EVENT_BUDGET")]
    pub race_event_budget: Option<u32>,
    /// Hook that counts insert races: `tracepoint` (the drop tracepoint),
    /// `probe` (adds a kretprobe on `__nf_conntrack_confirm`, where the kernel
    /// has kprobes), or `auto`: the probe where kprobes exist, else the
    /// tracepoint [default: auto].
    #[arg(long, env = "PODNET_RACE_HOOK", value_enum)]
    pub race_hook: Option<crate::conntrack::tracer::RaceHookChoice>,
    /// How the DNS and fast-path programs attach: `auto` (tcx where the
    /// kernel has it, 6.6+, else classic tc: clsact qdisc and a bpf filter),
    /// `tcx`, or `tc` [default: auto].
    #[arg(long, env = "PODNET_TC_ATTACH", value_enum)]
    pub tc_attach: Option<crate::bpf::tc::TcModeChoice>,
    /// A DNS query with no answer by then is a timeout (e.g. `5s`, `500ms`)
    /// [default: 5s].
    #[arg(long, env = "PODNET_DNS_TIMEOUT", value_parser = duration_arg)]
    pub dns_timeout: Option<std::time::Duration>,
    /// Host interfaces whose DNS traffic is traced too (host-network pods),
    /// comma-separated.
    #[arg(long, env = "PODNET_UPLINKS", value_delimiter = ',')]
    pub uplinks: Option<Vec<String>>,
    /// DNS server ports, comma-separated, at most 8 [default: 53].
    #[arg(long, env = "PODNET_DNS_PORTS", value_delimiter = ',')]
    pub dns_ports: Option<Vec<u16>>,
    /// DNS answers slower than this are logged with their query name
    /// (`podnetctl dns slow`) [default: 200ms].
    #[arg(long, env = "PODNET_DNS_SLOW_THRESHOLD", value_parser = duration_arg)]
    pub dns_slow_threshold: Option<std::time::Duration>,
    /// IPAM mode: `node-cidr` (the node's pod CIDR) or `eni` (secondary
    /// addresses of ENIs, from a warm pool) [default: node-cidr].
    #[arg(long, env = "PODNET_IPAM_MODE", value_enum)]
    pub ipam_mode: Option<crate::ipam::IpamMode>,
    /// Pod CIDR(s) of this node in node-cidr mode, comma-separated (at most
    /// one address per family per pod, e.g. `10.244.1.0/24,fd00:10:244:1::/64`).
    #[arg(long, env = "PODNET_NODE_CIDR")]
    pub node_cidr: Option<crate::net::CidrList>,
    /// This node's name: in node-cidr mode without --node-cidr, the agent reads the pod
    /// CIDRs of this Node (one GET of `spec.podCIDRs` through the in-cluster service
    /// account) before it serves pods. The DaemonSet sets it from `spec.nodeName`.
    #[arg(long, env = "PODNET_NODE_NAME")]
    pub node_name: Option<String>,
    /// YAML list of this node's ENIs (`name`, `mac`, `table`, `subnet`,
    /// `gateway`, `ips`: the secondary addresses given to pods); re-read when
    /// it changes.
    #[arg(long, env = "PODNET_ENIS")]
    pub enis: Option<PathBuf>,
    /// Destinations that are not masqueraded and that the fast path may steer
    /// to, comma-separated [default: the ENIs' subnets].
    #[arg(long, env = "PODNET_VPC_CIDRS", value_delimiter = ',')]
    pub vpc_cidrs: Option<Vec<crate::net::Ipv4Cidr>>,
    /// Service CIDRs, comma-separated: the fast path leaves them to the
    /// kernel (kube-proxy translates them).
    #[arg(long, env = "PODNET_SERVICE_CIDRS", value_delimiter = ',')]
    pub service_cidrs: Option<Vec<crate::net::Ipv4Cidr>>,
    /// Masquerade pod traffic leaving the VPC (`--snat=true|false`)
    /// [default: true when ENIs are configured].
    #[arg(long, env = "PODNET_SNAT", num_args = 0..=1, default_missing_value = "true")]
    pub snat: Option<bool>,
    /// Steer pod traffic to its ENI in eBPF, past netfilter and conntrack
    /// [default: false].
    #[arg(long, env = "PODNET_FAST_PATH", num_args = 0..=1, default_missing_value = "true")]
    pub fast_path: Option<bool>,
    /// ENI mode: free addresses to keep ready; with --minimum-ip-target it
    /// takes precedence over --warm-eni-target [default: unset].
    #[arg(long, env = "PODNET_WARM_IP_TARGET")]
    pub warm_ip_target: Option<u32>,
    /// ENI mode: addresses to hold at least, free or not [default: unset].
    #[arg(long, env = "PODNET_MINIMUM_IP_TARGET")]
    pub minimum_ip_target: Option<u32>,
    /// ENI mode: whole ENIs' worth of free addresses to keep when no IP
    /// target is set [default: 1].
    #[arg(long, env = "PODNET_WARM_ENI_TARGET")]
    pub warm_eni_target: Option<u32>,
    /// ENI mode: EC2 API endpoint, e.g. a local emulator
    /// [default: `https://ec2.<region>.amazonaws.com`].
    #[arg(long, env = "PODNET_CLOUD_ENDPOINT")]
    pub cloud_endpoint: Option<String>,
    /// ENI mode: instance metadata endpoint [default: `http://169.254.169.254`].
    #[arg(long, env = "PODNET_IMDS_ENDPOINT")]
    pub imds_endpoint: Option<String>,
    /// Log format.
    #[arg(long, env = "PODNET_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// One YAML file with the same keys as the flags (for a ConfigMap).
    #[arg(long, env = "PODNET_CONFIG")]
    pub config: Option<PathBuf>,
    /// Directory of the CNI configuration podnet installed
    /// (`10-podnet.conflist`) [default: /etc/cni/net.d].
    #[arg(long, env = "PODNET_CNI_CONF_DIR")]
    pub cni_conf_dir: Option<PathBuf>,
    /// Directory of the CNI plugin binary podnet installed (`podnet-cni`)
    /// [default: /opt/cni/bin].
    #[arg(long, env = "PODNET_CNI_BIN_DIR")]
    pub cni_bin_dir: Option<PathBuf>,
    /// Remove everything podnet installed on this node (pins and the programs
    /// they hold, owned rules, routes and proxy-ARP entries, the SNAT chain,
    /// the CNI config and binary, the API socket), print what was removed and
    /// exit; for uninstall. No environment twin: an action, not a setting.
    #[arg(long)]
    pub cleanup: bool,
}

/// The `--config` file: the same keys as the flags, in kebab-case.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ConfigFile {
    /// See [`AgentArgs::metrics_addr`].
    pub metrics_addr: Option<SocketAddr>,
    /// See [`AgentArgs::socket`].
    pub socket: Option<PathBuf>,
    /// See [`AgentArgs::state_dir`].
    pub state_dir: Option<PathBuf>,
    /// See [`AgentArgs::bpffs`].
    pub bpffs: Option<PathBuf>,
    /// See [`AgentArgs::endpoints`].
    pub endpoints: Option<PathBuf>,
    /// See [`AgentArgs::race_event_budget`].
    pub race_event_budget: Option<u32>,
    /// See [`AgentArgs::race_hook`].
    pub race_hook: Option<crate::conntrack::tracer::RaceHookChoice>,
    /// See [`AgentArgs::tc_attach`].
    pub tc_attach: Option<crate::bpf::tc::TcModeChoice>,
    /// See [`AgentArgs::log_format`].
    pub log_format: Option<LogFormat>,
    /// See [`AgentArgs::ipam_mode`].
    pub ipam_mode: Option<crate::ipam::IpamMode>,
    /// See [`AgentArgs::node_cidr`].
    pub node_cidr: Option<crate::net::CidrList>,
    /// See [`AgentArgs::node_name`].
    pub node_name: Option<String>,
    /// See [`AgentArgs::enis`].
    pub enis: Option<PathBuf>,
    /// See [`AgentArgs::vpc_cidrs`].
    pub vpc_cidrs: Option<Vec<crate::net::Ipv4Cidr>>,
    /// See [`AgentArgs::service_cidrs`].
    pub service_cidrs: Option<Vec<crate::net::Ipv4Cidr>>,
    /// See [`AgentArgs::warm_ip_target`].
    pub warm_ip_target: Option<u32>,
    /// See [`AgentArgs::minimum_ip_target`].
    pub minimum_ip_target: Option<u32>,
    /// See [`AgentArgs::warm_eni_target`].
    pub warm_eni_target: Option<u32>,
    /// See [`AgentArgs::cloud_endpoint`].
    pub cloud_endpoint: Option<String>,
    /// See [`AgentArgs::imds_endpoint`].
    pub imds_endpoint: Option<String>,
    /// See [`AgentArgs::snat`].
    pub snat: Option<bool>,
    /// See [`AgentArgs::fast_path`].
    pub fast_path: Option<bool>,
    /// See [`AgentArgs::dns_timeout`].
    #[serde(default, deserialize_with = "duration_key")]
    pub dns_timeout: Option<std::time::Duration>,
    /// See [`AgentArgs::uplinks`].
    pub uplinks: Option<Vec<String>>,
    /// See [`AgentArgs::dns_ports`].
    pub dns_ports: Option<Vec<u16>>,
    /// See [`AgentArgs::dns_slow_threshold`].
    #[serde(default, deserialize_with = "duration_key")]
    pub dns_slow_threshold: Option<std::time::Duration>,
    /// See [`AgentArgs::cni_conf_dir`].
    pub cni_conf_dir: Option<PathBuf>,
    /// See [`AgentArgs::cni_bin_dir`].
    pub cni_bin_dir: Option<PathBuf>,
}

/// Parses a duration flag such as `5s`, `500ms` or `1.5s` (1 ms to 60 s).
fn duration_arg(s: &str) -> Result<std::time::Duration, String> {
    podnet_api::duration::parse(s)
        .ok_or_else(|| format!("{s:?} is not a duration like \"5s\" or \"500ms\" (1ms to 60s)"))
}

/// Reads a duration key of the config file (same syntax as the flag).
fn duration_key<'de, D>(d: D) -> Result<Option<std::time::Duration>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let s = String::deserialize(d)?;
    duration_arg(&s).map(Some).map_err(serde::de::Error::custom)
}

/// The effective configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentConfig {
    /// Metrics listen address.
    pub metrics_addr: SocketAddr,
    /// API socket path.
    pub socket: PathBuf,
    /// State directory.
    pub state_dir: PathBuf,
    /// bpffs pin directory.
    pub bpffs: PathBuf,
    /// Endpoints file, if any.
    pub endpoints: Option<PathBuf>,
    /// Race event budget per CPU per second.
    pub race_event_budget: u32,
    /// Race hook choice.
    pub race_hook: crate::conntrack::tracer::RaceHookChoice,
    /// tc attach mode choice.
    pub tc_attach: crate::bpf::tc::TcModeChoice,
    /// Log format.
    pub log_format: LogFormat,
    /// IPAM mode.
    pub ipam_mode: crate::ipam::IpamMode,
    /// Pod CIDRs of this node.
    pub node_cidrs: Vec<crate::net::Cidr>,
    /// This node's name, whose Node object gives the pod CIDRs when none are set.
    pub node_name: Option<String>,
    /// Static ENI description, if any.
    pub enis: Option<PathBuf>,
    /// ENI mode: warm pool targets and endpoints.
    pub eni: crate::ipam::eni::EniSettings,
    /// VPC destinations (empty: the ENIs' subnets).
    pub vpc_cidrs: Vec<crate::net::Ipv4Cidr>,
    /// Service CIDRs the fast path leaves to the kernel.
    pub service_cidrs: Vec<crate::net::Ipv4Cidr>,
    /// SNAT on or off; `None`: on when ENIs are configured.
    pub snat: Option<bool>,
    /// The eBPF fast path.
    pub fast_path: bool,
    /// DNS timeout.
    pub dns_timeout: std::time::Duration,
    /// Uplink interfaces traced for DNS.
    pub uplinks: Vec<String>,
    /// DNS server ports.
    pub dns_ports: Vec<u16>,
    /// DNS slow-answer threshold.
    pub dns_slow_threshold: std::time::Duration,
    /// Directory of the installed CNI configuration.
    pub cni_conf_dir: PathBuf,
    /// Directory of the installed CNI plugin binary.
    pub cni_bin_dir: PathBuf,
    /// `--cleanup`: remove what podnet installed and exit.
    pub cleanup: bool,
}

/// Errors building the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("reading config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The config file is invalid; the message names the key.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// serde's message, which names the offending key and its location.
        message: String,
    },
    /// A setting has an unusable value.
    #[error("{0}")]
    Invalid(String),
}

/// Parses a config file's text.
pub fn parse_config_file(path: &Path, text: &str) -> Result<ConfigFile, ConfigError> {
    if text.trim().is_empty() {
        return Ok(ConfigFile::default());
    }
    serde_yaml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: naming_the_key(text, &e.to_string()),
    })
}

/// `serde_yaml` names the key in type errors, but not in the errors a value's
/// own parser raises (a prefix with host bits, a bad duration): find the
/// top-level key whose value fails alone and put it in front.
fn naming_the_key(text: &str, message: &str) -> String {
    let Ok(serde_yaml::Value::Mapping(map)) = serde_yaml::from_str(text) else {
        return message.to_owned();
    };
    let failing = map.into_iter().find_map(|(key, value)| {
        let name = key.as_str()?.to_owned();
        let alone = serde_yaml::Mapping::from_iter([(key, value)]);
        serde_yaml::from_value::<ConfigFile>(serde_yaml::Value::Mapping(alone))
            .is_err()
            .then_some(name)
    });
    match failing {
        Some(key) if !message.contains(key.as_str()) => format!("{key}: {message}"),
        _ => message.to_owned(),
    }
}

impl AgentConfig {
    /// The Node whose `spec.podCIDRs` the agent must read before it can give addresses:
    /// node-cidr mode, no CIDR configured, and a node name known.
    pub fn node_to_ask_for_pod_cidrs(&self) -> Option<&str> {
        (self.ipam_mode == crate::ipam::IpamMode::NodeCidr && self.node_cidrs.is_empty())
            .then_some(self.node_name.as_deref())
            .flatten()
    }

    /// Resolves flags, the config file they name, and defaults.
    pub fn resolve(args: AgentArgs) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                parse_config_file(path, &text)?
            }
            None => ConfigFile::default(),
        };
        Self::resolve_with(args, file)
    }

    /// Resolves flags over an already parsed config file, then defaults, and
    /// checks the result: what [`Self::resolve`] does once the file is read.
    pub fn resolve_with(args: AgentArgs, file: ConfigFile) -> Result<Self, ConfigError> {
        let config = Self::merge(args, file);
        config.check_dns()?;
        Ok(config)
    }

    /// Checks the DNS settings the kernel programs can hold.
    fn check_dns(&self) -> Result<(), ConfigError> {
        let max = podnet_common::dns::MAX_PORTS;
        if self.dns_ports.is_empty() || self.dns_ports.len() > max || self.dns_ports.contains(&0) {
            return Err(ConfigError::Invalid(format!(
                "--dns-ports must list 1 to {max} ports other than 0, not {:?}",
                self.dns_ports
            )));
        }
        Ok(())
    }

    fn merge(args: AgentArgs, file: ConfigFile) -> Self {
        Self {
            metrics_addr: args
                .metrics_addr
                .or(file.metrics_addr)
                .unwrap_or(defaults::METRICS_ADDR),
            socket: args
                .socket
                .or(file.socket)
                .unwrap_or_else(|| PathBuf::from(defaults::SOCKET)),
            state_dir: args
                .state_dir
                .or(file.state_dir)
                .unwrap_or_else(|| PathBuf::from(defaults::STATE_DIR)),
            bpffs: args
                .bpffs
                .or(file.bpffs)
                .unwrap_or_else(|| PathBuf::from(defaults::BPFFS)),
            endpoints: args.endpoints.or(file.endpoints),
            race_hook: args.race_hook.or(file.race_hook).unwrap_or_default(),
            tc_attach: args.tc_attach.or(file.tc_attach).unwrap_or_default(),
            race_event_budget: args
                .race_event_budget
                .or(file.race_event_budget)
                .unwrap_or(defaults::RACE_EVENT_BUDGET_PER_CPU),
            log_format: args.log_format.or(file.log_format).unwrap_or_default(),
            ipam_mode: args.ipam_mode.or(file.ipam_mode).unwrap_or_default(),
            node_cidrs: args.node_cidr.or(file.node_cidr).unwrap_or_default().0,
            node_name: args.node_name.or(file.node_name),
            enis: args.enis.or(file.enis),
            eni: crate::ipam::eni::EniSettings {
                targets: crate::ipam::eni::warm::Targets {
                    warm_ip: args.warm_ip_target.or(file.warm_ip_target),
                    minimum_ip: args.minimum_ip_target.or(file.minimum_ip_target),
                    warm_eni: args
                        .warm_eni_target
                        .or(file.warm_eni_target)
                        .unwrap_or(defaults::WARM_ENI_TARGET),
                },
                cloud_endpoint: args.cloud_endpoint.or(file.cloud_endpoint),
                imds_endpoint: args
                    .imds_endpoint
                    .or(file.imds_endpoint)
                    .unwrap_or_else(|| defaults::IMDS_ENDPOINT.to_owned()),
            },
            vpc_cidrs: args.vpc_cidrs.or(file.vpc_cidrs).unwrap_or_default(),
            service_cidrs: args
                .service_cidrs
                .or(file.service_cidrs)
                .unwrap_or_default(),
            snat: args.snat.or(file.snat),
            fast_path: args.fast_path.or(file.fast_path).unwrap_or(false),
            dns_timeout: args
                .dns_timeout
                .or(file.dns_timeout)
                .unwrap_or(defaults::DNS_TIMEOUT),
            uplinks: args.uplinks.or(file.uplinks).unwrap_or_default(),
            dns_ports: args
                .dns_ports
                .or(file.dns_ports)
                .unwrap_or_else(|| defaults::DNS_PORTS.to_vec()),
            dns_slow_threshold: args
                .dns_slow_threshold
                .or(file.dns_slow_threshold)
                .unwrap_or(defaults::DNS_SLOW_THRESHOLD),
            cni_conf_dir: args
                .cni_conf_dir
                .or(file.cni_conf_dir)
                .unwrap_or_else(|| PathBuf::from(defaults::CNI_CONF_DIR)),
            cni_bin_dir: args
                .cni_bin_dir
                .or(file.cni_bin_dir)
                .unwrap_or_else(|| PathBuf::from(defaults::CNI_BIN_DIR)),
            cleanup: args.cleanup,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(argv: &[&str]) -> AgentArgs {
        AgentArgs::try_parse_from(std::iter::once("podnet-agent").chain(argv.iter().copied()))
            .unwrap()
    }

    #[test]
    fn defaults_apply() {
        let c = AgentConfig::merge(args(&[]), ConfigFile::default());
        assert_eq!(c.metrics_addr.to_string(), "0.0.0.0:9965");
        assert_eq!(c.socket, PathBuf::from("/run/podnet/agent.sock"));
        assert_eq!(c.bpffs, PathBuf::from("/sys/fs/bpf/podnet"));
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/podnet"));
        assert_eq!(c.race_event_budget, 20_000);
    }

    #[test]
    fn routing_flags() {
        let c = AgentConfig::merge(args(&[]), ConfigFile::default());
        assert_eq!((c.fast_path, c.snat, c.enis.clone()), (false, None, None));
        let c = AgentConfig::merge(
            args(&[
                "--fast-path",
                "--snat=false",
                "--vpc-cidrs",
                "10.0.0.0/16,172.16.0.0/12",
                "--enis",
                "/etc/podnet/enis.yaml",
            ]),
            ConfigFile::default(),
        );
        assert!(c.fast_path);
        assert_eq!(c.snat, Some(false));
        assert_eq!(c.vpc_cidrs.len(), 2);
        assert_eq!(c.vpc_cidrs[1].to_string(), "172.16.0.0/12");
        let file = parse_config_file(
            Path::new("c.yaml"),
            "fast-path: true\nsnat: true\nservice-cidrs: [10.96.0.0/12]\n",
        )
        .unwrap();
        let c = AgentConfig::merge(args(&[]), file);
        assert_eq!((c.fast_path, c.snat), (true, Some(true)));
        assert_eq!(c.service_cidrs[0].to_string(), "10.96.0.0/12");
        assert!(AgentArgs::try_parse_from(["podnet-agent", "--vpc-cidrs", "10.0.0.0"]).is_err());
    }

    #[test]
    fn the_node_is_asked_only_when_node_cidr_mode_has_no_cidr() {
        let c = AgentConfig::merge(args(&["--node-name", "node-1"]), ConfigFile::default());
        assert_eq!(c.node_to_ask_for_pod_cidrs(), Some("node-1"));
        let c = AgentConfig::merge(
            args(&["--node-name", "node-1", "--node-cidr", "10.244.1.0/24"]),
            ConfigFile::default(),
        );
        assert_eq!(c.node_to_ask_for_pod_cidrs(), None);
        let c = AgentConfig::merge(
            args(&["--node-name", "node-1", "--ipam-mode", "eni"]),
            ConfigFile::default(),
        );
        assert_eq!(c.node_to_ask_for_pod_cidrs(), None);
        let c = AgentConfig::merge(args(&[]), ConfigFile::default());
        assert_eq!(c.node_to_ask_for_pod_cidrs(), None);
        let file = parse_config_file(Path::new("c.yaml"), "node-name: node-2\n").unwrap();
        let c = AgentConfig::merge(args(&[]), file);
        assert_eq!(c.node_to_ask_for_pod_cidrs(), Some("node-2"));
    }

    #[test]
    fn flags_win_over_the_file() {
        let file = parse_config_file(
            Path::new("c.yaml"),
            "metrics-addr: 127.0.0.1:1\nbpffs: /sys/fs/bpf/x\n",
        )
        .unwrap();
        let c = AgentConfig::merge(args(&["--metrics-addr", "127.0.0.1:2"]), file);
        assert_eq!(c.metrics_addr.to_string(), "127.0.0.1:2");
        assert_eq!(c.bpffs, PathBuf::from("/sys/fs/bpf/x"));
    }

    #[test]
    fn dns_settings() {
        let c = AgentConfig::merge(args(&[]), ConfigFile::default());
        assert_eq!(c.dns_timeout, std::time::Duration::from_secs(5));
        assert_eq!(c.dns_ports, vec![53]);
        assert_eq!(c.dns_slow_threshold, std::time::Duration::from_millis(200));
        assert!(c.uplinks.is_empty());
        let file = parse_config_file(
            Path::new("c.yaml"),
            "dns-timeout: 2s\ndns-ports: [53, 5353]\nuplinks: [eth0]\ndns-slow-threshold: 50ms\n",
        )
        .unwrap();
        let c = AgentConfig::merge(
            args(&["--dns-timeout", "1s", "--uplinks", "eth1,eth2"]),
            file,
        );
        assert_eq!(c.dns_timeout, std::time::Duration::from_secs(1));
        assert_eq!(c.uplinks, vec!["eth1".to_owned(), "eth2".to_owned()]);
        assert_eq!(c.dns_ports, vec![53, 5353]);
        assert_eq!(c.dns_slow_threshold, std::time::Duration::from_millis(50));
        assert!(c.check_dns().is_ok());
        let c = AgentConfig::merge(args(&["--dns-ports", "0"]), ConfigFile::default());
        assert!(c
            .check_dns()
            .unwrap_err()
            .to_string()
            .contains("--dns-ports"));
        let e = parse_config_file(Path::new("c.yaml"), "dns-timeout: soon\n").unwrap_err();
        assert!(e.to_string().contains("soon"), "{e}");
        assert!(AgentArgs::try_parse_from(["podnet-agent", "--dns-timeout", "5 min"]).is_err());
    }

    #[test]
    fn a_value_its_own_parser_rejects_names_the_key() {
        // Found by fuzzing: serde_yaml adds the key to type errors only, not
        // to errors raised by a value's own parser.
        for (text, key) in [
            ("node-cidr: 10.244.1.4/24\n", "node-cidr"),
            ("socket: /s\ndns-timeout: soon\n", "dns-timeout"),
            ("{bpffs: /b, vpc-cidrs: [10.0.0.0/40]}", "vpc-cidrs"),
        ] {
            let err = parse_config_file(Path::new("c.yaml"), text)
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("config file c.yaml: "), "{err}");
            assert!(err.contains(key), "{err}");
        }
    }

    #[test]
    fn a_broken_file_names_the_key() {
        let err = parse_config_file(Path::new("c.yaml"), "metrics-adr: 1.2.3.4:5\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("config file c.yaml: unknown field `metrics-adr`"),
            "{err}"
        );
        let err = parse_config_file(Path::new("c.yaml"), "race-event-budget: lots\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("race-event-budget"), "{err}");
    }
}
