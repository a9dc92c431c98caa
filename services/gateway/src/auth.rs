//! Bearer-token authentication. Tokens are stored only as SHA-256 hashes; the hash of
//! the presented token is looked up, then compared in constant time.
//!
//! What a caller costs: a verified token is trusted for `VM0_AUTH_CACHE_SECS`
//! without a store query ([`TokenCache`]); a token the store does not know (or
//! that is revoked or expired) is remembered as such for [`REFUSED_TTL`], and an
//! address that keeps presenting bad tokens is refused with `429` before any
//! lookup once it passes `VM0_AUTH_FAILURES_PER_MINUTE` ([`FailureLimit`]), so
//! guessing tokens costs the store a bounded number of queries. A token verified
//! before is not a guess: it is looked up again even from a blocked address.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::RwLock;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, FromRequestParts};
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
    /// When the caller's token expires (microseconds), if it does.
    pub expires_at: Option<i64>,
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

/// How long a refused token is answered from memory.
pub const REFUSED_TTL: Duration = Duration::from_secs(30);
/// Entries kept at most in each cache; a cache is emptied when full (cheap, and rare).
const CACHE_CAPACITY: usize = 10_000;

/// Recently verified tokens, so that a busy client costs one store query per
/// `ttl`, not one per request, and recently refused ones, so that a bad token
/// repeated costs none. A revocation takes effect at once on the replica that
/// made it, on the others as soon as NATS brings them the news
/// ([`forget_revoked`]), and within `ttl` if NATS is down. Every revocation is
/// also announced to this replica's open event streams ([`TokenCache::revocations`]).
pub struct TokenCache {
    ttl: Duration,
    entries: RwLock<HashMap<String, CachedToken>>,
    /// Hash → (why it was refused, until when).
    refused: RwLock<HashMap<String, (&'static str, Instant)>>,
    revoked: tokio::sync::broadcast::Sender<String>,
}

#[derive(Clone)]
struct CachedToken {
    caller: Caller,
    /// Microseconds: the earlier of the cache deadline and the token's expiry.
    valid_until: i64,
}

impl TokenCache {
    pub fn new(ttl: Duration) -> TokenCache {
        TokenCache {
            ttl,
            entries: RwLock::new(HashMap::new()),
            refused: RwLock::new(HashMap::new()),
            revoked: tokio::sync::broadcast::channel(1024).0,
        }
    }

    fn get(&self, hash: &str, now: i64) -> Option<Caller> {
        let entries = self.entries.read().unwrap_or_else(|p| p.into_inner());
        entries
            .get(hash)
            .filter(|e| e.valid_until > now)
            .map(|e| e.caller.clone())
    }

    /// Whether the token was verified here before and not revoked since (its
    /// cache entry may have expired): a token that is not a guess.
    fn known(&self, hash: &str) -> bool {
        let entries = self.entries.read().unwrap_or_else(|p| p.into_inner());
        entries.contains_key(hash)
    }

    fn put(&self, hash: String, caller: Caller, now: i64) {
        if self.ttl.is_zero() {
            return;
        }
        let ttl = i64::try_from(self.ttl.as_micros()).unwrap_or(i64::MAX);
        let valid_until = caller
            .expires_at
            .map_or(now.saturating_add(ttl), |e| e.min(now.saturating_add(ttl)));
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= CACHE_CAPACITY {
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

    fn refused(&self, hash: &str) -> Option<&'static str> {
        let refused = self.refused.read().unwrap_or_else(|p| p.into_inner());
        refused
            .get(hash)
            .filter(|(_, until)| *until > Instant::now())
            .map(|(why, _)| *why)
    }

    fn refuse(&self, hash: String, why: &'static str) {
        let mut refused = self.refused.write().unwrap_or_else(|p| p.into_inner());
        if refused.len() >= CACHE_CAPACITY {
            refused.clear();
        }
        refused.insert(hash, (why, Instant::now() + REFUSED_TTL));
    }

    /// Forgets a token (it was revoked) and tells this replica's open event
    /// streams.
    pub fn forget(&self, token_id: &str) {
        let mut entries = self.entries.write().unwrap_or_else(|p| p.into_inner());
        entries.retain(|_, e| e.caller.token_id != token_id);
        drop(entries);
        let _ = self.revoked.send(token_id.to_owned());
    }

    /// Ids of tokens revoked from now on (lagging receivers miss some: they must
    /// then ask the store).
    pub fn revocations(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.revoked.subscribe()
    }
}

/// Failed authentications per client address and minute: past the limit an
/// address is answered `429` without a store lookup until its minute is over.
pub struct FailureLimit {
    per_minute: u32,
    windows: RwLock<HashMap<IpAddr, (Instant, u32)>>,
}

const WINDOW: Duration = Duration::from_secs(60);
/// Addresses tracked at most (a flood of addresses resets the table).
const ADDRESSES_TRACKED: usize = 100_000;

impl FailureLimit {
    /// `per_minute` failures (0: no limit).
    pub fn new(per_minute: u32) -> FailureLimit {
        FailureLimit {
            per_minute,
            windows: RwLock::new(HashMap::new()),
        }
    }

    /// Seconds until `addr` may try again, when it is over the limit.
    fn blocked_for(&self, addr: IpAddr) -> Option<u64> {
        if self.per_minute == 0 {
            return None;
        }
        let windows = self.windows.read().unwrap_or_else(|p| p.into_inner());
        let (start, failures) = windows.get(&addr)?;
        let left = WINDOW.checked_sub(start.elapsed())?;
        (*failures >= self.per_minute).then(|| left.as_secs().max(1))
    }

