//! Where a webhook may point. A tenant's webhook URL is checked twice: its host against
//! the tenant's allow-list when the feed starts, and every address its host resolves to
//! before each delivery, which then connects to the checked address itself (never
//! resolving again: a DNS answer that changes between the check and the connection
//! cannot slip a private address in).
//!
//! Refused unless explicitly allowed: loopback, link-local (the cloud metadata
//! endpoints live there: 169.254.169.254, fd00:ec2::254), private and unique-local
//! ranges, shared address space (100.64.0.0/10), unspecified, broadcast, multicast and
//! documentation addresses.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Why a webhook target was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// Not an `http://` or `https://` URL with a host.
    #[error("webhook URL {0:?} is not an http(s) URL with a host")]
    Url(String),
    /// The host is not on the tenant's allow-list.
    #[error("webhook host {0:?} is not on the tenant's allow-list")]
    NotAllowed(String),
    /// The host resolved to an address of a refused kind.
    #[error("webhook host {host:?} resolves to {addr} ({kind}), which webhooks may not reach")]
    Address {
        /// The host.
        host: String,
        /// The address.
        addr: IpAddr,
        /// Its kind.
        kind: &'static str,
    },
    /// The host did not resolve.
    #[error("webhook host {0:?} does not resolve: {1}")]
    Resolve(String, String),
}

/// A checked webhook URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The URL as configured.
    pub url: url::Url,
    /// Its host.
    pub host: String,
    /// Its port (the scheme's default when not given).
    pub port: u16,
    /// `https`.
    pub tls: bool,
}

/// What a target may reach beyond public addresses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reach {
    /// Loopback addresses (`meridian dev --webhook` allows them).
    pub loopback: bool,
    /// Private and unique-local ranges (a receiver inside the same network).
    pub private: bool,
}

/// Parses `url` and checks its host against `allowed` (hosts, or `*.domain` for its
/// subdomains; empty: any host).
pub fn parse(url: &str, allowed: &[String]) -> Result<Target, TargetError> {
    let parsed = url::Url::parse(url).map_err(|_| TargetError::Url(url.to_string()))?;
    let tls = match parsed.scheme() {
        "https" => true,
        "http" => false,
        _ => return Err(TargetError::Url(url.to_string())),
    };
    let host = parsed
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| TargetError::Url(url.to_string()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    let port = parsed
        .port_or_known_default()
        .ok_or_else(|| TargetError::Url(url.to_string()))?;
    if !allowed.is_empty() && !allowed.iter().any(|a| host_matches(&host, a)) {
        return Err(TargetError::NotAllowed(host));
    }
    Ok(Target {
        url: parsed,
        host,
        port,
        tls,
    })
}

fn host_matches(host: &str, pattern: &str) -> bool {
    let pattern = pattern.to_ascii_lowercase();
    match pattern.strip_prefix("*.") {
        Some(domain) => host.len() > domain.len() && host.ends_with(&format!(".{domain}")),
        None => host == pattern,
    }
}

/// The kind of an address webhooks may not reach without leave, if it is one.
pub fn refused_kind(addr: IpAddr, reach: Reach) -> Option<&'static str> {
    let kind = match addr {
        IpAddr::V4(v4) => v4_kind(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4_kind(v4),
            None => v6_kind(v6),
        },
    }?;
    match kind {
        "loopback" if reach.loopback => None,
        "private" if reach.private => None,
        kind => Some(kind),
    }
}

fn v4_kind(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    Some(if ip.is_loopback() {
        "loopback"
    } else if ip.is_link_local() {
        "link-local or metadata"
    } else if ip.is_private() {
        "private"
    } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
        "shared address space"
    } else if ip.is_unspecified() || o[0] == 0 {
        "unspecified"
    } else if ip.is_broadcast() || ip.is_multicast() || o[0] >= 240 {
        "broadcast, multicast or reserved"
    } else if ip.is_documentation() || (o[0] == 198 && (o[1] & 0xfe) == 18) {
        "documentation or benchmarking"
    } else {
        return None;
    })
}

