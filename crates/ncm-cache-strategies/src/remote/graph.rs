//! The dependency/tag graph in Redis, shared by every instance.
//!
//! Sorted sets `{prefix}__ncm:{ncm-deps}:d:<node>` (who depends on `node`) and
//! `{prefix}__ncm:{ncm-deps}:r:<node>` (what `node` depends on), scored by each edge's end (ms
//! since the epoch, or `inf`): an edge lives as long as its dependent key (its TTL when it was
//! declared) or until that key is deleted; each set expires with its last edge, so the graph
//! is bounded by the keys alive. Every key carries the hash tag
//! `{ncm-deps}`, so the whole graph lives in one slot and the walk can run as one atomic Lua
//! script even on a Redis Cluster. The trade-off: the graph is not spread over the cluster
//! (one node holds it and runs every walk), and a walk over a very large graph blocks that node
//! for its duration. Keys are discovered during the walk, so only the root's key is declared.

use std::sync::{Arc, LazyLock};

use ncm_cache_core::{Operation, Result};
use ncm_cache_redis::RedisBackend;
use redis::Script;

/// Sets a sorted set's expiry to its latest member's (or none, for an edge without expiry).
const EXPIRE_FN: &str = r"
local function expire(key)
  local top = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if #top == 0 then return end
  if top[2] == 'inf' then
    redis.call('PERSIST', key)
  else
    redis.call('PEXPIREAT', key, top[2])
  end
end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
";

/// `record(first)`: records `ARGV[2]` → each dependency from `ARGV[first]` on, for the
/// lifetime `ARGV[3]` (ms, or `inf`; the end computed on Redis's clock, so no skew with the
/// pruning); prunes the touched sets' expired edges and sets each set's expiry to its last
/// edge's.
const RECORD_FN: &str = r"
local function record(first)
  local base, node = ARGV[1], ARGV[2]
  local upto = 'inf'
  if ARGV[3] ~= 'inf' then upto = now + tonumber(ARGV[3]) end
  local r = base .. 'r:' .. node
  for i = first, #ARGV do
    local dep = ARGV[i]
    if dep ~= node then
      local d = base .. 'd:' .. dep
      redis.call('ZADD', d, upto, node)
      redis.call('ZREMRANGEBYSCORE', d, '-inf', '(' .. now)
      expire(d)
      redis.call('ZADD', r, upto, dep)
    end
  end
  redis.call('ZREMRANGEBYSCORE', r, '-inf', '(' .. now)
  expire(r)
end
";

/// Records `node` → each dependency (from ARGV[4]) for the lifetime ARGV[3].
static ADD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{EXPIRE_FN}{RECORD_FN}
record(4)
return #ARGV - 3
"
    ))
});

/// [`ADD`] and the dependent's value in one step (one round trip): KEYS[2] is the cache key,
/// ARGV[4] its TTL in ms ('' for none), ARGV[5] the value; dependencies from ARGV[6].
static ADD_AND_SET: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{EXPIRE_FN}{RECORD_FN}
record(6)
if ARGV[4] == '' then
  redis.call('SET', KEYS[2], ARGV[5])
else
  redis.call('SET', KEYS[2], ARGV[5], 'PX', ARGV[4])
end
return 1
"
    ))
});

/// Breadth-first walk over live edges with a visited set (cycle-safe); returns the reached
/// keys (`k:` nodes, without the root). Edges stay: a declared dependency holds until its
/// dependent is deleted ([`REMOVE`]) or its lifetime ends. Expired edges met are pruned.
static INVALIDATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{EXPIRE_FN}
local base, root = ARGV[1], ARGV[2]
local visited = {{ [root] = true }}
local order = {{ root }}
local head = 1
local keys = {{}}
while head <= #order do
  local node = order[head]
  head = head + 1
  local d = base .. 'd:' .. node
  if redis.call('ZREMRANGEBYSCORE', d, '-inf', '(' .. now) > 0 then
    expire(d)
  end
  for _, m in ipairs(redis.call('ZRANGE', d, 0, -1)) do
    if not visited[m] then
      visited[m] = true
      order[#order + 1] = m
      if string.sub(m, 1, 2) == 'k:' then
        keys[#keys + 1] = string.sub(m, 3)
      end
    end
  end
end
return keys
"
    ))
});

