//! `cargo xtask vm-test`: the privileged suite on Debian's distribution
//! kernels, booted with virtme-ng under qemu (software emulation).
//!
//! Each kernel package is downloaded once from Debian (`apt-get download`),
//! unpacked and indexed (`depmod -b`) under [`KERNEL_CACHE`]; the VM shares the
//! host's root file system read-only, so the test binaries built here run
//! inside unchanged against the guest kernel.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};
use clap::{Args, ValueEnum};

use crate::{cmd, setup};

/// Unpacked kernels and their modules. Not under /var: the guest mounts its
/// own /var, so the module tree must live elsewhere to be visible inside.
const KERNEL_CACHE: &str = "/opt/podnet-tools/kernels";
/// virtme-ng's virtual environment and the release it is pinned to.
const VNG_VENV: &str = "/opt/podnet-tools/vng";
const VNG_REQUIREMENT: &str = "virtme-ng==1.42";
/// Debian packages the VM needs: qemu, and busybox for virtme-ng's initramfs.
const VM_PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static"];
/// Modules loaded before the tests: Debian builds netfilter and veth as
/// modules, and iptables-nft does not always trigger their autoload.
const MODULES: &[&str] = &[
    "veth",
    "nf_conntrack",
    "nf_nat",
    "nf_tables",
    "nft_chain_nat",
    "nft_compat",
    "xt_nat",
    "xt_MASQUERADE",
    "xt_conntrack",
    "xt_comment",
    "xt_statistic",
    "sch_ingress",
    "cls_bpf",
];
/// Seconds the agent may take to become ready in the emulated guest.
const GUEST_READY_TIMEOUT: &str = "180";
/// The integration test binaries run by default: the race tests, whose
/// exact counts prove the BTF-resolved offsets on each kernel.
const DEFAULT_SUITES: &[&str] = &["conntrack"];

/// Which kernel(s) to boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Kernel {
    /// Debian 12's 6.1 LTS kernel.
    #[value(name = "6.1")]
    V6_1,
    /// Debian 12's backported 6.12 kernel.
    #[value(name = "6.12")]
    V6_12,
    /// Both.
    All,
}

/// Options of `cargo xtask vm-test`.
#[derive(Debug, Args)]
pub struct VmTestArgs {
    /// Kernel(s) to test on.
    #[arg(long, value_enum, default_value = "all")]
    pub kernel: Kernel,
    /// Integration test binaries (tests/tests/<name>.rs) to run; default: conntrack.
    #[arg(long = "suite")]
    pub suites: Vec<String>,
    /// Guest memory.
    #[arg(long, default_value = "2G")]
    pub memory: String,
    /// Race hooks to run each suite with (default: both).
    #[arg(long = "hook", value_parser = ["probe", "tracepoint"])]
    pub hooks: Vec<String>,
}

/// A kernel package: the apt name pattern picks the newest build of a series.
struct KernelSeries {
    label: &'static str,
    /// Regex for `apt-cache search --names-only`.
    pattern: &'static str,
}

const SERIES_6_1: KernelSeries = KernelSeries {
    label: "6.1",
    pattern: r"^linux-image-6\.1\.0-[0-9]+-amd64-unsigned$",
};
const SERIES_6_12: KernelSeries = KernelSeries {
    label: "6.12",
    pattern: r"^linux-image-6\.12\.[0-9]+\+deb12-amd64-unsigned$",
};

