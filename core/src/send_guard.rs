//! The gateway's guard around a send: the idempotency window and the commit-order
//! guard of the fan-out. It assigns no seq (it was called `Sequencer` until the
//! cluster got a real one).
//!
//! The store numbers messages inside its write transaction (`seq` = chat's
//! last_seq + 1), which is the only place where numbering and durability can be
//! atomic. The `SendGuard` owns what happens around that:
//! - admission: a `send` whose (sender, chat, client_msg_id) is already acked
//!   gets the SAME ack again without reaching the store; one that is in flight
//!   waits for the first attempt's result instead of being stored twice. Keys
//!   evicted from the window (or lost in a restart) fall through to the store,
//!   whose unique index answers with the original ack, so idempotency holds for
//!   24 h and across restarts;
//! - ordering: a chat's messages are fanned out in strictly increasing `seq`;
//!   `record_commit` refuses a seq at or below the last one fanned out.

use std::collections::hash_map::{Entry as MapEntry, RandomState};
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::Arc;

use crate::fasthash::FastHash;
use crate::protocol::{Ack, Rewrite};

pub type UserId = Arc<str>;
pub type ChatId = Arc<str>;
pub type ConnId = u64;

/// Who waits for the outcome of a request: a live connection, or a REST call
/// identified by a ticket that Python chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Origin {
    Conn(ConnId),
    Ticket(u64),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdemKey {
    pub sender: UserId,
    pub chat: ChatId,
    pub client_msg_id: Arc<str>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// First time seen: send it to the store.
    New,
    /// Already acked: answer with this ack, store nothing.
    Duplicate(Arc<Ack>),
    /// The first attempt is still being stored; the origin will get its result.
    InFlight,
    /// The first attempt has been in flight past the deadline (its batch was lost between
    /// the gateway and the engine): the key is forgotten, and these origins (the earlier
    /// waiters) and the retry get `unavailable`; the next retry is new (the store still
    /// answers it with the original ack if the lost attempt was stored after all).
    Stale(Vec<Origin>),
}

/// A key's 128-bit digest: two independently keyed SipHashes of (sender, chat,
/// client_msg_id). The window keeps digests, not the strings: an accidental
/// collision is as likely as a 128-bit random id repeating, and the keys are
/// per process, so a client cannot aim for one.
type Digest = u128;

/// A message id as the window keeps it: inline when it fits (the store's ids are
/// 29 bytes), so an acked entry costs no allocation.
#[derive(Debug)]
enum StoredId {
    Inline { len: u8, bytes: [u8; 30] },
    Heap(Box<str>),
}

impl StoredId {
    fn new(id: &str) -> Self {
        let mut bytes = [0u8; 30];
        match bytes.get_mut(..id.len()) {
            Some(slot) => {
                slot.copy_from_slice(id.as_bytes());
                Self::Inline {
                    len: id.len() as u8,
                    bytes,
                }
            }
            None => Self::Heap(id.into()),
        }
    }

    fn as_str(&self) -> &str {
        match self {
            // Copied from a &str whole, so the prefix is valid UTF-8.
            Self::Inline { len, bytes } => {
                std::str::from_utf8(&bytes[..*len as usize]).unwrap_or_default()
            }
            Self::Heap(s) => s,
        }
    }
}

/// What a repeated send is answered with (its chat and client_msg_id come from the retry).
#[derive(Debug)]
struct Acked {
    digest: Digest,
    at_ms: u64,
    seq: u64,
    created_at: u64,
    message_id: StoredId,
    /// Only for a send a plugin changed (rare): its retries show the sender what was stored.
    rewritten: Option<Arc<Rewrite>>,
}

