//! Finds the conntrack entry that holds a reply tuple: the winner of an insert race.
//!
//! When a new flow fails to confirm because another entry already holds the same reply tuple
//! (destination → node SNAT address:port), the entry that won is still in the table. Asking
//! ctnetlink for the entry *by that reply tuple* (`IPCTNL_MSG_CT_GET` with `CTA_TUPLE_REPLY`)
//! returns it, and its original tuple names the winning pod's address and port. The loser is
//! never in the table (it was never confirmed), so the answer is always the winner.
//!
//! Kernel side: `ctnetlink_get_conntrack()` in `net/netfilter/nf_conntrack_netlink.c`
//! (Linux 6.18) parses the tuple, looks it up with `nf_conntrack_find_get()` (which matches both
//! directions of every confirmed entry) and answers with one `IPCTNL_MSG_CT_NEW` message
//! (flagged `NLM_F_MULTI`, in its own datagram) followed by the ack, or with `-ENOENT` when no
//! entry holds the tuple.
//!
//! Messages are built and parsed with `netlink-packet-netfilter`, which has the tuple, status,
//! timeout and mark attributes; `CTA_ID` and the ICMP tuple attributes, which it lacks, are
//! handled here as raw attributes named after `include/uapi/linux/netfilter/nfnetlink_conntrack.h`.

use std::io;
use std::net::IpAddr;
use std::num::NonZeroI32;
use std::time::{Duration, Instant};

use netlink_packet_core::{
    DecodeError, DefaultNla, NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, Nla,
    NLA_TYPE_MASK, NLMSG_ERROR, NLM_F_ACK, NLM_F_REQUEST,
};
use netlink_packet_netfilter::conntrack::{
    ConntrackAttribute, ConntrackMessage, IPTuple, ProtoTuple, Protocol, Tuple,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
};
use netlink_sys::{protocols::NETLINK_NETFILTER, Socket, SocketAddr};
use thiserror::Error;

/// How long [`NetlinkConntrack::open`] waits for each kernel answer.
pub const DEFAULT_RECV_TIMEOUT: Duration = Duration::from_millis(200);

/// `nfgenmsg.version`.
const NFNETLINK_V0: u8 = 0;

/// `enum ctattr_type`: the entry's id (hashed pointer, big-endian u32).
const CTA_ID: u16 = 12;
/// `enum ctattr_l4proto`: ICMP echo id (be16), type (u8), code (u8).
const CTA_PROTO_ICMP_ID: u16 = 4;
const CTA_PROTO_ICMP_TYPE: u16 = 5;
const CTA_PROTO_ICMP_CODE: u16 = 6;
/// `enum ctattr_l4proto`: the same for `ICMPv6`.
const CTA_PROTO_ICMPV6_ID: u16 = 7;
const CTA_PROTO_ICMPV6_TYPE: u16 = 8;
const CTA_PROTO_ICMPV6_CODE: u16 = 9;

/// IP protocol numbers (`include/uapi/linux/in.h`).
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPPROTO_DCCP: u8 = 33;
const IPPROTO_ICMPV6: u8 = 58;
const IPPROTO_SCTP: u8 = 132;
const IPPROTO_UDPLITE: u8 = 136;

/// Receive buffer: one entry is a few hundred bytes, an ack with the echoed request about 100.
const RECV_BUFFER_LEN: usize = 16 * 1024;

