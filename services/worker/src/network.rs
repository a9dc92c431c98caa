//! The worker's egress proxy, set up from its configuration: what it must never
//! let a run reach (its own addresses, the control plane, NATS) and what the
//! operator trusts.

use std::net::SocketAddr;

use vm0_egress::policy::{Cidr, Policy};
use vm0_egress::refused::AlwaysRefused;
use vm0_egress::{Egress, EgressConfig};
use vm0_proto::worker as pb;

use crate::config::WorkerConfig;

/// `host:port` of a URL (`http://h:9090/x`, `nats://u:p@h:4222`), with its
/// scheme's default port.
fn host_port(url: &str) -> Option<(String, u16)> {
    let (scheme, rest) = url.trim().split_once("://")?;
    let authority = rest.split('/').next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let default = match scheme {
        "http" => 80,
        "https" => 443,
        _ => 4222,
    };
    if let Some(v6) = authority.strip_prefix('[') {
        let (host, port) = v6.split_once(']')?;
        let port = port.strip_prefix(':').and_then(|p| p.parse().ok());
        return Some((host.to_owned(), port.unwrap_or(default)));
    }
    match authority.rsplit_once(':') {
        Some((h, p)) => Some((h.to_owned(), p.parse().ok()?)),
        None => Some((authority.to_owned(), default)),
    }
}

/// The addresses the control plane and NATS are at, as this worker resolves them.
async fn endpoints(config: &WorkerConfig) -> Vec<(SocketAddr, &'static str)> {
    let mut urls: Vec<(&str, &'static str)> =
        vec![(config.control_plane_url.as_str(), "the control plane")];
    urls.extend(config.nats.url.split(',').map(|u| (u, "NATS")));
    let mut out = Vec::new();
    for (url, what) in urls {
        let Some((host, port)) = host_port(url) else {
            continue;
        };
        if let Ok(found) = tokio::net::lookup_host((host.as_str(), port)).await {
            out.extend(found.map(|a| (a, what)));
        }
    }
    out
}

/// The proxy for sandboxes attached as `link`, or why runs on this worker get
/// no network.
pub async fn egress(config: &WorkerConfig, link: vm0_egress::Link) -> Result<Egress, String> {
    let refused = AlwaysRefused {
        trusted: config.network_trusted_cidrs.clone(),
        own: vm0_egress::proxy::host_addresses(),
        endpoints: endpoints(config).await,
    };
    let mut egress = EgressConfig::new(refused, config.network_max_connections);
    egress.tracking = vm0_egress::netns::Tracking {
        per_second: config.network_new_connections_per_sec,
    };
    egress.upstream_tls = Some(
        vm0_egress::intercept::upstream_tls(config.network_tls_ca_pem.as_deref())
            .map_err(|e| e.to_string())?,
    );
    tokio::task::spawn_blocking(move || Egress::new(egress, link))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

/// How a backend's sandboxes join a run's namespace (`None`: they cannot).
pub fn link(attachment: Option<vm0_sandbox::NetworkAttachment>) -> Option<vm0_egress::Link> {
    match attachment? {
        vm0_sandbox::NetworkAttachment::Namespace => Some(vm0_egress::Link::Loopback),
        vm0_sandbox::NetworkAttachment::Tap => Some(vm0_egress::Link::Tap),
    }
}

/// The run's policy from its spec (validated when the agent was saved; a spec
/// that does not parse reaches nothing).
pub fn policy(spec: &pb::RunSpec) -> Result<Policy, String> {
    let Some(n) = &spec.network else {
        return Ok(Policy::default());
    };
    Policy::parse(
        &n.mode,
        n.allow.iter().map(String::as_str),
        n.deny.iter().map(String::as_str),
        n.extra_hosts.iter().map(|(k, v)| (k.as_str(), v.as_str())),
    )
    .map_err(|e| format!("the run's network policy: {e}"))
}

/// `VM0_NETWORK_TRUSTED_CIDRS`: comma-separated ranges.
pub fn parse_cidrs(s: &str) -> anyhow::Result<Vec<Cidr>> {
    s.split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(|c| {
            Cidr::parse(c).ok_or_else(|| {
                anyhow::anyhow!("VM0_NETWORK_TRUSTED_CIDRS: '{c}' is not a CIDR range")
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_read_from_urls() {
        assert_eq!(
            host_port("http://127.0.0.1:9090"),
            Some(("127.0.0.1".into(), 9090))
        );
        assert_eq!(
            host_port("https://cp.example/x"),
            Some(("cp.example".into(), 443))
        );
        assert_eq!(
            host_port("nats://u:p@10.0.0.5:4222"),
            Some(("10.0.0.5".into(), 4222))
        );
        assert_eq!(host_port("tls://[::1]:4223"), Some(("::1".into(), 4223)));
        assert_eq!(
            host_port("nats://natshost"),
            Some(("natshost".into(), 4222))
        );
        assert!(parse_cidrs("10.99.0.0/16, 192.168.5.0/24").is_ok());
        assert!(parse_cidrs("nope").is_err());
        assert_eq!(parse_cidrs("").map(|v| v.len()).ok(), Some(0));
    }
}
