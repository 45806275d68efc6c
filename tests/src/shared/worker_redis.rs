//! The Redis a worker process of the cross-process tests connects to, from its environment:
//! `NCM_REDIS_URL` (one node) or `NCM_REDIS_NODES` (cluster seed URLs, comma-separated), and
//! `NCM_REDIS_PREFIX`. Included by each worker binary (`#[path]`).

use ncm_cache::RedisConfig;

/// The worker's Redis configuration (health checks as the Redis defaults have them).
pub(crate) fn from_env() -> RedisConfig {
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    let mut c = match std::env::var("NCM_REDIS_URL") {
        Ok(url) if !url.is_empty() => RedisConfig::from_url(&url).unwrap(),
        _ => {
            let mut c = RedisConfig::default();
            c.cluster_nodes = var("NCM_REDIS_NODES")
                .split(',')
                .map(str::to_owned)
                .collect();
            c
        }
    };
    c.key_prefix = var("NCM_REDIS_PREFIX");
    c
}
