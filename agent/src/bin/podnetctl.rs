//! podnetctl: inspect the podnet agent on this node through its local socket.

use std::{
    io::{self, Write as _},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use anyhow::Context as _;
use clap::{CommandFactory as _, Parser, Subcommand};
use podnet::{
    api::{
        call::Call,
        client::{self, DEFAULT_TIMEOUT},
        protocol::{DnsSlowParams, EventFilter, FollowParams, RacesParams, DEFAULT_RACES_LIMIT},
    },
    config::defaults,
    conntrack::{events::RaceRecord, view::races_table},
    ctl::{
        self,
        output::{self, Output},
        sysdump, Event,
    },
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
    /// Output format: `table`, `wide` (extra columns), `json` or `yaml`.
    #[arg(short, long, value_enum, env = "PODNET_OUTPUT", global = true)]
    output: Option<Output>,
    /// Same as `-o json`.
    #[arg(long, global = true)]
    json: bool,
    /// Stream insert races, DNS failures and drops as they happen, until
    /// interrupted (alone, or with `conntrack races` or `dns slow`).
    #[arg(long, global = true)]
    follow: bool,
    #[command(flatten)]
    filter: Filter,
    #[command(subcommand)]
    command: Option<Command>,
}

/// Filters of `--follow` and of the lists they apply to.
#[derive(Debug, clap::Args)]
struct Filter {
    /// Only this namespace's pods (`""`: host traffic).
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    /// Only this pod (by name).
    #[arg(long, global = true)]
    pod: Option<String>,
    /// Only this DNS server or race destination (`ip` or `ip:port`).
    #[arg(long, global = true)]
    server: Option<String>,
    /// Only these causes, comma-separated: `insert_race`, `timeout`, `slow`,
    /// `servfail`, `nxdomain`, `refused`, `netfilter_drop`.
    #[arg(long, global = true, value_delimiter = ',')]
    cause: Vec<String>,
}

impl Filter {
    fn to_filter(&self) -> anyhow::Result<EventFilter> {
        let filter = EventFilter {
            namespace: self.namespace.clone(),
            pod: self.pod.clone(),
            server: self.server.clone(),
            cause: self.cause.clone(),
        };
        filter.validate().map_err(anyhow::Error::msg)?;
        Ok(filter)
    }
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
    /// Streams insert races, DNS failures and drops as they happen (same as `--follow`).
    Follow,
    /// Writes one archive (tar.gz) with what a bug report needs.
    ///
    /// The agent's status, endpoints, IPAM, routes, recent races and DNS failures,
    /// metrics, the kernel's rules, routes, links, tc filters, podnet's pinned
    /// programs, maps and links, conntrack statistics, the CNI log, versions.
    Sysdump {
        /// The archive to write [default: podnet-sysdump-<time>.tar.gz].
        #[arg(short, long)]
        file: Option<PathBuf>,
        /// The agent's metrics URL.
        #[arg(long, env = "PODNET_METRICS_URL", default_value_t = default_metrics_url())]
        metrics_url: String,
        /// The CNI plugin's log file (its `.N` rotations are added).
        #[arg(long, env = "PODNET_CNI_LOG", default_value = CNI_LOG)]
        cni_log: PathBuf,
        /// podnet's pin directory, when the agent does not answer.
        #[arg(long, env = "PODNET_BPFFS", default_value = defaults::BPFFS)]
        bpffs: PathBuf,
        /// How long the whole dump may take, in seconds.
        #[arg(long, default_value_t = sysdump::DEFAULT_BUDGET.as_secs())]
        timeout: u64,
    },
    /// Prints a shell completion script.
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
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
    /// Why a pod's recent DNS queries failed, in words: the drop, insert race
    /// or silence behind each timeout, retransmit and slow answer.
    Why {
        /// The pod, as NAMESPACE/POD.
        pod: String,
        /// Look at most at this many of the pod's newest recorded queries.
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

fn default_metrics_url() -> String {
    format!("http://127.0.0.1:{}/metrics", defaults::METRICS_ADDR.port())
}

/// podnet-cni's default `logFile`.
const CNI_LOG: &str = "/var/log/podnet/cni.log";

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match (&args.command, args.follow) {
        (None, true) | (Some(Command::Follow), _) => follow(&args, Vec::new()),
        (Some(Command::Conntrack { .. }), true) => follow(&args, vec!["insert_race"]),
        (
            Some(Command::Dns {
                command: DnsCommand::Slow { .. },
            }),
            true,
        ) => follow(
            &args,
            vec![
                "timeout",
                "slow",
                "servfail",
                "nxdomain",
                "refused",
                "retried",
                "insert_race",
                "dropped",
                "unanswered",
                "late",
            ],
        ),
        (Some(_), true) => Err(anyhow::anyhow!(
            "--follow applies to podnetctl alone, `conntrack races` and `dns slow`"
        )),
        (None, false) => {
            let _ = Args::command().print_help();
            return ExitCode::FAILURE;
        }
        (Some(_), false) => run(&args).and_then(|output| print(output.as_bytes())),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("podnetctl: {}", message(&error));
            ExitCode::FAILURE
        }
    }
}

/// Writes to standard output; `podnetctl ... | head` closing the pipe early
/// is not an error.
fn print(bytes: &[u8]) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => {
            Err(anyhow::Error::new(e).context("cannot write output"))
        }
        _ => Ok(()),
    }
}

