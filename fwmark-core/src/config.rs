//! The TOML configuration: parsing and validation.
//!
//! ```toml
//! mask = 0xffffffff          # optional default for every service
//! icmp_errors = false        # optional: mark ICMP errors by the packet they quote
//!
//! [[service]]
//! name  = "web"              # optional label
//! vip   = "192.0.2.10"       # address or CIDR, IPv4 or IPv6, or a list
//! proto = "tcp"              # "tcp" | "udp" | "sctp", or a list
//! ports = [80, 443]          # numbers and "lo-hi" ranges; omit for every port
//! mark  = 80                 # 1..=0xffffffff
//! # mask = 0x0000ffff        # optional per-service override
//! ```
//!
//! Every problem is reported with file, line, column and field; a config with
//! any problem is rejected whole. Conflicts between services are found when
//! the config is compiled into map entries (`crate::ruleset`).

use std::{collections::HashMap, fmt, net::IpAddr, path::Path};

use ipnet::IpNet;
use serde::{
    Deserialize, Deserializer,
    de::{self, SeqAccess, Visitor},
};
use toml::Spanned;

/// Default mask: fwmark owns the whole 32-bit mark (`--set-mark`).
pub const DEFAULT_MASK: u32 = u32::MAX;

/// A validated configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Where it was read from, as given (used in messages).
    pub source: String,
    /// The services, in file order.
    pub services: Vec<Service>,
    /// `icmp_errors = true`: ICMP errors (ICMPv4 3, 4, 11; ICMPv6 1-4) get
    /// the mark of the service their quoted packet came from (its source
    /// address, protocol and source port), for IPVS's `schedule_icmp`.
    /// One switch for the whole config (see the README for why there is no
    /// per-service override).
    pub icmp_errors: bool,
}

/// One `[[service]]` table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    /// Its label: `name`, or `service<N>` (N counts from 1 in file order).
    pub name: String,
    /// Line of its `[[service]]` header.
    pub line: usize,
    /// Addresses and prefixes (host bits are zero).
    pub vips: Vec<IpNet>,
    /// Protocols, without duplicates.
    pub protos: Vec<Proto>,
    /// Port ranges (a single port is `lo == hi`); `None` = every port.
    pub ports: Option<Vec<PortRange>>,
    /// The mark value (inside `mask`, never 0).
    pub mark: u32,
    /// The bits of the mark this service writes.
    pub mask: u32,
}

/// A transport protocol fwmark can classify by port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
}

impl Proto {
    /// IANA protocol number.
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => fwmark_common::IPPROTO_TCP,
            Proto::Udp => fwmark_common::IPPROTO_UDP,
            Proto::Sctp => fwmark_common::IPPROTO_SCTP,
        }
    }

    /// Lower-case name as in the config and in iptables.
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Sctp => "sctp",
        }
    }

    /// The protocol of IANA number `n`, if fwmark classifies it by port.
    pub fn from_number(n: u8) -> Option<Proto> {
        [Proto::Tcp, Proto::Udp, Proto::Sctp]
            .into_iter()
            .find(|p| p.number() == n)
    }

    /// A protocol by name (`tcp`, `udp`, `sctp`, in any case) or, with
    /// `numbers`, by number (`6`, `17`, `132`): [`crate::text::parse_proto`]
    /// narrowed to the protocols fwmark classifies.
    pub fn parse(word: &str, numbers: bool) -> Option<Proto> {
        crate::text::parse_proto(word, numbers).and_then(Proto::from_number)
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An inclusive port range; a single port has `lo == hi`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    /// Number of ports in the range.
    pub fn len(self) -> usize {
        usize::from(self.hi - self.lo) + 1
    }

    /// Never empty: `lo <= hi` always holds.
    pub fn is_empty(self) -> bool {
        false
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi {
            write!(f, "{}", self.lo)
        } else {
            write!(f, "{}-{}", self.lo, self.hi)
        }
    }
}

