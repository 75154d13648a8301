//! DNS for tests and the demo: the test DNS server (`podnet-dns-responder`)
//! started in a namespace, and a stub resolver: one UDP query from inside a
//! pod, sent `copies` times with the same id and port, timed by the kernel's
//! receive timestamp so the client's own wake-up delay on a busy machine is
//! not part of its measurement.

use std::{
    net::{SocketAddr, UdpSocket},
    sync::atomic::{AtomicU16, Ordering},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result};

use crate::{
    agent::binary, netns::in_netns, process::spawn_in, traffic::dns_query_message, util::wait_for,
    Netns, NsChild,
};

/// How long the responder may take to listen.
const RESPONDER_START: Duration = Duration::from_secs(5);

/// Starts `podnet-dns-responder` in `netns` on port 53 of each `listen`
/// address and waits until it listens; it stops when the child is dropped.
pub fn start_dns_responder(netns: &Netns, listen: &[std::net::IpAddr]) -> Result<NsChild> {
    let bin = binary("podnet-dns-responder")?;
    let mut cmd = vec![bin.to_string_lossy().into_owned()];
    for addr in listen {
        cmd.extend(["--listen".to_owned(), addr.to_string()]);
    }
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let responder = spawn_in(netns, &cmd)?;
    if !wait_for(|| responder.log().contains("ready"), RESPONDER_START) {
        anyhow::bail!("the DNS responder did not start: {}", responder.log());
    }
    Ok(responder)
}

/// Query ids, unique within one process.
static NEXT_ID: AtomicU16 = AtomicU16::new(0x1000);

/// `SIOCGSTAMPNS`: the receive time of the last datagram read from a socket.
const SIOCGSTAMPNS: libc::c_ulong = 0x8907;

/// A fresh query id.
pub fn next_query_id() -> u16 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// One query as a client sends it.
#[derive(Debug, Clone)]
pub struct DnsQuery {
    /// The server (address and port).
    pub server: SocketAddr,
    /// The question's name, dotted.
    pub name: String,
    /// The question's type (1 = A, 28 = AAAA, ...).
    pub qtype: u16,
    /// How many copies to send (more than one: retransmissions of the same id and port).
    pub copies: usize,
    /// Time between copies.
    pub gap: Duration,
    /// How long to wait for the answer after the first copy.
    pub wait: Duration,
}

impl DnsQuery {
    /// One copy of an A or AAAA question, waiting up to `wait`.
    pub fn new(server: SocketAddr, name: &str, qtype: u16, wait: Duration) -> Self {
        Self {
            server,
            name: name.to_owned(),
            qtype,
            copies: 1,
            gap: Duration::ZERO,
            wait,
        }
    }

    /// Sends `copies` copies `gap` apart.
    #[must_use]
    pub fn retransmitted(mut self, copies: usize, gap: Duration) -> Self {
        self.copies = copies;
        self.gap = gap;
        self
    }
}

/// What the client saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnsAnswer {
    /// The answer's response code.
    pub rcode: u8,
    /// From the first copy sent to the answer's arrival.
    pub elapsed: Duration,
}

/// The kernel's receive timestamp of the last datagram read from `socket`
/// (enabled by a first call before any datagram arrives).
pub fn last_receive_time(socket: &UdpSocket) -> Option<SystemTime> {
    use std::os::fd::AsRawFd as _;
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: SIOCGSTAMPNS writes one timespec into `ts`, a valid local.
    let rc = unsafe { libc::ioctl(socket.as_raw_fd(), SIOCGSTAMPNS, &raw mut ts) };
    (rc == 0).then(|| {
        SystemTime::UNIX_EPOCH
            + Duration::new(
                u64::try_from(ts.tv_sec).unwrap_or(0),
                u32::try_from(ts.tv_nsec).unwrap_or(0),
            )
    })
}

/// Sends `query` from `pod` and waits for the answer with its id; `None`
/// when none came within `query.wait`.
pub fn udp_dns_query(pod: &Netns, query: &DnsQuery) -> Result<Option<DnsAnswer>> {
    let id = next_query_id();
    let msg = dns_query_message(id, &query.name, query.qtype);
    let query = query.clone();
    in_netns(pod, move || -> Result<Option<DnsAnswer>> {
        let bind: SocketAddr = if query.server.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = UdpSocket::bind(bind).context("binding the client socket")?;
        socket.connect(query.server).context("connecting")?;
        // Turns receive timestamps on (no datagram yet: the call fails).
        let _ = last_receive_time(&socket);
        let start = Instant::now();
        let sent_at = SystemTime::now();
        for i in 0..query.copies {
            if i > 0 {
                std::thread::sleep(query.gap);
            }
            socket.send(&msg).context("sending the query")?;
        }
        let mut buf = [0u8; 4096];
        let deadline = start + query.wait;
        loop {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return Ok(None);
            };
            socket.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
            let Ok(n) = socket.recv(&mut buf) else {
                return Ok(None);
            };
            let elapsed = last_receive_time(&socket)
                .and_then(|t| t.duration_since(sent_at).ok())
                .unwrap_or_else(|| start.elapsed());
            if n >= 12 && buf[..2] == id.to_be_bytes() {
                return Ok(Some(DnsAnswer {
                    rcode: buf[3] & 0x0f,
                    elapsed,
                }));
            }
        }
    })?
}
