//! Webhook signatures: `Meridian-Signature: t=<unix seconds>,v1=<hex>` where the hex is
//! HMAC-SHA256 of `"<t>.<body>"` under the webhook's secret. During a rotation the
//! webhook has two secrets and the header carries one `v1=` per secret (the current one
//! first), so that a receiver that knows either accepts it.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The header's name.
pub const HEADER: &str = "Meridian-Signature";

/// How far a signature's time may be from the receiver's clock by default.
pub const TOLERANCE_SECS: i64 = 300;

fn mac(secret: &[u8], t: i64, body: &[u8]) -> String {
    // HMAC takes a key of any length.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(mac) => mac,
        Err(_) => return String::new(),
    };
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// The header's value for `body` sent at `t` under every secret in `secrets`.
pub fn header(secrets: &[Vec<u8>], t: i64, body: &[u8]) -> String {
    let mut value = format!("t={t}");
    for secret in secrets {
        value.push_str(",v1=");
        value.push_str(&mac(secret, t, body));
    }
    value
}

/// Why a signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The header is not `t=…,v1=…`.
    #[error("the signature header is malformed")]
    Malformed,
    /// Its time is too far from now (a replayed delivery).
    #[error("the signature is {0} s away from now")]
    Stale(i64),
    /// No `v1` matches the secret.
    #[error("no signature matches the secret")]
    Mismatch,
}

/// Checks a header against `secret` for `body`, at `now` (Unix seconds), accepting times
/// within `tolerance` seconds. What a receiver does; the tests use it too.
pub fn verify(
    header: &str,
    secret: &[u8],
    body: &[u8],
    now: i64,
    tolerance: i64,
) -> Result<(), SignatureError> {
    let mut t = None;
    let mut candidates = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", value)) => t = value.parse::<i64>().ok(),
            Some(("v1", value)) => candidates.push(value),
            _ => {}
        }
    }
    let t = t.ok_or(SignatureError::Malformed)?;
    if candidates.is_empty() {
        return Err(SignatureError::Malformed);
    }
    if (now - t).abs() > tolerance {
        return Err(SignatureError::Stale(now - t));
    }
    let expected = mac(secret, t, body);
    // Compared in constant time per candidate.
    let equal = |a: &str| {
        a.len() == expected.len()
            && a.bytes()
                .zip(expected.bytes())
                .fold(0u8, |acc, (x, y)| acc | (x ^ y))
                == 0
    };
    if candidates.into_iter().any(equal) {
        Ok(())
    } else {
        Err(SignatureError::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_under_either_secret_of_a_rotation() {
        let (old, new) = (b"old-secret".to_vec(), b"new-secret".to_vec());
        let body = br#"{"tenant":"acme"}"#;
        let value = header(&[new.clone(), old.clone()], 1_700_000_000, body);
        assert!(value.starts_with("t=1700000000,v1="));
        assert_eq!(value.matches("v1=").count(), 2);
        for secret in [&old, &new] {
            assert_eq!(verify(&value, secret, body, 1_700_000_010, 300), Ok(()));
        }
        assert_eq!(
            verify(&value, b"other", body, 1_700_000_010, 300),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(&value, &new, b"{}", 1_700_000_010, 300),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(&value, &new, body, 1_700_001_000, 300),
            Err(SignatureError::Stale(1000))
        );
        assert_eq!(
            verify("v1=ab", &new, body, 0, 300),
            Err(SignatureError::Malformed)
        );
    }

    #[test]
    fn the_mac_is_hmac_sha256_of_time_dot_body() {
        // The signed bytes are exactly "1.body".
        let value = header(&[b"key".to_vec()], 1, b"body");
        let expected = {
            let mut mac = Hmac::<Sha256>::new_from_slice(b"key").unwrap();
            mac.update(b"1.body");
            hex::encode(mac.finalize().into_bytes())
        };
        assert_eq!(value, format!("t=1,v1={expected}"));
    }
}
