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
        client::{self, DEFAULT_TIMEOUT},
        protocol::{method, RacesParams, DEFAULT_RACES_LIMIT},
        view,
    },
    config::defaults,
    conntrack::events::RaceRecord,
};
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
    /// The agent's status.
    Status,
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
    let call =
        |method: &str, params: Value| client::call(&args.socket, method, params, DEFAULT_TIMEOUT);
    match &args.command {
        Command::Conntrack {
            command: ConntrackCommand::Races { limit },
        } => {
            let params = serde_json::to_value(RacesParams { limit: *limit })?;
            let result = call(method::CONNTRACK_RACES, params)?;
            if args.json {
                return json(&result);
            }
            let races: Vec<RaceRecord> = serde_json::from_value(result)
                .with_context(|| format!("unexpected answer to {}", method::CONNTRACK_RACES))?;
            Ok(view::races_table(&races))
        }
        Command::Status => {
            let result = call(method::STATUS, Value::Null)?;
            if args.json {
                return json(&result);
            }
            Ok(view::key_value_lines(&result))
        }
    }
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
