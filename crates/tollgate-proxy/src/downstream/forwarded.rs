//! The client's address behind load balancers (`trusted_proxies:`). Only a peer in
//! `trusted_proxies` is believed about whom it forwards for: its PROXY protocol header
//! ([`super::proxy_protocol`], read by the listener) or its `X-Forwarded-For`, walked
//! from the right, each trusted hop naming the one before it, to the first hop that is
//! not trusted: the client. Anyone else's headers are ignored (a client could write
//! any address there), so that every limit keyed on an address (requests per second,
//! connections and sessions per peer, `per: client` and anonymous `per: session` rate
//! limits) counts the client, not the balancer, and cannot be dodged by a client.

use std::net::IpAddr;
use std::sync::Arc;

use axum::http::HeaderMap;

/// The most `X-Forwarded-For` hops looked at: no chain of proxies is longer, and a
/// header stuffed with thousands costs no more than this.
const MAX_HOPS: usize = 32;

/// `trusted_proxies:`, the networks whose word on a client's address is taken.
#[derive(Debug, Clone, Default)]
pub struct Trusted(Arc<[ipnet::IpNet]>);

impl Trusted {
    /// The networks of `trusted_proxies:`.
    pub fn new(nets: &[ipnet::IpNet]) -> Trusted {
        Trusted(nets.into())
    }

    /// Whether no proxy is trusted (then no header is ever read).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether `ip` is a trusted proxy (an IPv4-mapped IPv6 address as its IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The client of a request that came from `peer`: `peer` itself unless it is
    /// trusted; else the rightmost `X-Forwarded-For` hop that is not trusted. When
    /// every hop is trusted, the leftmost; when a hop is not an address (`unknown`,
    /// garbage), the trusted hop after it, which is the last one known for sure.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if self.is_empty() || !self.contains(peer) {
            return peer;
        }
        let mut client = peer;
        let lines = headers.get_all("x-forwarded-for").iter().rev();
        let mut hops = 0;
        for line in lines {
            let Ok(line) = line.to_str() else {
                return client;
            };
            for hop in line.rsplit(',') {
                hops += 1;
                if hops > MAX_HOPS {
                    return client;
                }
                let Some(ip) = hop_address(hop) else {
                    return client;
                };
                client = ip;
                if !self.contains(ip) {
                    return ip;
                }
            }
        }
        client
    }
}

