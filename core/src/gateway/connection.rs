//! One connection's task: reads and decodes frames, hands them to `dispatch`,
//! writes what is queued (stitching `sync` answers with live messages), answers
//! pings, and says goodbye. Also the heartbeat sweep over every connection.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::dispatch::{self, FrameBudget};
use super::Shared;
use crate::hub::{now_ms, EngineEvent};
use crate::metrics;
use crate::outbox::{Outgoing, Stitched, Stitcher};
use crate::protocol::{self, ErrorCode, FrameError};
use crate::registry::{CloseReason, ConnHandle};
use crate::send_guard::UserId;
use crate::websocket::{self, FrameReader, Message};
use parking_lot::Mutex;

/// Queue items encoded per write at most, so one busy connection yields to others.
const MAX_FRAMES_PER_FLUSH: usize = 256;

/// After our Close: how long, and how many bytes, the peer's last input is read and
/// dropped (so our close does not become a reset that destroys the frames just sent).
const FAREWELL_DRAIN: Duration = Duration::from_secs(2);
const FAREWELL_DRAIN_BYTES: usize = 256 * 1024;

/// Pings every connection once per heartbeat (a slice of them per sweep, so
/// pings are spread out) and drops peers that are silent or do not read.
pub(super) async fn heartbeat_sweep(shared: Arc<Shared>) {
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

pub(super) async fn run_connection(
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
        shared.persist_side_path(seen);
    }
    let mut io = ConnIo::new(&shared, conn.clone(), leftover);
    io.process_input();
    io.run(&stream).await;
    let budget = io.budget.clone();
    // Boxed: the farewell's buffers exist only while a connection closes.
    Box::pin(io.farewell(&mut stream)).await;
    shared.release_budget(&conn.user, budget);
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
    /// Received bytes not yet decoded, and the decoder (unallocated between reads).
    input: FrameReader,
    /// Encoded bytes the socket has not taken yet, from `out_at`; empty
    /// (unallocated) whenever everything was written.
    outbuf: Vec<u8>,
    out_at: usize,
    stitcher: Stitcher,
    /// The user's, shared with its other connections here.
    budget: Arc<Mutex<FrameBudget>>,
    strikes: u32,
    /// An event the engine's queue had no room for: reading waits until it is
    /// handed over (backpressure on this connection only).
    blocked: Option<Box<EngineEvent>>,
    /// Waiting for room in the engine's queue, only while `blocked`.
    room: Option<Reserve<'a>>,
    /// The pong owed to the peer's latest ping (RFC 6455 allows answering only the latest):
    /// one slot, so a peer that pings and never reads cannot grow the write buffer.
    pong: Option<Box<Bytes>>,
    /// The close code to answer with, once the peer sent its close frame.
    peer_close: Option<u16>,
}

