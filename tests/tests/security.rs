//! End-to-end security properties on a real (throwaway) Redis: signed values defeat cache
//! poisoning by writers without the key, and key prefixes isolate caches sharing one server.
//!
//! The "attacker" in these tests has write access to Redis (a cache without the key, or a
//! plain redis-rs connection) but not the signing key.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use ncm_cache::codec::{Serializer, SignatureMode, inspect};
use ncm_cache::core::{Codec, SharedBackend};
use ncm_cache::multilevel::MultiLevelCache;
use ncm_cache::redis::{RedisBackend, RedisCache, RedisConfig};
use ncm_cache_testkit::RedisServer;
use redis::Commands;
use serde::{Deserialize, Serialize};

const SIGNING_KEY: &str = "e2e-signing-key-0123456789abcdef";
const ATTACKER_KEY: &str = "attacker-signing-key-0123456789";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Account {
    user: String,
    is_admin: bool,
}

fn alice() -> Account {
    Account {
        user: "alice".into(),
        is_admin: false,
    }
}

fn mallory_as_admin() -> Account {
    Account {
        user: "mallory".into(),
        is_admin: true,
    }
}

async fn redis_cache(server: &RedisServer, prefix: &str, signing_key: Option<&str>) -> RedisCache {
    let mut builder = RedisCache::builder()
        .url(&server.url())
        .unwrap()
        .key_prefix(prefix)
        .health_check_interval(None);
    if let Some(key) = signing_key {
        builder = builder.signing_key(key);
    }
    builder.build().await.unwrap()
}

fn raw_redis(server: &RedisServer) -> redis::Connection {
    redis::Client::open(server.url())
        .unwrap()
        .get_connection()
        .unwrap()
}

fn exists(con: &mut redis::Connection, full_key: &str) -> bool {
    con.exists(full_key).unwrap()
}

fn raw_get(con: &mut redis::Connection, full_key: &str) -> Vec<u8> {
    let bytes: Option<Vec<u8>> = con.get(full_key).unwrap();
    bytes.unwrap_or_else(|| panic!("{full_key} is not in Redis"))
}

