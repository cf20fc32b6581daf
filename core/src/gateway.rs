//! The WebSocket gateway: a tokio runtime on its own threads that accepts
//! sockets, checks the signed token at upgrade, and runs one small task per
//! connection that reads, decodes, handles and writes.
//!
//! Memory per idle connection is the point of this shape: no read or write
//! buffer exists unless bytes are in flight, the send queue is an empty deque,
//! and heartbeats come from one sweep task instead of a timer per connection.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, Notify};

use crate::hub::{
    now_ms, EngineEvent, EngineResult, Hub, SendAdmission, SidePathConfig, TicketOutcome,
};
use crate::metrics;
use crate::outbox::{Outgoing, Stitcher};
use crate::protocol::{self, ClientFrame, ErrorCode, FrameError, Limits, PointerKind, SendFrame};
use crate::ratelimit::TokenBucket;
use crate::registry::{CloseReason, ConnHandle};
use crate::sequencer::{Origin, UserId};
use crate::token::TokenVerifier;
use crate::websocket::{self, Decoder, HandshakeError, Message};

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub host: String,
    pub port: u16,
    pub secret: Vec<u8>,
    pub heartbeat_s: u64,
    /// Items a connection's send queue holds before the connection is closed.
    pub queue_capacity: usize,
    /// Bytes asked of the socket per read; the buffer exists only while a read
    /// is being decoded, so idle connections hold none.
    pub read_buffer_bytes: usize,
    pub runtime_threads: usize,
    /// Events waiting for the engine; past this, readers wait (backpressure).
    pub engine_queue_capacity: usize,
    pub window_capacity: usize,
    pub window_ttl_ms: u64,
    /// Consecutive refused frames after which a connection is closed.
    pub max_bad_frames: u32,
    pub limits: Limits,
    pub side_paths: SidePathConfig,
    /// How often typing expiry and presence changes are processed.
    pub tick_ms: u64,
    /// Upgrades accepted per second (and burst) before `rate_limited` answers.
    pub upgrades_per_s: f64,
    pub upgrade_burst: f64,
    /// Connections this process holds at most (0: no limit but the file limit).
    pub max_connections: usize,
    /// `send` frames per second (and burst) per connection.
    pub send_per_s: f64,
    pub send_burst: f64,
    /// Browser origins allowed to open a WebSocket; empty: any.
    pub allowed_origins: Vec<String>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 0,
            secret: Vec::new(),
            heartbeat_s: 25,
            queue_capacity: 4096,
            read_buffer_bytes: 4096,
            runtime_threads: 2,
            engine_queue_capacity: 16_384,
            window_capacity: 1_000_000,
            window_ttl_ms: 24 * 3600 * 1000,
            max_bad_frames: 20,
            limits: Limits::default(),
            side_paths: SidePathConfig::default(),
            tick_ms: 200,
            upgrades_per_s: 2_000.0,
            upgrade_burst: 4_000.0,
            max_connections: 0,
            send_per_s: 200.0,
            send_burst: 400.0,
            allowed_origins: Vec::new(),
        }
    }
}

struct Shared {
    hub: Arc<Hub>,
    upgrades: Mutex<TokenBucket>,
    config: GatewayConfig,
    verifier: TokenVerifier,
    events: mpsc::Sender<EngineEvent>,
    shutdown: Notify,
    next_conn: AtomicU64,
    started: Instant,
    /// Distinguishes session ids across restarts.
    boot_id: u64,
}

impl Shared {
    fn clock_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}

/// A stored batch waiting for its acks and fan-out.
type Completion = (Vec<EngineEvent>, Vec<EngineResult>);

/// Batches the engine has stored but the fan-out thread has not completed
/// yet; past this, `complete` waits (the engine never runs far ahead).
const COMPLETIONS_AHEAD: usize = 2;

/// REST tickets completed by the fan-out thread, for the engine to hand out.
#[derive(Default)]
struct Tickets {
    done: Mutex<Vec<(u64, TicketOutcome)>>,
    ready: Notify,
}

