//! Behaviour of [`SqliteStore`] against the [`Store`] contract, on
//! throwaway databases.

use std::collections::HashSet;
use std::sync::Arc;

use im_proto::{ConversationId, pb};

use super::{SqliteOptions, SqliteStore, schema};
use crate::store::{
    Ack, AppendOutcome, AppendRejection, AppendResult, CursorKind, CursorMove, GroupLimits,
    GroupRecord, NewMessage, RetentionMode, Store, StoreError, UserId,
};

fn open(dir: &std::path::Path) -> SqliteStore {
    SqliteStore::open(dir, SqliteOptions::default()).expect("open store")
}

fn text(body: &str) -> pb::Content {
    pb::Content {
        kind: Some(pb::content::Kind::Text(pb::Text { text: body.into() })),
    }
}

fn body(message: &pb::Message) -> &str {
    match message.content.as_ref().and_then(|c| c.kind.as_ref()) {
        Some(pb::content::Kind::Text(t)) => &t.text,
        other => panic!("not a text message: {other:?}"),
    }
}

fn new_message(
    sender: UserId,
    conversation: ConversationId,
    client_msg_id: &str,
    words: &str,
) -> NewMessage {
    NewMessage {
        sender,
        conversation,
        client_msg_id: client_msg_id.into(),
        content: text(words),
        server_time_ms: im_proto::now_ms(),
        resend: false,
    }
}

fn limits(max_members: usize) -> GroupLimits {
    GroupLimits {
        max_members,
        max_groups_per_user: 1000,
    }
}

fn direct(a: UserId, b: UserId) -> ConversationId {
    ConversationId::direct(a, b).expect("valid user ids")
}

fn group_conv(group: &GroupRecord) -> ConversationId {
    ConversationId::group(group.id).expect("valid group id")
}

fn stored(result: &AppendResult) -> &pb::Message {
    match result {
        Ok(AppendOutcome::Stored(m)) => m,
        other => panic!("expected a stored message, got {other:?}"),
    }
}

fn seqs(messages: &[pb::Message]) -> Vec<u64> {
    messages.iter().map(|m| m.seq).collect()
}

async fn users<S: Store>(store: &S, names: &[&str]) -> Vec<UserId> {
    let mut ids = Vec::new();
    for name in names {
        ids.push(store.create_user(name, "hash").await.expect("create user"));
    }
    ids
}

/// Appends `n` numbered messages from `sender` one batch at a time.
async fn send_n<S: Store>(
    store: &S,
    sender: UserId,
    conversation: ConversationId,
    tag: &str,
    n: usize,
) -> Vec<pb::Message> {
    let batch = (0..n)
        .map(|i| {
            new_message(
                sender,
                conversation,
                &format!("{tag}-{i}"),
                &format!("{tag} {i}"),
            )
        })
        .collect();
    let results = store.append_batch(batch).await.expect("append");
    results.iter().map(|r| stored(r).clone()).collect()
}

#[tokio::test]
async fn users_are_unique_case_insensitively_and_found_by_name_or_id() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let alice = store.create_user("alice", "h-alice").await.unwrap();
    let bob = store.create_user("Bob", "h-bob").await.unwrap();
    assert_ne!(alice, bob);
    assert!(alice >= 1 && bob >= 1);

    assert!(matches!(
        store.create_user("ALICE", "other").await,
        Err(StoreError::UsernameTaken)
    ));

    let found = store.user_by_name("aLiCe").await.unwrap().expect("alice");
    assert_eq!(found.id, alice);
    assert_eq!(found.username, "alice");
    assert_eq!(found.password_hash, "h-alice");
    assert_eq!(store.user_by_name("carol").await.unwrap(), None);

    let mut listed = store
        .lookup_users(
            &[alice, 999_999, alice],
            &["BOB".into(), "nobody".into(), "alice".into()],
        )
        .await
        .unwrap();
    listed.sort();
    assert_eq!(listed, vec![(alice, "alice".into()), (bob, "Bob".into())]);
    assert!(
        store
            .lookup_users(&[u64::MAX], &[])
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn seqs_are_dense_per_conversation_across_batches() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let ids = users(&store, &["a", "b", "c"]).await;
    let (a, b, c) = (ids[0], ids[1], ids[2]);
    let ab = direct(a, b);
    let ac = direct(a, c);

    let first = store
        .append_batch(vec![
            new_message(a, ab, "1", "one"),
            new_message(b, ab, "2", "two"),
            new_message(a, ac, "3", "other conversation"),
            new_message(a, ab, "4", "three"),
        ])
        .await
        .unwrap();
    assert_eq!(
        first.iter().map(|r| stored(r).seq).collect::<Vec<_>>(),
        vec![1, 2, 1, 3]
    );
    let m = stored(&first[1]);
    assert_eq!(m.conversation_id, ab.raw());
    assert_eq!(m.sender_id, b);
    assert_eq!(m.client_msg_id, "2");
    assert!(
        m.server_time_ms > 1_700_000_000_000,
        "the time it was given"
    );
    assert_eq!(body(m), "two");

    let second = send_n(&store, b, ab, "later", 2).await;
    assert_eq!(seqs(&second), vec![4, 5]);

    let all_ids: HashSet<u64> = first
        .iter()
        .map(|r| stored(r).message_id)
        .chain(second.iter().map(|m| m.message_id))
        .collect();
    assert_eq!(all_ids.len(), 6, "message ids are unique");

    let page = store.history(a, ab, 0, 100).await.unwrap();
    assert_eq!(seqs(&page.messages), vec![1, 2, 3, 4, 5]);
    assert_eq!(
        page.messages.iter().map(body).collect::<Vec<_>>(),
        vec!["one", "two", "three", "later 0", "later 1"]
    );
}

