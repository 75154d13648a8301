//! ENI kernel links: found by MAC in the agent's network namespace and
//! brought up with the ENI MTU, through the `ip` command (behind a trait so
//! the ENI logic is tested without root).

use std::process::{Command, Stdio};

use serde::Deserialize;

use crate::routing::eni::MacAddr;

/// MTU of ENIs inside a VPC (jumbo frames).
pub const ENI_MTU: u32 = 9001;

/// A kernel link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    /// Interface name.
    pub name: String,
    /// Its MTU.
    pub mtu: u32,
    /// Whether it is administratively up.
    pub up: bool,
}

/// The link operations ENI mode needs.
pub trait Links: Send + Sync {
    /// Every link by MAC.
    fn list(&self) -> Result<Vec<(MacAddr, LinkInfo)>, String>;
    /// Sets the MTU and brings the link up.
    fn bring_up(&self, name: &str, mtu: u32) -> Result<(), String>;
}

/// Links through `ip` (iproute2) in the agent's namespace.
#[derive(Clone, Copy, Debug, Default)]
pub struct IpCommand;

#[derive(Deserialize)]
struct IpLink {
    ifname: String,
    #[serde(default)]
    address: Option<String>,
    #[serde(default)]
    mtu: u32,
    #[serde(default)]
    flags: Vec<String>,
}

/// Parses `ip -j link show`.
pub fn parse_ip_links(json: &str) -> Result<Vec<(MacAddr, LinkInfo)>, String> {
    let links: Vec<IpLink> = serde_json::from_str(json).map_err(|e| format!("ip -j link: {e}"))?;
    Ok(links
        .into_iter()
        .filter_map(|l| {
            let mac = l.address.as_deref()?.parse().ok()?;
            Some((
                mac,
                LinkInfo {
                    up: l.flags.iter().any(|f| f == "UP"),
                    name: l.ifname,
                    mtu: l.mtu,
                },
            ))
        })
        .collect())
}

fn run(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running ip {}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Links for IpCommand {
    fn list(&self) -> Result<Vec<(MacAddr, LinkInfo)>, String> {
        parse_ip_links(&run(&["-j", "link", "show"])?)
    }

    fn bring_up(&self, name: &str, mtu: u32) -> Result<(), String> {
        run(&["link", "set", "dev", name, "mtu", &mtu.to_string(), "up"]).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ip_json() {
        let json = r#"[{"ifindex":1,"ifname":"lo","flags":["LOOPBACK","UP"],"mtu":65536,"address":"00:00:00:00:00:00"},
{"ifindex":5,"ifname":"eth1","flags":["BROADCAST","MULTICAST"],"mtu":1500,"address":"02:00:00:00:01:01"},
{"ifindex":6,"ifname":"tun0","flags":["UP"],"mtu":1500}]"#;
        let links = parse_ip_links(json).unwrap();
        assert_eq!(links.len(), 2);
        assert_eq!(links[1].0.to_string(), "02:00:00:00:01:01");
        assert_eq!(
            links[1].1,
            LinkInfo {
                name: "eth1".into(),
                mtu: 1500,
                up: false
            }
        );
        assert!(parse_ip_links("nope").is_err());
    }
}
