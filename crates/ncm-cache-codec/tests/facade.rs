//! The codecs wired into core's typed facade: `Cache<Serializer>` over a tiny in-test backend
//! (a `Mutex<HashMap>` test double for core-level logic only).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use common::{Record, records};
use ncm_cache_codec::{CompressionType, SerializationType, Serializer, SerializerFactory};
use ncm_cache_core::{
    Cache, CacheBackend, CacheError, CacheStats, HealthReport, KeyTtl, Result, async_trait,
};

#[derive(Debug, Default)]
struct MapBackend {
    map: Mutex<HashMap<String, Bytes>>,
    decode_errors: AtomicU64,
}

#[async_trait]
impl CacheBackend for MapBackend {
    fn name(&self) -> &str {
        "map"
    }
    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        Ok(self.map.lock().unwrap().get(key).cloned())
    }
    async fn set(&self, key: &str, value: Bytes, _ttl: Option<Duration>) -> Result<()> {
        self.map.lock().unwrap().insert(key.to_owned(), value);
        Ok(())
    }
    async fn delete(&self, key: &str) -> Result<bool> {
        Ok(self.map.lock().unwrap().remove(key).is_some())
    }
    async fn exists(&self, key: &str) -> Result<bool> {
        Ok(self.map.lock().unwrap().contains_key(key))
    }
    async fn get_ttl(&self, key: &str) -> Result<KeyTtl> {
        Ok(if self.map.lock().unwrap().contains_key(key) {
            KeyTtl::Persistent
        } else {
            KeyTtl::Missing
        })
    }
    async fn extend_ttl(&self, key: &str, _ttl: Duration) -> Result<bool> {
        self.exists(key).await
    }
    async fn clear_pattern(&self, _pattern: &str) -> Result<u64> {
        Ok(0)
    }
    async fn health_report(&self) -> HealthReport {
        HealthReport::new(true, Duration::ZERO, "map", "")
    }
    fn get_stats(&self) -> CacheStats {
        CacheStats::default()
    }
    fn record_decode_error(&self, _key: &str) {
        self.decode_errors.fetch_add(1, Ordering::Relaxed);
    }
}

fn codecs() -> Vec<Serializer> {
    let mut out = vec![Serializer::default()];
    for (f, c) in [
        (SerializationType::MsgPack, CompressionType::Zstd),
        (SerializationType::Cbor, CompressionType::Lz4),
        (SerializationType::Pickle, CompressionType::Gzip),
        (SerializationType::SimdJson, CompressionType::None),
    ] {
        if f.is_enabled() && c.is_enabled() {
            out.push(SerializerFactory::create_serializer(f, c, None).unwrap());
        }
    }
    out
}

#[tokio::test]
async fn typed_get_and_set_round_trip_through_every_codec() {
    for codec in codecs() {
        let cache = Cache::new(MapBackend::default(), codec.clone());
        let small = common::record(1);
        let large = records(50); // compressed when the codec compresses
        cache.set("user:1", &small).await.unwrap();
        cache.set("users", &large).await.unwrap();
        assert_eq!(cache.get::<Record>("user:1").await.unwrap(), Some(small));
        assert_eq!(
            cache.get::<Vec<Record>>("users").await.unwrap(),
            Some(large)
        );
        assert_eq!(cache.get::<Record>("missing").await.unwrap(), None);
    }
}

#[tokio::test]
async fn undecodable_values_read_as_none_and_are_deleted() {
    let backend = std::sync::Arc::new(MapBackend::default());
    let cache = Cache::new(backend.clone(), Serializer::default());
    // Corrupt envelope, foreign bytes, and a value of the wrong type.
    backend
        .set("corrupt", Bytes::from_static(&[0xC1, 0x4E, 1]), None)
        .await
        .unwrap();
    backend
        .set("foreign", Bytes::from_static(b"\x00\xffnot json"), None)
        .await
        .unwrap();
    cache.set("wrong-type", &"a string").await.unwrap();
    for key in ["corrupt", "foreign", "wrong-type"] {
        // The strict API shows the typed error and leaves the entry.
        let err = cache.try_get::<Record>(key).await.unwrap_err();
        assert!(matches!(err, CacheError::Codec(_)), "{key}: {err}");
        assert!(backend.exists(key).await.unwrap());
        // The normal read is a miss and repairs the entry.
        assert_eq!(cache.get::<Record>(key).await.unwrap(), None, "{key}");
        assert!(!backend.exists(key).await.unwrap(), "{key} was not deleted");
    }
    assert_eq!(backend.decode_errors.load(Ordering::Relaxed), 3);
}

#[tokio::test]
async fn a_codec_change_still_reads_old_values() {
    let backend = std::sync::Arc::new(MapBackend::default());
    let old = Cache::new(backend.clone(), Serializer::default());
    old.set("k", &records(10)).await.unwrap();
    for codec in codecs() {
        let new = Cache::new(backend.clone(), codec);
        assert_eq!(
            new.get::<Vec<Record>>("k").await.unwrap(),
            Some(records(10))
        );
    }
}
