//! The iptables rules kube-proxy v1.34 (iptables mode) writes on a node, for
//! a synthetic set of Services, loaded into a namespace with
//! `iptables-restore --noflush`, so that a benchmark's node pays what a real
//! node pays.
//!
//! The structure follows `syncProxyRules` in kube-proxy's
//! `pkg/proxy/iptables/proxier.go` (v1.34) and the `iptables-save` dumps its
//! tests expect:
//! - jump rules prepended to the built-in chains (filter `INPUT`, `FORWARD`,
//!   `OUTPUT`; nat `PREROUTING`, `OUTPUT`, `POSTROUTING`), in kube-proxy's
//!   order, so the last one it inserts comes first;
//! - filter: `KUBE-SERVICES`, `KUBE-EXTERNAL-SERVICES`, `KUBE-FORWARD`,
//!   `KUBE-NODEPORTS`, `KUBE-PROXY-FIREWALL`, `KUBE-FIREWALL`;
//! - nat: `KUBE-SERVICES` (one rule per cluster IP, then the `KUBE-NODEPORTS`
//!   tail rule), `KUBE-NODEPORTS`, `KUBE-POSTROUTING` (MASQUERADE of marked
//!   traffic, `--random-fully`), `KUBE-MARK-MASQ`, and per service port
//!   `KUBE-SVC-<hash>` (masquerade of off-cluster sources, then one rule per
//!   endpoint with `statistic --mode random --probability 1/n`),
//!   `KUBE-EXT-<hash>` for node ports and `KUBE-SEP-<hash>` per endpoint
//!   (hairpin masquerade, DNAT);
//! - chain names hash the service port name and protocol (and the endpoint)
//!   with SHA-256, base32, first 16 characters, as kube-proxy does;
//! - above 1,000 endpoints ("large cluster mode") the per-endpoint rules
//!   carry no comment.
//!
//! What it leaves out: load balancer and external IPs, session affinity,
//! `Local` traffic policies, and the localhost node port rules that need
//! `nfacct` counters.

use std::{fmt::Write as _, io::Write as _, net::Ipv4Addr, process::Stdio};

use anyhow::{bail, Context as _, Result};
use sha2::{Digest as _, Sha256};

use crate::netns::Netns;

/// kube-proxy's masquerade mark (`--iptables-masquerade-bit` 14).
const MASQ_MARK: &str = "0x4000";
/// Above this many endpoints kube-proxy drops the per-endpoint comments.
const LARGE_CLUSTER_ENDPOINTS: usize = 1000;
/// The cluster IP of the first Service; the others follow it (kube-apiserver's
/// default service range is 10.96.0.0/12).
pub const FIRST_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 1, 0);
/// First node port (the default range is 30000-32767).
const FIRST_NODE_PORT: u16 = 30000;
/// The Services' port.
pub const SERVICE_PORT: u16 = 80;
/// Their endpoints' port.
pub const TARGET_PORT: u16 = 8080;

/// The Services kube-proxy is given: every one a TCP Service with a cluster IP, a
/// port named `http`, the same number of endpoints each, and every
/// `node_port_every`-th one also a node port.
#[derive(Clone, Debug)]
pub struct Services {
    /// Number of Services.
    pub count: usize,
    /// Endpoints per Service.
    pub endpoints: usize,
    /// Every this many Services one is a node port Service (0: none).
    pub node_port_every: usize,
    /// The cluster's pod range (kube-proxy's `--cluster-cidr`, local traffic
    /// detection): traffic to a cluster IP from outside it is masqueraded.
    pub cluster_cidr: String,
    /// First endpoint address; endpoints are consecutive from it.
    pub first_endpoint: Ipv4Addr,
}

/// The rules for a [`Services`] set: the `iptables-restore --noflush` input
/// and how many rules and chains it has.
#[derive(Clone, Debug)]
pub struct Ruleset {
    /// The input for `iptables-restore --noflush`.
    pub restore_input: String,
    /// Rules appended to kube-proxy's own nat chains.
    pub nat_rules: usize,
    /// Rules appended to kube-proxy's own filter chains.
    pub filter_rules: usize,
    /// kube-proxy's nat chains (`KUBE-SVC-*`, `KUBE-SEP-*`, ... included).
    pub nat_chains: usize,
    /// Jump rules inserted into the built-in chains of the filter table.
    pub filter_jumps: usize,
    /// Jump rules inserted into the built-in chains of the nat table.
    pub nat_jumps: usize,
}