#[tokio::test]
async fn notes_to_self_form_a_one_member_conversation() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let ids = users(&store, &["solo", "other"]).await;
    let me = direct(ids[0], ids[0]);
    let sent = send_n(&store, ids[0], me, "note", 2).await;
    assert_eq!(seqs(&sent), vec![1, 2]);
    let (list, _) = store.conversations(ids[0], 0, 10).await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!((list[0].peer_id, list[0].title.as_str()), (ids[0], "solo"));
    assert_eq!((list[0].last_seq, list[0].unread_count), (2, 0));
    assert!(matches!(
        store.history(ids[1], me, 0, 10).await,
        Err(StoreError::NotMember)
    ));
}

#[tokio::test]
async fn concurrent_senders_get_every_seq_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(dir.path()));
    let names: Vec<String> = (0..8).map(|i| format!("user{i}")).collect();
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let ids = users(&*store, &name_refs).await;
    let group = store
        .create_group(ids[0], "crowd", &ids[1..], limits(100))
        .await
        .unwrap();
    let conversation = group_conv(&group);

    let mut tasks = Vec::new();
    for (t, &sender) in ids.iter().enumerate() {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            for round in 0..20 {
                let batch = (0..(round % 4 + 1))
                    .map(|i| new_message(sender, conversation, &format!("{t}-{round}-{i}"), "x"))
                    .collect();
                for r in store.append_batch(batch).await.unwrap() {
                    mine.push(stored(&r).seq);
                }
            }
            mine
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        let mine = task.await.unwrap();
        assert!(mine.windows(2).all(|w| w[0] < w[1]), "a sender's seqs rise");
        all.extend(mine);
    }
    all.sort_unstable();
    let expected: Vec<u64> = (1..=all.len() as u64).collect();
    assert_eq!(all.len(), 8 * (1 + 2 + 3 + 4) * 5);
    assert_eq!(all, expected);
}

#[tokio::test]
async fn consecutive_calls_keep_call_order_even_when_awaited_out_of_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let ids = users(&store, &["a", "b"]).await;
    let ab = direct(ids[0], ids[1]);

    // The batches are queued when append_batch returns, before any await.
    let pending: Vec<_> = (0..50)
        .map(|i| {
            store.append_batch(vec![new_message(
                ids[0],
                ab,
                &format!("m{i}"),
                &i.to_string(),
            )])
        })
        .collect();
    let mut results = Vec::new();
    for future in pending.into_iter().rev() {
        results.push(future.await.unwrap());
    }
    results.reverse();
    let got: Vec<u64> = results.iter().map(|r| stored(&r[0]).seq).collect();
    assert_eq!(got, (1..=50).collect::<Vec<_>>());
}

#[tokio::test]
async fn resends_return_the_original_ack_within_and_across_batches() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let ids = users(&store, &["a", "b", "c"]).await;
    let (a, b, c) = (ids[0], ids[1], ids[2]);
    let ab = direct(a, b);
    let ac = direct(a, c);

    let results = store
        .append_batch(vec![
            new_message(a, ab, "x", "first"),
            new_message(a, ab, "x", "resent"),
            new_message(b, ab, "x", "same id, other sender"),
        ])
        .await
        .unwrap();
    let original = stored(&results[0]).clone();
    let ack = Ack {
        message_id: original.message_id,
        conversation_id: ab.raw(),
        seq: 1,
        server_time_ms: original.server_time_ms,
    };
    assert_eq!(results[1], Ok(AppendOutcome::Duplicate(ack)));
    assert_eq!(stored(&results[2]).seq, 2);

    // A later batch to the same conversation is still a resend; the same
    // id in another conversation is another message (dedup is per
    // conversation, sender and id, as in the pipeline store).
    let later = store
        .append_batch(vec![
            new_message(a, ab, "x", "again"),
            new_message(a, ac, "x", "elsewhere"),
            new_message(a, ac, "y", "new"),
        ])
        .await
        .unwrap();
    assert_eq!(later[0], Ok(AppendOutcome::Duplicate(ack)));
    assert_eq!(stored(&later[1]).seq, 1);
    assert_eq!(stored(&later[2]).seq, 2, "the resend used no seq");

    // Server notices are never deduplicated.
    let notices = store
        .append_batch(vec![
            new_message(0, ab, "", "n1"),
            new_message(0, ab, "", "n2"),
        ])
        .await
        .unwrap();
    assert_eq!(stored(&notices[0]).seq, 3);
    assert_eq!(stored(&notices[1]).seq, 4);

    let page = store.history(a, ab, 0, 10).await.unwrap();
    assert_eq!(
        page.messages.iter().map(body).collect::<Vec<_>>(),
        vec!["first", "same id, other sender", "n1", "n2"]
    );
}

