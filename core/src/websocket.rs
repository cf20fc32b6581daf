//! The server side of RFC 6455, only what the gateway needs: the upgrade
//! handshake, decoding client frames (masked, possibly fragmented) and
//! encoding server frames.
//!
//! Why not a WebSocket library: the gateway holds tens of thousands of idle
//! connections, and a library's per-connection read and write buffers cost
//! more than everything else a connection needs. Here the codec works on
//! buffers the connection owns only while bytes are in flight.

use std::fmt;

use base64::Engine as _;
use sha1::{Digest, Sha1};

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Close codes the gateway sends (RFC 6455 7.4.1).
pub const CLOSE_NORMAL: u16 = 1000;
pub const CLOSE_AWAY: u16 = 1001;
pub const CLOSE_PROTOCOL: u16 = 1002;
pub const CLOSE_INVALID_DATA: u16 = 1007;
pub const CLOSE_POLICY: u16 = 1008;
pub const CLOSE_TOO_BIG: u16 = 1009;
pub const CLOSE_ERROR: u16 = 1011;

/// A request head larger than this is refused (tokens are a few hundred bytes).
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;

const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// A valid upgrade request, borrowing from the request bytes.
#[derive(Debug, PartialEq, Eq)]
pub struct Upgrade<'a> {
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub origin: Option<&'a str>,
    /// The `Sec-WebSocket-Accept` value to answer with.
    pub accept: String,
    /// Bytes of the request head; anything after it is already WebSocket data.
    pub head_len: usize,
}

#[derive(Debug, PartialEq, Eq)]
pub enum HandshakeError {
    /// More bytes are needed.
    Incomplete,
    TooLarge,
    /// Not a WebSocket upgrade (answered 400).
    Bad(&'static str),
    /// A WebSocket version other than 13 (answered 426 with the version we speak).
    Version,
}

/// Parses and checks an upgrade request head.
pub fn parse_upgrade(buf: &[u8]) -> Result<Upgrade<'_>, HandshakeError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_REQUEST_HEAD => {
            return Err(HandshakeError::TooLarge)
        }
        Ok(httparse::Status::Partial) => return Err(HandshakeError::Incomplete),
        Err(httparse::Error::TooManyHeaders) => return Err(HandshakeError::TooLarge),
        Err(_) => return Err(HandshakeError::Bad("malformed HTTP request")),
    };
    if head_len > MAX_REQUEST_HEAD {
        return Err(HandshakeError::TooLarge);
    }
    if req.method != Some("GET") || req.version != Some(1) {
        return Err(HandshakeError::Bad(
            "a WebSocket upgrade is a GET over HTTP/1.1",
        ));
    }
    let header = |name: &str| -> Option<&str> {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(str::trim)
    };
    let has_token = |name: &str, token: &str| {
        header(name).is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    if !has_token("upgrade", "websocket") || !has_token("connection", "upgrade") {
        return Err(HandshakeError::Bad("expected a WebSocket upgrade"));
    }
    if header("sec-websocket-version") != Some("13") {
        return Err(HandshakeError::Version);
    }
    let key =
        header("sec-websocket-key").ok_or(HandshakeError::Bad("missing Sec-WebSocket-Key"))?;
    match base64::engine::general_purpose::STANDARD.decode(key) {
        Ok(raw) if raw.len() == 16 => {}
        _ => return Err(HandshakeError::Bad("invalid Sec-WebSocket-Key")),
    }
    let target = req.path.unwrap_or("/");
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    Ok(Upgrade {
        path,
        query,
        origin: header("origin"),
        accept: accept_key(key),
        head_len,
    })
}

/// `Sec-WebSocket-Accept` for a client key (RFC 6455 4.2.2).
pub fn accept_key(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(GUID);
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

pub fn switching_protocols(accept: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n"
    )
    .into_bytes()
}

