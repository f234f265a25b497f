//! Resumption on the same node (section 6).

use crate::harness::*;
use gateway_shared::protocol::Event;
use gateway_shared::Client;
use serde_json::json;

/// Drops `peer`'s TCP connection and waits until the node has noticed.
async fn drop_connection(node: &TestNode, peer: Peer) -> (String, String, u64, u64) {
    let info = (
        peer.token.clone(),
        peer.user_id.clone(),
        peer.session_id(),
        peer.last_s,
    );
    peer.client.abort();
    // The node counts the session as detached once it noticed the drop.
    loop {
        let (_, metrics) = http_get(&node.http("/metrics")).await;
        if metrics.lines().any(|l| {
            l.starts_with("gateway_sessions{") && l.contains("detached") && !l.ends_with(" 0")
        }) {
            break;
        }
        tokio::task::yield_now().await;
    }
    info
}

#[tokio::test]
async fn resume_replays_exactly_the_missed_dispatches_in_order() {
    let node = TestNode::start().await;
    let room = fresh_channel("resume");
    let mut alice = Peer::join(&node, "alice").await;
    let mut bob = Peer::join(&node, "bob").await;
    alice.create_and_move(&room).await;
    bob.move_to(&room).await;
    alice.say("before").await;
    bob.dispatch(Event::MessageCreate).await;

    let (token, user_id, session_id, last_s) = drop_connection(&node, bob).await;
    for i in 0..5 {
        alice.say(&format!("missed {i}")).await;
    }

    let (mut client, _) = Client::connect_hello(&node.url()).await.unwrap();
    let ready = client
        .present(&token, Some((session_id, Some(last_s))))
        .await
        .unwrap();
    assert!(ready.resumed);
    assert_eq!(ready.session_id, session_id);
    assert_eq!(ready.channel, room);
    let mut bob = Peer {
        client,
        ready,
        token,
        user_id,
        last_s,
    };
    for i in 0..5 {
        let msg = bob.next().await.unwrap();
        assert!(msg.is_dispatch(Event::MessageCreate), "{}", msg.text);
        assert_eq!(msg.cnf["content"], format!("missed {i}"));
    }
    // Live traffic continues the numbering.
    alice.say("live").await;
    assert_eq!(
        bob.dispatch(Event::MessageCreate).await.cnf["content"],
        "live"
    );
}

#[tokio::test]
async fn resume_without_s_replays_everything_held() {
    let node = TestNode::start().await;
    let peer = Peer::join(&node, "carol").await;
    let mut other = Peer::join(&node, "dave").await;
    other.say("one").await;
    let (token, _, session_id, _) = drop_connection(&node, peer).await;
    let (mut client, _) = Client::connect_hello(&node.url()).await.unwrap();
    assert!(
        client
            .present(&token, Some((session_id, None)))
            .await
            .unwrap()
            .resumed
    );
    let first = client.next_message(WAIT).await.unwrap();
    assert_eq!(first.s, Some(1), "{}", first.text);
}

#[tokio::test]
async fn resume_of_an_unknown_or_ended_session_starts_a_new_one() {
    let node = TestNode::start().await;
    let (token, _) = user_token("erin");
    let (mut client, _) = Client::connect_hello(&node.url()).await.unwrap();
    let ready = client
        .present(&token, Some((987_654_321, Some(3))))
        .await
        .unwrap();
    assert!(!ready.resumed);
    assert_ne!(ready.session_id, 987_654_321);

    // A normal close (1000) ends the session: no resume.
    let old = ready.session_id;
    client.close(1000).await.unwrap();
    assert_eq!(client.closed().await.unwrap(), Some(1000));
    let (mut client, _) = Client::connect_hello(&node.url()).await.unwrap();
    let ready = client.present(&token, Some((old, Some(0)))).await.unwrap();
    assert!(!ready.resumed);
    assert_ne!(ready.session_id, old);
}

#[tokio::test]
async fn resume_past_the_replay_buffer_starts_a_new_session() {
    let node = TestNode::with(|c| {
        c.replay_buffer = 5;
        c.outbound_limit = 5;
    })
    .await;
    let room = fresh_channel("lost");
    let mut alice = Peer::join(&node, "alice").await;
    let mut bob = Peer::join(&node, "bob").await;
    alice.create_and_move(&room).await;
    bob.move_to(&room).await;
    let (token, _, session_id, last_s) = drop_connection(&node, bob).await;
    // A session holds the replay buffer before what it had not written,
    // and up to one past the outbound limit after: 5 + 6 here.
    for i in 0..12 {
        alice.say(&format!("m{i}")).await;
    }
    let (mut client, _) = Client::connect_hello(&node.url()).await.unwrap();
    let ready = client
        .present(&token, Some((session_id, Some(last_s))))
        .await
        .unwrap();
    assert!(!ready.resumed, "events past the replay window were lost");
    assert_ne!(ready.session_id, session_id);
    // The old session was ended: it left the room.
    let left = alice.dispatch(Event::RoomUserRemove).await.cnf;
    assert_eq!(left["session_id"], session_id);
}

