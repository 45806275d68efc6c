//! A throwaway Redis Sentinel setup: one primary, one replica and three sentinels on loopback.

use std::net::SocketAddr;
use std::time::Duration;

use tempfile::TempDir;

use crate::process::{HOST, TestkitError, info_field, wait_until, write_file};
use crate::server::RedisServer;

/// The name the sentinels monitor the primary under.
pub const MASTER_NAME: &str = "mymaster";
const SENTINELS: usize = 3;
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// One primary, one replica (`--replicaof`) and three sentinels (`redis-server <conf> --sentinel`)
/// monitoring the primary as [`MASTER_NAME`] with quorum 2, `down-after-milliseconds 1000` and
/// `failover-timeout 5000`. Every process is killed on drop.
#[derive(Debug)]
pub struct RedisSentinelSet {
    data: Vec<RedisServer>,
    sentinels: Vec<RedisServer>,
    _conf_dir: TempDir,
}

/// The `master0:` line of a sentinel's `INFO sentinel`: (status, address, replicas, sentinels).
fn master_status(info: &str) -> Option<(String, SocketAddr, usize, usize)> {
    let line = info_field(info, "master0")?;
    let field = |name: &str| {
        line.split(',')
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .map(str::to_owned)
    };
    Some((
        field("status")?,
        field("address")?.parse().ok()?,
        field("slaves")?.parse().ok()?,
        field("sentinels")?.parse().ok()?,
    ))
}

impl RedisSentinelSet {
    /// Starts the primary, the replica and the sentinels, then waits (up to 30 s) until the
    /// replica is linked and every sentinel sees the primary as `ok` with one replica and
    /// three sentinels.
    pub fn start() -> Result<Self, TestkitError> {
        Self::start_inner(None, &[])
    }

    /// The same with `password` required by the primary and the replica (`requirepass`,
    /// `masterauth`); the sentinels know it (`sentinel auth-pass`) and need none themselves.
    pub fn start_with_password(password: &str) -> Result<Self, TestkitError> {
        Self::start_inner(Some(password), &[])
    }

    /// The same with `args` given to the primary and the replica (not the sentinels), e.g.
    /// `["--rename-command", "HELLO", ""]` for a server without `HELLO`.
    pub fn start_with_data_args(args: &[&str]) -> Result<Self, TestkitError> {
        Self::start_inner(None, args)
    }

    fn start_inner(password: Option<&str>, extra: &[&str]) -> Result<Self, TestkitError> {
        let data = |args: Vec<String>| {
            let mut b = RedisServer::builder()
                .args(args)
                .args(extra.iter().copied());
            if let Some(p) = password {
                b = b.password(p).args(["--masterauth", p]);
            }
            b.start()
        };
        let primary = data(vec!["--repl-diskless-sync-delay".into(), "0".into()])?;
        let port = primary.port().to_string();
        let replica = data(vec!["--replicaof".into(), HOST.into(), port.clone()])?;
        let conf_dir = tempfile::Builder::new()
            .prefix("ncm-sentinel-")
            .tempdir()
            .map_err(|source| TestkitError::Spawn {
                what: "creating a temporary directory".to_owned(),
                source,
            })?;
        let conf = format!(
            "sentinel monitor {MASTER_NAME} {HOST} {port} 2\n\
             sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
             sentinel failover-timeout {MASTER_NAME} 5000\n\
             sentinel parallel-syncs {MASTER_NAME} 1\n{}",
            password.map_or(String::new(), |p| format!(
                "sentinel auth-pass {MASTER_NAME} {p}\n"
            ))
        );
        let mut sentinels = Vec::with_capacity(SENTINELS);
        for i in 0..SENTINELS {
            let path = conf_dir.path().join(format!("sentinel-{i}.conf"));
            write_file(&path, &conf)?;
            sentinels.push(
                RedisServer::builder()
                    .config_file(path)
                    .args(["--sentinel"])
                    .start()?,
            );
        }
        let set = Self {
            data: vec![primary, replica],
            sentinels,
            _conf_dir: conf_dir,
        };
        wait_until(
            READY_TIMEOUT,
            "waiting for the sentinels to become ready",
            || {
                let repl = set.data[1]
                    .command(&["INFO", "replication"])
                    .map_err(|e| e.to_string())?;
                if info_field(&repl, "master_link_status") != Some("up") {
                    return Err("the replica is not linked to the primary yet".to_owned());
                }
                set.check_sentinels(|status| status.2 == 1 && status.3 == SENTINELS)
            },
        )?;
        Ok(set)
    }