/// A refused upgrade: a JSON body, the connection closed after it.
pub fn http_error(status: u16, json_body: &str, extra_headers: &[(&str, String)]) -> Vec<u8> {
    let reason = match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n",
        json_body.len()
    );
    for (name, value) in extra_headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("\r\n");
    out.push_str(json_body);
    out.into_bytes()
}

/// A complete message from the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Message {
    Text(String),
    Binary,
    Ping(Vec<u8>),
    Pong,
    /// The close code the peer gave, if any.
    Close(Option<u16>),
}

/// Why the connection must be failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// A frame or message larger than the decoder's limit.
    TooLarge,
    /// Text that is not UTF-8 (close code 1007).
    InvalidUtf8,
    /// Anything else RFC 6455 forbids (close code 1002).
    Protocol(&'static str),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLarge => f.write_str("frame too large"),
            Self::InvalidUtf8 => f.write_str("text frame is not UTF-8"),
            Self::Protocol(why) => f.write_str(why),
        }
    }
}

/// Reassembles client messages from frames. Holds memory only while a
/// fragmented message is in progress.
#[derive(Debug)]
pub struct Decoder {
    max_message: usize,
    /// Opcode, payload so far, and bytes of it known to be UTF-8 of a fragmented message.
    fragments: Option<Box<(u8, Vec<u8>, usize)>>,
}

impl Decoder {
    pub fn new(max_message: usize) -> Self {
        Self {
            max_message,
            fragments: None,
        }
    }

    /// Decodes the next message from the start of `buf` (unmasking in place).
    /// `Ok(None)`: more bytes are needed. `Ok(Some((m, n)))`: `n` bytes were used;
    /// a continuation frame that does not finish a message yields nothing but
    /// still uses its bytes, so callers loop while `n > 0`.
    pub fn decode(
        &mut self,
        buf: &mut [u8],
    ) -> Result<Option<(Option<Message>, usize)>, DecodeError> {
        if buf.len() < 2 {
            return Ok(None);
        }
        let (b0, b1) = (buf[0], buf[1]);
        let fin = b0 & 0x80 != 0;
        if b0 & 0x70 != 0 {
            return Err(DecodeError::Protocol(
                "reserved bits set without an extension",
            ));
        }
        let opcode = b0 & 0x0F;
        if b1 & 0x80 == 0 {
            return Err(DecodeError::Protocol("client frames must be masked"));
        }
        let (len, mut at) = match b1 & 0x7F {
            126 if buf.len() < 4 => return Ok(None),
            126 => (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4),
            127 if buf.len() < 10 => return Ok(None),
            127 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&buf[2..10]);
                (u64::from_be_bytes(b), 10)
            }
            n => (u64::from(n), 2),
        };
        let control = opcode & 0x8 != 0;
        match opcode {
            OP_CONTINUATION | OP_TEXT | OP_BINARY => {}
            OP_CLOSE | OP_PING | OP_PONG => {
                if !fin || len > 125 {
                    return Err(DecodeError::Protocol(
                        "control frames are short and unfragmented",
                    ));
                }
            }
            _ => return Err(DecodeError::Protocol("unknown opcode")),
        }
        let so_far = self.fragments.as_ref().map_or(0, |f| f.1.len() as u64);
        if !control && len.saturating_add(so_far) > self.max_message as u64 {
            return Err(DecodeError::TooLarge);
        }
        let len = len as usize;
        if buf.len() < at + 4 + len {
            return Ok(None);
        }
        let mask = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
        at += 4;
        let payload = &mut buf[at..at + len];
        unmask(payload, mask);
        let used = at + len;
        let message = match opcode {
            OP_PING => Some(Message::Ping(payload.to_vec())),
            OP_PONG => Some(Message::Pong),
            OP_CLOSE => Some(Message::Close(close_code(payload)?)),
            OP_CONTINUATION => {
                let Some(frag) = self.fragments.as_mut() else {
                    return Err(DecodeError::Protocol("continuation without a first frame"));
                };
                frag.1.extend_from_slice(payload);
                if fin {
                    let (op, data, _) = *self.fragments.take().expect("checked above");
                    Some(finish(op, data)?)
                } else {
                    check_text_so_far(frag)?;
                    None
                }
            }
            _ if self.fragments.is_some() => {
                return Err(DecodeError::Protocol("new message inside a fragmented one"));
            }
            _ if fin => Some(finish(opcode, payload.to_vec())?),
            _ => {
                let mut frag = Box::new((opcode, payload.to_vec(), 0));
                check_text_so_far(&mut frag)?;
                self.fragments = Some(frag);
                None
            }
        };
        Ok(Some((message, used)))
    }
}

