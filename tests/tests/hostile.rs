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
/// envelopes, the wrong format, text that is JSON but not an `Order`. (Envelopes of a newer
/// version, format or compression are not damaged: see
/// [`envelopes_from_a_newer_build_are_misses_that_stay`].)
fn foreign_values() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("empty", Vec::new()),
        ("binary", (0..=255u8).collect()),
        ("nul bytes", vec![0; 64]),
        ("magic only", vec![0xC1, 0x4E]),
        ("truncated header", vec![0xC1, 0x4E, 1, 1]),
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
async fn decompression_bombs_in_redis_are_rejected_counted_and_liars_removed() {
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
                    matches!(e.kind(), CodecErrorKind::TooLarge | CodecErrorKind::Corrupt),
                    "{compression:?} {what}: {e}"
                ),
                ref other => panic!("{compression:?} {what}: {other:?}"),
            }
            assert_eq!(cache.get::<String>(key).await.unwrap(), None);
            // An honest value above this reader's cap is kept (a reader with a larger cap, like
            // its writer, reads it); one that lies about its length is damaged and removed.
            assert_eq!(
                exists(&other, &full).await,
                what == "honest",
                "{compression:?} {what}"
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

/// Nesting levels of the deep payloads: far past any recursion limit, a few MiB each.
const DEEP: usize = 1_000_000;

/// Values nested [`DEEP`] levels in every format (valid and unterminated), each as the raw
/// format bytes and inside an envelope that names the format: what anyone who can write to
/// Redis can store to abort a reader whose parser recurses once per level.
fn deep_payloads() -> Vec<(String, SerializationType, Vec<u8>)> {
    let json_open = |n: usize| {
        let mut v = b"{\"a\":".to_vec();
        v.extend(std::iter::repeat_n(b'[', n));
        v
    };
    let json_closed = |n: usize| {
        let mut v = json_open(n);
        v.extend(std::iter::repeat_n(b']', n));
        v.push(b'}');
        v
    };
    let nested = |head: u8, n: usize, leaf: u8| {
        let mut v = vec![head; n];
        v.push(leaf);
        v
    };
    // Pickle: PROTO 2, n EMPTY_LISTs, n APPENDs, STOP.
    let pickle = |n: usize| {
        let mut v = vec![0x80, 2];
        v.extend(std::iter::repeat_n(b']', n));
        v.extend(std::iter::repeat_n(b'a', n - 1));
        v.push(b'.');
        v
    };
    // (name, envelope format tag, bytes)
    let formats: Vec<(&str, u8, Vec<u8>)> = vec![
        ("json closed", 1, json_closed(DEEP)),
        ("json open", 1, json_open(DEEP)),
        ("simd-json closed", 2, json_closed(DEEP)),
        ("cbor arrays", 3, nested(0x81, DEEP, 0x00)),
        ("cbor maps", 3, {
            // {0: {0: ... 0}}: a one-entry map whose value is the next map.
            let mut v = Vec::with_capacity(2 * DEEP + 1);
            for _ in 0..DEEP {
                v.extend_from_slice(&[0xA1, 0x00]);
            }
            v.push(0x00);
            v
        }),
        ("cbor tags", 3, nested(0xC6, DEEP, 0x00)),
        ("msgpack arrays", 4, nested(0x91, DEEP, 0x00)),
        ("msgpack maps", 4, {
            let mut v = Vec::with_capacity(2 * DEEP + 1);
            for _ in 0..DEEP {
                v.extend_from_slice(&[0x81, 0x00]);
            }
            v.push(0x00);
            v
        }),
        ("pickle lists", 5, pickle(DEEP)),
    ];
    let mut out = Vec::new();
    for (name, tag, bytes) in formats {
        let format = SerializationType::ALL[usize::from(tag) - 1];
        let mut enveloped = vec![0xC1, 0x4E, 1, tag, 0];
        enveloped.extend_from_slice(&bytes);
        out.push((format!("{name} (envelope)"), format, enveloped));
        out.push((format!("{name} (raw)"), format, bytes));
    }
    out
}

/// Whether `reader` parses `payload` (written in `format`) as that format: every envelope, and
/// raw bytes of the reader's own format. (Other raw bytes are parsed as the reader's format,
/// where they may even be a short valid value followed by ignored bytes.)
fn parses_as_written(reader: &Serializer, name: &str, format: SerializationType) -> bool {
    let json = |f| matches!(f, SerializationType::Json | SerializationType::SimdJson);
    name.ends_with("(envelope)")
        || reader.format() == format
        || (json(reader.format()) && json(format))
}

/// Every reader configuration: each format, enveloped and raw.
fn every_reader() -> Vec<(String, Serializer)> {
    let mut readers = Vec::new();
    for format in SerializationType::ALL {
        for raw in [false, true] {
            let codec = Serializer::builder()
                .format(format)
                .raw(raw)
                .build()
                .unwrap();
            readers.push((format!("{format:?} raw={raw}"), codec));
        }
    }
    readers
}

/// Set in the child process of [`deep_nesting_in_redis_never_aborts_any_reader`]: the URL of
/// the Redis that holds the payloads.
const DEEP_CHILD_ENV: &str = "NCM_TEST_DEEP_NESTING_REDIS";

/// A value nested a million levels deep, stored in Redis by another client, is read by every
/// format configuration (as a self-describing `serde_json::Value`, as a struct, and through
/// `get_many`) on tokio worker threads — in a child process, because a stack overflow aborts
/// the process instead of failing a test. The child must exit normally and every read must be
/// a miss.
#[test]
fn deep_nesting_in_redis_never_aborts_any_reader() {
    if let Ok(url) = std::env::var(DEEP_CHILD_ENV) {
        return read_deep_payloads(&url);
    }
    let server = RedisServer::start().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let payloads = deep_payloads();
    rt.block_on(async {
        let other = intruder(&server).await;
        for (name, _, bytes) in &payloads {
            assert!(bytes.len() >= DEEP, "{name}: {} bytes", bytes.len());
            other
                .backend()
                .set(&format!("deep:{name}"), Bytes::from(bytes.clone()), None)
                .await
                .unwrap();
        }
    });
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "deep_nesting_in_redis_never_aborts_any_reader",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(DEEP_CHILD_ENV, server.url())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the reader process died ({}):\n{stdout}\n{stderr}",
        output.status
    );
    assert!(
        stdout.contains("deep payloads read"),
        "the child did not run the reads:\n{stdout}\n{stderr}"
    );
}

