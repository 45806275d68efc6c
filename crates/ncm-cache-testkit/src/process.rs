//! Process plumbing shared by the servers, the cluster and the sentinel set: errors, binary
//! lookup, commands with timeouts, signals, free ports and a minimal RESP client.

use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// The only address servers bind to.
pub(crate) const HOST: &str = "127.0.0.1";
const POLL: Duration = Duration::from_millis(15);
pub(crate) const SERVER_ENV: &str = "NCM_REDIS_SERVER";
pub(crate) const CLI_ENV: &str = "NCM_REDIS_CLI";

/// Errors from starting or driving throwaway Redis processes.
#[derive(Debug)]
#[non_exhaustive]
pub enum TestkitError {
    /// A Redis binary was not found; the message says how to install it.
    BinaryMissing {
        /// The binary looked for: `redis-server` or `redis-cli`.
        binary: &'static str,
        /// The environment variable that overrides its location.
        env_var: &'static str,
        /// Where it was looked for.
        detail: String,
    },
    /// Spawning a process, or preparing its directory or files, failed.
    Spawn {
        /// What was being done.
        what: String,
        /// The underlying error.
        source: io::Error,
    },
    /// A server did not answer in time or exited while starting.
    StartTimeout {
        /// What was being started and what went wrong.
        what: String,
        /// The last lines of the server's log (and stderr).
        log_tail: String,
    },
    /// A command (`redis-cli`, a signal, a cluster check) failed or timed out.
    Command {
        /// The command or check.
        what: String,
        /// Exit status, output or the reason.
        detail: String,
    },
}

impl fmt::Display for TestkitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BinaryMissing {
                binary,
                env_var,
                detail,
            } => write!(
                f,
                "`{binary}` not found ({detail}); install Redis with `apt-get install redis-server` \
                 (Debian/Ubuntu) or `brew install redis` (macOS), or set {env_var} to the path of `{binary}`"
            ),
            Self::Spawn { what, source } => write!(f, "{what}: {source}"),
            Self::StartTimeout { what, log_tail } => write!(f, "{what}; log tail:\n{log_tail}"),
            Self::Command { what, detail } => write!(f, "`{what}` failed: {detail}"),
        }
    }
}

