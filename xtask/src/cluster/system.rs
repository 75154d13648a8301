//! What the cluster does to the machine, and how it is undone: network namespaces and links,
//! a mount namespace per node, cgroups, and daemons started in them.
//!
//! Every process the cluster starts is put in a cgroup below [`layout::CGROUP_PARENT`] before
//! it runs, so `down` finds each one by its PID in `cgroup.procs` (containers included) and
//! ends it, then removes the cgroups, the mount namespaces and the network namespaces.

use std::{
    ffi::OsStr,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use super::layout::{self, Node};
use crate::cmd;

/// Runs `ip` with `args`, failing with its error message.
pub fn ip(args: &[&str]) -> Result<()> {
    cmd::stdout(Command::new("ip").args(args)).map(drop)
}

/// Runs `args` in network namespace `netns`.
pub fn in_netns(netns: &str, args: &[&str]) -> Result<String> {
    cmd::stdout(
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{netns}"))
            .arg("--")
            .args(args),
    )
}

/// Sets sysctl `key` to `value` in network namespace `netns`.
pub fn sysctl(netns: &str, key: &str, value: &str) -> Result<()> {
    in_netns(netns, &["sysctl", "-q", "-w", &format!("{key}={value}")]).map(drop)
}

/// Whether a network namespace of that name exists.
pub fn netns_exists(netns: &str) -> bool {
    Path::new("/run/netns").join(netns).exists()
}

/// The mount points of the machine's cgroup hierarchies (v1 controllers and the unified one).
pub fn cgroup_hierarchies() -> Result<Vec<PathBuf>> {
    let mounts = fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    Ok(parse_cgroup_mounts(&mounts))
}

fn parse_cgroup_mounts(mounts: &str) -> Vec<PathBuf> {
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, point, kind) = (fields.next()?, fields.next()?, fields.next()?);
            matches!(kind, "cgroup" | "cgroup2").then(|| PathBuf::from(point))
        })
        .collect()
}

/// Creates cgroup `path` (e.g. `/podnet-cluster/node-1`) in every hierarchy. A new cpuset
/// cgroup has no CPUs or memory nodes, and no task can join it until it gets its parent's.
pub fn create_cgroup(path: &str) -> Result<()> {
    for hierarchy in cgroup_hierarchies()? {
        let mut dir = hierarchy.clone();
        for part in path.trim_start_matches('/').split('/') {
            let parent = dir.clone();
            dir.push(part);
            if dir.exists() {
                continue;
            }
            fs::create_dir(&dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
            for file in ["cpuset.cpus", "cpuset.mems"] {
                if let Ok(value) = fs::read_to_string(parent.join(file)) {
                    fs::write(dir.join(file), value.trim())
                        .with_context(|| format!("writing {}", dir.join(file).display()))?;
                }
            }
        }
    }
    Ok(())
}

/// Every PID in cgroup `path` and below, in any hierarchy.
pub fn cgroup_pids(path: &str) -> Result<Vec<u32>> {
    let mut pids = Vec::new();
    for hierarchy in cgroup_hierarchies()? {
        let root = hierarchy.join(path.trim_start_matches('/'));
        for dir in cgroup_tree(&root) {
            if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
                pids.extend(
                    procs
                        .lines()
                        .filter_map(|pid| pid.trim().parse::<u32>().ok()),
                );
            }
        }
    }
    pids.sort_unstable();
    pids.dedup();
    Ok(pids)
}

/// `root` and every cgroup below it, children after parents.
fn cgroup_tree(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if !dir.is_dir() {
            continue;
        }
        if let Ok(entries) = fs::read_dir(&dir) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(entry.path());
                }
            }
        }
        out.push(dir);
    }
    out
}

/// Ends every process in cgroup `path` (SIGKILL, by PID, until none is left or `timeout`),
/// then removes the cgroups, deepest first.
pub fn kill_cgroup(path: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let pids = cgroup_pids(path)?;
        if pids.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            bail!("processes still in cgroup {path} after {timeout:?}: {pids:?}");
        }
        for pid in pids {
            // A PID read from the cgroup a moment ago: it is the cluster's own.
            let Ok(pid) = i32::try_from(pid) else {
                continue;
            };
            // SAFETY: kill(2) with a PID and a signal number has no memory effects.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for hierarchy in cgroup_hierarchies()? {
        let root = hierarchy.join(path.trim_start_matches('/'));
        let mut tree = cgroup_tree(&root);
        tree.reverse();
        for dir in tree {
            remove_cgroup_dir(&dir, deadline)?;
        }
    }
    Ok(())
}

/// rmdir of an empty cgroup; the kernel may need a moment after its last task exits.
fn remove_cgroup_dir(dir: &Path, deadline: Instant) -> Result<()> {
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(e).with_context(|| format!("removing cgroup {}", dir.display()))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Where a daemon runs.
#[derive(Debug, Clone, Copy)]
pub struct Place<'a> {
    /// Its cgroup (below every hierarchy).
    pub cgroup: &'a str,
    /// Its network namespace.
    pub netns: &'a str,
    /// Its mount namespace (a node's), or the machine's.
    pub mount_ns: Option<&'a Path>,
}

