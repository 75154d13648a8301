//! Traffic with exact packet counts from Rust sockets inside namespaces, and echo servers.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc, Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context as _, Result};

use crate::netns::{enter, in_netns, netns_file, Netns};

/// Payload of the datagrams [`udp_send`] sends.
const PAYLOAD: &[u8] = b"podnet-test";
/// How often echo servers look at their stop flag.
const SERVER_POLL: Duration = Duration::from_millis(50);
/// Echo servers stop by themselves after this long, so a leaked guard cannot keep a thread
/// (and its namespace) alive for the rest of the test run.
const SERVER_MAX_LIFETIME: Duration = Duration::from_mins(5);
/// Read timeout of one TCP echo connection.
const TCP_READ_TIMEOUT: Duration = Duration::from_secs(2);

/// A DNS query message with one question (`name` dotted, class IN).
pub fn dns_query_message(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        let label = &label.as_bytes()[..label.len().min(63)];
        m.push(u8::try_from(label.len()).unwrap_or(63));
        m.extend_from_slice(label);
    }
    m.push(0);
    m.extend_from_slice(&qtype.to_be_bytes());
    m.extend_from_slice(&[0, 1]);
    m
}

/// Sends `count` UDP datagrams from `netns` to `dst` with forged IPv4 source
/// addresses (`source(i)` for the i-th), through a raw socket.
pub fn udp_send_spoofed(
    netns: &Netns,
    source: impl Fn(usize) -> std::net::Ipv4Addr + Send + Sync,
    dst: std::net::SocketAddrV4,
    count: usize,
) -> Result<()> {
    in_netns(netns, || -> Result<()> {
        // SAFETY: plain syscall; the descriptor is owned right below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("raw socket");
        }
        // SAFETY: `fd` was just returned by socket(2) and nothing else owns it.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let to = libc::sockaddr_in {
            sin_family: libc::sa_family_t::try_from(libc::AF_INET)?,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(dst.ip().octets()),
            },
            sin_zero: [0; 8],
        };
        let to_len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_in>())?;
        for i in 0..count {
            let mut packet = [0u8; 36];
            // IPv4 header: the kernel fills in the total length, id and checksum.
            packet[0] = 0x45;
            packet[8] = 64;
            packet[9] = 17;
            packet[12..16].copy_from_slice(&source(i).octets());
            packet[16..20].copy_from_slice(&dst.ip().octets());
            // UDP header (checksum 0: none, allowed over IPv4), then 8 bytes.
            packet[20..22].copy_from_slice(&40_000u16.to_be_bytes());
            packet[22..24].copy_from_slice(&dst.port().to_be_bytes());
            packet[24..26].copy_from_slice(&16u16.to_be_bytes());
            // SAFETY: `packet` and `to` are valid for the lengths given.
            let sent = unsafe {
                libc::sendto(
                    std::os::fd::AsRawFd::as_raw_fd(&fd),
                    packet.as_ptr().cast(),
                    packet.len(),
                    0,
                    (&raw const to).cast(),
                    to_len,
                )
            };
            if sent < 0 {
                return Err(std::io::Error::last_os_error()).context("sendto (raw)");
            }
        }
        Ok(())
    })?
}

/// Sends exactly `count` UDP datagrams from `src` (bound, so the source port is fixed) to
/// `dst`, back to back, from inside `netns`.
pub fn udp_send(netns: &Netns, src: SocketAddr, dst: SocketAddr, count: usize) -> Result<()> {
    udp_send_paced(netns, src, dst, count, Duration::ZERO)
}

/// Like [`udp_send`], sleeping `gap` between datagrams.
pub fn udp_send_paced(
    netns: &Netns,
    src: SocketAddr,
    dst: SocketAddr,
    count: usize,
    gap: Duration,
) -> Result<()> {
    in_netns(netns, || -> Result<()> {
        let socket = UdpSocket::bind(src).with_context(|| format!("binding {src}"))?;
        for sent in 0..count {
            if sent > 0 && !gap.is_zero() {
                std::thread::sleep(gap);
            }
            socket
                .send_to(PAYLOAD, dst)
                .with_context(|| format!("sending datagram {sent} from {src} to {dst}"))?;
        }
        Ok(())
    })?
    .with_context(|| format!("UDP from {src} to {dst} in netns {}", netns.name()))
}

/// A UDP echo server on a thread inside a namespace; stops when dropped (or after 300 s).
#[derive(Debug)]
pub struct UdpEchoServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

/// Starts a UDP echo server bound to `addr` inside `netns`. It is listening when this
/// returns.
pub fn udp_echo_server(netns: &Netns, addr: SocketAddr) -> Result<UdpEchoServer> {
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let thread = spawn_server(netns, "udp-echo", {
        let (stop, received) = (stop.clone(), received.clone());
        move || -> Result<Box<dyn FnOnce() + Send>> {
            let socket = UdpSocket::bind(addr).with_context(|| format!("binding UDP {addr}"))?;
            socket.set_read_timeout(Some(SERVER_POLL))?;
            Ok(Box::new(move || {
                let started = Instant::now();
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) && started.elapsed() < SERVER_MAX_LIFETIME {
                    if let Ok((len, peer)) = socket.recv_from(&mut buf) {
                        received.fetch_add(1, Ordering::Relaxed);
                        let _ = socket.send_to(&buf[..len], peer);
                    }
                }
            }))
        }
    })?;
    Ok(UdpEchoServer {
        addr,
        stop,
        received,
        thread: Some(thread),
    })
}

