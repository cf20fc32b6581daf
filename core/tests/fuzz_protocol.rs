//! Property-based fuzzing of the frame parser and the stitching of sync with
//! live traffic. Bounded in `cargo test` (proptest's default case count);
//! `make fuzz` sets PROPTEST_CASES high. Seeds live in `core/fuzz/corpus/`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use _core::outbox::{Outgoing, Stitched, Stitcher, SyncRequest};
use _core::protocol::{parse_client_frame, ClientFrame, ErrorCode, Limits};
use _core::send_guard::ChatId;
use _core::websocket::FrameReader;
use bytes::Bytes;
use proptest::prelude::*;
use serde_json::{json, Value};

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        "\\PC{0,12}".prop_map(Value::String),
        prop_oneof![
            Just("send"),
            Just("sync"),
            Just("read"),
            Just("delivered"),
            Just("typing"),
            Just("presence.subscribe")
        ]
        .prop_map(|s| Value::String(s.into())),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("type".to_string()),
                    Just("chat_id".to_string()),
                    Just("client_msg_id".to_string()),
                    Just("content".to_string()),
                    Just("attachments".to_string()),
                    Just("since".to_string()),
                    Just("seq".to_string()),
                    Just("state".to_string()),
                    Just("user_ids".to_string()),
                    "\\PC{0,6}",
                ],
                inner,
                0..8
            )
            .prop_map(|m: BTreeMap<String, Value>| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn check_error_shape(text: &str) {
    if let Err(e) = parse_client_frame(text, &Limits::default()) {
        assert!(!e.message.is_empty());
        assert!(ErrorCode::parse(e.code.as_str()).is_some());
        let encoded: Value = serde_json::from_slice(&e.encode()).expect("error frames are JSON");
        assert_eq!(encoded["type"], "error");
    }
}

proptest! {
    #[test]
    fn parser_never_panics_on_any_text(text in "\\PC{0,300}") {
        check_error_shape(&text);
    }

    #[test]
    fn parser_never_panics_on_any_bytes_read_as_text(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        check_error_shape(&String::from_utf8_lossy(&bytes));
    }

    #[test]
    fn parser_never_panics_on_json_shaped_frames(value in arb_json()) {
        let text = value.to_string();
        check_error_shape(&text);
        // The ref of an error is the frame's client_msg_id whenever that is a short string.
        if let (Err(e), Some(Value::String(cmid))) = (parse_client_frame(&text, &Limits::default()), value.get("client_msg_id")) {
            if cmid.len() <= 128 {
                prop_assert_eq!(e.reference.as_deref(), Some(cmid.as_str()));
            }
        }
    }

    #[test]
    fn valid_sends_round_trip(
        chat in "[a-zA-Z0-9_-]{1,40}",
        cmid in "[a-zA-Z0-9_-]{1,64}",
        content in "\\PC{1,200}",
        attachments in prop::collection::vec("[a-z0-9]{1,16}", 0..=10),
    ) {
        let frame = json!({"type": "send", "chat_id": chat, "client_msg_id": cmid, "content": content, "attachments": attachments});
        match parse_client_frame(&frame.to_string(), &Limits::default()) {
            Ok(ClientFrame::Send(s)) => {
                prop_assert_eq!(s.chat_id, chat);
                prop_assert_eq!(s.client_msg_id, cmid);
                prop_assert_eq!(s.content, content);
                prop_assert_eq!(s.attachments, attachments);
            }
            other => prop_assert!(false, "{other:?}"),
        }
    }
}

/// One step of a connection's life as the gateway produces it.
#[derive(Debug, Clone)]
enum Step {
    /// A message committed in chat `n` and fanned out live.
    Live(u8),
    /// The client asks for sync (`SyncBegin` queued) with this cursor for every chat;
    /// ignored while a sync is open (the gateway answers one at a time).
    SyncRequest(u8),
    /// The engine streams one page (at most 2 rows of one chat) of the open sync's pass,
    /// read at this moment (later pages see later commits).
    SyncPage,
    /// The engine streams the rest of the open pass and ends it.
    SyncAnswer,
}

fn arb_script() -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec(
        prop_oneof![
            6 => (0u8..3).prop_map(Step::Live),
            1 => (0u8..4).prop_map(Step::SyncRequest),
            2 => Just(Step::SyncPage),
            1 => Just(Step::SyncAnswer),
        ],
        0..120,
    )
}

