//! The chat membership cache the gateway checks on every frame. Python keeps it
//! current: it loads every chat at start and replaces a chat's entry on each
//! membership change, before answering the request that made it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use parking_lot::RwLock;

use crate::send_guard::{ChatId, UserId};

#[derive(Debug)]
pub struct Members {
    pub list: Vec<UserId>,
    set: HashSet<UserId>,
}

impl Members {
    pub fn new(list: Vec<UserId>) -> Self {
        let set = list.iter().cloned().collect();
        Self { list, set }
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
    pub fn set(&self, chat: ChatId, members: Vec<UserId>) {
        self.chats
            .write()
            .insert(chat, Arc::new(Members::new(members)));
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
        cache.set("c1".into(), vec!["a".into(), "b".into()]);
        let (id, m) = cache.get("c1").unwrap();
        assert_eq!(&*id, "c1");
        assert!(m.contains("a") && m.contains("b") && !m.contains("c"));
        cache.set("c1".into(), vec!["a".into()]);
        assert!(!cache.get("c1").unwrap().1.contains("b"));
        cache.remove("c1");
        assert!(cache.get("c1").is_none());
    }
}
