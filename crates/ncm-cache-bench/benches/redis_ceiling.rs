//! How far batching can take 64 tasks' GETs on this machine: the issue-21 row (`RedisCache`
//! beside raw redis-rs `ConnectionManager`) beside two reference clients built here only to
//! measure, never used by the library:
//! - `redis-rs, 4 MGET drivers`: the same queue of callers served by four long-lived tasks,
//!   each sending what is queued as one `MGET` through a `ConnectionManager`;
//! - `own socket, 4 MGETs in flight`: the same queue written as `MGET`s on a socket of its
//!   own (one writer, one reader task, no redis-rs connection in between) — a ceiling for a
//!   batching client of 64 tokio tasks on this server, not a product (no reconnect, no
//!   timeouts, no auth).
//!
//! Rows go to `$NCM_BENCH_OUT/redis_ceiling.json`, each beside raw redis-rs in the same round.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use ncm_cache_bench::{Row, median, quick, redis_and_raw, spread, throughput, write_rows};
use ncm_cache_core::{CacheBackend, SharedBackend};
use ncm_cache_testkit::RedisServer;
use redis::aio::ConnectionManager;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{Notify, Semaphore, oneshot};

const KEYS: usize = 1000;
const TASKS: usize = 64;
/// Batches in flight at once, as `RedisCache`'s batcher allows.
const IN_FLIGHT: usize = 4;

type Reply = oneshot::Sender<Option<Vec<u8>>>;

/// Callers' reads waiting for a batch.
struct Queue {
    calls: Mutex<VecDeque<(String, Reply)>>,
    ready: Notify,
}

impl Queue {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            calls: Mutex::new(VecDeque::new()),
            ready: Notify::new(),
        })
    }

    fn take(&self) -> Vec<(String, Reply)> {
        let mut q = self.calls.lock().unwrap();
        let n = q.len().min(256);
        q.drain(..n).collect()
    }

    async fn get(&self, key: String) -> Option<Vec<u8>> {
        let (tx, rx) = oneshot::channel();
        self.calls.lock().unwrap().push_back((key, tx));
        self.ready.notify_one();
        rx.await.unwrap()
    }
}

/// Four long-lived tasks, each sending what is queued as one MGET through redis-rs.
fn redis_rs_drivers(conn: &ConnectionManager) -> Arc<Queue> {
    let queue = Queue::new();
    for _ in 0..IN_FLIGHT {
        let queue = Arc::clone(&queue);
        let mut conn = conn.clone();
        tokio::spawn(async move {
            loop {
                let batch = queue.take();
                if batch.is_empty() {
                    queue.ready.notified().await;
                    continue;
                }
                let mut mget = redis::cmd("MGET");
                for (key, _) in &batch {
                    mget.arg(key);
                }
                let values: Vec<Option<Vec<u8>>> = mget.query_async(&mut conn).await.unwrap();
                for ((_, tx), v) in batch.into_iter().zip(values) {
                    let _ = tx.send(v);
                }
            }
        });
    }
    queue
}

/// One writer and one reader task on a socket of their own: MGETs, at most four in flight.
async fn own_socket(addr: std::net::SocketAddr) -> Arc<Queue> {
    let queue = Queue::new();
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (read, mut write) = stream.into_split();
    let waiting: Arc<Mutex<VecDeque<Vec<Reply>>>> = Arc::default();
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let (q, w, s) = (Arc::clone(&queue), Arc::clone(&waiting), Arc::clone(&slots));
    tokio::spawn(async move {
        let mut buf = Vec::new();
        loop {
            q.ready.notified().await;
            loop {
                let permit = s.acquire().await.unwrap();
                let batch = q.take();
                if batch.is_empty() {
                    break;
                }
                permit.forget();
                buf.clear();
                buf.extend_from_slice(format!("*{}\r\n$4\r\nMGET\r\n", batch.len() + 1).as_bytes());
                let mut replies = Vec::with_capacity(batch.len());
                for (key, tx) in batch {
                    buf.extend_from_slice(format!("${}\r\n{key}\r\n", key.len()).as_bytes());
                    replies.push(tx);
                }
                w.lock().unwrap().push_back(replies);
                write.write_all(&buf).await.unwrap();
            }
        }
    });
    tokio::spawn(async move {
        let mut read = BufReader::with_capacity(1 << 16, read);
        let mut line = String::new();
        loop {
            line.clear();
            read.read_line(&mut line).await.unwrap();
            let n: usize = line[1..].trim().parse().unwrap();
            let replies = waiting.lock().unwrap().pop_front().unwrap();
            assert_eq!(n, replies.len(), "one value per key");
            for tx in replies {
                line.clear();
                read.read_line(&mut line).await.unwrap();
                let len: i64 = line[1..].trim().parse().unwrap();
                // A bulk string and its CRLF, or a nil (`$-1`).
                let value = match usize::try_from(len) {
                    Ok(len) => {
                        let mut v = vec![0u8; len + 2];
                        read.read_exact(&mut v).await.unwrap();
                        v.truncate(len);
                        Some(v)
                    }
                    Err(_) => None,
                };
                let _ = tx.send(value);
            }
            slots.add_permits(1);
        }
    });
    queue
}