/// Held live messages at most during a sync: small, so restarts happen often.
const HELD_CAP: usize = 3;

proptest! {
    #[test]
    fn stitching_writes_each_message_once_and_gap_free_after_sync(script in arb_script()) {
        let chats: Vec<ChatId> = (0..3).map(|i| ChatId::from(format!("c{i}"))).collect();
        let mut committed = [0u64; 3];
        // The open sync's pass: per chat, the last row streamed (from the pass's cursor) and
        // whether the chat's reading is finished.
        let mut pass: Option<[(u64, bool); 3]> = None;
        let mut stitcher = Stitcher::default();
        let mut out = Vec::new();
        let frame = |chat: usize, seq: u64| Bytes::from(format!("{chat}:{seq}"));
        let row = |c: usize, seq: u64| Outgoing::Backlog { chat: chats[c].clone(), seq, frame: frame(c, seq) };
        for step in &script {
            let mut results = Vec::new();
            match step {
                Step::Live(c) => {
                    let c = *c as usize;
                    committed[c] += 1;
                    let msg = Outgoing::Msg { chat: chats[c].clone(), seq: committed[c], frame: frame(c, committed[c]) };
                    results.push(stitcher.accept(msg, &mut out, HELD_CAP));
                }
                Step::SyncRequest(cursor) => {
                    if pass.is_some() {
                        continue;
                    }
                    let cursors: [u64; 3] = std::array::from_fn(|c| (*cursor as u64).min(committed[c]));
                    // Markers for the check below: per chat, the client said it had everything up to its cursor.
                    for (c, had) in cursors.iter().enumerate() {
                        out.push(Bytes::from(format!("|{c}={had}")));
                    }
                    let since = cursors.iter().enumerate().map(|(c, s)| (chats[c].to_string(), *s)).collect();
                    let begin = Outgoing::SyncBegin(Box::new(SyncRequest { since, reference: None }));
                    results.push(stitcher.accept(begin, &mut out, HELD_CAP));
                    pass = Some(cursors.map(|c| (c, false)));
                }
                Step::SyncPage => {
                    let Some(progress) = pass.as_mut() else { continue };
                    // Like the engine: a chat is read page by page until a page reaches its end,
                    // then never again in this pass (later commits are held or come live).
                    if let Some(c) = (0..3).find(|&c| !progress[c].1) {
                        let to = committed[c].min(progress[c].0 + 2);
                        for seq in progress[c].0 + 1..=to {
                            results.push(stitcher.accept(row(c, seq), &mut out, HELD_CAP));
                        }
                        progress[c] = (to, to == committed[c]);
                    }
                }
                Step::SyncAnswer => {
                    let Some(progress) = pass.take() else { continue };
                    for (c, (from, finished)) in progress.into_iter().enumerate() {
                        if !finished {
                            for seq in from + 1..=committed[c] {
                                results.push(stitcher.accept(row(c, seq), &mut out, HELD_CAP));
                            }
                        }
                    }
                    let end = Outgoing::SyncEnd { frame: Bytes::from_static(b"synced"), ok: true };
                    results.push(stitcher.accept(end, &mut out, HELD_CAP));
                }
            }
            prop_assert!(stitcher.held_len() <= HELD_CAP);
            let mut closed = false;
            for r in results {
                match r {
                    Stitched::Restart(again) => {
                        // The engine runs the sync again from the cursors asked for.
                        let cursor = |c: usize| again.since.iter().find(|(id, _)| *id == *chats[c]).map(|(_, s)| *s);
                        pass = Some(std::array::from_fn(|c| (cursor(c).expect("every chat keeps a cursor").min(committed[c]), false)));
                    }
                    Stitched::GiveUp => {
                        // The connection is closed; nothing more is written on it.
                        closed = true;
                        break;
                    }
                    Stitched::Nothing | Stitched::SyncDone => {}
                }
            }
            if closed {
                break;
            }
        }
        let text: Vec<String> = out.iter().map(|b| String::from_utf8(b.to_vec()).unwrap()).collect();
        let mut seen = HashSet::new();
        for t in text.iter().filter(|t| t.contains(':')) {
            prop_assert!(seen.insert(t.clone()), "{t} written twice: {text:?}");
        }
        // After the first sync request, each chat's messages are strictly increasing with no gap
        // (above what the client declared it had).
        if let Some(first) = text.iter().position(|t| t.starts_with('|')) {
            let mut last: HashMap<String, u64> = HashMap::new();
            for t in &text[..first] {
                if let Some((c, s)) = t.split_once(':') {
                    let s: u64 = s.parse().unwrap();
                    let e = last.entry(c.to_string()).or_insert(0);
                    *e = (*e).max(s);
                }
            }
            for t in &text[first..] {
                if let Some(marker) = t.strip_prefix('|') {
                    let (c, had) = marker.split_once('=').unwrap();
                    let e = last.entry(c.to_string()).or_insert(0);
                    *e = (*e).max(had.parse().unwrap());
                } else if let Some((c, s)) = t.split_once(':') {
                    let s: u64 = s.parse().unwrap();
                    let e = last.entry(c.to_string()).or_insert(0);
                    prop_assert_eq!(s, *e + 1, "gap or reorder in {} after sync: {:?}", c, text);
                    *e = s;
                }
            }
        }
    }
}

