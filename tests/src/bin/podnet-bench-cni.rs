//! podnet-bench-cni: ADD and DEL latency of a ptp + podnet IPAM + podnet
//! chained conflist over N pods (default 200), run through libcni as a
//! container runtime runs it, against the real agent in a simulated node.
//!
//! Reports p50/p99 of the whole chain (libcni's view) and of podnet's share:
//! the time podnet-cni spent in its two calls per command (IPAM + chained,
//! measured inside the process), and separately the wall time of one
//! podnet-cni process (exec to exit) for a chained ADD and DEL.
//!
//! Run as root: `cargo run -p podnet-tests --bin podnet-bench-cni [-- PODS]`.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use podnet_tests::{
    cni::{self, Attachment, CniEnv},
    Agent, Netns, Topology,
};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let idx = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

/// Prints one row and returns its figures (ms) as JSON.
fn report(what: &str, mut samples: Vec<Duration>) -> serde_json::Value {
    samples.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let figures = serde_json::json!({
        "n": samples.len(),
        "p50_ms": ms(percentile(&samples, 0.50)),
        "p99_ms": ms(percentile(&samples, 0.99)),
        "max_ms": ms(samples.last().copied().unwrap_or_default()),
    });
    println!(
        "{what:<44} n={:<4} p50={:>8.2} ms  p99={:>8.2} ms  max={:>8.2} ms",
        samples.len(),
        percentile(&samples, 0.50).as_secs_f64() * 1e3,
        percentile(&samples, 0.99).as_secs_f64() * 1e3,
        samples.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
    figures
}

/// Sums podnet-cni's logged durations pairwise (IPAM call + chained call per command).
fn pairs(logged: &[Duration]) -> Vec<Duration> {
    logged.chunks(2).map(|c| c.iter().sum()).collect()
}

fn main() -> Result<()> {
    if !podnet_tests::require_root() {
        bail!("podnet-bench-cni needs root");
    }
    cni::available()?;
    let pods: usize = std::env::args()
        .nth(1)
        .map_or(Ok(200), |s| s.parse())
        .context("PODS")?;
    let topo = Topology::builder().name("cnibench").pods(0).build()?;
    let node = topo.node();
    let agent = Agent::start_with(node, &[], &["--node-cidr", "10.247.0.0/22"])?;
    let env = CniEnv::new()?;
    let list = env.ptp_chain("bench", &agent.socket())?;
    let netns: Vec<Netns> = (0..pods)
        .map(|_| Netns::new("cnibp"))
        .collect::<Result<_>>()?;
    let atts: Vec<Attachment> = netns
        .iter()
        .enumerate()
        .map(|(i, ns)| Attachment::pod(&format!("bench{i:04}"), ns, "bench", &format!("pod-{i}")))
        .collect();
    let mut add = Vec::new();
    for att in &atts {
        add.push(env.run(node, "ADD", &list, att, None)?.elapsed);
    }
    let mut del = Vec::new();
    for att in &atts {
        del.push(env.run(node, "DEL", &list, att, None)?.elapsed);
    }
    let add_podnet = pairs(&cni::logged_durations(&env.log_file(), "ADD")?);
    let del_podnet = pairs(&cni::logged_durations(&env.log_file(), "DEL")?);

    // One podnet-cni process, exec to exit, chained role (what a runtime waits for).
    let socket = agent.socket().display().to_string();
    let log = env.log_file().display().to_string();
    let prev = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"lo"},{"name":"eth0","sandbox":"/proc/self/ns/net"}],"ips":[{"address":"10.250.0.2/24","interface":1}]}"#;
    let conf = format!(
        r#"{{"cniVersion":"1.0.0","name":"direct","type":"podnet-cni","socket":"{socket}","logFile":"{log}","prevResult":{prev}}}"#
    );
    let (mut exec_add, mut exec_del) = (Vec::new(), Vec::new());
    for i in 0..pods {
        let id = format!("direct{i:04}");
        for (command, out) in [("ADD", &mut exec_add), ("DEL", &mut exec_del)] {
            let vars = [
                ("CNI_COMMAND", command),
                ("CNI_CONTAINERID", id.as_str()),
                ("CNI_NETNS", "/proc/self/ns/net"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_PATH", "/usr/lib/cni"),
            ];
            let started = Instant::now();
            let (ok, stdout) = cni::invoke_plugin(&vars, conf.as_bytes())?;
            out.push(started.elapsed());
            if !ok {
                bail!("podnet-cni {command} failed: {stdout}");
            }
        }
    }

    let m = agent.metrics(node)?;
    let agent_mean = |command: &str| {
        let sum = m.value_or_zero(
            "podnet_cni_request_duration_seconds_sum",
            &[("command", command)],
        );
        let count = m.value_or_zero(
            "podnet_cni_request_duration_seconds_count",
            &[("command", command)],
        );
        if count > 0.0 {
            sum / count * 1e3
        } else {
            0.0
        }
    };
    println!("podnet-cni latency, {pods} pods (ptp + podnet IPAM + podnet chained, via libcni)");
    let figures = serde_json::json!({
        "pods": pods,
        "add_chain": report("ADD whole chain", add),
        "add_podnet": report("ADD podnet share (IPAM + chained, in-process)", add_podnet),
        "add_exec": report("ADD one podnet-cni process, exec to exit", exec_add),
        "del_chain": report("DEL whole chain", del),
        "del_podnet": report("DEL podnet share (IPAM + chained, in-process)", del_podnet),
        "del_exec": report("DEL one podnet-cni process, exec to exit", exec_del),
        "agent_mean_add_ms": agent_mean("ADD"),
        "agent_mean_del_ms": agent_mean("DEL"),
    });
    println!(
        "agent-side mean per API call: ADD {:.2} ms, DEL {:.2} ms (checkpoint written and fsynced on every change)",
        agent_mean("ADD"),
        agent_mean("DEL")
    );
    podnet_tests::bench::write_json_figures(&figures)
}
