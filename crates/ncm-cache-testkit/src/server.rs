//! One throwaway `redis-server` process on loopback.

use std::fs::{self, OpenOptions};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::process::{
    CLI_ENV, HOST, PortLease, SERVER_ENV, TestkitError, call, find_binary, free_port, info_field,
    run_with_timeout, signal, tail,
};

const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(10);
const CLI_TIMEOUT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(15);
const PORT_ATTEMPTS: usize = 8;

#[derive(Clone, Debug)]
struct Config {
    binary: Option<PathBuf>,
    cli_binary: Option<PathBuf>,
    password: Option<String>,
    config_file: Option<PathBuf>,
    args: Vec<String>,
    start_timeout: Duration,
}

/// Configures a [`RedisServer`] before starting it; see [`RedisServer::builder`].
#[derive(Clone, Debug)]
pub struct RedisServerBuilder {
    config: Config,
}

impl RedisServerBuilder {
    /// Uses this `redis-server` binary instead of `$NCM_REDIS_SERVER` or `PATH`.
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.binary = Some(path.into());
        self
    }

    /// Uses this `redis-cli` binary instead of `$NCM_REDIS_CLI` or `PATH`.
    pub fn cli_binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.cli_binary = Some(path.into());
        self
    }

    /// Requires this password for the `default` user (`--requirepass`); it is used by
    /// [`RedisServer::url`], [`RedisServer::cli`] and the readiness check.
    pub fn password(mut self, password: impl Into<String>) -> Self {
        self.config.password = Some(password.into());
        self
    }

    /// Adds an ACL user with full access: `--user <user> on ><password> ~* &* +@all`.
    pub fn acl_user(self, user: &str, password: &str) -> Self {
        self.args([
            "--user",
            user,
            "on",
            &format!(">{password}"),
            "~*",
            "&*",
            "+@all",
        ])
    }

    /// Passes `name value` verbatim to `redis-server`, e.g. `.arg("--notify-keyspace-events", "Ex")`.
    pub fn arg(self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.args([name.into(), value.into()])
    }

    /// Passes these arguments verbatim to `redis-server` (for options taking several values,
    /// or flags without a value).
    ///
    /// TLS works this way too (`--tls-port`, `--tls-cert-file`, ...), as long as the plain
    /// `--port` stays enabled: readiness is checked over it.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.config.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// How long to wait for the server to answer after spawning it (default 10 s).
    pub fn start_timeout(mut self, timeout: Duration) -> Self {
        self.config.start_timeout = timeout;
        self
    }

    /// Passes this config file as the first argument (needed by sentinel mode).
    pub(crate) fn config_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.config_file = Some(path.into());
        self
    }

    /// Starts the server on a free loopback port and waits until it answers.
    pub fn start(self) -> Result<RedisServer, TestkitError> {
        RedisServer::launch_new(self.config)
    }
}

/// A `redis-server` process on `127.0.0.1` with its own temporary directory, killed on drop.
///
/// Persistence is off (`--save "" --appendonly no`), so [`restart`](Self::restart) loses all data.
#[derive(Debug)]
pub struct RedisServer {
    config: Config,
    server_bin: PathBuf,
    port: u16,
    pid: u32,
    child: Mutex<Option<Child>>,
    dir: TempDir,
    /// Held from start to drop, through kills and restarts (see [`PortLease`]); dropped after
    /// the process is killed (`Drop` runs before the fields are dropped).
    lease: Option<PortLease>,
}

impl RedisServer {
    /// Starts a server with default settings.
    pub fn start() -> Result<Self, TestkitError> {
        Self::builder().start()
    }

    /// A builder for a server with a password, ACL users or extra arguments.
    pub fn builder() -> RedisServerBuilder {
        RedisServerBuilder {
            config: Config {
                binary: None,
                cli_binary: None,
                password: None,
                config_file: None,
                args: Vec::new(),
                start_timeout: DEFAULT_START_TIMEOUT,
            },
        }
    }

