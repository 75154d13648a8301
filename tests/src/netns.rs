//! Network namespaces as RAII guards, and ways to act inside them.

use std::{
    fs::File,
    os::fd::AsRawFd,
    path::PathBuf,
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

/// Where `ip netns add` bind-mounts named namespaces.
const NETNS_DIR: &str = "/run/netns";
/// Longest interface name the kernel accepts (`IFNAMSIZ` - 1).
pub const MAX_IFNAME_LEN: usize = 15;

/// How long [`veth`] waits for both ends to be operationally up.
const LINK_UP_TIMEOUT: Duration = Duration::from_secs(5);

/// Makes namespace and interface names unique within this process; the process id makes
/// them unique across processes.
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A named network namespace, `/run/netns/<prefix>-<pid>-<n>`, deleted on drop.
///
/// A new namespace has `lo` up and IPv6 duplicate address detection off
/// (`accept_dad=0` for `all` and `default`), so addresses are usable at once.
/// Links in the namespace go with it; processes started in it should be stopped before the
/// guard drops (declare them after the namespace, so they drop first).
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `/run/netns/<prefix>-<pid>-<n>` with `ip netns add`.
    pub fn new(prefix: &str) -> Result<Self> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}-{}-{n}", std::process::id());
        run_checked(Command::new("ip").args(["netns", "add", &name]), "the host")?;
        // From here on, the guard deletes the namespace if the rest fails.
        let netns = Netns { name };
        netns.run_ok(&["ip", "link", "set", "lo", "up"])?;
        netns.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
        netns.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
        Ok(netns)
    }

    /// The namespace's name (as `ip netns list` shows it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's bind mount, `/run/netns/<name>`, for `nsenter --net=` and `setns`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(NETNS_DIR).join(&self.name)
    }

    /// A command that runs `cmd` inside the namespace through `nsenter --net=<path> --`,
    /// with stdin closed; the caller may add environment or redirections before running it.
    ///
    /// # Panics
    /// If `cmd` is empty.
    pub fn command(&self, cmd: &[&str]) -> Command {
        assert!(!cmd.is_empty(), "empty command for netns {}", self.name);
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net={}", self.path().display()))
            .arg("--")
            .args(cmd)
            .stdin(Stdio::null());
        command
    }

    /// Runs `cmd` inside the namespace and returns its output, whatever its exit status.
    /// Fails only if the command cannot be started.
    pub fn run(&self, cmd: &[&str]) -> Result<Output> {
        self.command(cmd)
            .output()
            .with_context(|| format!("starting `{}` in netns {}", cmd.join(" "), self.name))
    }

    /// Runs `cmd` inside the namespace; fails with its stdout and stderr unless it exits 0.
    pub fn run_ok(&self, cmd: &[&str]) -> Result<Output> {
        run_checked(&mut self.command(cmd), &format!("netns {}", self.name))
    }

    /// Sets a sysctl of this namespace (`sysctl -qw key=value`), e.g.
    /// `net.ipv4.ip_forward`, `1`.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.run_ok(&["sysctl", "-qw", &format!("{key}={value}")])
            .map(drop)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        match Command::new("ip")
            .args(["netns", "delete", &self.name])
            .stdin(Stdio::null())
            .output()
        {
            Ok(output) if output.status.success() => {}
            Ok(output) => eprintln!(
                "podnet-tests: `ip netns delete {}` failed ({}): {}",
                self.name,
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
            Err(error) => eprintln!(
                "podnet-tests: could not run `ip netns delete {}`: {error}",
                self.name
            ),
        }
    }
}

