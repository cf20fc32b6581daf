//! The WebSocket frame codec: parsing client frames with precise errors, and
//! encoding server frames once into shared bytes (see PROTOCOL.md).

use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// The error codes of PROTOCOL.md; `as_str` is the wire spelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    Conflict,
    TooLarge,
    RateLimited,
    Unavailable,
    Internal,
}

impl ErrorCode {
    /// Every code, in PROTOCOL.md's order (Python's error table is checked against it).
    pub const ALL: [Self; 9] = [
        Self::BadRequest,
        Self::Unauthorized,
        Self::Forbidden,
        Self::NotFound,
        Self::Conflict,
        Self::TooLarge,
        Self::RateLimited,
        Self::Unavailable,
        Self::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::Conflict => "conflict",
            Self::TooLarge => "too_large",
            Self::RateLimited => "rate_limited",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }

    /// The HTTP status a REST answer (or a refused upgrade) with this code carries.
    pub fn http_status(self) -> u16 {
        match self {
            Self::BadRequest => 400,
            Self::Unauthorized => 401,
            Self::Forbidden => 403,
            Self::NotFound => 404,
            Self::Conflict => 409,
            Self::TooLarge => 413,
            Self::RateLimited => 429,
            Self::Unavailable => 503,
            Self::Internal => 500,
        }
    }

    pub fn parse(code: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == code)
    }
}

/// A refused frame: the error frame's code, message and `ref`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    pub code: ErrorCode,
    pub message: String,
    pub reference: Option<String>,
    /// For `rate_limited`: when to try again.
    pub retry_after_ms: Option<u64>,
}

impl FrameError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            reference: None,
            retry_after_ms: None,
        }
    }

    pub fn rate_limited(retry_after_ms: u64) -> Self {
        Self {
            retry_after_ms: Some(retry_after_ms),
            ..Self::new(
                ErrorCode::RateLimited,
                format!("too many requests: retry in {retry_after_ms} ms"),
            )
        }
    }

    fn bad(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }

    pub fn with_ref(mut self, reference: Option<String>) -> Self {
        self.reference = reference;
        self
    }

    pub fn encode(&self) -> Bytes {
        #[derive(Serialize)]
        struct F<'a> {
            r#type: &'static str,
            code: &'static str,
            message: &'a str,
            r#ref: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            retry_after_ms: Option<u64>,
        }
        to_bytes(&F {
            r#type: "error",
            code: self.code.as_str(),
            message: &self.message,
            r#ref: self.reference.as_deref(),
            retry_after_ms: self.retry_after_ms,
        })
    }
}

/// Size limits applied to client frames (defaults are PROTOCOL.md's).
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_frame_bytes: usize,
    pub max_content_bytes: usize,
    pub max_attachments: usize,
    pub max_client_msg_id_bytes: usize,
    pub max_id_bytes: usize,
    pub max_sync_chats: usize,
    pub max_subscribe: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_bytes: 256 * 1024,
            max_content_bytes: 64 * 1024,
            max_attachments: 10,
            max_client_msg_id_bytes: 128,
            max_id_bytes: 128,
            max_sync_chats: 10_000,
            max_subscribe: 1_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PointerKind {
    Delivered,
    Read,
}

impl PointerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Delivered => "delivered",
            Self::Read => "read",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendFrame {
    pub chat_id: String,
    pub client_msg_id: String,
    pub content: String,
    pub attachments: Vec<String>,
}

/// A parsed, validated client frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientFrame {
    Send(SendFrame),
    Sync {
        since: Vec<(String, u64)>,
        /// Echoed in the `synced` frame (an addition to PROTOCOL.md) so a client can match answers.
        reference: Option<String>,
    },
    Pointer {
        chat_id: String,
        seq: u64,
        kind: PointerKind,
    },
    Typing {
        chat_id: String,
        start: bool,
    },
    PresenceSubscribe {
        user_ids: Vec<String>,
    },
}

fn take_string(
    obj: &mut Map<String, Value>,
    field: &str,
    max: usize,
) -> Result<String, FrameError> {
    match obj.remove(field) {
        Some(Value::String(s)) if s.is_empty() => {
            Err(FrameError::bad(format!("`{field}` must not be empty")))
        }
        Some(Value::String(s)) if s.len() > max => Err(FrameError::new(
            ErrorCode::TooLarge,
            format!("`{field}` is longer than {max} bytes"),
        )),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(FrameError::bad(format!("`{field}` must be a string"))),
        None => Err(FrameError::bad(format!("`{field}` is required"))),
    }
}

