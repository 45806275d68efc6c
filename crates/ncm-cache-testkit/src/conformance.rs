//! The backend conformance suite: one set of checks every `CacheBackend` must pass.
//!
//! Written once and run against every backend (memory, Redis single node, Redis Cluster, the
//! blocking Redis client, multi-level caches). It only touches keys under a namespace unique to
//! the run, so it is safe against a store that holds other data.
//!
//! ```no_run
//! # async fn demo(backend: ncm_cache_core::SharedBackend) {
//! use ncm_cache_testkit::conformance::{self, RealTime};
//! conformance::run(backend, &RealTime).await;
//! # }
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use ncm_cache_core::{CacheError, KeyTtl, ManualClock, SharedBackend, escape_glob};

/// How the suite lets time pass for the TTL checks.
pub trait TimeControl: Send + Sync {
    /// The TTL the suite uses for expiring keys.
    fn ttl(&self) -> Duration;
    /// Lets `by` pass (sleeping, or moving a manual clock).
    fn advance(&self, by: Duration) -> impl Future<Output = ()> + Send;
}

/// Real time: TTLs of 300 ms, and sleeping. For backends that keep time themselves (Redis).
#[derive(Debug, Clone, Copy)]
pub struct RealTime;

impl TimeControl for RealTime {
    fn ttl(&self) -> Duration {
        Duration::from_millis(300)
    }
    async fn advance(&self, by: Duration) {
        tokio::time::sleep(by).await;
    }
}

/// A manual clock shared with the backend: TTLs of one hour that pass instantly.
#[derive(Debug, Clone)]
pub struct ManualTime(pub ManualClock);

impl TimeControl for ManualTime {
    fn ttl(&self) -> Duration {
        Duration::from_secs(3600)
    }
    async fn advance(&self, by: Duration) {
        self.0.advance(by);
    }
}

static RUN: AtomicU64 = AtomicU64::new(0);

/// Runs every check against `backend`; panics with a description of the first failure.
pub async fn run(backend: SharedBackend, time: &impl TimeControl) {
    let ns = format!(
        "cf{}-{}:",
        std::process::id(),
        RUN.fetch_add(1, Ordering::Relaxed)
    );
    basic_operations(&backend, &ns).await;
    key_validation(&backend).await;
    binary_values(&backend, &ns).await;
    unicode_and_odd_keys(&backend, &ns).await;
    ttl_behaviour(&backend, &ns, time).await;
    batch_operations(&backend, &ns).await;
    clear_pattern(&backend, &ns).await;
    concurrent_use(&backend, &ns).await;
    health_and_stats(&backend).await;
    // Leave nothing behind.
    backend
        .clear_pattern(&format!("{}*", escape_glob(&ns)))
        .await
        .unwrap();
}

/// get / set / delete / exists and overwrite.
pub async fn basic_operations(b: &SharedBackend, ns: &str) {
    let k = format!("{ns}basic");
    assert_eq!(b.get(&k).await.unwrap(), None, "fresh key must be missing");
    assert!(!b.exists(&k).await.unwrap());
    b.set(&k, Bytes::from_static(b"one"), None).await.unwrap();
    assert_eq!(b.get(&k).await.unwrap().as_deref(), Some(&b"one"[..]));
    assert!(b.exists(&k).await.unwrap());
    b.set(&k, Bytes::from_static(b"two"), None).await.unwrap();
    assert_eq!(
        b.get(&k).await.unwrap().as_deref(),
        Some(&b"two"[..]),
        "overwrite"
    );
    assert!(
        b.delete(&k).await.unwrap(),
        "delete of a present key returns true"
    );
    assert!(
        !b.delete(&k).await.unwrap(),
        "delete of a missing key returns false"
    );
    assert_eq!(b.get(&k).await.unwrap(), None);
}

/// Empty and over-long keys are rejected with `InvalidKey` by every operation.
pub async fn key_validation(b: &SharedBackend) {
    let long = "k".repeat(1024 * 1024);
    for key in ["", long.as_str()] {
        let v = Bytes::from_static(b"v");
        let errs = [
            b.get(key).await.err(),
            b.set(key, v.clone(), None).await.err(),
            b.delete(key).await.err(),
            b.exists(key).await.err(),
            b.get_ttl(key).await.err(),
            b.extend_ttl(key, Duration::from_secs(1)).await.err(),
            b.get_many(&["ok", key]).await.err(),
            b.set_many(&[(key, v.clone())], None).await.err(),
            b.delete_many(&[key]).await.err(),
        ];
        for (i, e) in errs.into_iter().enumerate() {
            assert!(
                matches!(e, Some(CacheError::InvalidKey { .. })),
                "operation #{i} with key of length {} must fail with InvalidKey, got {e:?}",
                key.len()
            );
        }
    }
    assert!(matches!(
        b.clear_pattern("").await,
        Err(CacheError::InvalidPattern { .. })
    ));
}

