//! Reading the run event stream (`GET /v1/runs/:id/events`, `text/event-stream`) as a
//! client: blocks separated by a blank line, `event:`, `id:` and `data:` fields,
//! `:` comments ignored. Chunks may split blocks anywhere; [`SseDecoder`] keeps the rest.

/// One event of the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// `event:`; `message` when absent, as the SSE standard says.
    pub event: String,
    /// `id:`, absent on heartbeats.
    pub id: Option<String>,
    /// The `data:` lines, joined by newlines (ours is one line of JSON).
    pub data: String,
}

/// Turns chunks of the stream into events as blocks complete. Chunks are bytes: a
/// chunk may end inside a UTF-8 character or between CR and LF.
#[derive(Debug, Default)]
pub struct SseDecoder {
    pending: Vec<u8>,
}

impl SseDecoder {
    /// Adds `chunk` and returns the events it completed.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        self.pending.extend_from_slice(chunk);
        if self.pending.contains(&b'\r') {
            self.pending = crlf_to_lf(&self.pending);
        }
        let mut events = Vec::new();
        while let Some(end) = self.pending.windows(2).position(|w| w == b"\n\n") {
            let block: Vec<u8> = self.pending.drain(..end + 2).collect();
            events.extend(parse_block(&String::from_utf8_lossy(&block)));
        }
        events
    }
}

/// CRLF becomes LF; a CR at the very end stays (its LF may be in the next chunk).
fn crlf_to_lf(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    for (i, &b) in bytes.iter().enumerate() {
        if b != b'\r' || bytes.get(i + 1).is_none_or(|&next| next != b'\n') {
            out.push(b);
        }
    }
    out
}

/// Every event of a whole stream body.
pub fn parse_stream(body: &str) -> Vec<SseEvent> {
    let mut decoder = SseDecoder::default();
    let mut events = decoder.push(body.as_bytes());
    events.extend(decoder.push(b"\n\n"));
    events
}

fn parse_block(block: &str) -> Option<SseEvent> {
    let (mut event, mut id, mut data, mut any) = (None, None, Vec::new(), false);
    for line in block
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with(':'))
    {
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => event = Some(value.to_owned()),
            "id" => id = Some(value.to_owned()),
            "data" => data.push(value),
            _ => continue,
        }
        any = true;
    }
    any.then(|| SseEvent {
        event: event.unwrap_or_else(|| "message".into()),
        id,
        data: data.join("\n"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_split_anywhere_come_out_whole() {
        let stream = "event: status\nid: evt_1\ndata: {\"a\":\"é→\"}\n\n: keep-alive\n\nevent: heartbeat\ndata: {}\r\n\r\n";
        let mut d = SseDecoder::default();
        let mut events = Vec::new();
        for piece in stream.as_bytes().chunks(3) {
            events.extend(d.push(piece));
        }
        assert_eq!(
            events,
            vec![
                SseEvent {
                    event: "status".into(),
                    id: Some("evt_1".into()),
                    data: "{\"a\":\"é→\"}".into()
                },
                SseEvent {
                    event: "heartbeat".into(),
                    id: None,
                    data: "{}".into()
                },
            ]
        );
    }

    #[test]
    fn a_body_without_its_last_blank_line_loses_nothing() {
        let events = parse_stream("data: one\ndata: two");
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].event, "message");
        assert_eq!(events[0].data, "one\ntwo");
    }
}
