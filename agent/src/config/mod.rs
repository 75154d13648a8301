//! The agent's configuration: command-line flags with `PODNET_*` environment
//! twins, an optional YAML file with the same keys (`--config`, a ConfigMap),
//! and defaults. Precedence: flag or environment, then file, then default.
//!
//! Each section is declared once, by its owner, with [`crate::options`]:
//! [`AgentOptions`] here, and `ConntrackOptions`, `DnsOptions`,
//! `RoutingOptions`, `IpamOptions`, `PodsOptions` beside their subsystems. [`AgentArgs`]
//! flattens them into the command line, [`ConfigFile`] reads the same keys
//! into the same sections, and [`AgentConfig`] composes each section's
//! resolved settings.

pub mod defaults;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use clap::{Parser, ValueEnum};
use serde::Deserialize;

use crate::{
    bpf::tc::TcModeChoice,
    conntrack::{ConntrackOptions, ConntrackSettings},
    dns::{DnsOptions, DnsSettings},
    ipam::service::{IpamOptions, IpamSettings},
    options::options,
    pods::{PodsOptions, PodsSettings},
    routing::{RoutingOptions, RoutingSettings},
};

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

options! {
    /// The agent-wide section of the configuration: its endpoints, its
    /// directories, how TC programs attach, logs, the CNI files it installed.
    pub struct AgentOptions {
        /// Address of /metrics, /healthz and /readyz [default: 0.0.0.0:10310].
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
        /// How the DNS and fast-path programs attach: `auto` (tcx where the
        /// kernel has it, 6.6+, else classic tc: clsact qdisc and a bpf filter),
        /// `tcx`, or `tc` [default: auto].
        #[arg(long, env = "PODNET_TC_ATTACH", value_enum)]
        pub tc_attach: Option<TcModeChoice>,
        /// Log format.
        #[arg(long, env = "PODNET_LOG_FORMAT", value_enum)]
        pub log_format: Option<LogFormat>,
        /// Directory of the CNI configuration podnet installed
        /// (`10-podnet.conflist`) [default: /etc/cni/net.d].
        #[arg(long, env = "PODNET_CNI_CONF_DIR")]
        pub cni_conf_dir: Option<PathBuf>,
        /// Directory of the CNI plugin binary podnet installed (`podnet-cni`)
        /// [default: /opt/cni/bin].
        #[arg(long, env = "PODNET_CNI_BIN_DIR")]
        pub cni_bin_dir: Option<PathBuf>,
    }
}

/// podnet-agent: eBPF node networking agent. Observes the network namespace
/// it runs in.
#[derive(Debug, Parser)]
#[command(name = "podnet-agent", version)]
pub struct AgentArgs {
    /// The agent-wide settings.
    #[command(flatten)]
    pub agent: AgentOptions,
    /// Conntrack's settings.
    #[command(flatten)]
    pub conntrack: ConntrackOptions,
    /// DNS's settings.
    #[command(flatten)]
    pub dns: DnsOptions,
    /// Routing's settings.
    #[command(flatten)]
    pub routing: RoutingOptions,
    /// IPAM's settings.
    #[command(flatten)]
    pub ipam: IpamOptions,
    /// Pod metadata's settings.
    #[command(flatten)]
    pub pods: PodsOptions,
    /// One YAML file with the same keys as the flags (for a ConfigMap).
    #[arg(long, env = "PODNET_CONFIG")]
    pub config: Option<PathBuf>,
    /// Remove everything podnet installed on this node (pins and the programs
    /// they hold, owned rules, routes and proxy-ARP entries, the SNAT chain,
    /// the CNI config and binary, the API socket), print what was removed and
    /// exit; for uninstall. No environment twin: an action, not a setting.
    #[arg(long)]
    pub cleanup: bool,
}

