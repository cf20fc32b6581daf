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
    frames_in,
    frames_out,
    bad_frames,
    queue_overflows,
    heartbeat_timeouts,
    messages_fanned_out,
    deliveries,
    batches,
    batch_events,
    presence_changes,
    presence_frames,
    // Microseconds summed over sends (divide by `sends_timed`): admitted by the
    // gateway -> taken by the engine -> acked and fanned out.
    sends_timed,
    send_to_engine_us,
    send_to_fanout_us,
);

pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}
