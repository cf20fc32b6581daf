//! The hub: admission of client requests and the fan-out of the engine's
//! results to live connections. No sockets here, so `cargo test` drives it
//! with plain queues.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::Mutex;
use serde_json::value::RawValue;

use crate::cluster::{ClusterEvent, ClusterLink};
use crate::gate::ConnectGate;
use crate::membership::{Members, MembershipCache};
use crate::metrics::{self, Counters};
use crate::outbox::Outgoing;
use crate::presence::{Presence, UserPresence};
use crate::protocol::{
    self, Ack, ErrorCode, FrameError, Limits, PointerKind, Rewrite, SendFrame, StoredMessage,
};
use crate::registry::ConnHandle;
use crate::registry::{ConnectionRegistry, Push};
use crate::send_guard::{
    Admission, ChatId, ConnId, IdemKey, Origin, RemoteOrder, SendGuard, UserId,
};
use crate::typing::TypingTracker;

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A request for the engine (Python), carried in batches.
#[derive(Debug)]
pub enum EngineEvent {
    Send {
        origin: Origin,
        key: IdemKey,
        content: String,
        attachments: Vec<String>,
        /// When the gateway admitted it: the stage timings in /metrics start here.
        admitted: std::time::Instant,
    },
    Pointer {
        origin: Origin,
        user: UserId,
        chat: ChatId,
        kind: PointerKind,
        seq: u64,
    },
    Sync {
        conn: ConnId,
        user: UserId,
        since: Vec<(String, u64)>,
        reference: Option<String>,
    },
    /// Persist a user's last_seen (presence changes, batched like everything else).
    Seen { user: UserId, at: u64 },
    /// `presence.subscribe`: which of these may `user` follow, and their stored last_seen.
    PresenceQuery {
        conn: ConnId,
        user: UserId,
        user_ids: Vec<String>,
    },
    /// An upgrade waits for the plugins' `on_connect` verdict on `user` (see `crate::gate`).
    Connect {
        user: UserId,
        address: String,
        origin: Option<String>,
    },
}

/// One message of a `sync` backlog, as the store returned it (each chat's rows in seq order).
#[derive(Debug)]
pub struct BacklogRow {
    pub chat_id: String,
    pub seq: u64,
    pub message_id: String,
    pub sender_id: String,
    pub content: String,
    pub attachments: Box<RawValue>,
    pub created_at: u64,
    pub client_msg_id: Option<String>,
}

impl BacklogRow {
    pub fn message(&self) -> StoredMessage<'_> {
        StoredMessage {
            chat_id: &self.chat_id,
            seq: self.seq,
            message_id: &self.message_id,
            sender_id: &self.sender_id,
            content: &self.content,
            attachments: &self.attachments,
            created_at: self.created_at,
            client_msg_id: self.client_msg_id.as_deref(),
        }
    }
}

/// Seqs `after + 1 .. before` of a chat that `Hub::deliver_stored` has not delivered here.
#[derive(Debug, PartialEq, Eq)]
pub struct SeqGap {
    pub chat_id: String,
    pub after: u64,
    pub before: u64,
}

/// The engine's answer to one event, in batch order.
#[derive(Debug)]
pub enum EngineResult {
    Stored {
        message_id: String,
        seq: u64,
        created_at: u64,
        /// What was stored (a plugin may have rewritten the send): what every member receives.
        content: String,
        attachments: Box<RawValue>,
        /// The store already had this (sender, chat, client_msg_id); fanned out again only if
        /// its seq is above the last one fanned out (see `SendGuard::record_commit`).
        duplicate: bool,
    },
    /// The pointers after the update; `moved_*` says which one moved.
    PointerMoved {
        delivered: u64,
        read: u64,
        moved_delivered: bool,
        moved_read: bool,
    },
    /// The engine answers this event later, by other calls (a `sync` is streamed in pages
    /// through `Hub::sync_rows` and ended by `Hub::sync_end`).
    Deferred,
    /// For a `PresenceQuery`: (user_id, may follow, stored last_seen).
    PresenceInfo(Vec<(String, bool, Option<u64>)>),
    Done,
    Failed(FrameError),
}

/// What the sequenced stream says about a chat, in its order (`Hub::apply_sequenced`).
#[derive(Debug)]
pub enum Sequenced {
    /// A chat's members after a change at `version` (its log offset); the `chat` frame, when
    /// there is one, goes to the connections here of `tell` (who joined, left, or stays).
    Members {
        chat: ChatId,
        members: Vec<UserId>,
        direct: bool,
        version: i64,
        tell: Vec<UserId>,
        frame: Option<Bytes>,
    },
    /// A stored message.
    Row(BacklogRow),
    /// A send answered without a new message: a retry the store knew, or a refusal.
    Answer {
        key: IdemKey,
        outcome: Result<Arc<Ack>, FrameError>,
    },
}

