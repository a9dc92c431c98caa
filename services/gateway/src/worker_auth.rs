//! Worker credentials: the operator mints one per worker (`vm0-gateway
//! worker-token create --name W`), shown once, stored as a SHA-256 hash. The
//! control plane knows a caller by its credential alone: the name it was minted
//! for is the worker's identity, whatever a request says, so a worker can
//! register, heartbeat, claim, report and finish only as itself.
//!
//! Verified credentials are trusted for [`CACHE_TTL`] without asking the store
//! again (a revocation takes at most that long); unknown ones are remembered as
//! unknown for as long, so a flood of made-up credentials costs one store query
//! per distinct credential, not per call.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use rand::RngCore;
use sha2::{Digest, Sha256};
use tonic::Status;
use tonic::metadata::MetadataMap;
use vm0_db::Store;

/// Worker credentials are this prefix and 64 hex characters.
pub const WORKER_TOKEN_PREFIX: &str = "vm0_worker_";
/// How long a lookup's answer is reused.
pub const CACHE_TTL: Duration = Duration::from_secs(5);
/// Answers kept at most; the cache is emptied when full.
const CACHE_CAPACITY: usize = 10_000;

/// A new credential: the secret (shown once) and its hash (stored).
pub fn mint() -> (String, String) {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let secret = format!("{WORKER_TOKEN_PREFIX}{}", hex::encode(bytes));
    let hash = hash(&secret);
    (secret, hash)
}

pub fn hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Whether `s` has the form of a worker credential.
pub fn is_worker_token(s: &str) -> bool {
    s.strip_prefix(WORKER_TOKEN_PREFIX).is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// The rule for worker names (they are the workers' ids in runs and logs).
pub fn valid_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// Mints and stores a credential for worker `name`; the secret, shown once.
/// (`vm0-gateway worker-token create`, `vm0 dev`, tests and benchmarks.)
pub async fn create_credential(store: &Store, name: &str) -> Result<String, vm0_db::StoreError> {
    let (secret, hash) = mint();
    store
        .insert_worker_credential(name, &hash, vm0_api_types::Timestamp::now().micros())
        .await?;
    Ok(secret)
}

/// Who is calling, as the credential says.
pub struct WorkerAuth {
    store: Store,
    /// hash → (worker name, or `None` for no live credential; when looked up).
    cache: RwLock<HashMap<String, (Option<String>, Instant)>>,
}

impl WorkerAuth {
    pub fn new(store: Store) -> WorkerAuth {
        WorkerAuth {
            store,
            cache: RwLock::new(HashMap::new()),
        }
    }

    /// The name of the worker whose credential `metadata` carries.
    pub async fn authenticate(&self, metadata: &MetadataMap) -> Result<String, Status> {
        let secret = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .filter(|t| is_worker_token(t))
            .ok_or_else(|| {
                Status::unauthenticated(
                    "a worker credential is required (vm0-gateway worker-token create --name W)",
                )
            })?;
        let hash = hash(secret);
        let cached = self
            .cache
            .read()
            .ok()
            .and_then(|c| c.get(&hash).cloned())
            .filter(|(_, at)| at.elapsed() < CACHE_TTL);
        let name = match cached {
            Some((name, _)) => name,
            None => {
                let row = self
                    .store
                    .find_worker_credential(&hash)
                    .await
                    .map_err(|e| {
                        tracing::error!(error = %crate::error::ErrorChain(&e), "worker credential lookup failed");
                        Status::unavailable("the control plane cannot check credentials now")
                    })?;
                let name = row.map(|r| r.name);
                if let Ok(mut c) = self.cache.write() {
                    if c.len() >= CACHE_CAPACITY {
                        c.clear();
                    }
                    c.insert(hash, (name.clone(), Instant::now()));
                }
                name
            }
        };
        name.ok_or_else(|| Status::unauthenticated("unknown or revoked worker credential"))
    }
}

/// The worker id a request may use: its credential's name. A request that names
/// another worker is refused; an empty one means "whoever I am".
pub fn identity(credential: &str, claimed: &str) -> Result<String, Status> {
    if claimed.is_empty() || claimed == credential {
        Ok(credential.to_owned())
    } else {
        Err(Status::permission_denied(format!(
            "this credential is worker {credential}'s, not {claimed}'s"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_have_their_own_form_and_names_are_checked() {
        let (secret, h) = mint();
        assert!(is_worker_token(&secret));
        assert!(
            !vm0_api_types::tokens::is_token(&secret),
            "not an API token"
        );
        assert_eq!(hash(&secret), h);
        assert!(valid_name("w-1.eu_west") && !valid_name("") && !valid_name("a b"));
        assert_eq!(identity("w1", "").ok().as_deref(), Some("w1"));
        assert!(identity("w1", "w2").is_err());
    }
}
