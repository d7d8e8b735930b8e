//! The PROXY protocol (v1 text and v2 binary, as HAProxy specifies them) on
//! the client listener, free of I/O: which peers are trusted load balancers
//! ([`Cidr`], [`trusted`]), and what the header such a peer must send before
//! its first frame says ([`parse_header`]).
//!
//! A header is checked the way frames are: `Ok(None)` asks for more bytes,
//! a complete one reports its length (the bytes after it are the start of
//! the frame stream) and the client's address, and anything else is an
//! error. The bytes a connection may hold while its header is incomplete
//! are bounded by [`MAX_HEADER_LEN`]. The parsing itself is the `ppp`
//! crate's.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use ppp::PartialResult;
use serde::{Deserialize, Serialize};

/// Longest v1 header, CRLF included (the specification's limit).
pub(crate) const MAX_V1_LEN: usize = 107;
/// Fixed part of a v2 header: signature, version and command, family and
/// protocol, length.
const V2_FIXED_LEN: usize = 16;
/// Longest v2 header accepted: the fixed part, the largest (AF_UNIX)
/// addresses and room for the TLVs balancers send (AWS adds a VPC
/// endpoint id, HAProxy may add a few short ones).
pub(crate) const MAX_V2_LEN: usize = 536;
/// Most bytes a connection holds while its header is incomplete.
pub(crate) const MAX_HEADER_LEN: usize = MAX_V2_LEN;

/// An IPv4 or IPv6 network: an address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Cidr {
    /// The network address (host bits cleared).
    addr: IpAddr,
    prefix: u8,
}

/// A string that is neither an IP address nor a CIDR.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an IP address or CIDR (e.g. 10.0.0.0/8, 127.0.0.1, ::1/128)")]
pub struct CidrError(String);

impl Cidr {
    /// Whether `ip` lies in this network (an IPv4 network never holds an
    /// IPv6 address, nor the other way round).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(ip) & mask == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(ip) & mask == u128::from(net)
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    /// `ADDR/PREFIX`, or a bare address (a /32 or /128). Host bits are
    /// cleared: `10.1.2.3/8` is `10.0.0.0/8`.
    fn from_str(s: &str) -> Result<Cidr, CidrError> {
        let bad = || CidrError(s.to_string());
        let t = s.trim();
        let (addr, prefix) = match t.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (t, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
                p.parse::<u8>().map_err(|_| bad())?
            }
            Some(_) => return Err(bad()),
            None => max,
        };
        if prefix > max {
            return Err(bad());
        }
        let addr = match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                IpAddr::from((u32::from(a) & mask).to_be_bytes())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                IpAddr::from((u128::from(a) & mask).to_be_bytes())
            }
        };
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl TryFrom<String> for Cidr {
    type Error = CidrError;

    fn try_from(s: String) -> Result<Cidr, CidrError> {
        s.parse()
    }
}

impl From<Cidr> for String {
    fn from(c: Cidr) -> String {
        c.to_string()
    }
}

/// Whether a connection from `peer` must start with a PROXY header. An
/// IPv4 peer on a dual-stack listener (`::ffff:10.0.0.1`) matches IPv4
/// networks too.
pub(crate) fn trusted(from: &[Cidr], peer: IpAddr) -> bool {
    let canonical = peer.to_canonical();
    from.iter()
        .any(|c| c.contains(peer) || c.contains(canonical))
}

/// A complete PROXY header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    /// Its length: the frame stream starts after it.
    pub len: usize,
    /// The client's address, or `None` where the connection is the
    /// balancer's own (v1 `UNKNOWN`, v2 `LOCAL` such as a health check, or
    /// an AF_UNIX or unspecified source): then its socket address stands.
    pub source: Option<SocketAddr>,
}

/// A header that cannot be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HeaderError {
    /// Longer than the specification (v1) or this server (v2) allows.
    #[error("PROXY header longer than {0} bytes")]
    TooLong(usize),
    /// Not a PROXY header, or a broken one.
    #[error("malformed PROXY header: {0}")]
    Malformed(String),
}

