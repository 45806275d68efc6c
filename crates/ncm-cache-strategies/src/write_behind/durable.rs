//! Durable write-behind: pending writes journaled in a Redis Stream with a consumer group.
//!
//! Layout (one hash slot per queue, so the Lua scripts also run on a Redis Cluster):
//! - `{prefix}__ncm:wb:{<name>}` — the stream; entries `k` (key) and `v` (encoded value);
//!   consumer group `ncm-wb`.
//! - `{prefix}__ncm:wb:{<name>}:consumers` — the set of consumers that have joined.
//! - `{prefix}__ncm:wb:{<name>}:alive:<consumer>` — a consumer's lease (`SET PX`), renewed in
//!   the background.
//! - `{prefix}__ncm:wb:{<name>}:dead` — entries that cannot be decoded (another writer's format,
//!   damage), moved out of the journal when adopted, with `reason` and the original `id`.
//! - `{prefix}__ncm:wb:{<name>}:newest` and `…:counts` — hashes: key → id of its newest
//!   journaled write, and how many of its entries the stream holds (both set by the append and
//!   removed when the key's last entry is acknowledged: bounded by the keys with entries).
//! - `{prefix}__ncm:wb:{<name>}:pinned` — hash: key → id of the newer write that an older write
//!   of the key was acknowledged as superseded by. That write can no longer be withdrawn (see
//!   below); removed with the key's other records.
//! - `{prefix}__ncm:wb:{<name>}:gone` — hash: key → its withdrawn entries and what each
//!   replaced as newest (up to 256, then marked as overflowed), so a withdrawal finds the newest
//!   write left (still journaled, or persisted); removed with the key's other records.
//!
//! **Order and fencing.** Before a batch goes to the store, one script checks each entry: still
//! in this consumer's pending list (else another process adopted it while this one stalled: it
//! is dropped, not persisted), and still its key's newest journaled write (else a newer write —
//! from any process — supersedes it: it is acknowledged, not persisted). So adoption, dead-letter
//! replay, a resumed consumer and two instances writing one key never put an older value back,
//! except in the window between that check and the store call; the store receives each entry's
//! stream id ([`WriteVersion`](crate::WriteVersion)) to close it with a conditional write.
//!
//! **Withdrawal.** A write whose cache write fails after its append is withdrawn (taken back
//! from the journal, the key's newest id handed back to the entry it replaced) — unless the fence
//! already acknowledged an older write of the key as superseded by it (its id is `pinned`): then
//! the withdrawal is refused in the same atomic step and the write is persisted, so the older,
//! acknowledged write is never lost to a newer one that did not happen.
//!
//! A write is `XADD` + `XCLAIM … FORCE` in one script: the entry enters the writer's own
//! pending list atomically, before the caller gets its acknowledgment — no other consumer ever
//! receives it while the writer lives (nothing reads with `>`). After the store accepted it,
//! `XACK` + `XDEL`. A process that finds a consumer whose lease expired claims its pending
//! entries (`XPENDING … IDLE` + `XCLAIM` with a minimum idle time, so two recovering processes
//! never both take one entry), persists them, and removes the dead consumer.

use std::marker::PhantomData;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use ncm_cache_core::{Cache, CacheError, Codec, Operation, Result};
use ncm_cache_redis::RedisBackend;
use redis::{Script, Value};

use super::QueueValue;
use super::config::DurableConfig;
use super::state::{Appended, CacheSink, Journal, Recovered, Verdict, Version};

const GROUP: &str = "ncm-wb";
const CLAIM_BATCH: usize = 500;

/// XADD, the entry into the writer's pending list, and the key's newest id — one step. With
/// ARGV[5] = `d`, a write-through's or write-around's entry (a direct write, marked `d`),
/// appended only when the key has journaled writes (ARGV[3] in the counts hash KEYS[3]): one
/// is then superseded by it; `{'', ''}` when nothing was appended.
static APPEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local id
if ARGV[5] == 'd' then
  if redis.call('HEXISTS', KEYS[3], ARGV[3]) == 0 then return {'', ''} end
  id = redis.call('XADD', KEYS[1], '*', 'k', ARGV[3], 'v', ARGV[4], 'c', '1', 'd', '1')
else
  id = redis.call('XADD', KEYS[1], '*', 'k', ARGV[3], 'v', ARGV[4], 'c', '1')
