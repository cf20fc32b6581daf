//! What a gateway shares with the other nodes of a cluster (issue 13). Absent on a single
//! node, which pays nothing for it.
//!
//! Out: frames for chat members connected elsewhere (typing, receipts) and this node's presence
//! changes, queued for the cluster layer (Python) to relay. In: presence as the cluster decided
//! it (a user is online while any node holds a connection of it): `Hub::cluster_presence` keeps
//! it in `view` and tells the followers connected here.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::{Condvar, Mutex};

use crate::presence::UserPresence;
use crate::send_guard::{ChatId, UserId};

/// Events waiting for the cluster layer; past this, frames for other nodes are dropped (typing
/// and receipts are best effort there; presence changes are kept: one per user at most matters).
pub const MAX_QUEUED: usize = 65_536;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterEvent {
    /// A frame for the members of `chat` connected to other nodes, except `user`'s connections.
    ChatFrame {
        chat: ChatId,
        user: UserId,
        frame: Bytes,
    },
    /// `user`'s first connection here opened (`online`), or its last one closed and the grace
    /// period passed; `at` is the connect or disconnect time.
    Presence { user: UserId, online: bool, at: u64 },
}

#[derive(Default)]
pub struct ClusterLink {
    queue: Mutex<Vec<ClusterEvent>>,
    ready: Condvar,
    /// Online users as the cluster published them (offline ones are not kept: their last_seen
    /// is in the store).
    view: Mutex<HashMap<UserId, UserPresence>>,
    pub dropped: std::sync::atomic::AtomicU64,
}

impl ClusterLink {
    pub fn push(&self, event: ClusterEvent) {
        let mut queue = self.queue.lock();
        if queue.len() >= MAX_QUEUED && matches!(event, ClusterEvent::ChatFrame { .. }) {
            self.dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return;
        }
        queue.push(event);
        self.ready.notify_one();
    }

    /// What is queued, waiting up to `timeout` for something when nothing is.
    pub fn take(&self, timeout: Duration) -> Vec<ClusterEvent> {
        let mut queue = self.queue.lock();
        if queue.is_empty() {
            self.ready.wait_for(&mut queue, timeout);
        }
        std::mem::take(&mut *queue)
    }

    /// Wakes a `take` (shutdown).
    pub fn wake(&self) {
        self.ready.notify_all();
    }

    /// Records the cluster's word on `user`; true when it changes what followers were told.
    pub fn set_presence(&self, user: &UserId, p: UserPresence) -> bool {
        let mut view = self.view.lock();
        let was_online = view.get(user).is_some_and(|old| old.online);
        if p.online {
            view.insert(user.clone(), p);
        } else {
            view.remove(user);
        }
        was_online != p.online
    }

    pub fn presence(&self, user: &str) -> Option<UserPresence> {
        self.view.lock().get(user).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_returns_what_was_pushed_in_order() {
        let link = ClusterLink::default();
        assert!(link.take(Duration::from_millis(1)).is_empty());
        let a = ClusterEvent::Presence {
            user: "u1".into(),
            online: true,
            at: 5,
        };
        let b = ClusterEvent::ChatFrame {
            chat: "c1".into(),
            user: "u1".into(),
            frame: Bytes::from_static(b"{}"),
        };
        link.push(a.clone());
        link.push(b.clone());
        assert_eq!(link.take(Duration::from_millis(1)), vec![a, b]);
        assert!(link.take(Duration::from_millis(1)).is_empty());
    }

    #[test]
    fn full_queue_drops_frames_but_keeps_presence() {
        let link = ClusterLink::default();
        for _ in 0..MAX_QUEUED {
            link.push(ClusterEvent::ChatFrame {
                chat: "c".into(),
                user: "u".into(),
                frame: Bytes::new(),
            });
        }
        link.push(ClusterEvent::ChatFrame {
            chat: "c".into(),
            user: "u".into(),
            frame: Bytes::new(),
        });
        link.push(ClusterEvent::Presence {
            user: "u".into(),
            online: false,
            at: 1,
        });
        let taken = link.take(Duration::from_millis(1));
        assert_eq!(taken.len(), MAX_QUEUED + 1);
        assert!(matches!(taken.last(), Some(ClusterEvent::Presence { .. })));
        assert_eq!(link.dropped.load(std::sync::atomic::Ordering::Relaxed), 1);
    }

    #[test]
    fn presence_changes_only_when_online_flips() {
        let link = ClusterLink::default();
        let on = UserPresence {
            online: true,
            last_seen: 1,
        };
        let off = UserPresence {
            online: false,
            last_seen: 2,
        };
        assert!(link.set_presence(&"u".into(), on));
        assert!(!link.set_presence(&"u".into(), on));
        assert_eq!(link.presence("u"), Some(on));
        assert!(link.set_presence(&"u".into(), off));
        assert_eq!(link.presence("u"), None);
        assert!(!link.set_presence(&"u".into(), off));
    }
}
