//! `cargo xtask lint`: the checks that keep the tree's shape, run first by
//! `cargo xtask test`: formatting, clippy at `-D warnings` over every crate
//! (the kernel programs included, checked for the host with `panic=abort`),
//! the fuzz targets compiling, and the agent's layers ([`layers`]).

pub mod layers;

use anyhow::{bail, Result};
use clap::Args;

use crate::cmd;

/// Options of `cargo xtask lint` (none yet).
#[derive(Debug, Args)]
pub struct LintArgs {}

/// Runs every check; fails on the first that fails.
pub fn run(_args: &LintArgs) -> Result<()> {
    cmd::run(cmd::cargo().args(["fmt", "--all", "--check"]))?;
    cmd::run(cmd::cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "podnet-ebpf",
        "--all-targets",
        "--features",
        "podnet-tests/cluster-e2e",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The kernel programs are `no_std` binaries for bpfel-unknown-none; clippy
    // checks them for the host, where only `panic=abort` lets them compile.
    // RUSTC_BOOTSTRAP=1 as in the real build (agent/build.rs): the DNS program
    // uses core's atomic intrinsic.
    cmd::run(
        cmd::cargo()
            .env("CARGO_PROFILE_DEV_PANIC", "abort")
            .env("RUSTC_BOOTSTRAP", "1")
            .args([
                "clippy",
                "-p",
                "podnet-ebpf",
                "--bins",
                "--",
                "-D",
                "warnings",
            ]),
    )?;
    // The fuzz targets live outside the workspace (cargo fuzz builds them with its own
    // flags); they must still compile against today's API.
    cmd::run(cmd::cargo().args([
        "check",
        "--manifest-path",
        "fuzz/Cargo.toml",
        "--bins",
        "--locked",
        "--target-dir",
        "target/fuzz-check",
    ]))?;
    let src = cmd::workspace_root().join("agent/src");
    println!("+ layers of {}", src.display());
    let violations = layers::check(&src, layers::LAYERS)?;
    if !violations.is_empty() {
        for v in &violations {
            eprintln!("{v}");
        }
        bail!(
            "{} import(s) against the agent's layers (docs/ARCHITECTURE.md)",
            violations.len()
        );
    }
    Ok(())
}
