//! `cargo xtask ci`: every check in order, continuing after failures, then a summary whose last
//! line is `ci: N passed, N failed, N skipped`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::counts::{self, Counts};
use crate::util::{self, Result};

/// How long one example may run before it is killed (override: `NCM_CI_EXAMPLE_TIMEOUT` secs).
const EXAMPLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Number of steps, for the `[i/N]` headers.
const STEP_COUNT: usize = 6;

/// Options of `cargo xtask ci`.
#[derive(Debug, Default)]
pub(crate) struct CiOptions {
    /// Skip clippy and docs.
    pub(crate) fast: bool,
}

/// Outcome of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    /// The step succeeded.
    Ok,
    /// The step failed (or could not run).
    Failed,
    /// The step was not run (`--fast`).
    Skipped,
}

/// State of a ci run.
struct Ci {
    /// Workspace root; every command runs there.
    root: PathBuf,
    /// `target/ci/skips.log`, exported to tests as `NCM_CACHE_SKIP_LOG`.
    skip_log: PathBuf,
    /// Finished steps, for the summary table.
    steps: Vec<(&'static str, Status, Duration)>,
    /// Test counts over tests and doctests.
    counts: Counts,
}

/// Runs the whole ci pipeline; returns `true` when every step passed.
pub(crate) fn run(opts: &CiOptions) -> Result<bool> {
    let root = util::workspace_root()?;
    let ci_dir = util::target_dir(&root).join("ci");
    fs::create_dir_all(&ci_dir).map_err(|e| format!("creating {}: {e}", ci_dir.display()))?;
    let skip_log = ci_dir.join("skips.log");
    fs::write(&skip_log, "").map_err(|e| format!("truncating {}: {e}", skip_log.display()))?;
    let mut ci = Ci {
        root,
        skip_log,
        steps: Vec::new(),
        counts: Counts::default(),
    };
    let started = Instant::now();
    ci.step("fmt", false, |ci| {
        util::run(ci.cargo().args(["fmt", "--all", "--", "--check"]))
    });
    ci.step("clippy", opts.fast, |ci| {
        let args = ["clippy", "--workspace", "--all-targets", "--all-features"];
        util::run(ci.cargo().args(args).args(["--", "-D", "warnings"]))
    });
    ci.step("tests", false, Ci::tests);
    ci.step("doctests", false, |ci| {
        let args = [
            "test",
            "--workspace",
            "--all-features",
            "--no-fail-fast",
            "--doc",
        ];
        let (ok, lines) = util::run_tee(ci.cargo().args(args), counts::is_libtest_result)?;
        ci.counts.add(counts::sum_libtest(&lines));
        Ok(ok)
    });
    ci.step("docs", opts.fast, |ci| {
        let mut flags = std::env::var("RUSTDOCFLAGS").unwrap_or_default();
        flags.push_str(if flags.is_empty() {
            "-D warnings"
        } else {
            " -D warnings"
        });
        let args = ["doc", "--workspace", "--no-deps", "--all-features"];
        util::run(ci.cargo().env("RUSTDOCFLAGS", flags).args(args))
    });
    ci.step("examples", false, Ci::examples);
    Ok(ci.summary(started.elapsed()))
}

impl Ci {
    /// A cargo command in the workspace root with the skip log exported.
    fn cargo(&self) -> Command {
        let mut cmd = util::cargo(&self.root);
        cmd.env("NCM_CACHE_SKIP_LOG", &self.skip_log);
        cmd
    }

    /// Runs one step with a header and a footer, recording its outcome.
    fn step(&mut self, name: &'static str, skip: bool, body: impl FnOnce(&mut Ci) -> Result<bool>) {
        let index = self.steps.len() + 1;
        if skip {
            println!("\n==> [{index}/{STEP_COUNT}] {name}: skipped (--fast)");
            self.steps.push((name, Status::Skipped, Duration::ZERO));
            return;
        }
        println!("\n==> [{index}/{STEP_COUNT}] {name}");
        let start = Instant::now();
        let status = match body(self) {
            Ok(true) => Status::Ok,
            Ok(false) => Status::Failed,
            Err(msg) => {
                eprintln!("xtask: {name}: {msg}");
                Status::Failed
            }
        };
        let elapsed = start.elapsed();
        println!("<== {name}: {} in {}", label(status), util::secs(elapsed));
        self.steps.push((name, status, elapsed));
    }

