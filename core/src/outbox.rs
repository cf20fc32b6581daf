//! What a connection's writer sends, and the stitching of a `sync` backlog
//! with live traffic.
//!
//! Guarantee (PROTOCOL.md 4 and 5): once a `synced` frame has been written, the
//! `msg` frames of each chat on this connection are in increasing seq order with
//! no gap, and no `msg` is written twice on one connection.
//!
//! How: when the reader sees `sync` it queues `SyncBegin`; from then on live
//! messages are held back. The backlog is read from the store after that (in
//! pages, off the engine thread), so every message is either in the backlog,
//! held, or was written live before; held messages are written after the
//! backlog only where it did not cover them.
//!
//! Bounds: the backlog arrives as one queue item per row (it counts against the
//! queue's capacity); the held messages are capped, and on overflow they are
//! dropped and the sync is run again from what this connection has written, so
//! the store fills what was dropped (no gap, no growth).

use std::collections::HashMap;

use bytes::Bytes;

use crate::fasthash::FastHash;
use crate::send_guard::ChatId;

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
    SyncBegin(Box<SyncRequest>),
    /// One message of a `sync` backlog (each chat's rows arrive in seq order).
    Backlog {
        chat: ChatId,
        seq: u64,
        frame: Bytes,
    },
    /// The end of a `sync` answer: the `synced` frame, or an error frame (`ok` false:
    /// nothing was sent, so the connection's stitching state stays as it was).
    SyncEnd { frame: Bytes, ok: bool },
}

/// What a `sync` asked for: kept while it is answered, so it can be run again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncRequest {
    pub since: Vec<(String, u64)>,
    pub reference: Option<String>,
}

/// What the connection's task must do after an item was stitched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stitched {
    Nothing,
    /// The sync's answer is complete (`synced` or its error was written).
    SyncDone,
    /// Held messages overflowed during this sync: ask the store again from these
    /// cursors (the `synced` of the pass that overflowed was not written).
    Restart(SyncRequest),
    /// The held messages overflowed on every pass: the connection cannot keep up.
    GiveUp,
}

/// Passes of one `sync` after which a connection whose held messages keep
/// overflowing is closed (it reconnects and syncs from its cursors).
pub const MAX_SYNC_PASSES: u8 = 4;

/// Seq ranges (inclusive, ascending, disjoint) written live before the first `sync`.
type Ranges = Vec<(u64, u64)>;

fn ranges_contain(ranges: &Ranges, seq: u64) -> bool {
    let i = ranges.partition_point(|&(_, hi)| hi < seq);
    ranges.get(i).is_some_and(|&(lo, _)| lo <= seq)
}

fn ranges_insert(ranges: &mut Ranges, seq: u64) {
    // Live messages of a chat arrive in increasing seq: almost always an extension of the last range.
    if let Some(last) = ranges.last_mut() {
        if last.1.checked_add(1) == Some(seq) {
            last.1 = seq;
            return;
        }
        if last.1 >= seq {
            if !ranges_contain(ranges, seq) {
                let i = ranges.partition_point(|&(_, hi)| hi < seq);
                ranges.insert(i, (seq, seq));
            }
            return;
        }
    }
    ranges.push((seq, seq));
}

/// Live messages held back while a `sync` is answered.
#[derive(Debug)]
struct Holding {
    request: SyncRequest,
    held: Vec<(ChatId, u64, Bytes)>,
    /// Held messages were dropped in this pass: its backlog cannot be trusted to cover them.
    overflowed: bool,
    passes: u8,
}

/// The writer's per-connection stitching state. Empty (no allocation) until
/// the connection receives its first message.
#[derive(Debug, Default)]
#[allow(clippy::box_collection)] // boxed on purpose: 8 bytes inline instead of 32 and 48
pub struct Stitcher {
    /// Highest seq written per chat.
    written: HashMap<ChatId, u64, FastHash>,
    /// Messages written live before the first `sync` was answered, as seq ranges per chat
    /// (exact at any count; boxed: most connections sync first and never need it).
    pre_sync: Option<Box<HashMap<ChatId, Ranges, FastHash>>>,
    synced_once: bool,
    /// `Some` while a `sync` is being answered.
    holding: Option<Box<Holding>>,
}

