//! One blocking netlink request loop: send a request, read its answers until
//! the kernel's ack, `NLMSG_DONE` or error. Used from dedicated OS threads
//! (the routing thread, the DNS attacher, the ENI thread, the race thread),
//! each in the agent's network namespace, so no async runtime is involved.

use std::{io, os::fd::AsRawFd as _, time::Duration};

use netlink_packet_core::{
    NetlinkDeserializable, NetlinkMessage, NetlinkPayload, NetlinkSerializable,
};
use netlink_sys::{Socket, SocketAddr};

/// How long one receive waits before the request counts as unanswered.
pub const DEFAULT_RECV_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The kernel answered with an errno.
    #[error("{0}")]
    Kernel(io::Error),
    /// The request could not be sent or its answer not read.
    #[error("{0}")]
    Transport(String),
}

/// A netlink socket of one protocol, bound and connected to the kernel, in
/// the calling thread's network namespace.
pub struct NetlinkSocket {
    socket: Socket,
    seq: u32,
}

impl NetlinkSocket {
    /// Opens a socket of `protocol` (e.g. `NETLINK_ROUTE`); each receive
    /// waits at most `timeout`.
    pub fn open(protocol: isize, timeout: Duration) -> io::Result<Self> {
        let mut socket = Socket::new(protocol)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        set_recv_timeout(&socket, timeout)?;
        Ok(Self { socket, seq: 0 })
    }

    /// Turns on strict checking of dump requests (`NETLINK_GET_STRICT_CHK`,
    /// Linux 4.20): the kernel then honours the filters a dump carries.
    pub fn set_strict_checking(&self) -> io::Result<()> {
        self.socket.set_netlink_get_strict_chk(true)
    }

    /// Sends `message` (its sequence number set here) and hands every answer
    /// to it to `on_answer`, until the kernel acks it, ends the dump, or
    /// refuses it (an errno is [`RequestError::Kernel`]; `on_error` may turn
    /// it into success by returning `true`). Answers to earlier requests are
    /// skipped.
    pub fn request<T>(
        &mut self,
        mut message: NetlinkMessage<T>,
        mut on_answer: impl FnMut(T),
        on_error: impl Fn(&io::Error) -> bool,
    ) -> Result<(), RequestError>
    where
        T: NetlinkSerializable + NetlinkDeserializable,
    {
        self.seq = self.seq.wrapping_add(1);
        message.header.sequence_number = self.seq;
        message.finalize();
        let mut buf = vec![0; message.buffer_len()];
        message.serialize(&mut buf);
        self.socket
            .send(&buf, 0)
            .map_err(|e| RequestError::Transport(format!("send: {e}")))?;
        loop {
            let (datagram, _) = self.socket.recv_from_full().map_err(|e| {
                RequestError::Transport(match e.kind() {
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                        "no answer from the kernel in time".to_owned()
                    }
                    _ => format!("receive: {e}"),
                })
            })?;
            let mut rest = &datagram[..];
            while rest.len() >= 16 {
                let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
                if len < 16 || len > rest.len() {
                    return Err(RequestError::Transport(format!(
                        "a message of {len} bytes in a datagram of {}",
                        rest.len()
                    )));
                }
                let answer = NetlinkMessage::<T>::deserialize(&rest[..len])
                    .map_err(|e| RequestError::Transport(format!("decode: {e}")))?;
                rest = &rest[len.next_multiple_of(4).min(rest.len())..];
                if answer.header.sequence_number != self.seq {
                    continue;
                }
                match answer.payload {
                    NetlinkPayload::InnerMessage(inner) => on_answer(inner),
                    NetlinkPayload::Done(_) => return Ok(()),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(()),
                            Some(_) if on_error(&e.to_io()) => Ok(()),
                            Some(_) => Err(RequestError::Kernel(e.to_io())),
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

/// Sets `SO_RCVTIMEO` so a kernel that never answers cannot block the
/// calling thread forever.
pub fn set_recv_timeout(socket: &Socket, timeout: Duration) -> io::Result<()> {
    // A zero timeval would mean "block forever".
    let timeout = timeout.max(Duration::from_micros(1));
    let tv = libc::timeval {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros()),
    };
    // SAFETY: the fd is an open socket owned by `socket`; `tv` is a valid timeval that outlives
    // the call, and the length passed is its exact size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast::<libc::c_void>(),
            // A timeval is 16 bytes; the cast cannot truncate.
            #[allow(clippy::cast_possible_truncation)]
            {
                std::mem::size_of::<libc::timeval>() as libc::socklen_t
            },
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST};
    use netlink_packet_route::{link::LinkMessage, RouteNetlinkMessage};
    use netlink_sys::protocols::NETLINK_ROUTE;

    use super::*;

    /// Unprivileged: every namespace has a loopback link to list.
    #[test]
    fn a_link_dump_lists_loopback() {
        let mut socket = NetlinkSocket::open(NETLINK_ROUTE, DEFAULT_RECV_TIMEOUT).unwrap();
        let mut message =
            NetlinkMessage::from(RouteNetlinkMessage::GetLink(LinkMessage::default()));
        message.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let mut indexes = Vec::new();
        socket
            .request(
                message,
                |answer| {
                    if let RouteNetlinkMessage::NewLink(link) = answer {
                        indexes.push(link.header.index);
                    }
                },
                |_| false,
            )
            .unwrap();
        // Loopback is always index 1 in its namespace.
        assert!(indexes.contains(&1), "{indexes:?}");
    }
}
