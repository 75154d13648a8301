//! The real `podnet-agent`, started inside a simulated node's namespace.
//!
//! Each agent gets its own bpffs pin directory, API socket and endpoints file,
//! so tests run in parallel without sharing kernel state. Dropping the guard
//! stops the agent by PID and removes its pins (which detaches its programs).

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::{
    netns::{in_netns, Netns},
    process::{spawn_in_with_env, NsChild},
    util::{http_exchange, wait_for},
};

/// The metrics address inside the node namespace (each namespace has its own
/// loopback, so every simulated node can use the default port).
pub const METRICS_ADDR: &str = "127.0.0.1:10310";
/// How long an agent may take to become ready by default.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// How long an agent may take to become ready: [`READY_TIMEOUT`], or
/// `PODNET_TEST_READY_TIMEOUT` seconds on slow machines such as emulated VMs.
pub fn ready_timeout() -> Duration {
    std::env::var("PODNET_TEST_READY_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(READY_TIMEOUT, Duration::from_secs)
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// One endpoint line of the agent's `--endpoints` file.
#[derive(Clone, Debug)]
pub struct EndpointSpec {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// Addresses.
    pub ips: Vec<std::net::IpAddr>,
    /// Host-side interface.
    pub interface: Option<String>,
    /// The pod's sandbox id in the container runtime (`containerId`).
    pub container_id: Option<String>,
}

impl EndpointSpec {
    /// An endpoint with the given identity and addresses.
    pub fn new(namespace: &str, pod: &str, ips: &[std::net::IpAddr]) -> Self {
        Self {
            namespace: namespace.into(),
            pod: pod.into(),
            ips: ips.to_vec(),
            interface: None,
            container_id: None,
        }
    }

    /// Sets the pod's sandbox id, which the agent looks up in the container runtime.
    #[must_use]
    pub fn container_id(mut self, id: &str) -> Self {
        self.container_id = Some(id.into());
        self
    }

    /// Sets the host-side interface.
    #[must_use]
    pub fn interface(mut self, name: &str) -> Self {
        self.interface = Some(name.into());
        self
    }
}

/// Renders an endpoints file in the documented YAML format.
pub fn endpoints_yaml(endpoints: &[EndpointSpec]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    for ep in endpoints {
        let ips: Vec<String> = ep.ips.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            out,
            "- namespace: {}\n  pod: {}\n  ips: [{}]",
            ep.namespace,
            ep.pod,
            ips.join(", ")
        );
        if let Some(i) = &ep.interface {
            let _ = writeln!(out, "  interface: {i}");
        }
        if let Some(id) = &ep.container_id {
            let _ = writeln!(out, "  containerId: {id}");
        }
    }
    out
}

/// Where cargo put the workspace's binaries (`target/<profile>`), found from
/// the running executable: a test (`target/<profile>/deps/<test>`) or a
/// binary of this crate (`target/<profile>/<bin>`).
pub fn binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(name))
        .collect();
    candidates.iter().find(|p| p.exists()).cloned().ok_or_else(|| {
        anyhow!(
            "{name} not built (looked for {candidates:?}): run `cargo build` (cargo xtask test does)"
        )
    })
}

/// A running agent and the files it owns.
#[derive(Debug)]
pub struct Agent {
    node: PathBuf,
    node_name: String,
    child: Option<NsChild>,
    workdir: PathBuf,
    bpffs: PathBuf,
    state: PathBuf,
    extra_args: Vec<String>,
    extra_env: Vec<(String, String)>,
}

impl Agent {
    /// Starts an agent in `node` with these endpoints and waits until ready.
    pub fn start(node: &Netns, endpoints: &[EndpointSpec]) -> Result<Self> {
        Self::start_with(node, endpoints, &[])
    }

    /// Like [`Agent::start`], with extra command-line arguments. `--bpffs` and
    /// `--state-dir` among them replace the agent's own directories (the
    /// caller then owns them; [`Agent::bpffs`] and [`Agent::state_dir`] name them).
    pub fn start_with(
        node: &Netns,
        endpoints: &[EndpointSpec],
        extra_args: &[&str],
    ) -> Result<Self> {
        Self::start_with_env(node, endpoints, extra_args, &[])
    }

