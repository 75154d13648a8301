//! A small DNS server for tests whose query names choose its behaviour.
//!
//! The first label of the question, split at `-`, is a command:
//! `delay-<ms>-...` answers NOERROR after `<ms>` milliseconds, `nx-...`
//! NXDOMAIN, `servfail-...` SERVFAIL, `refused-...` REFUSED, `drop-...` never
//! answers, `dropfirst-...` ignores the first copy of each (client, id) and
//! answers the next; anything else answers NOERROR at once. NOERROR answers to
//! A and AAAA carry `192.0.2.1` and `2001:db8::1`. Serves UDP and TCP on port 53
//! (or `--port`) of every `--listen` address; stopped by a signal. Delayed
//! UDP answers wait in one timer thread per socket (not a thread each), so
//! thousands of queries a second with delays up to seconds stay cheap.
//!
//! Usage: `podnet-dns-responder --listen 10.98.0.2 --listen fd00:98::2 [--port 53]`

use std::{
    cmp::Reverse,
    collections::{BinaryHeap, HashSet},
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{mpsc, Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

/// Threads reading each UDP socket.
const UDP_THREADS: usize = 2;

fn main() -> Result<()> {
    let mut listen: Vec<IpAddr> = Vec::new();
    let mut port = 53u16;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => listen.push(args.next().context("--listen needs an address")?.parse()?),
            "--port" => port = args.next().context("--port needs a number")?.parse()?,
            other => bail!("unknown argument {other:?}"),
        }
    }
    if listen.is_empty() {
        bail!("give at least one --listen address");
    }
    let seen = Arc::new(Mutex::new(HashSet::new()));
    let mut threads = Vec::new();
    for ip in listen {
        let addr = SocketAddr::new(ip, port);
        let udp = UdpSocket::bind(addr).with_context(|| format!("bind udp {addr}"))?;
        let tcp = TcpListener::bind(addr).with_context(|| format!("bind tcp {addr}"))?;
        // Two readers on one UDP socket: a load test's 20,000 queries/s
        // must not queue behind one thread.
        let later = delayed_sender(udp.try_clone()?);
        for _ in 0..UDP_THREADS {
            let (udp, seen_udp, later) = (udp.try_clone()?, seen.clone(), later.clone());
            threads.push(std::thread::spawn(move || {
                serve_udp(&udp, &seen_udp, &later);
            }));
        }
        let seen_tcp = seen.clone();
        threads.push(std::thread::spawn(move || serve_tcp(&tcp, &seen_tcp)));
    }
    println!("ready");
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

type Seen = Arc<Mutex<HashSet<(SocketAddr, u16)>>>;

/// An answer to send at a given time.
type Later = (Instant, SocketAddr, Vec<u8>);

/// A waiting answer: due time, arrival order, peer, message (ordered by the first two).
type Waiting = Reverse<(Instant, u64, SocketAddr, Vec<u8>)>;

/// Starts the thread that sends delayed answers on `socket` when they are due.
fn delayed_sender(socket: UdpSocket) -> mpsc::Sender<Later> {
    let (tx, rx) = mpsc::channel::<Later>();
    std::thread::spawn(move || {
        // Ordered by due time, then by arrival (the sequence number).
        let mut due: BinaryHeap<Waiting> = BinaryHeap::new();
        let mut seq = 0u64;
        loop {
            let now = Instant::now();
            while let Some(Reverse((at, _, _, _))) = due.peek() {
                if *at > now {
                    break;
                }
                if let Some(Reverse((_, _, peer, reply))) = due.pop() {
                    let _ = socket.send_to(&reply, peer);
                }
            }
            let next = match due.peek() {
                Some(Reverse((at, _, _, _))) => rx.recv_timeout(at.saturating_duration_since(now)),
                None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
            };
            match next {
                Ok((at, peer, reply)) => {
                    due.push(Reverse((at, seq, peer, reply)));
                    seq += 1;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
    });
    tx
}

fn serve_udp(socket: &UdpSocket, seen: &Seen, later: &mpsc::Sender<Later>) {
    let mut buf = [0u8; 4096];
    loop {
        let Ok((n, peer)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let Some((delay, reply)) = respond(&buf[..n], peer, seen) else {
            continue;
        };
        if delay.is_zero() {
            let _ = socket.send_to(&reply, peer);
        } else {
            let _ = later.send((Instant::now() + delay, peer, reply));
        }
    }
}

fn serve_tcp(listener: &TcpListener, seen: &Seen) {
    for stream in listener.incoming().flatten() {
        let seen = seen.clone();
        std::thread::spawn(move || {
            let _ = serve_connection(stream, &seen);
        });
    }
}

fn serve_connection(mut stream: TcpStream, seen: &Seen) -> std::io::Result<()> {
    let peer = stream.peer_addr()?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    loop {
        let mut len = [0u8; 2];
        stream.read_exact(&mut len)?;
        let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut msg)?;
        if let Some((delay, reply)) = respond(&msg, peer, seen) {
            std::thread::sleep(delay);
            let len = u16::try_from(reply.len()).unwrap_or(u16::MAX).to_be_bytes();
            stream.write_all(&[&len[..], &reply].concat())?;
        }
    }
}

/// The answer to `query` and how long to wait before sending it; `None`: stay silent.
fn respond(query: &[u8], peer: SocketAddr, seen: &Seen) -> Option<(Duration, Vec<u8>)> {
    if query.len() < 12 || query[2] & 0x80 != 0 {
        return None;
    }
    let id = u16::from_be_bytes([query[0], query[1]]);
    // Question: name, type, class.
    let mut pos = 12;
    let mut first_label = String::new();
    loop {
        let len = usize::from(*query.get(pos)?);
        if len == 0 {
            pos += 1;
            break;
        }
        if len & 0xc0 != 0 {
            return None;
        }
        let label = query.get(pos + 1..pos + 1 + len)?;
        if first_label.is_empty() {
            first_label = String::from_utf8_lossy(label).to_ascii_lowercase();
        }
        pos += 1 + len;
    }
    let question = query.get(12..pos + 4)?;
    let qtype = u16::from_be_bytes([query[pos], query[pos + 1]]);
    let mut words = first_label.split('-');
    let (rcode, delay) = match words.next().unwrap_or("") {
        "delay" => (0, Duration::from_millis(words.next()?.parse().ok()?)),
        "nx" => (3, Duration::ZERO),
        "servfail" => (2, Duration::ZERO),
        "refused" => (5, Duration::ZERO),
        "drop" => return None,
        "dropfirst" => {
            let mut seen = seen.lock().ok()?;
            if seen.insert((peer, id)) {
                return None;
            }
            (0, Duration::ZERO)
        }
        _ => (0, Duration::ZERO),
    };
    let rdata: Option<Vec<u8>> = match (rcode, qtype) {
        (0, 1) => Some(vec![192, 0, 2, 1]),
        (0, 28) => Some(
            "2001:db8::1"
                .parse::<std::net::Ipv6Addr>()
                .ok()?
                .octets()
                .to_vec(),
        ),
        _ => None,
    };
    let mut reply = Vec::with_capacity(question.len() + 40);
    reply.extend_from_slice(&id.to_be_bytes());
    // QR, opcode 0, AA, RD copied; RA; rcode.
    reply.push(0x84 | (query[2] & 0x01));
    reply.push(0x80 | rcode);
    reply.extend_from_slice(&[0, 1, 0, u8::from(rdata.is_some()), 0, 0, 0, 0]);
    reply.extend_from_slice(question);
    if let Some(rdata) = rdata {
        // Name: pointer to the question; type, class IN, TTL 60, rdata.
        reply.extend_from_slice(&[0xc0, 12]);
        reply.extend_from_slice(&qtype.to_be_bytes());
        reply.extend_from_slice(&[0, 1, 0, 0, 0, 60]);
        reply.extend_from_slice(&u16::try_from(rdata.len()).ok()?.to_be_bytes());
        reply.extend_from_slice(&rdata);
    }
    Some((delay, reply))
}