#[tokio::test]
async fn rejected_messages_do_not_disturb_the_rest_of_the_batch() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let ids = users(&store, &["a", "b", "c"]).await;
    let (a, b, c) = (ids[0], ids[1], ids[2]);
    let group = store.create_group(a, "g", &[b], limits(10)).await.unwrap();
    let g = group_conv(&group);
    let ab = direct(a, b);

    let results = store
        .append_batch(vec![
            new_message(a, g, "1", "ok in group"),
            new_message(c, g, "2", "c is not in the group"),
            new_message(a, direct(a, 4_000), "3", "no such peer"),
            new_message(c, ab, "4", "c is not in a-b"),
            new_message(b, g, "5", "ok again"),
            new_message(a, ab, "6", "ok direct"),
        ])
        .await
        .unwrap();
    assert_eq!(stored(&results[0]).seq, 1);
    assert_eq!(results[1], Err(AppendRejection::NotMember));
    assert_eq!(results[2], Err(AppendRejection::NoSuchUser));
    assert_eq!(results[3], Err(AppendRejection::NotMember));
    assert_eq!(stored(&results[4]).seq, 2);
    assert_eq!(stored(&results[5]).seq, 1);

    // The rejected client ids were not consumed.
    let retry = store
        .append_batch(vec![new_message(c, direct(c, a), "4", "now fine")])
        .await
        .unwrap();
    assert_eq!(stored(&retry[0]).seq, 1);
    // A conversation with a missing peer was not created.
    let (list, _) = store.conversations(a, 0, 100).await.unwrap();
    let mut convs: Vec<u64> = list.iter().map(|s| s.conversation_id).collect();
    convs.sort_unstable();
    let mut expected = vec![ab.raw(), direct(a, c).raw(), g.raw()];
    expected.sort_unstable();
    assert_eq!(convs, expected);
}

#[tokio::test]
async fn history_pages_backwards() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let ids = users(&store, &["a", "b", "c"]).await;
    let ab = direct(ids[0], ids[1]);
    send_n(&store, ids[0], ab, "m", 25).await;

    let newest = store.history(ids[1], ab, 0, 10).await.unwrap();
    assert_eq!(seqs(&newest.messages), (16..=25).collect::<Vec<_>>());
    assert!(newest.has_more);
    let older = store.history(ids[1], ab, 16, 10).await.unwrap();
    assert_eq!(seqs(&older.messages), (6..=15).collect::<Vec<_>>());
    assert!(older.has_more);
    let oldest = store.history(ids[1], ab, 6, 10).await.unwrap();
    assert_eq!(seqs(&oldest.messages), (1..=5).collect::<Vec<_>>());
    assert!(!oldest.has_more);
    let exact = store.history(ids[1], ab, 11, 10).await.unwrap();
    assert_eq!(seqs(&exact.messages), (1..=10).collect::<Vec<_>>());
    assert!(!exact.has_more);

    assert!(matches!(
        store.history(ids[2], ab, 0, 10).await,
        Err(StoreError::NotMember)
    ));
}

#[tokio::test]
async fn sync_pages_across_conversations_and_hides_what_came_before_joining() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let ids = users(&store, &["a", "b", "c"]).await;
    let (a, b, c) = (ids[0], ids[1], ids[2]);
    let ab = direct(a, b);
    let group = store.create_group(a, "g", &[b], limits(10)).await.unwrap();
    let g = group_conv(&group);

    send_n(&store, b, ab, "d", 5).await;
    send_n(&store, a, g, "before", 3).await;
    store.add_members(group.id, &[c], limits(10)).await.unwrap();
    send_n(&store, b, g, "after", 4).await;

    // The late joiner sees only what was sent after joining, in sync and history.
    let page = store.sync(c, &[(g, 0)], 100).await.unwrap();
    assert_eq!(seqs(&page.messages), vec![4, 5, 6, 7]);
    assert!(!page.has_more);
    let page = store.history(c, g, 0, 100).await.unwrap();
    assert_eq!(seqs(&page.messages), vec![4, 5, 6, 7]);
    assert!(!page.has_more);

    // Unsorted, repeated cursors; a conversation `a` is not in is skipped.
    let cursors = [(g, 0), (direct(b, c), 0), (ab, 2), (ab, 1)];
    let first = store.sync(a, &cursors, 6).await.unwrap();
    let got: Vec<(u64, u64)> = first
        .messages
        .iter()
        .map(|m| (m.conversation_id, m.seq))
        .collect();
    assert!(ab.raw() < g.raw());
    assert_eq!(
        got,
        vec![
            (ab.raw(), 2),
            (ab.raw(), 3),
            (ab.raw(), 4),
            (ab.raw(), 5),
            (g.raw(), 1),
            (g.raw(), 2)
        ]
    );
    assert!(first.has_more);

    let second = store.sync(a, &[(ab, 5), (g, 2)], 6).await.unwrap();
    assert_eq!(seqs(&second.messages), vec![3, 4, 5, 6, 7]);
    assert!(!second.has_more);

    // A page that ends exactly at a conversation boundary still reports more.
    let boundary = store.sync(a, &[(ab, 0), (g, 0)], 5).await.unwrap();
    assert_eq!(boundary.messages.len(), 5);
    assert!(boundary.has_more);
    let done = store.sync(a, &[(ab, 5), (g, 7)], 5).await.unwrap();
    assert!(done.messages.is_empty());
    assert!(!done.has_more);
}

