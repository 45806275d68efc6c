//! One instance of the cross-process reloader test (`tests/tests/reload_processes.rs`): an
//! Eager value `config` reloaded through a `CacheReloader` with Redis leases, until killed.
//!
//! Environment: `NCM_REDIS_URL`, `NCM_REDIS_PREFIX`, `NCM_WORKER_ID`, `NCM_RELOAD_TTL_MS`,
//! `NCM_RELOAD_FRACTION`, `NCM_RELOAD_LOAD_MS` (how long a load takes), `NCM_RELOAD_LOCK_MS`
//! (the run lease).
//!
//! Output lines: `ready` once registered; `loading <n>` when a load starts, `loaded <n>` when
//! it ends (the value is `{id}:{n}`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ncm_cache::loader::{CacheReloader, ReloadStrategy};
use ncm_cache::{RedisCache, RedisConfig};

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
    let mut config = RedisConfig::from_url(&env("NCM_REDIS_URL")).unwrap();
    config.key_prefix = env("NCM_REDIS_PREFIX");
    let redis = RedisCache::connect(config).await.unwrap();
    let reloader = CacheReloader::redis(&redis)
        .eager_fraction(env("NCM_RELOAD_FRACTION").parse().unwrap())
        .lock_ttl(millis("NCM_RELOAD_LOCK_MS"))
        .lock_wait(millis("NCM_RELOAD_TTL_MS"))
        .build();
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
            ReloadStrategy::Eager,
        )
        .unwrap();
    say("ready");
    // Runs until the test kills it.
    tokio::time::sleep(Duration::from_secs(600)).await;
}
