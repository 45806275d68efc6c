use ncm_cache_loader::{CacheLoader, cache_loader};

static LOADER: std::sync::LazyLock<CacheLoader> = std::sync::LazyLock::new(|| unimplemented!());

#[cache_loader(loader = LOADER, ttl = "1h")]
fn get_user(id: u64) -> Result<String, String> {
    Ok(id.to_string())
}

fn main() {}