    /// Like [`Agent::start_with`], with extra environment variables.
    pub fn start_with_env(
        node: &Netns,
        endpoints: &[EndpointSpec],
        extra_args: &[&str],
        extra_env: &[(&str, &str)],
    ) -> Result<Self> {
        let id = format!(
            "{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let workdir = std::env::temp_dir().join(format!("podnet-agent-{id}"));
        std::fs::create_dir_all(&workdir)?;
        std::fs::write(workdir.join("endpoints.yaml"), endpoints_yaml(endpoints))?;
        let mut bpffs = PathBuf::from(format!("/sys/fs/bpf/podnet-test-{id}"));
        let mut state = workdir.join("state");
        let mut extra = Vec::new();
        let mut args = extra_args.iter();
        while let Some(arg) = args.next() {
            match (*arg, args.clone().next()) {
                ("--bpffs", Some(dir)) => bpffs = PathBuf::from(dir),
                ("--state-dir", Some(dir)) => state = PathBuf::from(dir),
                _ => {
                    extra.push((*arg).to_owned());
                    continue;
                }
            }
            args.next();
        }
        let mut agent = Self {
            node: node.path(),
            node_name: node.name().to_owned(),
            child: None,
            workdir,
            bpffs,
            state,
            extra_args: extra,
            extra_env: extra_env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        };
        agent.launch(node)?;
        Ok(agent)
    }

    fn launch(&mut self, node: &Netns) -> Result<()> {
        let bin = binary("podnet-agent")?;
        let bin = bin.to_string_lossy().into_owned();
        let socket = self.socket().to_string_lossy().into_owned();
        let endpoints = self.endpoints_file().to_string_lossy().into_owned();
        let bpffs = self.bpffs.to_string_lossy().into_owned();
        let state = self.state.to_string_lossy().into_owned();
        let mut cmd = vec![bin.as_str()];
        // A test may listen elsewhere too (e.g. 0.0.0.0, for pods); the
        // harness still scrapes METRICS_ADDR, which that covers.
        if !self.extra_args.iter().any(|a| a == "--metrics-addr") {
            cmd.extend(["--metrics-addr", METRICS_ADDR]);
        }
        // The suites assert per-pod series (`namespace`, `pod`): every
        // namespace keeps its pods, unless a test chooses (the agent's
        // default is per workload).
        if !self
            .extra_args
            .iter()
            .any(|a| a.starts_with("--pod-metrics-namespaces"))
        {
            cmd.extend(["--pod-metrics-namespaces", "*"]);
        }
        cmd.extend([
            "--socket",
            &socket,
            "--endpoints",
            &endpoints,
            "--bpffs",
            &bpffs,
            "--state-dir",
            &state,
        ]);
        cmd.extend(self.extra_args.iter().map(String::as_str));
        // Extra flags for every agent of a run (e.g. `--race-hook tracepoint`
        // to run the suite once per race hook).
        // Flags given explicitly win over the same flags from the environment.
        let env_args = std::env::var("PODNET_TEST_AGENT_ARGS").unwrap_or_default();
        let env_args: Vec<&str> = env_args.split_whitespace().collect();
        for pair in env_args.chunks(2) {
            if !self.extra_args.iter().any(|a| a == pair[0]) {
                cmd.extend(pair.iter().copied());
            }
        }
        let mut env = vec![("PODNET_LOG", "info")];
        env.extend(self.extra_env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        self.child = Some(spawn_in_with_env(node, &cmd, &env)?);
        let timeout = ready_timeout();
        let ready = wait_for(
            || http_get(node, "/readyz").is_ok_and(|(code, _)| code == 200),
            timeout,
        );
        if !ready {
            let log = self.child.as_ref().map(NsChild::log).unwrap_or_default();
            bail!(
                "agent in {} not ready after {timeout:?}; log:\n{log}",
                self.node_name
            );
        }
        Ok(())
    }

    /// Stops the agent with SIGTERM (pins stay) and starts it again with the
    /// same files, waiting until ready.
    pub fn restart(&mut self, node: &Netns) -> Result<()> {
        self.stop()?;
        self.launch(node)
    }

    /// [`Agent::restart`] with `args` added to its flags (kept for later starts).
    pub fn restart_with_args(&mut self, node: &Netns, args: &[&str]) -> Result<()> {
        self.extra_args.extend(args.iter().map(|a| (*a).to_owned()));
        self.restart(node)
    }

    /// Stops the agent with SIGTERM; its pinned programs keep running.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(child) = self.child.take() {
            let status = child.stop()?;
            if !status.success() {
                bail!("agent exited with {status}");
            }
        }
        Ok(())
    }

