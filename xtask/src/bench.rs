//! `cargo xtask bench`: runs the side-by-side suite (`cargo bench -p ncm-cache-bench`) and writes
//! `target/bench/results.json` + `results.md`.
//!
//! Rows come from two places:
//! * criterion: group `<row name>`, function `ours` and `baseline_<name>`; the median of
//!   `target/criterion/<group>/<function>[/<param>]/new/estimates.json` (ns per iteration),
//!   ratio = baseline / ours. Only estimates written by this run count.
//! * custom harnesses: `target/bench/extra/*.json`, each an array of finished rows.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::json::Json;
use crate::report::{self, Table};
use crate::util::{self, Result};

/// The package holding the benchmark suite.
const BENCH_PACKAGE: &str = "ncm-cache-bench";

/// Criterion arguments of a `--quick` run.
const QUICK_ARGS: [&str; 7] = [
    "--warm-up-time",
    "0.5",
    "--measurement-time",
    "1",
    "--sample-size",
    "10",
    "--noplot",
];

/// Options of `cargo xtask bench`.
#[derive(Debug, Default)]
pub(crate) struct BenchOptions {
    /// Short criterion settings; `NCM_BENCH_QUICK=1`.
    pub(crate) quick: bool,
    /// Only benchmarks whose id contains this substring.
    pub(crate) filter: Option<String>,
    /// Copy `results.md` into `docs/BENCHMARKS.md`.
    pub(crate) publish: bool,
    /// With `publish`: do not run the suite, publish the existing `results.md`.
    pub(crate) no_run: bool,
    /// Run the soak for this many minutes instead of the suite.
    pub(crate) soak: Option<f64>,
}

/// Runs the suite, collects and writes the results; errors when cargo bench failed or no row
/// was produced.
pub(crate) fn run(opts: &BenchOptions) -> Result<()> {
    let root = util::workspace_root()?;
    let target = util::target_dir(&root);
    let out_dir = target.join("bench");
    if opts.no_run {
        return report::publish(&root, &out_dir.join("results.md"));
    }
    if let Some(minutes) = opts.soak {
        return soak(&root, &out_dir, minutes);
    }
    let extra = out_dir.join("extra");
    match fs::remove_dir_all(&extra) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(format!("clearing {}: {e}", extra.display()));
        }
        _ => {}
    }
    fs::create_dir_all(&extra).map_err(|e| format!("creating {}: {e}", extra.display()))?;
    // Slack for coarse file-system timestamps.
    let started = SystemTime::now() - Duration::from_secs(1);

    let mut cmd = util::cargo(&root);
    cmd.args(["bench", "-p", BENCH_PACKAGE, "--bench", "*", "--"]);
    cmd.env("NCM_BENCH_OUT", &extra);
    if opts.quick {
        cmd.args(QUICK_ARGS).env("NCM_BENCH_QUICK", "1");
    }
    if let Some(filter) = &opts.filter {
        cmd.arg(regex_escape(filter))
            .env("NCM_BENCH_FILTER", filter);
    }
    let bench_ok = util::run(&mut cmd)?;

    let criterion_dir = match std::env::var_os("CRITERION_HOME") {
        Some(dir) => root.join(dir),
        None => target.join("criterion"),
    };
    let mut rows = criterion_rows(&criterion_dir, started)?;
    rows.extend(extra_rows(&extra)?);
    let table = Table::new(&rows);
    print!("\n{}", table.plain());
    let results = out_dir.join("results.json");
    write(&results, &results_json(&rows))?;
    let markdown = out_dir.join("results.md");
    write(
        &markdown,
        &format!("{}\n\n{}", report::header(opts), table.markdown()),
    )?;
    println!(
        "wrote {} ({} rows) and {}",
        results.display(),
        rows.len(),
        markdown.display()
    );

    if !bench_ok {
        return Err(format!("`cargo bench -p {BENCH_PACKAGE}` failed"));
    }
    if rows.is_empty() {
        return Err("no benchmark rows were produced".to_owned());
    }
    if opts.publish {
        report::publish(&root, &markdown)?;
    }
    Ok(())
}

/// Runs the soak harness (`benches/soak.rs`) for `minutes`.
fn soak(root: &Path, out_dir: &Path, minutes: f64) -> Result<()> {
    fs::create_dir_all(out_dir).map_err(|e| format!("creating {}: {e}", out_dir.display()))?;
    let mut cmd = util::cargo(root);
    cmd.args(["bench", "-p", BENCH_PACKAGE, "--bench", "soak"])
        .env("NCM_SOAK_SECS", format!("{}", minutes * 60.0))
        .env("NCM_BENCH_OUT", out_dir);
    if util::run(&mut cmd)? {
        Ok(())
    } else {
        Err("the soak failed (see its output above)".to_owned())
    }
}

/// Writes `text` to `path`.
fn write(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))
}

/// Escapes regex metacharacters so criterion's regex filter acts as a substring match.
fn regex_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Builds one row object.
fn row(name: &str, ours: f64, baseline: f64, baseline_name: &str, unit: &str) -> Json {
    Json::Obj(vec![
        ("name".to_owned(), Json::Str(name.to_owned())),
        ("ours".to_owned(), Json::Num(ours)),
        ("baseline".to_owned(), Json::Num(baseline)),
        (
            "baseline_name".to_owned(),
            Json::Str(baseline_name.to_owned()),
        ),
        ("unit".to_owned(), Json::Str(unit.to_owned())),
        ("ratio".to_owned(), Json::Num(baseline / ours)),
    ])
}