    /// The name the sentinels monitor the primary under ([`MASTER_NAME`]).
    pub fn master_name(&self) -> &'static str {
        MASTER_NAME
    }

    /// The sentinels' addresses.
    pub fn sentinel_addrs(&self) -> Vec<SocketAddr> {
        self.sentinels.iter().map(RedisServer::addr).collect()
    }

    /// The sentinel processes.
    pub fn sentinels(&self) -> &[RedisServer] {
        &self.sentinels
    }

    /// The primary and the replica, in their original roles (fail-overs do not reorder them).
    pub fn servers(&self) -> &[RedisServer] {
        &self.data
    }

    /// The data server listening on `port`, e.g. to restart it.
    pub fn server_mut(&mut self, port: u16) -> Option<&mut RedisServer> {
        self.data.iter_mut().find(|s| s.port() == port)
    }

    /// The primary's address as reported by the first running sentinel.
    pub fn primary_addr(&self) -> Result<SocketAddr, TestkitError> {
        let sentinel = self
            .sentinels
            .iter()
            .find(|s| s.is_running())
            .ok_or_else(|| TestkitError::Command {
                what: "finding a running sentinel".to_owned(),
                detail: "every sentinel has been killed".to_owned(),
            })?;
        let info = sentinel.command(&["INFO", "sentinel"])?;
        master_status(&info)
            .map(|s| s.1)
            .ok_or_else(|| TestkitError::Command {
                what: format!("INFO sentinel on port {}", sentinel.port()),
                detail: format!("no master0 line in {info:?}"),
            })
    }

    /// Kills (SIGKILL) the current primary and returns its port. Follow with
    /// [`wait_for_failover`](Self::wait_for_failover).
    pub fn kill_primary(&mut self) -> Result<u16, TestkitError> {
        let port = self.primary_addr()?.port();
        let server = self.server_mut(port).ok_or_else(|| TestkitError::Command {
            what: "killing the primary".to_owned(),
            detail: format!("the sentinels report {port}, which is not in this set"),
        })?;
        server.kill();
        Ok(port)
    }

    /// Waits (up to `timeout`) until every running sentinel reports a running server as the
    /// primary with status `ok`, and that server reports `role:master`.
    pub fn wait_for_failover(&self, timeout: Duration) -> Result<(), TestkitError> {
        let set = self;
        wait_until(timeout, "waiting for the sentinels to fail over", || {
            set.check_sentinels(|status| {
                set.data.iter().any(|s| {
                    s.addr() == status.1
                        && s.is_running()
                        && s.command(&["INFO", "replication"])
                            .is_ok_and(|info| info_field(&info, "role") == Some("master"))
                })
            })
        })
    }

    fn check_sentinels(
        &self,
        accept: impl Fn(&(String, SocketAddr, usize, usize)) -> bool,
    ) -> Result<(), String> {
        for sentinel in self.sentinels.iter().filter(|s| s.is_running()) {
            let info = sentinel
                .command(&["INFO", "sentinel"])
                .map_err(|e| e.to_string())?;
            match master_status(&info) {
                Some(status) if status.0 == "ok" && accept(&status) => {}
                other => return Err(format!("sentinel {} reports {other:?}", sentinel.port())),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::master_status;

    #[test]
    fn parses_info_sentinel() {
        let info = "# Sentinel\r\nsentinel_masters:1\r\nmaster0:name=mymaster,status=ok,address=127.0.0.1:6379,slaves=1,sentinels=3\r\n";
        let (status, addr, replicas, sentinels) = master_status(info).unwrap();
        assert_eq!(
            (status.as_str(), addr.port(), replicas, sentinels),
            ("ok", 6379, 1, 3)
        );
    }
}