/// What a REST caller (ticket) gets back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TicketOutcome {
    Ack(Arc<Ack>),
    Pointer { delivered: u64, read: u64 },
    Failed(FrameError),
}

/// Result of admitting a `send`.
#[derive(Debug)]
pub enum SendAdmission {
    /// Pass this event to the engine.
    Forward(EngineEvent),
    /// Already acked: answer with this ack.
    Duplicate(Arc<Ack>),
    /// The first attempt is in flight; the origin will be answered with it.
    InFlight,
}

/// Timings of the side paths (typing, presence).
#[derive(Debug, Clone)]
pub struct SidePathConfig {
    pub typing_ttl_ms: u64,
    pub typing_min_interval_ms: u64,
    pub presence_grace_ms: u64,
}

impl Default for SidePathConfig {
    fn default() -> Self {
        Self {
            typing_ttl_ms: 6_000,
            typing_min_interval_ms: 2_000,
            presence_grace_ms: 5_000,
        }
    }
}

/// The idempotency window's bounds (see `send_guard::IdempotencyWindow`).
#[derive(Debug, Clone)]
pub struct WindowConfig {
    pub capacity: usize,
    pub ttl_ms: u64,
    pub in_flight_deadline_ms: u64,
}

impl Default for WindowConfig {
    fn default() -> Self {
        Self {
            capacity: 1_000_000,
            ttl_ms: 24 * 3600 * 1000,
            in_flight_deadline_ms: crate::send_guard::IN_FLIGHT_DEADLINE_MS,
        }
    }
}

/// What became of a page of a `sync` backlog handed to a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncPush {
    Queued,
    /// The connection's queue has no room for the page now: hand it again later.
    Full,
    /// The connection is gone or closing: stop reading its backlog.
    Closed,
}

pub struct Hub {
    pub limits: Limits,
    pub registry: ConnectionRegistry,
    pub members: MembershipCache,
    pub sends: Mutex<SendGuard>,
    pub typing: Mutex<TypingTracker>,
    pub presence: Mutex<Presence>,
    pub counters: Counters,
    /// Set on a node of a cluster: what other nodes must hear goes out through it.
    pub cluster: Option<ClusterLink>,
    /// Plugins' verdicts on upgrades (`on_connect`); off unless a plugin has the hook.
    pub connect_gate: ConnectGate,
}

mod presence;
mod sends;
mod sync;
#[cfg(test)]
mod tests;

impl Hub {
    pub fn new(limits: Limits, window_capacity: usize, window_ttl_ms: u64) -> Self {
        let window = WindowConfig {
            capacity: window_capacity,
            ttl_ms: window_ttl_ms,
            ..WindowConfig::default()
        };
        Self::with_config(limits, window, SidePathConfig::default())
    }

    pub fn with_config(limits: Limits, window: WindowConfig, side: SidePathConfig) -> Self {
        Self {
            typing: Mutex::new(TypingTracker::new(
                side.typing_ttl_ms,
                side.typing_min_interval_ms,
            )),
            presence: Mutex::new(Presence::new(side.presence_grace_ms, limits.max_subscribe)),
            limits,
            registry: ConnectionRegistry::default(),
            members: MembershipCache::default(),
            sends: Mutex::new(SendGuard::new(
                window.capacity,
                window.ttl_ms,
                window.in_flight_deadline_ms,
            )),
            counters: Counters::default(),
            cluster: None,
            connect_gate: ConnectGate::default(),
        }
    }

    /// Replaces a chat's members in the cache (and its presence links if direct), unless the
    /// cache holds a newer `version` of them (`membership::UNVERSIONED`: always). Whether it did.
    pub fn set_chat(&self, chat: ChatId, members: Vec<UserId>, direct: bool, version: i64) -> bool {
        let mut presence = self.presence.lock();
        let applied = self.members.set(chat.clone(), members.clone(), version);
        if applied {
            presence.set_chat(&chat, &members, direct);
        }
        applied
    }

    pub fn remove_chat(&self, chat: &str) {
        self.presence.lock().set_chat(&chat.into(), &[], false);
        self.members.remove(chat);
    }

    /// A connection opened: registers it; returns the store write to make if its user came online.
    pub fn connect(&self, conn: Arc<ConnHandle>, now: u64) -> Option<EngineEvent> {
        let user = conn.user.clone();
        self.registry.register(conn);
        self.presence
            .lock()
            .connected(&user, now)
            .then_some(EngineEvent::Seen { user, at: now })
    }

