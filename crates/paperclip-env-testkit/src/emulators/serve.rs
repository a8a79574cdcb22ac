//! Machinery every HTTP emulator shares: one way to serve an axum app on
//! 127.0.0.1 and stop it, and one recorded-request type.

use std::net::SocketAddr;

use axum::Router;
use axum::serve::ListenerExt;

/// Sets `TCP_NODELAY` on an accepted connection: a small response written
/// after an unacknowledged one otherwise waits out Nagle against the
/// client's delayed ACK (~40 ms), which would be measured as ours.
pub(crate) fn no_delay(stream: &mut tokio::net::TcpStream) {
    let _ = stream.set_nodelay(true);
}

/// An app served on `127.0.0.1:<random port>`; graceful shutdown starts when
/// this is dropped.
pub(crate) struct Server {
    addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Server {
    /// Binds a free port on 127.0.0.1 and serves `app` there.
    pub(crate) async fn start(app: Router) -> std::io::Result<Server> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let listener = listener.tap_io(no_delay);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        Ok(Server {
            addr,
            shutdown: Some(tx),
        })
    }

    /// The bound address.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// One request an emulator received.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// Method.
    pub method: String,
    /// Path (no query).
    pub path: String,
    /// Query string.
    pub query: Option<String>,
    /// Headers, lower-cased names (sensitive values included: tests assert on them).
    pub headers: Vec<(String, String)>,
    /// Body, lossily decoded, at most 64 KiB.
    pub body: String,
}

impl RecordedRequest {
    /// Records a request from its parts and body bytes.
    pub(crate) fn of(parts: &axum::http::request::Parts, body: &[u8]) -> RecordedRequest {
        RecordedRequest {
            method: parts.method.to_string(),
            path: parts.uri.path().to_owned(),
            query: parts.uri.query().map(str::to_owned),
            headers: parts
                .headers
                .iter()
                .map(|(n, v)| {
                    (
                        n.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: String::from_utf8_lossy(&body[..body.len().min(64 * 1024)]).into_owned(),
        }
    }

    /// A header value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == &name.to_ascii_lowercase())
            .map(|(_, v)| v.as_str())
    }
}
