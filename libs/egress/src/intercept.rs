//! `secretHeaders`: the proxy ends the run's TLS to a host that has secret
//! headers (with a certificate of the run's own CA, which only the run trusts),
//! opens its own TLS to the host (verified against the worker's roots), and
//! sets the headers on the request, so the run uses a credential it never holds.
//!
//! One request per connection: the rewritten request says `Connection: close`,
//! so that every request of the run comes through a head this module rewrote.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::EgressError;
use crate::policy::host_name;

/// The longest request head the proxy rewrites.
pub const MAX_HEAD: usize = 64 * 1024;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// How the proxy verifies the hosts it opens TLS to: the system's roots, and
/// the operator's extra ones (`VM0_NETWORK_TLS_CA_FILE`, PEM).
pub fn upstream_tls(
    extra_roots_pem: Option<&str>,
) -> Result<Arc<rustls::ClientConfig>, EgressError> {
    let setup = |what: &str, e: &dyn std::fmt::Display| EgressError::Setup(format!("{what}: {e}"));
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        // A system root rustls cannot read is one it cannot use either.
        let _ = roots.add(cert);
    }
    if let Some(pem) = extra_roots_pem {
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            let cert = cert.map_err(|e| setup("VM0_NETWORK_TLS_CA_FILE", &e))?;
            roots
                .add(cert)
                .map_err(|e| setup("VM0_NETWORK_TLS_CA_FILE", &e))?;
            added += 1;
        }
        if added == 0 {
            return Err(EgressError::Setup(
                "VM0_NETWORK_TLS_CA_FILE holds no PEM certificate".into(),
            ));
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| setup("TLS versions", &e))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A run's TLS termination: its CA, the headers per host, the certificates
/// made so far.
pub struct Intercept {
    ca: vm0_tls::Authority,
    /// Host (as rules compare names) → (header, value).
    hosts: HashMap<String, Vec<(String, String)>>,
    servers: Mutex<HashMap<String, Arc<rustls::ServerConfig>>>,
    upstream: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for Intercept {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the values: they are the secrets.
        f.debug_struct("Intercept")
            .field("hosts", &self.hosts.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Intercept {
    /// `hosts`: host name → header → value. A value with a control character
    /// would end the header early and is refused.
    pub fn new(
        run_id: &str,
        hosts: BTreeMap<String, BTreeMap<String, String>>,
        upstream: Arc<rustls::ClientConfig>,
    ) -> Result<Intercept, EgressError> {
        let ca = vm0_tls::Authority::new(&format!("vm0 run {run_id}"))
            .map_err(|e| EgressError::Setup(format!("the run's CA: {e}")))?;
        let mut by_host = HashMap::new();
        for (host, headers) in hosts {
            let name = host_name(&host).ok_or_else(|| {
                EgressError::Setup(format!("secretHeaders: {host:?} is not a host name"))
            })?;
            let mut set = Vec::new();
            for (header, value) in headers {
                if !crate::policy::is_header_value(&value) {
                    return Err(EgressError::Setup(format!(
                        "secretHeaders.{host}.{header}: the secret's value has a control character"
                    )));
                }
                set.push((header, value));
            }
            by_host.insert(name, set);
        }
        Ok(Intercept {
            ca,
            hosts: by_host,
            servers: Mutex::new(HashMap::new()),
            upstream,
        })
    }

    /// The run's CA certificate (PEM), for the sandbox to trust.
    pub fn ca_pem(&self) -> String {
        self.ca.cert_pem()
    }

    /// The headers to set on requests to `host` (a name as rules compare them).
    pub fn headers_for(&self, host: &str) -> Option<&[(String, String)]> {
        self.hosts.get(host).map(Vec::as_slice)
    }

    pub fn upstream(&self) -> tokio_rustls::TlsConnector {
        tokio_rustls::TlsConnector::from(self.upstream.clone())
    }

    /// The TLS server the run talks to for `host`: a certificate for it from
    /// the run's CA, HTTP/1.1 only (the rewrite reads HTTP/1 heads).
    pub fn acceptor(&self, host: &str) -> Result<tokio_rustls::TlsAcceptor, String> {
        if let Some(config) = self.servers.lock().ok().and_then(|s| s.get(host).cloned()) {
            return Ok(tokio_rustls::TlsAcceptor::from(config));
        }
        let cert = self
            .ca
            .server(&[host.to_owned()])
            .map_err(|e| format!("a certificate for {host}: {e}"))?;
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| format!("the certificate for {host}: {e}"))?;
        let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes())
            .map_err(|e| format!("the key for {host}: {e}"))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| format!("the TLS server for {host}: {e}"))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let config = Arc::new(config);
        if let Ok(mut servers) = self.servers.lock() {
            servers.insert(host.to_owned(), config.clone());
        }
        Ok(tokio_rustls::TlsAcceptor::from(config))
    }
}

