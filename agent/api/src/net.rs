//! IP prefixes and the address arithmetic the allocator needs, for IPv4 and
//! IPv6 alike (addresses are handled as `u128` offsets inside a prefix).

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Errors parsing a prefix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// Not of the form `address/length`.
    #[error("{0:?} is not a CIDR (expected address/length, e.g. 10.244.1.0/24)")]
    Syntax(String),
    /// The length is longer than the address.
    #[error("{0:?}: prefix length out of range")]
    Length(String),
    /// Host bits are set (`10.244.1.5/24`).
    #[error("{input:?} has host bits set; did you mean {network}?")]
    HostBits {
        /// What was given.
        input: String,
        /// The network it falls in.
        network: Cidr,
    },
}

/// An IP prefix with no host bits set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    network: IpAddr,
    len: u8,
}

/// Address family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// The family of `ip`.
    pub fn of(ip: IpAddr) -> Self {
        if ip.is_ipv4() {
            Self::V4
        } else {
            Self::V6
        }
    }

    /// Address width in bits.
    pub fn bits(self) -> u8 {
        match self {
            Self::V4 => 32,
            Self::V6 => 128,
        }
    }
}

/// The address as an unsigned integer.
pub fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// The address of `family` with integer value `value` (truncated to the family's width).
pub fn from_u128(family: Family, value: u128) -> IpAddr {
    match family {
        // Truncation is intended: callers pass values inside an IPv4 prefix.
        #[allow(clippy::cast_possible_truncation)]
        Family::V4 => IpAddr::V4(Ipv4Addr::from(value as u32)),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(value)),
    }
}

impl Cidr {
    /// `0.0.0.0/0`, the destination of the IPv4 default route.
    pub const ANY_V4: Cidr = Cidr {
        network: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        len: 0,
    };

    /// `::/0`, the destination of the IPv6 default route.
    pub const ANY_V6: Cidr = Cidr {
        network: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        len: 0,
    };

    /// The prefix of `len` bits that holds `ip`, host bits cleared (the
    /// kernel reports rules and routes as they were written).
    pub fn containing(ip: IpAddr, len: u8) -> Result<Self, CidrError> {
        let family = Family::of(ip);
        if len > family.bits() {
            return Err(CidrError::Length(format!("{ip}/{len}")));
        }
        Ok(Self {
            network: from_u128(family, to_u128(ip) & mask(family, len)),
            len,
        })
    }

    /// The one-address prefix of `ip` (`/32` or `/128`).
    pub fn host(ip: IpAddr) -> Self {
        Self {
            network: ip,
            len: Family::of(ip).bits(),
        }
    }

    /// The network address, when the prefix is IPv4.
    pub fn network_v4(&self) -> Option<Ipv4Addr> {
        match self.network {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        }
    }

    /// A prefix from its network address and length; fails on host bits.
    pub fn new(network: IpAddr, len: u8) -> Result<Self, CidrError> {
        let input = format!("{network}/{len}");
        let family = Family::of(network);
        if len > family.bits() {
            return Err(CidrError::Length(input));
        }
        let cidr = Self {
            network: from_u128(family, to_u128(network) & mask(family, len)),
            len,
        };
        if cidr.network != network {
            return Err(CidrError::HostBits {
                input,
                network: cidr,
            });
        }
        Ok(cidr)
    }