fn all_keys(con: &mut redis::Connection) -> BTreeSet<String> {
    con.scan::<String>()
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// Asserts that a value planted under `key` of the `app:` cache is in Redis, reads as a miss,
/// is counted as one more codec error, and has been deleted.
async fn assert_rejected(
    signed: &RedisCache,
    con: &mut redis::Connection,
    rejected: &mut u64,
    key: &str,
    how: &str,
) {
    let full = format!("app:{key}");
    assert!(exists(con, &full), "{how}: the value was not planted");
    assert_eq!(
        signed.get::<Account>(key).await.unwrap(),
        None,
        "{how}: a tampered value was served"
    );
    *rejected += 1;
    assert_eq!(
        signed.get_stats().codec_errors,
        *rejected,
        "{how}: the rejection was not counted"
    );
    assert!(!exists(con, &full), "{how}: the entry was not deleted");
}

/// A signed `RedisCache` reads a value only if it was signed with its key: values planted
/// under its keys by writers without the key read as misses, are counted as codec errors and
/// are deleted from Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_cache_rejects_values_written_without_the_key() {
    let server = RedisServer::start().unwrap();
    let mut con = raw_redis(&server);
    let signed = redis_cache(&server, "app:", Some(SIGNING_KEY)).await;
    assert!(signed.codec().is_signing());

    // Its own writes round-trip, and are stored signed (envelope version 2 + 32-byte tag).
    signed.set("account:alice", &alice()).await.unwrap();
    assert_eq!(
        signed.get::<Account>("account:alice").await.unwrap(),
        Some(alice())
    );
    let genuine = raw_get(&mut con, "app:account:alice");
    assert!(inspect(&genuine).unwrap().unwrap().is_signed());
    assert_eq!(signed.get_stats().codec_errors, 0);

    // Each planted value: present in Redis, read as a miss, counted, and removed.
    let mut rejected = 0;

    // (a) A valid but unsigned envelope, written by a cache without the key, same prefix.
    let unsigned = redis_cache(&server, "app:", None).await;
    unsigned
        .set("account:mallory", &mallory_as_admin())
        .await
        .unwrap();
    assert_rejected(
        &signed,
        &mut con,
        &mut rejected,
        "account:mallory",
        "unsigned envelope",
    )
    .await;

    // (b) A value signed with another key.
    let other_key = redis_cache(&server, "app:", Some(ATTACKER_KEY)).await;
    other_key
        .set("account:mallory", &mallory_as_admin())
        .await
        .unwrap();
    assert_rejected(
        &signed,
        &mut con,
        &mut rejected,
        "account:mallory",
        "signed with another key",
    )
    .await;

    // (c) Raw garbage through a plain connection; also raw JSON (no envelope), and a forged
    // "signed" envelope whose tag is zeros.
    let _: () = con
        .set(
            "app:account:mallory",
            b"\x00\xffnot a value\x13\x37".as_slice(),
        )
        .unwrap();
    assert_rejected(
        &signed,
        &mut con,
        &mut rejected,
        "account:mallory",
        "raw garbage",
    )
    .await;
    let _: () = con
        .set(
            "app:account:mallory",
            br#"{"user":"mallory","is_admin":true}"#.as_slice(),
        )
        .unwrap();
    assert_rejected(
        &signed,
        &mut con,
        &mut rejected,
        "account:mallory",
        "raw JSON without envelope",
    )
    .await;
    let mut forged = Serializer::default()
        .encode(&mallory_as_admin())
        .unwrap()
        .to_vec();
    forged[2] = 2;
    forged.extend_from_slice(&[0; 32]);
    let _: () = con.set("app:account:mallory", forged).unwrap();
    assert_rejected(
        &signed,
        &mut con,
        &mut rejected,
        "account:mallory",
        "forged tag",
    )
    .await;

    // (d) A bit-flipped copy of its own valid value: in the payload, in the header, in the tag.
    for (i, position) in [
        (genuine.len() - 40, "payload"),
        (3, "header"),
        (genuine.len() - 1, "tag"),
    ] {
        let mut flipped = genuine.clone();
        flipped[i] ^= 0x01;
        let _: () = con.set("app:account:alice", flipped).unwrap();
        assert_rejected(
            &signed,
            &mut con,
            &mut rejected,
            "account:alice",
            &format!("bit flip in the {position}"),
        )
        .await;
    }

    // The batch read path rejects the same way.
    unsigned
        .set("account:mallory", &mallory_as_admin())
        .await
        .unwrap();
    signed.set("account:alice", &alice()).await.unwrap();
    let batch = signed
        .get_many::<Account>(&["account:alice", "account:mallory"])
        .await
        .unwrap();
    assert_eq!(batch, vec![Some(alice()), None]);
    assert_eq!(signed.get_stats().codec_errors, rejected + 1);
    assert!(!exists(&mut con, "app:account:mallory"));
    assert!(exists(&mut con, "app:account:alice"));

    // Rollout semantics: a reader without the key still reads signed values (tag unchecked).
    assert_eq!(
        unsigned.get::<Account>("account:alice").await.unwrap(),
        Some(alice())
    );
    assert_eq!(
        signed.get::<Account>("account:alice").await.unwrap(),
        Some(alice())
    );
}

/// A signature covers the key a value is stored under (prefix included): a writer without the
/// secret who copies a genuinely signed value to another key of the same cache, or to the same
/// key of another cache that shares the secret, gets a miss there — counted, and the copy is
/// deleted. The original stays readable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_values_copied_to_another_key_are_rejected() {
    let server = RedisServer::start().unwrap();
    let mut con = raw_redis(&server);
    let signed = redis_cache(&server, "app:", Some(SIGNING_KEY)).await;
    let other_app = redis_cache(&server, "other:", Some(SIGNING_KEY)).await;
    signed.set("account:alice", &alice()).await.unwrap();
    let genuine = raw_get(&mut con, "app:account:alice");
    assert_eq!(genuine[2], ncm_cache::codec::KEY_BOUND_VERSION);
    let mut rejected = 0;
    let _: () = con.set("app:account:bob", &genuine).unwrap();
    assert_rejected(
        &signed,
        &mut con,
        &mut rejected,
        "account:bob",
        "copied to another key",
    )
    .await;
    let _: () = con.set("other:account:alice", &genuine).unwrap();
    assert_eq!(
        other_app.get::<Account>("account:alice").await.unwrap(),
        None
    );
    assert_eq!(other_app.get_stats().codec_errors, 1);
    assert!(
        !exists(&mut con, "other:account:alice"),
        "the copy was deleted"
    );
    // Through every read path: get_many, try_get, the blocking cache, a multi-level L2 read.
    let _: () = con.set("app:account:carol", &genuine).unwrap();
    assert!(signed.try_get::<Account>("account:carol").await.is_err());
    assert_eq!(
        signed
            .get_many::<Account>(&["account:alice", "account:carol"])
            .await
            .unwrap(),
        vec![Some(alice()), None]
    );
    let _: () = con.set("app:account:dave", &genuine).unwrap();
    let multi = MultiLevelCache::builder(signed.backend())
        .codec(signed.codec().clone())
        .build()
        .unwrap();
    assert_eq!(multi.get::<Account>("account:dave").await.unwrap(), None);
    assert_eq!(
        multi.get::<Account>("account:alice").await.unwrap(),
        Some(alice())
    );
    // The genuine value is untouched and still reads.
    assert_eq!(
        signed.get::<Account>("account:alice").await.unwrap(),
        Some(alice())
    );
}