end
local r = redis.pcall('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'FORCE', 'JUSTID')
if type(r) == 'table' and r.err then
  redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0')
  redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'FORCE', 'JUSTID')
end
local prev = redis.call('HGET', KEYS[2], ARGV[3]) or ''
redis.call('HSET', KEYS[2], ARGV[3], id)
redis.call('HINCRBY', KEYS[3], ARGV[3], 1)
return {id, prev}
",
    )
});

/// For each (key, id) about to be persisted by consumer ARGV[2] (pairs from ARGV[4]): 2 when
/// the entry is no longer in its pending list (adopted by another process); 3 when the key's
/// newest journaled write is a direct write (a write-through's, marked `d`) journaled less than
/// ARGV[3] ms ago and still in the stream — its store call is under way: ask again later, so
/// that the direct write's outcome decides (stored: this write is superseded; failed and taken
/// back: this one is the newest again); when a newer write of the key was journaled, that
/// write's id if it is pending under this same consumer, else 1 — and the newer write is pinned
/// in KEYS[3] (it may no longer be withdrawn); else 0 (persist).
static FENCE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local function mine(id)
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  return #p > 0 and p[1][2] == ARGV[2]
end
local function busy(newest)
  local e = redis.call('XRANGE', KEYS[1], newest, newest)
  if #e == 0 then return false end
  local f = e[1][2]
  for j = 1, #f, 2 do
    if f[j] == 'd' then
      local t = redis.call('TIME')
      local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
      local at = tonumber(string.match(newest, '^(%d+)'))
      return at ~= nil and now - at < tonumber(ARGV[3])
    end
  end
  return false
end
local out = {}
for i = 4, #ARGV, 2 do
  local key, id = ARGV[i], ARGV[i + 1]
  if not mine(id) then
    out[#out + 1] = 2
  else
    local newest = redis.call('HGET', KEYS[2], key)
    if newest and newest ~= id then
      if busy(newest) then
        out[#out + 1] = 3
      else
        redis.call('HSET', KEYS[3], key, newest)
        if mine(newest) then
          out[#out + 1] = newest
        else
          out[#out + 1] = 1
        end
      end
    else
      out[#out + 1] = 0
    end
  end
end
return out
",
    )
});

/// Moves one entry (ARGV[2], of key ARGV[3], '' when unknown) to the dead-entry stream KEYS[4]
/// with the reason ARGV[4], and removes it from the journal like an acknowledgment.
static BURY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local e = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2])
if #e == 0 then return 0 end
local fields = e[1][2]
local mine = false
for j = 1, #fields, 2 do
  if fields[j] == 'c' then mine = true end