impl<'a> ConnIo<'a> {
    fn new(shared: &'a Shared, conn: Arc<ConnHandle>, inbuf: Vec<u8>) -> Self {
        let c = &shared.config;
        let budget = shared.user_budget(&conn.user);
        Self {
            shared,
            conn,
            // Frames a little over the limit are read and refused with an error
            // frame (the connection stays); only far larger ones end it.
            input: FrameReader::new(c.limits.max_frame_bytes.saturating_mul(4), inbuf),
            outbuf: Vec::new(),
            out_at: 0,
            stitcher: Stitcher::default(),
            budget,
            strikes: 0,
            blocked: None,
            room: None,
            pong: None,
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
        let Some(buf) = self.input.read_buffer(want) else {
            return; // failed: the farewell discards the rest
        };
        match stream.try_read_buf(buf) {
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
        // A readable wake-up that read nothing must not leave the reserved buffer behind
        // (4 KiB on every idle connection).
        self.input.release_if_drained();
    }

    /// Decodes and handles every complete message in `inbuf`, stopping early
    /// while an event waits for room in the engine's queue.
    fn process_input(&mut self) {
        while self.blocked.is_none() && !self.conn.is_closing() {
            match self.input.next_message() {
                Ok(Some(message)) => self.on_message(message),
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
    }

    fn on_message(&mut self, message: Message) {
        let shared = self.shared;
        let hub = &shared.hub;
        let outcome = match message {
            Message::Text(text) => {
                metrics::inc(&hub.counters.frames_in);
                let event =
                    dispatch::dispatch(hub, &self.conn, &mut self.budget.lock(), &text, now_ms());
                event.and_then(|ev| ev.map_or(Ok(()), |ev| self.forward(ev)))
            }
            Message::Binary => Err(FrameError::new(
                ErrorCode::BadRequest,
                "frames must be JSON text frames",
            )),
            Message::Ping(payload) => {
                if self.pong.replace(Box::new(Bytes::from(payload))).is_some() {
                    metrics::inc(&hub.counters.pongs_coalesced);
                }
                // Written by the loop's next turn through the queue's path.
                self.conn.wake();
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
                metrics::inc(&hub.counters.bad_frames);
                self.conn.push(Outgoing::Frame(e.encode()));
                self.strikes += 1;
                if self.strikes >= self.shared.config.max_bad_frames {
                    self.conn.close(CloseReason::TooManyBadFrames);
                }
            }
        }
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

    /// Encodes what is queued (the pong owed and a due ping too) and writes it.
    fn flush_queue(&mut self, stream: &TcpStream) {
        let mut items = Vec::new();
        let more = self.conn.take_queued(MAX_FRAMES_PER_FLUSH, &mut items);
        let mut frames = Vec::new();
        for item in items {
            let next =
                self.stitcher
                    .accept(item, &mut frames, self.shared.config.sync_hold_capacity);
            self.after_stitch(next);
        }
        for frame in &frames {
            websocket::encode_frame(&mut self.outbuf, websocket::OP_TEXT, frame);
        }
        metrics::add(&self.shared.hub.counters.frames_out, frames.len() as u64);
        if let Some(payload) = self.pong.take() {
            websocket::encode_frame(&mut self.outbuf, websocket::OP_PONG, &payload);
        }
        if self.conn.ping_due.swap(false, Ordering::Relaxed) {
            websocket::encode_frame(&mut self.outbuf, websocket::OP_PING, b"");
        }
        if more {
            // Come back for the rest once this is written (others get a turn first).
            self.conn.wake();
        }
        self.write_out(stream);
    }

    /// Acts on what the stitcher asked for after an item.
    fn after_stitch(&mut self, next: Stitched) {
        let shared = self.shared;
        let counters = &shared.hub.counters;
        match next {
            Stitched::Nothing => {}
            Stitched::SyncDone => self.conn.sync_pending.store(false, Ordering::Release),
            Stitched::Restart(request) => {
                metrics::inc(&counters.sync_restarts);
                let ev = EngineEvent::Sync {
                    conn: self.conn.id,
                    user: self.conn.user.clone(),
                    since: request.since,
                    reference: request.reference,
                };
                if self.blocked.is_some() {
                    // One event parks at a time; the connection cannot keep up anyway.
                    metrics::inc(&counters.sync_gave_up);
                    self.conn.close(CloseReason::QueueOverflow);
                } else if let Err(e) = self.forward(ev) {
                    self.conn.push(Outgoing::Frame(e.encode()));
                    self.conn.close(CloseReason::ServerShutdown);
                }
            }
            Stitched::GiveUp => {
                metrics::inc(&counters.sync_gave_up);
                self.conn.close(CloseReason::QueueOverflow);
            }
        }
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
    /// not get to hold us), closes our side, then drops the peer's input until it
    /// closes too (bounded in time and bytes), so unread input does not turn our
    /// close into a TCP reset that would destroy the frames we just sent.
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
                let cap = self.shared.config.sync_hold_capacity;
                for item in items {
                    self.stitcher.accept(item, &mut frames, cap);
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
        // Nothing the peer sends now is decoded (RFC 6455 7.1.7): our side is closed at
        // once, and its input is read into a fixed buffer and dropped until it closes too.
        let drained = async {
            stream.shutdown().await?;
            let mut sink = [0u8; 4096];
            let mut total = 0;
            loop {
                let n = tokio::io::AsyncReadExt::read(stream, &mut sink).await?;
                total += n;
                if n == 0 || total > FAREWELL_DRAIN_BYTES {
                    return Ok::<(), io::Error>(());
                }
            }
        };
        let _ = tokio::time::timeout(FAREWELL_DRAIN, drained).await;
    }
}
