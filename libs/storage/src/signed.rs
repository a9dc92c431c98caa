//! URLs the gateway serves itself for the local store (S3 has presigned URLs):
//! each is signed with HMAC-SHA256 under a key every gateway derives from the
//! deployment's shared secret, and binds the method, the object, the size and digest
//! (for an upload) and the expiry. A change to any of them, or a signature made
//! with another key, is refused; so is a URL past its expiry.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// What a signed URL allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Get,
    Put,
}

impl Access {
    fn as_str(self) -> &'static str {
        match self {
            Access::Get => "GET",
            Access::Put => "PUT",
        }
    }
}

/// One signed permission: `access` to object `key` (of exactly `size` bytes,
/// and of SHA-256 `sha256` when given, for a `Put`) until `expires_at`
/// (seconds since the epoch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub access: Access,
    pub key: String,
    pub size: Option<u64>,
    pub sha256: Option<String>,
    pub expires_at: i64,
}

/// Why a signed URL is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("this URL expired; ask for a new one")]
    Expired,
    #[error(
        "this URL's signature does not match what it asks (tampered, or signed by another deployment)"
    )]
    Invalid,
}

/// Signs and checks [`Grant`]s.
#[derive(Clone)]
pub struct UrlSigner {
    key: [u8; 32],
}

impl std::fmt::Debug for UrlSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UrlSigner(..)")
    }
}

impl UrlSigner {
    /// The signer of a deployment whose gateways share `secret`: a key of its
    /// own is derived from it, so a signature reveals nothing of the secret.
    pub fn derive(secret: &[u8; 32]) -> UrlSigner {
        let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
        mac.update(b"vm0 signed object URLs v1");
        UrlSigner {
            key: mac.finalize().into_bytes().into(),
        }
    }

    fn mac(&self, grant: &Grant) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        // Fields are separated by NUL, which no key or number holds.
        for field in [
            grant.access.as_str().as_bytes(),
            grant.key.as_bytes(),
            grant
                .size
                .map(|s| s.to_string())
                .unwrap_or_default()
                .as_bytes(),
            grant.sha256.as_deref().unwrap_or_default().as_bytes(),
            grant.expires_at.to_string().as_bytes(),
        ] {
            mac.update(field);
            mac.update(&[0]);
        }
        mac
    }

    /// The signature of `grant` (URL-safe base64).
    pub fn sign(&self, grant: &Grant) -> String {
        URL_SAFE_NO_PAD.encode(self.mac(grant).finalize().into_bytes())
    }

    /// Checks `signature` against `grant` at `now` (seconds since the epoch),
    /// in constant time.
    pub fn verify(&self, grant: &Grant, signature: &str, now: i64) -> Result<(), SignatureError> {
        let raw = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| SignatureError::Invalid)?;
        self.mac(grant)
            .verify_slice(&raw)
            .map_err(|_| SignatureError::Invalid)?;
        if now >= grant.expires_at {
            return Err(SignatureError::Expired);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant() -> Grant {
        Grant {
            access: Access::Put,
            key: "uploads/up_1/0".into(),
            size: Some(1024),
            sha256: Some("ab".repeat(32)),
            expires_at: 2_000,
        }
    }

    #[test]
    fn a_signature_allows_what_it_names_until_it_expires() {
        let signer = UrlSigner::derive(&[7; 32]);
        let sig = signer.sign(&grant());
        assert_eq!(signer.verify(&grant(), &sig, 1_999), Ok(()));
        assert_eq!(
            signer.verify(&grant(), &sig, 2_000),
            Err(SignatureError::Expired)
        );
        // Another gateway of the same deployment agrees.
        assert_eq!(
            UrlSigner::derive(&[7; 32]).verify(&grant(), &sig, 0),
            Ok(())
        );
    }

    #[test]
    fn anything_changed_is_refused() {
        let signer = UrlSigner::derive(&[7; 32]);
        let sig = signer.sign(&grant());
        let changed = [
            Grant {
                access: Access::Get,
                ..grant()
            },
            Grant {
                key: "uploads/up_1/1".into(),
                ..grant()
            },
            Grant {
                size: Some(1025),
                ..grant()
            },
            Grant {
                size: None,
                ..grant()
            },
            Grant {
                sha256: Some("cd".repeat(32)),
                ..grant()
            },
            Grant {
                sha256: None,
                ..grant()
            },
            Grant {
                expires_at: 3_000,
                ..grant()
            },
        ];
        for g in changed {
            assert_eq!(
                signer.verify(&g, &sig, 0),
                Err(SignatureError::Invalid),
                "{g:?}"
            );
        }
        // Another deployment's signature, a flipped character, junk.
        let other = UrlSigner::derive(&[8; 32]).sign(&grant());
        let mut flipped = sig.clone().into_bytes();
        flipped[0] = if flipped[0] == b'A' { b'B' } else { b'A' };
        for bad in [
            other,
            String::from_utf8(flipped).unwrap(),
            "%%%".into(),
            String::new(),
        ] {
            assert_eq!(
                signer.verify(&grant(), &bad, 0),
                Err(SignatureError::Invalid),
                "{bad}"
            );
        }
        // An expired URL whose expiry was pushed forward is tampered, not fresh.
        let late = Grant {
            expires_at: 10,
            ..grant()
        };
        let late_sig = signer.sign(&late);
        assert_eq!(
            signer.verify(&late, &late_sig, 11),
            Err(SignatureError::Expired)
        );
        assert_eq!(
            signer.verify(&grant(), &late_sig, 11),
            Err(SignatureError::Invalid)
        );
    }
}