/// `hash` as kube-proxy names chains: SHA-256, standard base32, the first 16
/// characters (80 bits: the first 10 bytes of the digest).
fn chain_hash(input: &str) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let digest = Sha256::digest(input.as_bytes());
    let bits = digest[..10]
        .iter()
        .fold(0u128, |acc, byte| (acc << 8) | u128::from(*byte));
    (0..16)
        .map(|i| {
            // 16 groups of 5 bits, most significant first; the mask keeps
            // the index below 32.
            let index = usize::try_from((bits >> (75 - 5 * i)) & 0x1f).unwrap_or(0);
            char::from(ALPHABET[index])
        })
        .collect()
}

/// `KUBE-SVC-…` (or `KUBE-EXT-…` with `prefix`) of a service port, e.g.
/// `ns1/svc1:p80` and `tcp`.
fn service_chain(prefix: &str, port_name: &str, protocol: &str) -> String {
    format!("{prefix}{}", chain_hash(&format!("{port_name}{protocol}")))
}

/// `KUBE-SEP-…` of one endpoint (`ip:port`) of a service port.
fn endpoint_chain(port_name: &str, protocol: &str, endpoint: &str) -> String {
    format!(
        "KUBE-SEP-{}",
        chain_hash(&format!("{port_name}{protocol}{endpoint}"))
    )
}

/// kube-proxy's probability for the i-th of n remaining endpoints, `1/n` with
/// ten decimals.
fn probability(remaining: usize) -> String {
    #[allow(clippy::cast_precision_loss)] // endpoint counts are small
    let p = 1.0 / remaining as f64;
    format!("{p:.10}")
}

/// The address `offset` places after `base`; fails past the IPv4 space.
fn nth_address(base: Ipv4Addr, offset: usize) -> Result<Ipv4Addr> {
    let offset = u32::try_from(offset).context("address offset")?;
    u32::from(base)
        .checked_add(offset)
        .map(Ipv4Addr::from)
        .with_context(|| format!("{base} + {offset} leaves the IPv4 space"))
}

/// The jump rules kube-proxy prepends to built-in chains, in the order it
/// inserts them (`iptablesJumpChains`, then the kubelet-compatible
/// `KUBE-FIREWALL` ones): table, built-in chain, rule arguments.
const JUMPS: &[(&str, &str, &str)] = &[
    ("filter", "INPUT", "-m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES"),
    ("filter", "FORWARD", "-m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES"),
    ("filter", "INPUT", "-m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS"),
    ("filter", "FORWARD", "-m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"),
    ("filter", "OUTPUT", "-m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"),
    ("filter", "FORWARD", "-m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD"),
    ("filter", "INPUT", "-m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL"),
    ("filter", "OUTPUT", "-m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL"),
    ("filter", "FORWARD", "-m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL"),
    ("nat", "OUTPUT", "-m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"),
    ("nat", "PREROUTING", "-m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES"),
    ("nat", "POSTROUTING", "-m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING"),
    ("filter", "INPUT", "-j KUBE-FIREWALL"),
    ("filter", "OUTPUT", "-j KUBE-FIREWALL"),
];

/// Lines of one table: chain declarations, then rules.
#[derive(Default)]
struct Table {
    chains: Vec<String>,
    rules: Vec<String>,
}

impl Table {
    fn chain(&mut self, name: &str) {
        self.chains.push(format!(":{name} - [0:0]"));
    }

    fn rule(&mut self, rule: String) {
        self.rules.push(rule);
    }

    fn write(&self, out: &mut String, name: &str, jumps: &[String]) {
        let _ = writeln!(out, "*{name}");
        for line in self.chains.iter().chain(jumps).chain(&self.rules) {
            let _ = writeln!(out, "{line}");
        }
        let _ = writeln!(out, "COMMIT");
    }
}

