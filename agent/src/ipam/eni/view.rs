//! How `podnetctl ipam` shows ENI mode.

use std::fmt::Write as _;

use super::EniStatus;

/// The instance line, then one line per ENI.
pub fn eni_text(s: &EniStatus) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "instance: {} ({}), subnet {}, max {} ENIs, max {} pods",
        s.instance_id.as_deref().unwrap_or("?"),
        s.instance_type.as_deref().unwrap_or("?"),
        s.subnet.as_deref().unwrap_or("?"),
        s.max_enis.map_or_else(|| "?".into(), |n| n.to_string()),
        s.max_pods.map_or_else(|| "?".into(), |n| n.to_string()),
    );
    let _ = writeln!(
        out,
        "capacity: {} more pods; subnet: {} free addresses",
        s.pods_remaining
            .map_or_else(|| "?".into(), |n| n.to_string()),
        s.subnet_free.map_or_else(|| "?".into(), |n| n.to_string()),
    );
    if s.prefix_delegation {
        let _ = writeln!(
            out,
            "prefix delegation: ENIs hold /28 prefixes of 16 addresses; InsufficientCidrBlocks answers: {}",
            s.insufficient_cidr_blocks
        );
    }
    if let Some(e) = &s.last_error {
        let _ = writeln!(out, "cloud API failing: {e}");
    }
    let _ = writeln!(
        out,
        "{:<22} {:>3} {:<10} {:<7} {:<15} {:>9} {:>9} {:>8} {:>4}",
        "ENI", "DEV", "LINK", "OWNER", "PRIMARY", "ADDRESSES", "ALLOCATED", "COOLDOWN", "FREE"
    );
    for e in &s.enis {
        let _ = writeln!(
            out,
            "{:<22} {:>3} {:<10} {:<7} {:<15} {:>9} {:>9} {:>8} {:>4}",
            e.eni,
            e.device_index,
            e.link.as_deref().unwrap_or("(none)"),
            if e.managed { "podnet" } else { "-" },
            e.primary_ip.map_or_else(|| "-".into(), |ip| ip.to_string()),
            e.addresses,
            e.allocated,
            e.cooldown,
            e.free
        );
        if !e.prefixes.is_empty() {
            let _ = writeln!(out, "  prefixes: {}", e.prefixes.join(" "));
        }
    }
    out
}
