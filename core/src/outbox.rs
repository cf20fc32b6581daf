//! What a connection's writer sends, and the stitching of a `sync` backlog
//! with live traffic.
//!
//! Guarantee (PROTOCOL.md 4 and 5): once a `synced` frame has been written, the
//! `msg` frames of each chat on this connection are in increasing seq order with
//! no gap, and no `msg` is written twice on one connection.
//!
//! How: when the reader sees `sync` it queues `SyncBegin`; from then on live
//! messages are held back. The engine reads the backlog after every commit that
//! was fanned out before it, so the held messages are all at or below the
//! backlog's snapshot; they are written only if the backlog did not cover them.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;

use crate::fasthash::FastHash;
use crate::sequencer::ChatId;

/// One item of a connection's bounded send queue.
#[derive(Debug, Clone)]
pub enum Outgoing {
    /// Any frame that is written as is (ack, error, receipt, typing, chat, hello).
    Frame(Bytes),
    /// A live `msg` frame; `frame` is shared by every recipient.
    Msg {
        chat: ChatId,
        seq: u64,
        frame: Bytes,
    },
    /// The connection asked for `sync`: hold live messages until `SyncEnd`.
    SyncBegin,
    /// The backlog of a `sync`, in seq order per chat.
    Backlog(Vec<(ChatId, u64, Bytes)>),
    /// The end of a `sync` answer: the `synced` frame, or an error frame (`ok` false:
    /// nothing was sent, so the connection's stitching state stays as it was).
    SyncEnd { frame: Bytes, ok: bool },
}

/// Live messages written before the first `sync` that are remembered for
/// de-duplication against its backlog; past this many, they are not tracked.
const MAX_PRE_SYNC_TRACKED: usize = 4096;

/// The writer's per-connection stitching state. Empty (no allocation) until
/// the connection receives its first message; 56 bytes in every connection's task.
#[derive(Debug, Default)]
#[allow(clippy::box_collection)] // boxed on purpose: 8 bytes inline instead of 48 and 24
pub struct Stitcher {
    /// Highest seq written per chat.
    written: HashMap<ChatId, u64, FastHash>,
    /// Messages written live before the first `sync` was answered (boxed: most
    /// connections sync first and never need it).
    pre_sync: Option<Box<HashSet<(ChatId, u64), FastHash>>>,
    synced_once: bool,
    /// `Some` while a `sync` is being answered: live messages held back.
    held: Option<Box<Vec<(ChatId, u64, Bytes)>>>,
}

impl Stitcher {
    /// Feeds one queue item; pushes the frames to write, in order, onto `out`.
    pub fn accept(&mut self, item: Outgoing, out: &mut Vec<Bytes>) {
        match item {
            Outgoing::Frame(frame) => out.push(frame),
            Outgoing::Msg { chat, seq, frame } => {
                if let Some(held) = self.held.as_deref_mut() {
                    held.push((chat, seq, frame));
                } else {
                    self.write_live(chat, seq, frame, out);
                }
            }
            Outgoing::SyncBegin => {
                self.held.get_or_insert_with(Box::default);
            }
            Outgoing::Backlog(items) => {
                for (chat, seq, frame) in items {
                    let hi = self.written.get(&chat).copied().unwrap_or(0);
                    let already = if self.synced_once {
                        seq <= hi
                    } else {
                        self.pre_sync
                            .as_ref()
                            .is_some_and(|p| p.contains(&(chat.clone(), seq)))
                    };
                    if !already {
                        self.written.insert(chat, hi.max(seq));
                        out.push(frame);
                    }
                }
            }
            Outgoing::SyncEnd { frame, ok } => {
                let held = self.held.take().unwrap_or_default();
                if ok {
                    self.synced_once = true;
                    self.pre_sync = None;
                }
                for (chat, seq, frame) in *held {
                    self.write_live(chat, seq, frame, out);
                }
                out.push(frame);
            }
        }
    }

