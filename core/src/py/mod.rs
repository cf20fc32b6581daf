//! The PyO3 glue: converts between Python tuples and the gateway's types.
//! No logic lives here.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use serde_json::value::RawValue;

use crate::cluster::ClusterEvent;
use crate::gateway::{Gateway, GatewayConfig};
use crate::hub::{BacklogRow, EngineEvent, EngineResult, Sequenced, SyncPush};
use crate::protocol::{self, ErrorCode, FrameError, Limits, PointerKind, SendFrame};
use crate::send_guard::{IdemKey, UserId};
use crate::token::TokenVerifier;

mod values;

create_exception!(
    _core,
    GatewayError,
    PyException,
    "A request refused by the gateway: args are (code, message)."
);
create_exception!(
    _core,
    TokenError,
    PyValueError,
    "A token that is malformed, badly signed or expired."
);

fn gateway_error(e: FrameError) -> PyErr {
    GatewayError::new_err((e.code.as_str(), e.message))
}

pub(crate) fn raw_json(text: String) -> PyResult<Box<RawValue>> {
    RawValue::from_string(text)
        .map_err(|e| PyValueError::new_err(format!("attachments must be JSON: {e}")))
}

/// Store rows as they cross from Python (`BacklogTuple`) into the hub's.
fn backlog_rows(rows: Vec<BacklogTuple>) -> PyResult<Vec<BacklogRow>> {
    rows.into_iter()
        .map(
            |(
                chat_id,
                seq,
                message_id,
                sender_id,
                content,
                attachments,
                created_at,
                client_msg_id,
            )| {
                Ok(BacklogRow {
                    chat_id,
                    seq,
                    message_id,
                    sender_id,
                    content,
                    attachments: raw_json(attachments)?,
                    created_at,
                    client_msg_id,
                })
            },
        )
        .collect()
}

/// The gateway's settings as Python names them: each name, its Rust field, and its type.
/// `gateway_defaults()` reads this table off `GatewayConfig::default()` (the only defaults),
/// and `Gateway(settings=...)` writes it; Python's configuration takes its defaults from the
/// first, so a setting is declared once.
macro_rules! settings_table {
    ($defaults:ident, $apply:ident, $root:ident: $root_ty:ty, { $($name:ident : $ty:ty => $($path:ident).+),* $(,)? }) => {
        fn $defaults(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
            let $root = <$root_ty>::default();
            let d = PyDict::new(py);
            $( d.set_item(stringify!($name), $root.$($path).+.clone())?; )*
            Ok(d)
        }

        fn $apply($root: &mut $root_ty, values: &Bound<'_, PyDict>) -> PyResult<()> {
            for (key, value) in values.iter() {
                let key: String = key.extract()?;
                match key.as_str() {
                    $( stringify!($name) => {
                        $root.$($path).+ = value.extract::<$ty>().map_err(|e| {
                            PyValueError::new_err(format!("setting {key}: {e}"))
                        })?;
                    } )*
                    _ => return Err(PyValueError::new_err(format!("unknown gateway setting {key:?}"))),
                }
            }
            Ok(())
        }
    };
}

settings_table!(gateway_setting_defaults, apply_gateway_settings, c: GatewayConfig, {
    heartbeat_s: u64 => heartbeat_s,
    queue_capacity: usize => queue_capacity,
    sync_hold_capacity: usize => sync_hold_capacity,
    read_buffer_bytes: usize => read_buffer_bytes,
    runtime_threads: usize => runtime_threads,
    engine_queue_capacity: usize => engine_queue_capacity,
    idempotency_window: usize => window.capacity,
    idempotency_ttl_ms: u64 => window.ttl_ms,
    in_flight_deadline_ms: u64 => window.in_flight_deadline_ms,
    max_bad_frames: u32 => max_bad_frames,
    side_tick_ms: u64 => tick_ms,
    typing_ttl_ms: u64 => side_paths.typing_ttl_ms,
    typing_min_interval_ms: u64 => side_paths.typing_min_interval_ms,
    presence_grace_ms: u64 => side_paths.presence_grace_ms,
    upgrades_per_s: f64 => upgrades_per_s,
    upgrade_burst: f64 => upgrade_burst,
    max_connections: usize => max_connections,
    max_connections_per_user: usize => max_connections_per_user,
    max_connections_per_address: usize => max_connections_per_address,
    max_handshakes: usize => max_handshakes,
    handshakes_per_address: usize => handshakes_per_address,
    handshake_timeout_ms: u64 => handshake_timeout_ms,
    send_per_s: f64 => send_per_s,
    send_burst: f64 => send_burst,
    requests_per_s: f64 => requests_per_s,
    requests_burst: f64 => requests_burst,
    presence_ids_per_s: f64 => presence_ids_per_s,
    presence_ids_burst: f64 => presence_ids_burst,
});

