//! Every client event and the dispatches it causes.

use crate::harness::*;
use crate::rawws::{self, RawWs};
use gateway_shared::protocol::Event;
use serde_json::json;

#[tokio::test]
async fn message_to_channel_reaches_every_member_and_acknowledges_the_sender() {
    let node = TestNode::start().await;
    let channel = fresh_channel("msg");
    let mut alice = Peer::join(&node, "alice").await;
    let mut bob = Peer::join(&node, "bob").await;
    alice.create_and_move(&channel).await;
    bob.move_to(&channel).await;

    alice
        .execute_s(
            "MESSAGE_CREATE",
            json!({"content": "hello", "nonce": "n1"}),
            7,
        )
        .await;
    let ack = alice.dispatch(Event::MessageCreate).await.cnf;
    let got = bob.dispatch(Event::MessageCreate).await.cnf;
    assert_eq!(ack, got);
    assert_eq!(got["channel"], channel.as_str());
    assert_eq!(got["author"], json!({"id": alice.user_id, "name": "alice"}));
    assert_eq!(got["content"], "hello");
    assert_eq!(got["nonce"], "n1");
    assert!(got["ts"].as_u64().unwrap() > 1_700_000_000_000);
    let first: u64 = got["id"].as_str().unwrap().parse().unwrap();

    let second = bob.say("again").await;
    let second: u64 = second["id"].as_str().unwrap().parse().unwrap();
    assert!(second > first, "a later message has a larger id");
    assert!(alice
        .dispatch(Event::MessageCreate)
        .await
        .cnf
        .get("nonce")
        .is_none());
}

#[tokio::test]
async fn content_is_counted_in_code_points() {
    let node = TestNode::start().await;
    let mut alice = Peer::join(&node, "alice").await;
    alice.create_and_move(&fresh_channel("emoji")).await;
    let content = "😀".repeat(1000); // 1000 code points, 4000 bytes
    assert_eq!(alice.say(&content).await["content"], content.as_str());
}

#[tokio::test]
async fn messages_are_deleted_by_their_author_or_an_admin() {
    let node = TestNode::start().await;
    let channel = fresh_channel("del");
    let mut alice = Peer::join(&node, "alice").await;
    let mut bob = Peer::join(&node, "bob").await;
    let mut admin = Peer::admin(&node, "root").await;
    alice.create_and_move(&channel).await;
    bob.move_to(&channel).await;
    admin.move_to(&channel).await;

    let id = alice.say("one").await["id"].clone();
    bob.execute_s("MESSAGE_DELETE", json!({"id": id}), 3).await;
    let err = bob.error().await;
    assert_eq!(
        (err.c, err.d, err.s, err.t.as_deref()),
        (4012, false, Some(3), Some("MESSAGE_DELETE"))
    );

    alice.execute("MESSAGE_DELETE", json!({"id": id})).await;
    let deleted = bob.dispatch(Event::MessageDelete).await.cnf;
    assert_eq!(deleted, json!({"id": id, "channel": channel}));

    let id2 = alice.say("two").await["id"].clone();
    admin.execute("MESSAGE_DELETE", json!({"id": id2})).await;
    assert_eq!(alice.dispatch(Event::MessageDelete).await.cnf["id"], id2);

    // Deleted messages are left out of the history.
    let moved = bob.move_to(&channel).await;
    assert_eq!(moved["history"], json!([]));
}

