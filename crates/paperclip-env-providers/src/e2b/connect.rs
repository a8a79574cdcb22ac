//! Connect protocol envelopes (1 flag byte, 4-byte big-endian length, payload).

use bytes::{Buf, BytesMut};

/// Flag of a compressed payload (never negotiated, so a protocol error).
pub(crate) const FLAG_COMPRESSED: u8 = 0x01;
/// Flag of the end-of-stream envelope.
pub(crate) const FLAG_END_STREAM: u8 = 0x02;
/// Largest payload accepted; a longer announced length is a protocol error.
pub(crate) const MAX_PAYLOAD: usize = 16 * 1024 * 1024;

/// One decoded envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Frame {
    /// A message.
    Message(Vec<u8>),
    /// The final end-of-stream message (JSON, `{}` on success).
    EndOfStream(Vec<u8>),
}

/// Buffers bytes that arrive in arbitrary chunks and yields whole envelopes.
#[derive(Debug, Default)]
pub(crate) struct Decoder {
    buf: BytesMut,
}

impl Decoder {
    pub(crate) fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// Bytes received but not yet part of a whole envelope.
    pub(crate) fn pending(&self) -> usize {
        self.buf.len()
    }

    /// The next whole envelope, if buffered.
    pub(crate) fn next_frame(&mut self) -> Result<Option<Frame>, String> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let flags = self.buf[0];
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if flags & FLAG_COMPRESSED != 0 {
            return Err("compressed envelope received but no compression was negotiated".into());
        }
        if len > MAX_PAYLOAD {
            return Err(format!(
                "envelope of {len} bytes exceeds the {MAX_PAYLOAD}-byte limit"
            ));
        }
        if self.buf.len() < 5 + len {
            return Ok(None);
        }
        self.buf.advance(5);
        let payload = self.buf.split_to(len).to_vec();
        Ok(Some(if flags & FLAG_END_STREAM != 0 {
            Frame::EndOfStream(payload)
        } else {
            Frame::Message(payload)
        }))
    }
}

/// Encodes one envelope.
pub(crate) fn encode(flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + payload.len());
    out.push(flags);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_across_arbitrary_chunk_boundaries() {
        let mut wire = encode(0, br#"{"a":1}"#);
        wire.extend(encode(0, br#"{"b":2}"#));
        wire.extend(encode(FLAG_END_STREAM, b"{}"));
        for split in 0..wire.len() {
            let mut d = Decoder::default();
            let mut frames = Vec::new();
            for chunk in [&wire[..split], &wire[split..]] {
                d.push(chunk);
                while let Some(f) = d.next_frame().unwrap() {
                    frames.push(f);
                }
            }
            assert_eq!(frames.len(), 3, "split at {split}");
            assert_eq!(frames[2], Frame::EndOfStream(b"{}".to_vec()));
        }
    }

    #[test]
    fn rejects_compressed_and_oversized() {
        let mut d = Decoder::default();
        d.push(&encode(FLAG_COMPRESSED, b"x"));
        assert!(d.next_frame().is_err());
        let mut d = Decoder::default();
        d.push(&[0, 0xff, 0xff, 0xff, 0xff]);
        assert!(d.next_frame().is_err());
    }
}
