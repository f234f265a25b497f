//! Deadlines, slow consumers and drain.

use crate::harness::*;
use gateway_shared::protocol::Event;
use gateway_shared::Client;
use serde_json::json;

#[tokio::test]
async fn no_present_in_time_is_fatal_4003() {
    let node = TestNode::with(|c| c.hb_int_ms = 200).await;
    let (mut client, _) = Client::connect_hello(&node.url()).await.unwrap();
    expect_fatal(&mut client, 4003).await;
}

#[tokio::test]
async fn a_missed_heartbeat_is_fatal_4009_and_the_session_stays_resumable() {
    let node = TestNode::with(|c| c.hb_int_ms = 200).await;
    let mut peer = Peer::join(&node, "sleepy").await;
    let err = peer.error().await;
    assert_eq!((err.c, err.d), (4009, true));
    assert_eq!(peer.closed().await, Some(4009));
    let (mut client, _) = Client::connect_hello(&node.url()).await.unwrap();
    let ready = client
        .present(&peer.token, Some((peer.session_id(), Some(peer.last_s))))
        .await
        .unwrap();
    assert!(ready.resumed);
}

#[tokio::test]
async fn heartbeats_keep_a_session_alive() {
    let node = TestNode::with(|c| c.hb_int_ms = 200).await;
    let mut peer = Peer::join(&node, "awake").await;
    // Ten intervals of heartbeats, each answered: no 4009 in between.
    for _ in 0..10 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        peer.client.heartbeat().await.unwrap();
        let msg = peer.wait_for(|m| m.f == 120 || m.f == 150).await;
        assert_eq!(msg.f, 120, "{}", msg.text);
    }
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_as_a_slow_consumer() {
    let node = TestNode::with(|c| {
        c.outbound_limit = 64;
        c.rate_limit_count = 1_000_000;
    })
    .await;
    let room = fresh_channel("slow");
    let mut talker = Peer::join(&node, "talker").await;
    let mut slow = Peer::join(&node, "slow").await;
    talker.create_and_move(&room).await;
    slow.move_to(&room).await;
    // `slow` never reads again; its socket buffers fill, then its queue.
    let big = "x".repeat(1900);
    let (_, metrics_before) = http_get(&node.http("/metrics")).await;
    assert!(metrics_before.contains("gateway_slow_consumers_total{node="));
    let mut sent = 0u64;
    loop {
        talker
            .execute("MESSAGE_CREATE", json!({"content": big}))
            .await;
        sent += 1;
        // Keep talker's own socket drained.
        talker.dispatch(Event::MessageCreate).await;
        if sent.is_multiple_of(50) {
            let (_, metrics) = http_get(&node.http("/metrics")).await;
            if metrics
                .lines()
                .any(|l| l.starts_with("gateway_slow_consumers_total") && !l.ends_with(" 0"))
            {
                break;
            }
        }
        assert!(sent < 100_000, "never detected");
    }
    // It reads what it had been sent, numbered without a gap, then the
    // error and the close with 4016.
    let code = loop {
        match slow.next().await {
            Ok(msg) if msg.f == 150 => assert_eq!(msg.error().unwrap().c, 4016),
            Ok(_) => {}
            Err(gateway_shared::ClientError::Closed(code)) => break code,
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(code, Some(4016));
    // The session stays resumable, with nothing lost.
    let (mut client, _) = Client::connect_hello(&node.url()).await.unwrap();
    assert!(
        client
            .present(&slow.token, Some((slow.session_id(), Some(slow.last_s))))
            .await
            .unwrap()
            .resumed
    );
}

#[tokio::test]
async fn drain_sends_gateway_down_then_closes_with_1012() {
    let node = TestNode::start().await;
    let mut a = Peer::join(&node, "a").await;
    let mut b = Peer::join(&node, "b").await;
    let url = node.url();
    let addr = node.addr;
    let shutdown = tokio::spawn(node.shutdown());
    for peer in [&mut a, &mut b] {
        let down = peer.dispatch(Event::GatewayDown).await;
        assert_eq!(down.cnf["reconnect"], true);
        assert!(down.cnf["reason"].is_string());
        assert_eq!(peer.closed().await, Some(1012));
    }
    shutdown.await.unwrap();
    // Nothing listens any more.
    assert!(Client::connect(&url).await.is_err(), "{addr} still accepts");
}

#[tokio::test]
async fn metrics_count_real_traffic() {
    let node = TestNode::start().await;
    let mut peer = Peer::join(&node, "counted").await;
    peer.say("hello").await;
    peer.execute("NOPE", json!({})).await;
    peer.error().await;
    let (_, m) = http_get(&node.http("/metrics")).await;
    for needle in [
        r#"gateway_frames_received_total{f="110""#,
        r#"gateway_frames_received_total{f="130""#,
        r#"gateway_events_executed_total{t="MESSAGE_CREATE""#,
        r#"gateway_dispatches_sent_total{"#,
        r#"code="4010""#,
        "gateway_fanout_delay_seconds_bucket",
        r#"gateway_sessions{state="live""#,
        "process_resident_memory_bytes",
    ] {
        assert!(m.contains(needle), "{needle} missing in\n{m}");
    }
}
