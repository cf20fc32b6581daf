//! Typing indicators: a side path that never touches the store.
//!
//! Per (user, chat): a `start` is forwarded at most once per `min_interval`
//! (later ones only refresh the expiry); a state not refreshed within `ttl`
//! expires and a `stop` is sent for it; a `stop` is forwarded only for an open
//! state. The cost is bounded by the number of users typing right now.

use std::collections::HashMap;

use crate::send_guard::{ChatId, UserId};

#[derive(Debug, Clone, Copy)]
struct Typing {
    expires_at: u64,
    last_forwarded: u64,
}

#[derive(Debug)]
pub struct TypingTracker {
    open: HashMap<UserId, HashMap<ChatId, Typing>>,
    ttl_ms: u64,
    min_interval_ms: u64,
}

impl TypingTracker {
    pub fn new(ttl_ms: u64, min_interval_ms: u64) -> Self {
        Self {
            open: HashMap::new(),
            ttl_ms,
            min_interval_ms,
        }
    }

    /// Records a `start`; true if it is to be forwarded.
    pub fn start(&mut self, user: &UserId, chat: &ChatId, now: u64) -> bool {
        let chats = self.open.entry(user.clone()).or_default();
        match chats.get_mut(chat) {
            Some(t) if now.saturating_sub(t.last_forwarded) < self.min_interval_ms => {
                t.expires_at = now + self.ttl_ms;
                false
            }
            _ => {
                chats.insert(
                    chat.clone(),
                    Typing {
                        expires_at: now + self.ttl_ms,
                        last_forwarded: now,
                    },
                );
                true
            }
        }
    }

    /// Records a `stop`; true if a state was open (and the stop is to be forwarded).
    pub fn stop(&mut self, user: &UserId, chat: &ChatId) -> bool {
        let Some(chats) = self.open.get_mut(user) else {
            return false;
        };
        let was_open = chats.remove(chat).is_some();
        if chats.is_empty() {
            self.open.remove(user);
        }
        was_open
    }

    /// Closes and returns every state not refreshed in time.
    pub fn expire(&mut self, now: u64) -> Vec<(UserId, ChatId)> {
        let mut expired = Vec::new();
        self.open.retain(|user, chats| {
            chats.retain(|chat, t| {
                let keep = t.expires_at > now;
                if !keep {
                    expired.push((user.clone(), chat.clone()));
                }
                keep
            });
            !chats.is_empty()
        });
        expired
    }

    /// Closes and returns the chats a user was typing in (its last connection closed).
    pub fn drop_user(&mut self, user: &str) -> Vec<ChatId> {
        self.open
            .remove(user)
            .map(|chats| chats.into_keys().collect())
            .unwrap_or_default()
    }

    pub fn open_count(&self) -> usize {
        self.open.values().map(HashMap::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> (UserId, ChatId, ChatId) {
        ("u".into(), "c1".into(), "c2".into())
    }

    #[test]
    fn start_is_forwarded_at_most_once_per_interval_and_refreshes_expiry() {
        let (u, c, _) = ids();
        let mut t = TypingTracker::new(6_000, 2_000);
        assert!(t.start(&u, &c, 0));
        assert!(!t.start(&u, &c, 1_000));
        assert!(!t.start(&u, &c, 1_999));
        assert!(t.start(&u, &c, 2_000));
        // Refreshed at 5_000 (not forwarded), so still open at 10_000.
        assert!(!t.start(&u, &c, 3_000));
        assert!(t.expire(8_999).is_empty());
        assert_eq!(t.expire(9_000), vec![(u.clone(), c.clone())]);
        assert_eq!(t.open_count(), 0);
    }

    #[test]
    fn stop_is_forwarded_only_for_an_open_state() {
        let (u, c, c2) = ids();
        let mut t = TypingTracker::new(6_000, 2_000);
        assert!(!t.stop(&u, &c));
        assert!(t.start(&u, &c, 0));
        assert!(t.stop(&u, &c));
        assert!(!t.stop(&u, &c));
        // After a stop, the next start goes out at once.
        assert!(t.start(&u, &c, 100));
        assert!(t.start(&u, &c2, 100));
        let mut dropped = t.drop_user(&u);
        dropped.sort();
        assert_eq!(dropped, vec![c, c2]);
        assert_eq!(t.open_count(), 0);
    }
}
