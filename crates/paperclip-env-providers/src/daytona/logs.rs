//! The log-follow WebSocket and its stream demuxer (spec 22 §5.7).

use futures::StreamExt;
use paperclip_env_core::{Error, OutputCollector, Result};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const STDOUT: [u8; 3] = [1, 1, 1];
const STDERR: [u8; 3] = [2, 2, 2];

/// Splits the raw log into stdout and stderr; markers may be split across
/// messages, bytes before the first marker are dropped.
#[derive(Debug, Default)]
pub(crate) struct Demuxer {
    current: Option<bool>, // Some(true) = stdout
    pending: Vec<u8>,
}

impl Demuxer {
    /// Feeds bytes; returns `(is_stdout, bytes)` pieces.
    pub fn feed(&mut self, data: &[u8]) -> Vec<(bool, Vec<u8>)> {
        self.pending.extend_from_slice(data);
        let mut out = Vec::new();
        let buf = std::mem::take(&mut self.pending);
        let mut start = 0;
        let mut i = 0;
        while i + 3 <= buf.len() {
            let window = &buf[i..i + 3];
            if window == STDOUT || window == STDERR {
                if let Some(stream) = self.current
                    && i > start
                {
                    out.push((stream, buf[start..i].to_vec()));
                }
                self.current = Some(window == STDOUT);
                i += 3;
                start = i;
            } else {
                i += 1;
            }
        }
        // Keep up to 2 trailing bytes that could begin a marker.
        let mut keep = 0;
        for n in (1..=2).rev() {
            if buf.len() >= start + n {
                let tail = &buf[buf.len() - n..];
                if tail.iter().all(|b| *b == 1) || tail.iter().all(|b| *b == 2) {
                    keep = n;
                    break;
                }
            }
        }
        let end = buf.len() - keep;
        if let Some(stream) = self.current
            && end > start
        {
            out.push((stream, buf[start..end].to_vec()));
        }
        self.pending = buf[end..].to_vec();
        out
    }
}

/// Forwards the bytes of one stream beyond what was already delivered
/// (a reconnect replays the log from byte 0).
#[derive(Debug, Default)]
pub(crate) struct Delivery {
    pub stdout: usize,
    pub stderr: usize,
}

pub(crate) struct Replay {
    demux: Demuxer,
    seen_out: usize,
    seen_err: usize,
}

impl Replay {
    pub fn new() -> Self {
        Replay {
            demux: Demuxer::default(),
            seen_out: 0,
            seen_err: 0,
        }
    }

    pub fn feed(&mut self, data: &[u8], delivered: &mut Delivery, output: &OutputCollector) {
        for (is_stdout, bytes) in self.demux.feed(data) {
            let (seen, done) = if is_stdout {
                (&mut self.seen_out, &mut delivered.stdout)
            } else {
                (&mut self.seen_err, &mut delivered.stderr)
            };
            let begin = *seen;
            *seen += bytes.len();
            if *seen > *done {
                let skip = done.saturating_sub(begin);
                let fresh = &bytes[skip..];
                if is_stdout {
                    output.stdout(fresh);
                } else {
                    output.stderr(fresh);
                }
                *done = *seen;
            }
        }
    }
}

pub(crate) type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens the follow socket.
pub(crate) async fn connect(url: &str, headers: &reqwest::header::HeaderMap) -> Result<Socket> {
    let ws_url = if let Some(rest) = url.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if let Some(rest) = url.strip_prefix("http://") {
        format!("ws://{rest}")
    } else {
        url.to_owned()
    };
    let mut request = ws_url
        .into_client_request()
        .map_err(|e| Error::provider("daytona", format!("log stream: bad URL: {e}")))?;
    for (name, value) in headers {
        request.headers_mut().insert(name.clone(), value.clone());
    }
    let (socket, _) = tokio_tungstenite::connect_async(request)
        .await
        .map_err(|e| Error::provider("daytona", format!("log stream: connect failed: {e}")))?;
    Ok(socket)
}

/// What one read from the socket gave.
pub(crate) enum Frame {
    Data(Vec<u8>),
    Closed,
    Failed,
}

pub(crate) async fn next(socket: &mut Socket) -> Frame {
    loop {
        match socket.next().await {
            Some(Ok(Message::Binary(b))) => return Frame::Data(b.to_vec()),
            Some(Ok(Message::Text(t))) => return Frame::Data(t.as_bytes().to_vec()),
            Some(Ok(Message::Close(_))) | None => return Frame::Closed,
            Some(Ok(_)) => continue,
            Some(Err(_)) => return Frame::Failed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_split_across_messages() {
        let mut d = Demuxer::default();
        let mut out = Vec::new();
        for chunk in [
            &b"junk\x01"[..],
            b"\x01\x01hel",
            b"lo\x02\x02",
            b"\x02err\x01\x01\x01!",
        ] {
            out.extend(d.feed(chunk));
        }
        let stdout: Vec<u8> = out
            .iter()
            .filter(|(s, _)| *s)
            .flat_map(|(_, b)| b.clone())
            .collect();
        let stderr: Vec<u8> = out
            .iter()
            .filter(|(s, _)| !*s)
            .flat_map(|(_, b)| b.clone())
            .collect();
        assert_eq!(stdout, b"hello!");
        assert_eq!(stderr, b"err");
    }

    #[tokio::test]
    async fn https_toolboxes_get_tls_websockets() {
        // A TCP peer that hangs up: the TLS handshake fails, which proves
        // TLS support is compiled in (`wss://` for https toolbox URLs).
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            if let Ok((socket, _)) = listener.accept().await {
                drop(socket);
            }
        });
        let headers = reqwest::header::HeaderMap::new();
        let err = match connect(&format!("https://127.0.0.1:{port}/logs"), &headers).await {
            Ok(_) => panic!("connected to a peer that hung up"),
            Err(e) => e.to_string(),
        };
        assert!(!err.contains("TLS support not compiled"), "{err}");
    }

    #[test]
    fn replay_skips_delivered_prefix() {
        let output = OutputCollector::buffered();
        let mut delivered = Delivery::default();
        Replay::new().feed(b"\x01\x01\x01abc", &mut delivered, &output);
        Replay::new().feed(b"\x01\x01\x01abcdef\x02\x02\x02x", &mut delivered, &output);
        let r = output.finish(paperclip_env_core::CommandExit::code(0));
        assert_eq!((r.stdout.as_str(), r.stderr.as_str()), ("abcdef", "x"));
    }
}
