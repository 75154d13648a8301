//! podnet-demo: podnet's three jobs on a simulated node. Run through
//! `cargo xtask demo` (which builds everything first).
//!
//! 1. Pods are created the way a container runtime creates them: libcni runs
//!    the shipped chain (`ptp` with podnet's IPAM, then `podnet-cni`), so
//!    each pod gets its address from podnet and podnet installs its routing.
//! 2. The pods open UDP flows at the same moments through SNAT to a tiny
//!    port range: conntrack insert races, each named with its winner.
//! 3. The pods resolve names against a DNS server whose names choose its
//!    behaviour (slow, NXDOMAIN, SERVFAIL, silent, first copy lost): latency
//!    per pod, and the failed queries with what became of them.
//!
//! With `--cluster STATUS` (`cargo xtask demo --cluster`) the same jobs run
//! on the real cluster of `cargo xtask cluster up` instead (see [`cluster`]).
//!
//! Each section ends with agreement lines: podnet's count against the
//! kernel's own counter or what the clients themselves saw. Everything lives
//! in network namespaces this program creates and removes, also on Ctrl-C;
//! traffic goes only to addresses inside them.

mod cluster;
mod dns;
mod node;
mod races;
mod report;

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Instant,
};

use anyhow::{bail, Context as _, Result};
use podnet_tests::require_root;

use crate::report::Agreement;

/// Set by SIGINT/SIGTERM: stop the traffic, summarise, tear down.
pub static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Whether Ctrl-C (or SIGTERM) asked the demo to stop.
pub fn stopping() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Longest and shortest race phase, in seconds.
const SECONDS_RANGE: std::ops::RangeInclusive<u64> = 1..=600;

struct Options {
    seconds: u64,
    /// The status file of a running cluster, for the cluster demo.
    cluster: Option<std::path::PathBuf>,
}

fn options() -> Result<Options> {
    let mut seconds = 20;
    let mut cluster = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--seconds" => {
                seconds = args
                    .next()
                    .context("--seconds needs a value")?
                    .parse()
                    .context("--seconds: not a number")?;
            }
            "--cluster" => {
                cluster = Some(args.next().context("--cluster needs a status file")?.into());
            }
            "-h" | "--help" => {
                println!("podnet-demo [--seconds N]  (race traffic for N s; default 20, 1 to 600)");
                println!("podnet-demo --cluster STATUS  (on the cluster `cargo xtask cluster status --json` describes)");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    if !SECONDS_RANGE.contains(&seconds) {
        bail!("--seconds must be between 1 and 600");
    }
    Ok(Options { seconds, cluster })
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("podnet-demo: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let options = options()?;
    if !require_root() {
        bail!("the demo needs root (network namespaces, iptables, eBPF)");
    }
    // SAFETY: on_signal only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let started = Instant::now();
    if let Some(status) = &options.cluster {
        println!("podnet demo: the three jobs on the real cluster of `cargo xtask cluster up`");
        let mut agreement = Agreement::default();
        let outcome = cluster::run(status, &mut agreement);
        agreement.print();
        println!("done in {:.0} s.", started.elapsed().as_secs_f64());
        outcome?;
        return agreement.check();
    }
    println!("podnet demo: one simulated node (network namespaces), the real agent, three jobs");
    let node = report::step(1, "building the node, a server and the agent", || {
        node::Node::build()
    })?;
    let mut agreement = Agreement::default();
    let outcome = (|| -> Result<()> {
        node.create_pods()?;
        node.print_pods(&mut agreement)?;
        if !stopping() {
            races::run(&node, options.seconds, &mut agreement)?;
        }
        if !stopping() {
            dns::run(&node, &mut agreement)?;
        }
        Ok(())
    })();
    agreement.print();
    report::where_to_look(&node);
    report::step(
        5,
        "tearing down (pods through CNI DEL, rules, pins, agent)",
        || node.teardown(),
    )?;
    println!("done in {:.0} s.", started.elapsed().as_secs_f64());
    outcome?;
    if stopping() {
        println!("(stopped early by a signal)");
        return Ok(());
    }
    agreement.check()
}
