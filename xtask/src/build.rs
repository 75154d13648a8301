//! `cargo xtask build`: builds every default member, the kernel programs included (the agent's
//! build script compiles them).

use anyhow::Result;
use clap::Args;

use crate::{cmd, setup};

/// Options of `cargo xtask build`.
#[derive(Debug, Args)]
pub struct BuildArgs {
    /// Build with the release profile.
    #[arg(long)]
    release: bool,
    /// Extra arguments for `cargo build`, after `--`.
    #[arg(last = true)]
    cargo_args: Vec<String>,
}

/// Runs setup if anything is missing, then `cargo build`.
pub fn run(args: &BuildArgs) -> Result<()> {
    setup::ensure()?;
    let mut build = cmd::cargo();
    build.arg("build");
    if args.release {
        build.arg("--release");
    }
    build.args(&args.cargo_args);
    cmd::run(&mut build)
}
