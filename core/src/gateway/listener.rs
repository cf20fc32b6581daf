//! Listening and upgrade admission: accepts sockets, bounds the handshakes in
//! progress (in all and per client address), reads the upgrade request within a
//! deadline, and admits it (path, token, Origin, capacity, upgrade rate).
//!
//! A socket costs a slot only once accepted, and a silent one is dropped after
//! `handshake_timeout_ms`: a thousand sockets that never speak cannot stop other
//! clients' upgrades, and one address cannot hold more than its share.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use super::{connection, Shared};
use crate::gate::Admission;
use crate::hub::{now_ms, EngineEvent};
use crate::metrics;
use crate::protocol::{ErrorCode, FrameError};
use crate::send_guard::UserId;
use crate::websocket::{self, HandshakeError};

const LISTEN_BACKLOG: u32 = 4096;

/// Binds the listening socket with a deep accept queue: a reconnect storm waits in it
/// instead of being reset.
pub(super) fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Counts sockets (handshakes in progress, or connections), in all and per client address.
#[derive(Debug)]
pub struct AddressSlots {
    max_total: usize,
    max_per_address: usize,
    state: Mutex<SlotState>,
}

#[derive(Debug, Default)]
struct SlotState {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
}

/// Why a socket got no handshake slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoSlot {
    /// Every slot is taken: the server is busy.
    Busy,
    /// This address holds its share.
    Address,
}

/// A taken slot, given back when dropped.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<AddressSlots>,
    address: IpAddr,
}

impl AddressSlots {
    pub fn new(max_total: usize, max_per_address: usize) -> Arc<Self> {
        Arc::new(Self {
            max_total: max_total.max(1),
            max_per_address: max_per_address.max(1),
            state: Mutex::default(),
        })
    }

    pub fn take(self: &Arc<Self>, address: IpAddr) -> Result<Slot, NoSlot> {
        let mut s = self.state.lock();
        if s.total >= self.max_total {
            return Err(NoSlot::Busy);
        }
        let held = s.by_address.entry(address).or_insert(0);
        if *held >= self.max_per_address {
            return Err(NoSlot::Address);
        }
        *held += 1;
        s.total += 1;
        Ok(Slot {
            slots: self.clone(),
            address,
        })
    }

    #[cfg(test)]
    pub fn in_use(&self) -> usize {
        self.state.lock().total
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut s = self.slots.state.lock();
        s.total -= 1;
        if let Some(held) = s.by_address.get_mut(&self.address) {
            *held -= 1;
            if *held == 0 {
                s.by_address.remove(&self.address);
            }
        }
    }
}

pub(super) async fn accept_loop(shared: Arc<Shared>, listener: TcpListener) {
    let slots = AddressSlots::new(
        shared.config.max_handshakes,
        shared.config.handshakes_per_address,
    );
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.notified() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => match slots.take(peer.ip()) {
                Ok(slot) => {
                    tokio::spawn(serve_connection(shared.clone(), stream, slot));
                }
                Err(why) => {
                    let counters = &shared.hub.counters;
                    let refusal = match why {
                        NoSlot::Busy => {
                            metrics::inc(&counters.handshakes_refused_busy);
                            let mut r = Refusal::new(
                                ErrorCode::Unavailable.http_status(),
                                ErrorCode::Unavailable,
                                "too many upgrades in progress",
                            );
                            r.error.retry_after_ms = Some(1_000);
                            r
                        }
                        NoSlot::Address => {
                            metrics::inc(&counters.handshakes_refused_per_address);
                            Refusal {
                                status: ErrorCode::RateLimited.http_status(),
                                error: FrameError::rate_limited(1_000),
                            }
                        }
                    };
                    tokio::spawn(refuse(stream, refusal));
                }
            },
            // Out of file descriptors or a reset before accept: wait a little, keep serving.
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Answers a socket that got no slot without reading its request, then closes it. Its
/// request is read and dropped until the peer closes (a second at most), so the close does
/// not turn into a reset that would destroy the answer before the client reads it.
async fn refuse(mut stream: TcpStream, refusal: Refusal) {
    let said = async {
        stream.write_all(&refusal.response()).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 1024];
        while tokio::io::AsyncReadExt::read(&mut stream, &mut sink).await? > 0 {}
        Ok::<(), io::Error>(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), said).await;
}

/// A refused upgrade: status and the error body PROTOCOL.md gives REST errors.
struct Refusal {
    status: u16,
    error: FrameError,
}

