//! The values that cross the bridge, as small frozen Python classes instead of tuples
//! tagged with strings: one class per engine event (made here, read by Python) and per
//! result (made by Python, read here). Strings are kept as Python objects, so reading a
//! field costs no conversion.

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};
use serde_json::value::RawValue;

use crate::hub::{EngineEvent, EngineResult, TicketOutcome};
use crate::protocol::{ErrorCode, FrameError};

use super::raw_json;

/// A `send` to store.
#[pyclass(frozen, get_all, module = "pychat._core")]
pub struct SendEvent {
    sender_id: Py<PyString>,
    chat_id: Py<PyString>,
    client_msg_id: Py<PyString>,
    content: Py<PyString>,
    attachments: Py<PyList>,
}

/// A delivered or read pointer to move up.
#[pyclass(frozen, get_all, module = "pychat._core")]
pub struct PointerEvent {
    user_id: Py<PyString>,
    chat_id: Py<PyString>,
    /// "delivered" or "read".
    kind: &'static str,
    seq: u64,
}

/// A connection's `sync`: answered by streaming (`Gateway.sync_rows`, `sync_end`).
#[pyclass(frozen, get_all, module = "pychat._core")]
pub struct SyncEvent {
    user_id: Py<PyString>,
    /// The client's cursor per chat.
    since: Py<PyDict>,
    conn: u64,
    reference: Option<Py<PyString>>,
}

/// A user's last_seen to record.
#[pyclass(frozen, get_all, module = "pychat._core")]
pub struct SeenEvent {
    user_id: Py<PyString>,
    at: u64,
}

/// An upgrade of `user_id` waits for the plugins' `on_connect` verdict (`Done` or `Failed`).
#[pyclass(frozen, get_all, module = "pychat._core")]
pub struct ConnectEvent {
    user_id: Py<PyString>,
    address: Py<PyString>,
    origin: Option<Py<PyString>>,
}

/// `presence.subscribe`: which of `user_ids` may `viewer_id` follow.
#[pyclass(frozen, get_all, module = "pychat._core")]
pub struct PresenceQuery {
    conn: u64,
    viewer_id: Py<PyString>,
    user_ids: Py<PyList>,
}

fn s(py: Python<'_>, text: &str) -> Py<PyString> {
    PyString::new(py, text).unbind()
}

/// An engine event as its Python class.
pub fn event_to_python(py: Python<'_>, ev: &EngineEvent) -> PyResult<Py<PyAny>> {
    Ok(match ev {
        EngineEvent::Send {
            key,
            content,
            attachments,
            ..
        } => Py::new(
            py,
            SendEvent {
                sender_id: s(py, &key.sender),
                chat_id: s(py, &key.chat),
                client_msg_id: s(py, &key.client_msg_id),
                content: s(py, content),
                attachments: PyList::new(py, attachments)?.unbind(),
            },
        )?
        .into_any(),
        EngineEvent::Pointer {
            user,
            chat,
            kind,
            seq,
            ..
        } => Py::new(
            py,
            PointerEvent {
                user_id: s(py, user),
                chat_id: s(py, chat),
                kind: kind.as_str(),
                seq: *seq,
            },
        )?
        .into_any(),
        EngineEvent::Sync {
            conn,
            user,
            since,
            reference,
        } => {
            let cursors = PyDict::new(py);
            for (chat, seq) in since {
                cursors.set_item(chat, seq)?;
            }
            Py::new(
                py,
                SyncEvent {
                    user_id: s(py, user),
                    since: cursors.unbind(),
                    conn: *conn,
                    reference: reference.as_deref().map(|r| s(py, r)),
                },
            )?
            .into_any()
        }
        EngineEvent::Seen { user, at } => Py::new(
            py,
            SeenEvent {
                user_id: s(py, user),
                at: *at,
            },
        )?
        .into_any(),
        EngineEvent::PresenceQuery {
            conn,
            user,
            user_ids,
        } => Py::new(
            py,
            PresenceQuery {
                conn: *conn,
                viewer_id: s(py, user),
                user_ids: PyList::new(py, user_ids)?.unbind(),
            },
        )?
        .into_any(),
        EngineEvent::Connect {
            user,
            address,
            origin,
        } => Py::new(
            py,
            ConnectEvent {
                user_id: s(py, user),
                address: s(py, address),
                origin: origin.as_deref().map(|o| s(py, o)),
            },
        )?
        .into_any(),
    })
}

