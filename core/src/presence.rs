//! Presence: who is online, and who hears about it.
//!
//! A user is online while it has a connection; when its last one closes it
//! goes offline only after `grace` (a reconnecting phone does not flap).
//! Followers are the partners of the user's direct chats plus connections
//! that subscribed to it explicitly. Every operation costs in proportion to
//! the users and followers it touches; nothing scans all users. Changes are
//! coalesced: `take_changes` reports each user's latest state once, and only
//! if it differs from what was last published.

use std::collections::{HashMap, HashSet};

use crate::send_guard::{ChatId, ConnId, UserId};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserPresence {
    pub online: bool,
    /// Milliseconds since the epoch: connect time while online, disconnect time after.
    pub last_seen: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("at most {limit} followed users per connection")]
pub struct TooManySubscriptions {
    pub limit: usize,
}

#[derive(Debug)]
pub struct Presence {
    grace_ms: u64,
    max_subscriptions: usize,
    state: HashMap<UserId, UserPresence>,
    published: HashMap<UserId, bool>,
    /// Users whose last connection closed, with the time they go offline.
    leaving: HashMap<UserId, u64>,
    changed: HashSet<UserId>,
    /// Direct chats by id, and how many direct chats link two users.
    direct_chats: HashMap<ChatId, Vec<UserId>>,
    partners: HashMap<UserId, HashMap<UserId, u32>>,
    subscribers: HashMap<UserId, HashSet<ConnId>>,
    subscriptions: HashMap<ConnId, HashSet<UserId>>,
}

impl Presence {
    pub fn new(grace_ms: u64, max_subscriptions: usize) -> Self {
        Self {
            grace_ms,
            max_subscriptions,
            state: HashMap::new(),
            published: HashMap::new(),
            leaving: HashMap::new(),
            changed: HashSet::new(),
            direct_chats: HashMap::new(),
            partners: HashMap::new(),
            subscribers: HashMap::new(),
            subscriptions: HashMap::new(),
        }
    }

    /// A connection of `user` opened. Returns true if the user came online
    /// (false when it was already online or reconnected within the grace period).
    pub fn connected(&mut self, user: &UserId, now: u64) -> bool {
        if self.leaving.remove(user).is_some() {
            return false;
        }
        let entry = self.state.entry(user.clone()).or_insert(UserPresence {
            online: false,
            last_seen: now,
        });
        if entry.online {
            return false;
        }
        *entry = UserPresence {
            online: true,
            last_seen: now,
        };
        self.changed.insert(user.clone());
        true
    }

    /// A connection of `user` closed and `remaining` are left.
    pub fn disconnected(&mut self, user: &UserId, remaining: usize, now: u64) {
        if remaining == 0 {
            self.leaving.insert(user.clone(), now + self.grace_ms);
        }
    }

    /// Users whose grace period ended by `now` go offline; returns them with
    /// their last_seen (the time their last connection closed).
    pub fn expire(
        &mut self,
        now: u64,
        still_online: impl Fn(&UserId) -> bool,
    ) -> Vec<(UserId, u64)> {
        let mut gone = Vec::new();
        let grace = self.grace_ms;
        self.leaving.retain(|user, deadline| {
            if *deadline > now {
                return true;
            }
            if !still_online(user) {
                gone.push((user.clone(), deadline.saturating_sub(grace)));
            }
            false
        });
        for (user, last_seen) in &gone {
            self.state.insert(
                user.clone(),
                UserPresence {
                    online: false,
                    last_seen: *last_seen,
                },
            );
            self.changed.insert(user.clone());
        }
        gone
    }

    /// Each changed user's current state, once, if it differs from what was last published.
    pub fn take_changes(&mut self) -> Vec<(UserId, UserPresence)> {
        let mut out = Vec::new();
        for user in self.changed.drain() {
            let Some(p) = self.state.get(&user).copied() else {
                continue;
            };
            if self.published.get(&user) == Some(&p.online) {
                continue;
            }
            if p.online {
                self.published.insert(user.clone(), true);
            } else {
                // Offline is the default: forget the user rather than keep a row per user ever seen.
                self.published.remove(&user);
            }
            out.push((user, p));
        }
        out
    }

    /// What this node knows of `user`: `None` if it has not seen the user since it started.
    pub fn get(&self, user: &str) -> Option<UserPresence> {
        self.state.get(user).copied()
    }

    /// Forgets offline users' rows once published (their last_seen is in the store).
    pub fn forget_offline(&mut self, users: &[UserId]) {
        for u in users {
            if matches!(self.state.get(u), Some(p) if !p.online) && !self.leaving.contains_key(u) {
                self.state.remove(u);
            }
        }
    }

    /// Records a chat's members; direct chats make their two members partners.
    pub fn set_chat(&mut self, chat: &ChatId, members: &[UserId], direct: bool) {
        if let Some(old) = self.direct_chats.remove(chat) {
            self.link(&old, false);
        }
        if direct && members.len() == 2 {
            self.link(members, true);
            self.direct_chats.insert(chat.clone(), members.to_vec());
        }
    }

