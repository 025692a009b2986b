//! What IPVS has, read from the kernel the way `ipvsadm` reads it: the
//! generic netlink family `IPVS` (`IPVS_CMD_GET_SERVICE` and, per service,
//! `IPVS_CMD_GET_DEST` dumps; include/uapi/linux/ip_vs.h,
//! net/netfilter/ipvs/ip_vs_ctl.c), and the nftables tables (an
//! `NFT_MSG_GETTABLE` dump over nfnetlink) for keepalived's own marking
//! table. Neither `ipvsadm` nor `nft` is needed.
//!
//! No maintained crate speaks IPVS's generic netlink with the netlink
//! crates fwmark already uses (`netlink-packet-ipvs` 0.0.1 is built on
//! netlink-packet-core 0.7, `ipvs` 0.1 is a placeholder, `nlrs` brings its
//! own netlink stack), so the IPVS messages are a small typed layer on
//! `netlink-packet-generic`; the nftables dump uses
//! `netlink-packet-netfilter`'s table messages as they are. Both are short
//! synchronous dumps over a plain `netlink-sys` socket: `status` and
//! `check` call them directly, the daemon from its scrape, which runs on
//! tokio's blocking pool.
//!
//! The result is [`fwmark_core::ipvs_check::Snapshot`], the plain data the
//! pure check runs on.

use std::{io, net::IpAddr};

use fwmark_core::ipvs_check::{Family, IpvsDest, IpvsService, NftTable, Snapshot};
use netlink_packet_core::{
    DecodeError, Emitable, NLA_TYPE_MASK, NLM_F_ACK, NetlinkDeserializable, NetlinkMessage,
    NetlinkPayload, Nla, NlasIterator, ParseableParametrized,
};
use netlink_packet_generic::{
    GenlFamily, GenlHeader, GenlMessage,
    ctrl::{GenlCtrl, GenlCtrlCmd, nlas::GenlCtrlAttrs},
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
    nftables::{NfTablesMessage, TableAttribute, TableMessage},
};
use netlink_sys::protocols::{NETLINK_GENERIC, NETLINK_NETFILTER};

use crate::netlink::{self, Answer, NetlinkError, Reply};

/// The generic netlink family name (`IPVS_GENL_NAME`).
pub const FAMILY_NAME: &str = "IPVS";
/// `IPVS_GENL_VERSION`.
const VERSION: u8 = 1;

// Commands (enum in ip_vs.h). A dump's entries come back as NEW_*.
const IPVS_CMD_NEW_SERVICE: u8 = 1;
const IPVS_CMD_GET_SERVICE: u8 = 4;
const IPVS_CMD_NEW_DEST: u8 = 5;
const IPVS_CMD_GET_DEST: u8 = 8;

// First-level attributes.
const IPVS_CMD_ATTR_SERVICE: u16 = 1;
const IPVS_CMD_ATTR_DEST: u16 = 2;

// Service attributes (inside IPVS_CMD_ATTR_SERVICE).
const IPVS_SVC_ATTR_AF: u16 = 1;
const IPVS_SVC_ATTR_PROTOCOL: u16 = 2;
const IPVS_SVC_ATTR_ADDR: u16 = 3;
const IPVS_SVC_ATTR_PORT: u16 = 4;
const IPVS_SVC_ATTR_FWMARK: u16 = 5;
const IPVS_SVC_ATTR_SCHED_NAME: u16 = 6;
const IPVS_SVC_ATTR_FLAGS: u16 = 7;
const IPVS_SVC_ATTR_TIMEOUT: u16 = 8;

// Destination attributes (inside IPVS_CMD_ATTR_DEST).
const IPVS_DEST_ATTR_ADDR: u16 = 1;
const IPVS_DEST_ATTR_PORT: u16 = 2;
const IPVS_DEST_ATTR_FWD_METHOD: u16 = 3;
const IPVS_DEST_ATTR_WEIGHT: u16 = 4;
const IPVS_DEST_ATTR_ACTIVE_CONNS: u16 = 7;
const IPVS_DEST_ATTR_INACT_CONNS: u16 = 8;
const IPVS_DEST_ATTR_PERSIST_CONNS: u16 = 9;
const IPVS_DEST_ATTR_ADDR_FAMILY: u16 = 11;