/// Empty values, every byte value, and 1 MiB round-trip unchanged.
pub async fn binary_values(b: &SharedBackend, ns: &str) {
    let all: Vec<u8> = (0..=255u8).collect();
    let big: Vec<u8> = (0..1024 * 1024).map(|i| (i * 31 % 251) as u8).collect();
    for (name, value) in [("empty", vec![]), ("bytes256", all), ("mib", big)] {
        let k = format!("{ns}bin:{name}");
        b.set(&k, Bytes::from(value.clone()), None).await.unwrap();
        let got = b.get(&k).await.unwrap();
        assert_eq!(got.as_deref(), Some(&value[..]), "binary value {name}");
        assert!(b.delete(&k).await.unwrap());
    }
}

/// Unicode keys and keys with spaces, newlines and glob metacharacters are ordinary keys.
pub async fn unicode_and_odd_keys(b: &SharedBackend, ns: &str) {
    let keys = [
        "ключ:😀:名前",
        "with space",
        "new\nline",
        "tab\there",
        "glob*?[]\\{}",
        "\u{0}nul",
    ];
    for (i, key) in keys.iter().enumerate() {
        let k = format!("{ns}odd:{key}");
        let v = Bytes::from(format!("value {i}"));
        b.set(&k, v.clone(), None).await.unwrap();
        assert_eq!(b.get(&k).await.unwrap(), Some(v), "key {key:?}");
    }
    for key in keys {
        assert!(
            b.delete(&format!("{ns}odd:{key}")).await.unwrap(),
            "{key:?}"
        );
    }
}

/// Per-entry TTL: reads, expiry, persistence, extension, and rejection of zero TTLs.
pub async fn ttl_behaviour(b: &SharedBackend, ns: &str, time: &impl TimeControl) {
    let ttl = time.ttl();
    let exp = format!("{ns}ttl:expiring");
    let per = format!("{ns}ttl:persistent");
    let ext = format!("{ns}ttl:extended");
    b.set(&exp, Bytes::from_static(b"x"), Some(ttl))
        .await
        .unwrap();
    b.set(&per, Bytes::from_static(b"x"), None).await.unwrap();
    b.set(&ext, Bytes::from_static(b"x"), Some(ttl))
        .await
        .unwrap();

    match b.get_ttl(&exp).await.unwrap() {
        KeyTtl::Expires(d) => assert!(d <= ttl && d > ttl / 2, "remaining {d:?} of {ttl:?}"),
        other => panic!("expected an expiring key, got {other:?}"),
    }
    assert_eq!(b.get_ttl(&per).await.unwrap(), KeyTtl::Persistent);
    assert_eq!(
        b.get_ttl(&format!("{ns}ttl:none")).await.unwrap(),
        KeyTtl::Missing
    );

    // Extend one key to 10 × ttl; make the persistent key expire too.
    assert!(b.extend_ttl(&ext, ttl * 10).await.unwrap());
    match b.get_ttl(&ext).await.unwrap() {
        KeyTtl::Expires(d) => assert!(d > ttl * 5 && d <= ttl * 10, "extended to {d:?}"),
        other => panic!("expected an extended key, got {other:?}"),
    }
    assert!(!b.extend_ttl(&format!("{ns}ttl:none"), ttl).await.unwrap());

    // Zero TTLs are rejected.
    assert!(matches!(
        b.set(&exp, Bytes::from_static(b"x"), Some(Duration::ZERO))
            .await,
        Err(CacheError::InvalidArgument(_))
    ));
    assert!(matches!(
        b.extend_ttl(&ext, Duration::ZERO).await,
        Err(CacheError::InvalidArgument(_))
    ));

    time.advance(ttl + ttl / 3).await;
    assert_eq!(
        b.get(&exp).await.unwrap(),
        None,
        "expired key must not be returned"
    );
    assert!(!b.exists(&exp).await.unwrap());
    assert_eq!(b.get_ttl(&exp).await.unwrap(), KeyTtl::Missing);
    assert!(
        !b.extend_ttl(&exp, ttl).await.unwrap(),
        "cannot extend an expired key"
    );
    assert_eq!(b.get_many(&[exp.as_str()]).await.unwrap(), vec![None]);
    assert!(
        b.get(&ext).await.unwrap().is_some(),
        "extended key outlives its old TTL"
    );
    assert!(
        b.get(&per).await.unwrap().is_some(),
        "persistent key never expires"
    );
    b.delete_many(&[per.as_str(), ext.as_str()]).await.unwrap();
}

/// get_many / set_many / delete_many keep key order and count correctly.
pub async fn batch_operations(b: &SharedBackend, ns: &str) {
    let keys: Vec<String> = (0..50).map(|i| format!("{ns}batch:{i}")).collect();
    let entries: Vec<(&str, Bytes)> = keys
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 2 == 0)
        .map(|(i, k)| (k.as_str(), Bytes::from(format!("v{i}"))))
        .collect();
    b.set_many(&entries, None).await.unwrap();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let got = b.get_many(&refs).await.unwrap();
    assert_eq!(got.len(), keys.len());
    for (i, v) in got.iter().enumerate() {
        let expected = (i % 2 == 0).then(|| Bytes::from(format!("v{i}")));
        assert_eq!(v, &expected, "slot {i}");
    }
    // Duplicates and an empty batch.
    let dup = b.get_many(&[refs[0], refs[1], refs[0]]).await.unwrap();
    assert_eq!(dup[0], dup[2]);
    assert_eq!(dup[1], None);
    assert!(b.get_many(&[]).await.unwrap().is_empty());
    b.set_many(&[], None).await.unwrap();
    assert_eq!(b.delete_many(&[]).await.unwrap(), 0);
    assert_eq!(b.delete_many(&refs).await.unwrap(), 25);
    assert!(b.get_many(&refs).await.unwrap().iter().all(Option::is_none));
}