impl UdpEchoServer {
    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Datagrams received so far (each was echoed).
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Stops the server and returns how many datagrams it received.
    pub fn stop(mut self) -> u64 {
        self.shutdown();
        self.received()
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for UdpEchoServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A TCP echo server on a thread inside a namespace, one connection at a time; stops when
/// dropped (or after 300 s).
#[derive(Debug)]
pub struct TcpEchoServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

/// Starts a TCP echo server listening on `addr` inside `netns`. It is listening when this
/// returns. Each connection is echoed until the peer closes it or is silent for 2 s.
pub fn tcp_echo_server(netns: &Netns, addr: SocketAddr) -> Result<TcpEchoServer> {
    let stop = Arc::new(AtomicBool::new(false));
    let accepted = Arc::new(AtomicU64::new(0));
    let thread = spawn_server(netns, "tcp-echo", {
        let (stop, accepted) = (stop.clone(), accepted.clone());
        move || -> Result<Box<dyn FnOnce() + Send>> {
            let listener =
                TcpListener::bind(addr).with_context(|| format!("listening on TCP {addr}"))?;
            listener.set_nonblocking(true)?;
            Ok(Box::new(move || {
                let started = Instant::now();
                while !stop.load(Ordering::Relaxed) && started.elapsed() < SERVER_MAX_LIFETIME {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            accepted.fetch_add(1, Ordering::Relaxed);
                            echo(stream, &stop);
                        }
                        Err(error) if error.kind() == ErrorKind::WouldBlock => {
                            std::thread::sleep(SERVER_POLL);
                        }
                        Err(_) => std::thread::sleep(SERVER_POLL),
                    }
                }
            }))
        }
    })?;
    Ok(TcpEchoServer {
        addr,
        stop,
        accepted,
        thread: Some(thread),
    })
}

fn echo(mut stream: TcpStream, stop: &AtomicBool) {
    if stream.set_nonblocking(false).is_err()
        || stream.set_read_timeout(Some(TCP_READ_TIMEOUT)).is_err()
    {
        return;
    }
    let mut buf = [0u8; 16 * 1024];
    while !stop.load(Ordering::Relaxed) {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(len) => {
                if stream.write_all(&buf[..len]).is_err() {
                    return;
                }
            }
        }
    }
}

impl TcpEchoServer {
    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Stops the server and returns how many connections it accepted.
    pub fn stop(mut self) -> u64 {
        self.shutdown();
        self.accepted()
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for TcpEchoServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Starts a named thread that enters `netns`, runs `setup` (binding sockets) and reports its
/// result back before this returns, then runs the loop `setup` returned.
fn spawn_server<S>(netns: &Netns, name: &str, setup: S) -> Result<JoinHandle<()>>
where
    S: FnOnce() -> Result<Box<dyn FnOnce() + Send>> + Send + 'static,
{
    let file = netns_file(netns)?;
    let netns_name = netns.name().to_owned();
    let (ready, ready_rx) = mpsc::channel::<Result<()>>();
    let thread = std::thread::Builder::new()
        .name(format!("{name}-{netns_name}"))
        .spawn(move || {
            let serve = enter(&file, &netns_name).and_then(|()| setup());
            drop(file);
            match serve {
                Ok(serve) => {
                    let _ = ready.send(Ok(()));
                    serve();
                }
                Err(error) => {
                    let _ = ready.send(Err(error));
                }
            }
        })?;
    ready_rx
        .recv()
        .map_err(|_| anyhow!("{name} server thread ended before it was ready"))??;
    Ok(thread)
}

/// Opens a TCP connection from inside `netns` to `dst` (handshake only, then closes it) and
/// returns how long the connect took; fails if it did not complete within `timeout`.
///
/// A connect whose SYN is lost (e.g. to a conntrack insert race) completes only after the
/// kernel's SYN retransmit, about 1 s later, so the duration shows the retries.
pub fn tcp_connect(netns: &Netns, dst: SocketAddr, timeout: Duration) -> Result<Duration> {
    in_netns(netns, || {
        let started = Instant::now();
        TcpStream::connect_timeout(&dst, timeout).map(|_| started.elapsed())
    })?
    .with_context(|| format!("TCP connect to {dst} from netns {}", netns.name()))
}

/// Pings `dst` `count` times from `netns`, `interval` apart (each answer
/// awaited up to 1 s); returns the answers received, as `ping` counts them.
pub fn ping(netns: &Netns, dst: std::net::IpAddr, count: u32, interval: Duration) -> Result<u32> {
    let out = netns.run(&[
        "ping",
        "-n",
        "-q",
        "-c",
        &count.to_string(),
        "-i",
        &format!("{:.3}", interval.as_secs_f64()),
        "-W",
        "1",
        &dst.to_string(),
    ])?;
    let text = String::from_utf8_lossy(&out.stdout);
    ping_received(&text).with_context(|| format!("ping {dst}: {text}"))
}

/// The `N received` of ping's summary line.
pub fn ping_received(text: &str) -> Option<u32> {
    let line = text.lines().find(|l| l.contains("packets transmitted"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let idx = words.iter().position(|w| w.starts_with("received"))?;
    words.get(idx.checked_sub(1)?)?.parse().ok()
}
