//! Opening a simulated user's connection: TCP (bound to a chosen source
//! address when there are several), TLS over it with `--tls`, then
//! register or resume, speaking the protocol crate's framing directly.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, bail};
use futures::{SinkExt, StreamExt};
use im_proto::pb;
use im_proto::pb::frame::Body;
use im_proto::{Frame, FrameCodec};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_util::codec::Framed;
use tokio_util::either::Either;

use crate::tls::Tls;

/// A framed connection, plain or TLS.
pub type Conn = Framed<Either<TcpStream, TlsStream<TcpStream>>, FrameCodec>;

/// Time allowed for connecting and logging in.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Opens a TCP connection to `server`, from `source` if given.
pub async fn open(server: SocketAddr, source: Option<IpAddr>) -> anyhow::Result<TcpStream> {
    let socket = if server.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = source {
        socket
            .bind(SocketAddr::new(ip, 0))
            .with_context(|| format!("bind {ip}"))?;
    }
    let stream = socket
        .connect(server)
        .await
        .with_context(|| format!("connect {server}"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// The TCP socket under a connection.
pub fn tcp(stream: &Either<TcpStream, TlsStream<TcpStream>>) -> &TcpStream {
    match stream {
        Either::Left(tcp) => tcp,
        Either::Right(tls) => tls.get_ref().0,
    }
}

/// What logging in returned.
#[derive(Clone)]
pub struct Session {
    /// The user.
    pub user_id: u64,
    /// Token for the next resume.
    pub token: String,
    /// Heartbeat interval the server asked for.
    pub heartbeat: Duration,
    /// The user's TLS client (with its own session tickets), for the next
    /// connection.
    pub tls: Option<Tls>,
}

/// Connects and registers `username` (or logs in, if it exists from an
/// earlier run), or resumes with `token`.
pub async fn connect(
    server: SocketAddr,
    source: Option<IpAddr>,
    username: &str,
    password: &str,
    token: Option<&str>,
    tls: Option<Tls>,
) -> anyhow::Result<(Conn, Session)> {
    tokio::time::timeout(CONNECT_TIMEOUT, async {
        let stream = open(server, source).await?;
        let stream = match &tls {
            None => Either::Left(stream),
            Some(tls) => Either::Right(
                tls.connect(stream)
                    .await
                    .with_context(|| format!("TLS handshake with {server}"))?,
            ),
        };
        let mut conn = Framed::new(stream, FrameCodec::default());
        let first = match token {
            Some(token) => Body::Resume(pb::ResumeRequest {
                token: token.to_string(),
            }),
            None => Body::Register(pb::RegisterRequest {
                username: username.to_string(),
                password: password.to_string(),
                device_name: "loadgen".into(),
            }),
        };
        let mut reply = call_patiently(&mut conn, 1, &first).await?;
        if let Body::Error(e) = &reply {
            if e.code == im_proto::ErrorCode::UsernameTaken as i32 {
                let login = Body::Login(pb::LoginRequest {
                    username: username.to_string(),
                    password: password.to_string(),
                    device_name: "loadgen".into(),
                });
                reply = call_patiently(&mut conn, 100, &login).await?;
            }
        }
        match reply {
            Body::AuthOk(ok) => Ok((
                conn,
                Session {
                    user_id: ok.user_id,
                    token: ok.token,
                    heartbeat: Duration::from_millis(u64::from(ok.heartbeat_interval_ms).max(1000)),
                    tls,
                },
            )),
            other => bail!("authentication of {username} failed: {other:?}"),
        }
    })
    .await
    .context("connect and log in timed out")?
}

/// First pause after the server refused a login as overloaded.
const AUTH_BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Longest pause between login attempts.
const AUTH_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// [`call`], repeated after a jittered, doubling pause while the server
/// answers `OVERLOADED` or `RATE_LIMITED` (it keeps the connection open
/// for that), as a client does when thousands log in at once. Request ids
/// count up from `first_id`.
async fn call_patiently(conn: &mut Conn, first_id: u64, body: &Body) -> anyhow::Result<Body> {
    let mut backoff = AUTH_BACKOFF_MIN;
    let mut id = first_id;
    loop {
        let reply = call(conn, id, body.clone()).await?;
        let asked = match &reply {
            Body::Error(e)
                if e.code == im_proto::ErrorCode::Overloaded as i32
                    || e.code == im_proto::ErrorCode::RateLimited as i32 =>
            {
                Duration::from_millis(u64::from(e.retry_after_ms))
            }
            _ => return Ok(reply),
        };
        let jitter = rand::random_range(0.5..1.5);
        // At least as long as the server asked (`retry_after_ms`).
        tokio::time::sleep(backoff.mul_f64(jitter).max(asked)).await;
        backoff = (backoff * 2).min(AUTH_BACKOFF_MAX);
        id += 1;
    }
}

/// Sends a request and waits for its reply, skipping pushes.
pub async fn call(conn: &mut Conn, request_id: u64, body: Body) -> anyhow::Result<Body> {
    conn.send(Frame::new(request_id, body)).await?;
    while let Some(frame) = conn.next().await {
        let frame = frame?;
        if frame.request_id == request_id {
            return frame.body.context("reply without a body");
        }
    }
    bail!("connection closed before the reply")
}