/// A connection's input: the bytes read and not yet decoded, and the decoder. Once a
/// frame fails the connection, the buffer is freed and nothing more is kept or decoded
/// (RFC 6455 7.1.7): whatever the peer sends after that is the caller's to discard.
#[derive(Debug)]
pub struct FrameReader {
    decoder: Decoder,
    /// Received bytes; those before `at` are decoded. Unallocated between reads.
    buf: Vec<u8>,
    at: usize,
    failed: bool,
}

impl FrameReader {
    pub fn new(max_message: usize, leftover: Vec<u8>) -> Self {
        Self {
            decoder: Decoder::new(max_message),
            buf: leftover,
            at: 0,
            failed: false,
        }
    }

    /// The buffer to append the next read to, with room for `want` more bytes; `None`
    /// once the connection failed.
    pub fn read_buffer(&mut self, want: usize) -> Option<&mut Vec<u8>> {
        if self.failed {
            return None;
        }
        self.buf.drain(..self.at);
        self.at = 0;
        self.buf.reserve(want);
        Some(&mut self.buf)
    }

    /// The next complete message, `Ok(None)` when more bytes are needed. An error fails
    /// the reader for good.
    pub fn next_message(&mut self) -> Result<Option<Message>, DecodeError> {
        while !self.failed {
            match self.decoder.decode(&mut self.buf[self.at..]) {
                Ok(Some((message, used))) => {
                    self.at += used;
                    if message.is_some() {
                        return Ok(message);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    self.failed = true;
                    self.buf = Vec::new();
                    self.at = 0;
                    return Err(e);
                }
            }
        }
        self.release_if_drained();
        Ok(None)
    }

    /// Everything decoded (or nothing read: a wake-up without data): an idle connection
    /// holds no buffer.
    pub fn release_if_drained(&mut self) {
        if self.at == self.buf.len() && self.buf.capacity() > 0 {
            self.buf = Vec::new();
            self.at = 0;
        }
    }

    /// Bytes held (decoded or not): what this reader costs beyond its own size.
    pub fn held(&self) -> usize {
        self.buf.capacity()
    }

    pub fn failed(&self) -> bool {
        self.failed
    }
}

/// Fails a fragmented text message as soon as its bytes so far cannot begin valid UTF-8
/// (a character cut between fragments is fine), checking each byte once.
fn check_text_so_far(frag: &mut (u8, Vec<u8>, usize)) -> Result<(), DecodeError> {
    if frag.0 != OP_TEXT {
        return Ok(());
    }
    match std::str::from_utf8(&frag.1[frag.2..]) {
        Ok(_) => frag.2 = frag.1.len(),
        Err(e) if e.error_len().is_none() => frag.2 += e.valid_up_to(),
        Err(_) => return Err(DecodeError::InvalidUtf8),
    }
    Ok(())
}

fn finish(opcode: u8, data: Vec<u8>) -> Result<Message, DecodeError> {
    if opcode == OP_BINARY {
        return Ok(Message::Binary);
    }
    String::from_utf8(data)
        .map(Message::Text)
        .map_err(|_| DecodeError::InvalidUtf8)
}

fn close_code(payload: &[u8]) -> Result<Option<u16>, DecodeError> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(DecodeError::Protocol("close payload of one byte")),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !close_code_allowed(code) {
                return Err(DecodeError::Protocol("invalid close code"));
            }
            std::str::from_utf8(&payload[2..]).map_err(|_| DecodeError::InvalidUtf8)?;
            Ok(Some(code))
        }
    }
}

