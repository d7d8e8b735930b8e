//! What each im-chat command does: connect with the saved session, resolve
//! usernames to ids, make the requests and print the results.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use chrono::Offset;
use im_client::pb::{self, content::Kind};
use im_client::{
    Client, ClientConfig, ClientError, ConversationId, Credentials, ErrorCode, Event, Events,
    Target, Tls,
};
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;

use crate::format::{self, Names, Recipient};
use crate::state::{SavedSession, StateDir};
use crate::{Auth, Cli, Command, GroupCommand, SendArgs, SessionsCommand};

const DEFAULT_SERVER: &str = "127.0.0.1:7000";
/// How many earlier messages `chat` and `/history` show.
const CHAT_HISTORY: u32 = 10;
/// How often `listen` saves its cursors while running.
const SAVE_EVERY: Duration = Duration::from_secs(2);

pub async fn run(cli: Cli) -> Result<ExitCode> {
    let dir = match cli.dir {
        Some(dir) => dir,
        None => StateDir::default_path()?,
    };
    let ctx = Ctx {
        dir: StateDir::new(dir),
        server: cli.server,
        json: cli.json,
        tls: cli.tls || cli.ca_file.is_some(),
        ca_file: cli.ca_file,
    };
    match cli.command {
        Command::Register(auth) => ctx.authenticate(auth, true).await,
        Command::Login(auth) => ctx.authenticate(auth, false).await,
        Command::Logout { all } => ctx.logout(all).await,
        Command::Password { old, new } => ctx.password(old, new).await,
        Command::Sessions { action: None } => ctx.sessions().await,
        Command::Sessions {
            action: Some(SessionsCommand::End { id }),
        } => ctx.end_session(id).await,
        Command::Whoami => ctx.whoami(),
        Command::Send(send) => ctx.send(send).await,
        Command::Conversations => ctx.conversations().await,
        Command::History { to, limit, before } => ctx.history(&to, limit, before).await,
        Command::Listen { count, timeout } => ctx.listen(count, timeout).await,
        Command::Chat { to } => ctx.chat(&to).await,
        Command::Group(group) => ctx.group(group).await,
        Command::Presence { users, watch } => ctx.presence(users, watch).await,
        Command::Users { names } => ctx.users(names).await,
    }
}

/// A message for people about an error, with a hint for the usual causes.
pub fn describe(err: &anyhow::Error) -> String {
    let hint = err
        .chain()
        .find_map(|e| e.downcast_ref::<ClientError>())
        .and_then(|e| match e {
            ClientError::AuthFailed {
                code: ErrorCode::InvalidToken,
                ..
            } => Some("the saved session has expired; run `im-chat login <username>`".to_owned()),
            ClientError::Server { code, .. } | ClientError::AuthFailed { code, .. } => {
                Some(format::explain(*code).to_owned())
            }
            ClientError::Io(_) => Some("is the server running? see --server".to_owned()),
            _ => None,
        });
    // The SDK's errors already include their cause in their own message,
    // so the chain is cut after the first of them.
    let mut parts = Vec::new();
    for cause in err.chain() {
        parts.push(cause.to_string());
        if cause.downcast_ref::<ClientError>().is_some() {
            break;
        }
    }
    let text = parts.join(": ");
    match hint {
        Some(hint) => format!("{text} ({hint})"),
        None => text,
    }
}

struct Ctx {
    dir: StateDir,
    server: Option<String>,
    json: bool,
    /// --tls or --ca-file was given.
    tls: bool,
    ca_file: Option<PathBuf>,
}

/// How a command uses the connection.
#[derive(Clone, Copy)]
enum Mode {
    /// A single request or a few: no catch-up, events discarded.
    OneShot,
    /// Live events only, delivery acked (chat, presence --watch).
    Live,
    /// Catch up from saved cursors, then live (listen).
    CatchUp,
}

/// A connected client and what it needs to print messages.
struct Conn {
    client: Client,
    view: View,
}

impl Ctx {
    /// The TLS choice of the flags, else of the saved session: whether to
    /// use TLS and which CA file.
    fn tls_choice(&self, saved: Option<&SavedSession>) -> (bool, Option<PathBuf>) {
        match saved {
            Some(saved) if !self.tls => (saved.tls, saved.ca_file.clone()),
            _ => (self.tls, self.ca_file.clone()),
        }
    }

