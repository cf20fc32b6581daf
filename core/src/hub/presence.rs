//! Typing, presence and their hand-over to other nodes; `presence.subscribe` answers.

use super::*;

impl Hub {
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

    pub(super) fn send_typing(&self, user: &UserId, chat: &ChatId, start: bool) {
        if let Some((_, members)) = self.members.get(chat) {
            let frame = protocol::encode_typing(chat, user, start);
            self.broadcast(&members, Some(user), &frame);
            self.to_other_nodes(chat, user, frame);
        }
    }

    /// On a cluster node: `frame` also goes to the chat's members connected to other nodes.
    pub(super) fn to_other_nodes(&self, chat: &ChatId, user: &UserId, frame: Bytes) {
        if let Some(link) = &self.cluster {
            link.push(ClusterEvent::ChatFrame {
                chat: chat.clone(),
                user: user.clone(),
                frame,
            });
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

    pub(super) fn publish_presence(&self, user: &UserId, p: UserPresence) {
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
}
