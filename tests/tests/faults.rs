//! Fault injection under load, with versioned values.
//!
//! Every test runs tasks that write `Versioned { key, version }` values and read them back while
//! a fault is injected: Redis killed and restarted, paused with SIGSTOP, a TCP proxy that delays,
//! stalls, refuses and cuts connections, a cluster primary killed, the backplane cut, a lock
//! holder killed. For each fault the tests assert that
//! - nothing panics (every task is joined),
//! - no wrong value is returned: a read of `k` returns `k`'s last acknowledged version, or a
//!   version whose write returned an error (its outcome is unknown), or nothing — never another
//!   key's value, an older acknowledged version, or a version never written,
//! - every error is typed (connection, timeout, unavailable) and counted in the cache's stats,
//! - the service recovers by itself within 2 s of the fault ending (every task completes a
//!   write and a read).
//!
//! The report in docs/RELIABILITY.md names these tests.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ncm_cache::prelude::*;
use ncm_cache_core::CacheError;
use ncm_cache_testkit::{
    FaultProxy, ProxyMode, RedisCluster, RedisServer, kill_child_after_marker,
};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

/// The bound the issue sets on recovery after a fault ends.
const RECOVERY: Duration = Duration::from_secs(2);
const TIMEOUT: Duration = Duration::from_millis(300);
const TASKS: usize = 8;
const KEYS_PER_TASK: usize = 8;
/// No test's load runs longer than this, whatever happens.
const LOAD_DEADLINE: Duration = Duration::from_secs(90);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Versioned {
    key: String,
    version: u64,
}

type Fut<'a, T> = Pin<Box<dyn Future<Output = Result<T, CacheError>> + Send + 'a>>;

/// What the load drives: a typed Redis cache or a multi-level cache.
trait Store: Send + Sync + 'static {
    fn put<'a>(&'a self, key: &'a str, value: Versioned) -> Fut<'a, ()>;
    fn fetch<'a>(&'a self, key: &'a str) -> Fut<'a, Option<Versioned>>;
    /// Errors the cache itself counted.
    fn counted_errors(&self) -> u64;
}

impl Store for RedisCache {
    fn put<'a>(&'a self, key: &'a str, value: Versioned) -> Fut<'a, ()> {
        Box::pin(async move { self.set(key, &value).await })
    }
    fn fetch<'a>(&'a self, key: &'a str) -> Fut<'a, Option<Versioned>> {
        Box::pin(self.get::<Versioned>(key))
    }
    fn counted_errors(&self) -> u64 {
        self.get_stats().errors
    }
}

impl Store for MultiLevelCache {
    fn put<'a>(&'a self, key: &'a str, value: Versioned) -> Fut<'a, ()> {
        Box::pin(self.set(key, value))
    }
    fn fetch<'a>(&'a self, key: &'a str) -> Fut<'a, Option<Versioned>> {
        Box::pin(self.get::<Versioned>(key))
    }
    fn counted_errors(&self) -> u64 {
        self.get_stats().l2_errors
    }
}

/// How strictly reads are checked.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Check {
    /// A read returns the last acknowledged version or one whose write failed.
    LastAcked,
    /// A read returns some version this task wrote for this key (a failover may lose the last
    /// acknowledged writes: Redis replicates asynchronously).
    Written,
}

#[derive(Debug, Default)]
struct TaskReport {
    ok_pairs: u64,
    errors: u64,
    misses: u64,
    untyped: Vec<String>,
    wrong: Vec<String>,
}

struct Load {
    stop: Arc<AtomicBool>,
    base: Instant,
    /// Per task: nanoseconds since `base` of its last successful write + read.
    progress: Arc<Vec<AtomicU64>>,
    tasks: Vec<JoinHandle<TaskReport>>,
    store: Arc<dyn Store>,
}

fn typed(e: &CacheError) -> bool {
    e.is_connection() || e.is_timeout() || e.is_unavailable()
}