    fn launch_new(config: Config) -> Result<Self, TestkitError> {
        let server_bin = find_binary("redis-server", SERVER_ENV, config.binary.as_deref(), None)?;
        let dir = tempfile::Builder::new()
            .prefix("ncm-redis-")
            .tempdir()
            .map_err(|source| TestkitError::Spawn {
                what: "creating a temporary directory".to_owned(),
                source,
            })?;
        let cluster_bus = config.args.iter().any(|a| a == "--cluster-enabled");
        let mut server = Self {
            config,
            server_bin,
            port: 0,
            pid: 0,
            child: Mutex::new(None),
            dir,
            lease: None,
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            let lease = free_port(cluster_bus)?;
            server.port = lease.port();
            server.lease = Some(lease);
            match server.launch() {
                Err((_, true)) if attempt < PORT_ATTEMPTS => {}
                result => return result.map(|()| server).map_err(|(e, _)| e),
            }
        }
    }

    /// Spawns the process on `self.port` and waits for it. The error says whether the port
    /// was taken (so the caller may retry).
    fn launch(&mut self) -> Result<(), (TestkitError, bool)> {
        let log = self.log_path();
        let log_offset = fs::metadata(&log).map_or(0, |m| m.len());
        let spawn_err = |what: &str, source| {
            (
                TestkitError::Spawn {
                    what: what.to_owned(),
                    source,
                },
                false,
            )
        };
        let stderr = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("stderr.log"))
            .map_err(|e| spawn_err("opening stderr.log", e))?;
        let mut cmd = Command::new(&self.server_bin);
        if let Some(conf) = &self.config.config_file {
            cmd.arg(conf);
        }
        cmd.args([
            "--port",
            &self.port.to_string(),
            "--bind",
            HOST,
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(["--daemonize", "no", "--dir"])
        .arg(self.dir.path())
        .arg("--logfile")
        .arg(&log);
        if let Some(password) = &self.config.password {
            cmd.args(["--requirepass", password]);
        }
        cmd.args(&self.config.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let what = format!(
            "starting {} on port {}",
            self.server_bin.display(),
            self.port
        );
        let child = cmd.spawn().map_err(|e| spawn_err(&what, e))?;
        self.pid = child.id();
        *self.child_lock() = Some(child);

        let deadline = Instant::now() + self.config.start_timeout;
        loop {
            let exited = self.child_lock().as_mut().map(|c| c.try_wait());
            if let Some(Ok(Some(status))) = exited {
                self.child_lock().take();
                let fresh = fs::read(&log).unwrap_or_default();
                let fresh =
                    String::from_utf8_lossy(fresh.get(log_offset as usize..).unwrap_or_default());
                let in_use = fresh.contains("already in use");
                let err = TestkitError::StartTimeout {
                    what: format!("{what}: exited with {status}"),
                    log_tail: self.diagnostics(),
                };
                return Err((err, in_use));
            }
            // Readiness: the process listening on our port must be *our* process (another
            // one may have grabbed the port in between). A server whose password we do not
            // know (`--requirepass` passed via `arg`) is taken at its word.
            let reply = call(
                self.addr(),
                self.config.password.as_deref(),
                &["INFO", "server"],
                Duration::from_millis(250),
            );
            match reply {
                Ok(Ok(info)) if info_field(&info, "process_id") == Some(&self.pid.to_string()) => {
                    return Ok(());
                }
                Ok(Err(e)) if e.starts_with("NOAUTH") => return Ok(()),
                _ => {}
            }
            if Instant::now() >= deadline {
                self.kill();
                let what = format!("{what}: no answer within {:?}", self.config.start_timeout);
                return Err((
                    TestkitError::StartTimeout {
                        what,
                        log_tail: self.diagnostics(),
                    },
                    false,
                ));
            }
            thread::sleep(POLL);
        }
    }

    fn child_lock(&self) -> MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Last 30 lines of the log plus anything written to stderr.
    fn diagnostics(&self) -> String {
        let stderr = fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default();
        let mut out = self.log_tail(30);
        if !stderr.trim().is_empty() {
            out.push_str("\n--- stderr ---\n");
            out.push_str(&tail(&stderr, 30));
        }
        out
    }

    /// The port the server listens on (stable across [`restart`](Self::restart)).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The host the server listens on: always `"127.0.0.1"`.
    pub fn host(&self) -> &'static str {
        HOST
    }

    /// `redis://127.0.0.1:<port>/`, or `redis://:<password>@127.0.0.1:<port>/` with a password.
    pub fn url(&self) -> String {
        match &self.config.password {
            Some(password) => format!("redis://:{password}@{HOST}:{}/", self.port),
            None => format!("redis://{HOST}:{}/", self.port),
        }
    }

    /// The socket address `127.0.0.1:<port>`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// The password configured with [`RedisServerBuilder::password`].
    pub fn password(&self) -> Option<&str> {
        self.config.password.as_deref()
    }

    /// The server's working directory (a temporary directory removed on drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// The last `lines` lines of the server's log (empty if there is no log yet).
    pub fn log_tail(&self, lines: usize) -> String {
        let bytes = fs::read(self.log_path()).unwrap_or_default();
        tail(&String::from_utf8_lossy(&bytes), lines)
    }

    /// The process id of the most recently started process (it may have been killed since).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the process is alive (paused counts as alive).
    pub fn is_running(&self) -> bool {
        matches!(
            self.child_lock().as_mut().map(Child::try_wait),
            Some(Ok(None))
        )
    }

    /// Sends `PING` over a fresh connection, failing if no `PONG` arrives within `timeout`.
    pub fn ping(&self, timeout: Duration) -> Result<(), TestkitError> {
        match call(self.addr(), self.password(), &["PING"], timeout) {
            Ok(Ok(reply)) if reply == "PONG" => Ok(()),
            Ok(Ok(reply) | Err(reply)) => {
                Err(self.command_error("PING", format!("unexpected reply {reply:?}")))
            }
            Err(e) => Err(self.command_error("PING", e.to_string())),
        }
    }

    /// Sends one command over a fresh connection (authenticating if a password is set) and
    /// returns a status, integer or bulk reply as text; error replies and array replies are
    /// errors. Times out after 2 s. Faster than [`cli`](Self::cli) for polling.
    pub fn command(&self, args: &[&str]) -> Result<String, TestkitError> {
        self.command_with_timeout(args, Duration::from_secs(2))
    }

    /// [`command`](Self::command) with its own reply timeout, for slow commands such as
    /// `DEBUG POPULATE` of millions of keys on a loaded machine.
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # let server = ncm_cache_testkit::RedisServer::start()?;
    /// server.command_with_timeout(&["DEBUG", "POPULATE", "1000000"], Duration::from_secs(60))?;
    /// # Ok::<(), ncm_cache_testkit::TestkitError>(())
    /// ```
    pub fn command_with_timeout(
        &self,
        args: &[&str],
        timeout: Duration,
    ) -> Result<String, TestkitError> {
        match call(self.addr(), self.password(), args, timeout) {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(reply)) => Err(self.command_error(&args.join(" "), reply)),
            Err(e) => Err(self.command_error(&args.join(" "), e.to_string())),
        }
    }