    fn with_tls(
        config: ClientConfig,
        (tls, ca_file): &(bool, Option<PathBuf>),
    ) -> Result<ClientConfig> {
        if !tls {
            return Ok(config);
        }
        let tls = match ca_file {
            Some(path) => Tls::with_ca_file(path)?,
            None => Tls::system_roots()?,
        };
        Ok(config.with_tls(tls))
    }

    fn print(&self, human: impl FnOnce() -> String, json: impl FnOnce() -> Value) {
        if self.json {
            println!("{}", json());
        } else {
            println!("{}", human());
        }
    }

    fn session(&self) -> Result<SavedSession> {
        self.dir
            .load_session()?
            .context("not logged in: run `im-chat login <username>` first")
    }

    /// Connects for a command that only makes requests; pushed events are
    /// read and dropped so that they never hold up the replies.
    async fn connect_oneshot(&self) -> Result<Conn> {
        let (conn, mut events) = self.connect(Mode::OneShot).await?;
        tokio::spawn(async move { while events.next().await.is_some() {} });
        Ok(conn)
    }

    async fn connect(&self, mode: Mode) -> Result<(Conn, Events)> {
        let saved = self.session()?;
        let server = self.server.clone().unwrap_or_else(|| saved.server.clone());
        let tls = self.tls_choice(Some(&saved));
        let mut config = Self::with_tls(ClientConfig::new(server.clone()), &tls)?;
        match mode {
            Mode::OneShot => config = config.with_catch_up(false).with_auto_ack(false),
            Mode::Live => config = config.with_catch_up(false),
            Mode::CatchUp => {
                config = config.with_cursors(self.dir.load_cursors(saved.user_id)?);
            }
        }
        let (client, events) = Client::connect(config, Credentials::Token(saved.token))
            .await
            .with_context(|| format!("connecting to {server}"))?;
        // Every AuthOk brings a fresh token: keep the newest.
        let session = client.session();
        self.dir.save_session(&SavedSession {
            server,
            user_id: session.user_id,
            username: session.username.clone(),
            token: session.token,
            token_expires_at_ms: session.token_expires_at_ms,
            tls: tls.0,
            ca_file: tls.1.clone(),
        })?;
        let view = View::new(session.user_id, session.username, self.json);
        Ok((Conn { client, view }, events))
    }

    async fn authenticate(&self, auth: Auth, register: bool) -> Result<ExitCode> {
        let password = match auth.password {
            Some(p) => p,
            None => prompt_password(register).await?,
        };
        let saved = self.dir.load_session().ok().flatten();
        let server = self
            .server
            .clone()
            .or_else(|| saved.as_ref().map(|s| s.server.clone()))
            .unwrap_or_else(|| DEFAULT_SERVER.to_owned());
        // A server named on the command line gets the TLS flags as they
        // are; the saved server keeps its saved choice unless flags say.
        let tls = if self.server.is_some() {
            (self.tls, self.ca_file.clone())
        } else {
            self.tls_choice(saved.as_ref())
        };
        let credentials = if register {
            Credentials::Register {
                username: auth.username,
                password,
            }
        } else {
            Credentials::Login {
                username: auth.username,
                password,
            }
        };
        let config = Self::with_tls(ClientConfig::new(server.clone()), &tls)?
            .with_catch_up(false)
            .with_auto_ack(false)
            .with_device_name(auth.device_name);
        let (client, _events) = Client::connect(config, credentials)
            .await
            .with_context(|| format!("connecting to {server}"))?;
        let session = client.session();
        self.dir.save_session(&SavedSession {
            server: server.clone(),
            user_id: session.user_id,
            username: session.username.clone(),
            token: session.token,
            token_expires_at_ms: session.token_expires_at_ms,
            tls: tls.0,
            ca_file: tls.1.clone(),
        })?;
        client.close().await;
        let verb = if register { "registered" } else { "logged in" };
        self.print(
            || format!("{verb} as {} (user {}) on {server}", session.username, session.user_id),
            || json!({"type": "session", "user_id": session.user_id, "username": session.username, "server": server}),
        );
        Ok(ExitCode::SUCCESS)
    }

