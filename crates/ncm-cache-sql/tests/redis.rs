//! SqlCache over Redis (a throwaway redis-server from the testkit): the common suite, and
//! several application instances sharing one Redis see each other's invalidations.
#![cfg(feature = "sqlite")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use ncm_cache_redis::RedisCache;
use ncm_cache_sql::{QueryCacheStrategy, SqlCache, SqliteExecutor, params};
use ncm_cache_testkit::RedisServer;
use support::{Probe, common_suite};

async fn redis(server: &RedisServer) -> RedisCache {
    RedisCache::builder()
        .url(&server.url())
        .unwrap()
        .key_prefix("app:")
        .build()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn common_suite_over_redis() {
    let server = RedisServer::start().unwrap();
    let redis = redis(&server).await;
    let probe = Arc::new(Probe::new(SqliteExecutor::memory().await.unwrap()));
    let cache = SqlCache::builder_shared(redis.cache().clone(), probe.clone())
        .build()
        .unwrap();
    common_suite(&cache, &probe).await;
    // Everything lives under the Redis prefix and the SQL namespace.
    let keys = server.cli(&["--scan", "--pattern", "*"]).unwrap();
    assert!(
        keys.lines()
            .all(|k| k.is_empty() || k.starts_with("app:sql:")),
        "{keys}"
    );
    // Generation keys expire (7 days after their last write): a table no longer queried
    // leaves no key behind for good (before: no TTL — found by review).
    let gens: Vec<&str> = keys.lines().filter(|k| k.contains("#gen")).collect();
    assert!(!gens.is_empty(), "{keys}");
    for key in gens {
        let ttl: i64 = server.cli(&["PTTL", key]).unwrap().trim().parse().unwrap();
        assert!(ttl > 0 && ttl <= 7 * 24 * 3600 * 1000, "{key}: PTTL {ttl}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_sharing_redis_see_each_others_invalidations() {
    let server = RedisServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("shop.db").display());
    // Two "application instances": their own Redis clients and pools, one database.
    let a = SqlCache::builder(
        redis(&server).await.cache().clone(),
        SqliteExecutor::connect(&url).await.unwrap(),
    )
    .build()
    .unwrap();
    let b = SqlCache::builder(
        redis(&server).await.cache().clone(),
        SqliteExecutor::connect(&url).await.unwrap(),
    )
    .build()
    .unwrap();
    a.execute("CREATE TABLE orders (id INTEGER, total REAL)", ())
        .await
        .unwrap();
    a.execute("INSERT INTO orders VALUES (1, 10.0)", ())
        .await
        .unwrap();
    let q = "SELECT sum(total) AS s FROM orders WHERE id > %s";
    a.query(q, params![0]).await.unwrap();
    // B answers from A's entry without touching the database...
    assert!(
        b.cache_query(q, params![0], QueryCacheStrategy::CacheOnly, None)
            .await
            .unwrap()
            .is_some()
    );
    // ...and B's write invalidates it for A.
    b.execute("INSERT INTO orders VALUES (2, 5.5)", ())
        .await
        .unwrap();
    assert_eq!(
        a.cache_query(q, params![0], QueryCacheStrategy::CacheOnly, None)
            .await
            .unwrap(),
        None
    );
    let rows = a.query(q, params![0]).await.unwrap();
    assert_eq!(rows.get(0, "s").and_then(|v| v.as_f64()), Some(15.5));
    // invalidate_pattern and TTLs work through Redis too.
    assert_eq!(b.invalidate_pattern("*orders*").await.unwrap(), 1);
    a.cache_query(
        q,
        params![1],
        QueryCacheStrategy::CacheFirst,
        Some(Duration::from_secs(1)),
    )
    .await
    .unwrap();
    let key = a.key_for(q, params![1]).unwrap();
    let ttl = a.cache().get_ttl(&key).await.unwrap().unwrap();
    assert!(ttl <= Duration::from_secs(1), "{ttl:?}");
}
