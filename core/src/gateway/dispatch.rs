//! What one client text frame does: parse, rate-limit, check membership, and
//! either answer on the connection's queue or hand an event to the engine.
//! No sockets here: the tests drive it with a `Hub` and a `ConnHandle`.

use std::sync::atomic::Ordering;

use crate::hub::{EngineEvent, Hub, SendAdmission};
use crate::outbox::{Outgoing, SyncRequest};
use crate::protocol::{self, ClientFrame, ErrorCode, FrameError};
use crate::ratelimit::TokenBucket;
use crate::registry::ConnHandle;
use crate::send_guard::Origin;

/// A user's frame budgets (token buckets), shared by all of the user's connections to
/// this node: more sockets do not buy more sends.
#[derive(Debug)]
pub struct FrameBudget {
    sends: TokenBucket,
    /// Every other frame that costs the engine or a fan-out (sync, pointers, typing, subscribe).
    requests: TokenBucket,
    /// Users named in `presence.subscribe` frames: each costs a membership lookup.
    presence_ids: TokenBucket,
}

/// Rates and bursts of a `FrameBudget`.
#[derive(Debug, Clone, Copy)]
pub struct BudgetRates {
    pub send_per_s: f64,
    pub send_burst: f64,
    pub requests_per_s: f64,
    pub requests_burst: f64,
    pub presence_ids_per_s: f64,
    pub presence_ids_burst: f64,
}

impl FrameBudget {
    pub fn new(r: BudgetRates, now_ms: u64) -> Self {
        Self {
            sends: TokenBucket::new(r.send_per_s, r.send_burst, now_ms),
            requests: TokenBucket::new(r.requests_per_s, r.requests_burst, now_ms),
            presence_ids: TokenBucket::new(r.presence_ids_per_s, r.presence_ids_burst, now_ms),
        }
    }
}

