//! Addresses and sockets.

use std::net::IpAddr;

/// The address a connection counts against: IPv4 as it is, IPv6 by its /64 (one host
/// usually holds a whole /64). An IPv4 client of a dual-stack listener (bound to `[::]`)
/// arrives as an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) and counts as its IPv4
/// address: by its /64 every IPv4 client would share one key.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut segments = v6.segments();
                segments[4..].fill(0);
                IpAddr::V6(segments.into())
            }
        },
    }
}

/// A QUIC server endpoint on `listen` whose socket asks the kernel for `buffer_bytes` of
/// receive and send buffer (best effort: the kernel caps what it grants). Every
/// connection's packets arrive through this one socket: a small buffer drops honest
/// clients' packets while a flood fills it.
pub fn server_endpoint(
    server_config: quinn::ServerConfig,
    listen: std::net::SocketAddr,
    buffer_bytes: usize,
) -> std::io::Result<quinn::Endpoint> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(listen),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    if listen.is_ipv6() {
        // As the standard library binds: an IPv6 address takes IPv4 too where the
        // system allows it.
        let _ = socket.set_only_v6(false);
    }
    // Best effort: a smaller buffer than asked for still works, only with more drops
    // under floods (the kernel counts them: `RcvbufErrors` in /proc/net/snmp).
    let _ = socket.set_recv_buffer_size(buffer_bytes);
    let _ = socket.set_send_buffer_size(buffer_bytes);
    socket.bind(&listen.into())?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("no async runtime for QUIC"))?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server_config),
        socket.into(),
        runtime,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_addresses_count_by_their_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa:bbbb:cccc:dddd".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(address_key(a), address_key(b));
        assert_ne!(address_key(a), address_key(c));
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        assert_eq!(address_key(v4), v4);
    }

    #[test]
    fn ipv4_clients_of_a_dual_stack_listener_count_by_their_own_address() {
        let a: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        let b: IpAddr = "::ffff:192.0.2.8".parse().unwrap();
        assert_ne!(address_key(a), address_key(b));
        assert_eq!(address_key(a), "192.0.2.7".parse::<IpAddr>().unwrap());
    }
}
