//! The format and compression enums, with their stable envelope tags and cargo features.

use std::fmt;
use std::str::FromStr;

use ncm_cache_core::CacheError;
use serde::{Deserialize, Serialize};

/// The serialization format of a value (the original's `SerializationType`).
///
/// Each format sits behind its own cargo feature of `ncm-cache-codec`; [`is_enabled`]
/// says whether this build has it. Configs name formats in `snake_case`
/// (`"json"`, `"simd_json"`, `"cbor"`, `"msgpack"`, `"pickle"`); [`FromStr`] also accepts the
/// Python names (`"orjson"` for [`SimdJson`], `"msg_pack"`, `"simd-json"`), case-insensitively.
///
/// ```
/// use ncm_cache_codec::SerializationType;
/// let format: SerializationType = "msgpack".parse().unwrap();
/// assert_eq!(format, SerializationType::MsgPack);
/// assert_eq!(format.to_string(), "msgpack");
/// assert_eq!("ORJSON".parse::<SerializationType>().unwrap(), SerializationType::SimdJson);
/// assert_eq!(SerializationType::default(), SerializationType::Json);
/// ```
///
/// [`is_enabled`]: Self::is_enabled
/// [`SimdJson`]: Self::SimdJson
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum SerializationType {
    /// JSON through `serde_json` (feature `json`, on by default). Readable by anything.
    #[default]
    Json,
    /// JSON written and read through `simd-json` where it is faster (large payloads), `serde_json`
    /// otherwise (feature `simd-json`) — the role orjson plays in Python. The bytes are plain
    /// JSON: the `Json` codec reads them and vice versa.
    #[serde(alias = "simdjson", alias = "orjson")]
    SimdJson,
    /// CBOR through `ciborium` (feature `cbor`): compact, binary, self-describing.
    Cbor,
    /// MessagePack through `rmp-serde` with named fields (feature `msgpack`): maps keyed by field
    /// name, so fields can be added and other languages read it.
    #[serde(rename = "msgpack", alias = "msg_pack")]
    MsgPack,
    /// Python pickle (protocol 3) through `serde-pickle` (feature `pickle`), so Python services
    /// can share the cache. Decoding never executes code.
    Pickle,
}

impl SerializationType {
    /// Every format, in tag order.
    pub const ALL: [Self; 5] = [
        Self::Json,
        Self::SimdJson,
        Self::Cbor,
        Self::MsgPack,
        Self::Pickle,
    ];

    /// The stable tag written in the envelope. Never renumbered.
    pub const fn tag(self) -> u8 {
        match self {
            Self::Json => 1,
            Self::SimdJson => 2,
            Self::Cbor => 3,
            Self::MsgPack => 4,
            Self::Pickle => 5,
        }
    }

    /// The format with this envelope tag, if any.
    pub const fn from_tag(tag: u8) -> Option<Self> {
        Some(match tag {
            1 => Self::Json,
            2 => Self::SimdJson,
            3 => Self::Cbor,
            4 => Self::MsgPack,
            5 => Self::Pickle,
            _ => return None,
        })
    }

    /// The config name (`snake_case`), also used in error messages.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Json => "json",
            Self::SimdJson => "simd_json",
            Self::Cbor => "cbor",
            Self::MsgPack => "msgpack",
            Self::Pickle => "pickle",
        }
    }

    /// The cargo feature of `ncm-cache-codec` that compiles this format in.
    pub const fn feature(self) -> &'static str {
        match self {
            Self::Json => "json",
            Self::SimdJson => "simd-json",
            Self::Cbor => "cbor",
            Self::MsgPack => "msgpack",
            Self::Pickle => "pickle",
        }
    }

    /// `true` when this build can write the format.
    pub const fn is_enabled(self) -> bool {
        match self {
            Self::Json => cfg!(feature = "json"),
            Self::SimdJson => cfg!(feature = "simd-json"),
            Self::Cbor => cfg!(feature = "cbor"),
            Self::MsgPack => cfg!(feature = "msgpack"),
            Self::Pickle => cfg!(feature = "pickle"),
        }
    }
}

impl fmt::Display for SerializationType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SerializationType {
    type Err = CacheError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match normalize(s).as_str() {
            "json" => Self::Json,
            "simdjson" | "orjson" | "fastjson" => Self::SimdJson,
            "cbor" => Self::Cbor,
            "msgpack" | "messagepack" => Self::MsgPack,
            "pickle" => Self::Pickle,
            _ => {
                return Err(CacheError::Config(format!(
                    "unknown serialization type {s:?} (expected json, simd_json, cbor, msgpack or pickle)"
                )));
            }
        })
    }
}

/// The compression applied to encoded values above the size threshold.
///
/// Each algorithm sits behind its own cargo feature (`gzip`, `lz4`, `zstd`). Levels: gzip
/// 0–9 (default 6), zstd 1–22 and negative fast levels (default 3); LZ4 has a single level and
/// ignores it.
///
/// ```
/// use ncm_cache_codec::CompressionType;
/// assert_eq!("zstd".parse::<CompressionType>().unwrap(), CompressionType::Zstd);
/// assert_eq!(CompressionType::Lz4.to_string(), "lz4");
/// assert_eq!(CompressionType::default(), CompressionType::None);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum CompressionType {
    /// No compression.
    #[default]
    None,
    /// gzip (RFC 1952) through `flate2` (feature `gzip`).
    Gzip,
    /// LZ4 block format through `lz4_flex` (feature `lz4`): the fastest, the least compact.
    Lz4,
    /// Zstandard through `zstd` (feature `zstd`), with reused per-thread contexts.
    Zstd,
}

