//! ENIs as the routing subsystem needs them: which interface, which table,
//! which subnet and gateway, and which secondary addresses belong to pods.
//!
//! They come from a static description (`--enis FILE`) or from the ENI IPAM,
//! through the same [`EniStore`], so the reconciler does not care where they
//! come from.
//!
//! ```yaml
//! - {name: eth1, mac: "02:00:00:00:01:01", table: 101, subnet: 10.0.1.0/24,
//!    gateway: 10.0.1.1, ips: [10.0.1.10, 10.0.1.11]}
//! ```
//!
//! An ENI may also carry IPv6 (all optional, so IPv4-only descriptions keep
//! working): `subnet6`, `gateway6` (an address of `subnet6`, or the VPC
//! router's link-local address) and `ips6`, the IPv6 addresses given to pods.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    sync::{Arc, PoisonError, RwLock},
    time::SystemTime,
};

use serde::{Deserialize, Serialize};

use crate::net::{Cidr, MacAddr};

/// Tables the kernel reserves (`unspec`, `compat`, `default`, `main`, `local`).
const RESERVED_TABLES: [u32; 5] = [0, 252, 253, 254, 255];

/// One ENI attached to this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Eni {
    /// Kernel interface name; used when `mac` is absent or matches no link.
    pub name: String,
    /// The ENI's MAC; when given, the link with this MAC is the ENI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddr>,
    /// Routing table of the ENI (not one the kernel reserves).
    pub table: u32,
    /// The ENI's subnet.
    pub subnet: Cidr,
    /// The subnet's gateway (the VPC router).
    pub gateway: Ipv4Addr,
    /// Secondary addresses given to pods on this ENI.
    #[serde(default)]
    pub ips: Vec<Ipv4Addr>,
    /// The ENI's IPv6 subnet, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet6: Option<Cidr>,
    /// The IPv6 subnet's gateway (the VPC router), for the IPv6 default
    /// route of the ENI's table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway6: Option<Ipv6Addr>,
    /// IPv6 addresses given to pods on this ENI.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips6: Vec<Ipv6Addr>,
}

impl Eni {
    /// Whether the pod address `ip` is one of this ENI's addresses for pods.
    pub fn holds(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(v4) => self.ips.contains(&v4),
            IpAddr::V6(v6) => self.ips6.contains(&v6),
        }
    }

    /// Whether `ip` lies in the ENI's subnet of its family.
    pub fn in_subnet(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(_) => self.subnet.contains(ip),
            IpAddr::V6(_) => self.subnet6.is_some_and(|s| s.contains(ip)),
        }
    }

    /// Whether the pod address `ip` leaves through this ENI: it is one of
    /// its addresses for pods, or lies in its subnet of that family.
    pub fn owns(&self, ip: IpAddr) -> bool {
        self.holds(ip) || self.in_subnet(ip)
    }
}

/// The ENI whose addresses for pods hold `ip` (IPv4 or IPv6), else the
/// first whose subnet of that family holds it.
pub fn eni_for(enis: &[Eni], ip: IpAddr) -> Option<&Eni> {
    enis.iter()
        .find(|e| e.holds(ip))
        .or_else(|| enis.iter().find(|e| e.in_subnet(ip)))
}

/// The IPv6 half of an ENI description: `gateway6` and `ips6` need
/// `subnet6`, and lie in it (a link-local gateway, as the VPC router's
/// often is, is reachable on any link).
fn check_ipv6(eni: &Eni) -> Result<(), String> {
    let Some(subnet6) = eni.subnet6 else {
        if eni.gateway6.is_some() || !eni.ips6.is_empty() {
            return Err("`gateway6` and `ips6` need `subnet6`".into());
        }
        return Ok(());
    };
    if subnet6.network_v4().is_some() {
        return Err(format!("subnet6 {subnet6} is not an IPv6 prefix"));
    }
    if let Some(gw) = eni.gateway6 {
        let link_local = gw.segments()[0] & 0xffc0 == 0xfe80;
        if !link_local && !subnet6.contains(IpAddr::V6(gw)) {
            return Err(format!("gateway6 {gw} is outside subnet6 {subnet6}"));
        }
    }
    if let Some(ip) = eni
        .ips6
        .iter()
        .find(|ip| !subnet6.contains(IpAddr::V6(**ip)))
    {
        return Err(format!("address {ip} is outside subnet6 {subnet6}"));
    }
    Ok(())
}

