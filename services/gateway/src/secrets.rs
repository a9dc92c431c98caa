//! Run secrets at rest: sealed with ChaCha20-Poly1305 under the gateways' shared
//! key, bound to their run, opened only when a worker claims the run, erased when
//! the run ends.
//!
//! A seal is `v2.<key id>.<base64(nonce ‖ ciphertext)>`; the associated data is
//! the key id and the run id, so a seal copied onto another run does not open. The
//! key id is a public fingerprint of the key (16 hex of SHA-256 over a label and
//! the key). The store records the ids a deployment seals with, and a gateway
//! whose key is not among them refuses to start ([`SecretBox::check_against`]):
//! without it, a gateway that made its own key (no `VM0_SECRETS_KEY`) would seal
//! runs no other gateway can open.
//!
//! Rotation: `VM0_SECRETS_KEYS_OLD` (comma-separated) are keys that still open
//! seals but never seal. Give every gateway the new key there first, then swap it
//! with `VM0_SECRETS_KEY`; drop the old one once runs sealed with it have ended.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use rand::RngCore;
use sha2::{Digest, Sha256};

/// One key and its public id.
#[derive(Clone)]
struct SealingKey {
    id: String,
    cipher: ChaCha20Poly1305,
    /// Signs the URLs the gateway serves for the local object store.
    url_signer: vm0_storage::UrlSigner,
}

impl SealingKey {
    fn new(key: [u8; 32]) -> SealingKey {
        let mut h = Sha256::new();
        h.update(b"vm0 secrets key id v1\0");
        h.update(key);
        SealingKey {
            id: hex::encode(&h.finalize()[..8]),
            cipher: ChaCha20Poly1305::new(&Key::from(key)),
            url_signer: vm0_storage::UrlSigner::derive(&key),
        }
    }
}

/// Where the sealing key came from, for the message that names it.
#[derive(Debug, Clone)]
enum KeySource {
    Env,
    File(std::path::PathBuf),
    Given,
}

/// The keys every gateway of a deployment shares.
#[derive(Clone)]
pub struct SecretBox {
    current: SealingKey,
    old: Vec<SealingKey>,
    source: KeySource,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretBox(key id {})", self.current.id)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("sealed secrets are malformed")]
    Malformed,
    #[error("sealed secrets do not open with this key (was VM0_SECRETS_KEY changed?)")]
    WrongKey,
    #[error(
        "sealed secrets name key {0}, which this gateway does not have (VM0_SECRETS_KEY, VM0_SECRETS_KEYS_OLD)"
    )]
    UnknownKey(String),
}

fn from_hex(s: &str) -> Result<[u8; 32]> {
    let bytes = hex::decode(s.trim()).context("not hex")?;
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("a secrets key is 32 bytes (64 hex characters)"))
}

fn aad(key_id: &str, run_id: &str) -> Vec<u8> {
    format!("vm0 run secrets v2\0{key_id}\0{run_id}").into_bytes()
}

impl SecretBox {
    pub fn new(key: [u8; 32]) -> SecretBox {
        SecretBox {
            current: SealingKey::new(key),
            old: Vec::new(),
            source: KeySource::Given,
        }
    }

    /// A random key, for tests and single-process setups.
    pub fn random() -> SecretBox {
        let mut key = [0u8; 32];
        rand::rng().fill_bytes(&mut key);
        SecretBox::new(key)
    }

    /// Keys that still open seals, but never seal.
    pub fn with_old_keys(mut self, keys: &[[u8; 32]]) -> SecretBox {
        self.old = keys.iter().map(|k| SealingKey::new(*k)).collect();
        self
    }

    /// The signer of object URLs, under a key derived from the current one (a
    /// rotation invalidates URLs signed before it, which last an hour).
    pub fn url_signer(&self) -> vm0_storage::UrlSigner {
        self.current.url_signer.clone()
    }

