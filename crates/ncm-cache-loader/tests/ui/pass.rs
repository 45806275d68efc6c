use std::sync::LazyLock;
use std::time::Duration;

use ncm_cache_codec::Serializer;
use ncm_cache_core::{Cache, CacheStrategy};
use ncm_cache_loader::{CacheLoader, cache_loader, cache_method};
use ncm_cache_memory::MemoryBackend;

static LOADER: LazyLock<CacheLoader> =
    LazyLock::new(|| CacheLoader::new(Cache::new(MemoryBackend::new(), Serializer::default())));

fn loader() -> &'static CacheLoader {
    &LOADER
}

#[derive(Debug)]
struct DbError;

type AppResult<T> = Result<T, DbError>;
type Lookup<T> = Result<T, DbError>;
type Maybe<T> = Option<T>;

#[cache_loader(loader = LOADER)]
async fn alias_without_result_in_its_name(id: u64) -> Lookup<u64> {
    Ok(id)
}

#[cache_loader(loader = LOADER, mode = option, cache_none = true)]
async fn option_alias(id: u64) -> Maybe<u64> {
    Some(id)
}

#[cache_loader(loader = LOADER, mode = "value")]
async fn cached_as_a_whole(id: u64) -> Result<u64, String> {
    Ok(id)
}

#[cache_loader(loader = LOADER, key = format!("{}:{id}", std::any::type_name::<T>()))]
async fn generic_with_a_key<T: Default + serde::Serialize + serde::de::DeserializeOwned + Send + 'static>(
    id: u64,
) -> Result<T, DbError> {
    let _ = id;
    Ok(T::default())
}

#[cache_loader(loader = LOADER, ttl = "1h 30m", strategy = ReadThrough)]
async fn profile(user_id: u64) -> Result<String, DbError> {
    Ok(format!("{user_id}"))
}

#[cache_loader(loader = loader(), ttl = 0.5, strategy = CacheStrategy::WriteBehind, name = "n")]
pub(crate) async fn aliased(a: u8, mut b: Vec<String>) -> AppResult<Vec<String>> {
    b.push(a.to_string());
    Ok(b)
}

#[cache_loader(loader = LOADER, strategy = "write_around", ttl = Duration::from_secs(5))]
async fn plain() -> u32 {
    7
}

struct Service {
    loader: std::sync::Arc<CacheLoader>,
}

impl Service {
    #[cache_method(loader = self.loader, ttl = 1800, key = format!("email:{email}"))]
    async fn by_email(&self, email: &str) -> Result<String, DbError> {
        Ok(email.to_owned())
    }

    #[cache_method(loader = self.loader, cache_none = true)]
    async fn maybe(&mut self, id: u32) -> Option<u32> {
        Some(id)
    }

    #[cache_method(loader = LOADER)]
    async fn owned(self, id: u32) -> String {
        id.to_string()
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        assert_eq!(profile(1).await.unwrap(), "1");
        assert_eq!(aliased(1, vec![]).await.unwrap(), vec!["1".to_string()]);
        assert_eq!(plain().await, 7);
        let mut svc = Service { loader: std::sync::Arc::new(LOADER.clone()) };
        assert_eq!(svc.by_email("a").await.unwrap(), "a");
        assert_eq!(svc.maybe(3).await, Some(3));
        assert_eq!(svc.owned(4).await, "4");
    });
}
