//! Builds podnet's kernel programs (the `podnet-ebpf` crate) for the BPF target
//! with aya-build, so a plain `cargo build` builds everything.
//!
//! The kernel programs need a Rust toolchain with `rust-src` for `-Z build-std`;
//! `cargo xtask setup` installs Debian's Rust and links it as the rustup
//! toolchain named below. `RUSTC_BOOTSTRAP=1` is set for that inner build only.

use anyhow::{anyhow, Context as _};

/// The rustup toolchain that builds the kernel programs (see `cargo xtask setup`).
const EBPF_TOOLCHAIN: &str = "deb-rust";

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("agent crate has no parent directory"))?
        .join("ebpf");
    let ebpf_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("ebpf path is not UTF-8"))?
        .to_owned();
    println!("cargo:rerun-if-changed={ebpf_dir}/common");
    println!("cargo:rerun-if-env-changed=PODNET_EBPF_TOOLCHAIN");
    let toolchain =
        std::env::var("PODNET_EBPF_TOOLCHAIN").unwrap_or_else(|_| EBPF_TOOLCHAIN.to_owned());
    // SAFETY-free: build scripts are single-threaded here; the variable reaches
    // only the inner cargo that builds the kernel programs.
    std::env::set_var("RUSTC_BOOTSTRAP", "1");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "podnet-ebpf",
            root_dir: &ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
    .context(
        "building the kernel programs failed; run `cargo xtask setup` to install \
         the eBPF toolchain (Debian rustc-web, rust-web-src, bpf-linker)",
    )
}