    async fn logout(&self, all: bool) -> Result<ExitCode> {
        if self.dir.load_session()?.is_none() {
            self.print(
                || "not logged in".to_owned(),
                || json!({"type": "logout", "removed": false, "all": all}),
            );
            return Ok(ExitCode::SUCCESS);
        }
        match self.connect_oneshot().await {
            Ok(conn) => {
                conn.client.logout(all).await?;
                conn.client.close().await;
            }
            // The session is over already: only the saved copy is left.
            Err(e) if session_over(&e) => {}
            Err(e) => return Err(e),
        }
        let removed = self.dir.remove_session()?;
        self.print(
            || {
                if all {
                    "logged out on every device"
                } else {
                    "logged out"
                }
                .to_owned()
            },
            || json!({"type": "logout", "removed": removed, "all": all}),
        );
        Ok(ExitCode::SUCCESS)
    }

    async fn password(&self, old: Option<String>, new: Option<String>) -> Result<ExitCode> {
        let conn = self.connect_oneshot().await?;
        let old = match old {
            Some(p) => p,
            None => prompt("Current password: ", false).await?,
        };
        let new = match new {
            Some(p) => p,
            None => prompt("New password: ", true).await?,
        };
        conn.client.change_password(old, new).await?;
        conn.client.close().await;
        self.print(
            || "password changed; every other session was ended".to_owned(),
            || json!({"type": "password_changed"}),
        );
        Ok(ExitCode::SUCCESS)
    }

    async fn sessions(&self) -> Result<ExitCode> {
        let conn = self.connect_oneshot().await?;
        let sessions = conn.client.sessions().await?;
        conn.client.close().await;
        for s in &sessions {
            self.print(
                || {
                    let name = if s.device_name.is_empty() {
                        "(unnamed device)"
                    } else {
                        &s.device_name
                    };
                    let current = if s.current { "  (this device)" } else { "" };
                    format!(
                        "{}\t{name}\t{}\tlast seen {}{current}",
                        s.session_id,
                        s.address,
                        format::datetime(s.last_seen_ms),
                    )
                },
                || json!({"type": "session", "session_id": s.session_id, "device_name": s.device_name, "address": s.address, "created_ms": s.created_ms, "last_seen_ms": s.last_seen_ms, "current": s.current}),
            );
        }
        Ok(ExitCode::SUCCESS)
    }

    async fn end_session(&self, id: u64) -> Result<ExitCode> {
        let conn = self.connect_oneshot().await?;
        let own = conn.client.session().session_id == id;
        conn.client.end_session(id).await?;
        conn.client.close().await;
        if own {
            // That was this device's session: its saved token is dead.
            self.dir.remove_session()?;
        }
        self.print(
            || format!("session {id} ended"),
            || json!({"type": "session_ended", "session_id": id}),
        );
        Ok(ExitCode::SUCCESS)
    }

    fn whoami(&self) -> Result<ExitCode> {
        let s = self.session()?;
        let expires = chrono::DateTime::from_timestamp_millis(s.token_expires_at_ms)
            .map(|t| {
                t.with_timezone(&chrono::Local)
                    .format("%Y-%m-%d %H:%M")
                    .to_string()
            })
            .unwrap_or_else(|| "?".to_owned());
        self.print(
            || format!("{} (user {}) on {}, session valid until {expires}", s.username, s.user_id, s.server),
            || json!({"type": "session", "user_id": s.user_id, "username": s.username, "server": s.server, "token_expires_at_ms": s.token_expires_at_ms}),
        );
        Ok(ExitCode::SUCCESS)
    }

    async fn send(&self, send: SendArgs) -> Result<ExitCode> {
        let recipient = format::parse_recipient(&send.to)?;
        let content = content_of(&send)?;
        let conn = self.connect_oneshot().await?;
        let (target, _) = resolve(&conn.client, &recipient).await?;
        let ack = conn.client.send(target, content).await?;
        self.print(
            || {
                let dup = if ack.duplicate { " (already sent)" } else { "" };
                format!("sent to {recipient}: seq {} in conversation {}{dup}", ack.seq, ack.conversation_id)
            },
            || json!({"type": "ack", "conversation_id": ack.conversation_id, "seq": ack.seq, "message_id": ack.message_id, "server_time_ms": ack.server_time_ms, "duplicate": ack.duplicate}),
        );
        conn.client.close().await;
        Ok(ExitCode::SUCCESS)
    }