/// `host` as TLS names a server.
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(host.to_owned()).map_err(|e| format!("{host}: {e}"))
}

/// A request head with `set` applied: every header of those names the client
/// sent is dropped, each of `set` is added, and the request asks the server to
/// close the connection after it (one request per connection). Returns the
/// head, its method and its path; `None` when `head` is not one whole HTTP/1
/// request head.
pub fn rewrite_head(head: &[u8], set: &[(String, String)]) -> Option<(Vec<u8>, String, String)> {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(len) = req.parse(head).ok()? else {
        return None;
    };
    if len != head.len() {
        return None;
    }
    let (method, path, version) = (req.method?, req.path?, req.version?);
    let mut out = format!("{method} {path} HTTP/1.{version}\r\n").into_bytes();
    for h in req.headers.iter() {
        let dropped = ["connection", "keep-alive", "proxy-connection"]
            .iter()
            .any(|n| h.name.eq_ignore_ascii_case(n))
            || set.iter().any(|(n, _)| h.name.eq_ignore_ascii_case(n));
        if !dropped {
            out.extend_from_slice(h.name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(h.value);
            out.extend_from_slice(b"\r\n");
        }
    }
    for (name, value) in set {
        out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    Some((out, method.to_owned(), path.to_owned()))
}

/// The client's connection with the bytes the proxy already read from it (its
/// ClientHello) put back in front, for the TLS server to read.
pub struct Replayed {
    read: Vec<u8>,
    at: usize,
    inner: TcpStream,
}

impl Replayed {
    pub fn new(read: Vec<u8>, inner: TcpStream) -> Replayed {
        Replayed { read, at: 0, inner }
    }

    pub fn tcp(&self) -> &TcpStream {
        &self.inner
    }
}

impl AsyncRead for Replayed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.at < self.read.len() {
            let n = buf.remaining().min(self.read.len() - self.at);
            let at = self.at;
            buf.put_slice(&self.read[at..at + n]);
            self.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Replayed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set() -> Vec<(String, String)> {
        vec![("x-api-key".into(), "sekret".into())]
    }

    #[test]
    fn the_head_gets_the_secret_and_loses_what_the_client_sent_of_it() {
        let head = b"POST /v1/messages HTTP/1.1\r\nHost: api.test\r\nX-Api-Key: forged\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\n";
        let (out, method, path) = rewrite_head(head, &set()).expect("a head");
        let text = String::from_utf8(out).expect("text");
        assert_eq!((method.as_str(), path.as_str()), ("POST", "/v1/messages"));
        assert!(
            text.starts_with("POST /v1/messages HTTP/1.1\r\nHost: api.test\r\n"),
            "{text}"
        );
        assert!(text.contains("x-api-key: sekret\r\n"), "{text}");
        assert!(
            !text.contains("forged") && !text.contains("keep-alive"),
            "{text}"
        );
        assert!(text.contains("Content-Length: 2\r\n"), "{text}");
        assert!(text.ends_with("Connection: close\r\n\r\n"), "{text}");
    }

    #[test]
    fn what_is_not_one_whole_head_is_not_rewritten() {
        assert!(rewrite_head(b"GET / HTTP/1.1\r\nHost: a", &set()).is_none());
        assert!(rewrite_head(b"\x16\x03\x01 not http\r\n\r\n", &set()).is_none());
        assert!(rewrite_head(b"GET / HTTP/1.1\r\n\r\nextra", &set()).is_none());
    }

    #[test]
    fn a_value_that_would_end_its_header_is_refused() {
        let upstream = upstream_tls(None).expect("roots");
        let hosts = |v: &str| {
            BTreeMap::from([(
                "api.test".to_owned(),
                BTreeMap::from([("x-api-key".to_owned(), v.to_owned())]),
            )])
        };
        assert!(Intercept::new("run_x", hosts("a\r\nEvil: 1"), upstream.clone()).is_err());
        let ok = Intercept::new("run_x", hosts("fine"), upstream).expect("intercept");
        assert!(ok.headers_for("api.test").is_some());
        assert!(ok.acceptor("api.test").is_ok());
        assert!(!format!("{ok:?}").contains("fine"), "no value in Debug");
    }
}