    /// A connection closed: unregisters it, drops its subscriptions, and when it
    /// was the user's last, closes the user's typing states (telling the chats).
    pub fn disconnect(&self, conn: &ConnHandle, now: u64) {
        let remaining = self.registry.unregister(conn);
        {
            let mut presence = self.presence.lock();
            presence.drop_conn(conn.id);
            presence.disconnected(&conn.user, remaining, now);
        }
        if remaining == 0 {
            let chats = self.typing.lock().drop_user(&conn.user);
            for chat in chats {
                self.send_typing(&conn.user, &chat, false);
            }
        }
    }

    /// A frame another node relayed for a chat (typing, receipt): to the members connected
    /// here, except `skip_user`'s connections.
    pub fn push_to_chat(&self, chat: &str, skip_user: Option<&str>, frame: &Bytes) {
        if let Some((_, members)) = self.members.get(chat) {
            self.broadcast(&members, skip_user, frame);
        }
    }

    /// The chat's members if `user` is one of them; `not_found` or `forbidden` otherwise.
    pub fn member_chat(
        &self,
        user: &str,
        chat: &str,
    ) -> Result<(ChatId, Arc<Members>), FrameError> {
        let (id, members) = self
            .members
            .get(chat)
            .ok_or_else(|| FrameError::new(ErrorCode::NotFound, "no such chat"))?;
        if !members.contains(user) {
            return Err(FrameError::new(
                ErrorCode::Forbidden,
                "not a member of this chat",
            ));
        }
        Ok((id, members))
    }

    pub fn push_to(&self, conn: ConnId, item: Outgoing) {
        if let Some(c) = self.registry.get(conn) {
            self.count_push(c.push(item));
        }
    }

    pub(super) fn count_push(&self, push: Push) {
        if push == Push::Overflow {
            metrics::inc(&self.counters.queue_overflows);
        }
    }

    /// Sends `frame` to every connection of the chat's members except `skip_user`'s.
    pub fn broadcast(&self, members: &Members, skip_user: Option<&str>, frame: &Bytes) {
        self.registry.for_each_conn(
            members.list.iter().filter(|u| Some(&***u) != skip_user),
            |c| self.count_push(c.push(Outgoing::Frame(frame.clone()))),
        );
    }

    /// Sends `frame` to every connection of these users.
    pub fn push_to_users(&self, users: &[UserId], frame: &Bytes) {
        self.registry.for_each_conn(users, |c| {
            self.count_push(c.push(Outgoing::Frame(frame.clone())))
        });
    }

    /// Applies the engine's results for a batch: acks, fan-out, receipts, sync
    /// backlogs. Returns what REST callers waiting on tickets get.
    pub fn complete(
        &self,
        batch: Vec<EngineEvent>,
        results: Vec<EngineResult>,
    ) -> Vec<(u64, TicketOutcome)> {
        let mut tickets = Vec::new();
        let now = now_ms();
        for (event, result) in batch.into_iter().zip(results) {
            match event {
                EngineEvent::Send { key, admitted, .. } => {
                    self.complete_send(key, result, now, &mut tickets);
                    metrics::observe_send(&self.counters, admitted.elapsed().as_micros() as u64);
                }
                EngineEvent::Pointer {
                    origin,
                    user,
                    chat,
                    kind: _,
                    seq: _,
                } => self.complete_pointer(origin, &user, &chat, result, &mut tickets),
                EngineEvent::Sync {
                    conn, reference, ..
                } => self.complete_sync(conn, reference, result),
                EngineEvent::Seen { user, .. } => {
                    if matches!(result, EngineResult::Done) {
                        // Stored now: an offline user's row need not stay in memory.
                        self.presence.lock().forget_offline(&[user]);
                    }
                }
                EngineEvent::PresenceQuery { conn, .. } => {
                    self.complete_presence_query(conn, result)
                }
                EngineEvent::Connect { user, .. } => {
                    // Deferred: let in, but not kept (a plugin failed open on it).
                    let (verdict, keep) = match result {
                        EngineResult::Done => (Ok(()), true),
                        EngineResult::Deferred => (Ok(()), false),
                        EngineResult::Failed(e) => (Err(e), true),
                        _ => (
                            Err(FrameError::new(
                                ErrorCode::Internal,
                                "engine answered a connect with another kind of result",
                            )),
                            false,
                        ),
                    };
                    self.connect_gate.answer(&user, verdict, keep, now);
                }
            }
        }
        tickets
    }
}
