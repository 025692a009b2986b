//! The kernel's routing netlink (rtnetlink), typed, for what aya does not
//! cover: the tc filters on an interface's ingress, deleting one of them,
//! and link notifications. With it fwmark needs no iproute2 at run time.
//!
//! Messages are built and read with `netlink-packet-route`. The filter
//! requests are short synchronous exchanges made from synchronous code
//! (attach, adopt), through [`crate::netlink`]; the link notifications are
//! read from the daemon's tokio loop through `AsyncFd`.

use netlink_packet_core::{NLM_F_ACK, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
    link::{LinkAttribute, LinkMessage},
    tc::{TcAttribute, TcFilterBpfOption, TcHandle, TcHeader, TcMessage, TcOption},
};
use netlink_sys::{Socket, protocols::NETLINK_ROUTE};
use tokio::io::{Interest, unix::AsyncFd};

use crate::netlink;
pub use crate::netlink::NetlinkError;

/// The ingress hook of the `clsact` qdisc as a filter parent
/// (`TC_H_CLSACT | TC_H_MIN_INGRESS`, `ffff:fff2`).
pub const INGRESS_PARENT: TcHandle = TcHandle {
    major: 0xffff,
    minor: TcHandle::MIN_INGRESS,
};

/// `RTM_NEWTFILTER`, the type of each entry of a filter dump.
const RTM_NEWTFILTER: u16 = 44;

/// One entry of a filter dump. The kernel sends one per filter priority
/// (handle 0, no options) and one per element in it (handle and options).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FilterEntry {
    pub priority: u16,
    pub chain: u32,
    pub handle: u32,
    /// `bpf`, `u32`, `flower`, ... (None if the kernel left it out).
    pub kind: Option<String>,
    /// A `bpf` filter's program name (`TCA_BPF_NAME`).
    pub bpf_name: Option<String>,
}

/// A change of a network device, from the link notifications.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    /// `RTM_NEWLINK`: a device appeared or changed (renamed, up, down, ...).
    New { index: u32, name: Option<String> },
    /// `RTM_DELLINK`: a device went away.
    Del { index: u32, name: Option<String> },
    /// The kernel dropped notifications (the socket's buffer was full):
    /// any device may have changed.
    Overrun,
}

impl LinkEvent {
    /// Whether the event may change what `name` means or the device with
    /// index `index` (`None`: no device followed).
    pub fn concerns(&self, name: &str, index: Option<u32>) -> bool {
        match self {
            LinkEvent::New { index: i, name: n } | LinkEvent::Del { index: i, name: n } => {
                Some(*i) == index || n.as_deref() == Some(name)
            }
            LinkEvent::Overrun => true,
        }
    }
}

/// The request that dumps the filters on `ifindex`'s ingress hook.
fn dump_filters_request(ifindex: u32) -> RouteNetlinkMessage {
    let mut tc = TcMessage::with_index(ifindex.cast_signed());
    tc.header.parent = INGRESS_PARENT;
    RouteNetlinkMessage::GetTrafficFilter(tc)
}

/// The request that deletes the element `handle` of the `kind` filter at
/// `priority` (chain 0) on `ifindex`'s ingress hook.
fn delete_filter_request(
    ifindex: u32,
    priority: u16,
    handle: u32,
    kind: &str,
) -> RouteNetlinkMessage {
    let mut tc = TcMessage::with_index(ifindex.cast_signed());
    tc.header.parent = INGRESS_PARENT;
    tc.header.handle = handle.into();
    // tcm_info: priority in the upper half, protocol (0: any) in the lower.
    tc.header.info = u32::from(priority) << 16;
    tc.attributes.push(TcAttribute::Kind(kind.to_string()));
    RouteNetlinkMessage::DelTrafficFilter(tc)
}

/// Reads one filter entry of a dump.
fn filter_entry(tc: &TcMessage) -> FilterEntry {
    filter_entry_of(&tc.header, &tc.attributes)
}