impl Refusal {
    fn new(status: u16, code: ErrorCode, message: &str) -> Self {
        Self {
            status,
            error: FrameError::new(code, message),
        }
    }

    fn response(&self) -> Vec<u8> {
        #[derive(serde::Serialize)]
        struct Body<'a> {
            code: &'static str,
            message: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            retry_after_ms: Option<u64>,
        }
        let e = &self.error;
        let body = serde_json::json!({ "error": Body {
            code: e.code.as_str(),
            message: &e.message,
            retry_after_ms: e.retry_after_ms,
        }});
        let mut headers = Vec::new();
        if let Some(ms) = e.retry_after_ms {
            headers.push(("retry-after", ms.div_ceil(1000).max(1).to_string()));
        }
        if self.status == 426 {
            headers.push(("sec-websocket-version", "13".to_owned()));
        }
        websocket::http_error(self.status, &body.to_string(), &headers)
    }
}

fn token_from_query(query: &str) -> Option<&str> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("token="))
        .filter(|t| !t.is_empty())
}

/// Checks an upgrade request: path, token, Origin, capacity, then the upgrade
/// rate (a storm of reconnects is told when to come back instead of queueing).
fn admit_upgrade(shared: &Shared, up: &websocket::Upgrade<'_>) -> Result<String, Refusal> {
    if up.path != "/ws" {
        return Err(Refusal::new(
            404,
            ErrorCode::NotFound,
            "the WebSocket endpoint is /ws",
        ));
    }
    let Some(token) = up.query.and_then(token_from_query) else {
        return Err(Refusal::new(401, ErrorCode::Unauthorized, "missing token"));
    };
    let user = shared
        .verifier
        .verify(token, now_ms())
        .map_err(|e| Refusal::new(401, ErrorCode::Unauthorized, &e.to_string()))?;
    let allowed = &shared.config.allowed_origins;
    // Browsers always send Origin; other clients may omit it.
    if let (false, Some(origin)) = (allowed.is_empty(), up.origin) {
        if !allowed.iter().any(|a| a == origin) {
            return Err(Refusal::new(
                403,
                ErrorCode::Forbidden,
                "origin not allowed",
            ));
        }
    }
    let per_user = shared.config.max_connections_per_user;
    if per_user > 0 && shared.hub.registry.user_connection_count(&user) >= per_user {
        metrics::inc(&shared.hub.counters.upgrades_refused_per_user);
        let mut r = Refusal::new(
            429,
            ErrorCode::RateLimited,
            &format!("this user already has {per_user} connections, the most allowed"),
        );
        r.error.retry_after_ms = Some(1_000);
        return Err(r);
    }
    if let Err(retry_after) = shared.upgrades.lock().try_take(now_ms()) {
        metrics::inc(&shared.hub.counters.upgrades_rate_limited);
        return Err(Refusal {
            status: 429,
            error: FrameError::rate_limited(retry_after),
        });
    }
    Ok(user)
}

/// A connection refused by the caps in all (503) or per client address (429).
fn connection_refusal(shared: &Shared, why: NoSlot) -> Refusal {
    let counters = &shared.hub.counters;
    let mut r = match why {
        NoSlot::Busy => {
            metrics::inc(&counters.upgrades_refused_at_capacity);
            Refusal::new(
                503,
                ErrorCode::Unavailable,
                "server is at its connection limit",
            )
        }
        NoSlot::Address => {
            metrics::inc(&counters.upgrades_refused_per_address);
            Refusal::new(
                429,
                ErrorCode::RateLimited,
                "too many connections from this address",
            )
        }
    };
    r.error.retry_after_ms = Some(1_000);
    r
}

/// The plugins' `on_connect` verdict on this user (cached per user: see `crate::gate`).
async fn gate_upgrade(
    shared: &Shared,
    user: &str,
    address: String,
    origin: Option<&str>,
) -> Result<(), Refusal> {
    let gate = &shared.hub.connect_gate;
    if !gate.enabled() {
        return Ok(());
    }
    let user: UserId = user.into();
    let answer = match gate.admit(&user, now_ms()) {
        Admission::Allowed => return Ok(()),
        Admission::Refused(error) => return Err(refused(error)),
        Admission::Ask(answer) => {
            let ev = EngineEvent::Connect {
                user: user.clone(),
                address,
                origin: origin.map(str::to_owned),
            };
            if shared.events.try_send(ev).is_err() {
                let mut busy = FrameError::new(ErrorCode::Unavailable, "the server is busy; retry");
                busy.retry_after_ms = Some(1_000);
                gate.answer(&user, Err(busy), false, now_ms());
            }
            answer
        }
        Admission::Wait(answer) => answer,
    };
    match answer.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(refused(error)),
        Err(_) => Err(Refusal::new(
            503,
            ErrorCode::Unavailable,
            "the connection check was lost; retry",
        )),
    }
}