/// Caches of one Redis under `prefix`, each with its own signing configuration.
async fn rotating_cache(
    server: &RedisServer,
    signing: &str,
    verification: &[&str],
    mode: SignatureMode,
) -> RedisCache {
    RedisCache::builder()
        .url(&server.url())
        .unwrap()
        .key_prefix("rot:")
        .health_check_interval(None)
        .signing_key(signing)
        .verification_keys(verification.iter().copied())
        .signature_mode(mode)
        .build()
        .await
        .unwrap()
}

/// Two instances in different steps of a rollout write and read each other's keys: `true`
/// when every read hit, no codec error was counted and nothing was deleted.
async fn side_by_side(
    a: &RedisCache,
    b: &RedisCache,
    con: &mut redis::Connection,
    round: u32,
) -> bool {
    let mut clean = true;
    for (i, (writer, reader)) in [(a, b), (b, a)].into_iter().enumerate() {
        let key = format!("k:{round}:{i}");
        writer.set(&key, &alice()).await.unwrap();
        let before = reader.get_stats().codec_errors;
        clean &= reader.get::<Account>(&key).await.unwrap() == Some(alice());
        clean &= reader.get_stats().codec_errors == before;
        clean &= exists(con, &format!("rot:{key}"));
    }
    clean
}

/// Key rotation in the documented order (docs/configuration.md, "Signing"): at every step the
/// instances already moved and those not yet moved read each other's writes, with no miss
/// and no delete. Skipping step 1 makes the not-yet-rotated instances delete what the rotated
/// ones write — the step the order exists for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_rotation_in_the_documented_order_deletes_nothing() {
    const OLD: &str = "rotation-old-key-0123456789abcdef";
    const NEW: &str = "rotation-new-key-0123456789abcdef";
    let server = RedisServer::start().unwrap();
    let mut con = raw_redis(&server);
    let kb = SignatureMode::KeyBound;
    let start = rotating_cache(&server, OLD, &[], kb).await;
    let step1 = rotating_cache(&server, OLD, &[NEW], kb).await;
    let step2 = rotating_cache(&server, NEW, &[OLD], kb).await;
    let done = rotating_cache(&server, NEW, &[], kb).await;
    // Step 1 rolls out beside instances not yet touched.
    assert!(side_by_side(&start, &step1, &mut con, 1).await, "step 1");
    // Step 2 rolls out beside instances in step 1.
    assert!(side_by_side(&step1, &step2, &mut con, 2).await, "step 2");
    // Step 3 (after the longest TTL, no value signed with OLD is left) beside step 2.
    assert!(side_by_side(&step2, &done, &mut con, 3).await, "step 3");
    // Skipping step 1: an untouched instance deletes what a step-2 instance writes.
    assert!(
        !side_by_side(&start, &step2, &mut con, 4).await,
        "skipping step 1"
    );
    assert!(
        !exists(&mut con, "rot:k:4:1"),
        "the untouched instance deleted it"
    );
}

