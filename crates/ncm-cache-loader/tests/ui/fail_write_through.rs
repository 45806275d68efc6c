use ncm_cache_loader::{CacheLoader, cache_loader};

static LOADER: std::sync::LazyLock<CacheLoader> = std::sync::LazyLock::new(|| panic!("compile-fail fixture: never run"));

#[cache_loader(loader = LOADER, strategy = WriteThrough)]
async fn get_user(id: u64) -> Result<String, String> {
    Ok(id.to_string())
}

fn main() {}
