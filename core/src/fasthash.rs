//! A hasher for map keys the server makes itself (chat ids, keyed digests of
//! idempotency keys): 8 bytes per step and no per-map random state. Nobody
//! outside chooses these keys, so a DoS-resistant hash buys nothing here; a
//! cheap lookup per delivery and small per-connection maps do.

use std::hash::{BuildHasherDefault, Hasher};

#[derive(Debug, Default)]
pub struct FastHasher(u64);

impl Hasher for FastHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(word))
                .wrapping_mul(0x517c_c1b7_2722_0a95);
        }
    }
}

pub type FastHash = BuildHasherDefault<FastHasher>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn different_keys_hash_apart_and_equal_keys_alike() {
        let h = FastHash::default();
        assert_eq!(h.hash_one("c0193a1b2"), h.hash_one("c0193a1b2"));
        assert_ne!(h.hash_one("c0193a1b2"), h.hash_one("c0193a1b3"));
        assert_ne!(h.hash_one(1u64), h.hash_one(2u64));
        assert_ne!(h.hash_one(1u128 << 64), h.hash_one(1u128));
    }
}