settings_table!(limit_defaults, apply_limits, l: Limits, {
    max_frame_bytes: usize => max_frame_bytes,
    max_content_bytes: usize => max_content_bytes,
    max_attachments: usize => max_attachments,
    max_client_msg_id_bytes: usize => max_client_msg_id_bytes,
    max_id_bytes: usize => max_id_bytes,
    max_sync_chats: usize => max_sync_chats,
    max_subscribe: usize => max_subscribe,
});

/// The running WebSocket gateway (see `pychat._core.pyi`).
#[pyclass(name = "Gateway", frozen, module = "pychat._core")]
struct PyGateway {
    inner: Gateway,
    in_flight: Mutex<Option<Vec<EngineEvent>>>,
}

#[pymethods]
impl PyGateway {
    #[new]
    #[pyo3(signature = (*, host, port, secret, settings, limits, allowed_origins=Vec::new(), cluster=false))]
    fn new(
        host: String,
        port: u16,
        secret: Vec<u8>,
        settings: &Bound<'_, PyDict>,
        limits: &Bound<'_, PyDict>,
        allowed_origins: Vec<String>,
        cluster: bool,
    ) -> PyResult<Self> {
        if secret.len() < 16 {
            return Err(PyValueError::new_err("secret must be at least 16 bytes"));
        }
        let mut config = GatewayConfig {
            host,
            port,
            secret,
            allowed_origins,
            cluster,
            ..GatewayConfig::default()
        };
        apply_gateway_settings(&mut config, settings)?;
        apply_limits(&mut config.limits, limits)?;
        let inner = Gateway::start(config)
            .map_err(|e| PyOSError::new_err(format!("gateway failed to start: {e}")))?;
        Ok(Self {
            inner,
            in_flight: Mutex::new(None),
        })
    }

    #[getter]
    fn port(&self) -> u16 {
        self.inner.local_addr().port()
    }

    /// Waits (without the GIL) for events; `None` once the gateway is shut down.
    fn next_batch(
        &self,
        py: Python<'_>,
        max_events: usize,
        timeout_ms: u64,
    ) -> PyResult<Option<Vec<Py<PyAny>>>> {
        if self.in_flight.lock().is_some() {
            return Err(PyRuntimeError::new_err(
                "complete_batch() the previous batch first",
            ));
        }
        let batch = py.detach(|| {
            self.inner
                .next_batch(max_events.max(1), Duration::from_millis(timeout_ms))
        });
        if batch.is_empty() && !self.inner.is_running() {
            return Ok(None);
        }
        let out = match batch
            .iter()
            .map(|ev| values::event_to_python(py, ev))
            .collect::<PyResult<Vec<_>>>()
        {
            Ok(out) => out,
            Err(e) => {
                // The batch cannot reach the engine: its senders hear so now.
                let error = FrameError::new(ErrorCode::Internal, format!("engine batch: {e}"));
                for ev in batch {
                    self.inner.abandon(ev, &error);
                }
                return Err(e);
            }
        };
        if !batch.is_empty() {
            *self.in_flight.lock() = Some(batch);
        }
        Ok(Some(out))
    }