#[tokio::test]
async fn conversation_summaries_count_unread_and_sending_marks_read() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let ids = users(&store, &["alice", "bob", "carol"]).await;
    let (a, b, c) = (ids[0], ids[1], ids[2]);
    let ab = direct(a, b);
    send_n(&store, a, ab, "hi", 3).await;
    let group = store
        .create_group(b, "friends", &[a], limits(10))
        .await
        .unwrap();
    let g = group_conv(&group);
    send_n(&store, b, g, "g", 2).await;
    store.add_members(group.id, &[c], limits(10)).await.unwrap();
    send_n(&store, b, g, "g2", 1).await;

    let (list, more) = store.conversations(a, 0, 10).await.unwrap();
    assert!(!more);
    assert_eq!(list.len(), 2);
    let d = &list[0];
    assert_eq!(d.conversation_id, ab.raw());
    assert_eq!((d.peer_id, d.group_id), (b, 0));
    assert_eq!(d.title, "bob");
    assert_eq!((d.last_seq, d.read_seq, d.unread_count), (3, 3, 0));
    let last = d.last_message.as_ref().expect("last message");
    assert_eq!((last.seq, body(last)), (3, "hi 2"));
    let gs = &list[1];
    assert_eq!(gs.conversation_id, g.raw());
    assert_eq!((gs.peer_id, gs.group_id), (0, group.id));
    assert_eq!(gs.title, "friends");
    assert_eq!((gs.last_seq, gs.read_seq, gs.unread_count), (3, 0, 3));

    let (list, _) = store.conversations(b, 0, 10).await.unwrap();
    assert_eq!(list[0].title, "alice");
    assert_eq!((list[0].read_seq, list[0].unread_count), (0, 3));
    // Replying marks everything up to the reply as read.
    send_n(&store, b, ab, "re", 1).await;
    let (list, _) = store.conversations(b, 0, 10).await.unwrap();
    assert_eq!(
        (list[0].last_seq, list[0].read_seq, list[0].unread_count),
        (4, 4, 0)
    );

    // The late joiner counts only what came after joining: its read cursor
    // starts at the join, so unread is last_seq - read_seq.
    let (list, _) = store.conversations(c, 0, 10).await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(
        (list[0].last_seq, list[0].read_seq, list[0].unread_count),
        (3, 2, 1)
    );

    // Paging by conversation id.
    let (page, more) = store.conversations(a, 0, 1).await.unwrap();
    assert_eq!(page.len(), 1);
    assert!(more);
    let (page, more) = store
        .conversations(a, page[0].conversation_id, 1)
        .await
        .unwrap();
    assert_eq!(page[0].conversation_id, g.raw());
    assert!(!more);

    // A new group without messages has no last message.
    let quiet = store
        .create_group(a, "quiet", &[], limits(10))
        .await
        .unwrap();
    let (page, _) = store.conversations(a, g.raw(), 10).await.unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].group_id, quiet.id);
    assert_eq!((page[0].last_seq, page[0].unread_count), (0, 0));
    assert!(page[0].last_message.is_none());
}

#[tokio::test]
async fn cursors_move_forward_only_and_clamp_to_the_last_seq() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let ids = users(&store, &["a", "b", "c"]).await;
    let (a, b, c) = (ids[0], ids[1], ids[2]);
    let ab = direct(a, b);
    send_n(&store, a, ab, "m", 3).await;

    let read = CursorKind::Read;
    assert_eq!(
        store.advance_cursor(b, ab, read, 2).await.unwrap(),
        Some(CursorMove { from: 0, to: 2 })
    );
    assert_eq!(store.advance_cursor(b, ab, read, 1).await.unwrap(), None);
    assert_eq!(store.advance_cursor(b, ab, read, 2).await.unwrap(), None);
    assert_eq!(
        store.advance_cursor(b, ab, read, 1_000).await.unwrap(),
        Some(CursorMove { from: 2, to: 3 })
    );
    assert_eq!(
        store.advance_cursor(b, ab, read, u64::MAX).await.unwrap(),
        None
    );
    assert_eq!(
        store
            .advance_cursor(b, ab, CursorKind::Delivered, 3)
            .await
            .unwrap(),
        Some(CursorMove { from: 0, to: 3 })
    );
    // The sender's cursors already stand at its own message.
    assert_eq!(
        store
            .advance_cursor(a, ab, CursorKind::Delivered, 3)
            .await
            .unwrap(),
        None
    );
    assert!(matches!(
        store.advance_cursor(c, ab, read, 1).await,
        Err(StoreError::NotMember)
    ));

    let (list, _) = store.conversations(b, 0, 10).await.unwrap();
    assert_eq!((list[0].read_seq, list[0].unread_count), (3, 0));
}