end
fields[#fields + 1] = 'reason'
fields[#fields + 1] = ARGV[4]
fields[#fields + 1] = 'id'
fields[#fields + 1] = ARGV[2]
-- Bounded: about the newest 10,000 dead entries are kept.
redis.call('XADD', KEYS[4], 'MAXLEN', '~', 10000, '*', unpack(fields))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
if redis.call('XDEL', KEYS[1], ARGV[2]) == 1 and mine and ARGV[3] ~= '' then
  if redis.call('HINCRBY', KEYS[3], ARGV[3], -1) <= 0 then
    redis.call('HDEL', KEYS[3], ARGV[3])
    redis.call('HDEL', KEYS[2], ARGV[3])
    redis.call('HDEL', KEYS[5], ARGV[3])
    redis.call('HDEL', KEYS[6], ARGV[3])
  end
end
return 1
",
    )
});

/// Withdraws an appended entry that was not acknowledged (its cache write or its direct
/// write's store call failed): removes it like an acknowledgment and gives the key's newest-id
/// record back to ARGV[4], the entry it replaced — or, when that one was withdrawn too, to the
/// first of the chain of replaced entries still in the stream or acknowledged (KEYS[5] keeps
/// the key's withdrawn entries and what each replaced, while it has entries). Refused (0,
/// nothing changed) when the entry is pinned in KEYS[4]: an older write of the key was
/// acknowledged as superseded by it.
static WITHDRAW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local key, id, prev = ARGV[2], ARGV[3], ARGV[4]
if redis.call('HGET', KEYS[4], key) == id then return 0 end
redis.call('XACK', KEYS[1], ARGV[1], id)
if redis.call('XDEL', KEYS[1], id) == 1 then
  if redis.call('HINCRBY', KEYS[3], key, -1) <= 0 then
    redis.call('HDEL', KEYS[3], key)
    redis.call('HDEL', KEYS[2], key)
    redis.call('HDEL', KEYS[4], key)
    redis.call('HDEL', KEYS[5], key)
    return 1
  end
end
-- Entries of the key are left. The newest is again the write this one replaced or, when that
-- one was taken back too, the one it replaced, and so on: the first still journaled, or
-- acknowledged (persisted; review, helper-88 #1, helper-89 #1, helper-90). KEYS[5] keeps the
-- key's taken-back writes as `,id=prev,` while it has entries; past 256 of them it is marked
-- `!` and a chain that leaves it is unknown: no write is the newest, each left is persisted.
local gone = redis.call('HGET', KEYS[5], key) or ','
if redis.call('HGET', KEYS[2], key) == id then
  local at, known = prev, true
  for _ = 1, 300 do
    if at == '' or #redis.call('XRANGE', KEYS[1], at, at) > 0 then break end
    local nxt = string.match(gone, ',' .. string.gsub(at, '%-', '%%-') .. '=([^,]*),')
    if nxt == nil then
      known = string.sub(gone, 1, 1) ~= '!'
      break
    end
    at = nxt
  end
  if at ~= '' and known then
    redis.call('HSET', KEYS[2], key, at)
  else
    redis.call('HDEL', KEYS[2], key)
  end
end
gone = gone .. id .. '=' .. prev .. ','
if select(2, string.gsub(gone, '=', '=')) > 256 then
  gone = '!' .. string.gsub(gone, '^!?,[^,]*', '', 1)
end
redis.call('HSET', KEYS[5], key, gone)
return 1
",
    )
});

static REMOVE_CONSUMER: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if ARGV[3] == 'dead' and redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then return 0 end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
redis.call('SREM', KEYS[2], ARGV[2])
return 1
",
    )
});

/// Acknowledges and deletes (key, id) pairs. A key's records (newest id, entries in the
/// stream) go when its last entry does: while any entry of the key is left (pending with any
/// process, or a dead letter), an older one can still be told from the newest.
static ACK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local function counted(id)
  local e = redis.call('XRANGE', KEYS[1], id, id)
  if #e == 0 then return false end
  local f = e[1][2]
  for j = 1, #f, 2 do
    if f[j] == 'c' then return true end
  end
  return false
end
local n = 0
for i = 2, #ARGV, 2 do
  local key, id = ARGV[i], ARGV[i + 1]
  -- Entries of older builds carry no count mark: they never touch the counts.
  local mine = counted(id)
  redis.call('XACK', KEYS[1], ARGV[1], id)
  if redis.call('XDEL', KEYS[1], id) == 1 then
    n = n + 1
    if mine and redis.call('HINCRBY', KEYS[3], key, -1) <= 0 then
      redis.call('HDEL', KEYS[3], key)
      redis.call('HDEL', KEYS[2], key)
      redis.call('HDEL', KEYS[4], key)
      redis.call('HDEL', KEYS[5], key)
    end
  end
end
return n
",
    )
});