/// Errors from the ctnetlink lookup.
#[derive(Debug, Error)]
pub enum CtnetlinkError {
    /// The netlink socket could not be opened, bound or configured.
    #[error("opening a NETLINK_NETFILTER socket: {0}")]
    Open(#[source] io::Error),
    /// Sending the request failed.
    #[error("sending a ctnetlink request: {0}")]
    Send(#[source] io::Error),
    /// Receiving the answer failed.
    #[error("receiving a ctnetlink answer: {0}")]
    Recv(#[source] io::Error),
    /// The kernel did not finish answering in time.
    #[error("no complete ctnetlink answer within {0:?}")]
    Timeout(Duration),
    /// The kernel refused the request (an errno other than `ENOENT`).
    #[error("the kernel refused the conntrack lookup: {0}")]
    Kernel(#[source] io::Error),
    /// The tuple's source and destination are of different address families.
    #[error("tuple mixes address families: {src} and {dst}")]
    MixedFamilies {
        /// Source address.
        src: IpAddr,
        /// Destination address.
        dst: IpAddr,
    },
    /// A message could not be parsed at the netlink or attribute level.
    #[error("malformed ctnetlink message: {0}")]
    Decode(#[from] DecodeError),
    /// A message parsed but is not a conntrack entry.
    #[error("unexpected netlink message type {0:#06x}")]
    UnexpectedMessage(u16),
    /// A required attribute is absent.
    #[error("conntrack entry lacks {0}")]
    Missing(&'static str),
    /// An attribute has an impossible value.
    #[error("conntrack attribute {attribute}: {reason}")]
    Invalid {
        /// The kernel's name of the attribute.
        attribute: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// One direction of a connection, as conntrack stores it.
///
/// Ports are in host byte order. For ICMP and `ICMPv6`, `src_port` is the echo id and `dst_port`
/// is `type << 8 | code`: the kernel's `nf_conntrack_tuple` keeps them in the same places
/// (`src.u.icmp.id`, `dst.u.icmp.{type,code}`), so a tuple read from a kernel `nf_conn` maps
/// onto this one unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FlowTuple {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Source port (ICMP: echo id).
    pub src_port: u16,
    /// Destination port (ICMP: type and code).
    pub dst_port: u16,
    /// IP protocol number.
    pub proto: u8,
}

/// A conntrack entry as ctnetlink reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConntrackEntry {
    /// The original direction: for an SNAT'ed pod flow, pod → destination.
    pub original: FlowTuple,
    /// The reply direction: destination → node SNAT address and port.
    pub reply: FlowTuple,
    /// `IPS_*` status bits (`include/uapi/linux/netfilter/nf_conntrack_common.h`).
    pub status: u32,
    /// The entry's id (`CTA_ID`), stable for the entry's lifetime.
    pub id: Option<u32>,
    /// Seconds until the entry expires (`CTA_TIMEOUT`).
    pub timeout_secs: Option<u32>,
    /// The connection mark (`CTA_MARK`).
    pub mark: Option<u32>,
}

/// A conntrack table that can be searched by reply tuple.
pub trait ConntrackTable {
    /// The entry whose reply tuple is `reply`, or `None` if no entry holds it (any more).
    fn get_by_reply(&mut self, reply: &FlowTuple)
        -> Result<Option<ConntrackEntry>, CtnetlinkError>;
}

/// The kernel's conntrack table, reached over ctnetlink.
///
/// The socket belongs to the network namespace of the thread that opened it. Requests are
/// synchronous: run this on a dedicated thread.
pub struct NetlinkConntrack {
    socket: Socket,
    seq: u32,
    timeout: Duration,
    buf: Vec<u8>,
}

impl NetlinkConntrack {
    /// Opens a ctnetlink socket in the calling thread's network namespace, waiting at most
    /// [`DEFAULT_RECV_TIMEOUT`] for each answer.
    pub fn open() -> Result<Self, CtnetlinkError> {
        Self::open_with_timeout(DEFAULT_RECV_TIMEOUT)
    }

    /// Like [`NetlinkConntrack::open`] with another receive timeout.
    pub fn open_with_timeout(timeout: Duration) -> Result<Self, CtnetlinkError> {
        let mut socket = Socket::new(NETLINK_NETFILTER).map_err(CtnetlinkError::Open)?;
        socket.bind_auto().map_err(CtnetlinkError::Open)?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(CtnetlinkError::Open)?;
        crate::sys::netlink::set_recv_timeout(&socket, timeout).map_err(CtnetlinkError::Open)?;
        Ok(Self {
            socket,
            seq: 0,
            timeout,
            buf: vec![0; RECV_BUFFER_LEN],
        })
    }

    /// Receives one datagram into the buffer and returns its length (0 when
    /// interrupted); waiting longer than the socket's timeout is an error.
    fn receive(&mut self) -> Result<usize, CtnetlinkError> {
        match self.socket.recv(&mut &mut self.buf[..], 0) {
            Ok(n) => Ok(n.min(self.buf.len())),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Err(CtnetlinkError::Timeout(self.timeout))
            }
            Err(e) => Err(CtnetlinkError::Recv(e)),
        }
    }
}

impl ConntrackTable for NetlinkConntrack {
    fn get_by_reply(
        &mut self,
        reply: &FlowTuple,
    ) -> Result<Option<ConntrackEntry>, CtnetlinkError> {
        if reply.src.is_ipv4() != reply.dst.is_ipv4() {
            return Err(CtnetlinkError::MixedFamilies {
                src: reply.src,
                dst: reply.dst,
            });
        }
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let request = encode_get_by_reply(reply, seq);
        self.socket
            .send(&request, 0)
            .map_err(CtnetlinkError::Send)?;

        // Each recv waits at most `timeout` (SO_RCVTIMEO); the deadline bounds the whole
        // exchange even if stale answers to earlier, timed-out requests keep arriving.
        let deadline = Instant::now() + self.timeout;
        let mut answer = Answer::default();
        loop {
            let received = self.receive()?;
            if let Progress::Done(found) = answer.feed(&self.buf[..received], seq)? {
                return Ok(found);
            }
            if Instant::now() >= deadline {
                return Err(CtnetlinkError::Timeout(self.timeout));
            }
        }
    }
}

/// Whether the answer to a request is complete.
#[derive(Debug, PartialEq, Eq)]
enum Progress {
    /// The ack or `ENOENT` has not arrived yet.
    Pending,
    /// The lookup's result.
    Done(Option<ConntrackEntry>),
}

/// The answer to one request, collected over one or more datagrams.
#[derive(Default)]
struct Answer {
    entry: Option<ConntrackEntry>,
}

impl Answer {
    /// Takes one datagram. The lookup is done once the request's ack or `ENOENT` arrived; any
    /// other kernel errno is an error. Messages
    /// with another sequence number (late answers to a request that timed out) are skipped
    /// unparsed.
    fn feed(&mut self, datagram: &[u8], seq: u32) -> Result<Progress, CtnetlinkError> {
        for message in split_messages(datagram) {
            let message = message?;
            if NetlinkBuffer::new_checked(message)?.sequence_number() != seq {
                continue;
            }
            match decode_message(message)? {
                Decoded::Entry(entry) => self.entry = Some(entry),
                Decoded::Status(None) => return Ok(Progress::Done(self.entry.take())),
                // The winner expired between the race and this lookup.
                Decoded::Status(Some(code)) if code.get() == -libc::ENOENT => {
                    return Ok(Progress::Done(None));
                }
                Decoded::Status(Some(code)) => {
                    return Err(CtnetlinkError::Kernel(io::Error::from_raw_os_error(
                        code.get().saturating_neg(),
                    )));
                }
                Decoded::Other(_) => {}
            }
        }
        Ok(Progress::Pending)
    }
}

/// Splits a datagram into its netlink messages (each `NLMSG_ALIGN`ed).
fn split_messages(datagram: &[u8]) -> impl Iterator<Item = Result<&[u8], DecodeError>> {
    let mut rest = datagram;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let len = match NetlinkBuffer::new_checked(rest) {
            Ok(buffer) => buffer.length() as usize,
            Err(e) => {
                rest = &[];
                return Some(Err(e));
            }
        };
        // new_checked guarantees 16 <= len <= rest.len().
        let (message, tail) = rest.split_at(len);
        rest = tail.get(pad4(len) - len..).unwrap_or(&[]);
        Some(Ok(message))
    })
}

fn pad4(len: usize) -> usize {
    (len + 3) & !3
}

/// `NLM_F_DUMP` (`NLM_F_ROOT | NLM_F_MATCH`).
const NLM_F_DUMP: u16 = 0x300;
/// `NLMSG_DONE`: the end of a dump.
const NLMSG_DONE: u16 = 3;
/// Longest a whole dump may take.
const DUMP_DEADLINE: Duration = Duration::from_secs(10);

/// How a dump went.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DumpCount {
    /// Entries handed over.
    pub entries: usize,
    /// Entries skipped because they could not be read (a protocol without
    /// ports, an attribute this code does not know).
    pub skipped: usize,
}

impl NetlinkConntrack {
    /// Hands every entry of the table, both families, to `each`
    /// (`IPCTNL_MSG_CT_GET` with `NLM_F_DUMP`).
    pub fn dump(
        &mut self,
        mut each: impl FnMut(ConntrackEntry),
    ) -> Result<DumpCount, CtnetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        self.socket
            .send(&encode_dump(seq), 0)
            .map_err(CtnetlinkError::Send)?;
        let deadline = Instant::now() + DUMP_DEADLINE;
        let mut count = DumpCount::default();
        loop {
            let received = self.receive()?;
            for message in split_messages(&self.buf[..received]) {
                let message = message?;
                let header = NetlinkBuffer::new_checked(message)?;
                if header.sequence_number() != seq {
                    continue;
                }
                if header.message_type() == NLMSG_DONE {
                    return Ok(count);
                }
                match decode_message(message) {
                    Ok(Decoded::Entry(entry)) => {
                        count.entries += 1;
                        each(entry);
                    }
                    Ok(Decoded::Status(Some(code))) => {
                        return Err(CtnetlinkError::Kernel(io::Error::from_raw_os_error(
                            code.get().saturating_neg(),
                        )));
                    }
                    Ok(Decoded::Status(None) | Decoded::Other(_)) => {}
                    Err(_) => count.skipped += 1,
                }
            }
            if Instant::now() >= deadline {
                return Err(CtnetlinkError::Timeout(DUMP_DEADLINE));
            }
        }
    }
}

/// Builds the dump request: `IPCTNL_MSG_CT_GET`, `NLM_F_REQUEST | NLM_F_DUMP`,
/// family `AF_UNSPEC` (every family).
pub fn encode_dump(seq: u32) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    header.sequence_number = seq;
    let mut message = NetlinkMessage::new(
        header,
        NetlinkPayload::from(NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::Unspec, NFNETLINK_V0, 0),
            ConntrackMessage::Get(Vec::new()),
        )),
    );
    message.finalize();
    let mut bytes = vec![0; message.buffer_len()];
    // The buffer has exactly the length the message asks for, so serialize cannot run out.
    message.serialize(&mut bytes);
    bytes
}

