#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Runs the built `ncm-cache` binary.

use std::process::{Command, Output};

use ncm_cache::{RedisCache, RedisConfig, SerializationType};
use ncm_cache_testkit::RedisServer;

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ncm-cache"))
        .args(args)
        .output()
        .expect("the binary runs")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_demo_output(out: &Output) {
    let text = stdout(out);
    assert!(
        out.status.success(),
        "demo failed: {}\n{text}\n{}",
        out.status,
        stderr(out)
    );
    for section in [
        "== a. Complete example",
        "== b. Basic operations",
        "== c. Multi-level cache",
        "== d. Loaders",
        "== e. Codecs",
        "== f. SQL query caching",
        "== g. Write and invalidation strategies",
        "== h. Final stats",
        "invalidated the table: now [\"Johnny\", \"Jane\"]",
        "1000 writes over 10 keys",
        "pattern: 10 write-behind keys removed",
        "time: callback ran 1 time(s); key cached: false",
    ] {
        assert!(text.contains(section), "missing {section:?} in:\n{text}");
    }
    assert!(
        text.contains("loader ran 1 time(s)"),
        "the stampede loader must run once:\n{text}"
    );
    assert!(
        text.contains("1000 callers got the value, 0 failed"),
        "{text}"
    );
    assert!(text.contains("database queries so far: 1"), "{text}");
    assert!(
        !text.contains("database queries so far: 2"),
        "second load must hit:\n{text}"
    );
    assert!(text.contains("body ran 3 time(s)"), "{text}");
    assert!(text.contains("warm_cache: 100/100"), "{text}");
    assert!(text.contains("reload_key(force=true) ran: true"), "{text}");
    assert!(text.contains("0 combination(s) failed"), "{text}");
    assert!(text.contains("SQL caching: see section f"), "{text}");
    assert!(text.contains("then L1"), "promotion to L1:\n{text}");
}

#[test]
fn demo_runs_in_memory() {
    let out = run(&["demo"]);
    assert_demo_output(&out);
    assert!(stdout(&out).contains("on the memory backend"));
}

#[test]
fn demo_runs_on_redis() {
    let server = RedisServer::start().expect("redis-server starts");
    let out = run(&["demo", "--redis", &server.url()]);
    assert_demo_output(&out);
    let text = stdout(&out);
    assert!(text.contains("on the redis backend"), "{text}");
    assert!(text.contains("pipeline: 6 commands"), "{text}");
}

#[test]
fn bench_runs_briefly() {
    let out = run(&[
        "bench",
        "--duration",
        "1",
        "--keys",
        "1000",
        "--concurrency",
        "4",
    ]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}\n{}", stderr(&out));
    assert!(text.contains("throughput"), "{text}");
    assert!(text.contains("p999"), "{text}");
    assert!(text.contains("hit rate"), "{text}");
}

#[test]
fn bench_rejects_bad_arguments() {
    let out = run(&["bench", "--read-ratio", "2"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--read-ratio"), "{}", stderr(&out));
}

#[test]
fn inspect_and_stats_show_a_cached_key() {
    let server = RedisServer::start().expect("redis-server starts");
    let url = server.url();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut config = RedisConfig::from_url(&url).unwrap();
        config.serialization = SerializationType::MsgPack;
        let cache = RedisCache::connect(config).await.unwrap();
        cache
            .set(
                "user:123",
                &serde_json::json!({"name": "John", "email": "john@example.com"}),
            )
            .await
            .unwrap();
        cache.set("user:124", &"x").await.unwrap();
        cache.set("session:1", &1).await.unwrap();
        cache.close().await.unwrap();
    });

    let out = run(&["inspect", "user:123", "--redis", &url]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}\n{}", stderr(&out));
    assert!(text.contains("format       msgpack"), "{text}");
    assert!(text.contains("compression  none"), "{text}");
    assert!(text.contains("\"john@example.com\""), "{text}");
    assert!(text.contains("ttl "), "{text}");

    let out = run(&["inspect", "missing", "--redis", &url]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("does not exist"), "{}", stderr(&out));

    let out = run(&["stats", "--redis", &url]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}\n{}", stderr(&out));
    assert!(text.contains("version"), "{text}");
    assert!(text.contains("keys matching \"*\": 3"), "{text}");
    let user_line = text
        .lines()
        .find(|l| l.trim_start().starts_with("user:"))
        .unwrap();
    assert!(user_line.trim_end().ends_with(" 2"), "{text}");
}

#[test]
fn bad_urls_fail_with_a_message() {
    let out = run(&["inspect", "k", "--redis", "not a url"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("bad Redis URL"), "{}", stderr(&out));

    // Nothing listens on port 1.
    let out = run(&["demo", "--redis", "redis://127.0.0.1:1/0"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("cannot connect to Redis"),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
}