    /// Unit and integration tests: nextest when installed, else `cargo test`.
    fn tests(&mut self) -> Result<bool> {
        let nextest = self
            .cargo()
            .args(["nextest", "--version"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if nextest {
            let args = ["nextest", "run", "--workspace", "--all-features"];
            let mut cmd = self.cargo();
            cmd.args(args).args(["--profile", "ci", "--no-tests=warn"]);
            let (ok, lines) = util::run_tee(&mut cmd, counts::is_nextest_summary)?;
            match lines
                .iter()
                .rev()
                .find_map(|l| counts::parse_nextest_summary(l))
            {
                Some(counts) => self.counts.add(counts),
                None => eprintln!("xtask: tests: no nextest summary line found"),
            }
            Ok(ok)
        } else {
            println!("note: cargo-nextest is not installed; falling back to `cargo test`");
            let args = ["test", "--workspace", "--all-features", "--no-fail-fast"];
            let targets = ["--lib", "--bins", "--tests", "--examples"];
            let mut cmd = self.cargo();
            cmd.args(args).args(targets);
            let (ok, lines) = util::run_tee(&mut cmd, counts::is_libtest_result)?;
            self.counts.add(counts::sum_libtest(&lines));
            Ok(ok)
        }
    }

    /// Builds every example once (workspace feature set, so nothing is rebuilt), then runs each.
    fn examples(&mut self) -> Result<bool> {
        let examples = discover_examples(&self.root)?;
        if examples.is_empty() {
            println!("no examples yet");
            return Ok(true);
        }
        let build = ["build", "--workspace", "--all-features", "--examples"];
        if !util::run(self.cargo().args(build))? {
            return Ok(false);
        }
        let timeout = std::env::var("NCM_CI_EXAMPLE_TIMEOUT")
            .ok()
            .and_then(|s| s.parse().ok())
            .map_or(EXAMPLE_TIMEOUT, Duration::from_secs);
        let bin_dir = util::target_dir(&self.root).join("debug").join("examples");
        let mut failed = Vec::new();
        for (krate, name) in &examples {
            let shown = format!(
                "{}{name}",
                krate.as_ref().map(|k| format!("{k}/")).unwrap_or_default()
            );
            let binary = bin_dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
            let mut cmd = if binary.is_file() {
                let mut cmd = Command::new(&binary);
                cmd.current_dir(&self.root)
                    .env("NCM_CACHE_SKIP_LOG", &self.skip_log);
                if let Some(krate) = krate {
                    cmd.env("CARGO_MANIFEST_DIR", self.root.join("crates").join(krate));
                }
                cmd
            } else {
                let mut cmd = self.cargo();
                cmd.args(["run", "--quiet", "--all-features"]);
                if let Some(krate) = krate {
                    cmd.args(["-p", krate]);
                }
                cmd.args(["--example", name]);
                cmd
            };
            cmd.env("NCM_CI_EXAMPLES", "1");
            let start = Instant::now();
            let outcome = util::run_with_timeout(&mut cmd, timeout)?;
            let took = util::secs(start.elapsed());
            match outcome {
                Some(true) => println!("example {shown}: ok in {took}"),
                Some(false) => {
                    println!("example {shown}: FAILED in {took}");
                    failed.push(shown);
                }
                None => {
                    println!("example {shown}: TIMED OUT after {took}");
                    failed.push(shown);
                }
            }
        }
        if !failed.is_empty() {
            println!("failed examples: {}", failed.join(", "));
        }
        Ok(failed.is_empty())
    }

    /// Prints the summary table and the counts line; returns `true` when no step failed.
    fn summary(&self, total: Duration) -> bool {
        println!("\n================ ci summary ================");
        for (name, status, elapsed) in &self.steps {
            let time = match status {
                Status::Skipped => "-".to_owned(),
                _ => util::secs(*elapsed),
            };
            println!("  {name:<10} {:<8} {time:>9}", label(*status));
        }
        println!("  {:<10} {:<8} {:>9}", "total", "", util::secs(total));
        let notices: Vec<String> = fs::read_to_string(&self.skip_log)
            .unwrap_or_default()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect();
        println!("skipped-test notices: {}", notices.len());
        for line in &notices {
            println!("  - {line}");
        }
        let failed: Vec<&str> = self
            .steps
            .iter()
            .filter(|(_, status, _)| *status == Status::Failed)
            .map(|(name, _, _)| *name)
            .collect();
        if failed.is_empty() {
            println!("result: all steps passed");
        } else {
            println!("result: FAILED steps: {}", failed.join(", "));
        }
        let totals = counts::with_notices(self.counts, notices.len() as u64);
        println!(
            "ci: {} passed, {} failed, {} skipped",
            totals.passed, totals.failed, totals.skipped
        );
        failed.is_empty()
    }
}

/// Status label used in headers and the summary table.
fn label(status: Status) -> &'static str {
    match status {
        Status::Ok => "ok",
        Status::Failed => "FAILED",
        Status::Skipped => "skipped",
    }
}

/// Lists `crates/<crate>/examples/*.rs` (and `examples/<name>/main.rs`) plus the workspace-level
/// `examples/`, as `(crate directory name, example name)` sorted by crate then name.
fn discover_examples(root: &Path) -> Result<Vec<(Option<String>, String)>> {
    let mut found = Vec::new();
    let crates = root.join("crates");
    if crates.is_dir() {
        for dir in sorted_entries(&crates)? {
            let Some(krate) = dir.file_name().map(|n| n.to_string_lossy().into_owned()) else {
                continue;
            };
            for name in examples_in(&dir.join("examples"))? {
                found.push((Some(krate.clone()), name));
            }
        }
    }
    for name in examples_in(&root.join("examples"))? {
        found.push((None, name));
    }
    Ok(found)
}

/// Example names in one `examples/` directory (empty when it does not exist).
fn examples_in(dir: &Path) -> Result<Vec<String>> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut names = Vec::new();
    for path in sorted_entries(dir)? {
        let is_rs = path.extension().is_some_and(|e| e == "rs") && path.is_file();
        let name = if is_rs {
            path.file_stem()
        } else if path.join("main.rs").is_file() {
            path.file_name()
        } else {
            None
        };
        if let Some(name) = name {
            names.push(name.to_string_lossy().into_owned());
        }
    }
    Ok(names)
}

/// The entries of `dir`, sorted by path.
fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let read = fs::read_dir(dir).map_err(|e| format!("reading {}: {e}", dir.display()))?;
    let mut paths: Vec<PathBuf> = read.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    Ok(paths)
}
