//! Running CNI chains the way a container runtime does: a small Go program
//! on libcni (`tests/cni-runner`) drives Debian's reference plugins from
//! /usr/lib/cni with podnet-cni copied next to them.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        OnceLock,
    },
    time::Duration,
};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::{agent::binary, netns::Netns};

/// Debian's reference plugins.
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

static COUNTER: AtomicU32 = AtomicU32::new(0);
static RUNNER: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();

/// Builds `tests/cni-runner` once per process, offline, against Debian's
/// libcni sources (`GO111MODULE=off GOPATH=/usr/share/gocode`). The binary is
/// kept under the temporary directory by a hash of its source, with one Go
/// build cache beside it, so later processes (test binaries, the demo) reuse
/// it instead of compiling libcni again.
pub fn runner() -> Result<PathBuf> {
    RUNNER
        .get_or_init(|| build_runner().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

fn build_runner() -> Result<PathBuf> {
    use std::hash::{Hash as _, Hasher as _};
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("cni-runner/main.go");
    let text = std::fs::read(&source).with_context(|| format!("reading {}", source.display()))?;
    // SipHash with fixed keys: the same source gives the same name in every process.
    let mut hasher = std::hash::DefaultHasher::new();
    text.hash(&mut hasher);
    let cache = std::env::temp_dir().join("podnet-cni-runner");
    let out = cache
        .join(format!("{:016x}", hasher.finish()))
        .join("cni-runner");
    if out.exists() {
        return Ok(out);
    }
    let dir = out.parent().unwrap_or(&cache);
    std::fs::create_dir_all(dir)?;
    // Built under a name of this process's own and renamed into place, so
    // processes building at the same time never run a half-written binary.
    let partial = dir.join(format!("cni-runner.{}", std::process::id()));
    let status = Command::new("go")
        .args(["build", "-o"])
        .arg(&partial)
        .arg(&source)
        .env("GO111MODULE", "off")
        .env("GOPATH", "/usr/share/gocode")
        .env("GOCACHE", cache.join("gocache"))
        .env("GOFLAGS", "")
        .status()
        .context("running `go build` (install golang-go and golang-github-appc-cni-dev: cargo xtask setup)")?;
    if !status.success() {
        let _ = std::fs::remove_file(&partial);
        bail!("go build of {} failed: {status}", source.display());
    }
    std::fs::rename(&partial, &out)?;
    Ok(out)
}

/// Whether a CNI test can run: root and the CNI test peers ([`available`]).
/// Otherwise reports why (a failure with `CI=true`) and returns `false`.
pub fn ready() -> bool {
    if !crate::require_root() {
        return false;
    }
    match available() {
        Ok(()) => true,
        Err(e) => !crate::unavailable(&format!("CNI test peers: {e:#}")),
    }
}

/// What the host needs for CNI tests; `Err` names what is missing.
pub fn available() -> Result<()> {
    for plugin in ["ptp", "bridge", "host-local", "loopback"] {
        let p = Path::new(REFERENCE_PLUGINS).join(plugin);
        if !p.exists() {
            bail!(
                "{} missing (apt-get install containernetworking-plugins)",
                p.display()
            );
        }
    }
    if !Path::new("/usr/share/gocode/src/github.com/containernetworking/cni/libcni").exists() {
        bail!("libcni sources missing (apt-get install golang-github-appc-cni-dev)");
    }
    runner().map(|_| ())
}

/// A `CNI_PATH` directory with the reference plugins and podnet-cni, a
/// libcni cache directory and a log file; removed on drop.
#[derive(Debug)]
pub struct CniEnv {
    dir: PathBuf,
}

/// One attachment to run a chain for.
#[derive(Clone, Debug)]
pub struct Attachment {
    /// Container id.
    pub container_id: String,
    /// Pod netns path.
    pub netns: PathBuf,
    /// Interface name inside the pod.
    pub if_name: String,
    /// `CNI_ARGS`.
    pub args: String,
}

impl Attachment {
    /// An attachment of pod `namespace/name` in `netns`, with `eth0`.
    pub fn pod(container_id: &str, netns: &Netns, namespace: &str, name: &str) -> Self {
        Self {
            container_id: container_id.into(),
            netns: netns.path(),
            if_name: "eth0".into(),
            args: format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};K8S_POD_UID=uid-{container_id}"
            ),
        }
    }
}