impl Stitcher {
    /// Feeds one queue item; pushes the frames to write, in order, onto `out`.
    /// `held_cap` bounds the live messages held during a sync.
    pub fn accept(&mut self, item: Outgoing, out: &mut Vec<Bytes>, held_cap: usize) -> Stitched {
        match item {
            Outgoing::Frame(frame) => out.push(frame),
            Outgoing::Msg { chat, seq, frame } => match self.holding.as_deref_mut() {
                Some(h) => {
                    if h.held.len() >= held_cap.max(1) {
                        h.held = Vec::new();
                        h.overflowed = true;
                    }
                    h.held.push((chat, seq, frame));
                }
                None => self.write_live(chat, seq, frame, out),
            },
            Outgoing::SyncBegin(request) => {
                if self.holding.is_none() {
                    self.holding = Some(Box::new(Holding {
                        request: *request,
                        held: Vec::new(),
                        overflowed: false,
                        passes: 1,
                    }));
                }
            }
            Outgoing::Backlog { chat, seq, frame } => {
                if self.synced_once {
                    let hi = self.written.entry(chat).or_insert(0);
                    if seq > *hi {
                        *hi = seq;
                        out.push(frame);
                    }
                } else {
                    // Before the first sync is answered every written seq is remembered exactly,
                    // so a pass that failed or is run again never repeats a message.
                    let ranges = self
                        .pre_sync
                        .get_or_insert_with(Box::default)
                        .entry(chat.clone())
                        .or_default();
                    if !ranges_contain(ranges, seq) {
                        ranges_insert(ranges, seq);
                        let hi = self.written.entry(chat).or_insert(0);
                        *hi = (*hi).max(seq);
                        out.push(frame);
                    }
                }
            }
            Outgoing::SyncEnd { frame, ok } => return self.end_sync(frame, ok, out),
        }
        Stitched::Nothing
    }

    fn end_sync(&mut self, frame: Bytes, ok: bool, out: &mut Vec<Bytes>) -> Stitched {
        let Some(mut h) = self.holding.take() else {
            out.push(frame);
            return Stitched::SyncDone;
        };
        if h.overflowed {
            // Held messages were dropped: this pass's answer may miss them. Ask again, keeping
            // what is held since the drop; the dedup above makes the new pass exact.
            if h.passes >= MAX_SYNC_PASSES {
                return Stitched::GiveUp;
            }
            let again = self.next_pass(&h.request);
            h.overflowed = false;
            h.passes += 1;
            self.holding = Some(h);
            return Stitched::Restart(again);
        }
        if ok {
            self.synced_once = true;
            self.pre_sync = None;
        }
        for (chat, seq, frame) in h.held {
            self.write_live(chat, seq, frame, out);
        }
        out.push(frame);
        Stitched::SyncDone
    }

    /// The request of a sync's next pass. Once a sync was answered, a chat's rows at or
    /// below its highest written seq are never written again, so the store need not read
    /// them; before that, the pass repeats the request (the exact ranges drop repeats).
    fn next_pass(&self, request: &SyncRequest) -> SyncRequest {
        if !self.synced_once {
            return request.clone();
        }
        let mut since: HashMap<&str, u64> = request
            .since
            .iter()
            .map(|(c, s)| (c.as_str(), *s))
            .collect();
        for (chat, hi) in &self.written {
            let cursor = since.entry(chat).or_insert(0);
            *cursor = (*cursor).max(*hi);
        }
        let mut since: Vec<(String, u64)> =
            since.into_iter().map(|(c, s)| (c.to_owned(), s)).collect();
        since.sort_unstable();
        SyncRequest {
            since,
            reference: request.reference.clone(),
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
            ranges_insert(pre_sync.entry(chat).or_default(), seq);
        }
        *hi = (*hi).max(seq);
        out.push(frame);
    }

