//! Gateway counters, read by Python's `/metrics`.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($name:ident),* $(,)?) => {
        #[derive(Debug, Default)]
        pub struct Counters { $(pub $name: AtomicU64,)* }

        impl Counters {
            /// Every counter with its name, for exposition.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name.load(Ordering::Relaxed)),)*]
            }
        }
    };
}

counters!(
    connections_accepted,
    connections_closed,
    upgrades_refused,
    upgrades_rate_limited,
    // Upgrades refused by the connection caps: per user, per client address, in all.
    upgrades_refused_per_user,
    upgrades_refused_per_address,
    upgrades_refused_at_capacity,
    frames_in,
    frames_out,
    bad_frames,
    queue_overflows,
    heartbeat_timeouts,
    messages_fanned_out,
    deliveries,
    batches,
    batch_events,
    // A connection found the engine's queue full and stopped reading until it had room.
    engine_queue_full_waits,
    // A retry found its first attempt in flight past the deadline (its batch was lost).
    sends_in_flight_expired,
    // Backlog rows streamed to syncing connections; syncs run again because the live
    // messages held meanwhile overflowed; syncs whose connection was closed for that.
    sync_rows,
    sync_restarts,
    sync_gave_up,
    // Sockets whose upgrade request did not arrive in time; sockets refused before any
    // request was read because their address (or everyone) had too many handshakes open.
    handshake_timeouts,
    handshakes_refused_per_address,
    handshakes_refused_busy,
    // Pings answered by a pong already waiting to be written (one pong for them all).
    pongs_coalesced,
    presence_changes,
    presence_frames,
    // Sends that repeated an acked one, answered with the original ack: from the gateway's
    // idempotency window, or (older, or after a restart) by the store's index.
    retries_answered_from_window,
    retries_answered_by_store,
    // Microseconds summed over sends (divide by `sends_timed`): admitted by the
    // gateway -> taken by the engine -> acked and fanned out.
    sends_timed,
    send_to_engine_us,
    send_to_fanout_us,
    // Sends acked and fanned out within 1 / 5 / 20 / 100 ms of admission (cumulative, like
    // histogram buckets): where the tail of the latency is spent, server side.
    sends_fanned_out_within_1ms,
    sends_fanned_out_within_5ms,
    sends_fanned_out_within_20ms,
    sends_fanned_out_within_100ms,
);

/// Counts a send's admission-to-fan-out time into the cumulative buckets.
pub fn observe_send(c: &Counters, us: u64) {
    add(&c.send_to_fanout_us, us);
    for (limit, bucket) in [
        (1_000, &c.sends_fanned_out_within_1ms),
        (5_000, &c.sends_fanned_out_within_5ms),
        (20_000, &c.sends_fanned_out_within_20ms),
        (100_000, &c.sends_fanned_out_within_100ms),
    ] {
        if us <= limit {
            inc(bucket);
        }
    }
}

pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}