#[tokio::test]
async fn typing_reaches_the_others_once_per_three_seconds() {
    let node = TestNode::start().await;
    let channel = fresh_channel("typing");
    let mut alice = Peer::join(&node, "alice").await;
    let mut bob = Peer::join(&node, "bob").await;
    alice.create_and_move(&channel).await;
    bob.move_to(&channel).await;

    alice.execute("START_TYPING", json!({})).await;
    alice.execute("START_TYPING", json!({})).await;
    alice
        .execute("MESSAGE_CREATE", json!({"content": "marker"}))
        .await;
    // The sender never gets its own typing.
    let own = alice
        .wait_for(|m| m.is_dispatch(Event::MessageCreate) || m.is_dispatch(Event::StartTyping))
        .await;
    assert!(own.is_dispatch(Event::MessageCreate), "{}", own.text);
    let typing = bob
        .wait_for(|m| m.t.as_deref() != Some("ROOM_USER_ADD"))
        .await;
    assert!(typing.is_dispatch(Event::StartTyping), "{}", typing.text);
    assert_eq!(typing.cnf["channel"], channel.as_str());
    assert_eq!(typing.cnf["user"]["id"], alice.user_id.as_str());
    // The second START_TYPING was coalesced: the marker comes next.
    let next = bob.next().await.unwrap();
    assert!(next.is_dispatch(Event::MessageCreate), "{}", next.text);
}

#[tokio::test]
async fn channel_add_is_dispatched_to_every_session() {
    let node = TestNode::start().await;
    let mut alice = Peer::join(&node, "alice").await;
    let mut bob = Peer::join(&node, "bob").await;
    bob.create_and_move(&fresh_channel("elsewhere")).await;
    let name = fresh_channel("new");
    alice.execute("CHANNEL_ADD", json!({"name": name})).await;
    let creator = alice.user_id.clone();
    for peer in [&mut alice, &mut bob] {
        let add = peer
            .wait_for(|m| m.is_dispatch(Event::ChannelAdd) && m.cnf["name"] == name.as_str())
            .await;
        assert_eq!(add.cnf["topic"], "");
        assert_eq!(add.cnf["created_by"]["id"], creator.as_str());
    }
    let (_c, ready) = gateway_shared::Client::connect_present(&node.url(), &user_token("late").0)
        .await
        .unwrap();
    assert!(ready.channels.contains(&name));
}