const AF_INET: u16 = libc::AF_INET as u16;
const AF_INET6: u16 = libc::AF_INET6 as u16;

/// Why IPVS (or the nftables tables) could not be read.
#[derive(Debug, thiserror::Error)]
pub enum IpvsError {
    /// No `IPVS` generic netlink family: the ip_vs module is not loaded.
    #[error("IPVS is not loaded: `modprobe ip_vs` (or start keepalived, which loads it)")]
    NotLoaded,
    #[error("{what}: not permitted; reading IPVS takes root or CAP_NET_ADMIN, as ipvsadm does")]
    Permission {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Netlink(NetlinkError),
}

impl From<NetlinkError> for IpvsError {
    /// The kernel's EPERM says what it takes.
    fn from(e: NetlinkError) -> IpvsError {
        match e {
            NetlinkError::Kernel { what, source } if source.raw_os_error() == Some(libc::EPERM) => {
                IpvsError::Permission { what, source }
            }
            other => IpvsError::Netlink(other),
        }
    }
}

/// The kernel's answer of type `T`, or why it cannot be read.
fn read_reply<T: NetlinkDeserializable>(reply: &Reply, what: &str) -> Result<T, IpvsError> {
    T::deserialize(&reply.header, &reply.payload).map_err(|e| {
        IpvsError::Netlink(NetlinkError::Reply {
            what: what.to_string(),
            why: e.to_string(),
        })
    })
}

/// An unreadable answer to `what`.
fn unreadable(what: &str, why: String) -> IpvsError {
    IpvsError::Netlink(NetlinkError::Reply {
        what: what.to_string(),
        why,
    })
}

impl IpvsError {
    /// Whether this only says IPVS is not there.
    pub fn is_not_loaded(&self) -> bool {
        matches!(self, IpvsError::NotLoaded)
    }
}

/// Everything fwmark's check needs: IPVS's services with their real
/// servers, and the nftables tables. IPVS not loaded is no error: the
/// snapshot says so (`loaded: false`).
pub fn read() -> Result<Snapshot, IpvsError> {
    let (loaded, services) = match family_id() {
        Ok(family) => {
            let mut services = services(family)?;
            for s in &mut services {
                s.dests = dests(family, s)?;
            }
            (true, services)
        }
        Err(IpvsError::NotLoaded) => (false, Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(Snapshot {
        loaded,
        services,
        nft_tables: nft_tables()?,
    })
}

/// An IPVS generic netlink message: its command and attributes (nested
/// ones kept as bytes and read by [`parse_service`] / [`parse_dest`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpvsMessage {
    pub cmd: u8,
    pub attrs: Vec<Attr>,
    /// The family id the kernel gave `IPVS` (set on requests).
    family_id: u16,
}

impl GenlFamily for IpvsMessage {
    fn family_name() -> &'static str {
        FAMILY_NAME
    }
    fn family_id(&self) -> u16 {
        self.family_id
    }
    fn command(&self) -> u8 {
        self.cmd
    }
    fn version(&self) -> u8 {
        VERSION
    }
}

impl Emitable for IpvsMessage {
    fn buffer_len(&self) -> usize {
        self.attrs.as_slice().buffer_len()
    }
    fn emit(&self, buffer: &mut [u8]) {
        self.attrs.as_slice().emit(buffer)
    }
}

impl ParseableParametrized<[u8], GenlHeader> for IpvsMessage {
    fn parse_with_param(buf: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        Ok(IpvsMessage {
            cmd: header.cmd,
            attrs: nlas(buf)?,
            family_id: 0,
        })
    }
}

/// One netlink attribute: its type (flag bits cleared) and value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    pub kind: u16,
    pub value: Vec<u8>,
}

impl Nla for Attr {
    fn value_len(&self) -> usize {
        self.value.len()
    }
    fn kind(&self) -> u16 {
        self.kind
    }
    fn emit_value(&self, buffer: &mut [u8]) {
        buffer.copy_from_slice(&self.value);
    }
}

