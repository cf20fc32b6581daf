//! Live connections: each one's bounded send queue, and the registry
//! user -> connections (several devices per user).
//!
//! A full queue never blocks the sender of a fan-out: the slow connection is
//! closed with a reason instead (the consumer's problem, never the hub's).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Waker;

use parking_lot::{Mutex, RwLock};

use crate::outbox::Outgoing;
use crate::send_guard::{ConnId, UserId};

/// Why the server closed a connection (sent as the WebSocket close reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    QueueOverflow,
    HeartbeatTimeout,
    TooManyBadFrames,
    FrameTooLarge,
    PeerClosed,
    WriteFailed,
    ServerShutdown,
    /// The peer broke RFC 6455 (unmasked frame, unknown opcode, ...).
    ProtocolError,
    /// A text frame that is not UTF-8.
    InvalidText,
}

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::QueueOverflow => "send queue overflow: client is not reading fast enough",
            Self::HeartbeatTimeout => "heartbeat timeout",
            Self::TooManyBadFrames => "too many bad frames",
            Self::FrameTooLarge => "frame too large",
            Self::PeerClosed => "closed by peer",
            Self::WriteFailed => "write failed",
            Self::ServerShutdown => "server shutting down",
            Self::ProtocolError => "websocket protocol error",
            Self::InvalidText => "text frame is not UTF-8",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    Queued,
    /// The queue was full: the connection is now closing.
    Overflow,
    /// The connection is already closing.
    Closed,
}

/// The shared side of one live connection.
#[derive(Debug)]
pub struct ConnHandle {
    pub id: ConnId,
    pub user: UserId,
    /// Frames waiting for the connection's task. A plain deque: it holds no
    /// memory while empty, which is what an idle connection's queue is.
    queue: Mutex<VecDeque<Outgoing>>,
    capacity: usize,
    /// The connection's task, woken when something was queued, a ping is due or
    /// it should close. A waker and a flag instead of `Notify`s: the task polls
    /// them by hand, so an idle connection stores no waiting future.
    waker: Mutex<Option<Waker>>,
    woken: AtomicBool,
    closing: AtomicBool,
    reason: Mutex<Option<CloseReason>>,
    /// Milliseconds (gateway clock) of the last frame received from the peer.
    pub last_seen_ms: AtomicU64,
    /// Gateway clock when a write last found the socket full and not yet
    /// drained (0: not stalled); the heartbeat sweep drops stalled peers.
    pub write_stalled_since_ms: AtomicU64,
    /// The heartbeat sweep asks the connection's task to send a ping.
    pub ping_due: AtomicBool,
    /// A `sync` of this connection is being answered (one at a time): set by the reader,
    /// cleared by the connection's task once the answer's end is written.
    pub sync_pending: AtomicBool,
}

impl ConnHandle {
    pub fn new(id: ConnId, user: UserId, capacity: usize, now_ms: u64) -> Self {
        Self {
            id,
            user,
            queue: Mutex::new(VecDeque::new()),
            capacity: capacity.max(1),
            waker: Mutex::new(None),
            woken: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            reason: Mutex::new(None),
            last_seen_ms: AtomicU64::new(now_ms),
            write_stalled_since_ms: AtomicU64::new(0),
            ping_due: AtomicBool::new(false),
            sync_pending: AtomicBool::new(false),
        }
    }

    /// Queues without waiting. Overflow closes this connection only.
    pub fn push(&self, item: Outgoing) -> Push {
        if self.is_closing() {
            return Push::Closed;
        }
        let was_empty = {
            let mut q = self.queue.lock();
            if q.len() >= self.capacity {
                drop(q);
                self.close(CloseReason::QueueOverflow);
                return Push::Overflow;
            }
            q.push_back(item);
            q.len() == 1
        };
        // The task drains everything it finds, so only the first item needs a wakeup.
        if was_empty {
            self.wake();
        }
        Push::Queued
    }

    /// Whether a `sync` backlog page of `n` items may be queued now: it may fill half of
    /// the queue (an empty queue takes any page), so live traffic keeps the other half.
    pub fn has_room_for_backlog(&self, n: usize) -> bool {
        let len = self.queue.lock().len();
        len == 0 || len + n <= self.capacity / 2
    }

    /// Queues a page of items at once (a `sync` backlog page, after `has_room_for_backlog`).
    /// Never closes the connection.
    pub fn push_all(&self, items: impl IntoIterator<Item = Outgoing>) -> Push {
        if self.is_closing() {
            return Push::Closed;
        }
        let was_empty = {
            let mut q = self.queue.lock();
            let was_empty = q.is_empty();
            q.extend(items);
            was_empty && !q.is_empty()
        };
        if was_empty {
            self.wake();
        }
        Push::Queued
    }

