//! `podnetctl sysdump`: one tar.gz with what a bug report needs: the agent's
//! answers (status, endpoints, IPAM, routes, recent races and DNS failures),
//! its metrics, the kernel's view (rules, routes, links, tc filters, podnet's
//! pinned programs, maps and links, conntrack statistics), the CNI log and
//! versions.
//!
//! Every part is collected on its own: one that fails is listed in
//! `index.json` with its error and the dump goes on. Each part is cut at
//! [`MAX_PART_BYTES`], the whole at [`MAX_TOTAL_BYTES`], each command at
//! [`COMMAND_TIMEOUT`], and parts not started within the time budget are
//! listed as skipped.

use std::{
    fmt::Write as _,
    io::{self, Read as _, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde::Serialize;
use serde_json::{json, Value};

use crate::api::protocol::method;

/// Largest part kept; a longer one is cut and marked `truncated`.
pub const MAX_PART_BYTES: usize = 8 * 1024 * 1024;
/// Largest sum of parts; parts beyond it are listed as skipped.
pub const MAX_TOTAL_BYTES: usize = 64 * 1024 * 1024;
/// How long one command may run before it is killed.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the whole dump may take by default.
pub const DEFAULT_BUDGET: Duration = Duration::from_mins(1);
/// Races and DNS queries asked for (the agent keeps 1024 of each).
const RECENT_LIMIT: usize = 1024;

/// Where the parts come from; the real one talks to the agent and runs
/// commands, tests use a fake.
pub trait Sources {
    /// Calls an API method of the agent.
    fn api(&self, method: &str, params: Value) -> Result<Value, String>;
    /// Runs a command, returning its standard output; a command that fails
    /// is an error with its standard error.
    fn command(&self, argv: &[&str], timeout: Duration) -> Result<Vec<u8>, String>;
    /// Reads a file.
    fn file(&self, path: &Path) -> Result<Vec<u8>, String>;
    /// Lists a directory's entries, recursively, as paths.
    fn walk(&self, dir: &Path) -> Result<Vec<PathBuf>, String>;
    /// Fetches an HTTP URL (`http://host:port/path`).
    fn http_get(&self, url: &str) -> Result<Vec<u8>, String>;
}

/// What to collect besides the agent's answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// The agent's metrics URL.
    pub metrics_url: String,
    /// The CNI plugin's log file; `<file>.N` rotations are added.
    pub cni_log: PathBuf,
    /// The pin directory, when the agent's status does not say.
    pub bpffs: PathBuf,
    /// Time budget of the whole dump.
    pub budget: Duration,
    /// podnetctl's version.
    pub version: String,
}

/// One part as `index.json` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IndexEntry {
    /// Member name inside the archive (relative to its top directory).
    pub name: String,
    /// Where it came from: a method, a command line, a file, a URL.
    pub source: String,
    /// Whether it was collected.
    pub ok: bool,
    /// Why not, when not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Bytes kept.
    pub bytes: usize,
    /// Whether it was cut at [`MAX_PART_BYTES`].
    pub truncated: bool,
    /// Milliseconds it took.
    pub millis: u64,
}

/// The collected parts and their index.
#[derive(Debug, Default)]
pub struct Dump {
    /// Every part tried, in order.
    pub index: Vec<IndexEntry>,
    /// The content of each collected part, by name.
    pub members: Vec<(String, Vec<u8>)>,
    total: usize,
}

impl Dump {
    fn add(&mut self, name: &str, source: &str, started: Instant, result: Result<Vec<u8>, String>) {
        let millis = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let mut entry = IndexEntry {
            name: name.to_owned(),
            source: source.to_owned(),
            ok: false,
            error: None,
            bytes: 0,
            truncated: false,
            millis,
        };
        match result {
            Err(error) => entry.error = Some(error),
            Ok(_) if self.total >= MAX_TOTAL_BYTES => {
                entry.error = Some(format!(
                    "skipped: the archive reached {MAX_TOTAL_BYTES} bytes"
                ));
            }
            Ok(mut bytes) => {
                let room = MAX_PART_BYTES.min(MAX_TOTAL_BYTES - self.total);
                if bytes.len() > room {
                    bytes.truncate(room);
                    entry.truncated = true;
                }
                entry.ok = true;
                entry.bytes = bytes.len();
                self.total += bytes.len();
                self.members.push((name.to_owned(), bytes));
            }
        }
        self.index.push(entry);
    }

