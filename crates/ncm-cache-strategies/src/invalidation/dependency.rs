//! Dependency-based invalidation: a graph "key depends on dependency", walked transitively
//! (cycle-safe) when a dependency is invalidated. In process, or in Redis (shared by every
//! instance, walked atomically by a Lua script).
//!
//! Nodes are namespaced: `k:<key>` for cache keys, `t:<tag>` for tags (tags are dependencies
//! that are not keys). Invalidating a node deletes every key node reachable from it, except
//! the node itself. **Edges are declared facts**: a walk leaves them (a key it deletes and that
//! is cached again is reached again by the next walk); an edge ends when its dependent key is
//! deleted ([`CacheStrategies::invalidate`](crate::CacheStrategies::invalidate)) or when its
//! lifetime — the dependent key's TTL when the edge was declared — ends, so the graph is
//! bounded by the keys alive.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use ncm_cache_core::{KeyTtl, Result};

use super::{Invalidator, check_name};
use crate::stats::Kind;

/// How long an edge lives when its dependent key has no TTL to go by (declared before the key
/// was written): a day.
pub(crate) const UNKNOWN_KEY_EDGE_LIFETIME: Duration = Duration::from_secs(86_400);

/// The node of a cache key.
pub(crate) fn key_node(key: &str) -> String {
    format!("k:{key}")
}

/// The node of a tag.
pub(crate) fn tag_node(tag: &str) -> String {
    format!("t:{tag}")
}

/// Where the graph lives.
pub(crate) enum Graph {
    Local(Mutex<LocalGraph>),
    #[cfg(feature = "redis")]
    Redis(crate::remote::RedisGraph),
}

impl Graph {
    pub(crate) fn local() -> Self {
        Self::Local(Mutex::new(LocalGraph::default()))
    }

    /// Records that `node` depends on each of `deps`, for `lifetime` (`None`: until `node` is
    /// deleted).
    ///
    /// (Redis futures are boxed here and at the other Redis boundaries: redis-rs futures nest
    /// deeply, and boxing keeps callers' futures shallow enough for rustc's layout depth limit.)
    pub(crate) async fn add(
        &self,
        node: &str,
        deps: &[String],
        lifetime: Option<Duration>,
    ) -> Result<()> {
        match self {
            Self::Local(g) => {
                let until = lifetime.and_then(|l| Instant::now().checked_add(l));
                g.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .add(node, deps, until);
                Ok(())
            }
            #[cfg(feature = "redis")]
            Self::Redis(g) => Box::pin(g.add(node, deps, lifetime)).await,
        }
    }

    /// The keys reachable from `root` over live edges (each once per walk).
    pub(crate) async fn invalidate(&self, root: &str) -> Result<Vec<String>> {
        match self {
            Self::Local(g) => Ok(g
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .invalidate(root, Instant::now())),
            #[cfg(feature = "redis")]
            Self::Redis(g) => Box::pin(g.invalidate(root)).await,
        }
    }

    /// Ends `node`'s own edges (it was deleted).
    pub(crate) async fn remove(&self, node: &str) -> Result<()> {
        match self {
            Self::Local(g) => {
                g.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(node);
                Ok(())
            }
            #[cfg(feature = "redis")]
            Self::Redis(g) => Box::pin(g.remove(node)).await,
        }
    }
}

/// An edge's end (`None`: none).
type Until = Option<Instant>;

fn live(until: &Until, now: Instant) -> bool {
    until.is_none_or(|u| u > now)
}

/// The in-process graph: forward edges (dependency → dependents) and reverse edges, each with
/// its end.
#[derive(Debug, Default)]
pub(crate) struct LocalGraph {
    dependents: HashMap<String, HashMap<String, Until>>,
    depends_on: HashMap<String, HashMap<String, Until>>,
    /// Adds since the last sweep of expired edges.
    adds: usize,
}

impl LocalGraph {
    pub(crate) fn add(&mut self, node: &str, deps: &[String], until: Until) {
        for dep in deps {
            if dep == node {
                continue;
            }
            self.dependents
                .entry(dep.clone())
                .or_default()
                .insert(node.to_owned(), until);
            self.depends_on
                .entry(node.to_owned())
                .or_default()
                .insert(dep.clone(), until);
        }
        // Amortized: a full sweep every 1024 adds keeps expired edges bounded.
        self.adds += 1;
        if self.adds >= 1024 {
            self.adds = 0;
            self.sweep(Instant::now());
        }
    }

    fn sweep(&mut self, now: Instant) {
        for map in [&mut self.dependents, &mut self.depends_on] {
            map.retain(|_, edges| {
                edges.retain(|_, until| live(until, now));
                !edges.is_empty()
            });
        }
    }

    /// Breadth-first walk over live edges with a visited set; the same algorithm as the Redis
    /// script. Edges stay.
    pub(crate) fn invalidate(&mut self, root: &str, now: Instant) -> Vec<String> {
        let mut visited: HashSet<String> = HashSet::from([root.to_owned()]);
        let mut queue = VecDeque::from([root.to_owned()]);
        let mut keys = Vec::new();
        while let Some(node) = queue.pop_front() {
            let Some(edges) = self.dependents.get_mut(&node) else {
                continue;
            };
            edges.retain(|_, until| live(until, now));
            for m in edges.keys() {
                if visited.insert(m.clone()) {
                    queue.push_back(m.clone());
                    if let Some(key) = m.strip_prefix("k:") {
                        keys.push(key.to_owned());
                    }
                }
            }
        }
        keys
    }