/// The child's side: read every payload with every reader, on a multi-thread runtime's workers
/// (2 MiB stacks, like a service's).
fn read_deep_payloads(url: &str) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let names: Vec<(String, SerializationType)> = deep_payloads()
        .into_iter()
        .map(|(n, f, _)| (n, f))
        .collect();
    rt.block_on(async {
        let mut c = RedisConfig::from_url(url).unwrap();
        c.health_check_interval = None;
        c.key_prefix = "deep:".into();
        let redis = RedisCache::connect(c).await.unwrap();
        for (reader, codec) in every_reader() {
            let cache = ncm_cache_core::Cache::builder_shared(redis.backend(), codec).build();
            let task = tokio::spawn({
                let names = names.clone();
                async move {
                    for (name, format) in &names {
                        let deep = parses_as_written(cache.codec(), name, *format);
                        let v = cache.try_get::<serde_json::Value>(name).await;
                        assert!(
                            !deep || v.is_err(),
                            "{reader} read {name} as a value: {v:?}"
                        );
                        let o = cache.try_get::<Order>(name).await;
                        assert!(
                            !deep || o.is_err(),
                            "{reader} read {name} as an order: {o:?}"
                        );
                    }
                }
            });
            task.await.unwrap();
        }
        // A batch read (which removes what is damaged) by the fast-JSON reader last.
        let codec = Serializer::builder()
            .format(SerializationType::SimdJson)
            .build()
            .unwrap();
        let cache = ncm_cache_core::Cache::builder_shared(redis.backend(), codec).build();
        let many = tokio::spawn(async move {
            let keys: Vec<&str> = names.iter().map(|(n, _)| n.as_str()).collect();
            cache.get_many::<serde_json::Value>(&keys).await.unwrap()
        });
        assert!(many.await.unwrap().iter().all(Option::is_none));
    });
    println!("deep payloads read by every reader");
}

