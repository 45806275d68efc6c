//! Without the `redis` feature there is no backplane: publishing is a no-op.

use ncm_cache_core::Codec;

use crate::cache::Inner;

impl<C: Codec> Inner<C> {
    pub(crate) async fn publish_set(&self, _key: &str) {}
    pub(crate) async fn publish_delete(&self, _key: &str) {}
    pub(crate) async fn publish_clear(&self) {}
}
