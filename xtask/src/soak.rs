//! `cargo xtask soak`: the long reliability run. Every fuzz target of `fuzz/` for a bounded
//! time, then the long variants of the reliability tests (`tests/tests/{chaos,load,faults}.rs`
//! with `PODNET_SOAK=1`, which makes them scale up). Every part runs even when an earlier one
//! failed; the summary goes to [`SUMMARY`] and to stdout, and any failure fails the soak.
//!
//! Fuzzing uses cargo-fuzz on the stable toolchain: `RUSTC_BOOTSTRAP=1` unlocks the `-Z`
//! flags it passes (sanitizer, coverage instrumentation), as the agent's build script does for
//! the kernel programs. New corpus entries stay in `fuzz/corpus/<target>` (not committed), so
//! each soak starts where the last one stopped; `fuzz/seeds/<target>` adds committed seeds.

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use clap::{Args, ValueEnum};

use crate::{cmd, setup};

/// Seconds each fuzz target runs by default (its build not included).
const DEFAULT_FUZZ_SECONDS: u64 = 120;
/// The cargo-fuzz crate, relative to the workspace root.
const FUZZ_DIR: &str = "fuzz";
/// Where the summary is written, relative to the workspace root.
const SUMMARY: &str = "docs/reliability/soak-summary.md";
/// The variable the reliability tests read to run their long variants.
const SOAK_ENV: &str = "PODNET_SOAK";
/// One input running longer than this is a finding (libFuzzer `-timeout`, seconds).
const FUZZ_INPUT_TIMEOUT_SECS: u64 = 10;
/// A fuzz process using more memory than this is a finding (libFuzzer `-rss_limit_mb`); the
/// machines are shared, so well below libFuzzer's 2 GiB default.
const FUZZ_RSS_LIMIT_MB: u64 = 1024;

/// One part of the soak.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Part {
    /// Every fuzz target of `fuzz/`.
    Fuzz,
    /// `tests/tests/chaos.rs`: the agent killed and restarted under CNI traffic.
    Chaos,
    /// `tests/tests/load.rs`: sustained CNI, DNS and race load.
    Load,
    /// `tests/tests/faults.rs`: injected failures (disk, netlink, cloud API).
    Faults,
}

impl Part {
    /// Every part, in the order the soak runs them.
    const ALL: [Self; 4] = [Self::Fuzz, Self::Chaos, Self::Load, Self::Faults];

    fn name(self) -> &'static str {
        match self {
            Self::Fuzz => "fuzz",
            Self::Chaos => "chaos",
            Self::Load => "load",
            Self::Faults => "faults",
        }
    }
}

/// Options of `cargo xtask soak`.
#[derive(Debug, Args)]
pub struct SoakArgs {
    /// Seconds each fuzz target runs, its build not included.
    #[arg(long, default_value_t = DEFAULT_FUZZ_SECONDS,
          value_parser = clap::value_parser!(u64).range(1..))]
    fuzz_seconds: u64,
    /// Leave out the fuzz part.
    #[arg(long)]
    skip_fuzz: bool,
    /// Run this part only.
    #[arg(long, value_enum)]
    only: Option<Part>,
}

/// The parts `args` select, in run order.
fn parts(args: &SoakArgs) -> Result<Vec<Part>> {
    match (args.only, args.skip_fuzz) {
        (Some(Part::Fuzz), true) => bail!("--only fuzz and --skip-fuzz leave nothing to run"),
        (Some(part), _) => Ok(vec![part]),
        (None, skip_fuzz) => Ok(Part::ALL
            .into_iter()
            .filter(|part| !(skip_fuzz && *part == Part::Fuzz))
            .collect()),
    }
}

/// What one fuzz run reported (libFuzzer's final lines).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct FuzzStats {
    /// Inputs executed (`stat::number_of_executed_units`).
    executions: Option<u64>,
    /// Average executions per second (`stat::average_exec_per_sec`).
    exec_per_sec: Option<u64>,
    /// Coverage counters hit (`cov:` of the last status line).
    coverage: Option<u64>,
    /// Features (`ft:` of the last status line).
    features: Option<u64>,
    /// Where libFuzzer wrote the input that crashed, hung or ran out of memory.
    artifact: Option<String>,
}