    async fn conversations(&self) -> Result<ExitCode> {
        let mut conn = self.connect_oneshot().await?;
        let list = conn.client.conversations().await?;
        for c in &list {
            conn.view.learn_summary(c);
        }
        for c in &list {
            if let Some(m) = &c.last_message {
                conn.view.prepare(&conn.client, m).await;
            }
            let names = &conn.view.names;
            self.print(
                || format::conversation_line(names, c),
                || format::conversation_json(names, c),
            );
        }
        if list.is_empty() && !self.json {
            println!("no conversations yet");
        }
        conn.client.close().await;
        Ok(ExitCode::SUCCESS)
    }

    async fn history(&self, to: &str, limit: u32, before: u64) -> Result<ExitCode> {
        let recipient = format::parse_recipient(to)?;
        let mut conn = self.connect_oneshot().await?;
        let (_, conversation) = resolve(&conn.client, &recipient).await?;
        let page = conn.client.history(conversation, before, limit).await?;
        for m in &page.messages {
            conn.view.prepare(&conn.client, m).await;
            conn.view.show(m);
        }
        if page.has_more && !self.json {
            if let Some(first) = page.messages.first() {
                eprintln!("(older: im-chat history {to} --before {})", first.seq);
            }
        }
        if page.expired_seq > 0 && !self.json {
            eprintln!(
                "(messages up to #{} were removed by the server's retention policy)",
                page.expired_seq
            );
        }
        conn.client.close().await;
        Ok(ExitCode::SUCCESS)
    }

    async fn listen(&self, count: Option<u64>, timeout: Option<u64>) -> Result<ExitCode> {
        let (mut conn, mut events) = self.connect(Mode::CatchUp).await?;
        let me = conn.client.user_id();
        // What has been printed, which is what the next run skips; the
        // client's own cursors also count events not yet printed.
        let mut printed = self.dir.load_cursors(me)?;
        let deadline = timeout.map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
        let mut save = tokio::time::interval(SAVE_EVERY);
        let mut shown = 0u64;
        let mut timed_out = false;
        let ctrl_c = tokio::signal::ctrl_c();
        tokio::pin!(ctrl_c);
        loop {
            if count.is_some_and(|n| shown >= n) {
                break;
            }
            tokio::select! {
                event = events.next() => {
                    let Some(event) = event else { break };
                    match event {
                        Event::Message(m) => {
                            conn.view.prepare(&conn.client, &m).await;
                            conn.view.show(&m);
                            printed.insert(m.conversation_id, m.seq);
                            shown += 1;
                        }
                        other => conn.view.status(&conn.client, other).await?,
                    }
                }
                _ = sleep_until(deadline) => {
                    timed_out = true;
                    break;
                }
                _ = &mut ctrl_c => break,
                _ = save.tick() => self.dir.save_cursors(me, &printed)?,
            }
        }
        self.dir.save_cursors(me, &printed)?;
        conn.client.close().await;
        if timed_out && count.is_some_and(|n| shown < n) {
            eprintln!("timed out after {shown} messages");
            return Ok(ExitCode::FAILURE);
        }
        Ok(ExitCode::SUCCESS)
    }