    /// The parts that failed.
    pub fn failed(&self) -> usize {
        self.index.iter().filter(|e| !e.ok).count()
    }
}

/// Collects parts within the time budget.
struct Collector<'a, S> {
    sources: &'a S,
    deadline: Instant,
    dump: Dump,
}

impl<S: Sources> Collector<'_, S> {
    fn part(
        &mut self,
        name: &str,
        source: &str,
        collect: impl FnOnce(&S) -> Result<Vec<u8>, String>,
    ) {
        let started = Instant::now();
        let result = if started >= self.deadline {
            Err("skipped: the time budget of the dump was spent".to_owned())
        } else {
            collect(self.sources)
        };
        self.dump.add(name, source, started, result);
    }

    fn command_timeout(&self) -> Duration {
        COMMAND_TIMEOUT.min(self.deadline.saturating_duration_since(Instant::now()))
    }

    fn api_json(&mut self, name: &str, m: &str, params: Value) -> Option<Value> {
        let mut answer = None;
        self.part(name, &format!("api {m}"), |s| {
            let value = s.api(m, params)?;
            let text = serde_json::to_vec_pretty(&value).map_err(|e| e.to_string())?;
            answer = Some(value);
            Ok(text)
        });
        answer
    }

    fn command(&mut self, name: &str, argvs: &[&[&str]]) {
        let timeout = self.command_timeout();
        let source = argvs
            .iter()
            .map(|a| a.join(" "))
            .collect::<Vec<_>>()
            .join("; ");
        self.part(name, &source, |s| {
            // Several commands in one part: each one's output under its
            // command line; the part fails only when all of them fail.
            let mut out = Vec::new();
            let mut errors = Vec::new();
            for argv in argvs {
                if argvs.len() > 1 {
                    out.extend_from_slice(format!("# {}\n", argv.join(" ")).as_bytes());
                }
                match s.command(argv, timeout) {
                    Ok(bytes) => out.extend_from_slice(&bytes),
                    Err(e) => {
                        out.extend_from_slice(format!("(failed: {e})\n").as_bytes());
                        errors.push(format!("{}: {e}", argv.join(" ")));
                    }
                }
            }
            if errors.len() == argvs.len() {
                Err(errors.join("; "))
            } else {
                Ok(out)
            }
        });
    }
}

/// Collects every part from `sources`.
pub fn collect<S: Sources>(sources: &S, settings: &Settings) -> Dump {
    let mut c = Collector {
        sources,
        deadline: Instant::now() + settings.budget,
        dump: Dump::default(),
    };
    let (status, endpoints) = agent_parts(&mut c, settings);
    kernel_parts(&mut c, status.as_ref(), endpoints.as_ref(), settings);
    cni_logs(&mut c, &settings.cni_log);
    let build_info = c
        .dump
        .members
        .iter()
        .find(|(n, _)| n == "agent/metrics.txt")
        .map(|(_, m)| {
            String::from_utf8_lossy(m)
                .lines()
                .filter(|l| l.starts_with("podnet_build_info"))
                .collect::<Vec<_>>()
                .join("\n")
        });
    let versions = json!({
        "podnetctl": settings.version,
        "agent": status.as_ref().and_then(|s| s.get("version")).cloned(),
        "agent_kernel": status.as_ref().and_then(|s| s.get("kernel")).cloned(),
        "agent_build_info": build_info,
    });
    c.part(
        "versions.json",
        "podnetctl, status.version, podnet_build_info",
        |_| serde_json::to_vec_pretty(&versions).map_err(|e| e.to_string()),
    );
    c.command("uname.txt", &[&["uname", "-a"]]);
    c.dump
}

