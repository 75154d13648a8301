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
    /// Log format.
    #[arg(long, env = "PODNET_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// One YAML file with the same keys as the flags (for a ConfigMap).
    #[arg(long, env = "PODNET_CONFIG")]
    pub config: Option<PathBuf>,
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
    /// See [`AgentArgs::log_format`].
    pub log_format: Option<LogFormat>,
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
    /// Log format.
    pub log_format: LogFormat,
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
}

/// Parses a config file's text.
pub fn parse_config_file(path: &Path, text: &str) -> Result<ConfigFile, ConfigError> {
    if text.trim().is_empty() {
        return Ok(ConfigFile::default());
    }
    serde_yaml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
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
        Ok(Self::merge(args, file))
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
            race_event_budget: args
                .race_event_budget
                .or(file.race_event_budget)
                .unwrap_or(defaults::RACE_EVENT_BUDGET_PER_CPU),
            log_format: args.log_format.or(file.log_format).unwrap_or_default(),
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
