use ncm_cache_loader::{CacheLoader, cache_loader};

static LOADER: std::sync::LazyLock<CacheLoader> = std::sync::LazyLock::new(|| panic!("compile-fail fixture: never run"));

#[cache_loader(loader = LOADER)]
async fn touch(id: u64) {
    let _ = id;
}

fn main() {}
