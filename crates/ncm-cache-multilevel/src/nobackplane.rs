//! Without the `redis` feature there is no backplane: publishing is a no-op.

use ncm_cache_core::Codec;

use crate::cache::Inner;

impl<C: Codec> Inner<C> {
    pub(crate) async fn write_and_publish(
        &self,
        _key: &str,
        _bytes: &ncm_cache_core::Bytes,
        _ttl: Option<std::time::Duration>,
    ) -> Option<ncm_cache_core::Result<()>> {
        None
    }
    pub(crate) fn queue_delete(&self, _key: &str) {}
    pub(crate) fn queue_clear(&self) {}
    pub(crate) fn queue_pattern(&self, _pattern: &str) {}
    pub(crate) async fn publish_loads<'k>(&self, _keys: impl Iterator<Item = &'k str>) {}
    pub(crate) async fn publish_loaded(&self, _key: &str) {}
    pub(crate) async fn publish_local(&self, _key: &str) {}
    pub(crate) async fn publish_deletes<'k>(&self, _keys: impl Iterator<Item = &'k str>) {}
    pub(crate) async fn publish_set(&self, _key: &str) {}
    pub(crate) async fn publish_delete(&self, _key: &str) {}
    pub(crate) async fn publish_withdrawn(&self, _key: &str) {}
    pub(crate) async fn publish_clear(&self) {}
    pub(crate) async fn publish_pattern(&self, _pattern: &str) {}
}
