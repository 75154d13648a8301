//! The simulated node: a node namespace with the real agent (IPAM from a
//! node CIDR), a server namespace behind it, and pods created through the
//! shipped CNI chain run by libcni.

use std::{
    cell::RefCell,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
};

use anyhow::{bail, Context as _, Result};
use podnet_tests::{
    cni::{self, Attachment, CniEnv},
    Agent, Netns, Topology,
};
use serde_json::Value;

use crate::report::{self, Agreement};

/// The demo's pods: (namespace, pod).
pub const PODS: [(&str, &str); 4] = [
    ("shop", "cart-7d9f"),
    ("shop", "checkout-5c2a"),
    ("web", "frontend-8b1e"),
    ("batch", "report-0f3d"),
];
/// The node's pod CIDR, as the node IPAM of a cluster would give it.
pub const NODE_CIDR: &str = "10.244.7.0/24";
/// How long the agent waits for a DNS answer before counting a timeout.
pub const DNS_TIMEOUT: &str = "2s";
/// Answers slower than this are recorded as slow (`podnetctl dns slow`).
pub const DNS_SLOW_THRESHOLD: &str = "200ms";

/// A pod made through CNI ADD.
pub struct DemoPod {
    /// Kubernetes namespace.
    pub namespace: &'static str,
    /// Pod name.
    pub name: &'static str,
    /// The pod's network namespace.
    pub netns: Netns,
    /// What libcni was given for it.
    pub attachment: Attachment,
    /// Its address, from podnet's IPAM.
    pub ip: Ipv4Addr,
    /// Its default gateway, from podnet's IPAM.
    pub gateway: String,
    /// The host side of its veth.
    pub host_if: String,
}

/// The node, its agent and its pods.
pub struct Node {
    /// Node and server namespaces.
    pub topo: Topology,
    /// The real agent in the node namespace.
    pub agent: Agent,
    cni: CniEnv,
    conflist: PathBuf,
    /// Pods made so far.
    pub pods: RefCell<Vec<DemoPod>>,
}

impl Node {
    /// Builds the namespaces and starts the agent.
    pub fn build() -> Result<Self> {
        cni::available().context("libcni's runner and the reference plugins")?;
        let topo = Topology::builder().name("demo").pods(0).build()?;
        let agent = Agent::start_with(
            topo.node(),
            &[],
            &[
                "--node-cidr",
                NODE_CIDR,
                "--dns-timeout",
                DNS_TIMEOUT,
                "--dns-slow-threshold",
                DNS_SLOW_THRESHOLD,
            ],
        )?;
        let cni = CniEnv::new()?;
        let conflist = cni.ptp_chain("podnet", &agent.socket())?;
        Ok(Self {
            topo,
            agent,
            cni,
            conflist,
            pods: RefCell::new(Vec::new()),
        })
    }

    /// Runs CNI ADD for every pod of [`PODS`].
    pub fn create_pods(&self) -> Result<()> {
        report::step(
            2,
            &format!(
                "creating {} pods through CNI ADD (ptp + podnet IPAM + podnet-cni, run by libcni)",
                PODS.len()
            ),
            || {
                for (i, (namespace, name)) in PODS.into_iter().enumerate() {
                    let netns = Netns::new("demopod")?;
                    let attachment =
                        Attachment::pod(&format!("demo{i:02}"), &netns, namespace, name);
                    let result = self
                        .cni
                        .run(self.topo.node(), "ADD", &self.conflist, &attachment, None)?
                        .json()
                        .with_context(|| format!("CNI ADD of {namespace}/{name}"))?;
                    let (ip, gateway) = address(&result)?;
                    let host_if = host_interface(&result)?;
                    self.pods.borrow_mut().push(DemoPod {
                        namespace,
                        name,
                        netns,
                        attachment,
                        ip,
                        gateway,
                        host_if,
                    });
                }
                Ok(())
            },
        )
    }

