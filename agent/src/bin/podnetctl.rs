//! podnetctl: inspect the podnet agent on this node through its local socket.

use std::{
    io::{self, Write as _},
    path::PathBuf,
    process::ExitCode,
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use podnet::{
    api::{
        call::Call,
        client::{self, DEFAULT_TIMEOUT},
        protocol::{DnsSlowParams, RacesParams, DEFAULT_RACES_LIMIT},
    },
    config::defaults,
    conntrack::{events::RaceRecord, view::races_table},
};
use podnet_api::wire::StatusParams;
use serde_json::Value;

/// podnetctl: inspect the podnet agent on this node (run as root).
#[derive(Debug, Parser)]
#[command(name = "podnetctl", version)]
struct Args {
    /// Unix socket of the agent's API.
    #[arg(long, env = "PODNET_SOCKET", default_value = defaults::SOCKET, global = true)]
    socket: PathBuf,
    /// Print the agent's answer as JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Conntrack insert races.
    Conntrack {
        #[command(subcommand)]
        command: ConntrackCommand,
    },
    /// DNS latency per pod, measured in the kernel.
    Dns {
        #[command(subcommand)]
        command: DnsCommand,
    },
    /// The agent's status.
    Status,
    /// Pod routing: desired versus actual rules, routes and proxy entries.
    Routes,
    /// Pod attachments registered by podnet-cni.
    Endpoints,
    /// IPAM pools, their use and cooldowns.
    Ipam,
    /// Prints an addressing plan (no agent needed): clusters, nodes per
    /// cluster, pods per node, and a node's pod CIDR.
    Plan {
        /// The range all clusters share, e.g. 10.0.0.0/8.
        #[arg(long)]
        cluster_cidr: podnet::net::Cidr,
        /// Bits that number clusters.
        #[arg(long)]
        cluster_bits: u8,
        /// Bits that number nodes inside a cluster.
        #[arg(long)]
        node_bits: u8,
        /// The cluster whose CIDRs to print.
        #[arg(long, default_value_t = 0)]
        cluster_index: u128,
        /// The node whose pod CIDR to print.
        #[arg(long)]
        node_index: Option<u128>,
    },
}

#[derive(Debug, Subcommand)]
enum DnsCommand {
    /// Per pod and server over the last minute: query rate, p50, p99, timeouts, error rate.
    Top,
    /// Recent slow, failed (SERVFAIL, NXDOMAIN, REFUSED) and unanswered queries, with their names.
    Slow {
        /// Show at most this many of the newest queries.
        #[arg(long, default_value_t = podnet::api::protocol::DEFAULT_DNS_SLOW_LIMIT)]
        limit: usize,
    },
}

#[derive(Debug, Subcommand)]
enum ConntrackCommand {
    /// Recent insert races, oldest first: the pod that lost, its flow, and the flow that won the port.
    Races {
        /// Show at most this many of the newest races.
        #[arg(long, default_value_t = DEFAULT_RACES_LIMIT)]
        limit: usize,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(output) => match io::stdout().lock().write_all(output.as_bytes()) {
            // `podnetctl ... | head` closing the pipe early is not an error.
            Err(e) if e.kind() != io::ErrorKind::BrokenPipe => {
                eprintln!("podnetctl: cannot write output: {e}");
                ExitCode::FAILURE
            }
            _ => ExitCode::SUCCESS,
        },
        Err(error) => {
            eprintln!("podnetctl: {}", message(&error));
            ExitCode::FAILURE
        }
    }
}

/// Runs the command and returns what to print.
fn run(args: &Args) -> anyhow::Result<String> {
    let send = |c: &Call| client::call(&args.socket, c.method(), c.params(), DEFAULT_TIMEOUT);
    match &args.command {
        Command::Conntrack {
            command: ConntrackCommand::Races { limit },
        } => {
            let c = Call::ConntrackRaces(RacesParams { limit: *limit });
            let result = send(&c)?;
            if args.json {
                return json(&result);
            }
            let races: Vec<RaceRecord> = answer(&c, result)?;
            Ok(races_table(&races))
        }
        Command::Endpoints => {
            let c = Call::EndpointList;
            let result = send(&c)?;
            if args.json {
                return json(&result);
            }
            let eps: Vec<podnet_api::endpoint::EndpointRecord> = answer(&c, result)?;
            Ok(podnet::ipam::view::endpoints_table(&eps))
        }
        Command::Ipam => {
            let c = Call::IpamStatus(StatusParams::default());
            let result = send(&c)?;
            if args.json {
                return json(&result);
            }
            let status: podnet_api::wire::IpamStatus = answer(&c, result)?;
            Ok(podnet::ipam::view::ipam_text(&status))
        }
        Command::Plan {
            cluster_cidr,
            cluster_bits,
            node_bits,
            cluster_index,
            node_index,
        } => {
            let plan = podnet::ipam::plan::plan(
                *cluster_cidr,
                *cluster_bits,
                *node_bits,
                *cluster_index,
                *node_index,
            )?;
            if args.json {
                return json(&serde_json::to_value(&plan)?);
            }
            Ok(plan.render())
        }
        Command::Dns {
            command: DnsCommand::Top,
        } => {
            let c = Call::DnsTop;
            let result = send(&c)?;
            if args.json {
                return json(&result);
            }
            let rows: Vec<podnet::dns::top::TopRow> = answer(&c, result)?;
            Ok(podnet::dns::view::top_table(&rows))
        }
        Command::Dns {
            command: DnsCommand::Slow { limit },
        } => {
            let c = Call::DnsSlow(DnsSlowParams { limit: *limit });
            let result = send(&c)?;
            if args.json {
                return json(&result);
            }
            let records: Vec<podnet::dns::decode::QueryRecord> = answer(&c, result)?;
            Ok(podnet::dns::view::slow_table(&records))
        }
        Command::Routes => {
            let c = Call::RoutesShow;
            let result = send(&c)?;
            if args.json {
                return json(&result);
            }
            let routes: podnet::routing::show::RoutesView = answer(&c, result)?;
            Ok(podnet::routing::show::table(&routes))
        }
        Command::Status => {
            let result = send(&Call::Status)?;
            if args.json {
                return json(&result);
            }
            Ok(podnet::api::status_view::status_text(&result))
        }
    }
}

/// Decodes the answer to `call`.
fn answer<T: serde::de::DeserializeOwned>(call: &Call, result: Value) -> anyhow::Result<T> {
    serde_json::from_value(result)
        .with_context(|| format!("unexpected answer to {}", call.method()))
}

/// The error and its causes on one line. Errors here often repeat their
/// cause in their own message; a cause already shown is not repeated.
fn message(error: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}

fn json(value: &Value) -> anyhow::Result<String> {
    Ok(serde_json::to_string_pretty(value)? + "\n")
}
