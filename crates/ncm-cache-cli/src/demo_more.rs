//! Demo sections f (SQL caching) and g (write and invalidation strategies).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ncm_cache::Cache;
use ncm_cache::codec::Serializer;
use ncm_cache::sql::{QueryCacheStrategy, SqlCache, SqliteExecutor, params};
use ncm_cache::strategies::{CacheStrategies, store_fn};
use serde::Deserialize;

use crate::CliResult;

fn section(title: &str) {
    println!("\n== {title} ==");
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

#[derive(Debug, Deserialize)]
struct Name {
    name: String,
}

/// f. SQL query caching on SQLite, with write-aware table invalidation.
pub(crate) async fn sql(cache: &Cache<Serializer>) -> CliResult {
    section("f. SQL query caching (SQLite, table invalidation)");
    let db = SqliteExecutor::memory().await?;
    let sql = SqlCache::builder(cache.clone(), db)
        .default_ttl(Duration::from_secs(1800))
        .build()?;
    sql.execute(
        "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT, active BOOLEAN)",
        (),
    )
    .await?;
    sql.execute(
        "INSERT INTO users VALUES (123, 'John', %s), (124, 'Jane', %s)",
        params![true, true],
    )
    .await?;
    let query = "SELECT name FROM users WHERE active = %s ORDER BY id";
    let names = |rows: Option<ncm_cache::sql::Rows>| -> CliResult<Vec<String>> {
        Ok(match rows {
            Some(rows) => rows
                .deserialize::<Name>()?
                .into_iter()
                .map(|n| n.name)
                .collect(),
            None => Vec::new(),
        })
    };
    for attempt in ["first (database)", "second (cache)"] {
        let t = Instant::now();
        let rows = sql
            .cache_query(query, params![true], QueryCacheStrategy::CacheFirst, None)
            .await?;
        println!("{attempt}: {:?} in {}", names(rows)?, ms(t.elapsed()));
    }
    let changed = sql
        .execute(
            "UPDATE users SET name = %s WHERE id = %s",
            params!["Johnny", 123],
        )
        .await?;
    let rows = sql
        .cache_query(query, params![true], QueryCacheStrategy::CacheFirst, None)
        .await?;
    println!(
        "execute(UPDATE users ...) changed {changed} row(s) and invalidated the table: now {:?}",
        names(rows)?
    );
    let cached_only = sql
        .cache_query(
            "SELECT name FROM users WHERE id = %s",
            params![124],
            QueryCacheStrategy::CacheOnly,
            None,
        )
        .await?;
    println!(
        "CACHE_ONLY on a query never run: {:?} (no database access)",
        cached_only.is_some()
    );
    sql.invalidate_table("users").await?;
    let stats = sql.get_performance_stats();
    println!(
        "query stats: hits {}, misses {}, hit rate {:.2}%",
        stats.hits,
        stats.misses,
        stats.hit_rate * 100.0
    );
    Ok(())
}

/// g. Write-through, write-behind (batched), write-around, dependency and event invalidation.
pub(crate) async fn strategies(cache: &Cache<Serializer>) -> CliResult {
    section("g. Write and invalidation strategies");
    let strategies = CacheStrategies::new(cache.clone());
    let database: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let store_calls = Arc::new(AtomicUsize::new(0));
    let (db, calls) = (Arc::clone(&database), Arc::clone(&store_calls));
    let store = store_fn(move |key: String, value: u64| {
        let (db, calls) = (Arc::clone(&db), Arc::clone(&calls));
        async move {
            calls.fetch_add(1, Ordering::Relaxed);
            db.lock().map_err(|_| "poisoned")?.insert(key, value);
            Ok::<_, &'static str>(())
        }
    })
    .named("demo");
    let ttl = Duration::from_secs(3600);
    let stored = |key: &str| database.lock().ok().and_then(|db| db.get(key).copied());

    strategies
        .write_through("demo:wt:1", &1u64, ttl, &store)
        .await?;
    println!(
        "write_through: store {:?}, cache {:?}",
        stored("demo:wt:1"),
        cache.get::<u64>("demo:wt:1").await?
    );

    let t = Instant::now();
    for i in 0..1000u64 {
        let key = format!("demo:wb:{}", i % 10);
        strategies
            .write_behind(&key, &i, ttl, &store, Duration::from_millis(50))
            .await?;
    }
    let accepted = t.elapsed();
    strategies.flush().await?;
    let stats = strategies.write_behind_stats();
    let (writes, batches): (u64, u64) = stats
        .iter()
        .fold((0, 0), |(w, c), s| (w + s.accepted, c + s.store_calls));
    println!(
        "write_behind: {writes} writes over 10 keys accepted in {}, persisted in {batches} store call(s); demo:wb:9 = {:?}",
        ms(accepted),
        stored("demo:wb:9")
    );

    strategies.write_around("demo:wa:1", &7u64, &store).await?;
    println!(
        "write_around: store {:?}, cache {:?} (skipped)",
        stored("demo:wa:1"),
        cache.get::<u64>("demo:wa:1").await?
    );

    cache.set("demo:user:123", &"user").await?;
    cache.set("demo:profile:123", &"profile").await?;
    strategies
        .dependency_based_invalidation("demo:user:123", ["demo:profile:123"])
        .await?;
    let removed = strategies
        .invalidate_dependencies("demo:profile:123")
        .await?;
    println!(
        "dependency: invalidate_dependencies(profile) removed {removed} key(s); user cached: {}",
        cache.exists("demo:user:123").await?
    );

    cache.set("demo:user:456", &"user").await?;
    strategies
        .event_based_invalidation("user_updated", ["demo:user:456"], |event, keys| {
            println!("event {event:?} invalidated {keys:?}");
        })
        .await?;
    strategies
        .trigger_event_invalidation("user_updated")
        .await?;
    println!(
        "event: demo:user:456 cached after the event: {}",
        cache.exists("demo:user:456").await?
    );
    let removed = strategies
        .pattern_based_invalidation("demo:wb:*", |pattern, n| {
            println!("pattern {pattern:?} invalidated {n} key(s)");
        })
        .await?;
    println!("pattern: {removed} write-behind keys removed from the cache");

    let expired = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&expired);
    cache
        .set_with_ttl("demo:tmp:1", &"short-lived", Duration::from_millis(60))
        .await?;
    strategies
        .time_based_invalidation("demo:tmp:1", Duration::from_millis(60), move |key| {
            seen.fetch_add(1, Ordering::Relaxed);
            println!("time-based: {key} expired, callback ran");
        })
        .await?;
    for _ in 0..100 {
        if expired.load(Ordering::Relaxed) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "time: callback ran {} time(s); key cached: {}",
        expired.load(Ordering::Relaxed),
        cache.exists("demo:tmp:1").await?
    );
    strategies.shutdown().await?;
    println!(
        "store calls in this section: {}",
        store_calls.load(Ordering::Relaxed)
    );
    Ok(())
}
