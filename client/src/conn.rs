//! One connection to the server (TCP, or TLS over it): opening it, its
//! framed read and write halves, and the authentication handshake that
//! must precede everything else on it.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use im_proto::pb::{self, frame::Body};
use im_proto::{ErrorCode, Frame, FrameCodec};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout, timeout_at};
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::error::error_code;
use crate::tls::Tls;
use crate::{ClientError, Credentials};

/// Read half of a connection (plain or TLS).
pub(crate) type Reader = FramedRead<Box<dyn AsyncRead + Send + Unpin>, FrameCodec>;
/// Write half of a connection (plain or TLS).
pub(crate) type Writer = FramedWrite<Box<dyn AsyncWrite + Send + Unpin>, FrameCodec>;

/// An open connection, split so that reading never waits for writing.
pub(crate) struct Conn {
    pub(crate) reader: Reader,
    pub(crate) writer: Writer,
}

impl Conn {
    /// Connects to `addr` (and runs the TLS handshake, with `tls`) within
    /// `limit`.
    pub(crate) async fn open(
        addr: &str,
        limit: Duration,
        max_frame_bytes: usize,
        tls: Option<&Tls>,
    ) -> Result<Conn, ClientError> {
        let connect = async {
            let stream = TcpStream::connect(addr).await?;
            // Chat frames are small and latency matters more than packet
            // count.
            stream.set_nodelay(true)?;
            type Halves = (
                Box<dyn AsyncRead + Send + Unpin>,
                Box<dyn AsyncWrite + Send + Unpin>,
            );
            let halves: Halves = match tls {
                None => {
                    let (read, write) = stream.into_split();
                    (Box::new(read), Box::new(write))
                }
                Some(tls) => {
                    let (read, write) = tokio::io::split(tls.connect(addr, stream).await?);
                    (Box::new(read), Box::new(write))
                }
            };
            Ok::<_, ClientError>(halves)
        };
        let (read, write) = timeout(limit, connect)
            .await
            .map_err(|_| ClientError::Timeout)??;
        Ok(Conn {
            reader: FramedRead::new(read, FrameCodec::new(max_frame_bytes)),
            writer: FramedWrite::new(write, FrameCodec::new(max_frame_bytes)),
        })
    }

    /// Sends one request and waits for its reply. Used only during the
    /// handshake, when nothing else can arrive but a fatal error.
    async fn call(
        &mut self,
        request_id: u64,
        body: Body,
        limit: Duration,
    ) -> Result<Body, ClientError> {
        let deadline = Instant::now() + limit;
        timeout_at(deadline, self.writer.send(Frame::new(request_id, body)))
            .await
            .map_err(|_| ClientError::Timeout)??;
        loop {
            let frame = match timeout_at(deadline, self.reader.next()).await {
                Err(_) => return Err(ClientError::Timeout),
                Ok(None) => return Err(ClientError::Disconnected),
                Ok(Some(frame)) => frame?,
            };
            match frame.body {
                Some(Body::Error(err)) if frame.request_id == request_id || err.fatal => {
                    return Err(ClientError::from_wire(&err));
                }
                Some(body) if frame.request_id == request_id => return Ok(body),
                // A push or a stray pong cannot matter before login.
                _ => {}
            }
        }
    }

    /// Logs the connection in: resumes with `token` if there is one, falls
    /// back to the password of `credentials` when the token is refused, and
    /// otherwise uses `credentials` as they are.
    pub(crate) async fn authenticate(
        &mut self,
        credentials: &Credentials,
        token: Option<&str>,
        device_name: &str,
        mut next_request_id: impl FnMut() -> u64,
        limit: Duration,
    ) -> Result<pb::AuthOk, AuthError> {
        if let Some(token) = token.filter(|t| !t.is_empty()) {
            let resume = Body::Resume(pb::ResumeRequest {
                token: token.to_owned(),
            });
            match self.call(next_request_id(), resume, limit).await {
                Ok(body) => return auth_ok(body),
                Err(ClientError::Server {
                    code: ErrorCode::InvalidToken,
                    message,
                    ..
                }) if matches!(credentials, Credentials::Token(_)) => {
                    return Err(AuthError::Fatal(ClientError::AuthFailed {
                        code: ErrorCode::InvalidToken,
                        message,
                    }));
                }
                Err(ClientError::Server {
                    code: ErrorCode::InvalidToken,
                    ..
                }) => {} // fall back to the password below
                Err(e) => return Err(classify(e)),
            }
        }
        let body = match credentials {
            Credentials::Register { username, password } => Body::Register(pb::RegisterRequest {
                username: username.clone(),
                password: password.clone(),
                device_name: device_name.to_owned(),
            }),
            Credentials::Login { username, password } => Body::Login(pb::LoginRequest {
                username: username.clone(),
                password: password.clone(),
                device_name: device_name.to_owned(),
            }),
            Credentials::Token(token) => Body::Resume(pb::ResumeRequest {
                token: token.clone(),
            }),
        };
        match self.call(next_request_id(), body, limit).await {
            Ok(body) => auth_ok(body),
            Err(e) => Err(classify(e)),
        }
    }
}