/// The agent's answers and metrics; returns its status and endpoints.
fn agent_parts<S: Sources>(
    c: &mut Collector<'_, S>,
    settings: &Settings,
) -> (Option<Value>, Option<Value>) {
    let status = c.api_json("agent/status.json", method::STATUS, Value::Null);
    let endpoints = c.api_json("agent/endpoints.json", method::ENDPOINT_LIST, Value::Null);
    c.api_json("agent/ipam.json", method::IPAM_STATUS, Value::Null);
    if let Some(routes) = c.api_json("agent/routes.json", method::ROUTES_SHOW, Value::Null) {
        c.part(
            "agent/routes.txt",
            "routes.show as podnetctl routes prints it",
            |_| {
                serde_json::from_value::<crate::routing::show::RoutesView>(routes)
                    .map(|view| crate::routing::show::table(&view).into_bytes())
                    .map_err(|e| format!("unexpected routes.show answer: {e}"))
            },
        );
    }
    c.api_json(
        "agent/races.json",
        method::CONNTRACK_RACES,
        json!({"limit": RECENT_LIMIT}),
    );
    c.api_json(
        "agent/dns-slow.json",
        method::DNS_SLOW,
        json!({"limit": RECENT_LIMIT}),
    );
    c.api_json("agent/dns-top.json", method::DNS_TOP, Value::Null);
    let metrics_url = settings.metrics_url.clone();
    c.part("agent/metrics.txt", &format!("GET {metrics_url}"), |s| {
        s.http_get(&metrics_url)
    });
    (status, endpoints)
}

/// The kernel's view: rules, routes, links, tc filters of pod interfaces,
/// podnet's pins, conntrack statistics.
fn kernel_parts<S: Sources>(
    c: &mut Collector<'_, S>,
    status: Option<&Value>,
    endpoints: Option<&Value>,
    settings: &Settings,
) {
    c.command(
        "kernel/ip-rule.txt",
        &[&["ip", "rule"], &["ip", "-6", "rule"]],
    );
    c.command(
        "kernel/ip-route.txt",
        &[
            &["ip", "route", "show", "table", "all"],
            &["ip", "-6", "route", "show", "table", "all"],
        ],
    );
    c.command("kernel/ip-link.txt", &[&["ip", "-d", "link"]]);
    c.command("kernel/ip-neigh.txt", &[&["ip", "neigh"]]);
    let interfaces = pod_interfaces(status, endpoints);
    if interfaces.is_empty() {
        c.part(
            "kernel/tc-filters.txt",
            "tc filter show (pod interfaces)",
            |_| Err("no pod interface known (no endpoint with an interface)".to_owned()),
        );
    } else {
        let argvs: Vec<Vec<&str>> = interfaces
            .iter()
            .flat_map(|i| {
                ["ingress", "egress"]
                    .map(|dir| vec!["tc", "filter", "show", "dev", i.as_str(), dir])
            })
            .collect();
        let refs: Vec<&[&str]> = argvs.iter().map(Vec::as_slice).collect();
        c.command("kernel/tc-filters.txt", &refs);
    }
    c.command("kernel/bpftool-net.txt", &[&["bpftool", "net", "show"]]);
    let bpffs = status
        .and_then(|s| s.get("bpffs"))
        .and_then(Value::as_str)
        .map_or_else(|| settings.bpffs.clone(), PathBuf::from);
    pins(c, &bpffs);
    c.command("kernel/conntrack-stats.txt", &[&["conntrack", "-S"]]);
    c.part(
        "kernel/nf_conntrack-stat.txt",
        "/proc/net/stat/nf_conntrack",
        |s| s.file(Path::new("/proc/net/stat/nf_conntrack")),
    );
}