/// Upgrading a signing deployment from builds before key binding (docs/configuration.md,
/// "Signing"): step 1 (`Unbound`) runs beside old builds (which read only unbound values —
/// stood in for by the values an `Unbound` instance writes); step 2 (`Migrating`) beside
/// step 1; step 3 (`KeyBound`) beside step 2 once unbound values have expired. Every pair
/// reads each other's writes without a miss; `KeyBound` rejects unbound values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrading_to_key_bound_signatures_in_the_documented_order_deletes_nothing() {
    let server = RedisServer::start().unwrap();
    let mut con = raw_redis(&server);
    let unbound = rotating_cache(&server, SIGNING_KEY, &[], SignatureMode::Unbound).await;
    let migrating = rotating_cache(&server, SIGNING_KEY, &[], SignatureMode::Migrating).await;
    let bound = rotating_cache(&server, SIGNING_KEY, &[], SignatureMode::KeyBound).await;
    unbound.set("old", &alice()).await.unwrap();
    assert_eq!(
        raw_get(&mut con, "rot:old")[2],
        ncm_cache::codec::SIGNED_VERSION
    );
    assert!(
        side_by_side(&unbound, &migrating, &mut con, 1).await,
        "step 2 beside step 1"
    );
    assert!(
        side_by_side(&migrating, &bound, &mut con, 2).await,
        "step 3 beside step 2"
    );
    // An unbound value left over is a miss for a key-bound reader (and is removed).
    assert_eq!(bound.get::<Account>("old").await.unwrap(), None);
    assert!(!exists(&mut con, "rot:old"));
}

/// The blocking cache built from the same configuration rejects planted values too.
#[test]
fn signed_sync_cache_rejects_values_written_without_the_key() {
    let server = RedisServer::start().unwrap();
    let mut con = raw_redis(&server);
    let mut config = RedisConfig::from_url(&server.url()).unwrap();
    config.key_prefix = "sync:".into();
    config.health_check_interval = None;
    config.signing_key = Some(SIGNING_KEY.into());
    let signed = RedisCache::builder().config(config).build_sync().unwrap();
    signed.set("account:alice", &alice()).unwrap();
    assert_eq!(
        signed.get::<Account>("account:alice").unwrap(),
        Some(alice())
    );
    let unsigned = Serializer::default().encode(&mallory_as_admin()).unwrap();
    let _: () = con.set("sync:account:mallory", unsigned.to_vec()).unwrap();
    assert_eq!(signed.get::<Account>("account:mallory").unwrap(), None);
    assert_eq!(signed.get_stats().codec_errors, 1);
    assert!(!exists(&mut con, "sync:account:mallory"));
    // A genuine value copied to another key is rejected too.
    let genuine = raw_get(&mut con, "sync:account:alice");
    let _: () = con.set("sync:account:bob", genuine).unwrap();
    assert_eq!(signed.get::<Account>("account:bob").unwrap(), None);
    assert_eq!(signed.get_stats().codec_errors, 2);
    assert!(!exists(&mut con, "sync:account:bob"));
}

/// A `MultiLevelCache` over Redis with a signed codec: a tampered L2 value is a miss (counted
/// in the L2 stats, removed from Redis), and `get_or_load` then loads and stores the real
/// value, signed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signed_multilevel_cache_rejects_tampered_l2_values() {
    let server = RedisServer::start().unwrap();
    let mut con = raw_redis(&server);
    let mut config = RedisConfig::from_url(&server.url()).unwrap();
    config.key_prefix = "ml:".into();
    config.health_check_interval = None;
    let backend: SharedBackend = Arc::new(RedisBackend::connect(config).await.unwrap());
    let codec = Serializer::builder()
        .signing_key(SIGNING_KEY)
        .build()
        .unwrap();
    let build = || {
        MultiLevelCache::builder(Arc::clone(&backend))
            .codec(codec.clone())
            .name("accounts")
            .build()
            .unwrap()
    };
    let cache = build();

    // An unsigned value planted in L2 (never seen by this instance's L1).
    let planted = Serializer::default().encode(&mallory_as_admin()).unwrap();
    let _: () = con.set("ml:account:1", planted.to_vec()).unwrap();
    assert_eq!(cache.get::<Account>("account:1").await.unwrap(), None);
    assert_eq!(cache.get_stats().l2.codec_errors, 1);
    assert!(!exists(&mut con, "ml:account:1"));

    // Planted again: get_or_load treats it as a miss and loads the real value.
    let _: () = con.set("ml:account:1", planted.to_vec()).unwrap();
    let loads = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&loads);
    let loaded: Account = cache
        .get_or_load("account:1", move || async move {
            counter.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>(alice())
        })
        .await
        .unwrap();
    assert_eq!(loaded, alice());
    assert_eq!(loads.load(Ordering::SeqCst), 1);
    assert_eq!(cache.get_stats().l2.codec_errors, 2);
    // What is in Redis now is the real value, signed with the key.
    let stored = raw_get(&mut con, "ml:account:1");
    assert!(inspect(&stored).unwrap().unwrap().is_signed());
    assert_eq!(
        codec
            .decode_for::<Account>(&["ml:", "account:1"], &stored)
            .unwrap(),
        alice()
    );

    // A second instance (empty L1) reads the genuine value from L2 ...
    let other = build();
    assert_eq!(
        other.get::<Account>("account:1").await.unwrap(),
        Some(alice())
    );
    // ... but not a bit-flipped one: a miss, then the loader runs again.
    let third = build();
    let mut flipped = stored.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x80;
    let _: () = con.set("ml:account:1", flipped).unwrap();
    assert_eq!(third.get::<Account>("account:1").await.unwrap(), None);
    assert_eq!(third.get_stats().l2.codec_errors, 3);
    let counter = Arc::clone(&loads);
    let reloaded: Account = third
        .get_or_load("account:1", move || async move {
            counter.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>(alice())
        })
        .await
        .unwrap();
    assert_eq!(reloaded, alice());
    assert_eq!(loads.load(Ordering::SeqCst), 2);
}