/// Builds the request `IPCTNL_MSG_CT_GET` for the entry whose reply tuple is `reply`.
///
/// One netlink message, `NLM_F_REQUEST | NLM_F_ACK`, with the nfgenmsg family of `reply.src`
/// (the kernel rejects a tuple whose addresses do not match it).
pub fn encode_get_by_reply(reply: &FlowTuple, seq: u32) -> Vec<u8> {
    let family = if reply.src.is_ipv4() {
        NetfilterProtoFamily::IPv4
    } else {
        NetfilterProtoFamily::IPv6
    };
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK;
    header.sequence_number = seq;
    let mut message = NetlinkMessage::new(
        header,
        NetlinkPayload::from(NetfilterMessage::new(
            NetfilterHeader::new(family, NFNETLINK_V0, 0),
            ConntrackMessage::Get(vec![ConntrackAttribute::CtaTupleReply(tuple_attributes(
                reply,
            ))]),
        )),
    );
    message.finalize();
    let mut bytes = vec![0; message.buffer_len()];
    // The buffer has exactly the length the message asks for, so serialize cannot run out.
    message.serialize(&mut bytes);
    bytes
}

/// `CTA_TUPLE_IP` and `CTA_TUPLE_PROTO` for one tuple.
fn tuple_attributes(t: &FlowTuple) -> Vec<Tuple> {
    let mut proto = vec![ProtoTuple::Protocol(Protocol::from(t.proto))];
    let icmp = match t.proto {
        IPPROTO_ICMP => Some((CTA_PROTO_ICMP_ID, CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMP_CODE)),
        IPPROTO_ICMPV6 => Some((
            CTA_PROTO_ICMPV6_ID,
            CTA_PROTO_ICMPV6_TYPE,
            CTA_PROTO_ICMPV6_CODE,
        )),
        _ => None,
    };
    if let Some((id, kind, code)) = icmp {
        let [icmp_type, icmp_code] = t.dst_port.to_be_bytes();
        proto.push(ProtoTuple::Other(DefaultNla::new(
            id,
            t.src_port.to_be_bytes().to_vec(),
        )));
        proto.push(ProtoTuple::Other(DefaultNla::new(kind, vec![icmp_type])));
        proto.push(ProtoTuple::Other(DefaultNla::new(code, vec![icmp_code])));
    } else {
        proto.push(ProtoTuple::SourcePort(t.src_port));
        proto.push(ProtoTuple::DestinationPort(t.dst_port));
    }
    vec![
        Tuple::Ip(vec![
            IPTuple::SourceAddress(t.src),
            IPTuple::DestinationAddress(t.dst),
        ]),
        Tuple::Proto(proto),
    ]
}

/// What one netlink message turned out to be.
enum Decoded {
    /// A conntrack entry.
    Entry(ConntrackEntry),
    /// `NLMSG_ERROR`: `None` is the ack, `Some` a negative errno.
    Status(Option<NonZeroI32>),
    /// Anything else (e.g. `NLMSG_NOOP`), with its type.
    Other(u16),
}

/// Decodes one netlink message (header included) that carries a conntrack entry, as the kernel
/// sends it in answer to `IPCTNL_MSG_CT_GET` or in a dump.
///
/// Any other message is an error: `NLMSG_ERROR` with an errno becomes
/// [`CtnetlinkError::Kernel`]. Malformed input is an error, never a panic.
pub fn decode_entry(bytes: &[u8]) -> Result<ConntrackEntry, CtnetlinkError> {
    match decode_message(bytes)? {
        Decoded::Entry(entry) => Ok(entry),
        Decoded::Status(Some(code)) => Err(CtnetlinkError::Kernel(io::Error::from_raw_os_error(
            code.get().saturating_neg(),
        ))),
        Decoded::Status(None) => Err(CtnetlinkError::UnexpectedMessage(NLMSG_ERROR)),
        Decoded::Other(message_type) => Err(CtnetlinkError::UnexpectedMessage(message_type)),
    }
}

fn decode_message(bytes: &[u8]) -> Result<Decoded, CtnetlinkError> {
    let message = NetlinkMessage::<NetfilterMessage>::deserialize(bytes)?;
    let message_type = message.header.message_type;
    match message.payload {
        NetlinkPayload::Error(error) => Ok(Decoded::Status(error.code)),
        NetlinkPayload::InnerMessage(NetfilterMessage {
            header,
            inner:
                NetfilterMessageInner::Conntrack(
                    // Linux 6.18 answers a GET with IPCTNL_MSG_CT_NEW (as events and dumps);
                    // accept GET too, which some kernels have used for GET answers.
                    ConntrackMessage::Get(attributes) | ConntrackMessage::New(attributes),
                ),
            ..
        }) => Ok(Decoded::Entry(entry_from_attributes(
            header.family,
            &attributes,
        )?)),
        NetlinkPayload::InnerMessage(_) => Err(CtnetlinkError::UnexpectedMessage(message_type)),
        _ => Ok(Decoded::Other(message_type)),
    }
}

