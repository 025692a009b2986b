//! One request and its answer over a netlink socket: the exchange that
//! `rtnl` (tc filters), and `ipvs` (generic netlink, nfnetlink) share.
//!
//! A request is built with the `netlink-packet-*` crates and sent on a new
//! `netlink-sys` socket; the answer's messages are read up to the end of the
//! dump (`NLMSG_DONE`) or the acknowledgement (`NLMSG_ERROR` with code 0)
//! and handed back as their headers and raw payloads, so each caller reads
//! them with its own message type and can fall back where a crate cannot
//! read every attribute. A dump the kernel marks as interrupted (what it
//! lists changed while it was read) is read again.

use std::io;

use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, NetlinkBuffer,
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable,
};
use netlink_sys::{Socket, SocketAddr};

/// The length of `struct nlmsghdr`, before each message's payload.
const NLMSG_HEADER_LEN: usize = 16;
/// How often an interrupted dump is read, at most.
pub const DUMP_ATTEMPTS: usize = 5;
/// How long one read of an answer may wait: a kernel that never ends its
/// answer must not hang `status`, a scrape or an attach.
const RECV_TIMEOUT_SECS: i64 = 5;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open a netlink socket to the kernel (for {what})")]
    Socket {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{what} failed")]
    Kernel {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{what}: cannot read the kernel's reply: {why}")]
    Reply { what: String, why: String },
    #[error(
        "{what}: the kernel's list kept changing while it was read ({DUMP_ATTEMPTS} attempts); try again"
    )]
    Interrupted { what: String },
}

impl NetlinkError {
    /// The errno of a failed socket call or of the kernel's answer.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Socket { source, .. } | NetlinkError::Kernel { source, .. } => {
                source.raw_os_error()
            }
            _ => None,
        }
    }
}

/// One message of an answer (not the final `NLMSG_DONE` or acknowledgement).
#[derive(Debug)]
pub struct Reply {
    pub header: NetlinkHeader,
    pub payload: Vec<u8>,
}

/// What one exchange gave.
pub enum Answer {
    Complete(Vec<Reply>),
    /// The dump was interrupted: read it again.
    Interrupted,
}

/// `message` as a request with `flags` and sequence number `seq`.
pub fn serialize<T: NetlinkSerializable + std::fmt::Debug>(
    message: T,
    flags: u16,
    seq: u32,
) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | flags;
    header.sequence_number = seq;
    let mut message = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(message));
    message.finalize();
    let mut buf = vec![0; message.buffer_len()];
    message.serialize(&mut buf);
    buf
}

/// The messages of one datagram: header and payload.
fn split(datagram: &[u8]) -> Result<Vec<Reply>, String> {
    let mut parts = Vec::new();
    let mut offset = 0;
    while offset < datagram.len() {
        let buffer = NetlinkBuffer::new_checked(&datagram[offset..]).map_err(|e| e.to_string())?;
        let length = buffer.length() as usize;
        if length < NLMSG_HEADER_LEN {
            return Err(format!("a message of length {length}"));
        }
        let mut header = NetlinkHeader::default();
        header.length = buffer.length();
        header.message_type = buffer.message_type();
        header.flags = buffer.flags();
        header.sequence_number = buffer.sequence_number();
        header.port_number = buffer.port_number();
        parts.push(Reply {
            header,
            payload: datagram[offset + NLMSG_HEADER_LEN..offset + length].to_vec(),
        });
        // Messages are aligned to 4 bytes.
        offset += length.div_ceil(4) * 4;
    }
    Ok(parts)
}

/// The errno of an `NLMSG_ERROR` or `NLMSG_DONE` payload (0: none).
fn error_code(payload: &[u8]) -> Result<i32, String> {
    let code: [u8; 4] = payload
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or("truncated error message")?;
    Ok(-i32::from_ne_bytes(code))
}

/// A socket of `protocol` connected to the kernel, with a receive timeout.
fn connect(protocol: isize, what: &str) -> Result<Socket, NetlinkError> {
    let socket_error = |source| NetlinkError::Socket {
        what: what.to_string(),
        source,
    };
    let mut socket = Socket::new(protocol).map_err(socket_error)?;
    nix::sys::socket::setsockopt(
        &socket,
        nix::sys::socket::sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(RECV_TIMEOUT_SECS, 0),
    )
    .map_err(|e| socket_error(e.into()))?;
    socket.bind_auto().map_err(socket_error)?;
    socket
        .connect(&SocketAddr::new(0, 0))
        .map_err(socket_error)?;
    Ok(socket)
}