/// Remembers recent sends by key. Bounded by `capacity` acked entries and by age.
///
/// Acked entries live in a ring in completion order (about 100 bytes each with the
/// index, was ~450 with the strings and a shared `Ack`); the index maps the low half of
/// a digest to a ring position and the ring entry confirms the full digest. Two keys
/// sharing a low half only cost the older one its place: it falls through to the store,
/// which answers every retry too.
#[derive(Debug)]
pub struct IdempotencyWindow {
    pending: HashMap<Digest, Pending, FastHash>,
    index: HashMap<u64, u64, FastHash>,
    ring: VecDeque<Acked>,
    /// Ring position of `ring[0]`.
    first: u64,
    capacity: usize,
    ttl_ms: u64,
    in_flight_deadline_ms: u64,
    keys: (RandomState, RandomState),
}

/// A send admitted and not yet answered by the store.
#[derive(Debug)]
struct Pending {
    since_ms: u64,
    waiters: Vec<Origin>,
    /// The first attempt's `protocol::send_fingerprint`: what was stored is compared with it.
    sent: u64,
}

/// How long a send may stay in flight before a retry of it is told `unavailable` (and
/// its key forgotten); far above a healthy batch's time (the REST wait is 30 s too).
pub const IN_FLIGHT_DEADLINE_MS: u64 = 30_000;

impl IdempotencyWindow {
    pub fn new(capacity: usize, ttl_ms: u64, in_flight_deadline_ms: u64) -> Self {
        Self {
            pending: HashMap::default(),
            index: HashMap::default(),
            ring: VecDeque::new(),
            first: 0,
            capacity,
            ttl_ms,
            in_flight_deadline_ms,
            keys: (RandomState::new(), RandomState::new()),
        }
    }

    fn digest(&self, key: &IdemKey) -> Digest {
        let parts = (&*key.sender, &*key.chat, &*key.client_msg_id);
        (u128::from(self.keys.0.hash_one(parts)) << 64) | u128::from(self.keys.1.hash_one(parts))
    }

    fn acked(&self, digest: Digest) -> Option<&Acked> {
        let pos = *self.index.get(&(digest as u64))?;
        let entry = self.ring.get(usize::try_from(pos - self.first).ok()?)?;
        (entry.digest == digest).then_some(entry)
    }

    /// `sent`: the send's `protocol::send_fingerprint`.
    pub fn admit(&mut self, key: &IdemKey, sent: u64, origin: Origin, now_ms: u64) -> Admission {
        let digest = self.digest(key);
        if let Some(a) = self.acked(digest) {
            return Admission::Duplicate(Arc::new(Ack {
                client_msg_id: key.client_msg_id.to_string(),
                chat_id: key.chat.to_string(),
                message_id: a.message_id.as_str().to_owned(),
                seq: a.seq,
                created_at: a.created_at,
                rewritten: a.rewritten.clone(),
            }));
        }
        match self.pending.entry(digest) {
            MapEntry::Occupied(e)
                if now_ms.saturating_sub(e.get().since_ms) >= self.in_flight_deadline_ms =>
            {
                Admission::Stale(e.remove().waiters)
            }
            MapEntry::Occupied(mut e) => {
                // Once per retry: each attempt gets its own ack.
                e.get_mut().waiters.push(origin);
                Admission::InFlight
            }
            MapEntry::Vacant(e) => {
                e.insert(Pending {
                    since_ms: now_ms,
                    waiters: vec![origin],
                    sent,
                });
                Admission::New
            }
        }
    }

    /// The fingerprint of the send in flight under `key`, if one is.
    pub fn sent(&self, key: &IdemKey) -> Option<u64> {
        self.pending.get(&self.digest(key)).map(|p| p.sent)
    }

    /// Records the store's answer and returns everyone who waited for it, the
    /// first attempt's origin first. An error forgets the key so a retry is new.
    pub fn complete(&mut self, key: &IdemKey, ack: Option<&Ack>, now_ms: u64) -> Vec<Origin> {
        let digest = self.digest(key);
        let waiters = self
            .pending
            .remove(&digest)
            .map(|p| p.waiters)
            .unwrap_or_default();
        if let Some(ack) = ack {
            self.remember(digest, ack, now_ms);
        }
        waiters
    }