/// A running gateway. Dropping it (or `shutdown`) stops the runtime.
pub struct Gateway {
    shared: Arc<Shared>,
    events_rx: Mutex<mpsc::Receiver<EngineEvent>>,
    /// To the fan-out thread: acks and fan-out of batch k run there while
    /// the engine stores batch k+1 (in order: one thread, one queue).
    completions: Mutex<Option<std::sync::mpsc::SyncSender<Completion>>>,
    tickets: Arc<Tickets>,
    /// Drives the engine thread's waits; separate from the gateway runtime so
    /// a shutdown of that runtime never panics a waiting engine.
    engine_rt: Runtime,
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
        let hub = Arc::new(Hub::with_side_paths(
            config.limits.clone(),
            config.window_capacity,
            config.window_ttl_ms,
            config.side_paths.clone(),
        ));
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
        });
        let listener = {
            let _guard = runtime.enter();
            let socket = if addr.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            socket.set_reuseaddr(true)?;
            socket.bind(addr)?;
            // A deep accept queue: a reconnect storm waits in it instead of being reset.
            socket.listen(LISTEN_BACKLOG)?
        };
        let local_addr = listener.local_addr()?;
        runtime.spawn(accept_loop(shared.clone(), listener));
        runtime.spawn(side_path_ticker(shared.clone()));
        runtime.spawn(heartbeat_sweep(shared.clone()));
        let engine_rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()?;
        let tickets = Arc::new(Tickets::default());
        let (completions, completions_rx) = std::sync::mpsc::sync_channel(COMPLETIONS_AHEAD);
        {
            let (hub, tickets) = (shared.hub.clone(), tickets.clone());
            std::thread::Builder::new()
                .name("pychat-fanout".into())
                .spawn(move || complete_in_order(&hub, &tickets, completions_rx))?;
        }
        Ok(Self {
            shared,
            events_rx: Mutex::new(rx),
            completions: Mutex::new(Some(completions)),
            tickets,
            engine_rt,
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

    /// Blocks until at least one event is ready, REST tickets were completed
    /// (see `take_tickets`) or `timeout` passes, then takes up to `max`
    /// events. An empty batch after shutdown means stop.
    pub fn next_batch(&self, max: usize, timeout: Duration) -> Vec<EngineEvent> {
        let mut rx = self.events_rx.lock();
        let mut batch = Vec::new();
        if !self.is_running() {
            return batch;
        }
        let first = self.engine_rt.block_on(async {
            tokio::select! {
                ev = rx.recv() => ev,
                _ = self.tickets.ready.notified() => None,
                _ = tokio::time::sleep(timeout) => None,
            }
        });
        if let Some(ev) = first {
            batch.push(ev);
            while batch.len() < max {
                match rx.try_recv() {
                    Ok(ev) => batch.push(ev),
                    Err(_) => break,
                }
            }
            let counters = &self.shared.hub.counters;
            for ev in &batch {
                if let EngineEvent::Send { admitted, .. } = ev {
                    metrics::inc(&counters.sends_timed);
                    metrics::add(
                        &counters.send_to_engine_us,
                        admitted.elapsed().as_micros() as u64,
                    );
                }
            }
            metrics::inc(&self.shared.hub.counters.batches);
            metrics::add(&self.shared.hub.counters.batch_events, batch.len() as u64);
        }
        batch
    }

    pub fn is_running(&self) -> bool {
        self.runtime.lock().is_some()
    }

    /// A REST `send`: same admission and idempotency as a WebSocket `send`.
    /// `Ok(Some(ack))` when it was already acked, `Ok(None)` when the ticket
    /// will be completed by a later batch.
    pub fn submit_send(
        &self,
        ticket: u64,
        user: &str,
        send: SendFrame,
    ) -> Result<Option<Arc<protocol::Ack>>, FrameError> {
        let user: UserId = user.into();
        match self
            .shared
            .hub
            .admit_send(Origin::Ticket(ticket), &user, send)?
        {
            SendAdmission::Duplicate(ack) => Ok(Some(ack)),
            SendAdmission::InFlight => Ok(None),
            SendAdmission::Forward(ev) => self.forward_now(ev).map(|()| None),
        }
    }

    /// A REST pointer move (`POST /api/messages/{id}/read`), batched like the frame.
    pub fn submit_pointer(
        &self,
        ticket: u64,
        user: &str,
        chat: &str,
        kind: PointerKind,
        seq: u64,
    ) -> Result<(), FrameError> {
        let (chat, _) = self.shared.hub.member_chat(user, chat)?;
        self.forward_now(EngineEvent::Pointer {
            origin: Origin::Ticket(ticket),
            user: user.into(),
            chat,
            kind,
            seq,
        })
    }

    fn forward_now(&self, ev: EngineEvent) -> Result<(), FrameError> {
        self.shared.events.try_send(ev).map_err(|e| {
            let error = FrameError::new(ErrorCode::Unavailable, "server is busy, retry shortly");
            if let EngineEvent::Send { key, .. } = e.into_inner() {
                self.shared.hub.abandon_send(&key, &error);
            }
            error
        })
    }

    /// Hands a stored batch to the fan-out thread (waiting while it is
    /// `COMPLETIONS_AHEAD` batches behind). REST tickets it completes come
    /// back through `take_tickets`.
    pub fn complete(&self, batch: Vec<EngineEvent>, results: Vec<EngineResult>) {
        let queued = match self.completions.lock().as_ref() {
            Some(tx) => tx.send((batch, results)).map_err(|e| e.0),
            None => Err((batch, results)),
        };
        if let Err((batch, results)) = queued {
            // The fan-out thread is gone (shutdown): complete here.
            let done = self.shared.hub.complete(batch, results);
            self.tickets.done.lock().extend(done);
        }
    }

    /// REST tickets completed since the last call.
    pub fn take_tickets(&self) -> Vec<(u64, TicketOutcome)> {
        std::mem::take(&mut *self.tickets.done.lock())
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
        // Ends the fan-out thread once it has completed what is queued.
        self.completions.lock().take();
    }
}

/// The fan-out thread: completes stored batches in the order they were stored.
fn complete_in_order(
    hub: &Hub,
    tickets: &Tickets,
    completions: std::sync::mpsc::Receiver<Completion>,
) {
    while let Ok((batch, results)) = completions.recv() {
        let done = hub.complete(batch, results);
        if !done.is_empty() {
            tickets.done.lock().extend(done);
            tickets.ready.notify_one();
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Last-seen writes are best effort: under overload they are dropped, never waited for.
fn persist_side_path(shared: &Shared, ev: EngineEvent) {
    let _ = shared.events.try_send(ev);
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
                    persist_side_path(&shared, ev);
                }
            }
        }
    }
}

