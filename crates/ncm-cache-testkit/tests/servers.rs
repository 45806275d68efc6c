//! Tests of the throwaway Redis servers and clusters themselves.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use ncm_cache_testkit::{
    FaultProxy, PortLease, ProxyMode, RedisCluster, RedisSentinelSet, RedisServer, TestkitError,
};

/// Sends an inline `PING` over a fresh connection and returns the first reply line.
fn raw_ping(addr: SocketAddr, timeout: Duration) -> io::Result<String> {
    raw_command(addr, "PING", timeout)
}

fn raw_command(addr: SocketAddr, inline: &str, timeout: Duration) -> io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(format!("{inline}\r\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    Ok(line.trim_end().to_owned())
}

fn pid_alive(pid: u32) -> bool {
    Command::new("kill")
        .args(["-0", &pid.to_string()])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn two_servers_are_independent() {
    let a = RedisServer::start().unwrap();
    let b = RedisServer::start().unwrap();
    assert_ne!(a.port(), b.port());
    assert_ne!(a.pid(), b.pid());
    for server in [&a, &b] {
        assert_eq!(
            raw_ping(server.addr(), Duration::from_secs(2)).unwrap(),
            "+PONG"
        );
        assert_eq!(server.host(), "127.0.0.1");
        assert_eq!(
            server.url(),
            format!("redis://127.0.0.1:{}/", server.port())
        );
        assert!(server.is_running());
    }
    assert_eq!(a.cli(&["SET", "only-on-a", "1"]).unwrap().trim(), "OK");
    assert_eq!(a.cli(&["GET", "only-on-a"]).unwrap().trim(), "1");
    assert_eq!(b.cli(&["GET", "only-on-a"]).unwrap().trim(), "");
    assert_eq!(b.cli(&["DBSIZE"]).unwrap().trim(), "0");
    assert_eq!(a.command(&["DBSIZE"]).unwrap(), "1");
    assert!(
        a.log_tail(50).contains("Ready to accept connections"),
        "{}",
        a.log_tail(50)
    );
    assert!(a.log_path().starts_with(a.dir()));
}

#[test]
fn restart_keeps_the_port_and_loses_the_data() {
    let mut server = RedisServer::start().unwrap();
    let (port, old_pid) = (server.port(), server.pid());
    server.cli(&["SET", "k", "v"]).unwrap();
    assert_eq!(server.command(&["GET", "k"]).unwrap(), "v");
    server.restart().unwrap();
    assert_eq!(server.port(), port);
    assert_ne!(server.pid(), old_pid);
    assert!(!pid_alive(old_pid));
    assert_eq!(
        raw_ping(server.addr(), Duration::from_secs(2)).unwrap(),
        "+PONG"
    );
    assert_eq!(
        server.command(&["DBSIZE"]).unwrap(),
        "0",
        "--save \"\": nothing survives a restart"
    );
    // A killed server restarts too.
    server.kill();
    server.restart().unwrap();
    assert_eq!(server.port(), port);
    server.ping(Duration::from_secs(2)).unwrap();
}

#[test]
fn pause_stops_answers_and_resume_brings_them_back() {
    let server = RedisServer::start().unwrap();
    server.pause().unwrap();
    assert!(server.is_running(), "a paused server is still running");
    let err = raw_ping(server.addr(), Duration::from_millis(300)).unwrap_err();
    assert!(
        matches!(
            err.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ),
        "expected a read timeout, got {err:?}"
    );
    assert!(server.ping(Duration::from_millis(300)).is_err());
    server.resume().unwrap();
    assert_eq!(
        raw_ping(server.addr(), Duration::from_secs(2)).unwrap(),
        "+PONG"
    );
}

#[test]
fn kill_takes_the_server_down_and_drop_leaves_no_process() {
    let mut server = RedisServer::start().unwrap();
    let pid = server.pid();
    assert!(pid_alive(pid));
    server.kill();
    assert!(!server.is_running());
    assert!(!pid_alive(pid));
    let err = TcpStream::connect_timeout(&server.addr(), Duration::from_secs(1)).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
    server.kill(); // idempotent
    assert!(server.pause().is_err(), "a killed server cannot be paused");

    let server = RedisServer::start().unwrap();
    let (pid, dir) = (server.pid(), server.dir().to_path_buf());
    drop(server);
    assert!(!pid_alive(pid));
    assert!(!dir.exists(), "the temporary directory is removed on drop");

    // A paused server is killed on drop as well, without hanging.
    let server = RedisServer::start().unwrap();
    let pid = server.pid();
    server.pause().unwrap();
    let started = Instant::now();
    drop(server);
    assert!(!pid_alive(pid));
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// A killed server keeps its port (and a cluster node its bus port) until it is dropped: no
/// other test's server may start there while clients still reconnect to it (one that did
/// answered a failover test's reads with nil). `PortLease::take` is what every server start
/// (in any process) goes through.
#[test]
fn a_killed_servers_port_stays_held_until_drop() {
    let mut server = RedisServer::start().unwrap();
    let port = server.port();
    assert!(
        PortLease::take(port).unwrap().is_none(),
        "held while running"
    );
    server.kill();
    assert!(
        PortLease::take(port).unwrap().is_none(),
        "held while killed"
    );
    server.restart().unwrap();
    assert!(
        PortLease::take(port).unwrap().is_none(),
        "held after a restart"
    );
    drop(server);
    assert!(PortLease::take(port).unwrap().is_some(), "free after drop");

    let node = RedisServer::builder()
        .args(["--cluster-enabled", "yes"])
        .start()
        .unwrap();
    let bus = node.port() + 10000;
    assert!(
        PortLease::take(bus).unwrap().is_none(),
        "the bus port is held"
    );
    drop(node);
    assert!(PortLease::take(bus).unwrap().is_some());
}

/// The lease holds across processes: another process (`ncm-testkit-lease`) cannot take a port
/// a killed server of this process holds, and can once the server is dropped.
#[test]
fn a_killed_servers_port_is_held_against_other_processes() {
    let child_takes = |port: u16| {
        let out = Command::new(env!("CARGO_BIN_EXE_ncm-testkit-lease"))
            .arg(port.to_string())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "the child failed: {stdout}");
        match stdout.trim() {
            "taken" => true,
            "held" => false,
            other => panic!("the child said {other:?}"),
        }
    };
    let mut server = RedisServer::start().unwrap();
    server.kill();
    assert!(
        !child_takes(server.port()),
        "another process took a killed server's port"
    );
    let port = server.port();
    drop(server);
    assert!(
        child_takes(port),
        "the port stayed held after the server was dropped"
    );
}

#[test]
fn password_acl_users_and_extra_args_reach_the_server() {
    let server = RedisServer::builder()
        .password("s3cret")
        .acl_user("alice", "wonder")
        .arg("--notify-keyspace-events", "Ex")
        .start()
        .unwrap();
    assert_eq!(
        server.url(),
        format!("redis://:s3cret@127.0.0.1:{}/", server.port())
    );
    let reply = raw_ping(server.addr(), Duration::from_secs(2)).unwrap();
    assert!(reply.starts_with("-NOAUTH"), "{reply}");
    assert_eq!(
        server.cli(&["DBSIZE"]).unwrap().trim(),
        "0",
        "cli authenticates"
    );
    server.ping(Duration::from_secs(2)).unwrap();
    let auth = raw_command(server.addr(), "AUTH alice wonder", Duration::from_secs(2)).unwrap();
    assert_eq!(auth, "+OK");
    let bad = raw_command(server.addr(), "AUTH alice nope", Duration::from_secs(2)).unwrap();
    assert!(bad.starts_with("-WRONGPASS"), "{bad}");
    let events = server
        .cli(&["CONFIG", "GET", "notify-keyspace-events"])
        .unwrap();
    let value = events.lines().nth(1).unwrap();
    assert!(value.contains('E') && value.contains('x'), "{events}");
}

#[test]
fn missing_binary_explains_how_to_install_redis() {
    let err = RedisServer::builder()
        .binary("/nonexistent/redis-server")
        .start()
        .unwrap_err();
    assert!(
        matches!(
            err,
            TestkitError::BinaryMissing {
                binary: "redis-server",
                ..
            }
        ),
        "{err:?}"
    );
    let message = err.to_string();
    for hint in [
        "apt-get install redis-server",
        "brew install redis",
        "NCM_REDIS_SERVER",
        "/nonexistent",
    ] {
        assert!(message.contains(hint), "{message:?} lacks {hint:?}");
    }

    let server = RedisServer::builder()
        .cli_binary("/nonexistent/redis-cli")
        .start()
        .unwrap();
    let err = server.cli(&["PING"]).unwrap_err();
    assert!(err.to_string().contains("NCM_REDIS_CLI"), "{err}");
}

#[test]
fn a_bad_argument_fails_fast_with_the_log_tail() {
    let started = Instant::now();
    let err = RedisServer::builder()
        .arg("--no-such-directive", "1")
        .start()
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "should not wait for the timeout"
    );
    let TestkitError::StartTimeout { log_tail, .. } = &err else {
        panic!("{err:?}")
    };
    assert!(log_tail.contains("no-such-directive"), "{log_tail}");
}

#[test]
fn cluster_starts_with_three_primaries_and_serves_all_slots() {
    let cluster = RedisCluster::start().unwrap();
    assert_eq!(cluster.nodes().len(), 6);
    assert_eq!(cluster.node_urls().len(), 6);
    for node in cluster.nodes() {
        let info = cluster.cluster_info(node.port()).unwrap();
        assert!(info.contains("cluster_state:ok"), "{info}");
        assert!(info.contains("cluster_slots_ok:16384"), "{info}");
        assert!(cluster.node_urls().contains(&node.url()));
    }
    let primaries = cluster.primaries().unwrap();
    let replicas = cluster.replicas().unwrap();
    assert_eq!(primaries.len(), 3, "{primaries:?}");
    assert_eq!(replicas.len(), 3, "{replicas:?}");
    assert!(primaries.iter().all(|p| !replicas.contains(p)));
    // redis-cli -c follows redirections: a key is readable through any node.
    let first = &cluster.nodes()[0];
    assert_eq!(
        first.cli(&["-c", "SET", "{user}:1", "x"]).unwrap().trim(),
        "OK"
    );
    for node in cluster.nodes() {
        assert_eq!(node.cli(&["-c", "GET", "{user}:1"]).unwrap().trim(), "x");
    }
}

#[test]
fn cluster_fails_over_when_a_primary_is_killed() {
    let mut cluster = RedisCluster::start().unwrap();
    let before = cluster.primaries().unwrap();
    let victim = before[0];
    assert!(
        cluster
            .kill_primary(cluster.replicas().unwrap()[0])
            .is_err(),
        "only primaries can be killed"
    );
    let started = Instant::now();
    cluster.kill_primary(victim).unwrap();
    assert!(!cluster.node(victim).unwrap().is_running());
    cluster.wait_for_failover(Duration::from_secs(30)).unwrap();
    eprintln!("failover took {:?}", started.elapsed());
    let after = cluster.primaries().unwrap();
    assert_eq!(after.len(), 3, "{after:?}");
    assert!(!after.contains(&victim), "{after:?}");
    for node in cluster.nodes().iter().filter(|n| n.is_running()) {
        let info = cluster.cluster_info(node.port()).unwrap();
        assert!(info.contains("cluster_state:ok"), "{info}");
    }
    // The old primary rejoins as a replica after a restart.
    cluster.node_mut(victim).unwrap().restart().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cluster.replicas().unwrap().contains(&victim) {
        assert!(
            Instant::now() < deadline,
            "{victim} did not rejoin as a replica"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn sentinel_set_fails_over_when_the_primary_is_killed() {
    let mut set = RedisSentinelSet::start().unwrap();
    assert_eq!(set.master_name(), "mymaster");
    assert_eq!(set.sentinel_addrs().len(), 3);
    let original = set.primary_addr().unwrap();
    assert_eq!(original, set.servers()[0].addr());
    for sentinel in set.sentinels() {
        let addr = sentinel
            .cli(&["SENTINEL", "get-master-addr-by-name", "mymaster"])
            .unwrap();
        assert_eq!(
            addr.split_whitespace().collect::<Vec<_>>(),
            ["127.0.0.1", &original.port().to_string()]
        );
    }
    let started = Instant::now();
    let killed = set.kill_primary().unwrap();
    assert_eq!(killed, original.port());
    set.wait_for_failover(Duration::from_secs(30)).unwrap();
    eprintln!("sentinel failover took {:?}", started.elapsed());
    let promoted = set.primary_addr().unwrap();
    assert_eq!(promoted, set.servers()[1].addr());
    assert_eq!(
        set.servers()[1]
            .cli(&["SET", "after", "failover"])
            .unwrap()
            .trim(),
        "OK"
    );
}

/// One persistent connection through the proxy: sends inline commands, reads one reply line.
struct Conn {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Conn {
    fn open(addr: SocketAddr) -> io::Result<Self> {
        let writer = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        writer.set_read_timeout(Some(Duration::from_secs(2)))?;
        let reader = BufReader::new(writer.try_clone()?);
        Ok(Self { writer, reader })
    }

    fn send(&mut self, inline: &str) -> io::Result<()> {
        self.writer.write_all(format!("{inline}\r\n").as_bytes())
    }

    fn reply(&mut self, timeout: Duration) -> io::Result<String> {
        self.writer.set_read_timeout(Some(timeout))?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(line.trim_end().to_owned())
    }
}

#[test]
fn fault_proxy_passes_delays_stalls_refuses_and_cuts() {
    let server = RedisServer::start().unwrap();
    let proxy = FaultProxy::start(server.addr()).unwrap();
    assert!(proxy.url().ends_with(&proxy.port().to_string()));
    assert!(FaultProxy::start("10.0.0.1:6379".parse().unwrap()).is_err());

    // Pass: answers at once.
    let mut conn = Conn::open(proxy.addr()).unwrap();
    conn.send("SET k v").unwrap();
    assert_eq!(conn.reply(Duration::from_secs(2)).unwrap(), "+OK");

    // Delay: a round trip takes at least twice the delay (one per direction).
    proxy.set_mode(ProxyMode::Delay(Duration::from_millis(150)));
    let start = Instant::now();
    conn.send("PING").unwrap();
    assert_eq!(conn.reply(Duration::from_secs(3)).unwrap(), "+PONG");
    assert!(
        start.elapsed() >= Duration::from_millis(300),
        "{:?}",
        start.elapsed()
    );

    // Stall: nothing arrives, and the bytes are delivered in order once healed.
    proxy.set_mode(ProxyMode::Stall);
    conn.send("GET k").unwrap();
    assert!(conn.reply(Duration::from_millis(300)).is_err());
    proxy.set_mode(ProxyMode::Pass);
    let mut late = String::new();
    for _ in 0..2 {
        match conn.reply(Duration::from_secs(2)) {
            Ok(line) => late.push_str(&line),
            Err(_) => break,
        }
        if late.contains('v') {
            break;
        }
    }
    assert!(late.starts_with("$1") && late.ends_with('v'), "{late:?}");

    // Cut: the open connection sees EOF or a reset; new ones still work.
    proxy.cut();
    conn.send("PING").ok();
    assert!(conn.reply(Duration::from_secs(2)).is_err());
    assert_eq!(
        raw_ping(proxy.addr(), Duration::from_secs(2)).unwrap(),
        "+PONG"
    );

    // Refuse: new connections are closed at once, then accepted again.
    proxy.set_mode(ProxyMode::Refuse);
    let refused = raw_ping(proxy.addr(), Duration::from_secs(2)).unwrap_or_default();
    assert_eq!(
        refused, "",
        "a refused connection is closed without an answer"
    );
    proxy.set_mode(ProxyMode::Pass);
    assert_eq!(
        raw_ping(proxy.addr(), Duration::from_secs(2)).unwrap(),
        "+PONG"
    );

    // Dropping the proxy ends its threads and closes its port.
    let addr = proxy.addr();
    drop(proxy);
    let deadline = Instant::now() + Duration::from_secs(2);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
        assert!(
            Instant::now() < deadline,
            "proxy port still open after drop"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn command_calls_counts_what_the_server_ran() {
    let server = RedisServer::start().unwrap();
    assert_eq!(server.command_calls("PUBLISH").unwrap(), 0);
    for _ in 0..3 {
        assert_eq!(server.command(&["PUBLISH", "ch", "m"]).unwrap(), "0");
    }
    assert_eq!(server.command_calls("PUBLISH").unwrap(), 3);
    assert_eq!(server.command_calls("publish").unwrap(), 3);
    assert_eq!(server.command_calls("NO-SUCH-COMMAND").unwrap(), 0);
}
