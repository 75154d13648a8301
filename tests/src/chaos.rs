//! Helpers for chaos tests: a seeded random number generator whose seed is
//! printed and can be replayed, and the kernel's own views of a node that
//! churn must leave consistent (pod addresses, host routes, tcx attachments).

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{anyhow, Context as _, Result};
use serde_json::Value;

use crate::netns::{in_netns, Netns};

/// Environment variable that replays a run: the seed it printed.
pub const SEED_ENV: &str = "PODNET_CHAOS_SEED";

/// The seed of this run: [`SEED_ENV`] (decimal or `0x` hex) if set, else
/// one taken from the clock and the process id.
///
/// # Panics
/// If [`SEED_ENV`] is set but is not a number.
pub fn seed() -> u64 {
    if let Ok(text) = std::env::var(SEED_ENV) {
        let text = text.trim();
        let parsed = match text.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => text.parse(),
        };
        return parsed.unwrap_or_else(|e| panic!("{SEED_ENV}={text:?} is not a number: {e}"));
    }
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    // Truncation is fine: any 64 bits of the clock make a seed.
    #[allow(clippy::cast_possible_truncation)]
    let nanos = nanos as u64;
    nanos ^ u64::from(std::process::id()).rotate_left(32)
}

/// A small deterministic generator (SplitMix64): the same seed gives the
/// same sequence on every machine.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator starting from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    ///
    /// # Panics
    /// If `n` is 0.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "Rng::below(0)");
        self.next_u64() % n
    }

    /// An index in `0..n` (`n` > 0).
    ///
    /// # Panics
    /// If `n` is 0.
    pub fn index(&mut self, n: usize) -> usize {
        // usize fits in u64 on every supported target, and the result is below n.
        #[allow(clippy::cast_possible_truncation)]
        let i = self.below(n as u64) as usize;
        i
    }

    /// `k` distinct indices in `0..n`, sorted (all of them if `k >= n`).
    pub fn distinct_sorted(&mut self, k: usize, n: usize) -> Vec<usize> {
        let mut all: Vec<usize> = (0..n).collect();
        // Partial Fisher–Yates: the first k places are a uniform sample.
        let k = k.min(n);
        for i in 0..k {
            let j = i + self.index(n - i);
            all.swap(i, j);
        }
        let mut picked = all[..k].to_vec();
        picked.sort_unstable();
        picked
    }
}

/// The CNI error code a failed runner or plugin call reported: the runner's
/// `cni_error_code=N` line, or the `"code"` of a CNI error JSON.
pub fn cni_error_code(text: &str) -> Option<u32> {
    if let Some((_, rest)) = text.split_once("cni_error_code=") {
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        return digits.parse().ok();
    }
    serde_json::from_str::<Value>(text.trim())
        .ok()?
        .get("code")?
        .as_u64()
        .and_then(|c| u32::try_from(c).ok())
}

fn json_of(netns: &Netns, cmd: &[&str]) -> Result<Value> {
    let out = netns.run_ok(cmd)?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Ok(Value::Array(Vec::new()));
    }
    serde_json::from_str(&text).with_context(|| format!("`{}` printed {text:?}", cmd.join(" ")))
}

/// The IPv4 addresses of `ifname` in `netns` (`ip -j addr show dev`), or
/// none when the interface does not exist.
pub fn ipv4_addrs(netns: &Netns, ifname: &str) -> Result<Vec<Ipv4Addr>> {
    let exists = netns
        .run(&["ip", "link", "show", "dev", ifname])?
        .status
        .success();
    if !exists {
        return Ok(Vec::new());
    }
    let v = json_of(netns, &["ip", "-j", "addr", "show", "dev", ifname])?;
    let mut out = Vec::new();
    for link in v.as_array().into_iter().flatten() {
        for a in link["addr_info"].as_array().into_iter().flatten() {
            if a["family"] == "inet" {
                let local = a["local"]
                    .as_str()
                    .ok_or_else(|| anyhow!("address without local: {a}"))?;
                out.push(local.parse()?);
            }
        }
    }
    Ok(out)
}

/// Host routes (`/32`) of the main table in `netns`, destination → device;
/// with `proto`, only the routes of that protocol (e.g. `176`).
pub fn host_routes(netns: &Netns, proto: Option<&str>) -> Result<BTreeMap<Ipv4Addr, String>> {
    let mut cmd = vec!["ip", "-j", "-4", "route", "show", "table", "main"];
    if let Some(p) = proto {
        cmd.extend(["proto", p]);
    }
    let v = json_of(netns, &cmd)?;
    let mut out = BTreeMap::new();
    for r in v.as_array().into_iter().flatten() {
        let dst = r["dst"].as_str().unwrap_or_default();
        let dst = dst.strip_suffix("/32").unwrap_or(dst);
        if let Ok(ip) = dst.parse::<Ipv4Addr>() {
            out.insert(ip, r["dev"].as_str().unwrap_or_default().to_owned());
        }
    }
    Ok(out)
}

/// Names of the links in `netns`.
pub fn link_names(netns: &Netns) -> Result<Vec<String>> {
    let v = json_of(netns, &["ip", "-j", "link", "show"])?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["ifname"].as_str().map(str::to_owned))
        .collect())
}

/// Program ids on an interface's tcx hooks: (ingress, egress), in order.
pub type TcxPrograms = (Vec<u32>, Vec<u32>);

/// Programs attached to tcx hooks in `netns`, asked of the kernel
/// (`BPF_PROG_QUERY`): interface → programs, for every interface that has
/// at least one.
pub fn tcx_attachments(netns: &Netns) -> Result<BTreeMap<String, TcxPrograms>> {
    use podnet::dns::attach::{tcx_program_ids, Direction};
    let names = link_names(netns)?;
    in_netns(netns, move || -> Result<_> {
        let mut out = BTreeMap::new();
        for name in names {
            let ingress = tcx_program_ids(&name, Direction::Ingress)
                .map_err(|e| anyhow!("tcx query {name}: {e}"))?;
            let egress = tcx_program_ids(&name, Direction::Egress)
                .map_err(|e| anyhow!("tcx query {name}: {e}"))?;
            if !ingress.is_empty() || !egress.is_empty() {
                out.insert(name, (ingress, egress));
            }
        }
        Ok(out)
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_deterministic_and_bounded() {
        let mut a = Rng::new(42);
        let mut b = Rng::new(42);
        let xs: Vec<u64> = (0..100).map(|_| a.below(7)).collect();
        let ys: Vec<u64> = (0..100).map(|_| b.below(7)).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().all(|x| *x < 7));
        let picked = Rng::new(1).distinct_sorted(5, 20);
        assert_eq!(picked.len(), 5);
        assert!(picked.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(Rng::new(1).distinct_sorted(30, 3), vec![0, 1, 2]);
    }

    #[test]
    fn error_codes_from_runner_and_plugin() {
        assert_eq!(
            cni_error_code("cni_error_code=100\nplugin failed"),
            Some(100)
        );
        assert_eq!(
            cni_error_code("cni-runner DEL failed (exit status: 1): cni_error_code=100\nx"),
            Some(100)
        );
        assert_eq!(
            cni_error_code(r#"{"cniVersion":"1.0.0","code":11,"msg":"x"}"#),
            Some(11)
        );
        assert_eq!(cni_error_code("plain failure"), None);
    }
}