    /// `complete`, for a key only if it is in flight here (another node's send is none of this
    /// window's business: remembering it would fill the window with every delivered message).
    pub fn complete_pending(
        &mut self,
        key: &IdemKey,
        ack: Option<&Ack>,
        now_ms: u64,
    ) -> Vec<Origin> {
        if !self.pending.contains_key(&self.digest(key)) {
            return Vec::new();
        }
        self.complete(key, ack, now_ms)
    }

    fn remember(&mut self, digest: Digest, ack: &Ack, now_ms: u64) {
        if self.acked(digest).is_none() {
            let pos = self.first + self.ring.len() as u64;
            self.ring.push_back(Acked {
                digest,
                at_ms: now_ms,
                seq: ack.seq,
                created_at: ack.created_at,
                message_id: StoredId::new(&ack.message_id),
                rewritten: ack.rewritten.clone(),
            });
            self.index.insert(digest as u64, pos);
        }
        self.evict(now_ms);
    }

    fn evict(&mut self, now_ms: u64) {
        while let Some(oldest) = self.ring.front() {
            let expired = now_ms.saturating_sub(oldest.at_ms) >= self.ttl_ms;
            if !expired && self.ring.len() <= self.capacity {
                break;
            }
            let low = oldest.digest as u64;
            if self.index.get(&low) == Some(&self.first) {
                self.index.remove(&low);
            }
            self.ring.pop_front();
            self.first += 1;
        }
    }

    /// Acked keys held now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.ring.len()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("seq {seq} of chat {chat} is not above the last fanned-out seq {last}")]
pub struct OrderViolation {
    pub chat: String,
    pub seq: u64,
    pub last: u64,
}

/// Admission through the idempotency window, and the fan-out order guard.
#[derive(Debug)]
pub struct SendGuard {
    pub window: IdempotencyWindow,
    last_fanned_out: HashMap<ChatId, u64>,
}

impl SendGuard {
    pub fn new(window_capacity: usize, window_ttl_ms: u64, in_flight_deadline_ms: u64) -> Self {
        Self {
            window: IdempotencyWindow::new(window_capacity, window_ttl_ms, in_flight_deadline_ms),
            last_fanned_out: HashMap::new(),
        }
    }

    /// Where a message stored by another node stands against what this node fanned out in
    /// its chat: the next one (recorded), one already fanned out, or one past a gap. A chat
    /// this node never fanned out has no gap: its connections synced what came before.
    pub fn accept_remote(&mut self, chat: &ChatId, seq: u64) -> RemoteOrder {
        match self.last_fanned_out.get_mut(chat) {
            Some(last) if seq <= *last => RemoteOrder::Delivered,
            Some(last) if seq > *last + 1 => RemoteOrder::Gap { last: *last },
            Some(last) => {
                *last = seq;
                RemoteOrder::Next
            }
            None => {
                self.last_fanned_out.insert(chat.clone(), seq);
                RemoteOrder::Next
            }
        }
    }

    /// Every chat this node fanned out in, with the last seq it fanned out there.
    pub fn fanned_out(&self) -> Vec<(ChatId, u64)> {
        self.last_fanned_out
            .iter()
            .map(|(chat, seq)| (chat.clone(), *seq))
            .collect()
    }

    /// Accepts `seq` for fan-out only if it is above every seq already fanned out in `chat`.
    pub fn record_commit(&mut self, chat: &ChatId, seq: u64) -> Result<(), OrderViolation> {
        let last = self.last_fanned_out.entry(chat.clone()).or_insert(0);
        if seq <= *last {
            return Err(OrderViolation {
                chat: chat.to_string(),
                seq,
                last: *last,
            });
        }
        *last = seq;
        Ok(())
    }
}

/// See `SendGuard::accept_remote`.
#[derive(Debug, PartialEq, Eq)]
pub enum RemoteOrder {
    Next,
    Delivered,
    Gap { last: u64 },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(cmid: &str) -> IdemKey {
        IdemKey {
            sender: "u1".into(),
            chat: "c1".into(),
            client_msg_id: cmid.into(),
        }
    }

