//! `demo`: a guided tour of ncm-cache, on the embedded memory backend or on Redis.

use std::ops::Deref;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use ncm_cache::loader::WarmConfig;
use ncm_cache::{
    Cache, CacheLoader, CacheReloader, CacheStrategy, CompressionType, MemoryBackend,
    MultiLevelCache, RedisCache, ReloadStrategy, SerializationType, Serializer, SharedBackend,
    ValueSource, cache_loader,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::CliResult;

/// What the tour runs on.
struct Env {
    /// The typed cache every section shares (default TTL 1 h).
    cache: Cache<Serializer>,
    /// Its backend, the L2 of the multi-level section.
    l2: SharedBackend,
    /// Set when running on Redis.
    redis: Option<RedisCache>,
    /// Set when running in memory.
    memory: Option<Arc<MemoryBackend>>,
    /// "memory" or "redis".
    label: &'static str,
}

fn section(title: &str) {
    println!("\n== {title} ==");
}

/// Bytes as B / KiB / MiB.
pub(crate) fn human_bytes(n: u64) -> String {
    if n >= 1 << 20 {
        format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64)
    } else if n >= 1 << 10 {
        format!("{:.1} KiB", n as f64 / 1024.0)
    } else {
        format!("{n} B")
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// `demo [--redis URL]`.
pub(crate) async fn run(redis_url: Option<&str>) -> CliResult {
    let started = Instant::now();
    let env = match redis_url {
        None => {
            let memory = Arc::new(MemoryBackend::new());
            let cache =
                Cache::builder_shared(Arc::clone(&memory) as SharedBackend, Serializer::default())
                    .default_ttl(Duration::from_secs(3600))
                    .build();
            Env {
                l2: Arc::clone(cache.backend()),
                cache,
                redis: None,
                memory: Some(memory),
                label: "memory",
            }
        }
        Some(url) => {
            // Every demo key lives under `ncm-demo:` (after the URL's own prefix), so clearing
            // it touches nothing else.
            let redis = crate::redis_tools::connect(url, Some("ncm-demo:")).await?;
            redis.clear_pattern("*").await?;
            Env {
                cache: redis.cache().clone(),
                l2: redis.backend(),
                redis: Some(redis),
                memory: None,
                label: "redis",
            }
        }
    };
    println!(
        "ncm-cache demo on the {} backend{}",
        env.label,
        if env.redis.is_some() {
            " (keys under the prefix `ncm-demo:`)"
        } else {
            " (embedded, no server needed)"
        }
    );

    complete_example(&env).await?;
    basic_ops(&env).await?;
    let ml = multilevel(&env).await?;
    loaders(&env).await?;
    codecs()?;
    crate::demo_more::sql(&env.cache).await?;
    crate::demo_more::strategies(&env.cache).await?;
    final_stats(&env, &ml).await;

    if let Some(redis) = &env.redis {
        redis.clear_pattern("*").await?;
    }
    ml.close().await.ok();
    env.cache.close().await.ok();
    println!("\ndemo finished in {}", ms(started.elapsed()));
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct User {
    id: u64,
    name: String,
}

/// a. The original README's "Complete Example".
async fn complete_example(env: &Env) -> CliResult {
    section("a. Complete example (the original README)");
    let loader = CacheLoader::new(env.cache.clone());
    let db_queries = Arc::new(AtomicUsize::new(0));
    let queries = Arc::clone(&db_queries);
    loader.register_loader(
        "user",
        move |user_id: u64| {
            let queries = Arc::clone(&queries);
            async move {
                queries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await; // the database
                Ok::<_, std::io::Error>(User {
                    id: user_id,
                    name: format!("User {user_id}"),
                })
            }
        },
        Duration::from_secs(1800),
        CacheStrategy::CacheAside,
    )?;
    let before = env.cache.get_stats();
    for attempt in ["first", "second"] {
        let t = Instant::now();
        let user: User = loader.load("user", 123u64).await?;
        println!(
            "{attempt} load(\"user\", 123): {user:?} in {} (database queries so far: {})",
            ms(t.elapsed()),
            db_queries.load(Ordering::Relaxed)
        );
    }
    println!("SQL caching: see section f (SqlCache on SQLite)");
    let after = env.cache.get_stats();
    let hits = after.hits - before.hits;
    let reads = after.total_requests - before.total_requests;
    println!(
        "cache hit rate: {:.2}% ({hits} hit(s) of {reads} read(s))",
        if reads == 0 {
            0.0
        } else {
            hits as f64 * 100.0 / reads as f64
        }
    );
    Ok(())
}

/// b. Basic operations, TTL, batches, and (on Redis) a pipeline.
async fn basic_ops(env: &Env) -> CliResult {
    section("b. Basic operations");
    let cache = &env.cache;
    let key = "demo:user:1";
    cache
        .set(key, &json!({"name": "John", "email": "john@example.com"}))
        .await?;
    let value: Option<serde_json::Value> = cache.get(key).await?;
    println!("set + get {key}: {}", json!(value));
    println!("exists {key}: {}", cache.exists(key).await?);
    let ttl = cache.get_ttl(key).await?;
    println!("get_ttl: {}", fmt_ttl(ttl));
    let extended = cache.extend_ttl(key, Duration::from_secs(7200)).await?;
    println!(
        "extend_ttl(2 h): {extended}, get_ttl now: {}",
        fmt_ttl(cache.get_ttl(key).await?)
    );
    println!("delete {key}: {}", cache.delete(key).await?);
    println!("exists after delete: {}", cache.exists(key).await?);

    let entries: Vec<(String, u64)> = (0..100).map(|i| (format!("demo:n:{i}"), i * i)).collect();
    let t = Instant::now();
    cache
        .set_many(
            entries.iter().map(|(k, v)| (k.as_str(), *v)),
            Duration::from_secs(600),
        )
        .await?;
    let set_time = t.elapsed();
    let keys: Vec<&str> = entries.iter().map(|(k, _)| k.as_str()).collect();
    let t = Instant::now();
    let values: Vec<Option<u64>> = cache.get_many(&keys).await?;
    let found = values.iter().flatten().count();
    let sum: u64 = values.iter().flatten().sum();
    println!(
        "set_many 100 entries in {}, get_many found {found}/100 in {} (sum of squares {sum})",
        ms(set_time),
        ms(t.elapsed())
    );

    if let Some(redis) = &env.redis {
        let mut pipeline = redis.pipeline();
        pipeline
            .set("demo:p:1", "value1")
            .set("demo:p:2", "value2")
            .set("demo:p:3", "value3")
            .get("demo:p:2")
            .exists("demo:p:3")
            .delete("demo:p:1");
        let queued = pipeline.len();
        let t = Instant::now();
        let results = redis.execute_pipeline(pipeline).await?;
        let got: Option<String> = match results.get(3) {
            Some(r) => redis.decode_result("demo:p:2", r)?,
            None => None,
        };
        println!(
            "pipeline: {queued} commands in one round trip ({}), {} results, get demo:p:2 -> {got:?}",
            ms(t.elapsed()),
            results.len()
        );
    } else {
        println!("pipeline: Redis only (run `demo --redis URL`)");
    }
    Ok(())
}

fn fmt_ttl(ttl: Option<Duration>) -> String {
    match ttl {
        Some(d) => format!("{} s", d.as_secs()),
        None => "none".to_string(),
    }
}

/// c. Multi-level: promotion and stampede prevention.
async fn multilevel(env: &Env) -> CliResult<MultiLevelCache> {
    section("c. Multi-level cache (L1 memory + L2)");
    let mut builder = MultiLevelCache::builder(Arc::clone(&env.l2))
        .name("demo-ml")
        .l1_max_size(10_000)
        .l1_default_ttl(Duration::from_secs(300));
    if let Some(redis) = &env.redis {
        builder = builder
            .backplane(Arc::clone(redis.redis_backend()))
            .distributed_lock(
                Arc::clone(redis.redis_backend()),
                Duration::from_secs(10),
                Duration::from_secs(5),
            );
        println!(
            "L2 = {}, with the Redis backplane (other instances drop their L1 copy on writes)",
            env.label
        );
    } else {
        println!("L2 = {} backend", env.label);
    }
    let ml = builder.build()?;
    if env.redis.is_some() {
        // L1 stays off until the backplane has subscribed (so no stale copy can be missed).
        let t = Instant::now();
        while !ml.l1_active() && t.elapsed() < Duration::from_secs(3) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        println!(
            "backplane subscribed: L1 active = {} after {}",
            ml.l1_active(),
            ms(t.elapsed())
        );
    }

    // A value written to L2 only (e.g. by another instance) is promoted on its first read.
    let key = "demo:ml:config";
    env.cache
        .set(key, &json!({"feature_x": true, "limit": 100}))
        .await?;
    let mut sources = Vec::new();
    for _ in 0..2 {
        let t = Instant::now();
        match ml.get_with_source::<serde_json::Value>(key).await? {
            Some((_, source)) => {
                sources.push(format!("{} ({})", source_name(source), ms(t.elapsed())))
            }
            None => sources.push("miss".to_string()),
        }
    }
    println!(
        "promotion: get_with_source {key}: {}",
        sources.join(", then ")
    );

    // Stampede: 1,000 concurrent readers of a cold key.
    let runs = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    let t = Instant::now();
    for _ in 0..1000 {
        let ml = ml.clone();
        let runs = Arc::clone(&runs);
        tasks.spawn(async move {
            ml.get_or_load::<String, _, _, _>("demo:ml:hot", move || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await; // an expensive query
                Ok::<_, std::io::Error>("computed once".to_string())
            })
            .await
        });
    }
    let mut ok = 0usize;
    let mut failed = 0usize;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok(v)) if v == "computed once" => ok += 1,
            _ => failed += 1,
        }
    }
    println!(
        "stampede: 1000 concurrent get_or_load on a cold key -> loader ran {} time(s); \
         {ok} callers got the value, {failed} failed, in {}",
        runs.load(Ordering::SeqCst),
        ms(t.elapsed())
    );
    Ok(ml)
}

