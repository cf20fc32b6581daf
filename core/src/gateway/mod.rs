//! The WebSocket gateway: a tokio runtime on its own threads that accepts
//! sockets, checks the signed token at upgrade, and runs one small task per
//! connection that reads, decodes, handles and writes.
//!
//! One job per module: `listener` accepts sockets and admits upgrades,
//! `connection` runs a connection's task (socket I/O, heartbeats, stitching),
//! `dispatch` decides what one client frame does (no sockets: unit-tested), and
//! `bridge` is the engine's end (batches out, results and sync pages in).
//!
//! Memory per idle connection is the point of this shape: no read or write
//! buffer exists unless bytes are in flight, the send queue is an empty deque,
//! and heartbeats come from one sweep task instead of a timer per connection.

mod bridge;
mod connection;
pub mod dispatch;
mod listener;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, Notify};

use crate::hub::{now_ms, EngineEvent, Hub, SidePathConfig, WindowConfig};
use crate::protocol::Limits;
use crate::ratelimit::TokenBucket;
use crate::registry::CloseReason;
use crate::send_guard::UserId;
use crate::token::TokenVerifier;

pub use bridge::Tickets;
use dispatch::{BudgetRates, FrameBudget};

/// Every gateway setting. The defaults here are the only ones: Python's
/// configuration reads them (`pychat._core.gateway_defaults()`).
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub host: String,
    pub port: u16,
    pub secret: Vec<u8>,
    pub heartbeat_s: u64,
    /// Items a connection's send queue holds before the connection is closed. A `sync`
    /// backlog fills at most half of it (and waits for room), so live traffic keeps the rest.
    pub queue_capacity: usize,
    /// Live messages held back while a connection's `sync` is answered; past this they are
    /// dropped and the sync runs again from the store (no gap, no growth).
    pub sync_hold_capacity: usize,
    /// Bytes asked of the socket per read; the buffer exists only while a read
    /// is being decoded, so idle connections hold none.
    pub read_buffer_bytes: usize,
    pub runtime_threads: usize,
    /// Events waiting for the engine; past this, readers wait (backpressure).
    pub engine_queue_capacity: usize,
    pub window: WindowConfig,
    /// Consecutive refused frames after which a connection is closed.
    pub max_bad_frames: u32,
    pub limits: Limits,
    pub side_paths: SidePathConfig,
    /// How often typing expiry and presence changes are processed.
    pub tick_ms: u64,
    /// Upgrades accepted per second (and burst) before `rate_limited` answers.
    pub upgrades_per_s: f64,
    pub upgrade_burst: f64,
    /// Connections this process holds at most (0: no limit but the file limit), per user
    /// and per client address; past these an upgrade is refused (503 / 429).
    pub max_connections: usize,
    pub max_connections_per_user: usize,
    pub max_connections_per_address: usize,
    /// Accepted sockets whose upgrade is not done yet, in all and per client address;
    /// past these a socket is answered at once (503 / 429) and closed.
    pub max_handshakes: usize,
    pub handshakes_per_address: usize,
    /// A socket's upgrade request must be complete within this.
    pub handshake_timeout_ms: u64,
    /// `send` frames per second (and burst) per user, over all of its connections here.
    pub send_per_s: f64,
    pub send_burst: f64,
    /// Other frames (sync, pointers, typing, subscribe) per second (and burst) per user.
    pub requests_per_s: f64,
    pub requests_burst: f64,
    /// Users named in `presence.subscribe` frames per second (and burst) per user.
    pub presence_ids_per_s: f64,
    pub presence_ids_burst: f64,
    /// Browser origins allowed to open a WebSocket; empty: any.
    pub allowed_origins: Vec<String>,
    /// A node of a cluster (see `crate::cluster`); off on a single node.
    pub cluster: bool,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 0,
            secret: Vec::new(),
            heartbeat_s: 25,
            queue_capacity: 4096,
            sync_hold_capacity: 4096,
            read_buffer_bytes: 4096,
            runtime_threads: 2,
            engine_queue_capacity: 16_384,
            window: WindowConfig::default(),
            max_bad_frames: 20,
            limits: Limits::default(),
            side_paths: SidePathConfig::default(),
            tick_ms: 200,
            upgrades_per_s: 2_000.0,
            upgrade_burst: 4_000.0,
            max_connections: 0,
            max_connections_per_user: 32,
            max_connections_per_address: 4_096,
            max_handshakes: 4_096,
            handshakes_per_address: 256,
            handshake_timeout_ms: 3_000,
            send_per_s: 200.0,
            send_burst: 400.0,
            requests_per_s: 100.0,
            requests_burst: 200.0,
            presence_ids_per_s: 500.0,
            presence_ids_burst: 2_000.0,
            allowed_origins: Vec::new(),
            cluster: false,
        }
    }
}