const LISTEN_BACKLOG: u32 = 4096;

/// Upgrades in progress at once; past this the accept queue waits (half-open
/// sockets cannot pile up file descriptors).
const MAX_HANDSHAKES: usize = 1024;

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    loop {
        let Ok(permit) = handshakes.clone().acquire_owned().await else {
            return;
        };
        let accepted = tokio::select! {
            _ = shared.shutdown.notified() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, _)) => {
                tokio::spawn(serve_connection(shared.clone(), stream, permit));
            }
            // Out of file descriptors or a reset before accept: wait a little, keep serving.
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// A refused upgrade: status and the error body PROTOCOL.md gives REST errors.
struct Refusal {
    status: u16,
    error: FrameError,
}

impl Refusal {
    fn new(status: u16, code: ErrorCode, message: &str) -> Self {
        Self {
            status,
            error: FrameError::new(code, message),
        }
    }

    fn response(&self) -> Vec<u8> {
        #[derive(serde::Serialize)]
        struct Body<'a> {
            code: &'static str,
            message: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            retry_after_ms: Option<u64>,
        }
        let e = &self.error;
        let body = serde_json::json!({ "error": Body {
            code: e.code.as_str(),
            message: &e.message,
            retry_after_ms: e.retry_after_ms,
        }});
        let mut headers = Vec::new();
        if let Some(ms) = e.retry_after_ms {
            headers.push(("retry-after", ms.div_ceil(1000).max(1).to_string()));
        }
        if self.status == 426 {
            headers.push(("sec-websocket-version", "13".to_owned()));
        }
        websocket::http_error(self.status, &body.to_string(), &headers)
    }
}

fn token_from_query(query: &str) -> Option<&str> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("token="))
        .filter(|t| !t.is_empty())
}

