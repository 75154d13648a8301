//! Small helpers: privilege checks, polling, free ports, one HTTP exchange.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{anyhow, Result};

/// How often [`wait_for`] polls its condition.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Whether this test can run as root; call first in every privileged test:
/// `if !require_root() { return; }`.
///
/// When not root it says so loudly on stderr and returns `false`, so the test returns early;
/// with `CI=true` it panics instead, because a test that cannot run must fail in CI.
pub fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    euid == 0 || unavailable("this test needs root (network namespaces, iptables, BPF)")
}

/// Reports that a test cannot run here (missing privilege or kernel feature) and returns
/// `false`; with `CI=true` it panics instead, so the skip is never silent in CI.
pub fn unavailable(reason: &str) -> bool {
    let test = std::thread::current()
        .name()
        .unwrap_or("<unnamed>")
        .to_owned();
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test} cannot run: {reason} (with CI=true that is a failure)"
    );
    let banner = "!".repeat(72);
    // Straight to the stderr handle, not eprintln!: the test harness captures the macros'
    // output of passing tests, and a skip must be seen.
    let _ = writeln!(
        std::io::stderr(),
        "\n{banner}\nSKIPPED {test}: {reason}\n{banner}"
    );
    false
}

/// Polls `condition` every 10 ms until it is true or `timeout` has passed; returns whether
/// it became true. The condition is checked once more at the deadline.
pub fn wait_for(mut condition: impl FnMut() -> bool, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago (the kernel picked it; another process
/// may still take it before the caller binds).
pub fn free_tcp_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

/// Sends `request` (raw HTTP/1.0, as given) to `addr` in the calling thread's network
/// namespace and reads the answer to its end: (status code, body). Connecting may take
/// `connect`, each read `read`.
pub fn http_exchange(
    addr: SocketAddr,
    request: &str,
    connect: Duration,
    read: Duration,
) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, connect)?;
    stream.set_read_timeout(Some(read))?;
    stream.write_all(request.as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("malformed HTTP response from {addr}"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("no status code in {head:?}"))?;
    Ok((code, body.to_owned()))
}
