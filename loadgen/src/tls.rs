//! TLS for simulated users: one client configuration for the run and one
//! server name for every node (as clients of one service see it). Each
//! user keeps the session tickets of its own connections
//! ([`Tls::for_user`]), as a real client does, so whether a reconnect to
//! another node resumes depends on the nodes sharing ticket keys. A
//! single [`Tls`] can instead pool the tickets of many connections (for
//! benchmarks that only count handshakes).

use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use rustls::client::{ClientSessionMemoryCache, ClientSessionStore};
use rustls::client::{Tls12ClientSessionValue, Tls13ClientSessionValue};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{NamedGroup, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// The ALPN id of the protocol.
const ALPN: &[u8] = b"im/1";

/// How this run speaks TLS.
#[derive(Clone)]
pub struct Tls {
    config: Arc<rustls::ClientConfig>,
    connector: TlsConnector,
    name: ServerName<'static>,
    pool: Arc<TicketPool>,
}

impl Tls {
    /// Trusts the CA file's certificates (or, without one, the bundle at
    /// the usual system path), checks every node against `server_name`,
    /// and keeps up to `tickets` session tickets.
    pub fn new(ca_file: Option<&Path>, server_name: &str, tickets: usize) -> anyhow::Result<Tls> {
        let path = ca_file.unwrap_or(Path::new("/etc/ssl/certs/ca-certificates.crt"));
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(path)
            .with_context(|| format!("CA file {}", path.display()))?
        {
            let cert = cert.with_context(|| format!("CA file {}", path.display()))?;
            roots.add(cert).context("CA certificate")?;
        }
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![ALPN.to_vec()];
        let pool = Arc::new(TicketPool::new(tickets));
        config.resumption = rustls::client::Resumption::store(pool.clone());
        let config = Arc::new(config);
        Ok(Tls {
            connector: TlsConnector::from(config.clone()),
            config,
            pool,
            name: ServerName::try_from(server_name.to_owned())
                .with_context(|| format!("TLS server name {server_name}"))?,
        })
    }

    /// The same settings with a ticket store of one user's own (two
    /// tickets).
    pub fn for_user(&self) -> Tls {
        let pool = Arc::new(TicketPool::new(2));
        let mut config = (*self.config).clone();
        config.resumption = rustls::client::Resumption::store(pool.clone());
        let config = Arc::new(config);
        Tls {
            connector: TlsConnector::from(config.clone()),
            config,
            name: self.name.clone(),
            pool,
        }
    }

    /// Whether handshakes offer the tickets kept (default yes). Off, every
    /// handshake is a full one, and the tickets it brings are still kept.
    pub fn set_resume(&self, resume: bool) {
        self.pool
            .resume
            .store(resume, std::sync::atomic::Ordering::Relaxed);
    }

    /// Runs the handshake on `tcp`.
    pub async fn connect(&self, tcp: TcpStream) -> std::io::Result<TlsStream<TcpStream>> {
        self.connector.connect(self.name.clone(), tcp).await
    }
}

/// TLS 1.3 tickets of every connection (rustls's own cache keeps 8 per
/// server name, and every node has the same name here); the rest as the
/// standard cache does it.
#[derive(Debug)]
struct TicketPool {
    tickets: Mutex<VecDeque<Tls13ClientSessionValue>>,
    max: usize,
    other: ClientSessionMemoryCache,
    resume: std::sync::atomic::AtomicBool,
}

impl TicketPool {
    fn new(max: usize) -> TicketPool {
        TicketPool {
            tickets: Mutex::new(VecDeque::new()),
            max: max.max(1),
            other: ClientSessionMemoryCache::new(16),
            resume: std::sync::atomic::AtomicBool::new(true),
        }
    }

    fn tickets(&self) -> std::sync::MutexGuard<'_, VecDeque<Tls13ClientSessionValue>> {
        self.tickets.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl ClientSessionStore for TicketPool {
    fn set_kx_hint(&self, name: ServerName<'static>, group: NamedGroup) {
        self.other.set_kx_hint(name, group);
    }

    fn kx_hint(&self, name: &ServerName<'_>) -> Option<NamedGroup> {
        self.other.kx_hint(name)
    }

    fn set_tls12_session(&self, name: ServerName<'static>, value: Tls12ClientSessionValue) {
        self.other.set_tls12_session(name, value);
    }

    fn tls12_session(&self, name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        if !self.resume.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        self.other.tls12_session(name)
    }

    fn remove_tls12_session(&self, name: &ServerName<'static>) {
        self.other.remove_tls12_session(name);
    }

    fn insert_tls13_ticket(&self, _name: ServerName<'static>, value: Tls13ClientSessionValue) {
        let mut tickets = self.tickets();
        if tickets.len() >= self.max {
            tickets.pop_front();
        }
        tickets.push_back(value);
    }

    fn take_tls13_ticket(&self, _name: &ServerName<'static>) -> Option<Tls13ClientSessionValue> {
        if !self.resume.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        // Newest first: the oldest are the likeliest to have expired.
        self.tickets().pop_back()
    }
}
