//! The read batches' own connection (`RedisConfig::batch_socket`, on by default): on a single
//! node over plain TCP, each batch of reads (one `GET` or `MGET`) is written on a socket of its
//! own and answered by one reader task, instead of going through a redis-rs multiplexed
//! connection, whose request channel, driver task and parsing into `Value`s were most of what
//! kept batching from the throughput a socket allows (docs/BENCHMARKS.md, issue 21). Writes
//! stay on the pool's connections: a write whose call timed out may still land, and calls
//! made after it (a delete that cleans it up) must not overtake it on another connection.
//!
//! What it keeps:
//! - **Replies reach the batch they answer.** One socket, one queue of batches waiting in the
//!   order they were written; the reader hands each reply to the oldest.
//! - **A timeout fails its own batch.** A batch not answered within `response_timeout` gets
//!   `Timeout`; its replies, should they come, are read and dropped. The connection ends only
//!   when the server has also sent nothing for that long (stalled, or the connection silently
//!   gone), the oldest batch still owed replies was sent over twice that long ago, or bytes
//!   are still unwritten.
//! - **Any other doubt ends the connection.** A reply that cannot be parsed or that no batch
//!   waits for, a read or write error, a socket that does not drain, the server closing: the
//!   connection ends, its socket is shut down, every batch waiting on it gets that error at
//!   once, and no later byte of it is read. The next batch connects again (`connect_timeout`,
//!   then `AUTH` and `SELECT` as configured, `CLIENT SETNAME` and a `PING`, answered within
//!   `response_timeout`; a refusal of the last two is an answer too). After a connect that
//!   failed, the next waits 5 ms, doubling to 100 ms, and batches meanwhile get its error.
//! - **Bounded.** A write to the socket and every reply are bounded by `response_timeout`, the
//!   TCP connect by `connect_timeout`.
//!
//! It speaks RESP2 and is used only where the pool's connections would be plain TCP to one
//! server: TLS, Sentinel and Cluster keep redis-rs's connections (see `Batcher::new`).

use std::collections::VecDeque;
use std::io::Write as _;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use ncm_cache_core::{Bytes, CacheError, Operation, Result};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::oneshot;

use crate::backend::Inner;
use crate::config::RedisConfig;

/// The client name of a batch connection (`CLIENT LIST` shows it).
pub(crate) const NAME: &str = "ncm-cache-batches";
/// Bytes the reader asks the socket for at least, per read.
const READ_CHUNK: usize = 64 * 1024;
/// Longest bulk string the parser accepts (Redis refuses values over 512 MiB by default).
const MAX_BULK: usize = (u32::MAX >> 1) as usize;
/// Longest header line (`$123\r\n`, `-ERR …\r\n`) the parser waits for before giving up.
const MAX_LINE: usize = 64 * 1024;

/// One reply of `GET`, `MGET`, `AUTH`, `SELECT` or `CLIENT` (an array holds no arrays).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Reply {
    Nil,
    Bulk(Bytes),
    /// A status (`+OK`).
    Status,
    Int(i64),
    /// An error reply, as Redis sent it (without `-` and CRLF).
    Error(String),
    Array(Vec<Reply>),
}

impl Reply {
    /// This reply as a string value (`GET`, or one value of an `MGET`).
    pub(crate) fn into_value(self, op: &'static str, timeout: Duration) -> Result<Option<Bytes>> {
        match self {
            Self::Nil => Ok(None),
            Self::Bulk(b) => Ok(Some(b)),
            Self::Error(e) => Err(server_error(&e, op, timeout)),
            other => Err(CacheError::Backend {
                message: format!("{op}: Redis answered {other:?} where a string was expected"),
                source: None,
            }),
        }
    }
}

/// An error reply as the error redis-rs would have made of it (so that `NOPERM`, `READONLY`,
/// `LOADING`… map as they do on the pool's connections).
pub(crate) fn server_error(line: &str, op: &'static str, timeout: Duration) -> CacheError {
    let mut raw = Vec::with_capacity(line.len() + 3);
    raw.push(b'-');
    raw.extend_from_slice(line.as_bytes());
    raw.extend_from_slice(b"\r\n");
    match redis::parse_redis_value(&raw) {
        Ok(redis::Value::ServerError(e)) => crate::error::map_err(op, e.into(), timeout),
        Err(e) => crate::error::map_err(op, e, timeout),
        Ok(_) => CacheError::Backend {
            message: format!("{op}: {line}"),
            source: None,
        },
    }
}

/// Appends one command (a RESP array of bulk strings) to `out`.
pub(crate) fn command(out: &mut Vec<u8>, args: &[&[u8]]) {
    header(out, args.len());
    for a in args {
        arg(out, a);
    }
}

/// Appends the header of a command of `n` arguments.
pub(crate) fn header(out: &mut Vec<u8>, n: usize) {
    // Writing to a `Vec` cannot fail.
    let _ = write!(out, "*{n}\r\n");
}

/// Appends one argument.
pub(crate) fn arg(out: &mut Vec<u8>, a: &[u8]) {
    let _ = write!(out, "${}\r\n", a.len());
    out.extend_from_slice(a);
    out.extend_from_slice(b"\r\n");
}