    /// Ends `node`'s own edges.
    pub(crate) fn remove(&mut self, node: &str) {
        for dep in self
            .depends_on
            .remove(node)
            .into_iter()
            .flatten()
            .map(|(d, _)| d)
        {
            if let Some(set) = self.dependents.get_mut(&dep) {
                set.remove(node);
                if set.is_empty() {
                    self.dependents.remove(&dep);
                }
            }
        }
    }

    #[cfg(test)]
    fn edges(&self) -> usize {
        self.dependents.values().map(HashMap::len).sum()
    }
}

impl Invalidator {
    /// Records that `key` depends on each of `dependencies` (keys or not), for as long as
    /// `key` lives: `lifetime` when given (the TTL it is written with), else its remaining TTL
    /// in the cache, else (a key not written yet) [`UNKNOWN_KEY_EDGE_LIFETIME`].
    pub(crate) async fn add_dependencies(
        &self,
        key: &str,
        dependencies: &[String],
        lifetime: Option<Option<Duration>>,
    ) -> Result<()> {
        ncm_cache_core::validate_key(key, ncm_cache_core::DEFAULT_MAX_KEY_LEN)?;
        let deps: Vec<String> = dependencies
            .iter()
            .map(|d| check_name("dependency", d).map(|()| key_node(d)))
            .collect::<Result<_>>()?;
        let lifetime = match lifetime {
            Some(known) => known,
            None => self.key_lifetime(key).await,
        };
        self.graph.add(&key_node(key), &deps, lifetime).await
    }

    /// With the graph and the cache in one Redis (not a cluster): records `key`'s edges and
    /// writes its encoded value in one round trip. `false` when that does not apply (the
    /// caller records and writes separately).
    pub(crate) async fn add_dependencies_and_set(
        &self,
        key: &str,
        dependencies: &[String],
        lifetime: Option<Duration>,
        bytes: &[u8],
    ) -> Result<bool> {
        #[cfg(feature = "redis")]
        if let (Graph::Redis(graph), Some(remote)) = (&self.graph, &self.remote)
            && remote.shares_cache_on_one_node()
        {
            ncm_cache_core::validate_key(key, ncm_cache_core::DEFAULT_MAX_KEY_LEN)?;
            let deps: Vec<String> = dependencies
                .iter()
                .map(|d| check_name("dependency", d).map(|()| key_node(d)))
                .collect::<Result<_>>()?;
            let full = remote.full_key(key)?;
            Box::pin(graph.add_and_set(&key_node(key), &deps, lifetime, &full, bytes)).await?;
            return Ok(true);
        }
        let _ = (key, dependencies, lifetime, bytes);
        Ok(false)
    }

    /// How long `key` lives, from the cache: its remaining TTL; none when it never expires; a
    /// day when it is not there (yet).
    pub(crate) async fn key_lifetime(&self, key: &str) -> Option<Duration> {
        match self.backend.get_ttl(key).await {
            Ok(KeyTtl::Expires(left)) => Some(left),
            Ok(KeyTtl::Persistent) => None,
            _ => Some(UNKNOWN_KEY_EDGE_LIFETIME),
        }
    }

    /// Invalidates everything depending on `dependency`, transitively; returns how many keys.
    pub(crate) async fn invalidate_dependencies(&self, dependency: &str) -> Result<u64> {
        check_name("dependency", dependency)?;
        let keys = self.graph.invalidate(&key_node(dependency)).await?;
        self.delete_keys(&keys, Kind::Dependency).await?;
        Ok(keys.len() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deps(d: &[&str]) -> Vec<String> {
        d.iter().map(|s| key_node(s)).collect()
    }

    #[test]
    fn walks_transitively_once_per_key_and_survives_cycles() {
        let mut g = LocalGraph::default();
        g.add(&key_node("b"), &deps(&["a"]), None);
        g.add(&key_node("c"), &deps(&["b"]), None);
        g.add(&key_node("d"), &deps(&["b", "c"]), None); // a diamond
        g.add(&key_node("a"), &deps(&["d"]), None); // and a cycle back to the root
        let now = Instant::now();
        let mut keys = g.invalidate(&key_node("a"), now);
        keys.sort();
        assert_eq!(keys, ["b", "c", "d"]);
        let mut again = g.invalidate(&key_node("a"), now);
        again.sort();
        assert_eq!(
            again,
            ["b", "c", "d"],
            "edges are declared facts: they stay"
        );
    }

    #[test]
    fn a_walk_keeps_other_edges_and_deletion_or_expiry_ends_them() {
        let mut g = LocalGraph::default();
        let now = Instant::now();
        g.add(
            &key_node("user:1"),
            &deps(&["profile:1", "settings:1"]),
            None,
        );
        g.add(
            &key_node("feed:1"),
            &deps(&["settings:1"]),
            Some(now + Duration::from_secs(10)),
        );
        assert_eq!(g.invalidate(&key_node("profile:1"), now), ["user:1"]);
        // user:1 still depends on settings:1 (before: the walk dropped that edge).
        let mut keys = g.invalidate(&key_node("settings:1"), now);
        keys.sort();
        assert_eq!(keys, ["feed:1", "user:1"]);
        // feed:1's edge ends with its lifetime; user:1's when it is deleted.
        let later = now + Duration::from_secs(11);
        assert_eq!(g.invalidate(&key_node("settings:1"), later), ["user:1"]);
        g.remove(&key_node("user:1"));
        assert!(g.invalidate(&key_node("settings:1"), later).is_empty());
        g.sweep(later);
        assert_eq!(g.edges(), 0);
    }
}