    /// The sealing key's public id.
    pub fn key_id(&self) -> &str {
        &self.current.id
    }

    /// `VM0_SECRETS_KEY` (64 hex characters) when set; otherwise the key file in the
    /// data dir, created on first use. `VM0_SECRETS_KEYS_OLD` adds keys that only
    /// open. Every gateway of a fleet needs the same key.
    pub fn from_env_or_file(data_dir: &Path) -> Result<SecretBox> {
        let mut sb = if let Ok(hex_key) = std::env::var("VM0_SECRETS_KEY") {
            let mut sb = SecretBox::new(from_hex(&hex_key).context("VM0_SECRETS_KEY")?);
            sb.source = KeySource::Env;
            sb
        } else {
            let path = data_dir.join("secrets.key");
            let key = match std::fs::read_to_string(&path) {
                Ok(s) => from_hex(&s).with_context(|| format!("reading {}", path.display()))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    let mut key = [0u8; 32];
                    rand::rng().fill_bytes(&mut key);
                    std::fs::create_dir_all(data_dir)?;
                    write_private(&path, hex::encode(key).as_bytes())?;
                    key
                }
                Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
            };
            let mut sb = SecretBox::new(key);
            sb.source = KeySource::File(path);
            sb
        };
        if let Ok(old) = std::env::var("VM0_SECRETS_KEYS_OLD") {
            let keys = old
                .split(',')
                .filter(|k| !k.trim().is_empty())
                .map(from_hex)
                .collect::<Result<Vec<_>>>()
                .context("VM0_SECRETS_KEYS_OLD")?;
            sb = sb.with_old_keys(&keys);
        }
        Ok(sb)
    }

    /// Refuses a key this deployment's store does not know: the first gateway
    /// records its key's id; a later one must have a recorded key (as its sealing
    /// key, or among the old ones during a rotation, which records the new one).
    pub async fn check_against(&self, store: &vm0_db::Store) -> Result<()> {
        let known = store.secrets_key_ids().await?;
        let now = vm0_api_types::Timestamp::now().micros();
        let ours: Vec<&str> = std::iter::once(self.current.id.as_str())
            .chain(self.old.iter().map(|k| k.id.as_str()))
            .collect();
        if known.is_empty() || ours.iter().any(|id| known.iter().any(|k| k == id)) {
            if !known.contains(&self.current.id) {
                store.add_secrets_key_id(&self.current.id, now).await?;
            }
            return Ok(());
        }
        let whence = match &self.source {
            KeySource::Env => "from VM0_SECRETS_KEY".to_owned(),
            KeySource::File(p) => format!(
                "from {}, made for this data dir because VM0_SECRETS_KEY is unset",
                p.display()
            ),
            KeySource::Given => "given by the embedding program".to_owned(),
        };
        anyhow::bail!(
            "this gateway's secrets key (id {}, {whence}) is not the key this deployment's store \
             seals run secrets with (key ids {}): set VM0_SECRETS_KEY to the same 64 hex \
             characters on every gateway",
            self.current.id,
            known.join(", ")
        )
    }

    /// Seals `secrets` to run `run_id`.
    pub fn seal(&self, run_id: &str, secrets: &BTreeMap<String, String>) -> String {
        let mut nonce = [0u8; 12];
        rand::rng().fill_bytes(&mut nonce);
        // Serializing a map of strings cannot fail.
        let plain = serde_json::to_vec(secrets).unwrap_or_default();
        let id = &self.current.id;
        // Encryption fails only for messages over ~256 GiB.
        let sealed = self
            .current
            .cipher
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: &plain,
                    aad: &aad(id, run_id),
                },
            )
            .unwrap_or_default();
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        format!("v2.{id}.{}", STANDARD.encode(out))
    }

    /// Opens what was sealed to `run_id`. Seals from before key ids (no prefix,
    /// no associated data) still open with a key this gateway has.
    pub fn open(
        &self,
        run_id: &str,
        sealed: &str,
    ) -> Result<BTreeMap<String, String>, SecretError> {
        let keys = || std::iter::once(&self.current).chain(self.old.iter());
        let (key, body, aad) = match sealed.split_once('.') {
            Some(("v2", rest)) => {
                let (id, body) = rest.split_once('.').ok_or(SecretError::Malformed)?;
                let key = keys()
                    .find(|k| k.id == id)
                    .ok_or_else(|| SecretError::UnknownKey(id.to_owned()))?;
                (Some(key), body, aad(id, run_id))
            }
            _ => (None, sealed, Vec::new()),
        };
        let bytes = STANDARD.decode(body).map_err(|_| SecretError::Malformed)?;
        if bytes.len() < 12 {
            return Err(SecretError::Malformed);
        }
        let (nonce, ciphertext) = bytes.split_at(12);
        let nonce: [u8; 12] = nonce.try_into().map_err(|_| SecretError::Malformed)?;
        let attempt = |k: &SealingKey| {
            k.cipher
                .decrypt(
                    &Nonce::from(nonce),
                    Payload {
                        msg: ciphertext,
                        aad: &aad,
                    },
                )
                .ok()
        };
        let plain = match key {
            Some(k) => attempt(k),
            None => keys().find_map(attempt),
        }
        .ok_or(SecretError::WrongKey)?;
        serde_json::from_slice(&plain).map_err(|_| SecretError::Malformed)
    }
}