#[tokio::test]
async fn channel_move_reports_members_history_and_presence() {
    let node = TestNode::start().await;
    let room = fresh_channel("room");
    let mut alice = Peer::join(&node, "alice").await;
    let mut bob = Peer::join(&node, "bob").await;
    alice
        .execute("CHANNEL_ADD", json!({"name": room, "topic": "t"}))
        .await;
    assert_eq!(alice.dispatch(Event::ChannelAdd).await.cnf["topic"], "t");
    let moved = alice.move_to(&room).await;
    assert_eq!(moved["channel"], room.as_str());
    assert_eq!(moved["from"], "general");
    assert_eq!(moved["member_count"], 1);
    for i in 0..55 {
        alice.say(&format!("m{i}")).await;
    }

    bob.execute("CHANNEL_MOVE", json!({"channel": room})).await;
    let moved = bob.dispatch(Event::ChannelMove).await.cnf;
    assert_eq!(moved["member_count"], 2);
    let members: Vec<_> = moved["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(members, [alice.user_id.clone(), bob.user_id.clone()]);
    let history = moved["history"].as_array().unwrap();
    assert_eq!(history.len(), 50);
    assert_eq!(history[0]["content"], "m5");
    assert_eq!(history[49]["content"], "m54");

    let add = alice.dispatch(Event::RoomUserAdd).await.cnf;
    assert_eq!(add["channel"], room.as_str());
    assert_eq!(add["user"]["id"], bob.user_id.as_str());
    assert_eq!(add["session_id"], bob.session_id());

    // Moving to the current channel still answers, with no presence change.
    let again = bob.move_to(&room).await;
    assert_eq!(
        (again["channel"].clone(), again["from"].clone()),
        (json!(room), json!(room))
    );

    bob.move_to("general").await;
    let remove = alice.dispatch(Event::RoomUserRemove).await.cnf;
    assert_eq!(remove["user"]["id"], bob.user_id.as_str());
    assert_eq!(remove["session_id"], bob.session_id());
}

#[tokio::test]
async fn presence_is_not_dispatched_in_channels_over_the_threshold() {
    let node = TestNode::with(|c| c.presence_threshold = 2).await;
    let room = fresh_channel("big");
    let mut a = Peer::join(&node, "a").await;
    let mut b = Peer::join(&node, "b").await;
    let mut c = Peer::join(&node, "c").await;
    a.create_and_move(&room).await;
    b.move_to(&room).await;
    assert_eq!(
        a.dispatch(Event::RoomUserAdd).await.cnf["user"]["id"],
        b.user_id.as_str()
    );
    let moved = c.move_to(&room).await;
    assert_eq!(moved["member_count"], 3);
    a.say("after").await;
    // a saw no ROOM_USER_ADD for c: the next dispatch after b's join is its own message.
    b.wait_for(|m| m.is_dispatch(Event::MessageCreate)).await;
}

#[tokio::test]
async fn the_movers_channel_move_comes_before_any_event_of_the_new_channel() {
    let node = TestNode::with(|c| c.rate_limit_count = 100_000).await;
    let room = fresh_channel("order");
    let mut talker = Peer::join(&node, "talker").await;
    talker.create_and_move(&room).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let chatter = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                talker
                    .execute("MESSAGE_CREATE", json!({"content": format!("c{i}")}))
                    .await;
                i += 1;
                tokio::task::yield_now().await;
            }
        })
    };
    let mut mover = Peer::join(&node, "mover").await;
    mover
        .execute("CHANNEL_MOVE", json!({"channel": room}))
        .await;
    let first = mover
        .wait_for(|m| m.cnf.get("channel").and_then(|c| c.as_str()) == Some(room.as_str()))
        .await;
    assert!(first.is_dispatch(Event::ChannelMove), "{}", first.text);
    let newest = |history: &serde_json::Value| {
        history
            .as_array()
            .unwrap()
            .last()
            .map(|m| m["id"].as_str().unwrap().parse::<u64>().unwrap())
    };
    let last_in_history = newest(&first.cnf["history"]);
    // The first message after the snapshot is newer than all of its history.
    let next = mover.dispatch(Event::MessageCreate).await.cnf;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let next_id: u64 = next["id"].as_str().unwrap().parse().unwrap();
    assert!(last_in_history.is_none_or(|h| next_id > h));
    chatter.await.unwrap();
}

#[tokio::test]
async fn bans_close_the_users_sessions_and_refuse_present_until_removed() {
    let node = TestNode::start().await;
    let mut admin = Peer::admin(&node, "root").await;
    let mut target = Peer::join(&node, "troll").await;
    let mut watcher = Peer::join(&node, "watcher").await;

    admin
        .execute(
            "SYSTEM_BAN_ADD",
            json!({"user_id": target.user_id, "reason": "spam"}),
        )
        .await;
    let ack = admin.dispatch(Event::SystemBanAdd).await.cnf;
    assert_eq!(
        ack,
        json!({"user_id": target.user_id, "reason": "spam", "until": null})
    );
    let err = target.error().await;
    assert_eq!((err.c, err.d), (4015, true));
    assert_eq!(target.closed().await, Some(4015));
    let left = watcher.dispatch(Event::RoomUserRemove).await.cnf;
    assert_eq!(left["user"]["id"], target.user_id.as_str());

    let mut again = gateway_shared::Client::connect_hello(&node.url())
        .await
        .unwrap()
        .0;
    let err = again.present(&target.token, None).await.unwrap_err();
    assert!(
        matches!(err, gateway_shared::ClientError::Gateway(ref e) if e.c == 4015 && e.d),
        "{err:?}"
    );
    assert_eq!(again.closed().await.unwrap(), Some(4015));

    admin
        .execute("SYSTEM_BAN_REMOVE", json!({"user_id": target.user_id}))
        .await;
    assert_eq!(
        admin.dispatch(Event::SystemBanRemove).await.cnf,
        json!({"user_id": target.user_id})
    );
    Peer::present(&node.url(), target.token.clone(), target.user_id.clone()).await;

    // Removing a ban that does not exist is acknowledged all the same.
    admin
        .execute("SYSTEM_BAN_REMOVE", json!({"user_id": "nobody"}))
        .await;
    assert_eq!(
        admin.dispatch(Event::SystemBanRemove).await.cnf["user_id"],
        "nobody"
    );
}