fn entry_from_attributes(
    family: NetfilterProtoFamily,
    attributes: &[ConntrackAttribute],
) -> Result<ConntrackEntry, CtnetlinkError> {
    let mut original = None;
    let mut reply = None;
    let mut status = None;
    let mut entry_id = None;
    let mut timeout_secs = None;
    let mut mark = None;
    for attribute in attributes {
        match attribute {
            ConntrackAttribute::CtaTupleOrig(t) => {
                original = Some(flow_tuple(family, t, "CTA_TUPLE_ORIG")?);
            }
            ConntrackAttribute::CtaTupleReply(t) => {
                reply = Some(flow_tuple(family, t, "CTA_TUPLE_REPLY")?);
            }
            ConntrackAttribute::CtaStatus(s) => status = Some(s.bits()),
            ConntrackAttribute::CtaTimeout(t) => timeout_secs = Some(*t),
            ConntrackAttribute::CtaMark(m) => mark = Some(*m),
            ConntrackAttribute::Other(nla) if nla.kind() & NLA_TYPE_MASK == CTA_ID => {
                entry_id = Some(u32::from_be_bytes(fixed(nla, "CTA_ID")?));
            }
            _ => {}
        }
    }
    Ok(ConntrackEntry {
        original: original.ok_or(CtnetlinkError::Missing("CTA_TUPLE_ORIG"))?,
        reply: reply.ok_or(CtnetlinkError::Missing("CTA_TUPLE_REPLY"))?,
        status: status.ok_or(CtnetlinkError::Missing("CTA_STATUS"))?,
        id: entry_id,
        timeout_secs,
        mark,
    })
}

/// The value of a raw attribute that must be exactly `N` bytes long.
fn fixed<const N: usize>(nla: &DefaultNla, name: &'static str) -> Result<[u8; N], CtnetlinkError> {
    let mut value = vec![0; nla.value_len()];
    nla.emit_value(&mut value);
    <[u8; N]>::try_from(value.as_slice()).map_err(|_| CtnetlinkError::Invalid {
        attribute: name,
        reason: format!("{} bytes, expected {N}", value.len()),
    })
}

