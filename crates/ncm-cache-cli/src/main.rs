//! The `ncm-cache` command-line tool.
//!
//! - `demo [--redis URL]` — a guided tour of every capability, on the embedded memory backend
//!   by default (no server, no configuration) or on Redis.
//! - `bench` — a workload generator: throughput, latency percentiles and hit rate.
//! - `inspect KEY --redis URL` — the envelope, TTL and decoded value of one Redis key.
//! - `stats --redis URL` — server information and key counts per prefix.

mod bench;
mod demo;
mod demo_more;
mod redis_tools;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Every command returns this; errors are printed by `main`, never panicked on.
pub(crate) type CliResult<T = ()> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

#[derive(Parser, Debug)]
#[command(
    name = "ncm-cache",
    version,
    about = "ncm-cache: a guided demo, a workload generator, and Redis key inspection"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// A guided tour: the original's complete example, basic ops, multi-level caching,
    /// loaders, codecs and stats. Runs on the embedded memory backend unless --redis is given.
    Demo {
        /// Run the tour on this Redis (`redis://host:port/db`) instead of in memory.
        #[arg(long, value_name = "URL")]
        redis: Option<String>,
    },
    /// A workload generator: reads and writes over a Zipf-distributed key space.
    Bench(bench::BenchArgs),
    /// Shows the raw envelope, TTL and decoded value of one key in Redis.
    Inspect {
        /// The key (the URL's `key_prefix`, if any, is prepended).
        key: String,
        /// The Redis to read from.
        #[arg(long, value_name = "URL")]
        redis: String,
    },
    /// Server information and key counts per prefix (SCAN, never KEYS).
    Stats {
        /// The Redis to read from.
        #[arg(long, value_name = "URL")]
        redis: String,
        /// Count only keys starting with this prefix (grouped by what follows it).
        #[arg(long)]
        prefix: Option<String>,
        /// Stop after scanning this many keys.
        #[arg(long, default_value_t = 100_000)]
        max_keys: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Demo { redis } => demo::run(redis.as_deref()).await,
            Command::Bench(args) => bench::run(args).await,
            Command::Inspect { key, redis } => redis_tools::inspect(&redis, &key).await,
            Command::Stats {
                redis,
                prefix,
                max_keys,
            } => redis_tools::stats(&redis, prefix.as_deref(), max_keys).await,
        }
    });
    // Background tasks (health loops, pub/sub) must not keep the process alive.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