fn output_of(args: &Args) -> Output {
    if args.json {
        Output::Json
    } else {
        args.output.unwrap_or_default()
    }
}

/// Streams events until the agent stops (an error: the stream is
/// incomplete), the output closes or podnetctl is interrupted. `causes`
/// narrows the stream when no `--cause` is given.
fn follow(args: &Args, causes: Vec<&str>) -> anyhow::Result<()> {
    let mut filter = args.filter.to_filter()?;
    if filter.cause.is_empty() {
        filter.cause = causes.into_iter().map(str::to_owned).collect();
    }
    let output = output_of(args);
    let params = serde_json::to_value(FollowParams { filter })?;
    let mut stream = client::follow(&args.socket, params, DEFAULT_TIMEOUT)?;
    if matches!(output, Output::Table | Output::Wide) {
        print(output::follow_header(output == Output::Wide).as_bytes())?;
    }
    // `dns slow --follow` asks for DNS causes, `insert_race` among them:
    // races themselves are not DNS queries.
    let dns_only = matches!(
        &args.command,
        Some(Command::Dns {
            command: DnsCommand::Slow { .. }
        })
    );
    while let Some(value) = stream.next_event()? {
        // Lines this build does not know (a newer agent) are shown as JSON.
        let line = match serde_json::from_value::<Event>(value.clone()) {
            Ok(Event::Race(_) | Event::Drop(_)) if dns_only => continue,
            Ok(event) => output.event_line(&event)?,
            Err(_) => serde_json::to_string(&value)? + "\n",
        };
        let mut out = io::stdout().lock();
        match out.write_all(line.as_bytes()).and_then(|()| out.flush()) {
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(anyhow::Error::new(e).context("cannot write output")),
            Ok(()) => {}
        }
    }
    anyhow::bail!("the agent ended the stream (it stopped or restarted)")
}

/// An answer printed as JSON or YAML, or through `table` / `wide`.
fn render<T: serde::de::DeserializeOwned>(
    output: Output,
    call: &Call,
    result: Value,
    table: impl FnOnce(&T) -> String,
    wide: impl FnOnce(&T) -> String,
) -> anyhow::Result<String> {
    if let Some(text) = output.structured(&result)? {
        return Ok(text);
    }
    let value: T = answer(call, result)?;
    Ok(if output == Output::Wide {
        wide(&value)
    } else {
        table(&value)
    })
}

/// Refuses filters for commands they do not apply to.
fn no_filter(filter: &EventFilter, command: &'static str) -> anyhow::Result<()> {
    if filter.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("-n/--namespace, --pod, --server and --cause do not apply to {command}")
    }
}

/// Runs the command and returns what to print.
fn run(args: &Args) -> anyhow::Result<String> {
    let send = |c: &Call| client::call(&args.socket, c.method(), c.params(), DEFAULT_TIMEOUT);
    let output = output_of(args);
    let filter = args.filter.to_filter()?;
    let Some(command) = &args.command else {
        anyhow::bail!("no command");
    };
    match command {
        Command::Conntrack { .. } | Command::Endpoints | Command::Dns { .. } => {
            list(args, command, output, filter)
        }
        Command::Ipam => {
            no_filter(&filter, "ipam")?;
            let c = Call::IpamStatus(StatusParams::default());
            let result = send(&c)?;
            render(
                output,
                &c,
                result,
                podnet::ipam::view::ipam_text,
                podnet::ipam::view::ipam_text,
            )
        }
        Command::Plan {
            cluster_cidr,
            cluster_bits,
            node_bits,
            cluster_index,
            node_index,
        } => {
            no_filter(&filter, "plan")?;
            let plan = podnet::ipam::plan::plan(
                *cluster_cidr,
                *cluster_bits,
                *node_bits,
                *cluster_index,
                *node_index,
            )?;
            Ok(match output.structured(&serde_json::to_value(&plan)?)? {
                Some(text) => text,
                None => plan.render(),
            })
        }
        Command::Routes => {
            no_filter(&filter, "routes")?;
            let c = Call::RoutesShow;
            let result = send(&c)?;
            render(
                output,
                &c,
                result,
                podnet::routing::show::table,
                podnet::routing::show::table,
            )
        }
        Command::Status => {
            no_filter(&filter, "status")?;
            let result = send(&Call::Status)?;
            Ok(match output.structured(&result)? {
                Some(text) => text,
                None => podnet::api::status_view::status_text(&result),
            })
        }
        Command::Completion { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut Args::command(), "podnetctl", &mut script);
            Ok(String::from_utf8(script)?)
        }
        Command::Sysdump {
            file,
            metrics_url,
            cni_log,
            bpffs,
            timeout,
        } => sysdump(
            &args.socket,
            file.as_deref(),
            &sysdump::Settings {
                metrics_url: metrics_url.clone(),
                cni_log: cni_log.clone(),
                bpffs: bpffs.clone(),
                budget: Duration::from_secs(*timeout),
                version: env!("CARGO_PKG_VERSION").to_owned(),
            },
        ),
        Command::Follow => anyhow::bail!("follow streams; it is not a one-shot command"),
    }
}

