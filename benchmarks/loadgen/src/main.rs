//! pychat-loadgen: the benchmark suite's load generator, speaking PROTOCOL.md.
//!
//! Usage: `pychat-loadgen PLAN.json` — the plan (written by benchmarks/suite.py)
//! names the scenario, the server, the tokens and the chats. Results are one
//! JSON object on stdout; scenarios that hold connections print
//! `{"event":"ready"}` first so the caller can measure the server meanwhile.
//! Every scenario counts lost, duplicated and out-of-order deliveries: a fast
//! wrong answer is a failure.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

mod floor;

type Ws = WebSocketStream<TcpStream>;

/// A field this generator does not know is an error, not ignored: a plan written for a newer
/// generator than the binary at hand must not run as something else.
#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct Plan {
    scenario: String,
    server: SocketAddr,
    /// Several nodes of one service: a scenario's connection `i` (of each list it opens) goes to
    /// `servers[i % len]` instead of `server`.
    #[serde(default)]
    servers: Vec<SocketAddr>,
    #[serde(default)]
    source_ips: Vec<IpAddr>,
    #[serde(default)]
    tokens: Vec<String>,
    #[serde(default)]
    chat_id: String,
    #[serde(default)]
    groups: Vec<Group>,
    #[serde(default)]
    messages: u64,
    #[serde(default = "default_window")]
    window: usize,
    #[serde(default)]
    seconds: f64,
    #[serde(default)]
    rate: f64,
    #[serde(default = "default_content")]
    content_bytes: usize,
    /// Latency: seconds between "ready" and the first scheduled send, so the
    /// measurement starts after the server has digested the connect storm.
    #[serde(default = "default_warmup")]
    warmup_s: f64,
    #[serde(default)]
    expected: HashMap<String, u64>,
    /// Floor: connections whose both ends this process holds.
    #[serde(default)]
    pairs: usize,
    /// Floor: threads writing the frames (each owns its share of the connections), as many as
    /// the server's gateway runtime has workers.
    #[serde(default = "default_writers")]
    writers: usize,
    /// Idle: each connection sends `sync` and waits for `synced` before "ready", expecting
    /// this many chats and messages per user.
    #[serde(default)]
    sync_expect: Option<SyncExpect>,
    /// Persist: where to write every ack (chat, seq, message_id, client_msg_id, and for a
    /// sample of `verify_sample` the content sent), for the caller to check against the store.
    #[serde(default)]
    acks_file: Option<String>,
    #[serde(default = "default_verify_sample")]
    verify_sample: u64,
}

impl Plan {
    /// Where connection `index` goes.
    fn server_for(&self, index: usize) -> SocketAddr {
        if self.servers.is_empty() {
            self.server
        } else {
            self.servers[index % self.servers.len()]
        }
    }