/// Checks an upgrade request: path, token, Origin, capacity, then the upgrade
/// rate (a storm of reconnects is told when to come back instead of queueing).
fn admit_upgrade(shared: &Shared, up: &websocket::Upgrade<'_>) -> Result<String, Refusal> {
    if up.path != "/ws" {
        return Err(Refusal::new(
            404,
            ErrorCode::NotFound,
            "the WebSocket endpoint is /ws",
        ));
    }
    let Some(token) = up.query.and_then(token_from_query) else {
        return Err(Refusal::new(401, ErrorCode::Unauthorized, "missing token"));
    };
    let user = shared
        .verifier
        .verify(token, now_ms())
        .map_err(|e| Refusal::new(401, ErrorCode::Unauthorized, &e.to_string()))?;
    let allowed = &shared.config.allowed_origins;
    // Browsers always send Origin; other clients may omit it.
    if let (false, Some(origin)) = (allowed.is_empty(), up.origin) {
        if !allowed.iter().any(|a| a == origin) {
            return Err(Refusal::new(
                403,
                ErrorCode::Forbidden,
                "origin not allowed",
            ));
        }
    }
    let max = shared.config.max_connections;
    if max > 0 && shared.hub.registry.connection_count() >= max {
        metrics::inc(&shared.hub.counters.upgrades_rate_limited);
        let mut r = Refusal::new(
            503,
            ErrorCode::Unavailable,
            "server is at its connection limit",
        );
        r.error.retry_after_ms = Some(1_000);
        return Err(r);
    }
    if let Err(retry_after) = shared.upgrades.lock().try_take(now_ms()) {
        metrics::inc(&shared.hub.counters.upgrades_rate_limited);
        return Err(Refusal {
            status: 429,
            error: FrameError::rate_limited(retry_after),
        });
    }
    Ok(user)
}

async fn serve_connection(
    shared: Arc<Shared>,
    mut stream: TcpStream,
    handshake_permit: tokio::sync::OwnedSemaphorePermit,
) {
    let _ = stream.set_nodelay(true);
    // Boxed: the handshake's state (its buffer, the timer) exists only while it runs, not in
    // every connection's task for its whole life.
    let upgraded = Box::pin(tokio::time::timeout(
        Duration::from_secs(10),
        upgrade(&shared, &mut stream),
    ))
    .await;
    drop(handshake_permit);
    match upgraded {
        Ok(Some((user, leftover))) => run_connection(shared, stream, user.into(), leftover).await,
        _ => metrics::inc(&shared.hub.counters.upgrades_refused),
    }
}

/// Reads the request head and answers it: `101` and the user, or an error
/// response and `None`. Also returns bytes the client sent after the head.
async fn upgrade(shared: &Shared, stream: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        if buf.len() == buf.capacity() {
            buf.reserve(1024);
        }
        stream.readable().await.ok()?;
        match stream.try_read_buf(&mut buf) {
            Ok(0) => return None,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => return None,
        }
        let refusal = match websocket::parse_upgrade(&buf) {
            Err(HandshakeError::Incomplete) => continue,
            Err(HandshakeError::Bad(why)) => Refusal::new(400, ErrorCode::BadRequest, why),
            Err(HandshakeError::Version) => Refusal::new(
                426,
                ErrorCode::BadRequest,
                "only WebSocket version 13 is spoken",
            ),
            Err(HandshakeError::TooLarge) => {
                Refusal::new(431, ErrorCode::TooLarge, "request head too large")
            }
            Ok(up) => match admit_upgrade(shared, &up) {
                Ok(user) => {
                    let leftover = buf[up.head_len..].to_vec();
                    stream
                        .write_all(&websocket::switching_protocols(&up.accept))
                        .await
                        .ok()?;
                    return Some((user, leftover));
                }
                Err(refusal) => refusal,
            },
        };
        let _ = stream.write_all(&refusal.response()).await;
        let _ = stream.shutdown().await;
        return None;
    }
}

/// Pings every connection once per heartbeat (a slice of them per sweep, so
/// pings are spread out) and drops peers that are silent or do not read.
async fn heartbeat_sweep(shared: Arc<Shared>) {
    let heartbeat_ms = shared.config.heartbeat_s.clamp(1, 3600) * 1000;
    let period_ms = (heartbeat_ms / 4).clamp(50, 1000);
    let slices = (heartbeat_ms / period_ms).max(1);
    let mut ticker = tokio::time::interval(Duration::from_millis(period_ms));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let hub = &shared.hub;
    for sweep in 0u64.. {
        tokio::select! {
            _ = shared.shutdown.notified() => return,
            _ = ticker.tick() => {}
        }
        let now = shared.clock_ms();
        let limit = 2 * heartbeat_ms;
        hub.registry.for_each(|c| {
            let seen = c.last_seen_ms.load(Ordering::Relaxed);
            let stalled = c.write_stalled_since_ms.load(Ordering::Relaxed);
            if now.saturating_sub(seen) > limit {
                metrics::inc(&hub.counters.heartbeat_timeouts);
                c.close(CloseReason::HeartbeatTimeout);
            } else if stalled != 0 && now.saturating_sub(stalled) > limit {
                // A peer that stops reading (zero window) is dropped like a silent one.
                c.close(CloseReason::WriteFailed);
            } else if c.id % slices == sweep % slices {
                c.ping_due.store(true, Ordering::Relaxed);
                c.wake();
            }
        });
    }
}

