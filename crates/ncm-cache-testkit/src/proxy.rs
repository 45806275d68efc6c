//! A TCP fault proxy on loopback: put it between a client and a server to delay, stall, refuse
//! and cut connections while the test runs.
//!
//! It is plain threads and blocking sockets, so it keeps working whatever the test's async
//! runtime is doing. Every thread polls with a short timeout and ends when the proxy is dropped.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crate::process::TestkitError;

/// How often blocked threads look at the proxy's state.
const TICK: Duration = Duration::from_millis(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const BUF: usize = 64 * 1024;

/// What the proxy does with traffic; see [`FaultProxy::set_mode`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProxyMode {
    /// Forward everything at once.
    Pass,
    /// Forward every chunk only after this delay, in both directions (added latency).
    Delay(Duration),
    /// Forward nothing but keep every connection open, like a network partition: bytes wait
    /// in the proxy and the kernel and arrive late when the mode changes back (TCP never loses
    /// bytes silently, so neither does this). New connections are accepted but stall too.
    Stall,
    /// Close new connections as soon as they are accepted (existing ones keep working; combine
    /// with [`FaultProxy::cut`] to drop everything).
    Refuse,
}

#[derive(Debug)]
struct Shared {
    mode: Mutex<ProxyMode>,
    /// Bumped by `cut`: a connection opened in an older generation closes itself.
    generation: AtomicU64,
    /// Bumped on drop: every thread ends.
    stopped: AtomicU64,
    open: AtomicUsize,
    accepted: AtomicUsize,
    next_id: AtomicU64,
    /// Every live socket (connection id, generation, socket), so `cut` can shut them down.
    sockets: Mutex<Vec<(u64, u64, TcpStream)>>,
}

impl Shared {
    fn mode(&self) -> ProxyMode {
        *self.mode.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn stopped(&self) -> bool {
        self.stopped.load(Ordering::Relaxed) != 0
    }
}

/// A TCP proxy on `127.0.0.1` that forwards to one target and injects faults on demand.
///
/// ```no_run
/// use std::time::Duration;
/// use ncm_cache_testkit::{FaultProxy, ProxyMode, RedisServer};
///
/// let server = RedisServer::start()?;
/// let proxy = FaultProxy::start(server.addr())?;
/// let url = proxy.url(); // give this to the client instead of server.url()
/// proxy.set_mode(ProxyMode::Delay(Duration::from_millis(200)));
/// proxy.set_mode(ProxyMode::Stall); // a partition
/// proxy.cut(); // every open connection is closed
/// proxy.set_mode(ProxyMode::Pass); // healed
/// # let _ = url;
/// # Ok::<(), ncm_cache_testkit::TestkitError>(())
/// ```
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    target: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
    _lease: crate::process::PortLease,
}

