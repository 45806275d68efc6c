use std::sync::LazyLock;

use ncm_cache_codec::Serializer;
use ncm_cache_core::Cache;
use ncm_cache_loader::{CacheLoader, cache_loader};
use ncm_cache_memory::MemoryBackend;

static LOADER: LazyLock<CacheLoader> =
    LazyLock::new(|| CacheLoader::new(Cache::new(MemoryBackend::new(), Serializer::default())));

type Maybe<T> = Option<T>;

#[cache_loader(loader = LOADER, mode = result)]
async fn not_a_result(id: u64) -> u64 {
    id
}

#[cache_loader(loader = LOADER, mode = sometimes)]
async fn unknown_mode(id: u64) -> u64 {
    id
}

#[cache_loader(loader = LOADER, cache_none = true)]
async fn alias_without_mode(id: u64) -> Maybe<u64> {
    Some(id)
}

#[cache_loader(loader = LOADER, key = id)]
async fn generic_return<R: Default + serde::Serialize + serde::de::DeserializeOwned + Send + 'static>(
    id: u64,
) -> R {
    let _ = id;
    R::default()
}

fn main() {}