fn filter_entry_of(header: &TcHeader, attributes: &[TcAttribute]) -> FilterEntry {
    let mut entry = FilterEntry {
        // tcm_info: priority in the upper half, protocol in the lower.
        priority: (header.info >> 16) as u16,
        chain: 0,
        handle: header.handle.into(),
        kind: None,
        bpf_name: None,
    };
    for attribute in attributes {
        match attribute {
            TcAttribute::Kind(kind) => entry.kind = Some(kind.clone()),
            TcAttribute::Chain(chain) => entry.chain = *chain,
            TcAttribute::Options(options) => {
                for option in options {
                    if let TcOption::Bpf(TcFilterBpfOption::ProgName(name)) = option {
                        entry.bpf_name = Some(name.clone());
                    }
                }
            }
            _ => {}
        }
    }
    entry
}

/// Reads one link notification (`None` for other messages).
fn link_event(message: &RouteNetlinkMessage) -> Option<LinkEvent> {
    let name = |link: &LinkMessage| {
        link.attributes.iter().find_map(|a| match a {
            LinkAttribute::IfName(name) => Some(name.clone()),
            _ => None,
        })
    };
    match message {
        RouteNetlinkMessage::NewLink(link) => Some(LinkEvent::New {
            index: link.header.index,
            name: name(link),
        }),
        RouteNetlinkMessage::DelLink(link) => Some(LinkEvent::Del {
            index: link.header.index,
            name: name(link),
        }),
        _ => None,
    }
}

/// The tc filters on `ifindex`'s ingress hook, of every chain, one entry
/// per filter and per filter element, in the kernel's order; none when the
/// interface has no `clsact` (or `ingress`) qdisc.
pub fn ingress_filters(ifindex: u32) -> Result<Vec<FilterEntry>, NetlinkError> {
    let what = format!("listing the tc filters on the ingress of interface index {ifindex}");
    netlink::dump(NETLINK_ROUTE, || dump_filters_request(ifindex), &what)?
        .iter()
        .filter(|reply| reply.header.message_type == RTM_NEWTFILTER)
        .map(|reply| parse_filter(&reply.payload))
        .collect::<Result<_, _>>()
        .map_err(|why| NetlinkError::Reply { what, why })
}

/// Reads a filter entry; when the crate cannot read the attributes (a
/// filter kind it does not know well), the header alone still gives the
/// priority, which is what matters for choosing a free one.
fn parse_filter(payload: &[u8]) -> Result<FilterEntry, String> {
    use netlink_packet_core::Parseable as _;
    match TcMessage::parse(payload) {
        Ok(tc) => Ok(filter_entry(&tc)),
        Err(e) => {
            let header = TcHeader::parse(payload).map_err(|_| e.to_string())?;
            log::debug!("reading a tc filter's attributes failed ({e}); using its header only");
            Ok(filter_entry_of(&header, &[]))
        }
    }
}