    /// Kills the agent with SIGKILL, as a crash would; its files stay.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(child) = self.child.take() {
            child.kill()?;
        }
        Ok(())
    }

    /// Starts the agent again (after [`Agent::kill`] or [`Agent::stop`]) with
    /// the same files, waiting until ready.
    pub fn start_again(&mut self, node: &Netns) -> Result<()> {
        self.launch(node)
    }

    /// The agent's state directory (`--state-dir`).
    pub fn state_dir(&self) -> PathBuf {
        self.state.clone()
    }

    /// The agent's API socket.
    pub fn socket(&self) -> PathBuf {
        self.workdir.join("agent.sock")
    }

    /// The agent's endpoints file (rewrite it to change endpoints).
    pub fn endpoints_file(&self) -> PathBuf {
        self.workdir.join("endpoints.yaml")
    }

    /// The agent's bpffs pin directory.
    pub fn bpffs(&self) -> &Path {
        &self.bpffs
    }

    /// The agent's exit status once it exited on its own (`None` while it
    /// runs, and after [`Agent::kill`] or [`Agent::stop`]).
    pub fn exited(&mut self) -> Result<Option<std::process::ExitStatus>> {
        match self.child.as_mut() {
            Some(child) => child.try_wait(),
            None => Ok(None),
        }
    }

    /// The running agent's process id (`None` after [`Agent::kill`] or [`Agent::stop`]).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(NsChild::pid)
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        self.child.as_ref().map(NsChild::log).unwrap_or_default()
    }

    /// Scrapes `/metrics` from inside the node namespace.
    pub fn metrics(&self, node: &Netns) -> Result<Metrics> {
        let (code, body) = http_get(node, "/metrics")?;
        if code != 200 {
            bail!("/metrics answered {code}: {body}");
        }
        Ok(Metrics(body))
    }

    /// Calls the agent's local API.
    pub fn api(&self, method: &str, params: serde_json::Value) -> Result<serde_json::Value> {
        podnet::api::client::call(&self.socket(), method, params, Duration::from_secs(5))
            .map_err(|e| anyhow!("{method}: {e}"))
    }

    /// Waits until the agent's `routes.show` lists `expected` objects, all
    /// `ok` or `provided` (routing converged: a foreign route such as the one
    /// a CNI plugin installs forwards the same way), for at most 10 s.
    pub fn wait_routes_converged(&self, expected: usize) -> Result<()> {
        let mut last = serde_json::Value::Null;
        let ok = wait_for(
            || {
                let Ok(view) = self.api("routes.show", serde_json::Value::Null) else {
                    return false;
                };
                let lines = view["lines"].as_array().cloned().unwrap_or_default();
                last = view;
                lines.len() == expected
                    && lines
                        .iter()
                        .all(|l| l["state"] == "ok" || l["state"] == "provided")
            },
            Duration::from_secs(10),
        );
        if !ok {
            bail!(
                "routing did not converge to {expected} objects: {last:#}\nagent log:\n{}",
                self.log()
            );
        }
        Ok(())
    }

    /// Addresses free in the agent's first IPAM pool (0 when unknown).
    pub fn ipam_free(&self) -> u64 {
        self.api("ipam.status", serde_json::json!({}))
            .ok()
            .and_then(|s| s["pools"][0]["free"].as_u64())
            .unwrap_or(0)
    }

    /// Allocates an address for `container` (interface `eth0`, network
    /// `podnet`) through `ipam.allocate`, as podnet-cni does; returns it.
    pub fn ipam_allocate(&self, container: &str) -> Result<String> {
        let a = self.api(
            "ipam.allocate",
            serde_json::json!({"containerId": container, "ifName": "eth0", "network": "podnet"}),
        )?;
        a["ips"][0]["ip"]
            .as_str()
            .map(str::to_owned)
            .context("allocation without address")
    }

    /// Runs `podnetctl` against this agent and returns its stdout.
    pub fn podnetctl(&self, args: &[&str]) -> Result<String> {
        let out = std::process::Command::new(binary("podnetctl")?)
            .arg("--socket")
            .arg(self.socket())
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!(
                "podnetctl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            let _ = child.stop();
        }
        if let Err(e) = std::fs::remove_dir_all(&self.bpffs) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("podnet-tests: removing {}: {e}", self.bpffs.display());
            }
        }
        let _ = std::fs::remove_dir_all(&self.workdir);
        let _ = &self.node;
    }
}

/// One HTTP/1.0 GET to the agent's metrics address inside `node`.
pub fn http_get(node: &Netns, path: &str) -> Result<(u16, String)> {
    http_request(
        node,
        format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n"),
    )
    .context("GET from the agent")
}

/// Sends `request` (raw HTTP, as given) to the agent's metrics address inside
/// `node` and reads the answer to its end: (status code, body).
pub fn http_request(node: &Netns, request: String) -> Result<(u16, String)> {
    in_netns(node, move || -> Result<(u16, String)> {
        http_exchange(
            METRICS_ADDR.parse()?,
            &request,
            Duration::from_secs(1),
            Duration::from_secs(5),
        )
    })?
}