    /// The plan without its (large) lists.
    fn clone_settings(&self) -> Plan {
        Plan {
            scenario: self.scenario.clone(),
            server: self.server,
            servers: self.servers.clone(),
            source_ips: self.source_ips.clone(),
            tokens: Vec::new(),
            chat_id: self.chat_id.clone(),
            groups: Vec::new(),
            messages: self.messages,
            window: self.window,
            seconds: self.seconds,
            rate: self.rate,
            content_bytes: self.content_bytes,
            warmup_s: self.warmup_s,
            expected: HashMap::new(),
            pairs: self.pairs,
            writers: self.writers,
            sync_expect: self.sync_expect.clone(),
            acks_file: self.acks_file.clone(),
            verify_sample: self.verify_sample,
        }
    }
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct SyncExpect {
    chats: u64,
    messages: u64,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct Group {
    chat_id: String,
    /// The first member sends; the others receive.
    members: Vec<String>,
}

fn default_window() -> usize {
    64
}

fn default_warmup() -> f64 {
    0.5
}

fn default_content() -> usize {
    64
}

/// The gateway's default `runtime_threads`.
fn default_writers() -> usize {
    2
}

fn default_verify_sample() -> u64 {
    1000
}

/// Per-connection read buffer of the generator's WebSocket clients.
const READ_BUFFER_BYTES: usize = 4 * 1024;

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

async fn open(plan: &Plan, index: usize, token: &str) -> Result<Ws, String> {
    let socket = TcpSocket::new_v4().map_err(|e| e.to_string())?;
    if !plan.source_ips.is_empty() {
        // Spread over source addresses: each has its own ~28k ephemeral ports.
        let ip = plan.source_ips[index % plan.source_ips.len()];
        // Pick the port at connect() (by the 4-tuple), not at bind(): a bind to
        // port 0 searches the bound ports, which made connecting 19,000 ten
        // times slower than connecting 2,000.
        let one: libc::c_int = 1;
        // SAFETY: a valid socket fd and a c_int option of the right size.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&socket),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        socket
            .bind(SocketAddr::new(ip, 0))
            .map_err(|e| e.to_string())?;
    }
    let server = plan.server_for(index);
    let stream = socket.connect(server).await.map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let url = format!("ws://{server}/ws?token={token}");
    // tungstenite zero-fills its whole read buffer before every read (128 KiB by
    // default): that memset was more than half of this generator's CPU.
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES);
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(config))
        .await
        .map_err(|e| e.to_string())?;
    match ws.next().await {
        Some(Ok(Message::Text(t))) if t.as_str().contains("\"hello\"") => Ok(ws),
        other => Err(format!("no hello: {other:?}")),
    }
}

/// Opens every token's connection (a bounded number of handshakes at a time), retrying refusals.
async fn open_all(plan: &Plan, tokens: &[String]) -> (Vec<Ws>, u64, f64) {
    let started = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(256));
    let failures = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(tokens.len());
    // Only the dialing part of the plan: cloning the whole plan (every token)
    // per connection made connecting N connections O(N^2).
    let dial = Arc::new(plan.clone_settings());
    for (i, token) in tokens.iter().enumerate() {
        let (plan, token, sem, failures) =
            (dial.clone(), token.clone(), sem.clone(), failures.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire().await.expect("semaphore");
            for attempt in 0..50u64 {
                match open(&plan, i, &token).await {
                    Ok(ws) => return Some(ws),
                    Err(_) => {
                        failures.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(20 * (attempt + 1))).await;
                    }
                }
            }
            None
        }));
    }
    let mut out = Vec::with_capacity(tokens.len());
    for t in tasks {
        if let Ok(Some(ws)) = t.await {
            out.push(ws);
        }
    }
    (
        out,
        failures.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64(),
    )
}

/// The next text frame within `wait`, answering pings on the way (tungstenite queues
/// the pong; a flush sends it). `None` when the connection ends or stays silent.
async fn next_text(
    ws: &mut Ws,
    wait: Duration,
) -> Option<tokio_tungstenite::tungstenite::Utf8Bytes> {
    loop {
        match tokio::time::timeout(wait, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return Some(t),
            Ok(Some(Ok(Message::Ping(_)))) => {
                let _ = ws.flush().await;
            }
            Ok(Some(Ok(_))) => {}
            _ => return None,
        }
    }
}

/// The fields of a server frame the scenarios read, borrowed from the text (no
/// allocation per frame: at 200,000 deliveries/s a `Value` per frame was a
/// large part of this generator's CPU).
#[derive(Deserialize)]
struct Incoming<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    #[serde(default, borrow)]
    chat_id: Option<&'a str>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default, borrow)]
    content: Option<&'a str>,
    #[serde(default, borrow)]
    client_msg_id: Option<&'a str>,
    #[serde(default, borrow)]
    message_id: Option<&'a str>,
}

/// `None` for frames that are not JSON objects with a `type`.
fn incoming(text: &str) -> Option<Incoming<'_>> {
    serde_json::from_str(text).ok()
}

fn frame(v: &Value) -> Message {
    Message::Text(v.to_string().into())
}