async fn run_connection(
    shared: Arc<Shared>,
    mut stream: TcpStream,
    user: UserId,
    leftover: Vec<u8>,
) {
    let hub = shared.hub.clone();
    metrics::inc(&hub.counters.connections_accepted);
    let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    let conn = Arc::new(ConnHandle::new(
        id,
        user.clone(),
        shared.config.queue_capacity,
        shared.clock_ms(),
    ));
    let session_id = format!("s{:x}-{:x}", shared.boot_id, id);
    conn.push(Outgoing::Frame(protocol::encode_hello(
        &user,
        &session_id,
        now_ms(),
        shared.config.heartbeat_s,
    )));
    drop(session_id);
    if let Some(seen) = hub.connect(conn.clone(), now_ms()) {
        persist_side_path(&shared, seen);
    }
    let mut io = ConnIo::new(&shared, conn.clone(), leftover);
    io.process_input();
    io.run(&stream).await;
    // Boxed: the farewell's buffers exist only while a connection closes.
    Box::pin(io.farewell(&mut stream)).await;
    hub.disconnect(&conn, now_ms());
    metrics::inc(&hub.counters.connections_closed);
}

type Permit<'a> = Result<mpsc::Permit<'a, EngineEvent>, mpsc::error::SendError<()>>;
type Reserve<'a> = Pin<Box<dyn Future<Output = Permit<'a>> + Send + 'a>>;

/// What woke a connection's task.
enum Wake<'a> {
    Closed,
    EngineRoom(Permit<'a>),
    Writable(io::Result<()>),
    Queued,
    Readable(io::Result<()>),
}

/// One connection's task state.
struct ConnIo<'a> {
    shared: &'a Shared,
    conn: Arc<ConnHandle>,
    decoder: Decoder,
    /// Received bytes not yet decoded; empty (unallocated) between reads.
    inbuf: Vec<u8>,
    /// Encoded bytes the socket has not taken yet, from `out_at`; empty
    /// (unallocated) whenever everything was written.
    outbuf: Vec<u8>,
    out_at: usize,
    stitcher: Stitcher,
    sends: TokenBucket,
    /// Every other frame that costs the engine or a fan-out (sync, pointers, typing, subscribe).
    requests: TokenBucket,
    strikes: u32,
    /// An event the engine's queue had no room for: reading waits until it is
    /// handed over (backpressure on this connection only).
    blocked: Option<Box<EngineEvent>>,
    /// Waiting for room in the engine's queue, only while `blocked`.
    room: Option<Reserve<'a>>,
    /// The close code to answer with, once the peer sent its close frame.
    peer_close: Option<u16>,
}

impl<'a> ConnIo<'a> {
    fn new(shared: &'a Shared, conn: Arc<ConnHandle>, inbuf: Vec<u8>) -> Self {
        let now = now_ms();
        Self {
            shared,
            conn,
            // Frames a little over the limit are read and refused with an error
            // frame (the connection stays); only far larger ones end it.
            decoder: Decoder::new(shared.config.limits.max_frame_bytes.saturating_mul(4)),
            inbuf,
            outbuf: Vec::new(),
            out_at: 0,
            stitcher: Stitcher::default(),
            sends: TokenBucket::new(shared.config.send_per_s, shared.config.send_burst, now),
            requests: TokenBucket::new(REQUESTS_PER_S, REQUESTS_BURST, now),
            strikes: 0,
            blocked: None,
            room: None,
            peer_close: None,
        }
    }

    fn writing(&self) -> bool {
        self.out_at < self.outbuf.len()
    }