/// One `X-Forwarded-For` hop: `192.0.2.1`, `192.0.2.1:443`, `2001:db8::1`,
/// `[2001:db8::1]` or `[2001:db8::1]:443`, with spaces around; nothing else.
fn hop_address(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim_matches([' ', '\t']);
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    let (host, port) = match hop.strip_prefix('[') {
        Some(rest) => {
            let (host, after) = rest.split_once(']')?;
            let port = match after {
                "" => None,
                after => Some(after.strip_prefix(':')?),
            };
            (
                host.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6)?,
                port,
            )
        }
        None => {
            let (host, port) = hop.split_once(':')?;
            (
                host.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)?,
                Some(port),
            )
        }
    };
    let port_ok = port.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 5
            && p.bytes().all(|b| b.is_ascii_digit())
            && p.parse::<u16>().is_ok()
    });
    port_ok.then(|| host.to_canonical())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use axum::http::HeaderValue;

    fn trusted(nets: &[&str]) -> Trusted {
        let nets: Vec<ipnet::IpNet> = nets.iter().map(|n| n.parse().unwrap()).collect();
        Trusted::new(&nets)
    }

    fn headers(lines: &[&[u8]]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for line in lines {
            headers.append("x-forwarded-for", HeaderValue::from_bytes(line).unwrap());
        }
        headers
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn takes_the_rightmost_hop_that_is_not_a_trusted_proxy() {
        let t = trusted(&["10.0.0.0/8", "192.168.1.1/32"]);
        let lb = ip("10.0.0.2");
        // The client wrote a forged first hop; the balancers appended what they saw.
        let h = headers(&[b"6.6.6.6, 203.0.113.9, 192.168.1.1"]);
        assert_eq!(t.client(lb, &h), ip("203.0.113.9"));
        // Several header lines read as one list, in order.
        let h = headers(&[b"6.6.6.6", b"203.0.113.9", b"10.1.1.1"]);
        assert_eq!(t.client(lb, &h), ip("203.0.113.9"));
        // No header: the peer itself.
        assert_eq!(t.client(lb, &HeaderMap::new()), lb);
        // Every hop trusted: the leftmost.
        let h = headers(&[b"10.9.9.9, 10.8.8.8"]);
        assert_eq!(t.client(lb, &h), ip("10.9.9.9"));
    }

    #[test]
    fn an_untrusted_peer_is_its_own_client_whatever_it_says() {
        let t = trusted(&["10.0.0.0/8"]);
        let h = headers(&[b"203.0.113.9"]);
        assert_eq!(t.client(ip("198.51.100.7"), &h), ip("198.51.100.7"));
        // No trusted proxies at all: headers are never read.
        assert_eq!(
            Trusted::default().client(ip("10.0.0.2"), &h),
            ip("10.0.0.2")
        );
    }

    #[test]
    fn a_malformed_hop_stops_the_walk_at_the_last_trusted_one() {
        let t = trusted(&["10.0.0.0/8"]);
        let lb = ip("10.0.0.2");
        for bad in [
            &b"203.0.113.9, unknown"[..],
            b"203.0.113.9, ",
            b"203.0.113.9,,10.0.0.3",
            b"203.0.113.9, 1.2.3",
            b"203.0.113.9, 1.2.3.4:",
            b"203.0.113.9, 1.2.3.4:99999",
            b"203.0.113.9, 1.2.3.4:80x",
            b"203.0.113.9, [::1",
            b"203.0.113.9, [::1]x",
            b"203.0.113.9, [1.2.3.4]",
            b"203.0.113.9, ::1:80:zz",
            b"203.0.113.9, \xff\xfe",
        ] {
            let h = headers(&[bad]);
            let got = t.client(lb, &h);
            assert!(
                got == lb || got == ip("10.0.0.3"),
                "{:?} gave {got}",
                String::from_utf8_lossy(bad)
            );
            assert_ne!(got, ip("203.0.113.9"), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn reads_ipv6_and_ports_and_mapped_addresses() {
        let t = trusted(&["10.0.0.0/8", "fd00::/8"]);
        let cases = [
            ("2001:db8::1", "2001:db8::1"),
            ("[2001:db8::1]", "2001:db8::1"),
            ("[2001:db8::1]:4711", "2001:db8::1"),
            ("203.0.113.9:4711", "203.0.113.9"),
            (" \t203.0.113.9 ", "203.0.113.9"),
            ("::ffff:203.0.113.9", "203.0.113.9"),
            ("2001:db8::1, fd00::5, [fd00::6]:80", "2001:db8::1"),
        ];
        for (line, want) in cases {
            let h = headers(&[line.as_bytes()]);
            assert_eq!(t.client(ip("fd00::1"), &h), ip(want), "{line}");
        }
        // A trusted peer seen as an IPv4-mapped IPv6 address.
        let h = headers(&[b"203.0.113.9"]);
        assert_eq!(t.client(ip("::ffff:10.0.0.2"), &h), ip("203.0.113.9"));
    }

    #[test]
    fn a_long_chain_of_trusted_hops_is_cut_short() {
        let t = trusted(&["10.0.0.0/8"]);
        let mut line = String::from("203.0.113.9");
        for _ in 0..100 {
            line.push_str(", 10.0.0.9");
        }
        let h = headers(&[line.as_bytes()]);
        assert_eq!(t.client(ip("10.0.0.2"), &h), ip("10.0.0.9"));
    }
}