/// Checks for a PROXY header at the start of `buf`, v2 if `buf` starts
/// like the v2 signature and v1 otherwise: `Ok(None)` if more bytes are
/// needed (never once `buf` holds [`MAX_HEADER_LEN`] bytes).
pub(crate) fn parse_header(buf: &[u8]) -> Result<Option<Header>, HeaderError> {
    let signature = ppp::v2::PROTOCOL_PREFIX;
    let n = buf.len().min(signature.len());
    let header = if buf[..n] == signature[..n] {
        parse_v2(buf)?
    } else {
        parse_v1(buf)?
    };
    match header {
        None if buf.len() >= MAX_HEADER_LEN => Err(HeaderError::TooLong(MAX_HEADER_LEN)),
        header => Ok(header),
    }
}

fn parse_v1(buf: &[u8]) -> Result<Option<Header>, HeaderError> {
    use ppp::v1::{Addresses, BinaryParseError, ParseError};
    // A header has no other line feed than its last byte.
    let line_over = buf[..buf.len().min(MAX_V1_LEN)].contains(&b'\n');
    // `ppp` takes a line cut right after a separator for one with an
    // empty last field; judge it without that separator.
    let judged = match buf.split_last() {
        Some((b' ', head)) if !line_over => head,
        _ => buf,
    };
    let result = ppp::v1::Header::try_from(judged);
    if result.is_incomplete() {
        if line_over {
            // It lacks something, and will not get it.
            return Err(HeaderError::Malformed("incomplete line".into()));
        }
        return Ok(None);
    }
    match result {
        Ok(h) => {
            let source = match h.addresses {
                Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                Addresses::Unknown => None,
            };
            Ok(Some(Header {
                len: h.header.len(),
                source,
            }))
        }
        Err(BinaryParseError::Parse(ParseError::HeaderTooLong)) => {
            Err(HeaderError::TooLong(MAX_V1_LEN))
        }
        Err(e) => Err(HeaderError::Malformed(e.to_string())),
    }
}

fn parse_v2(buf: &[u8]) -> Result<Option<Header>, HeaderError> {
    use ppp::v2::{Addresses, Command};
    // Refuse an oversized length from the fixed part, before waiting for
    // (and holding) the bytes it announces.
    if buf.len() >= V2_FIXED_LEN {
        let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
        if V2_FIXED_LEN + len > MAX_V2_LEN {
            return Err(HeaderError::TooLong(MAX_V2_LEN));
        }
    }
    let result = ppp::v2::Header::try_from(buf);
    if result.is_incomplete() {
        return Ok(None);
    }
    let h = result.map_err(|e| HeaderError::Malformed(e.to_string()))?;
    // TLVs (after the addresses, within the length) are skipped.
    let source = match (h.command, h.addresses) {
        (Command::Local, _) => None,
        (Command::Proxy, Addresses::IPv4(a)) => {
            Some(SocketAddr::from((a.source_address, a.source_port)))
        }
        (Command::Proxy, Addresses::IPv6(a)) => {
            Some(SocketAddr::from((a.source_address, a.source_port)))
        }
        (Command::Proxy, Addresses::Unix(_) | Addresses::Unspecified) => None,
    };
    Ok(Some(Header {
        len: h.len(),
        source,
    }))
}

/// Lets a warning through at most once per `every` seconds and counts the
/// ones held back, so that a misconfigured balancer (one that sends no
/// header at all) cannot flood the log with a line per connection.
#[derive(Debug)]
pub(crate) struct WarnGate {
    every: u32,
    next_at: u32,
    held_back: u64,
}

impl WarnGate {
    pub fn new(every: u32) -> WarnGate {
        WarnGate {
            every,
            next_at: 0,
            held_back: 0,
        }
    }