/// Deletes the element `handle` of the `kind` filter at `priority` (chain
/// 0) on `ifindex`'s ingress hook. Ok(false): it was not there.
pub fn delete_ingress_filter(
    ifindex: u32,
    priority: u16,
    handle: u32,
    kind: &str,
) -> Result<bool, NetlinkError> {
    let what = format!(
        "deleting the {kind} filter pref {priority} handle {handle:#x} on the ingress of \
         interface index {ifindex}"
    );
    match netlink::exchange(
        NETLINK_ROUTE,
        delete_filter_request(ifindex, priority, handle, kind),
        NLM_F_ACK,
        &what,
    ) {
        Ok(_) => Ok(true),
        Err(e) if e.errno() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// A subscription to the link notifications of this network namespace.
pub struct LinkEvents {
    socket: AsyncFd<Socket>,
}

impl LinkEvents {
    /// Subscribes (inside a tokio runtime): devices that change from now on
    /// are reported by [`LinkEvents::next`].
    pub fn subscribe() -> Result<LinkEvents, NetlinkError> {
        let what = "link notifications";
        let socket_error = |source| NetlinkError::Socket {
            what: what.to_string(),
            source,
        };
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(socket_error)?;
        socket.bind_auto().map_err(socket_error)?;
        socket
            .add_membership(libc::RTNLGRP_LINK)
            .map_err(socket_error)?;
        socket.set_non_blocking(true).map_err(socket_error)?;
        // SAFETY: the netlink socket owns its fd, which stays open and the
        // same for the socket's whole life, and the AsyncFd owns the socket.
        let socket = unsafe { AsyncFd::register_with_interest(socket, Interest::READABLE) }
            .map_err(|e| socket_error(e.into_parts().1))?;
        Ok(LinkEvents { socket })
    }

    /// The link events of the next notification (possibly none: other
    /// messages are skipped). Cancel-safe: a notification is read only when
    /// it is returned.
    pub async fn next(&mut self) -> Result<Vec<LinkEvent>, NetlinkError> {
        let kernel = |source| NetlinkError::Kernel {
            what: "reading link notifications".to_string(),
            source,
        };
        loop {
            let mut guard = self.socket.readable().await.map_err(kernel)?;
            let (datagram, from) = match guard.try_io(|s| s.get_ref().recv_from_full()) {
                Ok(Ok(received)) => received,
                Ok(Err(e)) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    return Ok(vec![LinkEvent::Overrun]);
                }
                Ok(Err(e)) => return Err(kernel(e)),
                Err(_would_block) => continue,
            };
            // Only the kernel's notifications count.
            if from.port_number() != 0 {
                continue;
            }
            return Ok(link_events(&datagram));
        }
    }
}

/// The link events in one notification datagram.
fn link_events(datagram: &[u8]) -> Vec<LinkEvent> {
    let mut events = Vec::new();
    let mut offset = 0;
    while offset < datagram.len() {
        let Ok(message) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&datagram[offset..])
        else {
            // Unreadable: a device may have changed all the same.
            events.push(LinkEvent::Overrun);
            break;
        };
        let length = message.header.length as usize;
        if let NetlinkPayload::InnerMessage(inner) = &message.payload
            && let Some(event) = link_event(inner)
        {
            events.push(event);
        }
        if length == 0 {
            break;
        }
        offset += length.div_ceil(4) * 4;
    }
    events
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::{NLM_F_DUMP, NetlinkHeader};

    use crate::netlink::serialize;
    use netlink_packet_core::Emitable as _;
    use netlink_packet_route::link::LinkHeader;

    use super::*;

    /// The kernel's `struct tcmsg` fields of a serialized tc request.
    fn tcmsg(bytes: &[u8]) -> (u16, u16, i32, u32, u32, u32) {
        let u16_at = |o: usize| u16::from_ne_bytes(bytes[o..o + 2].try_into().unwrap());
        let u32_at = |o: usize| u32::from_ne_bytes(bytes[o..o + 4].try_into().unwrap());
        assert_eq!(u32_at(0) as usize, bytes.len(), "nlmsg_len");
        (
            u16_at(4),                // nlmsg_type
            u16_at(6),                // nlmsg_flags
            u32_at(20).cast_signed(), // tcm_ifindex
            u32_at(24),               // tcm_handle
            u32_at(28),               // tcm_parent
            u32_at(32),               // tcm_info
        )
    }

    #[test]
    fn the_dump_request_asks_for_the_ingress_hook_of_one_interface() {
        let bytes = serialize(dump_filters_request(7), NLM_F_DUMP, 1);
        // RTM_GETTFILTER, request + dump, ifindex 7, parent ffff:fff2.
        assert_eq!(tcmsg(&bytes), (46, 0x301, 7, 0, 0xFFFF_FFF2, 0));
        // No attributes: every chain comes back.
        assert_eq!(bytes.len(), 16 + 20);
    }

    #[test]
    fn the_delete_request_names_priority_handle_and_kind() {
        let bytes = serialize(delete_filter_request(3, 49152, 0x1, "bpf"), NLM_F_ACK, 1);
        // RTM_DELTFILTER, request + ack, priority in tcm_info's upper half
        // and protocol 0 (any) in the lower one.
        assert_eq!(tcmsg(&bytes), (45, 0x5, 3, 1, 0xFFFF_FFF2, 49152 << 16));
        // TCA_KIND "bpf\0": length 8, type 1.
        assert_eq!(&bytes[36..44], &[8, 0, 1, 0, b'b', b'p', b'f', 0]);
    }

    /// A filter message as the kernel sends it, serialized by the crate.
    fn reply(info: u32, handle: u32, attributes: Vec<TcAttribute>) -> Vec<u8> {
        let mut tc = TcMessage::with_index(2);
        tc.header.parent = INGRESS_PARENT;
        tc.header.handle = handle.into();
        tc.header.info = info;
        tc.attributes = attributes;
        let mut buf = vec![0; tc.buffer_len()];
        tc.emit(&mut buf);
        buf
    }

    #[test]
    fn filter_replies_give_priority_chain_kind_and_bpf_name() {
        // pref 2, protocol all (htons(ETH_P_ALL) = 0x0300 on little endian).
        let info = (2 << 16) | u32::from(0x0003u16.to_be());
        let element = reply(
            info,
            1,
            vec![
                TcAttribute::Kind("bpf".into()),
                TcAttribute::Chain(0),
                TcAttribute::Options(vec![
                    TcOption::Bpf(TcFilterBpfOption::ProgName("counter".into())),
                    TcOption::Bpf(TcFilterBpfOption::ProgId(42)),
                ]),
            ],
        );
        assert_eq!(
            parse_filter(&element).unwrap(),
            FilterEntry {
                priority: 2,
                chain: 0,
                handle: 1,
                kind: Some("bpf".into()),
                bpf_name: Some("counter".into()),
            }
        );
        let other_chain = reply(
            (65535 << 16) | 8,
            0,
            vec![TcAttribute::Kind("u32".into()), TcAttribute::Chain(5)],
        );
        assert_eq!(
            parse_filter(&other_chain).unwrap(),
            FilterEntry {
                priority: 65535,
                chain: 5,
                handle: 0,
                kind: Some("u32".into()),
                bpf_name: None,
            }
        );
        assert!(parse_filter(&[0; 8]).is_err(), "shorter than a tcmsg");
    }

    fn link_notification(message: RouteNetlinkMessage) -> Vec<u8> {
        let mut message = NetlinkMessage::new(
            NetlinkHeader::default(),
            NetlinkPayload::InnerMessage(message),
        );
        message.finalize();
        let mut buf = vec![0; message.buffer_len()];
        message.serialize(&mut buf);
        buf
    }

    #[test]
    fn link_notifications_give_index_and_name_and_concern_name_or_index() {
        let link = |index, name: &str| {
            let mut link = LinkMessage::default();
            link.header = LinkHeader {
                index,
                ..Default::default()
            };
            link.attributes.push(LinkAttribute::IfName(name.into()));
            link
        };
        let mut datagram = link_notification(RouteNetlinkMessage::NewLink(link(4, "eth9")));
        datagram.extend(link_notification(RouteNetlinkMessage::DelLink(link(
            5, "lb0",
        ))));
        let events = link_events(&datagram);
        assert_eq!(
            events,
            vec![
                LinkEvent::New {
                    index: 4,
                    name: Some("eth9".into())
                },
                LinkEvent::Del {
                    index: 5,
                    name: Some("lb0".into())
                },
            ]
        );
        // Renamed away: the index is the followed device's.
        assert!(events[0].concerns("lb0", Some(4)));
        // Created again under the name: a new index.
        assert!(events[1].concerns("lb0", Some(9)));
        assert!(events[1].concerns("lb0", None));
        assert!(!events[0].concerns("lb0", Some(5)));
        assert!(!events[0].concerns("lb0", None));
        assert!(LinkEvent::Overrun.concerns("lb0", None));
        // A cut datagram may have hidden a change.
        assert_eq!(link_events(&datagram[..10]), vec![LinkEvent::Overrun]);
    }
}
