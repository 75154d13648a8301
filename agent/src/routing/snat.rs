//! SNAT for pod traffic leaving the VPC: one chain owned by podnet per
//! family ([`CHAIN`] in the nat table of `iptables` and of `ip6tables`,
//! jumped to from POSTROUTING) that returns for VPC destinations and
//! masquerades the rest with `--random-fully` (no insert races on the shared
//! source port range). A family without pod sources has no chain.
//!
//! Applied with the `iptables`/`ip6tables` commands (Debian's default is the
//! `nf_tables` backend), idempotently: each rule is checked (`-C`) before
//! anything is written, and only podnet's chains and their jumps are ever
//! changed or removed.

use std::process::Command;

use crate::net::{Cidr, Family};

/// podnet's chain in the nat table.
pub const CHAIN: &str = "PODNET-SNAT";
/// Comment on the jump from POSTROUTING, so people know who put it there.
const JUMP_COMMENT: &str = "podnet: SNAT for pod traffic leaving the VPC";

/// The binary that manages `family`'s tables.
fn binary(family: Family) -> &'static str {
    match family {
        Family::V4 => "iptables",
        Family::V6 => "ip6tables",
    }
}

/// What the chain should do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnatSpec {
    /// Destinations that are not masqueraded.
    pub vpc_cidrs: Vec<Cidr>,
    /// Pod sources that are masqueraded towards anything else.
    pub pod_sources: Vec<Cidr>,
}

/// An iptables invocation failed.
#[derive(Debug, thiserror::Error)]
#[error("iptables {args}: {message}")]
pub struct SnatError {
    args: String,
    message: String,
}

impl SnatSpec {
    /// The part of `self` in `family`.
    #[must_use]
    pub fn of(&self, family: Family) -> Self {
        let keep = |cidrs: &[Cidr]| -> Vec<Cidr> {
            cidrs
                .iter()
                .filter(|c| c.family() == family)
                .copied()
                .collect()
        };
        Self {
            vpc_cidrs: keep(&self.vpc_cidrs),
            pod_sources: keep(&self.pod_sources),
        }
    }
}

/// The rules of [`CHAIN`], in order, as iptables arguments after `-A CHAIN`.
pub fn chain_rules(spec: &SnatSpec) -> Vec<Vec<String>> {
    let mut rules = Vec::new();
    for cidr in &spec.vpc_cidrs {
        rules.push(vec![
            "-d".into(),
            cidr.to_string(),
            "-j".into(),
            "RETURN".into(),
        ]);
    }
    for src in &spec.pod_sources {
        rules.push(vec![
            "-s".into(),
            src.to_string(),
            "-j".into(),
            "MASQUERADE".into(),
            "--random-fully".into(),
        ]);
    }
    rules
}

fn jump_rule() -> Vec<String> {
    ["-m", "comment", "--comment", JUMP_COMMENT, "-j", CHAIN]
        .map(str::to_owned)
        .to_vec()
}

/// Runs `iptables -w -t nat <args>` (`ip6tables` for IPv6); `Ok(false)`
/// when it exits 1 (a `-C` that found nothing, a missing chain), an error
/// for anything else.
fn iptables(family: Family, args: &[&str]) -> Result<bool, SnatError> {
    let out = Command::new(binary(family))
        .args(["-w", "-t", "nat"])
        .args(args)
        .output()
        .map_err(|e| SnatError {
            args: format!("{} {}", binary(family), args.join(" ")),
            message: e.to_string(),
        })?;
    match out.status.code() {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        _ => Err(SnatError {
            args: format!("{} {}", binary(family), args.join(" ")),
            message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        }),
    }
}

fn with<'a>(head: &[&'a str], rule: &'a [String]) -> Vec<&'a str> {
    head.iter()
        .copied()
        .chain(rule.iter().map(String::as_str))
        .collect()
}

/// Rules currently in [`CHAIN`] (`-S` lines starting with `-A`), or `None`
/// when the chain does not exist.
fn chain_listing(family: Family) -> Result<Option<usize>, SnatError> {
    let out = match Command::new(binary(family))
        .args(["-w", "-t", "nat", "-S", CHAIN])
        .output()
    {
        Ok(out) => out,
        // No such binary: no such chain (a node without ip6tables has no
        // IPv6 chain to remove; adding one fails at `-N` with the reason).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(SnatError {
                args: format!("{} -S {CHAIN}", binary(family)),
                message: e.to_string(),
            })
        }
    };
    if !out.status.success() {
        return Ok(None);
    }
    Ok(Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("-A "))
            .count(),
    ))
}

