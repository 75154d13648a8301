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
/// Where the guests' whole console output is kept (not under
/// `target/vm-test`, which each run replaces).
const CONSOLE_DIR: &str = "target/vm-logs";
/// Milliseconds a test client's own timing may differ from the kernel's in
/// the emulated guest (its syscalls take milliseconds there).
const GUEST_TIME_SLACK_MS: &str = "20";
/// Seconds the agent may take to become ready in the emulated guest.
const GUEST_READY_TIMEOUT: &str = "180";
/// The integration test binaries run by default: the race tests (whose
/// exact counts prove the BTF-resolved offsets on each kernel), the DNS
/// programs and the fast path (tcx on 6.6+, classic tc before), and the CNI
/// chains.
const DEFAULT_SUITES: &[&str] = &["conntrack", "dns", "routing", "cni"];
/// Suites that run once per race hook; the others run once, with the
/// agent's default hook.
const HOOK_SUITES: &[&str] = &["conntrack"];
/// Binaries of the test crate that the suites start (beside the agent's).
const SNAPSHOT_BINARIES: &[&str] = &[
    "podnet-agent",
    "podnetctl",
    "podnet-cni",
    "podnet-dns-responder",
];

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
    /// Integration test binaries (tests/tests/<name>.rs) to run; default:
    /// conntrack, dns, routing, cni.
    #[arg(long = "suite")]
    pub suites: Vec<String>,
    /// Guest memory.
    #[arg(long, default_value = "2G")]
    pub memory: String,
    /// Race hooks to run the race suites (conntrack) with (default: both).
    #[arg(long = "hook", value_parser = ["probe", "tracepoint"])]
    pub hooks: Vec<String>,
    /// Guest CPUs.
    #[arg(long, default_value_t = 2)]
    pub cpus: u32,
    /// Extra guest kernel command-line arguments (repeatable).
    #[arg(long = "kernel-arg")]
    pub kernel_args: Vec<String>,
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
        let (ok, summary) = boot_and_test(&vmlinuz, &release, &binaries, args, &hooks)?;
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
    for bin in SNAPSHOT_BINARIES {
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

/// The suite a snapshotted test executable belongs to (`dns-0123abcd` → `dns`).
fn suite_of(exe: &Path) -> String {
    let name = exe
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match name.rsplit_once('-') {
        Some((suite, _hash)) => suite.to_owned(),
        None => name,
    }
}

/// The shell script the guest runs: load modules, then each suite (the
/// race suites once per hook), with the emulation allowances.
fn guest_script(root: &Path, binaries: &[PathBuf], hooks: &[&str]) -> String {
    let mut script = format!(
        "for m in {}; do modprobe $m 2>/dev/null; done; cd {}; rc=0; ",
        MODULES.join(" "),
        root.display()
    );
    // The race suites run once per race hook (the confirm probe and the drop
    // tracepoint must give the same exact counts); the others once, with the
    // agent's default hook.
    for exe in binaries {
        let suite = suite_of(exe);
        let runs: Vec<Option<&str>> = if HOOK_SUITES.contains(&suite.as_str()) {
            hooks.iter().copied().map(Some).collect()
        } else {
            vec![None]
        };
        for hook in runs {
            let agent_args = hook.map_or(String::new(), |h| format!("--race-hook {h}"));
            let _ = write!(
                script,
                "echo \"== suite: {suite} race hook: {}\"; s=$(date +%s); \
                 PODNET_TEST_AGENT_ARGS='{agent_args}' \
                 PODNET_TEST_READY_TIMEOUT={GUEST_READY_TIMEOUT} \
                 PODNET_TEST_TIME_SLACK_MS={GUEST_TIME_SLACK_MS} CI=true {} --test-threads=1 || rc=1; \
                 echo \"== duration: $(( $(date +%s) - s )) s\"; ",
                hook.unwrap_or("default"),
                exe.display()
            );
        }
    }
    script.push_str("echo PODNET-VM-RESULT rc=$rc");
    script
}

/// Prints the tests' output and the kernel's crash lines from the guest
/// console, and returns the per-run summary and the number of oopses.
fn summarise(text: &str) -> (Vec<String>, usize) {
    let mut summary = Vec::new();
    let mut oopses = 0;
    for line in text.lines() {
        // Kernel console lines start with "[  12.34]"; show the tests' own
        // output, and every kernel line that reports a crash.
        let kernel_line = line.starts_with('[');
        let crash = [
            "Oops",
            "BUG:",
            "WARNING:",
            "Call Trace",
            "RIP:",
            "Kernel panic",
        ]
        .iter()
        .any(|w| line.contains(w));
        if !kernel_line || crash {
            println!("{line}");
        }
        if kernel_line && line.contains("Oops") {
            oopses += 1;
        }
        if let Some(run) = line.trim().strip_prefix("== suite: ") {
            summary.push(format!("{run}:"));
        }
        if let Some(rest) = line.trim().strip_prefix("test result: ") {
            summary.push(rest.split(';').take(2).collect::<Vec<_>>().join(";"));
        }
        if let Some(rest) = line.trim().strip_prefix("== duration: ") {
            summary.push(format!("({rest})"));
        }
    }
    (summary, oopses)
}

/// Boots `vmlinuz`, runs each test binary inside, and returns whether all
/// passed plus their `test result` lines. The whole guest output (kernel
/// console included) is written to `target/vm-test/console-<release>.log`
/// as it arrives (under [`CONSOLE_DIR`], one file per boot, kept across
/// runs), so a guest that dies leaves its last words on disk.
fn boot_and_test(
    vmlinuz: &Path,
    release: &str,
    binaries: &[PathBuf],
    args: &VmTestArgs,
    hooks: &[&str],
) -> Result<(bool, Vec<String>)> {
    let root = cmd::workspace_root();
    let script = guest_script(&root, binaries, hooks);
    let vng = Path::new(VNG_VENV).join("bin/vng");
    let path = format!(
        "{VNG_VENV}/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let log_dir = root.join(CONSOLE_DIR);
    std::fs::create_dir_all(&log_dir)?;
    let log_path = log_dir.join(format!("console-{release}-{started}.log"));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    println!("   guest console: {}", log_path.display());
    let mut command = Command::new(&vng);
    command.args(["--run"]).arg(vmlinuz).args([
        "--disable-kvm",
        "--memory",
        &args.memory,
        "--cpus",
        &args.cpus.to_string(),
        "--verbose",
    ]);
    for arg in &args.kernel_args {
        command.args(["--append", arg]);
    }
    let status = command
        .args(["--exec", &script])
        .env("PATH", path)
        .current_dir(std::env::temp_dir())
        .stdout(log.try_clone()?)
        .stderr(log)
        .status()
        .context("starting vng")?;
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let (mut summary, oopses) = summarise(&text);
    if oopses > 0 {
        summary.push(format!("{oopses} kernel oops (see {})", log_path.display()));
    }
    // The verdict is the guest script's own line: vng's exit status is not
    // the script's (it was non-zero after a clean power-down on 6.1).
    let passed = oopses == 0 && text.contains("PODNET-VM-RESULT rc=0");
    if !status.success() {
        summary.push(format!("(vng exited with {status})"));
    }
    if summary.is_empty() {
        summary.push(format!("no test ran (see {})", log_path.display()));
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

    #[test]
    fn suites_are_named_by_their_executables() {
        assert_eq!(suite_of(Path::new("/t/deps/dns-0123abcd")), "dns");
        assert_eq!(suite_of(Path::new("/t/deps/ipam_crash-99")), "ipam_crash");
    }
}