impl FuzzStats {
    /// Takes what one line of libFuzzer output tells.
    fn read_line(&mut self, line: &str) {
        if let Some(v) = line.strip_prefix("stat::number_of_executed_units:") {
            self.executions = v.trim().parse().ok();
        } else if let Some(v) = line.strip_prefix("stat::average_exec_per_sec:") {
            self.exec_per_sec = v.trim().parse().ok();
        } else if let Some(at) = line.find("Test unit written to ") {
            self.artifact = Some(line[at + "Test unit written to ".len()..].trim().to_owned());
        } else if line.starts_with('#') {
            if let Some(cov) = status_field(line, "cov:") {
                self.coverage = Some(cov);
            }
            if let Some(ft) = status_field(line, "ft:") {
                self.features = Some(ft);
            }
        }
    }
}

/// The number after `key` in a libFuzzer status line (`#1024 pulse cov: 312 ft: 845 ...`).
fn status_field(line: &str, key: &str) -> Option<u64> {
    let mut words = line.split_whitespace();
    words.find(|w| *w == key)?;
    words.next()?.parse().ok()
}

/// Whether a libFuzzer line is progress noise (new inputs, reductions, pulses), which goes to
/// the log file only.
fn is_progress(line: &str) -> bool {
    line.starts_with('#')
        && line
            .split_whitespace()
            .nth(1)
            .is_some_and(|kind| ["NEW", "REDUCE", "pulse"].contains(&kind))
}

/// The outcome of one row of the summary.
#[derive(Debug)]
struct Row {
    part: String,
    passed: bool,
    duration: Duration,
    fuzz: Option<(FuzzStats, Corpus)>,
    detail: String,
}

/// Files and bytes of a corpus directory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Corpus {
    files: u64,
    bytes: u64,
}

fn corpus_size(dir: &Path) -> Corpus {
    let mut corpus = Corpus::default();
    if let Ok(entries) = fs::read_dir(dir) {
        for meta in entries.flatten().filter_map(|e| e.metadata().ok()) {
            if meta.is_file() {
                corpus.files += 1;
                corpus.bytes += meta.len();
            }
        }
    }
    corpus
}

/// Runs `cargo xtask soak`.
pub fn run(args: &SoakArgs) -> Result<()> {
    let parts = parts(args)?;
    let root = cmd::workspace_root();
    let started = Instant::now();
    let mut rows = Vec::new();
    // Whether the release binaries built; they are built once, before the first test part.
    let mut release_built: Option<bool> = None;
    for part in parts {
        println!("== soak: {}", part.name());
        if part == Part::Fuzz {
            fuzz(&root, args.fuzz_seconds, &mut rows);
            continue;
        }
        if let Some(missing) = missing_test_file(&root, part) {
            rows.push(missing);
            continue;
        }
        let built = *release_built.get_or_insert_with(|| {
            let row = build_release();
            let passed = row.passed;
            rows.push(row);
            passed
        });
        rows.push(if built {
            test_part(part)
        } else {
            failed_row(
                part.name(),
                Duration::ZERO,
                "not run: the release build failed",
            )
        });
    }
    let summary = summary(args, &rows, started.elapsed());
    let path = root.join(SUMMARY);
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    fs::write(&path, &summary).with_context(|| format!("writing {}", path.display()))?;
    println!("\n{summary}\n(written to {SUMMARY})");
    let failed: Vec<&str> = rows
        .iter()
        .filter(|r| !r.passed)
        .map(|r| r.part.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("soak failed: {}", failed.join(", "));
    }
    Ok(())
}

/// Builds the agent binaries the tests start, where the release test binaries look for them.
fn build_release() -> Row {
    let started = Instant::now();
    let result = cmd::run(cmd::cargo().args(["build", "--release", "-p", "podnet", "--bins"]));
    Row {
        part: "release build".to_owned(),
        passed: result.is_ok(),
        duration: started.elapsed(),
        fuzz: None,
        detail: result.err().map(|e| format!("{e:#}")).unwrap_or_default(),
    }
}

fn failed_row(part: &str, duration: Duration, detail: &str) -> Row {
    eprintln!("soak: {part} FAILED: {detail}");
    Row {
        part: part.to_owned(),
        passed: false,
        duration,
        fuzz: None,
        detail: detail.to_owned(),
    }
}

/// `cargo fuzz` in the fuzz crate, with the `-Z` flags allowed on stable.
fn cargo_fuzz(root: &Path) -> Command {
    let mut command = cmd::cargo();
    command
        .current_dir(root.join(FUZZ_DIR))
        .env("RUSTC_BOOTSTRAP", "1")
        .arg("fuzz");
    command
}

