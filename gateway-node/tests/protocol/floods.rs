//! Floods of abusive connections, each cut off by a stated limit
//! (docs/DEPLOY.md, "Security and abuse limits"), while a well-behaved
//! client goes on chatting: slow heads (slowloris), heads too large,
//! upgrades that never PRESENT, PRESENTs with forged tokens, clients that
//! never read, and too many connections from one address.
//!
//! The counts are small so that CI stays quick; `bench/flood.sh` runs the
//! same abuse at scale against a release build and measures latency and
//! memory. No test here asserts a duration: "normal latency" is a message
//! of the well-behaved client that round-trips while the flood is on.

use crate::harness::*;
use crate::rawws::{self, RawWs};
use gateway_shared::protocol::Claims;
use gateway_shared::{token, Client, ClientError};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

/// A node for floods: executes are not rate limited (the chatting client
/// sends many), the other limits are short so that the test is.
async fn flood_node(tune: impl FnOnce(&mut gateway_node::config::Config)) -> TestNode {
    TestNode::with(|c| {
        c.rate_limit_count = 1_000_000;
        tune(c);
    })
    .await
}

/// The well-behaved client: a heartbeat and a message per round, each
/// round awaited (the heartbeat answer and the message's own dispatch)
/// before the next, until `flood` has finished. Returns the flood's
/// output and the round-trip time of every round that ended while the
/// flood was still on (at least one, or the test fails).
async fn chat_during<T: Send + 'static>(
    peer: &mut Peer,
    content: &str,
    flood: JoinHandle<T>,
) -> (T, Vec<Duration>) {
    let (out, during) = chat_until(peer, content, flood).await;
    assert!(
        !during.is_empty(),
        "no message round-tripped while the flood was on"
    );
    (out, during)
}