/// Sends `sync` and reads until `synced`; returns the chats' last seqs and the msgs seen.
async fn sync(ws: &mut Ws) -> (HashMap<String, u64>, Vec<Value>) {
    let _ = ws.send(frame(&json!({"type": "sync", "since": {}}))).await;
    let mut msgs = Vec::new();
    while let Some(Ok(m)) = ws.next().await {
        if let Message::Text(t) = m {
            let v: Value = serde_json::from_str(t.as_str()).unwrap_or(Value::Null);
            match v["type"].as_str() {
                Some("synced") => {
                    let chats = v["chats"]
                        .as_object()
                        .map(|o| {
                            o.iter()
                                .map(|(k, s)| (k.clone(), s.as_u64().unwrap_or(0)))
                                .collect()
                        })
                        .unwrap_or_default();
                    return (chats, msgs);
                }
                Some("msg") => msgs.push(v),
                _ => {}
            }
        }
    }
    (HashMap::new(), msgs)
}

/// Per receiver and chat: the next seq expected, and what went wrong.
#[derive(Default)]
struct Order {
    next: HashMap<String, u64>,
    lost: u64,
    duplicated: u64,
    out_of_order: u64,
}

impl Order {
    /// Adds one receiver's counts, with `missing` messages it never got counted as lost.
    fn merge(&mut self, other: &Order, missing: u64) {
        self.lost += other.lost + missing;
        self.duplicated += other.duplicated;
        self.out_of_order += other.out_of_order;
    }

    fn see(&mut self, chat: &str, seq: u64) {
        if !self.next.contains_key(chat) {
            self.next.insert(chat.to_owned(), seq);
        }
        let next = self.next.get_mut(chat).expect("inserted above");
        if seq == *next {
            *next += 1;
        } else if seq < *next {
            self.duplicated += 1;
        } else {
            self.out_of_order += 1;
            self.lost += seq - *next;
            *next = seq + 1;
        }
    }
}

/// What the idle scenario's `sync` of every connection returned.
#[derive(Default)]
struct Synced {
    connections: u64,
    chats: u64,
    messages: u64,
    /// Connections whose `synced` listed fewer chats than expected (or never came).
    incomplete: u64,
    order: Order,
}

/// Each connection sends `sync` (from nothing) and reads until `synced`, a bounded number
/// at a time; every chat's messages must arrive from seq 1 without gap or repeat.
async fn sync_all(conns: Vec<Ws>, expect: &SyncExpect) -> (Vec<Ws>, Synced) {
    let sem = Arc::new(tokio::sync::Semaphore::new(256));
    let mut tasks = Vec::with_capacity(conns.len());
    for mut ws in conns {
        let sem = sem.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire().await.expect("semaphore");
            let got = tokio::time::timeout(Duration::from_secs(120), sync(&mut ws)).await;
            (ws, got.ok())
        }));
    }
    let (mut out, mut s) = (Vec::with_capacity(tasks.len()), Synced::default());
    for t in tasks {
        let Ok((ws, got)) = t.await else { continue };
        out.push(ws);
        let Some((chats, msgs)) = got else {
            s.incomplete += 1;
            s.order.lost += expect.messages;
            continue;
        };
        s.connections += 1;
        s.chats += chats.len() as u64;
        s.messages += msgs.len() as u64;
        s.incomplete += u64::from((chats.len() as u64) < expect.chats);
        let mut order = Order::default();
        for m in &msgs {
            let chat = m["chat_id"].as_str().unwrap_or("").to_owned();
            order.next.entry(chat.clone()).or_insert(1);
            order.see(&chat, m["seq"].as_u64().unwrap_or(0));
        }
        let missing = expect.messages.saturating_sub(msgs.len() as u64);
        s.order.merge(&order, missing);
    }
    (out, s)
}