pub(crate) struct RedisJournal<V> {
    backend: Arc<RedisBackend>,
    codec: Arc<dyn CacheSink<V>>,
    stream: String,
    /// Hash: key → id of its newest journaled write (same hash slot as the stream).
    newest: String,
    /// Hash: key → how many of its entries are in the stream.
    counts: String,
    /// Hash: key → id of a write that may no longer be withdrawn (an older one was
    /// acknowledged as superseded by it).
    pinned: String,
    /// Hash: key → its writes taken back and what each replaced (`,id=prev,`…, up to 256),
    /// while other entries of the key are left: a withdrawal whose replaced write is gone
    /// follows the chain to the newest write left (see [`WITHDRAW`]).
    gone: String,
    /// Stream of entries that cannot be decoded, moved out of the journal for inspection.
    dead: String,
    members: String,
    alive_prefix: String,
    consumer: String,
    lease: Duration,
    claim_min_idle: Duration,
    _v: PhantomData<fn() -> V>,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn cmd(name: &str) -> redis::Cmd {
    redis::cmd(name)
}

impl<V: QueueValue> RedisJournal<V> {
    /// Joins (creating if needed) the queue's stream and consumer group.
    pub(crate) async fn open<C: Codec>(
        config: &DurableConfig,
        name: &str,
        cache: Cache<C>,
    ) -> Result<Arc<dyn Journal<V>>> {
        if name.is_empty() || name.contains(['{', '}']) {
            return Err(CacheError::Config(format!(
                "durable write-behind needs a store name without braces, got {name:?}"
            )));
        }
        if config.lease < Duration::from_millis(30) {
            return Err(CacheError::Config(
                "durable write-behind lease must be at least 30 ms".into(),
            ));
        }
        let ks = config.backend.key_space();
        let base = format!("wb:{{{name}}}");
        let consumer = format!("{}-{:016x}", std::process::id(), fastrand::u64(..));
        let journal = Self {
            stream: ks.reserved_key(&base)?,
            newest: ks.reserved_key(&format!("{base}:newest"))?,
            counts: ks.reserved_key(&format!("{base}:counts"))?,
            pinned: ks.reserved_key(&format!("{base}:pinned"))?,
            gone: ks.reserved_key(&format!("{base}:gone"))?,
            dead: ks.reserved_key(&format!("{base}:dead"))?,
            members: ks.reserved_key(&format!("{base}:consumers"))?,
            alive_prefix: ks.reserved_key(&format!("{base}:alive:"))?,
            backend: Arc::clone(&config.backend),
            codec: Arc::new(cache),
            consumer,
            lease: config.lease,
            claim_min_idle: config.claim_min_idle,
            _v: PhantomData,
        };
        let mut create = cmd("XGROUP");
        create
            .arg("CREATE")
            .arg(&journal.stream)
            .arg(GROUP)
            .arg("$")
            .arg("MKSTREAM");
        if let Err(e) = journal
            .backend
            .query_cmd::<()>(Operation::Set, &create)
            .await
            && !e.to_string().contains("BUSYGROUP")
        {
            return Err(e);
        }
        let mut join = cmd("XGROUP");
        join.arg("CREATECONSUMER")
            .arg(&journal.stream)
            .arg(GROUP)
            .arg(&journal.consumer);
        journal
            .backend
            .query_cmd::<i64>(Operation::Set, &join)
            .await?;
        journal.heartbeat().await?;
        tracing::debug!(stream = %journal.stream, consumer = %journal.consumer, "joined durable write-behind group");
        Ok(Arc::new(journal))
    }

    fn alive_key(&self, consumer: &str) -> String {
        format!("{}{consumer}", self.alive_prefix)
    }

    async fn pending_of(
        &self,
        consumer: &str,
        idle: Option<Duration>,
        count: usize,
    ) -> Result<Vec<String>> {
        let mut c = cmd("XPENDING");
        c.arg(&self.stream).arg(GROUP);
        if let Some(idle) = idle {
            c.arg("IDLE").arg(millis(idle));
        }
        c.arg("-").arg("+").arg(count).arg(consumer);
        let reply: Value = self.backend.query_cmd(Operation::Get, &c).await?;
        Ok(items(reply)
            .into_iter()
            .filter_map(|row| items(row).into_iter().next().and_then(|id| text(&id)))
            .collect())
    }

    /// A recovery pass that failed part-way: the entries it already claimed are in this
    /// consumer's pending list, where no later pass looks (passes skip their own consumer), so
    /// they are returned to be persisted; the error ends the pass (review, helper-69: they were
    /// dropped with it and stayed unpersisted for as long as this process lived). Nothing
    /// claimed: the error.
    fn partly(out: Vec<Recovered<V>>, e: CacheError) -> Result<Vec<Recovered<V>>> {
        if out.is_empty() {
            return Err(e);
        }
        tracing::warn!(error = %e, adopted = out.len(), "a write-behind recovery pass failed part-way: the writes it claimed are kept, the rest waits for the next pass");
        Ok(out)
    }