    fn failed(&self, addr: IpAddr) {
        if self.per_minute == 0 {
            return;
        }
        let mut windows = self.windows.write().unwrap_or_else(|p| p.into_inner());
        if windows.len() >= ADDRESSES_TRACKED {
            windows.clear();
        }
        let entry = windows.entry(addr).or_insert((Instant::now(), 0));
        if entry.0.elapsed() >= WINDOW {
            *entry = (Instant::now(), 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }
}

/// A CIDR block, `10.0.0.0/8` or an address alone (the egress policy's).
pub use vm0_egress::policy::Cidr;

/// The client's address: the TCP peer, or, when the peer is a trusted proxy
/// (`VM0_TRUSTED_PROXIES`), the last `X-Forwarded-For` hop before the trusted
/// ones. `None` when the request came without a socket (tests driving the router).
pub fn client_address(parts: &Parts, trusted: &[Cidr]) -> Option<IpAddr> {
    let peer = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())?;
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if !is_trusted(peer) {
        return Some(peer);
    }
    let forwarded: Vec<IpAddr> = parts
        .headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|a| a.trim().parse().ok())
        .collect();
    Some(
        forwarded
            .into_iter()
            .rev()
            .find(|ip| !is_trusted(*ip))
            .unwrap_or(peer),
    )
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
        let address = client_address(parts, &state.config.trusted_proxies);
        let fail = |e: ApiError| {
            if let Some(a) = address {
                state.auth_failures.failed(a);
            }
            e
        };
        let token = header
            .to_str()
            .ok()
            .and_then(|h| {
                let (scheme, rest) = h.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            })
            .filter(|t| is_token(t))
            .ok_or_else(|| {
                fail(ApiError::unauthorized(
                    "Malformed API key. Expected `Authorization: Bearer vm0_live_<64 hex characters>`",
                ))
            })?;
        let hash = hash_token(token);
        let now = Timestamp::now().micros();
        if let Some(caller) = state.tokens.get(&hash, now) {
            return Ok(caller);
        }
        // A token this replica verified before is looked up again even from a
        // blocked address: the block bounds guesses, not a client that shares
        // its address (a NAT, a CI runner) with one that guesses.
        if let Some(secs) = address
            .filter(|_| !state.tokens.known(&hash))
            .and_then(|a| state.auth_failures.blocked_for(a))
        {
            return Err(ApiError::rate_limited(
                "Too many requests with invalid API keys from this address; try again later",
                secs,
            ));
        }
        if let Some(why) = state.tokens.refused(&hash) {
            return Err(fail(ApiError::unauthorized(why)));
        }
        let row = state.store.find_token_by_hash(&hash).await?;
        let refuse = |why: &'static str| {
            state.tokens.refuse(hash.clone(), why);
            fail(ApiError::unauthorized(why))
        };
        let Some(row) = row.filter(|r| bool::from(r.token_hash.as_bytes().ct_eq(hash.as_bytes())))
        else {
            return Err(refuse("Invalid API key"));
        };
        if row.revoked_at.is_some() {
            return Err(refuse("This API key has been revoked"));
        }
        if row.expires_at.is_some_and(|e| e <= now) {
            return Err(refuse("This API key has expired"));
        }
        let caller = Caller {
            org_id: row.org_id,
            token_id: row.id,
            expires_at: row.expires_at,
        };
        state.tokens.put(hash, caller.clone(), now);
        Ok(caller)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(expires_at: Option<i64>) -> Caller {
        Caller {
            org_id: "org_a".into(),
            token_id: "tok_a".into(),
            expires_at,
        }
    }

    #[test]
    fn cache_honours_ttl_expiry_and_forget() {
        let cache = TokenCache::new(Duration::from_secs(5));
        cache.put("h".into(), caller(None), 0);
        assert!(cache.get("h", 4_999_999).is_some());
        assert!(cache.get("h", 5_000_000).is_none(), "past the ttl");
        cache.put("h".into(), caller(Some(1_000)), 0);
        assert!(cache.get("h", 1_000).is_none(), "past the token's expiry");
        cache.put("h".into(), caller(None), 0);
        let mut heard = cache.revocations();
        cache.forget("tok_a");
        assert!(cache.get("h", 1).is_none(), "forgotten");
        assert_eq!(heard.try_recv().ok().as_deref(), Some("tok_a"));
        let off = TokenCache::new(Duration::ZERO);
        off.put("h".into(), caller(None), 0);
        assert!(off.get("h", 1).is_none(), "a zero ttl disables the cache");
    }

    #[test]
    fn an_address_past_its_failures_waits_for_its_minute() {
        let limit = FailureLimit::new(3);
        let a: IpAddr = "203.0.113.7".parse().expect("ip");
        let b: IpAddr = "203.0.113.8".parse().expect("ip");
        for _ in 0..2 {
            limit.failed(a);
        }
        assert_eq!(limit.blocked_for(a), None);
        limit.failed(a);
        assert!(limit.blocked_for(a).is_some_and(|s| (1..=60).contains(&s)));
        assert_eq!(limit.blocked_for(b), None, "per address");
        assert_eq!(FailureLimit::new(0).blocked_for(a), None);
    }

    #[test]
    fn cidrs_parse_and_match() {
        let net: Cidr = "10.0.0.0/8".parse().expect("cidr");
        assert!(net.contains("10.1.2.3".parse().expect("ip")));
        assert!(!net.contains("11.0.0.1".parse().expect("ip")));
        let one: Cidr = "192.0.2.1".parse().expect("addr");
        assert!(one.contains("192.0.2.1".parse().expect("ip")));
        assert!(!one.contains("192.0.2.2".parse().expect("ip")));
        let v6: Cidr = "fd00::/8".parse().expect("v6");
        assert!(v6.contains("fd12::1".parse().expect("ip")));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nope".parse::<Cidr>().is_err());
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