/// Caches with different prefixes on one Redis never see each other's keys, and
/// `clear_pattern("*")` on one removes exactly its own keys — also when a prefix contains
/// glob metacharacters (`t[1]*:`), which must match only themselves: unescaped, its pattern
/// `t[1]*:*` would also match the `t1-victim:` cache's keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefixes_isolate_two_caches_on_one_redis() {
    let server = RedisServer::start().unwrap();
    let mut con = raw_redis(&server);
    let prefixes = ["tenant-a:", "tenant-b:", "t[1]*:", "t1-victim:"];
    let mut caches = Vec::new();
    for prefix in prefixes {
        caches.push(redis_cache(&server, prefix, None).await);
    }
    let logical = ["user:1", "user:2", "session:*", "cfg"];
    for (prefix, cache) in prefixes.iter().zip(&caches) {
        for key in logical {
            cache.set(key, &format!("{prefix}{key}")).await.unwrap();
        }
    }
    let expected_keys = |live: &[&str]| -> BTreeSet<String> {
        live.iter()
            .flat_map(|p| logical.iter().map(move |k| format!("{p}{k}")))
            .collect()
    };
    assert_eq!(all_keys(&mut con), expected_keys(&prefixes));

    // Each reads only its own values under the same logical keys.
    for (prefix, cache) in prefixes.iter().zip(&caches) {
        for key in logical {
            assert_eq!(
                cache.get::<String>(key).await.unwrap(),
                Some(format!("{prefix}{key}")),
                "{prefix} read another cache's {key}"
            );
        }
    }

    // Clearing tenant-a removes its 4 keys and nothing else.
    assert_eq!(caches[0].clear_pattern("*").await.unwrap(), 4);
    let dbsize: u64 = redis::cmd("DBSIZE").query(&mut con).unwrap();
    assert_eq!(dbsize, 12);
    assert_eq!(
        all_keys(&mut con),
        expected_keys(&["tenant-b:", "t[1]*:", "t1-victim:"])
    );
    for key in logical {
        assert_eq!(caches[0].get::<String>(key).await.unwrap(), None);
        assert_eq!(
            caches[1].get::<String>(key).await.unwrap(),
            Some(format!("tenant-b:{key}"))
        );
    }

    // The glob-metacharacter prefix: clearing it leaves t1-victim: (and tenant-b:) intact.
    assert_eq!(caches[2].clear_pattern("*").await.unwrap(), 4);
    assert_eq!(
        all_keys(&mut con),
        expected_keys(&["tenant-b:", "t1-victim:"])
    );
    for key in logical {
        assert_eq!(caches[2].get::<String>(key).await.unwrap(), None);
        assert_eq!(
            caches[3].get::<String>(key).await.unwrap(),
            Some(format!("t1-victim:{key}"))
        );
    }

    // A narrower pattern stays inside the prefix too, and a logical key containing `*` is
    // matched only by the escaped pattern.
    assert_eq!(caches[1].clear_pattern("user:*").await.unwrap(), 2);
    assert_eq!(caches[3].clear_pattern("session:\\*").await.unwrap(), 1);
    let mut remaining = expected_keys(&["tenant-b:", "t1-victim:"]);
    remaining.retain(|k| !k.starts_with("tenant-b:user:") && k != "t1-victim:session:*");
    assert_eq!(all_keys(&mut con), remaining);
    let dbsize: u64 = redis::cmd("DBSIZE").query(&mut con).unwrap();
    assert_eq!(dbsize, 5);
}