    /// Claims up to `limit` pending entries of one dead consumer; removes it once it has none
    /// left. Entries that cannot be decoded go to the dead-entry stream.
    async fn adopt(&self, dead: &str, out: &mut Vec<Recovered<V>>, limit: usize) -> Result<()> {
        loop {
            let room = limit.saturating_sub(out.len()).min(CLAIM_BATCH);
            if room == 0 {
                return Ok(());
            }
            let ids = self
                .pending_of(dead, Some(self.claim_min_idle), room)
                .await?;
            if ids.is_empty() {
                break;
            }
            let mut claim = cmd("XCLAIM");
            claim
                .arg(&self.stream)
                .arg(GROUP)
                .arg(&self.consumer)
                .arg(millis(self.claim_min_idle))
                .arg(&ids);
            let claimed: Value = self.backend.query_cmd(Operation::Set, &claim).await?;
            let entries = items(claimed);
            if entries.is_empty() {
                break;
            }
            // Every good entry of the claim is kept before any bad one is buried: a burial that
            // fails must not strand the good entries claimed after it (review, helper-72).
            let mut bad = Vec::new();
            for entry in entries {
                match self.parse_entry(entry) {
                    Ok(Some(r)) => out.push(r),
                    Ok(None) => {}
                    Err(b) => bad.push(b),
                }
            }
            for b in bad {
                self.bury(b).await?;
            }
        }
        self.remove_consumer(dead, true).await
    }

    /// Removes `consumer` if it has nothing pending (and, for a `dead` one, no lease), in one
    /// atomic step.
    async fn remove_consumer(&self, consumer: &str, dead: bool) -> Result<()> {
        let keys = [
            self.stream.clone(),
            self.members.clone(),
            self.alive_key(consumer),
        ];
        let mode: &[u8] = if dead { b"dead" } else { b"self" };
        let args = vec![
            GROUP.as_bytes().to_vec(),
            consumer.as_bytes().to_vec(),
            mode.to_vec(),
        ];
        self.backend
            .eval_script::<i64>(Operation::Delete, &REMOVE_CONSUMER, &keys, &args)
            .await
            .map(drop)
    }

    fn parse_entry(&self, entry: Value) -> std::result::Result<Option<Recovered<V>>, Bad> {
        let mut parts = items(entry).into_iter();
        let (Some(id), Some(fields)) = (parts.next(), parts.next()) else {
            return Ok(None); // deleted meanwhile
        };
        let Some(id) = text(&id).and_then(|s| parse_id(&s)) else {
            tracing::error!(stream = %self.stream, "a write-behind journal entry has a malformed id; left in place");
            return Ok(None);
        };
        let mut key = None;
        let mut value = None;
        let mut direct = false;
        let mut fields = items(fields).into_iter();
        while let (Some(f), Some(v)) = (fields.next(), fields.next()) {
            match text(&f).as_deref() {
                Some("k") => key = text(&v),
                Some("v") => value = bytes(v),
                Some("d") => direct = true,
                _ => {}
            }
        }
        let (Some(key), Some(value)) = (key, value) else {
            return Err(Bad {
                id,
                key: None,
                error: CacheError::backend(
                    format!("stream entry {} lacks k or v", id_str(id)),
                    None,
                ),
            });
        };
        match self.codec.decode(&[&self.stream, "\0", &key], &value) {
            Ok(value) => Ok(Some(Recovered {
                id,
                key,
                value,
                direct,
            })),
            Err(error) => Err(Bad {
                id,
                key: Some(key),
                error,
            }),
        }
    }

    /// Runs [`APPEND`] (`direct`: a write-through's entry); `None` when it appended nothing.
    async fn append_with(&self, direct: bool, key: &str, value: &V) -> Result<Option<Appended>> {
        let encoded = self.codec.encode(&[&self.stream, "\0", key], value)?;
        let args = vec![
            GROUP.as_bytes().to_vec(),
            self.consumer.as_bytes().to_vec(),
            key.as_bytes().to_vec(),
            encoded.to_vec(),
            if direct { b"d".to_vec() } else { Vec::new() },
        ];
        let (id, prev): (String, String) = self
            .backend
            .eval_script(
                Operation::Set,
                &APPEND,
                &[
                    self.stream.clone(),
                    self.newest.clone(),
                    self.counts.clone(),
                ],
                &args,
            )
            .await?;
        if id.is_empty() {
            return Ok(None);
        }
        let id = parse_id(&id).ok_or_else(|| {
            CacheError::backend(format!("XADD returned a malformed id {id:?}"), None)
        })?;
        Ok(Some(Appended {
            id,
            prev: parse_id(&prev),
        }))
    }