    /// The network address.
    pub fn network(&self) -> IpAddr {
        self.network
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    /// The address family.
    pub fn family(&self) -> Family {
        Family::of(self.network)
    }

    /// Host bits.
    pub fn host_bits(&self) -> u8 {
        self.family().bits() - self.len
    }

    /// The number of addresses in the prefix, saturating at `u128::MAX`.
    pub fn size(&self) -> u128 {
        1u128
            .checked_shl(u32::from(self.host_bits()))
            .unwrap_or(u128::MAX)
    }

    /// The last address of the prefix (the broadcast address for IPv4).
    pub fn last(&self) -> IpAddr {
        let host = !mask(self.family(), self.len) & family_mask(self.family());
        from_u128(self.family(), to_u128(self.network) | host)
    }

    /// Whether `ip` is inside the prefix.
    pub fn contains(&self, ip: IpAddr) -> bool {
        Family::of(ip) == self.family()
            && to_u128(ip) & mask(self.family(), self.len) == to_u128(self.network)
    }

    /// The `index`-th address of the prefix, if inside it.
    pub fn nth(&self, index: u128) -> Option<IpAddr> {
        (index < self.size()).then(|| from_u128(self.family(), to_u128(self.network) + index))
    }

    /// The `index`-th subnet of length `len` inside this prefix.
    pub fn subnet(&self, len: u8, index: u128) -> Option<Cidr> {
        if len < self.len || len > self.family().bits() {
            return None;
        }
        let count = 1u128
            .checked_shl(u32::from(len - self.len))
            .unwrap_or(u128::MAX);
        if index >= count {
            return None;
        }
        let step_bits = u32::from(self.family().bits() - len);
        let offset = index.checked_shl(step_bits)?;
        Some(Cidr {
            network: from_u128(self.family(), to_u128(self.network) + offset),
            len,
        })
    }
}

fn family_mask(family: Family) -> u128 {
    match family {
        Family::V4 => u128::from(u32::MAX),
        Family::V6 => u128::MAX,
    }
}

fn mask(family: Family, len: u8) -> u128 {
    let bits = family.bits();
    if len == 0 {
        return 0;
    }
    let host = u32::from(bits - len);
    let ones = family_mask(family);
    ones.checked_shl(host).map_or(0, |m| m & ones)
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.len)
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| CidrError::Syntax(s.to_owned()))?;
        let addr: IpAddr = addr.parse().map_err(|_| CidrError::Syntax(s.to_owned()))?;
        if len.is_empty() || len.len() > 3 || !len.bytes().all(|b| b.is_ascii_digit()) {
            return Err(CidrError::Syntax(s.to_owned()));
        }
        let len: u8 = len.parse().map_err(|_| CidrError::Length(s.to_owned()))?;
        Cidr::new(addr, len).map_err(|e| match e {
            CidrError::HostBits { network, .. } => CidrError::HostBits {
                input: s.to_owned(),
                network,
            },
            other => other,
        })
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Parses a comma-separated list of prefixes (`--node-cidr`).
pub fn parse_list(s: &str) -> Result<Vec<Cidr>, CidrError> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(str::parse)
        .collect()
}

/// A comma-separated list of prefixes, as `--node-cidr` takes it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CidrList(pub Vec<Cidr>);

impl FromStr for CidrList {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_list(s).map(Self)
    }
}

impl<'de> Deserialize<'de> for CidrList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_prefixes_hosts_and_the_default_route() {
        let c = Cidr::containing("10.0.1.7".parse().unwrap(), 24).unwrap();
        assert_eq!(c.to_string(), "10.0.1.0/24");
        assert!(Cidr::containing("10.0.1.7".parse().unwrap(), 33).is_err());
        assert_eq!(
            Cidr::host("10.0.1.7".parse().unwrap()).to_string(),
            "10.0.1.7/32"
        );
        assert_eq!(
            Cidr::host("fd00::7".parse().unwrap()).to_string(),
            "fd00::7/128"
        );
        assert_eq!(Cidr::ANY_V4.to_string(), "0.0.0.0/0");
        assert!(Cidr::ANY_V4.contains("192.0.2.1".parse().unwrap()));
        assert_eq!(c.network_v4(), Some("10.0.1.0".parse().unwrap()));
        assert_eq!("fd00::/64".parse::<Cidr>().unwrap().network_v4(), None);
    }

    #[test]
    fn parses_and_rejects() {
        let c: Cidr = "10.244.1.0/24".parse().unwrap();
        assert_eq!(c.size(), 256);
        assert_eq!(c.last().to_string(), "10.244.1.255");
        assert!(c.contains("10.244.1.7".parse().unwrap()));
        assert!(!c.contains("10.244.2.7".parse().unwrap()));
        assert!(!c.contains("::1".parse().unwrap()));
        let e = "10.244.1.5/24".parse::<Cidr>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "\"10.244.1.5/24\" has host bits set; did you mean 10.244.1.0/24?"
        );
        assert!(matches!(
            "10.0.0.0/33".parse::<Cidr>(),
            Err(CidrError::Length(_))
        ));
        assert!(matches!(
            "10.0.0.0".parse::<Cidr>(),
            Err(CidrError::Syntax(_))
        ));
        assert!(matches!(
            "10.0.0.0/+1".parse::<Cidr>(),
            Err(CidrError::Syntax(_))
        ));
        let v6: Cidr = "fd00:10:244:1::/64".parse().unwrap();
        assert_eq!(v6.last().to_string(), "fd00:10:244:1:ffff:ffff:ffff:ffff");
        assert_eq!(v6.size(), 1 << 64);
        let all: Cidr = "::/0".parse().unwrap();
        assert_eq!(all.size(), u128::MAX);
        assert_eq!(parse_list("10.244.1.0/24, fd00::/64").unwrap().len(), 2);
    }

    #[test]
    fn subnets() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert_eq!(c.subnet(12, 1).unwrap().to_string(), "10.16.0.0/12");
        assert_eq!(c.subnet(24, 65535).unwrap().to_string(), "10.255.255.0/24");
        assert!(c.subnet(24, 65536).is_none());
        assert!(c.subnet(7, 0).is_none());
    }
}