/// A rolling deploy: a newer build writes envelopes this build does not know (a newer envelope
/// version, a new format tag, a new compression tag). This reader treats them as misses, counts
/// them, and leaves them in place for the newer instances: it never deletes what it cannot read
/// because it is older. A value it could read but that is damaged is still removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelopes_from_a_newer_build_are_misses_that_stay() {
    let server = RedisServer::start().unwrap();
    let cache = RedisCache::connect(config(&server, "roll:")).await.unwrap();
    let multi = MultiLevelCache::builder(cache.backend()).build().unwrap();
    let other = intruder(&server).await;
    let newer: Vec<(&str, Vec<u8>)> = vec![
        ("newer version", vec![0xC1, 0x4E, 9, 1, 0, b'{', b'}']),
        ("newer format", vec![0xC1, 0x4E, 1, 200, 0, b'{', b'}']),
        (
            "newer compression",
            vec![0xC1, 0x4E, 1, 1, 77, 1, 0, 0, 0, b'x'],
        ),
    ];
    for (i, (what, bytes)) in newer.iter().enumerate() {
        let key = format!("order:{i}");
        let full = format!("roll:{key}");
        other
            .backend()
            .set(&full, Bytes::from(bytes.clone()), None)
            .await
            .unwrap();
        let before = cache.get_stats().codec_errors;
        let err = cache.try_get::<Order>(&key).await.unwrap_err();
        match &err {
            CacheError::Codec(e) => assert_eq!(e.kind(), CodecErrorKind::Unsupported, "{what}"),
            other => panic!("{what}: {other:?}"),
        }
        assert_eq!(cache.get::<Order>(&key).await.unwrap(), None, "{what}");
        assert_eq!(cache.get::<Order>(&key).await.unwrap(), None, "{what}");
        assert_eq!(
            cache.get_many::<Order>(&[key.as_str()]).await.unwrap(),
            vec![None],
            "{what}"
        );
        assert_eq!(
            cache.get_stats().codec_errors,
            before + 3,
            "{what}: every read is counted"
        );
        assert!(
            exists(&other, &full).await,
            "{what}: left for the newer build"
        );
        assert_eq!(
            &other.backend().get(&full).await.unwrap().unwrap()[..],
            &bytes[..]
        );
    }
    // Through the multi-level layer: the L2 read of a newer envelope is a miss that stays.
    other
        .backend()
        .set(
            "roll:ml",
            Bytes::from_static(&[0xC1, 0x4E, 9, 1, 0, b'1']),
            None,
        )
        .await
        .unwrap();
    assert_eq!(multi.get::<u32>("ml").await.unwrap(), None);
    assert!(
        exists(&other, "roll:ml").await,
        "the multi-level read left it"
    );
    // get_or_load serves (and stores) the loader's value.
    let loaded = multi
        .get_or_load("ml", || async { Ok::<_, CacheError>(7u32) })
        .await
        .unwrap();
    assert_eq!(loaded, 7);
    // The reloader (which re-reads the raw entry inside its flight) loads and overwrites an
    // entry it cannot read, instead of failing on it until the TTL.
    other
        .backend()
        .set(
            "roll:reloaded",
            Bytes::from_static(&[0xC1, 0x4E, 9, 1, 0, b'1']),
            None,
        )
        .await
        .unwrap();
    let reloader = ncm_cache::loader::CacheReloader::new(cache.cache().clone());
    reloader
        .register_loader(
            "reloaded",
            || async { Ok::<_, CacheError>(5u32) },
            None,
            ncm_cache::loader::ReloadStrategy::Lazy,
        )
        .unwrap();
    assert_eq!(reloader.get::<u32>("reloaded").await.unwrap(), 5);
    assert_eq!(cache.get::<u32>("reloaded").await.unwrap(), Some(5));
    // Damaged bytes this build could read are removed as before.
    other
        .backend()
        .set(
            "roll:bad",
            Bytes::from_static(&[0xC1, 0x4E, 1, 1, 0, b'{']),
            None,
        )
        .await
        .unwrap();
    assert_eq!(cache.get::<Order>("bad").await.unwrap(), None);
    assert!(!exists(&other, "roll:bad").await);
}