    /// Hands back one result per event of the last batch. Acks and fan-out
    /// run on the gateway's fan-out thread; REST tickets it completes come
    /// from `take_tickets`.
    fn complete_batch(&self, py: Python<'_>, results: Vec<Bound<'_, PyAny>>) -> PyResult<()> {
        let batch = self
            .in_flight
            .lock()
            .take()
            .ok_or_else(|| PyRuntimeError::new_err("no batch in flight"))?;
        let mut converted = Vec::with_capacity(batch.len());
        for i in 0..batch.len() {
            converted.push(match results.get(i) {
                Some(r) => match values::extract_result(r) {
                    Ok(r) => r,
                    Err(e) => EngineResult::Failed(FrameError::new(
                        ErrorCode::Internal,
                        format!("engine result: {e}"),
                    )),
                },
                None => EngineResult::Failed(FrameError::new(
                    ErrorCode::Internal,
                    "engine returned too few results",
                )),
            });
        }
        py.detach(|| self.inner.complete(batch, converted));
        Ok(())
    }

    /// What REST tickets got since the last call: `(ticket, Acked | PointerMoved | Failed)`.
    fn take_tickets(&self, py: Python<'_>) -> PyResult<Vec<(u64, Py<PyAny>)>> {
        self.inner
            .take_tickets()
            .into_iter()
            .map(|(t, outcome)| Ok((t, values::ticket_to_python(py, outcome)?)))
            .collect()
    }

    /// REST send; returns the ack if already acked, `None` if the ticket completes
    /// later. Raises GatewayError(code, message).
    #[pyo3(signature = (ticket, user_id, chat_id, client_msg_id, content, attachments))]
    #[allow(clippy::too_many_arguments)]
    fn submit_send(
        &self,
        py: Python<'_>,
        ticket: u64,
        user_id: &str,
        chat_id: String,
        client_msg_id: String,
        content: String,
        attachments: Vec<String>,
    ) -> PyResult<Option<Py<values::Acked>>> {
        let send = SendFrame {
            chat_id,
            client_msg_id,
            content,
            attachments,
        };
        match self.inner.submit_send(ticket, user_id, send) {
            Ok(Some(ack)) => Ok(Some(values::acked(py, &ack)?)),
            Ok(None) => Ok(None),
            Err(e) => Err(gateway_error(e)),
        }
    }

    fn submit_pointer(
        &self,
        ticket: u64,
        user_id: &str,
        chat_id: &str,
        kind: &str,
        seq: u64,
    ) -> PyResult<()> {
        let kind = match kind {
            "read" => PointerKind::Read,
            "delivered" => PointerKind::Delivered,
            _ => return Err(PyValueError::new_err("kind must be 'read' or 'delivered'")),
        };
        self.inner
            .submit_pointer(ticket, user_id, chat_id, kind, seq)
            .map_err(gateway_error)
    }

    /// Replaces a chat's members in the gateway's cache; direct chats also link presence partners.
    /// Replaces a chat's members, unless the gateway holds a newer `version` of them (the log
    /// offset of their last change; None, a change from outside the log, always applies).
    /// Whether it did.
    #[pyo3(signature = (chat_id, members, direct=false, version=None))]
    fn set_chat_members(
        &self,
        chat_id: &str,
        members: Vec<String>,
        direct: bool,
        version: Option<i64>,
    ) -> bool {
        let members: Vec<UserId> = members.into_iter().map(UserId::from).collect();
        let version = version.unwrap_or(crate::membership::UNVERSIONED);
        self.inner
            .hub()
            .set_chat(chat_id.into(), members, direct, version)
    }

    fn remove_chat(&self, chat_id: &str) {
        self.inner.hub().remove_chat(chat_id);
    }

    /// Upgrades wait for the plugins' `on_connect` verdict (a `ConnectEvent` in the engine's
    /// batches), kept per user this long; 0 turns the gate off.
    fn set_connect_gate(&self, ttl_ms: u64) {
        self.inner.hub().connect_gate.set_ttl(ttl_ms);
    }

    /// (online, last_seen) as this node knows it, given the stored last_seen.
    #[pyo3(signature = (user_id, stored_last_seen=None))]
    fn presence_of(&self, user_id: &str, stored_last_seen: Option<u64>) -> (bool, Option<u64>) {
        self.inner.hub().presence_view(user_id, stored_last_seen)
    }

    /// Sends a ready-made JSON frame to every connection of these users.
    fn push_to_users(&self, user_ids: Vec<String>, frame: String) {
        let users: Vec<UserId> = user_ids.into_iter().map(UserId::from).collect();
        self.inner
            .hub()
            .push_to_users(&users, &bytes::Bytes::from(frame));
    }