    /// How many times the server has run `command` since it started (`INFO commandstats`; 0
    /// when never), e.g. to check that calls were batched.
    pub fn command_calls(&self, command: &str) -> Result<u64, TestkitError> {
        let info = self.command(&["INFO", "commandstats"])?;
        let prefix = format!("cmdstat_{}:calls=", command.to_ascii_lowercase());
        Ok(info
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0))
    }

    /// How many calls of `command` the server answered with an error since it started (`INFO
    /// commandstats`' `failed_calls` plus `rejected_calls`): an `EXEC` of a transaction that a
    /// refused command discarded counts here.
    pub fn command_failures(&self, command: &str) -> Result<u64, TestkitError> {
        let info = self.command(&["INFO", "commandstats"])?;
        let prefix = format!("cmdstat_{}:", command.to_ascii_lowercase());
        let Some(stats) = info.lines().find_map(|l| l.strip_prefix(prefix.as_str())) else {
            return Ok(0);
        };
        Ok(stats
            .split(',')
            .filter_map(|field| field.split_once('='))
            .filter(|(name, _)| matches!(*name, "failed_calls" | "rejected_calls"))
            .filter_map(|(_, n)| n.parse::<u64>().ok())
            .sum())
    }

    /// How many calls of any command the server has refused since it started (`INFO
    /// commandstats`' `rejected_calls`, summed): on a cluster node, `MOVED` and `ASK`
    /// redirections among them, e.g. to check that clients met a slot migration.
    pub fn rejected_calls(&self) -> Result<u64, TestkitError> {
        let info = self.command(&["INFO", "commandstats"])?;
        Ok(info
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter_map(|field| field.strip_prefix("rejected_calls="))
            .filter_map(|n| n.parse::<u64>().ok())
            .sum())
    }

    fn command_error(&self, what: &str, detail: String) -> TestkitError {
        TestkitError::Command {
            what: format!("{what} on port {}", self.port),
            detail,
        }
    }

    /// Kills the process with SIGKILL and reaps it; the server stays down until
    /// [`restart`](Self::restart). Does nothing if it is not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child_lock().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the server if it is running and starts it again on the same port with the
    /// same arguments (and the same directory), waiting until it answers.
    pub fn restart(&mut self) -> Result<(), TestkitError> {
        self.kill();
        let deadline = Instant::now() + self.config.start_timeout;
        loop {
            match self.launch() {
                Err((_, true)) if Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(100))
                }
                result => return result.map_err(|(e, _)| e),
            }
        }
    }

    /// Freezes the process with SIGSTOP: connections are accepted but never answered.
    pub fn pause(&self) -> Result<(), TestkitError> {
        self.signal_running("STOP")
    }

    /// Resumes a [`pause`](Self::pause)d process with SIGCONT.
    pub fn resume(&self) -> Result<(), TestkitError> {
        self.signal_running("CONT")
    }

    /// Signals the process, refusing if it has been killed (its pid may be reused).
    fn signal_running(&self, name: &str) -> Result<(), TestkitError> {
        if !self.is_running() {
            let what = format!("kill -{name}");
            return Err(self.command_error(&what, "the server is not running".to_owned()));
        }
        signal(self.pid, name)
    }

    /// The path of the `redis-cli` binary this server uses.
    pub fn cli_binary(&self) -> Result<PathBuf, TestkitError> {
        find_binary(
            "redis-cli",
            CLI_ENV,
            self.config.cli_binary.as_deref(),
            Some(&self.server_bin),
        )
    }

    /// Runs `redis-cli -h 127.0.0.1 -p <port> [-a <password>] <args...>` and returns its stdout.
    ///
    /// Error replies are *not* errors here: redis-cli prints them (e.g. `ERR unknown command`)
    /// and exits 0. Fails if redis-cli cannot run, exits non-zero or takes over 60 s.
    pub fn cli(&self, args: &[&str]) -> Result<String, TestkitError> {
        let mut cmd = Command::new(self.cli_binary()?);
        cmd.args(["-h", HOST, "-p", &self.port.to_string()]);
        if let Some(password) = &self.config.password {
            cmd.args(["-a", password, "--no-auth-warning"]);
        }
        cmd.args(args);
        run_with_timeout(
            cmd,
            CLI_TIMEOUT,
            &format!("redis-cli -p {} {}", self.port, args.join(" ")),
        )
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