/// Builds every fuzz target, then runs each for `seconds`; one row per target.
fn fuzz(root: &Path, seconds: u64, rows: &mut Vec<Row>) {
    let started = Instant::now();
    let prepared = setup::ensure_cargo_fuzz()
        .and_then(|()| cmd::run(cargo_fuzz(root).arg("build")))
        .and_then(|()| cmd::stdout(cargo_fuzz(root).arg("list")));
    let targets = match prepared {
        Ok(list) => list
            .lines()
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(ToOwned::to_owned)
            .collect::<Vec<_>>(),
        Err(e) => {
            rows.push(Row {
                part: "fuzz (build)".to_owned(),
                passed: false,
                duration: started.elapsed(),
                fuzz: None,
                detail: format!("{e:#}"),
            });
            return;
        }
    };
    if targets.is_empty() {
        rows.push(Row {
            part: "fuzz (build)".to_owned(),
            passed: false,
            duration: started.elapsed(),
            fuzz: None,
            detail: "`cargo fuzz list` lists no target".to_owned(),
        });
    }
    for target in targets {
        rows.push(fuzz_target(root, &target, seconds));
    }
}

/// The `cargo fuzz run` arguments for `target` (run in the fuzz crate).
fn fuzz_run_args(target: &str, seconds: u64, with_seeds: bool) -> Vec<String> {
    let mut args = vec![
        "run".to_owned(),
        target.to_owned(),
        format!("corpus/{target}"),
    ];
    if with_seeds {
        args.push(format!("seeds/{target}"));
    }
    args.extend([
        "--".to_owned(),
        format!("-max_total_time={seconds}"),
        format!("-timeout={FUZZ_INPUT_TIMEOUT_SECS}"),
        format!("-rss_limit_mb={FUZZ_RSS_LIMIT_MB}"),
        "-print_final_stats=1".to_owned(),
    ]);
    args
}

fn fuzz_target(root: &Path, target: &str, seconds: u64) -> Row {
    let started = Instant::now();
    let fuzz_dir = root.join(FUZZ_DIR);
    let corpus = fuzz_dir.join("corpus").join(target);
    let log = root.join("target/soak").join(format!("fuzz-{target}.log"));
    let with_seeds = fuzz_dir.join("seeds").join(target).is_dir();
    let outcome = fs::create_dir_all(&corpus)
        .and_then(|()| fs::create_dir_all(log.parent().unwrap_or(root)))
        .context("creating the corpus and log directories")
        .and_then(|()| {
            let mut command = cargo_fuzz(root);
            command.args(fuzz_run_args(target, seconds, with_seeds));
            run_fuzzer(&mut command, &log)
        });
    let (passed, stats, mut detail) = match outcome {
        Ok((true, stats)) => (true, stats, String::new()),
        Ok((false, stats)) => {
            let detail = match &stats.artifact {
                Some(artifact) => format!("found a failing input: {artifact}"),
                None => "cargo fuzz failed without an artifact".to_owned(),
            };
            (false, stats, detail)
        }
        Err(e) => (false, FuzzStats::default(), format!("{e:#}")),
    };
    if !passed {
        let _ = write!(detail, " (log: {})", display_relative(root, &log));
        eprintln!("soak: fuzz {target} FAILED: {detail}");
    }
    Row {
        part: format!("fuzz {target}"),
        passed,
        duration: started.elapsed(),
        fuzz: Some((stats, corpus_size(&corpus))),
        detail,
    }
}

/// Runs a fuzzer, copying its output to `log` and the lines that are not progress to stderr.
/// Returns whether it exited with 0, and what it reported.
fn run_fuzzer(command: &mut Command, log: &Path) -> Result<(bool, FuzzStats)> {
    let line = cmd::display(command);
    println!("+ {line}");
    let mut file = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut child = command
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start `{line}`"))?;
    let mut report = FuzzStats::default();
    if let Some(stderr) = child.stderr.take() {
        for text in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = writeln!(file, "{text}");
            report.read_line(&text);
            if !is_progress(&text) {
                eprintln!("{text}");
            }
        }
    }
    let exit = child
        .wait()
        .with_context(|| format!("waiting for `{line}`"))?;
    Ok((exit.success(), report))
}

/// The test file of a test part, relative to the workspace root.
fn test_file(part: Part) -> String {
    format!("tests/tests/{}.rs", part.name())
}

