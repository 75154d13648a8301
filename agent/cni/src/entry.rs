//! The whole plugin call as the binary makes it: environment and stdin in,
//! stdout text and exit code out, with a log line per call.

use std::{
    collections::HashMap,
    io::Write,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use podnet_api::client::{self, ClientError};
use serde_json::Value;

use crate::{
    env::{self, Command},
    plugin::{self, AgentApi},
    spec::{self, CniError, PodnetKeys},
};

/// The agent behind a Unix socket.
#[derive(Clone, Debug)]
pub struct SocketAgent {
    /// Socket path.
    pub socket: PathBuf,
    /// Timeout of each call.
    pub timeout: Duration,
}

impl AgentApi for SocketAgent {
    fn call(&self, method: &str, params: Value) -> Result<Value, ClientError> {
        client::call(&self.socket, method, params, self.timeout)
    }
}

/// What the binary prints and exits with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Text for stdout (a result, a version answer, an error JSON, or empty).
    pub stdout: String,
    /// Process exit code.
    pub exit_code: i32,
    /// The error, if the call failed.
    pub error: Option<CniError>,
    /// The log file of the call (the configuration's, else the default).
    pub log_file: String,
}

/// Runs one call. `agent_for` builds the agent client from the
/// configuration's keys (tests pass a fake).
pub fn execute<S: std::hash::BuildHasher>(
    vars: &HashMap<String, String, S>,
    stdin: &[u8],
    agent_for: &dyn Fn(&PodnetKeys) -> Box<dyn AgentApi>,
) -> Outcome {
    let started = Instant::now();
    let mut version = spec::SPEC_VERSION.to_owned();
    let mut log_file: Option<String> = None;
    let result = (|| -> Result<(env::CniEnv, Option<String>), CniError> {
        let env = env::from_vars(vars)?;
        if env.command == Command::Version {
            version = plugin::version_request(stdin)?;
            return Ok((env, Some(spec::version_json(&version))));
        }
        let conf = spec::parse_netconf(stdin)?;
        version.clone_from(&conf.cni_version);
        log_file = Some(conf.keys.log_file.clone());
        let agent = agent_for(&conf.keys);
        let out = plugin::run(&env, &conf, agent.as_ref())?;
        Ok((env, out))
    })();
    let elapsed = started.elapsed();
    let command = vars.get("CNI_COMMAND").map_or("", String::as_str);
    let container = vars.get("CNI_CONTAINERID").map_or("", String::as_str);
    let log_file = log_file.unwrap_or_else(|| spec::DEFAULT_LOG_FILE.to_owned());
    let outcome = match result {
        Ok((_, out)) => Outcome {
            stdout: out.unwrap_or_default(),
            exit_code: 0,
            error: None,
            log_file,
        },
        Err(e) => Outcome {
            stdout: e.to_json(&version),
            exit_code: 1,
            error: Some(e),
            log_file,
        },
    };
    let line = format!(
        "{} command={command} container={container} elapsed_us={} result={}\n",
        unix_seconds(),
        elapsed.as_micros(),
        outcome.error.as_ref().map_or_else(
            || "ok".to_owned(),
            |e| format!("error code={} msg={:?}", e.code, e.to_string())
        ),
    );
    log(&outcome.log_file, &line);
    outcome
}

/// Writes the call's stdout text, a newline after it, to `out`. An error
/// means the runtime never got the result (it closed the pipe, or the write
/// failed): the binary logs it with [`log_undelivered`] and fails the call.
pub fn write_stdout(out: &mut impl Write, outcome: &Outcome) -> std::io::Result<()> {
    if outcome.stdout.is_empty() {
        return Ok(());
    }
    out.write_all(outcome.stdout.as_bytes())?;
    out.write_all(b"\n")?;
    out.flush()
}

/// Logs that the result of the call in `vars` could not be written.
pub fn log_undelivered<S: std::hash::BuildHasher>(
    vars: &HashMap<String, String, S>,
    outcome: &Outcome,
    error: &std::io::Error,
) {
    let command = vars.get("CNI_COMMAND").map_or("", String::as_str);
    let container = vars.get("CNI_CONTAINERID").map_or("", String::as_str);
    let line = format!(
        "{} command={command} container={container} result=undelivered msg={:?}\n",
        unix_seconds(),
        format!("writing the result to stdout: {error}"),
    );
    log(&outcome.log_file, &line);
}

fn unix_seconds() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}.{:03}", d.as_secs(), d.subsec_millis())
}

/// Appends `line` to the log file; logging never fails a call.
fn log(path: &str, line: &str) {
    let path = Path::new(path);
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = f.write_all(line.as_bytes());
    }
}