    fn is_online(&self, user_id: &str) -> bool {
        self.inner.hub().registry.is_online(user_id)
    }

    fn connection_count(&self) -> usize {
        self.inner.hub().registry.connection_count()
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let hub = self.inner.hub();
        let mut counters = hub.counters.snapshot();
        if let Some(link) = &hub.cluster {
            // Typing and receipt frames for other nodes dropped while the cluster layer lagged.
            let dropped = link.dropped.load(std::sync::atomic::Ordering::Relaxed);
            counters.push(("cluster_frames_dropped", dropped));
        }
        counters
    }

    /// Hands one page of a connection's `sync` backlog to it: rows are `(chat_id, seq,
    /// message_id, sender_id, content, attachments_json, created_at, client_msg_id)`, each
    /// chat's in seq order. "queued", "full" (no room now: hand the same page again later)
    /// or "closed" (stop).
    fn sync_rows(
        &self,
        py: Python<'_>,
        conn: u64,
        rows: Vec<BacklogTuple>,
    ) -> PyResult<&'static str> {
        let backlog = backlog_rows(rows)?;
        Ok(match py.detach(|| self.inner.sync_rows(conn, &backlog)) {
            SyncPush::Queued => "queued",
            SyncPush::Full => "full",
            SyncPush::Closed => "closed",
        })
    }

    /// Messages another node stored, fanned out to the members connected here like local ones
    /// (see `Hub::deliver_stored`): rows as for `sync_rows`, each chat's in seq order. Returns
    /// the gaps met, `(chat_id, after, before)`: the caller reads seqs `after + 1 .. before`
    /// from the store and hands them over, then that chat's rows from `before` again.
    fn deliver_stored(
        &self,
        py: Python<'_>,
        rows: Vec<BacklogTuple>,
    ) -> PyResult<Vec<(String, u64, u64)>> {
        let rows = backlog_rows(rows)?;
        let gaps = py.detach(|| self.inner.deliver_stored(&rows));
        Ok(gaps
            .into_iter()
            .map(|g| (g.chat_id, g.after, g.before))
            .collect())
    }

    /// `(chat_id, last seq fanned out here)` for every chat with a member connected here (see
    /// `Hub::fanned_out_heads`).
    fn fanned_out_heads(&self, py: Python<'_>) -> Vec<(String, u64)> {
        py.detach(|| self.inner.hub().fanned_out_heads())
            .into_iter()
            .map(|(chat, seq)| (chat.to_string(), seq))
            .collect()
    }

    /// Sends another node's sequencer answered without a new message: `(sender_id, chat_id,
    /// client_msg_id, ack, error)` with `ack` = `(message_id, seq, created_at)` for a retry the
    /// store knew, or `error` = `(code, message)` for a refusal. Their waiters here get it.
    fn answer_sends(&self, py: Python<'_>, answers: Vec<RemoteAnswer>) -> PyResult<()> {
        let out = answers
            .into_iter()
            .map(remote_answer)
            .collect::<PyResult<Vec<_>>>()?;
        py.detach(|| self.inner.answer_sends(out));
        Ok(())
    }

    /// The sequenced stream, in its order (see `Hub::apply_sequenced`): `("members", (chat_id,
    /// members, direct, version, tell, frame))` for a chat's members after a change at `version`
    /// (its `chat` frame, bytes or None, to the connections here of the users in `tell`),
    /// `("row", row)` for a stored message (rows as for `sync_rows`), `("answer", answer)` for a
    /// send answered without one (as for `answer_sends`). Returns the gaps met, as
    /// `deliver_stored` does.
    fn apply_sequenced(
        &self,
        py: Python<'_>,
        items: Vec<(String, Bound<'_, PyAny>)>,
    ) -> PyResult<Vec<(String, u64, u64)>> {
        let mut out = Vec::with_capacity(items.len());
        for (kind, item) in items {
            out.push(match kind.as_str() {
                "members" => {
                    let (chat, members, direct, version, tell, frame): MembersTuple =
                        item.extract()?;
                    Sequenced::Members {
                        chat: chat.as_str().into(),
                        members: members.into_iter().map(UserId::from).collect(),
                        direct,
                        version: version.unwrap_or(crate::membership::UNVERSIONED),
                        tell: tell.into_iter().map(UserId::from).collect(),
                        frame: frame.map(bytes::Bytes::from),
                    }
                }
                "row" => {
                    let row: BacklogTuple = item.extract()?;
                    Sequenced::Row(backlog_rows(vec![row])?.remove(0))
                }
                "answer" => {
                    let (key, outcome) = remote_answer(item.extract()?)?;
                    Sequenced::Answer { key, outcome }
                }
                other => {
                    return Err(PyValueError::new_err(format!(
                        "unknown sequenced item {other:?}"
                    )))
                }
            });
        }
        let gaps = py.detach(|| self.inner.apply_sequenced(out));
        Ok(gaps
            .into_iter()
            .map(|g| (g.chat_id, g.after, g.before))
            .collect())
    }

    /// What other nodes must hear, waiting up to `timeout_ms` when nothing is queued (empty on
    /// a single node): `("chat", chat_id, user_id, frame)` for a chat's members elsewhere but
    /// that user, `("presence", user_id, online, at)` for this node's presence changes.
    fn take_cluster_events(&self, py: Python<'_>, timeout_ms: u64) -> PyResult<Vec<Py<PyAny>>> {
        let Some(link) = &self.inner.hub().cluster else {
            return Ok(Vec::new());
        };
        let events = py.detach(|| link.take(Duration::from_millis(timeout_ms)));
        events
            .into_iter()
            .map(|ev| {
                Ok(match ev {
                    ClusterEvent::ChatFrame { chat, user, frame } => (
                        "chat",
                        &*chat,
                        &*user,
                        std::str::from_utf8(&frame).unwrap_or("{}"),
                    )
                        .into_pyobject(py)?
                        .into_any()
                        .unbind(),
                    ClusterEvent::Presence { user, online, at } => ("presence", &*user, online, at)
                        .into_pyobject(py)?
                        .into_any()
                        .unbind(),
                })
            })
            .collect()
    }

    /// The cluster's word on a user's presence; followers connected here hear of a change.
    fn cluster_presence(&self, user_id: &str, online: bool, last_seen: u64) {
        self.inner
            .hub()
            .cluster_presence(&user_id.into(), online, last_seen);
    }

    /// A frame another node relayed for a chat: to its members connected here but `skip_user_id`.
    #[pyo3(signature = (chat_id, frame, skip_user_id=None))]
    fn push_to_chat(&self, chat_id: &str, frame: String, skip_user_id: Option<&str>) {
        self.inner
            .hub()
            .push_to_chat(chat_id, skip_user_id, &bytes::Bytes::from(frame));
    }

    /// The chat's members as this node's cache has them (None: unknown chat).
    fn chat_members(&self, chat_id: &str) -> Option<Vec<String>> {
        let (_, members) = self.inner.hub().members.get(chat_id)?;
        Some(members.list.iter().map(|u| u.to_string()).collect())
    }

    /// Answers a deferred `presence.subscribe`: (user_id, may follow, stored last_seen) each.
    fn presence_answer(&self, py: Python<'_>, conn: u64, info: Vec<(String, bool, Option<u64>)>) {
        py.detach(|| {
            self.inner
                .hub()
                .complete_presence_query(conn, EngineResult::PresenceInfo(info))
        });
    }

    /// Answers a deferred `presence.subscribe` with an error frame.
    fn presence_failed(&self, conn: u64, code: &str, message: String) {
        let code = ErrorCode::parse(code).unwrap_or(ErrorCode::Internal);
        self.inner
            .hub()
            .complete_presence_query(conn, EngineResult::Failed(FrameError::new(code, message)));
    }

    /// Ends a connection's `sync` answer with `synced` (each chat's last seq).
    #[pyo3(signature = (conn, reference, chats))]
    fn sync_end(&self, conn: u64, reference: Option<&str>, chats: Vec<(String, u64)>) {
        self.inner.sync_end(conn, reference, &chats);
    }

    /// Ends a connection's `sync` answer with an error frame.
    #[pyo3(signature = (conn, reference, code, message))]
    fn sync_failed(&self, conn: u64, reference: Option<&str>, code: &str, message: String) {
        let code = ErrorCode::parse(code).unwrap_or(ErrorCode::Internal);
        self.inner
            .sync_failed(conn, reference, FrameError::new(code, message));
    }

    fn shutdown(&self, py: Python<'_>) {
        py.detach(|| self.inner.shutdown());
    }
}