fn source_name(source: ValueSource) -> &'static str {
    match source {
        ValueSource::L1 => "L1",
        ValueSource::L2 => "L2",
        ValueSource::Loader => "loader",
        ValueSource::Stale => "stale",
        _ => "other",
    }
}

/// The loader behind `#[cache_loader]`: the demo's cache once the tour starts (the macro needs
/// a place, e.g. a static, to reach it from).
struct DemoLoader(OnceLock<CacheLoader>);

impl Deref for DemoLoader {
    type Target = CacheLoader;
    fn deref(&self) -> &CacheLoader {
        self.0.get_or_init(|| {
            CacheLoader::new(Cache::new(MemoryBackend::new(), Serializer::default()))
        })
    }
}

static LOADER: DemoLoader = DemoLoader(OnceLock::new());
static PROFILE_BODY_RUNS: AtomicUsize = AtomicUsize::new(0);

/// A "slow" function whose results are cached per argument.
#[cache_loader(loader = LOADER, ttl = "1h")]
async fn user_profile(user_id: u64) -> Result<String, std::io::Error> {
    PROFILE_BODY_RUNS.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(5)).await;
    Ok(format!("profile of user {user_id}"))
}

/// d. Loaders: the attribute macro, warming, and the reloader.
async fn loaders(env: &Env) -> CliResult {
    section("d. Loaders, warming and reloading");
    // If LOADER was already initialised (the demo ran twice in one process) it keeps its cache.
    let _ = LOADER.0.set(CacheLoader::new(env.cache.clone()));

    let before = PROFILE_BODY_RUNS.load(Ordering::SeqCst);
    let t = Instant::now();
    let mut calls = 0;
    for _ in 0..5 {
        for id in [1u64, 2, 3] {
            user_profile(id).await?;
            calls += 1;
        }
    }
    println!(
        "#[cache_loader] user_profile: {calls} calls over 3 distinct ids -> body ran {} time(s) in {}",
        PROFILE_BODY_RUNS.load(Ordering::SeqCst) - before,
        ms(t.elapsed())
    );

    let loader = CacheLoader::new(env.cache.clone());
    loader.register_loader(
        "product",
        |id: u64| async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            Ok::<_, std::io::Error>(
                json!({"id": id, "name": format!("Product {id}"), "price": id * 100}),
            )
        },
        Duration::from_secs(600),
        CacheStrategy::CacheAside,
    )?;
    let configs: Vec<WarmConfig> = (0..100u64).map(|i| WarmConfig::new("product", i)).collect();
    let t = Instant::now();
    let results = loader.warm_cache(configs, 10).await;
    let warmed = results.iter().filter(|r| r.is_ok()).count();
    println!(
        "warm_cache: {warmed}/{} entries with concurrency 10 in {} (each load takes 5 ms)",
        results.len(),
        ms(t.elapsed())
    );
    let t = Instant::now();
    let p: serde_json::Value = loader.load("product", 42u64).await?;
    println!(
        "load(\"product\", 42) after warming: {p} in {}",
        ms(t.elapsed())
    );

    let reloader = CacheReloader::new(env.cache.clone());
    let version = Arc::new(AtomicUsize::new(0));
    let v = Arc::clone(&version);
    reloader.register_loader(
        "demo_config",
        move || {
            let n = v.fetch_add(1, Ordering::SeqCst) + 1;
            async move { Ok::<_, std::io::Error>(format!("config v{n}")) }
        },
        Duration::from_secs(300),
        ReloadStrategy::Lazy,
    )?;
    let first: String = reloader.get("demo_config").await?;
    let ran_unforced = reloader.reload_key("demo_config", false).await?;
    let ran_forced = reloader.reload_key("demo_config", true).await?;
    let second: String = reloader.get("demo_config").await?;
    println!(
        "CacheReloader: get -> {first:?}; reload_key(force=false) ran: {ran_unforced}; \
         reload_key(force=true) ran: {ran_forced}; get -> {second:?}"
    );
    reloader.shutdown().await;
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Order {
    id: u32,
    customer: String,
    email: String,
    status: String,
    paid: bool,
    total: f64,
    lines: Vec<OrderLine>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OrderLine {
    sku: String,
    description: String,
    quantity: u32,
    unit_price: f64,
}

fn sample_order() -> Order {
    let lines = (0..38u32)
        .map(|i| OrderLine {
            sku: format!("SKU-{:06}", 1000 + i * 7),
            description: format!(
                "Widget model {} in colour {}",
                i % 5,
                ["red", "green", "blue"][(i % 3) as usize]
            ),
            quantity: 1 + i % 4,
            unit_price: 9.99 + f64::from(i),
        })
        .collect::<Vec<_>>();
    let total = lines
        .iter()
        .map(|l| f64::from(l.quantity) * l.unit_price)
        .sum();
    Order {
        id: 123,
        customer: "John Example".into(),
        email: "john@example.com".into(),
        status: "shipped".into(),
        paid: true,
        total,
        lines,
    }
}

/// e. Every enabled format × compression on one ~4 KiB record.
fn codecs() -> CliResult {
    section("e. Codecs (format x compression, one ~4 KiB record)");
    let order = sample_order();
    let plain = serde_json::to_vec(&order)?.len();
    println!(
        "sample record: an order with {} lines, {} as plain JSON",
        order.lines.len(),
        human_bytes(plain as u64)
    );
    println!(
        "{:<10} {:<6} {:>8} {:>7} {:>10} {:>10}  round-trip",
        "format", "comp.", "bytes", "ratio", "encode", "decode"
    );
    let mut failures = 0;
    for format in SerializationType::ALL
        .into_iter()
        .filter(|f| f.is_enabled())
    {
        for compression in CompressionType::ALL.into_iter().filter(|c| c.is_enabled()) {
            let serializer = Serializer::builder()
                .format(format)
                .compression(compression)
                .build()?;
            let t = Instant::now();
            let bytes = serializer.encode_to_vec(&order)?;
            let encode = t.elapsed();
            let t = Instant::now();
            let decoded = serializer.decode_slice::<Order>(&bytes);
            let decode = t.elapsed();
            let header = ncm_cache::codec::inspect(&bytes)?;
            let ok = matches!(&decoded, Ok(o) if *o == order)
                && header.is_some_and(|h| h.format == format);
            if !ok {
                failures += 1;
            }
            println!(
                "{:<10} {:<6} {:>8} {:>6.2}x {:>10} {:>10}  {}",
                format.name(),
                compression.name(),
                bytes.len(),
                plain as f64 / bytes.len().max(1) as f64,
                format!("{:.1} us", encode.as_secs_f64() * 1e6),
                format!("{:.1} us", decode.as_secs_f64() * 1e6),
                match &decoded {
                    Ok(_) if ok => "OK".to_string(),
                    Ok(_) => "MISMATCH".to_string(),
                    Err(e) => format!("FAILED: {e}"),
                }
            );
        }
    }
    println!(
        "any serializer decodes every envelope; {} combination(s) failed",
        failures
    );
    if failures > 0 {
        return Err(format!("{failures} codec combination(s) did not round-trip").into());
    }
    Ok(())
}

/// f. Final statistics.
async fn final_stats(env: &Env, ml: &MultiLevelCache) {
    section("h. Final stats");
    if let Some(redis) = &env.redis {
        // Redis `used_memory` is refreshed periodically; read it now.
        redis.redis_backend().refresh_memory_usage().await.ok();
    }
    let s = env.cache.get_stats();
    println!(
        "{} cache: hits {}, misses {}, sets {}, deletes {}, errors {}, hit rate {:.2}%, entries {}, memory {}",
        env.label,
        s.hits,
        s.misses,
        s.sets,
        s.deletes,
        s.errors,
        s.hit_rate * 100.0,
        s.entries.map_or("?".to_string(), |n| n.to_string()),
        match &env.memory {
            // The real bytes (keys + values + per-entry overhead); `memory_usage` is the weight
            // charged against the bounds.
            Some(m) => format!("{} used", human_bytes(m.used_bytes())),
            None => s.memory_usage.map_or("?".to_string(), |b| format!(
                "{} (Redis used_memory)",
                human_bytes(b)
            )),
        },
    );
    let m = ml.get_stats();
    println!(
        "multi-level: L1 hits {}, L2 hits {}, misses {}, loads {}, promotions {}, hit rate {:.2}%, \
         L1 entries {}, L1 weight {}",
        m.l1_hits,
        m.l2_hits,
        m.misses,
        m.loads,
        m.promotions,
        m.hit_rate * 100.0,
        ml.l1_len(),
        human_bytes(ml.l1_weight()),
    );
}
