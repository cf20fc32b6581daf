//! `floor`: what delivering small frames over loopback TCP costs with no chat
//! server at all, on the same machine and in the same run.
//!
//! One process holds both ends of `pairs` connections. `writers` threads (as
//! many as the server's gateway runtime has workers) send `rate` frames per
//! second between them, one `write` per frame, each thread round-robin over its
//! own share of the connections (as a chat server delivers to members of many
//! small groups: one frame per socket, nothing to coalesce). Frames fall due on
//! a 1 ms tick, as the load generator's senders' timers do. Each connection's
//! reader (a task on this process's tokio runtime, like the latency scenario's
//! receivers) stamps a frame's arrival against the instant it was written (the
//! clock of the latency scenario's send -> receive) and against its scheduled
//! time. The process's CPU time over the run is the kernel's and tokio's price
//! per delivery: the floor under any server's figure at that rate on these
//! cores. It has no parsing, no fan-out logic and no store.

use std::io::Write;
use std::net::TcpStream as StdStream;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

use crate::{now_ns, record, summary, Plan};

/// About the size of a `msg` frame (JSON with its ids and 64 bytes of content).
const FRAME_BYTES: usize = 256;

/// (user, system) CPU seconds this process has used.
fn cpu_seconds() -> (f64, f64) {
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage only writes into the struct we pass.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (s(u.ru_utime), s(u.ru_stime))
}

async fn connect_pairs(n: usize) -> std::io::Result<(Vec<StdStream>, Vec<TcpStream>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (mut servers, mut clients) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (client, (server, _)) = (client?, accepted?);
        client.set_nodelay(true)?;
        server.set_nodelay(true)?;
        clients.push(client);
        // Blocking writes: a frame is never cut in two (a full socket would stall the writer,
        // which then shows as lateness, not as lost frames).
        let server = server.into_std()?;
        server.set_nonblocking(false)?;
        servers.push(server);
    }
    Ok((servers, clients))
}

/// How many of `total` items, dealt round-robin over `n` places, land in place `i`.
fn share(total: u64, n: usize, i: usize) -> u64 {
    (total + (n - 1 - i) as u64) / n as u64
}

/// One writer thread: frames `w`, `w + writers`, ... of the run's schedule (frame k is due
/// at `start_ns + k / rate`), dealt round-robin over `sockets`.
fn write_frames(
    w: usize,
    writers: usize,
    frames: u64,
    rate: f64,
    start_ns: u64,
    mut sockets: Vec<StdStream>,
) -> (u64, u64, Vec<StdStream>) {
    let mut frame = [b'x'; FRAME_BYTES];
    let (mut written, mut write_errors) = (0u64, 0u64);
    let tick = Duration::from_millis(1);
    let mut next_tick = Instant::now();
    while written < frames {
        next_tick += tick;
        if let Some(wait) = next_tick.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let now = now_ns();
        while written < frames {
            let k = w as u64 + written * writers as u64;
            let scheduled = start_ns + (k as f64 * 1e9 / rate) as u64;
            if scheduled > now {
                break;
            }
            let place = (written % sockets.len() as u64) as usize;
            let socket = &mut sockets[place];
            frame[..8].copy_from_slice(&scheduled.to_le_bytes());
            frame[8..16].copy_from_slice(&now_ns().to_le_bytes());
            if socket.write_all(&frame).is_err() {
                write_errors += 1; // counted as lost too, by the reader
            }
            written += 1;
        }
    }
    (written, write_errors, sockets)
}