    async fn chat(&self, to: &str) -> Result<ExitCode> {
        let mut recipient = format::parse_recipient(to)?;
        let (mut conn, mut events) = self.connect(Mode::Live).await?;
        let mut current = resolve(&conn.client, &recipient).await?;
        let summaries = conn.client.conversations().await?;
        for c in &summaries {
            conn.view.learn_summary(c);
        }
        for c in summaries.iter().filter(|c| c.unread_count > 0) {
            let name = conn.view.names.conversation(c.conversation_id);
            eprintln!("-- {name}: {} unread", c.unread_count);
        }
        eprintln!("-- chatting with {recipient}; /to <target>, /history [n], /quit");
        show_history(&mut conn, current.1, CHAT_HISTORY).await?;

        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        loop {
            tokio::select! {
                line = lines.next_line() => {
                    let Some(line) = line? else { break };
                    let line = line.trim();
                    if line.is_empty() {
                        continue;
                    }
                    match ChatInput::parse(line) {
                        ChatInput::Quit => break,
                        ChatInput::Help => {
                            eprintln!("-- /to <user or #group>, /history [n], /quit; anything else is sent");
                        }
                        ChatInput::To(arg) => {
                            let switched = match format::parse_recipient(&arg) {
                                Ok(r) => resolve(&conn.client, &r).await.map(|t| (r, t)),
                                Err(e) => Err(e),
                            };
                            match switched {
                                Ok((r, t)) => {
                                    recipient = r;
                                    current = t;
                                    eprintln!("-- chatting with {recipient}");
                                }
                                Err(e) => eprintln!("-- {}", describe(&e)),
                            }
                        }
                        ChatInput::History(n) => {
                            if let Err(e) = show_history(&mut conn, current.1, n).await {
                                eprintln!("-- {}", describe(&e));
                            }
                        }
                        ChatInput::Unknown(cmd) => eprintln!("-- unknown command {cmd}; try /help"),
                        ChatInput::Text(text) => {
                            match conn.client.send_text(current.0, text.clone()).await {
                                Ok(ack) => conn.view.show_sent(&ack, text),
                                Err(e) => eprintln!("-- not sent: {}", describe(&anyhow::Error::from(e))),
                            }
                        }
                    }
                }
                event = events.next() => {
                    let Some(event) = event else { break };
                    match event {
                        Event::Message(m) => {
                            conn.view.prepare(&conn.client, &m).await;
                            conn.view.show(&m);
                            if m.sender_id != conn.view.names.me {
                                mark_read(&conn.client, m.conversation_id, m.seq);
                            }
                        }
                        other => conn.view.status(&conn.client, other).await?,
                    }
                }
            }
        }
        conn.client.close().await;
        Ok(ExitCode::SUCCESS)
    }

    async fn group(&self, command: GroupCommand) -> Result<ExitCode> {
        let conn = self.connect_oneshot().await?;
        let client = conn.client.clone();
        match command {
            GroupCommand::Create { name, members } => {
                let ids = user_ids(&client, members).await?;
                let info = client.create_group(name, ids).await?;
                self.print_group("created", &info);
            }
            GroupCommand::Add { group_id, users } => {
                let ids = user_ids(&client, users).await?;
                let info = client.add_members(group_id, ids).await?;
                self.print_group("added to", &info);
            }
            GroupCommand::Remove { group_id, users } => {
                let ids = user_ids(&client, users).await?;
                let info = client.remove_members(group_id, ids).await?;
                self.print_group("removed from", &info);
            }
            GroupCommand::Leave { group_id } => {
                client.leave_group(group_id).await?;
                self.print(
                    || format!("left #{group_id}"),
                    || json!({"type": "left", "group_id": group_id}),
                );
            }
            GroupCommand::Members { group_id } => {
                for user in client.group_members(group_id).await? {
                    self.print_user(&user);
                }
            }
            GroupCommand::List => {
                for info in client.groups().await? {
                    self.print_group("", &info);
                }
            }
        }
        client.close().await;
        Ok(ExitCode::SUCCESS)
    }

    async fn presence(&self, users: Vec<String>, watch: bool) -> Result<ExitCode> {
        // Without --watch the command ends right after the snapshot, long
        // before unread events could fill the channel.
        let (mut conn, mut events) = self.connect(Mode::Live).await?;
        let found = lookup(&conn.client, users).await?;
        for u in &found {
            conn.view.names.users.insert(u.user_id, u.username.clone());
        }
        let ids = found.iter().map(|u| u.user_id).collect();
        for p in conn.client.subscribe_presence(ids).await? {
            conn.view.show_presence(&p);
        }
        if watch {
            let ctrl_c = tokio::signal::ctrl_c();
            tokio::pin!(ctrl_c);
            loop {
                tokio::select! {
                    _ = &mut ctrl_c => break,
                    event = events.next() => match event {
                        None => break,
                        Some(Event::Presence(p)) => conn.view.show_presence(&p),
                        Some(Event::Message(_) | Event::Receipt(_)) => {}
                        Some(other) => conn.view.status(&conn.client, other).await?,
                    },
                }
            }
        }
        conn.client.close().await;
        Ok(ExitCode::SUCCESS)
    }

