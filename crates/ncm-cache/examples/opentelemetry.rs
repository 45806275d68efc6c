//! A request's cache path as OpenTelemetry spans: `tracing-opentelemetry` turns the spans of a
//! `MultiLevelCache` — `ncm_cache.get_or_load` (with the `l1` result and the value's `source`),
//! `ncm_cache.l2` (operation and result), `ncm_cache.load` (the loader's answer),
//! `ncm_cache.backplane.publish`, and `ncm_cache.get` for L1 hits (DEBUG level, with
//! `trace_l1_hits`) — into OTel
//! spans, nested under the caller's own span.
//!
//! The exporter here prints each span (a real service uses `opentelemetry-otlp` instead, with
//! the same layer), and the example checks that the spans it expects arrived, nested.
//!
//! ```text
//! cargo run -p ncm-cache --features multilevel --example opentelemetry
//! ```

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ncm_cache::prelude::*;
use ncm_cache::{EntryOptions, Loaded};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

/// Prints spans and keeps them for the checks at the end.
#[derive(Debug, Clone, Default)]
struct PrintExporter(Arc<Mutex<Vec<SpanData>>>);

impl SpanExporter for PrintExporter {
    fn export(&self, batch: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
        for span in &batch {
            let attributes: Vec<String> = span
                .attributes
                .iter()
                .map(|kv| format!("{}={}", kv.key, kv.value))
                .collect();
            println!(
                "span {:<28} id {} parent {} {}",
                span.name,
                span.span_context.span_id(),
                span.parent_span_id,
                attributes.join(" ")
            );
        }
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(batch);
        std::future::ready(Ok(()))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let exporter = PrintExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("ncm-cache-example")));
    tracing::subscriber::set_global_default(subscriber)?;

    let cache = MultiLevelCache::builder(MemoryBackend::new())
        .trace_l1_hits(true)
        .build()?;
    let request = tracing::info_span!("GET /users/42");
    async {
        // Miss everywhere: L1 miss, L2 get (miss), the loader, the L2 set.
        let options = EntryOptions::new().ttl(Duration::from_secs(60));
        cache
            .get_or_load_with::<String, _, _, std::io::Error>("user:42", &options, |_| async {
                Ok(Loaded::value("Ada".to_string()))
            })
            .await?;
        // Then an L1 hit.
        cache
            .get_or_load("user:42", || async {
                Ok::<_, std::io::Error>("Ada".to_string())
            })
            .await?;
        Ok::<_, ncm_cache::CacheError>(())
    }
    .instrument(request)
    .await?;
    provider.shutdown()?;

    let spans = exporter.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let find = |name: &str| {
        spans
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| format!("no span {name} was exported"))
    };
    let attr = |span: &SpanData, key: &str| {
        span.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value.to_string())
    };
    let request = find("GET /users/42")?;
    let load_path = find("ncm_cache.get_or_load")?;
    assert_eq!(load_path.parent_span_id, request.span_context.span_id());
    assert_eq!(attr(load_path, "l1").as_deref(), Some("miss"));
    assert_eq!(attr(load_path, "source").as_deref(), Some("Loader"));
    let l2: Vec<&SpanData> = spans.iter().filter(|s| s.name == "ncm_cache.l2").collect();
    assert!(
        l2.iter()
            .all(|s| s.parent_span_id == load_path.span_context.span_id()),
        "every L2 call nested in the load path"
    );
    let ops: Vec<String> = l2.iter().filter_map(|s| attr(s, "op")).collect();
    assert_eq!(ops, ["get", "set"]);
    let load = find("ncm_cache.load")?;
    assert_eq!(attr(load, "answer").as_deref(), Some("value"));
    let hit = find("ncm_cache.get")?;
    assert_eq!(attr(hit, "source").as_deref(), Some("L1"));
    assert_eq!(hit.parent_span_id, request.span_context.span_id());
    println!("{} spans exported, nested under the request", spans.len());
    Ok(())
}
