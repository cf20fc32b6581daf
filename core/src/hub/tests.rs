use super::*;
use crate::registry::ConnHandle;

fn hub() -> Hub {
    let hub = Hub::new(Limits::default(), 100, 60_000);
    hub.members.set(
        "c1".into(),
        vec!["a".into(), "b".into(), "c".into()],
        crate::membership::UNVERSIONED,
    );
    hub
}

fn connect(hub: &Hub, id: ConnId, user: &str) -> Arc<ConnHandle> {
    let conn = Arc::new(ConnHandle::new(id, user.into(), 16, 0));
    hub.registry.register(conn.clone());
    conn
}

fn drain(conn: &Arc<ConnHandle>) -> Vec<String> {
    let mut out = Vec::new();
    let mut items = Vec::new();
    conn.take_queued(usize::MAX, &mut items);
    for item in items {
        let text = match item {
            Outgoing::Frame(b)
            | Outgoing::Msg { frame: b, .. }
            | Outgoing::SyncEnd { frame: b, .. } => String::from_utf8(b.to_vec()).unwrap(),
            other => format!("{other:?}"),
        };
        let v: serde_json::Value =
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
        out.push(
            v.get("type")
                .and_then(|t| t.as_str())
                .unwrap_or("?")
                .to_owned(),
        );
    }
    out
}

fn send(cmid: &str) -> SendFrame {
    SendFrame {
        chat_id: "c1".into(),
        client_msg_id: cmid.into(),
        content: "hi".into(),
        attachments: vec![],
    }
}

/// `user`'s send of `cmid` in chat c1, admitted as new: the event for the engine.
fn forward(hub: &Hub, origin: Origin, user: &str, cmid: &str) -> EngineEvent {
    match hub.admit_send(origin, &user.into(), send(cmid)).unwrap() {
        SendAdmission::Forward(ev) => ev,
        other => panic!("expected forward, got {other:?}"),
    }
}

fn stored(seq: u64, duplicate: bool) -> EngineResult {
    EngineResult::Stored {
        message_id: format!("m{seq}"),
        seq,
        created_at: 1,
        content: "hi".into(),
        attachments: RawValue::from_string("[]".into()).unwrap(),
        duplicate,
    }
}