    async fn users(&self, names: Vec<String>) -> Result<ExitCode> {
        let conn = self.connect_oneshot().await?;
        let found = conn.client.lookup_users(names.clone(), vec![]).await?;
        for user in &found {
            self.print_user(user);
        }
        conn.client.close().await;
        let missing: Vec<&String> = names
            .iter()
            .filter(|n| !found.iter().any(|u| &u.username == *n))
            .collect();
        if missing.is_empty() {
            Ok(ExitCode::SUCCESS)
        } else {
            for name in missing {
                eprintln!("unknown user: {name}");
            }
            Ok(ExitCode::FAILURE)
        }
    }

    fn print_group(&self, verb: &str, info: &pb::GroupInfo) {
        self.print(
            || {
                let verb = if verb.is_empty() { String::new() } else { format!("{verb} ") };
                format!(
                    "{verb}#{} {} ({} members, owner {})",
                    info.group_id, info.name, info.member_count, info.owner_id
                )
            },
            || json!({"type": "group", "group_id": info.group_id, "conversation_id": info.conversation_id, "name": info.name, "owner_id": info.owner_id, "member_count": info.member_count}),
        );
    }

    fn print_user(&self, user: &pb::User) {
        self.print(
            || format!("{}\t{}", user.user_id, user.username),
            || json!({"type": "user", "user_id": user.user_id, "username": user.username}),
        );
    }
}

/// What a line typed into `chat` means.
#[derive(Debug, PartialEq, Eq)]
enum ChatInput {
    Text(String),
    To(String),
    History(u32),
    Help,
    Quit,
    Unknown(String),
}

impl ChatInput {
    fn parse(line: &str) -> ChatInput {
        let Some(command) = line.strip_prefix('/') else {
            return ChatInput::Text(line.to_owned());
        };
        let mut words = command.split_whitespace();
        match (words.next(), words.next()) {
            (Some("quit" | "q"), None) => ChatInput::Quit,
            (Some("help" | "h"), None) => ChatInput::Help,
            (Some("to"), Some(target)) => ChatInput::To(target.to_owned()),
            (Some("history"), None) => ChatInput::History(CHAT_HISTORY),
            (Some("history"), Some(n)) => match n.parse() {
                Ok(n) => ChatInput::History(n),
                Err(_) => ChatInput::Unknown(line.to_owned()),
            },
            // "//text" sends "/text".
            _ if command.starts_with('/') => ChatInput::Text(command.to_owned()),
            _ => ChatInput::Unknown(line.to_owned()),
        }
    }
}

/// Names for display plus the output mode.
struct View {
    names: Names,
    /// Group names have been fetched once already.
    groups_loaded: bool,
    json: bool,
}

impl View {
    fn new(me: u64, username: String, json: bool) -> Self {
        let offset = chrono::Local::now().offset().fix();
        let mut names = Names::new(me, offset);
        names.users.insert(me, username);
        View {
            names,
            groups_loaded: false,
            json,
        }
    }

    fn learn_summary(&mut self, c: &pb::ConversationSummary) {
        if c.group_id != 0 {
            self.names.groups.insert(c.group_id, c.title.clone());
        } else if c.peer_id != 0 {
            self.names.users.insert(c.peer_id, c.title.clone());
        }
    }

    /// Looks up the names `m` mentions that are not known yet. Failures
    /// only cost nicer names, so they are logged, not returned.
    async fn prepare(&mut self, client: &Client, m: &pb::Message) {
        let missing = self.names.missing_users(m);
        if !missing.is_empty() {
            match client.lookup_users(vec![], missing).await {
                Ok(users) => {
                    for u in users {
                        self.names.users.insert(u.user_id, u.username);
                    }
                }
                Err(e) => tracing::debug!(error = %e, "user lookup failed"),
            }
        }
        let group = ConversationId::from_raw(m.conversation_id).and_then(ConversationId::group_id);
        if let Some(g) = group {
            let notice_name = match m.content.as_ref().and_then(|c| c.kind.as_ref()) {
                Some(Kind::Notice(n)) if !n.group_name.is_empty() => Some(n.group_name.clone()),
                _ => None,
            };
            if let Some(name) = notice_name {
                self.names.groups.insert(g, name);
            } else if !self.names.groups.contains_key(&g) && !self.groups_loaded {
                self.groups_loaded = true;
                if let Ok(groups) = client.groups().await {
                    for info in groups {
                        self.names.groups.insert(info.group_id, info.name);
                    }
                }
            }
        }
    }

    fn show(&self, m: &pb::Message) {
        if self.json {
            println!("{}", format::message_json(&self.names, m));
        } else {
            println!("{}", format::message_line(&self.names, m));
        }
    }

