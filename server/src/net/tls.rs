//! TLS for client connections (rustls on the `ring` provider), free of
//! I/O: the shard reads ciphertext into its buffers, hands it to
//! [`TlsConn::read`] and writes what [`TlsConn::encrypt`] and the
//! handshake leave in its output buffer.
//!
//! rustls's *unbuffered* connection is used, so every byte buffer belongs
//! to the shard: a connection's ciphertext and plaintext buffers exist only
//! while it has something to read or write (like a plain connection's), and
//! an idle TLS connection costs its slab entry plus the rustls state (keys
//! and the record layer), about 2 KiB.
//!
//! - [`TlsAcceptor`]: the server configuration (TLS 1.3 and 1.2, ALPN
//!   `im/1`), its certificate and its ticket keys, all reloadable
//!   ([`TlsAcceptor::reload`], on SIGHUP) without touching open
//!   connections.
//! - [`TicketKeys`]: session tickets that every node can open. Each secret
//!   in `--tls-ticket-key-file` yields one key per rotation period
//!   (HMAC-SHA256 of the secret and the period number); tickets are
//!   sealed with the current period's key of the first secret and opened
//!   with the current or previous period's key of any secret, so nodes
//!   that share the file and a clock rotate together without talking to
//!   each other.
//! - [`TlsConn`]: one connection's state machine.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use hmac::{Hmac, Mac};
use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::HandshakeKind;
#[cfg(test)]
use rustls::ProtocolVersion;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{
    ClientHello, ProducesTickets, ResolvesServerCert, ServerConfig, UnbufferedServerConnection,
};
use rustls::sign::CertifiedKey;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use sha2::Sha256;

/// The ALPN protocol id of this protocol's first version.
pub const ALPN: &[u8] = b"im/1";
/// Bytes of a ticket-key secret at least (hex in the key file).
const MIN_SECRET_BYTES: usize = 32;
/// Bytes of a ticket's key id.
const KEY_ID_LEN: usize = 4;
/// Bytes of ticket overhead: key id, nonce, tag.
const TICKET_OVERHEAD: usize = KEY_ID_LEN + aead::NONCE_LEN + 16;
/// Bytes a record adds to its plaintext at most (header, content type,
/// tag; TLS 1.2 adds an explicit nonce instead of the type).
const RECORD_OVERHEAD: usize = 5 + 8 + 16 + 1;
/// Largest plaintext of one record.
pub const MAX_PLAINTEXT: usize = 16 * 1024;

/// TLS set-up failures (at start-up or on reload).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or parsed.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The certificate and key do not fit together, or rustls refused
    /// the configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

fn file_error(path: &Path, reason: impl fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// Where the certificate, key and ticket keys come from.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// Ticket-key secrets shared by every node (none: a random secret of
    /// this process, so tickets resume on this node only).
    pub ticket_keys: Option<PathBuf>,
    /// Seconds of one ticket-key period (the ticket lifetime).
    pub ticket_rotate_secs: u32,
}

/// The server's TLS configuration, shared by the shards.
pub struct TlsAcceptor {
    config: Arc<ServerConfig>,
    cert: Arc<ReloadableCert>,
    tickets: Arc<TicketKeys>,
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
}

impl fmt::Debug for TlsAcceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsAcceptor")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl TlsAcceptor {
    /// Reads the certificate, key and ticket keys and builds the
    /// configuration.
    pub fn load(files: TlsFiles) -> Result<TlsAcceptor, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cert = Arc::new(ReloadableCert {
            current: ArcSwap::from_pointee(load_cert(&files, &provider)?),
        });
        let tickets = Arc::new(TicketKeys::new(
            load_secrets(files.ticket_keys.as_deref())?,
            files.ticket_rotate_secs,
        ));
        let mut config = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(cert.clone());
        config.alpn_protocols = vec![ALPN.to_vec()];
        config.ticketer = tickets.clone();
        // One ticket per handshake: a client resumes once per reconnect
        // and gets a fresh ticket each time.
        config.send_tls13_tickets = 1;
        Ok(TlsAcceptor {
            config: Arc::new(config),
            cert,
            tickets,
            files,
            provider,
        })
    }

    /// Reads the files again: new connections use the new certificate and
    /// ticket keys, open ones are untouched. On error nothing changes.
    pub fn reload(&self) -> Result<(), TlsError> {
        let cert = load_cert(&self.files, &self.provider)?;
        let secrets = load_secrets(self.files.ticket_keys.as_deref())?;
        self.cert.current.store(Arc::new(cert));
        if self.files.ticket_keys.is_some() {
            self.tickets.replace(secrets);
        }
        Ok(())
    }

    /// A server connection for a new client.
    pub(crate) fn accept(&self) -> Result<TlsConn, rustls::Error> {
        Ok(TlsConn {
            conn: UnbufferedServerConnection::new(self.config.clone())?,
            counted: false,
            close_queued: false,
        })
    }
}