/// Rows from criterion estimates written since `since`: one per (group, `baseline_*`) pair.
fn criterion_rows(dir: &Path, since: SystemTime) -> Result<Vec<Json>> {
    // row name -> function id -> median ns
    let mut groups: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
    for group in subdirs(dir)? {
        let group_name = file_name(&group);
        if group_name == "report" {
            continue;
        }
        for function in subdirs(&group)? {
            let id = file_name(&function);
            let mut found = vec![(group_name.clone(), function.join("new"))];
            // `BenchmarkId::new("ours", param)` adds one level: the row becomes `group/param`.
            for param in subdirs(&function)? {
                let param_name = file_name(&param);
                if param_name != "new" && param_name != "base" && param_name != "change" {
                    found.push((format!("{group_name}/{param_name}"), param.join("new")));
                }
            }
            for (row_name, new_dir) in found {
                if let Some(median) = fresh_median(&new_dir.join("estimates.json"), since)? {
                    groups
                        .entry(row_name)
                        .or_default()
                        .insert(id.clone(), median);
                }
            }
        }
    }
    let mut rows = Vec::new();
    for (name, functions) in &groups {
        let Some(&ours) = functions.get("ours") else {
            continue;
        };
        for (id, &baseline) in functions {
            if let Some(baseline_name) = id.strip_prefix("baseline_") {
                rows.push(row(name, ours, baseline, baseline_name, "ns/op"));
            }
        }
    }
    Ok(rows)
}

/// The median point estimate of an `estimates.json` modified at or after `since`.
fn fresh_median(path: &Path, since: SystemTime) -> Result<Option<f64>> {
    let Ok(meta) = fs::metadata(path) else {
        return Ok(None);
    };
    if meta.modified().map_or(true, |m| m < since) {
        return Ok(None);
    }
    let text = fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let json = Json::parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let median = json.get("median").and_then(|m| m.get("point_estimate"));
    match median.and_then(Json::as_f64) {
        Some(ns) => Ok(Some(ns)),
        None => Err(format!("{}: no median.point_estimate", path.display())),
    }
}

/// The sub-directories of `dir`, sorted (none when it does not exist).
fn subdirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let Ok(read) = fs::read_dir(dir) else {
        return Ok(Vec::new());
    };
    let mut dirs: Vec<PathBuf> = read
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    Ok(dirs)
}

/// The last component of `path` as a string.
fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Rows written by custom harnesses into `dir/*.json` (each file: an array of row objects).
fn extra_rows(dir: &Path) -> Result<Vec<Json>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| format!("reading {}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    let mut rows = Vec::new();
    for file in files {
        let text =
            fs::read_to_string(&file).map_err(|e| format!("reading {}: {e}", file.display()))?;
        let bad = |what: &str| format!("{}: {what}", file.display());
        let Json::Arr(items) = Json::parse(&text).map_err(|e| bad(&e))? else {
            return Err(bad("expected a JSON array of rows"));
        };
        for item in items {
            let strings = ["name", "baseline_name", "unit"];
            let numbers = ["ours", "baseline", "ratio"];
            if let Some(key) = strings
                .iter()
                .find(|k| item.get(k).and_then(Json::as_str).is_none())
            {
                return Err(bad(&format!("a row lacks string field `{key}`")));
            }
            if let Some(key) = numbers
                .iter()
                .find(|k| item.get(k).and_then(Json::as_f64).is_none())
            {
                return Err(bad(&format!("a row lacks number field `{key}`")));
            }
            rows.push(item);
        }
    }
    Ok(rows)
}

/// `results.json`: an array with one row object per line.
fn results_json(rows: &[Json]) -> String {
    let mut out = String::from("[\n");
    for (i, row) in rows.iter().enumerate() {
        out.push_str("  ");
        row.write(&mut out);
        out.push_str(if i + 1 < rows.len() { ",\n" } else { "\n" });
    }
    out.push_str("]\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_filter() {
        assert_eq!(
            regex_escape("memory_get-hit.100B"),
            "memory_get\\-hit\\.100B"
        );
    }

    #[test]
    fn collects_fresh_criterion_rows() {
        let dir = std::env::temp_dir().join(format!("xtask-bench-{}", std::process::id()));
        let estimates = |ns: f64| format!("{{\"median\":{{\"point_estimate\":{ns}}}}}");
        for (path, ns) in [
            ("g/ours", 10.0),
            ("g/baseline_moka", 25.0),
            ("h/baseline_x", 1.0),
            ("p/ours/8", 2.0),
            ("p/baseline_y/8", 3.0),
        ] {
            let new_dir = dir.join(path).join("new");
            fs::create_dir_all(&new_dir).unwrap();
            fs::write(new_dir.join("estimates.json"), estimates(ns)).unwrap();
        }
        let rows = criterion_rows(&dir, SystemTime::now() - Duration::from_secs(60)).unwrap();
        let json = results_json(&rows);
        assert!(json.contains("{\"name\": \"g\", \"ours\": 10, \"baseline\": 25, \"baseline_name\": \"moka\", \"unit\": \"ns/op\", \"ratio\": 2.5}"), "{json}");
        assert!(json.contains("\"name\": \"p/8\""), "{json}");
        assert_eq!(rows.len(), 2);
        let stale = criterion_rows(&dir, SystemTime::now() + Duration::from_secs(60)).unwrap();
        assert!(stale.is_empty());
        fs::remove_dir_all(&dir).unwrap();
    }
}
