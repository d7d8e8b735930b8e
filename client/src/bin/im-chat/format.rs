//! Pure text handling of im-chat: parsing a recipient argument and turning
//! messages, receipts and conversations into human lines
//! (`[15:04:05] bob → you: hi`) or JSON lines (`--json`).

use std::collections::HashMap;

use anyhow::{Result, bail};
use chrono::{FixedOffset, TimeZone};
use im_client::pb::{self, content::Kind, group_notice};
use im_client::{ConversationId, ErrorCode};
use serde_json::{Value, json};

/// A recipient as typed on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recipient {
    /// A user by username (`bob`, or `@bob`).
    User(String),
    /// A group by id (`#12`).
    Group(u64),
}

impl std::fmt::Display for Recipient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Recipient::User(name) => f.write_str(name),
            Recipient::Group(id) => write!(f, "#{id}"),
        }
    }
}

/// Parses `bob`, `@bob` or `#12`.
pub fn parse_recipient(arg: &str) -> Result<Recipient> {
    let arg = arg.trim();
    if let Some(id) = arg.strip_prefix('#') {
        match id.parse::<u64>() {
            Ok(id) if ConversationId::group(id).is_some() => Ok(Recipient::Group(id)),
            _ => bail!("`{arg}` is not a group: expected # followed by a group id, like #12"),
        }
    } else {
        let name = arg.strip_prefix('@').unwrap_or(arg);
        if name.is_empty() || name.chars().any(char::is_whitespace) {
            bail!("`{arg}` is not a username");
        }
        Ok(Recipient::User(name.to_owned()))
    }
}

/// Names known so far, for display. Filled by the caller (it looks up
/// what is missing); rendering itself never does I/O.
#[derive(Debug, Clone)]
pub struct Names {
    /// The local user.
    pub me: u64,
    /// User id → username.
    pub users: HashMap<u64, String>,
    /// Group id → group name.
    pub groups: HashMap<u64, String>,
    /// Offset of the local time zone, for clock times.
    pub offset: FixedOffset,
}

impl Names {
    pub fn new(me: u64, offset: FixedOffset) -> Self {
        Names {
            me,
            users: HashMap::new(),
            groups: HashMap::new(),
            offset,
        }
    }