fn v6_kind(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    Some(if ip.is_loopback() {
        "loopback"
    } else if ip.is_unspecified() {
        "unspecified"
    } else if (s[0] & 0xffc0) == 0xfe80 {
        "link-local or metadata"
    } else if (s[0] & 0xfe00) == 0xfc00 {
        // Unique-local; the EC2 metadata endpoint fd00:ec2::254 is one.
        if s[0] == 0xfd00 && s[1] == 0x0ec2 {
            "link-local or metadata"
        } else {
            "private"
        }
    } else if ip.is_multicast() {
        "broadcast, multicast or reserved"
    } else if s[0] == 0x2001 && s[1] == 0x0db8 {
        "documentation or benchmarking"
    } else {
        return None;
    })
}

/// Resolves the target's host and returns the first address, refusing the target when
/// any address is of a refused kind (a host that answers with one public and one
/// private address is refused: the next answer might be the private one alone).
pub async fn resolve(target: &Target, reach: Reach) -> Result<SocketAddr, TargetError> {
    let addrs: Vec<SocketAddr> = match target.host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, target.port)],
        Err(_) => tokio::net::lookup_host((target.host.as_str(), target.port))
            .await
            .map_err(|error| TargetError::Resolve(target.host.clone(), error.to_string()))?
            .collect(),
    };
    for addr in &addrs {
        if let Some(kind) = refused_kind(addr.ip(), reach) {
            return Err(TargetError::Address {
                host: target.host.clone(),
                addr: addr.ip(),
                kind,
            });
        }
    }
    addrs
        .first()
        .copied()
        .ok_or_else(|| TargetError::Resolve(target.host.clone(), "no address".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(addr: &str) -> Option<&'static str> {
        refused_kind(addr.parse().unwrap(), Reach::default())
    }

    #[test]
    fn internal_addresses_are_refused_and_public_ones_pass() {
        for addr in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00:ec2::254",
            "fc00::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "2001:db8::1",
        ] {
            assert!(kind(addr).is_some(), "{addr} should be refused");
        }
        for addr in ["93.184.216.34", "2606:2800:220:1::1", "1.1.1.1"] {
            assert_eq!(kind(addr), None, "{addr} should pass");
        }
        assert_eq!(kind("169.254.169.254"), Some("link-local or metadata"));
        assert_eq!(kind("fd00:ec2::254"), Some("link-local or metadata"));
        let dev = Reach {
            loopback: true,
            private: false,
        };
        assert_eq!(refused_kind("127.0.0.1".parse().unwrap(), dev), None);
        assert!(refused_kind("10.0.0.1".parse().unwrap(), dev).is_some());
        assert!(refused_kind("169.254.169.254".parse().unwrap(), dev).is_some());
    }

    #[test]
    fn urls_are_checked_against_the_allow_list() {
        let allowed = vec![
            "hooks.acme.example".to_string(),
            "*.svc.example".to_string(),
        ];
        assert!(parse("https://hooks.acme.example/in", &allowed).is_ok());
        assert!(parse("https://a.svc.example/in", &allowed).is_ok());
        assert_eq!(
            parse("https://svc.example/in", &allowed),
            Err(TargetError::NotAllowed("svc.example".into()))
        );
        assert_eq!(
            parse("https://evil.example/in", &allowed),
            Err(TargetError::NotAllowed("evil.example".into()))
        );
        assert!(matches!(parse("ftp://x/", &[]), Err(TargetError::Url(_))));
        assert!(matches!(parse("not a url", &[]), Err(TargetError::Url(_))));
        let t = parse("http://127.0.0.1:9000/hook", &[]).unwrap();
        assert_eq!((t.host.as_str(), t.port, t.tls), ("127.0.0.1", 9000, false));
        let t = parse("https://[::1]/hook", &[]).unwrap();
        assert_eq!((t.host.as_str(), t.port, t.tls), ("::1", 443, true));
    }

    #[tokio::test]
    async fn resolution_refuses_what_the_host_names() {
        let target = parse("http://127.0.0.1:1/", &[]).unwrap();
        assert!(matches!(
            resolve(&target, Reach::default()).await,
            Err(TargetError::Address {
                kind: "loopback",
                ..
            })
        ));
        let reach = Reach {
            loopback: true,
            private: false,
        };
        assert_eq!(
            resolve(&target, reach).await,
            Ok("127.0.0.1:1".parse().unwrap())
        );
        let target = parse("http://localhost:1/", &[]).unwrap();
        assert!(resolve(&target, Reach::default()).await.is_err());
    }
}