fn write_private(path: &Path, contents: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(contents)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_and_open() {
        let b = SecretBox::random();
        let secrets = BTreeMap::from([("API_KEY".to_owned(), "hunter2".to_owned())]);
        let sealed = b.seal("run_a", &secrets);
        assert!(!sealed.contains("hunter2"));
        assert!(sealed.starts_with(&format!("v2.{}.", b.key_id())));
        assert_eq!(b.open("run_a", &sealed).expect("opens"), secrets);
        assert!(matches!(
            SecretBox::random().open("run_a", &sealed),
            Err(SecretError::UnknownKey(_))
        ));
        assert!(matches!(b.open("run_a", "!!"), Err(SecretError::Malformed)));
    }

    #[test]
    fn a_seal_opens_only_for_its_own_run() {
        let b = SecretBox::random();
        let sealed = b.seal("run_a", &BTreeMap::from([("K".to_owned(), "v".to_owned())]));
        assert!(matches!(
            b.open("run_b", &sealed),
            Err(SecretError::WrongKey)
        ));
        // Nor with its key id changed to another key's.
        let forged = sealed.replacen(b.key_id(), "0000000000000000", 1);
        assert!(b.open("run_a", &forged).is_err());
    }

    #[test]
    fn old_keys_open_but_do_not_seal() {
        let old_key = [7u8; 32];
        let old = SecretBox::new(old_key);
        let sealed = old.seal("run_a", &BTreeMap::from([("K".to_owned(), "v".to_owned())]));
        let rotated = SecretBox::random().with_old_keys(&[old_key]);
        assert!(rotated.open("run_a", &sealed).is_ok());
        assert!(
            rotated
                .seal("run_b", &BTreeMap::new())
                .contains(rotated.key_id())
        );
        assert_ne!(rotated.key_id(), old.key_id());
    }

    #[test]
    fn seals_from_before_key_ids_still_open() {
        let key = [9u8; 32];
        let cipher = ChaCha20Poly1305::new(&Key::from(key));
        let nonce = [1u8; 12];
        let ct = cipher
            .encrypt(&Nonce::from(nonce), &br#"{"K":"v"}"#[..])
            .expect("encrypt");
        let legacy = STANDARD.encode([nonce.to_vec(), ct].concat());
        let b = SecretBox::new(key);
        assert_eq!(b.open("run_x", &legacy).expect("opens")["K"], "v");
    }
}
