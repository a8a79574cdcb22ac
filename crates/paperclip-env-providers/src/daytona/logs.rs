//! The log-follow WebSocket and its stream demuxer (spec 22 §5.7).

use futures::StreamExt;
use paperclip_env_core::{Error, OutputCollector, Result};
use tokio_tungstenite::tungstenite::Message;

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

/// What one command has produced so far, per stream, and how much of it
/// was handed to the host.
///
/// The daemon frames output per line: a last line without newline gains
/// one, so the log alone cannot tell `printf a` from `echo a`. The provider
/// therefore ends every command with `\n<trailer>` on both streams; the
/// trailer's line is the daemon's last line, the byte before it is the
/// command's own. Live delivery holds back whatever could still turn out
/// to be the start of `\n<trailer>\n`, so the host only ever sees exact
/// output.
#[derive(Debug)]
pub(crate) struct Streams {
    ending: Vec<u8>,
    stdout: Stream,
    stderr: Stream,
}

#[derive(Debug, Default)]
struct Stream {
    received: Vec<u8>,
    delivered: usize,
}

impl Stream {
    /// The longest tail of `received` that could begin `ending`.
    fn held_back(&self, ending: &[u8]) -> usize {
        let max = self.received.len().min(ending.len());
        (1..=max)
            .rev()
            .find(|&n| self.received[self.received.len() - n..] == ending[..n])
            .unwrap_or(0)
    }
}

impl Streams {
    /// `trailer`: the token the command prints last on both streams.
    pub fn new(trailer: &str) -> Self {
        Streams {
            ending: format!("\n{trailer}\n").into_bytes(),
            stdout: Stream::default(),
            stderr: Stream::default(),
        }
    }

    fn stream(&mut self, is_stdout: bool) -> &mut Stream {
        if is_stdout {
            &mut self.stdout
        } else {
            &mut self.stderr
        }
    }

    /// Adds the bytes of one stream found at `offset` of it (a reconnect
    /// replays the log from byte 0: what is known is skipped) and delivers
    /// what can no longer be part of the trailer.
    fn add(&mut self, is_stdout: bool, offset: usize, bytes: &[u8], output: &OutputCollector) {
        let ending = self.ending.clone();
        let stream = self.stream(is_stdout);
        let known = stream.received.len();
        if offset + bytes.len() <= known {
            return;
        }
        let skip = known.saturating_sub(offset);
        stream.received.extend_from_slice(&bytes[skip..]);
        let until = stream.received.len() - stream.held_back(&ending);
        if until > stream.delivered {
            let fresh = &stream.received[stream.delivered..until];
            if is_stdout {
                output.stdout(fresh);
            } else {
                output.stderr(fresh);
            }
            stream.delivered = until;
        }
    }

    /// The command ended without its trailer (deadline): everything seen
    /// is its output.
    pub fn flush(&mut self, output: &OutputCollector) {
        for is_stdout in [true, false] {
            let stream = self.stream(is_stdout);
            let fresh = stream.received[stream.delivered..].to_vec();
            stream.delivered = stream.received.len();
            if !fresh.is_empty() {
                if is_stdout {
                    output.stdout(&fresh);
                } else {
                    output.stderr(&fresh);
                }
            }
        }
    }

    /// A stream's final text without the trailer line (as is when the
    /// trailer is missing).
    pub fn exact<'a>(&self, text: &'a [u8]) -> &'a [u8] {
        text.strip_suffix(self.ending.as_slice()).unwrap_or(text)
    }
}

/// One connection's view of the log: demuxes it and counts the bytes of
/// each stream so a replayed prefix is recognised.
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

    pub fn feed(&mut self, data: &[u8], streams: &mut Streams, output: &OutputCollector) {
        for (is_stdout, bytes) in self.demux.feed(data) {
            let seen = if is_stdout {
                &mut self.seen_out
            } else {
                &mut self.seen_err
            };
            let offset = *seen;
            *seen += bytes.len();
            streams.add(is_stdout, offset, &bytes, output);
        }
    }
}

/// The follow socket, over a connection upgraded by reqwest.
pub(crate) type Socket = tokio_tungstenite::WebSocketStream<reqwest::Upgraded>;