/// A send another node's sequencer answered, as the hub takes it (see `answer_sends`).
fn remote_answer(
    (sender, chat, client_msg_id, ack, error): RemoteAnswer,
) -> PyResult<(IdemKey, Result<Arc<protocol::Ack>, FrameError>)> {
    let outcome = match (ack, error) {
        (Some((message_id, seq, created_at)), _) => Ok(Arc::new(protocol::Ack {
            client_msg_id: client_msg_id.clone(),
            chat_id: chat.clone(),
            message_id,
            seq,
            created_at,
            // The store's original ack: what it stored is not known here.
            rewritten: None,
        })),
        (None, Some((code, message))) => {
            let code = ErrorCode::parse(&code).unwrap_or(ErrorCode::Internal);
            let mut error = FrameError::new(code, message);
            if code == ErrorCode::Unavailable {
                error.retry_after_ms = Some(values::UNAVAILABLE_RETRY_MS);
            }
            Err(error)
        }
        (None, None) => return Err(PyValueError::new_err("an answer needs an ack or an error")),
    };
    let key = IdemKey {
        sender: sender.as_str().into(),
        chat: chat.as_str().into(),
        client_msg_id: client_msg_id.as_str().into(),
    };
    Ok((key, outcome))
}

/// See `PyGateway::apply_sequenced`.
type MembersTuple = (
    String,
    Vec<String>,
    bool,
    Option<i64>,
    Vec<String>,
    Option<Vec<u8>>,
);

