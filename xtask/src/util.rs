//! Helpers shared by the xtask commands: workspace paths, cargo commands, running processes.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Result type of xtask: errors are human-readable messages.
pub(crate) type Result<T> = std::result::Result<T, String>;

/// The workspace root: the parent of xtask's manifest directory.
///
/// Prefers the `CARGO_MANIFEST_DIR` that `cargo run` sets at run time (correct even when the
/// checkout was copied together with its `target/`), else the one baked in at compile time.
pub(crate) fn workspace_root() -> Result<PathBuf> {
    let runtime = std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from);
    let manifest_dir = runtime
        .filter(|dir| dir.join("src").join("ci.rs").is_file())
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    let root = manifest_dir
        .parent()
        .ok_or_else(|| format!("{} has no parent directory", manifest_dir.display()))?;
    if !root.join("Cargo.toml").is_file() {
        return Err(format!(
            "no Cargo.toml in workspace root {}",
            root.display()
        ));
    }
    Ok(root.to_path_buf())
}

/// The cargo target directory: `$CARGO_TARGET_DIR` (relative to the root) or `<root>/target`.
pub(crate) fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => root.join(dir),
        _ => root.join("target"),
    }
}

/// A `cargo` command (`$CARGO` if set, else `cargo` from `PATH`) running in `root`.
pub(crate) fn cargo(root: &Path) -> Command {
    let program = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(program);
    cmd.current_dir(root);
    cmd
}

/// Renders a command line for display, e.g. `RUSTDOCFLAGS=-D warnings cargo doc --no-deps`.
pub(crate) fn display(cmd: &Command) -> String {
    let mut parts: Vec<String> = Vec::new();
    for (key, value) in cmd.get_envs() {
        if let Some(value) = value {
            let key = key.to_string_lossy();
            if key == "RUSTDOCFLAGS" || key.starts_with("NCM_BENCH") || key.starts_with("NCM_CI") {
                let value = value.to_string_lossy();
                let quote = if value.contains(' ') { "'" } else { "" };
                parts.push(format!("{key}={quote}{value}{quote}"));
            }
        }
    }
    let program = Path::new(cmd.get_program());
    let name = program.file_name().unwrap_or(OsStr::new("?"));
    parts.push(name.to_string_lossy().into_owned());
    for arg in cmd.get_args() {
        let arg = arg.to_string_lossy();
        let plain = arg
            .chars()
            .all(|c| c.is_alphanumeric() || "-_=./:,@+%".contains(c));
        parts.push(if plain && !arg.is_empty() {
            arg.into_owned()
        } else {
            format!("'{arg}'")
        });
    }
    parts.join(" ")
}

/// Error message for a command that could not be started.
fn spawn_error(cmd: &Command, err: &std::io::Error) -> String {
    format!("could not run `{}`: {err}", display(cmd))
}

/// Runs `cmd` with inherited stdio, printing the command line first; returns whether it succeeded.
pub(crate) fn run(cmd: &mut Command) -> Result<bool> {
    println!("$ {}", display(cmd));
    let status = cmd.status().map_err(|e| spawn_error(cmd, &e))?;
    Ok(status.success())
}

/// Runs `cmd` with inherited stdio and kills it after `timeout`.
///
/// Returns `Some(success)` when it exited, `None` when it was killed for taking too long.
pub(crate) fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<Option<bool>> {
    println!("$ {}", display(cmd));
    let mut child = cmd.spawn().map_err(|e| spawn_error(cmd, &e))?;
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Ok(Some(status.success()));
        }
        if start.elapsed() >= timeout {
            // Best effort: the child may have exited in between.
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `cmd`, forwarding its stdout/stderr line by line to ours as they arrive, and returns
/// whether it succeeded plus every output line (ANSI colours stripped) for which `keep` is true.
pub(crate) fn run_tee(cmd: &mut Command, keep: fn(&str) -> bool) -> Result<(bool, Vec<String>)> {
    println!("$ {}", display(cmd));
    let mut child = cmd
        .stdin(Stdio::inherit())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| spawn_error(cmd, &e))?;
    let out = child.stdout.take().ok_or("child stdout was not captured")?;
    let err = child.stderr.take().ok_or("child stderr was not captured")?;
    let out_thread = std::thread::spawn(move || forward(out, std::io::stdout(), keep));
    let err_thread = std::thread::spawn(move || forward(err, std::io::stderr(), keep));
    let status = child.wait().map_err(|e| e.to_string());
    let mut kept = join(out_thread)?;
    kept.extend(join(err_thread)?);
    Ok((status?.success(), kept))
}

/// Joins an output-forwarding thread.
fn join(handle: JoinHandle<Vec<String>>) -> Result<Vec<String>> {
    handle
        .join()
        .map_err(|_| "output forwarding thread panicked".to_owned())
}

/// Copies `src` to `dst` line by line, collecting the (colour-stripped) lines `keep` selects.
fn forward<R: Read, W: Write>(src: R, mut dst: W, keep: fn(&str) -> bool) -> Vec<String> {
    let mut reader = BufReader::new(src);
    let mut buf = Vec::new();
    let mut kept = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        // Our own stdout may be gone (e.g. piped into `head`); keep draining the child anyway.
        let _ = dst.write_all(&buf);
        let _ = dst.flush();
        let line = strip_ansi(&String::from_utf8_lossy(&buf));
        let line = line.trim_end();
        if keep(line) {
            kept.push(line.to_owned());
        }
    }
    // Never leave the child blocked on a full pipe.
    let _ = std::io::copy(&mut reader, &mut std::io::sink());
    kept
}

/// Removes ANSI escape sequences (CSI `ESC [ ... final` and OSC `ESC ] ... BEL/ST`).
pub(crate) fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('[') => {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            Some(']') => {
                while let Some(c) = chars.next() {
                    if c == '\u{7}' {
                        break;
                    }
                    if c == '\u{1b}' && chars.peek() == Some(&'\\') {
                        chars.next();
                        break;
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// Formats a duration as seconds with two decimals, e.g. `12.34s`.
pub(crate) fn secs(d: Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_ansi() {
        let colored =
            "\u{1b}[32;1m     Summary\u{1b}[0m [   1.0s] \u{1b}]8;;x\u{7}5\u{1b}]8;;\u{1b}\\ tests";
        assert_eq!(strip_ansi(colored), "     Summary [   1.0s] 5 tests");
        assert_eq!(strip_ansi("plain"), "plain");
    }

    #[test]
    fn workspace_root_has_manifest() {
        let root = workspace_root().unwrap();
        assert!(root.join("xtask").join("Cargo.toml").is_file());
    }
}
