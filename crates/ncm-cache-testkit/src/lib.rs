//! Test support for ncm-cache: throwaway Redis servers and clusters on loopback, and the backend conformance suite.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod cluster;
pub mod conformance;
mod process;
mod proxy;
mod sentinel;
mod server;

pub use cluster::RedisCluster;
pub use process::{TestkitError, redis_cli_binary, redis_server_binary};
pub use proxy::{FaultProxy, ProxyMode};
pub use sentinel::{MASTER_NAME, RedisSentinelSet};
pub use server::{RedisServer, RedisServerBuilder};