fn take_seq(obj: &mut Map<String, Value>, field: &str) -> Result<u64, FrameError> {
    match obj.remove(field) {
        Some(Value::Number(n)) => n
            .as_u64()
            .ok_or_else(|| FrameError::bad(format!("`{field}` must be a non-negative integer"))),
        Some(_) => Err(FrameError::bad(format!(
            "`{field}` must be a non-negative integer"
        ))),
        None => Err(FrameError::bad(format!("`{field}` is required"))),
    }
}

/// Parses one text frame. The error's `ref` is the frame's `client_msg_id` when it has one.
pub fn parse_client_frame(text: &str, limits: &Limits) -> Result<ClientFrame, FrameError> {
    if text.len() > limits.max_frame_bytes {
        return Err(FrameError::new(
            ErrorCode::TooLarge,
            format!("frame is larger than {} bytes", limits.max_frame_bytes),
        ));
    }
    let value: Value =
        serde_json::from_str(text).map_err(|e| FrameError::bad(format!("invalid JSON: {e}")))?;
    let Value::Object(mut obj) = value else {
        return Err(FrameError::bad("a frame must be a JSON object"));
    };
    let reference = match obj.get("client_msg_id") {
        Some(Value::String(s)) if s.len() <= limits.max_client_msg_id_bytes => Some(s.clone()),
        _ => None,
    };
    parse_object(&mut obj, limits).map_err(|e| e.with_ref(reference))
}

fn parse_object(obj: &mut Map<String, Value>, limits: &Limits) -> Result<ClientFrame, FrameError> {
    let kind = match obj.remove("type") {
        Some(Value::String(s)) => s,
        Some(_) => return Err(FrameError::bad("`type` must be a string")),
        None => return Err(FrameError::bad("`type` is required")),
    };
    match kind.as_str() {
        "send" => {
            let chat_id = take_string(obj, "chat_id", limits.max_id_bytes)?;
            let client_msg_id = take_string(obj, "client_msg_id", limits.max_client_msg_id_bytes)?;
            let content = match obj.remove("content") {
                Some(Value::String(s)) if s.len() > limits.max_content_bytes => {
                    return Err(FrameError::new(
                        ErrorCode::TooLarge,
                        format!(
                            "`content` is larger than {} bytes",
                            limits.max_content_bytes
                        ),
                    ))
                }
                Some(Value::String(s)) => s,
                Some(_) => return Err(FrameError::bad("`content` must be a string")),
                None => return Err(FrameError::bad("`content` is required")),
            };
            let attachments = match obj.remove("attachments") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Array(items)) => {
                    if items.len() > limits.max_attachments {
                        return Err(FrameError::new(
                            ErrorCode::TooLarge,
                            format!("at most {} attachments per message", limits.max_attachments),
                        ));
                    }
                    items
                        .into_iter()
                        .map(|v| match v {
                            Value::String(s) if !s.is_empty() && s.len() <= limits.max_id_bytes => {
                                Ok(s)
                            }
                            _ => Err(FrameError::bad("`attachments` must be a list of media ids")),
                        })
                        .collect::<Result<_, _>>()?
                }
                Some(_) => {
                    return Err(FrameError::bad("`attachments` must be a list of media ids"))
                }
            };
            if content.is_empty() && attachments.is_empty() {
                return Err(FrameError::bad(
                    "a message needs `content` or `attachments`",
                ));
            }
            Ok(ClientFrame::Send(SendFrame {
                chat_id,
                client_msg_id,
                content,
                attachments,
            }))
        }
        "sync" => {
            let since = match obj.remove("since") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Object(map)) => {
                    if map.len() > limits.max_sync_chats {
                        return Err(FrameError::new(
                            ErrorCode::TooLarge,
                            format!("`since` lists more than {} chats", limits.max_sync_chats),
                        ));
                    }
                    map.into_iter()
                        .map(|(chat, seq)| match seq.as_u64() {
                            Some(seq) if !chat.is_empty() && chat.len() <= limits.max_id_bytes => {
                                Ok((chat, seq))
                            }
                            _ => Err(FrameError::bad(
                                "`since` must map chat ids to non-negative integers",
                            )),
                        })
                        .collect::<Result<_, _>>()?
                }
                Some(_) => return Err(FrameError::bad("`since` must be an object")),
            };
            let reference = match obj.remove("ref") {
                None | Some(Value::Null) => None,
                Some(Value::String(r)) if r.len() <= limits.max_client_msg_id_bytes => Some(r),
                Some(_) => {
                    return Err(FrameError::bad(
                        "`ref` must be a string of at most 128 bytes",
                    ))
                }
            };
            Ok(ClientFrame::Sync { since, reference })
        }
        "delivered" | "read" => {
            let chat_id = take_string(obj, "chat_id", limits.max_id_bytes)?;
            let seq = take_seq(obj, "seq")?;
            let kind = if kind == "read" {
                PointerKind::Read
            } else {
                PointerKind::Delivered
            };
            Ok(ClientFrame::Pointer { chat_id, seq, kind })
        }
        "typing" => {
            let chat_id = take_string(obj, "chat_id", limits.max_id_bytes)?;
            let start = match obj.remove("state") {
                Some(Value::String(s)) if s == "start" => true,
                Some(Value::String(s)) if s == "stop" => false,
                _ => return Err(FrameError::bad("`state` must be \"start\" or \"stop\"")),
            };
            Ok(ClientFrame::Typing { chat_id, start })
        }
        "presence.subscribe" => {
            let user_ids = match obj.remove("user_ids") {
                Some(Value::Array(items)) => {
                    if items.len() > limits.max_subscribe {
                        return Err(FrameError::bad(format!(
                            "at most {} user ids per connection",
                            limits.max_subscribe
                        )));
                    }
                    items
                        .into_iter()
                        .map(|v| match v {
                            Value::String(s) if !s.is_empty() && s.len() <= limits.max_id_bytes => {
                                Ok(s)
                            }
                            _ => Err(FrameError::bad("`user_ids` must be a list of user ids")),
                        })
                        .collect::<Result<_, _>>()?
                }
                _ => return Err(FrameError::bad("`user_ids` must be a list of user ids")),
            };
            Ok(ClientFrame::PresenceSubscribe { user_ids })
        }
        other => Err(FrameError::bad(format!("unknown frame type `{other}`"))),
    }
}

