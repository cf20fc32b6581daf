//! Token buckets: how the gateway says `rate_limited` (with `retry_after_ms`)
//! instead of queueing without bound.

/// `capacity` tokens, refilled at `per_second`; one request takes one token.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    capacity: f64,
    per_ms: f64,
    tokens: f64,
    last_ms: u64,
}

impl TokenBucket {
    pub fn new(per_second: f64, capacity: f64, now_ms: u64) -> Self {
        Self {
            capacity: capacity.max(1.0),
            per_ms: per_second.max(0.0) / 1000.0,
            tokens: capacity.max(1.0),
            last_ms: now_ms,
        }
    }

    /// Takes a token, or says in how many milliseconds one will be there.
    pub fn try_take(&mut self, now_ms: u64) -> Result<(), u64> {
        self.try_take_n(1.0, now_ms)
    }

    /// Takes `n` tokens at once (at most the capacity: a request of any size can pass
    /// when the bucket is full), or says in how many milliseconds they will be there.
    pub fn try_take_n(&mut self, n: f64, now_ms: u64) -> Result<(), u64> {
        let n = n.clamp(1.0, self.capacity);
        let elapsed = now_ms.saturating_sub(self.last_ms) as f64;
        self.tokens = (self.tokens + elapsed * self.per_ms).min(self.capacity);
        self.last_ms = now_ms.max(self.last_ms);
        // A hair under counts as enough: waiting exactly retry_after must be enough.
        if self.tokens >= n - 1e-9 {
            self.tokens -= n;
            return Ok(());
        }
        if self.per_ms <= 0.0 {
            return Err(60_000);
        }
        Err(((n - self.tokens) / self.per_ms).ceil().max(1.0) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill_with_retry_after() {
        let mut b = TokenBucket::new(10.0, 3.0, 0);
        assert!(b.try_take(0).is_ok());
        assert!(b.try_take(0).is_ok());
        assert!(b.try_take(0).is_ok());
        assert_eq!(b.try_take(0), Err(100));
        assert_eq!(b.try_take(50), Err(50));
        assert!(b.try_take(100).is_ok());
        // Refill never exceeds the capacity.
        for _ in 0..3 {
            assert!(b.try_take(10_000).is_ok());
        }
        assert!(b.try_take(10_000).is_err());
    }

    #[test]
    fn waiting_exactly_retry_after_is_enough() {
        for per_second in [0.7, 1.0, 3.0, 7.0, 13.0, 99.0] {
            let mut b = TokenBucket::new(per_second, 1.0, 0);
            let mut now = 0;
            for _ in 0..50 {
                let _ = b.try_take(now);
                let retry = b.try_take(now).expect_err("bucket is empty");
                now += retry;
                assert_eq!(b.try_take(now), Ok(()), "{per_second}/s after {retry} ms");
                now += 1;
            }
        }
    }

    #[test]
    fn many_tokens_at_once_wait_for_all_of_them() {
        let mut b = TokenBucket::new(100.0, 1_000.0, 0);
        assert!(b.try_take_n(600.0, 0).is_ok());
        assert_eq!(b.try_take_n(600.0, 0), Err(2_000));
        assert!(b.try_take_n(600.0, 2_000).is_ok());
        // More than the capacity costs the whole bucket, never forever.
        assert!(b.try_take_n(5_000.0, 20_000).is_ok());
        assert!(b.try_take(20_000).is_err());
    }

    #[test]
    fn clock_going_backwards_does_not_mint_tokens() {
        let mut b = TokenBucket::new(1.0, 1.0, 1_000);
        assert!(b.try_take(1_000).is_ok());
        assert!(b.try_take(500).is_err());
        assert!(b.try_take(1_500).is_err());
        assert!(b.try_take(2_000).is_ok());
    }
}