#[tokio::test]
async fn a_timed_ban_reports_its_end() {
    let node = TestNode::start().await;
    let mut admin = Peer::admin(&node, "root").await;
    admin
        .execute(
            "SYSTEM_BAN_ADD",
            json!({"user_id": "someone", "duration_s": 60}),
        )
        .await;
    let ack = admin.dispatch(Event::SystemBanAdd).await.cnf;
    let until = ack["until"].as_u64().unwrap();
    let now = gateway_shared::token::unix_now_s() * 1000;
    assert!(until > now && until <= now + 61_000, "{ack}");
    assert_eq!(ack["reason"], "");
}

#[tokio::test]
async fn a_normal_close_ends_the_session_for_the_others() {
    let node = TestNode::start().await;
    let room = fresh_channel("bye");
    let mut alice = Peer::join(&node, "alice").await;
    let mut bob = Peer::join(&node, "bob").await;
    alice.create_and_move(&room).await;
    bob.move_to(&room).await;
    bob.client.close(1000).await.unwrap();
    let left = alice.dispatch(Event::RoomUserRemove).await.cnf;
    assert_eq!(left["session_id"], bob.session_id());
}

#[tokio::test]
async fn with_direct_writes_every_member_gets_every_message_once_in_order_and_can_resume() {
    every_member_gets_every_message_once_in_order_and_can_resume(true).await;
}

#[tokio::test]
async fn with_only_the_writer_tasks_every_member_gets_every_message_once_in_order_and_can_resume() {
    every_member_gets_every_message_once_in_order_and_can_resume(false).await;
}

