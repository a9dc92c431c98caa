//! Bearer-token authentication. Tokens are stored only as SHA-256 hashes; the hash of
//! the presented token is looked up, then compared in constant time.

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
        let row = state.store.find_token_by_hash(&hash).await?;
        let Some(row) = row.filter(|r| bool::from(r.token_hash.as_bytes().ct_eq(hash.as_bytes())))
        else {
            return Err(ApiError::unauthorized("Invalid API key"));
        };
        if row.revoked_at.is_some() {
            return Err(ApiError::unauthorized("This API key has been revoked"));
        }
        if row
            .expires_at
            .is_some_and(|e| e <= Timestamp::now().micros())
        {
            return Err(ApiError::unauthorized("This API key has expired"));
        }
        Ok(Caller {
            org_id: row.org_id,
            token_id: row.id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_have_the_documented_form() {
        let t = mint_token();
        assert!(is_token(&t.secret), "{}", t.secret);
        assert_eq!(t.hash, hash_token(&t.secret));
        assert_eq!(t.hash.len(), 64);
        assert_ne!(mint_token().secret, t.secret);
    }
}