/// The attributes in `buf`.
fn nlas(buf: &[u8]) -> Result<Vec<Attr>, DecodeError> {
    NlasIterator::new(buf)
        .map(|nla| {
            let nla = nla?;
            Ok(Attr {
                kind: nla.kind() & NLA_TYPE_MASK,
                value: nla.value().to_vec(),
            })
        })
        .collect()
}

/// An attribute of `kind` holding `value`.
fn nla(kind: u16, value: &[u8]) -> Attr {
    Attr {
        kind,
        value: value.to_vec(),
    }
}

fn bytes<const N: usize>(v: &[u8], what: &str) -> Result<[u8; N], String> {
    v.get(..N)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| format!("{what}: {} bytes, expected {N}", v.len()))
}

fn u16_ne(v: &[u8], what: &str) -> Result<u16, String> {
    Ok(u16::from_ne_bytes(bytes(v, what)?))
}

fn u16_be(v: &[u8], what: &str) -> Result<u16, String> {
    Ok(u16::from_be_bytes(bytes(v, what)?))
}

fn u32_ne(v: &[u8], what: &str) -> Result<u32, String> {
    Ok(u32::from_ne_bytes(bytes(v, what)?))
}

fn family_of(af: u16) -> Result<Family, String> {
    match af {
        AF_INET => Ok(Family::V4),
        AF_INET6 => Ok(Family::V6),
        n => Err(format!("address family {n}")),
    }
}

/// An address attribute: IPVS sends `union nf_inet_addr` (16 bytes, an
/// IPv4 address in the first 4).
fn addr(v: &[u8], family: Family, what: &str) -> Result<IpAddr, String> {
    Ok(match family {
        Family::V4 => IpAddr::from(bytes::<4>(v, what)?),
        Family::V6 => IpAddr::from(bytes::<16>(v, what)?),
    })
}

/// The nested attributes of the first attribute of `kind` in `msg`.
fn nested(msg: &IpvsMessage, kind: u16) -> Result<Vec<Attr>, String> {
    let outer = msg
        .attrs
        .iter()
        .find(|a| a.kind == kind)
        .ok_or_else(|| format!("no attribute {kind} in command {}", msg.cmd))?;
    nlas(&outer.value).map_err(|e| e.to_string())
}

/// A service of a `IPVS_CMD_GET_SERVICE` dump (no real servers yet).
pub fn parse_service(msg: &IpvsMessage) -> Result<IpvsService, String> {
    let attrs = nested(msg, IPVS_CMD_ATTR_SERVICE)?;
    let get = |k: u16| attrs.iter().find(|a| a.kind == k).map(|a| a.value.clone());
    let family = family_of(u16_ne(
        &get(IPVS_SVC_ATTR_AF).ok_or("service without IPVS_SVC_ATTR_AF")?,
        "IPVS_SVC_ATTR_AF",
    )?)?;
    let fwmark = match get(IPVS_SVC_ATTR_FWMARK) {
        Some(v) => u32_ne(&v, "IPVS_SVC_ATTR_FWMARK")?,
        None => 0,
    };
    let addr = match get(IPVS_SVC_ATTR_ADDR) {
        Some(v) if fwmark == 0 => Some(addr(&v, family, "IPVS_SVC_ATTR_ADDR")?),
        _ => None,
    };
    Ok(IpvsService {
        family,
        fwmark,
        protocol: match get(IPVS_SVC_ATTR_PROTOCOL) {
            Some(v) => u16_ne(&v, "IPVS_SVC_ATTR_PROTOCOL")?,
            None => 0,
        },
        addr,
        port: match get(IPVS_SVC_ATTR_PORT) {
            Some(v) => u16_be(&v, "IPVS_SVC_ATTR_PORT")?,
            None => 0,
        },
        scheduler: match get(IPVS_SVC_ATTR_SCHED_NAME) {
            Some(v) => {
                String::from_utf8_lossy(v.split(|&b| b == 0).next().unwrap_or(&[])).into_owned()
            }
            None => String::new(),
        },
        // struct ip_vs_flags { flags, mask }
        flags: match get(IPVS_SVC_ATTR_FLAGS) {
            Some(v) => u32_ne(&v, "IPVS_SVC_ATTR_FLAGS")?,
            None => 0,
        },
        timeout: match get(IPVS_SVC_ATTR_TIMEOUT) {
            Some(v) => u32_ne(&v, "IPVS_SVC_ATTR_TIMEOUT")?,
            None => 0,
        },
        dests: Vec::new(),
    })
}

