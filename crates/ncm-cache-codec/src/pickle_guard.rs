//! A pre-scan of pickle opcodes that rejects what would hurt serde-pickle.
//!
//! serde-pickle builds a value tree by running the pickle stack machine, then hands it to
//! serde. Two hostile shapes make that dangerous, and this guard rejects both before
//! serde-pickle runs, in one linear pass that allocates only per stack item:
//!
//! - **depth**: a few bytes per level build lists nested 100,000 deep; serde (and dropping the
//!   tree) then recurse once per level and overflow the stack, which aborts the process.
//!   Nesting is capped at [`MAX_DEPTH`], like serde_json's recursion limit.
//! - **memo amplification**: a memoized object referenced twice by a two-byte `BINGET`, built
//!   into a list that is memoized and referenced twice again, doubles per step; serde-pickle
//!   copies every reference, so 40 steps ask for 2⁴⁰ nodes. The guard computes the expanded
//!   size (16 per node plus string/byte lengths) and rejects pickles whose expansion passes
//!   `max(budget, 16 × input length)` — an ordinary pickle never expands more than that.
//!
//! To keep the expansion exact, an object may not be changed after it was referenced (that
//! only happens in recursive structures, which serde-pickle cannot decode anyway).
//!
//! The guard does not decide what is valid pickle: unknown opcodes and truncated arguments are
//! errors here, everything else is left to serde-pickle. It runs no code: it only reads opcodes.

use std::collections::HashMap;

use ncm_cache_core::{CodecError, CodecErrorKind};

/// The deepest nesting of containers accepted.
pub(crate) const MAX_DEPTH: u32 = 128;

/// Expansion weight of one node.
const NODE: u64 = 16;

/// A stack slot: a value (its expanded weight and depth) or a reference to a memo entry.
#[derive(Clone, Copy)]
enum Item {
    Val { weight: u64, depth: u32 },
    Ref(u32),
}

#[derive(Clone, Copy)]
struct Memo {
    weight: u64,
    depth: u32,
    /// A reference to it has been copied into another value: it may not change any more.
    shared: bool,
}

struct Guard<'a> {
    input: &'a [u8],
    pos: usize,
    budget: u64,
    stack: Vec<Item>,
    /// Stack positions of the open MARKs (one flat stack: no allocation per MARK).
    marks: Vec<usize>,
    memo: HashMap<u32, Memo>,
    /// Total weight of the eager copies made so far.
    copied: u64,
}

/// Checks `input` (a pickle) for excessive nesting and memo amplification.
pub(crate) fn check(input: &[u8], budget: u64) -> Result<(), CodecError> {
    let len = u64::try_from(input.len()).unwrap_or(u64::MAX);
    let mut guard = Guard {
        input,
        pos: 0,
        budget: budget.max(len.saturating_mul(NODE)),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        copied: 0,
    };
    guard.run()
}

fn error(kind: CodecErrorKind, message: impl Into<String>) -> CodecError {
    CodecError::new(kind, "pickle", message)
}

