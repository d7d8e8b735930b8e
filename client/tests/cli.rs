//! Runs the im-chat binary against a small in-process fake server (one
//! user "bob", one direct conversation with two messages) to check the
//! commands end to end: login saves a session, later commands resume it,
//! send prints the ack, listen catches up and remembers what it printed.
#![cfg(feature = "cli")]

use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use futures::{SinkExt, StreamExt};
use im_client::im_proto::{Frame, FrameCodec};
use im_client::pb::{self, frame::Body};
use im_client::{ConversationId, ErrorCode};
use tokio::net::TcpListener;
use tokio_util::codec::Framed;

const ALICE: u64 = 1;
const BOB: u64 = 2;

fn conv() -> u64 {
    ConversationId::direct(ALICE, BOB).unwrap().raw()
}

fn message(seq: u64, sender: u64, text: &str) -> pb::Message {
    pb::Message {
        conversation_id: conv(),
        seq,
        message_id: seq,
        sender_id: sender,
        client_msg_id: format!("c{seq}"),
        server_time_ms: 1_700_000_000_000 + seq as i64 * 1000,
        content: Some(pb::Content {
            kind: Some(pb::content::Kind::Text(pb::Text { text: text.into() })),
        }),
    }
}

/// The fake server's state: the stored messages of the one conversation.
type Store = Arc<Mutex<Vec<pb::Message>>>;

fn answer(store: &Store, body: Body) -> Body {
    let auth_ok = || {
        Body::AuthOk(pb::AuthOk {
            user_id: ALICE,
            username: "alice".into(),
            token: "tok".into(),
            token_expires_at_ms: im_client::im_proto::now_ms() + 3_600_000,
            heartbeat_interval_ms: 10_000,
            heartbeat_timeout_ms: 30_000,
            server_time_ms: 0,
            max_frame_bytes: 65536,
            session_id: 1,
        })
    };
    let mut messages = store.lock().unwrap();
    match body {
        Body::Login(l) if l.password == "password1" => auth_ok(),
        Body::Login(_) => Body::Error(pb::Error {
            code: ErrorCode::InvalidCredentials as i32,
            message: "wrong password".into(),
            fatal: false,
            retry_after_ms: 0,
        }),
        Body::Resume(r) if r.token == "tok" => auth_ok(),
        Body::Ping(_) => Body::Pong(pb::Pong::default()),
        Body::Logout(_) => Body::Done(pb::Done {}),
        Body::LookupUsers(req) => Body::UserList(pb::UserList {
            users: [(ALICE, "alice"), (BOB, "bob")]
                .into_iter()
                .filter(|(id, name)| {
                    req.usernames.iter().any(|n| n == name) || req.user_ids.contains(id)
                })
                .map(|(user_id, name)| pb::User {
                    user_id,
                    username: name.into(),
                })
                .collect(),
        }),
        Body::Send(send) => {
            let text = match send.content.and_then(|c| c.kind) {
                Some(pb::content::Kind::Text(t)) => t.text,
                _ => String::new(),
            };
            let m = message(messages.len() as u64 + 1, ALICE, &text);
            messages.push(m.clone());
            Body::SendAck(pb::SendAck {
                message_id: m.message_id,
                conversation_id: m.conversation_id,
                seq: m.seq,
                server_time_ms: m.server_time_ms,
                duplicate: false,
            })
        }
        Body::ListConversations(_) => Body::ConversationList(pb::ConversationList {
            conversations: vec![pb::ConversationSummary {
                conversation_id: conv(),
                peer_id: BOB,
                title: "bob".into(),
                last_seq: messages.len() as u64,
                last_message: messages.last().cloned(),
                unread_count: 1,
                ..Default::default()
            }],
            has_more: false,
        }),
        Body::Sync(req) => {
            let from = req
                .cursors
                .iter()
                .find(|c| c.conversation_id == conv())
                .map_or(u64::MAX, |c| c.seq);
            Body::SyncResponse(pb::SyncResponse {
                messages: messages.iter().filter(|m| m.seq > from).cloned().collect(),
                has_more: false,
                expired: Vec::new(),
            })
        }
        Body::History(_) => Body::HistoryResponse(pb::HistoryResponse {
            messages: messages.clone(),
            has_more: false,
            expired_seq: 0,
        }),
        Body::Ack(_) => Body::Done(pb::Done {}),
        Body::ListGroups(_) => Body::GroupList(pb::GroupList::default()),
        other => panic!("fake server got an unexpected {other:?}"),
    }
}