fn to_bytes<T: Serialize>(frame: &T) -> Bytes {
    Bytes::from(serde_json::to_vec(frame).expect("server frames always serialize"))
}

pub fn encode_error(code: ErrorCode, message: &str, reference: Option<&str>) -> Bytes {
    FrameError::new(code, message)
        .with_ref(reference.map(str::to_owned))
        .encode()
}

pub fn encode_hello(user_id: &str, session_id: &str, server_time: u64, heartbeat_s: u64) -> Bytes {
    #[derive(Serialize)]
    struct F<'a> {
        r#type: &'static str,
        user_id: &'a str,
        session_id: &'a str,
        server_time: u64,
        heartbeat_s: u64,
    }
    to_bytes(&F {
        r#type: "hello",
        user_id,
        session_id,
        server_time,
        heartbeat_s,
    })
}

/// What the store returned for an accepted message: the content of every `ack` for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub client_msg_id: String,
    pub chat_id: String,
    pub message_id: String,
    pub seq: u64,
    pub created_at: u64,
    /// What was stored, when a plugin changed the send: the sender shows this instead of
    /// what it typed (everyone else receives it in the `msg`).
    pub rewritten: Option<Arc<Rewrite>>,
}

/// The stored content and attachments of a send a plugin changed.
#[derive(Debug)]
pub struct Rewrite {
    pub content: String,
    pub attachments: Box<RawValue>,
}

impl PartialEq for Rewrite {
    fn eq(&self, other: &Self) -> bool {
        self.content == other.content && self.attachments.get() == other.attachments.get()
    }
}

impl Eq for Rewrite {}

pub fn encode_ack(ack: &Ack) -> Bytes {
    #[derive(Serialize)]
    struct F<'a> {
        r#type: &'static str,
        client_msg_id: &'a str,
        chat_id: &'a str,
        message_id: &'a str,
        seq: u64,
        created_at: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        content: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        attachments: Option<&'a RawValue>,
    }
    let rewritten = ack.rewritten.as_deref();
    to_bytes(&F {
        r#type: "ack",
        client_msg_id: &ack.client_msg_id,
        chat_id: &ack.chat_id,
        message_id: &ack.message_id,
        seq: ack.seq,
        created_at: ack.created_at,
        content: rewritten.map(|r| r.content.as_str()),
        attachments: rewritten.map(|r| &*r.attachments),
    })
}

