//! Certificates for the links between vm0's own processes (workers to the
//! control plane's gRPC, every process to NATS): a private certificate authority
//! and the server certificates it signs, as PEM. `vm0-gateway tls create` makes a
//! set for a fleet, `vm0 dev` and the test harness one for themselves. Clients
//! trust the CA's certificate and nothing else.
//!
//! Keys are ECDSA P-256; certificates are valid for ten years (the CA can be
//! replaced by making a new set; nothing here renews them).

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("making a certificate failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("writing {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// A private certificate authority.
pub struct Authority {
    cert_pem: String,
    key_pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

/// A server certificate and its key, PEM.
#[derive(Clone)]
pub struct ServerCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for ServerCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerCert(..)")
    }
}

fn ten_years(params: &mut rcgen::CertificateParams) {
    params.not_before = rcgen::date_time_ymd(2024, 1, 1);
    params.not_after = rcgen::date_time_ymd(2036, 1, 1);
}

impl Authority {
    /// A new CA named `name` (its common name).
    pub fn new(name: &str) -> Result<Authority, TlsError> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        ten_years(&mut params);
        let key = rcgen::KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Authority {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            issuer: rcgen::Issuer::new(params, key),
        })
    }

    /// A CA made earlier, from its certificate and key.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Authority, TlsError> {
        let key = rcgen::KeyPair::from_pem(key_pem)?;
        Ok(Authority {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            issuer: rcgen::Issuer::from_ca_cert_pem(cert_pem, key)?,
        })
    }

    /// The CA certificate clients trust.
    pub fn cert_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// The CA's private key (keep it away from every server: it signs their
    /// certificates).
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// A server certificate for `names` (DNS names or IP addresses).
    pub fn server(&self, names: &[String]) -> Result<ServerCert, TlsError> {
        let mut params = rcgen::CertificateParams::new(names.to_vec())?;
        if let Some(first) = names.first() {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, first.as_str());
        }
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        ten_years(&mut params);
        let key = rcgen::KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(ServerCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Writes `contents` to `dir/file` with `mode`.
fn write_file(dir: &Path, file: &str, contents: &str, mode: u32) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let write = |file: &str, contents: &str, mode: u32| {
        let path = dir.join(file);
        std::fs::create_dir_all(dir)
            .and_then(|()| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(mode)
                    .open(&path)
            })
            .and_then(|mut f| f.write_all(contents.as_bytes()))
            .map_err(|source| TlsError::Write {
                path: path.display().to_string(),
                source,
            })
    };
    write(file, contents, mode)
}

/// The files of a set: `ca.pem`, `<name>.pem` and `<name>.key` (mode 0600).
pub fn write_set(
    dir: &Path,
    authority: &Authority,
    name: &str,
    server: &ServerCert,
) -> Result<(), TlsError> {
    write_file(dir, "ca.pem", &authority.cert_pem(), 0o644)?;
    write_file(dir, &format!("{name}.pem"), &server.cert_pem, 0o644)?;
    write_file(dir, &format!("{name}.key"), &server.key_pem, 0o600)
}

/// The CA of `dir` (`ca.pem` and `ca.key`), or a new one written there.
pub fn authority_in(dir: &Path, name: &str) -> Result<Authority, TlsError> {
    let read = |f: &str| std::fs::read_to_string(dir.join(f));
    match (read("ca.pem"), read("ca.key")) {
        (Ok(cert), Ok(key)) => Authority::load(&cert, &key),
        _ => {
            let ca = Authority::new(name)?;
            write_file(dir, "ca.pem", &ca.cert_pem(), 0o644)?;
            write_file(dir, "ca.key", ca.key_pem(), 0o600)?;
            Ok(ca)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_is_written_with_a_private_key_only_its_owner_reads() {
        let ca = Authority::new("vm0 test CA").expect("ca");
        let server = ca
            .server(&["localhost".into(), "127.0.0.1".into()])
            .expect("server");
        assert!(server.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(server.key_pem.contains("PRIVATE KEY"));
        let dir = tempfile::tempdir().expect("dir");
        write_set(dir.path(), &ca, "gateway", &server).expect("write");
        let mode = |f: &str| {
            std::os::unix::fs::PermissionsExt::mode(
                &std::fs::metadata(dir.path().join(f))
                    .expect("meta")
                    .permissions(),
            ) & 0o777
        };
        assert_eq!(mode("gateway.key"), 0o600);
        assert_eq!(mode("ca.pem"), 0o644);
    }

    #[test]
    fn a_ca_kept_in_a_directory_is_found_again() {
        let dir = tempfile::tempdir().expect("dir");
        let first = authority_in(dir.path(), "vm0 CA").expect("made");
        let again = authority_in(dir.path(), "vm0 CA").expect("loaded");
        assert_eq!(first.cert_pem(), again.cert_pem());
        again.server(&["nats.internal".into()]).expect("signs");
    }
}
