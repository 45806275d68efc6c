#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod compress;
mod config;
mod depth;
mod envelope;
mod formats;
#[cfg(feature = "pickle")]
mod pickle_guard;
mod serializer;
mod signing;
mod types;

pub use config::CodecConfig;
pub use depth::MAX_DEPTH;
pub use envelope::{
    EnvelopeHeader, KEY_BOUND_VERSION, MAGIC, SIGNED_VERSION, TAG_LEN, VERSION, inspect,
};
pub use serializer::{
    DEFAULT_COMPRESSION_THRESHOLD, DEFAULT_MAX_DECOMPRESSED_SIZE, Serializer, SerializerBuilder,
    SerializerFactory,
};
pub use signing::{MIN_SIGNING_KEY_LEN, SignatureMode};
pub use types::{CompressionType, SerializationType};