    /// Echoes a message the user just sent (the server does not push it
    /// back to the sending connection).
    fn show_sent(&self, ack: &pb::SendAck, text: String) {
        let m = pb::Message {
            conversation_id: ack.conversation_id,
            seq: ack.seq,
            message_id: ack.message_id,
            sender_id: self.names.me,
            client_msg_id: String::new(),
            server_time_ms: ack.server_time_ms,
            content: Some(pb::Content {
                kind: Some(Kind::Text(pb::Text { text })),
            }),
        };
        self.show(&m);
    }

    fn show_presence(&self, p: &pb::Presence) {
        let name = self
            .names
            .users
            .get(&p.user_id)
            .cloned()
            .unwrap_or_else(|| format!("user{}", p.user_id));
        if self.json {
            println!(
                "{}",
                json!({"type": "presence", "user_id": p.user_id, "username": name, "online": p.online})
            );
        } else {
            let state = if p.online { "online" } else { "offline" };
            println!(
                "[{}] {name} is {state}",
                self.names.clock(im_client::im_proto::now_ms())
            );
        }
    }

    /// Receipts, presence and connection changes. Connection changes go to
    /// stderr so that stdout holds only messages and receipts.
    async fn status(&mut self, client: &Client, event: Event) -> Result<()> {
        match event {
            Event::Receipt(r) => {
                if r.user_id != self.names.me && !self.names.users.contains_key(&r.user_id) {
                    if let Ok(users) = client.lookup_users(vec![], vec![r.user_id]).await {
                        for u in users {
                            self.names.users.insert(u.user_id, u.username);
                        }
                    }
                }
                if self.json {
                    println!("{}", format::receipt_json(&r));
                } else {
                    let now = im_client::im_proto::now_ms();
                    println!("{}", format::receipt_line(&self.names, &r, now));
                }
            }
            Event::Presence(p) => self.show_presence(&p),
            Event::Disconnected { reason } => {
                eprintln!("-- connection lost ({reason}); reconnecting")
            }
            Event::Connected {
                reconnected: true, ..
            } => eprintln!("-- reconnected"),
            Event::Stopped { reason } => bail!("disconnected for good: {reason}"),
            Event::Expired {
                conversation_id,
                seq,
            } => eprintln!(
                "-- conversation {conversation_id}: messages up to #{seq} were removed by the server's retention policy"
            ),
            Event::Message(_) | Event::Connected { .. } | Event::Resynced { .. } => {}
        }
        Ok(())
    }
}

async fn show_history(conn: &mut Conn, conversation: u64, limit: u32) -> Result<()> {
    let page = conn.client.history(conversation, 0, limit).await?;
    if page.expired_seq > 0 {
        eprintln!(
            "-- messages up to #{} were removed by the server's retention policy",
            page.expired_seq
        );
    }
    for m in &page.messages {
        conn.view.prepare(&conn.client, m).await;
        conn.view.show(m);
    }
    if let Some(last) = page.messages.last() {
        if last.sender_id != conn.view.names.me {
            mark_read(&conn.client, conversation, last.seq);
        }
    }
    Ok(())
}

/// Marks a conversation read up to `seq` without holding up the caller.
fn mark_read(client: &Client, conversation: u64, seq: u64) {
    let client = client.clone();
    tokio::spawn(async move {
        if let Err(e) = client.mark_read(conversation, seq).await {
            tracing::debug!(error = %e, conversation, seq, "mark read failed");
        }
    });
}

/// The send target and conversation id of a recipient.
async fn resolve(client: &Client, recipient: &Recipient) -> Result<(Target, u64)> {
    match recipient {
        Recipient::User(name) => {
            let id = client
                .user_id_of(name)
                .await?
                .with_context(|| format!("no user named {name}"))?;
            let conv = ConversationId::direct(client.user_id(), id)
                .with_context(|| format!("invalid user id {id}"))?;
            Ok((Target::User(id), conv.raw()))
        }
        Recipient::Group(g) => {
            let conv = ConversationId::group(*g).with_context(|| format!("invalid group #{g}"))?;
            Ok((Target::Group(*g), conv.raw()))
        }
    }
}