    /// Moves an entry that cannot be decoded to the dead-entry stream.
    async fn bury(&self, bad: Bad) -> Result<()> {
        tracing::error!(stream = %self.stream, dead = %self.dead, error = %bad.error, "a write-behind journal entry cannot be decoded; moved to the dead-entry stream");
        let args = vec![
            GROUP.as_bytes().to_vec(),
            id_str(bad.id).into_bytes(),
            bad.key.unwrap_or_default().into_bytes(),
            bad.error.to_string().into_bytes(),
        ];
        self.backend
            .eval_script::<i64>(
                Operation::Delete,
                &BURY,
                &[
                    self.stream.clone(),
                    self.newest.clone(),
                    self.counts.clone(),
                    self.dead.clone(),
                    self.pinned.clone(),
                    self.gone.clone(),
                ],
                &args,
            )
            .await
            .map(drop)
    }
}

#[async_trait]
impl<V: QueueValue> Journal<V> for RedisJournal<V> {
    async fn append(&self, key: &str, value: &V) -> Result<Appended> {
        self.append_with(false, key, value)
            .await?
            .ok_or_else(|| CacheError::backend("XADD returned no id".to_owned(), None))
    }

    async fn append_direct(&self, key: &str, value: &V) -> Result<Option<Appended>> {
        self.append_with(true, key, value).await
    }

    async fn withdraw(&self, key: &str, appended: Appended) -> Result<bool> {
        let args = vec![
            GROUP.as_bytes().to_vec(),
            key.as_bytes().to_vec(),
            id_str(appended.id).into_bytes(),
            appended.prev.map(id_str).unwrap_or_default().into_bytes(),
        ];
        self.backend
            .eval_script::<i64>(
                Operation::Delete,
                &WITHDRAW,
                &[
                    self.stream.clone(),
                    self.newest.clone(),
                    self.counts.clone(),
                    self.pinned.clone(),
                    self.gone.clone(),
                ],
                &args,
            )
            .await
            .map(|done| done == 1)
    }

    async fn fence(&self, entries: &[(&str, Version)]) -> Result<Vec<Verdict>> {
        let mut out = Vec::with_capacity(entries.len());
        for chunk in entries.chunks(CLAIM_BATCH) {
            let mut args = Vec::with_capacity(3 + 2 * chunk.len());
            args.push(GROUP.as_bytes().to_vec());
            args.push(self.consumer.as_bytes().to_vec());
            // A direct write's store call is waited for no longer than a lease (its writer may
            // have lost the append's reply and not track it).
            args.push(millis(self.lease).to_string().into_bytes());
            for (key, id) in chunk {
                args.push(key.as_bytes().to_vec());
                args.push(id_str(*id).into_bytes());
            }
            let codes: Vec<Value> = self
                .backend
                .eval_script(
                    Operation::Get,
                    &FENCE,
                    &[
                        self.stream.clone(),
                        self.newest.clone(),
                        self.pinned.clone(),
                    ],
                    &args,
                )
                .await?;
            if codes.len() != chunk.len() {
                return Err(CacheError::backend(
                    "write-behind fence: unexpected reply length",
                    None,
                ));
            }
            for code in codes {
                out.push(match code {
                    Value::Int(0) => Verdict::Persist,
                    Value::Int(1) => Verdict::Superseded,
                    Value::Int(3) => Verdict::Busy,
                    Value::Int(_) => Verdict::Lost,
                    other => match text(&other).as_deref().and_then(parse_id) {
                        Some(newest) => Verdict::Orphan(newest),
                        None => {
                            return Err(CacheError::backend(
                                format!("write-behind fence: unexpected reply {other:?}"),
                                None,
                            ));
                        }
                    },
                });
            }
        }
        Ok(out)
    }

    async fn fetch(&self, id: Version) -> Result<Option<Recovered<V>>> {
        let mut range = cmd("XRANGE");
        let id_text = id_str(id);
        range.arg(&self.stream).arg(&id_text).arg(&id_text);
        let reply: Value = self.backend.query_cmd(Operation::Get, &range).await?;
        let Some(entry) = items(reply).into_iter().next() else {
            return Ok(None);
        };
        match self.parse_entry(entry) {
            Ok(found) => Ok(found),
            Err(bad) => {
                self.bury(bad).await?;
                Ok(None)
            }
        }
    }

