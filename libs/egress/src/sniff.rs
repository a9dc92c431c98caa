//! What a connection's first bytes say of where it goes: an HTTP request's
//! `Host`, a TLS ClientHello's SNI. Nothing is decrypted; what cannot be read
//! is matched by address.

/// The most the proxy reads before deciding (an HTTP head, a ClientHello).
pub const MAX_SNIFF: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sniffed {
    /// More bytes are needed.
    Partial,
    Http {
        method: String,
        host: String,
        path: String,
    },
    Tls {
        sni: String,
    },
    /// Not what the port promised (or no name in it).
    Opaque,
}

/// An HTTP/1 request head.
pub fn http(buf: &[u8]) -> Sniffed {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) if buf.len() < MAX_SNIFF => Sniffed::Partial,
        Ok(httparse::Status::Complete(_)) => {
            let host = req
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("host"))
                .and_then(|h| std::str::from_utf8(h.value).ok())
                .map(strip_port);
            match (req.method, req.path, host) {
                (Some(m), Some(p), Some(h)) if !h.is_empty() => Sniffed::Http {
                    method: m.to_owned(),
                    host: h.to_owned(),
                    path: p.to_owned(),
                },
                _ => Sniffed::Opaque,
            }
        }
        _ => Sniffed::Opaque,
    }
}

fn strip_port(host: &str) -> &str {
    let host = host.trim();
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    host.rsplit_once(':')
        .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
        .map_or(host, |(h, _)| h)
}

/// The status of an HTTP response's first line (`HTTP/1.1 200 OK`).
pub fn http_status(buf: &[u8]) -> Option<u16> {
    let line = buf.split(|b| *b == b'\r').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split(' ');
    parts.next()?.strip_prefix("HTTP/")?;
    parts.next()?.parse().ok()
}

/// A TLS ClientHello's server name (the first record only: a ClientHello that
/// spans records is read as opaque).
pub fn tls(buf: &[u8]) -> Sniffed {
    match client_hello_sni(buf) {
        Ok(Some(sni)) => Sniffed::Tls { sni },
        Ok(None) => Sniffed::Opaque,
        Err(Short) if buf.len() < MAX_SNIFF => Sniffed::Partial,
        Err(Short) => Sniffed::Opaque,
    }
}

struct Short;

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Short> {
        if self.0.len() < n {
            return Err(Short);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<usize, Short> {
        Ok(usize::from(self.take(1)?[0]))
    }
    fn u16(&mut self) -> Result<usize, Short> {
        let b = self.take(2)?;
        Ok(usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
}

/// `Ok(None)`: it is not a ClientHello, or has no name. `Err(Short)`: it is cut.
fn client_hello_sni(buf: &[u8]) -> Result<Option<String>, Short> {
    let mut record = Reader(buf);
    let header = record.take(5)?;
    // Handshake record, TLS 1.x.
    if header[0] != 0x16 || header[1] != 3 {
        return Ok(None);
    }
    let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
    let mut hs = Reader(record.take(len)?);
    // A ClientHello that is not whole in its record is not read.
    let opaque = |r: Result<Option<String>, Short>| r.or(Ok(None));
    opaque((|| {
        if hs.u8()? != 1 {
            return Ok(None);
        }
        hs.take(3)?; // length
        hs.take(2 + 32)?; // version, random
        let n = hs.u8()?;
        hs.take(n)?; // session id
        let n = hs.u16()?;
        hs.take(n)?; // cipher suites
        let n = hs.u8()?;
        hs.take(n)?; // compression
        let n = hs.u16()?;
        let mut ext = Reader(hs.take(n)?);
        while !ext.0.is_empty() {
            let kind = ext.u16()?;
            let n = ext.u16()?;
            let mut body = Reader(ext.take(n)?);
            if kind != 0 {
                continue;
            }
            let n = body.u16()?;
            let mut names = Reader(body.take(n)?);
            while !names.0.is_empty() {
                let kind = names.u8()?;
                let n = names.u16()?;
                let name = names.take(n)?;
                if kind == 0 {
                    return Ok(std::str::from_utf8(name).ok().map(str::to_owned));
                }
            }
        }
        Ok(None)
    })())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello as rustls or curl send it, reduced to what is parsed.
    fn client_hello(sni: &str) -> Vec<u8> {
        let mut ext = Vec::new();
        let name = sni.as_bytes();
        let list_len = (name.len() + 3) as u16;
        ext.extend_from_slice(&0u16.to_be_bytes());
        ext.extend_from_slice(&(list_len + 2).to_be_bytes());
        ext.extend_from_slice(&list_len.to_be_bytes());
        ext.push(0);
        ext.extend_from_slice(&(name.len() as u16).to_be_bytes());
        ext.extend_from_slice(name);
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.push(0);
        body.extend_from_slice(&2u16.to_be_bytes());
        body.extend_from_slice(&[0x13, 0x01]);
        body.extend_from_slice(&[1, 0]);
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext);
        let mut hs = vec![1];
        hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend_from_slice(&body);
        let mut rec = vec![0x16, 3, 1];
        rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        rec.extend_from_slice(&hs);
        rec
    }

    #[test]
    fn sni_is_read_whole_or_asked_for() {
        let hello = client_hello("api.example.test");
        assert_eq!(
            tls(&hello),
            Sniffed::Tls {
                sni: "api.example.test".into()
            }
        );
        for cut in [0, 3, 10, hello.len() - 1] {
            assert_eq!(tls(&hello[..cut]), Sniffed::Partial, "cut at {cut}");
        }
        assert_eq!(tls(b"GET / HTTP/1.1\r\n"), Sniffed::Opaque);
        // Lengths that lie are opaque, never a panic.
        let mut bad = hello.clone();
        bad[43] = 0xff;
        assert_ne!(tls(&bad), Sniffed::Partial);
        for i in 0..hello.len() {
            let mut b = hello.clone();
            b[i] ^= 0xa5;
            let _ = tls(&b);
        }
    }

    #[test]
    fn http_heads_give_their_host() {
        let req = b"GET /x?y=1 HTTP/1.1\r\nHost: Example.test:8080\r\nAccept: */*\r\n\r\n";
        assert_eq!(
            http(req),
            Sniffed::Http {
                method: "GET".into(),
                host: "Example.test".into(),
                path: "/x?y=1".into()
            }
        );
        assert_eq!(http(&req[..20]), Sniffed::Partial);
        assert_eq!(http(b"GET / HTTP/1.1\r\n\r\n"), Sniffed::Opaque);
        assert_eq!(http(b"\x16\x03\x01\x00"), Sniffed::Opaque);
        assert_eq!(http_status(b"HTTP/1.1 404 Not Found\r\n"), Some(404));
        assert_eq!(http_status(b"SSH-2.0"), None);
    }
}
