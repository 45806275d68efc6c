//! Durations in configuration: `"1h"`, `"30m"`, `"500ms"`, `"1h 30m"`, or plain seconds.

use std::time::Duration;

use crate::error::{CacheError, Result};

/// The longest wait, timeout or interval the library schedules: about 30 years. A longer
/// configured duration (`Duration::MAX` for "never", "no bound") is treated as this, so that
/// deadline arithmetic (`now + wait`, `timeout * 2`) cannot overflow and panic.
pub const MAX_WAIT: Duration = Duration::from_secs(30 * 365 * 24 * 3600);

/// `d`, at most [`MAX_WAIT`].
///
/// ```
/// use std::time::Duration;
/// use ncm_cache_core::{MAX_WAIT, capped};
/// assert_eq!(capped(Duration::MAX), MAX_WAIT);
/// assert_eq!(capped(Duration::from_secs(5)), Duration::from_secs(5));
/// ```
pub const fn capped(d: Duration) -> Duration {
    if d.as_secs() >= MAX_WAIT.as_secs() {
        MAX_WAIT
    } else {
        d
    }
}

/// Parses a duration: a number of seconds (`"90"`, `"1.5"`) or a human form understood by
/// `humantime` (`"500ms"`, `"30s"`, `"5m"`, `"1h"`, `"2d"`, `"1h 30m"`).
///
/// ```
/// use std::time::Duration;
/// use ncm_cache_core::parse_duration;
/// assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
/// assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
/// assert_eq!(parse_duration("0.5").unwrap(), Duration::from_millis(500));
/// assert!(parse_duration("soon").is_err());
/// ```
pub fn parse_duration(text: &str) -> Result<Duration> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    if let Ok(secs) = text.parse::<f64>() {
        return Duration::try_from_secs_f64(secs)
            .map_err(|e| CacheError::Config(format!("invalid duration {text:?}: {e}")));
    }
    humantime::parse_duration(text).map_err(|e| {
        CacheError::Config(format!(
            "invalid duration {text:?}: {e} (use seconds or a form like \"500ms\", \"30s\", \"5m\", \"1h\")"
        ))
    })
}

/// Serde support for `Duration` fields: reads seconds (integer or float) or a human string,
/// writes a human string. Use with `#[serde(with = "ncm_cache_core::serde_duration")]`.
pub mod serde_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    pub(crate) enum Raw {
        Int(u64),
        Float(f64),
        Text(String),
    }

    pub(crate) fn from_raw<E: serde::de::Error>(raw: Raw) -> Result<Duration, E> {
        match raw {
            Raw::Int(s) => Ok(Duration::from_secs(s)),
            Raw::Float(s) => Duration::try_from_secs_f64(s).map_err(E::custom),
            Raw::Text(t) => super::parse_duration(&t).map_err(E::custom),
        }
    }

    /// Serializes as a human string (`"1h"`).
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    /// Deserializes from seconds or a human string.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        from_raw(Raw::deserialize(d)?)
    }

    /// The same for `Option<Duration>` (`null` is `None`).
    pub mod option {
        use std::time::Duration;

        use serde::{Deserialize, Deserializer, Serializer};

        /// Serializes `Some` as a human string and `None` as null.
        pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => super::serialize(d, s),
                None => s.serialize_none(),
            }
        }

        /// Deserializes from null, seconds or a human string.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            Option::<super::Raw>::deserialize(d)?
                .map(super::from_raw)
                .transpose()
        }
    }
}
