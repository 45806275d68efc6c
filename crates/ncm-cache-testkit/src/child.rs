//! Crash tests: run one test of the current test binary as a child process, wait until it
//! prints a marker line, and SIGKILL it.

use std::io::{BufRead, BufReader};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::process::TestkitError;

/// What happened to a child killed by [`kill_child_after_marker`].
#[derive(Debug)]
pub struct KilledChild {
    /// Whether the child printed the marker before the timeout (it was killed either way).
    pub reached_marker: bool,
    /// The child's exit status (a signal, when the kill landed).
    pub status: ExitStatus,
}

/// Runs the test `test_name` of the current test binary in a child process with `env` set (the
/// test recognises it and plays the child's part), waits up to `timeout` for a stdout line
/// containing `marker`, then kills the child with SIGKILL — no destructors, no flushing, as in a
/// crash.
///
/// ```no_run
/// # fn main() -> Result<(), ncm_cache_testkit::TestkitError> {
/// use std::time::Duration;
/// // In the test `crash`: if std::env::var("CHILD").is_ok() { do the work; println!("READY"); sleep }
/// let killed = ncm_cache_testkit::kill_child_after_marker(
///     "crash", ("CHILD", "1"), "READY", Duration::from_secs(60))?;
/// assert!(killed.reached_marker && !killed.status.success());
/// # Ok(()) }
/// ```
pub fn kill_child_after_marker(
    test_name: &str,
    env: (&str, &str),
    marker: &str,
    timeout: Duration,
) -> Result<KilledChild, TestkitError> {
    let spawn_err = |what: &str| {
        let what = what.to_owned();
        move |source| TestkitError::Spawn { what, source }
    };
    let exe = std::env::current_exe().map_err(spawn_err("finding the test binary"))?;
    let mut child = Command::new(exe)
        .args(["--exact", test_name, "--nocapture", "--test-threads", "1"])
        .env(env.0, env.1)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(spawn_err("spawning the child test"))?;
    let (tx, rx) = mpsc::channel();
    if let Some(stdout) = child.stdout.take() {
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    let deadline = Instant::now() + timeout;
    let reached_marker = loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) if line.contains(marker) => break true,
            Ok(_) => continue,
            Err(_) => break false,
        }
    };
    crate::process::signal(child.id(), "KILL")?;
    let status = child.wait().map_err(spawn_err("waiting for the child"))?;
    Ok(KilledChild {
        reached_marker,
        status,
    })
}
