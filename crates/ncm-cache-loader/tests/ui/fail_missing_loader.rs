use ncm_cache_loader::cache_loader;

#[cache_loader(ttl = "1h")]
async fn get_user(id: u64) -> Result<String, String> {
    Ok(id.to_string())
}

fn main() {}
