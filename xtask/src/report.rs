//! Rendering of benchmark results: the terminal / Markdown table, the Markdown header line and
//! publishing into `docs/BENCHMARKS.md`.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::bench::BenchOptions;
use crate::json::Json;
use crate::util::Result;

/// Markers delimiting the generated part of `docs/BENCHMARKS.md`.
const MARKERS: (&str, &str) = ("<!-- bench:start -->", "<!-- bench:end -->");

/// The rows rendered as text cells.
pub(crate) struct Table {
    /// One entry per row: name, ours, baseline, baseline_name, unit, ratio.
    cells: Vec<[String; 6]>,
}

impl Table {
    /// Column titles.
    const TITLES: [&'static str; 6] =
        ["name", "ours", "baseline", "baseline_name", "unit", "ratio"];

    /// Formats the rows.
    pub(crate) fn new(rows: &[Json]) -> Table {
        let text = |row: &Json, key: &str| {
            row.get(key)
                .and_then(Json::as_str)
                .unwrap_or("?")
                .to_owned()
        };
        let num = |row: &Json, key: &str| match row.get(key).and_then(Json::as_f64) {
            Some(n) => format!("{n:.2}"),
            None => "?".to_owned(),
        };
        let cells = rows
            .iter()
            .map(|r| {
                let ratio = num(r, "ratio");
                [
                    text(r, "name"),
                    num(r, "ours"),
                    num(r, "baseline"),
                    text(r, "baseline_name"),
                    text(r, "unit"),
                    ratio,
                ]
            })
            .collect();
        Table { cells }
    }

    /// A plain aligned table for the terminal (numbers right-aligned).
    pub(crate) fn plain(&self) -> String {
        let mut widths = Self::TITLES.map(str::len);
        for row in &self.cells {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let line = |cells: [&str; 6]| {
            let mut out = String::new();
            for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
                let numeric = matches!(i, 1 | 2 | 5);
                out.push_str(&if numeric {
                    format!("{cell:>w$}  ")
                } else {
                    format!("{cell:<w$}  ")
                });
            }
            format!("{}\n", out.trim_end())
        };
        let mut out = line(Self::TITLES);
        for row in &self.cells {
            out.push_str(&line([
                &row[0], &row[1], &row[2], &row[3], &row[4], &row[5],
            ]));
        }
        out
    }

    /// A Markdown table.
    pub(crate) fn markdown(&self) -> String {
        let mut out = format!(
            "| {} |\n|---|--:|--:|---|---|--:|\n",
            Self::TITLES.join(" | ")
        );
        for row in &self.cells {
            let cells: Vec<String> = row.iter().map(|c| c.replace('|', "\\|")).collect();
            out.push_str(&format!("| {} |\n", cells.join(" | ")));
        }
        out
    }
}

/// The Markdown header line: date, `uname -srm`, CPU model, `nproc`, run mode.
pub(crate) fn header(opts: &BenchOptions) -> String {
    let uname = Command::new("uname")
        .arg("-srm")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| std::env::consts::OS.to_owned());
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let nproc = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mode = match (&opts.quick, &opts.filter) {
        (true, Some(f)) => format!("quick run, filter `{f}`"),
        (true, None) => "quick run".to_owned(),
        (false, Some(f)) => format!("full run, filter `{f}`"),
        (false, None) => "full run".to_owned(),
    };
    format!(
        "Measured {} on {uname}, CPU: {cpu}, nproc: {nproc} ({mode}). \
         ratio > 1 means ncm-cache is better than the baseline.",
        utc_now()
    )
}

/// The current UTC time as `YYYY-MM-DD HH:MM UTC`.
fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

/// Converts days since 1970-01-01 to (year, month, day) (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Replaces the marked section of `docs/BENCHMARKS.md` with the contents of `markdown`.
pub(crate) fn publish(root: &Path, markdown: &Path) -> Result<()> {
    let results = fs::read_to_string(markdown).map_err(|e| {
        format!(
            "reading {} (run `cargo xtask bench` first): {e}",
            markdown.display()
        )
    })?;
    let doc_path = root.join("docs").join("BENCHMARKS.md");
    let doc = fs::read_to_string(&doc_path).unwrap_or_else(|_| "# Benchmarks\n".to_owned());
    let updated = splice(&doc, results.trim_end());
    if let Some(parent) = doc_path.parent() {
        fs::create_dir_all(parent).map_err(|e| format!("creating {}: {e}", parent.display()))?;
    }
    fs::write(&doc_path, updated).map_err(|e| format!("writing {}: {e}", doc_path.display()))?;
    println!(
        "published {} into {}",
        markdown.display(),
        doc_path.display()
    );
    Ok(())
}

/// Puts `body` between the markers of `doc`, appending the markers when missing.
fn splice(doc: &str, body: &str) -> String {
    let (start, end) = MARKERS;
    if let Some(s) = doc.find(start)
        && let Some(e) = doc[s..].find(end).map(|e| s + e)
    {
        return format!("{}{start}\n{body}\n{}", &doc[..s], &doc[e..]);
    }
    let sep = if doc.is_empty() || doc.ends_with("\n\n") {
        ""
    } else if doc.ends_with('\n') {
        "\n"
    } else {
        "\n\n"
    };
    format!("{doc}{sep}{start}\n{body}\n{end}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(20_454), (2026, 1, 1));
    }

    #[test]
    fn splices_between_markers() {
        let doc = "# B\n\nintro\n<!-- bench:start -->\nold\n<!-- bench:end -->\ntail\n";
        let want = "# B\n\nintro\n<!-- bench:start -->\nnew\n<!-- bench:end -->\ntail\n";
        assert_eq!(splice(doc, "new"), want);
        assert_eq!(
            splice("# B\n", "x"),
            "# B\n\n<!-- bench:start -->\nx\n<!-- bench:end -->\n"
        );
    }
}