/// What the parser found at the front of its buffer.
enum Item {
    Value(Reply),
    /// The header of an array of this many elements.
    Array(usize),
}

/// An incremental RESP parser: bytes in, whole replies out.
#[derive(Default)]
struct Parser {
    buf: BytesMut,
    /// The array being read: its length and the elements read so far.
    array: Option<(usize, Vec<Reply>)>,
}

impl Parser {
    /// The next whole reply, `None` until its bytes have all arrived.
    fn next(&mut self) -> std::result::Result<Option<Reply>, String> {
        loop {
            let Some(item) = self.item()? else {
                return Ok(None);
            };
            let value = match item {
                Item::Value(v) => v,
                Item::Array(_) if self.array.is_some() => {
                    return Err("an array inside an array".into());
                }
                Item::Array(0) => Reply::Array(Vec::new()),
                Item::Array(n) => {
                    self.array = Some((n, Vec::with_capacity(n.min(1024))));
                    continue;
                }
            };
            let Some((n, values)) = self.array.as_mut() else {
                return Ok(Some(value));
            };
            values.push(value);
            if values.len() == *n {
                let values = self.array.take().map(|(_, v)| v).unwrap_or_default();
                return Ok(Some(Reply::Array(values)));
            }
        }
    }

    /// The item at the front of the buffer, consumed; `None` (nothing consumed) until it has
    /// all arrived.
    fn item(&mut self) -> std::result::Result<Option<Item>, String> {
        let buf = &self.buf[..];
        let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
            if buf.len() > MAX_LINE {
                return Err(format!("a reply line longer than {MAX_LINE} bytes"));
            }
            return Ok(None);
        };
        if nl < 2 || buf[nl - 1] != b'\r' {
            return Err("a reply line not ended by CRLF".into());
        }
        let line = &buf[1..nl - 1];
        let number = || {
            std::str::from_utf8(line)
                .ok()
                .and_then(|s| s.parse::<i64>().ok())
                .ok_or_else(|| format!("a malformed length {:?}", String::from_utf8_lossy(line)))
        };
        let after = nl + 1;
        let item = match buf[0] {
            b'+' => Item::Value(Reply::Status),
            b'-' => Item::Value(Reply::Error(String::from_utf8_lossy(line).into_owned())),
            b':' => Item::Value(Reply::Int(number()?)),
            // RESP3's null, should a server send it.
            b'_' => Item::Value(Reply::Nil),
            b'*' => match usize::try_from(number()?) {
                Ok(n) => Item::Array(n),
                Err(_) => Item::Value(Reply::Nil),
            },
            b'$' => {
                let Ok(len) = usize::try_from(number()?) else {
                    self.buf.advance(after);
                    return Ok(Some(Item::Value(Reply::Nil)));
                };
                if len > MAX_BULK {
                    return Err(format!("a bulk string of {len} bytes"));
                }
                let end = after + len;
                if buf.len() < end + 2 {
                    // Room for more of the value (up to 64 MiB at a time), read in as few
                    // calls as it takes.
                    self.buf.reserve((end + 2 - buf.len()).min(1 << 26));
                    return Ok(None);
                }
                if &buf[end..end + 2] != b"\r\n" {
                    return Err("a bulk string not ended by CRLF".into());
                }
                // Copied: a slice of the read buffer would keep the whole buffer alive for as
                // long as the value is cached.
                let value = Bytes::copy_from_slice(&buf[after..end]);
                self.buf.advance(end + 2);
                return Ok(Some(Item::Value(Reply::Bulk(value))));
            }
            other => return Err(format!("an unknown reply type {:?}", char::from(other))),
        };
        self.buf.advance(after);
        Ok(Some(item))
    }
}

/// A batch waiting for its replies.
struct Pending {
    /// When it was queued (see [`ask`]).
    sent: tokio::time::Instant,
    left: usize,
    replies: Vec<Reply>,
    tx: oneshot::Sender<Result<Vec<Reply>>>,
}

#[derive(Default)]
struct Waiting {
    queue: VecDeque<Pending>,
    /// Bytes of batches written after the socket's buffer filled up, in order; a flusher task
    /// writes them as the socket drains.
    outbox: BytesMut,
    /// Why the connection ended, once it has.
    ended: Option<CacheError>,
}

/// One connection: its write half, the batches waiting for replies, its reader task.
///
/// Nothing is held across an `await` by a sender: a batch is queued and written (as far as
/// the socket takes it at once) under one short lock, and what the socket does not take is
/// written by a flusher task. So a caller's future that is polled once and then left (a lone
/// read is sent from its caller's future) holds no lock and cannot cut a command in half.
pub(crate) struct Link {
    write: OwnedWriteHalf,
    waiting: Mutex<Waiting>,
    reader: Mutex<Option<tokio::task::AbortHandle>>,
    runtime: tokio::runtime::Handle,
    /// How long the socket may take to drain a batch (`response_timeout`).
    timeout: Duration,
    /// When the reader last got bytes, in ms since `born` (see [`ask`]).
    last_read: std::sync::atomic::AtomicU64,
    born: tokio::time::Instant,
}