fn refused(error: FrameError) -> Refusal {
    Refusal {
        status: error.code.http_status(),
        error,
    }
}

async fn serve_connection(shared: Arc<Shared>, mut stream: TcpStream, slot: Slot) {
    let _ = stream.set_nodelay(true);
    let deadline = Duration::from_millis(shared.config.handshake_timeout_ms.max(1));
    // Boxed: the handshake's state (its buffer, the timer) exists only while it runs, not in
    // every connection's task for its whole life.
    let upgraded = Box::pin(tokio::time::timeout(
        deadline,
        upgrade(&shared, &mut stream),
    ))
    .await;
    drop(slot);
    match upgraded {
        Ok(Some((user, leftover, connection_slot))) => {
            connection::run_connection(shared, stream, user.into(), leftover).await;
            drop(connection_slot);
        }
        Ok(None) => metrics::inc(&shared.hub.counters.upgrades_refused),
        Err(_) => {
            metrics::inc(&shared.hub.counters.upgrades_refused);
            metrics::inc(&shared.hub.counters.handshake_timeouts);
        }
    }
}

/// Reads the request head and answers it: `101` and the user, or an error
/// response and `None`. Also returns bytes the client sent after the head.
async fn upgrade(shared: &Shared, stream: &mut TcpStream) -> Option<(String, Vec<u8>, Slot)> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        if buf.len() == buf.capacity() {
            buf.reserve(1024);
        }
        stream.readable().await.ok()?;
        match stream.try_read_buf(&mut buf) {
            Ok(0) => return None,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => return None,
        }
        let refusal = match websocket::parse_upgrade(&buf) {
            Err(HandshakeError::Incomplete) => continue,
            Err(HandshakeError::Bad(why)) => Refusal::new(400, ErrorCode::BadRequest, why),
            Err(HandshakeError::Version) => Refusal::new(
                426,
                ErrorCode::BadRequest,
                "only WebSocket version 13 is spoken",
            ),
            Err(HandshakeError::TooLarge) => {
                Refusal::new(431, ErrorCode::TooLarge, "request head too large")
            }
            Ok(up) => match admit_upgrade(shared, &up) {
                Ok(user) => {
                    let peer = stream.peer_addr().ok()?;
                    let slot = match shared.connection_slots.take(peer.ip()) {
                        Ok(slot) => slot,
                        Err(why) => {
                            let _ = stream
                                .write_all(&connection_refusal(shared, why).response())
                                .await;
                            let _ = stream.shutdown().await;
                            return None;
                        }
                    };
                    let address = peer.ip().to_string();
                    if let Err(refusal) = gate_upgrade(shared, &user, address, up.origin).await {
                        let _ = stream.write_all(&refusal.response()).await;
                        let _ = stream.shutdown().await;
                        return None;
                    }
                    let leftover = buf[up.head_len..].to_vec();
                    stream
                        .write_all(&websocket::switching_protocols(&up.accept))
                        .await
                        .ok()?;
                    return Some((user, leftover, slot));
                }
                Err(refusal) => refusal,
            },
        };
        let _ = stream.write_all(&refusal.response()).await;
        let _ = stream.shutdown().await;
        return None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_bounded_in_all_and_per_address_and_given_back() {
        let slots = AddressSlots::new(3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = slots.take(a).unwrap();
        let _a2 = slots.take(a).unwrap();
        assert_eq!(slots.take(a).unwrap_err(), NoSlot::Address);
        let _b1 = slots.take(b).unwrap();
        assert_eq!(slots.take(b).unwrap_err(), NoSlot::Busy);
        drop(a1);
        assert_eq!(slots.in_use(), 2);
        let _a3 = slots.take(a).unwrap();
    }

    #[test]
    fn the_token_is_read_from_the_query() {
        assert_eq!(token_from_query("a=1&token=xyz"), Some("xyz"));
        assert_eq!(token_from_query("token="), None);
        assert_eq!(token_from_query("x=token=1"), None);
    }
}