/// Runs the suites on the chosen kernels and prints a per-kernel report.
pub fn run(args: &VmTestArgs) -> Result<()> {
    setup::ensure()?;
    ensure_vm_tools()?;
    let series: Vec<KernelSeries> = match args.kernel {
        Kernel::V6_1 => vec![SERIES_6_1],
        Kernel::V6_12 => vec![SERIES_6_12],
        Kernel::All => vec![SERIES_6_1, SERIES_6_12],
    };
    let suites: Vec<String> = if args.suites.is_empty() {
        DEFAULT_SUITES.iter().map(|s| (*s).to_owned()).collect()
    } else {
        args.suites.clone()
    };
    cmd::run(cmd::cargo().args(["build", "--workspace", "--exclude", "podnet-ebpf", "--bins"]))?;
    let binaries = snapshot(&test_binaries(&suites)?)?;
    let mut failures = Vec::new();
    let mut report = Vec::new();
    for s in &series {
        let (release, vmlinuz) = kernel(s)?;
        println!("== booting {release} (qemu, software emulation)");
        let hooks: Vec<&str> = if args.hooks.is_empty() {
            vec!["probe", "tracepoint"]
        } else {
            args.hooks.iter().map(String::as_str).collect()
        };
        let (ok, summary) = boot_and_test(&vmlinuz, &binaries, &args.memory, &hooks)?;
        report.push(format!(
            "{:<8} {release:<24} {}",
            s.label,
            summary.join("; ")
        ));
        if !ok {
            failures.push(release);
        }
    }
    println!("\n== kernel matrix");
    for line in &report {
        println!("{line}");
    }
    if !failures.is_empty() {
        bail!("failed on {}", failures.join(", "));
    }
    Ok(())
}

fn ensure_vm_tools() -> Result<()> {
    let missing: Vec<&str> = VM_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if !missing.is_empty() {
        println!("installing: {}", missing.join(" "));
        cmd::run(
            Command::new("apt-get")
                .args(["install", "-y", "-q"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    let vng = Path::new(VNG_VENV).join("bin/vng");
    if !vng.exists() {
        println!("installing: {VNG_REQUIREMENT} into {VNG_VENV}");
        cmd::run(Command::new("python3").args(["-m", "venv", VNG_VENV]))?;
        cmd::run(Command::new(Path::new(VNG_VENV).join("bin/pip")).args([
            "install",
            "-q",
            VNG_REQUIREMENT,
        ]))?;
    }
    Ok(())
}

/// Downloads (once), unpacks and indexes the newest kernel of a series.
/// Returns its release and the path of its vmlinuz.
fn kernel(series: &KernelSeries) -> Result<(String, PathBuf)> {
    let search =
        cmd::stdout(Command::new("apt-cache").args(["search", "--names-only", series.pattern]))?;
    let mut names: Vec<&str> = search
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    names.sort_by_key(|n| version_key(n));
    let Some(package) = names.last() else {
        bail!(
            "no Debian package matches {} (run apt-get update?)",
            series.pattern
        );
    };
    let release = package
        .trim_start_matches("linux-image-")
        .trim_end_matches("-unsigned")
        .to_owned();
    let root = Path::new(KERNEL_CACHE).join(&release);
    let vmlinuz = root.join(format!("boot/vmlinuz-{release}"));
    if !vmlinuz.exists() {
        let downloads = Path::new(KERNEL_CACHE).join("debs");
        std::fs::create_dir_all(&downloads)?;
        println!("downloading {package}");
        cmd::run(
            Command::new("apt-get")
                .args(["download", package])
                .current_dir(&downloads),
        )?;
        let deb = std::fs::read_dir(&downloads)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_")))
            })
            .with_context(|| format!("{package} not found after download"))?;
        let partial = Path::new(KERNEL_CACHE).join(format!("{release}.partial"));
        let _ = std::fs::remove_dir_all(&partial);
        cmd::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
        cmd::run(Command::new("depmod").arg("-b").arg(&partial).arg(&release))?;
        std::fs::rename(&partial, &root)?;
    }
    Ok((release, vmlinuz))
}

/// Orders `linux-image-6.1.0-47-...` before `...-50-...` numerically.
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// Paths of the integration test executables of `suites`.
fn test_binaries(suites: &[String]) -> Result<Vec<PathBuf>> {
    let out = cmd::stdout(cmd::cargo().args([
        "test",
        "-p",
        "podnet-tests",
        "--no-run",
        "--message-format=json",
    ]))?;
    let mut found = Vec::new();
    for line in out.lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(name), Some(exe)) = (msg["target"]["name"].as_str(), msg["executable"].as_str())
        else {
            continue;
        };
        let is_test = msg["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|v| v == "test"));
        if is_test && suites.iter().any(|s| s == name) {
            found.push(PathBuf::from(exe));
        }
    }
    if found.len() != suites.len() {
        bail!("test binaries for {suites:?} not all found (got {found:?})");
    }
    Ok(found)
}

/// Copies the test executables and the binaries they start into
/// `target/vm-test/` (tests in `deps/`, binaries beside it, where the test
/// harness looks for them), so rebuilds during a long run change nothing.
fn snapshot(tests: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let root = cmd::workspace_root();
    let dir = root.join("target/vm-test");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("deps"))?;
    for bin in ["podnet-agent", "podnetctl", "podnet-cni"] {
        let from = root.join("target/debug").join(bin);
        if from.exists() {
            std::fs::copy(&from, dir.join(bin))
                .with_context(|| format!("copying {}", from.display()))?;
        }
    }
    let mut copied = Vec::new();
    for test in tests {
        let name = test.file_name().context("test executable without a name")?;
        let to = dir.join("deps").join(name);
        std::fs::copy(test, &to).with_context(|| format!("copying {}", test.display()))?;
        copied.push(to);
    }
    Ok(copied)
}

