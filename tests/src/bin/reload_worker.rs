//! One instance of the cross-process reloader tests (`tests/tests/reload_processes.rs`): a
//! value `config` reloaded through a `CacheReloader` with Redis leases, until killed.
//!
//! Environment: `NCM_REDIS_URL` (one node) or `NCM_REDIS_NODES` (cluster seed URLs,
//! comma-separated), `NCM_REDIS_PREFIX`, `NCM_WORKER_ID`, `NCM_RELOAD_TTL_MS`,
//! `NCM_RELOAD_FRACTION`, `NCM_RELOAD_LOAD_MS` (how long a load takes), `NCM_RELOAD_LOCK_MS`
//! (the run lease), `NCM_RELOAD_STRATEGY` (`eager`, the default, or `refresh_ahead`).
//!
//! Input lines: `get` reads `config` through the reloader. Output lines: `ready` once
//! registered; `loading <n>` when a load starts, `loaded <n>` when it ends (the value is
//! `{id}:{n}`); `got <value>` or `error <e>` for a `get`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

#[path = "../shared/worker_redis.rs"]
mod worker_redis;

use std::io::{BufRead, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ncm_cache::RedisCache;
use ncm_cache::loader::{CacheReloader, ReloadStrategy};

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_default()
}

fn millis(name: &str) -> Duration {
    Duration::from_millis(env(name).parse().expect(name))
}

fn say(line: &str) {
    println!("{line}");
    let _ = std::io::stdout().flush();
}

#[tokio::main]
async fn main() {
    let redis = RedisCache::connect(worker_redis::from_env()).await.unwrap();
    let fraction: f64 = env("NCM_RELOAD_FRACTION").parse().unwrap();
    let reloader = CacheReloader::redis(&redis)
        .eager_fraction(fraction)
        .lock_ttl(millis("NCM_RELOAD_LOCK_MS"))
        .lock_wait(millis("NCM_RELOAD_TTL_MS"))
        .build();
    let strategy = match env("NCM_RELOAD_STRATEGY").as_str() {
        "refresh_ahead" => ReloadStrategy::RefreshAhead { fraction },
        _ => ReloadStrategy::Eager,
    };
    let (id, load) = (env("NCM_WORKER_ID"), millis("NCM_RELOAD_LOAD_MS"));
    let loads = Arc::new(AtomicU64::new(0));
    reloader
        .register_loader(
            "config",
            move || {
                let (id, loads) = (id.clone(), Arc::clone(&loads));
                async move {
                    let n = loads.fetch_add(1, Ordering::SeqCst) + 1;
                    say(&format!("loading {n}"));
                    tokio::time::sleep(load).await;
                    say(&format!("loaded {n}"));
                    Ok::<_, std::io::Error>(format!("{id}:{n}"))
                }
            },
            millis("NCM_RELOAD_TTL_MS"),
            strategy,
        )
        .unwrap();
    say("ready");
    // Runs until the test kills it (or closes its stdin).
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = tokio::time::sleep(Duration::from_secs(600));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            line = rx.recv() => match line.as_deref() {
                Some("get") => match reloader.get::<String>("config").await {
                    Ok(value) => say(&format!("got {value}")),
                    Err(e) => say(&format!("error {e}")),
                },
                Some(_) => {}
                None => {
                    (&mut deadline).await;
                    return;
                }
            },
            () = &mut deadline => return,
        }
    }
}