#[test]
fn send_acks_sender_and_fans_out_to_everyone_else_including_senders_other_device() {
    let hub = hub();
    let a1 = connect(&hub, 1, "a");
    let a2 = connect(&hub, 2, "a");
    let b = connect(&hub, 3, "b");
    let ev = forward(&hub, Origin::Conn(1), "a", "x");
    let tickets = hub.complete(vec![ev], vec![stored(1, false)]);
    assert!(tickets.is_empty());
    assert_eq!(drain(&a1), ["ack"]);
    assert_eq!(drain(&a2), ["msg"]);
    assert_eq!(drain(&b), ["msg"]);
    // A retry anywhere gets the same ack, and nobody gets a second msg.
    match hub
        .admit_send(Origin::Ticket(7), &"a".into(), send("x"))
        .unwrap()
    {
        SendAdmission::Duplicate(ack) => {
            assert_eq!((ack.seq, ack.message_id.as_str()), (1, "m1"))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn store_duplicate_is_fanned_out_only_if_it_never_was() {
    let hub = hub();
    let a = connect(&hub, 1, "a");
    let b = connect(&hub, 2, "b");
    let forward = |cmid: &str| forward(&hub, Origin::Conn(1), "a", cmid);
    hub.complete(vec![forward("x")], vec![stored(4, false)]);
    assert_eq!(drain(&a), ["ack"]);
    assert_eq!(drain(&b), ["msg"]);
    // The store already had it and it was fanned out (seq 4): ack only.
    hub.complete(vec![forward("y")], vec![stored(4, true)]);
    assert_eq!(drain(&a), ["ack"]);
    assert!(drain(&b).is_empty());
    // The store had it but it was never fanned out (committed, then the batch failed): fan out now.
    hub.complete(vec![forward("z")], vec![stored(5, true)]);
    assert_eq!(drain(&a), ["ack"]);
    assert_eq!(drain(&b), ["msg"]);
}

#[test]
fn unknown_chat_is_refused_and_a_non_members_send_is_left_to_the_store() {
    let hub = hub();
    // It may be the retry of a send made while a member (the store answers it, or
    // refuses it with `forbidden`).
    assert!(matches!(
        hub.admit_send(Origin::Conn(1), &"z".into(), send("x")),
        Ok(SendAdmission::Forward(_))
    ));
    let mut s = send("y");
    s.chat_id = "nope".into();
    assert_eq!(
        hub.admit_send(Origin::Conn(1), &"a".into(), s)
            .unwrap_err()
            .code,
        ErrorCode::NotFound
    );
}

#[test]
fn failed_send_errors_every_waiter_and_can_be_retried() {
    let hub = hub();
    let a = connect(&hub, 1, "a");
    let ev = forward(&hub, Origin::Conn(1), "a", "x");
    assert!(matches!(
        hub.admit_send(Origin::Ticket(3), &"a".into(), send("x"))
            .unwrap(),
        SendAdmission::InFlight
    ));
    let t = hub.complete(
        vec![ev],
        vec![EngineResult::Failed(FrameError::new(
            ErrorCode::NotFound,
            "no media",
        ))],
    );
    assert_eq!(t.len(), 1);
    assert!(matches!(&t[0], (3, TicketOutcome::Failed(e)) if e.code == ErrorCode::NotFound));
    assert_eq!(drain(&a), ["error"]);
    assert!(matches!(
        hub.admit_send(Origin::Conn(1), &"a".into(), send("x"))
            .unwrap(),
        SendAdmission::Forward(_)
    ));
}

#[test]
fn receipts_go_to_other_members_only() {
    let hub = hub();
    let a = connect(&hub, 1, "a");
    let b = connect(&hub, 2, "b");
    let ev = EngineEvent::Pointer {
        origin: Origin::Conn(2),
        user: "b".into(),
        chat: "c1".into(),
        kind: PointerKind::Read,
        seq: 3,
    };
    hub.complete(
        vec![ev],
        vec![EngineResult::PointerMoved {
            delivered: 3,
            read: 3,
            moved_delivered: true,
            moved_read: true,
        }],
    );
    assert_eq!(drain(&a), ["receipt", "receipt"]);
    assert!(drain(&b).is_empty());
}

#[test]
fn presence_goes_to_online_direct_partners_after_grace_and_typing_stops_on_last_close() {
    let window = WindowConfig {
        capacity: 10,
        ttl_ms: 1_000,
        ..WindowConfig::default()
    };
    let hub = Hub::with_config(
        Limits::default(),
        window,
        SidePathConfig {
            typing_ttl_ms: 6_000,
            typing_min_interval_ms: 2_000,
            presence_grace_ms: 500,
        },
    );
    hub.set_chat("d".into(), vec!["a".into(), "b".into()], true, -1);
    hub.set_chat("g".into(), vec!["a".into(), "c".into()], false, -1);
    let b = connect(&hub, 2, "b");
    let c = connect(&hub, 3, "c");
    let a = Arc::new(ConnHandle::new(1, "a".into(), 16, 0));
    assert!(matches!(
        hub.connect(a.clone(), 1_000),
        Some(EngineEvent::Seen { at: 1_000, .. })
    ));
    assert!(hub.tick(1_000).is_empty());
    assert_eq!(drain(&b), ["presence"], "direct partner hears it");
    assert!(drain(&c).is_empty(), "a group member does not");
    hub.typing(&"a".into(), &"g".into(), true, 1_100);
    assert_eq!(drain(&c), ["typing"]);
    hub.disconnect(&a, 2_000);
    assert_eq!(
        drain(&c),
        ["typing"],
        "stop when the last connection closes"
    );
    assert!(
        hub.tick(2_400).is_empty() && drain(&b).is_empty(),
        "within grace"
    );
    let seen = hub.tick(2_500);
    assert!(matches!(&seen[..], [EngineEvent::Seen { at: 2_000, .. }]));
    assert_eq!(drain(&b), ["presence"]);
    assert_eq!(hub.presence_view("a", Some(10)), (false, Some(2_000)));
}

fn row(seq: u64) -> BacklogRow {
    BacklogRow {
        chat_id: "c1".into(),
        seq,
        message_id: format!("m{seq}"),
        sender_id: "b".into(),
        content: "hi".into(),
        attachments: RawValue::from_string("[]".into()).unwrap(),
        created_at: 1,
        client_msg_id: None,
    }
}

#[test]
fn messages_of_another_node_are_fanned_out_once_in_order_and_a_gap_is_returned() {
    let hub = hub();
    let a = connect(&hub, 1, "a");
    let b = connect(&hub, 2, "b");
    assert_eq!(hub.deliver_stored(&[row(1), row(2)]).0, []);
    assert_eq!(drain(&a), ["msg", "msg"]);
    assert_eq!(
        drain(&b),
        ["msg", "msg"],
        "the sender's devices here get it too"
    );
    // 3 was lost on the way: 4 and 5 wait for it.
    let (gaps, _) = hub.deliver_stored(&[row(2), row(4), row(5)]);
    assert_eq!(
        gaps,
        [SeqGap {
            chat_id: "c1".into(),
            after: 2,
            before: 4
        }]
    );
    assert!(drain(&a).is_empty(), "nothing past a gap, nothing twice");
    assert_eq!(hub.deliver_stored(&[row(3), row(4), row(5)]).0, []);
    assert_eq!(drain(&a), ["msg", "msg", "msg"]);
}

#[test]
fn fanned_out_heads_are_the_chats_with_a_member_connected_here() {
    let hub = hub();
    hub.members.set("c2".into(), vec!["x".into()], -1);
    let a = connect(&hub, 1, "a");
    hub.deliver_stored(&[row(1), row(2)]);
    let mut other = row(7);
    other.chat_id = "c2".into();
    hub.deliver_stored(&[other]);
    assert_eq!(
        hub.fanned_out_heads(),
        [("c1".into(), 2)],
        "c2's only member is not here"
    );
    hub.registry.unregister(&a);
    assert_eq!(hub.fanned_out_heads(), []);
}

fn cluster_hub() -> Hub {
    let mut hub = hub();
    hub.cluster = Some(ClusterLink::default());
    hub
}

fn sent_row(seq: u64, sender: &str, cmid: &str) -> BacklogRow {
    BacklogRow {
        sender_id: sender.into(),
        client_msg_id: Some(cmid.into()),
        ..row(seq)
    }
}

#[test]
fn a_cluster_send_waits_for_its_sequencer_and_is_acked_by_the_delivered_row() {
    let hub = cluster_hub();
    let a1 = connect(&hub, 1, "a");
    let a2 = connect(&hub, 2, "a");
    let b = connect(&hub, 3, "b");
    let forward = |origin: Origin, cmid: &str| forward(&hub, origin, "a", cmid);
    // Produced to the sends log: nothing yet, the send stays in flight.
    let tickets = hub.complete(
        vec![forward(Origin::Conn(1), "x")],
        vec![EngineResult::Deferred],
    );
    assert!(tickets.is_empty());
    assert!(drain(&a1).is_empty());
    assert!(matches!(
        hub.admit_send(Origin::Ticket(9), &"a".into(), send("x"))
            .unwrap(),
        SendAdmission::InFlight
    ));
    // The sequencer's row comes back: the sender's connection gets the ack instead of the
    // message, the REST retry its ticket, everyone else the message; once.
    let (gaps, tickets) = hub.deliver_stored(&[sent_row(1, "a", "x")]);
    assert!(gaps.is_empty());
    assert!(matches!(&tickets[..], [(9, TicketOutcome::Ack(ack))] if ack.seq == 1));
    assert_eq!(drain(&a1), ["ack"]);
    assert_eq!(drain(&a2), ["msg"]);
    assert_eq!(drain(&b), ["msg"]);
    assert_eq!(hub.deliver_stored(&[sent_row(1, "a", "x")]).1, []);
    assert!(drain(&a1).is_empty() && drain(&b).is_empty());
    // A later retry here is answered from the window.
    assert!(matches!(
        hub.admit_send(Origin::Conn(1), &"a".into(), send("x")).unwrap(),
        SendAdmission::Duplicate(ack) if ack.seq == 1
    ));
    // Another node's message is not remembered in this window.
    hub.deliver_stored(&[sent_row(2, "b", "y")]);
    assert!(matches!(
        hub.admit_send(Origin::Conn(3), &"b".into(), send("y"))
            .unwrap(),
        SendAdmission::Forward(_)
    ));
}

#[test]
fn a_cluster_send_answered_without_a_message_gets_the_ack_or_the_error_only() {
    let hub = cluster_hub();
    let a = connect(&hub, 1, "a");
    let b = connect(&hub, 2, "b");
    for cmid in ["x", "y"] {
        let ev = forward(&hub, Origin::Conn(1), "a", cmid);
        hub.complete(vec![ev], vec![EngineResult::Deferred]);
    }
    let key = |cmid: &str| IdemKey {
        sender: "a".into(),
        chat: "c1".into(),
        client_msg_id: cmid.into(),
    };
    let ack = Arc::new(Ack {
        client_msg_id: "x".into(),
        chat_id: "c1".into(),
        message_id: "m7".into(),
        seq: 7,
        created_at: 1,
        rewritten: None,
    });
    hub.answer_sends(vec![
        (key("x"), Ok(ack)),
        (
            key("y"),
            Err(FrameError::new(ErrorCode::Forbidden, "not a member")),
        ),
    ]);
    assert_eq!(drain(&a), ["ack", "error"]);
    assert!(
        drain(&b).is_empty(),
        "a retry's message was delivered when it was stored"
    );
}

#[test]
fn a_single_node_never_leaves_a_send_deferred() {
    let hub = hub();
    let a = connect(&hub, 1, "a");
    let ev = forward(&hub, Origin::Conn(1), "a", "x");
    hub.complete(vec![ev], vec![EngineResult::Deferred]);
    assert_eq!(drain(&a), ["error"]);
}

#[test]
fn cluster_nodes_hand_typing_receipts_and_presence_to_the_cluster_layer() {
    let hub = cluster_hub();
    hub.set_chat("d1".into(), vec!["a".into(), "b".into()], true, -1);
    let b = connect(&hub, 2, "b");
    hub.typing(&"a".into(), &"c1".into(), true, 10);
    assert_eq!(drain(&b), ["typing"], "members here hear it at once");
    hub.connect(connect(&hub, 1, "a"), 10);
    hub.tick(20);
    assert!(
        drain(&b).is_empty(),
        "a's presence is the cluster's to decide"
    );
    let link = hub.cluster.as_ref().unwrap();
    let events = link.take(std::time::Duration::from_millis(1));
    assert!(matches!(&events[0], ClusterEvent::ChatFrame { chat, .. } if &**chat == "c1"));
    assert!(events.iter().any(|e| matches!(
        e,
        ClusterEvent::Presence { user, online: true, .. } if &**user == "a"
    )));
    // The cluster's word reaches the followers here once per change.
    hub.cluster_presence(&"a".into(), true, 10);
    hub.cluster_presence(&"a".into(), true, 10);
    assert_eq!(drain(&b), ["presence"]);
    hub.cluster_presence(&"x".into(), true, 10);
    assert_eq!(
        hub.presence_view("x", Some(3)),
        (true, Some(10)),
        "online on another node"
    );
    hub.cluster_presence(&"x".into(), false, 30);
    assert_eq!(hub.presence_view("x", Some(30)), (false, Some(30)));
}

#[test]
fn a_sync_page_is_queued_only_while_the_connection_has_room_for_it() {
    let hub = hub();
    let a = connect(&hub, 1, "a"); // queue capacity 16: a backlog may fill 8
    let page: Vec<BacklogRow> = (1..=4).map(row).collect();
    assert_eq!(hub.sync_rows(1, &page), SyncPush::Queued);
    assert_eq!(hub.sync_rows(1, &page), SyncPush::Queued);
    assert_eq!(hub.sync_rows(1, &page), SyncPush::Full, "4 + 4 + 4 > 8");
    let mut items = Vec::new();
    a.take_queued(usize::MAX, &mut items);
    assert_eq!(items.len(), 8);
    let big: Vec<BacklogRow> = (1..=40).map(row).collect();
    assert_eq!(
        hub.sync_rows(1, &big),
        SyncPush::Queued,
        "an empty queue takes any page"
    );
    a.take_queued(usize::MAX, &mut items);
    assert_eq!(hub.sync_rows(1, &page), SyncPush::Queued);
    assert_eq!(
        hub.sync_rows(99, &page),
        SyncPush::Closed,
        "no such connection"
    );
    a.close(crate::registry::CloseReason::PeerClosed);
    assert_eq!(hub.sync_rows(1, &page), SyncPush::Closed);
}

#[test]
fn a_retry_after_the_in_flight_deadline_is_told_unavailable_with_every_earlier_waiter() {
    let window = WindowConfig {
        capacity: 10,
        ttl_ms: 60_000,
        in_flight_deadline_ms: 0,
    };
    let hub = Hub::with_config(Limits::default(), window, SidePathConfig::default());
    hub.members.set("c1".into(), vec!["a".into()], -1);
    let a = connect(&hub, 1, "a");
    assert!(matches!(
        hub.admit_send(Origin::Conn(1), &"a".into(), send("x")),
        Ok(SendAdmission::Forward(_))
    ));
    // The batch carrying it is lost; a retry past the deadline is refused, not parked.
    let e = hub
        .admit_send(Origin::Conn(1), &"a".into(), send("x"))
        .unwrap_err();
    assert_eq!(
        (e.code, e.reference.as_deref()),
        (ErrorCode::Unavailable, Some("x"))
    );
    assert_eq!(
        drain(&a),
        ["error"],
        "the first attempt's waiter hears it too"
    );
    assert!(matches!(
        hub.admit_send(Origin::Conn(1), &"a".into(), send("x")),
        Ok(SendAdmission::Forward(_))
    ));
}

#[test]
fn members_receive_the_content_that_was_stored_not_the_content_that_was_sent() {
    let hub = hub();
    let b = connect(&hub, 2, "b");
    let ev = forward(&hub, Origin::Conn(1), "a", "x");
    let mut result = stored(1, false);
    if let EngineResult::Stored { content, .. } = &mut result {
        *content = "rewritten by the store".into();
    }
    hub.complete(vec![ev], vec![result]);
    let mut items = Vec::new();
    b.take_queued(usize::MAX, &mut items);
    let [Outgoing::Msg { frame, .. }] = &items[..] else {
        panic!("one msg: {items:?}")
    };
    let msg: serde_json::Value = serde_json::from_slice(frame).unwrap();
    assert_eq!(msg["content"], "rewritten by the store");
}

fn ack_of(conn: &Arc<ConnHandle>) -> serde_json::Value {
    let mut items = Vec::new();
    conn.take_queued(usize::MAX, &mut items);
    let [Outgoing::Frame(frame)] = &items[..] else {
        panic!("one frame: {items:?}")
    };
    serde_json::from_slice(frame).unwrap()
}

#[test]
fn the_sender_is_shown_what_a_plugin_stored_instead_of_what_it_sent() {
    let hub = hub();
    let a = connect(&hub, 1, "a");
    let ev = forward(&hub, Origin::Conn(1), "a", "x");
    let mut result = stored(1, false);
    if let EngineResult::Stored {
        content,
        attachments,
        ..
    } = &mut result
    {
        *content = "rewritten".into();
        *attachments = RawValue::from_string(r#"[{"id":"f1","name":"a.png"}]"#.into()).unwrap();
    }
    hub.complete(vec![ev], vec![result]);
    let ack = ack_of(&a);
    assert_eq!(ack["type"], "ack");
    assert_eq!(ack["content"], "rewritten");
    assert_eq!(ack["attachments"][0]["id"], "f1");
    // A retry answered from the window shows it too.
    let Ok(SendAdmission::Duplicate(again)) =
        hub.admit_send(Origin::Conn(1), &"a".into(), send("x"))
    else {
        panic!("a duplicate")
    };
    assert_eq!(again.rewritten.as_ref().unwrap().content, "rewritten");
}

#[test]
fn a_retry_the_store_answers_gets_the_plain_ack_whatever_its_content() {
    let hub = hub();
    let a = connect(&hub, 1, "a");
    let mut retry = send("x");
    retry.content = "other words, same client_msg_id".into();
    let Ok(SendAdmission::Forward(ev)) = hub.admit_send(Origin::Conn(1), &"a".into(), retry) else {
        panic!("new to the window")
    };
    hub.complete(vec![ev], vec![stored(1, true)]);
    let ack = ack_of(&a);
    assert_eq!(ack["seq"], 1);
    assert!(ack.get("content").is_none());
}

#[test]
fn an_ack_of_a_send_stored_as_sent_carries_no_content() {
    let hub = hub();
    let a = connect(&hub, 1, "a");
    let ev = forward(&hub, Origin::Conn(1), "a", "x");
    hub.complete(vec![ev], vec![stored(1, false)]);
    let ack = ack_of(&a);
    assert_eq!(ack["seq"], 1);
    assert!(ack.get("content").is_none() && ack.get("attachments").is_none());
    // Same content, attachments sent as ids and stored as objects: not a rewrite.
    assert_eq!(
        protocol::send_fingerprint("hi", ["f1", "f2"].into_iter()),
        protocol::stored_fingerprint(
            "hi",
            &RawValue::from_string(r#"[{"id":"f1","size":3},{"id":"f2"}]"#.into()).unwrap()
        )
    );
    assert_ne!(
        protocol::send_fingerprint("hi", ["f2", "f1"].into_iter()),
        protocol::stored_fingerprint(
            "hi",
            &RawValue::from_string(r#"[{"id":"f1"},{"id":"f2"}]"#.into()).unwrap()
        )
    );
}

#[test]
fn a_removal_between_rows_stops_fan_out_at_its_point() {
    let hub = cluster_hub();
    let c = connect(&hub, 3, "c");
    let removal = Bytes::from_static(br#"{"type":"chat","chat_id":"c1"}"#);
    let members = |list: &[&str]| list.iter().map(|u| UserId::from(*u)).collect::<Vec<_>>();
    let (gaps, _) = hub.apply_sequenced(vec![
        Sequenced::Row(row(1)),
        Sequenced::Members {
            chat: "c1".into(),
            members: members(&["a", "b"]),
            direct: false,
            version: 5,
            tell: members(&["a", "b", "c"]),
            frame: Some(removal),
        },
        Sequenced::Row(row(2)),
        // The start's scan, older than the removal, arriving late: ignored.
        Sequenced::Members {
            chat: "c1".into(),
            members: members(&["a", "b", "c"]),
            direct: false,
            version: 4,
            tell: vec![],
            frame: None,
        },
        Sequenced::Row(row(3)),
    ]);
    assert!(gaps.is_empty());
    assert_eq!(
        drain(&c),
        ["msg", "chat"],
        "seq 1, then the removal, then nothing"
    );
    assert!(!hub.members.get("c1").unwrap().1.contains("c"));
}

#[test]
fn a_row_acks_its_waiter_without_a_cluster_link() {
    let hub = hub();
    let a = connect(&hub, 1, "a");
    let b = connect(&hub, 2, "b");
    let _ = forward(&hub, Origin::Conn(1), "a", "x");
    let (_, tickets) = hub.apply_sequenced(vec![Sequenced::Row(sent_row(1, "a", "x"))]);
    assert!(tickets.is_empty());
    assert_eq!(drain(&a), ["ack"]);
    assert_eq!(drain(&b), ["msg"]);
}
