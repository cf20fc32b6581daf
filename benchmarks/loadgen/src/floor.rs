//! `floor`: what delivering small frames over loopback TCP costs with no chat
//! server at all, on the same machine and in the same run.
//!
//! One process holds both ends of `pairs` connections. A writer task sends
//! `rate` frames per second, one `write` per frame, round-robin over the
//! connections (as a chat server delivers to members of many small groups: one
//! frame per socket, nothing to coalesce); each connection's reader stamps the
//! frame's arrival against its scheduled time. The process's CPU time over the
//! run is the kernel's and tokio's price per delivery: the floor under any
//! server's figure at that rate on these cores.

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
    // SAFETY: getrusage only writes into the struct we pass.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
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

pub async fn floor(plan: Plan) -> Value {
    let pairs = plan.pairs.max(1);
    let (mut servers, clients) = match connect_pairs(pairs).await {
        Ok(p) => p,
        Err(e) => return json!({"error": format!("connect: {e}")}),
    };
    let total = (plan.rate * plan.seconds).round() as u64;
    let start_ns = now_ns() + 200_000_000;
    let mut readers = Vec::new();
    for (i, mut stream) in clients.into_iter().enumerate() {
        // Frames k with k % pairs == i go to connection i.
        let expected = (total + (pairs - 1 - i) as u64) / pairs as u64;
        readers.push(tokio::spawn(async move {
            let mut samples = Vec::with_capacity(expected as usize);
            // One socket's frames are scheduled in increasing order: anything else is a fault.
            let (mut last, mut duplicated, mut out_of_order) = (0u64, 0u64, 0u64);
            let (mut buf, mut have) = (vec![0u8; 4096], 0usize);
            let deadline = Instant::now() + Duration::from_secs_f64(plan.seconds + 10.0);
            while (samples.len() as u64) < expected {
                let left = deadline.saturating_duration_since(Instant::now());
                let n = match tokio::time::timeout(left, stream.read(&mut buf[have..])).await {
                    Ok(Ok(n)) if n > 0 => n,
                    _ => break,
                };
                have += n;
                let at = now_ns();
                let whole = have / FRAME_BYTES * FRAME_BYTES;
                for f in buf[..whole].chunks_exact(FRAME_BYTES) {
                    let mut stamp = [0u8; 8];
                    stamp.copy_from_slice(&f[..8]);
                    let scheduled = u64::from_le_bytes(stamp);
                    match scheduled.cmp(&last) {
                        std::cmp::Ordering::Equal => duplicated += 1,
                        std::cmp::Ordering::Less => out_of_order += 1,
                        std::cmp::Ordering::Greater => last = scheduled,
                    }
                    samples.push(at.saturating_sub(scheduled));
                }
                buf.copy_within(whole..have, 0);
                have -= whole;
            }
            (samples, expected, duplicated, out_of_order, stream)
        }));
    }
    let cpu0 = cpu_seconds();
    let writer = tokio::spawn(async move {
        let mut frame = [b'x'; FRAME_BYTES];
        let (mut written, mut write_errors) = (0u64, 0u64);
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        while written < total {
            tick.tick().await;
            let due = (now_ns().saturating_sub(start_ns) as f64 * plan.rate / 1e9) as u64;
            while written < due.min(total) {
                let scheduled = start_ns + (written as f64 * 1e9 / plan.rate) as u64;
                frame[..8].copy_from_slice(&scheduled.to_le_bytes());
                let socket = &mut servers[(written % pairs as u64) as usize];
                if socket.write_all(&frame).is_err() {
                    write_errors += 1; // counted as lost too, by the reader
                }
                written += 1;
            }
        }
        (written, write_errors, servers)
    });
    let (written, write_errors, _servers) = writer.await.unwrap_or((0, 0, Vec::new()));
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
    let (mut received, mut missing, mut keep) = (0u64, 0u64, Vec::new());
    let (mut duplicated, mut out_of_order) = (0u64, 0u64);
    for r in readers {
        if let Ok((samples, expected, dup, ooo, stream)) = r.await {
            received += samples.len() as u64;
            missing += expected.saturating_sub(samples.len() as u64);
            duplicated += dup;
            out_of_order += ooo;
            samples.iter().for_each(|&v| record(&mut h, v));
            keep.push(stream);
        }
    }
    let cpu1 = cpu_seconds();
    let (user, system) = (cpu1.0 - cpu0.0, cpu1.1 - cpu0.1);
    json!({"pairs": pairs, "rate": plan.rate, "seconds": plan.seconds, "frame_bytes": FRAME_BYTES,
           "written": written, "received": received, "write_errors": write_errors,
           "cpu_user_s": user, "cpu_system_s": system,
           "cores_busy": (user + system) / plan.seconds,
           "cpu_us_per_delivery": (user + system) * 1e6 / received.max(1) as f64,
           "write_to_read": summary(&h),
           "lost": missing, "duplicated": duplicated, "out_of_order": out_of_order})
}