/// Writes `key` (any bytes) as another program would.
async fn set_raw(raw: &mut redis::aio::MultiplexedConnection, key: &[u8]) {
    let _: () = redis::cmd("SET")
        .arg(key)
        .arg("x")
        .query_async(raw)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_that_are_not_utf8_under_the_prefix_do_not_stop_a_pattern_clear() {
    let server = RedisServer::start().unwrap();
    let cache = RedisCache::connect(config(&server, "app:")).await.unwrap();
    // Another program leaves a binary key name under our prefix.
    let client = redis::Client::open(server.url()).unwrap();
    let mut raw = client.get_multiplexed_async_connection().await.unwrap();
    let binary_key = b"app:\xff\xfebin".to_vec();
    set_raw(&mut raw, &binary_key).await;
    cache.set("a", &1u32).await.unwrap();
    cache.set("b", &2u32).await.unwrap();
    assert_eq!(cache.clear_pattern("*").await.unwrap(), 3);
    assert_eq!(cache.get::<u32>("a").await.unwrap(), None);
    let left: bool = redis::cmd("EXISTS")
        .arg(&binary_key)
        .query_async(&mut raw)
        .await
        .unwrap();
    assert!(!left, "the binary key under the prefix is cleared too");

    // The blocking cache, the same way.
    set_raw(&mut raw, &binary_key).await;
    cache.set("c", &3u32).await.unwrap();
    let url = server.url();
    let removed = tokio::task::spawn_blocking(move || {
        let mut c = RedisConfig::from_url(&url).unwrap();
        c.health_check_interval = None;
        c.key_prefix = "app:".into();
        RedisSyncCache::connect(c).unwrap().clear_pattern("*")
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(removed, 2);
    assert_eq!(cache.get::<u32>("c").await.unwrap(), None);
}

/// A key of another Redis type (a hash, a list) left under our prefix by another program: a
/// batched read (`MGET`: `get_many`, and concurrent `get`s coalesced) reads it as nil, so a
/// load after it stores "only if absent" — and `SET NX` refused it, so every read ran the
/// loader again and nothing was ever cached (a lone `GET` sees `WRONGTYPE`, and the load after
/// that failed read replaced the key). Now a refused store looks at the key's type and
/// replaces a key that holds no string.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_of_another_type_is_replaced_by_a_load() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;
    let server = RedisServer::start().unwrap();
    let redis = RedisCache::connect(config(&server, "t:")).await.unwrap();
    let multi = MultiLevelCache::builder(redis.backend())
        .name("types")
        .build()
        .unwrap();
    let client = redis::Client::open(server.url()).unwrap();
    let raw = client.get_multiplexed_async_connection().await.unwrap();
    let encoded = ncm_cache_core::Codec::encode(redis.cache().codec(), &7u32).unwrap();
    for kind in ["hash", "list"] {
        let plant = |key: String| {
            let mut c = redis::cmd(if kind == "hash" { "HSET" } else { "RPUSH" });
            c.arg(format!("t:{key}"));
            if kind == "hash" {
                c.arg("f");
            }
            c.arg("v");
            let mut raw = raw.clone();
            async move {
                let _: () = c.query_async(&mut raw).await.unwrap();
            }
        };
        // MultiLevelCache::get_many_or_load (its L2 read is one MGET), twice.
        let key = format!("many-{kind}");
        plant(key.clone()).await;
        let calls = Arc::new(AtomicUsize::new(0));
        for _ in 0..2 {
            let calls = Arc::clone(&calls);
            let got = multi
                .get_many_or_load::<u32, _, _, _>(&[key.as_str()], move |keys| async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, std::io::Error>(keys.into_iter().map(|k| (k, 7)).collect())
                })
                .await
                .unwrap();
            assert_eq!(got[0], Some(7));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1, "{kind}: loaded twice");
        assert_eq!(redis.get::<u32>(&key).await.unwrap(), Some(7), "{kind}");
        // The backend's store "only if absent" itself.
        let key = format!("nx-{kind}");
        plant(key.clone()).await;
        let stored = redis
            .backend()
            .set_if_absent(&key, encoded.clone(), Some(Duration::from_secs(60)))
            .await
            .unwrap();
        assert!(stored, "{kind}: refused");
        assert_eq!(redis.get::<u32>(&key).await.unwrap(), Some(7), "{kind}");
        let ttl = redis.backend().get_ttl(&key).await.unwrap();
        assert!(
            matches!(ttl, ncm_cache_core::KeyTtl::Expires(t) if t > Duration::from_secs(50)),
            "{kind}: TTL {ttl:?}"
        );
        // A string stays refused.
        let stored = redis
            .backend()
            .set_if_absent(&key, encoded.clone(), None)
            .await
            .unwrap();
        assert!(!stored, "{kind}: a string was replaced");
    }
    assert_eq!(multi.get_stats().loads_not_cached, 0);
}

/// The same replacement on a 3+3 cluster (the type is looked at by a script, routed by key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_of_another_type_is_replaced_by_a_load_on_a_cluster() {
    let cluster = ncm_cache_testkit::RedisCluster::start().unwrap();
    let mut c = RedisConfig::default();
    c.cluster_nodes = cluster.node_urls();
    c.key_prefix = "t:".into();
    let redis = RedisCache::connect(c).await.unwrap();
    let client = redis::cluster::ClusterClient::new(cluster.node_urls()).unwrap();
    let mut raw = client.get_async_connection().await.unwrap();
    let encoded = ncm_cache_core::Codec::encode(redis.cache().codec(), &7u32).unwrap();
    for i in 0..8 {
        let key = format!("h{i}");
        let _: () = redis::cmd("HSET")
            .arg(format!("t:{key}"))
            .arg("f")
            .arg("v")
            .query_async(&mut raw)
            .await
            .unwrap();
        let stored = redis
            .backend()
            .set_if_absent(&key, encoded.clone(), None)
            .await
            .unwrap();
        assert!(stored, "{key}: refused");
        assert_eq!(redis.get::<u32>(&key).await.unwrap(), Some(7), "{key}");
    }
}

