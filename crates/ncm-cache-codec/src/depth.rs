//! Nesting-depth limits checked before any recursive parser sees the bytes.
//!
//! serde deserializers recurse once per nesting level, and so does dropping the value they
//! build; a payload of a few bytes per level (`[[[[…` in JSON, `0x81 0x81 …` in CBOR,
//! `0x91 0x91 …` in MessagePack) nested a million deep overflows the stack, which aborts the
//! process (a stack overflow is not a panic). Every format is scanned here first, without
//! recursion and without allocating more than one counter per level up to the limit, and a
//! value nested [`MAX_DEPTH`] levels or more is rejected. Pickle has its own guard
//! (`pickle_guard`), with the same limit.
//!
//! The scanners only look at structure: a malformed value within the limit passes the scan and
//! is then rejected by the format's parser (which cannot recurse deeper than the scan went).

use ncm_cache_core::{CodecError, CodecErrorKind};

/// Values nested this many levels or more are rejected, on decode and on encode (so nothing
/// this crate writes is refused by a reader). The same limit as serde_json's recursion limit:
/// 127 nested arrays or maps read, 128 do not.
pub const MAX_DEPTH: usize = 128;

fn too_deep(format: &'static str) -> CodecError {
    CodecError::new(
        CodecErrorKind::Corrupt,
        format,
        format!("value nests {MAX_DEPTH} levels or more (the limit, like serde_json's)"),
    )
}