fn load_cert(files: &TlsFiles, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| file_error(&files.cert, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_error(&files.cert, e))?;
    if chain.is_empty() {
        return Err(file_error(&files.cert, "no PEM certificate in the file"));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| file_error(&files.key, e))?;
    Ok(CertifiedKey::from_der(chain, key, provider)?)
}

/// The secrets of a ticket-key file: one per line in hex, at least 32
/// bytes each; blank lines and `#` comments are skipped. No file: one
/// random secret.
fn load_secrets(path: Option<&Path>) -> Result<Vec<Vec<u8>>, TlsError> {
    let Some(path) = path else {
        let mut secret = vec![0; MIN_SECRET_BYTES];
        SystemRandom::new()
            .fill(&mut secret)
            .map_err(|_| file_error(Path::new("<random>"), "no system randomness"))?;
        return Ok(vec![secret]);
    };
    let text = std::fs::read_to_string(path).map_err(|e| file_error(path, e))?;
    let mut secrets = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let secret = decode_hex(line)
            .filter(|s| s.len() >= MIN_SECRET_BYTES)
            .ok_or_else(|| {
                file_error(
                    path,
                    format!(
                        "line {}: expected at least {MIN_SECRET_BYTES} bytes in hex",
                        n + 1
                    ),
                )
            })?;
        secrets.push(secret);
    }
    if secrets.is_empty() {
        return Err(file_error(path, "no secret in the file"));
    }
    Ok(secrets)
}

fn decode_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The certificate new handshakes present, swapped on reload.
#[derive(Debug)]
struct ReloadableCert {
    current: ArcSwap<CertifiedKey>,
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// Session-ticket keys derived per period from shared secrets (see the
/// module docs).
pub struct TicketKeys {
    secrets: ArcSwap<Vec<Vec<u8>>>,
    rotate_secs: u32,
    /// The keys of the period they were derived for.
    derived: ArcSwap<Derived>,
    rng: SystemRandom,
}

struct Derived {
    period: u64,
    /// The sealing key (current period, first secret) comes first.
    keys: Vec<([u8; KEY_ID_LEN], LessSafeKey)>,
}

impl fmt::Debug for TicketKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TicketKeys")
            .field("rotate_secs", &self.rotate_secs)
            .finish_non_exhaustive()
    }
}

impl TicketKeys {
    /// Keys from `secrets` (at least one), rotated every `rotate_secs`.
    pub fn new(secrets: Vec<Vec<u8>>, rotate_secs: u32) -> TicketKeys {
        let rotate_secs = rotate_secs.max(1);
        let keys = TicketKeys {
            derived: ArcSwap::from_pointee(Derived {
                period: u64::MAX,
                keys: Vec::new(),
            }),
            secrets: ArcSwap::from_pointee(secrets),
            rotate_secs,
            rng: SystemRandom::new(),
        };
        keys.keys_at(unix_secs());
        keys
    }

    fn replace(&self, secrets: Vec<Vec<u8>>) {
        self.secrets.store(Arc::new(secrets));
        // Derived again on next use.
        self.derived.store(Arc::new(Derived {
            period: u64::MAX,
            keys: Vec::new(),
        }));
    }