#[tokio::test]
async fn groups_are_created_grown_shrunk_and_handed_over() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let ids = users(&store, &["a", "b", "c", "d", "e"]).await;
    let (a, b, c, d, e) = (ids[0], ids[1], ids[2], ids[3], ids[4]);

    let group = store
        .create_group(a, "team", &[b, a, c, b], limits(4))
        .await
        .unwrap();
    assert_eq!((group.owner, group.member_count), (a, 3));
    assert_eq!(group.name, "team");
    assert_eq!(store.group_members(group.id).await.unwrap(), vec![a, b, c]);
    assert_eq!(store.group(group.id).await.unwrap(), Some(group.clone()));

    // Refused creations leave nothing behind.
    assert!(matches!(
        store
            .create_group(a, "ghost", &[b, 9_999], limits(10))
            .await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store.create_group(a, "big", &[b, c, d, e], limits(4)).await,
        Err(StoreError::LimitExceeded(_))
    ));
    assert_eq!(
        store.user_groups(a, 0, 100).await.unwrap().0,
        vec![group.clone()]
    );

    // Adding: already-members skipped, duplicates once, limits enforced.
    let (after, added) = store
        .add_members(group.id, &[c, d, d], limits(4))
        .await
        .unwrap();
    assert_eq!(added, vec![d]);
    assert_eq!(after.member_count, 4);
    assert!(matches!(
        store.add_members(group.id, &[e], limits(4)).await,
        Err(StoreError::LimitExceeded(_))
    ));
    assert!(matches!(
        store.add_members(group.id, &[9_999], limits(10)).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store.add_members(group.id + 100, &[e], limits(10)).await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(
        store.group_members(group.id).await.unwrap(),
        vec![a, b, c, d]
    );

    // Removing the owner hands the group to the longest-standing member.
    let (after, removed) = store.remove_members(group.id, &[a, e, a]).await.unwrap();
    assert_eq!(removed, vec![a]);
    assert_eq!((after.owner, after.member_count), (b, 3));
    assert_eq!(store.group(group.id).await.unwrap(), Some(after.clone()));
    assert!(store.user_groups(a, 0, 100).await.unwrap().0.is_empty());
    assert_eq!(
        store.user_groups(d, 0, 100).await.unwrap().0,
        vec![after.clone()]
    );
    assert!(matches!(
        store.remove_members(group.id + 100, &[b]).await,
        Err(StoreError::NotFound)
    ));

    // A removed member may no longer send.
    let g = group_conv(&group);
    let results = store
        .append_batch(vec![new_message(a, g, "late", "x")])
        .await
        .unwrap();
    assert_eq!(results[0], Err(AppendRejection::NotMember));

    // Re-adding puts the user last in joining order.
    let (_, added) = store.add_members(group.id, &[a], limits(10)).await.unwrap();
    assert_eq!(added, vec![a]);
    assert_eq!(
        store.group_members(group.id).await.unwrap(),
        vec![b, c, d, a]
    );

    // Emptying the group keeps the last owner.
    let (after, removed) = store.remove_members(group.id, &[b, c, d, a]).await.unwrap();
    assert_eq!(removed, vec![b, c, d, a]);
    assert_eq!((after.owner, after.member_count), (b, 0));
    assert!(store.group_members(group.id).await.unwrap().is_empty());

    assert_eq!(store.group(group.id + 100).await.unwrap(), None);
    assert_eq!(store.group(u64::MAX).await.unwrap(), None);

    // Several groups are listed for one user.
    store.add_members(group.id, &[d], limits(10)).await.unwrap();
    let second = store
        .create_group(e, "second", &[d], limits(10))
        .await
        .unwrap();
    let mut listed: Vec<u64> = store
        .user_groups(d, 0, 100)
        .await
        .unwrap()
        .0
        .iter()
        .map(|g| g.id)
        .collect();
    listed.sort_unstable();
    assert_eq!(listed, vec![group.id, second.id]);
}

#[tokio::test]
async fn senders_between_lists_distinct_senders_without_notices() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let ids = users(&store, &["a", "b", "c"]).await;
    let group = store
        .create_group(ids[0], "g", &ids[1..], limits(10))
        .await
        .unwrap();
    let g = group_conv(&group);
    store
        .append_batch(vec![
            new_message(0, g, "", "created"),
            new_message(ids[0], g, "1", "x"),
            new_message(ids[1], g, "2", "x"),
            new_message(ids[0], g, "3", "x"),
            new_message(ids[2], g, "4", "x"),
        ])
        .await
        .unwrap();
    let mut senders = store.senders_between(g, 0, 4, 10).await.unwrap();
    senders.sort_unstable();
    assert_eq!(senders, vec![ids[0], ids[1]]);
    let senders = store.senders_between(g, 4, 5, 10).await.unwrap();
    assert_eq!(senders, vec![ids[2]]);
    assert_eq!(store.senders_between(g, 0, 5, 2).await.unwrap().len(), 2);
}

#[tokio::test]
async fn a_failing_job_does_not_fail_its_neighbours() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let ids = users(&store, &["a", "b"]).await;
    let ab = direct(ids[0], ids[1]);
    // Queued back to back, so they usually share one transaction.
    let first = store.create_user("zed", "h");
    let taken = store.create_user("ZED", "h");
    let sent = store.append_batch(vec![new_message(ids[0], ab, "m", "x")]);
    let not_member = store.advance_cursor(ids[0], direct(ids[1], ids[1]), CursorKind::Read, 1);
    assert!(first.await.is_ok());
    assert!(matches!(taken.await, Err(StoreError::UsernameTaken)));
    assert_eq!(stored(&sent.await.unwrap()[0]).seq, 1);
    assert!(matches!(not_member.await, Err(StoreError::NotMember)));
    assert!(store.user_by_name("zed").await.unwrap().is_some());
}

