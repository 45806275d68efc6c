//! A server that answers with the wrong number of replies (a broken proxy, a hostile endpoint):
//! the clients fail the call instead of pairing values with the wrong keys.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};

use ncm_cache_core::CacheBackend;
use ncm_cache_redis::{RedisCache, RedisSyncCache};

/// Reads one RESP command (an array of bulk strings); `None` at the end of the stream.
fn command(r: &mut BufReader<TcpStream>) -> Option<Vec<String>> {
    let mut line = String::new();
    r.read_line(&mut line).ok().filter(|n| *n > 0)?;
    let n: usize = line.trim().strip_prefix('*')?.parse().ok()?;
    let mut args = Vec::with_capacity(n);
    for _ in 0..n {
        line.clear();
        r.read_line(&mut line).ok()?;
        let len: usize = line.trim().strip_prefix('$')?.parse().ok()?;
        let mut arg = vec![0; len + 2];
        std::io::Read::read_exact(r, &mut arg).ok()?;
        arg.truncate(len);
        args.push(String::from_utf8_lossy(&arg).into_owned());
    }
    Some(args)
}

/// A loopback server that answers `MGET` of any number of keys with one nil, `PING` with
/// `PONG`, and anything else with `OK`. Runs until the test process ends.
fn one_reply_server() -> u16 {
    // Leased (never a port another test's killed server held), for as long as it serves.
    let lease = ncm_cache_testkit::PortLease::reserve().unwrap();
    let listener = TcpListener::bind(("127.0.0.1", lease.port())).unwrap();
    let port = lease.port();
    std::thread::spawn(move || {
        let _lease = lease;
        for stream in listener.incoming().map_while(Result::ok) {
            std::thread::spawn(move || {
                let mut w = stream.try_clone().unwrap();
                let mut r = BufReader::new(stream);
                while let Some(args) = command(&mut r) {
                    let name = args.first().map(|a| a.to_ascii_uppercase());
                    let reply: &[u8] = match name.as_deref() {
                        Some("MGET") => b"*1\r\n$-1\r\n",
                        Some("PING") => b"+PONG\r\n",
                        _ => b"+OK\r\n",
                    };
                    if w.write_all(reply).is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

#[test]
fn the_blocking_client_fails_a_batch_read_answered_with_the_wrong_number_of_values() {
    let port = one_reply_server();
    let cache = RedisSyncCache::from_url(&format!("redis://127.0.0.1:{port}")).unwrap();
    let read = cache.get_many_bytes(&["a", "b", "c"]);
    let err = read.expect_err("three keys read from one reply: values paired with the wrong keys");
    assert!(
        err.to_string()
            .contains("MGET returned 1 values for 3 keys"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_async_client_fails_a_batch_read_answered_with_the_wrong_number_of_values() {
    let port = one_reply_server();
    let cache = RedisCache::from_url(&format!("redis://127.0.0.1:{port}"))
        .await
        .unwrap();
    let read = cache.redis_backend().get_many(&["a", "b", "c"]).await;
    let err = read.expect_err("three keys read from one reply: values paired with the wrong keys");
    assert!(
        err.to_string()
            .contains("MGET returned 1 values for 3 keys"),
        "{err}"
    );
}