#[tokio::test]
async fn resume_ahead_of_what_the_session_sent_starts_a_new_session() {
    let node = TestNode::start().await;
    let room = fresh_channel("ahead");
    let mut alice = Peer::join(&node, "alice").await;
    let mut bob = Peer::join(&node, "bob").await;
    alice.create_and_move(&room).await;
    bob.move_to(&room).await;
    let (token, _, session_id, last_s) = drop_connection(&node, bob).await;
    resume_ahead_is_a_new_session(&node.url(), &token, (session_id, last_s + 100), &mut alice)
        .await;
}

/// Presents `(session_id, s)` at `url` with an `s` past what the session
/// sent: READY of a new session, and the old one leaves its channel at
/// once (`watcher`, a member there, sees it go).
pub async fn resume_ahead_is_a_new_session(
    url: &str,
    token: &str,
    (session_id, s): (u64, u64),
    watcher: &mut Peer,
) {
    let (mut client, _) = Client::connect_hello(url).await.unwrap();
    let ready = client
        .present(token, Some((session_id, Some(s))))
        .await
        .unwrap();
    assert!(
        !ready.resumed,
        "a client ahead of its session is not resumed"
    );
    assert_ne!(ready.session_id, session_id);
    let left = watcher.dispatch(Event::RoomUserRemove).await.cnf;
    assert_eq!(left["session_id"], session_id);
}

#[tokio::test]
async fn resume_while_the_old_connection_is_open_closes_it_with_4017() {
    let node = TestNode::start().await;
    let mut old = Peer::join(&node, "frank").await;
    let (mut client, _) = Client::connect_hello(&node.url()).await.unwrap();
    let ready = client
        .present(&old.token, Some((old.session_id(), Some(0))))
        .await
        .unwrap();
    assert!(ready.resumed);
    let err = old.error().await;
    assert_eq!((err.c, err.d), (4017, true));
    assert_eq!(old.closed().await, Some(4017));
    // The new connection carries on with the session.
    client
        .execute("CHANNEL_MOVE", json!({"channel": "general"}), None)
        .await
        .unwrap();
    client
        .wait_for(|m| m.is_dispatch(Event::ChannelMove))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_session_expires_after_the_resume_window() {
    let node = TestNode::with(|c| c.resume_window_s = 1).await;
    let room = fresh_channel("expire");
    let mut alice = Peer::join(&node, "alice").await;
    let mut bob = Peer::join(&node, "bob").await;
    alice.create_and_move(&room).await;
    bob.move_to(&room).await;
    let (token, _, session_id, last_s) = drop_connection(&node, bob).await;
    // The window runs out: the session ends and its channel is told.
    let left = alice.dispatch(Event::RoomUserRemove).await.cnf;
    assert_eq!(left["session_id"], session_id);
    let (mut client, _) = Client::connect_hello(&node.url()).await.unwrap();
    assert!(
        !client
            .present(&token, Some((session_id, Some(last_s))))
            .await
            .unwrap()
            .resumed
    );
}

/// A resume that cannot be honoured (its `s` is ahead of a session live on
/// another connection) followed by a new session that is refused (4008:
/// over the user's budget) leaves the connection unpresented: its PRESENT
/// deadline runs on (4003, not the heartbeat timeout of a presented one).
#[tokio::test]
async fn a_failed_resume_leaves_the_connection_unpresented() {
    let node = TestNode::with(|c| {
        c.session_starts_per_user = 1;
        c.hb_int_ms = 1000;
    })
    .await;
    let alice = Peer::join(&node, "alice").await;
    let (mut other, _) = Client::connect_hello(&node.url()).await.unwrap();
    let ahead = Some((alice.session_id(), Some(alice.last_s + 100)));
    match other.present(&alice.token, ahead).await {
        Err(gateway_shared::ClientError::Gateway(e)) => assert_eq!(e.c, 4008),
        other => panic!("expected 4008, got {other:?}"),
    }
    assert_eq!(other.closed().await.unwrap(), Some(4003));
}

/// The same failed resume, then a normal close (1000) of that connection:
/// it ends no session, and the one live on the other connection goes on.
#[tokio::test]
async fn a_failed_resume_then_a_normal_close_ends_nobodys_session() {
    let node = TestNode::with(|c| c.session_starts_per_user = 1).await;
    let room = fresh_channel("kept");
    let mut alice = Peer::join(&node, "alice").await;
    let mut bob = Peer::join(&node, "bob").await;
    alice.create_and_move(&room).await;
    bob.move_to(&room).await;
    let (mut other, _) = Client::connect_hello(&node.url()).await.unwrap();
    let ahead = Some((alice.session_id(), Some(alice.last_s + 100)));
    assert!(other.present(&alice.token, ahead).await.is_err());
    other.close(1000).await.unwrap();
    assert_eq!(other.closed().await.unwrap(), Some(1000));
    // The node is done with that connection (and whatever its close ends).
    tokio::time::timeout(WAIT, async {
        while metric(node.addr, "gateway_connections").await != 2 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the closed connection is gone");
    let sent = bob.say("still here?").await;
    assert_eq!(alice.dispatch(Event::MessageCreate).await.cnf, sent);
}