/// The host-side interfaces of the endpoints the agent listed (podnet-cni's)
/// and of its DNS links (`<ifname>@<ifindex>@<role>@<direction>`), which
/// cover endpoints from `--endpoints` too.
fn pod_interfaces(status: Option<&Value>, endpoints: Option<&Value>) -> Vec<String> {
    let registered = endpoints
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|e| e.get("interface").and_then(Value::as_str));
    let linked = status
        .and_then(|s| s.pointer("/dns/links"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .filter(|l| l.ends_with("@pod@ingress") || l.ends_with("@pod@egress"))
        .filter_map(|l| l.split('@').next());
    let mut out: Vec<String> = registered.chain(linked).map(str::to_owned).collect();
    out.sort();
    out.dedup();
    out
}

/// The pins below `bpffs`, and bpftool's view of each.
fn pins<S: Sources>(c: &mut Collector<'_, S>, bpffs: &Path) {
    let mut listed = Vec::new();
    c.part(
        "kernel/bpffs-pins.txt",
        &format!("walk {}", bpffs.display()),
        |s| {
            listed = s.walk(bpffs)?;
            let mut out = String::new();
            for p in &listed {
                let _ = writeln!(out, "{}", p.display());
            }
            Ok(out.into_bytes())
        },
    );
    if listed.is_empty() {
        return;
    }
    let timeout = c.command_timeout();
    c.part(
        "kernel/bpftool-pins.txt",
        "bpftool {link,prog,map} show pinned <each pin>",
        |s| {
            let mut out = String::new();
            for pin in &listed {
                let path = pin.to_string_lossy();
                let _ = writeln!(out, "# {path}");
                // A pin is a link, a program or a map; bpftool says which by
                // failing for the other kinds.
                let shown = ["link", "prog", "map"].iter().find_map(|kind| {
                    s.command(&["bpftool", kind, "show", "pinned", &path], timeout)
                        .ok()
                        .map(|o| format!("{kind}: {}", String::from_utf8_lossy(&o)))
                });
                out.push_str(&shown.unwrap_or_else(|| "(bpftool could not show it)\n".to_owned()));
            }
            Ok(out.into_bytes())
        },
    );
}

/// The CNI log and its rotations (`<file>.1`, `<file>.2`, ...).
fn cni_logs<S: Sources>(c: &mut Collector<'_, S>, log: &Path) {
    let name = log.file_name().map_or_else(
        || "cni.log".to_owned(),
        |n| n.to_string_lossy().into_owned(),
    );
    c.part(&format!("logs/{name}"), &log.display().to_string(), |s| {
        s.file(log)
    });
    let Some(dir) = log.parent() else {
        return;
    };
    let mut rotated: Vec<PathBuf> = c
        .sources
        .walk(dir)
        .unwrap_or_default()
        .into_iter()
        .filter(|p| {
            p.parent() == Some(dir)
                && p.file_name().is_some_and(|f| {
                    f.to_string_lossy()
                        .strip_prefix(&format!("{name}."))
                        .is_some_and(|n| n.parse::<u32>().is_ok())
                })
        })
        .collect();
    rotated.sort();
    for path in rotated {
        let member = format!(
            "logs/{}",
            path.file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        c.part(&member, &path.display().to_string(), |s| s.file(&path));
    }
}

/// Writes `dump` as a tar.gz whose members sit under `top/`, `index.json`
/// first.
pub fn write_archive(
    dump: &Dump,
    top: &str,
    created_unix_ms: u64,
    out: impl io::Write,
) -> io::Result<()> {
    let gz = flate2::write::GzEncoder::new(out, flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    let mtime = created_unix_ms / 1000;
    let index = json!({
        "created_unix_ms": created_unix_ms,
        "parts": dump.index,
        "failed": dump.failed(),
    });
    let index = serde_json::to_vec_pretty(&index).map_err(io::Error::other)?;
    let members = std::iter::once(("index.json", index.as_slice()))
        .chain(dump.members.iter().map(|(n, b)| (n.as_str(), b.as_slice())));
    for (name, bytes) in members {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(mtime);
        header.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut header, format!("{top}/{name}"), bytes)?;
    }
    tar.into_inner()?.finish()?.flush()
}

/// The real sources: the agent's socket, commands, files, plain HTTP.
#[derive(Debug)]
pub struct System {
    /// The agent's socket.
    pub socket: PathBuf,
}

impl Sources for System {
    fn api(&self, m: &str, params: Value) -> Result<Value, String> {
        crate::api::client::call(&self.socket, m, params, crate::api::client::DEFAULT_TIMEOUT)
            .map_err(|e| e.to_string())
    }

    fn command(&self, argv: &[&str], timeout: Duration) -> Result<Vec<u8>, String> {
        run_command(argv, timeout)
    }

    fn file(&self, path: &Path) -> Result<Vec<u8>, String> {
        let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut bytes = Vec::new();
        file.take(MAX_PART_BYTES as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(bytes)
    }

    fn walk(&self, dir: &Path) -> Result<Vec<PathBuf>, String> {
        let mut out = Vec::new();
        let mut pending = vec![dir.to_owned()];
        // Bounded: pin directories are shallow and small.
        while let Some(d) = pending.pop() {
            let entries = std::fs::read_dir(&d).map_err(|e| format!("{}: {e}", d.display()))?;
            for entry in entries.flatten() {
                let path = entry.path();
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    if out.len() < 10_000 {
                        pending.push(path);
                    }
                } else {
                    out.push(path);
                }
            }
        }
        out.sort();
        Ok(out)
    }

    fn http_get(&self, url: &str) -> Result<Vec<u8>, String> {
        http_get(url, COMMAND_TIMEOUT)
    }
}

/// Runs `argv` with no input, killing it (by its pid) after `timeout`.
fn run_command(argv: &[&str], timeout: Duration) -> Result<Vec<u8>, String> {
    let (program, rest) = argv.split_first().ok_or("empty command")?;
    let mut child = Command::new(program)
        .args(rest)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    let mut stdout = child.stdout.take().ok_or("no stdout")?;
    let mut stderr = child.stderr.take().ok_or("no stderr")?;
    let out = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = (&mut stdout)
            .take(MAX_PART_BYTES as u64 + 1)
            .read_to_end(&mut bytes);
        // Keep draining, so the command is not blocked on a full pipe.
        let _ = io::copy(&mut stdout, &mut io::sink());
        bytes
    });
    let err = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = (&mut stderr).take(64 * 1024).read_to_end(&mut bytes);
        let _ = io::copy(&mut stderr, &mut io::sink());
        bytes
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!(
                    "{program} did not finish within {timeout:?}; killed"
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => break Err(format!("waiting for {program}: {e}")),
        }
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    let status = status?;
    if status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "{status}: {}",
            String::from_utf8_lossy(&stderr).trim()
        ))
    }
}