/// Durations at their extremes in the configuration — `Duration::MAX` meaning "never" or "no
/// bound", zero meaning "off" (redis-py's `health_check_interval=0`) — never panic a caller or
/// a background task (found by review: a `response_timeout` of `Duration::MAX` panicked every
/// batched read on a duration overflow, the blocking cache's pipelines too; a zero
/// health-check interval panicked the health, pub/sub and tracking tasks, so a multi-level
/// cache's backplane never came up; `Duration::MAX` TTLs were refused by Redis; a reloader's
/// `lock_wait(Duration::MAX)` panicked every reload, a multi-level lock wait of
/// `Duration::MAX` did not wait at all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extreme_durations_in_the_configuration_never_panic() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;
    let server = RedisServer::start().unwrap();

    let mut unbounded = config(&server, "x:");
    unbounded.response_timeout = Duration::MAX;
    unbounded.connect_timeout = Duration::MAX;
    unbounded.cluster_failover_wait = Duration::MAX;
    let redis = RedisCache::connect(unbounded.clone()).await.unwrap();
    redis.set("k", &1u64).await.unwrap();
    assert_eq!(redis.get::<u64>("k").await.unwrap(), Some(1));
    // A TTL of Duration::MAX never expires, as on the memory backend.
    redis
        .set_with_ttl("forever", &2u64, Duration::MAX)
        .await
        .unwrap();
    assert_eq!(redis.get::<u64>("forever").await.unwrap(), Some(2));
    let sync = tokio::task::spawn_blocking(move || {
        let sync = RedisSyncCache::connect(unbounded).unwrap();
        sync.set_many([("a", &1u64), ("b", &2u64)], Expiry::Default)
            .unwrap();
        sync.get::<u64>("b").unwrap()
    })
    .await
    .unwrap();
    assert_eq!(sync, Some(2));

    // A zero health-check interval: off from a URL (as redis-py's 0), refused by `connect`.
    let url = format!("{}?health_check_interval=0", server.url());
    assert_eq!(
        RedisConfig::from_url(&url).unwrap().health_check_interval,
        None
    );
    let mut zero = config(&server, "z:");
    zero.health_check_interval = Some(Duration::ZERO);
    let refused = RedisCache::connect(zero).await;
    assert!(
        matches!(refused, Err(CacheError::Config(_))),
        "{:?}",
        refused.err()
    );

    // A multi-level lock wait of Duration::MAX waits: two instances, one load.
    let runs = Arc::new(AtomicUsize::new(0));
    let instance = || async {
        let redis = RedisCache::connect(config(&server, "ml:")).await.unwrap();
        MultiLevelCache::builder(redis.backend())
            .distributed_lock(
                Arc::clone(redis.redis_backend()),
                Duration::from_secs(10),
                Duration::MAX,
            )
            .build()
            .unwrap()
    };
    let (a, b) = (instance().await, instance().await);
    let load = |cache: MultiLevelCache| {
        let runs = Arc::clone(&runs);
        tokio::spawn(async move {
            cache
                .get_or_load("hot", move || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    Ok::<_, std::io::Error>(7u64)
                })
                .await
                .unwrap()
        })
    };
    let first = load(a.clone());
    tokio::time::sleep(Duration::from_millis(50)).await;
    let second = load(b.clone());
    assert_eq!((first.await.unwrap(), second.await.unwrap()), (7, 7));
    assert_eq!(runs.load(Ordering::SeqCst), 1, "a waiter did not wait");

    // A reloader's lock wait and a schedule of Duration::MAX.
    let reloader = CacheReloader::redis(&redis)
        .lock_wait(Duration::MAX)
        .build();
    reloader
        .register_loader(
            "cfg",
            || async { Ok::<_, std::io::Error>(3u64) },
            Some(Duration::MAX),
            ReloadStrategy::Lazy,
        )
        .unwrap();
    assert_eq!(reloader.get::<u64>("cfg").await.unwrap(), 3);
    // An eager value that never expires: its timer loads it now and lives on.
    reloader
        .register_loader(
            "eager",
            || async { Ok::<_, std::io::Error>(4u64) },
            Some(Duration::MAX),
            ReloadStrategy::Eager,
        )
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stats = reloader.stats("eager").unwrap();
    assert!(
        stats.owned_ticks >= 1 && stats.reloads >= 1,
        "the eager timer died: {stats:?}"
    );
    assert_eq!(reloader.get::<u64>("eager").await.unwrap(), 4);
    // A schedule of Duration::MAX ("never again") starts and stops cleanly.
    reloader
        .schedule_reload("tick", Duration::MAX, || async {
            Ok::<_, std::io::Error>(5u64)
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(reloader.cancel_reload("tick").await);
    reloader.shutdown().await;
}