/// The `--config` file: the same keys as the flags, in kebab-case, each
/// read into the section that declares it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ConfigFile {
    /// The agent-wide keys.
    pub agent: AgentOptions,
    /// Conntrack's keys.
    pub conntrack: ConntrackOptions,
    /// DNS's keys.
    pub dns: DnsOptions,
    /// Routing's keys.
    pub routing: RoutingOptions,
    /// IPAM's keys.
    pub ipam: IpamOptions,
    /// Pod metadata's keys.
    pub pods: PodsOptions,
}

/// The effective configuration: the agent-wide settings and each
/// subsystem's, defaults filled in.
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
    /// tc attach mode choice.
    pub tc_attach: TcModeChoice,
    /// Log format.
    pub log_format: LogFormat,
    /// Directory of the installed CNI configuration.
    pub cni_conf_dir: PathBuf,
    /// Directory of the installed CNI plugin binary.
    pub cni_bin_dir: PathBuf,
    /// `--cleanup`: remove what podnet installed and exit.
    pub cleanup: bool,
    /// Conntrack.
    pub conntrack: ConntrackSettings,
    /// DNS.
    pub dns: DnsSettings,
    /// Routing, SNAT and the fast path.
    pub routing: RoutingSettings,
    /// IPAM.
    pub ipam: IpamSettings,
    /// Pod metadata and the labels of per-pod series.
    pub pods: PodsSettings,
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
        /// What is wrong, naming the offending key.
        message: String,
    },
    /// A setting has an unusable value.
    #[error("{0}")]
    Invalid(String),
}

/// Parses a config file's text: a mapping whose keys are split among the
/// sections that declare them.
pub fn parse_config_file(path: &Path, text: &str) -> Result<ConfigFile, ConfigError> {
    if text.trim().is_empty() {
        return Ok(ConfigFile::default());
    }
    let parse = |message: String| ConfigError::Parse {
        path: path.to_owned(),
        message,
    };
    let document: serde_norway::Mapping =
        serde_norway::from_str(text).map_err(|e| parse(e.to_string()))?;
    let sections: [(&str, Vec<String>); 6] = [
        ("agent", AgentOptions::keys().collect()),
        ("conntrack", ConntrackOptions::keys().collect()),
        ("dns", DnsOptions::keys().collect()),
        ("routing", RoutingOptions::keys().collect()),
        ("ipam", IpamOptions::keys().collect()),
        ("pods", PodsOptions::keys().collect()),
    ];
    let mut split: [serde_norway::Mapping; 6] = Default::default();
    for (key, value) in document {
        let Some(name) = key.as_str() else {
            return Err(parse(format!("key {key:?} is not a string")));
        };
        let Some(section) = sections
            .iter()
            .position(|(_, keys)| keys.iter().any(|k| k == name))
        else {
            let known: Vec<String> = sections
                .iter()
                .flat_map(|(_, keys)| keys.iter().map(|k| format!("`{k}`")))
                .collect();
            return Err(parse(format!(
                "unknown field `{name}`, expected one of {}",
                known.join(", ")
            )));
        };
        split[section].insert(key, value);
    }
    let [agent, conntrack, dns, routing, ipam, pods] = split;
    Ok(ConfigFile {
        agent: section(agent).map_err(parse)?,
        conntrack: section(conntrack).map_err(parse)?,
        dns: section(dns).map_err(parse)?,
        routing: section(routing).map_err(parse)?,
        ipam: section(ipam).map_err(parse)?,
        pods: section(pods).map_err(parse)?,
    })
}

/// Reads one section from its keys; an error names the key whose value
/// fails (serde names it in type errors, but not in the errors a value's own
/// parser raises: a prefix with host bits, a bad duration).
fn section<S: serde::de::DeserializeOwned>(keys: serde_norway::Mapping) -> Result<S, String> {
    serde_norway::from_value(serde_norway::Value::Mapping(keys.clone())).map_err(|e| {
        let message = e.to_string();
        let failing = keys.into_iter().find_map(|(key, value)| {
            let name = key.as_str()?.to_owned();
            let alone = serde_norway::Mapping::from_iter([(key, value)]);
            serde_norway::from_value::<S>(serde_norway::Value::Mapping(alone))
                .is_err()
                .then_some(name)
        });
        match failing {
            Some(key) if !message.contains(key.as_str()) => format!("{key}: {message}"),
            _ => message,
        }
    })
}