/// A send's fingerprint, to tell whether what was stored is what was sent: its content and
/// its attachment ids in order. Sent as ids, stored as objects that carry an `id`.
pub fn send_fingerprint<'a>(content: &str, attachment_ids: impl Iterator<Item = &'a str>) -> u64 {
    use std::hash::{Hash, Hasher};
    // Fixed keys: only compared within this process, and a collision costs the sender a
    // redraw, never anyone's data.
    let mut h = std::hash::DefaultHasher::new();
    content.hash(&mut h);
    for id in attachment_ids {
        id.hash(&mut h);
    }
    h.finish()
}

/// `send_fingerprint` of a stored message (attachments as the store's JSON objects).
pub fn stored_fingerprint(content: &str, attachments: &RawValue) -> u64 {
    #[derive(serde::Deserialize)]
    struct Id<'a> {
        #[serde(borrow)]
        id: std::borrow::Cow<'a, str>,
    }
    let ids: Vec<Id<'_>> = match attachments.get() {
        "[]" => Vec::new(),
        json => serde_json::from_str(json).unwrap_or_default(),
    };
    send_fingerprint(content, ids.iter().map(|i| &*i.id))
}

/// A stored message as the `msg` frame shows it. `attachments` is the JSON array
/// of attachment objects the store resolved.
#[derive(Debug)]
pub struct StoredMessage<'a> {
    pub chat_id: &'a str,
    pub seq: u64,
    pub message_id: &'a str,
    pub sender_id: &'a str,
    pub content: &'a str,
    pub attachments: &'a RawValue,
    pub created_at: u64,
    pub client_msg_id: Option<&'a str>,
}

pub fn encode_msg(m: &StoredMessage<'_>) -> Bytes {
    #[derive(Serialize)]
    struct F<'a> {
        r#type: &'static str,
        chat_id: &'a str,
        seq: u64,
        message_id: &'a str,
        sender_id: &'a str,
        content: &'a str,
        attachments: &'a RawValue,
        created_at: u64,
        client_msg_id: Option<&'a str>,
    }
    to_bytes(&F {
        r#type: "msg",
        chat_id: m.chat_id,
        seq: m.seq,
        message_id: m.message_id,
        sender_id: m.sender_id,
        content: m.content,
        attachments: m.attachments,
        created_at: m.created_at,
        client_msg_id: m.client_msg_id,
    })
}

pub fn encode_synced<'a>(
    chats: impl IntoIterator<Item = (&'a str, u64)>,
    reference: Option<&str>,
) -> Bytes {
    #[derive(Serialize)]
    struct F<'a> {
        r#type: &'static str,
        chats: std::collections::BTreeMap<&'a str, u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        r#ref: Option<&'a str>,
    }
    to_bytes(&F {
        r#type: "synced",
        chats: chats.into_iter().collect(),
        r#ref: reference,
    })
}

pub fn encode_receipt(chat_id: &str, user_id: &str, kind: PointerKind, seq: u64) -> Bytes {
    #[derive(Serialize)]
    struct F<'a> {
        r#type: &'static str,
        chat_id: &'a str,
        user_id: &'a str,
        status: &'static str,
        seq: u64,
    }
    to_bytes(&F {
        r#type: "receipt",
        chat_id,
        user_id,
        status: kind.as_str(),
        seq,
    })
}

pub fn encode_typing(chat_id: &str, user_id: &str, start: bool) -> Bytes {
    #[derive(Serialize)]
    struct F<'a> {
        r#type: &'static str,
        chat_id: &'a str,
        user_id: &'a str,
        state: &'static str,
    }
    to_bytes(&F {
        r#type: "typing",
        chat_id,
        user_id,
        state: if start { "start" } else { "stop" },
    })
}

