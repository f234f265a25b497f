//! Network faults between a node and Redis, and between a client and a
//! node: a link cut (an nftables drop rule in a network namespace, see
//! `netns.rs`), and a link with latency and loss (the delaying proxy of
//! `proxy.rs`). What docs/PROTOCOL.md §8 ("Clusters") promises is
//! asserted as it is written: while the backend is unreachable, a PRESENT
//! or an execute gets 4018 (`d: false`), heartbeats are answered, and
//! `/readyz` is 503; once the link is back, the cut node's clients
//! receive every event they missed, in order and once (`Peer::next`
//! checks the numbering), since Redis kept them all.

use crate::failover::{check, member, until, Traffic};
use crate::harness::*;
use crate::netns::{netns_or_skip, NsRedis};
use crate::proxy::{DelayProxy, Faults};
use crate::redis_server::RedisServer;
use gateway_shared::protocol::{Event, FunctionCode};
use gateway_shared::{Client, ClientError};
use serde_json::json;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

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

#[tokio::test]
async fn latency_and_loss_between_a_node_and_redis_lose_nothing_under_traffic() {
    let redis = RedisServer::start();
    let upstream = format!("127.0.0.1:{}", redis.port).parse().unwrap();
    let link = DelayProxy::start(upstream, Faults::lossy_wan()).await;
    let node = |url: String| {
        TestNode::with(move |c| {
            c.redis_url = Some(url);
            c.rate_limit_count = 1_000_000;
            // The members do not heartbeat.
            c.hb_int_ms = 120_000;
        })
    };
    // Node A is behind the slow, lossy link; node B is next to Redis.
    let a = node(format!("redis://{}/", link.addr)).await;
    let b = node(redis.url()).await;
    let room = fresh_channel("lossy");
    let mut admin = Peer::admin(&a, "admin").await;
    admin.execute("CHANNEL_ADD", json!({ "name": room })).await;
    admin.dispatch(Event::ChannelAdd).await;
    let (talk_tx, talk) = watch::channel(true);
    let traffic = Arc::new(Traffic {
        received: AtomicU64::new(0),
        settled: AtomicU64::new(0),
    });
    // Three publishers and a reader on each node, all in the room first.
    // A session's requests are executed one after the other, each a round
    // trip to Redis (100 ms and more through the link): a message every
    // 150 ms each keeps A's publishers from falling behind.
    const PUBLISHERS: usize = 6;
    let mut peers = Vec::new();
    for i in 0..PUBLISHERS + 2 {
        let node = if i % 2 == 0 { &a } else { &b };
        let mut peer = Peer::join(node, &format!("m{i}")).await;
        peer.move_to(&room).await;
        peers.push(peer);
    }
    let tasks: Vec<_> = peers
        .into_iter()
        .enumerate()
        .map(|(i, peer)| {
            tokio::spawn(member(
                peer,
                format!("m{i}"),
                i < PUBLISHERS,
                Duration::from_millis(150),
                talk.clone(),
                Arc::clone(&traffic),
            ))
        })
        .collect();
    // About three seconds of traffic: 40 messages/s, each delivered to
    // eight members.
    until(&traffic.received, 1_000).await;
    let (status, _) = http_get(&a.http("/readyz")).await;
    assert_eq!(status, 200, "a slow link is not an outage");
    talk_tx.send(false).unwrap();
    until(&traffic.settled, PUBLISHERS as u64).await;
    admin.move_to(&room).await;
    admin.say("done").await;
    let mut seen = Vec::new();
    for task in tasks {
        seen.push(tokio::time::timeout(WAIT * 3, task).await.unwrap().unwrap());
    }
    let (accepted, reset) = check(&seen, &a.url()).await;
    let refused: usize = seen.iter().map(|(s, _)| s.refused.len()).sum();
    eprintln!("lossy link to Redis: {accepted} accepted, {refused} refused (4018), {reset} reset");
    assert!(accepted > 0);
    assert_eq!(
        reset, 0,
        "nothing was lost in Redis: no session starts over"
    );
}

#[tokio::test]
async fn a_client_behind_a_lossy_link_whose_connection_dies_resumes_without_a_gap() {
    let node = TestNode::with(|c| c.rate_limit_count = 1_000_000).await;
    let link = DelayProxy::start(node.addr, Faults::lossy_wan()).await;
    let url = format!("ws://{}/gateway", link.addr);
    let (token, user_id) = user_token("mobile");
    let mut mobile = Peer::present(&url, token, user_id).await;
    let room = fresh_channel("mobile");
    let mut talker = Peer::join(&node, "talker").await;
    talker.create_and_move(&room).await;
    mobile.move_to(&room).await;
    let sent: Vec<String> = (0..200).map(|i| format!("t-{i}")).collect();
    let talking = {
        let sent = sent.clone();
        tokio::spawn(async move {
            for content in &sent {
                talker.say(content).await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            talker
        })
    };
    // Part of the conversation arrives; then the link dies silently.
    let mut got = Vec::new();
    while got.len() < 50 {
        let msg = mobile.dispatch(Event::MessageCreate).await;
        got.push(msg.cnf["content"].as_str().unwrap().to_owned());
    }
    link.freeze();
    // The client's heartbeat goes unanswered: the connection is a zombie.
    mobile.client.heartbeat().await.unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(1), mobile.client.recv()).await {
            Err(_) => break,
            Ok(Some(gateway_shared::Incoming::Message(m))) => {
                // Frames already past the link before it died.
                assert_ne!(m.f, 120, "a heartbeat answer through a dead link");
                if let Some(s) = m.s {
                    assert_eq!(s, mobile.last_s + 1, "gap or duplicate before {}", m.text);
                    mobile.last_s = s;
                }
                if m.is_dispatch(Event::MessageCreate) {
                    got.push(m.cnf["content"].as_str().unwrap().to_owned());
                }
            }
            Ok(other) => panic!("{other:?}"),
        }
    }
    // It resumes on a new connection, over the same slow, lossy link.
    let (client, ready) = mobile.resume_at(&url).await;
    assert!(ready.resumed);
    mobile.client = client;
    while got.last().map(String::as_str) != Some("t-199") {
        let msg = mobile.dispatch(Event::MessageCreate).await;
        got.push(msg.cnf["content"].as_str().unwrap().to_owned());
    }
    assert_eq!(got, sent, "every message, once, in order");
    talking.await.unwrap();
}
