//! Hostile input end to end, on a real Redis: bytes written under our keys by another client,
//! keys built to confuse glob patterns or the protocol, values over the configured maximum and
//! decompression bombs.
//!
//! The report in docs/RELIABILITY.md names these tests.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use ncm_cache::prelude::*;
use ncm_cache::{CompressionType, SerializationType};
use ncm_cache_core::{Bytes, CacheError, CodecErrorKind, escape_glob};
use ncm_cache_testkit::RedisServer;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Order {
    id: u64,
    total: f64,
}

fn config(server: &RedisServer, prefix: &str) -> RedisConfig {
    let mut c = RedisConfig::from_url(&server.url()).unwrap();
    c.health_check_interval = None;
    c.key_prefix = prefix.into();
    c
}

/// Another client: no prefix, writes whatever bytes it likes under our full keys.
async fn intruder(server: &RedisServer) -> RedisCache {
    RedisCache::connect(config(server, "")).await.unwrap()
}

async fn exists(intruder: &RedisCache, full_key: &str) -> bool {
    intruder.backend().exists(full_key).await.unwrap()
}

/// Byte strings another program might leave under a key: empty, binary, truncated or damaged
/// envelopes, the wrong format, text that is JSON but not an `Order`.
fn foreign_values() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("empty", Vec::new()),
        ("binary", (0..=255u8).collect()),
        ("nul bytes", vec![0; 64]),
        ("magic only", vec![0xC1, 0x4E]),
        ("truncated header", vec![0xC1, 0x4E, 1, 1]),
        ("unknown version", vec![0xC1, 0x4E, 99, 1, 0, b'{', b'}']),
        ("unknown format", vec![0xC1, 0x4E, 1, 200, 0, b'{', b'}']),
        (
            "unknown compression",
            vec![0xC1, 0x4E, 1, 1, 77, 1, 0, 0, 0, b'x'],
        ),
        (
            "garbage zstd",
            vec![0xC1, 0x4E, 1, 1, 3, 16, 0, 0, 0, 1, 2, 3, 4],
        ),
        (
            "json of another type",
            br#"{"name":"not an order"}"#.to_vec(),
        ),
        ("json array", b"[1,2,3]".to_vec()),
        (
            "pickle",
            vec![
                0x80, 4, 0x95, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f,
            ],
        ),
        ("utf-8 text", "plain text, not JSON 🙂".as_bytes().to_vec()),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_bytes_under_our_keys_are_misses_counted_and_removed() {
    let server = RedisServer::start().unwrap();
    let cache = RedisCache::connect(config(&server, "shop:")).await.unwrap();
    let other = intruder(&server).await;
    let cases = foreign_values();
    for (i, (what, bytes)) in cases.iter().enumerate() {
        let key = format!("order:{i}");
        let full = format!("shop:{key}");
        other
            .backend()
            .set(&full, Bytes::from(bytes.clone()), None)
            .await
            .unwrap();
        let before = cache.get_stats().codec_errors;
        // The strict read returns a typed codec error and leaves the entry for inspection...
        let err = cache.try_get::<Order>(&key).await.unwrap_err();
        assert!(err.is_codec(), "{what}: {err:?}");
        assert!(exists(&other, &full).await, "{what}: try_get leaves it");
        // ...the normal read is a miss, counted, and the entry is gone.
        assert_eq!(cache.get::<Order>(&key).await.unwrap(), None, "{what}");
        assert_eq!(
            cache.get_stats().codec_errors,
            before + 1,
            "{what}: counted once"
        );
        assert!(!exists(&other, &full).await, "{what}: removed");
        // The key works normally again.
        let order = Order {
            id: i as u64,
            total: 9.5,
        };
        cache.set(&key, &order).await.unwrap();
        assert_eq!(
            cache.get::<Order>(&key).await.unwrap(),
            Some(order),
            "{what}"
        );
    }

    // In a batch, a foreign entry is one miss among good values, and it is removed.
    cache
        .set("good:1", &Order { id: 1, total: 1.0 })
        .await
        .unwrap();
    cache
        .set("good:2", &Order { id: 2, total: 2.0 })
        .await
        .unwrap();
    other
        .backend()
        .set("shop:bad", Bytes::from_static(b"\xff\xfe"), None)
        .await
        .unwrap();
    let got = cache
        .get_many::<Order>(&["good:1", "bad", "good:2"])
        .await
        .unwrap();
    assert_eq!(got[1], None);
    assert_eq!(got[0].as_ref().map(|o| o.id), Some(1));
    assert_eq!(got[2].as_ref().map(|o| o.id), Some(2));
    assert!(
        !exists(&other, "shop:bad").await,
        "the batch read repaired it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_bytes_in_l2_are_replaced_by_the_loader_in_a_multilevel_cache() {
    let server = RedisServer::start().unwrap();
    let redis = RedisCache::connect(config(&server, "ml:")).await.unwrap();
    let cache = MultiLevelCache::builder(redis.backend())
        .name("hostile")
        .build()
        .unwrap();
    let other = intruder(&server).await;
    for (i, (what, bytes)) in foreign_values().into_iter().enumerate() {
        let key = format!("order:{i}");
        let full = format!("ml:{key}");
        other
            .backend()
            .set(&full, Bytes::from(bytes), None)
            .await
            .unwrap();
        assert_eq!(cache.get::<Order>(&key).await.unwrap(), None, "{what}");
        assert!(!exists(&other, &full).await, "{what}: removed from L2");
        other
            .backend()
            .set(&full, Bytes::from_static(b"\x00garbage"), None)
            .await
            .unwrap();
        let order = Order {
            id: i as u64,
            total: 1.5,
        };
        let fresh = order.clone();
        let loaded = cache
            .get_or_load(&key, move || async move { Ok::<_, std::io::Error>(fresh) })
            .await
            .unwrap();
        assert_eq!(
            loaded, order,
            "{what}: the loader's value, not the foreign bytes"
        );
        // L2 now holds a valid value another instance can read.
        assert_eq!(
            redis.get::<Order>(&key).await.unwrap(),
            Some(order),
            "{what}"
        );
    }
    assert!(cache.get_stats().l2.codec_errors >= 2 * foreign_values().len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_with_glob_characters_newlines_and_spaces_are_literal() {
    let server = RedisServer::start().unwrap();
    // A prefix full of glob metacharacters must not widen any pattern.
    let cache = RedisCache::connect(config(&server, "t[1]*?:"))
        .await
        .unwrap();
    let neighbour = RedisCache::connect(config(&server, "t1xx:")).await.unwrap();
    let keys = [
        "*",
        "?",
        "[abc]",
        "a*b?c[d]e\\f",
        "line\nbreak",
        "carriage\r\nreturn",
        "with space",
        "\t tab",
        "*3\r\n$3\r\nDEL\r\n$1\r\n*\r\n",
        "ünïcödé 🔑",
        "{hash}tag",
        "quote\"s and 'single'",
    ];
    for (i, k) in keys.iter().enumerate() {
        cache.set(k, &i).await.unwrap();
        neighbour.set(k, &(i + 1000)).await.unwrap();
    }
    for (i, k) in keys.iter().enumerate() {
        assert_eq!(cache.get::<usize>(k).await.unwrap(), Some(i), "{k:?}");
        assert_eq!(
            neighbour.get::<usize>(k).await.unwrap(),
            Some(i + 1000),
            "{k:?}"
        );
    }
    // The literal key `*` is one key, not a wildcard.
    assert!(cache.delete("*").await.unwrap());
    assert_eq!(cache.get::<usize>("?").await.unwrap(), Some(1));
    // An escaped pattern matches exactly the literal key.
    let removed = cache
        .clear_pattern(&escape_glob("a*b?c[d]e\\f"))
        .await
        .unwrap();
    assert_eq!(removed, 1);
    assert_eq!(cache.get::<usize>("[abc]").await.unwrap(), Some(2));
    // Clearing everything in one prefix leaves the neighbour's keys alone.
    cache.clear_pattern("*").await.unwrap();
    for (i, k) in keys.iter().enumerate() {
        assert_eq!(cache.get::<usize>(k).await.unwrap(), None, "{k:?}");
        assert_eq!(
            neighbour.get::<usize>(k).await.unwrap(),
            Some(i + 1000),
            "{k:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_empty_keys_are_typed_errors_before_any_io() {
    let server = RedisServer::start().unwrap();
    let cache = RedisCache::connect(config(&server, "k:")).await.unwrap();
    let huge = "k".repeat(1 << 20);
    for result in [
        cache.set(&huge, &1).await.err(),
        cache.get::<i32>(&huge).await.err(),
        cache.delete(&huge).await.err(),
        cache.set("", &1).await.err(),
    ] {
        let err = result.expect("rejected");
        assert!(err.is_invalid_input(), "{err:?}");
        assert!(matches!(err, CacheError::InvalidKey { .. }), "{err:?}");
    }
    // A key at the limit works; the limit is configurable.
    let max = ncm_cache_core::DEFAULT_MAX_KEY_LEN - "k:".len();
    let at_limit = "x".repeat(max);
    cache.set(&at_limit, &7).await.unwrap();
    assert_eq!(cache.get::<i32>(&at_limit).await.unwrap(), Some(7));
    let mut c = config(&server, "big:");
    c.max_key_len = 2 << 20;
    let roomy = RedisCache::connect(c).await.unwrap();
    roomy.set(&huge, &1).await.unwrap();
    assert_eq!(roomy.get::<i32>(&huge).await.unwrap(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_over_the_configured_maximum_are_rejected_with_a_typed_error() {
    let server = RedisServer::start().unwrap();
    let mut c = config(&server, "v:");
    c.max_value_size = 1024;
    let cache = RedisCache::connect(c).await.unwrap();
    let err = cache.set("big", &"x".repeat(2000)).await.unwrap_err();
    assert!(
        matches!(err, CacheError::ValueTooLarge { size, max: 1024 } if size > 1024),
        "{err:?}"
    );
    assert!(err.is_invalid_input());
    assert_eq!(
        cache.get::<String>("big").await.unwrap(),
        None,
        "nothing stored"
    );
    cache.set("small", &"x".repeat(500)).await.unwrap();
    // Batches check every value before writing any.
    let big = "y".repeat(5000);
    let err = cache
        .set_many(
            [("a", &"ok".to_owned()), ("b", &big)],
            ncm_cache_core::Expiry::Default,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, CacheError::ValueTooLarge { .. }), "{err:?}");
    assert_eq!(
        cache.get::<String>("a").await.unwrap(),
        None,
        "no partial batch"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decompression_bombs_in_redis_are_rejected_counted_and_removed() {
    let server = RedisServer::start().unwrap();
    let cache = RedisCache::connect(config(&server, "z:")).await.unwrap();
    let other = intruder(&server).await;
    // A 65 MiB string of zeros compresses to kilobytes; the reader's cap is 64 MiB.
    let payload = "0".repeat(65 << 20);
    for compression in [
        CompressionType::Zstd,
        CompressionType::Gzip,
        CompressionType::Lz4,
    ] {
        let writer = Serializer::builder()
            .format(SerializationType::Json)
            .compression(compression)
            .max_decompressed_size(128 << 20)
            .build()
            .unwrap();
        let bomb = ncm_cache_core::Codec::encode(&writer, &payload).unwrap();
        assert!(
            bomb.len() < 4 << 20,
            "{compression:?}: {} bytes",
            bomb.len()
        );
        // As written (declared length 65 MiB), and lying about its length (declares 1 KiB).
        let mut liar = bomb.to_vec();
        liar[5..9].copy_from_slice(&1024u32.to_le_bytes());
        for (what, bytes) in [("honest", bomb.to_vec()), ("lying", liar)] {
            let full = format!("z:bomb:{compression:?}:{what}");
            let key = &full["z:".len()..];
            other
                .backend()
                .set(&full, Bytes::from(bytes), None)
                .await
                .unwrap();
            let err = cache.try_get::<String>(key).await.unwrap_err();
            match err {
                CacheError::Codec(ref e) => assert!(
                    matches!(
                        e.kind(),
                        CodecErrorKind::TooLarge | CodecErrorKind::Compression
                    ),
                    "{compression:?} {what}: {e}"
                ),
                ref other => panic!("{compression:?} {what}: {other:?}"),
            }
            assert_eq!(cache.get::<String>(key).await.unwrap(), None);
            assert!(
                !exists(&other, &full).await,
                "{compression:?} {what}: removed"
            );
        }
    }
    assert_eq!(cache.get_stats().codec_errors, 6);
    // The cache still works.
    cache.set("after", &"fine").await.unwrap();
    assert_eq!(
        cache.get::<String>("after").await.unwrap().as_deref(),
        Some("fine")
    );
}
