//! Shared test data: a recursive serde value and the enabled codec configurations.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    dead_code,
    unreachable_pub,
    missing_docs
)]

use std::collections::BTreeMap;

use ncm_cache_codec::{CompressionType, SerializationType, Serializer};
use serde::{Deserialize, Serialize};

/// Arbitrary serde data: what a cached value may hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Value {
    Unit,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(String),
    Bytes(#[serde(with = "serde_bytes")] Vec<u8>),
    Opt(Option<Box<Value>>),
    List(Vec<Value>),
    Map(BTreeMap<String, Value>),
}

/// A realistic record, with several field kinds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub id: u64,
    pub name: String,
    pub email: Option<String>,
    pub score: f64,
    pub tags: Vec<String>,
    #[serde(with = "serde_bytes")]
    pub avatar: Vec<u8>,
    pub attributes: BTreeMap<String, Value>,
}

/// A record of a few hundred bytes.
pub fn record(i: u64) -> Record {
    let mut attributes = BTreeMap::new();
    attributes.insert("plan".into(), Value::Str("pro".into()));
    attributes.insert("logins".into(), Value::Int(i as i64 * 3 - 100));
    attributes.insert("ratio".into(), Value::Float(i as f64 / 7.0));
    attributes.insert(
        "nested".into(),
        Value::List(vec![Value::Unit, Value::Bool(true), Value::Opt(None)]),
    );
    Record {
        id: i,
        name: format!("user-{i} Zoë 日本"),
        email: (!i.is_multiple_of(3)).then(|| format!("user{i}@example.com")),
        score: i as f64 * 1.25,
        tags: vec!["a".into(), "bb".into(), String::new()],
        avatar: (0..32).map(|b| (b * 7 + i) as u8).collect(),
        attributes,
    }
}

/// `n` records: about 250 bytes each.
pub fn records(n: u64) -> Vec<Record> {
    (0..n).map(record).collect()
}

/// Every format this build can write.
pub fn formats() -> Vec<SerializationType> {
    SerializationType::ALL
        .into_iter()
        .filter(|f| f.is_enabled())
        .collect()
}

/// Every compression this build has.
pub fn compressions() -> Vec<CompressionType> {
    CompressionType::ALL
        .into_iter()
        .filter(|c| c.is_enabled())
        .collect()
}

/// Envelope serializers for every format × compression, compressing from `threshold` bytes.
pub fn envelope_configs(threshold: usize) -> Vec<Serializer> {
    let mut out = Vec::new();
    for f in formats() {
        for c in compressions() {
            out.push(
                Serializer::builder()
                    .format(f)
                    .compression(c)
                    .compression_threshold(threshold)
                    .build()
                    .unwrap(),
            );
        }
    }
    out
}

/// A raw-mode serializer per format.
pub fn raw_configs() -> Vec<Serializer> {
    formats()
        .into_iter()
        .map(|f| Serializer::builder().format(f).raw(true).build().unwrap())
        .collect()
}

/// A short label for messages.
pub fn label(s: &Serializer) -> String {
    if s.is_raw() {
        format!("{}/raw", s.format())
    } else {
        format!("{}/{}", s.format(), s.compression())
    }
}