/// A plain HTTP/1.0 GET (the agent's metrics endpoint), the body only.
fn http_get(url: &str, timeout: Duration) -> Result<Vec<u8>, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// URLs are supported"))?;
    let (host, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_owned()), |(h, p)| (h, format!("/{p}")));
    let address = std::net::ToSocketAddrs::to_socket_addrs(host)
        .map_err(|e| format!("{host}: {e}"))?
        .next()
        .ok_or_else(|| format!("{host}: no address"))?;
    let mut stream = std::net::TcpStream::connect_timeout(&address, timeout)
        .map_err(|e| format!("connecting to {address}: {e}"))?;
    let io = |e: io::Error| format!("{url}: {e}");
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .map_err(io)?;
    let mut answer = Vec::new();
    stream
        .take(MAX_PART_BYTES as u64 + 64 * 1024)
        .read_to_end(&mut answer)
        .map_err(io)?;
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("{url}: no HTTP header in the answer"))?;
    let head = String::from_utf8_lossy(&answer[..split]).into_owned();
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(format!("{url}: {status}"));
    }
    Ok(answer[split + 4..].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    struct Fake {
        files: BTreeMap<PathBuf, Vec<u8>>,
    }

    impl Sources for Fake {
        fn api(&self, m: &str, _params: Value) -> Result<Value, String> {
            match m {
                method::STATUS => Ok(
                    json!({"version": "0.1.0", "kernel": "6.18.0", "bpffs": "/pins",
                        "dns": {"links": ["vpod2@9@pod@ingress", "eth0@2@uplink@egress"]}}),
                ),
                method::ENDPOINT_LIST => {
                    Ok(json!([{"interface": "vpod1"}, {"interface": "vpod0"}, {}]))
                }
                method::ROUTES_SHOW => Err("routes.show: still starting (unavailable)".into()),
                _ => Ok(json!([])),
            }
        }

        fn command(&self, argv: &[&str], _timeout: Duration) -> Result<Vec<u8>, String> {
            match argv {
                ["conntrack", ..] => {
                    Err("cannot run conntrack: No such file or directory (os error 2)".into())
                }
                ["ip", "-6", "rule"] => {
                    Err("exit status: 2: RTNETLINK answers: Address family not supported".into())
                }
                ["bpftool", "link", "show", "pinned", "/pins/links/dns"] => {
                    Ok(b"7: tcx  prog 42\n".to_vec())
                }
                ["bpftool", "link", ..] => Err("not a link".into()),
                ["bpftool", "prog", ..] => Ok(b"42: sched_cls\n".to_vec()),
                _ => Ok(format!("{}\n", argv.join(" ")).into_bytes()),
            }
        }

        fn file(&self, path: &Path) -> Result<Vec<u8>, String> {
            self.files.get(path).cloned().ok_or_else(|| {
                format!("{}: No such file or directory (os error 2)", path.display())
            })
        }

        fn walk(&self, dir: &Path) -> Result<Vec<PathBuf>, String> {
            if dir == Path::new("/pins") {
                return Ok(vec!["/pins/links/dns".into(), "/pins/progs/tracer".into()]);
            }
            Ok(self
                .files
                .keys()
                .filter(|p| p.starts_with(dir))
                .cloned()
                .collect())
        }

        fn http_get(&self, _url: &str) -> Result<Vec<u8>, String> {
            Ok(
                b"# TYPE podnet_build_info gauge\npodnet_build_info{version=\"0.1.0\"} 1\n"
                    .to_vec(),
            )
        }
    }

    fn settings() -> Settings {
        Settings {
            metrics_url: "http://127.0.0.1:10310/metrics".into(),
            cni_log: "/var/log/podnet/cni.log".into(),
            bpffs: "/sys/fs/bpf/podnet".into(),
            budget: Duration::from_mins(1),
            version: "0.1.0".into(),
        }
    }

    #[test]
    fn failed_parts_are_listed_and_the_dump_goes_on() {
        let fake = Fake {
            files: [
                ("/var/log/podnet/cni.log", "now"),
                ("/var/log/podnet/cni.log.1", "before"),
                ("/var/log/podnet/cni.log.old", "not a rotation"),
                ("/proc/net/stat/nf_conntrack", "entries\n"),
            ]
            .into_iter()
            .map(|(p, c)| (PathBuf::from(p), c.as_bytes().to_vec()))
            .collect(),
        };
        let dump = collect(&fake, &settings());
        let names: Vec<&str> = dump.index.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "agent/status.json",
                "agent/endpoints.json",
                "agent/ipam.json",
                "agent/routes.json",
                "agent/races.json",
                "agent/dns-slow.json",
                "agent/dns-top.json",
                "agent/metrics.txt",
                "kernel/ip-rule.txt",
                "kernel/ip-route.txt",
                "kernel/ip-link.txt",
                "kernel/ip-neigh.txt",
                "kernel/tc-filters.txt",
                "kernel/bpftool-net.txt",
                "kernel/bpffs-pins.txt",
                "kernel/bpftool-pins.txt",
                "kernel/conntrack-stats.txt",
                "kernel/nf_conntrack-stat.txt",
                "logs/cni.log",
                "logs/cni.log.1",
                "versions.json",
                "uname.txt",
            ]
        );
        let failed: Vec<(&str, &str)> = dump
            .index
            .iter()
            .filter(|e| !e.ok)
            .map(|e| (e.name.as_str(), e.error.as_deref().unwrap_or_default()))
            .collect();
        assert_eq!(
            failed,
            [
                (
                    "agent/routes.json",
                    "routes.show: still starting (unavailable)"
                ),
                (
                    "kernel/conntrack-stats.txt",
                    "conntrack -S: cannot run conntrack: No such file or directory (os error 2)"
                ),
            ]
        );
        let member = |name: &str| {
            String::from_utf8(
                dump.members
                    .iter()
                    .find(|(n, _)| n == name)
                    .unwrap()
                    .1
                    .clone(),
            )
            .unwrap()
        };
        // One of two commands failing keeps the part, with the failure inside.
        assert_eq!(
            member("kernel/ip-rule.txt"),
            "# ip rule\nip rule\n# ip -6 rule\n(failed: exit status: 2: RTNETLINK answers: Address family not supported)\n"
        );
        assert_eq!(
            member("kernel/tc-filters.txt"),
            "# tc filter show dev vpod0 ingress\ntc filter show dev vpod0 ingress\n\
             # tc filter show dev vpod0 egress\ntc filter show dev vpod0 egress\n\
             # tc filter show dev vpod1 ingress\ntc filter show dev vpod1 ingress\n\
             # tc filter show dev vpod1 egress\ntc filter show dev vpod1 egress\n\
             # tc filter show dev vpod2 ingress\ntc filter show dev vpod2 ingress\n\
             # tc filter show dev vpod2 egress\ntc filter show dev vpod2 egress\n"
        );
        assert_eq!(
            member("kernel/bpftool-pins.txt"),
            "# /pins/links/dns\nlink: 7: tcx  prog 42\n# /pins/progs/tracer\nprog: 42: sched_cls\n"
        );
        assert_eq!(member("logs/cni.log.1"), "before");
        let versions: Value = serde_json::from_str(&member("versions.json")).unwrap();
        assert_eq!(
            versions,
            json!({"podnetctl": "0.1.0", "agent": "0.1.0", "agent_kernel": "6.18.0",
                   "agent_build_info": "podnet_build_info{version=\"0.1.0\"} 1"})
        );
        assert_eq!(dump.failed(), 2);
    }

    #[test]
    fn parts_are_bounded_in_size_and_time() {
        let mut dump = Dump::default();
        dump.add(
            "big",
            "x",
            Instant::now(),
            Ok(vec![b'x'; MAX_PART_BYTES + 5]),
        );
        assert!(dump.index[0].truncated);
        assert_eq!(dump.index[0].bytes, MAX_PART_BYTES);
        for n in 0..7 {
            dump.add(
                &format!("p{n}"),
                "x",
                Instant::now(),
                Ok(vec![b'x'; MAX_PART_BYTES]),
            );
        }
        assert_eq!(dump.total, MAX_TOTAL_BYTES);
        dump.add("late", "x", Instant::now(), Ok(vec![b'x']));
        assert_eq!(
            dump.index.last().unwrap().error.as_deref(),
            Some("skipped: the archive reached 67108864 bytes")
        );
        let spent = Settings {
            budget: Duration::ZERO,
            ..settings()
        };
        let fake = Fake {
            files: BTreeMap::new(),
        };
        let dump = collect(&fake, &spent);
        assert!(dump
            .index
            .iter()
            .all(|e| e.error.as_deref() == Some("skipped: the time budget of the dump was spent")));
    }

    #[test]
    fn archive_lists_index_first_under_one_directory() {
        let mut dump = Dump::default();
        dump.add(
            "agent/status.json",
            "api status",
            Instant::now(),
            Ok(b"{}".to_vec()),
        );
        dump.add(
            "kernel/ip-rule.txt",
            "ip rule",
            Instant::now(),
            Err("boom".into()),
        );
        let mut bytes = Vec::new();
        write_archive(&dump, "podnet-sysdump-1", 1_795_685_462_007, &mut bytes).unwrap();
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(bytes.as_slice()));
        let mut members = Vec::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let mut text = String::new();
            entry.read_to_string(&mut text).unwrap();
            members.push((entry.path().unwrap().display().to_string(), text));
        }
        assert_eq!(members.len(), 2);
        assert_eq!(members[0].0, "podnet-sysdump-1/index.json");
        assert_eq!(
            members[1],
            ("podnet-sysdump-1/agent/status.json".into(), "{}".into())
        );
        let index: Value = serde_json::from_str(&members[0].1).unwrap();
        assert_eq!(index["failed"], 1);
        assert_eq!(index["parts"][1]["error"], "boom");
        assert_eq!(index["parts"][1]["ok"], false);
    }

    #[test]
    fn commands_are_killed_at_their_timeout() {
        let started = Instant::now();
        let error = run_command(&["sleep", "5"], Duration::from_millis(200)).unwrap_err();
        assert_eq!(error, "sleep did not finish within 200ms; killed");
        assert!(started.elapsed() < Duration::from_secs(4));
        assert_eq!(
            run_command(&["echo", "hi"], Duration::from_secs(5)).unwrap(),
            b"hi\n"
        );
        assert!(
            run_command(&["podnet-no-such-command"], Duration::from_secs(1))
                .unwrap_err()
                .starts_with("cannot run podnet-no-such-command: ")
        );
    }
}