impl Services {
    /// The rules kube-proxy writes for these Services.
    ///
    /// # Errors
    /// If the addresses or node ports run out.
    pub fn ruleset(&self) -> Result<Ruleset> {
        let mut filter = Table::default();
        let mut nat = Table::default();
        for chain in [
            "KUBE-SERVICES",
            "KUBE-EXTERNAL-SERVICES",
            "KUBE-FORWARD",
            "KUBE-NODEPORTS",
            "KUBE-PROXY-FIREWALL",
        ] {
            filter.chain(chain);
        }
        for chain in [
            "KUBE-SERVICES",
            "KUBE-NODEPORTS",
            "KUBE-POSTROUTING",
            "KUBE-MARK-MASQ",
        ] {
            nat.chain(chain);
        }
        nat.rule(format!(
            "-A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN"
        ));
        nat.rule(format!(
            "-A KUBE-POSTROUTING -j MARK --xor-mark {MASQ_MARK}"
        ));
        nat.rule(
            "-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully".into(),
        );
        nat.rule(format!("-A KUBE-MARK-MASQ -j MARK --or-mark {MASQ_MARK}"));
        filter.chain("KUBE-FIREWALL");
        filter.rule(
            "-A KUBE-FIREWALL -m comment --comment \"block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP".into(),
        );
        let large_cluster = self.count * self.endpoints > LARGE_CLUSTER_ENDPOINTS;
        for i in 0..self.count {
            self.service(i, large_cluster, &mut nat)?;
        }
        nat.rule(
            "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS".into(),
        );
        filter.rule("-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP".into());
        filter.rule(format!(
            "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT"
        ));
        filter.rule(
            "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT".into(),
        );
        let jumps = |table: &str| -> Vec<String> {
            JUMPS
                .iter()
                .filter(|(t, _, _)| *t == table)
                .map(|(_, chain, rule)| format!("-I {chain} 1 {rule}"))
                .collect()
        };
        let (filter_jumps, nat_jumps) = (jumps("filter"), jumps("nat"));
        let mut restore_input = String::new();
        filter.write(&mut restore_input, "filter", &filter_jumps);
        nat.write(&mut restore_input, "nat", &nat_jumps);
        Ok(Ruleset {
            restore_input,
            nat_rules: nat.rules.len(),
            filter_rules: filter.rules.len(),
            nat_chains: nat.chains.len(),
            filter_jumps: filter_jumps.len(),
            nat_jumps: nat_jumps.len(),
        })
    }

    /// The rules of Service `i`, in the order kube-proxy writes them.
    fn service(&self, i: usize, large_cluster: bool, nat: &mut Table) -> Result<()> {
        let port_name = format!("bench-{}/svc{i}:http", i % 10);
        let cluster_ip = nth_address(FIRST_CLUSTER_IP, i)?;
        let svc = service_chain("KUBE-SVC-", &port_name, "tcp");
        let cluster = format!(
            "-m comment --comment \"{port_name} cluster IP\" -m tcp -p tcp -d {cluster_ip} --dport {SERVICE_PORT}"
        );
        nat.rule(format!("-A KUBE-SERVICES {cluster} -j {svc}"));
        let node_port = self.node_port_every > 0 && i.is_multiple_of(self.node_port_every);
        let ext = service_chain("KUBE-EXT-", &port_name, "tcp");
        if node_port {
            let port = u16::try_from(i)
                .ok()
                .and_then(|i| FIRST_NODE_PORT.checked_add(i))
                .filter(|p| *p <= 32767)
                .with_context(|| format!("no NodePort left for Service {i}"))?;
            nat.rule(format!(
                "-A KUBE-NODEPORTS -m comment --comment {port_name} -m tcp -p tcp --dport {port} -j {ext}"
            ));
        }
        nat.rule(format!(
            "-A {svc} {cluster} ! -s {} -j KUBE-MARK-MASQ",
            self.cluster_cidr
        ));
        if node_port {
            nat.chain(&ext);
            nat.rule(format!(
                "-A {ext} -m comment --comment \"masquerade traffic for {port_name} external destinations\" -j KUBE-MARK-MASQ"
            ));
            nat.rule(format!("-A {ext} -j {svc}"));
        }
        nat.chain(&svc);
        let endpoints: Vec<String> = (0..self.endpoints)
            .map(|e| {
                nth_address(self.first_endpoint, i * self.endpoints + e)
                    .map(|ip| format!("{ip}:{TARGET_PORT}"))
            })
            .collect::<Result<_>>()?;
        let comment = |text: String| {
            if large_cluster {
                String::new()
            } else {
                format!(" -m comment --comment {text}")
            }
        };
        for (e, endpoint) in endpoints.iter().enumerate() {
            let sep = endpoint_chain(&port_name, "tcp", endpoint);
            let pick = if e + 1 < endpoints.len() {
                format!(
                    " -m statistic --mode random --probability {}",
                    probability(endpoints.len() - e)
                )
            } else {
                String::new()
            };
            let note = comment(format!("\"{port_name} -> {endpoint}\""));
            nat.rule(format!("-A {svc}{note}{pick} -j {sep}"));
        }
        for endpoint in &endpoints {
            let sep = endpoint_chain(&port_name, "tcp", endpoint);
            let ip = endpoint.split(':').next().unwrap_or_default();
            nat.chain(&sep);
            let note = comment(port_name.clone());
            nat.rule(format!("-A {sep}{note} -s {ip} -j KUBE-MARK-MASQ"));
            nat.rule(format!(
                "-A {sep}{note} -m tcp -p tcp -j DNAT --to-destination {endpoint}"
            ));
        }
        Ok(())
    }
}

