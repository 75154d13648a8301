//! `cargo xtask test`: the one command that runs all of podnet's tests.

use anyhow::Result;
use clap::Args;

use crate::{cluster, cmd, lint, setup, vmtest};

/// Test threads per test binary. The privileged tests create namespaces with unique names and
/// can run in parallel; two matches the two cores of the reference machines.
const DEFAULT_TEST_THREADS: usize = 2;

/// Options of `cargo xtask test`.
#[derive(Debug, Args)]
pub struct TestArgs {
    /// Test threads per test binary (ignored if the extra arguments set --test-threads).
    #[arg(long, default_value_t = DEFAULT_TEST_THREADS)]
    test_threads: usize,
    /// Skip the distribution-kernel smoke runs (Debian 6.1 under qemu) after the host suite.
    #[arg(long)]
    no_kernel_smoke: bool,
    /// Skip the end-to-end suite on the Kubernetes cluster of `cargo xtask cluster up`.
    #[arg(long)]
    no_cluster: bool,
    /// Extra arguments for `cargo test`, after `--`; a second `--` starts the arguments for
    /// the test binaries, e.g. `cargo xtask test -- race -- --nocapture` (a test name filter,
    /// then a flag for the test binaries).
    #[arg(last = true)]
    cargo_args: Vec<String>,
}

/// Runs setup if anything is missing, the lint checks, builds everything, then runs
/// `cargo test` over the workspace (all but the kernel-side crate, which only builds for the BPF target).
///
/// The test runner's output goes through unchanged; a failing test makes this fail.
pub fn run(args: &TestArgs) -> Result<()> {
    setup::ensure()?;
    lint::run(&lint::LintArgs {})?;
    cmd::run(cmd::cargo().arg("build"))?;
    cmd::run(&mut test_command(args))?;
    if args.no_cluster {
        println!("cluster suite skipped (--no-cluster)");
    } else {
        run_cluster_suite()?;
    }
    if args.no_kernel_smoke {
        println!("kernel smoke run skipped (--no-kernel-smoke)");
        return Ok(());
    }
    for smoke in KERNEL_SMOKE_RUNS {
        println!("kernel smoke run: cargo xtask vm-test {}", smoke.join(" "));
        vmtest::run(&vmtest::VmTestArgs::parse_from(smoke)?)?;
    }
    Ok(())
}

/// The end-to-end suites (tests/tests/cluster*.rs), in the order they run on one cluster.
const CLUSTER_SUITES: &[&str] = &[
    "cluster",
    "cluster_upgrade",
    "cluster_uninstall",
    "cluster_helm",
];

/// Brings the cluster up, runs the end-to-end suite on it (one test at a time: they share
/// the cluster) and takes it down again, also when the suite fails.
fn run_cluster_suite() -> Result<()> {
    println!("cluster suite: cargo xtask cluster up");
    let up = cluster::run_up();
    // In this order: the suite, then a rolling update of podnet, then its uninstall, then
    // podnet installed, cleaned up and uninstalled again with its Helm chart.
    let suite = up.and_then(|()| {
        CLUSTER_SUITES.iter().try_for_each(|suite| {
            cmd::run(
                cmd::cargo()
                    .env(
                        "PODNET_CLUSTER_STATUS",
                        cluster::layout::cluster_path("status.json"),
                    )
                    .args([
                        "test",
                        "-p",
                        "podnet-tests",
                        "--features",
                        "cluster-e2e",
                        "--test",
                        suite,
                        "--",
                        "--test-threads=1",
                    ]),
            )
        })
    });
    if suite.is_err() {
        cluster::keep_logs();
    }
    let down = cluster::down();
    suite.and(down)
}

/// The `cargo xtask vm-test` runs after the host suite, on Debian's 6.1
/// kernel; the whole matrix (over an hour) does not fit the test command's
/// budget.
const KERNEL_SMOKE_RUNS: &[&[&str]] = &[KERNEL_SMOKE_ARGS, KERNEL_SMOKE_IPV6_ARGS];

