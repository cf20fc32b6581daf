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
use crate::sequencer::{
    Admission, ChatId, ConnId, IdemKey, Origin, RemoteOrder, Sequencer, UserId,
};
use crate::typing::TypingTracker;

/// What an ack shows of a stored message: nothing when it is what was sent (`sent`, the send's
/// fingerprint, if it is in flight here), the stored content and attachments when a plugin
/// changed them.
fn rewrite(
    sent: Option<u64>,
    stored: u64,
    content: &str,
    attachments: &RawValue,
) -> Option<Arc<Rewrite>> {
    match sent {
        Some(sent) if sent != stored => Some(Arc::new(Rewrite {
            content: content.to_owned(),
            attachments: attachments.to_owned(),
        })),
        _ => None,
    }
}

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
        /// its seq is above the last one fanned out (see `Sequencer::record_commit`).
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

/// The idempotency window's bounds (see `sequencer::IdempotencyWindow`).
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
            in_flight_deadline_ms: crate::sequencer::IN_FLIGHT_DEADLINE_MS,
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
    pub sequencer: Mutex<Sequencer>,
    pub typing: Mutex<TypingTracker>,
    pub presence: Mutex<Presence>,
    pub counters: Counters,
    /// Set on a node of a cluster: what other nodes must hear goes out through it.
    pub cluster: Option<ClusterLink>,
    /// Plugins' verdicts on upgrades (`on_connect`); off unless a plugin has the hook.
    pub connect_gate: ConnectGate,
}

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
            sequencer: Mutex::new(Sequencer::new(
                window.capacity,
                window.ttl_ms,
                window.in_flight_deadline_ms,
            )),
            counters: Counters::default(),
            cluster: None,
            connect_gate: ConnectGate::default(),
        }
    }

    /// Replaces a chat's members in the cache (and its presence links if direct).
    pub fn set_chat(&self, chat: ChatId, members: Vec<UserId>, direct: bool) {
        self.presence.lock().set_chat(&chat, &members, direct);
        self.members.set(chat, members);
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

    /// A typing frame from a member: forwarded to the other members if the tracker says so.
    pub fn typing(&self, user: &UserId, chat: &ChatId, start: bool, now: u64) {
        let forward = {
            let mut t = self.typing.lock();
            if start {
                t.start(user, chat, now)
            } else {
                t.stop(user, chat)
            }
        };
        if forward {
            self.send_typing(user, chat, start);
        }
    }

    fn send_typing(&self, user: &UserId, chat: &ChatId, start: bool) {
        if let Some((_, members)) = self.members.get(chat) {
            let frame = protocol::encode_typing(chat, user, start);
            self.broadcast(&members, Some(user), &frame);
            self.to_other_nodes(chat, user, frame);
        }
    }

    /// On a cluster node: `frame` also goes to the chat's members connected to other nodes.
    fn to_other_nodes(&self, chat: &ChatId, user: &UserId, frame: Bytes) {
        if let Some(link) = &self.cluster {
            link.push(ClusterEvent::ChatFrame {
                chat: chat.clone(),
                user: user.clone(),
                frame,
            });
        }
    }

    /// A frame another node relayed for a chat (typing, receipt): to the members connected
    /// here, except `skip_user`'s connections.
    pub fn push_to_chat(&self, chat: &str, skip_user: Option<&str>, frame: &Bytes) {
        if let Some((_, members)) = self.members.get(chat) {
            self.broadcast(&members, skip_user, frame);
        }
    }

    /// Periodic work of the side paths: expire typing states and presence grace
    /// periods, publish coalesced presence changes. Returns store writes to make.
    pub fn tick(&self, now: u64) -> Vec<EngineEvent> {
        let expired = self.typing.lock().expire(now);
        for (user, chat) in expired {
            self.send_typing(&user, &chat, false);
        }
        let (gone, changes) = {
            let mut presence = self.presence.lock();
            // A user who reconnected while its last close was being processed stays online.
            let gone = presence.expire(now, |user| self.registry.is_online(user));
            (gone, presence.take_changes())
        };
        for (user, p) in changes {
            match &self.cluster {
                // Another node may hold a connection of this user: the cluster decides.
                Some(link) => link.push(ClusterEvent::Presence {
                    user,
                    online: p.online,
                    at: p.last_seen,
                }),
                None => self.publish_presence(&user, p),
            }
        }
        gone.into_iter()
            .map(|(user, at)| EngineEvent::Seen { user, at })
            .collect()
    }

    fn publish_presence(&self, user: &UserId, p: UserPresence) {
        let frame = protocol::encode_presence(user, p.online, Some(p.last_seen));
        let (partners, conns) = self.presence.lock().followers(user);
        let mut sent = 0u64;
        self.registry.for_each_conn(partners.iter(), |c| {
            sent += 1;
            self.count_push(c.push(Outgoing::Frame(frame.clone())));
        });
        for id in conns {
            sent += 1;
            self.push_to(id, Outgoing::Frame(frame.clone()));
        }
        metrics::inc(&self.counters.presence_changes);
        metrics::add(&self.counters.presence_frames, sent);
    }

    /// The cluster's word on a user's presence: tells the followers connected here when it
    /// changes what they were told.
    pub fn cluster_presence(&self, user: &UserId, online: bool, last_seen: u64) {
        let Some(link) = &self.cluster else { return };
        let p = UserPresence { online, last_seen };
        if link.set_presence(user, p) {
            self.publish_presence(user, p);
        }
    }

    /// A user's presence as this node knows it, falling back to the stored last_seen. On a
    /// cluster node a user online on another node is online here too.
    pub fn presence_view(&self, user: &str, stored_last_seen: Option<u64>) -> (bool, Option<u64>) {
        let elsewhere = self.cluster.as_ref().and_then(|link| link.presence(user));
        let here = self.presence.lock().get(user);
        match here.filter(|p| p.online).or(elsewhere).or(here) {
            Some(p) => (
                p.online,
                Some(p.last_seen.max(stored_last_seen.unwrap_or(0))),
            ),
            None => (false, stored_last_seen),
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

    /// Admits a `send`: checks the chat, the sizes and the idempotency window. A sender
    /// who is no longer a member is still admitted, so that a retry of a send it made while
    /// it was one gets the original ack (from the window, or from the store, which refuses
    /// anything else with `forbidden`); a user who never was one gets nothing but that.
    pub fn admit_send(
        &self,
        origin: Origin,
        user: &UserId,
        send: SendFrame,
    ) -> Result<SendAdmission, FrameError> {
        let reference = Some(send.client_msg_id.clone());
        let (chat, _) = self
            .members
            .get(&send.chat_id)
            .ok_or_else(|| FrameError::new(ErrorCode::NotFound, "no such chat"))
            .map_err(|e| e.with_ref(reference.clone()))?;
        if send.content.len() > self.limits.max_content_bytes {
            return Err(
                FrameError::new(ErrorCode::TooLarge, "content is too large").with_ref(reference)
            );
        }
        if send.attachments.len() > self.limits.max_attachments {
            return Err(
                FrameError::new(ErrorCode::TooLarge, "too many attachments").with_ref(reference)
            );
        }
        let key = IdemKey {
            sender: user.clone(),
            chat,
            client_msg_id: send.client_msg_id.into(),
        };
        let sent =
            protocol::send_fingerprint(&send.content, send.attachments.iter().map(String::as_str));
        let admission = self
            .sequencer
            .lock()
            .window
            .admit(&key, sent, origin, now_ms());
        Ok(match admission {
            Admission::New => SendAdmission::Forward(EngineEvent::Send {
                origin,
                key,
                content: send.content,
                attachments: send.attachments,
                admitted: std::time::Instant::now(),
            }),
            Admission::Duplicate(ack) => {
                metrics::inc(&self.counters.retries_answered_from_window);
                SendAdmission::Duplicate(ack)
            }
            Admission::InFlight => SendAdmission::InFlight,
            Admission::Stale(waiters) => {
                metrics::inc(&self.counters.sends_in_flight_expired);
                let mut error = FrameError::new(
                    ErrorCode::Unavailable,
                    "an earlier attempt of this send was lost before it was stored; retry",
                )
                .with_ref(reference);
                error.retry_after_ms = Some(100);
                for w in waiters {
                    if let Origin::Conn(c) = w {
                        self.push_to(c, Outgoing::Frame(error.encode()));
                    }
                }
                return Err(error);
            }
        })
    }

    /// Forgets an admitted send that never reached the engine (queue closed or full).
    pub fn abandon_send(&self, key: &IdemKey, error: &FrameError) {
        let waiters = self.sequencer.lock().window.complete(key, None, now_ms());
        let frame = error
            .clone()
            .with_ref(Some(key.client_msg_id.to_string()))
            .encode();
        for w in waiters {
            // REST tickets get the error from the failed call itself or time out.
            if let Origin::Conn(c) = w {
                self.push_to(c, Outgoing::Frame(frame.clone()));
            }
        }
    }

    pub fn push_to(&self, conn: ConnId, item: Outgoing) {
        if let Some(c) = self.registry.get(conn) {
            self.count_push(c.push(item));
        }
    }

    fn count_push(&self, push: Push) {
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

    fn complete_send(
        &self,
        key: IdemKey,
        result: EngineResult,
        now: u64,
        tickets: &mut Vec<(u64, TicketOutcome)>,
    ) {
        let (message_id, seq, created_at, content, attachments) = match result {
            EngineResult::Stored {
                message_id,
                seq,
                created_at,
                content,
                attachments,
                duplicate, // the order guard below decides whether it was fanned out
            } => {
                if duplicate {
                    metrics::inc(&self.counters.retries_answered_by_store);
                }
                (message_id, seq, created_at, content, attachments)
            }
            // A cluster node: the chat's sequencer answers it later (`deliver_stored`,
            // `answer_sends`); until then it is in flight, like a send being stored here.
            EngineResult::Deferred if self.cluster.is_some() => return,
            other => {
                let error = match other {
                    EngineResult::Failed(e) => e,
                    _ => FrameError::new(
                        ErrorCode::Internal,
                        "engine answered a send with another kind of result",
                    ),
                };
                self.answer_waiters(&key, Err(error), now, tickets, false);
                return;
            }
        };
        let stored = protocol::stored_fingerprint(&content, &attachments);
        let (ack, waiters, fan_out) = {
            let mut seq_state = self.sequencer.lock();
            let ack = Arc::new(Ack {
                client_msg_id: key.client_msg_id.to_string(),
                chat_id: key.chat.to_string(),
                message_id,
                seq,
                created_at,
                rewritten: rewrite(seq_state.window.sent(&key), stored, &content, &attachments),
            });
            let waiters = seq_state.window.complete(&key, Some(&ack), now);
            // A store duplicate above the last seq fanned out was committed but never fanned
            // out (its batch failed after the commit, or the process restarted): fan it out now.
            let fan_out = seq_state.record_commit(&key.chat, seq).is_ok();
            (ack, waiters, fan_out)
        };
        self.push_answer(&waiters, Ok(ack.clone()), tickets);
        if !fan_out {
            return;
        }
        let message = StoredMessage {
            chat_id: &key.chat,
            seq,
            message_id: &ack.message_id,
            sender_id: &key.sender,
            content: &content,
            attachments: &attachments,
            created_at,
            client_msg_id: Some(&key.client_msg_id),
        };
        // The sending connection has its ack instead.
        self.fan_out(&key.chat, &message, &waiters);
    }

    /// Ends a send's time in flight: its waiting connections and REST tickets get the ack (also
    /// kept in the window for later retries) or the error. Returns who waited.
    fn answer_waiters(
        &self,
        key: &IdemKey,
        outcome: Result<Arc<Ack>, FrameError>,
        now: u64,
        tickets: &mut Vec<(u64, TicketOutcome)>,
        pending_only: bool,
    ) -> Vec<Origin> {
        let waiters = {
            let window = &mut self.sequencer.lock().window;
            let ack = outcome.as_ref().ok().map(|a| &**a);
            if pending_only {
                window.complete_pending(key, ack, now)
            } else {
                window.complete(key, ack, now)
            }
        };
        let outcome = outcome.map_err(|e| e.with_ref(Some(key.client_msg_id.to_string())));
        self.push_answer(&waiters, outcome, tickets);
        waiters
    }

    /// The ack or the error to each waiter of a send: a frame to a connection, an outcome to a
    /// REST ticket.
    fn push_answer(
        &self,
        waiters: &[Origin],
        outcome: Result<Arc<Ack>, FrameError>,
        tickets: &mut Vec<(u64, TicketOutcome)>,
    ) {
        if waiters.is_empty() {
            return;
        }
        let (frame, outcome) = match outcome {
            Ok(ack) => (protocol::encode_ack(&ack), TicketOutcome::Ack(ack)),
            Err(error) => (error.encode(), TicketOutcome::Failed(error)),
        };
        for w in waiters {
            match *w {
                Origin::Conn(c) => self.push_to(c, Outgoing::Frame(frame.clone())),
                Origin::Ticket(t) => tickets.push((t, outcome.clone())),
            }
        }
    }

    /// Sends another node's sequencer answered without a new message (a retry the store knew:
    /// the original ack; or a refusal): their waiters here get it, nothing is fanned out.
    pub fn answer_sends(
        &self,
        answers: Vec<(IdemKey, Result<Arc<Ack>, FrameError>)>,
    ) -> Vec<(u64, TicketOutcome)> {
        let mut tickets = Vec::new();
        let now = now_ms();
        for (key, outcome) in answers {
            if outcome.is_ok() {
                metrics::inc(&self.counters.retries_answered_by_store);
            }
            self.answer_waiters(&key, outcome, now, &mut tickets, false);
        }
        tickets
    }

    /// One stored message to every connection of its chat's members here but `skip`.
    fn fan_out(&self, chat: &ChatId, message: &StoredMessage<'_>, skip: &[Origin]) {
        let Some((_, members)) = self.members.get(chat) else {
            return;
        };
        // Encoded once; every recipient's queue shares these bytes.
        let frame = protocol::encode_msg(message);
        let mut deliveries = 0u64;
        self.registry.for_each_conn(members.list.iter(), |c| {
            if skip.contains(&Origin::Conn(c.id)) {
                return;
            }
            deliveries += 1;
            self.count_push(c.push(Outgoing::Msg {
                chat: chat.clone(),
                seq: message.seq,
                frame: frame.clone(),
            }));
        });
        metrics::inc(&self.counters.messages_fanned_out);
        metrics::add(&self.counters.deliveries, deliveries);
    }

    /// Messages another node stored (each chat's in seq order), fanned out to the members
    /// connected here exactly like local ones (one encoding, the same order guard, the same
    /// queues and sync stitching). A send of this node's among them is acked here, and its
    /// sending connection gets the ack instead of the message. One already fanned out here is
    /// dropped; one past a gap (a relay lost the messages between) stops its chat for this
    /// call and comes back as a gap: the caller reads the missing seqs from the store and
    /// hands them over first, so a lost relay message delays, never loses. Returns the gaps
    /// and what REST tickets got.
    pub fn deliver_stored(&self, rows: &[BacklogRow]) -> (Vec<SeqGap>, Vec<(u64, TicketOutcome)>) {
        let mut gaps: Vec<SeqGap> = Vec::new();
        let mut tickets = Vec::new();
        let now = now_ms();
        for row in rows {
            if gaps.iter().any(|g| g.chat_id == row.chat_id) {
                continue;
            }
            let chat: ChatId = row.chat_id.as_str().into();
            let order = self.sequencer.lock().accept_remote(&chat, row.seq);
            if let RemoteOrder::Gap { last } = order {
                gaps.push(SeqGap {
                    chat_id: row.chat_id.clone(),
                    after: last,
                    before: row.seq,
                });
                continue;
            }
            let waiters = match &row.client_msg_id {
                Some(cmid) if self.cluster.is_some() => {
                    let key = IdemKey {
                        sender: row.sender_id.as_str().into(),
                        chat: chat.clone(),
                        client_msg_id: cmid.as_str().into(),
                    };
                    let sent = self.sequencer.lock().window.sent(&key);
                    let stored = protocol::stored_fingerprint(&row.content, &row.attachments);
                    let ack = Arc::new(Ack {
                        client_msg_id: cmid.clone(),
                        chat_id: row.chat_id.clone(),
                        message_id: row.message_id.clone(),
                        seq: row.seq,
                        created_at: row.created_at,
                        rewritten: rewrite(sent, stored, &row.content, &row.attachments),
                    });
                    self.answer_waiters(&key, Ok(ack), now, &mut tickets, true)
                }
                _ => Vec::new(),
            };
            if order == RemoteOrder::Next {
                self.fan_out(&chat, &row.message(), &waiters);
            }
        }
        (gaps, tickets)
    }

    /// Chats with a member connected here, each with the last seq fanned out here: after the
    /// relay between nodes lost messages (Redis restarted under it), the cluster layer reads
    /// what follows from the store and hands it to `deliver_stored`. A message whose relay was
    /// lost and that no later one in its chat follows would otherwise wait for a reconnect.
    pub fn fanned_out_heads(&self) -> Vec<(ChatId, u64)> {
        let heads = self.sequencer.lock().fanned_out();
        heads
            .into_iter()
            .filter(|(chat, _)| {
                self.members.get(chat).is_some_and(|(_, members)| {
                    members.list.iter().any(|u| self.registry.is_online(u))
                })
            })
            .collect()
    }

    fn complete_pointer(
        &self,
        origin: Origin,
        user: &UserId,
        chat: &ChatId,
        result: EngineResult,
        tickets: &mut Vec<(u64, TicketOutcome)>,
    ) {
        match result {
            EngineResult::PointerMoved {
                delivered,
                read,
                moved_delivered,
                moved_read,
            } => {
                if let Some((_, members)) = self.members.get(chat) {
                    if moved_delivered {
                        let f =
                            protocol::encode_receipt(chat, user, PointerKind::Delivered, delivered);
                        self.broadcast(&members, Some(user), &f);
                        self.to_other_nodes(chat, user, f);
                    }
                    if moved_read {
                        let f = protocol::encode_receipt(chat, user, PointerKind::Read, read);
                        self.broadcast(&members, Some(user), &f);
                        self.to_other_nodes(chat, user, f);
                    }
                }
                if let Origin::Ticket(t) = origin {
                    tickets.push((t, TicketOutcome::Pointer { delivered, read }));
                }
            }
            other => {
                let error = match other {
                    EngineResult::Failed(e) => e,
                    _ => FrameError::new(
                        ErrorCode::Internal,
                        "engine answered a pointer with another kind of result",
                    ),
                };
                match origin {
                    Origin::Conn(c) => self.push_to(c, Outgoing::Frame(error.encode())),
                    Origin::Ticket(t) => tickets.push((t, TicketOutcome::Failed(error))),
                }
            }
        }
    }

    /// Answers a connection's `presence.subscribe` (the engine defers it: Python looks the
    /// users up off its thread and answers here).
    pub fn complete_presence_query(&self, conn: ConnId, result: EngineResult) {
        let info = match result {
            EngineResult::PresenceInfo(info) => info,
            EngineResult::Failed(e) => return self.push_to(conn, Outgoing::Frame(e.encode())),
            _ => return,
        };
        let (allowed, refused): (Vec<_>, Vec<_>) = info.into_iter().partition(|(_, ok, _)| *ok);
        let users: Vec<UserId> = allowed
            .iter()
            .map(|(u, _, _)| UserId::from(u.as_str()))
            .collect();
        if let Err(e) = self.presence.lock().subscribe(conn, &users) {
            return self.push_to(
                conn,
                Outgoing::Frame(FrameError::new(ErrorCode::BadRequest, e.to_string()).encode()),
            );
        }
        for (user, _, stored) in &allowed {
            let (online, last_seen) = self.presence_view(user, *stored);
            self.push_to(
                conn,
                Outgoing::Frame(protocol::encode_presence(user, online, last_seen)),
            );
        }
        if !refused.is_empty() {
            let ids: Vec<&str> = refused.iter().map(|(u, _, _)| u.as_str()).collect();
            let message = format!("you share no chat with: {}", ids.join(", "));
            self.push_to(
                conn,
                Outgoing::Frame(FrameError::new(ErrorCode::Forbidden, message).encode()),
            );
        }
    }

    /// The engine's answer to a `sync` event: nothing now when it streams the backlog
    /// (`Deferred`), or an error that ends the sync.
    fn complete_sync(&self, conn: ConnId, reference: Option<String>, result: EngineResult) {
        match result {
            EngineResult::Deferred => {}
            EngineResult::Failed(e) => self.sync_failed(conn, reference.as_deref(), e),
            _ => self.sync_failed(
                conn,
                reference.as_deref(),
                FrameError::new(
                    ErrorCode::Internal,
                    "engine answered a sync with another kind of result",
                ),
            ),
        }
    }

    /// Queues one page of a `sync` backlog on the connection, whole or not at all: only
    /// while it fits in half of its queue (the backlog counts against `queue_capacity`, so
    /// a returning user's history is never held in memory beyond that, and live messages
    /// keep the other half).
    pub fn sync_rows(&self, conn: ConnId, rows: &[BacklogRow]) -> SyncPush {
        let Some(c) = self.registry.get(conn) else {
            return SyncPush::Closed;
        };
        if c.is_closing() {
            return SyncPush::Closed;
        }
        if !c.has_room_for_backlog(rows.len()) {
            return SyncPush::Full;
        }
        let items = rows.iter().map(|row| Outgoing::Backlog {
            chat: ChatId::from(row.chat_id.as_str()),
            seq: row.seq,
            frame: protocol::encode_msg(&row.message()),
        });
        metrics::add(&self.counters.sync_rows, rows.len() as u64);
        match c.push_all(items) {
            Push::Queued => SyncPush::Queued,
            Push::Overflow | Push::Closed => SyncPush::Closed,
        }
    }

    /// Ends a `sync` answer with its `synced` frame (each chat's last seq as read).
    pub fn sync_end(&self, conn: ConnId, reference: Option<&str>, chats: &[(String, u64)]) {
        let frame = protocol::encode_synced(chats.iter().map(|(c, s)| (c.as_str(), *s)), reference);
        self.push_to(conn, Outgoing::SyncEnd { frame, ok: true });
    }

    /// Ends a `sync` answer with an error (what was streamed stays written; a retry
    /// repeats none of it).
    pub fn sync_failed(&self, conn: ConnId, reference: Option<&str>, error: FrameError) {
        let frame = error.with_ref(reference.map(str::to_owned)).encode();
        self.push_to(conn, Outgoing::SyncEnd { frame, ok: false });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::ConnHandle;

    fn hub() -> Hub {
        let hub = Hub::new(Limits::default(), 100, 60_000);
        hub.members
            .set("c1".into(), vec!["a".into(), "b".into(), "c".into()]);
        hub
    }

    fn connect(hub: &Hub, id: ConnId, user: &str) -> Arc<ConnHandle> {
        let conn = Arc::new(ConnHandle::new(id, user.into(), 16, 0));
        hub.registry.register(conn.clone());
        conn
    }

    fn drain(conn: &Arc<ConnHandle>) -> Vec<String> {
        let mut out = Vec::new();
        let mut items = Vec::new();
        conn.take_queued(usize::MAX, &mut items);
        for item in items {
            let text = match item {
                Outgoing::Frame(b)
                | Outgoing::Msg { frame: b, .. }
                | Outgoing::SyncEnd { frame: b, .. } => String::from_utf8(b.to_vec()).unwrap(),
                other => format!("{other:?}"),
            };
            let v: serde_json::Value =
                serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
            out.push(
                v.get("type")
                    .and_then(|t| t.as_str())
                    .unwrap_or("?")
                    .to_owned(),
            );
        }
        out
    }

    fn send(cmid: &str) -> SendFrame {
        SendFrame {
            chat_id: "c1".into(),
            client_msg_id: cmid.into(),
            content: "hi".into(),
            attachments: vec![],
        }
    }

    /// `user`'s send of `cmid` in chat c1, admitted as new: the event for the engine.
    fn forward(hub: &Hub, origin: Origin, user: &str, cmid: &str) -> EngineEvent {
        match hub.admit_send(origin, &user.into(), send(cmid)).unwrap() {
            SendAdmission::Forward(ev) => ev,
            other => panic!("expected forward, got {other:?}"),
        }
    }

    fn stored(seq: u64, duplicate: bool) -> EngineResult {
        EngineResult::Stored {
            message_id: format!("m{seq}"),
            seq,
            created_at: 1,
            content: "hi".into(),
            attachments: RawValue::from_string("[]".into()).unwrap(),
            duplicate,
        }
    }

    #[test]
    fn send_acks_sender_and_fans_out_to_everyone_else_including_senders_other_device() {
        let hub = hub();
        let a1 = connect(&hub, 1, "a");
        let a2 = connect(&hub, 2, "a");
        let b = connect(&hub, 3, "b");
        let ev = forward(&hub, Origin::Conn(1), "a", "x");
        let tickets = hub.complete(vec![ev], vec![stored(1, false)]);
        assert!(tickets.is_empty());
        assert_eq!(drain(&a1), ["ack"]);
        assert_eq!(drain(&a2), ["msg"]);
        assert_eq!(drain(&b), ["msg"]);
        // A retry anywhere gets the same ack, and nobody gets a second msg.
        match hub
            .admit_send(Origin::Ticket(7), &"a".into(), send("x"))
            .unwrap()
        {
            SendAdmission::Duplicate(ack) => {
                assert_eq!((ack.seq, ack.message_id.as_str()), (1, "m1"))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn store_duplicate_is_fanned_out_only_if_it_never_was() {
        let hub = hub();
        let a = connect(&hub, 1, "a");
        let b = connect(&hub, 2, "b");
        let forward = |cmid: &str| forward(&hub, Origin::Conn(1), "a", cmid);
        hub.complete(vec![forward("x")], vec![stored(4, false)]);
        assert_eq!(drain(&a), ["ack"]);
        assert_eq!(drain(&b), ["msg"]);
        // The store already had it and it was fanned out (seq 4): ack only.
        hub.complete(vec![forward("y")], vec![stored(4, true)]);
        assert_eq!(drain(&a), ["ack"]);
        assert!(drain(&b).is_empty());
        // The store had it but it was never fanned out (committed, then the batch failed): fan out now.
        hub.complete(vec![forward("z")], vec![stored(5, true)]);
        assert_eq!(drain(&a), ["ack"]);
        assert_eq!(drain(&b), ["msg"]);
    }

    #[test]
    fn unknown_chat_is_refused_and_a_non_members_send_is_left_to_the_store() {
        let hub = hub();
        // It may be the retry of a send made while a member (the store answers it, or
        // refuses it with `forbidden`).
        assert!(matches!(
            hub.admit_send(Origin::Conn(1), &"z".into(), send("x")),
            Ok(SendAdmission::Forward(_))
        ));
        let mut s = send("y");
        s.chat_id = "nope".into();
        assert_eq!(
            hub.admit_send(Origin::Conn(1), &"a".into(), s)
                .unwrap_err()
                .code,
            ErrorCode::NotFound
        );
    }

    #[test]
    fn failed_send_errors_every_waiter_and_can_be_retried() {
        let hub = hub();
        let a = connect(&hub, 1, "a");
        let ev = forward(&hub, Origin::Conn(1), "a", "x");
        assert!(matches!(
            hub.admit_send(Origin::Ticket(3), &"a".into(), send("x"))
                .unwrap(),
            SendAdmission::InFlight
        ));
        let t = hub.complete(
            vec![ev],
            vec![EngineResult::Failed(FrameError::new(
                ErrorCode::NotFound,
                "no media",
            ))],
        );
        assert_eq!(t.len(), 1);
        assert!(matches!(&t[0], (3, TicketOutcome::Failed(e)) if e.code == ErrorCode::NotFound));
        assert_eq!(drain(&a), ["error"]);
        assert!(matches!(
            hub.admit_send(Origin::Conn(1), &"a".into(), send("x"))
                .unwrap(),
            SendAdmission::Forward(_)
        ));
    }

    #[test]
    fn receipts_go_to_other_members_only() {
        let hub = hub();
        let a = connect(&hub, 1, "a");
        let b = connect(&hub, 2, "b");
        let ev = EngineEvent::Pointer {
            origin: Origin::Conn(2),
            user: "b".into(),
            chat: "c1".into(),
            kind: PointerKind::Read,
            seq: 3,
        };
        hub.complete(
            vec![ev],
            vec![EngineResult::PointerMoved {
                delivered: 3,
                read: 3,
                moved_delivered: true,
                moved_read: true,
            }],
        );
        assert_eq!(drain(&a), ["receipt", "receipt"]);
        assert!(drain(&b).is_empty());
    }

    #[test]
    fn presence_goes_to_online_direct_partners_after_grace_and_typing_stops_on_last_close() {
        let window = WindowConfig {
            capacity: 10,
            ttl_ms: 1_000,
            ..WindowConfig::default()
        };
        let hub = Hub::with_config(
            Limits::default(),
            window,
            SidePathConfig {
                typing_ttl_ms: 6_000,
                typing_min_interval_ms: 2_000,
                presence_grace_ms: 500,
            },
        );
        hub.set_chat("d".into(), vec!["a".into(), "b".into()], true);
        hub.set_chat("g".into(), vec!["a".into(), "c".into()], false);
        let b = connect(&hub, 2, "b");
        let c = connect(&hub, 3, "c");
        let a = Arc::new(ConnHandle::new(1, "a".into(), 16, 0));
        assert!(matches!(
            hub.connect(a.clone(), 1_000),
            Some(EngineEvent::Seen { at: 1_000, .. })
        ));
        assert!(hub.tick(1_000).is_empty());
        assert_eq!(drain(&b), ["presence"], "direct partner hears it");
        assert!(drain(&c).is_empty(), "a group member does not");
        hub.typing(&"a".into(), &"g".into(), true, 1_100);
        assert_eq!(drain(&c), ["typing"]);
        hub.disconnect(&a, 2_000);
        assert_eq!(
            drain(&c),
            ["typing"],
            "stop when the last connection closes"
        );
        assert!(
            hub.tick(2_400).is_empty() && drain(&b).is_empty(),
            "within grace"
        );
        let seen = hub.tick(2_500);
        assert!(matches!(&seen[..], [EngineEvent::Seen { at: 2_000, .. }]));
        assert_eq!(drain(&b), ["presence"]);
        assert_eq!(hub.presence_view("a", Some(10)), (false, Some(2_000)));
    }

    fn row(seq: u64) -> BacklogRow {
        BacklogRow {
            chat_id: "c1".into(),
            seq,
            message_id: format!("m{seq}"),
            sender_id: "b".into(),
            content: "hi".into(),
            attachments: RawValue::from_string("[]".into()).unwrap(),
            created_at: 1,
            client_msg_id: None,
        }
    }

    #[test]
    fn messages_of_another_node_are_fanned_out_once_in_order_and_a_gap_is_returned() {
        let hub = hub();
        let a = connect(&hub, 1, "a");
        let b = connect(&hub, 2, "b");
        assert_eq!(hub.deliver_stored(&[row(1), row(2)]).0, []);
        assert_eq!(drain(&a), ["msg", "msg"]);
        assert_eq!(
            drain(&b),
            ["msg", "msg"],
            "the sender's devices here get it too"
        );
        // 3 was lost on the way: 4 and 5 wait for it.
        let (gaps, _) = hub.deliver_stored(&[row(2), row(4), row(5)]);
        assert_eq!(
            gaps,
            [SeqGap {
                chat_id: "c1".into(),
                after: 2,
                before: 4
            }]
        );
        assert!(drain(&a).is_empty(), "nothing past a gap, nothing twice");
        assert_eq!(hub.deliver_stored(&[row(3), row(4), row(5)]).0, []);
        assert_eq!(drain(&a), ["msg", "msg", "msg"]);
    }

    #[test]
    fn fanned_out_heads_are_the_chats_with_a_member_connected_here() {
        let hub = hub();
        hub.members.set("c2".into(), vec!["x".into()]);
        let a = connect(&hub, 1, "a");
        hub.deliver_stored(&[row(1), row(2)]);
        let mut other = row(7);
        other.chat_id = "c2".into();
        hub.deliver_stored(&[other]);
        assert_eq!(
            hub.fanned_out_heads(),
            [("c1".into(), 2)],
            "c2's only member is not here"
        );
        hub.registry.unregister(&a);
        assert_eq!(hub.fanned_out_heads(), []);
    }

    fn cluster_hub() -> Hub {
        let mut hub = hub();
        hub.cluster = Some(ClusterLink::default());
        hub
    }

    fn sent_row(seq: u64, sender: &str, cmid: &str) -> BacklogRow {
        BacklogRow {
            sender_id: sender.into(),
            client_msg_id: Some(cmid.into()),
            ..row(seq)
        }
    }

    #[test]
    fn a_cluster_send_waits_for_its_sequencer_and_is_acked_by_the_delivered_row() {
        let hub = cluster_hub();
        let a1 = connect(&hub, 1, "a");
        let a2 = connect(&hub, 2, "a");
        let b = connect(&hub, 3, "b");
        let forward = |origin: Origin, cmid: &str| forward(&hub, origin, "a", cmid);
        // Produced to the sends log: nothing yet, the send stays in flight.
        let tickets = hub.complete(
            vec![forward(Origin::Conn(1), "x")],
            vec![EngineResult::Deferred],
        );
        assert!(tickets.is_empty());
        assert!(drain(&a1).is_empty());
        assert!(matches!(
            hub.admit_send(Origin::Ticket(9), &"a".into(), send("x"))
                .unwrap(),
            SendAdmission::InFlight
        ));
        // The sequencer's row comes back: the sender's connection gets the ack instead of the
        // message, the REST retry its ticket, everyone else the message; once.
        let (gaps, tickets) = hub.deliver_stored(&[sent_row(1, "a", "x")]);
        assert!(gaps.is_empty());
        assert!(matches!(&tickets[..], [(9, TicketOutcome::Ack(ack))] if ack.seq == 1));
        assert_eq!(drain(&a1), ["ack"]);
        assert_eq!(drain(&a2), ["msg"]);
        assert_eq!(drain(&b), ["msg"]);
        assert_eq!(hub.deliver_stored(&[sent_row(1, "a", "x")]).1, []);
        assert!(drain(&a1).is_empty() && drain(&b).is_empty());
        // A later retry here is answered from the window.
        assert!(matches!(
            hub.admit_send(Origin::Conn(1), &"a".into(), send("x")).unwrap(),
            SendAdmission::Duplicate(ack) if ack.seq == 1
        ));
        // Another node's message is not remembered in this window.
        hub.deliver_stored(&[sent_row(2, "b", "y")]);
        assert!(matches!(
            hub.admit_send(Origin::Conn(3), &"b".into(), send("y"))
                .unwrap(),
            SendAdmission::Forward(_)
        ));
    }

    #[test]
    fn a_cluster_send_answered_without_a_message_gets_the_ack_or_the_error_only() {
        let hub = cluster_hub();
        let a = connect(&hub, 1, "a");
        let b = connect(&hub, 2, "b");
        for cmid in ["x", "y"] {
            let ev = forward(&hub, Origin::Conn(1), "a", cmid);
            hub.complete(vec![ev], vec![EngineResult::Deferred]);
        }
        let key = |cmid: &str| IdemKey {
            sender: "a".into(),
            chat: "c1".into(),
            client_msg_id: cmid.into(),
        };
        let ack = Arc::new(Ack {
            client_msg_id: "x".into(),
            chat_id: "c1".into(),
            message_id: "m7".into(),
            seq: 7,
            created_at: 1,
            rewritten: None,
        });
        hub.answer_sends(vec![
            (key("x"), Ok(ack)),
            (
                key("y"),
                Err(FrameError::new(ErrorCode::Forbidden, "not a member")),
            ),
        ]);
        assert_eq!(drain(&a), ["ack", "error"]);
        assert!(
            drain(&b).is_empty(),
            "a retry's message was delivered when it was stored"
        );
    }

    #[test]
    fn a_single_node_never_leaves_a_send_deferred() {
        let hub = hub();
        let a = connect(&hub, 1, "a");
        let ev = forward(&hub, Origin::Conn(1), "a", "x");
        hub.complete(vec![ev], vec![EngineResult::Deferred]);
        assert_eq!(drain(&a), ["error"]);
    }

    #[test]
    fn cluster_nodes_hand_typing_receipts_and_presence_to_the_cluster_layer() {
        let hub = cluster_hub();
        hub.set_chat("d1".into(), vec!["a".into(), "b".into()], true);
        let b = connect(&hub, 2, "b");
        hub.typing(&"a".into(), &"c1".into(), true, 10);
        assert_eq!(drain(&b), ["typing"], "members here hear it at once");
        hub.connect(connect(&hub, 1, "a"), 10);
        hub.tick(20);
        assert!(
            drain(&b).is_empty(),
            "a's presence is the cluster's to decide"
        );
        let link = hub.cluster.as_ref().unwrap();
        let events = link.take(std::time::Duration::from_millis(1));
        assert!(matches!(&events[0], ClusterEvent::ChatFrame { chat, .. } if &**chat == "c1"));
        assert!(events.iter().any(|e| matches!(
            e,
            ClusterEvent::Presence { user, online: true, .. } if &**user == "a"
        )));
        // The cluster's word reaches the followers here once per change.
        hub.cluster_presence(&"a".into(), true, 10);
        hub.cluster_presence(&"a".into(), true, 10);
        assert_eq!(drain(&b), ["presence"]);
        hub.cluster_presence(&"x".into(), true, 10);
        assert_eq!(
            hub.presence_view("x", Some(3)),
            (true, Some(10)),
            "online on another node"
        );
        hub.cluster_presence(&"x".into(), false, 30);
        assert_eq!(hub.presence_view("x", Some(30)), (false, Some(30)));
    }

    #[test]
    fn a_sync_page_is_queued_only_while_the_connection_has_room_for_it() {
        let hub = hub();
        let a = connect(&hub, 1, "a"); // queue capacity 16: a backlog may fill 8
        let page: Vec<BacklogRow> = (1..=4).map(row).collect();
        assert_eq!(hub.sync_rows(1, &page), SyncPush::Queued);
        assert_eq!(hub.sync_rows(1, &page), SyncPush::Queued);
        assert_eq!(hub.sync_rows(1, &page), SyncPush::Full, "4 + 4 + 4 > 8");
        let mut items = Vec::new();
        a.take_queued(usize::MAX, &mut items);
        assert_eq!(items.len(), 8);
        let big: Vec<BacklogRow> = (1..=40).map(row).collect();
        assert_eq!(
            hub.sync_rows(1, &big),
            SyncPush::Queued,
            "an empty queue takes any page"
        );
        a.take_queued(usize::MAX, &mut items);
        assert_eq!(hub.sync_rows(1, &page), SyncPush::Queued);
        assert_eq!(
            hub.sync_rows(99, &page),
            SyncPush::Closed,
            "no such connection"
        );
        a.close(crate::registry::CloseReason::PeerClosed);
        assert_eq!(hub.sync_rows(1, &page), SyncPush::Closed);
    }

    #[test]
    fn a_retry_after_the_in_flight_deadline_is_told_unavailable_with_every_earlier_waiter() {
        let window = WindowConfig {
            capacity: 10,
            ttl_ms: 60_000,
            in_flight_deadline_ms: 0,
        };
        let hub = Hub::with_config(Limits::default(), window, SidePathConfig::default());
        hub.members.set("c1".into(), vec!["a".into()]);
        let a = connect(&hub, 1, "a");
        assert!(matches!(
            hub.admit_send(Origin::Conn(1), &"a".into(), send("x")),
            Ok(SendAdmission::Forward(_))
        ));
        // The batch carrying it is lost; a retry past the deadline is refused, not parked.
        let e = hub
            .admit_send(Origin::Conn(1), &"a".into(), send("x"))
            .unwrap_err();
        assert_eq!(
            (e.code, e.reference.as_deref()),
            (ErrorCode::Unavailable, Some("x"))
        );
        assert_eq!(
            drain(&a),
            ["error"],
            "the first attempt's waiter hears it too"
        );
        assert!(matches!(
            hub.admit_send(Origin::Conn(1), &"a".into(), send("x")),
            Ok(SendAdmission::Forward(_))
        ));
    }

    #[test]
    fn members_receive_the_content_that_was_stored_not_the_content_that_was_sent() {
        let hub = hub();
        let b = connect(&hub, 2, "b");
        let ev = forward(&hub, Origin::Conn(1), "a", "x");
        let mut result = stored(1, false);
        if let EngineResult::Stored { content, .. } = &mut result {
            *content = "rewritten by the store".into();
        }
        hub.complete(vec![ev], vec![result]);
        let mut items = Vec::new();
        b.take_queued(usize::MAX, &mut items);
        let [Outgoing::Msg { frame, .. }] = &items[..] else {
            panic!("one msg: {items:?}")
        };
        let msg: serde_json::Value = serde_json::from_slice(frame).unwrap();
        assert_eq!(msg["content"], "rewritten by the store");
    }

    fn ack_of(conn: &Arc<ConnHandle>) -> serde_json::Value {
        let mut items = Vec::new();
        conn.take_queued(usize::MAX, &mut items);
        let [Outgoing::Frame(frame)] = &items[..] else {
            panic!("one frame: {items:?}")
        };
        serde_json::from_slice(frame).unwrap()
    }

    #[test]
    fn the_sender_is_shown_what_a_plugin_stored_instead_of_what_it_sent() {
        let hub = hub();
        let a = connect(&hub, 1, "a");
        let ev = forward(&hub, Origin::Conn(1), "a", "x");
        let mut result = stored(1, false);
        if let EngineResult::Stored {
            content,
            attachments,
            ..
        } = &mut result
        {
            *content = "rewritten".into();
            *attachments = RawValue::from_string(r#"[{"id":"f1","name":"a.png"}]"#.into()).unwrap();
        }
        hub.complete(vec![ev], vec![result]);
        let ack = ack_of(&a);
        assert_eq!(ack["type"], "ack");
        assert_eq!(ack["content"], "rewritten");
        assert_eq!(ack["attachments"][0]["id"], "f1");
        // A retry answered from the window shows it too.
        let Ok(SendAdmission::Duplicate(again)) =
            hub.admit_send(Origin::Conn(1), &"a".into(), send("x"))
        else {
            panic!("a duplicate")
        };
        assert_eq!(again.rewritten.as_ref().unwrap().content, "rewritten");
    }

    #[test]
    fn an_ack_of_a_send_stored_as_sent_carries_no_content() {
        let hub = hub();
        let a = connect(&hub, 1, "a");
        let ev = forward(&hub, Origin::Conn(1), "a", "x");
        hub.complete(vec![ev], vec![stored(1, false)]);
        let ack = ack_of(&a);
        assert_eq!(ack["seq"], 1);
        assert!(ack.get("content").is_none() && ack.get("attachments").is_none());
        // Same content, attachments sent as ids and stored as objects: not a rewrite.
        assert_eq!(
            protocol::send_fingerprint("hi", ["f1", "f2"].into_iter()),
            protocol::stored_fingerprint(
                "hi",
                &RawValue::from_string(r#"[{"id":"f1","size":3},{"id":"f2"}]"#.into()).unwrap()
            )
        );
        assert_ne!(
            protocol::send_fingerprint("hi", ["f2", "f1"].into_iter()),
            protocol::stored_fingerprint(
                "hi",
                &RawValue::from_string(r#"[{"id":"f1"},{"id":"f2"}]"#.into()).unwrap()
            )
        );
    }
}