/// A send is stored (now, or before: `duplicate`), with what was stored.
#[pyclass(frozen, get_all, module = "pychat._core")]
pub struct Stored {
    message_id: Py<PyString>,
    seq: u64,
    created_at: u64,
    content: Py<PyString>,
    /// The attachment objects as a JSON array.
    attachments: Py<PyString>,
    duplicate: bool,
}

#[pymethods]
impl Stored {
    #[new]
    fn new(
        message_id: Py<PyString>,
        seq: u64,
        created_at: u64,
        content: Py<PyString>,
        attachments: Py<PyString>,
        duplicate: bool,
    ) -> Self {
        Self {
            message_id,
            seq,
            created_at,
            content,
            attachments,
            duplicate,
        }
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        format!(
            "Stored(message_id={}, seq={}, duplicate={})",
            self.message_id.bind(py),
            self.seq,
            self.duplicate
        )
    }
}

/// A pointer move: the pointers after it, and which one moved.
#[pyclass(frozen, get_all, module = "pychat._core")]
pub struct PointerMoved {
    delivered: u64,
    read: u64,
    moved_delivered: bool,
    moved_read: bool,
}

#[pymethods]
impl PointerMoved {
    #[new]
    #[pyo3(signature = (delivered, read, moved_delivered=false, moved_read=false))]
    fn new(delivered: u64, read: u64, moved_delivered: bool, moved_read: bool) -> Self {
        Self {
            delivered,
            read,
            moved_delivered,
            moved_read,
        }
    }
}

/// A refused event, with a PROTOCOL.md error code (and when to retry: `unavailable`
/// says 1 s unless told otherwise).
#[pyclass(frozen, get_all, module = "pychat._core")]
pub struct Failed {
    code: Py<PyString>,
    message: Py<PyString>,
    retry_after_ms: Option<u64>,
}

/// What an `unavailable` answer tells the client to wait when nothing better is known
/// (REST's answers too: `pychat.errors` reads it from here).
pub const UNAVAILABLE_RETRY_MS: u64 = 1_000;

#[pymethods]
impl Failed {
    #[new]
    #[pyo3(signature = (code, message, retry_after_ms=None))]
    fn new(
        code: &Bound<'_, PyString>,
        message: Py<PyString>,
        retry_after_ms: Option<u64>,
    ) -> PyResult<Self> {
        let parsed = ErrorCode::parse(code.to_str()?)
            .ok_or_else(|| PyTypeError::new_err(format!("unknown error code {code}")))?;
        let retry_after_ms =
            retry_after_ms.or((parsed == ErrorCode::Unavailable).then_some(UNAVAILABLE_RETRY_MS));
        Ok(Self {
            code: code.clone().unbind(),
            message,
            retry_after_ms,
        })
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        format!("Failed({}, {})", self.code.bind(py), self.message.bind(py))
    }
}

/// Done, nothing to tell (a last_seen recorded).
#[pyclass(frozen, module = "pychat._core")]
pub struct Done;

#[pymethods]
impl Done {
    #[new]
    fn new() -> Self {
        Self
    }
}

/// The answer comes later by other calls (a sync is streamed).
#[pyclass(frozen, module = "pychat._core")]
pub struct Deferred;

#[pymethods]
impl Deferred {
    #[new]
    fn new() -> Self {
        Self
    }
}

/// The answer to a `PresenceQuery`: (user_id, may follow, stored last_seen) each.
#[pyclass(frozen, get_all, module = "pychat._core")]
pub struct PresenceInfo {
    users: Py<PyList>,
}

#[pymethods]
impl PresenceInfo {
    #[new]
    fn new(users: Py<PyList>) -> Self {
        Self { users }
    }
}