    async fn run(&mut self, stream: &TcpStream) {
        while !self.conn.is_closing() {
            let wake = self.next_wake(stream).await;
            match wake {
                Wake::Closed => break,
                Wake::EngineRoom(Ok(permit)) => {
                    permit.send(*self.blocked.take().expect("branch runs only when blocked"));
                    // Frames already read and waiting behind the blocked one.
                    self.process_input();
                }
                Wake::EngineRoom(Err(_)) => {
                    let ev = self.blocked.take().expect("branch runs only when blocked");
                    self.refuse_forward(*ev, "server is shutting down");
                    self.conn.close(CloseReason::ServerShutdown);
                }
                Wake::Writable(Ok(())) => self.write_out(stream),
                Wake::Queued => self.flush_queue(stream),
                Wake::Readable(Ok(())) => self.read(stream),
                Wake::Writable(Err(_)) | Wake::Readable(Err(_)) => {
                    self.conn.close(CloseReason::PeerClosed)
                }
            }
        }
        // A send parked for room in the engine's queue when the connection closed (heartbeat,
        // send-queue overflow, shutdown) is refused: its key must not stay in flight, where
        // every later retry of it would wait for an answer that never comes.
        self.room = None;
        if let Some(ev) = self.blocked.take() {
            self.refuse_forward(
                *ev,
                "connection closed before the request reached the engine",
            );
        }
    }