fn main() {
    let filter = std::env::var("NCM_BENCH_FILTER").unwrap_or_default();
    if !filter.is_empty() && !"redis_ceiling".contains(&filter) {
        return;
    }
    let server = RedisServer::start().expect("redis-server is needed for the Redis benches");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (rounds, per_task) = if quick() { (4, 1500) } else { (8, 3000) };
    let (ours, raw, drivers, socket): (SharedBackend, ConnectionManager, _, _) =
        rt.block_on(async {
            let (ours, raw) = redis_and_raw(&server.url()).await.unwrap();
            for i in 0..KEYS {
                ours.set(&format!("k{i}"), vec![b'x'; 100].into(), None)
                    .await
                    .unwrap();
            }
            let drivers = redis_rs_drivers(&raw);
            let socket = own_socket(server.addr()).await;
            (ours, raw, drivers, socket)
        });
    let key = |i: usize| format!("k{}", spread(i, KEYS));
    let mut samples: [Vec<f64>; 4] = Default::default();
    // Reads and commands (GET + MGET) of our client's rounds: how large its batches were.
    let commands = || server.command_calls("GET").unwrap() + server.command_calls("MGET").unwrap();
    let (mut our_reads, mut our_commands) = (0u64, 0u64);
    for round in 0..rounds {
        let mut order = [0, 1, 2, 3];
        order.rotate_left(round % 4);
        for which in order {
            let before = (which == 1).then(commands);
            let ops = rt.block_on(async {
                match which {
                    0 => {
                        let raw = raw.clone();
                        throughput(TASKS, per_task, move |i| {
                            let mut raw = raw.clone();
                            async move {
                                let v: Option<Vec<u8>> = redis::cmd("GET")
                                    .arg(key(i))
                                    .query_async(&mut raw)
                                    .await
                                    .unwrap();
                                assert!(v.is_some());
                            }
                        })
                        .await
                    }
                    1 => {
                        let ours = Arc::clone(&ours);
                        throughput(TASKS, per_task, move |i| {
                            let ours = Arc::clone(&ours);
                            async move {
                                assert!(ours.get(&key(i)).await.unwrap().is_some());
                            }
                        })
                        .await
                    }
                    n => {
                        let queue = Arc::clone(if n == 2 { &drivers } else { &socket });
                        throughput(TASKS, per_task, move |i| {
                            let queue = Arc::clone(&queue);
                            async move {
                                assert!(queue.get(key(i)).await.is_some());
                            }
                        })
                        .await
                    }
                }
            });
            if let Some(before) = before {
                our_commands += commands() - before;
                our_reads += (TASKS * per_task) as u64;
            }
            samples[which].push(ops);
        }
    }
    let [raw_ops, ours_ops, drivers_ops, socket_ops] = samples.map(|mut s| median(&mut s));
    let baseline = "redis-rs ConnectionManager";
    let rows: Vec<Row> = [
        ("redis_ceiling_get_64tasks_100B_ours", ours_ops),
        (
            "redis_ceiling_get_64tasks_100B_redis_rs_4_mget_drivers",
            drivers_ops,
        ),
        (
            "redis_ceiling_get_64tasks_100B_own_socket_4_mgets",
            socket_ops,
        ),
    ]
    .into_iter()
    .map(|(name, ours)| Row {
        name: name.into(),
        ours,
        baseline: raw_ops,
        baseline_name: baseline.into(),
        unit: "ops/s".into(),
        ratio: ours / raw_ops,
    })
    .collect();
    for r in &rows {
        println!(
            "{:<58} {:>9.0} ops/s  beside {:>9.0} ({baseline})  ratio {:.2}",
            r.name, r.ours, r.baseline, r.ratio
        );
    }
    println!(
        "RedisCache: {our_reads} reads in {our_commands} GET/MGET commands ({:.1} reads per command)",
        our_reads as f64 / our_commands.max(1) as f64
    );
    write_rows("redis_ceiling", &rows).unwrap();
}