    /// At second `now`: `Some(n)` if a warning may be logged, `n` being
    /// how many were held back since the last one; `None` to hold this
    /// one back.
    pub fn pass(&mut self, now: u32) -> Option<u64> {
        if now < self.next_at {
            self.held_back += 1;
            return None;
        }
        self.next_at = now.saturating_add(self.every);
        Some(std::mem::take(&mut self.held_back))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// A v2 header: `command` 0 (LOCAL) or 1 (PROXY), `family` 0x1_ (IPv4),
    /// 0x2_ (IPv6), 0x3_ (AF_UNIX) or 0x0_, then `body` (addresses and
    /// TLVs).
    fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut h = ppp::v2::PROTOCOL_PREFIX.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&(body.len() as u16).to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    fn v2_tcp4(src: [u8; 4], sport: u16, tlvs: &[u8]) -> Vec<u8> {
        let mut body = src.to_vec();
        body.extend_from_slice(&[10, 0, 0, 1]);
        body.extend_from_slice(&sport.to_be_bytes());
        body.extend_from_slice(&7000u16.to_be_bytes());
        body.extend_from_slice(tlvs);
        v2(1, 0x11, &body)
    }

    fn done(len: usize, source: Option<&str>) -> Result<Option<Header>, HeaderError> {
        Ok(Some(Header {
            len,
            source: source.map(|s| s.parse().unwrap()),
        }))
    }

    /// Every proper prefix of `header` asks for more; the whole parses to
    /// `expected`.
    fn assert_split(header: &[u8], expected: Result<Option<Header>, HeaderError>) {
        for cut in 0..header.len() {
            assert_eq!(
                parse_header(&header[..cut]),
                Ok(None),
                "prefix of {cut} bytes"
            );
        }
        assert_eq!(parse_header(header), expected);
    }

    #[test]
    fn cidrs_parse_bare_addresses_and_clear_host_bits() {
        assert_eq!(cidr("10.0.0.0/8").to_string(), "10.0.0.0/8");
        assert_eq!(cidr(" 10.1.2.3/8 ").to_string(), "10.0.0.0/8");
        assert_eq!(cidr("127.0.0.1").to_string(), "127.0.0.1/32");
        assert_eq!(cidr("::1").to_string(), "::1/128");
        assert_eq!(cidr("fd00::1/8").to_string(), "fd00::/8");
        assert_eq!(cidr("0.0.0.0/0").to_string(), "0.0.0.0/0");
        for bad in [
            "",
            "10.0.0.0/",
            "10.0.0.0/33",
            "::/129",
            "10.0.0/8",
            "10.0.0.0/+8",
            "host",
            "10.0.0.0/8/8",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn cidrs_contain_their_addresses_only() {
        let net = cidr("10.0.0.0/8");
        assert!(net.contains(ip("10.0.0.0")));
        assert!(net.contains(ip("10.255.255.255")));
        assert!(!net.contains(ip("11.0.0.0")));
        assert!(!net.contains(ip("::ffff:10.0.0.1")), "families differ");
        assert!(cidr("0.0.0.0/0").contains(ip("203.0.113.9")));
        assert!(!cidr("0.0.0.0/0").contains(ip("::1")));
        assert!(cidr("127.0.0.1").contains(ip("127.0.0.1")));
        assert!(!cidr("127.0.0.1").contains(ip("127.0.0.2")));
        assert!(cidr("::1/128").contains(ip("::1")));
        assert!(cidr("fd00::/8").contains(ip("fdab::7")));
        assert!(!cidr("fd00::/8").contains(ip("fe80::1")));
        assert!(cidr("::/0").contains(ip("2001:db8::1")));
    }

    #[test]
    fn trust_matches_any_listed_network_and_mapped_ipv4() {
        let from = [cidr("10.0.0.0/8"), cidr("::1")];
        assert!(trusted(&from, ip("10.9.8.7")));
        assert!(trusted(&from, ip("::ffff:10.9.8.7")));
        assert!(trusted(&from, ip("::1")));
        assert!(!trusted(&from, ip("192.0.2.1")));
        assert!(!trusted(&[], ip("10.9.8.7")), "empty list trusts nobody");
    }

    #[test]
    fn v1_tcp4_tcp6_and_unknown() {
        let h = b"PROXY TCP4 192.0.2.7 10.0.0.1 51234 7000\r\n";
        assert_eq!(parse_header(h), done(h.len(), Some("192.0.2.7:51234")));
        let h = b"PROXY TCP6 2001:db8::7 2001:db8::1 51234 7000\r\n";
        assert_eq!(parse_header(h), done(h.len(), Some("[2001:db8::7]:51234")));
        let h = b"PROXY UNKNOWN\r\n";
        assert_eq!(parse_header(h), done(h.len(), None));
        let h = b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n";
        assert_eq!(parse_header(h), done(h.len(), None));
    }

    #[test]
    fn v1_split_anywhere_waits_for_the_rest() {
        let h = b"PROXY TCP4 192.0.2.7 10.0.0.1 51234 7000\r\n";
        assert_split(h, done(h.len(), Some("192.0.2.7:51234")));
        let h = b"PROXY TCP6 2001:db8::7 2001:db8::1 1 2\r\n";
        assert_split(h, done(h.len(), Some("[2001:db8::7]:1")));
        assert_split(b"PROXY UNKNOWN\r\n", done(15, None));
    }

    #[test]
    fn v1_leaves_the_frame_bytes_after_it() {
        let mut buf = b"PROXY TCP4 192.0.2.7 10.0.0.1 51234 7000\r\n".to_vec();
        let len = buf.len();
        // A frame whose body holds CR and LF bytes too.
        buf.extend_from_slice(&[0, 0, 0, 4, b'\r', b'\n', 0xff, b'\n']);
        assert_eq!(parse_header(&buf), done(len, Some("192.0.2.7:51234")));
    }

    #[test]
    fn v1_oversized_and_malformed_are_refused() {
        // 107 bytes and no line end yet.
        let mut long = b"PROXY TCP4 ".to_vec();
        long.resize(MAX_V1_LEN, b'1');
        assert_eq!(parse_header(&long), Err(HeaderError::TooLong(MAX_V1_LEN)));
        assert_eq!(parse_header(&long[..MAX_V1_LEN - 1]), Ok(None));
        // A line end past 107 bytes.
        let mut late = b"PROXY UNKNOWN ".to_vec();
        late.resize(150, b'x');
        late.extend_from_slice(b"\r\n");
        assert_eq!(parse_header(&late), Err(HeaderError::TooLong(MAX_V1_LEN)));
        for bad in [
            &b"PROXY TCP4 192.0.2.7 10.0.0.1 51234\r\n"[..],
            b"PROXY TCP4\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 51234 7000\n",
            b"PROXY TCP4 300.0.2.7 10.0.0.1 51234 7000\r\n",
            b"PROXY TCP4 2001:db8::7 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 99999 7000\r\n",
            b"PROXY UDP4 192.0.2.7 10.0.0.1 1 2\r\n",
            b"proxy TCP4 192.0.2.7 10.0.0.1 1 2\r\n",
        ] {
            assert!(
                matches!(parse_header(bad), Err(HeaderError::Malformed(_))),
                "{:?}: {:?}",
                String::from_utf8_lossy(bad),
                parse_header(bad)
            );
        }
    }

    #[test]
    fn garbage_is_refused_from_its_first_bytes() {
        // A frame sent without a header (length prefix, then Protobuf).
        let frame = [0u8, 0, 0, 12, 0x08, 0x01, 0x52, 0x00];
        assert!(matches!(
            parse_header(&frame),
            Err(HeaderError::Malformed(_))
        ));
        assert!(matches!(
            parse_header(b"GET / HTTP/1.1\r\n"),
            Err(HeaderError::Malformed(_))
        ));
        assert!(matches!(parse_header(b"X"), Err(HeaderError::Malformed(_))));
        assert!(matches!(
            parse_header(&[0xff; 64]),
            Err(HeaderError::Malformed(_))
        ));
        // Whatever it is, a connection never holds more than the maximum.
        let mut almost = ppp::v2::PROTOCOL_PREFIX.to_vec();
        almost.truncate(11);
        assert_eq!(parse_header(&almost), Ok(None));
        assert_eq!(parse_header(b""), Ok(None));
    }

    #[test]
    fn v2_proxy_ipv4_and_ipv6_carry_the_source() {
        let h = v2_tcp4([192, 0, 2, 7], 51234, &[]);
        assert_eq!(parse_header(&h), done(28, Some("192.0.2.7:51234")));
        let mut body = "2001:db8::7"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets()
            .to_vec();
        body.extend_from_slice(
            &"2001:db8::1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets(),
        );
        body.extend_from_slice(&[0xc8, 0x22, 0x1b, 0x58]);
        let h = v2(1, 0x21, &body);
        assert_eq!(parse_header(&h), done(52, Some("[2001:db8::7]:51234")));
    }

    #[test]
    fn v2_local_unix_and_unspecified_keep_the_balancer_address() {
        // A health check: LOCAL, with or without addresses.
        let h = v2(0, 0x00, &[]);
        assert_eq!(parse_header(&h), done(16, None));
        let mut local = v2_tcp4([192, 0, 2, 7], 1, &[]);
        local[12] = 0x20;
        assert_eq!(parse_header(&local), done(28, None));
        let h = v2(1, 0x31, &[0; 216]);
        assert_eq!(parse_header(&h), done(232, None));
        let h = v2(1, 0x00, &[]);
        assert_eq!(parse_header(&h), done(16, None));
    }

    #[test]
    fn v2_tlvs_are_skipped() {
        // PP2_TYPE_AUTHORITY "im.example", PP2_TYPE_NOOP, and an AWS
        // VPC endpoint id (type 0xEA).
        let mut tlvs = vec![0x02, 0, 10];
        tlvs.extend_from_slice(b"im.example");
        tlvs.extend_from_slice(&[0x04, 0, 2, 0, 0]);
        tlvs.extend_from_slice(&[0xEA, 0, 23, 0x01]);
        tlvs.extend_from_slice(b"vpce-0123456789abcdef");
        let h = v2_tcp4([198, 51, 100, 4], 443, &tlvs);
        assert_eq!(parse_header(&h), done(h.len(), Some("198.51.100.4:443")));
        assert_split(&h, done(h.len(), Some("198.51.100.4:443")));
    }

    #[test]
    fn v2_leaves_the_frame_bytes_after_it() {
        let mut buf = v2_tcp4([192, 0, 2, 7], 51234, &[]);
        buf.extend_from_slice(&[0, 0, 0, 2, 0x08, 0x01]);
        assert_eq!(parse_header(&buf), done(28, Some("192.0.2.7:51234")));
    }

    #[test]
    fn v2_oversized_is_refused_from_the_fixed_part() {
        let mut h = v2(1, 0x11, &[0; 12]);
        h[14..16].copy_from_slice(&((MAX_V2_LEN - 16 + 1) as u16).to_be_bytes());
        assert_eq!(
            parse_header(&h[..16]),
            Err(HeaderError::TooLong(MAX_V2_LEN))
        );
        // The largest accepted one.
        let mut tlvs = vec![0x04];
        tlvs.extend_from_slice(&((MAX_V2_LEN - 28 - 3) as u16).to_be_bytes());
        tlvs.resize(MAX_V2_LEN - 28, 0);
        let h = v2_tcp4([192, 0, 2, 7], 1, &tlvs);
        assert_eq!(h.len(), MAX_V2_LEN);
        assert_eq!(parse_header(&h), done(MAX_V2_LEN, Some("192.0.2.7:1")));
        assert_eq!(parse_header(&h[..MAX_V2_LEN - 1]), Ok(None));
    }

    #[test]
    fn v2_malformed_is_refused() {
        let good = v2_tcp4([192, 0, 2, 7], 1, &[]);
        let with = |i: usize, b: u8| {
            let mut h = good.clone();
            h[i] = b;
            h
        };
        for bad in [
            with(12, 0x11),       // version 1
            with(12, 0x22),       // command 2
            with(13, 0x41),       // family 4
            with(13, 0x13),       // protocol 3
            v2(1, 0x11, &[0; 8]), // too short for IPv4 addresses
            with(5, b'X'),        // signature
        ] {
            assert!(
                matches!(parse_header(&bad), Err(HeaderError::Malformed(_))),
                "{bad:?}: {:?}",
                parse_header(&bad)
            );
        }
    }

    #[test]
    fn warnings_pass_once_per_period_and_count_the_rest() {
        let mut gate = WarnGate::new(60);
        assert_eq!(gate.pass(5), Some(0));
        assert_eq!(gate.pass(5), None);
        assert_eq!(gate.pass(64), None);
        assert_eq!(gate.pass(65), Some(2));
        assert_eq!(gate.pass(200), Some(0));
    }
}