#[tokio::test]
async fn a_full_queue_reports_overload() {
    let dir = tempfile::tempdir().unwrap();
    let options = SqliteOptions {
        write_queue: 1,
        ..SqliteOptions::default()
    };
    let store = SqliteStore::open(dir.path(), options).unwrap();
    let ids = users(&store, &["a", "b"]).await;
    let ab = direct(ids[0], ids[1]);
    // Each job commits (and syncs) on its own far slower than it is queued.
    let pending: Vec<_> = (0..200)
        .map(|i| store.append_batch(vec![new_message(ids[0], ab, &i.to_string(), "x")]))
        .collect();
    let mut overloaded = 0;
    let mut stored_seqs = Vec::new();
    for future in pending {
        match future.await {
            Ok(r) => stored_seqs.push(stored(&r[0]).seq),
            Err(StoreError::Overloaded) => overloaded += 1,
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert!(overloaded > 0);
    // What was accepted is still dense and in order.
    assert_eq!(
        stored_seqs,
        (1..=stored_seqs.len() as u64).collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn everything_survives_close_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c, group, ab, g);
    {
        let store = open(dir.path());
        let ids = users(&store, &["alice", "bob", "carol"]).await;
        (a, b, c) = (ids[0], ids[1], ids[2]);
        ab = direct(a, b);
        group = store
            .create_group(a, "crew", &[b, c], limits(10))
            .await
            .unwrap();
        g = group_conv(&group);
        send_n(&store, a, ab, "d", 3).await;
        send_n(&store, c, g, "g", 2).await;
        store
            .advance_cursor(b, ab, CursorKind::Read, 2)
            .await
            .unwrap();
        store.remove_members(group.id, &[a]).await.unwrap();
        store.close();
        assert!(
            !dir.path().join("im.sqlite3-wal").exists()
                || std::fs::metadata(dir.path().join("im.sqlite3-wal"))
                    .unwrap()
                    .len()
                    == 0
        );
    }
    let store = open(dir.path());
    let bob = store
        .user_by_name("BOB")
        .await
        .unwrap()
        .expect("bob survives");
    assert_eq!((bob.id, bob.password_hash.as_str()), (b, "hash"));
    assert!(matches!(
        store.create_user("alice", "x").await,
        Err(StoreError::UsernameTaken)
    ));
    let crew = store
        .group(group.id)
        .await
        .unwrap()
        .expect("group survives");
    assert_eq!((crew.owner, crew.member_count), (b, 2));
    assert_eq!(store.group_members(group.id).await.unwrap(), vec![b, c]);

    let page = store.history(b, ab, 0, 10).await.unwrap();
    assert_eq!(
        page.messages.iter().map(body).collect::<Vec<_>>(),
        vec!["d 0", "d 1", "d 2"]
    );
    let (list, _) = store.conversations(b, 0, 10).await.unwrap();
    assert_eq!((list[0].read_seq, list[0].unread_count), (2, 1));

    // Sequencing and deduplication pick up where they were.
    let results = store
        .append_batch(vec![
            new_message(a, ab, "d-0", "resend"),
            new_message(b, ab, "new", "fresh"),
        ])
        .await
        .unwrap();
    assert!(matches!(
        results[0],
        Ok(AppendOutcome::Duplicate(Ack { seq: 1, .. }))
    ));
    assert_eq!(stored(&results[1]).seq, 4);
    let more = send_n(&store, b, g, "g-after", 1).await;
    assert_eq!(more[0].seq, 3);

    // A fresh user gets a fresh id.
    let dave = store.create_user("dave", "h").await.unwrap();
    assert!(![a, b, c].contains(&dave));
}

#[tokio::test]
async fn first_attempts_are_recognised_in_the_window_and_resends_at_any_time() {
    let dir = tempfile::tempdir().unwrap();
    // Each generation holds one send: a first attempt is recognised while
    // its original is among the last two.
    let options = SqliteOptions {
        dedup_capacity: 2,
        ..SqliteOptions::default()
    };
    let store = SqliteStore::open(dir.path(), options.clone()).unwrap();
    let ids = users(&store, &["a", "b", "c"]).await;
    let ab = direct(ids[0], ids[1]);
    let send = |id: &str, resend: bool| {
        let store = &store;
        let mut m = new_message(ids[0], ab, id, id);
        m.resend = resend;
        async move { store.append_batch(vec![m]).await.unwrap().remove(0) }
    };
    assert_eq!(stored(&send("m1", false).await).seq, 1);
    assert_eq!(stored(&send("m2", false).await).seq, 2);
    assert!(matches!(
        send("m2", false).await,
        Ok(AppendOutcome::Duplicate(Ack { seq: 2, .. }))
    ));
    assert_eq!(stored(&send("m3", false).await).seq, 3);
    assert_eq!(stored(&send("m4", false).await).seq, 4);
    // "m1" has left the window: flagged as a resend it is still found...
    assert!(matches!(
        send("m1", true).await,
        Ok(AppendOutcome::Duplicate(Ack { seq: 1, .. }))
    ));
    // ...while an unflagged repeat this late counts as a new message.
    assert_eq!(stored(&send("m1", false).await).seq, 5);
    // A resend of something never stored is stored once.
    assert_eq!(stored(&send("m9", true).await).seq, 6);
    assert!(matches!(
        send("m9", true).await,
        Ok(AppendOutcome::Duplicate(Ack { seq: 6, .. }))
    ));
    // The same id in another conversation is another message.
    let ac = direct(ids[0], ids[2]);
    let mut other = new_message(ids[0], ac, "m2", "elsewhere");
    other.resend = true;
    let results = store.append_batch(vec![other]).await.unwrap();
    assert_eq!(stored(&results[0]).seq, 1);
    store.close();

    // Reopened, the window is refilled from the newest rows, and the index
    // still finds the oldest.
    let store = SqliteStore::open(dir.path(), options).unwrap();
    let mut again = new_message(ids[0], ab, "m9", "again");
    let mut oldest = new_message(ids[0], ab, "m2", "again");
    again.resend = false;
    oldest.resend = true;
    let results = store.append_batch(vec![again, oldest]).await.unwrap();
    assert!(matches!(
        results[0],
        Ok(AppendOutcome::Duplicate(Ack { seq: 6, .. }))
    ));
    assert!(matches!(
        results[1],
        Ok(AppendOutcome::Duplicate(Ack { seq: 2, .. }))
    ));
}

#[tokio::test]
async fn a_closed_store_refuses_work() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let ids = users(&store, &["a", "b"]).await;
    let ab = direct(ids[0], ids[1]);
    // Queued before close: finished, not dropped.
    let queued = store.append_batch(vec![new_message(ids[0], ab, "m", "x")]);
    store.close();
    assert_eq!(stored(&queued.await.unwrap()[0]).seq, 1);
    store.close(); // idempotent

    assert!(matches!(
        store.create_user("c", "h").await,
        Err(StoreError::Closed)
    ));
    assert!(matches!(
        store
            .append_batch(vec![new_message(ids[0], ab, "n", "x")])
            .await,
        Err(StoreError::Closed)
    ));
    assert!(matches!(
        store.user_by_name("a").await,
        Err(StoreError::Closed)
    ));
    assert!(matches!(
        store.history(ids[0], ab, 0, 10).await,
        Err(StoreError::Closed)
    ));
    assert!(matches!(
        store.advance_cursor(ids[1], ab, CursorKind::Read, 1).await,
        Err(StoreError::Closed)
    ));
}

#[tokio::test]
async fn migrations_are_recorded_and_rerun_harmlessly() {
    let dir = tempfile::tempdir().unwrap();
    open(dir.path()).close();
    open(dir.path()).close();
    let conn = rusqlite::Connection::open(dir.path().join(super::DB_FILE)).unwrap();
    let version: usize = conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'schema_version'",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(version, schema::latest_version());
    // A database from a newer server is refused rather than misread.
    conn.execute(
        "UPDATE meta SET value = value + 1 WHERE key = 'schema_version'",
        [],
    )
    .unwrap();
    drop(conn);
    assert!(matches!(
        SqliteStore::open(dir.path(), SqliteOptions::default()),
        Err(StoreError::Backend(_))
    ));
}

/// Not a benchmark: prints the append rate on this machine for a rough
/// sense of the group-commit path (run with `--nocapture` to see it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_throughput() {
    const TOTAL: usize = 50_000;
    const BATCH: usize = 500;
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(dir.path()));
    let ids = users(&*store, &["a", "b", "c", "d"]).await;
    let conversations = [direct(ids[0], ids[1]), direct(ids[2], ids[3])];
    let started = std::time::Instant::now();
    let mut pending = Vec::new();
    for b in 0..TOTAL / BATCH {
        let conversation = conversations[b % 2];
        let sender = if b % 2 == 0 { ids[0] } else { ids[2] };
        let batch = (0..BATCH)
            .map(|i| new_message(sender, conversation, &format!("{b}-{i}"), "hello there"))
            .collect();
        pending.push(store.append_batch(batch));
        // Keep a bounded window in flight, like many sessions would.
        if pending.len() == 8 {
            for result in pending.remove(0).await.unwrap() {
                stored(&result);
            }
        }
    }
    for future in pending {
        for result in future.await.unwrap() {
            stored(&result);
        }
    }
    let elapsed = started.elapsed();
    println!(
        "appended {TOTAL} messages in {elapsed:?}: {:.0} messages/s",
        TOTAL as f64 / elapsed.as_secs_f64()
    );
    let page = store.history(ids[0], conversations[0], 0, 1).await.unwrap();
    assert_eq!(page.messages[0].seq, (TOTAL / 2) as u64);

    // Single-message sends, as from many sessions at once: group commit
    // shares each fsync among whatever is queued.
    const SINGLES: usize = 10_000;
    let started = std::time::Instant::now();
    let mut pending = std::collections::VecDeque::new();
    for i in 0..SINGLES {
        let message = new_message(ids[1], conversations[0], &format!("s{i}"), "hi");
        pending.push_back(store.append_batch(vec![message]));
        if pending.len() == 1_000 {
            if let Some(future) = pending.pop_front() {
                stored(&future.await.unwrap()[0]);
            }
        }
    }
    for future in pending {
        stored(&future.await.unwrap()[0]);
    }
    let elapsed = started.elapsed();
    println!(
        "appended {SINGLES} single-message batches in {elapsed:?}: {:.0} messages/s",
        SINGLES as f64 / elapsed.as_secs_f64()
    );
}

