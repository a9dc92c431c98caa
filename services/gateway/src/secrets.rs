//! Run secrets at rest: sealed with ChaCha20-Poly1305 under the gateways' shared
//! key, opened only when a worker claims the run, erased when the run ends.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use rand::RngCore;

/// The key every gateway of a deployment shares.
#[derive(Clone)]
pub struct SecretBox {
    cipher: ChaCha20Poly1305,
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretBox(..)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("sealed secrets are malformed")]
    Malformed,
    #[error("sealed secrets do not open with this key (was VM0_SECRETS_KEY changed?)")]
    WrongKey,
}

impl SecretBox {
    pub fn new(key: [u8; 32]) -> SecretBox {
        SecretBox {
            cipher: ChaCha20Poly1305::new(&Key::from(key)),
        }
    }

    /// A random key, for tests and single-process setups.
    pub fn random() -> SecretBox {
        let mut key = [0u8; 32];
        rand::rng().fill_bytes(&mut key);
        SecretBox::new(key)
    }

    /// `VM0_SECRETS_KEY` (64 hex characters) when set; otherwise the key file in the
    /// data dir, created on first use. Every gateway of a fleet needs the same key.
    pub fn from_env_or_file(data_dir: &Path) -> Result<SecretBox> {
        if let Ok(hex_key) = std::env::var("VM0_SECRETS_KEY") {
            return Self::from_hex(hex_key.trim()).context("VM0_SECRETS_KEY");
        }
        let path = data_dir.join("secrets.key");
        match std::fs::read_to_string(&path) {
            Ok(s) => {
                Self::from_hex(s.trim()).with_context(|| format!("reading {}", path.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                rand::rng().fill_bytes(&mut key);
                std::fs::create_dir_all(data_dir)?;
                write_private(&path, hex::encode(key).as_bytes())?;
                Ok(SecretBox::new(key))
            }
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    fn from_hex(s: &str) -> Result<SecretBox> {
        let bytes = hex::decode(s).context("not hex")?;
        let key: [u8; 32] = bytes
            .try_into()
            .map_err(|_| anyhow::anyhow!("a secrets key is 32 bytes (64 hex characters)"))?;
        Ok(SecretBox::new(key))
    }

    pub fn seal(&self, secrets: &BTreeMap<String, String>) -> String {
        let mut nonce = [0u8; 12];
        rand::rng().fill_bytes(&mut nonce);
        // Serializing a map of strings cannot fail.
        let plain = serde_json::to_vec(secrets).unwrap_or_default();
        // Encryption fails only for messages over ~256 GiB.
        let sealed = self
            .cipher
            .encrypt(&Nonce::from(nonce), plain.as_slice())
            .unwrap_or_default();
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        STANDARD.encode(out)
    }

    pub fn open(&self, sealed: &str) -> Result<BTreeMap<String, String>, SecretError> {
        let bytes = STANDARD
            .decode(sealed)
            .map_err(|_| SecretError::Malformed)?;
        if bytes.len() < 12 {
            return Err(SecretError::Malformed);
        }
        let (nonce, ciphertext) = bytes.split_at(12);
        let nonce: [u8; 12] = nonce.try_into().map_err(|_| SecretError::Malformed)?;
        let plain = self
            .cipher
            .decrypt(&Nonce::from(nonce), ciphertext)
            .map_err(|_| SecretError::WrongKey)?;
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
        let sealed = b.seal(&secrets);
        assert!(!sealed.contains("hunter2"));
        assert_eq!(b.open(&sealed).expect("opens"), secrets);
        assert!(matches!(
            SecretBox::random().open(&sealed),
            Err(SecretError::WrongKey)
        ));
        assert!(matches!(b.open("!!"), Err(SecretError::Malformed)));
    }
}
