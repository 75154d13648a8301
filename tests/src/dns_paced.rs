//! Paced DNS load whose answers take a chosen time: one UDP client per pod
//! sends queries named `delay-<ms>-<n>.paced.test` (the test responder waits
//! `<ms>` before answering) at a steady rate, and times every answer with the
//! kernel's receive timestamp, so a benchmark can set podnet's and a packet
//! capture's latency sums against the clients' own.

use std::{
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result};

use crate::{dns_client::last_receive_time, netns::in_netns, traffic::dns_query_message, Netns};

/// The A record type.
const QTYPE_A: u16 = 1;

/// How long each client waits for answers after its last query, beyond the
/// longest delay.
const DRAIN: Duration = Duration::from_millis(1_500);

/// What the clients sent and measured.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PacedResult {
    /// Queries sent.
    pub sent: u64,
    /// Answers received.
    pub answered: u64,
    /// Sum of the answered queries' latencies (send to the kernel's receive
    /// timestamp), in seconds.
    pub latency_sum_s: f64,
    /// From the first query to the last one sent, in seconds.
    pub sending_s: f64,
}

/// The answer delay of query `n` in milliseconds: spread over 0..=`max_ms`
/// (a stride coprime with `max_ms + 1`, so every value comes up).
pub fn delay_ms(n: u64, max_ms: u64) -> u64 {
    n.wrapping_mul(7_919) % (max_ms + 1)
}

/// Sends `per_pod` queries from each of `pods` to `server` at `rate` queries
/// per second in all (shared evenly by the pods), with answer delays spread
/// over 0..=`max_delay_ms`, and waits for the answers.
pub fn run(
    pods: &[&Netns],
    server: SocketAddr,
    rate: u64,
    per_pod: u16,
    max_delay_ms: u64,
) -> Result<PacedResult> {
    let per_pod_rate = (rate / u64::try_from(pods.len()).unwrap_or(1).max(1)).max(1);
    let mut sockets = Vec::new();
    for pod in pods {
        let socket = in_netns(pod, move || -> Result<UdpSocket> {
            let s = UdpSocket::bind("0.0.0.0:0").context("binding the client socket")?;
            s.connect(server).context("connecting")?;
            Ok(s)
        })??;
        // Turns receive timestamps on (no datagram yet: the call fails).
        let _ = last_receive_time(&socket);
        sockets.push(socket);
    }
    let clients: Vec<_> = sockets
        .into_iter()
        .map(|socket| {
            std::thread::spawn(move || client(&socket, per_pod_rate, per_pod, max_delay_ms))
        })
        .collect();
    let mut total = PacedResult::default();
    for c in clients {
        let r = c
            .join()
            .map_err(|_| anyhow::anyhow!("a DNS client thread panicked"))??;
        total.sent += r.sent;
        total.answered += r.answered;
        total.latency_sum_s += r.latency_sum_s;
        total.sending_s = total.sending_s.max(r.sending_s);
    }
    Ok(total)
}

/// One pod's client: a sender paced at `rate` and a receiver on the same socket.
fn client(socket: &UdpSocket, rate: u64, count: u16, max_delay_ms: u64) -> Result<PacedResult> {
    let receiver = socket.try_clone()?;
    let wait = Duration::from_millis(max_delay_ms) + DRAIN;
    let receiving = std::thread::spawn(move || -> Result<Vec<(u16, SystemTime)>> {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        receiver.set_read_timeout(Some(Duration::from_millis(100)))?;
        let mut quiet_since = Instant::now();
        while quiet_since.elapsed() < wait {
            let Ok(n) = receiver.recv(&mut buf) else {
                continue;
            };
            if n >= 12 {
                if let Some(at) = last_receive_time(&receiver) {
                    got.push((u16::from_be_bytes([buf[0], buf[1]]), at));
                }
            }
            quiet_since = Instant::now();
        }
        Ok(got)
    });
    let mut sent_at = vec![None; usize::from(count)];
    let gap = Duration::from_secs(1).as_nanos() / u128::from(rate);
    let start = Instant::now();
    for id in 0..count {
        let due = start + Duration::from_nanos(u64::try_from(gap * u128::from(id)).unwrap_or(0));
        if let Some(left) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(left);
        }
        let name = format!(
            "delay-{}-{id}.paced.test",
            delay_ms(u64::from(id), max_delay_ms)
        );
        let msg = dns_query_message(id, &name, QTYPE_A);
        let at = SystemTime::now();
        if socket.send(&msg).is_ok() {
            sent_at[usize::from(id)] = Some(at);
        }
    }
    let sending_s = start.elapsed().as_secs_f64();
    let answers = receiving
        .join()
        .map_err(|_| anyhow::anyhow!("a DNS receiver thread panicked"))??;
    let mut result = PacedResult {
        sent: u64::try_from(sent_at.iter().flatten().count()).unwrap_or(u64::MAX),
        sending_s,
        ..PacedResult::default()
    };
    for (id, at) in answers {
        let Some(Some(sent)) = sent_at.get_mut(usize::from(id)).map(Option::take) else {
            // Unknown id or a second answer: not counted.
            continue;
        };
        if let Ok(latency) = at.duration_since(sent) {
            result.answered += 1;
            result.latency_sum_s += latency.as_secs_f64();
        }
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_cover_the_whole_range() {
        let seen: std::collections::BTreeSet<u64> =
            (0..1_001).map(|n| delay_ms(n, 1_000)).collect();
        assert_eq!(seen.len(), 1_001);
        assert_eq!(seen.first(), Some(&0));
        assert_eq!(seen.last(), Some(&1_000));
    }
}
