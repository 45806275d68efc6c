//! The original README's "Microservice Integration" (FastAPI) as an axum service, with a
//! Prometheus `/metrics` endpoint fed by ncm-cache's `metrics` emission.
//!
//! `cargo run -p ncm-cache --all-features --example axum_service` serves on 127.0.0.1:3000
//! until Ctrl-C: `curl localhost:3000/users/123`, `curl localhost:3000/products`,
//! `curl localhost:3000/metrics`. Under `cargo xtask ci` (`NCM_CI_EXAMPLES=1`) it binds a free
//! port, calls its own endpoints once, checks the answers and exits.

use std::time::Duration;

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use ncm_cache::prelude::*;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct User {
    id: u64,
    name: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Product {
    id: u64,
    name: String,
}

#[derive(Clone)]
struct AppState {
    loader: CacheLoader,
    metrics: PrometheusHandle,
}

type Handler<T> = Result<Json<T>, (axum::http::StatusCode, String)>;

fn internal(e: CacheError) -> (axum::http::StatusCode, String) {
    (axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

async fn get_user(State(app): State<AppState>, Path(user_id): Path<u64>) -> Handler<User> {
    app.loader
        .load("user", user_id)
        .await
        .map(Json)
        .map_err(internal)
}

async fn get_products(State(app): State<AppState>) -> Handler<Vec<Product>> {
    app.loader
        .load("products", ())
        .await
        .map(Json)
        .map_err(internal)
}

async fn render_metrics(State(app): State<AppState>) -> String {
    app.metrics.render()
}

/// One HTTP/1.0 GET with a plain TCP socket (keeps the example free of an HTTP client crate).
async fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    Ok(response)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Install the Prometheus recorder before building caches: their metric handles bind to it.
    let metrics = PrometheusBuilder::new().install_recorder()?;

    // The cache: Redis when REDIS_URL is set, the embedded default otherwise.
    let cache = match std::env::var("REDIS_URL") {
        Ok(url) => (*RedisCache::from_url(&url).await?).clone(),
        Err(_) => Cache::builder(MemoryBackend::new(), Serializer::default())
            .default_ttl(Duration::from_secs(3600))
            .build(),
    };
    let loader = CacheLoader::new(cache);
    loader.register_loader(
        "user",
        |user_id: u64| async move {
            tokio::time::sleep(Duration::from_millis(5)).await; // the database
            Ok::<_, std::io::Error>(User {
                id: user_id,
                name: format!("User {user_id}"),
            })
        },
        Duration::from_secs(1800),
        CacheStrategy::CacheAside,
    )?;
    loader.register_loader(
        "products",
        |(): ()| async move {
            Ok::<_, std::io::Error>(vec![Product {
                id: 1,
                name: "Laptop".into(),
            }])
        },
        Duration::from_secs(300),
        CacheStrategy::CacheAside,
    )?;

    let app = Router::new()
        .route("/users/{user_id}", get(get_user))
        .route("/products", get(get_products))
        .route("/metrics", get(render_metrics))
        .with_state(AppState {
            loader,
            metrics: metrics.clone(),
        });

    let ci = std::env::var_os("NCM_CI_EXAMPLES").is_some();
    let listener =
        tokio::net::TcpListener::bind(if ci { "127.0.0.1:0" } else { "127.0.0.1:3000" }).await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    println!("serving on http://{addr}");
    if !ci {
        tokio::signal::ctrl_c().await?;
        server.abort();
        return Ok(());
    }

    for _ in 0..3 {
        let user = http_get(addr, "/users/123").await?;
        if !user.contains("\"name\":\"User 123\"") {
            return Err(format!("unexpected /users/123 answer: {user}").into());
        }
    }
    let products = http_get(addr, "/products").await?;
    if !products.contains("Laptop") {
        return Err(format!("unexpected /products answer: {products}").into());
    }
    let scrape = http_get(addr, "/metrics").await?;
    let hits = scrape
        .lines()
        .find(|l| l.starts_with("ncm_cache_operations_total") && l.contains("outcome=\"hit\""))
        .ok_or("no ncm_cache_operations_total hit series in /metrics")?;
    println!("GET /users/123 x3, /products: ok");
    println!("/metrics: {hits}");
    server.abort();
    Ok(())
}