/// Errors reading the ENI description.
#[derive(Debug, thiserror::Error)]
pub enum EnisFileError {
    /// The file could not be read.
    #[error("reading ENI file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not a valid ENI list.
    #[error("ENI file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// Parses and validates an ENI list: names and tables unique, tables not
/// reserved, gateway and secondary addresses inside the subnet.
pub fn parse(path: &Path, text: &str) -> Result<Vec<Eni>, EnisFileError> {
    let err = |message: String| EnisFileError::Parse {
        path: path.to_owned(),
        message,
    };
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let enis: Vec<Eni> = serde_norway::from_str(text).map_err(|e| err(e.to_string()))?;
    let (mut names, mut tables) = (HashSet::new(), HashSet::new());
    for (i, eni) in enis.iter().enumerate() {
        let at = |m: String| err(format!("entry {i} ({}): {m}", eni.name));
        if eni.name.is_empty() || eni.name.len() > 15 {
            return Err(at("`name` must have 1 to 15 characters".into()));
        }
        if !names.insert(eni.name.clone()) {
            return Err(at("duplicate name".into()));
        }
        if RESERVED_TABLES.contains(&eni.table) {
            return Err(at(format!("table {} is reserved by the kernel", eni.table)));
        }
        if !tables.insert(eni.table) {
            return Err(at(format!("table {} used twice", eni.table)));
        }
        if !eni.subnet.contains(IpAddr::V4(eni.gateway)) {
            return Err(at(format!(
                "gateway {} is outside subnet {}",
                eni.gateway, eni.subnet
            )));
        }
        if let Some(ip) = eni
            .ips
            .iter()
            .find(|ip| !eni.subnet.contains(IpAddr::V4(**ip)))
        {
            return Err(at(format!("address {ip} is outside subnet {}", eni.subnet)));
        }
        check_ipv6(eni).map_err(at)?;
    }
    Ok(enis)
}

/// Reads and parses the file.
pub fn load(path: &Path) -> Result<Vec<Eni>, EnisFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| EnisFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(path, &text)
}

/// Modification time and size of a file, to notice edits.
pub fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

#[derive(Debug, Default)]
struct Inner {
    enis: Vec<Eni>,
    generation: u64,
}

/// The node's ENIs, shared between whoever knows them (the static file or
/// the ENI IPAM) and the reconciler. Cloning shares the store.
#[derive(Clone, Debug, Default)]
pub struct EniStore {
    inner: Arc<RwLock<Inner>>,
}