/// Brings each family's chain and jump to `spec`: a family with pod sources
/// gets its chain, one without has none. Returns whether anything changed.
pub fn reconcile(spec: &SnatSpec) -> Result<bool, SnatError> {
    let mut changed = false;
    for family in [Family::V4, Family::V6] {
        let part = spec.of(family);
        changed |= if part.pod_sources.is_empty() {
            remove_family(family)?
        } else {
            reconcile_family(family, &part)?
        };
    }
    Ok(changed)
}

fn reconcile_family(family: Family, spec: &SnatSpec) -> Result<bool, SnatError> {
    let iptables = |args: &[&str]| iptables(family, args);
    let rules = chain_rules(spec);
    let mut changed = false;
    let present = match chain_listing(family)? {
        None => {
            iptables(&["-N", CHAIN])?;
            changed = true;
            Some(0)
        }
        n => n,
    };
    let mut in_place = present == Some(rules.len());
    if in_place {
        for rule in &rules {
            if !iptables(&with(&["-C", CHAIN], rule))? {
                in_place = false;
                break;
            }
        }
    }
    if !in_place {
        iptables(&["-F", CHAIN])?;
        for rule in &rules {
            iptables(&with(&["-A", CHAIN], rule))?;
        }
        changed = true;
    }
    let jump = jump_rule();
    if !iptables(&with(&["-C", "POSTROUTING"], &jump))? {
        iptables(&with(&["-A", "POSTROUTING"], &jump))?;
        changed = true;
    }
    Ok(changed)
}

/// Removes both families' jumps and chains; nothing else. Returns whether
/// anything was there.
pub fn remove() -> Result<bool, SnatError> {
    let v4 = remove_family(Family::V4)?;
    let v6 = remove_family(Family::V6)?;
    Ok(v4 || v6)
}

fn remove_family(family: Family) -> Result<bool, SnatError> {
    let iptables = |args: &[&str]| iptables(family, args);
    // A jump cannot exist without its chain, and `-C` of a jump to a missing
    // chain is an error (exit 2), not "not found".
    if chain_listing(family)?.is_none() {
        return Ok(false);
    }
    let jump = jump_rule();
    let mut removed = false;
    // Bounded: a duplicated jump is removed too, but never loop forever.
    for _ in 0..16 {
        if !iptables(&with(&["-C", "POSTROUTING"], &jump))? {
            break;
        }
        iptables(&with(&["-D", "POSTROUTING"], &jump))?;
        removed = true;
    }
    if chain_listing(family)?.is_some() {
        iptables(&["-F", CHAIN])?;
        iptables(&["-X", CHAIN])?;
        removed = true;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_family_gets_its_own_part() {
        let spec = SnatSpec {
            vpc_cidrs: vec![
                "10.0.0.0/16".parse().unwrap(),
                "fd00:99::/32".parse().unwrap(),
            ],
            pod_sources: vec!["fd00:99:1::2/128".parse().unwrap()],
        };
        let v6: Vec<String> = chain_rules(&spec.of(Family::V6))
            .iter()
            .map(|r| r.join(" "))
            .collect();
        assert_eq!(
            v6,
            [
                "-d fd00:99::/32 -j RETURN",
                "-s fd00:99:1::2/128 -j MASQUERADE --random-fully"
            ]
        );
        assert!(spec.of(Family::V4).pod_sources.is_empty());
        assert_eq!(binary(Family::V6), "ip6tables");
    }

    #[test]
    fn rules_return_for_the_vpc_then_masquerade_pods() {
        let spec = SnatSpec {
            vpc_cidrs: vec!["10.0.0.0/16".parse().unwrap()],
            pod_sources: vec!["10.0.1.0/24".parse().unwrap()],
        };
        let rules: Vec<String> = chain_rules(&spec).iter().map(|r| r.join(" ")).collect();
        assert_eq!(
            rules,
            [
                "-d 10.0.0.0/16 -j RETURN",
                "-s 10.0.1.0/24 -j MASQUERADE --random-fully"
            ]
        );
    }
}
