//! Network faults between a node and Redis: a link cut (an nftables drop
//! rule in a network namespace, see `netns.rs`). What docs/PROTOCOL.md §8 ("Clusters") promises is
//! asserted as it is written: while the backend is unreachable, a PRESENT
//! or an execute gets 4018 (`d: false`), heartbeats are answered, and
//! `/readyz` is 503; once the link is back, the cut node's clients
//! receive every event they missed, in order and once (`Peer::next`
//! checks the numbering), since Redis kept them all.

use crate::harness::*;
use crate::netns::{netns_or_skip, NsRedis};
use gateway_shared::protocol::{Event, FunctionCode};
use gateway_shared::{Client, ClientError};
use serde_json::json;
use std::time::{Duration, Instant};

/// Polls `path` on `node` until it answers `status`.
async fn until_status(node: &TestNode, path: &str, status: u16) {
    let deadline = Instant::now() + WAIT;
    loop {
        let (got, _) = http_get(&node.http(path)).await;
        if got == status {
            return;
        }
        assert!(Instant::now() < deadline, "{path} is {got}, not {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The contents of the MESSAGE_CREATE dispatches `peer` receives, up to
/// and including `last`.
async fn contents_until(peer: &mut Peer, last: &str) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        let msg = peer.dispatch(Event::MessageCreate).await;
        let content = msg.cnf["content"].as_str().unwrap().to_owned();
        seen.push(content.clone());
        if content == last {
            return seen;
        }
    }
}

#[tokio::test]
async fn a_node_cut_off_from_redis_answers_4018_and_then_delivers_every_missed_event() {
    let test = "a_node_cut_off_from_redis_answers_4018_and_then_delivers_every_missed_event";
    let Some(ns) = netns_or_skip(test, 2) else {
        return;
    };
    let redis = NsRedis::start(&ns);
    // Node A reaches Redis over link 0 (the one cut), node B over link 1.
    let a = TestNode::with(|c| c.redis_url = Some(redis.url(0))).await;
    let b = TestNode::with(|c| c.redis_url = Some(redis.url(1))).await;
    let room = fresh_channel("cut");
    let mut talker = Peer::join(&b, "talker").await;
    talker.create_and_move(&room).await;
    let mut reader = Peer::join(&a, "reader").await;
    reader.move_to(&room).await;
    talker.say("before").await;
    assert_eq!(contents_until(&mut reader, "before").await, ["before"]);

    ns.cut(0);
    // Other nodes go on: B's clients talk through the cut.
    let during: Vec<String> = (0..30).map(|i| format!("during-{i}")).collect();
    for content in &during {
        talker.say(content).await;
    }
    // On A, what needs Redis is refused and not fatal; heartbeats work.
    reader.client.heartbeat().await.unwrap();
    let beat = reader
        .wait_for(|m| m.f == FunctionCode::Heartbeat.code())
        .await;
    assert_eq!(beat.f, 120);
    reader
        .execute_s("MESSAGE_CREATE", json!({"content": "refused"}), 7)
        .await;
    let err = reader.error().await;
    assert_eq!((err.c, err.d, err.s), (4018, false, Some(7)));
    let (mut newcomer, _) = Client::connect_hello(&a.url()).await.unwrap();
    let (token, _) = user_token("newcomer");
    match newcomer.present(&token, None).await {
        Err(ClientError::Gateway(err)) if (err.c, err.d) == (4018, false) => {}
        other => panic!("a PRESENT while cut off: {other:?}"),
    }
    until_status(&a, "/readyz", 503).await;
    let (status, _) = http_get(&b.http("/readyz")).await;
    assert_eq!(status, 200, "the node that kept its link stays ready");

    ns.mend();
    until_status(&a, "/readyz", 200).await;
    // The refused PRESENT may be sent again, on the same connection.
    let deadline = Instant::now() + WAIT;
    loop {
        match newcomer.present(&token, None).await {
            Ok(_) => break,
            Err(ClientError::Gateway(err)) if err.c == 4018 && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("PRESENT after the link came back: {e}"),
        }
    }
    talker.say("after").await;
    // Everything B published during the cut, in order, once, and nothing
    // of the refused message.
    let mut want = during.clone();
    want.push("after".into());
    assert_eq!(contents_until(&mut reader, "after").await, want);
    reader.say("reader is back").await;
    drop(redis);
}
