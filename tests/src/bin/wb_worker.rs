//! One process of the durable write-behind tests (`tests/tests/write_behind_processes.rs`): a
//! durable `WriteBehind<String>` queue named `orders`, whose store is the Redis hash `db` (a
//! real system of record shared by every process), driven by commands on stdin.
//!
//! Environment: `NCM_REDIS_URL`, `NCM_WB_LEASE_MS`, `NCM_WB_ABORT_AFTER_STORE=1` to abort the
//! process right after its first successful store call (a crash between persist and ack), and
//! `NCM_WB_JOURNAL_URL` to reach the journal's Redis another way (through a fault proxy).
//!
//! With `NCM_WB_STRATEGIES=1` the queue is the one of a `CacheStrategies` built with that
//! durable configuration, and `through <key> <value>` writes through it to the same store.
//!
//! Commands, one per line, each answered by one line (`ok ...` or `err ...`):
//! `write <key> <value> <delay_ms>`, `flush`, `recover`, `through <key> <value>`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::panic
)]

use std::io::{BufRead, Write};
use std::time::Duration;

use ncm_cache::strategies::{
    CacheStrategies, DurableConfig, WriteBehind, WriteBehindConfig, batch_store_fn,
};
use ncm_cache::{RedisCache, RedisConfig};

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_default()
}

fn say(line: &str) {
    println!("{line}");
    let _ = std::io::stdout().flush();
}

#[tokio::main]
async fn main() {
    let url = env("NCM_REDIS_URL");
    let mut config = RedisConfig::from_url(&url).unwrap();
    config.response_timeout = Duration::from_secs(2);
    let redis = RedisCache::connect(config).await.unwrap();
    let db = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let abort = env("NCM_WB_ABORT_AFTER_STORE") == "1";
    let store = batch_store_fn(move |rows: Vec<(String, String)>| {
        let mut db = db.clone();
        async move {
            let mut cmd = redis::cmd("HSET");
            cmd.arg("db");
            for (k, v) in &rows {
                cmd.arg(k).arg(v);
            }
            cmd.query_async::<i64>(&mut db).await?;
            say(&format!("stored {}", rows.len()));
            if abort {
                // Persisted, not acknowledged in the journal: as if SIGKILLed right here.
                std::process::abort();
            }
            Ok::<_, redis::RedisError>(())
        }
    })
    .named("orders");
    let lease = Duration::from_millis(env("NCM_WB_LEASE_MS").parse().unwrap());
    // The journal on another connection (e.g. through a fault proxy) when asked.
    let journal = match env("NCM_WB_JOURNAL_URL") {
        u if u.is_empty() => redis.clone(),
        u => {
            let mut c = RedisConfig::from_url(&u).unwrap();
            c.response_timeout = Duration::from_secs(30);
            RedisCache::connect(c).await.unwrap()
        }
    };
    let durable = DurableConfig::new(journal.redis_backend().clone())
        .lease(lease)
        .claim_min_idle(Duration::from_millis(50));
    let config = WriteBehindConfig::default()
        .batch_size(500)
        .durable(durable);
    let strategies = if env("NCM_WB_STRATEGIES") == "1" {
        Some(
            CacheStrategies::builder(redis.cache().clone())
                .redis(redis.redis_backend().clone())
                .write_behind(config.clone())
                .build()
                .await
                .unwrap(),
        )
    } else {
        None
    };
    let queue = match &strategies {
        Some(s) => s.write_behind_queue(&store).await.unwrap(),
        None => WriteBehind::start(redis.cache().clone(), store.clone(), config)
            .await
            .unwrap(),
    };
    say("ready");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    while let Some(line) = rx.recv().await {
        let words: Vec<&str> = line.split_whitespace().collect();
        let reply = match words.as_slice() {
            ["write", key, value, delay] => {
                let delay = Duration::from_millis(delay.parse().unwrap());
                queue
                    .write(key, &(*value).to_owned(), Duration::from_secs(3600), delay)
                    .await
                    .map(|()| String::new())
            }
            ["flush"] => queue.flush().await.map(|()| String::new()),
            ["through", key, value] => match &strategies {
                Some(s) => s
                    .write_through(key, &(*value).to_owned(), Duration::from_secs(3600), &store)
                    .await
                    .map(|()| String::new()),
                None => panic!("`through` needs NCM_WB_STRATEGIES=1"),
            },
            ["recover"] => queue.recover().await.map(|n| n.to_string()),
            other => panic!("unknown command {other:?}"),
        };
        match reply {
            Ok(extra) => say(&format!("ok {extra}")),
            Err(e) => say(&format!("err {e}")),
        }
    }
}