impl std::error::Error for TestkitError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Spawn { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Path of `redis-server`: `$NCM_REDIS_SERVER` if set, otherwise looked up on `PATH`.
pub fn redis_server_binary() -> Result<PathBuf, TestkitError> {
    find_binary("redis-server", SERVER_ENV, None, None)
}

/// Path of `redis-cli`: `$NCM_REDIS_CLI` if set, otherwise next to `redis-server`, otherwise on `PATH`.
pub fn redis_cli_binary() -> Result<PathBuf, TestkitError> {
    let sibling = redis_server_binary().ok();
    find_binary("redis-cli", CLI_ENV, None, sibling.as_deref())
}

pub(crate) fn find_binary(
    binary: &'static str,
    env_var: &'static str,
    explicit: Option<&Path>,
    sibling_of: Option<&Path>,
) -> Result<PathBuf, TestkitError> {
    let missing = |detail: String| TestkitError::BinaryMissing {
        binary,
        env_var,
        detail,
    };
    let on_path = |name: &Path| {
        std::env::var_os("PATH")
            .iter()
            .flat_map(std::env::split_paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    };
    let explicit = explicit.map(Path::to_path_buf).or_else(|| {
        std::env::var_os(env_var)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    });
    if let Some(path) = explicit {
        let found = if path.components().count() == 1 && !path.is_file() {
            on_path(&path)
        } else {
            Some(path.clone()).filter(|p| p.is_file())
        };
        return found.ok_or_else(|| missing(format!("{} does not exist", path.display())));
    }
    sibling_of
        .and_then(Path::parent)
        .map(|dir| dir.join(binary))
        .filter(|p| p.is_file())
        .or_else(|| on_path(Path::new(binary)))
        .ok_or_else(|| missing("not on PATH".to_owned()))
}

/// Runs `cmd` to completion (killing it after `timeout`) and returns its stdout.
pub(crate) fn run_with_timeout(
    mut cmd: Command,
    timeout: Duration,
    what: &str,
) -> Result<String, TestkitError> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|source| TestkitError::Spawn {
        what: what.to_owned(),
        source,
    })?;
    let collect = |pipe: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let stdout = collect(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = collect(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(POLL),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    let fail = |detail: String| {
        Err(TestkitError::Command {
            what: what.to_owned(),
            detail,
        })
    };
    match status {
        Some(status) if status.success() => Ok(stdout),
        Some(status) => fail(format!("{status}; stderr: {stderr}; stdout: {stdout}")),
        None => fail(format!(
            "timed out after {timeout:?}; output so far: {stderr}{stdout}"
        )),
    }
}

/// Sends `kill -<signal> <pid>`.
pub(crate) fn signal(pid: u32, signal: &str) -> Result<(), TestkitError> {
    let mut cmd = Command::new("kill");
    cmd.arg(format!("-{signal}")).arg(pid.to_string());
    run_with_timeout(
        cmd,
        Duration::from_secs(5),
        &format!("kill -{signal} {pid}"),
    )
    .map(drop)
}

/// A loopback port held by this process from a server's (or a `FaultProxy`'s) start until its
/// drop — also while the server is killed — so that no other test process using the testkit
/// starts a server or proxy on it in between (a test that binds a port of its own should take
/// it with [`reserve`](Self::reserve) too).
///
/// Without it, a killed node's port could be handed (by `bind` to port 0) to another test's
/// fresh `redis-server`; clients reconnecting to the killed node then talk to a stranger that
/// answers `GET` with nil, and a test that kills a primary sees keys "missing". The hold is an
/// advisory lock (`flock`) on `<tmp>/ncm-cache-testkit-ports/<port>`, one file per port (the
/// cluster bus port too), released by the kernel when the process ends however it ends.
///
/// ```
/// let lease = ncm_cache_testkit::PortLease::reserve()?;
/// // Held here: neither another process nor this one is handed the port again.
/// assert!(ncm_cache_testkit::PortLease::take(lease.port())?.is_none());
/// drop(lease);
/// assert!(ncm_cache_testkit::PortLease::take(0).is_err());
/// # Ok::<(), ncm_cache_testkit::TestkitError>(())
/// ```
#[derive(Debug)]
pub struct PortLease {
    port: u16,
    _locks: Vec<File>,
}

impl PortLease {
    /// A free loopback port, held until the lease is dropped.
    pub fn reserve() -> Result<Self, TestkitError> {
        free_port(false)
    }

    /// Holds `port` (not checking whether something listens on it); `None` if another lease,
    /// in this process or another, holds it. Port 0 is refused.
    pub fn take(port: u16) -> Result<Option<Self>, TestkitError> {
        Self::take_all(port, &[port])
    }

    /// The leased port.
    pub fn port(&self) -> u16 {
        self.port
    }

    fn take_all(port: u16, ports: &[u16]) -> Result<Option<Self>, TestkitError> {
        let err = |source| TestkitError::Spawn {
            what: format!("reserving port {port} (a lock file in the temporary directory)"),
            source,
        };
        if ports.contains(&0) {
            return Err(err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "port 0 cannot be reserved",
            )));
        }
        let dir = std::env::temp_dir().join("ncm-cache-testkit-ports");
        std::fs::create_dir_all(&dir).map_err(err)?;
        let mut locks = Vec::with_capacity(ports.len());
        for p in ports {
            // Never removed: removing a lock file races with another process opening it.
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(dir.join(p.to_string()))
                .map_err(err)?;
            match file.try_lock() {
                Ok(()) => locks.push(file),
                Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
                Err(std::fs::TryLockError::Error(e)) => return Err(err(e)),
            }
        }
        Ok(Some(Self {
            port,
            _locks: locks,
        }))
    }
}