    /// User ids mentioned by `message` whose names are unknown.
    pub fn missing_users(&self, message: &pb::Message) -> Vec<u64> {
        let mut ids = vec![message.sender_id];
        if let Some(peer) =
            ConversationId::from_raw(message.conversation_id).and_then(|c| c.peer_of(self.me))
        {
            ids.push(peer);
        }
        if let Some(Kind::Notice(notice)) = message.content.as_ref().and_then(|c| c.kind.as_ref()) {
            ids.push(notice.actor_id);
            ids.extend(&notice.user_ids);
        }
        ids.retain(|&id| id != 0 && id != self.me && !self.users.contains_key(&id));
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    fn user(&self, id: u64) -> String {
        if id == self.me {
            "you".to_owned()
        } else {
            self.users
                .get(&id)
                .cloned()
                .unwrap_or_else(|| format!("user{id}"))
        }
    }

    /// `#12 friends`, or `#12` while the name is unknown.
    pub fn group(&self, id: u64) -> String {
        match self.groups.get(&id) {
            Some(name) if !name.is_empty() => format!("#{id} {name}"),
            _ => format!("#{id}"),
        }
    }

    /// How a conversation is called: the group, or the other user.
    pub fn conversation(&self, conversation_id: u64) -> String {
        match ConversationId::from_raw(conversation_id) {
            Some(c) => match (c.group_id(), c.peer_of(self.me)) {
                (Some(g), _) => self.group(g),
                (None, Some(peer)) => self.user(peer),
                (None, None) => c.to_string(),
            },
            None => format!("conversation {conversation_id}"),
        }
    }

    /// `15:04:05` in local time.
    pub fn clock(&self, ms: i64) -> String {
        match self.offset.timestamp_millis_opt(ms).single() {
            Some(t) => t.format("%H:%M:%S").to_string(),
            None => "--:--:--".to_owned(),
        }
    }
}

/// `2026-12-03 15:04:05` in local time.
pub fn datetime(ms: i64) -> String {
    match chrono::Local.timestamp_millis_opt(ms).single() {
        Some(t) => t.format("%Y-%m-%d %H:%M:%S").to_string(),
        None => "-".to_owned(),
    }
}

/// One message as a human line: `[15:04:05] bob → you: hi`, or for a
/// group `[15:04:05] bob → #12 friends: hi`.
pub fn message_line(names: &Names, message: &pb::Message) -> String {
    let conv = ConversationId::from_raw(message.conversation_id);
    let to = match conv.and_then(ConversationId::group_id) {
        Some(g) => names.group(g),
        None if message.sender_id == names.me => names.conversation(message.conversation_id),
        None => "you".to_owned(),
    };
    let time = names.clock(message.server_time_ms);
    let body = content_text(names, message.content.as_ref());
    if message.sender_id == 0 {
        format!("[{time}] {to}: * {body}")
    } else {
        let from = names.user(message.sender_id);
        format!("[{time}] {from} → {to}: {body}")
    }
}

/// The text shown for a message body.
pub fn content_text(names: &Names, content: Option<&pb::Content>) -> String {
    match content.and_then(|c| c.kind.as_ref()) {
        Some(Kind::Text(t)) => t.text.clone(),
        Some(Kind::Image(m)) => format!("[image {}{}]", m.url, media_details(m)),
        Some(Kind::File(m)) => {
            let name = if m.name.is_empty() { "file" } else { &m.name };
            format!("[file {name}: {}{}]", m.url, media_details(m))
        }
        Some(Kind::Notice(n)) => notice_text(names, n),
        None => "[empty message]".to_owned(),
    }
}

fn media_details(m: &pb::Media) -> String {
    let mut out = String::new();
    if !m.mime_type.is_empty() {
        out.push_str(&format!(", {}", m.mime_type));
    }
    if m.size > 0 {
        out.push_str(&format!(", {}", human_size(m.size)));
    }
    out
}

fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

fn notice_text(names: &Names, n: &pb::GroupNotice) -> String {
    let actor = names.user(n.actor_id);
    let users = n
        .user_ids
        .iter()
        .map(|&u| names.user(u))
        .collect::<Vec<_>>()
        .join(", ");
    match group_notice::Kind::try_from(n.kind) {
        Ok(group_notice::Kind::Created) => format!("{actor} created the group {:?}", n.group_name),
        Ok(group_notice::Kind::MembersAdded) => format!("{actor} added {users}"),
        Ok(group_notice::Kind::MembersRemoved) => format!("{actor} removed {users}"),
        Ok(group_notice::Kind::MemberLeft) => format!("{users} left"),
        _ => "group changed".to_owned(),
    }
}

/// A receipt as a human line: `[15:04:05] bob read up to 12 in #3 team`.
pub fn receipt_line(names: &Names, receipt: &pb::Receipt, now_ms: i64) -> String {
    let verb = match pb::ReceiptKind::try_from(receipt.kind) {
        Ok(pb::ReceiptKind::Read) => "read",
        _ => "received",
    };
    format!(
        "[{}] {} {verb} up to {} in {}",
        names.clock(now_ms),
        names.user(receipt.user_id),
        receipt.seq,
        names.conversation(receipt.conversation_id)
    )
}

/// A conversation summary as a human line.
pub fn conversation_line(names: &Names, c: &pb::ConversationSummary) -> String {
    let title = if c.group_id != 0 {
        format!("#{} {}", c.group_id, c.title)
    } else {
        c.title.clone()
    };
    let unread = if c.unread_count > 0 {
        format!(" ({} unread)", c.unread_count)
    } else {
        String::new()
    };
    let last = match &c.last_message {
        Some(m) => format!(": {}", message_line(names, m)),
        None => String::new(),
    };
    format!("{title}{unread}{last}")
}

/// A message as a JSON line.
pub fn message_json(names: &Names, m: &pb::Message) -> Value {
    json!({
        "type": "message",
        "conversation_id": m.conversation_id,
        "conversation": names.conversation(m.conversation_id),
        "seq": m.seq,
        "message_id": m.message_id,
        "sender_id": m.sender_id,
        "sender": if m.sender_id == 0 { String::new() } else { names.user(m.sender_id) },
        "client_msg_id": m.client_msg_id,
        "server_time_ms": m.server_time_ms,
        "content": content_json(names, m.content.as_ref()),
    })
}

fn content_json(names: &Names, content: Option<&pb::Content>) -> Value {
    let media = |kind: &str, m: &pb::Media| json!({"kind": kind, "url": m.url, "size": m.size, "mime_type": m.mime_type, "name": m.name});
    match content.and_then(|c| c.kind.as_ref()) {
        Some(Kind::Text(t)) => json!({"kind": "text", "text": t.text}),
        Some(Kind::Image(m)) => media("image", m),
        Some(Kind::File(m)) => media("file", m),
        Some(Kind::Notice(n)) => json!({
            "kind": "notice",
            "text": notice_text(names, n),
            "actor_id": n.actor_id,
            "user_ids": n.user_ids,
            "group_name": n.group_name,
        }),
        None => Value::Null,
    }
}

/// A receipt as a JSON line.
pub fn receipt_json(r: &pb::Receipt) -> Value {
    let kind = match pb::ReceiptKind::try_from(r.kind) {
        Ok(pb::ReceiptKind::Read) => "read",
        Ok(pb::ReceiptKind::Delivered) => "delivered",
        _ => "unknown",
    };
    json!({
        "type": "receipt",
        "conversation_id": r.conversation_id,
        "user_id": r.user_id,
        "seq": r.seq,
        "kind": kind,
    })
}

/// A conversation summary as a JSON line.
pub fn conversation_json(names: &Names, c: &pb::ConversationSummary) -> Value {
    json!({
        "type": "conversation",
        "conversation_id": c.conversation_id,
        "peer_id": c.peer_id,
        "group_id": c.group_id,
        "title": c.title,
        "last_seq": c.last_seq,
        "read_seq": c.read_seq,
        "unread_count": c.unread_count,
        "last_message": c.last_message.as_ref().map(|m| message_json(names, m)),
    })
}

/// A one-line explanation of a server error code for people.
pub fn explain(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::InvalidCredentials => "unknown username or wrong password",
        ErrorCode::UsernameTaken => "that username is taken",
        ErrorCode::InvalidToken => "the saved session has expired; log in again",
        ErrorCode::SessionRevoked => {
            "this session was ended (logout or password change); log in again"
        }
        ErrorCode::RateLimited => "too many requests or attempts; try again later",
        ErrorCode::Forbidden => "not allowed",
        ErrorCode::NotFound => "no such user, group or conversation",
        ErrorCode::InvalidArgument => "invalid argument",
        _ => "server error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE: u64 = 1;
    const BOB: u64 = 2;

    fn names() -> Names {
        let mut n = Names::new(ALICE, FixedOffset::east_opt(0).unwrap());
        n.users.insert(BOB, "bob".into());
        n.groups.insert(12, "friends".into());
        n
    }

    fn text(conv: u64, sender: u64, text: &str) -> pb::Message {
        pb::Message {
            conversation_id: conv,
            seq: 3,
            message_id: 9,
            sender_id: sender,
            client_msg_id: "c".into(),
            // 2023-11-14 22:13:20 UTC + 5 s
            server_time_ms: 1_700_000_005_000,
            content: Some(pb::Content {
                kind: Some(Kind::Text(pb::Text { text: text.into() })),
            }),
        }
    }

    #[test]
    fn recipients_parse() {
        assert_eq!(
            parse_recipient("bob").unwrap(),
            Recipient::User("bob".into())
        );
        assert_eq!(
            parse_recipient("@bob").unwrap(),
            Recipient::User("bob".into())
        );
        assert_eq!(parse_recipient("#12").unwrap(), Recipient::Group(12));
        assert!(parse_recipient("#").is_err());
        assert!(parse_recipient("#x1").is_err());
        assert!(parse_recipient("#0").is_err());
        assert!(parse_recipient("").is_err());
        assert!(parse_recipient("@").is_err());
        assert_eq!(Recipient::Group(12).to_string(), "#12");
    }

    #[test]
    fn direct_and_group_lines() {
        let n = names();
        let direct = ConversationId::direct(ALICE, BOB).unwrap().raw();
        assert_eq!(
            message_line(&n, &text(direct, BOB, "hi")),
            "[22:13:25] bob → you: hi"
        );
        assert_eq!(
            message_line(&n, &text(direct, ALICE, "hello")),
            "[22:13:25] you → bob: hello"
        );
        let group = ConversationId::group(12).unwrap().raw();
        assert_eq!(
            message_line(&n, &text(group, BOB, "all")),
            "[22:13:25] bob → #12 friends: all"
        );
        let unknown = ConversationId::group(13).unwrap().raw();
        assert_eq!(
            message_line(&n, &text(unknown, 7, "x")),
            "[22:13:25] user7 → #13: x"
        );
        let plus_two = Names {
            offset: FixedOffset::east_opt(2 * 3600).unwrap(),
            ..names()
        };
        assert!(message_line(&plus_two, &text(direct, BOB, "hi")).starts_with("[00:13:25]"));
    }

    #[test]
    fn notices_media_and_receipts() {
        let n = names();
        let group = ConversationId::group(12).unwrap().raw();
        let mut m = text(group, 0, "");
        m.content = Some(pb::Content {
            kind: Some(Kind::Notice(pb::GroupNotice {
                kind: group_notice::Kind::MembersAdded as i32,
                actor_id: ALICE,
                user_ids: vec![BOB, 5],
                group_name: "friends".into(),
            })),
        });
        assert_eq!(
            message_line(&n, &m),
            "[22:13:25] #12 friends: * you added bob, user5"
        );
        assert_eq!(n.missing_users(&m), [5]);

        let image = pb::Content {
            kind: Some(Kind::Image(pb::Media {
                url: "https://x/y.png".into(),
                size: 2048,
                mime_type: "image/png".into(),
                ..Default::default()
            })),
        };
        assert_eq!(
            content_text(&n, Some(&image)),
            "[image https://x/y.png, image/png, 2.0 KiB]"
        );

        let receipt = pb::Receipt {
            conversation_id: ConversationId::direct(ALICE, BOB).unwrap().raw(),
            user_id: BOB,
            seq: 4,
            kind: pb::ReceiptKind::Read as i32,
        };
        assert_eq!(
            receipt_line(&n, &receipt, 1_700_000_005_000),
            "[22:13:25] bob read up to 4 in bob"
        );
        assert_eq!(receipt_json(&receipt)["kind"], "read");
    }

    #[test]
    fn json_lines_carry_ids_and_names() {
        let n = names();
        let direct = ConversationId::direct(ALICE, BOB).unwrap().raw();
        let v = message_json(&n, &text(direct, BOB, "hi"));
        assert_eq!(v["type"], "message");
        assert_eq!(v["sender"], "bob");
        assert_eq!(v["seq"], 3);
        assert_eq!(v["content"]["text"], "hi");
        // One line, as --json promises.
        assert!(!v.to_string().contains('\n'));
    }
}
