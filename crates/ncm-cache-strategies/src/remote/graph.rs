//! The dependency/tag graph in Redis, shared by every instance.
//!
//! Sets `{prefix}__ncm:{ncm-deps}:d:<node>` (who depends on `node`) and
//! `{prefix}__ncm:{ncm-deps}:r:<node>` (what `node` depends on). Every key carries the hash tag
//! `{ncm-deps}`, so the whole graph lives in one slot and the walk can run as one atomic Lua
//! script even on a Redis Cluster. The trade-off: the graph is not spread over the cluster
//! (one node holds it and runs every walk), and a walk over a very large graph blocks that node
//! for its duration. Keys are discovered during the walk, so only the root's key is declared.

use std::sync::{Arc, LazyLock};

use ncm_cache_core::{Operation, Result};
use ncm_cache_redis::RedisBackend;
use redis::Script;

static ADD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local base, node = ARGV[1], ARGV[2]
for i = 3, #ARGV do
  if ARGV[i] ~= node then
    redis.call('SADD', base .. 'd:' .. ARGV[i], node)
    redis.call('SADD', base .. 'r:' .. node, ARGV[i])
  end
end
return #ARGV - 2
",
    )
});

/// Breadth-first walk with a visited set (cycle-safe); returns the reached keys (`k:` nodes,
/// without the root) and removes the edges of everything reached. Atomic: two instances
/// walking at once never both return a key.
static INVALIDATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local base, root = ARGV[1], ARGV[2]
local visited = { [root] = true }
local order = { root }
local head = 1
local keys = {}
while head <= #order do
  local node = order[head]
  head = head + 1
  for _, m in ipairs(redis.call('SMEMBERS', base .. 'd:' .. node)) do
    if not visited[m] then
      visited[m] = true
      order[#order + 1] = m
      if string.sub(m, 1, 2) == 'k:' then
        keys[#keys + 1] = string.sub(m, 3)
      end
    end
  end
end
for i, node in ipairs(order) do
  redis.call('DEL', base .. 'd:' .. node)
  if i > 1 then
    local r = base .. 'r:' .. node
    for _, dep in ipairs(redis.call('SMEMBERS', r)) do
      if not visited[dep] then
        redis.call('SREM', base .. 'd:' .. dep, node)
      end
    end
    redis.call('DEL', r)
  end
end
return keys
",
    )
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

    pub(crate) async fn add(&self, node: &str, deps: &[String]) -> Result<()> {
        if deps.is_empty() {
            return Ok(());
        }
        let mut args = Vec::with_capacity(deps.len() + 2);
        args.push(self.base.clone().into_bytes());
        args.push(node.as_bytes().to_vec());
        args.extend(deps.iter().map(|d| d.as_bytes().to_vec()));
        let keys = [format!("{}r:{node}", self.base)];
        self.backend
            .eval_script::<i64>(Operation::Set, &ADD, &keys, &args)
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
}