impl CompressionType {
    /// Every compression, in tag order.
    pub const ALL: [Self; 4] = [Self::None, Self::Gzip, Self::Lz4, Self::Zstd];

    /// The stable tag written in the envelope. Never renumbered.
    pub const fn tag(self) -> u8 {
        match self {
            Self::None => 0,
            Self::Gzip => 1,
            Self::Lz4 => 2,
            Self::Zstd => 3,
        }
    }

    /// The compression with this envelope tag, if any.
    pub const fn from_tag(tag: u8) -> Option<Self> {
        Some(match tag {
            0 => Self::None,
            1 => Self::Gzip,
            2 => Self::Lz4,
            3 => Self::Zstd,
            _ => return None,
        })
    }

    /// The config name (`snake_case`), also used in error messages.
    pub const fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Gzip => "gzip",
            Self::Lz4 => "lz4",
            Self::Zstd => "zstd",
        }
    }

    /// The cargo feature of `ncm-cache-codec` that compiles this compression in (`None` needs
    /// none).
    pub const fn feature(self) -> Option<&'static str> {
        match self {
            Self::None => None,
            Self::Gzip => Some("gzip"),
            Self::Lz4 => Some("lz4"),
            Self::Zstd => Some("zstd"),
        }
    }

    /// `true` when this build has the compression.
    pub const fn is_enabled(self) -> bool {
        match self {
            Self::None => true,
            Self::Gzip => cfg!(feature = "gzip"),
            Self::Lz4 => cfg!(feature = "lz4"),
            Self::Zstd => cfg!(feature = "zstd"),
        }
    }

    /// The level used when none is configured.
    pub const fn default_level(self) -> i32 {
        match self {
            Self::None | Self::Lz4 => 0,
            Self::Gzip => 6,
            Self::Zstd => 3,
        }
    }

    /// Checks that `level` is valid for this algorithm.
    pub fn validate_level(self, level: i32) -> Result<(), CacheError> {
        let ok = match self {
            Self::None | Self::Lz4 => true,
            Self::Gzip => (0..=9).contains(&level),
            Self::Zstd => (-(1 << 17)..=22).contains(&level),
        };
        if ok {
            Ok(())
        } else {
            Err(CacheError::Config(format!(
                "compression level {level} is out of range for {self} (gzip: 0..=9, zstd: -131072..=22, 0 = default)"
            )))
        }
    }
}

impl fmt::Display for CompressionType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for CompressionType {
    type Err = CacheError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match normalize(s).as_str() {
            "none" | "off" | "false" | "" => Self::None,
            "gzip" | "gz" => Self::Gzip,
            "lz4" => Self::Lz4,
            "zstd" | "zstandard" => Self::Zstd,
            _ => {
                return Err(CacheError::Config(format!(
                    "unknown compression type {s:?} (expected none, gzip, lz4 or zstd)"
                )));
            }
        })
    }
}

/// Lower-cases and drops `_`, `-` and spaces, so `"Simd-JSON"` and `"simd_json"` compare equal.
fn normalize(s: &str) -> String {
    s.chars()
        .filter(|c| !matches!(c, '_' | '-' | ' '))
        .flat_map(char::to_lowercase)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_round_trip_and_are_stable() {
        for f in SerializationType::ALL {
            assert_eq!(SerializationType::from_tag(f.tag()), Some(f));
            assert_eq!(f.name().parse::<SerializationType>().unwrap(), f);
        }
        for c in CompressionType::ALL {
            assert_eq!(CompressionType::from_tag(c.tag()), Some(c));
            assert_eq!(c.name().parse::<CompressionType>().unwrap(), c);
        }
        // The envelope table in the docs: never renumber.
        let tags: Vec<u8> = SerializationType::ALL.iter().map(|f| f.tag()).collect();
        assert_eq!(tags, [1, 2, 3, 4, 5]);
        let tags: Vec<u8> = CompressionType::ALL.iter().map(|c| c.tag()).collect();
        assert_eq!(tags, [0, 1, 2, 3]);
        assert_eq!(SerializationType::from_tag(0), None);
        assert_eq!(CompressionType::from_tag(200), None);
    }

    #[test]
    fn config_names_are_snake_case() {
        let json = serde_json::to_string(&SerializationType::SimdJson).unwrap();
        assert_eq!(json, "\"simd_json\"");
        for f in SerializationType::ALL {
            let json = serde_json::to_string(&f).unwrap();
            assert_eq!(json, format!("\"{}\"", f.name()));
        }
        let back: SerializationType = serde_json::from_str("\"orjson\"").unwrap();
        assert_eq!(back, SerializationType::SimdJson);
        let back: CompressionType = serde_json::from_str("\"zstd\"").unwrap();
        assert_eq!(back, CompressionType::Zstd);
        assert!("yaml".parse::<SerializationType>().is_err());
        assert!("brotli".parse::<CompressionType>().is_err());
    }

    #[test]
    fn levels_are_validated() {
        assert!(CompressionType::Gzip.validate_level(9).is_ok());
        assert!(CompressionType::Gzip.validate_level(10).is_err());
        assert!(CompressionType::Zstd.validate_level(19).is_ok());
        assert!(CompressionType::Zstd.validate_level(-5).is_ok());
        assert!(CompressionType::Zstd.validate_level(23).is_err());
        assert!(CompressionType::Lz4.validate_level(99).is_ok());
    }
}