/// Two tests of the conntrack suite with the default race hook. The
/// host kernel has no kprobes, so this is where `auto` takes the confirm
/// kretprobe, and where `sk_buff`/`nf_conn` offsets come from another
/// kernel's BTF (conntrack a module). Exact race counts, and the hook
/// reported and forced both ways: about 3 minutes under emulation.
const KERNEL_SMOKE_ARGS: &[&str] = &[
    "--kernel",
    "6.1",
    "--suite",
    "conntrack",
    "--hook",
    "auto",
    "--test",
    "deterministic_udp_races_are_attributed_exactly",
    "--test",
    "race_hook_is_reported_and_probe_needs_kprobes",
];

/// The IPv6 fast path where it differs most from the host: the 6.1
/// verifier, classic tc filters (no tcx) and `bpf_fib_lookup` through the
/// policy rules (no `BPF_FIB_LOOKUP_TBID`).
const KERNEL_SMOKE_IPV6_ARGS: &[&str] = &[
    "--kernel",
    "6.1",
    "--suite",
    "routing",
    "--test",
    "fast_path_steers_ipv6_past_netfilter_and_conntrack",
];

fn test_command(args: &TestArgs) -> std::process::Command {
    let (cargo_args, binary_args) = match args.cargo_args.iter().position(|arg| arg == "--") {
        Some(split) => (&args.cargo_args[..split], &args.cargo_args[split + 1..]),
        None => (&args.cargo_args[..], &[][..]),
    };
    let mut test = cmd::cargo();
    test.args(["test", "--workspace", "--exclude", "podnet-ebpf"])
        .args(cargo_args)
        .arg("--");
    let threads_given = binary_args
        .iter()
        .any(|arg| arg == "--test-threads" || arg.starts_with("--test-threads="));
    if !threads_given {
        test.arg(format!("--test-threads={}", args.test_threads));
    }
    test.args(binary_args);
    test
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Vec<String> {
        let args = TestArgs {
            test_threads: 2,
            no_kernel_smoke: false,
            no_cluster: false,
            cargo_args: extra.iter().map(ToString::to_string).collect(),
        };
        test_command(&args)
            .get_args()
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn default_command() {
        assert_eq!(
            args(&[]),
            [
                "test",
                "--workspace",
                "--exclude",
                "podnet-ebpf",
                "--",
                "--test-threads=2"
            ]
        );
    }

    #[test]
    fn extra_arguments_split_at_double_dash() {
        assert_eq!(
            args(&["-p", "podnet-tests", "--", "--nocapture"]),
            [
                "test",
                "--workspace",
                "--exclude",
                "podnet-ebpf",
                "-p",
                "podnet-tests",
                "--",
                "--test-threads=2",
                "--nocapture"
            ]
        );
    }

    #[test]
    fn kernel_smoke_arguments_parse() {
        let smoke = vmtest::VmTestArgs::parse_from(KERNEL_SMOKE_ARGS).unwrap();
        assert_eq!(smoke.kernel, vmtest::Kernel::V6_1);
        assert_eq!(smoke.suites, ["conntrack"]);
        assert_eq!(smoke.hooks, ["auto"]);
        assert_eq!(smoke.tests.len(), 2);
        assert_eq!((smoke.memory.as_str(), smoke.cpus), ("2G", 2));
        let ipv6 = vmtest::VmTestArgs::parse_from(KERNEL_SMOKE_IPV6_ARGS).unwrap();
        assert_eq!(ipv6.kernel, vmtest::Kernel::V6_1);
        assert_eq!(ipv6.suites, ["routing"]);
        assert_eq!(ipv6.tests.len(), 1);
        assert_eq!(KERNEL_SMOKE_RUNS.len(), 2);
    }

    #[test]
    fn explicit_test_threads_win() {
        let got = args(&["--", "--test-threads", "1"]);
        assert!(!got.iter().any(|arg| arg == "--test-threads=2"), "{got:?}");
    }
}