    fn ack(cmid: &str, seq: u64) -> Ack {
        Ack {
            client_msg_id: cmid.into(),
            chat_id: "c1".into(),
            message_id: format!("id{seq}"),
            seq,
            created_at: 1,
            rewritten: None,
        }
    }

    #[test]
    fn remote_messages_are_taken_in_seq_order_and_a_jump_is_a_gap() {
        let mut s = SendGuard::new(10, 1_000, 5_000);
        let chat: ChatId = "c1".into();
        assert_eq!(
            s.accept_remote(&chat, 7),
            RemoteOrder::Next,
            "a chat new here has no gap"
        );
        assert_eq!(s.accept_remote(&chat, 8), RemoteOrder::Next);
        assert_eq!(s.accept_remote(&chat, 8), RemoteOrder::Delivered);
        assert_eq!(s.accept_remote(&chat, 11), RemoteOrder::Gap { last: 8 });
        assert!(
            s.record_commit(&chat, 9).is_ok(),
            "a local ack path shares the guard"
        );
        assert_eq!(s.accept_remote(&chat, 9), RemoteOrder::Delivered);
        assert_eq!(s.accept_remote(&chat, 10), RemoteOrder::Next);
    }

    #[test]
    fn retry_while_in_flight_waits_then_duplicate_gets_same_ack() {
        let mut w = IdempotencyWindow::new(10, 1_000, 5_000);
        assert_eq!(w.admit(&key("a"), 0, Origin::Conn(1), 0), Admission::New);
        assert_eq!(
            w.admit(&key("a"), 0, Origin::Conn(2), 0),
            Admission::InFlight
        );
        assert_eq!(
            w.admit(&key("a"), 0, Origin::Ticket(9), 0),
            Admission::InFlight
        );
        let waiters = w.complete(&key("a"), Some(&ack("a", 1)), 0);
        assert_eq!(
            waiters,
            vec![Origin::Conn(1), Origin::Conn(2), Origin::Ticket(9)]
        );
        assert_eq!(
            w.admit(&key("a"), 0, Origin::Conn(3), 0),
            Admission::Duplicate(Arc::new(ack("a", 1)))
        );
    }

    #[test]
    fn same_client_msg_id_from_another_sender_or_chat_is_new() {
        let mut w = IdempotencyWindow::new(10, 1_000, 5_000);
        assert_eq!(w.admit(&key("a"), 0, Origin::Conn(1), 0), Admission::New);
        let mut other = key("a");
        other.sender = "u2".into();
        assert_eq!(w.admit(&other, 0, Origin::Conn(1), 0), Admission::New);
        let mut other_chat = key("a");
        other_chat.chat = "c2".into();
        assert_eq!(w.admit(&other_chat, 0, Origin::Conn(1), 0), Admission::New);
    }

    #[test]
    fn error_forgets_the_key() {
        let mut w = IdempotencyWindow::new(10, 1_000, 5_000);
        w.admit(&key("a"), 0, Origin::Conn(1), 0);
        assert_eq!(w.complete(&key("a"), None, 0), vec![Origin::Conn(1)]);
        assert_eq!(w.admit(&key("a"), 0, Origin::Conn(1), 0), Admission::New);
    }

