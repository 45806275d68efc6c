//! `MultiLevelCache::clear()` on a throwaway redis-server holding 2,000,000 keys of other
//! programs (`DEBUG POPULATE`): with `epoch_clear` (one write of a new epoch) beside the
//! default clear (a SCAN of the keyspace for the cache's prefix, then UNLINK), same server,
//! same run. Each clear removes (or hides) the 100 keys the cache wrote just before it.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::Instant;

use ncm_cache_bench::{Row, median, quick, write_rows};
use ncm_cache_multilevel::MultiLevelCache;
use ncm_cache_redis::{RedisCache, RedisConfig};
use ncm_cache_testkit::RedisServer;

const OTHER_KEYS: &str = "2000000";

async fn cache(server: &RedisServer, prefix: &str, epoch: bool) -> MultiLevelCache {
    let mut config = RedisConfig::from_url(&server.url()).unwrap();
    config.key_prefix = prefix.into();
    config.health_check_interval = None;
    // A SCAN of 2M keys takes seconds: room for every step of it.
    config.response_timeout = std::time::Duration::from_secs(10);
    let redis = RedisCache::connect(config).await.unwrap();
    MultiLevelCache::builder(redis.backend())
        .name(prefix)
        .epoch_clear(epoch)
        .build()
        .unwrap()
}

/// Writes 100 keys, then times `clear()` (ns).
async fn one_clear(cache: &MultiLevelCache) -> f64 {
    for i in 0..100u32 {
        cache.set(&format!("k{i}"), i).await.unwrap();
    }
    let start = Instant::now();
    cache.clear().await.unwrap();
    let took = start.elapsed().as_nanos() as f64;
    assert_eq!(cache.get::<u32>("k0").await.unwrap(), None);
    took
}

fn main() {
    let filter = std::env::var("NCM_BENCH_FILTER").unwrap_or_default();
    if !filter.is_empty() && !"clear_with_2m_other_keys".contains(&filter) {
        return;
    }
    let server = RedisServer::builder()
        .arg("--enable-debug-command", "yes")
        .start()
        .expect("redis-server is needed for the clear bench");
    server
        .command(&["DEBUG", "POPULATE", OTHER_KEYS, "other", "16"])
        .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (ours_runs, scan_runs) = if quick() { (20, 2) } else { (100, 5) };
    let (ours, scan) = rt.block_on(async {
        let epoch = cache(&server, "epoch:", true).await;
        let plain = cache(&server, "scan:", false).await;
        let mut ours = Vec::new();
        for _ in 0..ours_runs {
            ours.push(one_clear(&epoch).await);
        }
        let mut scan = Vec::new();
        for _ in 0..scan_runs {
            scan.push(one_clear(&plain).await);
        }
        (median(&mut ours), median(&mut scan))
    });
    let rows = vec![Row {
        name: "clear_with_2m_other_keys".into(),
        ours,
        baseline: scan,
        baseline_name: "clear() without epochs (SCAN + UNLINK)".into(),
        unit: "ns".into(),
        ratio: scan / ours,
    }];
    for r in &rows {
        println!(
            "{:<40} ours {:>14.0} {:<3} baseline {:>14.0} ({}) ratio {:.0}",
            r.name, r.ours, r.unit, r.baseline, r.baseline_name, r.ratio
        );
    }
    write_rows("clear", &rows).unwrap();
}
