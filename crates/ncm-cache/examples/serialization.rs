//! The original README's "Serialization Options" snippet in Rust:
//! `SerializerFactory::create_serializer` for JSON + gzip (level 6), Pickle, MessagePack + LZ4
//! and the fast-JSON codec (`SimdJson`, the role orjson plays in Python) + Zstd. Prints the
//! encoded size of one value with each, and shows that any serializer reads what another wrote
//! (the self-describing envelope).
//!
//! ```text
//! cargo run -p ncm-cache --features simd-json,msgpack,pickle,gzip,lz4,zstd --example serialization
//! ```

use std::time::Duration;

use ncm_cache::Codec;
use ncm_cache::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Product {
    id: u64,
    name: String,
    price: f64,
    tags: Vec<String>,
    description: String,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A value large enough (> 1 KiB, the default compression threshold) to be compressed.
    let product = Product {
        id: 456,
        name: "Laptop".into(),
        price: 999.99,
        tags: (0..40).map(|i| format!("tag-{i}")).collect(),
        description: "A light laptop with a long battery life. ".repeat(40),
    };

    // json_serializer = SerializerFactory.create_serializer(SerializationType.JSON,
    //     compression_type=CompressionType.GZIP, compression_level=6)
    let json_gzip = SerializerFactory::create_serializer(
        SerializationType::Json,
        CompressionType::Gzip,
        Some(6),
    )?;
    // pickle_serializer = SerializerFactory.create_serializer(SerializationType.PICKLE)
    let pickle = SerializerFactory::create_serializer(
        SerializationType::Pickle,
        CompressionType::None,
        None,
    )?;
    // msgpack_serializer = SerializerFactory.create_serializer(SerializationType.MSGPACK,
    //     compression_type=CompressionType.LZ4)
    let msgpack_lz4 = SerializerFactory::create_serializer(
        SerializationType::MsgPack,
        CompressionType::Lz4,
        None,
    )?;
    // orjson_serializer = SerializerFactory.create_serializer(SerializationType.ORJSON,
    //     compression_type=CompressionType.ZSTD)
    let fast_json_zstd = SerializerFactory::create_serializer(
        SerializationType::SimdJson,
        CompressionType::Zstd,
        None,
    )?;
    let plain_json = Serializer::default();

    let serializers = [
        ("JSON (no compression)", &plain_json),
        ("JSON + gzip level 6", &json_gzip),
        ("Pickle", &pickle),
        ("MessagePack + LZ4", &msgpack_lz4),
        ("SimdJson (ORJSON role) + Zstd", &fast_json_zstd),
    ];
    for (label, serializer) in serializers {
        let bytes = serializer.encode(&product)?;
        let back: Product = serializer.decode(&bytes)?;
        if back != product {
            return Err(format!("{label}: round trip changed the value").into());
        }
        println!(
            "{label:<31} {:>6} bytes  (format {}, compression {}, level {})",
            bytes.len(),
            serializer.format(),
            serializer.compression(),
            serializer.level()
        );
    }

    // The envelope names format and compression, so any serializer decodes any other's bytes.
    let written_by_msgpack = msgpack_lz4.encode(&product)?;
    let read_by_json: Product = plain_json.decode(&written_by_msgpack)?;
    println!(
        "a JSON serializer read MessagePack+LZ4 bytes: {}",
        read_by_json == product
    );

    // A cache uses one of them for everything it writes.
    let cache = Cache::builder(MemoryBackend::new(), msgpack_lz4)
        .default_ttl(Duration::from_secs(60))
        .build();
    cache.set("product:456", &product).await?;
    let cached: Option<Product> = cache.get("product:456").await?;
    println!(
        "cache with MessagePack+LZ4: round trip ok = {}",
        cached.as_ref() == Some(&product)
    );
    cache.close().await?;
    Ok(())
}