/// The HTTP/1.1-only client that opens log sockets (an upgrade needs
/// HTTP/1.1; ALPN could otherwise pick h2 on https toolboxes).
pub(crate) fn socket_client(connect_timeout: std::time::Duration) -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .http1_only()
        .connect_timeout(connect_timeout)
        .build()
        .map_err(|e| {
            Error::provider_with_source(
                "daytona",
                "building the log-stream client failed",
                false,
                e,
            )
        })
}

/// Opens the follow socket at `url` (http/https).
///
/// The handshake is sent by reqwest, not by tungstenite: tungstenite logs
/// the whole handshake request, Authorization header included, at TRACE
/// (issue 26); reqwest marks the header sensitive and logs no headers.
pub(crate) async fn connect(
    client: &reqwest::Client,
    url: &str,
    headers: &reqwest::header::HeaderMap,
    timeout: std::time::Duration,
) -> Result<Socket> {
    use tokio_tungstenite::tungstenite::handshake::client::generate_key;
    use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
    use tokio_tungstenite::tungstenite::protocol::Role;
    let key = generate_key();
    let request = client
        .get(url)
        .headers(headers.clone())
        .header(reqwest::header::CONNECTION, "Upgrade")
        .header(reqwest::header::UPGRADE, "websocket")
        .header(reqwest::header::SEC_WEBSOCKET_VERSION, "13")
        .header(reqwest::header::SEC_WEBSOCKET_KEY, &key);
    let response = tokio::time::timeout(timeout, request.send())
        .await
        .map_err(|_| Error::provider("daytona", "log stream: the handshake timed out"))?
        .map_err(|e| {
            Error::provider_with_source("daytona", "log stream: connect failed", true, e)
        })?;
    if response.status() != reqwest::StatusCode::SWITCHING_PROTOCOLS {
        return Err(Error::provider(
            "daytona",
            format!(
                "log stream: the server answered {} to the upgrade",
                response.status()
            ),
        ));
    }
    let accept = response
        .headers()
        .get(reqwest::header::SEC_WEBSOCKET_ACCEPT)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if accept.as_deref() != Some(derive_accept_key(key.as_bytes()).as_str()) {
        return Err(Error::provider(
            "daytona",
            "log stream: the server's Sec-WebSocket-Accept does not match",
        ));
    }
    let upgraded = response.upgrade().await.map_err(|e| {
        Error::provider_with_source("daytona", "log stream: upgrade failed", true, e)
    })?;
    Ok(tokio_tungstenite::WebSocketStream::from_raw_socket(upgraded, Role::Client, None).await)
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
        let client = socket_client(std::time::Duration::from_secs(5)).unwrap();
        let url = format!("https://127.0.0.1:{port}/logs");
        let err = match connect(&client, &url, &headers, std::time::Duration::from_secs(5)).await {
            Ok(_) => panic!("connected to a peer that hung up"),
            Err(e) => e.to_string(),
        };
        assert!(!err.contains("TLS support not compiled"), "{err}");
    }

    #[test]
    fn replay_skips_delivered_prefix_and_the_trailer() {
        let output = OutputCollector::buffered();
        let mut streams = Streams::new("END");
        Replay::new().feed(b"\x01\x01\x01abc\n", &mut streams, &output);
        Replay::new().feed(
            b"\x01\x01\x01abc\n\x01\x01\x01def\n\x02\x02\x02x\n\x01\x01\x01END\n\x02\x02\x02END\n",
            &mut streams,
            &output,
        );
        let r = output.finish(paperclip_env_core::CommandExit::code(0));
        assert_eq!((r.stdout.as_str(), r.stderr.as_str()), ("abc\ndef", "x"));
    }

    #[test]
    fn the_command_s_own_last_newline_survives() {
        let streams = Streams::new("END");
        assert_eq!(streams.exact(b"a\n\nEND\n"), b"a\n");
        assert_eq!(streams.exact(b"a\nEND\n"), b"a");
        assert_eq!(streams.exact(b"\nEND\n"), b"");
        assert_eq!(streams.exact(b"cut off\n"), b"cut off\n");
    }
}