/// Removes a deleted node's own edges (what it depended on).
static REMOVE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r"{EXPIRE_FN}
local base, node = ARGV[1], ARGV[2]
local r = base .. 'r:' .. node
for _, dep in ipairs(redis.call('ZRANGE', r, 0, -1)) do
  local d = base .. 'd:' .. dep
  redis.call('ZREM', d, node)
  expire(d)
end
return redis.call('DEL', r)
"
    ))
});

/// The Redis graph of one cache prefix.
pub(crate) struct RedisGraph {
    backend: Arc<RedisBackend>,
    base: String,
}

impl RedisGraph {
    pub(crate) fn new(backend: Arc<RedisBackend>) -> Self {
        let base = format!("{}__ncm:{{ncm-deps}}:", backend.key_space().prefix());
        Self { backend, base }
    }

    /// Records that `node` depends on each of `deps` for `lifetime` (`None`: no end).
    pub(crate) async fn add(
        &self,
        node: &str,
        deps: &[String],
        lifetime: Option<std::time::Duration>,
    ) -> Result<()> {
        if deps.is_empty() {
            return Ok(());
        }
        let mut args = Vec::with_capacity(deps.len() + 3);
        args.push(self.base.clone().into_bytes());
        args.push(node.as_bytes().to_vec());
        args.push(lifetime_arg(lifetime).into_bytes());
        args.extend(deps.iter().map(|d| d.as_bytes().to_vec()));
        let keys = [format!("{}r:{node}", self.base)];
        self.backend
            .eval_script::<i64>(Operation::Set, &ADD, &keys, &args)
            .await
            .map(drop)
    }

    /// Records the edges and writes `value` under the cache key `full_key` (in this Redis, not
    /// a cluster) in one script: one round trip.
    pub(crate) async fn add_and_set(
        &self,
        node: &str,
        deps: &[String],
        lifetime: Option<std::time::Duration>,
        full_key: &str,
        value: &[u8],
    ) -> Result<()> {
        let px = lifetime.map_or(String::new(), |l| l.as_millis().max(1).to_string());
        let mut args = Vec::with_capacity(deps.len() + 5);
        args.push(self.base.clone().into_bytes());
        args.push(node.as_bytes().to_vec());
        args.push(lifetime_arg(lifetime).into_bytes());
        args.push(px.into_bytes());
        args.push(value.to_vec());
        args.extend(deps.iter().map(|d| d.as_bytes().to_vec()));
        let keys = [format!("{}r:{node}", self.base), full_key.to_owned()];
        self.backend
            .eval_script::<i64>(Operation::Set, &ADD_AND_SET, &keys, &args)
            .await
            .map(drop)
    }

    pub(crate) async fn invalidate(&self, root: &str) -> Result<Vec<String>> {
        let args = [self.base.clone().into_bytes(), root.as_bytes().to_vec()];
        let keys = [format!("{}d:{root}", self.base)];
        self.backend
            .eval_script(Operation::Delete, &INVALIDATE, &keys, &args)
            .await
    }

    pub(crate) async fn remove(&self, node: &str) -> Result<()> {
        let args = [self.base.clone().into_bytes(), node.as_bytes().to_vec()];
        let keys = [format!("{}r:{node}", self.base)];
        self.backend
            .eval_script::<i64>(Operation::Delete, &REMOVE, &keys, &args)
            .await
            .map(drop)
    }
}

/// An edge's lifetime in ms for the scripts, or `inf`.
fn lifetime_arg(lifetime: Option<std::time::Duration>) -> String {
    lifetime.map_or_else(|| "inf".to_owned(), |l| l.as_millis().max(1).to_string())
}