async fn lookup(client: &Client, names: Vec<String>) -> Result<Vec<pb::User>> {
    let found = client.lookup_users(names.clone(), vec![]).await?;
    let missing: Vec<String> = names
        .into_iter()
        .filter(|n| !found.iter().any(|u| &u.username == n))
        .collect();
    if !missing.is_empty() {
        bail!("unknown users: {}", missing.join(", "));
    }
    Ok(found)
}

async fn user_ids(client: &Client, names: Vec<String>) -> Result<Vec<u64>> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    Ok(lookup(client, names)
        .await?
        .into_iter()
        .map(|u| u.user_id)
        .collect())
}

fn content_of(send: &SendArgs) -> Result<pb::Content> {
    let text = send.text.join(" ");
    let media = |url: &String| pb::Media {
        url: url.clone(),
        size: send.size.unwrap_or(0),
        mime_type: send.mime.clone().unwrap_or_default(),
        name: send.name.clone().unwrap_or_default(),
        thumbnail: None,
    };
    let kind = match (&send.image, &send.file) {
        (Some(_), _) | (_, Some(_)) if !text.is_empty() => {
            bail!("give either text or --image/--file, not both")
        }
        (Some(url), _) => Kind::Image(media(url)),
        (None, Some(url)) => Kind::File(media(url)),
        (None, None) if text.trim().is_empty() => bail!("nothing to send"),
        (None, None) => Kind::Text(pb::Text { text }),
    };
    Ok(pb::Content { kind: Some(kind) })
}

async fn prompt_password(register: bool) -> Result<String> {
    prompt("Password: ", register).await
}

/// Whether a connect failed because the saved session is over (ended or
/// expired), so there is nothing left to end on the server.
fn session_over(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        matches!(
            e.downcast_ref::<ClientError>(),
            Some(ClientError::AuthFailed {
                code: ErrorCode::InvalidToken,
                ..
            })
        )
    })
}

/// Reads a password without echo; with `twice`, asks again to confirm.
async fn prompt(label: &'static str, twice: bool) -> Result<String> {
    tokio::task::spawn_blocking(move || -> Result<String> {
        let password = rpassword::prompt_password(label).context("reading the password")?;
        if twice {
            let again =
                rpassword::prompt_password("Repeat password: ").context("reading the password")?;
            if again != password {
                bail!("the passwords differ");
            }
        }
        Ok(password)
    })
    .await?
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_input_is_parsed() {
        assert_eq!(ChatInput::parse("hello"), ChatInput::Text("hello".into()));
        assert_eq!(ChatInput::parse("/quit"), ChatInput::Quit);
        assert_eq!(ChatInput::parse("/to #3"), ChatInput::To("#3".into()));
        assert_eq!(
            ChatInput::parse("/history"),
            ChatInput::History(CHAT_HISTORY)
        );
        assert_eq!(ChatInput::parse("/history 50"), ChatInput::History(50));
        assert_eq!(
            ChatInput::parse("//slash"),
            ChatInput::Text("/slash".into())
        );
        assert!(matches!(
            ChatInput::parse("/frobnicate"),
            ChatInput::Unknown(_)
        ));
        assert!(matches!(
            ChatInput::parse("/history x"),
            ChatInput::Unknown(_)
        ));
    }

    fn send_args(text: &[&str], image: Option<&str>, file: Option<&str>) -> SendArgs {
        SendArgs {
            to: "bob".into(),
            text: text.iter().map(|s| s.to_string()).collect(),
            image: image.map(Into::into),
            file: file.map(Into::into),
            name: Some("a.pdf".into()),
            mime: Some("application/pdf".into()),
            size: Some(10),
        }
    }

    #[test]
    fn content_from_arguments() {
        let text = content_of(&send_args(&["hi", "there"], None, None)).unwrap();
        assert_eq!(
            text.kind,
            Some(Kind::Text(pb::Text {
                text: "hi there".into()
            }))
        );
        let file = content_of(&send_args(&[], None, Some("https://f"))).unwrap();
        let Some(Kind::File(media)) = file.kind else {
            panic!("expected a file")
        };
        assert_eq!(
            (media.url.as_str(), media.size, media.name.as_str()),
            ("https://f", 10, "a.pdf")
        );
        assert!(content_of(&send_args(&[], None, None)).is_err());
        assert!(content_of(&send_args(&["x"], Some("https://i"), None)).is_err());
    }
}
