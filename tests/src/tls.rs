//! Certificates made at test time (never committed): a private CA and a
//! server certificate for `localhost` / `127.0.0.1` it signed, as PEM
//! files, and TLS clients that trust the CA.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// The ALPN id of the protocol.
pub const ALPN: &[u8] = b"im/1";

/// A CA, the server certificate and key it signed, in a directory.
pub struct TestPki {
    dir: PathBuf,
    ca: CertificateDer<'static>,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestPki {
    /// A fresh CA and server certificate, written under `dir`.
    pub fn new(dir: &Path) -> TestPki {
        let (ca, ca_pem, issuer) = new_ca();
        let pki = TestPki {
            dir: dir.to_path_buf(),
            ca,
            issuer,
        };
        std::fs::write(pki.ca_file(), ca_pem).expect("write CA");
        pki.issue();
        pki
    }

    /// Signs a new server certificate (new key) and writes it over the old
    /// files.
    pub fn issue(&self) {
        let params = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
            .expect("certificate parameters");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        std::fs::write(self.cert_file(), cert.pem()).expect("write certificate");
        std::fs::write(self.key_file(), key.serialize_pem()).expect("write key");
    }

    /// Moves to a new CA (writing its certificate to the CA file) and signs
    /// a server certificate with it: clients trusting the old CA no longer
    /// accept new handshakes.
    pub fn rotate_ca(&mut self) {
        let (ca, ca_pem, issuer) = new_ca();
        self.ca = ca;
        self.issuer = issuer;
        std::fs::write(self.ca_file(), ca_pem).expect("write CA");
        self.issue();
    }

    /// The CA certificate (PEM).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The server certificate (PEM).
    pub fn cert_file(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }

    /// The server key (PEM).
    pub fn key_file(&self) -> PathBuf {
        self.dir.join("key.pem")
    }

    /// Writes a ticket-key file with `secret` (hex) and returns its path.
    pub fn ticket_key_file(&self, secret: &str) -> PathBuf {
        let path = self.dir.join("ticket-keys");
        std::fs::write(&path, format!("{secret}\n")).expect("write ticket keys");
        path
    }

    /// The server flags for a TLS listener on `addr`.
    pub fn server_args(&self, addr: SocketAddr) -> Vec<String> {
        vec![
            "--tls-listen".into(),
            addr.to_string(),
            "--tls-cert".into(),
            self.cert_file().display().to_string(),
            "--tls-key".into(),
            self.key_file().display().to_string(),
        ]
    }

    /// A client configuration trusting the current CA (with its own
    /// session cache, so a second connection may resume).
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone()).expect("CA certificate");
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![ALPN.to_vec()];
        Arc::new(config)
    }
}

/// A CA certificate (DER and PEM) and its signing half.
fn new_ca() -> (
    CertificateDer<'static>,
    String,
    rcgen::Issuer<'static, rcgen::KeyPair>,
) {
    let mut params = rcgen::CertificateParams::new(Vec::new()).expect("CA parameters");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "im test CA");
    let key = rcgen::KeyPair::generate().expect("CA key");
    let cert = params.self_signed(&key).expect("self-sign CA");
    (
        cert.der().clone(),
        cert.pem(),
        rcgen::Issuer::new(params, key),
    )
}

/// Opens TCP to `addr` and runs a TLS handshake for `localhost`.
pub async fn connect(
    addr: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    connect_after(addr, &[], config).await
}

/// Like [`connect`], writing `preamble` (a PROXY protocol header, as a
/// balancer passing TLS through sends it) in clear first.
pub async fn connect_after(
    addr: SocketAddr,
    preamble: &[u8],
    config: &Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    use tokio::io::AsyncWriteExt;
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    tcp.write_all(preamble).await?;
    let name = ServerName::try_from("localhost").expect("server name");
    TlsConnector::from(config.clone()).connect(name, tcp).await
}
