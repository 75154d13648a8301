//! Long-running processes inside a namespace, stopped by PID when their guard drops.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Child, ExitStatus},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use crate::netns::Netns;

/// How long a process gets to exit after SIGTERM before it is killed.
const TERM_GRACE: Duration = Duration::from_secs(5);
/// How much of a process's log is printed when a test fails while it runs.
const LOG_TAIL_BYTES: usize = 8 * 1024;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A process running inside a namespace. On drop it gets SIGTERM, then SIGKILL after 5 s, and
/// is reaped. Its stdout and stderr go to a log file; if the test is panicking when the guard
/// drops, the end of the log is printed and the file kept, otherwise the file is removed.
#[derive(Debug)]
pub struct NsChild {
    child: Child,
    command: String,
    log: PathBuf,
    status: Option<ExitStatus>,
}

/// Starts `cmd` inside `netns` with `nsenter --net=<path> -- cmd...` (nsenter execs `cmd`,
/// so the child's PID is the command's own).
pub fn spawn_in(netns: &Netns, cmd: &[&str]) -> Result<NsChild> {
    spawn_in_with_env(netns, cmd, &[])
}

/// Like [`spawn_in`], with extra environment variables for the command.
pub fn spawn_in_with_env(netns: &Netns, cmd: &[&str], env: &[(&str, &str)]) -> Result<NsChild> {
    let command = cmd.join(" ");
    let program = Path::new(cmd.first().copied().unwrap_or("empty"))
        .file_name()
        .map_or_else(
            || "process".to_owned(),
            |n| n.to_string_lossy().into_owned(),
        );
    let log = std::env::temp_dir().join(format!(
        "podnet-tests-{}-{}-{program}.log",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let stdout = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let stderr = stdout.try_clone()?;
    let child = netns
        .command(cmd)
        .envs(env.iter().copied())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .with_context(|| format!("starting `{command}` in netns {}", netns.name()))?;
    Ok(NsChild {
        child,
        command,
        log,
        status: None,
    })
}

impl NsChild {
    /// The process id (of the command itself; nsenter execs it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The file that collects the process's stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything the process has printed so far (stdout and stderr interleaved).
    pub fn log(&self) -> String {
        std::fs::read(&self.log)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// The exit status if the process has exited, without waiting.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.child.try_wait()?;
        }
        Ok(self.status)
    }

    /// Kills the process with SIGKILL at once (no chance to clean up) and reaps it.
    pub fn kill(mut self) -> Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        self.child.kill()?;
        let status = self.child.wait()?;
        self.status = Some(status);
        Ok(status)
    }

    /// Stops the process (SIGTERM, then SIGKILL after 5 s) and returns its exit status.
    pub fn stop(mut self) -> Result<ExitStatus> {
        self.terminate()
    }

    fn terminate(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        let pid = libc::pid_t::try_from(self.child.id()).context("pid out of range")?;
        // SAFETY: plain syscall. The child is ours and not yet reaped (try_wait saw it
        // running and only we wait on it), so the PID still names it and cannot be reused.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + TERM_GRACE;
        while Instant::now() < deadline {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "podnet-tests: `{}` (pid {pid}) ignored SIGTERM for {TERM_GRACE:?}; killing it",
            self.command
        );
        self.child.kill()?;
        let status = self.child.wait()?;
        self.status = Some(status);
        Ok(status)
    }
}

impl Drop for NsChild {
    fn drop(&mut self) {
        if let Err(error) = self.terminate() {
            eprintln!(
                "podnet-tests: stopping `{}` (pid {}): {error:#}",
                self.command,
                self.child.id()
            );
        }
        if std::thread::panicking() {
            let log = self.log();
            let mut start = log.len().saturating_sub(LOG_TAIL_BYTES);
            while !log.is_char_boundary(start) {
                start += 1;
            }
            let tail = &log[start..];
            eprintln!(
                "--- `{}` output (end of {}):\n{tail}\n---",
                self.command,
                self.log.display()
            );
        } else {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}
