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
/// Pods per CNI chain test in the guest: each pod's namespace, veth and
/// plugin runs cost seconds under emulation (50 pods took 7 minutes per
/// test); the kernel paths are the same for 10.
const GUEST_CNI_PODS: &str = "10";
/// The function podnet's kretprobe traps in (`--race-hook probe`).
const PROBED_FUNCTION: &str = "__nf_conntrack_confirm";
/// Seconds the agent may take to become ready in the emulated guest.
const GUEST_READY_TIMEOUT: &str = "180";
/// The integration test binaries run by default: the race tests (whose
/// exact counts prove the BTF-resolved offsets on each kernel), the DNS
/// programs and the fast path (tcx on 6.6+, classic tc before), the CNI
/// chains, and the hostile pod against the programs' bounded maps.
const DEFAULT_SUITES: &[&str] = &["conntrack", "dns", "routing", "cni", "hostile"];
/// Suites that run once per race hook; the others run once, with the
/// agent's default hook (`auto`: the probe on these kernels).
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
    /// conntrack, dns, routing, cni, hostile.
    #[arg(long = "suite")]
    pub suites: Vec<String>,
    /// Guest memory.
    #[arg(long, default_value = "2G")]
    pub memory: String,
    /// Race hooks to run the race suites (conntrack) with (default: probe
    /// and tracepoint; `auto` is the agent's own choice).
    #[arg(long = "hook", value_parser = ["probe", "tracepoint", "auto"])]
    pub hooks: Vec<String>,
    /// Only these tests, by exact name (repeatable); each must run and pass.
    #[arg(long = "test")]
    pub tests: Vec<String>,
    /// Guest CPUs.
    #[arg(long, default_value_t = 2)]
    pub cpus: u32,
    /// Extra guest kernel command-line arguments (repeatable).
    #[arg(long = "kernel-arg")]
    pub kernel_args: Vec<String>,
}

impl VmTestArgs {
    /// Parses `cargo xtask vm-test` arguments, with the command line's defaults.
    pub fn parse_from(args: &[&str]) -> Result<Self> {
        #[derive(clap::Parser)]
        struct VmTest {
            #[command(flatten)]
            args: VmTestArgs,
        }
        let command = <VmTest as clap::Parser>::try_parse_from(
            std::iter::once("vm-test").chain(args.iter().copied()),
        )?;
        Ok(command.args)
    }
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
    let hooks: Vec<&str> = if args.hooks.is_empty() {
        vec!["probe", "tracepoint"]
    } else {
        args.hooks.iter().map(String::as_str).collect()
    };
    cmd::run(cmd::cargo().args(["build", "--workspace", "--exclude", "podnet-ebpf", "--bins"]))?;
    let binaries = snapshot(&test_binaries(&suites)?)?;
    let runs = suite_runs(&binaries, &hooks, &args.tests);
    let mut failures = Vec::new();
    let mut report = Vec::new();
    for s in &series {
        let (release, vmlinuz) = kernel(s)?;
        for run in &runs {
            let outcome = run_with_retry(&vmlinuz, &release, run, args)?;
            report.push(format!(
                "{:<5} {release:<22} {:<22} {}",
                s.label,
                run.label(),
                outcome.summary
            ));
            if !outcome.passed {
                failures.push(format!("{} on {release}", run.label()));
            }
        }
    }
    println!("\n== kernel matrix");
    for line in &report {
        println!("{line}");
    }
    if !failures.is_empty() {
        bail!("failed: {}", failures.join(", "));
    }
    Ok(())
}

/// One test binary run in its own guest boot: a suite, with a race hook for
/// the race suites.
struct SuiteRun {
    suite: String,
    hook: Option<String>,
    exe: PathBuf,
    /// Test name filters (none: every test of the suite).
    filters: Vec<String>,
}

impl SuiteRun {
    fn label(&self) -> String {
        match &self.hook {
            Some(hook) => format!("{} ({hook})", self.suite),
            None => self.suite.clone(),
        }
    }
}

/// The race suites once per race hook (the confirm probe and the drop
/// tracepoint must give the same exact counts); the others once, with the
/// agent's default hook.
fn suite_runs(binaries: &[PathBuf], hooks: &[&str], filters: &[String]) -> Vec<SuiteRun> {
    let mut runs = Vec::new();
    for exe in binaries {
        let suite = suite_of(exe);
        if HOOK_SUITES.contains(&suite.as_str()) {
            for hook in hooks {
                runs.push(SuiteRun {
                    suite: suite.clone(),
                    hook: Some((*hook).to_owned()),
                    exe: exe.clone(),
                    filters: filters.to_vec(),
                });
            }
        } else {
            runs.push(SuiteRun {
                suite,
                hook: None,
                exe: exe.clone(),
                filters: filters.to_vec(),
            });
        }
    }
    runs
}

