//! API tokens: `vm0_live_` followed by 64 lowercase hex characters.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::Timestamp;

pub const TOKEN_PREFIX: &str = "vm0_live_";
const TOKEN_HEX_LEN: usize = 64;
/// How much of a token is kept in clear to tell tokens apart in listings.
const DISPLAY_PREFIX_LEN: usize = TOKEN_PREFIX.len() + 8;
pub const MAX_EXPIRES_IN_DAYS: u32 = 3650;

/// Whether `s` has the form of an API token.
pub fn is_token(s: &str) -> bool {
    s.strip_prefix(TOKEN_PREFIX).is_some_and(|hex| {
        hex.len() == TOKEN_HEX_LEN
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// The part of a token shown in listings (`vm0_live_1a2b3c4d`).
pub fn display_prefix(token: &str) -> &str {
    token.get(..DISPLAY_PREFIX_LEN).unwrap_or(token)
}

/// `POST /v1/tokens`
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateTokenRequest {
    /// A label, 1–100 characters.
    #[serde(default)]
    pub name: Option<String>,
    /// Lifetime in days (1–3650); no expiry when absent.
    #[serde(
        default,
        alias = "expires_in_days",
        deserialize_with = "crate::integer::optional_integer"
    )]
    pub expires_in_days: Option<u32>,
}

/// A token as listings show it: never the secret itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Token {
    pub id: String,
    pub name: String,
    /// First characters of the token, to recognise it.
    pub prefix: String,
    pub created_at: Timestamp,
    pub expires_at: Option<Timestamp>,
}

/// The answer to `POST /v1/tokens`: the only time `token` is shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreatedToken {
    #[serde(flatten)]
    pub token_info: Token,
    pub token: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_format() {
        let good = format!("vm0_live_{}", "0123456789abcdef".repeat(4));
        assert!(is_token(&good));
        assert_eq!(display_prefix(&good), "vm0_live_01234567");
        assert!(!is_token(&good.to_uppercase()));
        assert!(!is_token(&good[..good.len() - 1]));
        assert!(!is_token(&format!("vm0_test_{}", "0".repeat(64))));
        assert!(!is_token(&format!("vm0_live_{}", "g".repeat(64))));
    }
}