/// A member whose socket fills in the middle of a frame the fan-out writes
/// itself (a direct write cut short), and that reads on later, gets every
/// frame whole, in order and gapless: the writer finishes the cut frame
/// before anything else.
#[tokio::test]
async fn a_frame_cut_short_by_a_full_socket_is_finished_before_the_next() {
    let node = TestNode::with(|c| {
        c.direct_writes = true;
        c.rate_limit_count = 100_000;
    })
    .await;
    let room = fresh_channel("cut");
    let mut talker = Peer::join(&node, "talker").await;
    talker.create_and_move(&room).await;
    // A member with a small receive buffer, that stops reading.
    let stream = rawws::connect(node.addr, None, Some(4096)).await.unwrap();
    let mut member = RawWs::upgrade(stream, "").await.unwrap();
    let (token, _) = user_token("paused");
    member
        .send_text(&format!(r#"{{"f":110,"cnf":{{"token":"{token}"}}}}"#))
        .await
        .unwrap();
    assert!(member.until_payload(br#""f":140"#).await, "READY");
    member
        .send_text(&format!(
            r#"{{"f":130,"t":"CHANNEL_MOVE","cnf":{{"channel":"{room}"}}}}"#
        ))
        .await
        .unwrap();
    assert!(
        member.until_payload(br#""t":"CHANNEL_MOVE""#).await,
        "moved"
    );
    // Large messages, one at a time (each fanned out before the next is
    // sent, so that the paused member's is written straight to its socket
    // while nothing is queued), until one was cut short.
    let big = "x".repeat(1900);
    let mut sent = 0;
    while metric(node.addr, "gateway_direct_writes_cut_total").await == 0 {
        assert!(
            sent < 900,
            "no direct write was cut short in {sent} messages"
        );
        talker
            .execute(
                "MESSAGE_CREATE",
                json!({ "content": format!("{sent} {big}") }),
            )
            .await;
        talker.dispatch(Event::MessageCreate).await;
        sent += 1;
    }
    // A few more behind it, then the member reads everything.
    for k in sent..sent + 5 {
        talker
            .execute("MESSAGE_CREATE", json!({ "content": format!("{k} {big}") }))
            .await;
        talker.dispatch(Event::MessageCreate).await;
    }
    let mut last_s = None;
    let mut next = 0;
    while next < sent + 5 {
        let payload = member.next_payload().await.expect("the node keeps sending");
        let frame: serde_json::Value = serde_json::from_slice(&payload).expect("every frame whole");
        let s = frame["s"].as_u64();
        if let (Some(s), Some(last)) = (s, last_s) {
            assert_eq!(s, last + 1, "gapless");
        }
        last_s = s.or(last_s);
        if frame["t"] == "MESSAGE_CREATE" {
            let content = frame["cnf"]["content"].as_str().unwrap();
            assert_eq!(content, format!("{next} {big}"), "in order");
            next += 1;
        }
    }
}

/// A burst of messages (some written by the fan-out, some by the writer
/// tasks when direct writes are on) reaches every member once, in order,
/// and what was written is held for a resume.
async fn every_member_gets_every_message_once_in_order_and_can_resume(direct_writes: bool) {
    let node = TestNode::with(|c| {
        c.direct_writes = direct_writes;
        c.rate_limit_count = 1000;
    })
    .await;
    let channel = fresh_channel("direct");
    let mut alice = Peer::join(&node, "alice").await;
    let mut bob = Peer::join(&node, "bob").await;
    alice.create_and_move(&channel).await;
    bob.move_to(&channel).await;
    let count = 300;
    for i in 0..count {
        alice
            .execute("MESSAGE_CREATE", json!({ "content": format!("m{i}") }))
            .await;
    }
    // `next` checks that `s` is gapless and never repeats.
    for peer in [&mut alice, &mut bob] {
        for i in 0..count {
            let got = peer.dispatch(Event::MessageCreate).await;
            assert_eq!(got.cnf["content"], format!("m{i}"), "in the log's order");
        }
    }
    // What was written straight to the socket is in the ring: a resume
    // from an earlier `s` replays it.
    let (mut client, ready) = {
        let mut behind = bob.last_s - 10;
        std::mem::swap(&mut bob.last_s, &mut behind);
        let resumed = bob.resume_at(&node.url()).await;
        bob.last_s = behind;
        resumed
    };
    assert!(ready.resumed);
    let mut replayed = 0;
    while replayed < 10 {
        let msg = client.next_message(WAIT).await.expect("replayed");
        if msg.is_dispatch(Event::MessageCreate) {
            assert_eq!(msg.cnf["content"], format!("m{}", count - 10 + replayed));
            replayed += 1;
        }
    }
}

/// With `retain` as the node's `history_retain`: the message `retain + 1`
/// back is gone from history, so deleting it is 4013; the one after it
/// can still be deleted.
pub async fn only_retained_messages_can_be_deleted(node: &TestNode, retain: usize) {
    let room = fresh_channel("retain");
    let mut admin = Peer::admin(node, "keeper").await;
    admin.create_and_move(&room).await;
    let mut ids = Vec::new();
    for i in 0..=retain {
        ids.push(admin.say(&format!("m{i}")).await["id"].clone());
    }
    admin
        .execute_s("MESSAGE_DELETE", json!({"id": ids[0]}), 1)
        .await;
    let err = admin.error().await;
    assert_eq!((err.c, err.d, err.s), (4013, false, Some(1)));
    admin.execute("MESSAGE_DELETE", json!({"id": ids[1]})).await;
    let deleted = admin.dispatch(Event::MessageDelete).await.cnf;
    assert_eq!(deleted["id"], ids[1]);
}

#[tokio::test]
async fn a_message_past_the_retained_history_cannot_be_deleted() {
    let node = TestNode::with(|c| c.history_retain = 50).await;
    only_retained_messages_can_be_deleted(&node, 50).await;
}