/// Runs `command` and fails with its command line, status, stdout and stderr unless it
/// exits 0; `place` says where it ran, for the message.
pub(crate) fn run_checked(command: &mut Command, place: &str) -> Result<Output> {
    let line = std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|part| part.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    let output = command
        .output()
        .with_context(|| format!("starting `{line}` in {place}"))?;
    if !output.status.success() {
        bail!(
            "`{line}` in {place} failed ({})\n--- stdout\n{}--- stderr\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(output)
}

/// Runs `f` on a new thread that has entered `netns` (`setns(CLONE_NEWNET)`) and returns its
/// result. Sockets created in `f` live in that namespace; `f` may borrow from the caller.
///
/// Only the network namespace changes: the thread still sees the host's mount namespace, so
/// `/proc/net` (which follows the *process*) shows the host: use `/proc/thread-self/net`.
/// A panic in `f` is resumed in the caller.
pub fn in_netns<T, F>(netns: &Netns, f: F) -> Result<T>
where
    F: FnOnce() -> T + Send,
    T: Send,
{
    in_netns_path(&netns.path(), f)
}

/// Like [`in_netns`], for a namespace this process did not create, by its bind mount
/// (e.g. `/run/netns/<name>` of a cluster node).
pub fn in_netns_path<T, F>(path: &std::path::Path, f: F) -> Result<T>
where
    F: FnOnce() -> T + Send,
    T: Send,
{
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let name = path.display().to_string();
    std::thread::scope(|scope| {
        let thread = scope.spawn(move || -> Result<T> {
            enter(&file, &name)?;
            Ok(f())
        });
        thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Opens the namespace's bind mount, for [`enter`].
pub(crate) fn netns_file(netns: &Netns) -> Result<File> {
    File::open(netns.path()).with_context(|| format!("opening {}", netns.path().display()))
}

/// Moves the calling thread into the network namespace `file` refers to. Call only on a
/// thread dedicated to that namespace: it never moves back.
pub(crate) fn enter(file: &File, name: &str) -> Result<()> {
    // SAFETY: `file` is an open namespace file for the duration of the call; setns with
    // CLONE_NEWNET changes only the calling thread's network namespace, and every caller runs
    // on a thread of its own that ends in that namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("setns into netns {name}"));
    }
    Ok(())
}

/// A short interface name that is unique in this process, `pn<6 hex digits><suffix>`, at
/// most [`MAX_IFNAME_LEN`] characters.
///
/// The digits mix the process id and a counter, so names from parallel test processes are
/// very unlikely to collide; [`veth`] creates its ends directly in their namespaces, so a
/// collision in the host namespace cannot happen anyway.
///
/// # Panics
/// If `suffix` is longer than 7 characters.
pub fn unique_ifname(suffix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mixed = std::process::id()
        .wrapping_mul(0x9E37_79B1)
        .wrapping_add(n.wrapping_mul(0x85EB_CA77));
    let name = format!("pn{:06x}{suffix}", mixed & 0x00FF_FFFF);
    assert!(
        name.len() <= MAX_IFNAME_LEN,
        "interface name {name} is longer than {MAX_IFNAME_LEN}"
    );
    name
}

/// Creates a veth pair with end `a_if` in `a` and `b_if` in `b`, adds the addresses (CIDR
/// notation, IPv4 or IPv6; IPv6 with `nodad`), brings both ends up and waits until both
/// are operationally up ([`wait_link_up`]), so the first packet is not lost.
///
/// The ends are created directly in their namespaces, so the names only need to be unique
/// there; they must not exceed [`MAX_IFNAME_LEN`].
pub fn veth(
    a: &Netns,
    a_if: &str,
    a_addrs: &[&str],
    b: &Netns,
    b_if: &str,
    b_addrs: &[&str],
) -> Result<()> {
    for name in [a_if, b_if] {
        if name.is_empty() || name.len() > MAX_IFNAME_LEN {
            bail!("interface name {name:?} must have 1 to {MAX_IFNAME_LEN} characters");
        }
    }
    run_checked(
        Command::new("ip").args([
            "link",
            "add",
            "name",
            a_if,
            "netns",
            a.name(),
            "type",
            "veth",
            "peer",
            "name",
            b_if,
            "netns",
            b.name(),
        ]),
        "the host",
    )?;
    for (netns, ifname, addrs) in [(a, a_if, a_addrs), (b, b_if, b_addrs)] {
        for addr in addrs {
            let mut cmd = vec!["ip", "address", "add", addr, "dev", ifname];
            if addr.contains(':') {
                cmd.push("nodad");
            }
            netns.run_ok(&cmd)?;
        }
        netns.run_ok(&["ip", "link", "set", ifname, "up"])?;
    }
    wait_link_up(a, a_if, LINK_UP_TIMEOUT)?;
    wait_link_up(b, b_if, LINK_UP_TIMEOUT)
}

/// Waits until `ifname` in `netns` is operationally up (`state UP`: carrier on, qdisc
/// attached), polling `ip link` every 20 ms.
///
/// A veth end can stay `NO-CARRIER` for up to a second after both ends are up: the kernel's
/// link watcher handles a carrier change at once only if it is urgent, and a veth whose
/// ifindex equals its peer's (index 2 at both ends, common in fresh namespaces) is not
/// (`linkwatch_urgent_event` in `net/core/link_watch.c`, 6.x). A packet sent before then is
/// dropped; an ND or ARP request then only retries after a second.
pub fn wait_link_up(netns: &Netns, ifname: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let output = netns.run_ok(&["ip", "-o", "link", "show", "dev", ifname])?;
        let line = String::from_utf8_lossy(&output.stdout);
        if line.contains(" state UP ") {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{ifname} in netns {} is not up after {timeout:?}: {}",
                netns.name(),
                line.trim()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