impl Guard<'_> {
    fn run(&mut self) -> Result<(), CodecError> {
        loop {
            let op = self.take(1)?[0];
            match op {
                b'.' => return Ok(()),                     // STOP
                b'(' => self.marks.push(self.stack.len()), // MARK
                b'0' => {
                    // POP (an empty stack pops the mark, as in Python and serde-pickle)
                    if self.stack.len() == self.floor() {
                        self.pop_mark()?;
                    } else {
                        self.pop()?;
                    }
                }
                b'1' => {
                    // POP_MARK
                    let start = self.pop_mark()?;
                    self.stack.truncate(start);
                }
                b'2' => {
                    // DUP: serde-pickle pushes a deep copy of the top (resolved)
                    let top = self.pop()?;
                    let (weight, depth) = Self::resolve(&mut self.memo, top)?;
                    self.copy(weight)?;
                    self.stack.extend([top, Item::Val { weight, depth }]);
                }
                // Scalars with fixed-size arguments.
                b'N' | 0x88 | 0x89 => self.scalar(0), // NONE, NEWTRUE, NEWFALSE
                b'K' => self.skip_scalar(1)?,         // BININT1
                b'M' => self.skip_scalar(2)?,         // BININT2
                b'J' => self.skip_scalar(4)?,         // BININT
                b'G' => self.skip_scalar(8)?,         // BINFLOAT
                b'F' | b'I' | b'L' | b'S' | b'V' | b'P' => {
                    // FLOAT, INT, LONG, STRING, UNICODE, PERSID: newline-terminated
                    let n = self.line()?.len();
                    self.scalar(n);
                }
                // Length-prefixed scalars.
                0x8a | b'U' | b'C' | 0x8c => {
                    // LONG1, SHORT_BINSTRING, SHORT_BINBYTES, SHORT_BINUNICODE
                    let n = self.take(1)?[0].into();
                    self.skip_scalar(n)?;
                }
                0x8b | b'T' | b'X' | b'B' => {
                    // LONG4, BINSTRING, BINUNICODE, BINBYTES
                    let n = self.u32()?.into();
                    self.skip_scalar(n)?;
                }
                0x8d | 0x8e | 0x96 => {
                    // BINUNICODE8, BINBYTES8, BYTEARRAY8
                    let n = self.u64()?;
                    self.skip_scalar(n)?;
                }
                b'c' | b'i' => {
                    // GLOBAL, INST: module and name lines
                    let n = self.line()?.len() + self.line()?.len();
                    if op == b'i' {
                        let start = self.pop_mark()?;
                        self.push_container(start, n)?;
                    } else {
                        self.scalar(n);
                    }
                }
                0x93 => {
                    // STACK_GLOBAL
                    let start = self.top_n(2)?;
                    self.push_container(start, 0)?;
                }
                0x82 => self.skip_scalar(1)?, // EXT1
                0x83 => self.skip_scalar(2)?, // EXT2
                0x84 => self.skip_scalar(4)?, // EXT4
                0x97 => self.scalar(0),       // NEXT_BUFFER
                0x98 => {}                    // READONLY_BUFFER
                0x80 => drop(self.take(1)?),  // PROTO
                0x95 => drop(self.u64()?),    // FRAME
                b'Q' => {
                    // BINPERSID
                    let start = self.top_n(1)?;
                    self.push_container(start, 0)?;
                }
                // Containers.
                b']' | b'}' | b')' | 0x8f => self.push_container(self.stack.len(), 0)?,
                b'l' | b't' | b'd' | 0x91 | b'o' => {
                    // LIST, TUPLE, DICT, FROZENSET, OBJ
                    let start = self.pop_mark()?;
                    self.push_container(start, 0)?;
                }
                0x85..=0x87 => {
                    // TUPLE1..TUPLE3
                    let start = self.top_n(usize::from(op - 0x84))?;
                    self.push_container(start, 0)?;
                }
                b'R' | 0x81 => {
                    // REDUCE, NEWOBJ: callable/class and arguments
                    let start = self.top_n(2)?;
                    self.push_container(start, 0)?;
                }
                0x92 => {
                    // NEWOBJ_EX
                    let start = self.top_n(3)?;
                    self.push_container(start, 0)?;
                }
                // Changes to the value on top of the stack.
                b'a' | b'b' => {
                    // APPEND, BUILD
                    let start = self.top_n(1)?;
                    self.extend_top(start)?;
                }
                b's' => {
                    // SETITEM
                    let start = self.top_n(2)?;
                    self.extend_top(start)?;
                }
                b'e' | b'u' | 0x90 => {
                    // APPENDS, SETITEMS, ADDITEMS
                    let start = self.pop_mark()?;
                    self.extend_top(start)?;
                }
                // The memo.
                b'p' => {
                    let id = self.ascii_id()?;
                    self.memoize(id)?;
                }
                b'q' => {
                    let id = self.take(1)?[0].into();
                    self.memoize(id)?;
                }
                b'r' => {
                    let id = self.u32()?;
                    self.memoize(id)?;
                }
                0x94 => {
                    let id = u32::try_from(self.memo.len()).unwrap_or(u32::MAX);
                    self.memoize(id)?;
                }
                b'g' => {
                    let id = self.ascii_id()?;
                    self.get(id)?;
                }
                b'h' => {
                    let id = self.take(1)?[0].into();
                    self.get(id)?;
                }
                b'j' => {
                    let id = self.u32()?;
                    self.get(id)?;
                }
                other => {
                    return Err(error(
                        CodecErrorKind::Decode,
                        format!(
                            "unknown pickle opcode 0x{other:02x} at offset {}",
                            self.pos - 1
                        ),
                    ));
                }
            }
        }
    }

    fn take(&mut self, n: usize) -> Result<&[u8], CodecError> {
        match self.input.get(self.pos..).and_then(|rest| rest.get(..n)) {
            Some(bytes) => {
                self.pos += n;
                Ok(bytes)
            }
            None => Err(error(CodecErrorKind::Decode, "truncated pickle")),
        }
    }

    fn u32(&mut self) -> Result<u32, CodecError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, CodecError> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes([
            b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
        ]))
    }

    fn line(&mut self) -> Result<&[u8], CodecError> {
        let rest = self.input.get(self.pos..).unwrap_or_default();
        match rest.iter().position(|&b| b == b'\n') {
            Some(n) => {
                self.pos += n + 1;
                Ok(&rest[..n])
            }
            None => Err(error(
                CodecErrorKind::Decode,
                "truncated pickle (no newline)",
            )),
        }
    }

    fn ascii_id(&mut self) -> Result<u32, CodecError> {
        let line = self.line()?;
        std::str::from_utf8(line)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| error(CodecErrorKind::Decode, "invalid memo id"))
    }

    fn scalar(&mut self, len: usize) {
        let weight = NODE.saturating_add(u64::try_from(len).unwrap_or(u64::MAX));
        self.stack.push(Item::Val { weight, depth: 0 });
    }

    /// A scalar whose `len` argument bytes follow the opcode.
    fn skip_scalar(&mut self, len: u64) -> Result<(), CodecError> {
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        self.take(len)?;
        self.scalar(len);
        Ok(())
    }

    /// Where the current MARK's items start (serde-pickle never pops across a MARK).
    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn underflow() -> CodecError {
        error(CodecErrorKind::Decode, "pickle stack underflow")
    }

    fn pop(&mut self) -> Result<Item, CodecError> {
        if self.stack.len() <= self.floor() {
            return Err(Self::underflow());
        }
        self.stack.pop().ok_or_else(Self::underflow)
    }

    /// The start of the top `n` items (an opcode's operands).
    fn top_n(&self, n: usize) -> Result<usize, CodecError> {
        match self.stack.len().checked_sub(n) {
            Some(start) if start >= self.floor() => Ok(start),
            _ => Err(Self::underflow()),
        }
    }

    /// Closes the innermost MARK; its items are `stack[start..]`.
    fn pop_mark(&mut self) -> Result<usize, CodecError> {
        self.marks
            .pop()
            .ok_or_else(|| error(CodecErrorKind::Decode, "pickle mark stack underflow"))
    }

    /// The weight and depth of an item that is copied into another value.
    fn resolve(memo: &mut HashMap<u32, Memo>, item: Item) -> Result<(u64, u32), CodecError> {
        match item {
            Item::Val { weight, depth } => Ok((weight, depth)),
            Item::Ref(id) => match memo.get_mut(&id) {
                Some(memo) => {
                    memo.shared = true;
                    Ok((memo.weight, memo.depth))
                }
                None => Err(error(CodecErrorKind::Decode, format!("missing memo {id}"))),
            },
        }
    }

    /// Removes `stack[start..]`, returning their total weight and greatest depth.
    fn take_from(&mut self, start: usize) -> Result<(u64, u32), CodecError> {
        let mut weight = 0u64;
        let mut depth = 0;
        for &item in self.stack.get(start..).unwrap_or_default() {
            let (w, d) = Self::resolve(&mut self.memo, item)?;
            weight = weight.saturating_add(w);
            depth = depth.max(d);
        }
        self.stack.truncate(start);
        Ok((weight, depth))
    }

    /// Counts an eager deep copy made while parsing (DUP, memoizing a reference).
    fn copy(&mut self, weight: u64) -> Result<(), CodecError> {
        self.copied = self.copied.saturating_add(weight);
        self.check(self.copied, 0)
    }

    fn check(&self, weight: u64, depth: u32) -> Result<(), CodecError> {
        if depth > MAX_DEPTH {
            return Err(error(
                CodecErrorKind::Decode,
                format!("pickle nests deeper than {MAX_DEPTH} levels"),
            ));
        }
        if weight > self.budget {
            return Err(error(
                CodecErrorKind::TooLarge,
                format!(
                    "pickle expands past {} bytes through shared references",
                    self.budget
                ),
            ));
        }
        Ok(())
    }

    /// Replaces `stack[start..]` by one container holding them.
    fn push_container(&mut self, start: usize, extra: usize) -> Result<(), CodecError> {
        let (children, depth) = self.take_from(start)?;
        let weight = NODE
            .saturating_add(u64::try_from(extra).unwrap_or(u64::MAX))
            .saturating_add(children);
        let depth = depth + 1;
        self.check(weight, depth)?;
        self.stack.push(Item::Val { weight, depth });
        Ok(())
    }

    /// Moves `stack[start..]` into the value below them (APPEND, SETITEM, BUILD, ...).
    fn extend_top(&mut self, start: usize) -> Result<(), CodecError> {
        let (add, child_depth) = self.take_from(start)?;
        if self.stack.len() <= self.floor() {
            return Err(Self::underflow());
        }
        let (weight, depth) = match self.stack.last_mut() {
            Some(Item::Val { weight, depth }) => {
                *weight = weight.saturating_add(add);
                *depth = (*depth).max(child_depth + 1);
                (*weight, *depth)
            }
            Some(Item::Ref(id)) => match self.memo.get_mut(id) {
                Some(memo) if memo.shared => {
                    return Err(error(
                        CodecErrorKind::Decode,
                        "pickle changes an object after referencing it (recursive structure)",
                    ));
                }
                Some(memo) => {
                    memo.weight = memo.weight.saturating_add(add);
                    memo.depth = memo.depth.max(child_depth + 1);
                    (memo.weight, memo.depth)
                }
                None => return Err(error(CodecErrorKind::Decode, "missing memo")),
            },
            None => return Err(Self::underflow()),
        };
        self.check(weight, depth)
    }

    fn memoize(&mut self, id: u32) -> Result<(), CodecError> {
        let top = self.pop()?;
        let (weight, depth) = Self::resolve(&mut self.memo, top)?;
        let shared = matches!(top, Item::Ref(_));
        if shared {
            self.copy(weight)?;
        }
        self.memo.insert(
            id,
            Memo {
                weight,
                depth,
                shared,
            },
        );
        self.stack.push(Item::Ref(id));
        Ok(())
    }

    fn get(&mut self, id: u32) -> Result<(), CodecError> {
        if !self.memo.contains_key(&id) {
            return Err(error(CodecErrorKind::Decode, format!("missing memo {id}")));
        }
        self.stack.push(Item::Ref(id));
        Ok(())
    }
}
