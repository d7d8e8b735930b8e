//! TLS to the server (rustls on the `ring` provider): which roots to trust,
//! the ALPN id `im/1`, and session resumption (tickets are kept in memory
//! per server name, so a reconnect skips the full handshake).

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::ClientError;

/// The ALPN protocol id of the server's protocol.
pub const ALPN: &[u8] = b"im/1";

/// How a client speaks TLS: the trusted roots, and optionally the name to
/// check the server's certificate against (default: the host part of the
/// address connected to). Cheap to clone.
#[derive(Clone)]
pub struct Tls {
    connector: TlsConnector,
    server_name: Option<ServerName<'static>>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Trusts the operating system's root certificates.
    pub fn system_roots() -> Result<Tls, ClientError> {
        let found = rustls_native_certs::load_native_certs();
        let mut roots = RootCertStore::empty();
        let (added, _) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            return Err(ClientError::InvalidArgument(format!(
                "no usable system root certificate ({} errors)",
                found.errors.len()
            )));
        }
        Tls::with_roots(roots)
    }

    /// Trusts the CA certificates of a PEM file (a private CA) only.
    pub fn with_ca_file(path: impl AsRef<Path>) -> Result<Tls, ClientError> {
        let path = path.as_ref();
        let bad = |e: &dyn fmt::Display| {
            ClientError::InvalidArgument(format!("CA file {}: {e}", path.display()))
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| bad(&e))?
            .collect::<Result<_, _>>()
            .map_err(|e| bad(&e))?;
        let mut roots = RootCertStore::empty();
        for cert in certs {
            roots.add(cert).map_err(|e| bad(&e))?;
        }
        if roots.is_empty() {
            return Err(bad(&"no certificate in the file"));
        }
        Tls::with_roots(roots)
    }

    /// Trusts `roots`.
    pub fn with_roots(roots: RootCertStore) -> Result<Tls, ClientError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError::InvalidArgument(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(Tls::with_config(Arc::new(config)))
    }

    /// Uses a rustls configuration as it is (its ALPN list should hold
    /// [`ALPN`]).
    pub fn with_config(config: Arc<rustls::ClientConfig>) -> Tls {
        Tls {
            connector: TlsConnector::from(config),
            server_name: None,
        }
    }

    /// Checks the server's certificate against `name` instead of the host
    /// connected to (e.g. when connecting by IP address).
    pub fn with_server_name(mut self, name: &str) -> Result<Tls, ClientError> {
        let name = ServerName::try_from(name.to_owned())
            .map_err(|e| ClientError::InvalidArgument(format!("server name {name}: {e}")))?;
        self.server_name = Some(name);
        Ok(self)
    }

    /// Runs the handshake on `tcp`, connected to `addr` (`host:port`).
    pub async fn connect(
        &self,
        addr: &str,
        tcp: TcpStream,
    ) -> Result<TlsStream<TcpStream>, ClientError> {
        let name = match &self.server_name {
            Some(name) => name.clone(),
            None => host_name(addr)?,
        };
        Ok(self.connector.connect(name, tcp).await?)
    }
}

/// The host part of `host:port` (IPv6 in brackets) as a server name.
fn host_name(addr: &str) -> Result<ServerName<'static>, ClientError> {
    let host = match addr.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host,
        _ => addr,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned())
        .map_err(|e| ClientError::InvalidArgument(format!("server name {host}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_names_come_from_the_address() {
        assert_eq!(
            host_name("chat.example.com:7443").unwrap(),
            ServerName::try_from("chat.example.com").unwrap()
        );
        assert!(matches!(
            host_name("127.0.0.1:7443").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            host_name("[::1]:7443").unwrap(),
            ServerName::IpAddress(_)
        ));
    }

    #[test]
    fn ca_files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "no certificate here").unwrap();
        assert!(Tls::with_ca_file(&path).is_err());
        assert!(Tls::with_ca_file(dir.path().join("missing.pem")).is_err());
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(&path, cert.pem()).unwrap();
        assert!(Tls::with_ca_file(&path).is_ok());
    }
}