/// Starts `program args` as a daemon in `place`: it joins the cgroup, then enters the
/// namespaces and execs, in its own process group, with stdin closed and output appended
/// to `log`. Returns its PID.
pub fn spawn_daemon(
    place: Place<'_>,
    program: &Path,
    args: &[&OsStr],
    env: &[(&str, &OsStr)],
    log: &Path,
) -> Result<u32> {
    use std::os::unix::process::CommandExt as _;

    let mut script = String::new();
    for hierarchy in cgroup_hierarchies()? {
        let procs = hierarchy
            .join(place.cgroup.trim_start_matches('/'))
            .join("cgroup.procs");
        let _ = writeln!(script, "echo $$ > '{}' || exit 1", procs.display());
    }
    script.push_str("exec \"$@\"\n");
    let log_file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let mut command = Command::new("/bin/sh");
    command
        .args(["-c", &script, "sh", "nsenter"])
        .arg(format!("--net=/run/netns/{}", place.netns));
    if let Some(mount_ns) = place.mount_ns {
        command.arg(format!("--mount={}", mount_ns.display()));
    }
    command
        .arg("--")
        .arg(program)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .process_group(0);
    let child = command
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    Ok(child.id())
}

/// Whether process `pid` exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .next()?
                .to_owned();
            Some(state != "Z")
        })
        .unwrap_or(false)
}

/// Creates node `node`'s mount namespace, bound to [`Node::mount_ns`], with the node's own
/// directories over the machine's, a bpffs of its own, and kubelet's kernel settings shown
/// through files over `/proc/sys`.
pub fn create_node_mount_ns(node: &Node) -> Result<()> {
    let dir = node.dir();
    let mut script = String::from("set -e\nmount -t bpf bpf /sys/fs/bpf\n");
    let sysctl_dir = dir.join("sysctl");
    fs::create_dir_all(&sysctl_dir)?;
    for (key, value) in layout::KUBELET_SYSCTLS {
        let file = sysctl_dir.join(key.replace('/', "."));
        fs::write(&file, format!("{value}\n"))?;
        let _ = writeln!(
            script,
            "mount --bind '{}' '/proc/sys/{key}'",
            file.display()
        );
    }
    // The node resolves nothing through the machine's resolvers: nothing of the cluster
    // (an image pull, kubelet, a host-network pod) sends a query out of the machine.
    let resolv_conf = dir.join("resolv.conf");
    fs::write(&resolv_conf, layout::NODE_RESOLV_CONF)?;
    let _ = writeln!(
        script,
        "mount --bind '{}' /etc/resolv.conf",
        resolv_conf.display()
    );
    for (name, mount_point) in layout::NODE_DIRS {
        let source = dir.join(name);
        fs::create_dir_all(&source)?;
        let _ = writeln!(
            script,
            "mount --bind '{}' '{mount_point}'",
            source.display()
        );
    }
    // kubelet makes its root directory rshared; a shared root lets containers' mount
    // propagation settings work as on a systemd host. The peer group is this node's only.
    script.push_str("mount --make-rshared /\n");
    let ns_file = node.mount_ns();
    fs::write(&ns_file, b"")?;
    cmd::stdout(
        Command::new("unshare")
            .arg(format!("--mount={}", ns_file.display()))
            .args(["--propagation", "private", "true"]),
    )?;
    cmd::stdout(
        Command::new("nsenter")
            .arg(format!("--mount={}", ns_file.display()))
            .args(["--", "/bin/sh", "-c", &script]),
    )
    .with_context(|| format!("setting up the mounts of {}", node.name))?;
    Ok(())
}

/// Runs `args` inside node `node`'s network and mount namespaces, with `stdin` as input.
pub fn in_node(node: &Node, args: &[&OsStr], stdin: Option<&Path>) -> Result<String> {
    let mut command = Command::new("nsenter");
    command
        .arg(format!("--net={}", node.netns_path().display()))
        .arg(format!("--mount={}", node.mount_ns().display()))
        .arg("--")
        .args(args);
    if let Some(input) = stdin {
        command.stdin(fs::File::open(input)?);
        let line = cmd::display(&command);
        let output = command
            .output()
            .with_context(|| format!("could not start `{line}`"))?;
        if !output.status.success() {
            bail!(
                "`{line}` failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
    }
    cmd::stdout(&mut command)
}

/// Unbinds a node's mount namespace; it goes away with its last process.
pub fn remove_node_mount_ns(node: &Node) -> Result<()> {
    let ns_file = node.mount_ns();
    if !ns_file.exists() {
        return Ok(());
    }
    // Not mounted (a half-made namespace) is fine: the file is removed either way.
    let _ = Command::new("umount")
        .arg(&ns_file)
        .stderr(Stdio::null())
        .status();
    fs::remove_file(&ns_file).with_context(|| format!("removing {}", ns_file.display()))
}

/// Polls `condition` every 500 ms until it holds or `timeout` passes.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut condition: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match condition() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_error = Some(e),
        }
        if Instant::now() > deadline {
            match last_error {
                Some(e) => bail!("{what}: not after {timeout:?} (last error: {e:#})"),
                None => bail!("{what}: not after {timeout:?}"),
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_mounts_of_a_hybrid_host() {
        let mounts = "sysfs /sys sysfs rw 0 0\n\
                      tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup /sys/fs/cgroup/pids cgroup rw,pids 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(
            parse_cgroup_mounts(mounts),
            [
                PathBuf::from("/sys/fs/cgroup/cpu"),
                PathBuf::from("/sys/fs/cgroup/pids"),
                PathBuf::from("/sys/fs/cgroup/unified")
            ]
        );
    }

    #[test]
    fn this_process_is_alive_and_a_made_up_one_is_not() {
        assert!(alive(std::process::id()));
        assert!(!alive(u32::MAX));
    }
}
