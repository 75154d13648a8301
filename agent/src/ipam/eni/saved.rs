//! The confirmed pool on disk, so that an agent restarted while EC2 or the
//! metadata service is unreachable still hands out the addresses its ENIs
//! hold.
//!
//! Written (atomically, with fsync) whenever the ENIs with links or their
//! confirmed addresses change; read once at start, before the cloud has
//! answered. Addresses are saved only once a listing has shown them and
//! removed before they are released, so the file never names an address
//! EC2 may have given to someone else.

use std::{io, net::Ipv4Addr, path::Path};

use serde::{Deserialize, Serialize};

use crate::{
    ipam::store::{RealFs, StateFs},
    net::Cidr,
    routing::eni::Eni,
};

/// File name in the state directory.
pub const FILE: &str = "eni-pool.json";

/// What the ENI thread knew last.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedPool {
    /// The instance the ENIs belong to.
    pub instance_id: String,
    /// The pods' subnet.
    pub subnet: Cidr,
    /// The pods' gateway ([`super::POD_GATEWAY`]).
    pub gateway: Option<Ipv4Addr>,
    /// The ENIs with links, as routing takes them; `ips` only the confirmed
    /// addresses that may be handed out.
    pub enis: Vec<Eni>,
    /// The pods' IPv6 prefix (`--eni-ipv6`), once confirmed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6_prefix: Option<Cidr>,
}

/// Reads `dir`'s saved pool; `None` when there is none.
pub fn load(dir: &Path) -> Result<Option<SavedPool>, String> {
    let path = dir.join(FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Replaces `dir`'s saved pool with `pool`.
pub fn store(dir: &Path, pool: &SavedPool) -> io::Result<()> {
    let bytes = serde_json::to_vec_pretty(pool).map_err(io::Error::other)?;
    RealFs::from_env().write_atomic(&dir.join(FILE), &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_pool_reads_back_and_a_damaged_one_is_an_error_naming_the_file() {
        let dir = std::env::temp_dir().join(format!("podnet-eni-saved-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(load(&dir), Ok(None));
        let pool = SavedPool {
            instance_id: "i-1".into(),
            subnet: "10.0.1.0/24".parse().unwrap(),
            gateway: Some(Ipv4Addr::new(10, 0, 1, 1)),
            enis: vec![Eni {
                name: "ens6".into(),
                mac: Some("02:00:00:00:01:01".parse().unwrap()),
                table: 101,
                subnet: "10.0.1.0/24".parse().unwrap(),
                gateway: Ipv4Addr::new(10, 0, 1, 1),
                ips: vec![Ipv4Addr::new(10, 0, 1, 9)],
                subnet6: None,
                gateway6: None,
                ips6: Vec::new(),
            }],
            ipv6_prefix: Some("2600:1f18::/80".parse().unwrap()),
        };
        store(&dir, &pool).unwrap();
        assert_eq!(load(&dir), Ok(Some(pool)));
        std::fs::write(dir.join(FILE), b"{\"instance_id\":").unwrap();
        let err = load(&dir).unwrap_err();
        assert!(
            err.starts_with(&dir.join(FILE).display().to_string()),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