/// One problem in a config file, with its place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    /// The key the problem is in (`service[2].ports`), when there is one.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        f.write_str(&self.message)
    }
}

/// Every problem found in a config file; nothing of it may be applied.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        if n > 1 {
            write!(f, "\n{n} problems; nothing was applied")?;
        }
        Ok(())
    }
}

/// Reading the file itself failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read config {path}: {error}{hint}", hint = read_hint(error))]
    Read { path: String, error: std::io::Error },
    // Transparent: with `#[error("{0}")]` the errors would also be the
    // source, and `{:#}` would print every one of them twice.
    #[error(transparent)]
    Invalid(#[from] ConfigErrors),
}

/// What to do about a config that cannot be read.
fn read_hint(error: &std::io::Error) -> &'static str {
    match error.kind() {
        std::io::ErrorKind::NotFound => {
            " (create it from fwmark.example.toml, or pass --config FILE)"
        }
        std::io::ErrorKind::PermissionDenied => {
            " (fwmark reads it as root without CAP_DAC_OVERRIDE when it runs with the documented \
             capabilities, as its systemd unit does: make it readable by its owner root, \
             `chown root FILE && chmod u+r FILE`)"
        }
        std::io::ErrorKind::IsADirectory => " (it is a directory: pass the config file itself)",
        _ => "",
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, LoadError> {
        let display = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|error| LoadError::Read {
            path: display.clone(),
            error,
        })?;
        Ok(Config::parse(&text, &display)?)
    }

    /// Parses and validates config text; `source` names it in messages.
    pub fn parse(text: &str, source: &str) -> Result<Config, ConfigErrors> {
        let lines = LineIndex::new(text);
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map_or((1, 1), |s| lines.position(s.start));
            ConfigErrors(vec![ConfigError {
                file: source.to_string(),
                line,
                column,
                field: None,
                message: e.message().trim_end().to_string(),
            }])
        })?;
        Validator {
            file: source,
            lines: &lines,
            errors: Vec::new(),
        }
        .config(raw)
    }

    /// The config with no service: what is live before the first switch.
    /// (A config file must have a service; this one is never parsed.)
    pub fn empty() -> Config {
        Config {
            source: String::new(),
            services: Vec::new(),
            icmp_errors: false,
        }
    }

    /// Number of services.
    pub fn len(&self) -> usize {
        self.services.len()
    }

    /// True when there is no service.
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }
}

/// Byte offset to 1-based (line, column).
struct LineIndex {
    starts: Vec<usize>,
}

impl LineIndex {
    fn new(text: &str) -> Self {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        LineIndex { starts }
    }

    fn position(&self, offset: usize) -> (usize, usize) {
        let line = self.starts.partition_point(|&s| s <= offset);
        (line, offset - self.starts[line - 1] + 1)
    }
}

// ---- the file as TOML gives it --------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    mask: Option<Spanned<i64>>,
    icmp_errors: Option<Spanned<toml::Value>>,
    #[serde(default)]
    service: Vec<Spanned<RawService>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Option<Spanned<String>>,
    vip: Spanned<OneOrMany>,
    proto: Spanned<OneOrMany>,
    ports: Option<Spanned<Vec<PortItem>>>,
    mark: Spanned<i64>,
    mask: Option<Spanned<i64>>,
}

/// A string or a list of strings.
struct OneOrMany(Vec<String>);

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a list of strings")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![s.to_string()]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<OneOrMany, A::Error> {
                let mut items = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    items.push(s);
                }
                Ok(OneOrMany(items))
            }
        }
        d.deserialize_any(V)
    }
}

/// A port number or a "lo-hi" string.
enum PortItem {
    Number(i64),
    Text(String),
}

