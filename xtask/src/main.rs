//! `cargo xtask`: project automation for the ncm-cache workspace.
//!
//! Std-only on purpose (no dependencies) so it compiles in a second or two.
//!
//! * `cargo xtask ci [--fast]` runs every check (fmt, clippy, tests, doctests, docs, examples)
//!   and ends with the line `ci: N passed, N failed, N skipped`.
//! * `cargo xtask bench [--quick] [--filter SUBSTR] [--publish [--no-run]]` runs the
//!   side-by-side benchmark suite and writes `target/bench/results.json` and `results.md`.
//! * `cargo xtask chaos [--minutes N]` runs the multi-process coherence checker for longer.

mod bench;
mod ci;
mod counts;
mod json;
mod report;
mod util;

use std::process::ExitCode;

use util::Result;

/// Usage text printed by `cargo xtask help` (and on a usage error).
const USAGE: &str = "\
usage: cargo xtask <command> [options]

commands:
  ci [--fast]
      Run every check from the workspace root, in order: fmt, clippy, tests (cargo-nextest
      when installed, else cargo test), doctests, docs, examples. Every step runs even after
      a failure; a summary table follows and the last line reads
      `ci: N passed, N failed, N skipped`. Exit status 1 when any step failed.
      --fast              skip clippy and docs

  bench [--quick] [--filter SUBSTR] [--publish [--no-run]]
      Run `cargo bench -p ncm-cache-bench --bench '*'`, then collect criterion medians and
      custom-harness rows (target/bench/extra/*.json) into target/bench/results.json and
      target/bench/results.md, and print the table.
      --quick             short criterion settings and NCM_BENCH_QUICK=1 (whole run < 3 min)
      --filter SUBSTR     only benchmarks whose id contains SUBSTR (also NCM_BENCH_FILTER)
      --publish           copy results.md into docs/BENCHMARKS.md between
                          <!-- bench:start --> and <!-- bench:end -->
      --no-run            with --publish: publish the existing results.md without running

  bench --soak [--minutes N]
      Soak (not part of the suite or CI): N minutes (default 10) of mixed load on a throwaway
      Redis that is killed and restarted at random; prints ops/s, errors by kind, p99 and RSS
      per interval, writes target/bench/soak.json, and fails on a wrong value, an untyped
      error or a recovery slower than 2 s.

  chaos [--minutes N]
      The multi-process coherence checker (tests/tests/coherence.rs) for N minutes (default 5)
      per topology — one node, then a 3+3 cluster — instead of CI's 12 s: three worker
      processes, faults injected throughout, fails on any invented or stale read.

  help                    print this message
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args_os()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    match dispatch(&args) {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("xtask: error: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// Prints a usage error plus the usage text; exit status 2.
fn usage_error(msg: &str) -> ExitCode {
    eprintln!("xtask: {msg}\n\n{USAGE}");
    ExitCode::from(2)
}

/// Parses the command line and runs the selected command.
fn dispatch(args: &[String]) -> Result<ExitCode> {
    let Some((command, rest)) = args.split_first() else {
        print!("{USAGE}");
        return Ok(ExitCode::SUCCESS);
    };
    match command.as_str() {
        "help" | "-h" | "--help" => {
            print!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        "ci" => {
            let mut opts = ci::CiOptions::default();
            for arg in rest {
                match arg.as_str() {
                    "--fast" => opts.fast = true,
                    other => return Ok(usage_error(&format!("ci: unknown option `{other}`"))),
                }
            }
            let ok = ci::run(&opts)?;
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        "bench" => match parse_bench(rest) {
            Ok(opts) => {
                bench::run(&opts)?;
                Ok(ExitCode::SUCCESS)
            }
            Err(msg) => Ok(usage_error(&msg)),
        },
        "chaos" => {
            let minutes = match rest {
                [] => 5.0,
                [flag, n] if flag == "--minutes" => match n.parse::<f64>() {
                    Ok(m) if m > 0.0 && m.is_finite() => m,
                    _ => return Ok(usage_error("chaos: --minutes takes a positive number")),
                },
                _ => return Ok(usage_error("chaos: usage: chaos [--minutes N]")),
            };
            let root = util::workspace_root()?;
            let secs = format!("{}", minutes * 60.0);
            let mut cmd = util::cargo(&root);
            cmd.env("NCM_CHAOS_SECS", secs).args([
                "test",
                "-p",
                "ncm-cache-tests",
                "--all-features",
                "--test",
                "coherence",
                "--",
                "--nocapture",
                "--test-threads=1",
            ]);
            Ok(if util::run(&mut cmd)? {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        other => Ok(usage_error(&format!("unknown command `{other}`"))),
    }
}

/// Parses the options of `cargo xtask bench`.
fn parse_bench(args: &[String]) -> Result<bench::BenchOptions> {
    let mut opts = bench::BenchOptions::default();
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        match arg.as_str() {
            "--quick" => opts.quick = true,
            "--publish" => opts.publish = true,
            "--no-run" => opts.no_run = true,
            "--soak" => opts.soak = Some(opts.soak.unwrap_or(10.0)),
            "--minutes" => {
                let value = iter.next().ok_or("bench: --minutes needs a value")?;
                let minutes: f64 = value
                    .parse()
                    .ok()
                    .filter(|m: &f64| *m > 0.0 && m.is_finite())
                    .ok_or(format!(
                        "bench: --minutes takes a positive number, not `{value}`"
                    ))?;
                opts.soak = Some(minutes);
            }
            "--filter" => {
                let value = iter.next().ok_or("bench: --filter needs a value")?;
                opts.filter = Some(value.clone());
            }
            other => match other.strip_prefix("--filter=") {
                Some(value) => opts.filter = Some(value.to_owned()),
                None => return Err(format!("bench: unknown option `{other}`")),
            },
        }
    }
    if opts.soak.is_some() && (opts.quick || opts.publish || opts.filter.is_some()) {
        return Err("bench: --soak runs alone (no --quick, --filter or --publish)".to_owned());
    }
    if opts.no_run && !opts.publish {
        return Err("bench: --no-run only makes sense with --publish".to_owned());
    }
    if opts.filter.as_deref() == Some("") {
        return Err("bench: --filter needs a non-empty value".to_owned());
    }
    Ok(opts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn bench_options_parse() {
        let opts = parse_bench(&strings(&["--quick", "--filter", "memory", "--publish"])).unwrap();
        assert!(opts.quick && opts.publish && !opts.no_run);
        assert_eq!(opts.filter.as_deref(), Some("memory"));
        let opts = parse_bench(&strings(&["--filter=get_hit"])).unwrap();
        assert_eq!(opts.filter.as_deref(), Some("get_hit"));
        assert!(parse_bench(&strings(&["--no-run"])).is_err());
        assert!(parse_bench(&strings(&["--filter"])).is_err());
        assert!(parse_bench(&strings(&["--bogus"])).is_err());
        assert_eq!(parse_bench(&strings(&["--soak"])).unwrap().soak, Some(10.0));
        let opts = parse_bench(&strings(&["--soak", "--minutes", "0.5"])).unwrap();
        assert_eq!(opts.soak, Some(0.5));
        assert!(parse_bench(&strings(&["--minutes", "-1"])).is_err());
        assert!(parse_bench(&strings(&["--soak", "--quick"])).is_err());
    }
}