impl Load {
    fn start(store: Arc<dyn Store>, check: Check) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let base = Instant::now();
        let progress: Arc<Vec<AtomicU64>> =
            Arc::new((0..TASKS).map(|_| AtomicU64::new(0)).collect());
        let tasks = (0..TASKS)
            .map(|t| {
                let (store, stop, progress) =
                    (Arc::clone(&store), Arc::clone(&stop), Arc::clone(&progress));
                tokio::spawn(
                    async move { run_task(t, &*store, &stop, &progress, base, check).await },
                )
            })
            .collect();
        Self {
            stop,
            base,
            progress,
            tasks,
            store,
        }
    }

    /// Waits until every task has completed a write and a read after `since`; the time taken.
    async fn recovered_after(&self, since: Instant) -> Duration {
        let since_ns = since.duration_since(self.base).as_nanos() as u64;
        let limit = RECOVERY * 5;
        loop {
            if self
                .progress
                .iter()
                .all(|p| p.load(Ordering::Relaxed) > since_ns)
            {
                return since.elapsed();
            }
            assert!(
                since.elapsed() < limit,
                "no recovery within {limit:?} of the fault ending"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The fault has just ended: asserts recovery within [`RECOVERY`], lets the load run a
    /// little longer, checks the invariants and that the fault was seen as errors.
    async fn after_fault(self, what: &str) -> TaskReport {
        let took = self.recovered_after(Instant::now()).await;
        assert!(
            took <= RECOVERY,
            "{what}: recovered {took:?} after the fault ended"
        );
        settle().await;
        let report = self.finish(what).await;
        assert!(report.errors > 0, "{what}: the fault was seen as errors");
        report
    }

    /// Stops the tasks and checks the invariants; returns the summed report.
    async fn finish(self, what: &str) -> TaskReport {
        self.stop.store(true, Ordering::Relaxed);
        let mut sum = TaskReport::default();
        for t in self.tasks {
            let r = t
                .await
                .unwrap_or_else(|e| panic!("{what}: a load task panicked: {e}"));
            sum.ok_pairs += r.ok_pairs;
            sum.errors += r.errors;
            sum.misses += r.misses;
            sum.untyped.extend(r.untyped);
            sum.wrong.extend(r.wrong);
        }
        assert!(
            sum.wrong.is_empty(),
            "{what}: wrong values returned: {:?}",
            &sum.wrong[..sum.wrong.len().min(5)]
        );
        assert!(
            sum.untyped.is_empty(),
            "{what}: untyped errors: {:?}",
            &sum.untyped[..sum.untyped.len().min(5)]
        );
        let counted = self.store.counted_errors();
        assert!(
            counted >= sum.errors,
            "{what}: {} errors returned but only {counted} counted",
            sum.errors
        );
        assert!(sum.ok_pairs > 0, "{what}: no successful operation at all");
        println!(
            "{what}: {} ok pairs, {} errors ({counted} counted), {} misses",
            sum.ok_pairs, sum.errors, sum.misses
        );
        sum
    }
}

async fn run_task(
    t: usize,
    store: &dyn Store,
    stop: &AtomicBool,
    progress: &[AtomicU64],
    base: Instant,
    check: Check,
) -> TaskReport {
    let keys: Vec<String> = (0..KEYS_PER_TASK).map(|j| format!("t{t}:k{j}")).collect();
    let mut acked: Vec<Option<u64>> = vec![None; KEYS_PER_TASK];
    let mut failed: Vec<BTreeSet<u64>> = vec![BTreeSet::new(); KEYS_PER_TASK];
    let mut next = 0u64;
    let mut report = TaskReport::default();
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) && base.elapsed() < LOAD_DEADLINE {
        let j = i % KEYS_PER_TASK;
        i += 1;
        let key = &keys[j];
        next += 1;
        let value = Versioned {
            key: key.clone(),
            version: next,
        };
        let wrote = match store.put(key, value).await {
            Ok(()) => {
                acked[j] = Some(next);
                true
            }
            Err(e) => {
                failed[j].insert(next);
                report.errors += 1;
                if !typed(&e) {
                    report.untyped.push(format!("set {key}: {e:?}"));
                }
                false
            }
        };
        match store.fetch(key).await {
            Ok(Some(v)) => {
                let legit = v.key == *key
                    && match check {
                        Check::LastAcked => {
                            Some(v.version) == acked[j] || failed[j].contains(&v.version)
                        }
                        Check::Written => {
                            v.version <= next
                                && (Some(v.version) <= acked[j] || failed[j].contains(&v.version))
                        }
                    };
                if !legit {
                    report.wrong.push(format!(
                        "read {key} -> {v:?}; acked {:?}, failed {:?}",
                        acked[j], failed[j]
                    ));
                }
                if wrote {
                    report.ok_pairs += 1;
                    let now = base.elapsed().as_nanos() as u64;
                    progress[t].store(now, Ordering::Relaxed);
                }
            }
            Ok(None) => {
                report.misses += 1;
                if wrote {
                    report.ok_pairs += 1;
                    let now = base.elapsed().as_nanos() as u64;
                    progress[t].store(now, Ordering::Relaxed);
                }
            }
            Err(e) => {
                report.errors += 1;
                if !typed(&e) {
                    report.untyped.push(format!("get {key}: {e:?}"));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    report
}

fn config(url: &str) -> RedisConfig {
    let mut c = RedisConfig::from_url(url).unwrap();
    c.response_timeout = TIMEOUT;
    c.connect_timeout = TIMEOUT;
    c.health_check_interval = Some(Duration::from_millis(100));
    c.key_prefix = "faults:".into();
    c
}

async fn redis_cache(url: &str) -> Arc<RedisCache> {
    Arc::new(RedisCache::connect(config(url)).await.unwrap())
}

/// Lets the load run (and succeed) for a while before and after a fault.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_mid_load_and_restarted() {
    let mut server = RedisServer::start().unwrap();
    let cache = redis_cache(&server.url()).await;
    let load = Load::start(cache.clone(), Check::LastAcked);
    settle().await;
    server.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    server.restart().unwrap();
    load.after_fault("kill + restart").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_paused_then_resumed() {
    let server = RedisServer::start().unwrap();
    let cache = redis_cache(&server.url()).await;
    let load = Load::start(cache.clone(), Check::LastAcked);
    settle().await;
    server.pause().unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    server.resume().unwrap();
    load.after_fault("SIGSTOP + SIGCONT").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_delay_below_the_timeout_costs_nothing_and_above_it_times_out() {
    let server = RedisServer::start().unwrap();
    let proxy = FaultProxy::start(server.addr()).unwrap();
    let cache = redis_cache(&proxy.url()).await;

    // 50 ms each way stays under the 300 ms timeout: slower, but no error.
    let load = Load::start(cache.clone(), Check::LastAcked);
    settle().await;
    proxy.set_mode(ProxyMode::Delay(Duration::from_millis(50)));
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.set_mode(ProxyMode::Pass);
    settle().await;
    let report = load.finish("delay 50 ms").await;
    assert_eq!(
        report.errors, 0,
        "a delay under the timeout is not an error"
    );

    // 400 ms each way exceeds it: typed timeouts, then recovery once the delay is gone.
    let load = Load::start(cache.clone(), Check::LastAcked);
    settle().await;
    proxy.set_mode(ProxyMode::Delay(Duration::from_millis(400)));
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.set_mode(ProxyMode::Pass);
    load.after_fault("delay 400 ms").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_stall_delivers_late_replies_to_no_one_else() {
    let server = RedisServer::start().unwrap();
    let proxy = FaultProxy::start(server.addr()).unwrap();
    let cache = redis_cache(&proxy.url()).await;
    let load = Load::start(cache.clone(), Check::LastAcked);
    settle().await;
    // A partition: requests and replies wait, the callers time out, then everything queued
    // arrives at once. A reply that reached the wrong caller would show up as a wrong value.
    proxy.set_mode(ProxyMode::Stall);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    proxy.set_mode(ProxyMode::Pass);
    load.after_fault("stall 1.5 s").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_cut_and_refused_connections_then_accepted_again() {
    let server = RedisServer::start().unwrap();
    let proxy = FaultProxy::start(server.addr()).unwrap();
    let cache = redis_cache(&proxy.url()).await;
    let load = Load::start(cache.clone(), Check::LastAcked);
    settle().await;
    for _ in 0..3 {
        // Cut every connection once while traffic flows.
        proxy.cut();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Then refuse reconnections for a second.
    proxy.set_mode(ProxyMode::Refuse);
    proxy.cut();
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.set_mode(ProxyMode::Pass);
    load.after_fault("cut + refuse").await;
    assert!(proxy.accepted_connections() > 2, "the cache reconnected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multilevel_cache_through_a_stalled_and_cut_proxy() {
    let server = RedisServer::start().unwrap();
    let proxy = FaultProxy::start(server.addr()).unwrap();
    let redis = redis_cache(&proxy.url()).await;
    let cache = Arc::new(
        MultiLevelCache::builder(redis.backend())
            .name("faults")
            .backplane(Arc::clone(redis.redis_backend()))
            .build()
            .unwrap(),
    );
    let load = Load::start(cache.clone(), Check::LastAcked);
    settle().await;
    proxy.set_mode(ProxyMode::Stall);
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.cut();
    proxy.set_mode(ProxyMode::Pass);
    load.after_fault("multilevel stall + cut").await;
}

/// Acknowledged writes per key index: (version, when acknowledged).
type History = HashMap<usize, Vec<(u64, Instant)>>;

/// Writes on A (direct to Redis) while B (through the proxy) reads: B's backplane and data
/// connections are cut and stalled. B only ever returns versions A wrote, and after the fault
/// ends B converges: a read that starts more than 100 ms after A acknowledged a newer version
/// never returns an older one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backplane_cut_between_two_instances_converges_after_the_fault() {
    const KEYS: usize = 16;
    let server = RedisServer::start().unwrap();
    let proxy = FaultProxy::start(server.addr()).unwrap();
    let instance = |redis: Arc<RedisCache>| {
        Arc::new(
            MultiLevelCache::builder(redis.backend())
                .name("shared")
                .backplane(Arc::clone(redis.redis_backend()))
                .build()
                .unwrap(),
        )
    };
    let a = instance(redis_cache(&server.url()).await);
    let b = instance(redis_cache(&proxy.url()).await);
    let start = Instant::now();
    while !(a.l1_active() && b.l1_active()) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "backplane never up"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // A's acknowledged writes per key: (version, when acknowledged).
    let history: Arc<Mutex<History>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (a, history, stop) = (a.clone(), history.clone(), stop.clone());
        tokio::spawn(async move {
            let mut version = 0u64;
            while !stop.load(Ordering::Relaxed) && start.elapsed() < LOAD_DEADLINE {
                version += 1;
                let k = version as usize % KEYS;
                let key = format!("k{k}");
                let v = Versioned {
                    key: key.clone(),
                    version,
                };
                a.set(&key, v).await.unwrap();
                history
                    .lock()
                    .unwrap()
                    .entry(k)
                    .or_default()
                    .push((version, Instant::now()));
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let converge_from = Arc::new(Mutex::new(None::<Instant>));
    let reads = Arc::new(AtomicUsize::new(0));
    let reader = {
        let (b, history, stop, converge_from, reads) = (
            b.clone(),
            history.clone(),
            stop.clone(),
            converge_from.clone(),
            reads.clone(),
        );
        tokio::spawn(async move {
            let mut violations = Vec::new();
            let mut errors = 0u64;
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) && start.elapsed() < LOAD_DEADLINE {
                let k = i % KEYS;
                i += 1;
                let key = format!("k{k}");
                let began = Instant::now();
                match b.get::<Versioned>(&key).await {
                    Ok(Some(v)) => {
                        reads.fetch_add(1, Ordering::Relaxed);
                        let history = history.lock().unwrap();
                        let written = history.get(&k).map(Vec::as_slice).unwrap_or_default();
                        if v.key != key || v.version % KEYS as u64 != k as u64 {
                            violations.push(format!("{key} -> {v:?}: another key's value"));
                        }
                        let converging = converge_from.lock().unwrap().is_some_and(|t| began >= t);
                        let newer_long_ago = written.iter().any(|(version, at)| {
                            *version > v.version && *at + Duration::from_millis(100) < began
                        });
                        if converging && newer_long_ago {
                            violations.push(format!("{key} -> {v:?}: stale after recovery"));
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        errors += 1;
                        if !typed(&e) {
                            violations.push(format!("{key}: untyped {e:?}"));
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            (violations, errors)
        })
    };
    settle().await;
    // Cut B's connections (data and pub/sub) three times, then a one-second partition.
    for _ in 0..3 {
        proxy.cut();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    proxy.set_mode(ProxyMode::Stall);
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.cut();
    proxy.set_mode(ProxyMode::Pass);
    let ended = Instant::now();
    *converge_from.lock().unwrap() = Some(ended + RECOVERY);
    // Run well past the recovery bound so the convergence check has reads to judge.
    tokio::time::sleep(RECOVERY + Duration::from_secs(1)).await;
    let before = reads.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        reads.load(Ordering::Relaxed) > before,
        "B serves reads again after the fault"
    );
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let (violations, errors) = reader.await.unwrap();
    assert!(
        violations.is_empty(),
        "{:?}",
        &violations[..violations.len().min(5)]
    );
    assert!(b.get_stats().l2_errors >= errors, "B's errors are counted");
    assert!(b.l1_active(), "B's backplane is back");
    println!(
        "backplane cut: B saw {errors} errors, {} reads",
        reads.load(Ordering::Relaxed)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_primary_killed_during_load_fails_over() {
    let mut cluster = RedisCluster::start().unwrap();
    let mut c = RedisConfig::default();
    c.cluster_nodes = cluster.node_urls();
    c.response_timeout = Duration::from_secs(1);
    c.connect_timeout = Duration::from_millis(500);
    c.health_check_interval = None;
    c.key_prefix = "faults:".into();
    let cache = Arc::new(RedisCache::connect(c).await.unwrap());
    let load = Load::start(cache.clone(), Check::Written);
    settle().await;
    let victim = cluster.primaries().unwrap()[0];
    cluster.kill_primary(victim).unwrap();
    cluster.wait_for_failover(Duration::from_secs(30)).unwrap();
    load.after_fault("cluster failover").await;
}

const LOCK_CHILD: &str = "NCM_FAULTS_LOCK_CHILD_URL";

/// The child: starts loading `report` under the distributed lock, says so, and hangs until
/// it is killed.
async fn hold_the_lock(url: &str) {
    let redis = redis_cache(url).await;
    let cache = MultiLevelCache::builder(redis.backend())
        .name("locked")
        .distributed_lock(
            Arc::clone(redis.redis_backend()),
            Duration::from_secs(1),
            Duration::from_secs(30),
        )
        .build()
        .unwrap();
    let _ = cache
        .get_or_load("report", || async {
            println!("NCM_CHILD_LOADING");
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok::<_, std::io::Error>(0u64)
        })
        .await;
    eprintln!("child was not killed");
    std::process::exit(3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_holder_killed_the_lock_expires_and_another_instance_loads() {
    if let Ok(url) = std::env::var(LOCK_CHILD) {
        return hold_the_lock(&url).await;
    }
    let server = RedisServer::start().unwrap();
    let url = server.url();
    let child = kill_child_after_marker(
        "lock_holder_killed_the_lock_expires_and_another_instance_loads",
        (LOCK_CHILD, &url),
        "NCM_CHILD_LOADING",
        Duration::from_secs(60),
    )
    .unwrap();
    assert!(
        child.reached_marker,
        "the child took the lock and started loading ({:?})",
        child.status
    );
    assert!(!child.status.success(), "killed: {:?}", child.status);
    let killed_at = Instant::now();
    // The dead process still holds the lock: its key is there, with a TTL.
    let locks = server.cli(&["--scan", "--pattern", "*lock*"]).unwrap();
    let lock_key = locks.lines().next().unwrap_or_default().trim().to_owned();
    assert!(!lock_key.is_empty(), "no lock key in Redis: {locks:?}");
    let pttl: i64 = server
        .cli(&["PTTL", &lock_key])
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(pttl > 0, "the orphaned lock has a TTL ({pttl} ms)");

    // The lock is still held by the dead process; this instance waits for it to expire (1 s),
    // then takes it and loads, once.
    let redis = redis_cache(&server.url()).await;
    let cache = MultiLevelCache::builder(redis.backend())
        .name("locked")
        .distributed_lock(
            Arc::clone(redis.redis_backend()),
            Duration::from_secs(1),
            Duration::from_secs(30),
        )
        .build()
        .unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let callers: Vec<_> = (0..50)
        .map(|_| {
            let (cache, runs) = (cache.clone(), runs.clone());
            tokio::spawn(async move {
                cache
                    .get_or_load("report", || async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        Ok::<_, std::io::Error>(42u64)
                    })
                    .await
            })
        })
        .collect();
    for c in callers {
        assert_eq!(c.await.unwrap().unwrap(), 42);
    }
    let took = killed_at.elapsed();
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "one load for all 50 callers"
    );
    assert!(
        took + Duration::from_millis(50) >= Duration::from_millis(pttl as u64),
        "the load waited for the orphaned lock to expire ({took:?}, PTTL was {pttl} ms)"
    );
    assert!(
        took <= Duration::from_secs(1) + RECOVERY,
        "loaded {took:?} after the holder died (lock TTL 1 s)"
    );
}
