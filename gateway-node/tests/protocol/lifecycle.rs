//! Deadlines, slow consumers and drain.

use crate::harness::*;
use crate::rawws::{self, RawWs};
use gateway_shared::protocol::{Event, FunctionCode};
use gateway_shared::Client;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
    assert!(peer.resume_at(&node.url()).await.1.resumed);
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
    // The replay buffer no larger than the outbound limit, as with the
    // defaults (1000 and 1024): the backlog must still be replayable.
    let node = TestNode::with(|c| {
        c.outbound_limit = 64;
        c.replay_buffer = 64;
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
        // Every message sent after the 4016 reaches the detached session:
        // look often, so that fewer than the replay buffer's 64 arrive.
        if sent.is_multiple_of(10) {
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
    // The session stays resumable, with nothing lost, though more events
    // arrive before the client resumes (up to 9 above and 10 here: fewer
    // than the replay buffer).
    for i in 0..10 {
        talker.say(&format!("meanwhile {i}")).await;
    }
    let (mut client, ready) = slow.resume_at(&node.url()).await;
    assert!(ready.resumed);
    // Everything after what it read, in order, through the last one.
    let mut s = slow.last_s;
    loop {
        let msg = client.next_message(WAIT).await.unwrap();
        if msg.f != FunctionCode::Dispatch.code() {
            continue;
        }
        s += 1;
        assert_eq!(msg.s, Some(s), "gap or duplicate at {}", msg.text);
        if msg.is_dispatch(Event::MessageCreate) && msg.cnf["content"] == "meanwhile 9" {
            break;
        }
    }
}

/// The sum of the counters of `node` whose lines start with `prefix` (a
/// name, and maybe the first labels).
async fn counter(node: &TestNode, prefix: &str) -> u64 {
    let (_, metrics) = http_get(&node.http("/metrics")).await;
    metrics
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Waits until the node has stopped reading some client at least once.
async fn until_reads_held_back(node: &TestNode) {
    tokio::time::timeout(WAIT, async {
        while counter(node, "gateway_reads_held_back_total").await == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the node holds back its reads");
}

/// Sends requests that each earn a reply (heartbeats, unknown events) and
/// never reads: the client's queue fills, then the socket buffers, then the
/// node stops reading. Returns once the node closed the connection (the
/// sends fail: it closed with requests unread).
async fn flood_without_reading(client: &mut Client) {
    let batch: Vec<String> = (0..100)
        .map(|i| match i {
            0 => r#"{"f":120}"#.to_owned(),
            _ => json!({"f": 130, "t": "NOPE", "s": i}).to_string(),
        })
        .collect();
    while client.send_texts(&batch).await.is_ok() {}
}

#[tokio::test]
async fn a_client_that_sends_requests_but_never_reads_is_closed_as_a_slow_consumer() {
    // The stall deadline is hb_int: short here so the test is quick.
    let node = TestNode::with(|c| c.hb_int_ms = 500).await;
    let mut deaf = Peer::join(&node, "deaf").await;
    // Held back, its heartbeats wait unread: not a 4009 but a 4016, once
    // the socket took nothing for hb_int.
    tokio::time::timeout(WAIT * 3, flood_without_reading(&mut deaf.client))
        .await
        .expect("the node closes the connection");
    assert!(counter(&node, "gateway_reads_held_back_total").await > 0);
    assert_eq!(counter(&node, "gateway_slow_consumers_total").await, 1);
    let timeouts = r#"gateway_errors_sent_total{code="4009""#;
    assert_eq!(counter(&node, timeouts).await, 0);
    // The session stays resumable.
    assert!(deaf.resume_at(&node.url()).await.1.resumed);
}

#[tokio::test]
async fn a_drain_closes_a_connection_whose_reads_are_held_back() {
    // hb_int stays long: only the drain can end the connection in time.
    let node = TestNode::start().await;
    let mut deaf = Peer::join(&node, "deaf").await;
    let flood = tokio::spawn(async move { flood_without_reading(&mut deaf.client).await });
    until_reads_held_back(&node).await;
    // Its reader waits for room from now on, or will soon (the client never
    // reads); whichever, the drain ends the connection and the run.
    node.shutdown().await;
    tokio::time::timeout(WAIT, flood)
        .await
        .expect("the connection is closed")
        .unwrap();
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
async fn an_upgrade_while_the_node_drains_is_503() {
    let node = TestNode::start().await;
    let mut peer = Peer::join(&node, "stays").await;
    // An HTTP connection the node served before the drain, kept alive.
    let mut stream = rawws::connect(node.addr, None, None).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut stream).await, 200);
    let shutdown = tokio::spawn(node.shutdown());
    // GATEWAY_DOWN comes once the node is draining.
    peer.dispatch(Event::GatewayDown).await;
    let ws = RawWs::upgrade(stream, "").await.unwrap();
    assert_eq!(ws.status, 503);
    shutdown.await.unwrap();
}

/// Reads one HTTP response with a `Content-Length` body; returns its status.
async fn read_response(stream: &mut tokio::net::TcpStream) -> u16 {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            if buf.len() >= end + 4 + length {
                return head[9..12].parse().unwrap();
            }
        }
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the connection ended mid-response");
        buf.extend_from_slice(&chunk[..n]);
    }
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
