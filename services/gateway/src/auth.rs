//! Bearer-token authentication. Tokens are stored only as SHA-256 hashes; the hash of
//! the presented token is looked up, then compared in constant time.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::{header, request::Parts};
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use vm0_api_types::Timestamp;
use vm0_api_types::tokens::{TOKEN_PREFIX, is_token};

use crate::AppState;
use crate::error::ApiError;

/// Who is calling: the organization every query is scoped to.
#[derive(Debug, Clone)]
pub struct Caller {
    pub org_id: String,
    pub token_id: String,
}

/// A freshly minted token: the secret (shown once) and what is stored.
pub struct MintedToken {
    pub secret: String,
    pub hash: String,
}

/// `vm0_live_` + 64 hex characters from a CSPRNG seeded by the OS.
pub fn mint_token() -> MintedToken {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let secret = format!("{TOKEN_PREFIX}{}", hex::encode(bytes));
    let hash = hash_token(&secret);
    MintedToken { secret, hash }
}

pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Recently verified tokens, so that a busy client costs one store query per
/// `ttl`, not one per request. Only valid tokens are cached. A revocation takes
/// effect at once on the replica that made it, on the others as soon as NATS
/// brings them the news ([`forget_revoked`]), and within `ttl` if NATS is down.
pub struct TokenCache {
    ttl: Duration,
    entries: RwLock<HashMap<String, CachedToken>>,
}

#[derive(Clone)]
struct CachedToken {
    caller: Caller,
    /// Microseconds: the earlier of the cache deadline and the token's expiry.
    valid_until: i64,
}

/// Entries kept at most; the cache is emptied when full (cheap, and rare).
const TOKEN_CACHE_CAPACITY: usize = 10_000;

impl TokenCache {
    pub fn new(ttl: Duration) -> TokenCache {
        TokenCache {
            ttl,
            entries: RwLock::new(HashMap::new()),
        }
    }

    fn get(&self, hash: &str, now: i64) -> Option<Caller> {
        let entries = self.entries.read().unwrap_or_else(|p| p.into_inner());
        entries
            .get(hash)
            .filter(|e| e.valid_until > now)
            .map(|e| e.caller.clone())
    }

    fn put(&self, hash: String, caller: Caller, now: i64, expires_at: Option<i64>) {
        if self.ttl.is_zero() {
            return;
        }
        let ttl = i64::try_from(self.ttl.as_micros()).unwrap_or(i64::MAX);
        let valid_until =
            expires_at.map_or(now.saturating_add(ttl), |e| e.min(now.saturating_add(ttl)));
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= TOKEN_CACHE_CAPACITY {
            entries.clear();
        }
        entries.insert(
            hash,
            CachedToken {
                caller,
                valid_until,
            },
        );
    }

    /// Forgets a token (after it was revoked here).
    pub fn forget(&self, token_id: &str) {
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        entries.retain(|_, e| e.caller.token_id != token_id);
    }
}

/// Forgets the tokens other gateways revoke, until `shutdown`.
pub async fn forget_revoked(
    tokens: std::sync::Arc<TokenCache>,
    bus: vm0_bus::Bus,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let revoked = match bus.subscribe_token_revocations().await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %crate::error::ErrorChain(&e), "cannot hear token revocations; other gateways' revocations take up to VM0_AUTH_CACHE_SECS here");
            return;
        }
    };
    vm0_bus::each_message(revoked, &shutdown, |msg| {
        if let Ok(token_id) = std::str::from_utf8(&msg.payload) {
            tokens.forget(token_id);
        }
    })
    .await;
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = parts.headers.get(header::AUTHORIZATION).ok_or_else(|| {
            ApiError::unauthorized("No API key provided. Send `Authorization: Bearer vm0_live_...`")
        })?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| {
                let (scheme, rest) = h.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            })
            .filter(|t| is_token(t))
            .ok_or_else(|| {
                ApiError::unauthorized(
                    "Malformed API key. Expected `Authorization: Bearer vm0_live_<64 hex characters>`",
                )
            })?;
        let hash = hash_token(token);
        let now = Timestamp::now().micros();
        if let Some(caller) = state.tokens.get(&hash, now) {
            return Ok(caller);
        }
        let row = state.store.find_token_by_hash(&hash).await?;
        let Some(row) = row.filter(|r| bool::from(r.token_hash.as_bytes().ct_eq(hash.as_bytes())))
        else {
            return Err(ApiError::unauthorized("Invalid API key"));
        };
        if row.revoked_at.is_some() {
            return Err(ApiError::unauthorized("This API key has been revoked"));
        }
        if row.expires_at.is_some_and(|e| e <= now) {
            return Err(ApiError::unauthorized("This API key has expired"));
        }
        let caller = Caller {
            org_id: row.org_id,
            token_id: row.id,
        };
        state.tokens.put(hash, caller.clone(), now, row.expires_at);
        Ok(caller)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_honours_ttl_expiry_and_forget() {
        let caller = Caller {
            org_id: "org_a".into(),
            token_id: "tok_a".into(),
        };
        let cache = TokenCache::new(Duration::from_secs(5));
        cache.put("h".into(), caller.clone(), 0, None);
        assert!(cache.get("h", 4_999_999).is_some());
        assert!(cache.get("h", 5_000_000).is_none(), "past the ttl");
        cache.put("h".into(), caller.clone(), 0, Some(1_000));
        assert!(cache.get("h", 1_000).is_none(), "past the token's expiry");
        cache.put("h".into(), caller, 0, None);
        cache.forget("tok_a");
        assert!(cache.get("h", 1).is_none(), "forgotten");
        let off = TokenCache::new(Duration::ZERO);
        off.put(
            "h".into(),
            Caller {
                org_id: "o".into(),
                token_id: "t".into(),
            },
            0,
            None,
        );
        assert!(off.get("h", 1).is_none(), "a zero ttl disables the cache");
    }

    #[test]
    fn minted_tokens_have_the_documented_form() {
        let t = mint_token();
        assert!(is_token(&t.secret), "{}", t.secret);
        assert_eq!(t.hash, hash_token(&t.secret));
        assert_eq!(t.hash.len(), 64);
        assert_ne!(mint_token().secret, t.secret);
    }
}