#[tokio::test]
async fn late_resends_are_looked_up_within_a_budget_per_sender() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let ids = users(&store, &["a", "b"]).await;
    let ab = direct(ids[0], ids[1]);
    let resend = |id: String, sender: UserId| {
        let mut m = new_message(sender, ab, &id, "late");
        m.resend = true;
        m
    };
    // Resends of ids the window does not know each scan the conversation:
    // one sender gets 120 a minute, then has to wait.
    let batch: Vec<NewMessage> = (0..121).map(|i| resend(format!("r{i}"), ids[0])).collect();
    let results = store.append_batch(batch).await.unwrap();
    assert!(
        results[..120]
            .iter()
            .all(|r| matches!(r, Ok(AppendOutcome::Stored(_))))
    );
    assert_eq!(results[120], Err(AppendRejection::DedupBehind));
    // Repeats the window knows cost nothing and are still answered, and
    // another sender has its own budget.
    let again = store
        .append_batch(vec![
            resend("r5".into(), ids[0]),
            resend("x".into(), ids[1]),
        ])
        .await
        .unwrap();
    assert!(matches!(
        again[0],
        Ok(AppendOutcome::Duplicate(Ack { seq: 6, .. }))
    ));
    assert!(matches!(again[1], Ok(AppendOutcome::Stored(_))));
}