/// JSON: counts `[` and `{` outside strings.
pub(crate) fn check_json(bytes: &[u8]) -> Result<(), CodecError> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in bytes {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth >= MAX_DEPTH {
                    return Err(too_deep("json"));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// What is left to read of an open container: a count of items, or "until a break byte"
/// (CBOR's indefinite lengths).
#[derive(Clone, Copy)]
enum Left {
    Items(u64),
    UntilBreak,
}

/// A stack of open containers, bounded by [`MAX_DEPTH`].
struct Open {
    stack: Vec<Left>,
    format: &'static str,
}

impl Open {
    fn new(format: &'static str) -> Self {
        Self {
            stack: Vec::new(),
            format,
        }
    }

    /// One item has been read: counts it against the innermost container, closing every
    /// container it completes. `true` when the top-level value is complete.
    fn item_done(&mut self) -> bool {
        while let Some(top) = self.stack.last_mut() {
            match top {
                Left::Items(n) => {
                    *n = n.saturating_sub(1);
                    if *n > 0 {
                        return false;
                    }
                    self.stack.pop();
                }
                Left::UntilBreak => return false,
            }
        }
        true
    }

    /// Opens a container of `items` items (an empty one is an item of its parent at once).
    fn open(&mut self, left: Left) -> Result<bool, CodecError> {
        if matches!(left, Left::Items(0)) {
            return Ok(self.item_done());
        }
        if self.stack.len() + 1 >= MAX_DEPTH {
            return Err(too_deep(self.format));
        }
        self.stack.push(left);
        Ok(false)
    }
}

/// A cursor over the input; running out of bytes ends the scan (the parser reports it).
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn byte(&mut self) -> Option<u8> {
        let b = *self.bytes.get(self.at)?;
        self.at += 1;
        Some(b)
    }

    /// A big-endian unsigned integer of `n` bytes (n ≤ 8).
    fn uint(&mut self, n: usize) -> Option<u64> {
        let end = self.at.checked_add(n)?;
        let slice = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(slice.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
    }

    fn skip(&mut self, n: u64) -> Option<()> {
        let n = usize::try_from(n).ok()?;
        let end = self.at.checked_add(n)?;
        if end > self.bytes.len() {
            return None;
        }
        self.at = end;
        Some(())
    }
}

/// CBOR (RFC 8949): arrays, maps and tags nest; strings are skipped.
pub(crate) fn check_cbor(bytes: &[u8]) -> Result<(), CodecError> {
    let mut cur = Cursor { bytes, at: 0 };
    let mut open = Open::new("cbor");
    while let Some(initial) = cur.byte() {
        let major = initial >> 5;
        let info = initial & 0x1f;
        let arg = match info {
            0..=23 => Some(u64::from(info)),
            24 => cur.uint(1),
            25 => cur.uint(2),
            26 => cur.uint(4),
            27 => cur.uint(8),
            31 => None,         // indefinite length, or a break
            _ => return Ok(()), // reserved: malformed, the parser says so
        };
        let done = match (major, arg) {
            // A break closes the innermost indefinite container.
            (7, None) => match open.stack.last() {
                Some(Left::UntilBreak) => {
                    open.stack.pop();
                    open.item_done()
                }
                _ => return Ok(()),
            },
            (0 | 1 | 7, Some(_)) => open.item_done(),
            (2 | 3, Some(len)) => {
                if cur.skip(len).is_none() {
                    return Ok(());
                }
                open.item_done()
            }
            // Indefinite strings are chunks of definite strings, then a break: one level.
            (2 | 3, None) | (4 | 5, None) => open.open(Left::UntilBreak)?,
            (4, Some(n)) => open.open(Left::Items(n))?,
            (5, Some(n)) => open.open(Left::Items(n.saturating_mul(2)))?,
            // A tag wraps the next item: one level.
            (6, Some(_)) => open.open(Left::Items(1))?,
            _ => return Ok(()),
        };
        if done {
            // Trailing bytes are the parser's business.
            return Ok(());
        }
    }
    Ok(())
}

/// MessagePack: arrays and maps nest; strings, binaries and extensions are skipped.
pub(crate) fn check_msgpack(bytes: &[u8]) -> Result<(), CodecError> {
    let mut cur = Cursor { bytes, at: 0 };
    let mut open = Open::new("msgpack");
    while let Some(b) = cur.byte() {
        // (bytes to skip, container items)
        let (skip, items) = match b {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (Some(0), None),
            0x80..=0x8f => (Some(0), Some(u64::from(b & 0x0f) * 2)),
            0x90..=0x9f => (Some(0), Some(u64::from(b & 0x0f))),
            0xa0..=0xbf => (Some(u64::from(b & 0x1f)), None),
            0xc1 => return Ok(()), // never used: the parser rejects it
            0xc4 | 0xd9 => (cur.uint(1), None),
            0xc5 | 0xda => (cur.uint(2), None),
            0xc6 | 0xdb => (cur.uint(4), None),
            0xc7 => (cur.uint(1).map(|n| n + 1), None),
            0xc8 => (cur.uint(2).map(|n| n + 1), None),
            0xc9 => (cur.uint(4).map(|n| n + 1), None),
            0xca => (Some(4), None),
            0xcb => (Some(8), None),
            0xcc | 0xd0 => (Some(1), None),
            0xcd | 0xd1 => (Some(2), None),
            0xce | 0xd2 => (Some(4), None),
            0xcf | 0xd3 => (Some(8), None),
            0xd4 => (Some(2), None),
            0xd5 => (Some(3), None),
            0xd6 => (Some(5), None),
            0xd7 => (Some(9), None),
            0xd8 => (Some(17), None),
            0xdc..=0xdf => {
                let width = if b & 1 == 0 { 2 } else { 4 };
                let Some(n) = cur.uint(width) else {
                    return Ok(());
                };
                (
                    Some(0),
                    Some(if b >= 0xde { n.saturating_mul(2) } else { n }),
                )
            }
        };
        let Some(skip) = skip else { return Ok(()) };
        if cur.skip(skip).is_none() {
            return Ok(());
        }
        let done = match items {
            Some(n) => open.open(Left::Items(n))?,
            None => open.item_done(),
        };
        if done {
            return Ok(());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(head: &[u8], n: usize, leaf: &[u8]) -> Vec<u8> {
        let mut v = head.repeat(n);
        v.extend_from_slice(leaf);
        v
    }

    #[test]
    fn json_limit_matches_serde_json() {
        for n in [MAX_DEPTH - 1, MAX_DEPTH, 100_000] {
            let text = format!("{}{}", "[".repeat(n), "]".repeat(n));
            let ours = check_json(text.as_bytes()).is_ok();
            let serde = serde_json::from_str::<serde_json::Value>(&text).is_ok();
            assert_eq!(ours, serde, "depth {n}");
            assert_eq!(ours, n < MAX_DEPTH, "depth {n}");
        }
        // Brackets inside strings (escaped quotes included) do not count.
        let s = format!(r#"["\"{}"]"#, "[".repeat(1000));
        assert!(check_json(s.as_bytes()).is_ok());
    }

    #[test]
    fn cbor_and_msgpack_count_arrays_maps_and_tags() {
        let ok = MAX_DEPTH - 1;
        for (what, head, check) in [
            ("cbor array", &[0x81u8][..], check_cbor as fn(&[u8]) -> _),
            ("cbor map", &[0xa1, 0x00][..], check_cbor),
            ("cbor tag", &[0xc6][..], check_cbor),
            ("cbor indefinite", &[0x9f][..], check_cbor),
            ("msgpack array", &[0x91][..], check_msgpack),
            ("msgpack map", &[0x81, 0x00][..], check_msgpack),
            ("msgpack array16", &[0xdc, 0, 1][..], check_msgpack),
        ] {
            assert!(check(&nested(head, ok, &[0])).is_ok(), "{what} {ok}");
            let err = check(&nested(head, MAX_DEPTH, &[0])).unwrap_err();
            assert_eq!(err.kind(), CodecErrorKind::Corrupt, "{what}");
            assert!(check(&nested(head, 1_000_000, &[0])).is_err(), "{what}");
        }
        // Siblings do not add up: 1000 arrays side by side, each 100 deep.
        let mut wide = vec![0x99, 0x03, 0xe8]; // cbor array of 1000
        for _ in 0..1000 {
            wide.extend(nested(&[0x81], 100, &[0]));
        }
        assert!(check_cbor(&wide).is_ok());
        let mut wide = vec![0xdc, 0x03, 0xe8]; // msgpack array16 of 1000
        for _ in 0..1000 {
            wide.extend(nested(&[0x91], 100, &[0]));
        }
        assert!(check_msgpack(&wide).is_ok());
    }

    #[test]
    fn scanners_skip_string_bodies_and_survive_truncation() {
        // A byte string whose body looks like deep nesting.
        let mut cbor = vec![0x5a, 0, 0x01, 0, 0]; // bytes(65536)
        cbor.extend(vec![0x81; 65536]);
        assert!(check_cbor(&cbor).is_ok());
        let mut mp = vec![0xc6, 0, 0x01, 0, 0]; // bin32(65536)
        mp.extend(vec![0x91; 65536]);
        assert!(check_msgpack(&mp).is_ok());
        // Truncated or lying lengths end the scan without panicking.
        for bytes in [
            &[0x5b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff][..],
            &[0x9b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x81][..],
            &[0x1b][..],
            &[],
        ] {
            assert!(check_cbor(bytes).is_ok());
        }
        for bytes in [
            &[0xdd, 0xff][..],
            &[0xc6, 0xff, 0xff, 0xff, 0xff][..],
            &[0xdf][..],
        ] {
            assert!(check_msgpack(bytes).is_ok());
        }
    }
}