async fn idle(plan: Plan) -> Value {
    let (conns, failures, secs) = open_all(&plan, &plan.tokens).await;
    let synced_at = Instant::now();
    let (conns, synced) = match &plan.sync_expect {
        Some(expect) => sync_all(conns, expect).await,
        None => (conns, Synced::default()),
    };
    let sync_s = synced_at.elapsed().as_secs_f64();
    let n = conns.len();
    println!(
        "{}",
        json!({"event": "ready", "connected": n, "synced": synced.connections})
    );
    // Hold: read everything (pings are answered by the reader) until the time is up.
    let hold = Duration::from_secs_f64(plan.seconds.max(1.0));
    let mut tasks = Vec::new();
    for mut ws in conns {
        tasks.push(tokio::spawn(async move {
            let deadline = tokio::time::sleep(hold);
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    _ = &mut deadline => break,
                    m = ws.next() => match m {
                        // tungstenite queues the pong for a ping; only a flush sends it.
                        Some(Ok(Message::Ping(_))) => { let _ = ws.flush().await; }
                        Some(Ok(_)) => {}
                        _ => return false,
                    },
                }
            }
            let _ = ws.close(None).await;
            true
        }));
    }
    let mut alive = 0;
    for t in tasks {
        alive += u64::from(t.await.unwrap_or(false));
    }
    let mut out = json!({"connected": n, "connect_failures": failures, "connect_s": secs,
           "connect_per_s": n as f64 / secs.max(1e-9), "alive_at_end": alive});
    if plan.sync_expect.is_some() {
        let o = &synced.order;
        let extra = json!({"synced": synced.connections, "sync_s": sync_s,
            "synced_chats": synced.chats, "synced_messages": synced.messages,
            "sync_incomplete": synced.incomplete,
            "lost": o.lost, "duplicated": o.duplicated, "out_of_order": o.out_of_order});
        if let (Some(o), Some(e)) = (out.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
    }
    out
}

