//! HTTPS for the emulator: a throwaway CA and a server certificate for
//! `127.0.0.1`/`localhost`, so clients exercise the kubeconfig
//! `certificate-authority-data` path with real verification.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::server::TlsStream;

/// The CA (PEM) clients must trust, and the acceptor presenting the
/// server certificate it signed.
pub(crate) fn authority() -> std::io::Result<(String, TlsAcceptor)> {
    let invalid = |e: rcgen::Error| std::io::Error::other(format!("certificate generation: {e}"));
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(invalid)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "paperclip kube emulator CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().map_err(invalid)?)
        .map_err(invalid)?;
    let server_key = KeyPair::generate().map_err(invalid)?;
    let mut server_params =
        CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .map_err(invalid)?;
    server_params
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    let server = server_params.signed_by(&server_key, &ca).map_err(invalid)?;
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(server_key.serialize_der().into());
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(std::io::Error::other)?
    .with_no_client_auth()
    .with_single_cert(vec![server.der().clone(), ca.as_ref().der().clone()], key)
    .map_err(std::io::Error::other)?;
    // Exec upgrades need HTTP/1.1.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((ca.as_ref().pem(), TlsAcceptor::from(Arc::new(config))))
}

/// A TCP listener whose connections are TLS-terminated before axum sees
/// them; a failed or stalled handshake drops that connection only.
pub(crate) struct TlsListener {
    pub tcp: TcpListener,
    pub acceptor: TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((mut stream, addr)) = self.tcp.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            super::super::serve::no_delay(&mut stream);
            let handshake = self.acceptor.accept(stream);
            if let Ok(Ok(tls)) = tokio::time::timeout(Duration::from_secs(5), handshake).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}