/// Ends its link when dropped armed (a reader or flusher task dropped unfinished).
struct EndOnDrop(Option<Arc<Link>>, &'static str);

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        if let Some(link) = self.0.take() {
            link.end(CacheError::connection(
                format!("the batch connection ended: {}; retry", self.1),
                None,
            ));
        }
    }
}

impl Link {
    fn waiting(&self) -> MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn is_ended(&self) -> bool {
        self.waiting().ended.is_some()
    }

    /// Ends the connection: every waiting batch (and any later one) gets `why`, and its reader
    /// stops (the socket closes once the last holder of the link lets go of it).
    pub(crate) fn end(&self, why: CacheError) {
        self.end_locked(self.waiting(), why);
    }

    /// [`end`](Self::end) with the lock already held: marked ended before any other sender
    /// can write (a command cut short must not be completed by another batch's bytes).
    fn end_locked(&self, mut w: MutexGuard<'_, Waiting>, why: CacheError) {
        if w.ended.is_some() {
            return;
        }
        w.ended = Some(why.clone());
        w.outbox = BytesMut::new();
        let queue = std::mem::take(&mut w.queue);
        drop(w);
        // Closed both ways now: the server lets the connection go, and nothing more is read.
        let _ = socket2::SockRef::from(self.write.as_ref()).shutdown(std::net::Shutdown::Both);
        for p in queue {
            let _ = p.tx.send(Err(why.clone()));
        }
        let reader = self
            .reader
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(reader) = reader {
            reader.abort();
        }
    }