/// What every task of the gateway shares.
pub(crate) struct Shared {
    pub(crate) hub: Arc<Hub>,
    pub(crate) upgrades: Mutex<TokenBucket>,
    pub(crate) config: GatewayConfig,
    pub(crate) verifier: TokenVerifier,
    pub(crate) events: mpsc::Sender<EngineEvent>,
    pub(crate) shutdown: Notify,
    pub(crate) next_conn: AtomicU64,
    pub(crate) started: Instant,
    /// Distinguishes session ids across restarts.
    pub(crate) boot_id: u64,
    /// Frame budgets of the users connected here, shared by each user's connections; an
    /// entry lives while its user has a connection.
    budgets: Mutex<HashMap<UserId, Arc<Mutex<FrameBudget>>>>,
    /// Connections held, in all and per client address (a slot per connection).
    pub(crate) connection_slots: Arc<listener::AddressSlots>,
}

impl Shared {
    pub(crate) fn clock_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The frame budget `user`'s connections share (made with its first connection).
    pub(crate) fn user_budget(&self, user: &UserId) -> Arc<Mutex<FrameBudget>> {
        let c = &self.config;
        let rates = BudgetRates {
            send_per_s: c.send_per_s,
            send_burst: c.send_burst,
            requests_per_s: c.requests_per_s,
            requests_burst: c.requests_burst,
            presence_ids_per_s: c.presence_ids_per_s,
            presence_ids_burst: c.presence_ids_burst,
        };
        self.budgets
            .lock()
            .entry(user.clone())
            .or_insert_with(|| Arc::new(Mutex::new(FrameBudget::new(rates, now_ms()))))
            .clone()
    }

    /// A connection of `user` ended: its budget goes with the user's last connection.
    pub(crate) fn release_budget(&self, user: &UserId, budget: Arc<Mutex<FrameBudget>>) {
        let mut budgets = self.budgets.lock();
        drop(budget);
        if budgets.get(user).is_some_and(|b| Arc::strong_count(b) == 1) {
            budgets.remove(user);
        }
    }

    /// Last-seen writes are best effort: under overload they are dropped, never waited for.
    pub(crate) fn persist_side_path(&self, ev: EngineEvent) {
        let _ = self.events.try_send(ev);
    }
}

/// A running gateway. Dropping it (or `shutdown`) stops the runtime.
pub struct Gateway {
    shared: Arc<Shared>,
    bridge: bridge::Bridge,
    runtime: Mutex<Option<Runtime>>,
    local_addr: SocketAddr,
}

impl Gateway {
    pub fn start(config: GatewayConfig) -> io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.runtime_threads.max(1))
            .thread_name("pychat-gateway")
            .enable_all()
            .build()?;
        let addr = std::net::ToSocketAddrs::to_socket_addrs(&(config.host.as_str(), config.port))?
            .next()
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "no address to listen on")
            })?;
        let (tx, rx) = mpsc::channel(config.engine_queue_capacity.max(1));
        let mut hub = Hub::with_config(
            config.limits.clone(),
            config.window.clone(),
            config.side_paths.clone(),
        );
        if config.cluster {
            hub.cluster = Some(crate::cluster::ClusterLink::default());
        }
        let hub = Arc::new(hub);
        let (config_max, per_address) =
            (config.max_connections, config.max_connections_per_address);
        let shared = Arc::new(Shared {
            hub,
            upgrades: Mutex::new(TokenBucket::new(
                config.upgrades_per_s,
                config.upgrade_burst,
                now_ms(),
            )),
            verifier: TokenVerifier::new(&config.secret),
            config,
            events: tx,
            shutdown: Notify::new(),
            next_conn: AtomicU64::new(1),
            started: Instant::now(),
            boot_id: now_ms(),
            budgets: Mutex::default(),
            connection_slots: listener::AddressSlots::new(
                if config_max == 0 {
                    usize::MAX
                } else {
                    config_max
                },
                per_address,
            ),
        });
        let listener = {
            let _guard = runtime.enter();
            listener::bind(addr)?
        };
        let local_addr = listener.local_addr()?;
        runtime.spawn(listener::accept_loop(shared.clone(), listener));
        runtime.spawn(side_path_ticker(shared.clone()));
        runtime.spawn(connection::heartbeat_sweep(shared.clone()));
        let bridge = bridge::Bridge::start(shared.clone(), rx)?;
        Ok(Self {
            shared,
            bridge,
            runtime: Mutex::new(Some(runtime)),
            local_addr,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.shared.hub
    }

    pub fn is_running(&self) -> bool {
        self.runtime.lock().is_some()
    }

    /// Closes every connection and stops the runtime.
    pub fn shutdown(&self) {
        let Some(rt) = self.runtime.lock().take() else {
            return;
        };
        self.shared.shutdown.notify_waiters();
        for c in self.shared.hub.registry.all() {
            c.close(CloseReason::ServerShutdown);
        }
        rt.shutdown_timeout(Duration::from_secs(2));
        self.bridge.stop();
        if let Some(link) = &self.shared.hub.cluster {
            link.wake();
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Expires typing states and presence grace periods, publishes presence changes.
async fn side_path_ticker(shared: Arc<Shared>) {
    let mut ticker = tokio::time::interval(Duration::from_millis(shared.config.tick_ms.max(10)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shared.shutdown.notified() => return,
            _ = ticker.tick() => {
                for ev in shared.hub.tick(now_ms()) {
                    shared.persist_side_path(ev);
                }
            }
        }
    }
}