/// Boots the kernel for one suite run; boots once more if the guest died of
/// the emulator's code-patching oops (see [`emulator_patching_oops`]), which
/// the report then mentions. Any other failure is final.
fn run_with_retry(
    vmlinuz: &Path,
    release: &str,
    run: &SuiteRun,
    args: &VmTestArgs,
) -> Result<BootOutcome> {
    println!("== {release}: {} (qemu, software emulation)", run.label());
    let first = boot_and_test(vmlinuz, release, run, args)?;
    if first.passed || !first.emulator_oops {
        return Ok(first);
    }
    println!(
        "   the guest oopsed at an int3 outside podnet's probe (the kernel patching its own code under emulation); booting again"
    );
    let mut second = boot_and_test(vmlinuz, release, run, args)?;
    second.summary = format!(
        "{} (second boot: the first ended in the emulator's int3 oops, {})",
        second.summary,
        first.log.display()
    );
    Ok(second)
}

/// Downloads (once), unpacks and indexes the newest kernel of a series.
/// Returns its release and the path of its vmlinuz.
fn kernel(series: &KernelSeries) -> Result<(String, PathBuf)> {
    let mut package = newest_package(series)?;
    if package.is_none() {
        // A machine whose package lists were never fetched finds nothing.
        cmd::run(Command::new("apt-get").arg("update"))?;
        package = newest_package(series)?;
    }
    let Some(package) = package else {
        bail!(
            "no Debian package matches {} after apt-get update",
            series.pattern
        );
    };
    let package = package.as_str();
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

/// The newest package of the series in the package lists.
fn newest_package(series: &KernelSeries) -> Result<Option<String>> {
    let search =
        cmd::stdout(Command::new("apt-cache").args(["search", "--names-only", series.pattern]))?;
    let mut names: Vec<&str> = search
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    names.sort_by_key(|n| version_key(n));
    Ok(names.last().map(|n| (*n).to_owned()))
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
        let from = cmd::target_dir().join("debug").join(bin);
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

/// The shell script the guest runs for one suite run: load modules, run the
/// test binary with the emulation allowances, print the verdict line.
fn guest_script(root: &Path, run: &SuiteRun) -> String {
    let agent_args = run
        .hook
        .as_ref()
        .map_or(String::new(), |h| format!("--race-hook {h}"));
    format!(
        "for m in {modules}; do modprobe $m 2>/dev/null; done; cd {root}; rc=0; \
         echo \"== suite: {label}\"; s=$(date +%s); \
         PODNET_TEST_AGENT_ARGS='{agent_args}' \
         PODNET_TEST_READY_TIMEOUT={GUEST_READY_TIMEOUT} \
         PODNET_TEST_TIME_SLACK_MS={GUEST_TIME_SLACK_MS} \
         PODNET_TEST_CNI_PODS={GUEST_CNI_PODS} CI=true {exe} --test-threads=1 --color never {filters} || rc=1; \
         echo \"== duration: $(( $(date +%s) - s )) s\"; \
         echo PODNET-VM-RESULT rc=$rc",
        modules = MODULES.join(" "),
        root = root.display(),
        label = run.label(),
        exe = run.exe.display(),
        filters = if run.filters.is_empty() {
            String::new()
        } else {
            format!("--exact {}", run.filters.join(" "))
        },
    )
}

/// What one guest boot gave.
struct BootOutcome {
    /// The guest script's verdict line said rc=0 and the kernel did not oops.
    passed: bool,
    /// The guest died of [`emulator_patching_oops`].
    emulator_oops: bool,
    /// The test result and duration, and what went wrong.
    summary: String,
    /// The whole guest console.
    log: PathBuf,
}

/// Prints the tests' output and the kernel's crash lines from the guest
/// console; returns the test result and duration, the number of tests that
/// passed, and the number of oopses.
fn summarise(text: &str) -> (String, usize, usize) {
    let mut summary = Vec::new();
    let mut oopses = 0;
    let mut passed = 0;
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
        if let Some(rest) = line.trim().strip_prefix("test result: ") {
            summary.push(rest.split(';').take(2).collect::<Vec<_>>().join(";"));
            passed += rest
                .split(';')
                .find_map(|part| part.trim().split_once(" passed"))
                .and_then(|(n, _)| n.rsplit(' ').next()?.parse::<usize>().ok())
                .unwrap_or(0);
        }
        if let Some(rest) = line.trim().strip_prefix("== duration: ") {
            summary.push(format!("({rest})"));
        }
    }
    (summary.join(" "), passed, oopses)
}

/// True when the guest's only oopses are `int3` traps in kernel code that
/// podnet does not probe. qemu's software emulation can run a vCPU through
/// an instruction that another vCPU is re-patching with `text_poke_bp`
/// (static keys flip as TC programs and netfilter hooks come and go); the
/// trap then hits a site with no breakpoint handler. The one int3 podnet
/// plants is its kretprobe's, in [`PROBED_FUNCTION`]: an oops there is
/// podnet's and is never retried.
fn emulator_patching_oops(text: &str) -> bool {
    let oopses: Vec<&str> = text.lines().filter(|l| l.contains("Oops: ")).collect();
    let kernel_rips: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_once("RIP: 0010:").map(|(_, at)| at))
        .collect();
    !oopses.is_empty()
        && oopses.iter().all(|l| l.contains("Oops: int3"))
        && !kernel_rips.is_empty()
        && kernel_rips.iter().all(|at| !at.contains(PROBED_FUNCTION))
}