/// Handles one text frame of `conn`. `Ok(Some(event))`: hand it to the engine;
/// `Ok(None)`: done (any answer is on the connection's queue); `Err`: refuse the
/// frame with that error.
pub fn dispatch(
    hub: &Hub,
    conn: &ConnHandle,
    budget: &mut FrameBudget,
    text: &str,
    now_ms: u64,
) -> Result<Option<EngineEvent>, FrameError> {
    let frame = protocol::parse_client_frame(text, &hub.limits)?;
    if !matches!(frame, ClientFrame::Send(_)) {
        budget
            .requests
            .try_take(now_ms)
            .map_err(FrameError::rate_limited)?;
    }
    Ok(Some(match frame {
        ClientFrame::Send(send) => {
            if let Err(retry_after) = budget.sends.try_take(now_ms) {
                return Err(
                    FrameError::rate_limited(retry_after).with_ref(Some(send.client_msg_id))
                );
            }
            match hub.admit_send(Origin::Conn(conn.id), &conn.user, send)? {
                SendAdmission::Forward(ev) => ev,
                SendAdmission::Duplicate(ack) => {
                    conn.push(Outgoing::Frame(protocol::encode_ack(&ack)));
                    return Ok(None);
                }
                SendAdmission::InFlight => return Ok(None),
            }
        }
        ClientFrame::Sync { since, reference } => {
            if conn.sync_pending.swap(true, Ordering::AcqRel) {
                return Err(FrameError::rate_limited(100).with_ref(reference));
            }
            // Queued before the request leaves, so live messages from here on are held.
            conn.push(Outgoing::SyncBegin(Box::new(SyncRequest {
                since: since.clone(),
                reference: reference.clone(),
            })));
            EngineEvent::Sync {
                conn: conn.id,
                user: conn.user.clone(),
                since,
                reference,
            }
        }
        ClientFrame::Pointer { chat_id, seq, kind } => {
            let (chat, _) = hub.member_chat(&conn.user, &chat_id)?;
            EngineEvent::Pointer {
                origin: Origin::Conn(conn.id),
                user: conn.user.clone(),
                chat,
                kind,
                seq,
            }
        }
        ClientFrame::Typing { chat_id, start } => {
            let (chat, _) = hub.member_chat(&conn.user, &chat_id)?;
            hub.typing(&conn.user, &chat, start, now_ms);
            return Ok(None);
        }
        ClientFrame::PresenceSubscribe { user_ids } => {
            hub.presence
                .lock()
                .check_subscribe(conn.id, &user_ids)
                .map_err(|e| FrameError::new(ErrorCode::BadRequest, e.to_string()))?;
            budget
                .presence_ids
                .try_take_n(user_ids.len() as f64, now_ms)
                .map_err(FrameError::rate_limited)?;
            EngineEvent::PresenceQuery {
                conn: conn.id,
                user: conn.user.clone(),
                user_ids,
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::hub::EngineResult;
    use crate::protocol::Limits;
    use serde_json::value::RawValue;

    fn setup() -> (Hub, Arc<ConnHandle>, FrameBudget) {
        let hub = Hub::new(Limits::default(), 100, 60_000);
        hub.members
            .set("c1".into(), vec!["a".into(), "b".into()], -1);
        let conn = Arc::new(ConnHandle::new(1, "a".into(), 64, 0));
        hub.registry.register(conn.clone());
        let rates = BudgetRates {
            send_per_s: 1_000.0,
            send_burst: 1_000.0,
            requests_per_s: 3.0,
            requests_burst: 3.0,
            presence_ids_per_s: 10.0,
            presence_ids_burst: 20.0,
        };
        (hub, conn, FrameBudget::new(rates, 0))
    }

    fn queued(conn: &ConnHandle) -> Vec<String> {
        let mut items = Vec::new();
        conn.take_queued(usize::MAX, &mut items);
        items
            .into_iter()
            .map(|item| match item {
                Outgoing::Frame(b) => {
                    let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
                    v["type"].as_str().unwrap().to_owned()
                }
                Outgoing::SyncBegin(_) => "sync-begin".into(),
                other => format!("{other:?}"),
            })
            .collect()
    }

    /// The engine's answer to a batch of one send: stored as seq 1.
    fn store_first(hub: &Hub, ev: EngineEvent) {
        let stored = EngineResult::Stored {
            message_id: "m1".into(),
            seq: 1,
            created_at: 5,
            content: "hi".into(),
            attachments: RawValue::from_string("[]".into()).unwrap(),
            duplicate: false,
        };
        hub.complete(vec![ev], vec![stored]);
    }

    const SEND: &str = r#"{"type":"send","chat_id":"c1","client_msg_id":"k1","content":"hi"}"#;

    #[test]
    fn a_send_goes_to_the_engine_and_its_retry_is_answered_from_the_window() {
        let (hub, conn, mut budget) = setup();
        let Some(ev) = dispatch(&hub, &conn, &mut budget, SEND, 0).unwrap() else {
            panic!("a new send goes to the engine")
        };
        // A retry while the first is in flight waits for its answer.
        assert!(dispatch(&hub, &conn, &mut budget, SEND, 0)
            .unwrap()
            .is_none());
        store_first(&hub, ev);
        assert_eq!(queued(&conn), ["ack", "ack"]);
        assert!(dispatch(&hub, &conn, &mut budget, SEND, 0)
            .unwrap()
            .is_none());
        assert_eq!(queued(&conn), ["ack"]);
    }

    #[test]
    fn a_removed_member_retrying_gets_the_original_ack_not_forbidden() {
        let (hub, conn, mut budget) = setup();
        let ev = dispatch(&hub, &conn, &mut budget, SEND, 0)
            .unwrap()
            .unwrap();
        store_first(&hub, ev);
        queued(&conn);
        hub.members.set("c1".into(), vec!["b".into()], -1);
        assert!(dispatch(&hub, &conn, &mut budget, SEND, 0)
            .unwrap()
            .is_none());
        assert_eq!(queued(&conn), ["ack"]);
        // A new send of the non-member goes to the store, which refuses it (it may be a
        // retry the window no longer holds); typing and pointers are refused at once.
        let other = SEND.replace("k1", "k2");
        assert!(matches!(
            dispatch(&hub, &conn, &mut budget, &other, 0),
            Ok(Some(EngineEvent::Send { .. }))
        ));
        let typing = r#"{"type":"typing","chat_id":"c1","state":"start"}"#;
        let e = dispatch(&hub, &conn, &mut budget, typing, 0).unwrap_err();
        assert_eq!(e.code, ErrorCode::Forbidden);
    }

    #[test]
    fn unknown_chat_bad_json_and_rate_limits_are_refused() {
        let (hub, conn, mut budget) = setup();
        let e = dispatch(&hub, &conn, &mut budget, &SEND.replace("c1", "zz"), 0).unwrap_err();
        assert_eq!(
            (e.code, e.reference.as_deref()),
            (ErrorCode::NotFound, Some("k1"))
        );
        let e = dispatch(&hub, &conn, &mut budget, "{not json", 0).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        let read = r#"{"type":"read","chat_id":"c1","seq":1}"#;
        for _ in 0..3 {
            dispatch(&hub, &conn, &mut budget, read, 0).unwrap();
        }
        let e = dispatch(&hub, &conn, &mut budget, read, 0).unwrap_err();
        assert_eq!(e.code, ErrorCode::RateLimited);
        assert!(e.retry_after_ms.is_some());
    }

    #[test]
    fn presence_subscribes_cost_one_token_per_user_named() {
        let (hub, conn, mut budget) = setup();
        let ids = |n: usize| {
            (0..n)
                .map(|i| format!("\"u{i}\""))
                .collect::<Vec<_>>()
                .join(",")
        };
        let frame = |n| format!(r#"{{"type":"presence.subscribe","user_ids":[{}]}}"#, ids(n));
        assert!(dispatch(&hub, &conn, &mut budget, &frame(15), 0).is_ok());
        let e = dispatch(&hub, &conn, &mut budget, &frame(10), 0).unwrap_err();
        assert_eq!(e.code, ErrorCode::RateLimited);
        // 10 ids a second: the 5 left and half a second's 5 more.
        assert_eq!(e.retry_after_ms, Some(500));
        assert!(dispatch(&hub, &conn, &mut budget, &frame(10), 500).is_ok());
    }

    #[test]
    fn one_sync_at_a_time_and_live_messages_are_held_from_its_request() {
        let (hub, conn, mut budget) = setup();
        let sync = r#"{"type":"sync","since":{"c1":3},"ref":"s1"}"#;
        let Some(EngineEvent::Sync {
            since, reference, ..
        }) = dispatch(&hub, &conn, &mut budget, sync, 0).unwrap()
        else {
            panic!("a sync goes to the engine")
        };
        assert_eq!(
            (since, reference.as_deref()),
            (vec![("c1".to_owned(), 3)], Some("s1"))
        );
        assert_eq!(queued(&conn), ["sync-begin"]);
        let e = dispatch(&hub, &conn, &mut budget, sync, 0).unwrap_err();
        assert_eq!(
            (e.code, e.reference.as_deref()),
            (ErrorCode::RateLimited, Some("s1"))
        );
    }
}