/// A scraped metrics page.
#[derive(Clone, Debug)]
pub struct Metrics(pub String);

impl Metrics {
    /// The value of the sample `name` whose labels are exactly `labels`
    /// (order-insensitive); `None` when there is no such sample.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut want: Vec<(String, String)> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        want.sort();
        self.0.lines().find_map(|line| {
            let (sample_name, sample_labels, value) = parse_sample(line)?;
            (sample_name == name && sample_labels == want).then_some(value)
        })
    }

    /// Like [`Metrics::value`], with a missing sample read as 0.
    pub fn value_or_zero(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels).unwrap_or(0.0)
    }

    /// Every sample of `name`: its sorted labels and value.
    pub fn samples(&self, name: &str) -> Vec<(Vec<(String, String)>, f64)> {
        self.0
            .lines()
            .filter_map(parse_sample)
            .filter(|(n, _, _)| n == name)
            .map(|(_, labels, v)| (labels, v))
            .collect()
    }

    /// The sum of every sample of `name` whose labels include all of `labels`.
    pub fn count_matching(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let sum = self
            .samples(name)
            .iter()
            .filter(|(have, _)| {
                labels
                    .iter()
                    .all(|(k, v)| have.iter().any(|(hk, hv)| hk == k && hv == v))
            })
            .map(|(_, v)| v)
            .sum();
        exact(name, sum)
    }

    /// The sum of every sample of `name`.
    pub fn sum(&self, name: &str) -> f64 {
        self.0
            .lines()
            .filter_map(parse_sample)
            .filter(|(n, _, _)| n == name)
            .map(|(_, _, v)| v)
            .sum()
    }

    /// A counter or integer gauge as an exact integer (missing = 0).
    ///
    /// # Panics
    /// If the sample is not a non-negative integer.
    pub fn count(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        exact(name, self.value_or_zero(name, labels))
    }

    /// The sum of every sample of `name`, as an exact integer.
    ///
    /// # Panics
    /// If the sum is not a non-negative integer.
    pub fn count_sum(&self, name: &str) -> u64 {
        exact(name, self.sum(name))
    }

    /// True when some sample (or HELP/TYPE line) names this metric family.
    pub fn has_family(&self, name: &str) -> bool {
        self.0.lines().any(|l| {
            l.strip_prefix("# TYPE ")
                .is_some_and(|rest| rest.split_whitespace().next() == Some(name))
        })
    }
}

/// Converts a counter value to an integer, refusing anything inexact.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // checked just before
fn exact(name: &str, value: f64) -> u64 {
    assert!(
        value >= 0.0 && value.fract() == 0.0 && value < 2f64.powi(53),
        "{name} = {value} is not an exact count"
    );
    value as u64
}

/// A sample: metric name, sorted labels, value.
type Sample = (String, Vec<(String, String)>, f64);

fn parse_sample(line: &str) -> Option<Sample> {
    if line.starts_with('#') || line.trim().is_empty() {
        return None;
    }
    let (series, value) = line.rsplit_once(' ')?;
    let value: f64 = value.parse().ok()?;
    let (name, labels) = match series.split_once('{') {
        Some((name, rest)) => (name, rest.strip_suffix('}')?),
        None => (series, ""),
    };
    let mut parsed = Vec::new();
    let mut rest = labels;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => {
                    end = Some(i);
                    break;
                }
                c => value.push(c),
            }
        }
        let end = end?;
        parsed.push((key.trim_start_matches(',').to_owned(), value));
        rest = after[end + 1..].trim_start_matches(',');
    }
    parsed.sort();
    Some((name.to_owned(), parsed, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_samples_with_escaped_labels() {
        let m = Metrics(
            "# TYPE podnet_x_total counter\npodnet_x_total{pod=\"a\\\"b\",namespace=\"\"} 5\npodnet_y 1.5\n"
                .into(),
        );
        assert_eq!(
            m.value("podnet_x_total", &[("namespace", ""), ("pod", "a\"b")]),
            Some(5.0)
        );
        assert_eq!(m.value("podnet_x_total", &[("pod", "a\"b")]), None);
        assert_eq!(m.value("podnet_y", &[]), Some(1.5));
        assert!(m.has_family("podnet_x_total"));
        assert_eq!(m.count_sum("podnet_x_total"), 5);
        assert_eq!(m.count("podnet_z_total", &[]), 0);
    }
}