/// See `PyGateway::answer_sends`.
type RemoteAnswer = (
    String,
    String,
    String,
    Option<(String, u64, u64)>,
    Option<(String, String)>,
);

type BacklogTuple = (
    String,
    u64,
    String,
    String,
    String,
    String,
    u64,
    Option<String>,
);

/// Signs a token for `user_id` valid until `expires_at_ms`.
#[pyfunction]
fn sign_token(secret: &[u8], user_id: &str, expires_at_ms: u64) -> PyResult<String> {
    if user_id.is_empty() || user_id.contains('.') {
        return Err(PyValueError::new_err(
            "user_id must be non-empty and contain no '.'",
        ));
    }
    Ok(TokenVerifier::new(secret).sign(user_id, expires_at_ms))
}

/// Returns the token's user id; raises TokenError if it is malformed, badly signed or expired.
#[pyfunction]
fn verify_token(secret: &[u8], token: &str, now_ms: u64) -> PyResult<String> {
    TokenVerifier::new(secret)
        .verify(token, now_ms)
        .map_err(|e| TokenError::new_err(e.to_string()))
}

/// Every gateway setting's default, by the name Python's configuration gives it.
#[pyfunction]
fn gateway_defaults(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    gateway_setting_defaults(py)
}

/// The defaults of the frame limits the gateway enforces.
#[pyfunction]
fn frame_limit_defaults(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    limit_defaults(py)
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyGateway>()?;
    values::add_classes(m)?;
    m.add_function(wrap_pyfunction!(gateway_defaults, m)?)?;
    m.add_function(wrap_pyfunction!(frame_limit_defaults, m)?)?;
    m.add(
        "ERROR_CODES",
        ErrorCode::ALL.map(ErrorCode::as_str).to_vec(),
    )?;
    let status = PyDict::new(m.py());
    for code in ErrorCode::ALL {
        status.set_item(code.as_str(), code.http_status())?;
    }
    m.add("ERROR_STATUS", status)?;
    m.add("UNAVAILABLE_RETRY_MS", values::UNAVAILABLE_RETRY_MS)?;
    m.add_function(wrap_pyfunction!(sign_token, m)?)?;
    m.add_function(wrap_pyfunction!(verify_token, m)?)?;
    m.add("GatewayError", m.py().get_type::<GatewayError>())?;
    m.add("TokenError", m.py().get_type::<TokenError>())?;
    Ok(())
}