/// Builds a [`FlowTuple`] from the nested attributes of `CTA_TUPLE_ORIG` or `CTA_TUPLE_REPLY`.
fn flow_tuple(
    family: NetfilterProtoFamily,
    tuple: &[Tuple],
    name: &'static str,
) -> Result<FlowTuple, CtnetlinkError> {
    let mut src = None;
    let mut dst = None;
    let mut proto = None;
    let mut ports = (None, None);
    let mut icmp = (None, None, None);
    for part in tuple {
        match part {
            Tuple::Ip(addresses) => {
                for address in addresses {
                    match address {
                        IPTuple::SourceAddress(a) => src = Some(*a),
                        IPTuple::DestinationAddress(a) => dst = Some(*a),
                        _ => {}
                    }
                }
            }
            Tuple::Proto(fields) => {
                for field in fields {
                    match field {
                        ProtoTuple::Protocol(p) => proto = Some(u8::from(*p)),
                        ProtoTuple::SourcePort(p) => ports.0 = Some(*p),
                        ProtoTuple::DestinationPort(p) => ports.1 = Some(*p),
                        ProtoTuple::Other(nla) => match nla.kind() & NLA_TYPE_MASK {
                            CTA_PROTO_ICMP_ID | CTA_PROTO_ICMPV6_ID => {
                                icmp.0 = Some(u16::from_be_bytes(fixed(nla, "CTA_PROTO_ICMP_ID")?));
                            }
                            CTA_PROTO_ICMP_TYPE | CTA_PROTO_ICMPV6_TYPE => {
                                icmp.1 = Some(fixed::<1>(nla, "CTA_PROTO_ICMP_TYPE")?[0]);
                            }
                            CTA_PROTO_ICMP_CODE | CTA_PROTO_ICMPV6_CODE => {
                                icmp.2 = Some(fixed::<1>(nla, "CTA_PROTO_ICMP_CODE")?[0]);
                            }
                            _ => {}
                        },
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    let missing = |what: &'static str| CtnetlinkError::Invalid {
        attribute: name,
        reason: format!("no {what}"),
    };
    let src = src.ok_or_else(|| missing("source address"))?;
    let dst = dst.ok_or_else(|| missing("destination address"))?;
    let proto = proto.ok_or_else(|| missing("CTA_PROTO_NUM"))?;
    let expected_v4 = match family {
        NetfilterProtoFamily::IPv4 => Some(true),
        NetfilterProtoFamily::IPv6 => Some(false),
        _ => None,
    };
    if src.is_ipv4() != dst.is_ipv4() || expected_v4.is_some_and(|v4| v4 != src.is_ipv4()) {
        return Err(CtnetlinkError::Invalid {
            attribute: name,
            reason: format!("addresses {src} and {dst} do not match family {family:?}"),
        });
    }
    let (src_port, dst_port) = match proto {
        IPPROTO_ICMP | IPPROTO_ICMPV6 => match icmp {
            (Some(id), Some(icmp_type), Some(code)) => (id, u16::from_be_bytes([icmp_type, code])),
            _ => return Err(missing("ICMP id, type and code")),
        },
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_UDPLITE | IPPROTO_SCTP | IPPROTO_DCCP => match ports {
            (Some(s), Some(d)) => (s, d),
            _ => return Err(missing("ports")),
        },
        // Protocols without ports (GRE keys travel as ports; others have none).
        _ => (ports.0.unwrap_or(0), ports.1.unwrap_or(0)),
    };
    Ok(FlowTuple {
        src,
        dst,
        src_port,
        dst_port,
        proto,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const NLA_F_NESTED: u16 = 1 << 15;
    const CTA_TUPLE_ORIG: u16 = 1;
    const CTA_TUPLE_REPLY: u16 = 2;
    const CTA_STATUS: u16 = 3;
    const CTA_PROTOINFO: u16 = 4;
    const CTA_TIMEOUT: u16 = 7;
    const CTA_MARK: u16 = 8;
    const CTA_USE: u16 = 11;
    const CTA_TUPLE_IP: u16 = 1;
    const CTA_TUPLE_PROTO: u16 = 2;
    const CTA_IP_V4_SRC: u16 = 1;
    const CTA_IP_V4_DST: u16 = 2;
    const CTA_IP_V6_SRC: u16 = 3;
    const CTA_IP_V6_DST: u16 = 4;
    const CTA_PROTO_NUM: u16 = 1;
    const CTA_PROTO_SRC_PORT: u16 = 2;
    const CTA_PROTO_DST_PORT: u16 = 3;
    const IPCTNL_MSG_CT_NEW: u16 = 0;
    const IPCTNL_MSG_CT_GET: u16 = 1;
    const NFNL_SUBSYS_CTNETLINK: u16 = 1;
    const IPS_CONFIRMED: u32 = 1 << 3;
    const NLM_F_MULTI: u16 = 2;

    /// Linux 6.18's answer to `CT_GET` for the UDP flow 127.0.0.1:5001 → 127.0.0.1:5002, as
    /// captured with strace (`x86_64`: little-endian netlink headers).
    #[cfg(target_endian = "little")]
    #[rustfmt::skip]
    const KERNEL_6_18_ANSWER: [u8; 164] = [
        0xa4, 0x00, 0x00, 0x00, 0x00, 0x01, 0x02, 0x00, 0xf7, 0x65, 0x01, 0x6b, 0x66, 0x41, 0x00, 0x00,
        0x02, 0x00, 0x00, 0x00, 0x34, 0x00, 0x01, 0x80, 0x14, 0x00, 0x01, 0x80, 0x08, 0x00, 0x01, 0x00,
        0x7f, 0x00, 0x00, 0x01, 0x08, 0x00, 0x02, 0x00, 0x7f, 0x00, 0x00, 0x01, 0x1c, 0x00, 0x02, 0x80,
        0x05, 0x00, 0x01, 0x00, 0x11, 0x00, 0x00, 0x00, 0x06, 0x00, 0x02, 0x00, 0x13, 0x89, 0x00, 0x00,
        0x06, 0x00, 0x03, 0x00, 0x13, 0x8a, 0x00, 0x00, 0x34, 0x00, 0x02, 0x80, 0x14, 0x00, 0x01, 0x80,
        0x08, 0x00, 0x01, 0x00, 0x7f, 0x00, 0x00, 0x01, 0x08, 0x00, 0x02, 0x00, 0x7f, 0x00, 0x00, 0x01,
        0x1c, 0x00, 0x02, 0x80, 0x05, 0x00, 0x01, 0x00, 0x11, 0x00, 0x00, 0x00, 0x06, 0x00, 0x02, 0x00,
        0x13, 0x8a, 0x00, 0x00, 0x06, 0x00, 0x03, 0x00, 0x13, 0x89, 0x00, 0x00, 0x08, 0x00, 0x03, 0x00,
        0x00, 0x00, 0x00, 0x08, 0x08, 0x00, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x08, 0x00, 0x0c, 0x00,
        0x8a, 0x33, 0x16, 0x6b, 0x08, 0x00, 0x0b, 0x00, 0x00, 0x00, 0x00, 0x02, 0x08, 0x00, 0x07, 0x00,
        0x00, 0x00, 0x00, 0x1d,
    ];

    // Hand-built netlink, independent of the crates, as the kernel lays it out.

    fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
        let len = u16::try_from(4 + value.len()).unwrap();
        let mut out = Vec::new();
        out.extend_from_slice(&len.to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(value);
        out.resize(pad4(out.len()), 0);
        out
    }

    fn nested(kind: u16, children: &[Vec<u8>]) -> Vec<u8> {
        nla(kind | NLA_F_NESTED, &children.concat())
    }

    fn nlmsg(message_type: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(16 + payload.len()).unwrap();
        let mut out = Vec::new();
        out.extend_from_slice(&len.to_ne_bytes());
        out.extend_from_slice(&message_type.to_ne_bytes());
        out.extend_from_slice(&flags.to_ne_bytes());
        out.extend_from_slice(&seq.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes());
        out.extend_from_slice(payload);
        out
    }

    fn nfgenmsg(family: u8) -> Vec<u8> {
        vec![family, 0, 0, 0]
    }

    fn family_of(t: &FlowTuple) -> u8 {
        if t.src.is_ipv4() {
            2
        } else {
            10
        }
    }

    fn ip_bytes(a: IpAddr) -> Vec<u8> {
        match a {
            IpAddr::V4(v4) => v4.octets().to_vec(),
            IpAddr::V6(v6) => v6.octets().to_vec(),
        }
    }

    /// The kernel's `ctnetlink_dump_tuples()` for one tuple.
    fn kernel_tuple(kind: u16, t: &FlowTuple) -> Vec<u8> {
        let (src_kind, dst_kind) = if t.src.is_ipv4() {
            (CTA_IP_V4_SRC, CTA_IP_V4_DST)
        } else {
            (CTA_IP_V6_SRC, CTA_IP_V6_DST)
        };
        let ip = nested(
            CTA_TUPLE_IP,
            &[
                nla(src_kind, &ip_bytes(t.src)),
                nla(dst_kind, &ip_bytes(t.dst)),
            ],
        );
        let mut proto = vec![nla(CTA_PROTO_NUM, &[t.proto])];
        match t.proto {
            IPPROTO_ICMP | IPPROTO_ICMPV6 => {
                let base = if t.proto == IPPROTO_ICMP { 0 } else { 3 };
                let [icmp_type, code] = t.dst_port.to_be_bytes();
                proto.push(nla(CTA_PROTO_ICMP_ID + base, &t.src_port.to_be_bytes()));
                proto.push(nla(CTA_PROTO_ICMP_TYPE + base, &[icmp_type]));
                proto.push(nla(CTA_PROTO_ICMP_CODE + base, &[code]));
            }
            _ => {
                proto.push(nla(CTA_PROTO_SRC_PORT, &t.src_port.to_be_bytes()));
                proto.push(nla(CTA_PROTO_DST_PORT, &t.dst_port.to_be_bytes()));
            }
        }
        // CTA_TUPLE_ZONE follows only for a non-default zone.
        nested(kind, &[ip, nested(CTA_TUPLE_PROTO, &proto)])
    }

    /// A kernel answer to `CT_GET`: what `ctnetlink_fill_info()` emits, in its order.
    fn kernel_entry(seq: u32, entry: &ConntrackEntry) -> Vec<u8> {
        let mut payload = nfgenmsg(family_of(&entry.original));
        payload.extend(kernel_tuple(CTA_TUPLE_ORIG, &entry.original));
        payload.extend(kernel_tuple(CTA_TUPLE_REPLY, &entry.reply));
        payload.extend(nla(CTA_STATUS, &entry.status.to_be_bytes()));
        if let Some(m) = entry.mark {
            payload.extend(nla(CTA_MARK, &m.to_be_bytes()));
        }
        if let Some(id) = entry.id {
            payload.extend(nla(CTA_ID, &id.to_be_bytes()));
        }
        // The table's reference plus the one the lookup holds while answering.
        payload.extend(nla(CTA_USE, &2u32.to_be_bytes()));
        if let Some(t) = entry.timeout_secs {
            payload.extend(nla(CTA_TIMEOUT, &t.to_be_bytes()));
        }
        nlmsg(
            NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_NEW,
            NLM_F_MULTI,
            seq,
            &payload,
        )
    }

    fn nlmsg_error(seq: u32, errno: i32) -> Vec<u8> {
        let mut payload = (-errno).to_ne_bytes().to_vec();
        // The echoed request header.
        payload.extend(nlmsg(
            NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_GET,
            5,
            seq,
            &[],
        ));
        nlmsg(NLMSG_ERROR, 0, seq, &payload)
    }

    fn v4(a: [u8; 4]) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(a))
    }

    fn udp(src: IpAddr, src_port: u16, dst: IpAddr, dst_port: u16) -> FlowTuple {
        FlowTuple {
            src,
            dst,
            src_port,
            dst_port,
            proto: IPPROTO_UDP,
        }
    }

    fn winner() -> ConntrackEntry {
        ConntrackEntry {
            original: udp(v4([10, 0, 1, 2]), 5000, v4([10, 98, 0, 2]), 7000),
            reply: udp(v4([10, 98, 0, 2]), 7000, v4([10, 98, 0, 1]), 40000),
            status: 0x18e,
            id: Some(0xdead_beef),
            timeout_secs: Some(29),
            mark: Some(0x40),
        }
    }

    #[test]
    fn encodes_get_by_reply_exactly() {
        let reply = udp(v4([10, 98, 0, 2]), 7000, v4([10, 98, 0, 1]), 40000);
        let tuple = nested(
            CTA_TUPLE_REPLY,
            &[
                nested(
                    CTA_TUPLE_IP,
                    &[
                        nla(CTA_IP_V4_SRC, &[10, 98, 0, 2]),
                        nla(CTA_IP_V4_DST, &[10, 98, 0, 1]),
                    ],
                ),
                nested(
                    CTA_TUPLE_PROTO,
                    &[
                        nla(CTA_PROTO_NUM, &[17]),
                        nla(CTA_PROTO_SRC_PORT, &7000u16.to_be_bytes()),
                        nla(CTA_PROTO_DST_PORT, &40000u16.to_be_bytes()),
                    ],
                ),
            ],
        );
        let mut payload = nfgenmsg(2);
        payload.extend(tuple);
        let expected = nlmsg(
            NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_GET,
            NLM_F_REQUEST | NLM_F_ACK,
            77,
            &payload,
        );
        let got = encode_get_by_reply(&reply, 77);
        assert_eq!(got, expected);
        assert_eq!(got.len(), 72);
    }

    #[test]
    fn encodes_icmp_and_ipv6() {
        // An echo reply tuple: id 0x1234, type 0 (echo reply), code 0.
        let reply = FlowTuple {
            src: "fd00::2".parse().unwrap(),
            dst: "fd00::1".parse().unwrap(),
            src_port: 0x1234,
            dst_port: 129 << 8,
            proto: IPPROTO_ICMPV6,
        };
        let got = encode_get_by_reply(&reply, 1);
        let mut payload = nfgenmsg(10);
        payload.extend(nested(
            CTA_TUPLE_REPLY,
            &[
                nested(
                    CTA_TUPLE_IP,
                    &[
                        nla(CTA_IP_V6_SRC, &ip_bytes(reply.src)),
                        nla(CTA_IP_V6_DST, &ip_bytes(reply.dst)),
                    ],
                ),
                nested(
                    CTA_TUPLE_PROTO,
                    &[
                        nla(CTA_PROTO_NUM, &[58]),
                        nla(CTA_PROTO_ICMPV6_ID, &[0x12, 0x34]),
                        nla(CTA_PROTO_ICMPV6_TYPE, &[129]),
                        nla(CTA_PROTO_ICMPV6_CODE, &[0]),
                    ],
                ),
            ],
        ));
        assert_eq!(got, nlmsg(0x0101, 5, 1, &payload));
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn decodes_a_captured_kernel_answer() {
        let lo = v4([127, 0, 0, 1]);
        assert_eq!(
            decode_entry(&KERNEL_6_18_ANSWER).unwrap(),
            ConntrackEntry {
                original: udp(lo, 5001, lo, 5002),
                reply: udp(lo, 5002, lo, 5001),
                status: IPS_CONFIRMED,
                id: Some(0x8a33_166b),
                timeout_secs: Some(29),
                mark: Some(0),
            }
        );
        // The hand-built kernel message of these tests matches the capture byte for byte.
        let entry = decode_entry(&KERNEL_6_18_ANSWER).unwrap();
        let mut built = kernel_entry(0x6b01_65f7, &entry);
        built[12..16].copy_from_slice(&16742u32.to_ne_bytes());
        assert_eq!(built, KERNEL_6_18_ANSWER);
    }

    #[test]
    fn decodes_a_kernel_entry() {
        let entry = winner();
        assert_eq!(decode_entry(&kernel_entry(3, &entry)).unwrap(), entry);

        // The same entry as an IPCTNL_MSG_CT_GET message without the optional attributes.
        let bare = ConntrackEntry {
            id: None,
            timeout_secs: None,
            mark: None,
            ..winner()
        };
        let mut bytes = kernel_entry(3, &bare);
        bytes[4..6]
            .copy_from_slice(&(NFNL_SUBSYS_CTNETLINK << 8 | IPCTNL_MSG_CT_GET).to_ne_bytes());
        assert_eq!(decode_entry(&bytes).unwrap(), bare);
    }

    #[test]
    fn decodes_icmp_and_ipv6_entries() {
        let echo = ConntrackEntry {
            original: FlowTuple {
                src: v4([10, 0, 1, 2]),
                dst: v4([1, 1, 1, 1]),
                src_port: 0x0042,
                dst_port: 8 << 8,
                proto: IPPROTO_ICMP,
            },
            reply: FlowTuple {
                src: v4([1, 1, 1, 1]),
                dst: v4([10, 98, 0, 1]),
                src_port: 0x0042,
                dst_port: 0,
                proto: IPPROTO_ICMP,
            },
            status: IPS_CONFIRMED,
            id: Some(1),
            timeout_secs: Some(30),
            mark: Some(0),
        };
        assert_eq!(decode_entry(&kernel_entry(1, &echo)).unwrap(), echo);

        let tcp6 = ConntrackEntry {
            original: FlowTuple {
                src: "fd00::2".parse().unwrap(),
                dst: IpAddr::V6(Ipv6Addr::LOCALHOST),
                src_port: 33000,
                dst_port: 443,
                proto: IPPROTO_TCP,
            },
            reply: FlowTuple {
                src: IpAddr::V6(Ipv6Addr::LOCALHOST),
                dst: "fd00::2".parse().unwrap(),
                src_port: 443,
                dst_port: 33000,
                proto: IPPROTO_TCP,
            },
            ..winner()
        };
        assert_eq!(decode_entry(&kernel_entry(1, &tcp6)).unwrap(), tcp6);
    }

    #[test]
    fn ignores_attributes_it_does_not_use() {
        let entry = winner();
        let mut bytes = kernel_entry(3, &entry);
        // CTA_PROTOINFO { CTA_PROTOINFO_TCP { state } } and an unknown attribute 99.
        let extra = [
            nested(CTA_PROTOINFO, &[nested(1, &[nla(1, &[3])])]),
            nla(99, &[1, 2, 3]),
        ]
        .concat();
        bytes.extend(&extra);
        let len = u32::try_from(bytes.len()).unwrap();
        bytes[0..4].copy_from_slice(&len.to_ne_bytes());
        assert_eq!(decode_entry(&bytes).unwrap(), entry);

        // A zone (CTA_TUPLE_ZONE, 3) inside a tuple, as the kernel adds for non-default zones.
        let mut payload = nfgenmsg(2);
        let mut orig = kernel_tuple(CTA_TUPLE_ORIG, &entry.original);
        orig.extend(nla(3, &7u16.to_be_bytes()));
        let len = u16::try_from(orig.len()).unwrap();
        orig[0..2].copy_from_slice(&len.to_ne_bytes());
        payload.extend(orig);
        payload.extend(kernel_tuple(CTA_TUPLE_REPLY, &entry.reply));
        payload.extend(nla(CTA_STATUS, &entry.status.to_be_bytes()));
        let zoned = decode_entry(&nlmsg(0x0100, 0, 1, &payload)).unwrap();
        assert_eq!(zoned.original, entry.original);
    }

    #[test]
    fn rejects_malformed_entries() {
        let good = kernel_entry(3, &winner());

        // Truncated anywhere: an error, never a panic.
        for cut in 0..good.len() {
            assert!(decode_entry(&good[..cut]).is_err(), "cut at {cut}");
        }

        // No original tuple.
        let mut payload = nfgenmsg(2);
        payload.extend(kernel_tuple(CTA_TUPLE_REPLY, &winner().reply));
        payload.extend(nla(CTA_STATUS, &8u32.to_be_bytes()));
        let bytes = nlmsg(0x0101, 0, 1, &payload);
        assert!(matches!(
            decode_entry(&bytes),
            Err(CtnetlinkError::Missing("CTA_TUPLE_ORIG"))
        ));

        // A UDP tuple without ports.
        let mut payload = nfgenmsg(2);
        let no_ports = nested(
            CTA_TUPLE_ORIG,
            &[
                nested(
                    CTA_TUPLE_IP,
                    &[
                        nla(CTA_IP_V4_SRC, &[1, 2, 3, 4]),
                        nla(CTA_IP_V4_DST, &[1, 2, 3, 5]),
                    ],
                ),
                nested(CTA_TUPLE_PROTO, &[nla(CTA_PROTO_NUM, &[17])]),
            ],
        );
        payload.extend(no_ports);
        payload.extend(kernel_tuple(CTA_TUPLE_REPLY, &winner().reply));
        payload.extend(nla(CTA_STATUS, &8u32.to_be_bytes()));
        assert!(matches!(
            decode_entry(&nlmsg(0x0101, 0, 1, &payload)),
            Err(CtnetlinkError::Invalid {
                attribute: "CTA_TUPLE_ORIG",
                ..
            })
        ));

        // An IPv4 entry announced as IPv6.
        let mut bytes = kernel_entry(3, &winner());
        bytes[16] = 10;
        assert!(matches!(
            decode_entry(&bytes),
            Err(CtnetlinkError::Invalid { .. })
        ));

        // A 2-byte CTA_ID.
        let mut payload = nfgenmsg(2);
        payload.extend(kernel_tuple(CTA_TUPLE_ORIG, &winner().original));
        payload.extend(kernel_tuple(CTA_TUPLE_REPLY, &winner().reply));
        payload.extend(nla(CTA_STATUS, &8u32.to_be_bytes()));
        payload.extend(nla(CTA_ID, &[0, 1]));
        assert!(matches!(
            decode_entry(&nlmsg(0x0101, 0, 1, &payload)),
            Err(CtnetlinkError::Invalid {
                attribute: "CTA_ID",
                ..
            })
        ));

        // Not a conntrack message at all.
        assert!(matches!(
            decode_entry(&nlmsg_error(1, libc::ENOENT)),
            Err(CtnetlinkError::Kernel(e)) if e.raw_os_error() == Some(libc::ENOENT)
        ));
        assert!(matches!(
            decode_entry(&nlmsg_error(1, 0)),
            Err(CtnetlinkError::UnexpectedMessage(NLMSG_ERROR))
        ));
    }

    #[test]
    fn answer_collects_entry_then_ack() {
        let entry = winner();
        // Entry and ack in separate datagrams, as the kernel sends them.
        let mut answer = Answer::default();
        assert_eq!(
            answer.feed(&kernel_entry(9, &entry), 9).unwrap(),
            Progress::Pending
        );
        let done = answer.feed(&nlmsg_error(9, 0), 9).unwrap();
        assert_eq!(done, Progress::Done(Some(entry.clone())));

        // Both in one datagram, after a stale answer to request 8 (even a garbled one).
        let mut datagram = kernel_entry(8, &winner());
        datagram.truncate(60);
        let len = u32::try_from(datagram.len()).unwrap();
        datagram[0..4].copy_from_slice(&len.to_ne_bytes());
        datagram.extend(nlmsg_error(8, 0));
        datagram.extend(kernel_entry(9, &entry));
        datagram.extend(nlmsg_error(9, 0));
        let mut answer = Answer::default();
        assert_eq!(
            answer.feed(&datagram, 9).unwrap(),
            Progress::Done(Some(entry))
        );
    }

    #[test]
    fn answer_maps_enoent_to_none_and_other_errors_to_kernel() {
        let mut answer = Answer::default();
        let done = answer.feed(&nlmsg_error(4, libc::ENOENT), 4).unwrap();
        assert_eq!(done, Progress::Done(None));

        let mut answer = Answer::default();
        assert!(matches!(
            answer.feed(&nlmsg_error(4, libc::EPERM), 4),
            Err(CtnetlinkError::Kernel(e)) if e.raw_os_error() == Some(libc::EPERM)
        ));

        // A truncated datagram is an error, not a hang or a panic.
        let mut answer = Answer::default();
        assert!(answer.feed(&nlmsg_error(4, 0)[..10], 4).is_err());
    }

    fn arb_tuple() -> impl Strategy<Value = FlowTuple> {
        let v4 = (any::<[u8; 4]>(), any::<[u8; 4]>())
            .prop_map(|(s, d)| (IpAddr::V4(s.into()), IpAddr::V4(d.into())));
        let v6 = (any::<[u8; 16]>(), any::<[u8; 16]>())
            .prop_map(|(s, d)| (IpAddr::V6(s.into()), IpAddr::V6(d.into())));
        (
            prop_oneof![v4, v6],
            any::<u16>(),
            any::<u16>(),
            prop_oneof![
                Just(IPPROTO_TCP),
                Just(IPPROTO_UDP),
                Just(IPPROTO_ICMP),
                Just(IPPROTO_ICMPV6),
                Just(IPPROTO_SCTP)
            ],
        )
            .prop_map(|((src, dst), src_port, dst_port, proto)| FlowTuple {
                src,
                dst,
                src_port,
                dst_port,
                proto,
            })
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_entry(&bytes);
            let _ = Answer::default().feed(&bytes, 1);
        }

        #[test]
        fn random_attributes_never_panic(attrs in proptest::collection::vec(any::<u8>(), 0..512)) {
            // Valid netlink and nfgenmsg headers, random attributes: reaches the attribute
            // parsers, which random whole messages rarely do.
            let mut payload = nfgenmsg(2);
            payload.extend(attrs);
            let _ = decode_entry(&nlmsg(0x0101, 0, 1, &payload));
        }

        #[test]
        fn decodes_what_the_kernel_would_send(
            original in arb_tuple(),
            reply in arb_tuple(),
            status in any::<u32>(),
            id in any::<Option<u32>>(),
            timeout_secs in any::<Option<u32>>(),
            mark in any::<Option<u32>>(),
        ) {
            // Both tuples of one entry share the family.
            let reply = FlowTuple {
                src: original.dst,
                dst: original.src,
                ..reply
            };
            let entry = ConntrackEntry { original, reply, status, id, timeout_secs, mark };
            prop_assert_eq!(decode_entry(&kernel_entry(5, &entry)).unwrap(), entry);
        }

        #[test]
        fn request_carries_the_tuple(reply in arb_tuple(), seq in any::<u32>()) {
            let bytes = encode_get_by_reply(&reply, seq);
            let message = NetlinkMessage::<NetfilterMessage>::deserialize(&bytes).unwrap();
            prop_assert_eq!(message.header.sequence_number, seq);
            let NetlinkPayload::InnerMessage(NetfilterMessage {
                inner: NetfilterMessageInner::Conntrack(ConntrackMessage::Get(attrs)),
                header,
                ..
            }) = message.payload else {
                panic!("not a conntrack GET");
            };
            let [ConntrackAttribute::CtaTupleReply(tuple)] = attrs.as_slice() else {
                panic!("not one CTA_TUPLE_REPLY: {attrs:?}");
            };
            prop_assert_eq!(flow_tuple(header.family, tuple, "CTA_TUPLE_REPLY").unwrap(), reply);
        }
    }

    /// A network namespace that is removed when dropped, also on panic.
    struct Netns {
        name: String,
    }

    impl Netns {
        fn create(name: String) -> Self {
            // A leftover from a killed run of the same pid is harmless to remove first.
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &name])
                .stderr(std::process::Stdio::null())
                .status();
            run("ip", &["netns", "add", &name]);
            Self { name }
        }

        fn path(&self) -> String {
            format!("/run/netns/{}", self.name)
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.name])
                .status();
        }
    }

    fn run(program: &str, args: &[&str]) {
        let status = std::process::Command::new(program)
            .args(args)
            .status()
            .unwrap_or_else(|e| panic!("{program}: {e}"));
        assert!(status.success(), "{program} {args:?}: {status}");
    }

    /// Moves the calling thread into the namespace at `path`.
    fn enter(path: &str) {
        let file = std::fs::File::open(path).unwrap();
        // SAFETY: the fd is open for the duration of the call; setns only changes the
        // network namespace of this thread, which the test owns.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", io::Error::last_os_error());
    }

    /// Sends one datagram from a fresh socket to another; returns (sender, receiver) ports.
    fn send_one(loopback: IpAddr) -> (u16, u16) {
        let receiver = std::net::UdpSocket::bind((loopback, 0)).unwrap();
        let sender = std::net::UdpSocket::bind((loopback, 0)).unwrap();
        let to = receiver.local_addr().unwrap();
        sender.send_to(b"podnet", to).unwrap();
        receiver
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let mut buf = [0u8; 16];
        // Received means the entry went through confirm (at the input hook).
        assert_eq!(receiver.recv(&mut buf).unwrap(), 6);
        (sender.local_addr().unwrap().port(), to.port())
    }

    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions and cannot fail.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn finds_the_winner_in_a_real_namespace() {
        if !is_root() {
            let message = "ctnetlink namespace test needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN)";
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{message}, and CI=true"
            );
            eprintln!("\n!!!!!!!! SKIPPED: {message} !!!!!!!!\n");
            return;
        }
        let ns = Netns::create(format!("podnet-ctnl-{}", std::process::id()));
        let path = ns.path();
        let outcome = std::thread::spawn(move || {
            enter(&path);
            // Child processes inherit this thread's namespace.
            run("ip", &["link", "set", "lo", "up"]);
            // Conntrack hooks are registered per namespace only once a rule needs them
            // (nf_ct_netns_get); a fresh namespace tracks nothing without one.
            run(
                "iptables",
                &[
                    "-w",
                    "-A",
                    "OUTPUT",
                    "-m",
                    "conntrack",
                    "--ctstate",
                    "NEW",
                    "-j",
                    "ACCEPT",
                ],
            );
            run(
                "ip6tables",
                &[
                    "-w",
                    "-A",
                    "OUTPUT",
                    "-m",
                    "conntrack",
                    "--ctstate",
                    "NEW",
                    "-j",
                    "ACCEPT",
                ],
            );
            let lo4 = IpAddr::V4(Ipv4Addr::LOCALHOST);
            let lo6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
            let (p1, p2) = send_one(lo4);
            let (q1, q2) = send_one(lo6);

            let mut table = NetlinkConntrack::open().unwrap();
            let v4 = table.get_by_reply(&udp(lo4, p2, lo4, p1)).unwrap();
            let v6 = table.get_by_reply(&udp(lo6, q2, lo6, q1)).unwrap();
            let absent_port = table
                .get_by_reply(&udp(lo4, p2, lo4, p1.wrapping_add(1)))
                .unwrap();
            let absent_proto = table
                .get_by_reply(&FlowTuple {
                    proto: IPPROTO_TCP,
                    ..udp(lo4, p2, lo4, p1)
                })
                .unwrap();
            ((p1, p2, v4), (q1, q2, v6), absent_port, absent_proto)
        })
        .join();
        drop(ns);
        let ((p1, p2, v4), (q1, q2, v6), absent_port, absent_proto) =
            outcome.unwrap_or_else(|panic| std::panic::resume_unwind(panic));

        let lo4 = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let entry = v4.expect("the UDP entry is in the table");
        assert_eq!(entry.original, udp(lo4, p1, lo4, p2));
        assert_eq!(entry.reply, udp(lo4, p2, lo4, p1));
        assert_ne!(
            entry.status & IPS_CONFIRMED,
            0,
            "status {:#x}",
            entry.status
        );
        assert!(entry.id.is_some());
        assert!(entry.timeout_secs.is_some_and(|t| t <= 30), "{entry:?}");

        let lo6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
        let entry = v6.expect("the UDP/IPv6 entry is in the table");
        assert_eq!(entry.original, udp(lo6, q1, lo6, q2));

        assert_eq!(absent_port, None);
        assert_eq!(absent_proto, None);
    }
}
