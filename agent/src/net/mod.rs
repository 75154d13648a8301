//! The ground floor of addresses: prefixes (one [`Cidr`] for IPv4 and IPv6,
//! from podnet-api), MAC addresses, and the kernel's own address and protocol
//! encodings. Imports no subsystem.

mod mac;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub use mac::MacAddr;
pub use podnet_api::net::{from_u128, parse_list, to_u128, Cidr, CidrError, CidrList, Family};
use podnet_common::family;

/// Protocol label value: `tcp`, `udp`, `icmp`, `icmpv6`, or the number.
pub fn proto_name(proto: u8) -> String {
    match proto {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        58 => "icmpv6".into(),
        132 => "sctp".into(),
        n => n.to_string(),
    }
}

/// Converts a kernel address (16 bytes, IPv4 in the first 4) to an `IpAddr`.
/// Unknown families yield `None`.
pub fn kernel_addr(addr: &[u8; 16], fam: u8) -> Option<IpAddr> {
    match fam {
        family::INET => Some(IpAddr::V4(Ipv4Addr::new(
            addr[0], addr[1], addr[2], addr[3],
        ))),
        family::INET6 => Some(IpAddr::V6(Ipv6Addr::from(*addr))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_labels() {
        assert_eq!(proto_name(6), "tcp");
        assert_eq!(proto_name(17), "udp");
        assert_eq!(proto_name(1), "icmp");
        assert_eq!(proto_name(47), "47");
    }

    #[test]
    fn kernel_addresses() {
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&[10, 1, 2, 3]);
        assert_eq!(
            kernel_addr(&a, family::INET),
            Some("10.1.2.3".parse().unwrap())
        );
        let v6: Ipv6Addr = "fd00::7".parse().unwrap();
        assert_eq!(
            kernel_addr(&v6.octets(), family::INET6),
            Some(IpAddr::V6(v6))
        );
        assert_eq!(kernel_addr(&a, 99), None);
    }
}