/// Whether a peer may send this close code (RFC 6455 7.4 and IANA's registry): 0-999 are
/// unused, 1004-1006 and 1015 never go on the wire, 1016-2999 are unassigned, 3000-4999
/// belong to libraries and applications, and above that nothing is defined.
pub fn close_code_allowed(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let word = u32::from_ne_bytes(mask);
    let mut chunks = payload.chunks_exact_mut(4);
    for c in &mut chunks {
        let v = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) ^ word;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i];
    }
}

/// Appends one unmasked, unfragmented server frame.
pub fn encode_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    out.push(0x80 | opcode);
    let len = payload.len();
    if len < 126 {
        out.push(len as u8);
    } else if len <= usize::from(u16::MAX) {
        out.push(126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(payload);
}

/// Appends a close frame with a code and a reason (cut to fit a control frame).
pub fn encode_close(out: &mut Vec<u8>, code: u16, reason: &str) {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    encode_frame(out, OP_CLOSE, &payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client frame as a browser would send it.
    fn client_frame(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut out = vec![if fin { 0x80 } else { 0 } | opcode];
        let len = payload.len();
        if len < 126 {
            out.push(0x80 | len as u8);
        } else if len <= 65535 {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    fn decode_all(d: &mut Decoder, mut buf: Vec<u8>) -> Result<Vec<Message>, DecodeError> {
        let mut out = Vec::new();
        let mut at = 0;
        while let Some((m, n)) = d.decode(&mut buf[at..])? {
            out.extend(m);
            at += n;
        }
        assert_eq!(at, buf.len(), "every byte used");
        Ok(out)
    }

    #[test]
    fn accept_key_matches_the_rfc_example() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn upgrade_parsed_with_path_query_origin_and_leftover() {
        let req = b"GET /ws?token=abc HTTP/1.1\r\nHost: x\r\nUpgrade: WebSocket\r\n\
                    Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                    Sec-WebSocket-Version: 13\r\nOrigin: https://a.example\r\n\r\nXY";
        let up = parse_upgrade(req).unwrap();
        assert_eq!(up.path, "/ws");
        assert_eq!(up.query, Some("token=abc"));
        assert_eq!(up.origin, Some("https://a.example"));
        assert_eq!(up.accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(&req[up.head_len..], b"XY");
        assert_eq!(parse_upgrade(&req[..40]), Err(HandshakeError::Incomplete));
    }

    #[test]
    fn non_upgrades_and_wrong_versions_are_refused() {
        let plain = b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n";
        assert!(matches!(parse_upgrade(plain), Err(HandshakeError::Bad(_))));
        let v8 = b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n";
        assert_eq!(parse_upgrade(v8), Err(HandshakeError::Version));
        let post = b"POST /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\
                     Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
        assert!(matches!(parse_upgrade(post), Err(HandshakeError::Bad(_))));
        let short_key = b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\
                          Sec-WebSocket-Key: abcd\r\nSec-WebSocket-Version: 13\r\n\r\n";
        assert!(matches!(
            parse_upgrade(short_key),
            Err(HandshakeError::Bad(_))
        ));
        let huge = vec![b'a'; MAX_REQUEST_HEAD + 1];
        assert!(parse_upgrade(&huge).is_err());
    }

    #[test]
    fn decodes_every_length_form_and_unmasks() {
        for len in [0usize, 1, 5, 125, 126, 65535, 65536, 70_000] {
            let payload: String = "abcdefghij".repeat(len / 10 + 1)[..len].to_owned();
            let frame = client_frame(true, OP_TEXT, payload.as_bytes(), [1, 2, 3, 4]);
            let mut d = Decoder::new(1 << 20);
            assert_eq!(decode_all(&mut d, frame).unwrap(), [Message::Text(payload)]);
        }
    }

    #[test]
    fn partial_input_waits_for_more() {
        let frame = client_frame(true, OP_TEXT, &[b'x'; 300], [9, 8, 7, 6]);
        let mut d = Decoder::new(1 << 20);
        for cut in 0..frame.len() {
            assert_eq!(d.decode(&mut frame[..cut].to_vec()), Ok(None), "cut {cut}");
        }
    }

    #[test]
    fn fragments_reassemble_with_control_frames_between() {
        let mut buf = client_frame(false, OP_TEXT, b"hel", [1, 1, 1, 1]);
        buf.extend(client_frame(true, OP_PING, b"p", [2, 2, 2, 2]));
        buf.extend(client_frame(false, OP_CONTINUATION, b"lo ", [3, 3, 3, 3]));
        buf.extend(client_frame(
            true,
            OP_CONTINUATION,
            "wörld".as_bytes(),
            [4, 4, 4, 4],
        ));
        let mut d = Decoder::new(1 << 20);
        assert_eq!(
            decode_all(&mut d, buf).unwrap(),
            [
                Message::Ping(b"p".to_vec()),
                Message::Text("hello wörld".into())
            ]
        );
        assert!(d.fragments.is_none());
    }

    #[test]
    fn limits_and_protocol_violations_fail_the_connection() {
        let mut d = Decoder::new(100);
        let big = client_frame(true, OP_TEXT, &[b'a'; 101], [0; 4]);
        // Refused from the header alone, before the payload arrives.
        assert_eq!(d.decode(&mut big[..8].to_vec()), Err(DecodeError::TooLarge));
        let mut d = Decoder::new(100);
        let mut two = client_frame(false, OP_TEXT, &[b'a'; 60], [0; 4]);
        two.extend(client_frame(true, OP_CONTINUATION, &[b'a'; 60], [0; 4]));
        assert_eq!(decode_all(&mut d, two), Err(DecodeError::TooLarge));

        let cases: Vec<(Vec<u8>, DecodeError)> = vec![
            (
                vec![0x81, 0x00],
                DecodeError::Protocol("client frames must be masked"),
            ),
            (
                client_frame(true, 0x3, b"", [0; 4]),
                DecodeError::Protocol("unknown opcode"),
            ),
            (
                client_frame(true, OP_CONTINUATION, b"x", [0; 4]),
                DecodeError::Protocol("continuation without a first frame"),
            ),
            (
                client_frame(true, OP_TEXT, &[0xff, 0xfe], [0; 4]),
                DecodeError::InvalidUtf8,
            ),
            (
                client_frame(false, OP_PING, b"", [0; 4]),
                DecodeError::Protocol("control frames are short and unfragmented"),
            ),
        ];
        for (bytes, want) in cases {
            let mut d = Decoder::new(100);
            assert_eq!(decode_all(&mut d, bytes), Err(want));
        }
        let mut rsv = client_frame(true, OP_TEXT, b"x", [0; 4]);
        rsv[0] |= 0x40;
        assert!(matches!(
            Decoder::new(100).decode(&mut rsv),
            Err(DecodeError::Protocol(_))
        ));
    }

    #[test]
    fn close_codes_binary_and_pong() {
        let mut d = Decoder::new(100);
        let mut buf = client_frame(true, OP_CLOSE, &[0x03, 0xE8, b'b', b'y', b'e'], [5; 4]);
        buf.extend(client_frame(true, OP_BINARY, b"\x00\x01", [6; 4]));
        buf.extend(client_frame(true, OP_PONG, b"", [7; 4]));
        assert_eq!(
            decode_all(&mut d, buf).unwrap(),
            [Message::Close(Some(1000)), Message::Binary, Message::Pong]
        );
    }

    #[test]
    fn invalid_text_fails_at_its_fragment_not_at_the_message_end() {
        let mut d = Decoder::new(100);
        // "é" cut between two fragments is fine.
        let mut buf = client_frame(false, OP_TEXT, b"ab\xc3", [1; 4]);
        buf.extend(client_frame(false, OP_CONTINUATION, b"\xa9c", [2; 4]));
        buf.extend(client_frame(true, OP_CONTINUATION, b"d", [3; 4]));
        assert_eq!(
            decode_all(&mut d, buf).unwrap(),
            [Message::Text("ab\u{e9}cd".into())]
        );
        let mut d = Decoder::new(100);
        let first = client_frame(false, OP_TEXT, b"ok", [1; 4]);
        let bad = client_frame(false, OP_CONTINUATION, b"\xff", [2; 4]);
        assert!(d.decode(&mut first.clone()).unwrap().is_some());
        assert_eq!(d.decode(&mut bad.clone()), Err(DecodeError::InvalidUtf8));
    }

    #[test]
    fn close_codes_outside_the_registry_are_protocol_errors() {
        for code in [
            0u16, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ] {
            let frame = client_frame(true, OP_CLOSE, &code.to_be_bytes(), [1; 4]);
            assert_eq!(
                decode_all(&mut Decoder::new(100), frame),
                Err(DecodeError::Protocol("invalid close code")),
                "{code}"
            );
        }
        for code in [
            1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 4999,
        ] {
            let frame = client_frame(true, OP_CLOSE, &code.to_be_bytes(), [1; 4]);
            assert_eq!(
                decode_all(&mut Decoder::new(100), frame).unwrap(),
                [Message::Close(Some(code))]
            );
        }
    }

    #[test]
    fn a_failed_reader_frees_its_buffer_and_takes_nothing_more() {
        let mut r = FrameReader::new(100, Vec::new());
        let mut bytes = client_frame(true, OP_TEXT, b"hi", [3; 4]);
        bytes.extend(client_frame(true, OP_TEXT, b"x", [3; 4]));
        bytes[8] |= 0x40; // the second frame sets a reserved bit
        bytes.extend(vec![0u8; 5000]);
        r.read_buffer(bytes.len())
            .unwrap()
            .extend_from_slice(&bytes);
        assert_eq!(r.next_message(), Ok(Some(Message::Text("hi".into()))));
        assert!(matches!(r.next_message(), Err(DecodeError::Protocol(_))));
        assert!(r.failed());
        assert_eq!(r.held(), 0);
        assert!(r.read_buffer(4096).is_none());
        assert_eq!(r.next_message(), Ok(None));
    }

    #[test]
    fn a_reader_holds_no_buffer_once_everything_is_decoded() {
        let mut r = FrameReader::new(100, Vec::new());
        let frame = client_frame(true, OP_TEXT, b"hello", [7; 4]);
        r.read_buffer(4096).unwrap().extend_from_slice(&frame[..4]);
        assert_eq!(r.next_message(), Ok(None));
        r.read_buffer(4096).unwrap().extend_from_slice(&frame[4..]);
        assert_eq!(r.next_message(), Ok(Some(Message::Text("hello".into()))));
        assert_eq!(r.next_message(), Ok(None));
        assert_eq!(r.held(), 0);
        // A wake-up that read nothing leaves no reserved buffer either.
        assert!(r.read_buffer(4096).unwrap().is_empty());
        r.release_if_drained();
        assert_eq!(r.held(), 0);
        // A partial frame is kept.
        r.read_buffer(4096).unwrap().extend_from_slice(&frame[..3]);
        r.release_if_drained();
        assert!(r.held() >= 3);
    }

    #[test]
    fn server_frames_have_the_right_headers() {
        for (len, head) in [(5usize, 2usize), (126, 4), (65535, 4), (65536, 10)] {
            let mut out = Vec::new();
            encode_frame(&mut out, OP_TEXT, &vec![b'z'; len]);
            assert_eq!(out.len(), head + len);
            assert_eq!(out[0], 0x81);
            assert_eq!(out[1] & 0x80, 0, "server frames are not masked");
        }
        let mut out = Vec::new();
        encode_close(&mut out, CLOSE_POLICY, &"é".repeat(100));
        assert!(out.len() <= 2 + 125);
        assert!(std::str::from_utf8(&out[4..]).is_ok());
    }
}