    fn write_live(&mut self, chat: ChatId, seq: u64, frame: Bytes, out: &mut Vec<Bytes>) {
        let hi = self.written.entry(chat.clone()).or_insert(0);
        if self.synced_once {
            if seq <= *hi {
                return; // already written by a backlog
            }
        } else {
            let pre_sync = self.pre_sync.get_or_insert_with(Box::default);
            if pre_sync.len() < MAX_PRE_SYNC_TRACKED {
                pre_sync.insert((chat, seq));
            }
        }
        *hi = (*hi).max(seq);
        out.push(frame);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(chat: &str, seq: u64) -> Outgoing {
        Outgoing::Msg {
            chat: chat.into(),
            seq,
            frame: Bytes::from(format!("{chat}:{seq}")),
        }
    }

    fn backlog(chat: &str, seqs: std::ops::RangeInclusive<u64>) -> Outgoing {
        Outgoing::Backlog(
            seqs.map(|s| (ChatId::from(chat), s, Bytes::from(format!("{chat}:{s}"))))
                .collect(),
        )
    }

    fn run(items: Vec<Outgoing>) -> Vec<String> {
        let mut s = Stitcher::default();
        let mut out = Vec::new();
        for i in items {
            s.accept(i, &mut out);
        }
        out.into_iter()
            .map(|b| String::from_utf8(b.to_vec()).unwrap())
            .collect()
    }

    #[test]
    fn live_held_during_sync_and_deduplicated() {
        let out = run(vec![
            Outgoing::SyncBegin,
            msg("a", 4), // committed before the snapshot: covered by the backlog
            backlog("a", 2..=4),
            Outgoing::SyncEnd {
                frame: Bytes::from("synced"),
                ok: true,
            },
            msg("a", 5),
            msg("a", 5),
        ]);
        assert_eq!(out, ["a:2", "a:3", "a:4", "synced", "a:5"]);
    }

    #[test]
    fn pre_sync_live_message_not_repeated_by_backlog() {
        let out = run(vec![
            msg("a", 3),
            Outgoing::SyncBegin,
            backlog("a", 1..=3),
            Outgoing::SyncEnd {
                frame: Bytes::from("synced"),
                ok: true,
            },
        ]);
        assert_eq!(out, ["a:3", "a:1", "a:2", "synced"]);
    }

    #[test]
    fn held_messages_of_chats_outside_the_backlog_are_written_before_synced() {
        let out = run(vec![
            Outgoing::SyncBegin,
            msg("b", 1),
            backlog("a", 1..=1),
            Outgoing::SyncEnd {
                frame: Bytes::from("synced"),
                ok: true,
            },
        ]);
        assert_eq!(out, ["a:1", "b:1", "synced"]);
    }

    #[test]
    fn second_sync_does_not_repeat() {
        let out = run(vec![
            Outgoing::SyncBegin,
            backlog("a", 1..=2),
            Outgoing::SyncEnd {
                frame: Bytes::from("s1"),
                ok: true,
            },
            msg("a", 3),
            Outgoing::SyncBegin,
            backlog("a", 1..=4),
            Outgoing::SyncEnd {
                frame: Bytes::from("s2"),
                ok: true,
            },
        ]);
        assert_eq!(out, ["a:1", "a:2", "s1", "a:3", "a:4", "s2"]);
    }

    #[test]
    fn a_failed_sync_changes_nothing_and_the_retry_fills_every_gap() {
        let out = run(vec![
            msg("a", 10),
            Outgoing::SyncBegin,
            Outgoing::SyncEnd {
                frame: Bytes::from("error"),
                ok: false,
            },
            Outgoing::SyncBegin,
            backlog("a", 4..=10),
            Outgoing::SyncEnd {
                frame: Bytes::from("synced"),
                ok: true,
            },
        ]);
        assert_eq!(
            out,
            ["a:10", "error", "a:4", "a:5", "a:6", "a:7", "a:8", "a:9", "synced"]
        );
    }

    #[test]
    fn frames_pass_through_while_holding() {
        let out = run(vec![
            Outgoing::SyncBegin,
            msg("a", 1),
            Outgoing::Frame(Bytes::from("ack")),
            Outgoing::SyncEnd {
                frame: Bytes::from("synced"),
                ok: true,
            },
        ]);
        assert_eq!(out, ["ack", "a:1", "synced"]);
    }
}