    /// What the task does next, in this order: close, hand the blocked event to the
    /// engine, finish writing, drain the queue, read. Polled by hand rather than
    /// with `select!` over futures, so an idle connection's task holds no waiting
    /// future: only its waker, in the handle and in the socket's readiness.
    fn next_wake<'s>(&'s mut self, stream: &'s TcpStream) -> impl Future<Output = Wake<'a>> + 's {
        let shared = self.shared;
        let (writing, blocked) = (self.writing(), self.blocked.is_some());
        let (conn, room) = (&*self.conn, &mut self.room);
        std::future::poll_fn(move |cx| {
            conn.register(cx.waker());
            if conn.is_closing() {
                return Poll::Ready(Wake::Closed);
            }
            if blocked {
                let reserve = room.get_or_insert_with(|| Box::pin(shared.events.reserve()));
                if let Poll::Ready(permit) = reserve.as_mut().poll(cx) {
                    *room = None;
                    return Poll::Ready(Wake::EngineRoom(permit));
                }
            }
            if writing {
                if let Poll::Ready(r) = stream.poll_write_ready(cx) {
                    return Poll::Ready(Wake::Writable(r));
                }
            } else if conn.take_wakeup() {
                return Poll::Ready(Wake::Queued);
            }
            if !blocked {
                if let Poll::Ready(r) = stream.poll_read_ready(cx) {
                    return Poll::Ready(Wake::Readable(r));
                }
            }
            Poll::Pending
        })
    }

    fn read(&mut self, stream: &TcpStream) {
        let want = self.shared.config.read_buffer_bytes.max(512);
        self.inbuf.reserve(want);
        match stream.try_read_buf(&mut self.inbuf) {
            Ok(0) => self.conn.close(CloseReason::PeerClosed),
            Ok(_) => {
                self.conn
                    .last_seen_ms
                    .store(self.shared.clock_ms(), Ordering::Relaxed);
                self.process_input();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => self.conn.close(CloseReason::PeerClosed),
        }
        if self.inbuf.is_empty() {
            self.inbuf = Vec::new();
        }
    }

    /// Decodes and handles every complete message in `inbuf`, stopping early
    /// while an event waits for room in the engine's queue.
    fn process_input(&mut self) {
        let mut at = 0;
        while self.blocked.is_none() && !self.conn.is_closing() {
            match self.decoder.decode(&mut self.inbuf[at..]) {
                Ok(Some((message, used))) => {
                    at += used;
                    if let Some(m) = message {
                        self.on_message(m);
                    }
                }
                Ok(None) => break,
                Err(websocket::DecodeError::TooLarge) => {
                    // Far over the size limit: the stream cannot be read past it.
                    self.conn.push(Outgoing::Frame(protocol::encode_error(
                        ErrorCode::TooLarge,
                        "frame is far larger than the limit",
                        None,
                    )));
                    self.conn.close(CloseReason::FrameTooLarge);
                }
                Err(websocket::DecodeError::InvalidUtf8) => {
                    self.conn.close(CloseReason::InvalidText)
                }
                Err(websocket::DecodeError::Protocol(_)) => {
                    self.conn.close(CloseReason::ProtocolError)
                }
            }
        }
        self.inbuf.drain(..at);
    }

    fn on_message(&mut self, message: Message) {
        let outcome = match message {
            Message::Text(text) => {
                metrics::inc(&self.shared.hub.counters.frames_in);
                self.handle_frame(&text)
            }
            Message::Binary => Err(FrameError::new(
                ErrorCode::BadRequest,
                "frames must be JSON text frames",
            )),
            Message::Ping(payload) => {
                // Written by the loop's next turn (`writing` is now true).
                websocket::encode_frame(&mut self.outbuf, websocket::OP_PONG, &payload);
                Ok(())
            }
            Message::Pong => Ok(()),
            Message::Close(code) => {
                self.peer_close = Some(code.unwrap_or(websocket::CLOSE_NORMAL));
                self.conn.close(CloseReason::PeerClosed);
                Ok(())
            }
        };
        match outcome {
            Ok(()) => self.strikes = 0,
            // Too fast is not malformed: no strike.
            Err(e) if e.code == ErrorCode::RateLimited => {
                self.conn.push(Outgoing::Frame(e.encode()));
            }
            Err(e) => {
                metrics::inc(&self.shared.hub.counters.bad_frames);
                self.conn.push(Outgoing::Frame(e.encode()));
                self.strikes += 1;
                if self.strikes >= self.shared.config.max_bad_frames {
                    self.conn.close(CloseReason::TooManyBadFrames);
                }
            }
        }
    }

    fn handle_frame(&mut self, text: &str) -> Result<(), FrameError> {
        let hub = &self.shared.hub;
        let conn = &self.conn;
        let frame = protocol::parse_client_frame(text, &hub.limits)?;
        if !matches!(frame, ClientFrame::Send(_)) {
            self.requests
                .try_take(now_ms())
                .map_err(FrameError::rate_limited)?;
        }
        let event = match frame {
            ClientFrame::Send(send) => {
                if let Err(retry_after) = self.sends.try_take(now_ms()) {
                    return Err(
                        FrameError::rate_limited(retry_after).with_ref(Some(send.client_msg_id))
                    );
                }
                match hub.admit_send(Origin::Conn(conn.id), &conn.user, send)? {
                    SendAdmission::Forward(ev) => ev,
                    SendAdmission::Duplicate(ack) => {
                        conn.push(Outgoing::Frame(protocol::encode_ack(&ack)));
                        return Ok(());
                    }
                    SendAdmission::InFlight => return Ok(()),
                }
            }
            ClientFrame::Sync { since, reference } => {
                if conn.sync_pending.swap(true, Ordering::AcqRel) {
                    return Err(FrameError::rate_limited(100).with_ref(reference));
                }
                // Queued before the request leaves, so live messages from here on are held.
                conn.push(Outgoing::SyncBegin);
                EngineEvent::Sync {
                    conn: conn.id,
                    user: conn.user.clone(),
                    since,
                    reference,
                }
            }
            ClientFrame::Pointer { chat_id, seq, kind } => {
                let (chat, _) = hub.member_chat(&conn.user, &chat_id)?;
                EngineEvent::Pointer {
                    origin: Origin::Conn(conn.id),
                    user: conn.user.clone(),
                    chat,
                    kind,
                    seq,
                }
            }
            ClientFrame::Typing { chat_id, start } => {
                let (chat, _) = hub.member_chat(&conn.user, &chat_id)?;
                hub.typing(&conn.user, &chat, start, now_ms());
                return Ok(());
            }
            ClientFrame::PresenceSubscribe { user_ids } => {
                hub.presence
                    .lock()
                    .check_subscribe(conn.id, &user_ids)
                    .map_err(|e| FrameError::new(ErrorCode::BadRequest, e.to_string()))?;
                EngineEvent::PresenceQuery {
                    conn: conn.id,
                    user: conn.user.clone(),
                    user_ids,
                }
            }
        };
        self.forward(event)
    }

    /// Hands an event to the engine; a full queue parks it (see `blocked`).
    fn forward(&mut self, ev: EngineEvent) -> Result<(), FrameError> {
        match self.shared.events.try_send(ev) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(ev)) => {
                metrics::inc(&self.shared.hub.counters.engine_queue_full_waits);
                self.blocked = Some(Box::new(ev));
                Ok(())
            }
            Err(mpsc::error::TrySendError::Closed(ev)) => {
                Err(self.refuse_forward(ev, "server is shutting down"))
            }
        }
    }

    /// An event that will never reach the engine: its send waiters get the error.
    fn refuse_forward(&self, ev: EngineEvent, why: &str) -> FrameError {
        let error = FrameError::new(ErrorCode::Unavailable, why);
        if let EngineEvent::Send { key, .. } = ev {
            self.shared.hub.abandon_send(&key, &error);
        }
        error
    }

    /// Encodes what is queued (and a due ping) and writes it.
    fn flush_queue(&mut self, stream: &TcpStream) {
        let mut items = Vec::new();
        let more = self.conn.take_queued(MAX_FRAMES_PER_FLUSH, &mut items);
        let mut frames = Vec::new();
        for item in items {
            self.stitcher.accept(item, &mut frames);
        }
        for frame in &frames {
            websocket::encode_frame(&mut self.outbuf, websocket::OP_TEXT, frame);
        }
        metrics::add(&self.shared.hub.counters.frames_out, frames.len() as u64);
        if self.conn.ping_due.swap(false, Ordering::Relaxed) {
            websocket::encode_frame(&mut self.outbuf, websocket::OP_PING, b"");
        }
        if more {
            // Come back for the rest once this is written (others get a turn first).
            self.conn.wake();
        }
        self.write_out(stream);
    }

    /// Writes `outbuf` until done or the socket is full.
    fn write_out(&mut self, stream: &TcpStream) {
        while self.writing() {
            match stream.try_write(&self.outbuf[self.out_at..]) {
                Ok(0) => return self.conn.close(CloseReason::WriteFailed),
                Ok(n) => self.out_at += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let stalled = &self.conn.write_stalled_since_ms;
                    if stalled.load(Ordering::Relaxed) == 0 {
                        stalled.store(self.shared.clock_ms().max(1), Ordering::Relaxed);
                    }
                    return;
                }
                Err(_) => return self.conn.close(CloseReason::WriteFailed),
            }
        }
        self.outbuf = Vec::new();
        self.out_at = 0;
        self.conn.write_stalled_since_ms.store(0, Ordering::Relaxed);
    }

    /// Says why the connection ends (briefly: a peer that does not read does
    /// not get to hold us), then waits for the peer's close so unread input
    /// does not turn our close into a TCP reset that would destroy the frames
    /// we just sent.
    async fn farewell(mut self, stream: &mut TcpStream) {
        let reason = self
            .conn
            .close_reason()
            .unwrap_or(CloseReason::ServerShutdown);
        let code = match reason {
            CloseReason::WriteFailed => return,
            CloseReason::PeerClosed => match self.peer_close {
                Some(code) => code,
                None => return, // the socket is gone
            },
            CloseReason::QueueOverflow | CloseReason::TooManyBadFrames => websocket::CLOSE_POLICY,
            CloseReason::FrameTooLarge => websocket::CLOSE_TOO_BIG,
            CloseReason::ServerShutdown => websocket::CLOSE_AWAY,
            CloseReason::ProtocolError => websocket::CLOSE_PROTOCOL,
            CloseReason::InvalidText => websocket::CLOSE_INVALID_DATA,
            CloseReason::HeartbeatTimeout => websocket::CLOSE_ERROR,
        };
        let said = async {
            if !matches!(reason, CloseReason::QueueOverflow | CloseReason::PeerClosed) {
                // Frames queued before the close (e.g. the error that caused it) still go out.
                let mut items = Vec::new();
                self.conn.take_queued(usize::MAX, &mut items);
                let mut frames = Vec::new();
                for item in items {
                    self.stitcher.accept(item, &mut frames);
                }
                for frame in &frames {
                    websocket::encode_frame(&mut self.outbuf, websocket::OP_TEXT, frame);
                }
            }
            let why = if reason == CloseReason::PeerClosed {
                ""
            } else {
                reason.as_str()
            };
            websocket::encode_close(&mut self.outbuf, code, why);
            stream.write_all(&self.outbuf[self.out_at..]).await
        };
        let said = tokio::time::timeout(Duration::from_secs(1), said).await;
        if reason == CloseReason::PeerClosed || !matches!(said, Ok(Ok(()))) {
            return;
        }
        let peer_closed = async {
            loop {
                stream.readable().await?;
                self.inbuf.reserve(4096);
                match stream.try_read_buf(&mut self.inbuf) {
                    Ok(0) => return Ok::<(), io::Error>(()),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
                let mut at = 0;
                while let Ok(Some((message, used))) = self.decoder.decode(&mut self.inbuf[at..]) {
                    at += used;
                    if matches!(message, Some(Message::Close(_))) {
                        return Ok(());
                    }
                }
                self.inbuf.drain(..at);
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), peer_closed).await;
    }
}

/// Non-send frames per second (and burst) per connection.
const REQUESTS_PER_S: f64 = 100.0;
const REQUESTS_BURST: f64 = 200.0;

/// Queue items encoded per write at most, so one busy connection yields to others.
const MAX_FRAMES_PER_FLUSH: usize = 256;