impl FaultProxy {
    /// Starts a proxy on a free loopback port forwarding to `target` (which must be a loopback
    /// address: fault tests never touch other hosts).
    pub fn start(target: SocketAddr) -> Result<Self, TestkitError> {
        if !target.ip().is_loopback() {
            return Err(TestkitError::Command {
                what: "FaultProxy::start".into(),
                detail: format!("{target} is not a loopback address; fault tests stay on loopback"),
            });
        }
        let spawn_err = |what: &str| {
            let what = what.to_owned();
            move |source| TestkitError::Spawn { what, source }
        };
        // On a leased port (see `PortLease`): never a killed server's port that clients may
        // still reconnect to.
        let (listener, lease) = {
            let mut attempt = 0;
            loop {
                attempt += 1;
                let lease = crate::process::free_port(false)?;
                match TcpListener::bind((Ipv4Addr::LOCALHOST, lease.port())) {
                    Ok(listener) => break (listener, lease),
                    Err(_) if attempt < 20 => {}
                    Err(e) => return Err(spawn_err("binding the fault proxy")(e)),
                }
            }
        };
        listener
            .set_nonblocking(true)
            .map_err(spawn_err("configuring the fault proxy"))?;
        let addr = listener
            .local_addr()
            .map_err(spawn_err("reading the proxy address"))?;
        let shared = Arc::new(Shared {
            mode: Mutex::new(ProxyMode::Pass),
            generation: AtomicU64::new(0),
            stopped: AtomicU64::new(0),
            open: AtomicUsize::new(0),
            accepted: AtomicUsize::new(0),
            next_id: AtomicU64::new(0),
            sockets: Mutex::new(Vec::new()),
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name(format!("fault-proxy-{}", addr.port()))
                .spawn(move || accept_loop(&listener, target, &shared))
                .map_err(spawn_err("spawning the proxy thread"))?
        };
        Ok(Self {
            addr,
            target,
            shared,
            acceptor: Some(acceptor),
            _lease: lease,
        })
    }

    /// The proxy's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The proxy's port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Where the proxy forwards to.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// `redis://127.0.0.1:<proxy port>`: a Redis URL that goes through the proxy.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Changes what the proxy does from now on (also for connections already open).
    pub fn set_mode(&self, mode: ProxyMode) {
        *self
            .shared
            .mode
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = mode;
    }

    /// The current mode.
    pub fn mode(&self) -> ProxyMode {
        self.shared.mode()
    }

    /// Closes every open connection at once (both sides see the socket shut down); bytes still
    /// waiting in the proxy are discarded. New connections are accepted as the mode says.
    pub fn cut(&self) {
        let generation = self.shared.generation.fetch_add(1, Ordering::SeqCst);
        let sockets = self
            .shared
            .sockets
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for (_, g, socket) in sockets.iter() {
            if *g <= generation {
                let _ = socket.shutdown(Shutdown::Both);
            }
        }
    }

    /// Connections open right now.
    pub fn open_connections(&self) -> usize {
        self.shared.open.load(Ordering::Relaxed)
    }

    /// Connections accepted since the start (including refused ones).
    pub fn accepted_connections(&self) -> usize {
        self.shared.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stopped.store(1, Ordering::Relaxed);
        self.cut();
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, target: SocketAddr, shared: &Arc<Shared>) {
    while !shared.stopped() {
        match listener.accept() {
            Ok((client, _)) => {
                shared.accepted.fetch_add(1, Ordering::Relaxed);
                if shared.mode() == ProxyMode::Refuse {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let shared = Arc::clone(shared);
                let _ = thread::Builder::new()
                    .name("fault-proxy-conn".into())
                    .spawn(move || connection(client, target, &shared));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(TICK),
            Err(_) => thread::sleep(TICK),
        }
    }
}

/// Runs one proxied connection: two pumps, one per direction, until either side closes or the
/// connection is cut.
fn connection(client: TcpStream, target: SocketAddr, shared: &Arc<Shared>) {
    let generation = shared.generation.load(Ordering::SeqCst);
    // A stalled proxy stalls the connect too (the client sees a handshake that never answers).
    while shared.mode() == ProxyMode::Stall && !shared.stopped() {
        if shared.generation.load(Ordering::SeqCst) != generation {
            let _ = client.shutdown(Shutdown::Both);
            return;
        }
        thread::sleep(TICK);
    }
    let Ok(server) = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let pair = (|| {
        Ok::<_, io::Error>((
            client.try_clone()?,
            server.try_clone()?,
            server.try_clone()?,
            client.try_clone()?,
        ))
    })();
    let Ok((client_r, server_w, server_r, client_w)) = pair else {
        return;
    };
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    {
        let mut sockets = shared
            .sockets
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        sockets.push((id, generation, client));
        sockets.push((id, generation, server));
    }
    shared.open.fetch_add(1, Ordering::Relaxed);
    let upstream = {
        let shared = Arc::clone(shared);
        thread::Builder::new()
            .name("fault-proxy-up".into())
            .spawn(move || pump(client_r, server_w, &shared, generation))
    };
    pump(server_r, client_w, shared, generation);
    if let Ok(upstream) = upstream {
        let _ = upstream.join();
    }
    shared.open.fetch_sub(1, Ordering::Relaxed);
    let mut sockets = shared
        .sockets
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    sockets.retain(|(i, _, _)| *i != id);
}

/// Copies `from` → `to` as the mode says; on any end, shuts both down so the other pump ends.
fn pump(mut from: TcpStream, mut to: TcpStream, shared: &Shared, generation: u64) {
    let _ = from.set_read_timeout(Some(TICK));
    let mut buf = vec![0u8; BUF];
    let alive = || !shared.stopped() && shared.generation.load(Ordering::SeqCst) == generation;
    'outer: while alive() {
        // While stalled, leave the bytes unread (in the kernel) so they arrive late, in order.
        if shared.mode() == ProxyMode::Stall {
            thread::sleep(TICK);
            continue;
        }
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => break,
        };
        // The mode may have changed while reading: honour a stall or a delay for this chunk.
        loop {
            if !alive() {
                break 'outer;
            }
            match shared.mode() {
                ProxyMode::Stall => thread::sleep(TICK),
                ProxyMode::Delay(d) => {
                    sleep_while(d, &alive);
                    break;
                }
                ProxyMode::Pass | ProxyMode::Refuse => break,
            }
        }
        if !alive() || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

/// Sleeps `d` in ticks, stopping early when `alive` turns false.
fn sleep_while(d: Duration, alive: &impl Fn() -> bool) {
    let mut left = d;
    while !left.is_zero() && alive() {
        let step = left.min(TICK);
        thread::sleep(step);
        left = left.saturating_sub(step);
    }
}
