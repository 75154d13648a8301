//! The whole plugin call as the binary makes it: environment and stdin in,
//! stdout text and exit code out, with a log line per call.

use std::{
    collections::HashMap,
    io::Write,
    os::unix::fs::MetadataExt as _,
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

/// Appends `line` to the log file, rotated at [`spec::MAX_LOG_BYTES`];
/// logging never fails a call.
fn log(path: &str, line: &str) {
    let _ = append(Path::new(path), line, spec::MAX_LOG_BYTES);
}

/// `<path>.1`, where a full log file goes.
fn rotated(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// Appends `line` to `path`, first renaming it to `<path>.1` when it holds
/// `max` bytes or more.
///
/// Plugin calls run concurrently. The one that rotates holds an exclusive
/// `flock` on the full file and renames it only while `path` still names
/// that file: another call that found it full too waits for the lock, then
/// sees that `path` names a new file and appends there instead of rotating
/// the fresh file over the full one. Calls that do not rotate take no lock;
/// a line appended to the old file while it is renamed lands in `<path>.1`.
fn append(path: &Path, line: &str, max: u64) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let open = || {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    };
    let mut file = open()?;
    if file.metadata()?.len() >= max {
        file.lock()?;
        let still_named = std::fs::metadata(path).is_ok_and(|named| {
            file.metadata()
                .is_ok_and(|held| (named.dev(), named.ino()) == (held.dev(), held.ino()))
        });
        if still_named {
            std::fs::rename(path, rotated(path))?;
        }
        // The lock goes with the full file; the line goes to the new one.
        file = open()?;
    }
    file.write_all(line.as_bytes())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn the_log_is_rotated_once_full() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("sub/cni.log");
        // 30 bytes a line, rotated at 100: four lines fit (the fourth
        // starts at 90), the fifth goes to a new file.
        let line = |n: u32| format!("{n:029}\n");
        for n in 1..=5 {
            append(&log, &line(n), 100).unwrap();
        }
        let read = |p: &Path| std::fs::read_to_string(p).unwrap();
        assert_eq!(read(&rotated(&log)), (1..=4).map(line).collect::<String>());
        assert_eq!(read(&log), line(5));
        // Full again: the previous rotated file is replaced.
        for n in 6..=9 {
            append(&log, &line(n), 100).unwrap();
        }
        assert_eq!(read(&rotated(&log)), (5..=8).map(line).collect::<String>());
        assert_eq!(read(&log), line(9));
        assert_eq!(
            rotated(Path::new("/var/log/podnet/cni.log")),
            Path::new("/var/log/podnet/cni.log.1")
        );
    }

    #[test]
    fn concurrent_calls_keep_the_log_bounded() {
        const WRITERS: usize = 8;
        const LINES: u64 = 500;
        const LINE: usize = 30;
        const MAX: u64 = 1000;
        // One line per writer.
        const SLACK: u64 = 8 * 30;
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(dir.path().join("cni.log"));
        // Each call opens the file itself, so the locks are as between
        // processes (flock is per open file).
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for n in 0..LINES {
                        append(&log, &format!("{w:02}{n:027}\n"), MAX).unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        // Only full files are rotated, and each file outgrows the limit by at
        // most one line per call that found it not yet full.
        let len = |p: &Path| std::fs::metadata(p).unwrap().len();
        let (old, new) = (len(&rotated(&log)), len(&log));
        assert!((MAX..=MAX + SLACK).contains(&old), "{old} bytes");
        assert!(new <= MAX + SLACK, "{new} bytes");
        // Whole lines, and each writer's in the order it wrote them: no
        // rotation put a newer file before an older one.
        let both = std::fs::read_to_string(rotated(&log)).unwrap()
            + &std::fs::read_to_string(log.as_ref()).unwrap();
        let mut last = [None; WRITERS];
        for l in both.lines() {
            assert_eq!(l.len() + 1, LINE, "{l:?}");
            let (w, n): (usize, u64) = (l[..2].parse().unwrap(), l[2..].parse().unwrap());
            assert!(last[w] < Some(n), "writer {w}: {n} after {:?}", last[w]);
            last[w] = Some(n);
        }
    }
}