#[test]
fn seed_corpus_parses_as_named() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/frames");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("corpus folder") {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let text = String::from_utf8_lossy(&std::fs::read(&path).unwrap()).to_string();
        let parsed = parse_client_frame(&text, &Limits::default());
        if name.starts_with("ok-") {
            assert!(parsed.is_ok(), "{name}: {parsed:?}");
        } else if name.starts_with("err-") {
            assert!(parsed.is_err(), "{name}: {parsed:?}");
        }
        check_error_shape(&text);
        n += 1;
    }
    assert!(n >= 10, "the corpus has {n} seeds");
}

/// Masked client frames (some valid, some not) and raw bytes, cut into reads of any size.
fn arb_input() -> impl Strategy<Value = (Vec<u8>, Vec<usize>)> {
    let frame = (any::<u8>(), 0usize..300, any::<[u8; 4]>(), any::<bool>()).prop_map(
        |(b0, len, mask, long)| {
            let mut out = vec![b0];
            if long {
                out.push(0x80 | 126);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            } else {
                out.push(0x80 | (len.min(125) as u8));
            }
            out.extend_from_slice(&mask);
            out.extend(std::iter::repeat_n(
                b'a' ^ mask[0],
                if long { len } else { len.min(125) },
            ));
            out
        },
    );
    let piece = prop_oneof![frame, prop::collection::vec(any::<u8>(), 0..64)];
    (
        prop::collection::vec(piece, 1..20).prop_map(|p| p.concat()),
        prop::collection::vec(1usize..700, 1..40),
    )
}

proptest! {
    /// The input buffer never holds more than one frame under the limit plus a read, and
    /// once the reader fails it holds nothing and takes nothing, whatever follows.
    #[test]
    fn a_frame_reader_stays_bounded_and_drops_everything_after_a_failure(
        (bytes, reads) in arb_input()
    ) {
        const LIMIT: usize = 256;
        const READ: usize = 512;
        let mut r = FrameReader::new(LIMIT, Vec::new());
        let mut at = 0;
        for n in reads.iter().cycle().take(200) {
            if at >= bytes.len() {
                break;
            }
            let chunk = &bytes[at..(at + n).min(bytes.len())];
            at += chunk.len();
            match r.read_buffer(READ) {
                Some(buf) => buf.extend_from_slice(chunk),
                None => {
                    prop_assert!(r.failed());
                    prop_assert_eq!(r.held(), 0);
                    continue;
                }
            }
            while let Ok(Some(_)) = r.next_message() {}
            if r.failed() {
                prop_assert_eq!(r.held(), 0);
            } else {
                // A partial frame of at most LIMIT bytes and its 14-byte header, plus a read.
                prop_assert!(r.held() <= 2 * (LIMIT + 14 + 700 + READ), "held {}", r.held());
            }
        }
    }
}