async fn fanout(plan: Plan) -> Value {
    let (mut receivers, failures, _) = open_all(&plan, &plan.tokens[1..]).await;
    let mut base = 0;
    for ws in receivers.iter_mut() {
        let (chats, _) = sync(ws).await;
        base = chats.get(&plan.chat_id).copied().unwrap_or(0);
    }
    let m = plan.messages;
    let deliveries = Arc::new(AtomicU64::new(0));
    let orders = Arc::new(Mutex::new(Order::default()));
    let last_delivery = Arc::new(Mutex::new(Instant::now()));
    let mut tasks = Vec::new();
    for mut ws in receivers {
        let (deliveries, orders, last_delivery) =
            (deliveries.clone(), orders.clone(), last_delivery.clone());
        tasks.push(tokio::spawn(async move {
            let mut order = Order::default();
            let mut got = 0;
            while got < m {
                let Some(t) = next_text(&mut ws, Duration::from_secs(30)).await else {
                    break;
                };
                match incoming(t.as_str()) {
                    Some(f) if f.kind == "msg" => {
                        order.see(f.chat_id.unwrap_or(""), f.seq.unwrap_or(0));
                        got += 1;
                        deliveries.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
            *last_delivery.lock().await = Instant::now();
            orders.lock().await.merge(&order, m - got);
            let _ = ws.close(None).await;
        }));
    }
    let mut sender = open(&plan, 0, &plan.tokens[0])
        .await
        .expect("sender connects");
    let body = "x".repeat(plan.content_bytes);
    let started = Instant::now();
    let (mut sent, mut acked) = (0u64, 0u64);
    while acked < m {
        while sent < m && sent - acked < plan.window as u64 {
            let f = json!({"type": "send", "chat_id": plan.chat_id, "client_msg_id": format!("f{sent:012}"), "content": body});
            sender.feed(frame(&f)).await.expect("send");
            sent += 1;
        }
        sender.flush().await.expect("flush");
        match tokio::time::timeout(Duration::from_secs(30), sender.next()).await {
            Ok(Some(Ok(Message::Text(t)))) if t.as_str().contains("\"ack\"") => acked += 1,
            Ok(Some(Ok(_))) => {}
            _ => break,
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    let secs = last_delivery
        .lock()
        .await
        .duration_since(started)
        .as_secs_f64();
    let d = deliveries.load(Ordering::Relaxed);
    let o = orders.lock().await;
    json!({"receivers": plan.tokens.len() - 1, "messages": m, "acked": acked, "deliveries": d,
           "seconds": secs, "deliveries_per_s": d as f64 / secs.max(1e-9), "base_seq": base,
           "connect_failures": failures, "lost": o.lost, "duplicated": o.duplicated, "out_of_order": o.out_of_order})
}

fn record(h: &mut Histogram<u64>, ns: u64) {
    let _ = h.record(ns.max(1) / 1_000); // microseconds
}

fn summary(h: &Histogram<u64>) -> Value {
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    json!({"count": h.len(), "p50_ms": ms(0.5), "p99_ms": ms(0.99), "p999_ms": ms(0.999), "max_ms": h.max() as f64 / 1000.0})
}

async fn latency(plan: Plan) -> Value {
    let receivers_tokens: Vec<String> = plan
        .groups
        .iter()
        .flat_map(|g| g.members[1..].to_vec())
        .collect();
    let senders_tokens: Vec<String> = plan.groups.iter().map(|g| g.members[0].clone()).collect();
    let (idle_conns, _, _) = open_all(&plan, &plan.tokens).await;
    let (receivers, f1, _) = open_all(&plan, &receivers_tokens).await;
    let (senders, f2, _) = open_all(&plan, &senders_tokens).await;
    println!(
        "{}",
        json!({"event": "ready", "connected": idle_conns.len() + receivers.len() + senders.len()})
    );
    let per_group = plan.rate / plan.groups.len().max(1) as f64;
    let per_sender = (per_group * plan.seconds).round() as u64;
    let new_h = || Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    // From the scheduled time (coordinated-omission safe; includes this generator's 1 ms timer
    // lateness) and from the moment the frame was handed to the socket.
    let recv_h = Arc::new(Mutex::new((new_h(), new_h())));
    let ack_h = Arc::new(Mutex::new((new_h(), new_h())));
    let orders = Arc::new(Mutex::new(Order::default()));
    let start_ns = now_ns() + (plan.warmup_s.max(0.1) * 1e9) as u64;
    let mut tasks = Vec::new();
    // Connections stay open until every task is done: a receiver that closed as soon as it had
    // its messages made the server handle a wave of closes while others were still measuring
    // (the latency tail of the last ~300 ms of each run).
    let keep: Arc<std::sync::Mutex<Vec<Ws>>> = Arc::default();
    for mut ws in receivers {
        let (recv_h, orders, keep) = (recv_h.clone(), orders.clone(), keep.clone());
        tasks.push(tokio::spawn(async move {
            // Raw samples per task, histograms only when merged: a histogram per
            // connection (18,000 of them) page-faulted in gigabytes.
            let (mut from_schedule, mut from_send) = (Vec::new(), Vec::new());
            let mut order = Order::default();
            let mut got = 0;
            while got < per_sender {
                let Some(t) = next_text(&mut ws, Duration::from_secs(20)).await else {
                    break;
                };
                let Some(f) = incoming(t.as_str()) else {
                    continue;
                };
                if f.kind == "msg" {
                    let at = now_ns();
                    let mut stamps = f
                        .content
                        .unwrap_or("")
                        .split('|')
                        .map(|s| s.parse::<u64>().unwrap_or(at));
                    let (scheduled, sent) =
                        (stamps.next().unwrap_or(at), stamps.next().unwrap_or(at));
                    from_schedule.push(at.saturating_sub(scheduled));
                    from_send.push(at.saturating_sub(sent));
                    order.see(f.chat_id.unwrap_or(""), f.seq.unwrap_or(0));
                    got += 1;
                }
            }
            {
                let mut h = recv_h.lock().await;
                from_schedule.iter().for_each(|&v| record(&mut h.0, v));
                from_send.iter().for_each(|&v| record(&mut h.1, v));
            }
            orders
                .lock()
                .await
                .merge(&order, per_sender.saturating_sub(got));
            keep.lock().expect("not poisoned").push(ws);
        }));
    }
    let interval_ns = (1e9 / per_group.max(1e-9)) as u64;
    let groups = plan.groups.len().max(1) as u64;
    for (index, (g, ws)) in plan.groups.iter().zip(senders).enumerate() {
        let (chat, ack_h, body) = (
            g.chat_id.clone(),
            ack_h.clone(),
            "x".repeat(plan.content_bytes),
        );
        // Spread the groups' schedules over one interval.
        // (By group index: an offset from the task count packed 100 groups' sends into the
        // last tenth of the interval, i.e. bursts at ten times the nominal rate.)
        let offset = interval_ns * index as u64 / groups;
        let keep = keep.clone();
        tasks.push(tokio::spawn(async move {
            let (mut sink, mut stream) = ws.split();
            let scheduled: Arc<Mutex<HashMap<u64, (u64, u64)>>> = Arc::default();
            let reader = {
                let (scheduled, ack_h) = (scheduled.clone(), ack_h.clone());
                tokio::spawn(async move {
                    let (mut from_schedule, mut from_send) = (Vec::new(), Vec::new());
                    let mut acks = 0;
                    while acks < per_sender {
                        // Pings are answered by the sender half's regular writes (they flush the pong).
                        let t = match tokio::time::timeout(Duration::from_secs(20), stream.next()).await {
                            Ok(Some(Ok(Message::Text(t)))) => t,
                            Ok(Some(Ok(_))) => continue,
                            _ => break,
                        };
                        let Some(f) = incoming(t.as_str()) else { continue };
                        if f.kind == "ack" {
                            let i: u64 = f
                                .client_msg_id
                                .and_then(|s| s.rsplit('-').next())
                                .and_then(|s| s.parse().ok())
                                .unwrap_or(0);
                            if let Some((at, sent)) = scheduled.lock().await.remove(&i) {
                                let now = now_ns();
                                from_schedule.push( now.saturating_sub(at));
                                from_send.push( now.saturating_sub(sent));
                            }
                            acks += 1;
                        }
                    }
                    let mut h = ack_h.lock().await;
                    from_schedule.iter().for_each(|&v| record(&mut h.0, v));
                    from_send.iter().for_each(|&v| record(&mut h.1, v));
                    stream
                })
            };
            for i in 0..per_sender {
                // Open loop: the send time is the schedule, whatever happened before.
                let at = start_ns + offset + i * interval_ns;
                let now = now_ns();
                if at > now {
                    tokio::time::sleep(Duration::from_nanos(at - now)).await;
                }
                let sent = now_ns();
                scheduled.lock().await.insert(i, (at, sent));
                // Unique per run: a rerun against the same server must not be answered as retries.
                let f = json!({"type": "send", "chat_id": chat, "client_msg_id": format!("{start_ns}-{i:012}"), "content": format!("{at}|{sent}|{body}")});
                if sink.send(frame(&f)).await.is_err() {
                    break;
                }
            }
            if let Ok(stream) = reader.await {
                if let Ok(ws) = sink.reunite(stream) {
                    keep.lock().expect("not poisoned").push(ws);
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    drop(keep);
    drop(idle_conns);
    let o = orders.lock().await;
    json!({"groups": plan.groups.len(), "rate": plan.rate, "seconds": plan.seconds, "idle": plan.tokens.len(),
           "send_to_receive": summary(&recv_h.lock().await.1), "send_to_ack": summary(&ack_h.lock().await.1),
           "send_to_receive_from_schedule": summary(&recv_h.lock().await.0),
           "send_to_ack_from_schedule": summary(&ack_h.lock().await.0),
           "connect_failures": f1 + f2, "lost": o.lost, "duplicated": o.duplicated, "out_of_order": o.out_of_order})
}

/// One acked send of the persist scenario, in the order its ack arrived.
struct Acked {
    seq: u64,
    /// Its position in the connection's sends (the client_msg_id's counter).
    index: u64,
    message_id: String,
}

/// What one persist connection saw of its chat: every ack, and how their seqs ran.
#[derive(Default)]
struct ChatAcks {
    acks: Vec<Acked>,
    /// An ack whose seq was not the previous one + 1: skipped seqs, a seq again, or lower.
    seq_gaps: u64,
    seq_repeats: u64,
    seq_backwards: u64,
    /// A second ack for one send, and acks naming another chat.
    duplicated: u64,
    wrong_chat: u64,
}

impl ChatAcks {
    fn see(&mut self, seq: u64, index: u64, message_id: &str, acked: &mut [bool]) {
        if let Some(prev) = self.acks.last().map(|a| a.seq) {
            match seq.cmp(&(prev + 1)) {
                std::cmp::Ordering::Equal => {}
                std::cmp::Ordering::Greater => self.seq_gaps += 1,
                std::cmp::Ordering::Less if seq == prev => self.seq_repeats += 1,
                std::cmp::Ordering::Less => self.seq_backwards += 1,
            }
        }
        match acked.get_mut(index as usize) {
            Some(seen) if !*seen => *seen = true,
            _ => self.duplicated += 1,
        }
        self.acks.push(Acked {
            seq,
            index,
            message_id: message_id.to_owned(),
        });
    }
}

/// The content of send `index` of run `run`: its client_msg_id first, so the store can be
/// checked for the right content per message (padded to `bytes`, the size measured before).
fn persist_key(run: u64, index: u64) -> String {
    format!("{run}-{index:012}")
}

fn persist_content(key: &str, bytes: usize) -> String {
    let mut c = String::with_capacity(bytes.max(key.len() + 1));
    c.push_str(key);
    c.push('|');
    while c.len() < bytes {
        c.push('x');
    }
    c
}

/// Every ack, one line each: chat, seq, message_id, client_msg_id, and the content sent for
/// one ack in `stride` (empty for the others).
fn write_acks(
    path: &str,
    run: u64,
    bytes: usize,
    chats: &[(String, ChatAcks)],
    stride: u64,
) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut n = 0u64;
    for (chat, c) in chats {
        for a in &c.acks {
            let key = persist_key(run, a.index);
            let content = if n.is_multiple_of(stride) {
                persist_content(&key, bytes)
            } else {
                String::new()
            };
            writeln!(out, "{chat}\t{}\t{}\t{key}\t{content}", a.seq, a.message_id)?;
            n += 1;
        }
    }
    out.flush()
}

async fn persist(plan: Plan) -> Value {
    let run = now_ns();
    let chats: Vec<String> = plan.groups.iter().map(|g| g.chat_id.clone()).collect();
    let tokens: Vec<String> = plan.groups.iter().map(|g| g.members[0].clone()).collect();
    let (conns, failures, _) = open_all(&plan, &tokens).await;
    let deadline = Instant::now() + Duration::from_secs_f64(plan.seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (mut ws, chat) in conns.into_iter().zip(chats) {
        let (window, bytes) = (plan.window as u64, plan.content_bytes);
        tasks.push(tokio::spawn(async move {
            let (mut sent, mut acked, mut errors) = (0u64, 0u64, 0u64);
            let mut seen = ChatAcks::default();
            // Per send: has it been acked (a second ack is a duplicate).
            let mut was_acked: Vec<bool> = Vec::new();
            let prefix = format!("{run}-");
            loop {
                while Instant::now() < deadline && sent - acked < window {
                    // Unique per run: a rerun against the same server must not be answered as retries.
                    let key = persist_key(run, sent);
                    let f = json!({"type": "send", "chat_id": chat, "client_msg_id": key,
                                   "content": persist_content(&key, bytes)});
                    if ws.feed(frame(&f)).await.is_err() {
                        break;
                    }
                    sent += 1;
                    was_acked.push(false);
                }
                let _ = ws.flush().await;
                if acked + errors >= sent {
                    break;
                }
                let Some(t) = next_text(&mut ws, Duration::from_secs(30)).await else {
                    break;
                };
                match incoming(t.as_str()) {
                    Some(f) if f.kind == "ack" => {
                        if f.chat_id != Some(chat.as_str()) {
                            seen.wrong_chat += 1;
                        }
                        let index = f
                            .client_msg_id
                            .and_then(|k| k.strip_prefix(prefix.as_str()))
                            .and_then(|n| n.parse().ok())
                            .unwrap_or(u64::MAX);
                        let message_id = f.message_id.unwrap_or("");
                        seen.see(f.seq.unwrap_or(0), index, message_id, &mut was_acked);
                        acked += 1;
                    }
                    Some(f) if f.kind == "error" => errors += 1,
                    _ => {}
                }
            }
            (chat, sent, acked, errors, seen)
        }));
    }
    let (mut sent, mut acked, mut errors) = (0, 0, 0);
    let mut per_chat = Vec::new();
    for t in tasks {
        if let Ok((chat, s, a, e, seen)) = t.await {
            sent += s;
            acked += a;
            errors += e;
            per_chat.push((chat, seen));
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let total = |f: fn(&ChatAcks) -> u64| per_chat.iter().map(|(_, c)| f(c)).sum::<u64>();
    let (gaps, repeats, backwards) = (
        total(|c| c.seq_gaps),
        total(|c| c.seq_repeats),
        total(|c| c.seq_backwards),
    );
    let (dup, wrong_chat) = (total(|c| c.duplicated), total(|c| c.wrong_chat));
    let seqs: Vec<Value> = per_chat
        .iter()
        .map(|(chat, c)| {
            json!({"chat_id": chat, "acked": c.acks.len(),
                   "first_seq": c.acks.first().map(|a| a.seq), "last_seq": c.acks.last().map(|a| a.seq)})
        })
        .collect();
    let mut out = json!({"connections": tokens.len(), "sent": sent, "acked": acked, "seconds": secs,
           "acked_per_s": acked as f64 / secs.max(1e-9), "errors": errors, "connect_failures": failures,
           "lost": sent - acked - errors, "duplicated": dup, "out_of_order": gaps + repeats + backwards,
           "ack_seqs": {"gaps": gaps, "repeats": repeats, "backwards": backwards, "wrong_chat": wrong_chat},
           "chats": seqs});
    if let Some(path) = &plan.acks_file {
        let stride = (acked / plan.verify_sample.max(1)).max(1);
        if let Err(e) = write_acks(path, run, plan.content_bytes, &per_chat, stride) {
            out["acks_file_error"] = json!(e.to_string());
        }
    }
    out
}

async fn sync_scenario(plan: Plan) -> Value {
    let started = Instant::now();
    let mut ws = open(&plan, 0, &plan.tokens[0]).await.expect("connects");
    let connected = started.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let (chats, msgs) = sync(&mut ws).await;
    let secs = t0.elapsed().as_secs_f64();
    let mut order = Order::default();
    let mut per_chat: HashMap<String, u64> = HashMap::new();
    for m in &msgs {
        let chat = m["chat_id"].as_str().unwrap_or("").to_owned();
        // Backlogs start at 1 here: the reader has read nothing.
        order.next.entry(chat.clone()).or_insert(1);
        order.see(&chat, m["seq"].as_u64().unwrap_or(0));
        *per_chat.entry(chat).or_default() += 1;
    }
    let missing: u64 = plan
        .expected
        .iter()
        .map(|(c, n)| n.saturating_sub(*per_chat.get(c).unwrap_or(&0)))
        .sum();
    json!({"messages": msgs.len(), "chats": chats.len(), "seconds_to_synced": secs, "connect_s": connected,
           "lost": order.lost + missing, "duplicated": order.duplicated, "out_of_order": order.out_of_order})
}

fn main() {
    let path = std::env::args()
        .nth(1)
        .expect("usage: pychat-loadgen PLAN.json");
    let plan: Plan =
        serde_json::from_slice(&std::fs::read(&path).expect("read plan")).expect("parse plan");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let result = runtime.block_on(async move {
        match plan.scenario.as_str() {
            "idle" => idle(plan).await,
            "fanout" => fanout(plan).await,
            "latency" => latency(plan).await,
            "persist" => persist(plan).await,
            "sync" => sync_scenario(plan).await,
            "floor" => floor::floor(plan).await,
            other => json!({"error": format!("unknown scenario {other}")}),
        }
    });
    println!("{result}");
}