    fn link(&mut self, pair: &[UserId], add: bool) {
        let [a, b] = pair else { return };
        for (x, y) in [(a, b), (b, a)] {
            let counts = self.partners.entry(x.clone()).or_default();
            let n = counts.entry(y.clone()).or_insert(0);
            if add {
                *n += 1;
            } else {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    counts.remove(y);
                }
            }
            if counts.is_empty() {
                self.partners.remove(x);
            }
        }
    }

    /// The users (direct partners) and connections (subscribers) that follow `user`.
    pub fn followers(&self, user: &str) -> (Vec<UserId>, Vec<ConnId>) {
        let partners = self
            .partners
            .get(user)
            .map(|p| p.keys().cloned().collect())
            .unwrap_or_default();
        let conns = self
            .subscribers
            .get(user)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        (partners, conns)
    }

    /// Checks that `conn` may follow these users too, without changing anything.
    pub fn check_subscribe(
        &self,
        conn: ConnId,
        users: &[String],
    ) -> Result<(), TooManySubscriptions> {
        let current = self.subscriptions.get(&conn);
        let new = users
            .iter()
            .filter(|u| !current.is_some_and(|c| c.contains(u.as_str())))
            .collect::<HashSet<_>>()
            .len();
        if current.map_or(0, HashSet::len) + new > self.max_subscriptions {
            return Err(TooManySubscriptions {
                limit: self.max_subscriptions,
            });
        }
        Ok(())
    }

    pub fn subscribe(
        &mut self,
        conn: ConnId,
        users: &[UserId],
    ) -> Result<(), TooManySubscriptions> {
        let names: Vec<String> = users.iter().map(|u| u.to_string()).collect();
        self.check_subscribe(conn, &names)?;
        let subs = self.subscriptions.entry(conn).or_default();
        for u in users {
            subs.insert(u.clone());
            self.subscribers.entry(u.clone()).or_default().insert(conn);
        }
        Ok(())
    }

    /// A connection closed: drop its subscriptions.
    pub fn drop_conn(&mut self, conn: ConnId) {
        for user in self.subscriptions.remove(&conn).unwrap_or_default() {
            if let Some(s) = self.subscribers.get_mut(&user) {
                s.remove(&conn);
                if s.is_empty() {
                    self.subscribers.remove(&user);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(s: &str) -> UserId {
        s.into()
    }

    #[test]
    fn online_with_any_connection_offline_after_grace() {
        let mut p = Presence::new(1_000, 10);
        assert!(p.connected(&u("a"), 0));
        assert!(!p.connected(&u("a"), 10), "second device");
        p.disconnected(&u("a"), 1, 20);
        assert!(
            p.expire(5_000, |_| false).is_empty(),
            "one device still open"
        );
        p.disconnected(&u("a"), 0, 100);
        assert!(p.expire(1_099, |_| false).is_empty());
        assert_eq!(p.expire(1_100, |_| false), vec![(u("a"), 100)]);
        assert_eq!(
            p.get("a"),
            Some(UserPresence {
                online: false,
                last_seen: 100
            })
        );
        let changes = p.take_changes();
        assert_eq!(
            changes,
            vec![(
                u("a"),
                UserPresence {
                    online: false,
                    last_seen: 100
                }
            )]
        );
    }

    #[test]
    fn reconnect_within_grace_does_not_flap_and_changes_coalesce() {
        let mut p = Presence::new(1_000, 10);
        p.connected(&u("a"), 0);
        assert_eq!(p.take_changes().len(), 1);
        p.disconnected(&u("a"), 0, 100);
        assert!(!p.connected(&u("a"), 500));
        assert!(p.expire(5_000, |_| false).is_empty());
        assert!(p.take_changes().is_empty());
        // Offline then online again before anyone was told: nothing to tell.
        p.disconnected(&u("a"), 0, 6_000);
        p.expire(7_000, |_| false);
        p.connected(&u("a"), 7_001);
        assert!(p.take_changes().is_empty());
    }

    #[test]
    fn direct_partners_follow_each_other_and_unlink() {
        let mut p = Presence::new(1_000, 10);
        let chat: ChatId = "d1".into();
        p.set_chat(&chat, &[u("a"), u("b")], true);
        p.set_chat(&"g1".into(), &[u("a"), u("c")], false);
        assert_eq!(p.followers("a").0, vec![u("b")]);
        assert_eq!(p.followers("b").0, vec![u("a")]);
        assert!(p.followers("c").0.is_empty());
        p.set_chat(&chat, &[u("a")], true);
        assert!(p.followers("a").0.is_empty() && p.followers("b").0.is_empty());
    }

    #[test]
    fn subscriptions_are_limited_per_connection_and_dropped_with_it() {
        let mut p = Presence::new(1_000, 3);
        p.subscribe(1, &[u("a"), u("b")]).unwrap();
        p.subscribe(1, &[u("a"), u("c")]).unwrap();
        assert_eq!(
            p.subscribe(1, &[u("d")]),
            Err(TooManySubscriptions { limit: 3 })
        );
        p.subscribe(2, &[u("a")]).unwrap();
        let mut conns = p.followers("a").1;
        conns.sort();
        assert_eq!(conns, vec![1, 2]);
        p.drop_conn(1);
        assert_eq!(p.followers("a").1, vec![2]);
        assert!(p.followers("b").1.is_empty());
    }
}
