//! The compact state of one connection, kept in its shard's slab.
//!
//! An idle connection is this struct and nothing else: buffers live in
//! [`Bufs`], boxed and allocated only while a partial frame is being read or
//! output is waiting for the socket, and recycled afterwards.

use mio::net::TcpStream;

use super::output::Output;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// Accepted; only authentication requests and pings are allowed.
    Unauthenticated,
    /// An authentication request is being processed; reading is paused.
    Authenticating,
    /// Logged in; session requests flow.
    Authenticated,
    /// Flushing a last frame and waiting for the peer's FIN (or the linger
    /// deadline); input is discarded.
    Closing,
}

/// Reading is paused until in-flight requests drain.
pub(crate) const READ_PAUSED: u8 = 1;
/// Queued in the shard's list of connections with output to flush.
pub(crate) const DIRTY: u8 = 1 << 1;
/// Queued in the shard's list of connections with input left to read.
pub(crate) const READY: u8 = 1 << 2;
/// The socket returned WouldBlock on write; wait for a writable event.
pub(crate) const WRITE_BLOCKED: u8 = 1 << 3;
/// The write side has been shut down (closing).
pub(crate) const WRITE_SHUT: u8 = 1 << 4;
/// Reading is paused until queued output drains below the limit.
pub(crate) const OUT_PAUSED: u8 = 1 << 5;
/// The peer is a trusted load balancer whose PROXY protocol header has not
/// been read yet; until then `Bufs::inbound` holds its first bytes, and no
/// frame is parsed.
pub(crate) const PROXY_HEADER: u8 = 1 << 6;
/// The connection speaks TLS: its state is in the shard's TLS map, its
/// ciphertext in `Bufs::tls_in` / `Bufs::tls_out`.
pub(crate) const TLS: u8 = 1 << 7;

/// One client connection.
#[derive(Debug)]
pub(crate) struct Conn {
    pub stream: TcpStream,
    pub generation: u32,
    /// The authenticated user (user ids fit in 31 bits), 0 before login.
    pub user_id: u32,
    /// Second (shard clock) at which the current deadline expires.
    pub deadline: u32,
    /// Second of this connection's live timer-wheel entry.
    pub wheel_at: u32,
    /// Requests handed to the chat logic and not answered yet.
    pub in_flight: u16,
    pub state: State,
    pub flags: u8,
    pub bufs: Option<Box<Bufs>>,
}

// The per-connection cost the design promises; keep it from creeping. (Debug
// builds of mio add a selector id to every socket, so check release only.)
#[cfg(not(debug_assertions))]
const _: () = assert!(std::mem::size_of::<Conn>() <= 32);

impl Conn {
    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    pub fn set(&mut self, flag: u8) {
        self.flags |= flag;
    }

    pub fn clear(&mut self, flag: u8) {
        self.flags &= !flag;
    }

    /// Bytes of output waiting for the socket.
    pub fn out_bytes(&self) -> usize {
        self.bufs.as_ref().map_or(0, |b| b.out.bytes())
    }

    /// Whether partial input is buffered.
    pub fn has_inbound(&self) -> bool {
        self.bufs.as_ref().is_some_and(|b| !b.inbound.is_empty())
    }
}

/// Buffers of a connection that is busy.
#[derive(Debug, Default)]
pub(crate) struct Bufs {
    /// Received bytes not yet parsed into frames (a partial frame, frames
    /// held back while reading is paused, or an incomplete PROXY header).
    pub inbound: Vec<u8>,
    /// Frames waiting for the socket, and the push policy.
    pub out: Output,
    /// TLS: received ciphertext not yet decrypted (an incomplete record,
    /// or an incomplete PROXY header before the handshake).
    pub tls_in: Vec<u8>,
    /// TLS: ciphertext to write, from `tls_sent` on.
    pub tls_out: Vec<u8>,
    /// Bytes of `tls_out` already written.
    pub tls_sent: usize,
    /// Bytes at the front of `out` whose ciphertext is in `tls_out`: they
    /// count as written once `tls_out` is.
    pub tls_plain: usize,
}

impl Bufs {
    pub fn is_empty(&self) -> bool {
        self.inbound.is_empty()
            && self.out.is_empty()
            && self.tls_in.is_empty()
            && self.tls_out.is_empty()
    }

    /// Empties the buffers but keeps modest capacity for reuse.
    pub fn reset(&mut self) {
        self.inbound.clear();
        if self.inbound.capacity() > 16 * 1024 {
            self.inbound = Vec::new();
        }
        self.out.reset();
        // TLS buffers are not kept for reuse: a pooled set would hold a
        // handshake's kilobytes for good (rustls allocates per record
        // anyway).
        self.tls_in = Vec::new();
        self.tls_out = Vec::new();
        self.tls_sent = 0;
        self.tls_plain = 0;
    }
}