    /// The keys valid at `now` (Unix seconds), derived when the period
    /// has changed.
    fn keys_at(&self, now: u64) -> Arc<Derived> {
        let period = now / u64::from(self.rotate_secs);
        let derived = self.derived.load_full();
        if derived.period == period {
            return derived;
        }
        let mut keys = Vec::new();
        for secret in self.secrets.load().iter() {
            for p in [period, period.saturating_sub(1)] {
                let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret)
                    .expect("HMAC takes keys of any length");
                mac.update(b"im ticket key v1");
                mac.update(&p.to_be_bytes());
                let bytes = mac.finalize().into_bytes();
                let mut id = [0; KEY_ID_LEN];
                id.copy_from_slice(&<Sha256 as sha2::Digest>::digest(bytes)[..KEY_ID_LEN]);
                let key = UnboundKey::new(&aead::CHACHA20_POLY1305, &bytes)
                    .expect("a 32-byte ChaCha20-Poly1305 key");
                keys.push((id, LessSafeKey::new(key)));
            }
        }
        let fresh = Arc::new(Derived { period, keys });
        self.derived.store(fresh.clone());
        fresh
    }

    fn seal(&self, plain: &[u8], now: u64) -> Option<Vec<u8>> {
        let derived = self.keys_at(now);
        let (id, key) = derived.keys.first()?;
        let mut nonce = [0; aead::NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut ticket = Vec::with_capacity(plain.len() + TICKET_OVERHEAD);
        ticket.extend_from_slice(id);
        ticket.extend_from_slice(&nonce);
        let mut body = plain.to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(id),
            &mut body,
        )
        .ok()?;
        ticket.extend_from_slice(&body);
        Some(ticket)
    }

    fn open(&self, ticket: &[u8], now: u64) -> Option<Vec<u8>> {
        if ticket.len() < TICKET_OVERHEAD {
            return None;
        }
        let (id, rest) = ticket.split_at(KEY_ID_LEN);
        let (nonce, body) = rest.split_at(aead::NONCE_LEN);
        let derived = self.keys_at(now);
        let (_, key) = derived.keys.iter().find(|(kid, _)| kid == id)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut body = body.to_vec();
        let plain_len = key
            .open_in_place(nonce, Aad::from(id), &mut body)
            .ok()?
            .len();
        body.truncate(plain_len);
        Some(body)
    }
}

impl ProducesTickets for TicketKeys {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        self.rotate_secs
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.seal(plain, unix_secs())
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.open(cipher, unix_secs())
    }
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What [`TlsConn::read`] found in the ciphertext it was given.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct ReadOutcome {
    /// Bytes of the input taken (the rest is an incomplete record: keep it
    /// and append what the socket delivers next).
    pub consumed: usize,
    /// The peer sent close_notify: no more data will come.
    pub closed: bool,
    /// The handshake finished during this call: `Some(true)` when it
    /// resumed a session from a ticket.
    pub handshake_done: Option<bool>,
}

/// One client's TLS state.
pub(crate) struct TlsConn {
    conn: UnbufferedServerConnection,
    /// The finished handshake has been reported.
    counted: bool,
    /// close_notify has been queued (or could not be: once is enough).
    pub close_queued: bool,
}

impl TlsConn {
    /// Processes the ciphertext in `incoming`: decrypted application data
    /// is appended to `plain`, handshake records to send are appended to
    /// `out`.
    pub fn read(
        &mut self,
        incoming: &mut [u8],
        plain: &mut Vec<u8>,
        out: &mut Vec<u8>,
    ) -> Result<ReadOutcome, rustls::Error> {
        let mut outcome = ReadOutcome::default();
        loop {
            let UnbufferedStatus { discard, state } = self
                .conn
                .process_tls_records(&mut incoming[outcome.consumed..]);
            let mut discard = discard;
            match state? {
                ConnectionState::ReadTraffic(mut traffic) => {
                    while let Some(record) = traffic.next_record() {
                        let record = record?;
                        discard += record.discard;
                        plain.extend_from_slice(record.payload);
                    }
                }
                ConnectionState::EncodeTlsData(mut data) => encode(&mut data, out)?,
                // `out` is sent in order after everything before it.
                ConnectionState::TransmitTlsData(data) => data.done(),
                ConnectionState::PeerClosed | ConnectionState::Closed => {
                    outcome.consumed += discard;
                    outcome.closed = true;
                    break;
                }
                ConnectionState::BlockedHandshake | ConnectionState::WriteTraffic(_) => {
                    outcome.consumed += discard;
                    break;
                }
                // Early data is not enabled; nothing else is expected.
                _ => return Err(rustls::Error::General("unexpected TLS state".into())),
            }
            outcome.consumed += discard;
        }
        if !self.counted && !self.conn.is_handshaking() {
            self.counted = true;
            outcome.handshake_done =
                Some(self.conn.handshake_kind() == Some(HandshakeKind::Resumed));
        }
        Ok(outcome)
    }

