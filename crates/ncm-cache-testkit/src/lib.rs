//! Test support for ncm-cache: throwaway Redis servers and clusters on loopback, and the backend conformance suite.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod child;
mod cluster;
pub mod conformance;
mod process;
mod proxy;
mod sentinel;
mod server;

pub use child::{KilledChild, kill_child_after_marker};
pub use cluster::RedisCluster;
pub use process::{PortLease, TestkitError, redis_cli_binary, redis_server_binary};
pub use proxy::{FaultProxy, ProxyMode};
pub use sentinel::{MASTER_NAME, RedisSentinelSet};
pub use server::{RedisServer, RedisServerBuilder};