/// A real server of a `IPVS_CMD_GET_DEST` dump of a `family` service.
pub fn parse_dest(msg: &IpvsMessage, family: Family) -> Result<IpvsDest, String> {
    let attrs = nested(msg, IPVS_CMD_ATTR_DEST)?;
    let get = |k: u16| attrs.iter().find(|a| a.kind == k).map(|a| a.value.clone());
    let u32_of = |k: u16, what: &str| -> Result<u32, String> {
        match get(k) {
            Some(v) => u32_ne(&v, what),
            None => Ok(0),
        }
    };
    // A real server's family may differ from its service's (IPv6 real
    // servers behind an IPv4 tunnel service); older kernels omit it.
    let dest_family = match get(IPVS_DEST_ATTR_ADDR_FAMILY) {
        Some(v) => family_of(u16_ne(&v, "IPVS_DEST_ATTR_ADDR_FAMILY")?)?,
        None => family,
    };
    Ok(IpvsDest {
        addr: addr(
            &get(IPVS_DEST_ATTR_ADDR).ok_or("real server without IPVS_DEST_ATTR_ADDR")?,
            dest_family,
            "IPVS_DEST_ATTR_ADDR",
        )?,
        port: match get(IPVS_DEST_ATTR_PORT) {
            Some(v) => u16_be(&v, "IPVS_DEST_ATTR_PORT")?,
            None => 0,
        },
        forward: u32_of(IPVS_DEST_ATTR_FWD_METHOD, "IPVS_DEST_ATTR_FWD_METHOD")?,
        weight: u32_of(IPVS_DEST_ATTR_WEIGHT, "IPVS_DEST_ATTR_WEIGHT")? as i32,
        active_conns: u32_of(IPVS_DEST_ATTR_ACTIVE_CONNS, "IPVS_DEST_ATTR_ACTIVE_CONNS")?,
        inactive_conns: u32_of(IPVS_DEST_ATTR_INACT_CONNS, "IPVS_DEST_ATTR_INACT_CONNS")?,
        persist_conns: u32_of(IPVS_DEST_ATTR_PERSIST_CONNS, "IPVS_DEST_ATTR_PERSIST_CONNS")?,
    })
}

/// The nested service attribute that names `svc` in a destination dump
/// request: family and mark, or family, protocol, address and port.
fn service_key(svc: &IpvsService) -> Attr {
    let af = match svc.family {
        Family::V4 => AF_INET,
        Family::V6 => AF_INET6,
    };
    let mut inner = vec![nla(IPVS_SVC_ATTR_AF, &af.to_ne_bytes())];
    if svc.fwmark != 0 {
        inner.push(nla(IPVS_SVC_ATTR_FWMARK, &svc.fwmark.to_ne_bytes()));
    } else {
        let mut addr = [0u8; 16];
        match svc.addr {
            Some(IpAddr::V4(a)) => addr[..4].copy_from_slice(&a.octets()),
            Some(IpAddr::V6(a)) => addr.copy_from_slice(&a.octets()),
            None => {}
        }
        inner.push(nla(IPVS_SVC_ATTR_PROTOCOL, &svc.protocol.to_ne_bytes()));
        inner.push(nla(IPVS_SVC_ATTR_ADDR, &addr));
        inner.push(nla(IPVS_SVC_ATTR_PORT, &svc.port.to_be_bytes()));
    }
    let mut buf = vec![0; inner.as_slice().buffer_len()];
    inner.as_slice().emit(&mut buf);
    nla(IPVS_CMD_ATTR_SERVICE, &buf)
}

/// The request for the real servers of `svc`, as ipvsadm sends it.
pub fn dest_request(family_id: u16, svc: &IpvsService) -> IpvsMessage {
    IpvsMessage {
        cmd: IPVS_CMD_GET_DEST,
        attrs: vec![service_key(svc)],
        family_id,
    }
}