    async fn newest(&self, key: &str) -> Result<Option<Version>> {
        let mut hget = cmd("HGET");
        hget.arg(&self.newest).arg(key);
        let id: Option<String> = self.backend.query_cmd(Operation::Get, &hget).await?;
        Ok(id.as_deref().and_then(parse_id))
    }

    async fn ack(&self, ids: &[(String, Version)]) -> Result<()> {
        for chunk in ids.chunks(CLAIM_BATCH) {
            let mut args = Vec::with_capacity(1 + 2 * chunk.len());
            args.push(GROUP.as_bytes().to_vec());
            for (key, id) in chunk {
                args.push(key.as_bytes().to_vec());
                args.push(id_str(*id).into_bytes());
            }
            self.backend
                .eval_script::<i64>(
                    Operation::Delete,
                    &ACK,
                    &[
                        self.stream.clone(),
                        self.newest.clone(),
                        self.counts.clone(),
                        self.pinned.clone(),
                        self.gone.clone(),
                    ],
                    &args,
                )
                .await?;
        }
        Ok(())
    }

    async fn recover(&self, limit: usize) -> Result<Vec<Recovered<V>>> {
        let mut members = cmd("SMEMBERS");
        members.arg(&self.members);
        let members: Vec<String> = self.backend.query_cmd(Operation::Get, &members).await?;
        let mut out = Vec::new();
        for m in members.iter().filter(|m| **m != self.consumer) {
            let mut exists = cmd("EXISTS");
            exists.arg(self.alive_key(m));
            let alive = match self
                .backend
                .query_cmd::<i64>(Operation::Exists, &exists)
                .await
            {
                Ok(n) => n > 0,
                Err(e) => return Self::partly(out, e),
            };
            if alive {
                continue;
            }
            if out.len() >= limit {
                break;
            }
            if let Err(e) = self.adopt(m, &mut out, limit).await {
                return Self::partly(out, e);
            }
        }
        Ok(out)
    }

    async fn heartbeat(&self) -> Result<()> {
        let mut set = cmd("SET");
        set.arg(self.alive_key(&self.consumer))
            .arg(1)
            .arg("PX")
            .arg(millis(self.lease));
        self.backend.query_cmd::<()>(Operation::Set, &set).await?;
        // Re-registered every time, so membership survives a flushed or restarted Redis.
        let mut register = cmd("SADD");
        register.arg(&self.members).arg(&self.consumer);
        self.backend
            .query_cmd::<i64>(Operation::Set, &register)
            .await
            .map(drop)
    }

    async fn retire(&self) -> Result<()> {
        if self.pending_of(&self.consumer, None, 1).await?.is_empty() {
            self.remove_consumer(&self.consumer, false).await?;
        } else {
            tracing::warn!(stream = %self.stream, "leaving unpersisted write-behind entries (dead letters) for another process to adopt");
        }
        // Without a lease, another process may adopt what is left right away.
        let mut del = cmd("DEL");
        del.arg(self.alive_key(&self.consumer));
        self.backend
            .query_cmd::<i64>(Operation::Delete, &del)
            .await?;
        Ok(())
    }

    fn maintenance_every(&self) -> Duration {
        (self.lease / 3).max(Duration::from_millis(10))
    }
}

fn items(v: Value) -> Vec<Value> {
    match v {
        Value::Array(a) | Value::Set(a) => a,
        Value::Map(m) => m.into_iter().flat_map(|(k, v)| [k, v]).collect(),
        _ => Vec::new(),
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

fn bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        _ => None,
    }
}

fn parse_id(s: &str) -> Option<Version> {
    let (ms, seq) = s.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

fn id_str((ms, seq): Version) -> String {
    format!("{ms}-{seq}")
}

/// A journal entry this process cannot decode.
struct Bad {
    id: Version,
    key: Option<String>,
    error: CacheError,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_round_trip_and_order() {
        assert_eq!(parse_id("1700000000000-3"), Some((1_700_000_000_000, 3)));
        assert_eq!(id_str((5, 0)), "5-0");
        assert!(parse_id("5").is_none() && parse_id("a-b").is_none());
        assert!(parse_id("10-0") > parse_id("9-99"));
    }
}
