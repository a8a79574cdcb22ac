//! Server-sent events parsing (spec 23 §4.5): CRLF or LF, frames split at any
//! byte, comments ignored, multi-line `data:` joined with `\n`.

/// One parsed event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Event {
    pub kind: String,
    pub data: String,
}

/// Buffers bytes and yields complete events.
#[derive(Debug, Default)]
pub(crate) struct Parser {
    buf: Vec<u8>,
}

impl Parser {
    pub(crate) fn push(&mut self, chunk: &[u8]) -> Vec<Event> {
        self.buf.extend_from_slice(chunk);
        let mut events = Vec::new();
        while let Some((end, skip)) = frame_end(&self.buf) {
            let frame: Vec<u8> = self.buf.drain(..end + skip).take(end).collect();
            if let Some(event) = parse_frame(&frame) {
                events.push(event);
            }
        }
        events
    }

    /// The final frame at end of stream, if bytes remain.
    pub(crate) fn finish(&mut self) -> Option<Event> {
        let rest = std::mem::take(&mut self.buf);
        if rest.iter().all(|b| b.is_ascii_whitespace()) {
            None
        } else {
            parse_frame(&rest)
        }
    }
}

/// Position of the blank line ending the first frame and its length.
fn frame_end(buf: &[u8]) -> Option<(usize, usize)> {
    let mut i = 0;
    while i + 1 < buf.len() {
        if buf[i] == b'\n' {
            if buf[i + 1] == b'\n' {
                return Some((i, 2));
            }
            if buf[i + 1] == b'\r' && buf.get(i + 2) == Some(&b'\n') {
                return Some((i, 3));
            }
        }
        i += 1;
    }
    None
}

fn parse_frame(frame: &[u8]) -> Option<Event> {
    let text = String::from_utf8_lossy(frame).replace("\r\n", "\n");
    let mut kind = String::new();
    let mut data: Vec<&str> = Vec::new();
    let mut meaningful = false;
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if let Some(rest) = line.strip_prefix("event:") {
            kind = rest.trim().to_owned();
            meaningful = true;
        } else if let Some(rest) = line.strip_prefix("data:") {
            data.push(rest.trim_start());
            meaningful = true;
        }
    }
    if !meaningful {
        return None;
    }
    Some(Event {
        kind: if kind.is_empty() {
            "message".into()
        } else {
            kind
        },
        data: data.join("\n"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_split_of_crlf_and_lf_streams() {
        let wire = ": keepalive\r\n\r\nevent: stdout\r\ndata: {\"data\":\"h\u{e9}\"}\r\n\r\nevent: complete\ndata: {\"a\":\ndata: 1}\n\n: keepalive\n\nevent: stdout\ndata: {\"data\":\"tail\"}";
        let bytes = wire.as_bytes();
        for split in 0..bytes.len() {
            let mut p = Parser::default();
            let mut events = p.push(&bytes[..split]);
            events.extend(p.push(&bytes[split..]));
            events.extend(p.finish());
            let kinds: Vec<_> = events.iter().map(|e| e.kind.as_str()).collect();
            assert_eq!(kinds, ["stdout", "complete", "stdout"], "split at {split}");
            assert_eq!(events[0].data, "{\"data\":\"h\u{e9}\"}");
            assert_eq!(events[1].data, "{\"a\":\n1}");
        }
    }
}