impl EniStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the ENIs; bumps the generation when they changed.
    pub fn replace(&self, enis: Vec<Eni>) {
        let mut inner = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        if inner.enis != enis {
            inner.enis = enis;
            inner.generation += 1;
        }
    }

    /// A copy of the ENIs.
    pub fn enis(&self) -> Vec<Eni> {
        self.inner
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .enis
            .clone()
    }

    /// Increases on every change.
    pub fn generation(&self) -> u64 {
        self.inner
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .generation
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "\
- {name: eth1, mac: \"02:00:00:00:01:01\", table: 101, subnet: 10.0.1.0/24, gateway: 10.0.1.1, ips: [10.0.1.10, 10.0.1.11]}
- name: eth2
  table: 102
  subnet: 10.0.2.0/24
  gateway: 10.0.2.1
";

    #[test]
    fn parses_the_documented_format() {
        let enis = parse(Path::new("e.yaml"), FILE).unwrap();
        assert_eq!(enis.len(), 2);
        assert_eq!(enis[0].mac.unwrap().to_string(), "02:00:00:00:01:01");
        assert_eq!(enis[0].ips.len(), 2);
        assert_eq!(enis[1].mac, None);
        assert!(enis[1].ips.is_empty());
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(eni_for(&enis, ip("10.0.1.11")).unwrap().name, "eth1");
        assert_eq!(eni_for(&enis, ip("10.0.2.77")).unwrap().name, "eth2");
        assert!(eni_for(&enis, ip("10.0.3.1")).is_none());
        assert!(eni_for(&enis, ip("2600:1f18::10")).is_none());
        assert_eq!(enis[0].subnet6, None);
    }

    #[test]
    fn ipv6_fields_are_optional_and_found_by_eni_for() {
        let text = "\
- {name: eth1, table: 101, subnet: 10.0.1.0/24, gateway: 10.0.1.1, ips: [10.0.1.10],
   subnet6: \"2600:1f18:1::/64\", gateway6: \"fe80::1\", ips6: [\"2600:1f18:1::10\"]}
- {name: eth2, table: 102, subnet: 10.0.2.0/24, gateway: 10.0.2.1,
   subnet6: \"2600:1f18:2::/64\", gateway6: \"2600:1f18:2::1\"}
";
        let enis = parse(Path::new("e.yaml"), text).unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(eni_for(&enis, ip("2600:1f18:1::10")).unwrap().name, "eth1");
        assert_eq!(eni_for(&enis, ip("2600:1f18:2::77")).unwrap().name, "eth2");
        assert!(eni_for(&enis, ip("2600:1f18:3::1")).is_none());
        // An IPv6 address is never matched against the IPv4 subnet.
        assert!(!enis[0].owns(ip("::ffff:10.0.1.10")));
        assert_eq!(enis[1].gateway6, Some("2600:1f18:2::1".parse().unwrap()));
    }

    #[test]
    fn errors_name_the_entry() {
        let check = |text: &str, want: &str| {
            let e = parse(Path::new("e.yaml"), text).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        };
        check(
            "- {name: a, table: 254, subnet: 10.0.1.0/24, gateway: 10.0.1.1}",
            "entry 0 (a): table 254 is reserved",
        );
        check(
            "- {name: a, table: 101, subnet: 10.0.1.0/24, gateway: 10.0.2.1}",
            "gateway 10.0.2.1 is outside subnet 10.0.1.0/24",
        );
        check(
            "- {name: a, table: 101, subnet: 10.0.1.0/24, gateway: 10.0.1.1, ips: [10.0.9.9]}",
            "address 10.0.9.9 is outside",
        );
        check(
            "- {name: a, table: 101, subnet: 10.0.1.0/24, gateway: 10.0.1.1}\n- {name: b, table: 101, subnet: 10.0.2.0/24, gateway: 10.0.2.1}",
            "entry 1 (b): table 101 used twice",
        );
        check(
            "- {name: a, table: 101, subnet: 10.0.1.0/24, gateway: 10.0.1.1, gateway6: \"fe80::1\"}",
            "`gateway6` and `ips6` need `subnet6`",
        );
        check(
            "- {name: a, table: 101, subnet: 10.0.1.0/24, gateway: 10.0.1.1, subnet6: \"fd00:1::/64\", gateway6: \"fd00:2::1\"}",
            "gateway6 fd00:2::1 is outside subnet6 fd00:1::/64",
        );
        check(
            "- {name: a, table: 101, subnet: 10.0.1.0/24, gateway: 10.0.1.1, subnet6: \"fd00:1::/64\", ips6: [\"fd00:9::9\"]}",
            "address fd00:9::9 is outside subnet6",
        );
        check(
            "- {name: a, table: 101, subnet: 10.0.1.0/24, gateway: 10.0.1.1, subnet6: 10.0.9.0/24}",
            "subnet6 10.0.9.0/24 is not an IPv6 prefix",
        );
        check(
            "- {name: a, mac: zz, table: 101, subnet: 10.0.1.0/24, gateway: 10.0.1.1}",
            "invalid MAC",
        );
        check(
            "- {name: a, table: 101, subnet: 10.0.1.0/24, gateway: 10.0.1.1, colour: red}",
            "unknown field `colour`",
        );
    }

    #[test]
    fn store_generation_moves_on_change_only() {
        let store = EniStore::new();
        let enis = parse(Path::new("e.yaml"), FILE).unwrap();
        store.replace(enis.clone());
        store.replace(enis);
        assert_eq!(store.generation(), 1);
        store.replace(Vec::new());
        assert_eq!(store.generation(), 2);
    }
}