impl CniEnv {
    /// Prepares the directories.
    pub fn new() -> Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "podnet-cni-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin)?;
        std::fs::create_dir_all(dir.join("cache"))?;
        for entry in std::fs::read_dir(REFERENCE_PLUGINS)? {
            let entry = entry?;
            std::fs::copy(entry.path(), bin.join(entry.file_name()))?;
        }
        std::fs::copy(binary("podnet-cni")?, bin.join("podnet-cni"))?;
        Ok(Self { dir })
    }

    /// The `CNI_PATH` directory.
    pub fn bin_dir(&self) -> PathBuf {
        self.dir.join("bin")
    }

    /// podnet-cni's log file for configurations made with [`CniEnv::keys`].
    pub fn log_file(&self) -> PathBuf {
        self.dir.join("cni.log")
    }

    /// A scratch directory (e.g. host-local's dataDir).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// podnet's configuration keys as a JSON fragment: `"socket":..,"logFile":..`.
    pub fn keys(&self, socket: &Path) -> String {
        format!(
            "\"socket\": {:?}, \"logFile\": {:?}, \"timeout\": \"5s\"",
            socket.display().to_string(),
            self.log_file().display().to_string()
        )
    }

    /// The shipped chain as a conflist of network `network`: `ptp` with
    /// podnet-cni as its IPAM, then podnet-cni, both talking to the agent at
    /// `socket`.
    pub fn ptp_chain_text(&self, network: &str, socket: &Path) -> String {
        let keys = self.keys(socket);
        format!(
            r#"{{"cniVersion": "1.0.0", "name": "{network}", "plugins": [
                {{"type": "ptp", "ipMasq": false, "ipam": {{"type": "podnet-cni", {keys}}}}},
                {{"type": "podnet-cni", {keys}}}
            ]}}"#
        )
    }

    /// Writes [`CniEnv::ptp_chain_text`] as `<network>.conflist`; returns its path.
    pub fn ptp_chain(&self, network: &str, socket: &Path) -> Result<PathBuf> {
        self.conflist(network, &self.ptp_chain_text(network, socket))
    }

    /// Writes a conflist and returns its path.
    pub fn conflist(&self, name: &str, text: &str) -> Result<PathBuf> {
        let path = self.dir.join(format!("{name}.conflist"));
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// Runs the runner with `command` for `att` inside `node`.
    pub fn run(
        &self,
        node: &Netns,
        command: &str,
        conflist: &Path,
        att: &Attachment,
        valid: Option<&str>,
    ) -> Result<RunOutput> {
        let runner = runner()?;
        let runner = runner.to_string_lossy().into_owned();
        let list = conflist.to_string_lossy().into_owned();
        let mut cmd = node.command(&[&runner, command, &list]);
        cmd.env("CNI_PATH", self.bin_dir())
            .env("RUNNER_CACHEDIR", self.dir.join("cache"))
            .env("RUNNER_CONTAINERID", &att.container_id)
            .env("RUNNER_NETNS", &att.netns)
            .env("RUNNER_IFNAME", &att.if_name)
            .env("RUNNER_ARGS", &att.args)
            .env("RUNNER_VALID", valid.unwrap_or("[]"))
            .stdin(Stdio::null());
        let out = cmd.output().context("running cni-runner")?;
        RunOutput::from(&out, command)
    }
}

impl Drop for CniEnv {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What one runner call printed.
#[derive(Clone, Debug)]
pub struct RunOutput {
    /// The result JSON (ADD) or empty.
    pub stdout: String,
    /// Time libcni took for the whole chain.
    pub elapsed: Duration,
}

impl RunOutput {
    fn from(out: &Output, command: &str) -> Result<Self> {
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if !out.status.success() {
            bail!(
                "cni-runner {command} failed ({}): {stderr}{stdout}",
                out.status
            );
        }
        let us: u64 = stderr
            .lines()
            .find_map(|l| l.strip_prefix("elapsed_us="))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| anyhow!("cni-runner printed no elapsed time: {stderr}"))?;
        Ok(Self {
            stdout,
            elapsed: Duration::from_micros(us),
        })
    }

    /// The result as JSON.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_str(&self.stdout).with_context(|| format!("result {:?}", self.stdout))
    }
}

/// The environment of a direct plugin call: `command` for `container_id`'s
/// interface `eth0` in the namespace at `netns`, plugins in
/// [`REFERENCE_PLUGINS`].
pub fn runtime_env<'a>(
    command: &'a str,
    container_id: &'a str,
    netns: &'a str,
) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", container_id),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", REFERENCE_PLUGINS),
    ]
}

/// A ptp network whose IPAM is podnet-cni, talking to the agent at `socket`
/// and logging to `log`, for direct plugin calls.
pub fn ptp_ipam_conf(socket: &Path, log: &Path) -> String {
    format!(
        r#"{{"cniVersion":"1.0.0","name":"n","type":"ptp","ipam":{{"type":"podnet-cni","socket":"{}","logFile":"{}"}}}}"#,
        socket.display(),
        log.display()
    )
}

/// Calls podnet-cni directly, expecting a CNI error; returns the error
/// object it printed (an `Err` if the call succeeded or printed no JSON).
pub fn invoke_plugin_error(env: &[(&str, &str)], stdin: &[u8]) -> Result<serde_json::Value> {
    let (ok, out) = invoke_plugin(env, stdin)?;
    if ok {
        bail!("the call succeeded: {out}");
    }
    serde_json::from_str(out.trim()).with_context(|| format!("not a CNI error: {out}"))
}

/// Calls podnet-cni directly (no runtime), as a runtime would: env + stdin.
/// Returns (exit success, stdout).
pub fn invoke_plugin(env: &[(&str, &str)], stdin: &[u8]) -> Result<(bool, String)> {
    invoke_plugin_at(&binary("podnet-cni")?, env, stdin)
}

/// Like [`invoke_plugin`], with the plugin binary at `path`: long runs next
/// to a rebuild of the workspace use the copy in a `CNI_PATH` directory
/// ([`CniEnv::bin_dir`]), which a rebuild cannot replace.
pub fn invoke_plugin_at(path: &Path, env: &[(&str, &str)], stdin: &[u8]) -> Result<(bool, String)> {
    use std::io::Write as _;
    let mut child = Command::new(path)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", path.display()))?;
    if let Some(mut input) = child.stdin.take() {
        // A plugin that exits early closes its stdin; its answer says why.
        let _ = input.write_all(stdin);
    }
    let out = child.wait_with_output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

/// The durations podnet-cni logged (`elapsed_us=`) for `command`, in order.
pub fn logged_durations(log: &Path, command: &str) -> Result<Vec<Duration>> {
    let text =
        std::fs::read_to_string(log).with_context(|| format!("reading {}", log.display()))?;
    let want = format!("command={command} ");
    Ok(text
        .lines()
        .filter(|l| l.contains(&want))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("elapsed_us="))
                .and_then(|v| v.parse().ok())
        })
        .map(Duration::from_micros)
        .collect())
}