/// A free loopback port, leased; with `cluster_bus`, one whose `port + 10000` is free (and
/// leased) too.
pub(crate) fn free_port(cluster_bus: bool) -> Result<PortLease, TestkitError> {
    let err = |source| TestkitError::Spawn {
        what: "finding a free loopback port".to_owned(),
        source,
    };
    for _ in 0..200 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(err)?;
        let port = listener.local_addr().map_err(err)?.port();
        drop(listener);
        let lease = if !cluster_bus {
            PortLease::take(port)?
        } else if port <= 55535 && TcpListener::bind((Ipv4Addr::LOCALHOST, port + 10000)).is_ok() {
            PortLease::take_all(port, &[port, port + 10000])?
        } else {
            None
        };
        if let Some(lease) = lease {
            return Ok(lease);
        }
    }
    Err(err(io::Error::new(
        io::ErrorKind::AddrNotAvailable,
        "no free port (with a free cluster bus port, for a cluster node) that no other test holds",
    )))
}

/// Sends one command as a RESP array and reads one reply: `Ok(Ok(text))` for a status,
/// integer or bulk reply (a flat array of those: its elements, one per line), `Ok(Err(message))`
/// for an error reply.
fn resp_call(stream: &mut TcpStream, args: &[&str]) -> io::Result<Result<String, String>> {
    let mut request = format!("*{}\r\n", args.len());
    for arg in args {
        request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    stream.write_all(request.as_bytes())?;
    let mut reader = BufReader::new(&*stream);
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let Some(len) = line.trim_end().strip_prefix('*') else {
        return read_scalar(&mut reader, line);
    };
    let len: i64 = len.parse().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad array length {len:?}"),
        )
    })?;
    let mut items = Vec::new();
    for _ in 0..len.max(0) {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        match read_scalar(&mut reader, line)? {
            Ok(item) => items.push(item),
            Err(e) => return Ok(Err(e)),
        }
    }
    Ok(Ok(items.join("\n")))
}

/// The rest of a non-array reply whose first line is `line`.
fn read_scalar(
    reader: &mut BufReader<&TcpStream>,
    line: String,
) -> io::Result<Result<String, String>> {
    let line = line.trim_end();
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected reply {line:?}"),
        )
    };
    match line.split_at_checked(1).ok_or_else(bad)? {
        ("+" | ":", rest) => Ok(Ok(rest.to_owned())),
        ("-", rest) => Ok(Err(rest.to_owned())),
        ("$", "-1") => Ok(Ok(String::new())),
        ("$", len) => {
            let len: usize = len.parse().map_err(|_| bad())?;
            let mut body = vec![0; len + 2];
            reader.read_exact(&mut body)?;
            body.truncate(len);
            Ok(Ok(String::from_utf8_lossy(&body).into_owned()))
        }
        _ => Err(bad()),
    }
}

/// Connects to `addr`, authenticates with `password` if any, and sends `args`.
pub(crate) fn call(
    addr: SocketAddr,
    password: Option<&str>,
    args: &[&str],
    timeout: Duration,
) -> io::Result<Result<String, String>> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    if let Some(password) = password
        && let Err(e) = resp_call(&mut stream, &["AUTH", password])?
    {
        return Ok(Err(e));
    }
    resp_call(&mut stream, args)
}

/// The value of `field:` in an `INFO`-style reply.
pub(crate) fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .map(str::trim)
}

/// The last `lines` lines of `text`.
pub(crate) fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Creates or overwrites `path` with `contents`.
pub(crate) fn write_file(path: &Path, contents: &str) -> Result<(), TestkitError> {
    File::create(path)
        .and_then(|mut f| f.write_all(contents.as_bytes()))
        .map_err(|source| TestkitError::Spawn {
            what: format!("writing {}", path.display()),
            source,
        })
}

/// Polls `check` every 100 ms until it succeeds or `timeout` passes; the error carries the
/// last reason `check` gave.
pub(crate) fn wait_until(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<(), String>,
) -> Result<(), TestkitError> {
    let deadline = Instant::now() + timeout;
    loop {
        let reason = match check() {
            Ok(()) => return Ok(()),
            Err(reason) => reason,
        };
        if Instant::now() >= deadline {
            let detail = format!("not done after {timeout:?}: {reason}");
            return Err(TestkitError::Command {
                what: what.to_owned(),
                detail,
            });
        }
        thread::sleep(Duration::from_millis(100));
    }
}