/// Boots `vmlinuz`, runs each test binary inside, and returns whether all
/// passed plus their `test result` lines.
fn boot_and_test(
    vmlinuz: &Path,
    binaries: &[PathBuf],
    memory: &str,
    hooks: &[&str],
) -> Result<(bool, Vec<String>)> {
    let root = cmd::workspace_root();
    let mut script = format!(
        "for m in {}; do modprobe $m 2>/dev/null; done; cd {}; rc=0; ",
        MODULES.join(" "),
        root.display()
    );
    // Each suite runs once per race hook: the confirm probe (the default
    // where kprobes exist, as on these kernels) and the drop tracepoint. Both
    // must give the same exact counts.
    for exe in binaries {
        for hook in hooks {
            let _ = write!(
                script,
                "echo \"== race hook: {hook}\"; PODNET_TEST_AGENT_ARGS='--race-hook {hook}' \
                 PODNET_TEST_READY_TIMEOUT={GUEST_READY_TIMEOUT} CI=true {} --test-threads=1 || rc=1; ",
                exe.display()
            );
        }
    }
    script.push_str("echo PODNET-VM-RESULT rc=$rc");
    let vng = Path::new(VNG_VENV).join("bin/vng");
    let path = format!(
        "{VNG_VENV}/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    let output = Command::new(&vng)
        .args(["--run"])
        .arg(vmlinuz)
        .args([
            "--disable-kvm",
            "--memory",
            memory,
            "--cpus",
            "2",
            "--verbose",
            "--exec",
            &script,
        ])
        .env("PATH", path)
        .current_dir(std::env::temp_dir())
        .output()
        .context("starting vng")?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    let mut summary = Vec::new();
    for line in text.lines() {
        // Kernel console lines start with "[  12.34]"; show the tests' own output.
        if !line.starts_with('[') {
            println!("{line}");
        }
        if let Some(hook) = line.trim().strip_prefix("== race hook: ") {
            summary.push(format!("{hook}:"));
        }
        if let Some(rest) = line.trim().strip_prefix("test result: ") {
            summary.push(rest.split(';').take(2).collect::<Vec<_>>().join(";"));
        }
    }
    let passed = text.contains("PODNET-VM-RESULT rc=0");
    if summary.is_empty() {
        summary.push("no test ran (see the console output above)".into());
    }
    Ok((passed, summary))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_package_sorts_last() {
        let mut names = [
            "linux-image-6.1.0-50-amd64-unsigned",
            "linux-image-6.1.0-9-amd64-unsigned",
            "linux-image-6.1.0-47-amd64-unsigned",
        ];
        names.sort_by_key(|n| version_key(n));
        assert_eq!(names.last(), Some(&"linux-image-6.1.0-50-amd64-unsigned"));
    }
}
