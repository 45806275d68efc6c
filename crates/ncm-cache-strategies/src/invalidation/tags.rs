//! Tags: labels attached to keys when they are written; invalidating a tag deletes every key
//! carrying it (and, transitively, the keys that depend on those).

use ncm_cache_core::Result;

use super::dependency::{key_node, tag_node};
use super::{Invalidator, check_name};
use crate::stats::Kind;

impl Invalidator {
    /// Attaches `tags` to `key` (added to the tags it already has).
    /// Tags `key` for `lifetime` (the TTL it is written with; `None`: until it is deleted).
    pub(crate) async fn add_tags(
        &self,
        key: &str,
        tags: &[String],
        lifetime: Option<std::time::Duration>,
    ) -> Result<()> {
        ncm_cache_core::validate_key(key, ncm_cache_core::DEFAULT_MAX_KEY_LEN)?;
        let nodes: Vec<String> = tags
            .iter()
            .map(|t| check_name("tag", t).map(|()| tag_node(t)))
            .collect::<Result<_>>()?;
        self.graph.add(&key_node(key), &nodes, lifetime).await
    }

    /// Deletes every key tagged `tag`; returns how many keys were invalidated.
    pub(crate) async fn invalidate_tag(&self, tag: &str) -> Result<u64> {
        check_name("tag", tag)?;
        let keys = self.graph.invalidate(&tag_node(tag)).await?;
        self.delete_keys(&keys, Kind::Tag).await?;
        Ok(keys.len() as u64)
    }
}