async fn serve(listener: TcpListener, store: Store) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let store = store.clone();
        tokio::spawn(async move {
            let mut framed = Framed::new(stream, FrameCodec::default());
            while let Some(Ok(frame)) = framed.next().await {
                let Some(body) = frame.body else { break };
                let reply = answer(&store, body);
                if framed
                    .send(Frame::new(frame.request_id, reply))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
    }
}

fn im_chat(dir: &std::path::Path, server: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_im-chat"))
        .args(args)
        .env("IM_SERVER", server)
        .env("IM_CHAT_DIR", dir)
        .env_remove("IM_PASSWORD")
        .env_remove("RUST_LOG")
        .output()
        .expect("im-chat runs")
}

/// Runs `im-chat chat <to>` with `input` as the typed lines.
fn im_chat_interactive(dir: &std::path::Path, server: &str, to: &str, input: &str) -> Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_im-chat"))
        .args(["chat", to])
        .env("IM_SERVER", server)
        .env("IM_CHAT_DIR", dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("im-chat runs");
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin
        .write_all(input.as_bytes())
        .expect("chat reads its input");
    drop(stdin);
    child.wait_with_output().expect("chat ends")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_send_listen_history() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let store: Store = Arc::new(Mutex::new(vec![
        message(1, BOB, "hi alice"),
        message(2, BOB, "are you there?"),
    ]));
    tokio::spawn(serve(listener, store.clone()));
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let run_addr = addr.clone();
    let run = move |args: &'static [&'static str]| {
        let dir = dir.clone();
        let addr = run_addr.clone();
        tokio::task::spawn_blocking(move || im_chat(&dir, &addr, args))
    };

    let out = run(&["whoami"]).await.unwrap();
    assert!(!out.status.success(), "whoami without a session must fail");

    let out = run(&["login", "alice", "--password", "wrong"])
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("wrong password"), "{err}");

    let out = run(&["login", "alice", "--password", "password1"])
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).contains("logged in as alice (user 1)"));
    let out = run(&["--json", "whoami"]).await.unwrap();
    assert!(stdout(&out).contains("\"username\":\"alice\""));

    let out = run(&["send", "bob", "hello", "bob"]).await.unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout(&out).starts_with("sent to bob: seq 3"),
        "{}",
        stdout(&out)
    );
    assert_eq!(store.lock().unwrap().len(), 3);

    // listen catches up on all three, then remembers that it printed them.
    let out = run(&["--json", "listen", "--count", "3", "--timeout", "5"])
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let lines: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let seqs: Vec<u64> = lines.iter().map(|v| v["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [1, 2, 3]);
    assert_eq!(lines[0]["sender"], "bob");
    assert_eq!(lines[2]["content"]["text"], "hello bob");

    let out = run(&["listen", "--count", "1", "--timeout", "1"])
        .await
        .unwrap();
    assert!(!out.status.success(), "nothing new: times out");
    assert_eq!(stdout(&out), "");

    let out = run(&["history", "bob"]).await.unwrap();
    let history = stdout(&out);
    assert!(history.contains("bob → you: hi alice"), "{history}");
    assert!(history.contains("you → bob: hello bob"), "{history}");

    let out = run(&["conversations"]).await.unwrap();
    assert!(
        stdout(&out).starts_with("bob (1 unread): "),
        "{}",
        stdout(&out)
    );

    let chat_dir = tmp.path().to_path_buf();
    let chat_addr = addr.clone();
    let out = tokio::task::spawn_blocking(move || {
        im_chat_interactive(&chat_dir, &chat_addr, "bob", "hello again\n/nope\n/quit\n")
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    let shown = stdout(&out);
    // The last messages first, then the echo of the typed line.
    assert!(shown.contains("bob → you: are you there?"), "{shown}");
    assert!(
        shown.trim_end().ends_with("you → bob: hello again"),
        "{shown}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown command /nope"));
    assert_eq!(store.lock().unwrap().len(), 4);

    let out = run(&["users", "bob", "nobody"]).await.unwrap();
    assert!(!out.status.success());
    assert_eq!(stdout(&out), "2\tbob\n");

    let out = run(&["logout"]).await.unwrap();
    assert!(out.status.success());
    let out = run(&["send", "bob", "x"]).await.unwrap();
    assert!(!out.status.success());
}