fn owned(py: Python<'_>, text: &Py<PyString>) -> PyResult<String> {
    Ok(text.bind(py).to_str()?.to_owned())
}

/// A result object made by the engine, as the hub's result.
pub fn extract_result(r: &Bound<'_, PyAny>) -> PyResult<EngineResult> {
    let py = r.py();
    if let Ok(x) = r.cast::<Stored>() {
        let x = x.get();
        let attachments: Box<RawValue> = raw_json(owned(py, &x.attachments)?)?;
        return Ok(EngineResult::Stored {
            message_id: owned(py, &x.message_id)?,
            seq: x.seq,
            created_at: x.created_at,
            content: owned(py, &x.content)?,
            attachments,
            duplicate: x.duplicate,
        });
    }
    if let Ok(x) = r.cast::<PointerMoved>() {
        let x = x.get();
        return Ok(EngineResult::PointerMoved {
            delivered: x.delivered,
            read: x.read,
            moved_delivered: x.moved_delivered,
            moved_read: x.moved_read,
        });
    }
    if let Ok(x) = r.cast::<Failed>() {
        let x = x.get();
        let code = ErrorCode::parse(x.code.bind(py).to_str()?).unwrap_or(ErrorCode::Internal);
        let mut error = FrameError::new(code, owned(py, &x.message)?);
        error.retry_after_ms = x.retry_after_ms;
        return Ok(EngineResult::Failed(error));
    }
    if r.cast::<Done>().is_ok() {
        return Ok(EngineResult::Done);
    }
    if r.cast::<Deferred>().is_ok() {
        return Ok(EngineResult::Deferred);
    }
    if let Ok(x) = r.cast::<PresenceInfo>() {
        let info: Vec<(String, bool, Option<u64>)> = x.get().users.bind(py).extract()?;
        return Ok(EngineResult::PresenceInfo(info));
    }
    Err(PyTypeError::new_err(format!(
        "not an engine result: {}",
        r.get_type().name()?
    )))
}

/// What a REST ticket got: its ack, its pointers, or its error.
#[pyclass(frozen, get_all, module = "pychat._core")]
pub struct Acked {
    message_id: Py<PyString>,
    seq: u64,
    created_at: u64,
    /// What was stored, when a plugin changed the send (else None); attachments as JSON.
    content: Option<Py<PyString>>,
    attachments: Option<Py<PyString>>,
}

pub fn acked(py: Python<'_>, ack: &crate::protocol::Ack) -> PyResult<Py<Acked>> {
    let rewritten = ack.rewritten.as_deref();
    Py::new(
        py,
        Acked {
            message_id: s(py, &ack.message_id),
            seq: ack.seq,
            created_at: ack.created_at,
            content: rewritten.map(|r| s(py, &r.content)),
            attachments: rewritten.map(|r| s(py, r.attachments.get())),
        },
    )
}

pub fn ticket_to_python(py: Python<'_>, outcome: TicketOutcome) -> PyResult<Py<PyAny>> {
    Ok(match outcome {
        TicketOutcome::Ack(ack) => acked(py, &ack)?.into_any(),
        TicketOutcome::Pointer { delivered, read } => {
            Py::new(py, PointerMoved::new(delivered, read, false, false))?.into_any()
        }
        TicketOutcome::Failed(e) => Py::new(
            py,
            Failed {
                code: s(py, e.code.as_str()),
                message: s(py, &e.message),
                retry_after_ms: e.retry_after_ms,
            },
        )?
        .into_any(),
    })
}

pub fn add_classes(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<SendEvent>()?;
    m.add_class::<PointerEvent>()?;
    m.add_class::<SyncEvent>()?;
    m.add_class::<SeenEvent>()?;
    m.add_class::<PresenceQuery>()?;
    m.add_class::<ConnectEvent>()?;
    m.add_class::<Stored>()?;
    m.add_class::<PointerMoved>()?;
    m.add_class::<Failed>()?;
    m.add_class::<Done>()?;
    m.add_class::<Deferred>()?;
    m.add_class::<PresenceInfo>()?;
    m.add_class::<Acked>()?;
    Ok(())
}
