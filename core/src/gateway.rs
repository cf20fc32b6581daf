//! The WebSocket gateway: a tokio runtime on its own threads that accepts
//! sockets, checks the signed token at upgrade, and runs one task per
//! connection (a reader and a writer future joined in that task).

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, Notify};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

use crate::hub::{now_ms, EngineEvent, Hub, SendAdmission, SidePathConfig, TicketOutcome};
use crate::metrics;
use crate::outbox::{Outgoing, Stitcher};
use crate::protocol::{self, ClientFrame, ErrorCode, FrameError, Limits, PointerKind, SendFrame};
use crate::ratelimit::TokenBucket;
use crate::registry::{CloseReason, ConnHandle};
use crate::sequencer::{Origin, UserId};
use crate::token::TokenVerifier;

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub host: String,
    pub port: u16,
    pub secret: Vec<u8>,
    pub heartbeat_s: u64,
    /// Items a connection's send queue holds before the connection is closed.
    pub queue_capacity: usize,
    /// tungstenite allocates this read buffer per connection, idle or not.
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

/// A running gateway. Dropping it (or `shutdown`) stops the runtime.
pub struct Gateway {
    shared: Arc<Shared>,
    events_rx: Mutex<mpsc::Receiver<EngineEvent>>,
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
        let engine_rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()?;
        Ok(Self {
            shared,
            events_rx: Mutex::new(rx),
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

    /// Blocks until at least one event is ready (or `timeout` passes), then
    /// takes up to `max` events. An empty batch after shutdown means stop.
    pub fn next_batch(&self, max: usize, timeout: Duration) -> Vec<EngineEvent> {
        let mut rx = self.events_rx.lock();
        let mut batch = Vec::new();
        if !self.is_running() {
            return batch;
        }
        let first = self.engine_rt.block_on(async {
            tokio::time::timeout(timeout, rx.recv())
                .await
                .ok()
                .flatten()
        });
        if let Some(ev) = first {
            batch.push(ev);
            while batch.len() < max {
                match rx.try_recv() {
                    Ok(ev) => batch.push(ev),
                    Err(_) => break,
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

    pub fn complete(
        &self,
        batch: Vec<EngineEvent>,
        results: Vec<crate::hub::EngineResult>,
    ) -> Vec<(u64, TicketOutcome)> {
        self.shared.hub.complete(batch, results)
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

#[allow(clippy::result_large_err)]
fn reject(status: StatusCode, error: FrameError) -> ErrorResponse {
    #[derive(serde::Serialize)]
    struct Body<'a> {
        code: &'static str,
        message: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    }
    let body = serde_json::json!({ "error": Body {
        code: error.code.as_str(),
        message: &error.message,
        retry_after_ms: error.retry_after_ms,
    }});
    let mut resp = ErrorResponse::new(Some(body.to_string()));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(
        "content-type",
        "application/json".parse().expect("valid header"),
    );
    if let Some(ms) = error.retry_after_ms {
        headers.insert("retry-after", ms.div_ceil(1000).max(1).into());
    }
    resp
}

fn token_from_query(query: &str) -> Option<&str> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("token="))
        .filter(|t| !t.is_empty())
}

/// Checks an upgrade request: path, token, Origin, capacity, then the upgrade
/// rate (a storm of reconnects is told when to come back instead of queueing).
#[allow(clippy::result_large_err)] // tungstenite's `Callback` fixes the error type
fn admit_upgrade(shared: &Shared, req: &Request) -> Result<String, ErrorResponse> {
    if req.uri().path() != "/ws" {
        let e = FrameError::new(ErrorCode::NotFound, "the WebSocket endpoint is /ws");
        return Err(reject(StatusCode::NOT_FOUND, e));
    }
    let Some(token) = req.uri().query().and_then(token_from_query) else {
        return Err(reject(
            StatusCode::UNAUTHORIZED,
            FrameError::new(ErrorCode::Unauthorized, "missing token"),
        ));
    };
    let user = shared.verifier.verify(token, now_ms()).map_err(|e| {
        reject(
            StatusCode::UNAUTHORIZED,
            FrameError::new(ErrorCode::Unauthorized, e.to_string()),
        )
    })?;
    let allowed = &shared.config.allowed_origins;
    if !allowed.is_empty() {
        let origin = req.headers().get("origin").and_then(|o| o.to_str().ok());
        // Browsers always send Origin; other clients may omit it.
        if let Some(origin) = origin {
            if !allowed.iter().any(|a| a == origin) {
                let e = FrameError::new(ErrorCode::Forbidden, "origin not allowed");
                return Err(reject(StatusCode::FORBIDDEN, e));
            }
        }
    }
    let max = shared.config.max_connections;
    if max > 0 && shared.hub.registry.connection_count() >= max {
        metrics::inc(&shared.hub.counters.upgrades_rate_limited);
        let mut e = FrameError::new(ErrorCode::Unavailable, "server is at its connection limit");
        e.retry_after_ms = Some(1_000);
        return Err(reject(StatusCode::SERVICE_UNAVAILABLE, e));
    }
    if let Err(retry_after) = shared.upgrades.lock().try_take(now_ms()) {
        metrics::inc(&shared.hub.counters.upgrades_rate_limited);
        return Err(reject(
            StatusCode::TOO_MANY_REQUESTS,
            FrameError::rate_limited(retry_after),
        ));
    }
    Ok(user)
}

#[allow(clippy::result_large_err)] // the upgrade callback's shape is tungstenite's
async fn serve_connection(
    shared: Arc<Shared>,
    stream: TcpStream,
    handshake_permit: tokio::sync::OwnedSemaphorePermit,
) {
    let _ = stream.set_nodelay(true);
    let user_slot: Arc<Mutex<Option<String>>> = Arc::default();
    let check = {
        let shared = shared.clone();
        let slot = user_slot.clone();
        move |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
            admit_upgrade(&shared, req).map(|user| {
                *slot.lock() = Some(user);
                resp
            })
        }
    };
    // Frames a little over the limit are read and refused with an error frame
    // (the connection stays); only far larger ones break the connection.
    let hard_cap = shared.config.limits.max_frame_bytes.saturating_mul(4);
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(shared.config.read_buffer_bytes)
        .write_buffer_size(0)
        .max_message_size(Some(hard_cap))
        .max_frame_size(Some(hard_cap));
    let handshake = tokio_tungstenite::accept_hdr_async_with_config(stream, check, Some(ws_config));
    let ws = match tokio::time::timeout(Duration::from_secs(10), handshake).await {
        Ok(Ok(ws)) => ws,
        _ => {
            metrics::inc(&shared.hub.counters.upgrades_refused);
            return;
        }
    };
    drop(handshake_permit);
    let Some(user) = user_slot.lock().take() else {
        return;
    };
    run_connection(shared, ws, user.into()).await;
}

async fn run_connection(shared: Arc<Shared>, ws: WebSocketStream<TcpStream>, user: UserId) {
    let hub = shared.hub.clone();
    metrics::inc(&hub.counters.connections_accepted);
    let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = mpsc::channel(shared.config.queue_capacity.max(1));
    let conn = Arc::new(ConnHandle::new(id, user.clone(), tx, shared.clock_ms()));
    let session_id = format!("s{:x}-{:x}", shared.boot_id, id);
    conn.push(Outgoing::Frame(protocol::encode_hello(
        &user,
        &session_id,
        now_ms(),
        shared.config.heartbeat_s,
    )));
    if let Some(seen) = hub.connect(conn.clone(), now_ms()) {
        persist_side_path(&shared, seen);
    }
    let (sink, stream) = ws.split();
    tokio::join!(
        read_loop(&shared, &conn, stream),
        write_loop(&shared, &conn, sink, rx)
    );
    hub.disconnect(&conn, now_ms());
    metrics::inc(&hub.counters.connections_closed);
}

type WsSink = futures_util::stream::SplitSink<WebSocketStream<TcpStream>, Message>;
type WsStream = futures_util::stream::SplitStream<WebSocketStream<TcpStream>>;

async fn read_loop(shared: &Shared, conn: &Arc<ConnHandle>, mut stream: WsStream) {
    read_frames(shared, conn, &mut stream).await;
    if conn.close_reason() != Some(CloseReason::PeerClosed) {
        // The server is closing: keep reading (and dropping) until the peer's
        // close reply, so unread input does not turn our close into a TCP reset
        // that would destroy the frames we just sent (the error that explains it).
        let drain = async { while let Some(Ok(_)) = stream.next().await {} };
        let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
    }
}

async fn read_frames(shared: &Shared, conn: &Arc<ConnHandle>, stream: &mut WsStream) {
    let mut strikes = 0u32;
    let mut sends = TokenBucket::new(shared.config.send_per_s, shared.config.send_burst, now_ms());
    // Every other frame that costs the engine or a fan-out (sync, pointers, typing, subscribe).
    let mut requests = TokenBucket::new(REQUESTS_PER_S, REQUESTS_BURST, now_ms());
    loop {
        let next = tokio::select! {
            _ = conn.closed() => return,
            n = stream.next() => n,
        };
        let message = match next {
            Some(Ok(m)) => m,
            Some(Err(tokio_tungstenite::tungstenite::Error::Capacity(_))) => {
                // Far over the size limit: the stream cannot be read past it.
                conn.push(Outgoing::Frame(protocol::encode_error(
                    ErrorCode::TooLarge,
                    "frame is far larger than the limit",
                    None,
                )));
                conn.close(CloseReason::FrameTooLarge);
                return;
            }
            _ => {
                conn.close(CloseReason::PeerClosed);
                return;
            }
        };
        conn.last_seen_ms
            .store(shared.clock_ms(), Ordering::Relaxed);
        let outcome = match message {
            Message::Text(text) => {
                metrics::inc(&shared.hub.counters.frames_in);
                handle_frame(shared, conn, &mut sends, &mut requests, text.as_str()).await
            }
            Message::Binary(_) => Err(FrameError::new(
                ErrorCode::BadRequest,
                "frames must be JSON text frames",
            )),
            Message::Close(_) => {
                conn.close(CloseReason::PeerClosed);
                return;
            }
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Ok(()),
        };
        match outcome {
            Ok(()) => strikes = 0,
            // Too fast is not malformed: no strike.
            Err(e) if e.code == ErrorCode::RateLimited => {
                conn.push(Outgoing::Frame(e.encode()));
            }
            Err(e) => {
                metrics::inc(&shared.hub.counters.bad_frames);
                conn.push(Outgoing::Frame(e.encode()));
                strikes += 1;
                if strikes >= shared.config.max_bad_frames {
                    conn.close(CloseReason::TooManyBadFrames);
                    return;
                }
            }
        }
    }
}

async fn handle_frame(
    shared: &Shared,
    conn: &Arc<ConnHandle>,
    sends: &mut TokenBucket,
    requests: &mut TokenBucket,
    text: &str,
) -> Result<(), FrameError> {
    let hub = &shared.hub;
    let frame = protocol::parse_client_frame(text, &hub.limits)?;
    if !matches!(frame, ClientFrame::Send(_)) {
        requests
            .try_take(now_ms())
            .map_err(FrameError::rate_limited)?;
    }
    match frame {
        ClientFrame::Send(send) => {
            if let Err(retry_after) = sends.try_take(now_ms()) {
                return Err(
                    FrameError::rate_limited(retry_after).with_ref(Some(send.client_msg_id))
                );
            }
            admit_and_forward(shared, conn, send).await
        }
        ClientFrame::Sync { since, reference } => {
            if conn.sync_pending.swap(true, Ordering::AcqRel) {
                return Err(FrameError::rate_limited(100).with_ref(reference));
            }
            // Queued before the request leaves, so live messages from here on are held.
            conn.push(Outgoing::SyncBegin);
            forward(
                shared,
                EngineEvent::Sync {
                    conn: conn.id,
                    user: conn.user.clone(),
                    since,
                    reference,
                },
            )
            .await
        }
        ClientFrame::Pointer { chat_id, seq, kind } => {
            let (chat, _) = hub.member_chat(&conn.user, &chat_id)?;
            forward(
                shared,
                EngineEvent::Pointer {
                    origin: Origin::Conn(conn.id),
                    user: conn.user.clone(),
                    chat,
                    kind,
                    seq,
                },
            )
            .await
        }
        ClientFrame::Typing { chat_id, start } => {
            let (chat, _) = hub.member_chat(&conn.user, &chat_id)?;
            hub.typing(&conn.user, &chat, start, now_ms());
            Ok(())
        }
        ClientFrame::PresenceSubscribe { user_ids } => {
            hub.presence
                .lock()
                .check_subscribe(conn.id, &user_ids)
                .map_err(|e| FrameError::new(ErrorCode::BadRequest, e.to_string()))?;
            forward(
                shared,
                EngineEvent::PresenceQuery {
                    conn: conn.id,
                    user: conn.user.clone(),
                    user_ids,
                },
            )
            .await
        }
    }
}

async fn admit_and_forward(
    shared: &Shared,
    conn: &Arc<ConnHandle>,
    send: SendFrame,
) -> Result<(), FrameError> {
    match shared
        .hub
        .admit_send(Origin::Conn(conn.id), &conn.user, send)?
    {
        SendAdmission::Forward(ev) => forward(shared, ev).await,
        SendAdmission::Duplicate(ack) => {
            conn.push(Outgoing::Frame(protocol::encode_ack(&ack)));
            Ok(())
        }
        SendAdmission::InFlight => Ok(()),
    }
}

/// Hands an event to the engine, waiting while its queue is full (backpressure
/// on this connection's reads only).
async fn forward(shared: &Shared, ev: EngineEvent) -> Result<(), FrameError> {
    shared.events.send(ev).await.map_err(|e| {
        let error = FrameError::new(ErrorCode::Unavailable, "server is shutting down");
        if let EngineEvent::Send { key, .. } = e.0 {
            shared.hub.abandon_send(&key, &error);
        }
        error
    })
}

fn text_message(frame: Bytes) -> Message {
    // SAFETY: every queued frame is produced by serde_json (or by us from
    // ASCII), so it is valid UTF-8.
    Message::Text(unsafe { Utf8Bytes::from_bytes_unchecked(frame) })
}

/// Non-send frames per second (and burst) per connection.
const REQUESTS_PER_S: f64 = 100.0;
const REQUESTS_BURST: f64 = 200.0;

/// Frames written per flush at most, so one busy connection yields to others.
const MAX_FRAMES_PER_FLUSH: usize = 256;

async fn write_loop(
    shared: &Shared,
    conn: &Arc<ConnHandle>,
    mut sink: WsSink,
    mut rx: mpsc::Receiver<Outgoing>,
) {
    let heartbeat = Duration::from_secs(shared.config.heartbeat_s.clamp(1, 3600));
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
    let mut stitcher = Stitcher::default();
    let mut out: Vec<Bytes> = Vec::new();
    loop {
        tokio::select! {
            biased;
            _ = conn.closed() => break,
            item = rx.recv() => {
                let Some(item) = item else { break };
                stitcher.accept(item, &mut out);
                while out.len() < MAX_FRAMES_PER_FLUSH {
                    match rx.try_recv() {
                        Ok(item) => stitcher.accept(item, &mut out),
                        Err(_) => break,
                    }
                }
                let n = out.len() as u64;
                let write = async {
                    for frame in out.drain(..) {
                        sink.feed(text_message(frame)).await?;
                    }
                    sink.flush().await
                };
                // A peer that stops reading (zero window) is dropped like a silent one.
                let written = tokio::select! {
                    r = tokio::time::timeout(2 * heartbeat, write) => matches!(r, Ok(Ok(()))),
                    _ = conn.closed() => false,
                };
                out.clear();
                if !written {
                    conn.close(CloseReason::WriteFailed);
                    break;
                }
                metrics::add(&shared.hub.counters.frames_out, n);
            }
            _ = ticker.tick() => {
                let silent_ms = shared.clock_ms().saturating_sub(conn.last_seen_ms.load(Ordering::Relaxed));
                if silent_ms > 2 * heartbeat.as_millis() as u64 {
                    metrics::inc(&shared.hub.counters.heartbeat_timeouts);
                    conn.close(CloseReason::HeartbeatTimeout);
                    break;
                }
                let ping = tokio::select! {
                    r = sink.send(Message::Ping(Bytes::new())) => r.is_ok(),
                    _ = conn.closed() => false,
                };
                if !ping {
                    conn.close(CloseReason::WriteFailed);
                    break;
                }
            }
        }
    }
    let reason = conn.close_reason().unwrap_or(CloseReason::ServerShutdown);
    if matches!(reason, CloseReason::PeerClosed | CloseReason::WriteFailed) {
        return;
    }
    // Say why, briefly; a peer that does not read does not get to hold us.
    let farewell = async {
        if reason != CloseReason::QueueOverflow {
            // Frames queued before the close (e.g. the error that caused it) still go out.
            while let Ok(item) = rx.try_recv() {
                stitcher.accept(item, &mut out);
            }
            for frame in out.drain(..) {
                sink.feed(text_message(frame)).await?;
            }
        }
        let code = match reason {
            CloseReason::QueueOverflow | CloseReason::TooManyBadFrames => CloseCode::Policy,
            CloseReason::FrameTooLarge => CloseCode::Size,
            CloseReason::ServerShutdown => CloseCode::Away,
            _ => CloseCode::Error,
        };
        let frame = CloseFrame {
            code,
            reason: reason.as_str().into(),
        };
        sink.send(Message::Close(Some(frame))).await
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), farewell).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
}
