//! HTTPS through the proxy: SNI pass-through against `secretHeaders`, whose
//! TLS the proxy ends (a handshake with the run, one with the host, the head
//! rewritten, every byte decrypted and encrypted again). One request per
//! connection, as the proxy asks of such hosts (`Connection: close`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};

/// The name the remote's certificate is for (the run's `extraHosts` maps it).
pub const NAME: &str = "bench.test";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// An HTTPS server on `addr:443` in the namespace `ns`, with a certificate for
/// [`NAME`] from `ca`: `GET /<n>` answers `n` bytes.
pub fn serve(ns: OwnedFd, addr: String, ca: &vm0_tls::Authority) -> Result<()> {
    let cert = ca.server(&[NAME.to_owned()])?;
    let chain = CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("the server's certificate")?;
    let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).context("the server's key")?;
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?,
    );
    let listener = std::thread::spawn(move || -> Result<TcpListener> {
        nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)?;
        Ok(TcpListener::bind((addr.as_str(), 443))?)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("listener thread"))??;
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let config = config.clone();
            let _ = conn.set_nodelay(std::env::var_os("BENCH_SERVER_NAGLE").is_none());
            std::thread::spawn(move || {
                let Ok(tls) = rustls::ServerConnection::new(config) else {
                    return;
                };
                let mut stream = rustls::StreamOwned::new(tls, conn);
                if serve_one(&mut stream).is_ok() {
                    stream.conn.send_close_notify();
                    let _ = stream.flush();
                }
            });
        }
    });
    Ok(())
}

/// Reads the head of a request or a response (up to the blank line).
fn head(stream: &mut impl Read) -> Result<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 16 * 1024 {
            bail!("head too long");
        }
        if stream.read(&mut byte)? == 0 {
            bail!("closed in the head");
        }
        head.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// Reads a request head and answers as many bytes as its path says.
fn serve_one<S: Read + Write>(stream: &mut S) -> Result<()> {
    let request = head(stream)?;
    let n: u64 = request
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.trim_start_matches('/').parse().ok())
        .unwrap_or(2);
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n"
    )?;
    let chunk = vec![0u8; 256 * 1024];
    let mut left = n;
    while left > 0 {
        let now = left.min(chunk.len() as u64) as usize;
        stream.write_all(&chunk[..now])?;
        left -= now as u64;
    }
    stream.flush()?;
    Ok(())
}

/// A client that trusts `roots_pem` only.
pub fn client(roots_pem: &str) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(roots_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    Ok(Arc::new(
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

/// One HTTPS request for `n` bytes on a connection of its own: the body's
/// length.
pub fn fetch(config: &Arc<rustls::ClientConfig>, to: SocketAddr, n: u64) -> Result<u64> {
    let name = ServerName::try_from(NAME)?;
    let tls = rustls::ClientConnection::new(config.clone(), name)?;
    let conn = TcpStream::connect(to)?;
    conn.set_nodelay(std::env::var_os("BENCH_CLIENT_NAGLE").is_none())?;
    let mut stream = rustls::StreamOwned::new(tls, conn);
    write!(
        stream,
        "GET /{n} HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n"
    )?;
    stream.flush()?;
    let response = head(&mut stream)?;
    if !response.starts_with("HTTP/1.1 200") {
        bail!("answered {}", response.lines().next().unwrap_or_default());
    }
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    while total < n {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(got) => total += got as u64,
            // A peer that closes without close_notify, once the body is in.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e.into()),
        }
    }
    if total != n {
        bail!("got {total} of {n} bytes");
    }
    Ok(total)
}

/// Requests per second, `threads` clients each making `each` requests for
/// `n` bytes, on threads in `netns` when given.
pub fn rate(
    netns: Option<&OwnedFd>,
    config: Arc<rustls::ClientConfig>,
    to: SocketAddr,
    threads: usize,
    each: usize,
    n: u64,
) -> Result<(f64, f64)> {
    let started = Instant::now();
    let bytes: u64 = super::on_threads(netns, threads, move || {
        let mut bytes = 0;
        for _ in 0..each {
            bytes += fetch(&config, to, n)?;
        }
        Ok(bytes)
    })?
    .into_iter()
    .sum();
    let secs = started.elapsed().as_secs_f64();
    Ok(((threads * each) as f64 / secs, bytes as f64 / 1e6 / secs))
}
