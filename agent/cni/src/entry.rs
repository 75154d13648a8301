//! The whole plugin call as the binary makes it: environment and stdin in,
//! stdout text and exit code out, with a log line per call.

use std::{
    collections::HashMap,
    io::Write as _,
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
    let outcome = match result {
        Ok((_, out)) => Outcome {
            stdout: out.unwrap_or_default(),
            exit_code: 0,
            error: None,
        },
        Err(e) => Outcome {
            stdout: e.to_json(&version),
            exit_code: 1,
            error: Some(e),
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
    log(log_file.as_deref().unwrap_or(spec::DEFAULT_LOG_FILE), &line);
    outcome
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