impl AgentConfig {
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
        let agent = args.agent.or(file.agent);
        let bpffs = agent
            .bpffs
            .unwrap_or_else(|| PathBuf::from(defaults::BPFFS));
        let dns = args
            .dns
            .or(file.dns)
            .settings(&bpffs)
            .map_err(ConfigError::Invalid)?;
        Ok(Self {
            metrics_addr: agent.metrics_addr.unwrap_or(defaults::METRICS_ADDR),
            socket: agent
                .socket
                .unwrap_or_else(|| PathBuf::from(defaults::SOCKET)),
            state_dir: agent
                .state_dir
                .unwrap_or_else(|| PathBuf::from(defaults::STATE_DIR)),
            endpoints: agent.endpoints,
            tc_attach: agent.tc_attach.unwrap_or_default(),
            log_format: agent.log_format.unwrap_or_default(),
            cni_conf_dir: agent
                .cni_conf_dir
                .unwrap_or_else(|| PathBuf::from(defaults::CNI_CONF_DIR)),
            cni_bin_dir: agent
                .cni_bin_dir
                .unwrap_or_else(|| PathBuf::from(defaults::CNI_BIN_DIR)),
            cleanup: args.cleanup,
            conntrack: ConntrackSettings {
                flow_ports: dns.ports.clone(),
                ..args.conntrack.or(file.conntrack).settings(&bpffs)
            },
            routing: args
                .routing
                .or(file.routing)
                .settings(&bpffs, &dns.ports)
                .map_err(ConfigError::Invalid)?,
            ipam: args
                .ipam
                .or(file.ipam)
                .settings()
                .map_err(ConfigError::Invalid)?,
            pods: args.pods.or(file.pods).settings(),
            dns,
            bpffs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn merged(args: AgentArgs, file: ConfigFile) -> AgentConfig {
        AgentConfig::resolve_with(args, file).unwrap()
    }

    fn args(argv: &[&str]) -> AgentArgs {
        AgentArgs::try_parse_from(std::iter::once("podnet-agent").chain(argv.iter().copied()))
            .unwrap()
    }

    #[test]
    fn defaults_apply() {
        let c = merged(args(&[]), ConfigFile::default());
        assert_eq!(c.metrics_addr.to_string(), "0.0.0.0:10310");
        assert_eq!(c.socket, PathBuf::from("/run/podnet/agent.sock"));
        assert_eq!(c.bpffs, PathBuf::from("/sys/fs/bpf/podnet"));
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/podnet"));
        assert_eq!(c.conntrack.event_budget_per_cpu, 20_000);
    }

    #[test]
    fn routing_flags() {
        let c = merged(args(&[]), ConfigFile::default());
        assert_eq!(
            (
                c.routing.fast_path,
                c.routing.snat,
                c.routing.enis_file.clone()
            ),
            (false, None, None)
        );
        let c = merged(
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
        assert!(c.routing.fast_path);
        assert_eq!(c.routing.snat, Some(false));
        assert_eq!(c.routing.vpc_cidrs.len(), 2);
        assert_eq!(c.routing.vpc_cidrs[1].to_string(), "172.16.0.0/12");
        let file = parse_config_file(
            Path::new("c.yaml"),
            "fast-path: true\nsnat: true\nservice-cidrs: [10.96.0.0/12]\n",
        )
        .unwrap();
        let c = merged(args(&[]), file);
        assert_eq!((c.routing.fast_path, c.routing.snat), (true, Some(true)));
        assert_eq!(c.routing.service_cidrs[0].to_string(), "10.96.0.0/12");
        assert!(AgentArgs::try_parse_from(["podnet-agent", "--vpc-cidrs", "10.0.0.0"]).is_err());
        // One Cidr type for every prefix: host bits are refused, IPv6 is
        // taken (the fast path steers both families).
        let e = AgentArgs::try_parse_from(["podnet-agent", "--vpc-cidrs", "10.0.1.7/24"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("did you mean 10.0.1.0/24?"), "{e}");
        let c = AgentConfig::resolve_with(
            args(&["--service-cidrs", "10.96.0.0/12,fd00::/108"]),
            ConfigFile::default(),
        )
        .unwrap();
        assert_eq!(c.routing.service_cidrs[1].to_string(), "fd00::/108");
    }

    #[test]
    fn the_node_is_asked_only_when_node_cidr_mode_has_no_cidr() {
        let c = merged(args(&["--node-name", "node-1"]), ConfigFile::default());
        assert_eq!(c.ipam.node_to_ask_for_pod_cidrs(), Some("node-1"));
        let c = merged(
            args(&["--node-name", "node-1", "--node-cidr", "10.244.1.0/24"]),
            ConfigFile::default(),
        );
        assert_eq!(c.ipam.node_to_ask_for_pod_cidrs(), None);
        let c = merged(
            args(&["--node-name", "node-1", "--ipam-mode", "eni"]),
            ConfigFile::default(),
        );
        assert_eq!(c.ipam.node_to_ask_for_pod_cidrs(), None);
        let c = merged(args(&[]), ConfigFile::default());
        assert_eq!(c.ipam.node_to_ask_for_pod_cidrs(), None);
        let file = parse_config_file(Path::new("c.yaml"), "node-name: node-2\n").unwrap();
        let c = merged(args(&[]), file);
        assert_eq!(c.ipam.node_to_ask_for_pod_cidrs(), Some("node-2"));
    }

    #[test]
    fn flags_win_over_the_file() {
        let file = parse_config_file(
            Path::new("c.yaml"),
            "metrics-addr: 127.0.0.1:1\nbpffs: /sys/fs/bpf/x\n",
        )
        .unwrap();
        let c = merged(args(&["--metrics-addr", "127.0.0.1:2"]), file);
        assert_eq!(c.metrics_addr.to_string(), "127.0.0.1:2");
        assert_eq!(c.bpffs, PathBuf::from("/sys/fs/bpf/x"));
    }

    #[test]
    fn dns_settings() {
        let c = merged(args(&[]), ConfigFile::default());
        assert_eq!(c.dns.timeout, std::time::Duration::from_secs(5));
        assert_eq!(c.dns.ports, vec![53]);
        assert_eq!(c.dns.slow_threshold, std::time::Duration::from_millis(200));
        assert!(c.dns.uplinks.is_empty());
        let file = parse_config_file(
            Path::new("c.yaml"),
            "dns-timeout: 2s\ndns-ports: [53, 5353]\nuplinks: [eth0]\ndns-slow-threshold: 50ms\n",
        )
        .unwrap();
        let c = merged(
            args(&["--dns-timeout", "1s", "--uplinks", "eth1,eth2"]),
            file,
        );
        assert_eq!(c.dns.timeout, std::time::Duration::from_secs(1));
        assert_eq!(c.dns.uplinks, vec!["eth1".to_owned(), "eth2".to_owned()]);
        assert_eq!(c.dns.ports, vec![53, 5353]);
        assert_eq!(c.dns.slow_threshold, std::time::Duration::from_millis(50));
        let e = AgentConfig::resolve_with(args(&["--dns-ports", "0"]), ConfigFile::default())
            .unwrap_err();
        assert!(e.to_string().contains("--dns-ports"), "{e}");
        let e = parse_config_file(Path::new("c.yaml"), "dns-timeout: soon\n").unwrap_err();
        assert!(e.to_string().contains("soon"), "{e}");
        assert!(AgentArgs::try_parse_from(["podnet-agent", "--dns-timeout", "5 min"]).is_err());
    }

    #[test]
    fn cni_add_wait_is_unset_unless_given() {
        let c = merged(args(&[]), ConfigFile::default());
        assert_eq!(c.ipam.add_wait, None);
        let file = parse_config_file(Path::new("c.yaml"), "cni-add-wait: 2s\n").unwrap();
        assert_eq!(
            merged(args(&[]), file.clone()).ipam.add_wait,
            Some(std::time::Duration::from_secs(2))
        );
        assert_eq!(
            merged(args(&["--cni-add-wait", "500ms"]), file)
                .ipam
                .add_wait,
            Some(std::time::Duration::from_millis(500)),
            "the flag wins over the file"
        );
        assert!(AgentArgs::try_parse_from(["podnet-agent", "--cni-add-wait", "0s"]).is_err());
        let err = parse_config_file(Path::new("c.yaml"), "cni-add-wait: forever\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("cni-add-wait"), "{err}");
    }

    #[test]
    fn a_value_its_own_parser_rejects_names_the_key() {
        // Found by fuzzing: serde_norway adds the key to type errors only, not
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
    fn warm_pool_targets_out_of_range_name_the_key() {
        for (flag, max) in [
            ("--warm-ip-target", 65_536),
            ("--minimum-ip-target", 65_536),
            ("--warm-eni-target", 1024),
            ("--warm-prefix-target", 4096),
        ] {
            let at_max = format!("{flag}={max}");
            assert!(
                AgentConfig::resolve_with(args(&[&at_max]), ConfigFile::default()).is_ok(),
                "{at_max}"
            );
            for n in [max + 1, u32::MAX] {
                let e = AgentConfig::resolve_with(
                    args(&[&format!("{flag}={n}")]),
                    ConfigFile::default(),
                )
                .unwrap_err()
                .to_string();
                assert_eq!(e, format!("{flag} {n} is out of range (at most {max})"));
                // The same key in the file.
                let file = parse_config_file(
                    Path::new("c.yaml"),
                    &format!("{}: {n}\n", flag.trim_start_matches('-')),
                )
                .unwrap();
                let e = AgentConfig::resolve_with(args(&[]), file)
                    .unwrap_err()
                    .to_string();
                assert_eq!(e, format!("{flag} {n} is out of range (at most {max})"));
            }
        }
        let c = merged(
            args(&["--warm-ip-target=65536", "--minimum-ip-target=0"]),
            ConfigFile::default(),
        );
        assert_eq!(c.ipam.eni.targets.warm_ip, Some(65_536));
        assert_eq!(c.ipam.eni.targets.minimum_ip, Some(0));
        assert_eq!(c.ipam.eni.targets.warm_eni, 1);
        assert_eq!(c.ipam.eni.slots, crate::cloud::SlotKind::Address);
        let c = merged(
            args(&["--eni-prefix-delegation", "--warm-prefix-target=2"]),
            ConfigFile::default(),
        );
        assert_eq!(c.ipam.eni.slots, crate::cloud::SlotKind::Prefix);
        assert_eq!(c.ipam.eni.targets.warm_prefix, Some(2));
        let file = parse_config_file(
            Path::new("c.yaml"),
            "eni-prefix-delegation: true
",
        )
        .unwrap();
        assert_eq!(
            merged(args(&[]), file).ipam.eni.slots,
            crate::cloud::SlotKind::Prefix
        );
        let e = AgentConfig::resolve_with(
            args(&[
                "--eni-ipv6",
                "--eni-configs",
                r#"{"us-east-1a": {"subnet": "subnet-1"}}"#,
            ]),
            ConfigFile::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("--eni-ipv6 cannot be combined with --eni-configs"),
            "{e}"
        );
        assert!(
            merged(args(&["--eni-ipv6"]), ConfigFile::default())
                .ipam
                .eni
                .ipv6
        );
        // Past u32 in the file: serde's error, naming the key.
        let e = parse_config_file(Path::new("c.yaml"), "warm-eni-target: 4294967296\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("warm-eni-target"), "{e}");
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
