//! pychat's Rust core, compiled as `pychat._core`: the WebSocket gateway,
//! sequencing and fan-out. The logic modules have no Python in them; the PyO3
//! glue lives in `py` behind the `python` feature.

pub mod cluster;
pub mod fasthash;
pub mod gate;
pub mod gateway;
pub mod hub;
pub mod membership;
pub mod metrics;
pub mod outbox;
pub mod presence;
pub mod protocol;
pub mod ratelimit;
pub mod registry;
pub mod send_guard;
pub mod token;
pub mod typing;
pub mod websocket;

#[cfg(feature = "python")]
mod py;