/// [`chat_during`] without the check: to keep a client alive (it
/// heartbeats) while waiting for something that may already be done.
async fn chat_until<T: Send + 'static>(
    peer: &mut Peer,
    content: &str,
    task: JoinHandle<T>,
) -> (T, Vec<Duration>) {
    let mut during = Vec::new();
    let mut round = 0u64;
    while !task.is_finished() {
        round += 1;
        let started = Instant::now();
        peer.client.heartbeat().await.unwrap();
        let text = format!("{content} {round}");
        peer.say(&text).await;
        if !task.is_finished() {
            during.push(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (task.await.unwrap(), during)
}

/// Waits until `gateway_connections_refused_total` for `reason` on the
/// node at `addr` is `want` (it is counted as the connection's task ends,
/// just after the client saw the close).
async fn until_refused(addr: SocketAddr, reason: &str, want: u64) {
    let label = &format!("reason=\"{reason}\"");
    eventually_async(
        &format!("{want} refused for {reason}"),
        WAIT,
        || async move {
            match metric_where(addr, "gateway_connections_refused_total", label).await {
                got if got == want => Ok(()),
                got => Err(format!("{got} refused")),
            }
        },
    )
    .await
}

/// A task that polls a metric of the node at `addr` until it is at most
/// `most`, for at most three harness waits.
fn until_at_most(addr: SocketAddr, name: &'static str, most: u64) -> JoinHandle<()> {
    tokio::spawn(async move {
        let what = format!("{name} at most {most}");
        eventually_async(&what, WAIT * 3, || async move {
            match metric(addr, name).await {
                got if got <= most => Ok(()),
                got => Err(format!("it is {got}")),
            }
        })
        .await
    })
}

#[tokio::test]
async fn slow_heads_are_closed_at_the_header_timeout_while_a_client_chats() {
    let node = flood_node(|c| c.http_header_timeout_ms = 500).await;
    let addr = node.addr;
    let mut peer = Peer::join(&node, "steady").await;
    // Slowloris: a byte of a head that never ends every 20 ms, until the
    // node hangs up. Each connection reports how long it was held.
    let flood = tokio::spawn(async move {
        let conns: Vec<JoinHandle<Duration>> = (0..100)
            .map(|_| {
                tokio::spawn(async move {
                    let started = Instant::now();
                    let mut stream = rawws::connect(addr, None, None).await.unwrap();
                    let head = rawws::upgrade_head(addr, "X-Slow: ");
                    let mut bytes = head.bytes().chain(std::iter::repeat(b'a'));
                    let mut answer = [0u8; 256];
                    loop {
                        tokio::select! {
                            read = stream.read(&mut answer) => {
                                // The node answers nothing: it closes.
                                assert!(matches!(read, Ok(0) | Err(_)), "an answer to a slow head");
                                return started.elapsed();
                            }
                            _ = tokio::time::sleep(Duration::from_millis(20)) => {
                                let byte = [bytes.next().unwrap()];
                                if stream.write_all(&byte).await.is_err() {
                                    return started.elapsed();
                                }
                            }
                        }
                        assert!(started.elapsed() < WAIT, "a slow head held for {WAIT:?}");
                    }
                })
            })
            .collect();
        let mut held = Vec::new();
        for conn in conns {
            held.push(conn.await.unwrap());
        }
        held
    });
    let (held, _) = chat_during(&mut peer, "while slowloris", flood).await;
    // Each was cut by the 500 ms header timeout, not before.
    assert!(
        held.iter().all(|d| *d >= Duration::from_millis(450)),
        "{held:?}"
    );
    until_refused(node.addr, "header_timeout", 100).await;
    peer.say("after slowloris").await;
}

#[tokio::test]
async fn a_head_over_16_kib_gets_431_and_a_large_normal_head_still_upgrades() {
    let node = flood_node(|_| {}).await;
    // Over the limit: 431, then the node closes.
    let mut stream = rawws::connect(node.addr, None, None).await.unwrap();
    let cookie = format!("Cookie: c={}\r\n", "x".repeat(20 * 1024));
    let head = rawws::upgrade_head(node.addr, &cookie);
    // The node may close before reading all of it: a failed write is fine.
    let _ = stream.write_all(head.as_bytes()).await;
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");
    until_refused(node.addr, "head_too_large", 1).await;
    // Browsers' heads are far smaller; 8 KiB of cookies still upgrade.
    let cookie = format!("Cookie: c={}\r\n", "x".repeat(8 * 1024));
    let stream = rawws::connect(node.addr, None, None).await.unwrap();
    let mut ws = RawWs::upgrade(stream, &cookie).await.unwrap();
    assert_eq!(ws.status, 101);
    assert!(
        ws.read_until(br#""f":100"#).await,
        "HELLO after the upgrade"
    );
}

#[tokio::test]
async fn upgrades_that_never_present_get_4003_at_the_present_deadline() {
    let node = flood_node(|c| c.hb_int_ms = 700).await;
    let url = node.url();
    let mut peer = Peer::join(&node, "steady").await;
    let flood = tokio::spawn(async move {
        let conns: Vec<JoinHandle<()>> = (0..100)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move {
                    let (mut client, _) = Client::connect_hello(&url).await.unwrap();
                    expect_fatal(&mut client, 4003).await;
                })
            })
            .collect();
        for conn in conns {
            conn.await.unwrap();
        }
    });
    chat_during(&mut peer, "while nobody presents", flood).await;
    let gone = until_at_most(node.addr, "gateway_connections", 1);
    chat_until(&mut peer, "while they go", gone).await;
}

/// One valid token presenting and dropping in a loop: each dropped session
/// would stay for the resume window, so new ones are held to the user's
/// budget (4008, the connection open), while others keep chatting.
#[tokio::test]
async fn a_user_starting_sessions_in_a_loop_is_held_to_its_budget() {
    const BUDGET: u32 = 20; // a minute's: one more every 3 s
    let node = flood_node(|c| c.session_starts_per_user = BUDGET).await;
    let url = node.url();
    let mut peer = Peer::join(&node, "steady").await;
    let (token, _) = user_token("looper");
    let began = Instant::now();
    let flood = tokio::spawn(async move {
        let (mut started, mut refused) = (0u32, 0u32);
        for _ in 0..100 {
            let (mut client, _) = Client::connect_hello(&url).await.unwrap();
            match client.present(&token, None).await {
                Ok(_) => started += 1,
                Err(ClientError::Gateway(err)) if err.c == 4008 && !err.d => refused += 1,
                Err(e) => panic!("{e}"),
            }
            client.abort();
        }
        (started, refused)
    });
    let ((started, refused), _) = chat_until(&mut peer, "while it loops", flood).await;
    // The burst, and what refilled while the loop ran.
    let refilled = (began.elapsed().as_secs_f64() / 3.0).floor() as u32;
    assert!(
        (BUDGET..=BUDGET + refilled).contains(&started),
        "{started} sessions started"
    );
    assert_eq!(started + refused, 100);
}

#[tokio::test]
async fn presents_with_forged_tokens_get_4004_and_the_node_keeps_serving() {
    let node = flood_node(|_| {}).await;
    let url = node.url();
    let mut peer = Peer::join(&node, "steady").await;
    let claims = |exp| Claims {
        sub: "victim".into(),
        name: "victim".into(),
        admin: true,
        exp,
        iss: None,
        aud: None,
    };
    let forged = [
        // Signed with another secret.
        token::mint(b"not-the-cluster-secret-not-the-cluster", &claims(u64::MAX / 2)),
        // Expired.
        token::mint(SECRET.as_bytes(), &claims(1)),
        // Unsigned (alg none).
        "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ2aWN0aW0iLCJuYW1lIjoidiIsImV4cCI6OTk5OTk5OTk5OX0.".into(),
        "not a token".into(),
        String::new(),
    ];
    let refused = std::sync::Arc::new(AtomicU64::new(0));
    let flood = {
        let refused = std::sync::Arc::clone(&refused);
        tokio::spawn(async move {
            let conns: Vec<JoinHandle<()>> = (0..100)
                .map(|i| {
                    let (url, token) = (url.clone(), forged[i % forged.len()].clone());
                    let refused = std::sync::Arc::clone(&refused);
                    tokio::spawn(async move {
                        let (mut client, _) = Client::connect_hello(&url).await.unwrap();
                        match client.present(&token, None).await {
                            Err(ClientError::Gateway(err)) if err.c == 4004 && err.d => {}
                            other => panic!("a forged token was not refused: {other:?}"),
                        }
                        assert_eq!(client.closed().await.unwrap(), Some(4004));
                        refused.fetch_add(1, Ordering::Relaxed);
                    })
                })
                .collect();
            for conn in conns {
                conn.await.unwrap();
            }
        })
    };
    chat_during(&mut peer, "while tokens are forged", flood).await;
    assert_eq!(refused.load(Ordering::Relaxed), 100);
    assert_eq!(
        metric(node.addr, "gateway_sessions").await,
        1,
        "only the chat"
    );
}

#[tokio::test]
async fn clients_that_never_read_are_cut_as_slow_consumers() {
    const NEVER_READ: u64 = 20;
    let node = flood_node(|c| {
        c.hb_int_ms = 1000;
        c.outbound_limit = 32;
    })
    .await;
    let addr = node.addr;
    let mut peer = Peer::join(&node, "steady").await;
    let room = fresh_channel("deaf");
    let mut talker = Peer::join(&node, "talker").await;
    talker.create_and_move(&room).await;
    // They present, move to the talker's room, read the answer, and never
    // read again; their receive buffers are small, as a phone's on a bad
    // network would be.
    let mut deaf = Vec::new();
    for i in 0..NEVER_READ {
        let stream = rawws::connect(addr, None, Some(4096)).await.unwrap();
        let mut ws = RawWs::upgrade(stream, "").await.unwrap();
        assert_eq!(ws.status, 101);
        let (token, _) = user_token(&format!("deaf{i}"));
        ws.send_text(&format!(r#"{{"f":110,"cnf":{{"token":"{token}"}}}}"#))
            .await
            .unwrap();
        assert!(ws.read_until(br#""f":140"#).await, "READY");
        ws.send_text(&format!(
            r#"{{"f":130,"t":"CHANNEL_MOVE","cnf":{{"channel":"{room}"}}}}"#
        ))
        .await
        .unwrap();
        assert!(ws.read_until(br#""t":"CHANNEL_MOVE""#).await, "moved");
        deaf.push(ws);
    }
    // The talker fills their queues (the kernel's socket buffers first,
    // up to `net.ipv4.tcp_wmem`, 4 MiB by default) until every one of them
    // was cut; the well-behaved client chats meanwhile in its own channel.
    let flood = tokio::spawn(async move {
        let big = "x".repeat(1900);
        let deadline = Instant::now() + WAIT * 6;
        loop {
            // hb_int is short here: the talker heartbeats too.
            talker.client.heartbeat().await.unwrap();
            for _ in 0..16 {
                talker
                    .execute("MESSAGE_CREATE", serde_json::json!({ "content": big }))
                    .await;
            }
            for _ in 0..16 {
                talker
                    .dispatch(gateway_shared::protocol::Event::MessageCreate)
                    .await;
            }
            let cut = metric(addr, "gateway_slow_consumers_total").await;
            if cut >= NEVER_READ {
                return (cut, talker);
            }
            assert!(Instant::now() < deadline, "{cut} of {NEVER_READ} cut");
        }
    });
    let ((cut, _talker), _) = chat_during(&mut peer, "while some never read", flood).await;
    assert_eq!(cut, NEVER_READ);
    // Their sockets go too (after the close frames' flush deadline); the
    // talker, no longer heartbeating, may go as well.
    let gone = until_at_most(node.addr, "gateway_connections", 2);
    chat_until(&mut peer, "while they go", gone).await;
    drop(deaf);
    peer.say("after the deaf ones").await;
}

#[tokio::test]
async fn an_address_over_max_connections_per_ip_gets_429_and_others_do_not() {
    let node = flood_node(|c| c.max_connections_per_ip = 2).await;
    let url = node.url();
    let (first, _second) = two_then_refused(&node, 429, "address_full").await;
    // Another address is counted apart.
    let other: IpAddr = "127.0.0.2".parse().unwrap();
    let stream = rawws::connect(node.addr, Some(other), None).await.unwrap();
    let ws = RawWs::upgrade(stream, "").await.unwrap();
    assert_eq!(ws.status, 101);
    // A connection that ends gives its place back.
    drop(first);
    connects_once_refusals_end(&url, 429).await;
}

#[tokio::test]
async fn a_node_at_max_connections_refuses_upgrades_with_503() {
    let node = flood_node(|c| c.max_connections = 2).await;
    let url = node.url();
    let (first, _second) = two_then_refused(&node, 503, "node_full").await;
    drop(first);
    connects_once_refusals_end(&url, 503).await;
}

/// Opens two connections to `node` (from 127.0.0.1), which a cap of two
/// admits, and checks that a third is refused with `status`, counted
/// under `reason`. Returns the two.
async fn two_then_refused(node: &TestNode, status: u16, reason: &str) -> (Client, Client) {
    let url = node.url();
    let (first, _) = Client::connect_hello(&url).await.unwrap();
    let (second, _) = Client::connect_hello(&url).await.unwrap();
    match Client::connect_hello(&url).await {
        Err(ClientError::Refused(s)) if s == status => {}
        other => panic!("a third connection: {:?}", other.err()),
    }
    until_refused(node.addr, reason, 1).await;
    (first, second)
}

/// Connects to `url`, retrying while the node answers `status` (it frees
/// a place when it notices a connection ended, which nothing announces),
/// for at most `WAIT`.
async fn connects_once_refusals_end(url: &str, status: u16) {
    let deadline = Instant::now() + WAIT;
    loop {
        match Client::connect_hello(url).await {
            Ok(_) => break,
            Err(ClientError::Refused(s)) if s == status && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("{e}"),
        }
    }
}
