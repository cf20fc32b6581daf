//! The engine's end of the gateway: batches of events out to the engine (Python),
//! stored results back in, completed in order on the fan-out thread, and the pages
//! of a `sync` backlog that the engine streams to a connection.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, Notify};

use super::{Gateway, Shared};
use crate::hub::{
    BacklogRow, EngineEvent, EngineResult, Hub, SendAdmission, SeqGap, Sequenced, SyncPush,
    TicketOutcome,
};
use crate::metrics;
use crate::protocol::{self, ErrorCode, FrameError, PointerKind, SendFrame};
use crate::send_guard::{ConnId, IdemKey, Origin, UserId};

/// A stored batch waiting for its acks and fan-out.
type Completion = (Vec<EngineEvent>, Vec<EngineResult>);

/// Batches the engine has stored but the fan-out thread has not completed
/// yet; past this, `complete` waits (the engine never runs far ahead).
const COMPLETIONS_AHEAD: usize = 2;

/// REST tickets completed by the fan-out thread, for the engine to hand out.
#[derive(Default)]
pub struct Tickets {
    done: Mutex<Vec<(u64, TicketOutcome)>>,
    ready: Notify,
}

pub(super) struct Bridge {
    events_rx: Mutex<mpsc::Receiver<EngineEvent>>,
    /// To the fan-out thread: acks and fan-out of batch k run there while
    /// the engine stores batch k+1 (in order: one thread, one queue).
    completions: Mutex<Option<std::sync::mpsc::SyncSender<Completion>>>,
    tickets: Arc<Tickets>,
    /// Drives the engine thread's waits; separate from the gateway runtime so
    /// a shutdown of that runtime never panics a waiting engine.
    engine_rt: Runtime,
}

impl Bridge {
    pub(super) fn start(
        shared: Arc<Shared>,
        events_rx: mpsc::Receiver<EngineEvent>,
    ) -> std::io::Result<Self> {
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
            events_rx: Mutex::new(events_rx),
            completions: Mutex::new(Some(completions)),
            tickets,
            engine_rt,
        })
    }

    /// Ends the fan-out thread once it has completed what is queued.
    pub(super) fn stop(&self) {
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

impl Gateway {
    /// Blocks until at least one event is ready, REST tickets were completed
    /// (see `take_tickets`) or `timeout` passes, then takes up to `max`
    /// events. An empty batch after shutdown means stop.
    pub fn next_batch(&self, max: usize, timeout: Duration) -> Vec<EngineEvent> {
        let bridge = &self.bridge;
        let mut rx = bridge.events_rx.lock();
        let mut batch = Vec::new();
        if !self.is_running() {
            return batch;
        }
        let first = bridge.engine_rt.block_on(async {
            tokio::select! {
                ev = rx.recv() => ev,
                _ = bridge.tickets.ready.notified() => None,
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
            metrics::inc(&counters.batches);
            metrics::add(&counters.batch_events, batch.len() as u64);
        }
        batch
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
            let mut error =
                FrameError::new(ErrorCode::Unavailable, "server is busy, retry shortly");
            error.retry_after_ms = Some(100);
            self.abandon(e.into_inner(), &error);
            error
        })
    }

    /// An event taken from the queue that will never reach the engine (its batch could
    /// not be handed over): its send waiters get `error` at once instead of waiting
    /// for the in-flight deadline.
    pub fn abandon(&self, ev: EngineEvent, error: &FrameError) {
        if let EngineEvent::Send { key, .. } = ev {
            self.shared.hub.abandon_send(&key, error);
        }
    }

    /// Hands a stored batch to the fan-out thread (waiting while it is
    /// `COMPLETIONS_AHEAD` batches behind). REST tickets it completes come
    /// back through `take_tickets`.
    pub fn complete(&self, batch: Vec<EngineEvent>, results: Vec<EngineResult>) {
        let queued = match self.bridge.completions.lock().as_ref() {
            Some(tx) => tx.send((batch, results)).map_err(|e| e.0),
            None => Err((batch, results)),
        };
        if let Err((batch, results)) = queued {
            // The fan-out thread is gone (shutdown): complete here.
            let done = self.shared.hub.complete(batch, results);
            self.bridge.tickets.done.lock().extend(done);
        }
    }

    /// Messages another node stored (see `Hub::deliver_stored`); the gaps met come back.
    pub fn deliver_stored(&self, rows: &[BacklogRow]) -> Vec<SeqGap> {
        let (gaps, done) = self.shared.hub.deliver_stored(rows);
        self.hand_out(done);
        gaps
    }

    /// The sequenced stream's members, rows and answers, in its order (see
    /// `Hub::apply_sequenced`); returns the gaps met.
    pub fn apply_sequenced(&self, items: Vec<Sequenced>) -> Vec<SeqGap> {
        let (gaps, done) = self.shared.hub.apply_sequenced(items);
        self.hand_out(done);
        gaps
    }

    /// Sends another node's sequencer answered without a new message (see `Hub::answer_sends`).
    pub fn answer_sends(&self, answers: Vec<(IdemKey, Result<Arc<protocol::Ack>, FrameError>)>) {
        let done = self.shared.hub.answer_sends(answers);
        self.hand_out(done);
    }

    fn hand_out(&self, done: Vec<(u64, TicketOutcome)>) {
        if !done.is_empty() {
            self.bridge.tickets.done.lock().extend(done);
            self.bridge.tickets.ready.notify_one();
        }
    }

    /// REST tickets completed since the last call.
    pub fn take_tickets(&self) -> Vec<(u64, TicketOutcome)> {
        std::mem::take(&mut *self.bridge.tickets.done.lock())
    }

    /// One page of a connection's `sync` backlog (see `Hub::sync_rows`).
    pub fn sync_rows(&self, conn: ConnId, rows: &[BacklogRow]) -> SyncPush {
        self.shared.hub.sync_rows(conn, rows)
    }

    /// The end of a connection's `sync` answer.
    pub fn sync_end(&self, conn: ConnId, reference: Option<&str>, chats: &[(String, u64)]) {
        self.shared.hub.sync_end(conn, reference, chats)
    }

    pub fn sync_failed(&self, conn: ConnId, reference: Option<&str>, error: FrameError) {
        self.shared.hub.sync_failed(conn, reference, error)
    }
}