/// Loads `ruleset` into `netns` with `iptables-restore -w --noflush`, as
/// kube-proxy does (rules of other owners stay).
///
/// # Errors
/// If iptables-restore cannot run or rejects the input (its message says
/// which line).
pub fn load(netns: &Netns, ruleset: &Ruleset) -> Result<()> {
    let mut child = netns
        .command(&["iptables-restore", "-w", "--noflush"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting iptables-restore")?;
    child
        .stdin
        .take()
        .context("iptables-restore has no stdin")?
        .write_all(ruleset.restore_input.as_bytes())
        .context("writing to iptables-restore")?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "iptables-restore in netns {} failed ({}): {}",
            netns.name(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Rules in `table` of `netns` (`iptables-save`) that name a `KUBE-` chain:
/// what kube-proxy owns there, jumps from built-in chains included.
///
/// # Errors
/// If iptables-save fails.
pub fn count_rules(netns: &Netns, table: &str) -> Result<usize> {
    let out = netns.run_ok(&["iptables-save", "-t", table])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| (l.starts_with("-A ") || l.starts_with("-I ")) && l.contains("KUBE-"))
        .count())
}

/// Packets that took kube-proxy's nat `PREROUTING` jump to `KUBE-SERVICES`
/// in `netns`: one per new flow forwarded through it (the nat table sees
/// only a flow's first packet), each of which then walks every Service rule.
///
/// # Errors
/// If iptables fails or the jump is missing.
pub fn service_lookups(netns: &Netns) -> Result<u64> {
    let out = netns.run_ok(&[
        "iptables",
        "-w",
        "-t",
        "nat",
        "-L",
        "PREROUTING",
        "-v",
        "-x",
        "-n",
    ])?;
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    listing
        .lines()
        .find(|l| l.contains("KUBE-SERVICES"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("no KUBE-SERVICES jump in nat PREROUTING:\n{listing}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Names from the iptables-save dumps kube-proxy's own tests expect
    // (pkg/proxy/iptables/proxier_test.go).
    #[test]
    fn chain_names_match_kube_proxy() {
        assert_eq!(
            service_chain("KUBE-SVC-", "ns1/svc1:p80", "tcp"),
            "KUBE-SVC-XPGD46QRK7WJZT7O"
        );
        assert_eq!(
            service_chain("KUBE-SVC-", "ns2/svc2:p80", "tcp"),
            "KUBE-SVC-GNZBNJ2PO5MGZ6GT"
        );
        assert_eq!(
            service_chain("KUBE-EXT-", "ns4/svc4:p80", "tcp"),
            "KUBE-EXT-4SW47YFZTEDKD3PK"
        );
        assert_eq!(
            endpoint_chain("ns1/svc1:p80", "tcp", "10.180.0.1:80"),
            "KUBE-SEP-SXIVWICOYRO3J4NJ"
        );
        assert_eq!(
            endpoint_chain("ns4/svc4:p80", "tcp", "10.180.0.4:80"),
            "KUBE-SEP-UKSFD7AGPMPPLUHC"
        );
        assert_eq!(
            endpoint_chain("ns4/svc4:p80", "tcp", "10.180.0.5:80"),
            "KUBE-SEP-C6EBXVWJJZMIWKLZ"
        );
    }

    fn services(count: usize) -> Services {
        Services {
            count,
            endpoints: 2,
            node_port_every: 10,
            cluster_cidr: "10.0.0.0/16".into(),
            first_endpoint: Ipv4Addr::new(10, 0, 32, 2),
        }
    }

    #[test]
    fn one_service_with_two_endpoints_as_kube_proxy_writes_it() {
        let rules = services(1).ruleset().unwrap();
        let svc = service_chain("KUBE-SVC-", "bench-0/svc0:http", "tcp");
        let ext = service_chain("KUBE-EXT-", "bench-0/svc0:http", "tcp");
        let sep = |ep: &str| endpoint_chain("bench-0/svc0:http", "tcp", ep);
        let (a, b) = (sep("10.0.32.2:8080"), sep("10.0.32.3:8080"));
        let nat = rules.restore_input.split("*nat\n").nth(1).unwrap();
        let expected = [
            format!("-A KUBE-SERVICES -m comment --comment \"bench-0/svc0:http cluster IP\" -m tcp -p tcp -d 10.96.1.0 --dport 80 -j {svc}"),
            format!("-A KUBE-NODEPORTS -m comment --comment bench-0/svc0:http -m tcp -p tcp --dport 30000 -j {ext}"),
            format!("-A {svc} -m comment --comment \"bench-0/svc0:http cluster IP\" -m tcp -p tcp -d 10.96.1.0 --dport 80 ! -s 10.0.0.0/16 -j KUBE-MARK-MASQ"),
            format!("-A {ext} -m comment --comment \"masquerade traffic for bench-0/svc0:http external destinations\" -j KUBE-MARK-MASQ"),
            format!("-A {ext} -j {svc}"),
            format!("-A {svc} -m comment --comment \"bench-0/svc0:http -> 10.0.32.2:8080\" -m statistic --mode random --probability 0.5000000000 -j {a}"),
            format!("-A {svc} -m comment --comment \"bench-0/svc0:http -> 10.0.32.3:8080\" -j {b}"),
            format!("-A {a} -m comment --comment bench-0/svc0:http -s 10.0.32.2 -j KUBE-MARK-MASQ"),
            format!("-A {a} -m comment --comment bench-0/svc0:http -m tcp -p tcp -j DNAT --to-destination 10.0.32.2:8080"),
            format!("-A {b} -m comment --comment bench-0/svc0:http -s 10.0.32.3 -j KUBE-MARK-MASQ"),
            format!("-A {b} -m comment --comment bench-0/svc0:http -m tcp -p tcp -j DNAT --to-destination 10.0.32.3:8080"),
            "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS".to_owned(),
        ];
        let service_lines: Vec<&str> = nat
            .lines()
            .filter(|l| {
                l.starts_with("-A ")
                    && !l.contains("KUBE-POSTROUTING")
                    && !l.starts_with("-A KUBE-MARK-MASQ ")
            })
            .collect();
        assert_eq!(service_lines, expected);
        assert!(nat.contains(&format!(":{svc} - [0:0]\n")));
        assert!(nat.contains("-I PREROUTING 1 -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n"));
    }

    #[test]
    fn a_thousand_services_are_a_large_cluster() {
        let rules = services(1000).ruleset().unwrap();
        // Per Service: cluster IP, masquerade, 2 endpoint picks, 2 x 2 endpoint
        // rules; per node port (100): the node port rule and 2 EXT rules; and
        // 4 fixed rules (KUBE-POSTROUTING, KUBE-MARK-MASQ) plus the node ports
        // tail rule.
        assert_eq!(rules.nat_rules, 1000 * 8 + 100 * 3 + 5);
        // KUBE-SVC + 2 KUBE-SEP per Service, KUBE-EXT per node port, 4 fixed.
        assert_eq!(rules.nat_chains, 1000 * 3 + 100 + 4);
        assert_eq!(rules.filter_rules, 4);
        assert_eq!((rules.filter_jumps, rules.nat_jumps), (11, 3));
        // Above 1,000 endpoints the endpoint rules carry no comment.
        let svc = service_chain("KUBE-SVC-", "bench-0/svc0:http", "tcp");
        let sep = endpoint_chain("bench-0/svc0:http", "tcp", "10.0.32.2:8080");
        assert!(rules.restore_input.contains(&format!(
            "-A {svc} -m statistic --mode random --probability 0.5000000000 -j {sep}\n"
        )));
        assert!(rules
            .restore_input
            .contains(&format!("-A {sep} -s 10.0.32.2 -j KUBE-MARK-MASQ\n")));
    }

    #[test]
    fn too_many_node_ports_is_an_error() {
        let mut many = services(3000);
        many.node_port_every = 1;
        let err = many.ruleset().unwrap_err().to_string();
        assert!(err.contains("no NodePort left"), "{err}");
    }

    #[test]
    fn probabilities_have_ten_decimals() {
        assert_eq!(probability(2), "0.5000000000");
        assert_eq!(probability(3), "0.3333333333");
    }
}