    /// Tells the task to look at the queue (and the ping and close flags).
    pub fn wake(&self) {
        self.woken.store(true, Ordering::Release);
        let waker = self.waker.lock().take();
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// The task's waker, for `wake` and `close`; registered before the task
    /// checks the flags, so a wake in between is never lost.
    pub fn register(&self, waker: &Waker) {
        let mut slot = self.waker.lock();
        if !slot.as_ref().is_some_and(|w| w.will_wake(waker)) {
            *slot = Some(waker.clone());
        }
    }

    /// Whether `wake` was called since the last time this returned true.
    pub fn take_wakeup(&self) -> bool {
        self.woken.swap(false, Ordering::AcqRel)
    }

    /// Moves up to `max` queued items into `out`; returns whether more remain.
    pub fn take_queued(&self, max: usize, out: &mut Vec<Outgoing>) -> bool {
        let mut q = self.queue.lock();
        let n = q.len().min(max);
        out.extend(q.drain(..n));
        if q.is_empty() {
            // An idle connection's queue holds no memory (one allocation per burst instead).
            *q = VecDeque::new();
        }
        !q.is_empty()
    }

    /// Starts closing; the first reason given wins.
    pub fn close(&self, reason: CloseReason) {
        {
            let mut r = self.reason.lock();
            if r.is_none() {
                *r = Some(reason);
            }
        }
        self.closing.store(true, Ordering::Release);
        self.wake();
    }

    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    pub fn close_reason(&self) -> Option<CloseReason> {
        *self.reason.lock()
    }
}

/// user -> live connections, and connection id -> connection.
#[derive(Debug, Default)]
pub struct ConnectionRegistry {
    by_user: RwLock<HashMap<UserId, Vec<Arc<ConnHandle>>>>,
    by_id: RwLock<HashMap<ConnId, Arc<ConnHandle>>>,
}

impl ConnectionRegistry {
    pub fn register(&self, conn: Arc<ConnHandle>) {
        self.by_id.write().insert(conn.id, conn.clone());
        self.by_user
            .write()
            .entry(conn.user.clone())
            .or_default()
            .push(conn);
    }

    /// Removes a connection; returns how many connections its user still has.
    pub fn unregister(&self, conn: &ConnHandle) -> usize {
        self.by_id.write().remove(&conn.id);
        let mut by_user = self.by_user.write();
        let Some(list) = by_user.get_mut(&conn.user) else {
            return 0;
        };
        list.retain(|c| c.id != conn.id);
        let left = list.len();
        if left == 0 {
            by_user.remove(&conn.user);
        }
        left
    }

    pub fn get(&self, id: ConnId) -> Option<Arc<ConnHandle>> {
        self.by_id.read().get(&id).cloned()
    }

    /// Calls `f` for every live connection of each user, under one read lock.
    pub fn for_each_conn<'a>(
        &self,
        users: impl IntoIterator<Item = &'a UserId>,
        mut f: impl FnMut(&Arc<ConnHandle>),
    ) {
        let by_user = self.by_user.read();
        for user in users {
            if let Some(conns) = by_user.get(user) {
                conns.iter().for_each(&mut f);
            }
        }
    }

    /// Connections `user` holds here.
    pub fn user_connection_count(&self, user: &str) -> usize {
        self.by_user.read().get(user).map_or(0, Vec::len)
    }

    pub fn is_online(&self, user: &str) -> bool {
        self.by_user.read().contains_key(user)
    }

    pub fn connection_count(&self) -> usize {
        self.by_id.read().len()
    }

    /// Calls `f` for every live connection, under one read lock.
    pub fn for_each(&self, mut f: impl FnMut(&Arc<ConnHandle>)) {
        self.by_id.read().values().for_each(&mut f);
    }

    pub fn all(&self) -> Vec<Arc<ConnHandle>> {
        self.by_id.read().values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn conn(id: ConnId, user: &str, cap: usize) -> Arc<ConnHandle> {
        Arc::new(ConnHandle::new(id, user.into(), cap, 0))
    }

    #[test]
    fn registry_tracks_devices_per_user() {
        let reg = ConnectionRegistry::default();
        let a1 = conn(1, "a", 4);
        let a2 = conn(2, "a", 4);
        let b1 = conn(3, "b", 4);
        reg.register(a1.clone());
        reg.register(a2.clone());
        reg.register(b1.clone());
        let mut seen = Vec::new();
        reg.for_each_conn([&UserId::from("a"), &UserId::from("b")], |c| {
            seen.push(c.id)
        });
        assert_eq!(seen, [1, 2, 3]);
        assert_eq!(reg.unregister(&a1), 1);
        assert!(reg.is_online("a"));
        assert_eq!(reg.unregister(&a2), 0);
        assert!(!reg.is_online("a"));
        assert!(reg.get(3).is_some() && reg.get(1).is_none());
        assert_eq!(reg.connection_count(), 1);
    }

    #[test]
    fn overflow_closes_only_the_slow_connection() {
        let slow = conn(1, "a", 2);
        let fast = conn(2, "b", 2);
        for _ in 0..2 {
            assert_eq!(
                slow.push(Outgoing::Frame(Bytes::from_static(b"x"))),
                Push::Queued
            );
        }
        assert_eq!(
            slow.push(Outgoing::Frame(Bytes::from_static(b"x"))),
            Push::Overflow
        );
        assert!(slow.is_closing());
        assert_eq!(slow.close_reason(), Some(CloseReason::QueueOverflow));
        assert_eq!(
            slow.push(Outgoing::Frame(Bytes::from_static(b"x"))),
            Push::Closed
        );
        for _ in 0..5 {
            assert_eq!(
                fast.push(Outgoing::Frame(Bytes::from_static(b"y"))),
                Push::Queued
            );
            let mut got = Vec::new();
            assert!(!fast.take_queued(10, &mut got));
            assert_eq!(got.len(), 1);
        }
        assert!(!fast.is_closing());
    }

    #[test]
    fn first_close_reason_wins_and_wakes_waiters() {
        let c = conn(1, "a", 2);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let waiter = {
                let c = c.clone();
                tokio::spawn(std::future::poll_fn(move |cx| {
                    c.register(cx.waker());
                    if c.is_closing() {
                        std::task::Poll::Ready(())
                    } else {
                        std::task::Poll::Pending
                    }
                }))
            };
            tokio::task::yield_now().await;
            c.close(CloseReason::HeartbeatTimeout);
            c.close(CloseReason::QueueOverflow);
            waiter.await.unwrap();
        });
        assert_eq!(c.close_reason(), Some(CloseReason::HeartbeatTimeout));
    }
}
