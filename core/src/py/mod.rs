//! The PyO3 glue: converts between Python tuples and the gateway's types.
//! No logic lives here.

use std::time::Duration;

use parking_lot::Mutex;
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use serde_json::value::RawValue;

use crate::gateway::{Gateway, GatewayConfig};
use crate::hub::{BacklogRow, EngineEvent, EngineResult, SidePathConfig, TicketOutcome};
use crate::protocol::{Ack, ErrorCode, FrameError, Limits, PointerKind, SendFrame};
use crate::sequencer::UserId;
use crate::token::TokenVerifier;

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

fn raw_json(text: String) -> PyResult<Box<RawValue>> {
    RawValue::from_string(text)
        .map_err(|e| PyValueError::new_err(format!("attachments must be JSON: {e}")))
}

fn ack_tuple(ack: &Ack) -> (&'static str, String, u64, u64) {
    ("ack", ack.message_id.clone(), ack.seq, ack.created_at)
}

/// The running WebSocket gateway (see `pychat._core.pyi`).
#[pyclass(name = "Gateway", frozen, module = "pychat._core")]
struct PyGateway {
    inner: Gateway,
    in_flight: Mutex<Option<Vec<EngineEvent>>>,
}

#[pymethods]
impl PyGateway {
    #[new]
    #[pyo3(signature = (*, host, port, secret, heartbeat_s=25, queue_capacity=4096, read_buffer_bytes=4096,
        runtime_threads=2, engine_queue_capacity=16384, window_capacity=1_000_000, window_ttl_s=86400,
        max_bad_frames=20, max_frame_bytes=262144, max_content_bytes=65536, max_attachments=10,
        max_subscribe=1000, typing_ttl_ms=6000, typing_min_interval_ms=2000, presence_grace_ms=5000,
        tick_ms=200, upgrades_per_s=2000.0, upgrade_burst=4000.0, max_connections=0, send_per_s=200.0,
        send_burst=400.0, allowed_origins=Vec::new()))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        host: String,
        port: u16,
        secret: Vec<u8>,
        heartbeat_s: u64,
        queue_capacity: usize,
        read_buffer_bytes: usize,
        runtime_threads: usize,
        engine_queue_capacity: usize,
        window_capacity: usize,
        window_ttl_s: u64,
        max_bad_frames: u32,
        max_frame_bytes: usize,
        max_content_bytes: usize,
        max_attachments: usize,
        max_subscribe: usize,
        typing_ttl_ms: u64,
        typing_min_interval_ms: u64,
        presence_grace_ms: u64,
        tick_ms: u64,
        upgrades_per_s: f64,
        upgrade_burst: f64,
        max_connections: usize,
        send_per_s: f64,
        send_burst: f64,
        allowed_origins: Vec<String>,
    ) -> PyResult<Self> {
        if secret.len() < 16 {
            return Err(PyValueError::new_err("secret must be at least 16 bytes"));
        }
        let config = GatewayConfig {
            host,
            port,
            secret,
            heartbeat_s,
            queue_capacity,
            read_buffer_bytes,
            runtime_threads,
            engine_queue_capacity,
            window_capacity,
            window_ttl_ms: window_ttl_s.saturating_mul(1000),
            max_bad_frames,
            limits: Limits {
                max_frame_bytes,
                max_content_bytes,
                max_attachments,
                max_subscribe,
                ..Limits::default()
            },
            side_paths: SidePathConfig {
                typing_ttl_ms,
                typing_min_interval_ms,
                presence_grace_ms,
            },
            tick_ms,
            upgrades_per_s,
            upgrade_burst,
            max_connections,
            send_per_s,
            send_burst,
            allowed_origins,
        };
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
        let mut out = Vec::with_capacity(batch.len());
        for ev in &batch {
            let obj = match ev {
                EngineEvent::Send {
                    key,
                    content,
                    attachments,
                    ..
                } => (
                    "send",
                    &*key.sender,
                    &*key.chat,
                    &*key.client_msg_id,
                    content.as_str(),
                    attachments.clone(),
                )
                    .into_pyobject(py)?
                    .into_any()
                    .unbind(),
                EngineEvent::Pointer {
                    user,
                    chat,
                    kind,
                    seq,
                    ..
                } => (kind.as_str(), &**user, &**chat, *seq)
                    .into_pyobject(py)?
                    .into_any()
                    .unbind(),
                EngineEvent::Sync { user, since, .. } => ("sync", &**user, since.clone())
                    .into_pyobject(py)?
                    .into_any()
                    .unbind(),
                EngineEvent::Seen { user, at } => ("seen", &**user, *at)
                    .into_pyobject(py)?
                    .into_any()
                    .unbind(),
                EngineEvent::PresenceQuery { user, user_ids, .. } => {
                    ("presence.query", &**user, user_ids.clone())
                        .into_pyobject(py)?
                        .into_any()
                        .unbind()
                }
            };
            out.push(obj);
        }
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
                Some(r) => match extract_result(r) {
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

    /// What REST tickets got since the last call: `(ticket, ("ack", message_id,
    /// seq, created_at) | ("pointer", delivered, read) | ("error", code, message))`.
    fn take_tickets(&self, py: Python<'_>) -> PyResult<Vec<(u64, Py<PyAny>)>> {
        self.inner
            .take_tickets()
            .into_iter()
            .map(|(t, outcome)| {
                let obj = match outcome {
                    TicketOutcome::Ack(ack) => {
                        ack_tuple(&ack).into_pyobject(py)?.into_any().unbind()
                    }
                    TicketOutcome::Pointer { delivered, read } => ("pointer", delivered, read)
                        .into_pyobject(py)?
                        .into_any()
                        .unbind(),
                    TicketOutcome::Failed(e) => ("error", e.code.as_str(), e.message)
                        .into_pyobject(py)?
                        .into_any()
                        .unbind(),
                };
                Ok((t, obj))
            })
            .collect()
    }

    /// REST send; returns the ack tuple if already acked, `None` if the ticket
    /// completes later. Raises GatewayError(code, message).
    #[pyo3(signature = (ticket, user_id, chat_id, client_msg_id, content, attachments))]
    fn submit_send(
        &self,
        ticket: u64,
        user_id: &str,
        chat_id: String,
        client_msg_id: String,
        content: String,
        attachments: Vec<String>,
    ) -> PyResult<Option<(&'static str, String, u64, u64)>> {
        let send = SendFrame {
            chat_id,
            client_msg_id,
            content,
            attachments,
        };
        match self.inner.submit_send(ticket, user_id, send) {
            Ok(Some(ack)) => Ok(Some(ack_tuple(&ack))),
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
    #[pyo3(signature = (chat_id, members, direct=false))]
    fn set_chat_members(&self, chat_id: &str, members: Vec<String>, direct: bool) {
        let members: Vec<UserId> = members.into_iter().map(UserId::from).collect();
        self.inner.hub().set_chat(chat_id.into(), members, direct);
    }

    fn remove_chat(&self, chat_id: &str) {
        self.inner.hub().remove_chat(chat_id);
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
        self.inner.hub().counters.snapshot()
    }

    fn shutdown(&self, py: Python<'_>) {
        py.detach(|| self.inner.shutdown());
    }
}

fn extract_result(r: &Bound<'_, PyAny>) -> PyResult<EngineResult> {
    let tag: String = r.get_item(0)?.extract()?;
    Ok(match tag.as_str() {
        "stored" => {
            let (_, message_id, seq, created_at, attachments, duplicate): (
                String,
                String,
                u64,
                u64,
                String,
                bool,
            ) = r.extract()?;
            EngineResult::Stored {
                message_id,
                seq,
                created_at,
                attachments: raw_json(attachments)?,
                duplicate,
            }
        }
        "pointer" => {
            let (_, delivered, read, moved_delivered, moved_read): (String, u64, u64, bool, bool) =
                r.extract()?;
            EngineResult::PointerMoved {
                delivered,
                read,
                moved_delivered,
                moved_read,
            }
        }
        "synced" => {
            type Row = (
                String,
                u64,
                String,
                String,
                String,
                String,
                u64,
                Option<String>,
            );
            let (_, rows, chats): (String, Vec<Row>, Vec<(String, u64)>) = r.extract()?;
            let mut backlog = Vec::with_capacity(rows.len());
            for (
                chat_id,
                seq,
                message_id,
                sender_id,
                content,
                attachments,
                created_at,
                client_msg_id,
            ) in rows
            {
                backlog.push(BacklogRow {
                    chat_id,
                    seq,
                    message_id,
                    sender_id,
                    content,
                    attachments: raw_json(attachments)?,
                    created_at,
                    client_msg_id,
                });
            }
            EngineResult::Synced { backlog, chats }
        }
        "ok" => EngineResult::Done,
        "presence" => {
            let (_, info): (String, Vec<(String, bool, Option<u64>)>) = r.extract()?;
            EngineResult::PresenceInfo(info)
        }
        "error" => {
            let (_, code, message): (String, String, String) = r.extract()?;
            let code = ErrorCode::parse(&code).unwrap_or(ErrorCode::Internal);
            EngineResult::Failed(FrameError::new(code, message))
        }
        other => {
            return Err(PyValueError::new_err(format!(
                "unknown result kind {other:?}"
            )))
        }
    })
}

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

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyGateway>()?;
    m.add_function(wrap_pyfunction!(sign_token, m)?)?;
    m.add_function(wrap_pyfunction!(verify_token, m)?)?;
    m.add("GatewayError", m.py().get_type::<GatewayError>())?;
    m.add("TokenError", m.py().get_type::<TokenError>())?;
    Ok(())
}