impl<'de> Deserialize<'de> for PortItem {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = PortItem;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(r#"a port number or a "lo-hi" range string"#)
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<PortItem, E> {
                Ok(PortItem::Number(n))
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<PortItem, E> {
                Ok(PortItem::Number(i64::try_from(n).unwrap_or(i64::MAX)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<PortItem, E> {
                Ok(PortItem::Text(s.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

// ---- validation -----------------------------------------------------------

struct Validator<'a> {
    file: &'a str,
    lines: &'a LineIndex,
    errors: Vec<ConfigError>,
}

impl Validator<'_> {
    fn error(&mut self, span: std::ops::Range<usize>, field: String, message: String) {
        let (line, column) = self.lines.position(span.start);
        self.errors.push(ConfigError {
            file: self.file.to_string(),
            line,
            column,
            field: Some(field),
            message,
        });
    }

    fn config(mut self, raw: RawConfig) -> Result<Config, ConfigErrors> {
        let default_mask = match raw.mask {
            None => DEFAULT_MASK,
            Some(m) => self.mask(&m, "mask".into()).unwrap_or(DEFAULT_MASK),
        };
        let icmp_errors = match raw.icmp_errors {
            None => false,
            Some(v) => match v.get_ref() {
                toml::Value::Boolean(b) => *b,
                other => {
                    self.error(
                        v.span(),
                        "icmp_errors".into(),
                        format!(
                            "{other} is not a boolean; write `icmp_errors = true` to mark ICMP \
                             errors by the packet they quote, or `false` (the default)"
                        ),
                    );
                    false
                }
            },
        };
        let mut services = Vec::new();
        let mut names: HashMap<String, usize> = HashMap::new();
        for (i, raw_service) in raw.service.into_iter().enumerate() {
            let line = self.lines.position(raw_service.span().start).0;
            if let Some(service) = self.service(i, line, raw_service.into_inner(), default_mask) {
                if let Some(first) = names.insert(service.name.clone(), service.line) {
                    let (l, c) = (service.line, 1);
                    self.errors.push(ConfigError {
                        file: self.file.to_string(),
                        line: l,
                        column: c,
                        field: Some(format!("service[{}].name", i + 1)),
                        message: format!(
                            "name {:?} is already used by the service at line {first}; \
                             give each service its own name",
                            service.name
                        ),
                    });
                }
                services.push(service);
            }
        }
        if services.is_empty() && self.errors.is_empty() {
            self.errors.push(ConfigError {
                file: self.file.to_string(),
                line: 1,
                column: 1,
                field: None,
                message: "no [[service]] defined; add at least one (see fwmark.example.toml)"
                    .into(),
            });
        }
        if self.errors.is_empty() {
            Ok(Config {
                source: self.file.to_string(),
                services,
                icmp_errors,
            })
        } else {
            Err(ConfigErrors(self.errors))
        }
    }

    fn mask(&mut self, m: &Spanned<i64>, field: String) -> Option<u32> {
        match u32::try_from(*m.get_ref()) {
            Ok(0) => {
                self.error(
                    m.span(),
                    field,
                    "mask 0 owns no bit of the mark; use 0xffffffff for the whole mark".into(),
                );
                None
            }
            Ok(v) => Some(v),
            Err(_) => {
                self.error(
                    m.span(),
                    field,
                    format!("{} is not a 32-bit mask (0x1..=0xffffffff)", m.get_ref()),
                );
                None
            }
        }
    }

    fn service(
        &mut self,
        index: usize,
        line: usize,
        raw: RawService,
        default_mask: u32,
    ) -> Option<Service> {
        let field = |name: &str| format!("service[{}].{name}", index + 1);
        let errors_before = self.errors.len();

        let name = match &raw.name {
            Some(n) if n.get_ref().trim().is_empty() => {
                self.error(
                    n.span(),
                    field("name"),
                    "name is empty; omit it or give a label".into(),
                );
                String::new()
            }
            Some(n) if n.get_ref().chars().any(char::is_control) => {
                self.error(
                    n.span(),
                    field("name"),
                    "name contains control characters (such as a newline); use printable text"
                        .into(),
                );
                String::new()
            }
            Some(n) => n.get_ref().clone(),
            None => format!("service{}", index + 1),
        };

        let mut vips = Vec::with_capacity(raw.vip.get_ref().0.len());
        if raw.vip.get_ref().0.is_empty() {
            self.error(raw.vip.span(), field("vip"), "vip list is empty".into());
        }
        // Repeats are dropped, the first kept in place: a set, not a scan
        // of the list per address (a service may list thousands).
        let mut seen =
            foldhash::HashSet::with_capacity_and_hasher(vips.capacity(), Default::default());
        for text in &raw.vip.get_ref().0 {
            match parse_vip(text) {
                Ok(net) if seen.insert(net) => vips.push(net),
                Ok(_) => {}
                Err(message) => self.error(raw.vip.span(), field("vip"), message),
            }
        }

        let mut protos = Vec::new();
        if raw.proto.get_ref().0.is_empty() {
            self.error(
                raw.proto.span(),
                field("proto"),
                "proto list is empty".into(),
            );
        }
        for text in &raw.proto.get_ref().0 {
            match Proto::parse(text, false) {
                Some(p) if !protos.contains(&p) => protos.push(p),
                Some(_) => {}
                None => self.error(
                    raw.proto.span(),
                    field("proto"),
                    format!("unknown protocol {text:?}; use \"tcp\", \"udp\" or \"sctp\""),
                ),
            }
        }

        let ports = raw.ports.as_ref().map(|ports| {
            if ports.get_ref().is_empty() {
                self.error(
                    ports.span(),
                    field("ports"),
                    "ports is empty; omit `ports` to match every port".into(),
                );
            }
            let mut ranges: Vec<PortRange> = Vec::new();
            for item in ports.get_ref() {
                match parse_port_item(item) {
                    Ok(r) => ranges.push(r),
                    Err(message) => self.error(ports.span(), field("ports"), message),
                }
            }
            ranges.sort();
            ranges.dedup();
            ranges
        });

        let mask = match &raw.mask {
            Some(m) => self.mask(m, field("mask")).unwrap_or(default_mask),
            None => default_mask,
        };
        let mark = match u32::try_from(*raw.mark.get_ref()) {
            // With a partial mask, 0 clears the masked bits: that is useful.
            Ok(0) if mask == u32::MAX => {
                self.error(
                    raw.mark.span(),
                    field("mark"),
                    "mark 0 means \"no mark\" to IPVS; use 1..=0xffffffff (0 is allowed only \
                     with a mask, to clear those bits)"
                        .into(),
                );
                0
            }
            Ok(v) if v & !mask != 0 => {
                self.error(
                    raw.mark.span(),
                    field("mark"),
                    format!(
                        "mark {v:#x} has bits outside the mask {mask:#x}; \
                         fwmark writes only the masked bits, so widen the mask or change the mark"
                    ),
                );
                v
            }
            Ok(v) => v,
            Err(_) => {
                self.error(
                    raw.mark.span(),
                    field("mark"),
                    format!(
                        "{} is not a 32-bit mark (1..=0xffffffff)",
                        raw.mark.get_ref()
                    ),
                );
                0
            }
        };

        (self.errors.len() == errors_before).then_some(Service {
            name,
            line,
            vips,
            protos,
            ports,
            mark,
            mask,
        })
    }
}

/// "192.0.2.10", "2001:db8::10", "192.0.2.0/24". A prefix must have its host
/// bits clear, so a typo does not silently widen or narrow a service.
fn parse_vip(text: &str) -> Result<IpNet, String> {
    let text = text.trim();
    if text.contains('/') {
        let net: IpNet = text
            .parse()
            .map_err(|_| format!("{text:?} is not an IPv4/IPv6 address or CIDR prefix"))?;
        if net.addr() != net.network() {
            return Err(format!(
                "{text:?} has host bits set; did you mean \"{}\" (the prefix) or \"{}\" (one address)?",
                net.trunc(),
                net.addr()
            ));
        }
        Ok(net)
    } else {
        let addr: IpAddr = text
            .parse()
            .map_err(|_| format!("{text:?} is not an IPv4/IPv6 address or CIDR prefix"))?;
        Ok(IpNet::from(addr))
    }
}

fn parse_port_item(item: &PortItem) -> Result<PortRange, String> {
    /// `within`: the range text the port came from, for the message.
    fn port(n: i64, within: Option<&str>) -> Result<u16, String> {
        let place = within.map(|t| format!(" in {t:?}")).unwrap_or_default();
        match u16::try_from(n) {
            Ok(0) => Err(format!(
                "port 0{place} is not a port; omit `ports` to match every port"
            )),
            Ok(p) => Ok(p),
            Err(_) => Err(format!("port {n}{place} is outside 1..=65535")),
        }
    }
    match item {
        PortItem::Number(n) => port(*n, None).map(|p| PortRange { lo: p, hi: p }),
        PortItem::Text(text) => {
            let parse = |s: &str| -> Result<i64, String> {
                s.trim().parse::<i64>().map_err(|_| {
                    format!("{text:?} is not a port or a \"lo-hi\" range (e.g. \"10000-20000\")")
                })
            };
            let (lo, hi) = match text.trim().split_once('-') {
                Some((a, b)) => (parse(a)?, parse(b)?),
                None => {
                    let p = parse(text)?;
                    (p, p)
                }
            };
            let (lo, hi) = (port(lo, Some(text))?, port(hi, Some(text))?);
            if lo > hi {
                return Err(format!("range {text:?} is reversed; write \"{hi}-{lo}\""));
            }
            Ok(PortRange { lo, hi })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigErrors> {
        Config::parse(text, "test.toml")
    }

    #[test]
    fn a_load_error_says_each_problem_once_through_its_causes() {
        // What `{:#}` prints at the command edge: the error, then each source.
        let error = LoadError::from(parse("x = 1\n").expect_err("unknown field"));
        let mut text = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            text = format!("{text}: {cause}");
            source = cause.source();
        }
        assert_eq!(text.matches("unknown field `x`").count(), 1, "{text}");
    }

    fn one_error(text: &str) -> ConfigError {
        let errs = parse(text).expect_err("config should be rejected").0;
        assert_eq!(errs.len(), 1, "expected one error, got {errs:?}");
        errs.into_iter().next().unwrap()
    }

    #[test]
    fn parses_a_full_service() {
        let c = parse(
            r#"
mask = 0xffff
[[service]]
name = "web"
vip = ["192.0.2.10", "2001:db8::/64"]
proto = ["tcp", "UDP"]
ports = [443, 80, "10000-20000", 80]
mark = 0x50
"#,
        )
        .unwrap();
        assert_eq!(c.services.len(), 1);
        let s = &c.services[0];
        assert_eq!(s.name, "web");
        assert_eq!(s.line, 3);
        assert_eq!(s.mark, 80);
        assert_eq!(s.mask, 0xffff);
        assert_eq!(s.protos, vec![Proto::Tcp, Proto::Udp]);
        assert_eq!(
            s.vips,
            vec![
                "192.0.2.10/32".parse::<IpNet>().unwrap(),
                "2001:db8::/64".parse().unwrap()
            ]
        );
        assert_eq!(
            s.ports,
            Some(vec![
                PortRange { lo: 80, hi: 80 },
                PortRange { lo: 443, hi: 443 },
                PortRange {
                    lo: 10000,
                    hi: 20000
                }
            ])
        );
    }

    #[test]
    fn defaults_name_mask_and_all_ports() {
        let c = parse("[[service]]\nvip = \"192.0.2.1\"\nproto = \"sctp\"\nmark = 7\n").unwrap();
        let s = &c.services[0];
        assert_eq!(s.name, "service1");
        assert_eq!(s.mask, DEFAULT_MASK);
        assert_eq!(s.ports, None);
    }

    #[test]
    fn rejects_bad_address_with_line_and_field() {
        let e = one_error(
            "[[service]]\nvip = \"192.0.2.300\"\nproto = \"tcp\"\nports = [80]\nmark = 80\n",
        );
        assert_eq!((e.line, e.field.as_deref()), (2, Some("service[1].vip")));
        assert!(e.message.contains("192.0.2.300"), "{e}");
        assert!(e.to_string().starts_with("test.toml:2:"), "{e}");
    }

    #[test]
    fn rejects_bad_prefix_and_host_bits() {
        let e = one_error("[[service]]\nvip = \"192.0.2.0/33\"\nproto = \"tcp\"\nmark = 1\n");
        assert!(e.message.contains("CIDR"), "{e}");
        let e = one_error("[[service]]\nvip = \"192.0.2.10/24\"\nproto = \"tcp\"\nmark = 1\n");
        assert!(e.message.contains("192.0.2.0/24"), "{e}");
    }

    #[test]
    fn rejects_port_zero_and_too_large() {
        let e =
            one_error("[[service]]\nvip = \"192.0.2.1\"\nproto = \"tcp\"\nports = [0]\nmark = 1\n");
        assert_eq!((e.line, e.field.as_deref()), (4, Some("service[1].ports")));
        assert!(e.message.contains("port 0"), "{e}");
        let e = one_error(
            "[[service]]\nvip = \"192.0.2.1\"\nproto = \"tcp\"\nports = [65536]\nmark = 1\n",
        );
        assert!(e.message.contains("65536"), "{e}");
        let e = one_error(
            "[[service]]\nvip = \"192.0.2.1\"\nproto = \"tcp\"\nports = [\"1-70000\"]\nmark = 1\n",
        );
        assert!(e.message.contains("70000"), "{e}");
    }

    #[test]
    fn rejects_reversed_and_garbled_ranges() {
        let e = one_error(
            "[[service]]\nvip = \"192.0.2.1\"\nproto = \"tcp\"\nports = [\"20000-10000\"]\nmark = 1\n",
        );
        assert!(e.message.contains("reversed"), "{e}");
        let e = one_error(
            "[[service]]\nvip = \"192.0.2.1\"\nproto = \"tcp\"\nports = [\"80:90\"]\nmark = 1\n",
        );
        assert!(e.message.contains("lo-hi"), "{e}");
    }

    #[test]
    fn rejects_mark_zero_and_out_of_range() {
        let e = one_error("[[service]]\nvip = \"192.0.2.1\"\nproto = \"tcp\"\nmark = 0\n");
        assert_eq!((e.line, e.field.as_deref()), (4, Some("service[1].mark")));
        let e =
            one_error("[[service]]\nvip = \"192.0.2.1\"\nproto = \"tcp\"\nmark = 0x100000000\n");
        assert!(e.message.contains("32-bit"), "{e}");
    }

    #[test]
    fn mark_zero_clears_bits_under_a_mask() {
        let c =
            parse("[[service]]\nvip = \"192.0.2.1\"\nproto = \"tcp\"\nmark = 0\nmask = 0xff00\n")
                .unwrap();
        assert_eq!((c.services[0].mark, c.services[0].mask), (0, 0xff00));
    }

    #[test]
    fn rejects_mark_outside_mask() {
        let e = one_error(
            "mask = 0xff\n[[service]]\nvip = \"192.0.2.1\"\nproto = \"tcp\"\nmark = 0x100\n",
        );
        assert!(e.message.contains("outside the mask 0xff"), "{e}");
        let e = one_error(
            "[[service]]\nvip = \"192.0.2.1\"\nproto = \"tcp\"\nmark = 0x4001\nmask = 0x4000\n",
        );
        assert!(e.message.contains("outside the mask 0x4000"), "{e}");
        let e =
            one_error("mask = 0\n[[service]]\nvip = \"192.0.2.1\"\nproto = \"tcp\"\nmark = 1\n");
        assert_eq!(e.field.as_deref(), Some("mask"));
    }

    #[test]
    fn icmp_errors_is_a_top_level_boolean_default_off() {
        let svc = "[[service]]\nvip = \"192.0.2.1\"\nproto = \"tcp\"\nmark = 1\n";
        assert!(!parse(svc).unwrap().icmp_errors);
        assert!(
            parse(&format!("icmp_errors = true\n{svc}"))
                .unwrap()
                .icmp_errors
        );
        assert!(
            !parse(&format!("icmp_errors = false\n{svc}"))
                .unwrap()
                .icmp_errors
        );
        let e = one_error(&format!("mask = 0xff\nicmp_errors = \"yes\"\n{svc}"));
        assert_eq!((e.line, e.column), (2, 15), "{e}");
        assert_eq!(e.field.as_deref(), Some("icmp_errors"));
        assert!(e.message.contains("icmp_errors = true"), "{e}");
        assert!(
            e.to_string().starts_with("test.toml:2:15: icmp_errors: "),
            "{e}"
        );
        // Not a per-service key.
        let e = one_error(&format!("{svc}icmp_errors = true\n"));
        assert!(e.message.contains("icmp_errors"), "{e}");
    }

    #[test]
    fn rejects_unknown_protocol_and_key() {
        let e = one_error("[[service]]\nvip = \"192.0.2.1\"\nproto = \"icmp\"\nmark = 1\n");
        assert!(e.message.contains("icmp"), "{e}");
        let e =
            one_error("[[service]]\nvip = \"192.0.2.1\"\nproto = \"tcp\"\nmark = 1\nport = 80\n");
        assert_eq!(e.line, 5);
        assert!(e.message.contains("unknown field `port`"), "{e}");
        let e =
            one_error("bogus = 1\n[[service]]\nvip = \"192.0.2.1\"\nproto = \"tcp\"\nmark = 1\n");
        assert_eq!(e.line, 1);
    }

    #[test]
    fn rejects_missing_fields_and_empty_config() {
        let e = one_error("[[service]]\nvip = \"192.0.2.1\"\nproto = \"tcp\"\n");
        assert!(e.message.contains("mark"), "{e}");
        let e = one_error("# nothing\n");
        assert!(e.message.contains("no [[service]]"), "{e}");
        let e = one_error("[[service]]\nvip = []\nproto = \"tcp\"\nmark = 1\n");
        assert!(e.message.contains("empty"), "{e}");
    }

    #[test]
    fn rejects_control_characters_in_names() {
        let e = one_error(
            "[[service]]\nname = \"a\\nb\"\nvip = \"192.0.2.1\"\nproto = \"tcp\"\nmark = 1\n",
        );
        assert!(e.message.contains("control characters"), "{e}");
    }

    #[test]
    fn rejects_duplicate_names() {
        let e = one_error(
            "[[service]]\nname = \"a\"\nvip = \"192.0.2.1\"\nproto = \"tcp\"\nmark = 1\n\
             [[service]]\nname = \"a\"\nvip = \"192.0.2.2\"\nproto = \"tcp\"\nmark = 2\n",
        );
        assert_eq!(e.line, 6);
        assert!(e.message.contains("line 1"), "{e}");
    }

    #[test]
    fn reports_every_problem_at_once() {
        let errs = parse(
            "[[service]]\nvip = \"nope\"\nproto = \"tcp\"\nmark = 0\n\
             [[service]]\nvip = \"192.0.2.1\"\nproto = \"gre\"\nmark = 1\n",
        )
        .unwrap_err();
        assert_eq!(errs.0.len(), 3, "{errs}");
        assert!(
            errs.to_string()
                .ends_with("3 problems; nothing was applied")
        );
    }
}