/// Sends `request` on a new socket of `protocol` with `flags`
/// (`NLM_F_DUMP`, `NLM_F_ACK`) and collects the answer's messages up to the
/// end of the dump or the acknowledgement. An error the kernel answers
/// with is [`NetlinkError::Kernel`].
pub fn exchange<T: NetlinkSerializable + std::fmt::Debug>(
    protocol: isize,
    request: T,
    flags: u16,
    what: &str,
) -> Result<Answer, NetlinkError> {
    let socket = connect(protocol, what)?;
    let kernel = |source| NetlinkError::Kernel {
        what: what.to_string(),
        source,
    };
    let unreadable = |why: String| NetlinkError::Reply {
        what: what.to_string(),
        why,
    };
    let seq = 1;
    socket
        .send(&serialize(request, flags, seq), 0)
        .map_err(kernel)?;
    let mut replies = Vec::new();
    let mut interrupted = false;
    loop {
        let (datagram, _) = socket.recv_from_full().map_err(kernel)?;
        for part in split(&datagram).map_err(unreadable)? {
            if part.header.sequence_number != seq {
                continue;
            }
            interrupted |= part.header.flags & NLM_F_DUMP_INTR != 0;
            match part.header.message_type {
                NLMSG_ERROR | NLMSG_DONE => {
                    // An error, an acknowledgement (0), or the end of a
                    // dump with its error, if any.
                    let code = error_code(&part.payload).map_err(unreadable)?;
                    if code != 0 {
                        return Err(kernel(io::Error::from_raw_os_error(code)));
                    }
                    return Ok(if interrupted {
                        Answer::Interrupted
                    } else {
                        Answer::Complete(replies)
                    });
                }
                _ => replies.push(part),
            }
        }
    }
}

/// A dump (`NLM_F_DUMP`) of what `request` asks for, read again while the
/// kernel says it was interrupted.
pub fn dump<T: NetlinkSerializable + std::fmt::Debug>(
    protocol: isize,
    request: impl Fn() -> T,
    what: &str,
) -> Result<Vec<Reply>, NetlinkError> {
    for _ in 0..DUMP_ATTEMPTS {
        if let Answer::Complete(replies) = exchange(protocol, request(), NLM_F_DUMP, what)? {
            return Ok(replies);
        }
    }
    Err(NetlinkError::Interrupted {
        what: what.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A message as the kernel lays it out: header, payload, padding.
    fn message(out: &mut Vec<u8>, kind: u16, flags: u16, payload: &[u8]) {
        let length = (NLMSG_HEADER_LEN + payload.len()) as u32;
        out.extend_from_slice(&length.to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(&flags.to_ne_bytes());
        out.extend_from_slice(&7u32.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes());
        out.extend_from_slice(payload);
        out.resize(out.len().div_ceil(4) * 4, 0);
    }

    #[test]
    fn splits_a_datagram_into_aligned_messages() {
        let mut datagram = Vec::new();
        message(&mut datagram, 44, NLM_F_DUMP_INTR, &[1, 2, 3]);
        message(&mut datagram, NLMSG_DONE, 0, &0i32.to_ne_bytes());
        let parts = split(&datagram).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].header.message_type, 44);
        assert_eq!(parts[0].header.sequence_number, 7);
        assert_eq!(parts[0].header.flags, NLM_F_DUMP_INTR);
        assert_eq!(parts[0].payload, [1, 2, 3]);
        assert_eq!(parts[1].header.message_type, NLMSG_DONE);
        assert_eq!(error_code(&parts[1].payload), Ok(0));
        assert!(
            split(&datagram[..datagram.len() - 2]).is_err(),
            "a cut message is an error"
        );
    }

    #[test]
    fn the_cause_is_said_once_through_the_chain() {
        let e = NetlinkError::Kernel {
            what: "listing the tc filters".into(),
            source: io::Error::from_raw_os_error(libc::ENODEV),
        };
        let text = crate::chain(&e);
        assert_eq!(text.matches("No such device").count(), 1, "{text}");
        assert_eq!(e.errno(), Some(libc::ENODEV));
    }

    #[test]
    fn an_error_payload_gives_its_errno_and_a_short_one_is_refused() {
        assert_eq!(error_code(&(-libc::ENOENT).to_ne_bytes()), Ok(libc::ENOENT));
        assert!(error_code(&[0, 0]).is_err());
        // A header claiming less than itself is refused, not looped on.
        let mut datagram = Vec::new();
        message(&mut datagram, 44, 0, &[]);
        datagram[..4].copy_from_slice(&4u32.to_ne_bytes());
        assert!(split(&datagram).is_err());
    }
}
