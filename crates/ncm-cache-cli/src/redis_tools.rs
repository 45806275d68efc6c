//! `inspect` and `stats`: read-only looks at a Redis server.

use std::collections::BTreeMap;
use std::time::Duration;

use ncm_cache::core::Operation;
use ncm_cache::{RedisCache, RedisConfig, Serializer, codec};

use crate::CliResult;

/// Connects to `url`, appending `extra_prefix` to the URL's own `key_prefix`.
pub(crate) async fn connect(url: &str, extra_prefix: Option<&str>) -> CliResult<RedisCache> {
    let mut config = RedisConfig::from_url(url).map_err(|e| format!("bad Redis URL: {e}"))?;
    if let Some(p) = extra_prefix {
        config.key_prefix = format!("{}{p}", config.key_prefix);
    }
    // A CLI should say quickly that nothing is listening.
    config.connect_timeout = config.connect_timeout.min(Duration::from_secs(2));
    let cache = RedisCache::connect(config)
        .await
        .map_err(|e| format!("cannot connect to Redis: {e}"))?;
    Ok(cache)
}

/// `inspect KEY --redis URL`.
pub(crate) async fn inspect(url: &str, key: &str) -> CliResult {
    let redis = connect(url, None).await?;
    let backend = redis.redis_backend();
    let full = backend.key_space().full_key(key)?.into_owned();
    let raw: Option<Vec<u8>> = backend
        .query_cmd(Operation::Get, redis::cmd("GET").arg(&full))
        .await
        .map_err(|e| format!("GET {full:?} failed: {e}"))?;
    let Some(raw) = raw else {
        return Err(format!("key {full:?} does not exist").into());
    };
    let pttl: i64 = backend
        .query_cmd(Operation::GetTtl, redis::cmd("PTTL").arg(&full))
        .await?;
    println!("key          {full}");
    println!("size         {} bytes", raw.len());
    match pttl {
        -1 => println!("ttl          none (never expires)"),
        ms if ms >= 0 => println!("ttl          {:.3} s", ms as f64 / 1000.0),
        _ => println!("ttl          (key vanished)"),
    }
    match codec::inspect(&raw) {
        Ok(Some(h)) => {
            println!("envelope     ncm-cache v{}", h.version);
            println!("format       {}", h.format.name());
            println!("compression  {}", h.compression.name());
            println!("header       {} bytes", h.header_len);
            println!("payload      {} bytes", h.payload(&raw).len());
            if h.is_signed() {
                println!("signed       HMAC-SHA256 tag, {} bytes", codec::TAG_LEN);
            }
            if let Some(n) = h.uncompressed_len {
                let ratio = n as f64 / raw.len().max(1) as f64;
                println!("uncompressed {n} bytes (ratio {ratio:.2}x)");
            }
            if !h.format.is_enabled() {
                println!(
                    "note         this build lacks feature `{}`",
                    h.format.feature()
                );
            }
        }
        Ok(None) => println!("envelope     none (a raw value)"),
        Err(e) => println!("envelope     corrupt: {e}"),
    }
    match Serializer::default().decode_slice::<serde_json::Value>(&raw) {
        Ok(value) => {
            let pretty = serde_json::to_string_pretty(&value)?;
            println!("value:\n{pretty}");
        }
        Err(e) => {
            println!("value        not decodable as a cache value ({e})");
            let text = String::from_utf8_lossy(&raw[..raw.len().min(256)]).into_owned();
            println!(
                "raw          {text:?}{}",
                if raw.len() > 256 { " ..." } else { "" }
            );
        }
    }
    Ok(())
}

/// Pulls `field:value` out of an `INFO` reply.
fn info_field<'a>(info: &'a str, field: &str) -> Option<&'a str> {
    info.lines().find_map(|line| {
        line.strip_prefix(field)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(str::trim)
    })
}

/// `stats --redis URL [--prefix P]`.
pub(crate) async fn stats(url: &str, prefix: Option<&str>, max_keys: u64) -> CliResult {
    let redis = connect(url, None).await?;
    let backend = redis.redis_backend();
    let info: String = backend
        .query_cmd(Operation::HealthCheck, &redis::cmd("INFO"))
        .await
        .map_err(|e| format!("INFO failed: {e}"))?;
    println!("server");
    for (label, field) in [
        ("version", "redis_version"),
        ("mode", "redis_mode"),
        ("uptime (s)", "uptime_in_seconds"),
        ("used_memory", "used_memory"),
        ("used_memory_human", "used_memory_human"),
        ("connected_clients", "connected_clients"),
        ("keyspace hits", "keyspace_hits"),
        ("keyspace misses", "keyspace_misses"),
    ] {
        println!("  {label:<18} {}", info_field(&info, field).unwrap_or("?"));
    }
    for line in info.lines().filter(|l| l.starts_with("db")) {
        println!("  {line}");
    }

    let base = format!("{}{}", backend.config().key_prefix, prefix.unwrap_or(""));
    let pattern = format!("{}*", ncm_cache::escape_glob(&base));
    let mut groups: BTreeMap<String, u64> = BTreeMap::new();
    let mut cursor: u64 = 0;
    let mut scanned: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<Vec<u8>>) = backend
            .query_cmd(
                Operation::ClearPattern,
                redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000),
            )
            .await
            .map_err(|e| format!("SCAN failed: {e}"))?;
        for key in keys {
            scanned += 1;
            let key = String::from_utf8_lossy(&key);
            let rest = key.strip_prefix(base.as_str()).unwrap_or(&key);
            let group = match rest.split_once(':') {
                Some((g, _)) => format!("{g}:"),
                None => "(no ':')".to_string(),
            };
            *groups.entry(group).or_default() += 1;
        }
        cursor = next;
        if cursor == 0 || scanned >= max_keys {
            break;
        }
    }
    let complete = cursor == 0;
    println!(
        "\nkeys matching {pattern:?}: {scanned}{}",
        if complete {
            String::new()
        } else {
            format!(" (stopped after {max_keys}; more exist)")
        }
    );
    let mut rows: Vec<_> = groups.into_iter().collect();
    rows.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    for (group, count) in rows.iter().take(50) {
        println!("  {base}{group:<30} {count:>10}");
    }
    if rows.len() > 50 {
        println!("  ... {} more prefixes", rows.len() - 50);
    }
    redis.close().await.ok();
    Ok(())
}