/// Boots `vmlinuz` and runs one suite inside. The whole guest output (kernel
/// console included) is written as it arrives to
/// `target/vm-logs/console-<release>-<suite>-<time>.log` (one file per boot,
/// kept across runs), so a guest that dies leaves its last words on disk.
fn boot_and_test(
    vmlinuz: &Path,
    release: &str,
    run: &SuiteRun,
    args: &VmTestArgs,
) -> Result<BootOutcome> {
    let root = cmd::workspace_root();
    let script = guest_script(&root, run);
    let venv_bin = Path::new(setup::TOOLS_VENV).join("bin");
    let vng = venv_bin.join("vng");
    let path = format!(
        "{}:{}",
        venv_bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let log_dir = root.join(CONSOLE_DIR);
    std::fs::create_dir_all(&log_dir)?;
    let run_name = match &run.hook {
        Some(hook) => format!("{}-{hook}", run.suite),
        None => run.suite.clone(),
    };
    let log_path = log_dir.join(format!("console-{release}-{run_name}-{started}.log"));
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
    let (mut summary, tests_passed, oopses) = summarise(&text);
    if oopses > 0 {
        let _ = write!(
            summary,
            " {oopses} kernel oops (see {})",
            log_path.display()
        );
    }
    // The verdict is the guest script's own line: vng's exit status is not
    // the script's (it was non-zero after a clean power-down on 6.1).
    let mut passed = oopses == 0 && text.contains("PODNET-VM-RESULT rc=0");
    // Named tests must all have run: a misspelt name would match nothing.
    if !run.filters.is_empty() && tests_passed != run.filters.len() {
        let _ = write!(
            summary,
            " ({tests_passed} of the {} named tests passed)",
            run.filters.len()
        );
        passed = false;
    }
    if !status.success() && !passed {
        let _ = write!(summary, " (vng exited with {status})");
    }
    if summary.is_empty() {
        summary = format!("no test ran (see {})", log_path.display());
    }
    Ok(BootOutcome {
        passed,
        emulator_oops: emulator_patching_oops(&text),
        summary,
        log: log_path,
    })
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

    #[test]
    fn only_int3_oopses_outside_the_probe_are_the_emulators() {
        let emulator = "[  149.704753] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI\n\
             [  149.709472] RIP: 0010:__netif_receive_skb_core.constprop.0+0x3f/0x1060\n\
             [  149.711883] RIP: 0033:0x7fe7a3cb4d0c\n";
        assert!(emulator_patching_oops(emulator));
        let in_probe = "[ 1.0] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI\n\
             [ 1.1] RIP: 0010:__nf_conntrack_confirm+0x5/0x600 [nf_conntrack]\n";
        assert!(!emulator_patching_oops(in_probe));
        let null_deref = "[ 1.0] Oops: 0000 [#1] PREEMPT SMP NOPTI\n\
             [ 1.1] RIP: 0010:skb_release_data+0x20/0x1c0\n";
        assert!(!emulator_patching_oops(null_deref));
        assert!(!emulator_patching_oops(
            "test result: ok. 8 passed; 0 failed\n"
        ));
    }

    #[test]
    fn summary_counts_the_tests_that_passed() {
        let console = "== suite: conntrack (auto)\n\
             test result: ok. 2 passed; 0 failed; 0 ignored; 0 measured; 6 filtered out; finished in 90.1s\n\
             == duration: 95 s\n";
        let (summary, passed, oopses) = summarise(console);
        assert_eq!(summary, "ok. 2 passed; 0 failed (95 s)");
        assert_eq!((passed, oopses), (2, 0));
    }
}
