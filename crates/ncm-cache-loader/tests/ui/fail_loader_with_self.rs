use ncm_cache_loader::{CacheLoader, cache_loader};

struct Service {
    loader: CacheLoader,
}

impl Service {
    #[cache_loader(loader = self.loader)]
    async fn get_user(&self, id: u64) -> Result<String, String> {
        Ok(id.to_string())
    }
}

fn main() {}