/// Why authentication failed, and whether trying again later can help.
#[derive(Debug)]
pub(crate) enum AuthError {
    /// Transient (network, rate limit, overload): back off and retry.
    Retry(ClientError),
    /// The server refused the credentials: retrying cannot help.
    Fatal(ClientError),
}

impl AuthError {
    pub(crate) fn into_inner(self) -> ClientError {
        match self {
            AuthError::Retry(e) | AuthError::Fatal(e) => e,
        }
    }
}

fn auth_ok(body: Body) -> Result<pb::AuthOk, AuthError> {
    match body {
        Body::AuthOk(ok) => Ok(ok),
        other => Err(AuthError::Retry(ClientError::UnexpectedReply(format!(
            "expected AuthOk, got {}",
            body_name(&other)
        )))),
    }
}

fn classify(err: ClientError) -> AuthError {
    match err {
        ClientError::Server {
            code,
            message,
            retry_after,
        } => match code {
            ErrorCode::RateLimited
            | ErrorCode::Overloaded
            | ErrorCode::Internal
            | ErrorCode::ServerFull
            | ErrorCode::ServerShutdown
            | ErrorCode::AuthTimeout => AuthError::Retry(ClientError::Server {
                code,
                message,
                retry_after,
            }),
            _ => AuthError::Fatal(ClientError::AuthFailed { code, message }),
        },
        other => AuthError::Retry(other),
    }
}

/// A short name of a frame body, for logs and errors.
pub(crate) fn body_name(body: &Body) -> &'static str {
    match body {
        Body::Register(_) => "Register",
        Body::Login(_) => "Login",
        Body::Resume(_) => "Resume",
        Body::Ping(_) => "Ping",
        Body::Send(_) => "Send",
        Body::Sync(_) => "Sync",
        Body::History(_) => "History",
        Body::ListConversations(_) => "ListConversations",
        Body::Ack(_) => "Ack",
        Body::CreateGroup(_) => "CreateGroup",
        Body::AddMembers(_) => "AddMembers",
        Body::RemoveMembers(_) => "RemoveMembers",
        Body::LeaveGroup(_) => "LeaveGroup",
        Body::ListMembers(_) => "ListMembers",
        Body::ListGroups(_) => "ListGroups",
        Body::PresenceSubscribe(_) => "PresenceSubscribe",
        Body::LookupUsers(_) => "LookupUsers",
        Body::Logout(_) => "Logout",
        Body::ChangePassword(_) => "ChangePassword",
        Body::ListSessions(_) => "ListSessions",
        Body::EndSession(_) => "EndSession",
        Body::SessionList(_) => "SessionList",
        Body::AuthOk(_) => "AuthOk",
        Body::Pong(_) => "Pong",
        Body::SendAck(_) => "SendAck",
        Body::SyncResponse(_) => "SyncResponse",
        Body::HistoryResponse(_) => "HistoryResponse",
        Body::ConversationList(_) => "ConversationList",
        Body::Group(_) => "GroupInfo",
        Body::MemberList(_) => "MemberList",
        Body::GroupList(_) => "GroupList",
        Body::PresenceSnapshot(_) => "PresenceSnapshot",
        Body::UserList(_) => "UserList",
        Body::Done(_) => "Done",
        Body::Error(_) => "Error",
        Body::Message(_) => "Message",
        Body::Receipt(_) => "Receipt",
        Body::Presence(_) => "Presence",
        Body::SyncHint(_) => "SyncHint",
    }
}

/// Describes a fatal `Error` frame for a disconnect reason.
pub(crate) fn describe_error(err: &pb::Error) -> String {
    format!("{:?}: {}", error_code(err.code), err.message)
}