    /// Encrypts `plain` into records appended to `out`. `Ok(false)` while
    /// the handshake has not finished (nothing is written then).
    pub fn encrypt(&mut self, plain: &[u8], out: &mut Vec<u8>) -> Result<bool, rustls::Error> {
        loop {
            let UnbufferedStatus { state, .. } = self.conn.process_tls_records(&mut []);
            match state? {
                ConnectionState::EncodeTlsData(mut data) => encode(&mut data, out)?,
                ConnectionState::TransmitTlsData(data) => data.done(),
                ConnectionState::WriteTraffic(mut traffic) => {
                    if plain.is_empty() {
                        return Ok(true);
                    }
                    let records = plain.len().div_ceil(MAX_PLAINTEXT);
                    let mut need = plain.len() + records * RECORD_OVERHEAD;
                    loop {
                        let start = out.len();
                        out.resize(start + need, 0);
                        match traffic.encrypt(plain, &mut out[start..]) {
                            Ok(n) => {
                                out.truncate(start + n);
                                return Ok(true);
                            }
                            Err(EncryptError::InsufficientSize(e)) if e.required_size > need => {
                                out.truncate(start);
                                need = e.required_size;
                            }
                            Err(e) => {
                                out.truncate(start);
                                return Err(rustls::Error::General(e.to_string()));
                            }
                        }
                    }
                }
                ConnectionState::BlockedHandshake => return Ok(false),
                // Everything read was taken before; a closed peer still
                // reads what we send.
                ConnectionState::PeerClosed => {}
                ConnectionState::Closed => return Ok(false),
                _ => return Err(rustls::Error::General("unexpected TLS state".into())),
            }
        }
    }

    /// After [`TlsConn::read`] failed: appends the alert rustls queued
    /// for the peer, if any.
    pub fn pending_alert(&mut self, out: &mut Vec<u8>) {
        for _ in 0..4 {
            let UnbufferedStatus { state, .. } = self.conn.process_tls_records(&mut []);
            match state {
                Ok(ConnectionState::EncodeTlsData(mut data)) => {
                    if encode(&mut data, out).is_err() {
                        return;
                    }
                }
                Ok(ConnectionState::TransmitTlsData(data)) => data.done(),
                _ => return,
            }
        }
    }

    /// Appends a close_notify alert to `out` (when the handshake is done),
    /// once.
    pub fn close_notify(&mut self, out: &mut Vec<u8>) {
        if std::mem::replace(&mut self.close_queued, true) {
            return;
        }
        let UnbufferedStatus { state, .. } = self.conn.process_tls_records(&mut []);
        if let Ok(ConnectionState::WriteTraffic(mut traffic)) = state {
            let start = out.len();
            out.resize(start + RECORD_OVERHEAD + 2, 0);
            match traffic.queue_close_notify(&mut out[start..]) {
                Ok(n) => out.truncate(start + n),
                Err(_) => out.truncate(start),
            }
        }
    }

    /// The negotiated protocol version, once known.
    #[cfg(test)]
    pub fn version(&self) -> Option<ProtocolVersion> {
        self.conn.protocol_version()
    }
}

