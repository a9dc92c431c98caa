//! The run's resolver, on the wire: one question per query (as every stub
//! resolver sends), answered with A records, or refused. Runs are IPv4-only
//! inside: AAAA and other types get an empty answer.

use std::net::Ipv4Addr;

pub const TYPE_A: u16 = 1;
const CLASS_IN: u16 = 1;
pub const NOERROR: u8 = 0;
pub const SERVFAIL: u8 = 2;
pub const NXDOMAIN: u8 = 3;
pub const REFUSED: u8 = 5;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    #[error("not a DNS query")]
    NotAQuery,
    #[error("the query's question is malformed")]
    Malformed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    id: u16,
    recursion_desired: bool,
    /// The name asked, lowercase, without the trailing dot.
    pub name: String,
    pub qtype: u16,
    /// The question as it came (echoed in the answer).
    question: Vec<u8>,
}

pub fn parse_query(buf: &[u8]) -> Result<Query, DnsError> {
    if buf.len() < 12 {
        return Err(DnsError::NotAQuery);
    }
    let id = u16::from_be_bytes([buf[0], buf[1]]);
    let flags = u16::from_be_bytes([buf[2], buf[3]]);
    let qdcount = u16::from_be_bytes([buf[4], buf[5]]);
    // A query (QR 0), standard opcode, one question.
    if flags & 0x8000 != 0 || (flags >> 11) & 0xf != 0 || qdcount != 1 {
        return Err(DnsError::NotAQuery);
    }
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*buf.get(at).ok_or(DnsError::Malformed)?);
        at += 1;
        if len == 0 {
            break;
        }
        // Compression pointers have no place in a question.
        if len > 63 {
            return Err(DnsError::Malformed);
        }
        let label = buf.get(at..at + len).ok_or(DnsError::Malformed)?;
        labels.push(String::from_utf8_lossy(label).to_ascii_lowercase());
        at += len;
    }
    let tail = buf.get(at..at + 4).ok_or(DnsError::Malformed)?;
    let qtype = u16::from_be_bytes([tail[0], tail[1]]);
    let name = labels.join(".");
    if name.len() > 253 {
        return Err(DnsError::Malformed);
    }
    Ok(Query {
        id,
        recursion_desired: flags & 0x0100 != 0,
        name,
        qtype,
        question: buf[12..at + 4].to_vec(),
    })
}

/// The answer to `q`: `rcode`, and for an A question the addresses.
pub fn answer(q: &Query, rcode: u8, addrs: &[Ipv4Addr]) -> Vec<u8> {
    let addrs: &[Ipv4Addr] = if rcode == NOERROR && q.qtype == TYPE_A {
        addrs
    } else {
        &[]
    };
    let mut out = Vec::with_capacity(12 + q.question.len() + addrs.len() * 16);
    out.extend_from_slice(&q.id.to_be_bytes());
    // QR, RA, and RD as asked.
    let flags: u16 = 0x8080 | if q.recursion_desired { 0x0100 } else { 0 } | u16::from(rcode & 0xf);
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&(addrs.len() as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&q.question);
    for addr in addrs {
        // The name: a pointer to the question's.
        out.extend_from_slice(&[0xc0, 12]);
        out.extend_from_slice(&TYPE_A.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&30u32.to_be_bytes());
        out.extend_from_slice(&4u16.to_be_bytes());
        out.extend_from_slice(&addr.octets());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&CLASS_IN.to_be_bytes());
        q
    }

    #[test]
    fn queries_are_answered() {
        let q = parse_query(&query("Example.TEST", TYPE_A)).expect("query");
        assert_eq!(q.name, "example.test");
        let a = answer(&q, NOERROR, &[Ipv4Addr::new(10, 1, 2, 3)]);
        assert_eq!(&a[..2], &[0x12, 0x34]);
        assert_eq!(a[3] & 0xf, NOERROR);
        assert_eq!(u16::from_be_bytes([a[6], a[7]]), 1);
        assert_eq!(&a[a.len() - 4..], &[10, 1, 2, 3]);
        let refused = answer(&q, REFUSED, &[Ipv4Addr::new(10, 1, 2, 3)]);
        assert_eq!(refused[3] & 0xf, REFUSED);
        assert_eq!(u16::from_be_bytes([refused[6], refused[7]]), 0);
        let aaaa = parse_query(&query("example.test", 28)).expect("query");
        assert_eq!(
            answer(&aaaa, NOERROR, &[Ipv4Addr::LOCALHOST]).len(),
            12 + aaaa.question.len()
        );
    }

    #[test]
    fn garbage_is_refused_without_panic() {
        assert_eq!(parse_query(b"short"), Err(DnsError::NotAQuery));
        let good = query("a.test", TYPE_A);
        for cut in 12..good.len() {
            assert!(parse_query(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut pointer = good.clone();
        pointer[12] = 0xc0;
        assert!(parse_query(&pointer).is_err());
        for i in 0..good.len() {
            let mut b = good.clone();
            b[i] ^= 0xff;
            let _ = parse_query(&b);
        }
    }
}
