use ncm_cache_loader::{CacheLoader, cache_method};

static LOADER: std::sync::LazyLock<CacheLoader> = std::sync::LazyLock::new(|| panic!("compile-fail fixture: never run"));

struct Service;

impl Service {
    #[cache_method(loader = LOADER)]
    async fn get_user(id: u64) -> Result<String, String> {
        Ok(id.to_string())
    }
}

fn main() {}
