//! The chat membership cache the gateway checks on every frame. Python keeps it
//! current: it loads every chat at start and replaces a chat's entry on each
//! membership change, before answering the request that made it.
//!
//! An entry carries the version of the change it reflects (the log offset of the chat's
//! last membership record; `UNVERSIONED` for a change from outside the log): a change
//! that arrives after a newer one (the start's scan racing the stream) is ignored.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use parking_lot::RwLock;

use crate::send_guard::{ChatId, UserId};

/// A change from outside the log (REST on a node without one, an admin command): it always
/// applies, and any versioned change applies over it.
pub const UNVERSIONED: i64 = -1;

#[derive(Debug)]
pub struct Members {
    pub list: Vec<UserId>,
    set: HashSet<UserId>,
    pub version: i64,
}

impl Members {
    pub fn new(list: Vec<UserId>, version: i64) -> Self {
        let set = list.iter().cloned().collect();
        Self { list, set, version }
    }

    pub fn contains(&self, user: &str) -> bool {
        self.set.contains(user)
    }
}

#[derive(Debug, Default)]
pub struct MembershipCache {
    chats: RwLock<HashMap<ChatId, Arc<Members>>>,
}

impl MembershipCache {
    /// Replaces the chat's members unless the cache holds a newer version; whether it did.
    pub fn set(&self, chat: ChatId, members: Vec<UserId>, version: i64) -> bool {
        let mut chats = self.chats.write();
        let stale = chats
            .get(&chat)
            .is_some_and(|m| version != UNVERSIONED && version <= m.version);
        if !stale {
            chats.insert(chat, Arc::new(Members::new(members, version)));
        }
        !stale
    }

    pub fn remove(&self, chat: &str) {
        self.chats.write().remove(chat);
    }

    /// The chat's interned id and members, if the chat exists.
    pub fn get(&self, chat: &str) -> Option<(ChatId, Arc<Members>)> {
        let chats = self.chats.read();
        chats
            .get_key_value(chat)
            .map(|(k, v)| (k.clone(), v.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_remove() {
        let cache = MembershipCache::default();
        cache.set("c1".into(), vec!["a".into(), "b".into()], UNVERSIONED);
        let (id, m) = cache.get("c1").unwrap();
        assert_eq!(&*id, "c1");
        assert!(m.contains("a") && m.contains("b") && !m.contains("c"));
        cache.set("c1".into(), vec!["a".into()], UNVERSIONED);
        assert!(!cache.get("c1").unwrap().1.contains("b"));
        cache.remove("c1");
        assert!(cache.get("c1").is_none());
    }

    #[test]
    fn an_older_membership_version_is_ignored() {
        let cache = MembershipCache::default();
        assert!(cache.set("c1".into(), vec!["a".into(), "b".into()], 7));
        // The start's scan read the chat before the removal at 7 was written: ignored.
        assert!(!cache.set("c1".into(), vec!["a".into(), "b".into(), "c".into()], 5));
        assert!(!cache.set("c1".into(), vec!["a".into()], 7));
        assert!(!cache.get("c1").unwrap().1.contains("c"));
        assert!(cache.set("c1".into(), vec!["a".into()], 9));
        assert_eq!(cache.get("c1").unwrap().1.version, 9);
        // A change from outside the log always applies.
        assert!(cache.set("c1".into(), vec!["a".into(), "d".into()], UNVERSIONED));
        assert!(cache.get("c1").unwrap().1.contains("d"));
    }
}