    /// Prints each pod with its address and the kernel's rules and routes
    /// for it, and adds the routing agreement lines.
    pub fn print_pods(&self, agreement: &mut Agreement) -> Result<()> {
        report::section(&format!(
            "Pods (addresses from podnet's IPAM, node CIDR {NODE_CIDR}; the kernel's rules and routes for each)"
        ));
        let rules = self.kernel_lines(&["ip", "rule", "show"])?;
        let routes = self.kernel_lines(&["ip", "route", "show", "table", "all"])?;
        for pod in self.pods.borrow().iter() {
            println!(
                "  {:<22} {:<15} gateway {:<13} host interface {}",
                format!("{}/{}", pod.namespace, pod.name),
                pod.ip,
                pod.gateway,
                pod.host_if
            );
            let ip = pod.ip.to_string();
            for line in rules
                .iter()
                .chain(&routes)
                .filter(|l| mentions_address(l, &ip))
            {
                println!("      {line}");
            }
        }
        // The routing thread acts on each ADD at once; wait (bounded) for
        // its reconcile to have put everything in place.
        let mut view = Value::Null;
        podnet_tests::wait_for(
            || {
                view = self
                    .agent
                    .api("routes.show", Value::Null)
                    .unwrap_or(Value::Null);
                let (desired, not_ok) = route_view_counts(&view);
                desired > 0 && not_ok == 0
            },
            std::time::Duration::from_secs(10),
        );
        let (desired, not_ok) = route_view_counts(&view);
        let metrics = self.agent.metrics(self.topo.node())?;
        let allocated = metrics.count("podnet_ipam_addresses", &[("state", "allocated")]);
        agreement.exact(
            "IPAM addresses allocated",
            allocated,
            "pods made through CNI ADD",
            self.pods.borrow().len() as u64,
        );
        agreement.exact(
            "routing objects not as desired",
            not_ok,
            "(desired entries, all present)",
            0,
        );
        println!(
            "  podnet's routing view (podnetctl routes): {desired} objects, {not_ok} not as desired"
        );
        Ok(())
    }

    /// Lines a command prints in the node namespace.
    fn kernel_lines(&self, command: &[&str]) -> Result<Vec<String>> {
        let out = self.topo.node().run_ok(command)?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect())
    }

    /// Removes the pods through CNI DEL, then the agent and the namespaces.
    pub fn teardown(self) -> Result<()> {
        let mut failed = Vec::new();
        for pod in self.pods.borrow().iter() {
            if let Err(e) = self.cni.run(
                self.topo.node(),
                "DEL",
                &self.conflist,
                &pod.attachment,
                None,
            ) {
                failed.push(format!("{}/{}: {e:#}", pod.namespace, pod.name));
            }
        }
        drop(self.pods);
        drop(self.agent);
        drop(self.cni);
        drop(self.topo);
        if !failed.is_empty() {
            bail!("CNI DEL failed for {}", failed.join("; "));
        }
        Ok(())
    }
}

/// The address and gateway of a CNI result's first IP.
fn address(result: &Value) -> Result<(Ipv4Addr, String)> {
    let first = &result["ips"][0];
    let address = first["address"]
        .as_str()
        .context("the CNI result has no address")?;
    let ip: IpAddr = address
        .split('/')
        .next()
        .unwrap_or_default()
        .parse()
        .with_context(|| format!("CNI result address {address:?}"))?;
    let IpAddr::V4(ip) = ip else {
        bail!("the demo's node CIDR is IPv4, got {ip}");
    };
    let gateway = first["gateway"].as_str().unwrap_or("-").to_owned();
    Ok((ip, gateway))
}

/// The host-side interface of a CNI result (the interface without a sandbox).
fn host_interface(result: &Value) -> Result<String> {
    result["interfaces"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| i["sandbox"].as_str().is_none_or(str::is_empty))
        .and_then(|i| i["name"].as_str())
        .map(str::to_owned)
        .context("the CNI result names no host interface")
}

/// Whether an `ip` output line names `ip` as a whole address.
fn mentions_address(line: &str, ip: &str) -> bool {
    line.split_whitespace()
        .any(|w| w == ip || w.strip_prefix(ip).is_some_and(|rest| rest == "/32"))
}

/// (objects, objects whose kernel state is not as desired) of the
/// `routes.show` view; `provided` objects are made by the chain's first plugin.
fn route_view_counts(view: &Value) -> (u64, u64) {
    let lines = view["lines"].as_array().map_or(&[][..], Vec::as_slice);
    let not_ok = lines
        .iter()
        .filter(|l| !matches!(l["state"].as_str(), Some("ok" | "provided")))
        .count();
    (lines.len() as u64, not_ok as u64)
}