/// The id of the `IPVS` generic netlink family; [`IpvsError::NotLoaded`]
/// when there is none.
pub fn family_id() -> Result<u16, IpvsError> {
    let what = "looking up the IPVS generic netlink family";
    let mut request = GenlMessage::from_payload(GenlCtrl {
        cmd: GenlCtrlCmd::GetFamily,
        nlas: vec![GenlCtrlAttrs::FamilyName(FAMILY_NAME.to_string())],
    });
    request.finalize();
    // NLM_F_ACK: a lookup that succeeds ends with the acknowledgement (it
    // is no dump, so no NLMSG_DONE follows the answer).
    let replies = match netlink::exchange(NETLINK_GENERIC, request, NLM_F_ACK, what) {
        Err(e) if e.errno() == Some(libc::ENOENT) => return Err(IpvsError::NotLoaded),
        Err(e) => return Err(e.into()),
        Ok(Answer::Complete(r)) => r,
        Ok(Answer::Interrupted) => Vec::new(),
    };
    for reply in &replies {
        let answer: GenlMessage<GenlCtrl> = read_reply(reply, what)?;
        if let Some(id) = answer.payload.nlas.iter().find_map(|a| match a {
            GenlCtrlAttrs::FamilyId(id) => Some(*id),
            _ => None,
        }) {
            return Ok(id);
        }
    }
    Err(unreadable(what, "no family id in the answer".into()))
}

/// Every IPVS service (without real servers).
fn services(family_id: u16) -> Result<Vec<IpvsService>, IpvsError> {
    let what = "listing the IPVS services (IPVS_CMD_GET_SERVICE)";
    let request = || {
        let mut m = GenlMessage::from_payload(IpvsMessage {
            cmd: IPVS_CMD_GET_SERVICE,
            attrs: Vec::new(),
            family_id,
        });
        m.finalize();
        m
    };
    let mut services = Vec::new();
    for reply in netlink::dump(NETLINK_GENERIC, request, what)? {
        let m: GenlMessage<IpvsMessage> = read_reply(&reply, what)?;
        if m.payload.cmd == IPVS_CMD_NEW_SERVICE {
            services.push(parse_service(&m.payload).map_err(|why| unreadable(what, why))?);
        }
    }
    Ok(services)
}

/// The real servers of `svc`.
fn dests(family_id: u16, svc: &IpvsService) -> Result<Vec<IpvsDest>, IpvsError> {
    let what = format!(
        "listing the real servers of IPVS service {} (IPVS_CMD_GET_DEST)",
        svc.label()
    );
    let request = || {
        let mut m = GenlMessage::from_payload(dest_request(family_id, svc));
        m.finalize();
        m
    };
    let mut dests = Vec::new();
    for reply in netlink::dump(NETLINK_GENERIC, request, &what)? {
        let m: GenlMessage<IpvsMessage> = read_reply(&reply, &what)?;
        if m.payload.cmd == IPVS_CMD_NEW_DEST {
            dests.push(parse_dest(&m.payload, svc.family).map_err(|why| unreadable(&what, why))?);
        }
    }
    Ok(dests)
}

/// Every nftables table, of every family; none when the kernel has no
/// nftables (no nfnetlink or no nf_tables: nobody can have loaded one).
pub fn nft_tables() -> Result<Vec<NftTable>, IpvsError> {
    let what = "listing the nftables tables (NFT_MSG_GETTABLE)";
    let request = || {
        NetfilterMessage::new(
            NetfilterHeader::new(NetfilterProtoFamily::Unspec, 0, 0),
            NfTablesMessage::GetTable(TableMessage { attributes: vec![] }),
        )
    };
    let replies = match netlink::dump(NETLINK_NETFILTER, request, what) {
        Err(e)
            if matches!(
                e.errno(),
                Some(libc::EPROTONOSUPPORT | libc::EOPNOTSUPP | libc::ENOENT)
            ) =>
        {
            return Ok(Vec::new());
        }
        other => other?,
    };
    let mut tables = Vec::new();
    for reply in &replies {
        tables.push(read_reply::<NetfilterMessage>(reply, what)?);
    }
    Ok(tables
        .into_iter()
        .filter_map(|m| {
            let family = u8::from(m.header.family);
            match m.inner {
                NetfilterMessageInner::NfTables(NfTablesMessage::NewTable(t)) => {
                    t.attributes.into_iter().find_map(|a| match a {
                        TableAttribute::Name(name) => Some(NftTable { family, name }),
                        _ => None,
                    })
                }
                _ => None,
            }
        })
        .collect())
}

