//! Signed access tokens, checked at WebSocket upgrade without touching the store.
//!
//! Format: `v1.<user_id>.<expires_at_ms>.<signature>` where the signature is the
//! unpadded base64url HMAC-SHA256 of `v1.<user_id>.<expires_at_ms>` under the
//! server's secret key. Python issues tokens with the same rule (`pychat.auth`).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is malformed")]
    Malformed,
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token has expired")]
    Expired,
}

/// Verifies (and, for tests and tools, signs) tokens under one secret key.
#[derive(Clone)]
pub struct TokenVerifier {
    key: Vec<u8>,
}

impl TokenVerifier {
    pub fn new(secret: &[u8]) -> Self {
        Self {
            key: secret.to_vec(),
        }
    }

    fn mac(&self, signed_part: &str) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes keys of any size");
        mac.update(signed_part.as_bytes());
        mac
    }

    pub fn sign(&self, user_id: &str, expires_at_ms: u64) -> String {
        let signed_part = format!("v1.{user_id}.{expires_at_ms}");
        let sig = self.mac(&signed_part).finalize().into_bytes();
        format!("{signed_part}.{}", URL_SAFE_NO_PAD.encode(sig))
    }

    /// Returns the token's user id when the signature holds and it has not expired.
    pub fn verify(&self, token: &str, now_ms: u64) -> Result<String, TokenError> {
        let (signed_part, sig_b64) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let mut parts = signed_part.split('.');
        let (Some("v1"), Some(user_id), Some(expires), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        if user_id.is_empty() {
            return Err(TokenError::Malformed);
        }
        let expires_at: u64 = expires.parse().map_err(|_| TokenError::Malformed)?;
        let sig = URL_SAFE_NO_PAD
            .decode(sig_b64)
            .map_err(|_| TokenError::Malformed)?;
        // Constant-time comparison of the signature.
        self.mac(signed_part)
            .verify_slice(&sig)
            .map_err(|_| TokenError::BadSignature)?;
        if expires_at <= now_ms {
            return Err(TokenError::Expired);
        }
        Ok(user_id.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let v = TokenVerifier::new(b"secret");
        let t = v.sign("u123", 2_000);
        assert_eq!(v.verify(&t, 1_000), Ok("u123".to_owned()));
    }

    #[test]
    fn expired_tampered_and_other_key_are_refused() {
        let v = TokenVerifier::new(b"secret");
        let t = v.sign("u123", 2_000);
        assert_eq!(v.verify(&t, 2_000), Err(TokenError::Expired));
        let tampered = t.replace("u123", "u124");
        assert_eq!(v.verify(&tampered, 1_000), Err(TokenError::BadSignature));
        let other = TokenVerifier::new(b"other").sign("u123", 2_000);
        assert_eq!(v.verify(&other, 1_000), Err(TokenError::BadSignature));
        for bad in [
            "",
            "v1",
            "v1.u.1",
            "v2.u.1.x",
            "v1..5.abc",
            "v1.u.x.abc",
            "v1.u.5.!!",
        ] {
            assert_eq!(v.verify(bad, 1), Err(TokenError::Malformed), "{bad}");
        }
    }
}