/// The lists the filters apply to: races, DNS, endpoints.
fn list(
    args: &Args,
    command: &Command,
    output: Output,
    filter: EventFilter,
) -> anyhow::Result<String> {
    let send = |c: &Call| client::call(&args.socket, c.method(), c.params(), DEFAULT_TIMEOUT);
    match command {
        Command::Conntrack {
            command: ConntrackCommand::Races { limit },
        } => {
            let c = Call::ConntrackRaces(RacesParams {
                limit: *limit,
                filter,
            });
            let result = send(&c)?;
            render(
                output,
                &c,
                result,
                |r: &Vec<RaceRecord>| races_table(r),
                |r| output::races_wide(r),
            )
        }
        Command::Endpoints => {
            let c = Call::EndpointList;
            let eps: Vec<podnet_api::endpoint::EndpointRecord> = answer(&c, send(&c)?)?;
            let eps = ctl::filter_endpoints(eps, &filter)?;
            render(
                output,
                &c,
                serde_json::to_value(&eps)?,
                |e: &Vec<_>| podnet::ipam::view::endpoints_table(e),
                |e| output::endpoints_wide(e),
            )
        }
        Command::Dns {
            command: DnsCommand::Top,
        } => {
            let c = Call::DnsTop;
            let rows: Vec<podnet::dns::top::TopRow> = answer(&c, send(&c)?)?;
            let rows = ctl::filter_top(rows, &filter)?;
            render(
                output,
                &c,
                serde_json::to_value(&rows)?,
                |r: &Vec<_>| podnet::dns::view::top_table(r),
                |r| podnet::dns::view::top_table(r),
            )
        }
        Command::Dns {
            command: DnsCommand::Slow { limit },
        } => {
            let c = Call::DnsSlow(DnsSlowParams {
                limit: *limit,
                filter,
            });
            let result = send(&c)?;
            render(
                output,
                &c,
                result,
                |r: &Vec<_>| podnet::dns::view::slow_table(r),
                |r| output::slow_wide(r),
            )
        }
        Command::Dns {
            command: DnsCommand::Why { pod, limit },
        } => {
            let Some((namespace, name)) = pod.split_once('/') else {
                anyhow::bail!("dns why: give the pod as NAMESPACE/POD, not `{pod}`");
            };
            let c = Call::DnsSlow(DnsSlowParams {
                limit: *limit,
                filter: EventFilter {
                    namespace: Some(namespace.to_owned()),
                    pod: Some(name.to_owned()),
                    ..filter
                },
            });
            let result = send(&c)?;
            let failed = |records: &Vec<podnet::dns::decode::QueryRecord>| {
                podnet::dns::view::why_lines(records)
            };
            render(output, &c, result, failed, failed)
        }
        _ => anyhow::bail!("not a list"),
    }
}

/// Writes the bug-report archive to `file` and says what it holds.
fn sysdump(
    socket: &std::path::Path,
    file: Option<&std::path::Path>,
    settings: &sysdump::Settings,
) -> anyhow::Result<String> {
    let created = podnet::api::protocol::now_unix_ms();
    let top = format!("podnet-sysdump-{}", created / 1000);
    let path = file.map_or_else(|| PathBuf::from(format!("{top}.tar.gz")), ToOwned::to_owned);
    let dump = sysdump::collect(
        &sysdump::System {
            socket: socket.to_owned(),
        },
        settings,
    );
    let out =
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    sysdump::write_archive(&dump, &top, created, io::BufWriter::new(out))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(format!(
        "wrote {}: {} parts, {} failed (see index.json)\n",
        path.display(),
        dump.index.len(),
        dump.failed()
    ))
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