/// The long variant of one reliability test file.
fn test_command(part: Part) -> Command {
    let mut command = cmd::cargo();
    command
        .env(SOAK_ENV, "1")
        .args(["test", "--release", "-p", "podnet-tests", "--test"])
        .arg(part.name())
        .args(["--", "--test-threads=1", "--nocapture"]);
    command
}

/// A failed row when the test file of `part` does not exist: a part not written yet fails the
/// soak rather than being skipped.
fn missing_test_file(root: &Path, part: Part) -> Option<Row> {
    let file = test_file(part);
    (!root.join(&file).is_file()).then(|| {
        failed_row(
            part.name(),
            Duration::ZERO,
            &format!(
                "{file} does not exist: the {} tests are not written yet",
                part.name()
            ),
        )
    })
}

/// Runs the long variant of one test file (the release binaries are built).
fn test_part(part: Part) -> Row {
    let started = Instant::now();
    match run_tests(&mut test_command(part)) {
        Ok(counts) => Row {
            part: part.name().to_owned(),
            passed: true,
            duration: started.elapsed(),
            fuzz: None,
            detail: counts,
        },
        Err(e) => failed_row(part.name(), started.elapsed(), &format!("{e:#}")),
    }
}

/// Runs a test binary through cargo, passing its output through; returns the libtest result
/// line (`test result: ok. 3 passed; 0 failed; ...`).
fn run_tests(command: &mut Command) -> Result<String> {
    let line = cmd::display(command);
    println!("+ {line} ({SOAK_ENV}=1)");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start `{line}`"))?;
    let mut result = String::new();
    if let Some(stdout) = child.stdout.take() {
        for text in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("{text}");
            if let Some(counts) = text.strip_prefix("test result: ") {
                counts.trim().clone_into(&mut result);
            }
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{line}`"))?;
    if !status.success() {
        // The command line is printed above; the summary keeps the outcome short.
        bail!(
            "{status}{}",
            if result.is_empty() {
                String::new()
            } else {
                format!(": {result}")
            }
        );
    }
    Ok(result)
}

fn display_relative(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .display()
        .to_string()
}

/// `95 s`, `2 min 05 s`.
fn human(duration: Duration) -> String {
    let secs = duration.as_secs();
    if secs < 60 {
        format!("{secs} s")
    } else {
        format!("{} min {:02} s", secs / 60, secs % 60)
    }
}

fn opt(value: Option<u64>) -> String {
    value.map_or_else(|| "—".to_owned(), |v| v.to_string())
}

/// The Markdown summary.
fn summary(args: &SoakArgs, rows: &[Row], total: Duration) -> String {
    let machine = |command: &mut Command| {
        cmd::stdout(command).map_or_else(|_| "?".to_owned(), |s| s.trim().to_owned())
    };
    let date = machine(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]));
    let kernel = machine(Command::new("uname").arg("-r"));
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let passed = rows.iter().all(|r| r.passed) && !rows.is_empty();
    let mut out = String::new();
    let _ = writeln!(out, "# Soak summary\n");
    let _ = writeln!(
        out,
        "`cargo xtask soak{}{}{}` on {date}, kernel {kernel}, {cpus} CPUs: **{}** in {}.\n",
        if args.fuzz_seconds == DEFAULT_FUZZ_SECONDS {
            String::new()
        } else {
            format!(" --fuzz-seconds {}", args.fuzz_seconds)
        },
        if args.skip_fuzz { " --skip-fuzz" } else { "" },
        args.only
            .map_or_else(String::new, |p| format!(" --only {}", p.name())),
        if passed { "passed" } else { "FAILED" },
        human(total),
    );
    let _ = writeln!(
        out,
        "| part | result | duration | executions | exec/s | coverage | corpus (files, bytes) | detail |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    for row in rows {
        let (executions, speed, coverage, corpus) = match &row.fuzz {
            Some((stats, corpus)) => (
                opt(stats.executions),
                opt(stats.exec_per_sec),
                match (stats.coverage, stats.features) {
                    (Some(cov), Some(ft)) => format!("cov {cov}, ft {ft}"),
                    (cov, _) => opt(cov),
                },
                format!("{}, {}", corpus.files, corpus.bytes),
            ),
            None => ("—".into(), "—".into(), "—".into(), "—".into()),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {executions} | {speed} | {coverage} | {corpus} | {} |",
            row.part,
            if row.passed { "pass" } else { "**FAIL**" },
            human(row.duration),
            row.detail.replace('|', "\\|").replace('\n', " "),
        );
    }
    let _ = writeln!(
        out,
        "\nFuzz targets run {} s each with AddressSanitizer (a row's duration also counts a \
         rebuild when the tree changed after the first build); the long tests run with \
         `{SOAK_ENV}=1`, one test at a time, in release builds.",
        args.fuzz_seconds
    );
    out
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        soak: SoakArgs,
    }

    fn parse(argv: &[&str]) -> Result<SoakArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("soak").chain(argv.iter().copied())).map(|c| c.soak)
    }

    #[test]
    fn options_select_parts() {
        let all = parse(&[]).unwrap();
        assert_eq!(all.fuzz_seconds, 120);
        assert_eq!(parts(&all).unwrap(), Part::ALL);
        let no_fuzz = parse(&["--skip-fuzz"]).unwrap();
        assert_eq!(
            parts(&no_fuzz).unwrap(),
            [Part::Chaos, Part::Load, Part::Faults]
        );
        let only = parse(&["--only", "load", "--fuzz-seconds", "5"]).unwrap();
        assert_eq!(
            (parts(&only).unwrap(), only.fuzz_seconds),
            (vec![Part::Load], 5)
        );
        let nothing = parse(&["--only", "fuzz", "--skip-fuzz"]).unwrap();
        assert!(parts(&nothing).is_err());
        assert!(parse(&["--only", "dns"]).is_err());
        assert!(parse(&["--fuzz-seconds", "0"]).is_err());
    }

    #[test]
    fn commands() {
        let run = fuzz_run_args("checkpoint", 60, true);
        assert_eq!(
            run,
            [
                "run",
                "checkpoint",
                "corpus/checkpoint",
                "seeds/checkpoint",
                "--",
                "-max_total_time=60",
                "-timeout=10",
                "-rss_limit_mb=1024",
                "-print_final_stats=1"
            ]
        );
        assert_eq!(
            fuzz_run_args("dns_event", 1, false)[2..4],
            ["corpus/dns_event", "--"]
        );
        let test = test_command(Part::Faults);
        let argv: Vec<String> = test
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            argv,
            [
                "test",
                "--release",
                "-p",
                "podnet-tests",
                "--test",
                "faults",
                "--",
                "--test-threads=1",
                "--nocapture"
            ]
        );
        assert!(test
            .get_envs()
            .any(|(k, v)| k == SOAK_ENV && v == Some("1".as_ref())));
        assert_eq!(test_file(Part::Chaos), "tests/tests/chaos.rs");
    }

    #[test]
    fn a_missing_test_file_fails_its_part() {
        let row = missing_test_file(Path::new("/nonexistent/podnet"), Part::Load).unwrap();
        assert!(!row.passed);
        assert_eq!(
            row.detail,
            "tests/tests/load.rs does not exist: the load tests are not written yet"
        );
    }

    #[test]
    fn libfuzzer_output() {
        let mut stats = FuzzStats::default();
        for line in [
            "INFO: Seed: 1234",
            "#2\tINITED cov: 120 ft: 130 corp: 1/1b exec/s: 0 rss: 40Mb",
            "#1024\tpulse  cov: 310 ft: 845 corp: 40/2Kb lim: 14 exec/s: 512 rss: 60Mb",
            "#70000\tDONE   cov: 312 ft: 851 corp: 41/2Kb lim: 14 exec/s: 1166 rss: 62Mb",
            "stat::number_of_executed_units: 70000",
            "stat::average_exec_per_sec:     1166",
        ] {
            stats.read_line(line);
        }
        assert_eq!(
            stats,
            FuzzStats {
                executions: Some(70_000),
                exec_per_sec: Some(1166),
                coverage: Some(312),
                features: Some(851),
                artifact: None,
            }
        );
        stats.read_line(
            "artifact_prefix='/w/fuzz/artifacts/checkpoint/'; Test unit written to \
             /w/fuzz/artifacts/checkpoint/crash-da39a3ee",
        );
        assert_eq!(
            stats.artifact.as_deref(),
            Some("/w/fuzz/artifacts/checkpoint/crash-da39a3ee")
        );
        assert!(is_progress("#1024\tpulse  cov: 310 ft: 845"));
        assert!(is_progress("#77\tNEW    cov: 310 ft: 845 corp: 4/9b"));
        assert!(!is_progress("#70000\tDONE   cov: 312 ft: 851"));
        assert!(!is_progress(
            "==12==ERROR: AddressSanitizer: heap-buffer-overflow"
        ));
    }
}
