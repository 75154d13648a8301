//! `cargo xtask`: podnet's project tasks.
//!
//! Every task is one variant of [`Task`] with its own module and `Args` struct, so adding a
//! task (`bench`, `soak`, `vm-test`, ...) is one variant, one match arm and one module.

mod bench;
mod build;
mod cluster;
mod cmd;
mod demo;
mod deploy;
mod lint;
mod setup;
mod soak;
mod test;
mod vmtest;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// podnet's project tasks. Run from anywhere in the repository as `cargo xtask <task>`.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install what podnet needs on a Debian 12 machine: Debian packages, the eBPF
    /// toolchain and bpf-linker. Idempotent; needs root (except with --check).
    Setup(setup::SetupArgs),
    /// Run the benchmarks on this machine and write docs/PERFORMANCE.md (needs root).
    Bench(bench::BenchArgs),
    /// Run the privileged suite on Debian's 6.1 and 6.12 kernels in qemu (virtme-ng).
    VmTest(vmtest::VmTestArgs),
    /// A two-node Kubernetes cluster on this machine (namespaces), with podnet installed
    /// from deploy/: `up`, `down`, `status [--json]`.
    Cluster(cluster::ClusterArgs),
    /// Build the agent, CLI, CNI plugin and the kernel programs (runs setup if anything is
    /// missing).
    Build(build::BuildArgs),
    /// The kustomize bundle from the Helm chart: `render [--check]` writes (or checks)
    /// deploy/manifests/, the chart deploy/helm/podnet rendered with its default values.
    Deploy(deploy::DeployArgs),
    /// Show podnet's main job on simulated nodes (runs setup if anything is missing).
    Demo(demo::DemoArgs),
    /// Formatting, clippy over every crate (kernel programs included) and the agent's
    /// layers (docs/ARCHITECTURE.md); the first step of `test`.
    Lint(lint::LintArgs),
    /// Build everything and run all tests, the privileged ones included (runs setup if
    /// anything is missing).
    Test(test::TestArgs),
    /// The long reliability run: every fuzz target for a bounded time, then the long chaos,
    /// load and fault tests; writes docs/reliability/soak-summary.md (needs root).
    Soak(soak::SoakArgs),
}

fn main() -> ExitCode {
    cmd::ensure_sbin_on_path();
    let result = match Cli::parse().task {
        Task::Setup(args) => setup::run(&args),
        Task::Bench(args) => bench::run(&args),
        Task::VmTest(args) => vmtest::run(&args),
        Task::Build(args) => build::run(&args),
        Task::Cluster(args) => cluster::run(&args),
        Task::Demo(args) => demo::run(&args),
        Task::Deploy(args) => deploy::run(&args),
        Task::Lint(args) => lint::run(&args),
        Task::Test(args) => test::run(&args),
        Task::Soak(args) => soak::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // The whole cause chain on one line; no backtrace, these are user-facing errors.
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
