//! Per-chat sequencing on the gateway side: the idempotency window and the
//! commit-order guard of the fan-out.
//!
//! The store numbers messages inside its write transaction (`seq` = chat's
//! last_seq + 1), which is the only place where numbering and durability can be
//! atomic. The `Sequencer` owns what happens around that:
//! - admission: a `send` whose (sender, chat, client_msg_id) is already acked
//!   gets the SAME ack again without reaching the store; one that is in flight
//!   waits for the first attempt's result instead of being stored twice. Keys
//!   evicted from the window (or lost in a restart) fall through to the store,
//!   whose unique index answers with the original ack, so idempotency holds for
//!   24 h and across restarts;
//! - ordering: a chat's messages are fanned out in strictly increasing `seq`;
//!   `record_commit` refuses a seq at or below the last one fanned out.

use std::collections::hash_map::Entry as MapEntry;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::protocol::Ack;

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
}

#[derive(Debug)]
enum Entry {
    Pending(Vec<Origin>),
    Done(Arc<Ack>),
}

/// Remembers recent sends by key. Bounded by `capacity` acked entries and by age.
#[derive(Debug)]
pub struct IdempotencyWindow {
    entries: HashMap<IdemKey, Entry>,
    /// Acked keys in the order they completed, with their completion time.
    order: VecDeque<(IdemKey, u64)>,
    capacity: usize,
    ttl_ms: u64,
}

impl IdempotencyWindow {
    pub fn new(capacity: usize, ttl_ms: u64) -> Self {
        Self {
            entries: HashMap::new(),
            order: VecDeque::new(),
            capacity,
            ttl_ms,
        }
    }

    pub fn admit(&mut self, key: IdemKey, origin: Origin) -> Admission {
        match self.entries.entry(key) {
            MapEntry::Occupied(mut e) => match e.get_mut() {
                Entry::Pending(waiters) => {
                    // Once per retry: each attempt gets its own ack.
                    waiters.push(origin);
                    Admission::InFlight
                }
                Entry::Done(ack) => Admission::Duplicate(ack.clone()),
            },
            MapEntry::Vacant(e) => {
                e.insert(Entry::Pending(vec![origin]));
                Admission::New
            }
        }
    }

    /// Records the store's answer and returns everyone who waited for it, the
    /// first attempt's origin first. An error forgets the key so a retry is new.
    pub fn complete(&mut self, key: &IdemKey, ack: Option<Arc<Ack>>, now_ms: u64) -> Vec<Origin> {
        let waiters = match self.entries.remove(key) {
            Some(Entry::Pending(w)) => w,
            Some(done @ Entry::Done(_)) => {
                self.entries.insert(key.clone(), done);
                return Vec::new();
            }
            None => Vec::new(),
        };
        if let Some(ack) = ack {
            self.entries.insert(key.clone(), Entry::Done(ack));
            self.order.push_back((key.clone(), now_ms));
            self.evict(now_ms);
        }
        waiters
    }

    fn evict(&mut self, now_ms: u64) {
        while let Some((key, at)) = self.order.front() {
            let expired = now_ms.saturating_sub(*at) >= self.ttl_ms;
            if !expired && self.order.len() <= self.capacity {
                break;
            }
            if let Some(Entry::Done(_)) = self.entries.get(key) {
                self.entries.remove(key);
            }
            self.order.pop_front();
        }
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
pub struct Sequencer {
    pub window: IdempotencyWindow,
    last_fanned_out: HashMap<ChatId, u64>,
}

impl Sequencer {
    pub fn new(window_capacity: usize, window_ttl_ms: u64) -> Self {
        Self {
            window: IdempotencyWindow::new(window_capacity, window_ttl_ms),
            last_fanned_out: HashMap::new(),
        }
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

    fn ack(seq: u64) -> Arc<Ack> {
        Arc::new(Ack {
            client_msg_id: "m".into(),
            chat_id: "c1".into(),
            message_id: format!("id{seq}"),
            seq,
            created_at: 1,
        })
    }

    #[test]
    fn retry_while_in_flight_waits_then_duplicate_gets_same_ack() {
        let mut w = IdempotencyWindow::new(10, 1_000);
        assert_eq!(w.admit(key("a"), Origin::Conn(1)), Admission::New);
        assert_eq!(w.admit(key("a"), Origin::Conn(2)), Admission::InFlight);
        assert_eq!(w.admit(key("a"), Origin::Ticket(9)), Admission::InFlight);
        let waiters = w.complete(&key("a"), Some(ack(1)), 0);
        assert_eq!(
            waiters,
            vec![Origin::Conn(1), Origin::Conn(2), Origin::Ticket(9)]
        );
        assert_eq!(
            w.admit(key("a"), Origin::Conn(3)),
            Admission::Duplicate(ack(1))
        );
    }

    #[test]
    fn same_client_msg_id_from_another_sender_or_chat_is_new() {
        let mut w = IdempotencyWindow::new(10, 1_000);
        assert_eq!(w.admit(key("a"), Origin::Conn(1)), Admission::New);
        let mut other = key("a");
        other.sender = "u2".into();
        assert_eq!(w.admit(other, Origin::Conn(1)), Admission::New);
        let mut other_chat = key("a");
        other_chat.chat = "c2".into();
        assert_eq!(w.admit(other_chat, Origin::Conn(1)), Admission::New);
    }

    #[test]
    fn error_forgets_the_key() {
        let mut w = IdempotencyWindow::new(10, 1_000);
        w.admit(key("a"), Origin::Conn(1));
        assert_eq!(w.complete(&key("a"), None, 0), vec![Origin::Conn(1)]);
        assert_eq!(w.admit(key("a"), Origin::Conn(1)), Admission::New);
    }

    #[test]
    fn evicts_by_capacity_and_age_but_never_pending() {
        let mut w = IdempotencyWindow::new(2, 1_000);
        for (i, k) in ["a", "b", "c"].iter().enumerate() {
            w.admit(key(k), Origin::Conn(1));
            w.complete(&key(k), Some(ack(i as u64 + 1)), 10);
        }
        assert_eq!(
            w.admit(key("a"), Origin::Conn(1)),
            Admission::New,
            "oldest evicted by capacity"
        );
        assert!(matches!(
            w.admit(key("c"), Origin::Conn(1)),
            Admission::Duplicate(_)
        ));
        // "a" is pending now; completing "d" far in the future expires b and c, not a.
        w.admit(key("d"), Origin::Conn(1));
        w.complete(&key("d"), Some(ack(4)), 5_000);
        assert_eq!(w.admit(key("b"), Origin::Conn(1)), Admission::New);
        assert_eq!(w.admit(key("a"), Origin::Conn(2)), Admission::InFlight);
    }

    #[test]
    fn fan_out_order_guard() {
        let mut s = Sequencer::new(10, 1_000);
        let c: ChatId = "c1".into();
        assert!(s.record_commit(&c, 1).is_ok());
        assert!(s.record_commit(&c, 2).is_ok());
        assert_eq!(s.record_commit(&c, 2).unwrap_err().last, 2);
        assert!(s.record_commit(&c, 1).is_err());
        assert!(s.record_commit(&"c2".into(), 1).is_ok());
    }
}
