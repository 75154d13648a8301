//! New TCP connections per second, like netperf's `TCP_CRR`: connect, one
//! request and its response, close; repeated on one client thread for a
//! bounded time.
//!
//! The server answers each request and closes first (as an HTTP/1.0 server
//! does), so its side keeps the `TIME_WAIT` state and the client's ports are
//! free again at once: the client never runs out of ephemeral ports, and the
//! kernel accepts a new SYN on a tuple still in `TIME_WAIT` on the server
//! (its timestamps are newer), as conntrack reopens such a tuple.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc, Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context as _, Result};

use crate::netns::{enter, in_netns, netns_file, Netns};

/// Bytes of one request and of one response.
pub const MESSAGE_BYTES: usize = 64;
/// Longest wait for a connect, a response or the server's close.
const IO_TIMEOUT: Duration = Duration::from_secs(1);
/// How often the server looks at its stop flag while no client connects.
const POLL_MS: i32 = 100;
/// The server stops by itself after this long, so a leaked guard cannot keep
/// a thread (and its namespace) alive.
const SERVER_MAX_LIFETIME: Duration = Duration::from_mins(10);

/// A connect/request/response/close server on a thread inside a namespace;
/// stops when dropped.
#[derive(Debug)]
pub struct CrrServer {
    stop: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

/// Starts a [`CrrServer`] listening on `addr` inside `netns`; it is listening
/// when this returns.
///
/// # Errors
/// If the namespace cannot be entered or `addr` cannot be bound.
pub fn crr_server(netns: &Netns, addr: SocketAddr) -> Result<CrrServer> {
    let file = netns_file(netns)?;
    let name = netns.name().to_owned();
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let (ready, ready_rx) = mpsc::channel::<Result<()>>();
    let thread = std::thread::Builder::new()
        .name(format!("crr-{name}"))
        .spawn({
            let (stop, served) = (stop.clone(), served.clone());
            move || {
                let listener = enter(&file, &name).and_then(|()| {
                    TcpListener::bind(addr).with_context(|| format!("listening on TCP {addr}"))
                });
                drop(file);
                match listener {
                    Ok(listener) => {
                        let _ = ready.send(Ok(()));
                        serve(&listener, &stop, &served);
                    }
                    Err(error) => {
                        let _ = ready.send(Err(error));
                    }
                }
            }
        })?;
    ready_rx
        .recv()
        .map_err(|_| anyhow!("CRR server thread ended before it was ready"))??;
    Ok(CrrServer {
        stop,
        served,
        thread: Some(thread),
    })
}

/// Whether `listener` has a connection to accept within [`POLL_MS`].
fn acceptable(listener: &TcpListener) -> bool {
    let mut fd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `fd` is one valid pollfd that lives across the call, and the
    // count passed is 1; the listener's descriptor stays open meanwhile.
    let ready = unsafe { libc::poll(&raw mut fd, 1, POLL_MS) };
    ready > 0 && fd.revents & libc::POLLIN != 0
}

fn serve(listener: &TcpListener, stop: &AtomicBool, served: &AtomicU64) {
    let started = Instant::now();
    while !stop.load(Ordering::Relaxed) && started.elapsed() < SERVER_MAX_LIFETIME {
        if !acceptable(listener) {
            continue;
        }
        let Ok((mut stream, _)) = listener.accept() else {
            continue;
        };
        // Counted before the close, so a client that saw the close sees
        // its connection counted.
        if answer(&mut stream).is_ok() {
            served.fetch_add(1, Ordering::Relaxed);
        }
        drop(stream);
    }
}

/// Reads one request and writes one response.
fn answer(stream: &mut TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut request = [0u8; MESSAGE_BYTES];
    stream.read_exact(&mut request)?;
    stream.write_all(&request)
}

impl CrrServer {
    /// Connections answered so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for CrrServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// What one client run did.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CrrRun {
    /// Connections that completed connect, request, response and close.
    pub completed: u64,
    /// Connections that failed (refused, timed out, short response).
    pub failed: u64,
    /// How long the run took.
    pub elapsed: Duration,
}

impl CrrRun {
    /// Completed connections per second.
    pub fn per_second(&self) -> f64 {
        #[allow(clippy::cast_precision_loss)] // counts far below 2^52
        let completed = self.completed as f64;
        completed / self.elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
    }
}

/// One connection: connect, request, response, then the server's close.
fn transaction(dst: SocketAddr) -> std::io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&dst, IO_TIMEOUT)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    let message = [0x5au8; MESSAGE_BYTES];
    stream.write_all(&message)?;
    let mut response = [0u8; MESSAGE_BYTES];
    stream.read_exact(&mut response)?;
    // The server closes first: wait for its FIN, then close.
    let mut rest = [0u8; 1];
    match stream.read(&mut rest)? {
        0 => Ok(()),
        _ => Err(std::io::Error::new(
            ErrorKind::InvalidData,
            "more bytes than one response",
        )),
    }
}

/// Runs connect/request/response/close to `dst` from inside `netns`, one at a
/// time, for `duration` (each step bounded by 1 s).
///
/// # Errors
/// If the namespace cannot be entered.
pub fn crr_client(netns: &Netns, dst: SocketAddr, duration: Duration) -> Result<CrrRun> {
    in_netns(netns, || {
        let started = Instant::now();
        let mut run = CrrRun::default();
        while started.elapsed() < duration {
            match transaction(dst) {
                Ok(()) => run.completed += 1,
                Err(_) => run.failed += 1,
            }
        }
        run.elapsed = started.elapsed();
        run
    })
}