    /// Notes that the server sent something.
    fn heard(&self) {
        let ms = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_read
            .store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the server has sent nothing for `for_at_least`.
    fn silent(&self, for_at_least: Duration) -> bool {
        let last = Duration::from_millis(self.last_read.load(std::sync::atomic::Ordering::Relaxed));
        self.born.elapsed().saturating_sub(last) >= for_at_least
    }

    /// Hands `reply` to the oldest waiting batch.
    fn answer(&self, reply: Reply) -> std::result::Result<(), String> {
        let mut w = self.waiting();
        let Some(head) = w.queue.front_mut() else {
            // Such as Redis refusing the connection on accept (`max number of clients
            // reached`, protected mode): its text is what the callers need to see.
            return Err(match reply {
                Reply::Error(e) => format!("an error no batch waited for: {e}"),
                _ => "a reply no batch waited for".into(),
            });
        };
        head.replies.push(reply);
        head.left = head.left.saturating_sub(1);
        if head.left == 0
            && let Some(done) = w.queue.pop_front()
        {
            drop(w);
            let _ = done.tx.send(Ok(done.replies));
        }
        Ok(())
    }

    /// An error reply the oldest waiting batch got, if any (the server's reason before it
    /// closed the connection).
    fn error_heard(&self) -> Option<String> {
        let w = self.waiting();
        w.queue.front()?.replies.iter().find_map(|r| match r {
            Reply::Error(e) => Some(e.clone()),
            _ => None,
        })
    }

    /// Queues a batch of `replies` commands and writes `bytes`; its replies (or the error that
    /// ended the connection) arrive on the receiver.
    pub(crate) fn send(
        self: &Arc<Self>,
        bytes: &[u8],
        replies: usize,
    ) -> oneshot::Receiver<Result<Vec<Reply>>> {
        let (tx, rx) = oneshot::channel();
        let mut w = self.waiting();
        if let Some(why) = &w.ended {
            let _ = tx.send(Err(why.clone()));
            return rx;
        }
        w.queue.push_back(Pending {
            sent: tokio::time::Instant::now(),
            left: replies,
            replies: Vec::with_capacity(replies),
            tx,
        });
        if !w.outbox.is_empty() {
            // Behind what is still to be written (the flusher is at it).
            w.outbox.extend_from_slice(bytes);
            return rx;
        }
        let mut done = 0;
        let failed = loop {
            match self.write.try_write(&bytes[done..]) {
                Ok(0) => break Some(std::io::Error::from(std::io::ErrorKind::WriteZero)),
                Ok(n) => {
                    done += n;
                    if done == bytes.len() {
                        return rx;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break None,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break Some(e),
            }
        };
        if let Some(e) = failed {
            self.end_locked(
                w,
                CacheError::connection(format!("writing to Redis: {e}; retry"), Some(Box::new(e))),
            );
            return rx;
        }
        // The socket is full: the rest goes to the flusher.
        w.outbox.extend_from_slice(&bytes[done..]);
        drop(w);
        self.runtime.spawn(flush(Arc::clone(self)));
        rx
    }
}

/// Writes the outbox as the socket drains, until it is empty; a socket that does not drain
/// within the timeout ends the connection.
async fn flush(link: Arc<Link>) {
    let mut guard = EndOnDrop(Some(link), "its writer stopped");
    let Some(link) = guard.0.clone() else {
        return;
    };
    loop {
        match tokio::time::timeout(link.timeout, link.write.writable()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                guard.0 = None;
                return link.end(CacheError::connection(
                    format!("writing to Redis: {e}; retry"),
                    Some(Box::new(e)),
                ));
            }
            Err(_) => {
                guard.0 = None;
                return link.end(CacheError::Timeout {
                    operation: "write",
                    after: link.timeout,
                });
            }
        }
        let mut w = link.waiting();
        if w.ended.is_some() {
            guard.0 = None;
            return;
        }
        loop {
            match link.write.try_write(&w.outbox) {
                Ok(0) => {
                    guard.0 = None;
                    let closed = CacheError::connection("writing to Redis: closed; retry", None);
                    return link.end_locked(w, closed);
                }
                Ok(n) => {
                    w.outbox.advance(n);
                    if w.outbox.is_empty() {
                        // Done; the next full socket starts a new flusher.
                        w.outbox = BytesMut::new();
                        guard.0 = None;
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    guard.0 = None;
                    let failed = CacheError::connection(
                        format!("writing to Redis: {e}; retry"),
                        Some(Box::new(e)),
                    );
                    return link.end_locked(w, failed);
                }
            }
        }
    }
}

/// Reads replies and hands them to the waiting batches until the connection ends.
async fn read_replies(link: Arc<Link>, mut read: OwnedReadHalf) {
    // Dropped unfinished (aborted, or its runtime shut down): the connection ends.
    let guard = EndOnDrop(Some(link), "its reader stopped");
    let Some(link) = guard.0.as_ref() else {
        return;
    };
    let mut parser = Parser::default();
    loop {
        // A buffer grown for a large value is not kept for the connection's life.
        if parser.buf.capacity() > 16 * READ_CHUNK && parser.buf.len() < READ_CHUNK {
            parser.buf = BytesMut::from(&parser.buf[..]);
        }
        parser.buf.reserve(READ_CHUNK);
        match read.read_buf(&mut parser.buf).await {
            Ok(0) => {
                let why = match link.error_heard() {
                    Some(e) => format!("Redis closed the batch connection: {e}"),
                    None => "Redis closed the batch connection; retry".into(),
                };
                return link.end(CacheError::connection(why, None));
            }
            Err(e) => {
                return link.end(CacheError::connection(
                    format!("reading from Redis: {e}; retry"),
                    Some(Box::new(e)),
                ));
            }
            Ok(_) => link.heard(),
        }
        loop {
            let why = match parser.next() {
                Ok(None) => break,
                Ok(Some(reply)) => match link.answer(reply) {
                    Ok(()) => continue,
                    Err(why) => why,
                },
                Err(why) => why,
            };
            return link.end(CacheError::Backend {
                message: format!("Redis sent {why} on the batch connection; it was closed"),
                source: None,
            });
        }
    }
}

type Connecting = futures_util::future::Shared<oneshot::Receiver<Result<Arc<Link>>>>;

/// A state dropped or replaced while `Up` ends its connection (a backend dropped while its
/// connect ran, `close()`).
#[derive(Default)]
enum State {
    #[default]
    Down,
    /// A connect under way, in a task of its own (a caller's future polled once and left
    /// must not hold it up).
    Connecting(Connecting),
    Up(Arc<Link>),
}

impl Drop for State {
    fn drop(&mut self) {
        if let Self::Up(link) = self {
            link.end(CacheError::Closed);
        }
    }
}

/// Sets a wire's state back to `Down` when dropped armed.
struct ResetOnDrop(Option<std::sync::Weak<Mutex<State>>>);

impl Drop for ResetOnDrop {
    fn drop(&mut self) {
        if let Some(state) = self.0.take().and_then(|w| w.upgrade()) {
            *state.lock().unwrap_or_else(PoisonError::into_inner) = State::Down;
        }
    }
}

/// A connection made on demand (one connect at a time) and made again after it ended.
#[derive(Default)]
pub(crate) struct Wire {
    state: Arc<Mutex<State>>,
    /// After a failed connect, when the next may begin (review, helper-95 #2: a handshake
    /// that kept failing — a server still `LOADING`, at `maxclients`, refusing the user —
    /// made every batch open a new TCP connection, one right after another).
    backoff: Arc<Mutex<Backoff>>,
}

/// The shortest and longest wait between two failed connects.
const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_millis(100);

/// The failed connects' backoff: each failure doubles the wait (5 ms to 100 ms), a connect
/// made resets it. During the wait, batches get the last connect's error at once.
#[derive(Default)]
struct Backoff {
    wait: Duration,
    until: Option<(tokio::time::Instant, CacheError)>,
}

impl Backoff {
    fn failed(&mut self, e: &CacheError) {
        self.wait = (self.wait * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
        self.until = Some((tokio::time::Instant::now() + self.wait, e.clone()));
    }

    fn made(&mut self) {
        *self = Self::default();
    }

    /// The last connect's error while the wait lasts.
    fn waiting(&self) -> Option<CacheError> {
        self.until
            .as_ref()
            .filter(|(until, _)| tokio::time::Instant::now() < *until)
            .map(|(_, e)| e.clone())
    }
}

impl Drop for Wire {
    fn drop(&mut self) {
        // Ends an `Up` connection (`State`'s drop).
        drop(std::mem::take(
            &mut *self.state.lock().unwrap_or_else(PoisonError::into_inner),
        ));
    }
}

impl Wire {
    /// Ends the connection (the backend was closed).
    pub(crate) fn close(&self) {
        // Ends an `Up` connection (`State`'s drop), out of the lock.
        let state = std::mem::take(&mut *self.state.lock().unwrap_or_else(PoisonError::into_inner));
        drop(state);
    }

    /// The connection, made now if there is none: waited for at most the connect, the
    /// handshake and the pool's check (see the bound below). The connect runs on `runtime`; `gone` is set when
    /// a connect task there was dropped (that runtime shut down). A health check
    /// (`past_backoff`) connects also while a failed connect's backoff lasts: it must not
    /// report that connect's error after the server came back (found by review, helper-97:
    /// the background check then said unhealthy until its next round, 30 s by default).
    pub(crate) async fn ready(
        &self,
        config: &RedisConfig,
        runtime: Option<tokio::runtime::Handle>,
        gone: &std::sync::atomic::AtomicBool,
        owner: &std::sync::Weak<Inner>,
        past_backoff: bool,
    ) -> Result<Arc<Link>> {
        use futures_util::FutureExt;
        let connecting = {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            match &*state {
                State::Up(link) if !link.is_ended() => return Ok(Arc::clone(link)),
                State::Connecting(c) => c.clone(),
                _ => {
                    if let Some(e) = self
                        .backoff
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .waiting()
                        .filter(|_| !past_backoff)
                    {
                        return Err(e);
                    }
                    let Some(runtime) =
                        runtime.or_else(|| tokio::runtime::Handle::try_current().ok())
                    else {
                        return Err(CacheError::connection(
                            "no tokio runtime to run the batch connection on",
                            None,
                        ));
                    };
                    let (tx, rx) = oneshot::channel();
                    let shared = rx.shared();
                    *state = State::Connecting(shared.clone());
                    let weak = Arc::downgrade(&self.state);
                    let owner = owner.clone();
                    let config = config.clone();
                    let rt = runtime.clone();
                    // Dropped before the connect ends (its runtime shut down, also before the
                    // task ran): the next call connects again instead of waiting on a connect
                    // that never ends.
                    let reset = ResetOnDrop(Some(weak.clone()));
                    let backoff = Arc::clone(&self.backoff);
                    let task = async move {
                        let mut reset = reset;
                        let made = connect(&config, rt).await;
                        {
                            let mut backoff =
                                backoff.lock().unwrap_or_else(PoisonError::into_inner);
                            match &made {
                                Ok(_) => backoff.made(),
                                Err(e) => backoff.failed(e),
                            }
                        }
                        // Every connect, the first included, checks the pool's connections
                        // before any batch goes on: Redis may have been away since the pool
                        // last spoke to it (the first batch connection can come after an
                        // outage the pool sat through idle), and calls that follow a read go
                        // on the pool (a `SET` after a read, a backplane's `PUBLISH`), which
                        // must not meet a dropped connection:
                        // `tracking.rs::after_a_server_restart_nothing_from_before_is_served_as_fresh`,
                        // `coherence.rs::a_write_after_an_outage_is_announced_without_waiting_out_the_backoff`.
                        if made.is_ok()
                            && let Some(owner) = owner.upgrade()
                        {
                            owner.conn.revive_pool(&owner.config).await;
                        }
                        reset.0 = None;
                        let installed = weak.upgrade().and_then(|state| {
                            let mut state = state.lock().unwrap_or_else(PoisonError::into_inner);
                            // The backend closed or dropped meanwhile: the new connection
                            // ends. (Checked under the lock: `close` marks the backend closed
                            // before it takes the state.)
                            if owner.upgrade().is_none_or(|o| o.is_closed()) {
                                return None;
                            }
                            let next = match &made {
                                Ok(link) => State::Up(Arc::clone(link)),
                                Err(_) => State::Down,
                            };
                            // The state replaced (`Connecting`) ends no connection.
                            Some(std::mem::replace(&mut *state, next))
                        });
                        if installed.is_none() {
                            if let Ok(link) = made {
                                link.end(CacheError::Closed);
                            }
                            let _ = tx.send(Err(CacheError::Closed));
                            return;
                        }
                        drop(installed);
                        let _ = tx.send(made);
                    };
                    // Spawned with the lock released: on a runtime that has shut down, the
                    // task is dropped within `spawn`, and its `ResetOnDrop` takes the lock.
                    drop(state);
                    drop(runtime.spawn(task));
                    shared
                }
            }
        };
        // The connect, the handshake (twice for the `AUTH` fallback) and the pool's check (`Conn::revive_pool`).
        // (The pool's check asks each connection at most twice, each within
        // `connect_timeout + response_timeout`: review, helper-94 #5.)
        let bound = config.connect_timeout * 3 + config.response_timeout * 4;
        match tokio::time::timeout(bound, connecting).await {
            Ok(Ok(made)) => made,
            Ok(Err(_)) => {
                // Its task was dropped: the runtime it was spawned on has shut down, and later
                // batch work runs on its callers' runtimes.
                gone.store(true, std::sync::atomic::Ordering::Release);
                Err(CacheError::connection(
                    "the batch connection's connect was dropped (its runtime shut down); retry",
                    None,
                ))
            }
            Err(_) => Err(CacheError::Timeout {
                operation: "connect",
                after: bound,
            }),
        }
    }
}

/// Sends `bytes` (`replies` commands) on `link` and waits for the replies, at most
/// `response_timeout` (see the module's text for when the connection then ends).
pub(crate) async fn ask(
    link: &Arc<Link>,
    op: &'static str,
    bytes: &[u8],
    replies: usize,
) -> Result<Vec<Reply>> {
    let rx = link.send(bytes, replies);
    match tokio::time::timeout(link.timeout, rx).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Err(CacheError::connection(
            "the batch connection ended; retry",
            None,
        )),
        Err(_) => {
            let e = CacheError::Timeout {
                operation: op,
                after: link.timeout,
            };
            // A reply slower than the bound (a large value, a slow command ahead of it) fails
            // only its batch, whose replies are then read and dropped. The connection ends
            // instead when the server has sent nothing for that long (stalled or gone), when
            // the oldest batch still owed replies was sent over twice that long ago (the
            // server falls behind: a backlog would only grow), or when bytes are still
            // unwritten (a socket not draining).
            let (behind, unwritten) = {
                let w = link.waiting();
                let oldest = w.queue.front().map(|p| p.sent.elapsed());
                (
                    oldest.is_some_and(|age| age >= link.timeout * 2),
                    !w.outbox.is_empty(),
                )
            };
            if behind || unwritten || link.silent(link.timeout) {
                link.end(e.clone());
            }
            Err(e)
        }
    }
}

/// Connects, sets the socket's options, starts the reader and checks that the server
/// answers: `AUTH` and `SELECT` as configured, else a `PING`.
async fn connect(config: &RedisConfig, runtime: tokio::runtime::Handle) -> Result<Arc<Link>> {
    let to = || format!("{}:{}", config.host, config.port);
    let stream = match tokio::time::timeout(
        config.connect_timeout,
        TcpStream::connect((config.host.as_str(), config.port)),
    )
    .await
    {
        Err(_) => {
            return Err(CacheError::Timeout {
                operation: "connect",
                after: config.connect_timeout,
            });
        }
        Ok(Err(e)) => {
            return Err(CacheError::connection(
                format!("connect to {}: {e}; is Redis running there?", to()),
                Some(Box::new(e)),
            ));
        }
        Ok(Ok(s)) => s,
    };
    let options = (|| {
        stream.set_nodelay(config.tcp_nodelay)?;
        if let Some(ka) = crate::conn::keepalive(config) {
            socket2::SockRef::from(&stream).set_tcp_keepalive(&ka)?;
        }
        std::io::Result::Ok(())
    })();
    if let Err(e) = options {
        return Err(CacheError::connection(
            format!("socket options for {}: {e}", to()),
            Some(Box::new(e)),
        ));
    }
    let (read, write) = stream.into_split();
    let link = Arc::new(Link {
        write,
        waiting: Mutex::default(),
        reader: Mutex::new(None),
        runtime: runtime.clone(),
        timeout: config.response_timeout,
        last_read: std::sync::atomic::AtomicU64::new(0),
        born: tokio::time::Instant::now(),
    });
    let reader = runtime.spawn(read_replies(Arc::clone(&link), read));
    *link.reader.lock().unwrap_or_else(PoisonError::into_inner) = Some(reader.abort_handle());
    // An `end` that ran before the handle was stored could not stop the reader.
    if link.is_ended() {
        reader.abort();
    }
    // Redis before 6 knows no users: `AUTH user password` is refused for its arguments, and
    // redis-rs then sends `AUTH password`, as is done here.
    let done = match handshake(&link, config, config.username.as_deref()).await {
        Ok(true) => handshake(&link, config, None).await.map(|_| ()),
        other => other.map(|_| ()),
    };
    if let Err(e) = done {
        link.end(e.clone());
        return Err(e);
    }
    Ok(link)
}

/// `AUTH` (as `user`, if given) and `SELECT` as configured, then `CLIENT SETNAME`: the
/// connection is up once the server has answered them all. `Ok(true)`: the server refused
/// `AUTH` with a user for its arguments (before Redis 6), to be asked again without one.
async fn handshake(link: &Arc<Link>, config: &RedisConfig, user: Option<&str>) -> Result<bool> {
    let timeout = config.response_timeout;
    let mut hello = Vec::new();
    let mut n = 0;
    if let Some(password) = &config.password {
        let mut auth = redis::cmd("AUTH");
        if let Some(user) = user {
            auth.arg(user);
        }
        auth.arg(password).write_packed_command(&mut hello);
        n += 1;
    }
    if config.db != 0 {
        redis::cmd("SELECT")
            .arg(config.db)
            .write_packed_command(&mut hello);
        n += 1;
    }
    // Named, so that `CLIENT LIST` tells it from the pool's; then a `PING`, whose `PONG`
    // proves the server answers (a proxy or a paused server accepts connections without
    // answering; an error Redis sends on accept, such as `max number of clients reached`,
    // would be taken for the name's reply, and Redis then closes the connection: that error
    // is kept in the one the callers get).
    redis::cmd("CLIENT")
        .arg("SETNAME")
        .arg(NAME)
        .write_packed_command(&mut hello);
    redis::cmd("PING").write_packed_command(&mut hello);
    let replies = ask(link, "connect", &hello, n + 2).await?;
    for (i, r) in replies.into_iter().enumerate() {
        match r {
            Reply::Status => {}
            // A user not allowed `CLIENT` or `PING` (`+@read +@write` leaves `PING` out,
            // and the pool never sends it: review, helper-95 #1), a server or proxy that
            // renamed them away or does not have them: not named, and the refusal is the
            // answer that proves the server answers. (Not a server that is loading or
            // wants a password.)
            Reply::Error(e) if i >= n && !e.starts_with("NOAUTH") && !e.starts_with("LOADING") => {}
            Reply::Error(e)
                if i == 0
                    && user.is_some()
                    && config.password.is_some()
                    && e.contains("wrong number of arguments") =>
            {
                return Ok(true);
            }
            Reply::Error(e) => return Err(server_error(&e, "connect", timeout)),
            other => {
                return Err(CacheError::Backend {
                    message: format!("connect: Redis answered {other:?} to the handshake"),
                    source: None,
                });
            }
        }
    }
    Ok(false)
}

/// Whether the read batches' own connection answers, made now if it is down: `None` when
/// reads do not use one. A reply of any kind is an answer (an error reply too: a user not
/// allowed `PING` still reads); a connect that fails, or a reply that does not come within
/// the response timeout, is not. (A health check asking only the pool reported a server
/// whose batch connection could not be made, at `maxclients`, as healthy while every read
/// failed.)
pub(crate) async fn answers(inner: &Inner) -> Option<Result<()>> {
    let wire = inner.batcher.as_ref()?.wire.as_ref()?;
    let mut bytes = Vec::with_capacity(14);
    command(&mut bytes, &[b"PING"]);
    Some(
        run(
            inner,
            wire,
            Operation::HealthCheck,
            false,
            &bytes,
            1,
            |_| Ok(()),
        )
        .await,
    )
}

/// One batch on `wire`, counted as `Inner::run` counts a call: its latency, an error once;
/// a read (`retry`) is sent once more on a new connection after a timeout when
/// `retry_on_timeout` is on. `answer` turns the replies into the batch's result (an error it
/// returns is counted too).
pub(crate) async fn run<T>(
    inner: &Inner,
    wire: &Wire,
    op: Operation,
    retry: bool,
    bytes: &[u8],
    replies: usize,
    answer: impl Fn(Vec<Reply>) -> Result<T>,
) -> Result<T> {
    if inner.is_closed() {
        return Err(CacheError::Closed);
    }
    let attempts = if retry && inner.config.retry_on_timeout {
        2
    } else {
        1
    };
    let start = tokio::time::Instant::now();
    let mut result = Err(CacheError::Closed);
    let idle = std::sync::atomic::AtomicBool::new(false);
    let gone = inner.batcher.as_ref().map_or(&idle, |b| b.runtime_gone());
    let owner = inner
        .batcher
        .as_ref()
        .map(crate::batch::Batcher::owner)
        .unwrap_or_default();
    let mut result_link: Option<Arc<Link>>;
    for _ in 0..attempts {
        result_link = None;
        result = match wire
            .ready(
                &inner.config,
                crate::batch::runtime_of(inner),
                gone,
                &owner,
                op == Operation::HealthCheck,
            )
            .await
        {
            Ok(link) => {
                let r = ask(&link, op.as_str(), bytes, replies)
                    .await
                    .and_then(&answer);
                result_link = Some(link);
                r
            }
            Err(e) => Err(e),
        };
        // Again only on a new connection: on the same one it would queue behind the reply
        // that was too slow.
        let ended = result_link.as_ref().is_none_or(|l| l.is_ended());
        if !matches!(&result, Err(e) if e.is_timeout()) || !ended {
            break;
        }
    }
    inner.stats.latency(op, start.elapsed());
    // `Closed` (the backend closed) is counted by no one here, as `Inner::run` does not.
    if let Err(e) = &result
        && !matches!(e, CacheError::Closed)
    {
        inner.stats.error(op);
        tracing::debug!(operation = op.as_str(), error = %e, "redis batch failed");
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(chunks: &[&[u8]]) -> Vec<Reply> {
        let mut p = Parser::default();
        let mut out = Vec::new();
        for c in chunks {
            p.buf.extend_from_slice(c);
            while let Some(r) = p.next().unwrap_or_else(|e| panic!("{e}")) {
                out.push(r);
            }
        }
        out
    }

    #[test]
    fn replies_split_anywhere_parse_the_same() {
        let whole: &[u8] =
            b"*3\r\n$3\r\nabc\r\n$-1\r\n$0\r\n\r\n+OK\r\n-ERR no\r\n:7\r\n$2\r\n\r\n\r\n*0\r\n";
        let expected = vec![
            Reply::Array(vec![
                Reply::Bulk(Bytes::from_static(b"abc")),
                Reply::Nil,
                Reply::Bulk(Bytes::new()),
            ]),
            Reply::Status,
            Reply::Error("ERR no".into()),
            Reply::Int(7),
            Reply::Bulk(Bytes::from_static(b"\r\n")),
            Reply::Array(Vec::new()),
        ];
        assert_eq!(parse(&[whole]), expected);
        for at in 1..whole.len() {
            let (a, b) = whole.split_at(at);
            assert_eq!(parse(&[a, b]), expected, "split at {at}");
        }
        let bytes: Vec<&[u8]> = whole.chunks(1).collect();
        assert_eq!(parse(&bytes), expected);
    }

    #[test]
    fn malformed_replies_are_refused() {
        for bad in [
            &b"?x\r\n"[..],
            b"$3\r\nabcd\r\n",
            b"$x\r\n",
            b"*2\r\n*1\r\n",
            b"+OK\n",
            b"$99999999999999\r\n",
            b"$-99999999999999999999999\r\n",
            b"\r\n",
            b"\n",
        ] {
            let mut p = Parser::default();
            p.buf.extend_from_slice(bad);
            let mut r = p.next();
            while let Ok(Some(_)) = r {
                r = p.next();
            }
            assert!(
                r.is_err(),
                "{:?} was accepted",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn commands_are_encoded_as_redis_rs_encodes_them() {
        let mut ours = Vec::new();
        command(&mut ours, &[b"SET", b"k", b"v\r\n", b"PX", b"10"]);
        let theirs = redis::cmd("SET")
            .arg("k")
            .arg(b"v\r\n")
            .arg("PX")
            .arg(10)
            .get_packed_command();
        assert_eq!(ours, theirs);
    }

    fn test_config(server: &ncm_cache_testkit::RedisServer, timeout: Duration) -> RedisConfig {
        let mut config = RedisConfig::from_url(&server.url()).unwrap_or_else(|e| panic!("{e}"));
        config.response_timeout = timeout;
        config
    }

    /// A command larger than the socket takes at once while Redis does not read (paused):
    /// its rest goes to the flusher, and a command sent after it waits behind it instead of
    /// cutting into it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_command_the_socket_cannot_take_at_once_goes_before_those_behind_it() {
        let server = ncm_cache_testkit::RedisServer::start().unwrap_or_else(|e| panic!("{e}"));
        let config = test_config(&server, Duration::from_secs(20));
        let link = connect(&config, tokio::runtime::Handle::current())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        server.pause().unwrap_or_else(|e| panic!("{e}"));
        let value = vec![b'x'; 32 << 20];
        let mut big = Vec::new();
        command(&mut big, &[b"SET", b"big", &value]);
        let first = link.send(&big, 1);
        assert!(
            !link.waiting().outbox.is_empty(),
            "the socket took 32 MiB at once: the flusher was not needed"
        );
        let mut small = Vec::new();
        command(&mut small, &[b"STRLEN", b"big"]);
        let second = link.send(&small, 1);
        server.resume().unwrap_or_else(|e| panic!("{e}"));
        let first = first.await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(first.unwrap_or_else(|e| panic!("{e}")), vec![Reply::Status]);
        let second = second.await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            second.unwrap_or_else(|e| panic!("{e}")),
            vec![Reply::Int(32 << 20)]
        );
    }

    /// A server that stops reading (paused) while a command larger than the socket takes is
    /// written: the wait ends within the response timeout (and the flusher's), with the
    /// connection ended.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_command_the_server_stops_draining_ends_the_connection_within_its_bound() {
        let server = ncm_cache_testkit::RedisServer::start().unwrap_or_else(|e| panic!("{e}"));
        let config = test_config(&server, Duration::from_millis(500));
        let link = connect(&config, tokio::runtime::Handle::current())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        server.pause().unwrap_or_else(|e| panic!("{e}"));
        let mut big = Vec::new();
        command(&mut big, &[b"SET", b"huge", &vec![b'x'; 64 << 20]]);
        let start = std::time::Instant::now();
        let r = ask(&link, "set", &big, 1).await;
        let took = start.elapsed();
        server.resume().unwrap_or_else(|e| panic!("{e}"));
        let e = r.expect_err("a paused server answered");
        assert!(e.is_timeout() || e.is_connection(), "{e:?}");
        assert!(took < Duration::from_millis(1200), "took {took:?}");
        assert!(link.is_ended());
    }

    #[test]
    fn error_replies_map_as_on_the_pool() {
        let e = server_error("NOPERM this user has no permissions", "get", Duration::ZERO);
        assert!(matches!(e, CacheError::Auth(_)), "{e:?}");
        let e = server_error(
            "READONLY You can't write against a read only replica.",
            "set",
            Duration::ZERO,
        );
        assert!(e.is_connection(), "{e:?}");
    }
}
