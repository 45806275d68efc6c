use std::sync::LazyLock;

use ncm_cache_codec::Serializer;
use ncm_cache_core::Cache;
use ncm_cache_loader::{CacheLoader, cache_loader};
use ncm_cache_memory::MemoryBackend;

static LOADER: LazyLock<CacheLoader> =
    LazyLock::new(|| CacheLoader::new(Cache::new(MemoryBackend::new(), Serializer::default())));

#[cache_loader(loader = LOADER)]
async fn get<T: Default + serde::Serialize + serde::de::DeserializeOwned + Send + 'static>(
    id: u64,
) -> Result<T, String> {
    let _ = id;
    Ok(T::default())
}

fn main() {}
