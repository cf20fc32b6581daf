//! The connect gate: plugins' `on_connect` verdicts on WebSocket upgrades, asked of Python
//! through the engine's batches and cached per user, so that a reconnect storm asks Python once
//! per user per `ttl`, not once per socket.
//!
//! An upgrade whose token is valid asks the gate: a cached verdict answers at once; otherwise
//! the first upgrade of the user asks (the caller queues one `Connect` event for the engine)
//! and every other upgrade of that user waits for the same answer. An ask that went unanswered
//! for `ASK_TIMEOUT_MS` (the engine lost it) is asked again. Off (`ttl` 0) unless a plugin has
//! the hook.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::protocol::{ErrorCode, FrameError};
use crate::send_guard::UserId;

/// An ask older than this without an answer is asked again.
pub const ASK_TIMEOUT_MS: u64 = 10_000;
/// Cached verdicts kept before the expired ones are first swept (then again each time the
/// cache has doubled since the last sweep: a sweep is never paid per answer).
const SWEEP_AT: usize = 100_000;

pub type Verdict = Result<(), FrameError>;

pub enum Admission {
    Allowed,
    Refused(FrameError),
    /// Ask the engine (queue the event), then wait for the answer.
    Ask(oneshot::Receiver<Verdict>),
    /// Someone asked already: wait for the same answer.
    Wait(oneshot::Receiver<Verdict>),
}

#[derive(Default)]
struct GateState {
    verdicts: HashMap<UserId, (Verdict, u64)>,
    asking: HashMap<UserId, (u64, Vec<oneshot::Sender<Verdict>>)>,
    /// The cache's size at which the next sweep runs.
    sweep_at: usize,
}

#[derive(Default)]
pub struct ConnectGate {
    ttl_ms: AtomicU64,
    state: Mutex<GateState>,
}

impl ConnectGate {
    /// How long a verdict is kept (0: the gate is off, every upgrade is allowed).
    pub fn set_ttl(&self, ttl_ms: u64) {
        self.ttl_ms.store(ttl_ms, Ordering::Relaxed);
        self.state.lock().verdicts.clear();
    }

    pub fn enabled(&self) -> bool {
        self.ttl_ms.load(Ordering::Relaxed) > 0
    }

    pub fn admit(&self, user: &UserId, now: u64) -> Admission {
        let mut state = self.state.lock();
        if let Some((verdict, expires)) = state.verdicts.get(user) {
            if *expires > now {
                return match verdict {
                    Ok(()) => Admission::Allowed,
                    Err(e) => Admission::Refused(e.clone()),
                };
            }
        }
        let (tx, rx) = oneshot::channel();
        match state.asking.get_mut(user) {
            Some((asked_at, waiters)) if now.saturating_sub(*asked_at) < ASK_TIMEOUT_MS => {
                waiters.push(tx);
                Admission::Wait(rx)
            }
            _ => {
                // A lost ask's waiters see their senders dropped (refused as unavailable).
                state.asking.insert(user.clone(), (now, vec![tx]));
                Admission::Ask(rx)
            }
        }
    }

    /// The engine's verdict, given to every upgrade waiting for it, and kept for `ttl` if
    /// `keep` (not a verdict given because a plugin failed, nor one that says to try again).
    pub fn answer(&self, user: &str, verdict: Verdict, keep: bool, now: u64) {
        let ttl = self.ttl_ms.load(Ordering::Relaxed);
        let mut state = self.state.lock();
        let transient = matches!(&verdict, Err(e) if matches!(e.code, ErrorCode::Unavailable | ErrorCode::Internal | ErrorCode::RateLimited));
        if ttl > 0 && keep && !transient {
            if state.verdicts.len() >= state.sweep_at.max(SWEEP_AT) {
                state.verdicts.retain(|_, (_, expires)| *expires > now);
                state.sweep_at = state.verdicts.len() * 2;
            }
            state
                .verdicts
                .insert(user.into(), (verdict.clone(), now.saturating_add(ttl)));
        }
        if let Some((_, waiters)) = state.asking.remove(user) {
            for w in waiters {
                let _ = w.send(verdict.clone());
            }
        }
    }

    pub fn cached(&self) -> usize {
        self.state.lock().verdicts.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused() -> FrameError {
        FrameError::new(ErrorCode::Forbidden, "banned")
    }

    #[test]
    fn one_ask_per_user_and_everyone_waiting_gets_its_answer() {
        let gate = ConnectGate::default();
        gate.set_ttl(60_000);
        let u: UserId = "u1".into();
        let Admission::Ask(mut first) = gate.admit(&u, 0) else {
            panic!("the first upgrade asks")
        };
        let Admission::Wait(mut second) = gate.admit(&u, 5) else {
            panic!("the second waits for the same answer")
        };
        gate.answer("u1", Err(refused()), true, 10);
        assert_eq!(first.try_recv().unwrap(), Err(refused()));
        assert_eq!(second.try_recv().unwrap(), Err(refused()));
        // Cached: no more asks until it expires.
        assert!(matches!(gate.admit(&u, 1_000), Admission::Refused(e) if e == refused()));
        assert!(matches!(gate.admit(&u, 60_010), Admission::Ask(_)));
    }

    #[test]
    fn allowed_users_pass_without_asking_and_try_again_answers_are_not_kept() {
        let gate = ConnectGate::default();
        gate.set_ttl(1_000);
        let u: UserId = "u2".into();
        assert!(matches!(gate.admit(&u, 0), Admission::Ask(_)));
        gate.answer("u2", Ok(()), true, 1);
        assert!(matches!(gate.admit(&u, 500), Admission::Allowed));
        assert_eq!(gate.cached(), 1);
        let v: UserId = "u3".into();
        assert!(matches!(gate.admit(&v, 0), Admission::Ask(_)));
        gate.answer(
            "u3",
            Err(FrameError::new(ErrorCode::Unavailable, "plugin down")),
            true,
            1,
        );
        assert!(
            matches!(gate.admit(&v, 2), Admission::Ask(_)),
            "asked again, not cached"
        );
        let w: UserId = "u5".into();
        assert!(matches!(gate.admit(&w, 0), Admission::Ask(_)));
        gate.answer("u5", Ok(()), false, 1);
        assert!(
            matches!(gate.admit(&w, 2), Admission::Ask(_)),
            "let in, not kept"
        );
    }

    #[test]
    fn an_ask_the_engine_lost_is_asked_again() {
        let gate = ConnectGate::default();
        gate.set_ttl(1_000);
        let u: UserId = "u4".into();
        let Admission::Ask(mut lost) = gate.admit(&u, 0) else {
            panic!()
        };
        assert!(matches!(
            gate.admit(&u, ASK_TIMEOUT_MS - 1),
            Admission::Wait(_)
        ));
        assert!(matches!(gate.admit(&u, ASK_TIMEOUT_MS), Admission::Ask(_)));
        assert!(
            lost.try_recv().is_err(),
            "the lost ask's waiters are let go"
        );
    }
}
