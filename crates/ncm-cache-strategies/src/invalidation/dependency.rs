//! Dependency-based invalidation: a graph "key depends on dependency", walked transitively
//! (cycle-safe) when a dependency is invalidated. In process, or in Redis (shared by every
//! instance, walked atomically by a Lua script).
//!
//! Nodes are namespaced: `k:<key>` for cache keys, `t:<tag>` for tags (tags are dependencies
//! that are not keys). Invalidating a node deletes every key node reachable from it, except
//! the node itself, and removes the edges of everything it reached, so the graph does not grow
//! with stale edges.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Mutex, PoisonError};

use ncm_cache_core::Result;

use super::{Invalidator, check_name};
use crate::stats::Kind;

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

    /// Records that `node` depends on each of `deps`.
    ///
    /// (Redis futures are boxed here and at the other Redis boundaries: redis-rs futures nest
    /// deeply, and boxing keeps callers' futures shallow enough for rustc's layout depth limit.)
    pub(crate) async fn add(&self, node: &str, deps: &[String]) -> Result<()> {
        match self {
            Self::Local(g) => {
                g.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .add(node, deps);
                Ok(())
            }
            #[cfg(feature = "redis")]
            Self::Redis(g) => Box::pin(g.add(node, deps)).await,
        }
    }

    /// Removes everything reachable from `root` and returns the keys reached (each once,
    /// across every caller: concurrent walks never return the same key twice).
    pub(crate) async fn invalidate(&self, root: &str) -> Result<Vec<String>> {
        match self {
            Self::Local(g) => Ok(g
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .invalidate(root)),
            #[cfg(feature = "redis")]
            Self::Redis(g) => Box::pin(g.invalidate(root)).await,
        }
    }
}

/// The in-process graph: forward edges (dependency → dependents) and reverse edges.
#[derive(Debug, Default)]
pub(crate) struct LocalGraph {
    dependents: HashMap<String, HashSet<String>>,
    depends_on: HashMap<String, HashSet<String>>,
}

impl LocalGraph {
    pub(crate) fn add(&mut self, node: &str, deps: &[String]) {
        for dep in deps {
            if dep == node {
                continue;
            }
            self.dependents
                .entry(dep.clone())
                .or_default()
                .insert(node.to_owned());
            self.depends_on
                .entry(node.to_owned())
                .or_default()
                .insert(dep.clone());
        }
    }

    /// Breadth-first walk with a visited set; the same algorithm as the Redis script.
    pub(crate) fn invalidate(&mut self, root: &str) -> Vec<String> {
        let mut visited: HashSet<String> = HashSet::from([root.to_owned()]);
        let mut order = vec![root.to_owned()];
        let mut queue = VecDeque::from([root.to_owned()]);
        let mut keys = Vec::new();
        while let Some(node) = queue.pop_front() {
            for m in self.dependents.get(&node).into_iter().flatten() {
                if visited.insert(m.clone()) {
                    order.push(m.clone());
                    queue.push_back(m.clone());
                    if let Some(key) = m.strip_prefix("k:") {
                        keys.push(key.to_owned());
                    }
                }
            }
        }
        for (i, node) in order.iter().enumerate() {
            self.dependents.remove(node);
            if i == 0 {
                continue; // the root keeps what it depends on
            }
            for dep in self.depends_on.remove(node).into_iter().flatten() {
                if !visited.contains(&dep)
                    && let Some(set) = self.dependents.get_mut(&dep)
                {
                    set.remove(node);
                    if set.is_empty() {
                        self.dependents.remove(&dep);
                    }
                }
            }
        }
        keys
    }

    #[cfg(test)]
    fn edges(&self) -> usize {
        self.dependents.values().map(HashSet::len).sum()
    }
}

impl Invalidator {
    /// Records that `key` depends on each of `dependencies` (keys or not).
    pub(crate) async fn add_dependencies(&self, key: &str, dependencies: &[String]) -> Result<()> {
        ncm_cache_core::validate_key(key, ncm_cache_core::DEFAULT_MAX_KEY_LEN)?;
        let deps: Vec<String> = dependencies
            .iter()
            .map(|d| check_name("dependency", d).map(|()| key_node(d)))
            .collect::<Result<_>>()?;
        self.graph.add(&key_node(key), &deps).await
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
        g.add(&key_node("b"), &deps(&["a"]));
        g.add(&key_node("c"), &deps(&["b"]));
        g.add(&key_node("d"), &deps(&["b", "c"])); // a diamond
        g.add(&key_node("a"), &deps(&["d"])); // and a cycle back to the root
        let mut keys = g.invalidate(&key_node("a"));
        keys.sort();
        assert_eq!(keys, ["b", "c", "d"]);
        assert_eq!(g.edges(), 0, "reached edges are removed");
        assert!(
            g.invalidate(&key_node("a")).is_empty(),
            "a second walk finds nothing"
        );
    }

    #[test]
    fn unrelated_edges_survive() {
        let mut g = LocalGraph::default();
        g.add(&key_node("user:1"), &deps(&["profile:1", "settings:1"]));
        g.add(&key_node("feed:1"), &deps(&["settings:1"]));
        assert_eq!(g.invalidate(&key_node("profile:1")), ["user:1"]);
        // user:1 no longer depends on settings:1; feed:1 still does.
        assert_eq!(g.invalidate(&key_node("settings:1")), ["feed:1"]);
        assert_eq!(g.edges(), 0);
    }
}
