//! Running external commands with the command line echoed and failures reported clearly.

use std::{
    ffi::OsString,
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

/// The workspace root (the parent of this crate), where nested cargo commands run.
pub fn workspace_root() -> PathBuf {
    let xtask_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    xtask_dir.parent().map_or(xtask_dir.clone(), PathBuf::from)
}

/// Cargo's target directory: `CARGO_TARGET_DIR` when set, else `target/` of the workspace.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from)
}

/// A `cargo` command in the workspace root, using the cargo that runs this xtask.
pub fn cargo() -> Command {
    // `cargo run` sets CARGO to the cargo binary it is; fall back to PATH.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root());
    cmd
}

/// The command line as a shell-like string, for messages.
pub fn display(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|part| part.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` with inherited stdio after printing it, and fails unless it exits with 0.
pub fn run(cmd: &mut Command) -> Result<()> {
    let line = display(cmd);
    println!("+ {line}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` and returns its stdout, failing with its stderr unless it exits with 0.
pub fn stdout(cmd: &mut Command) -> Result<String> {
    let line = display(cmd);
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{line}`"))?;
    if !output.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    String::from_utf8(output.stdout).with_context(|| format!("`{line}` printed non-UTF-8"))
}

/// Whether `program` can be started at all (found on PATH and executable).
pub fn exists(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Where Debian keeps administration tools: `ip`, `iptables`, `sysctl` (the tests) and
/// `ldconfig`, `start-stop-daemon` (dpkg, during `apt-get install`).
const SBIN_DIRS: &[&str] = &["/usr/local/sbin", "/usr/sbin", "/sbin"];

/// Appends the sbin directories to this process's PATH where missing, so every command it
/// starts finds them; a minimal environment (cron, CI) may lack them. Call first thing in
/// `main`, while the process has a single thread.
pub fn ensure_sbin_on_path() {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    let before = dirs.len();
    for sbin in SBIN_DIRS {
        if !dirs.iter().any(|dir| dir.as_os_str() == *sbin) {
            dirs.push(PathBuf::from(sbin));
        }
    }
    if dirs.len() != before {
        if let Ok(path) = std::env::join_paths(dirs) {
            // Single-threaded at this point (see above), so nothing reads the environment
            // concurrently.
            std::env::set_var("PATH", path);
        }
    }
}