    #[test]
    fn evicts_by_capacity_and_age_but_never_pending() {
        let mut w = IdempotencyWindow::new(2, 1_000, 5_000);
        for (i, k) in ["a", "b", "c"].iter().enumerate() {
            w.admit(&key(k), 0, Origin::Conn(1), 0);
            w.complete(&key(k), Some(&ack(k, i as u64 + 1)), 10);
        }
        assert_eq!(
            w.admit(&key("a"), 0, Origin::Conn(1), 0),
            Admission::New,
            "oldest evicted by capacity"
        );
        assert!(matches!(
            w.admit(&key("c"), 0, Origin::Conn(1), 0),
            Admission::Duplicate(_)
        ));
        // "a" is pending now; completing "d" far in the future expires b and c, not a.
        w.admit(&key("d"), 0, Origin::Conn(1), 0);
        w.complete(&key("d"), Some(&ack("d", 4)), 5_000);
        assert_eq!(w.admit(&key("b"), 0, Origin::Conn(1), 0), Admission::New);
        assert_eq!(
            w.admit(&key("a"), 0, Origin::Conn(2), 0),
            Admission::InFlight
        );
    }

    #[test]
    fn fan_out_order_guard() {
        let mut s = SendGuard::new(10, 1_000, 5_000);
        let c: ChatId = "c1".into();
        assert!(s.record_commit(&c, 1).is_ok());
        assert!(s.record_commit(&c, 2).is_ok());
        assert_eq!(s.record_commit(&c, 2).unwrap_err().last, 2);
        assert!(s.record_commit(&c, 1).is_err());
        assert!(s.record_commit(&"c2".into(), 1).is_ok());
    }

    #[test]
    fn message_ids_of_any_length_come_back_whole() {
        let mut w = IdempotencyWindow::new(10, 1_000, 5_000);
        for (cmid, id) in [
            ("short", "m1"),
            ("store", "m0193a1b2c3d4e5f60718293a4b5c"),
            ("long", &"x".repeat(300)[..]),
        ] {
            let mut a = ack(cmid, 7);
            a.message_id = id.to_owned();
            w.admit(&key(cmid), 0, Origin::Conn(1), 0);
            w.complete(&key(cmid), Some(&a), 0);
            assert_eq!(
                w.admit(&key(cmid), 0, Origin::Conn(2), 0),
                Admission::Duplicate(Arc::new(a))
            );
        }
        assert_eq!(w.len(), 3);
    }

    #[test]
    fn digests_sharing_the_index_slot_never_answer_for_each_other() {
        let mut w = IdempotencyWindow::new(10, 1_000, 5_000);
        let older: Digest = (1 << 64) | 42;
        let newer: Digest = (2 << 64) | 42;
        w.remember(older, &ack("x", 1), 0);
        w.remember(newer, &ack("y", 2), 0);
        assert_eq!(w.acked(newer).map(|a| a.seq), Some(2));
        assert!(
            w.acked(older).is_none(),
            "the older one falls through to the store"
        );
        // Evicting the older ring entry leaves the newer one's slot alone.
        let mut small = IdempotencyWindow::new(1, 1_000, 5_000);
        small.remember(older, &ack("x", 1), 0);
        small.remember(newer, &ack("y", 2), 0);
        assert_eq!(small.len(), 1);
        assert_eq!(small.acked(newer).map(|a| a.seq), Some(2));
    }

    #[test]
    fn a_send_in_flight_past_the_deadline_is_forgotten_and_its_retry_told_unavailable() {
        let mut w = IdempotencyWindow::new(10, 1_000_000, 5_000);
        assert_eq!(w.admit(&key("a"), 0, Origin::Conn(1), 0), Admission::New);
        // Its batch is lost: no completion ever comes.
        assert_eq!(
            w.admit(&key("a"), 0, Origin::Conn(2), 4_999),
            Admission::InFlight
        );
        assert_eq!(
            w.admit(&key("a"), 0, Origin::Conn(3), 5_000),
            Admission::Stale(vec![Origin::Conn(1), Origin::Conn(2)])
        );
        // The next retry goes to the engine again (the store answers it if it was stored).
        assert_eq!(
            w.admit(&key("a"), 0, Origin::Conn(3), 5_001),
            Admission::New
        );
        // A late answer of the lost attempt finds nobody waiting and changes nothing.
        assert_eq!(
            w.complete(&key("a"), Some(&ack("a", 1)), 5_002),
            vec![Origin::Conn(3)]
        );
    }
}