/// Parses one netlink message (header included) of an IPVS dump, as the
/// kernel sends it (the unit tests feed it bytes captured in the VM).
pub fn parse_message(bytes: &[u8]) -> Result<IpvsMessage, String> {
    let message = NetlinkMessage::<GenlMessage<IpvsMessage>>::deserialize(bytes)
        .map_err(|e| e.to_string())?;
    match message.payload {
        NetlinkPayload::InnerMessage(m) => Ok(m.payload),
        other => Err(format!("not an IPVS message: {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::NLM_F_DUMP;

    use super::*;
    use crate::netlink::serialize;

    /// An attribute as the kernel lays it out (`nla_put`): length, type,
    /// value, padding to 4 bytes.
    fn put(out: &mut Vec<u8>, kind: u16, value: &[u8]) {
        out.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(value);
        out.resize(out.len().div_ceil(4) * 4, 0);
    }

    /// A whole netlink message of family `id`, command `cmd`, with one
    /// nested attribute `outer` holding `inner`.
    fn message(id: u16, cmd: u8, outer: u16, inner: &[u8]) -> Vec<u8> {
        let mut attrs = Vec::new();
        put(&mut attrs, outer, inner);
        let mut m = Vec::new();
        m.extend_from_slice(&((16 + 4 + attrs.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&id.to_ne_bytes());
        m.extend_from_slice(&2u16.to_ne_bytes()); // NLM_F_MULTI
        m.extend_from_slice(&1u32.to_ne_bytes());
        m.extend_from_slice(&77u32.to_ne_bytes());
        m.extend_from_slice(&[cmd, VERSION, 0, 0]);
        m.extend_from_slice(&attrs);
        m
    }

    /// A fwmark service as ip_vs_genl_fill_service() writes it: family,
    /// mark, scheduler, flags {flags, mask}, timeout, netmask, and the
    /// nested statistics (skipped by the parser).
    #[test]
    fn a_fwmark_service_and_its_real_server_parse_as_the_kernel_sends_them() {
        let mut svc = Vec::new();
        put(&mut svc, IPVS_SVC_ATTR_AF, &AF_INET6.to_ne_bytes());
        put(&mut svc, IPVS_SVC_ATTR_FWMARK, &86u32.to_ne_bytes());
        put(&mut svc, IPVS_SVC_ATTR_SCHED_NAME, b"wlc\0");
        let mut flags = 1u32.to_ne_bytes().to_vec();
        flags.extend_from_slice(&u32::MAX.to_ne_bytes());
        put(&mut svc, IPVS_SVC_ATTR_FLAGS, &flags);
        put(&mut svc, IPVS_SVC_ATTR_TIMEOUT, &300u32.to_ne_bytes());
        put(&mut svc, 9, &128u32.to_be_bytes()); // NETMASK
        let mut stats = Vec::new();
        put(&mut stats, 1, &5u32.to_ne_bytes());
        put(&mut svc, 10, &stats); // STATS
        let bytes = message(0x1d, IPVS_CMD_NEW_SERVICE, IPVS_CMD_ATTR_SERVICE, &svc);
        let parsed = parse_service(&parse_message(&bytes).unwrap()).unwrap();
        assert_eq!(
            parsed,
            IpvsService {
                family: Family::V6,
                fwmark: 86,
                protocol: 0,
                addr: None,
                port: 0,
                scheduler: "wlc".into(),
                flags: 1,
                timeout: 300,
                dests: vec![],
            }
        );
        assert_eq!(parsed.label(), "FWM 86 IPv6");

        let mut dest = Vec::new();
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[10, 0, 2, 2]);
        put(&mut dest, IPVS_DEST_ATTR_ADDR, &addr);
        put(&mut dest, IPVS_DEST_ATTR_PORT, &0u16.to_be_bytes());
        put(&mut dest, IPVS_DEST_ATTR_FWD_METHOD, &0u32.to_ne_bytes());
        put(&mut dest, IPVS_DEST_ATTR_WEIGHT, &3u32.to_ne_bytes());
        put(&mut dest, IPVS_DEST_ATTR_ACTIVE_CONNS, &7u32.to_ne_bytes());
        put(&mut dest, IPVS_DEST_ATTR_INACT_CONNS, &9u32.to_ne_bytes());
        put(&mut dest, IPVS_DEST_ATTR_PERSIST_CONNS, &2u32.to_ne_bytes());
        put(
            &mut dest,
            IPVS_DEST_ATTR_ADDR_FAMILY,
            &AF_INET.to_ne_bytes(),
        );
        let bytes = message(0x1d, IPVS_CMD_NEW_DEST, IPVS_CMD_ATTR_DEST, &dest);
        // An IPv4 real server of the IPv6 service: its own family decides.
        let d = parse_dest(&parse_message(&bytes).unwrap(), Family::V6).unwrap();
        assert_eq!(d.addr, IpAddr::from([10, 0, 2, 2]));
        assert_eq!(
            (d.weight, d.active_conns, d.inactive_conns, d.persist_conns),
            (3, 7, 9, 2)
        );
        assert_eq!(d.forward_name(), "Masq");
    }

    #[test]
    fn an_address_port_service_parses_and_truncated_values_are_refused() {
        let mut svc = Vec::new();
        put(&mut svc, IPVS_SVC_ATTR_AF, &AF_INET.to_ne_bytes());
        put(&mut svc, IPVS_SVC_ATTR_PROTOCOL, &17u16.to_ne_bytes());
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[192, 0, 2, 53]);
        put(&mut svc, IPVS_SVC_ATTR_ADDR, &addr);
        put(&mut svc, IPVS_SVC_ATTR_PORT, &53u16.to_be_bytes());
        let bytes = message(0x1d, IPVS_CMD_NEW_SERVICE, IPVS_CMD_ATTR_SERVICE, &svc);
        let parsed = parse_service(&parse_message(&bytes).unwrap()).unwrap();
        assert_eq!(parsed.label(), "UDP 192.0.2.53:53");

        let mut bad = Vec::new();
        put(&mut bad, IPVS_SVC_ATTR_AF, &AF_INET.to_ne_bytes());
        put(&mut bad, IPVS_SVC_ATTR_FWMARK, &[1, 2]);
        let bytes = message(0x1d, IPVS_CMD_NEW_SERVICE, IPVS_CMD_ATTR_SERVICE, &bad);
        let e = parse_service(&parse_message(&bytes).unwrap()).unwrap_err();
        assert!(e.contains("IPVS_SVC_ATTR_FWMARK: 2 bytes"), "{e}");
    }

    /// The destination request names the service the way
    /// ip_vs_genl_parse_service() needs: family and mark, nested.
    #[test]
    fn the_dest_request_names_a_fwmark_service_by_family_and_mark() {
        let svc = IpvsService {
            family: Family::V4,
            fwmark: 80,
            protocol: 0,
            addr: None,
            port: 0,
            scheduler: "rr".into(),
            flags: 0,
            timeout: 0,
            dests: vec![],
        };
        let mut m = GenlMessage::from_payload(dest_request(0x1d, &svc));
        m.finalize();
        let bytes = serialize(m, NLM_F_DUMP, 1);
        assert_eq!(u16::from_ne_bytes([bytes[4], bytes[5]]), 0x1d);
        assert_eq!(bytes[16], IPVS_CMD_GET_DEST);
        let mut inner = Vec::new();
        put(&mut inner, IPVS_SVC_ATTR_AF, &AF_INET.to_ne_bytes());
        put(&mut inner, IPVS_SVC_ATTR_FWMARK, &80u32.to_ne_bytes());
        let mut want = Vec::new();
        put(&mut want, IPVS_CMD_ATTR_SERVICE, &inner);
        assert_eq!(&bytes[20..], &want[..]);
    }
}