pub fn encode_presence(user_id: &str, online: bool, last_seen: Option<u64>) -> Bytes {
    #[derive(Serialize)]
    struct F<'a> {
        r#type: &'static str,
        user_id: &'a str,
        status: &'static str,
        last_seen: Option<u64>,
    }
    to_bytes(&F {
        r#type: "presence",
        user_id,
        status: if online { "online" } else { "offline" },
        last_seen,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ClientFrame, FrameError> {
        parse_client_frame(text, &Limits::default())
    }

    #[test]
    fn parses_send_and_defaults_attachments() {
        let f = parse(
            r#"{"type":"send","chat_id":"c1","client_msg_id":"m1","content":"hi","extra":1}"#,
        )
        .unwrap();
        assert_eq!(
            f,
            ClientFrame::Send(SendFrame {
                chat_id: "c1".into(),
                client_msg_id: "m1".into(),
                content: "hi".into(),
                attachments: vec![],
            })
        );
    }

    #[test]
    fn bad_frames_get_precise_errors_with_ref() {
        let e = parse(r#"{"type":"send","chat_id":"c1","client_msg_id":"m1"}"#).unwrap_err();
        assert_eq!(
            (e.code, e.message.as_str(), e.reference.as_deref()),
            (ErrorCode::BadRequest, "`content` is required", Some("m1"))
        );
        let e = parse("not json").unwrap_err();
        assert_eq!((e.code, e.reference), (ErrorCode::BadRequest, None));
        assert_eq!(
            parse("[1]").unwrap_err().message,
            "a frame must be a JSON object"
        );
        assert_eq!(
            parse(r#"{"type":"nope"}"#).unwrap_err().message,
            "unknown frame type `nope`"
        );
        assert_eq!(
            parse(r#"{"chat_id":"c"}"#).unwrap_err().message,
            "`type` is required"
        );
        let e = parse(r#"{"type":"read","chat_id":"c","seq":-1}"#).unwrap_err();
        assert_eq!(e.message, "`seq` must be a non-negative integer");
        let e = parse(r#"{"type":"typing","chat_id":"c","state":"maybe"}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
    }

    #[test]
    fn size_limits() {
        let big = "x".repeat(64 * 1024 + 1);
        let e = parse(&format!(
            r#"{{"type":"send","chat_id":"c","client_msg_id":"m","content":"{big}"}}"#
        ))
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::TooLarge);
        let ok = "x".repeat(64 * 1024);
        assert!(parse(&format!(
            r#"{{"type":"send","chat_id":"c","client_msg_id":"m","content":"{ok}"}}"#
        ))
        .is_ok());
        let atts: Vec<String> = (0..11).map(|i| format!("\"m{i}\"")).collect();
        let e = parse(&format!(r#"{{"type":"send","chat_id":"c","client_msg_id":"m","content":"x","attachments":[{}]}}"#, atts.join(","))).unwrap_err();
        assert_eq!(e.code, ErrorCode::TooLarge);
        let frame = "y".repeat(256 * 1024 + 1);
        assert_eq!(parse(&frame).unwrap_err().code, ErrorCode::TooLarge);
    }

    #[test]
    fn parses_sync_pointer_typing() {
        assert_eq!(
            parse(r#"{"type":"sync","since":{"c1":4}}"#).unwrap(),
            ClientFrame::Sync {
                since: vec![("c1".into(), 4)],
                reference: None
            }
        );
        assert_eq!(
            parse(r#"{"type":"sync","ref":"r1"}"#).unwrap(),
            ClientFrame::Sync {
                since: vec![],
                reference: Some("r1".into())
            }
        );
        assert_eq!(
            parse(r#"{"type":"read","chat_id":"c1","seq":3}"#).unwrap(),
            ClientFrame::Pointer {
                chat_id: "c1".into(),
                seq: 3,
                kind: PointerKind::Read
            }
        );
        assert_eq!(
            parse(r#"{"type":"typing","chat_id":"c1","state":"stop"}"#).unwrap(),
            ClientFrame::Typing {
                chat_id: "c1".into(),
                start: false
            }
        );
    }

    #[test]
    fn encodes_frames_as_json() {
        let atts = RawValue::from_string("[]".into()).unwrap();
        let m = StoredMessage {
            chat_id: "c\"1",
            seq: 7,
            message_id: "m",
            sender_id: "u",
            content: "héllo\n",
            attachments: &atts,
            created_at: 5,
            client_msg_id: None,
        };
        let v: Value = serde_json::from_slice(&encode_msg(&m)).unwrap();
        assert_eq!(v["type"], "msg");
        assert_eq!(v["chat_id"], "c\"1");
        assert_eq!(v["content"], "héllo\n");
        assert_eq!(v["attachments"], serde_json::json!([]));
        assert_eq!(v["client_msg_id"], Value::Null);
        let v: Value =
            serde_json::from_slice(&encode_error(ErrorCode::Forbidden, "no", Some("r"))).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type":"error","code":"forbidden","message":"no","ref":"r"})
        );
        let v: Value = serde_json::from_slice(&encode_synced([("a", 1), ("b", 2)], None)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type":"synced","chats":{"a":1,"b":2}})
        );
    }
}