/// Appends one handshake record to `out`, growing it as needed.
fn encode(
    data: &mut rustls::unbuffered::EncodeTlsData<'_, rustls::server::ServerConnectionData>,
    out: &mut Vec<u8>,
) -> Result<(), rustls::Error> {
    let mut need = 4096;
    loop {
        let start = out.len();
        out.resize(start + need, 0);
        match data.encode(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(EncodeError::InsufficientSize(e)) => {
                out.truncate(start);
                need = e.required_size;
            }
            Err(e) => {
                out.truncate(start);
                return Err(rustls::Error::General(e.to_string()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::ServerName;
    use rustls::{ClientConfig, ClientConnection, RootCertStore};

    /// A CA and a leaf for localhost / 127.0.0.1 it signed, as PEM files.
    struct Pki {
        dir: tempfile::TempDir,
        ca: CertificateDer<'static>,
    }

    impl Pki {
        fn new() -> Pki {
            let dir = tempfile::tempdir().unwrap();
            let mut ca_params = rcgen::CertificateParams::new(Vec::new()).unwrap();
            ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let ca_key = rcgen::KeyPair::generate().unwrap();
            let ca = ca_params.self_signed(&ca_key).unwrap();
            let issuer = rcgen::Issuer::new(ca_params, ca_key);
            let pki = Pki {
                dir,
                ca: ca.der().clone(),
            };
            pki.issue(&issuer, "first");
            pki
        }

        /// Writes a fresh leaf (with `name` as its common name).
        fn issue(&self, issuer: &rcgen::Issuer<'_, rcgen::KeyPair>, name: &str) {
            let mut params =
                rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
                    .unwrap();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, issuer).unwrap();
            std::fs::write(self.dir.path().join("cert.pem"), cert.pem()).unwrap();
            std::fs::write(self.dir.path().join("key.pem"), key.serialize_pem()).unwrap();
        }

        fn files(&self, tickets: Option<&str>) -> TlsFiles {
            let ticket_keys = tickets.map(|secret| {
                let path = self.dir.path().join(format!("tickets-{}", &secret[..8]));
                std::fs::write(&path, format!("# shared\n{secret}\n")).unwrap();
                path
            });
            TlsFiles {
                cert: self.dir.path().join("cert.pem"),
                key: self.dir.path().join("key.pem"),
                ticket_keys,
                ticket_rotate_secs: 3600,
            }
        }

        fn client(&self, versions: &[&'static rustls::SupportedProtocolVersion]) -> ClientConfig {
            let mut roots = RootCertStore::empty();
            roots.add(self.ca.clone()).unwrap();
            let mut config = ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_protocol_versions(versions)
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
            config.alpn_protocols = vec![ALPN.to_vec()];
            config
        }
    }

    /// Runs the handshake and one exchange each way; returns what the
    /// server's read reported when the handshake finished.
    fn exchange(acceptor: &TlsAcceptor, client: &Arc<ClientConfig>) -> (Option<bool>, TlsConn) {
        let name = ServerName::try_from("localhost").unwrap();
        let mut client = ClientConnection::new(client.clone(), name).unwrap();
        let mut server = acceptor.accept().unwrap();
        let mut done = None;
        let mut pending: Vec<u8> = Vec::new();
        let mut received = Vec::new();
        client.writer_write_all(b"hello server");
        for _ in 0..10 {
            let mut wire = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut wire).unwrap();
            }
            pending.extend_from_slice(&wire);
            let mut out = Vec::new();
            let outcome = server.read(&mut pending, &mut received, &mut out).unwrap();
            pending.drain(..outcome.consumed);
            done = done.or(outcome.handshake_done);
            if outcome.handshake_done.is_some() {
                assert!(server.encrypt(b"hello client", &mut out).unwrap());
            }
            let mut slice = &out[..];
            while !slice.is_empty() {
                client.read_tls(&mut slice).unwrap();
            }
            client.process_new_packets().unwrap();
        }
        assert_eq!(received, b"hello server");
        let mut got = [0u8; 12];
        std::io::Read::read_exact(&mut client.reader(), &mut got).unwrap();
        assert_eq!(&got, b"hello client");
        assert_eq!(client.alpn_protocol(), Some(ALPN));
        (done, server)
    }

    trait WriteAll {
        fn writer_write_all(&mut self, data: &[u8]);
    }

    impl WriteAll for ClientConnection {
        fn writer_write_all(&mut self, data: &[u8]) {
            std::io::Write::write_all(&mut self.writer(), data).unwrap();
        }
    }

    const SECRET_A: &str = "a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0";
    const SECRET_B: &str = "0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20";

    #[test]
    fn tls13_and_tls12_carry_data_both_ways_with_alpn() {
        let pki = Pki::new();
        let acceptor = TlsAcceptor::load(pki.files(None)).unwrap();
        for (version, expected) in [
            (&rustls::version::TLS13, ProtocolVersion::TLSv1_3),
            (&rustls::version::TLS12, ProtocolVersion::TLSv1_2),
        ] {
            let client = Arc::new(pki.client(&[version]));
            let (done, server) = exchange(&acceptor, &client);
            assert_eq!(done, Some(false), "a full handshake");
            assert_eq!(server.version(), Some(expected));
        }
    }

    #[test]
    fn nodes_sharing_a_ticket_key_file_resume_each_others_sessions() {
        let pki = Pki::new();
        let node_a = TlsAcceptor::load(pki.files(Some(SECRET_A))).unwrap();
        let node_b = TlsAcceptor::load(pki.files(Some(SECRET_A))).unwrap();
        let stranger = TlsAcceptor::load(pki.files(Some(SECRET_B))).unwrap();
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let client = Arc::new(pki.client(&[version]));
            assert_eq!(exchange(&node_a, &client).0, Some(false));
            assert_eq!(
                exchange(&node_b, &client).0,
                Some(true),
                "resumed on another node"
            );
            assert_eq!(
                exchange(&stranger, &client).0,
                Some(false),
                "a node with other keys makes a full handshake"
            );
        }
    }

    #[test]
    fn ticket_keys_open_the_current_and_previous_period_only() {
        let keys = TicketKeys::new(vec![vec![7; 32]], 100);
        let ticket = keys.seal(b"state", 1_000).unwrap();
        assert_eq!(keys.open(&ticket, 1_050).as_deref(), Some(&b"state"[..]));
        assert_eq!(keys.open(&ticket, 1_150).as_deref(), Some(&b"state"[..]));
        assert_eq!(keys.open(&ticket, 1_200), None, "two periods old");
        let mut forged = ticket.clone();
        *forged.last_mut().unwrap() ^= 1;
        assert_eq!(keys.open(&forged, 1_050), None);
        assert_eq!(keys.open(&ticket[..10], 1_050), None);
        // A second secret in the file still opens tickets of the first.
        let rotated = TicketKeys::new(vec![vec![9; 32], vec![7; 32]], 100);
        assert_eq!(rotated.open(&ticket, 1_050).as_deref(), Some(&b"state"[..]));
        assert_eq!(
            TicketKeys::new(vec![vec![9; 32]], 100).open(&ticket, 1_050),
            None
        );
    }

    #[test]
    fn ticket_key_files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        for bad in ["", "# only a comment\n", "abcd\n", "zz".repeat(32).as_str()] {
            std::fs::write(&path, bad).unwrap();
            assert!(load_secrets(Some(&path)).is_err(), "{bad:?} accepted");
        }
        std::fs::write(&path, format!("{SECRET_A}\n\n{SECRET_B}\n")).unwrap();
        assert_eq!(load_secrets(Some(&path)).unwrap().len(), 2);
    }

    #[test]
    fn reload_serves_the_new_certificate_to_new_connections_only() {
        let pki = Pki::new();
        let acceptor = TlsAcceptor::load(pki.files(None)).unwrap();
        let client = Arc::new(pki.client(&[&rustls::version::TLS13]));
        let (_, mut open) = exchange(&acceptor, &client);
        let before = acceptor.cert.current.load_full();
        // A broken key file changes nothing.
        std::fs::write(pki.dir.path().join("key.pem"), "not a key").unwrap();
        assert!(acceptor.reload().is_err());
        assert!(Arc::ptr_eq(&before, &acceptor.cert.current.load_full()));
        let mut ca_params = rcgen::CertificateParams::new(Vec::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let other_ca = rcgen::Issuer::new(ca_params, rcgen::KeyPair::generate().unwrap());
        pki.issue(&other_ca, "second");
        acceptor.reload().unwrap();
        assert_ne!(before.cert, acceptor.cert.current.load_full().cert);
        // The open connection still encrypts with its own keys.
        let mut out = Vec::new();
        assert!(open.encrypt(b"still here", &mut out).unwrap());
        assert!(!out.is_empty());
    }
}