/// clear_pattern follows Redis glob syntax, honours escapes, and stays in its pattern.
pub async fn clear_pattern(b: &SharedBackend, ns: &str) {
    let p = format!("{ns}cp:");
    let names = [
        "user:1",
        "user:2",
        "user:1:profile",
        "order:1",
        "a*b",
        "aXb",
        "q?",
        "qq",
        "[x]",
        "x",
    ];
    for n in names {
        b.set(&format!("{p}{n}"), Bytes::from_static(b"v"), None)
            .await
            .unwrap();
    }
    let outside = format!("{ns}outside:user:1");
    b.set(&outside, Bytes::from_static(b"v"), None)
        .await
        .unwrap();
    let esc = escape_glob(&p).into_owned();

    assert_eq!(b.clear_pattern(&format!("{esc}user:?")).await.unwrap(), 2);
    assert!(b.exists(&format!("{p}user:1:profile")).await.unwrap());
    assert_eq!(b.clear_pattern(&format!("{esc}user:*")).await.unwrap(), 1);
    // Escaped metacharacters match only themselves.
    assert_eq!(
        b.clear_pattern(&format!("{esc}{}", escape_glob("a*b")))
            .await
            .unwrap(),
        1
    );
    assert!(b.exists(&format!("{p}aXb")).await.unwrap());
    assert_eq!(
        b.clear_pattern(&format!("{esc}{}", escape_glob("q?")))
            .await
            .unwrap(),
        1
    );
    assert!(b.exists(&format!("{p}qq")).await.unwrap());
    assert_eq!(
        b.clear_pattern(&format!("{esc}{}", escape_glob("[x]")))
            .await
            .unwrap(),
        1
    );
    assert!(b.exists(&format!("{p}x")).await.unwrap());
    // Character classes.
    assert_eq!(
        b.clear_pattern(&format!("{esc}[ao]rder:*")).await.unwrap(),
        1
    );
    // Everything left under the prefix, nothing outside it.
    assert_eq!(b.clear_pattern(&format!("{esc}*")).await.unwrap(), 3);
    assert!(
        b.exists(&outside).await.unwrap(),
        "keys outside the pattern survive"
    );
    assert_eq!(b.clear_pattern(&format!("{esc}*")).await.unwrap(), 0);
    b.delete(&outside).await.unwrap();
}

/// 16 tasks write and read 32 shared keys; every value read is one that was written, whole.
pub async fn concurrent_use(b: &SharedBackend, ns: &str) {
    const TASKS: u64 = 16;
    const OPS: u64 = 200;
    let mut handles = Vec::new();
    for t in 0..TASKS {
        let b = Arc::clone(b);
        let ns = ns.to_owned();
        handles.push(tokio::spawn(async move {
            for i in 0..OPS {
                let key = format!("{ns}conc:{}", (t * 7 + i) % 32);
                if i % 3 == 0 {
                    b.set(&key, tagged_value(t, i), None).await.unwrap();
                } else if let Some(v) = b.get(&key).await.unwrap() {
                    assert!(check_tagged(&v), "torn or foreign value under {key}");
                }
            }
        }));
    }
    for h in handles {
        h.await.expect("task panicked");
    }
    let keys: Vec<String> = (0..32).map(|i| format!("{ns}conc:{i}")).collect();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    for v in b.get_many(&refs).await.unwrap().into_iter().flatten() {
        assert!(check_tagged(&v));
    }
    b.delete_many(&refs).await.unwrap();
}

/// A value whose every 8-byte word is `(task << 32 | op)`, 1 KiB long.
fn tagged_value(task: u64, op: u64) -> Bytes {
    let word = ((task << 32) | op).to_le_bytes();
    Bytes::from(word.repeat(128))
}

fn check_tagged(v: &[u8]) -> bool {
    v.len() == 1024 && v.chunks(8).all(|c| c == &v[..8])
}

/// health_check answers and stats count the suite's reads.
pub async fn health_and_stats(b: &SharedBackend) {
    assert!(b.health_check().await, "backend must report healthy");
    let report = b.health_report().await;
    assert!(report.healthy, "{report:?}");
    let stats = b.get_stats();
    assert!(stats.total_requests > 0, "reads must be counted: {stats:?}");
    assert!(stats.hits > 0 && stats.misses > 0, "{stats:?}");
    assert_eq!(stats.total_requests, stats.hits + stats.misses);
    assert!((0.0..=1.0).contains(&stats.hit_rate));
}