    /// Live messages held now (tests and the cap's proof).
    pub fn held_len(&self) -> usize {
        self.holding.as_ref().map_or(0, |h| h.held.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: usize = 1_000;

    fn msg(chat: &str, seq: u64) -> Outgoing {
        Outgoing::Msg {
            chat: chat.into(),
            seq,
            frame: Bytes::from(format!("{chat}:{seq}")),
        }
    }

    fn backlog(chat: &str, seqs: std::ops::RangeInclusive<u64>) -> Vec<Outgoing> {
        seqs.map(|seq| Outgoing::Backlog {
            chat: chat.into(),
            seq,
            frame: Bytes::from(format!("{chat}:{seq}")),
        })
        .collect()
    }

    fn begin() -> Outgoing {
        Outgoing::SyncBegin(Box::new(SyncRequest {
            since: vec![("a".into(), 0)],
            reference: Some("r".into()),
        }))
    }

    fn end(frame: &str, ok: bool) -> Outgoing {
        Outgoing::SyncEnd {
            frame: Bytes::from(frame.to_owned()),
            ok,
        }
    }

    /// Feeds the items (a nested Vec is a backlog); returns the written frames and what
    /// the last item asked for.
    fn feed(s: &mut Stitcher, items: Vec<Vec<Outgoing>>, cap: usize) -> (Vec<String>, Stitched) {
        let mut out = Vec::new();
        let mut last = Stitched::Nothing;
        for item in items.into_iter().flatten() {
            last = s.accept(item, &mut out, cap);
            assert!(s.held_len() <= cap, "held messages stay under the cap");
        }
        let out = out
            .into_iter()
            .map(|b| String::from_utf8(b.to_vec()).unwrap())
            .collect();
        (out, last)
    }

    fn run(items: Vec<Vec<Outgoing>>) -> Vec<String> {
        feed(&mut Stitcher::default(), items, CAP).0
    }

    #[test]
    fn live_held_during_sync_and_deduplicated() {
        let out = run(vec![
            vec![begin()],
            vec![msg("a", 4)], // committed before the snapshot: covered by the backlog
            backlog("a", 2..=4),
            vec![end("synced", true)],
            vec![msg("a", 5)],
            vec![msg("a", 5)],
        ]);
        assert_eq!(out, ["a:2", "a:3", "a:4", "synced", "a:5"]);
    }

    #[test]
    fn pre_sync_live_message_not_repeated_by_backlog() {
        let out = run(vec![
            vec![msg("a", 3)],
            vec![begin()],
            backlog("a", 1..=3),
            vec![end("synced", true)],
        ]);
        assert_eq!(out, ["a:3", "a:1", "a:2", "synced"]);
    }

    #[test]
    fn pre_sync_messages_are_not_repeated_at_any_count() {
        // 5,000 live messages before the first sync (the old set stopped tracking at 4,096).
        let mut items: Vec<Vec<Outgoing>> = (1..=5_000).map(|s| vec![msg("a", s)]).collect();
        items.push(vec![begin()]);
        items.push(backlog("a", 1..=5_000));
        items.push(vec![end("synced", true)]);
        let out = run(items);
        assert_eq!(out.len(), 5_001, "each message once, then synced");
        assert_eq!(out.last().map(String::as_str), Some("synced"));
    }

    #[test]
    fn pre_sync_ranges_with_a_gap_are_filled_by_the_backlog() {
        // Removed from the chat and added back: the live messages have a hole the backlog fills.
        let out = run(vec![
            vec![msg("a", 1), msg("a", 2), msg("a", 5)],
            vec![begin()],
            backlog("a", 1..=5),
            vec![end("synced", true)],
        ]);
        assert_eq!(out, ["a:1", "a:2", "a:5", "a:3", "a:4", "synced"]);
    }

    #[test]
    fn held_messages_of_chats_outside_the_backlog_are_written_before_synced() {
        let out = run(vec![
            vec![begin()],
            vec![msg("b", 1)],
            backlog("a", 1..=1),
            vec![end("synced", true)],
        ]);
        assert_eq!(out, ["a:1", "b:1", "synced"]);
    }

    #[test]
    fn second_sync_does_not_repeat() {
        let out = run(vec![
            vec![begin()],
            backlog("a", 1..=2),
            vec![end("s1", true)],
            vec![msg("a", 3)],
            vec![begin()],
            backlog("a", 1..=4),
            vec![end("s2", true)],
        ]);
        assert_eq!(out, ["a:1", "a:2", "s1", "a:3", "a:4", "s2"]);
    }

    #[test]
    fn a_failed_sync_changes_nothing_and_the_retry_fills_every_gap() {
        let out = run(vec![
            vec![msg("a", 10)],
            vec![begin()],
            vec![end("error", false)],
            vec![begin()],
            backlog("a", 4..=10),
            vec![end("synced", true)],
        ]);
        assert_eq!(
            out,
            ["a:10", "error", "a:4", "a:5", "a:6", "a:7", "a:8", "a:9", "synced"]
        );
    }

    #[test]
    fn a_sync_that_failed_midway_is_not_repeated_by_its_retry() {
        let out = run(vec![
            vec![msg("a", 10)],
            vec![begin()],
            backlog("a", 4..=6), // streamed, then the store failed
            vec![end("error", false)],
            vec![begin()],
            backlog("a", 4..=10),
            vec![end("synced", true)],
        ]);
        assert_eq!(
            out,
            ["a:10", "a:4", "a:5", "a:6", "error", "a:7", "a:8", "a:9", "synced"]
        );
    }

    #[test]
    fn frames_pass_through_while_holding() {
        let out = run(vec![
            vec![begin()],
            vec![msg("a", 1)],
            vec![Outgoing::Frame(Bytes::from("ack"))],
            vec![end("synced", true)],
        ]);
        assert_eq!(out, ["ack", "a:1", "synced"]);
    }

    #[test]
    fn held_overflow_restarts_the_sync_and_the_next_pass_leaves_no_gap() {
        let mut s = Stitcher::default();
        // Pass 1: the backlog has 1..3; meanwhile 4..20 arrive live, far over a cap of 4.
        let mut items = vec![vec![begin()], backlog("a", 1..=3)];
        items.extend((4..=20).map(|seq| vec![msg("a", seq)]));
        items.push(vec![end("synced-1", true)]);
        let (out, next) = feed(&mut s, items, 4);
        assert_eq!(
            out,
            ["a:1", "a:2", "a:3"],
            "the first pass's synced is not written"
        );
        let Stitched::Restart(again) = next else {
            panic!("expected a restart, got {next:?}")
        };
        assert_eq!(again.reference.as_deref(), Some("r"));
        // Pass 2 reads the store again (now up to 20) while 21 and 22 arrive live.
        let (out, next) = feed(
            &mut s,
            vec![
                vec![msg("a", 21)],
                backlog("a", 1..=20),
                vec![msg("a", 22)],
                vec![end("synced-2", true)],
            ],
            4,
        );
        let expected: Vec<String> = (4..=22)
            .map(|seq| format!("a:{seq}"))
            .chain(["synced-2".to_owned()])
            .collect();
        assert_eq!(out, expected);
        assert_eq!(next, Stitched::SyncDone);
    }

    #[test]
    fn a_second_sync_restarts_from_what_was_written() {
        let mut s = Stitcher::default();
        feed(
            &mut s,
            vec![vec![begin()], backlog("a", 1..=5), vec![end("s1", true)]],
            4,
        );
        let mut items = vec![vec![begin()]];
        items.extend((6..=15).map(|seq| vec![msg("a", seq)]));
        items.push(vec![end("s2", true)]);
        let (_, next) = feed(&mut s, items, 4);
        let Stitched::Restart(again) = next else {
            panic!("expected a restart, got {next:?}")
        };
        assert_eq!(again.since, vec![("a".to_owned(), 5)]);
    }

    #[test]
    fn a_connection_whose_held_messages_overflow_every_pass_gives_up() {
        let mut s = Stitcher::default();
        let mut last = Stitched::Nothing;
        for pass in 0..MAX_SYNC_PASSES {
            let mut items = vec![vec![begin()]];
            let base = u64::from(pass) * 10;
            items.extend((1..=10).map(|seq| vec![msg("a", base + seq)]));
            items.push(vec![end("synced", true)]);
            last = feed(&mut s, items, 2).1;
        }
        assert_eq!(last, Stitched::GiveUp);
    }
}