#[tokio::test]
async fn sessions_end_by_scope_and_by_the_device_limit_and_touches_only_move_forward() {
    use crate::store::{NewSession, SessionScope, SessionTouch};
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let ids = users(&store, &["alice", "bob"]).await;
    let (alice, bob) = (ids[0], ids[1]);
    let new = |user: UserId, name: &str, now_ms: i64| NewSession {
        user,
        device_name: name.into(),
        address: "10.0.0.1".into(),
        now_ms,
        max_live: 2,
        live_since_ms: 0,
    };
    let (a1, ended) = store
        .create_session(new(alice, "one", 1_000))
        .await
        .unwrap();
    assert!(ended.is_empty());
    let (a2, _) = store
        .create_session(new(alice, "two", 2_000))
        .await
        .unwrap();
    let (b1, _) = store.create_session(new(bob, "bob", 2_500)).await.unwrap();
    // The least recently used goes: a1, unless it was seen since.
    store
        .touch_sessions(vec![SessionTouch {
            id: a1,
            at_ms: 3_000,
            address: Some("10.0.0.9".into()),
        }])
        .await
        .unwrap();
    let (a3, ended) = store
        .create_session(new(alice, "three", 4_000))
        .await
        .unwrap();
    assert_eq!(ended, [a2]);
    let listed = store.sessions(alice, 0).await.unwrap();
    let seen: Vec<(u64, &str, &str, i64)> = listed
        .iter()
        .map(|s| {
            (
                s.id,
                s.device_name.as_str(),
                s.address.as_str(),
                s.last_seen_ms,
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            (a3, "three", "10.0.0.1", 4_000),
            (a1, "one", "10.0.0.9", 3_000)
        ]
    );
    // An older touch does not move it back; expired sessions are not live.
    store
        .touch_sessions(vec![SessionTouch {
            id: a1,
            at_ms: 10,
            address: None,
        }])
        .await
        .unwrap();
    assert_eq!(store.sessions(alice, 3_500).await.unwrap().len(), 1);

    assert!(matches!(
        store
            .end_sessions(alice, SessionScope::One(b1), 5_000)
            .await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(
        store
            .end_sessions(alice, SessionScope::AllBut(a3), 5_000)
            .await
            .unwrap(),
        [a1]
    );
    assert!(store.session_ended(a1).await.unwrap());
    assert!(!store.session_ended(a3).await.unwrap());
    assert!(
        store.session_ended(999_999).await.unwrap(),
        "unknown counts as ended"
    );
    assert_eq!(
        store
            .end_sessions(alice, SessionScope::All, 6_000)
            .await
            .unwrap(),
        [a3]
    );
    let ends = store.ended_since(5_000, 10).await.unwrap();
    assert_eq!(ends, [(a3, 6_000), (a1, 5_000)]);
    assert_eq!(store.ended_since(5_500, 10).await.unwrap(), [(a3, 6_000)]);
    assert!(!store.session_ended(b1).await.unwrap());

    store.set_password(alice, "new hash").await.unwrap();
    let record = store.user_by_name("alice").await.unwrap().unwrap();
    assert_eq!(record.password_hash, "new hash");
    assert!(matches!(
        store.set_password(12_345, "x").await,
        Err(StoreError::NotFound)
    ));
}

/// Archive mode moves the expired messages, whole, to `messages_archive`;
/// a store emptied by retention never gives a removed message's id again,
/// even after a restart.
#[tokio::test]
async fn archived_messages_keep_their_rows_and_ids_are_never_reused() {
    let dir = tempfile::tempdir().unwrap();
    let (a, ab, old_ids);
    {
        let store = open(dir.path());
        let ids = users(&store, &["alice", "bob"]).await;
        a = ids[0];
        ab = direct(a, ids[1]);
        old_ids = send_n(&store, a, ab, "old", 3)
            .await
            .iter()
            .map(|m| m.message_id)
            .collect::<Vec<_>>();
        let removed = store
            .expire_before(im_proto::now_ms() + 1, RetentionMode::Archive)
            .await
            .unwrap();
        assert_eq!(removed, 3);
        store.close();
    }
    let conn = rusqlite::Connection::open(dir.path().join(super::DB_FILE)).unwrap();
    let archived: Vec<(u64, u64, String)> = conn
        .prepare("SELECT id, seq, client_msg_id FROM messages_archive ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        archived.iter().map(|r| r.0).collect::<Vec<_>>(),
        old_ids,
        "archived whole, under their ids"
    );
    assert_eq!(archived[0].1, 1);
    let left: u64 = conn
        .query_row("SELECT COUNT(*) FROM messages", [], |r| r.get(0))
        .unwrap();
    assert_eq!(left, 0);
    drop(conn);

    let store = open(dir.path());
    let next = send_n(&store, a, ab, "new", 1).await;
    assert_eq!(next[0].seq, 4);
    assert!(
        next[0].message_id > *old_ids.iter().max().unwrap(),
        "an id of a removed message was given again"
    );
    let page = store.sync(a, &[(ab, 0)], 10).await.unwrap();
    assert_eq!(page.expired, [(ab.raw(), 3)]);
    assert_eq!(seqs(&page.messages), [4]);
}