pub async fn floor(plan: Plan) -> Value {
    let pairs = plan.pairs.max(1);
    let writers = plan.writers.clamp(1, pairs);
    let (servers, clients) = match connect_pairs(pairs).await {
        Ok(p) => p,
        Err(e) => return json!({"error": format!("connect: {e}")}),
    };
    let total = (plan.rate * plan.seconds).round() as u64;
    let start_ns = now_ns() + 200_000_000;
    // Connection c belongs to writer c % writers, at place c / writers of its round-robin.
    let frames_of = |w: usize| share(total, writers, w);
    let mut readers = Vec::new();
    for (c, mut stream) in clients.into_iter().enumerate() {
        let (w, place) = (c % writers, c / writers);
        let expected = share(
            frames_of(w),
            share(pairs as u64, writers, w) as usize,
            place,
        );
        readers.push(tokio::spawn(async move {
            // From the write, and from the schedule (which adds the writer's lateness).
            let (mut from_write, mut from_schedule) = (
                Vec::with_capacity(expected as usize),
                Vec::with_capacity(expected as usize),
            );
            // One socket's frames are scheduled in increasing order: anything else is a fault.
            let (mut last, mut duplicated, mut out_of_order) = (0u64, 0u64, 0u64);
            let (mut buf, mut have) = (vec![0u8; 4096], 0usize);
            let deadline = Instant::now() + Duration::from_secs_f64(plan.seconds + 10.0);
            while (from_write.len() as u64) < expected {
                let left = deadline.saturating_duration_since(Instant::now());
                let n = match tokio::time::timeout(left, stream.read(&mut buf[have..])).await {
                    Ok(Ok(n)) if n > 0 => n,
                    _ => break,
                };
                have += n;
                let at = now_ns();
                let whole = have / FRAME_BYTES * FRAME_BYTES;
                for f in buf[..whole].chunks_exact(FRAME_BYTES) {
                    let stamp = |i: usize| {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(&f[i * 8..i * 8 + 8]);
                        u64::from_le_bytes(b)
                    };
                    let (scheduled, written) = (stamp(0), stamp(1));
                    match scheduled.cmp(&last) {
                        std::cmp::Ordering::Equal => duplicated += 1,
                        std::cmp::Ordering::Less => out_of_order += 1,
                        std::cmp::Ordering::Greater => last = scheduled,
                    }
                    from_write.push(at.saturating_sub(written));
                    from_schedule.push(at.saturating_sub(scheduled));
                }
                buf.copy_within(whole..have, 0);
                have -= whole;
            }
            (
                from_write,
                from_schedule,
                expected,
                duplicated,
                out_of_order,
                stream,
            )
        }));
    }
    let mut owned: Vec<Vec<StdStream>> = (0..writers).map(|_| Vec::new()).collect();
    for (c, s) in servers.into_iter().enumerate() {
        owned[c % writers].push(s);
    }
    let cpu0 = cpu_seconds();
    let threads: Vec<_> = owned
        .into_iter()
        .enumerate()
        .map(|(w, sockets)| {
            let (frames, rate) = (frames_of(w), plan.rate);
            std::thread::spawn(move || write_frames(w, writers, frames, rate, start_ns, sockets))
        })
        .collect();
    let (mut written, mut write_errors, mut open_ends) = (0u64, 0u64, Vec::new());
    for t in threads {
        let (n, e, sockets) = tokio::task::spawn_blocking(move || t.join())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or((0, 0, Vec::new()));
        written += n;
        write_errors += e;
        open_ends.push(sockets);
    }
    let new_h = || Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    let (mut h, mut hs) = (new_h(), new_h());
    let (mut received, mut missing, mut keep) = (0u64, 0u64, Vec::new());
    let (mut duplicated, mut out_of_order) = (0u64, 0u64);
    for r in readers {
        if let Ok((from_write, from_schedule, expected, dup, ooo, stream)) = r.await {
            received += from_write.len() as u64;
            missing += expected.saturating_sub(from_write.len() as u64);
            duplicated += dup;
            out_of_order += ooo;
            from_write.iter().for_each(|&v| record(&mut h, v));
            from_schedule.iter().for_each(|&v| record(&mut hs, v));
            keep.push(stream);
        }
    }
    let cpu1 = cpu_seconds();
    let (user, system) = (cpu1.0 - cpu0.0, cpu1.1 - cpu0.1);
    json!({"pairs": pairs, "writers": writers, "rate": plan.rate, "seconds": plan.seconds,
           "frame_bytes": FRAME_BYTES, "written": written, "received": received,
           "write_errors": write_errors,
           "cpu_user_s": user, "cpu_system_s": system,
           "cores_busy": (user + system) / plan.seconds,
           "cpu_us_per_delivery": (user + system) * 1e6 / received.max(1) as f64,
           "write_to_read": summary(&h), "write_to_read_from_schedule": summary(&hs),
           "lost": missing, "duplicated": duplicated, "out_of_order": out_of_order})
}
