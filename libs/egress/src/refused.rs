//! What no policy reaches: the worker's own network and the control plane's.
//! Loopback, link-local (with the cloud metadata address), the worker's own
//! addresses and the control plane's and NATS's endpoints are refused always;
//! private ranges (RFC 1918, CGNAT, IPv6 unique-local) unless the operator
//! trusts them (`VM0_NETWORK_TRUSTED_CIDRS`).

use std::net::{IpAddr, SocketAddr};

use crate::policy::{Cidr, canonical};

const PRIVATE: &[&str] = &[
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "fc00::/7",
];

#[derive(Debug, Clone, Default)]
pub struct AlwaysRefused {
    /// Ranges the operator trusts (lifts the private-range refusal only).
    pub trusted: Vec<Cidr>,
    /// The worker's own addresses.
    pub own: Vec<IpAddr>,
    /// The control plane's and NATS's endpoints, with what they are.
    pub endpoints: Vec<(SocketAddr, &'static str)>,
}

impl AlwaysRefused {
    /// Why `to` may never be reached, if it may not.
    pub fn check(&self, to: SocketAddr) -> Option<String> {
        let ip = canonical(to.ip());
        if let Some((_, what)) = self
            .endpoints
            .iter()
            .find(|(e, _)| canonical(e.ip()) == ip && e.port() == to.port())
        {
            return Some(format!("always refused: {what}"));
        }
        let class = match ip {
            IpAddr::V4(v4) if v4.is_loopback() => Some("loopback"),
            IpAddr::V6(v6) if v6.is_loopback() => Some("loopback"),
            IpAddr::V4(v4) if v4.is_link_local() => Some("link-local"),
            IpAddr::V6(v6) if v6.is_unicast_link_local() => Some("link-local"),
            IpAddr::V4(v4) if v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast() => {
                Some("not a unicast address")
            }
            IpAddr::V6(v6) if v6.is_unspecified() || v6.is_multicast() => {
                Some("not a unicast address")
            }
            // 0.0.0.0/8 reaches this host on Linux.
            IpAddr::V4(v4) if v4.octets()[0] == 0 => Some("this host"),
            _ => None,
        };
        if let Some(class) = class {
            return Some(format!("always refused: {class}"));
        }
        if self.own.iter().any(|own| canonical(*own) == ip) {
            return Some("always refused: the worker's own address".into());
        }
        let private = PRIVATE
            .iter()
            .filter_map(|c| Cidr::parse(c))
            .any(|c| c.contains(ip));
        if private && !self.trusted.iter().any(|t| t.contains(ip)) {
            return Some(
                "always refused: private address (not in VM0_NETWORK_TRUSTED_CIDRS)".into(),
            );
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    #[test]
    fn the_worker_and_its_neighbours_are_refused() {
        let r = AlwaysRefused {
            trusted: vec![Cidr::parse("10.99.0.0/16").expect("cidr")],
            own: vec![
                "203.0.113.5".parse().expect("ip"),
                "10.99.0.1".parse().expect("ip"),
            ],
            endpoints: vec![(to("198.51.100.7:4222"), "NATS")],
        };
        for (addr, why) in [
            ("127.0.0.1:80", "loopback"),
            ("[::1]:80", "loopback"),
            ("[::ffff:127.0.0.1]:80", "loopback"),
            ("169.254.169.254:80", "link-local"),
            ("0.0.0.0:80", "unicast"),
            ("0.1.2.3:80", "this host"),
            ("224.0.0.1:80", "unicast"),
            ("203.0.113.5:22", "own"),
            ("10.99.0.1:80", "own"),
            ("198.51.100.7:4222", "NATS"),
            ("192.168.1.1:80", "private"),
            ("10.1.0.1:80", "private"),
            ("172.20.0.1:80", "private"),
            ("100.64.0.1:80", "private"),
            ("[fd00::1]:80", "private"),
        ] {
            let got = r
                .check(to(addr))
                .unwrap_or_else(|| panic!("{addr} was not refused"));
            assert!(got.contains(why), "{addr}: {got}");
        }
        for addr in ["198.51.100.7:443", "10.99.0.2:80", "93.184.216.34:443"] {
            assert_eq!(r.check(to(addr)), None, "{addr}");
        }
    }
}
