//! Every rejection path of PROTOCOL.md sections 3-5: the code, the `d`
//! flag, the echoed `s`/`t`, and the close code when fatal.

use crate::harness::*;
use fastwebsockets::OpCode;
use gateway_shared::protocol::{ErrorBody, FunctionCode};
use gateway_shared::Client;
use serde_json::json;

/// Sends `text` on a fresh connection (presented or not) and returns the
/// error and, when fatal, the close code.
async fn reject_raw(node: &TestNode, presented: bool, text: &str) -> (ErrorBody, Option<u16>) {
    let (mut client, _) = Client::connect_hello(&node.url()).await.unwrap();
    if presented {
        client.present(&user_token("e").0, None).await.unwrap();
    }
    client.send_text(text).await.unwrap();
    let err = client
        .expect_f(FunctionCode::Error)
        .await
        .unwrap()
        .error()
        .unwrap();
    let close = if err.d {
        client.closed().await.unwrap()
    } else {
        None
    };
    (err, close)
}

async fn assert_fatal(node: &TestNode, presented: bool, text: &str, code: u16) {
    let (err, close) = reject_raw(node, presented, text).await;
    assert_eq!(
        (err.c, err.d, close),
        (code, true, Some(code)),
        "{text}: {err:?}"
    );
    assert!(err.m.is_some_and(|m| !m.is_empty()));
}

#[tokio::test]
async fn unknown_and_server_only_function_codes_are_fatal_4001() {
    let node = TestNode::start().await;
    for text in [
        r#"{"f":100}"#,
        r#"{"f":140}"#,
        r#"{"f":150}"#,
        r#"{"f":7}"#,
        r#"{"f":131}"#,
    ] {
        assert_fatal(&node, false, text, 4001).await;
        assert_fatal(&node, true, text, 4001).await;
    }
}

#[tokio::test]
async fn malformed_payloads_are_fatal_4002() {
    let node = TestNode::start().await;
    for text in [
        "not json",
        "[1,2]",
        "42",
        "{}",
        r#"{"f":"120"}"#,
        r#"{"f":120.0}"#,
        r#"{"f":130,"t":5,"cnf":{}}"#,
        r#"{"f":130,"t":"MESSAGE_CREATE","s":"1","cnf":{}}"#,
        // `s` must fit in 64 signed bits.
        r#"{"f":130,"t":"MESSAGE_CREATE","s":9223372036854775808,"cnf":{}}"#,
        r#"{"f":130,"t":"MESSAGE_CREATE","cnf":[1]}"#,
        r#"{"f":130,"t":"MESSAGE_CREATE","cnf":true}"#,
        r#"{"f":130,"t":"MESSAGE_CREATE","cnf":1.5}"#,
        r#"{"f":110,"cnf":"token"}"#,
        r#"{"f":110,"cnf":1.5}"#,
        r#"{"f":110,"cnf":[]}"#,
        r#"{"f":110,"cnf":{"token":5}}"#,
        r#"{"f":110,"cnf":{"token":"x","session_id":"1"}}"#,
        // session_id: an integer in 1..2^53.
        r#"{"f":110,"cnf":{"token":"x","session_id":0}}"#,
        r#"{"f":110,"cnf":{"token":"x","session_id":-3}}"#,
        r#"{"f":110,"cnf":{"token":"x","session_id":1.5}}"#,
        r#"{"f":110,"cnf":{"token":"x","session_id":9007199254740992}}"#,
        r#"{"f":110,"cnf":{"token":"x","session_id":1,"s":-1}}"#,
    ] {
        assert_fatal(&node, false, text, 4002).await;
    }
    // The same with a session where it matters.
    assert_fatal(&node, true, r#"{"f":130,"t":["x"]}"#, 4002).await;
}

#[tokio::test]
async fn binary_frames_are_fatal_4002() {
    let node = TestNode::start().await;
    let (mut client, _) = Client::connect_hello(&node.url()).await.unwrap();
    client
        .send_frame(true, OpCode::Binary, br#"{"f":120}"#)
        .await
        .unwrap();
    expect_fatal(&mut client, 4002).await;
}

#[tokio::test]
async fn a_text_frame_that_is_not_utf8_is_fatal_4002() {
    let node = TestNode::start().await;
    let (mut client, _) = Client::connect_hello(&node.url()).await.unwrap();
    client
        .send_frame(true, OpCode::Text, b"{\"f\":120,\"x\":\"\xff\xfe\"}")
        .await
        .unwrap();
    expect_fatal(&mut client, 4002).await;
}

#[tokio::test]
async fn execute_before_present_is_fatal_4003_with_the_request_echoed() {
    let node = TestNode::start().await;
    let (err, close) = reject_raw(
        &node,
        false,
        r#"{"f":130,"t":"MESSAGE_CREATE","s":9,"cnf":{"content":"x"}}"#,
    )
    .await;
    assert_eq!((err.c, err.d, close), (4003, true, Some(4003)));
    assert_eq!((err.s, err.t.as_deref()), (Some(9), Some("MESSAGE_CREATE")));
}

#[tokio::test]
async fn bad_tokens_are_fatal_4004() {
    let node = TestNode::start().await;
    let expired = {
        let mut c = gateway_shared::token::claims("u", "n", false, 0);
        c.exp -= 10;
        gateway_shared::token::mint(SECRET.as_bytes(), &c)
    };
    let wrong_key = gateway_shared::token::mint(
        b"another-secret-another-secret-xx",
        &gateway_shared::token::claims("u", "n", false, 60),
    );
    let alg_none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ1MSIsIm5hbWUiOiJhIiwiZXhwIjo0MTAyNDQ0ODAwfQ.";
    for token in [
        expired.as_str(),
        wrong_key.as_str(),
        alg_none,
        "garbage",
        "",
    ] {
        let text = json!({"f": 110, "cnf": {"token": token}}).to_string();
        assert_fatal(&node, false, &text, 4004).await;
    }
    assert_fatal(&node, false, r#"{"f":110,"cnf":{}}"#, 4004).await;
}

/// An HS256 token with any claims, signed with `secret`.
fn signed(secret: &[u8], claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .unwrap()
}

fn in_an_hour() -> u64 {
    gateway_shared::token::unix_now_s() + 3600
}

#[tokio::test]
async fn a_rotated_secret_keeps_old_tokens_and_their_sessions_working() {
    const OLD: &str = "the-secret-before-the-rotation-xyz!";
    let node = TestNode::with(|c| c.jwt_previous_secret = Some(OLD.into())).await;
    let old_token = signed(
        OLD.as_bytes(),
        json!({"sub": "rot-1", "name": "rot", "exp": in_an_hour()}),
    );
    let alice = Peer::present(&node.url(), old_token, "rot-1".into()).await;
    // Her app gets a token signed with the new secret and resumes with it.
    let new_token = token_for("rot-1", "rot", false);
    let (mut client, _) = Client::connect_hello(&node.url()).await.unwrap();
    let ready = client
        .present(&new_token, Some((alice.session_id(), Some(0))))
        .await
        .unwrap();
    assert!(ready.resumed);
    assert_eq!(ready.session_id, alice.session_id());
    // A secret that is neither is refused.
    let stranger = signed(
        b"neither-the-old-nor-the-new-secret!",
        json!({"sub": "rot-2", "name": "x", "exp": in_an_hour()}),
    );
    let text = json!({"f": 110, "cnf": {"token": stranger}}).to_string();
    assert_fatal(&node, false, &text, 4004).await;
}

#[tokio::test]
async fn a_configured_issuer_and_audience_are_required() {
    let node = TestNode::with(|c| {
        c.jwt_issuer = Some("https://auth.example".into());
        c.jwt_audience = Some("chat".into());
    })
    .await;
    let claims = |extra: serde_json::Value| {
        let mut c = json!({"sub": "iss-1", "name": "i", "exp": in_an_hour()});
        c.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        c
    };
    for (extra, reason) in [
        (json!({}), "token claim iss missing"),
        (
            json!({"iss": "https://auth.example"}),
            "token claim aud missing",
        ),
        (
            json!({"iss": "https://other.example", "aud": "chat"}),
            "token issuer (iss) not accepted",
        ),
        (
            json!({"iss": "https://auth.example", "aud": "other"}),
            "token audience (aud) not accepted",
        ),
    ] {
        let token = signed(SECRET.as_bytes(), claims(extra));
        let text = json!({"f": 110, "cnf": {"token": token}}).to_string();
        let (err, close) = reject_raw(&node, false, &text).await;
        assert_eq!((err.c, close), (4004, Some(4004)));
        // With both iss and aud missing, jsonwebtoken reports whichever its
        // set of required claims yields first: either is right.
        let both_missing = reason == "token claim iss missing";
        let either = err.m.as_deref() == Some("token claim aud missing") && both_missing;
        assert!(err.m.as_deref() == Some(reason) || either, "{:?}", err.m);
    }
    let good = signed(
        SECRET.as_bytes(),
        claims(json!({"iss": "https://auth.example", "aud": ["chat", "web"]})),
    );
    Peer::present(&node.url(), good, "iss-1".into()).await;
}

#[tokio::test]
async fn tokens_not_yet_valid_or_of_another_algorithm_are_fatal_4004() {
    let node = TestNode::start().await;
    let later = signed(
        SECRET.as_bytes(),
        json!({"sub": "nbf", "name": "n", "exp": in_an_hour(), "nbf": in_an_hour() - 60}),
    );
    let hs512 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS512),
        &json!({"sub": "alg", "name": "a", "exp": in_an_hour()}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    // Within the 4096-byte frame, but no token: refused, not a panic.
    let oversized = "x".repeat(4000);
    for (token, reason) in [
        (later.as_str(), "token not valid yet (nbf)"),
        (hs512.as_str(), "token algorithm must be HS256"),
        (oversized.as_str(), "token malformed"),
    ] {
        let text = json!({"f": 110, "cnf": {"token": token}}).to_string();
        let (err, close) = reject_raw(&node, false, &text).await;
        assert_eq!((err.c, close), (4004, Some(4004)), "{reason}");
        assert_eq!(err.m.as_deref(), Some(reason));
    }
    // Over the frame limit, it is the payload that is refused.
    let huge = json!({"f": 110, "cnf": {"token": "x".repeat(5000)}}).to_string();
    let (err, close) = reject_raw(&node, false, &huge).await;
    assert_eq!((err.c, close), (4006, Some(4006)));
}

#[tokio::test]
async fn resuming_another_users_session_is_fatal_4004() {
    let node = TestNode::start().await;
    let alice = Peer::join(&node, "alice").await;
    let (mut mallory, _) = Client::connect_hello(&node.url()).await.unwrap();
    let err = mallory
        .present(&user_token("mallory").0, Some((alice.session_id(), None)))
        .await
        .unwrap_err();
    assert!(
        matches!(err, gateway_shared::ClientError::Gateway(ref e) if e.c == 4004 && e.d),
        "{err:?}"
    );
    assert_eq!(mallory.closed().await.unwrap(), Some(4004));
}

#[tokio::test]
async fn a_second_present_is_fatal_4005() {
    let node = TestNode::start().await;
    let mut peer = Peer::join(&node, "twice").await;
    peer.client
        .send_json(&json!({"f": 110, "cnf": {"token": peer.token}}))
        .await
        .unwrap();
    let err = peer.error().await;
    assert_eq!((err.c, err.d), (4005, true));
    assert_eq!(peer.closed().await, Some(4005));
}

/// `{"f":120,"p":"xxx…"}` of exactly `len` bytes.
fn heartbeat_of_len(len: usize) -> String {
    let base = r#"{"f":120,"p":""}"#.len();
    format!(r#"{{"f":120,"p":"{}"}}"#, "x".repeat(len - base))
}

#[tokio::test]
async fn the_payload_limit_is_4096_bytes() {
    let node = TestNode::start().await;
    let (mut client, _) = Client::connect_hello(&node.url()).await.unwrap();
    let exact = heartbeat_of_len(4096);
    assert_eq!(exact.len(), 4096);
    client.send_text(&exact).await.unwrap();
    client.expect_f(FunctionCode::Heartbeat).await.unwrap();

    let over = heartbeat_of_len(4097);
    client.send_text(&over).await.unwrap();
    expect_fatal(&mut client, 4006).await;
}

#[tokio::test]
async fn the_payload_limit_applies_to_fragmented_messages() {
    let node = TestNode::start().await;
    let (mut client, _) = Client::connect_hello(&node.url()).await.unwrap();
    // 4096 bytes in three fragments: accepted.
    let exact = heartbeat_of_len(4096);
    let (a, rest) = exact.as_bytes().split_at(1000);
    let (b, c) = rest.split_at(2000);
    client.send_frame(false, OpCode::Text, a).await.unwrap();
    client
        .send_frame(false, OpCode::Continuation, b)
        .await
        .unwrap();
    client
        .send_frame(true, OpCode::Continuation, c)
        .await
        .unwrap();
    client.expect_f(FunctionCode::Heartbeat).await.unwrap();
    // 4097 bytes, fragments of 1000: refused once the total passes 4096,
    // before the last fragment is even sent.
    let over = heartbeat_of_len(4097);
    let chunks: Vec<_> = over.as_bytes().chunks(1000).collect();
    for chunk in &chunks[..chunks.len() - 1] {
        client
            .send_frame(
                false,
                if std::ptr::eq(*chunk, chunks[0]) {
                    OpCode::Text
                } else {
                    OpCode::Continuation
                },
                chunk,
            )
            .await
            .unwrap();
    }
    let _ = client
        .send_frame(true, OpCode::Continuation, chunks[chunks.len() - 1])
        .await;
    expect_fatal(&mut client, 4006).await;
}

#[tokio::test]
async fn unknown_and_dispatch_only_events_get_4010() {
    let node = TestNode::start().await;
    let mut peer = Peer::join(&node, "events").await;
    for (i, t) in [
        "NOPE",
        "ROOM_USER_ADD",
        "ROOM_USER_REMOVE",
        "GATEWAY_DOWN",
        "message_create",
    ]
    .iter()
    .enumerate()
    {
        peer.execute_s(t, json!({}), i as u64).await;
        let err = peer.error().await;
        assert_eq!(
            (err.c, err.d, err.s, err.t.as_deref()),
            (4010, false, Some(i as i64), Some(*t))
        );
    }
    peer.client
        .send_text(r#"{"f":130,"cnf":{}}"#)
        .await
        .unwrap();
    let err = peer.error().await;
    assert_eq!((err.c, err.d, err.t), (4010, false, None));
    // `e` is accepted in place of `t`.
    peer.client
        .send_text(r#"{"f":130,"e":"CHANNEL_MOVE","cnf":{"channel":"general"}}"#)
        .await
        .unwrap();
    peer.dispatch(gateway_shared::Event::ChannelMove).await;
}

#[tokio::test]
async fn invalid_event_data_gets_4011_and_keeps_the_connection() {
    let node = TestNode::start().await;
    let mut admin = Peer::admin(&node, "root").await;
    let long = "x".repeat(2001);
    let cases = [
        ("MESSAGE_CREATE", json!({})),
        ("MESSAGE_CREATE", json!({"content": ""})),
        ("MESSAGE_CREATE", json!({"content": long})),
        ("MESSAGE_CREATE", json!({"content": 5})),
        (
            "MESSAGE_CREATE",
            json!({"content": "x", "nonce": "n".repeat(65)}),
        ),
        ("MESSAGE_CREATE", json!({"content": "x", "nonce": 1})),
        ("MESSAGE_CREATE", json!("just a string")),
        ("MESSAGE_CREATE", json!(7)),
        // An event that takes no fields still wants an object (or none).
        ("START_TYPING", json!("x")),
        ("START_TYPING", json!(3)),
        ("MESSAGE_DELETE", json!({})),
        ("MESSAGE_DELETE", json!({"id": 12})),
        ("MESSAGE_DELETE", json!({"id": "12a"})),
        ("CHANNEL_ADD", json!({"name": "Bad Name"})),
        ("CHANNEL_ADD", json!({"name": "-x"})),
        ("CHANNEL_ADD", json!({"name": "x".repeat(33)})),
        (
            "CHANNEL_ADD",
            json!({"name": "ok", "topic": "t".repeat(257)}),
        ),
        ("CHANNEL_ADD", json!({})),
        ("CHANNEL_MOVE", json!({})),
        ("CHANNEL_MOVE", json!({"channel": 1})),
        ("SYSTEM_BAN_ADD", json!({})),
        ("SYSTEM_BAN_ADD", json!({"user_id": admin.user_id})),
        ("SYSTEM_BAN_ADD", json!({"user_id": "u", "duration_s": 0})),
        ("SYSTEM_BAN_ADD", json!({"user_id": "u", "duration_s": 1.5})),
        // Longer than 100 years (of 365 days).
        (
            "SYSTEM_BAN_ADD",
            json!({"user_id": "u", "duration_s": 100_i64 * 365 * 86_400 + 1}),
        ),
        (
            "SYSTEM_BAN_ADD",
            json!({"user_id": "u", "reason": "r".repeat(257)}),
        ),
        ("SYSTEM_BAN_REMOVE", json!({})),
    ];
    for (i, (t, cnf)) in cases.into_iter().enumerate() {
        admin.execute_s(t, cnf.clone(), i as u64).await;
        let err = admin.error().await;
        assert_eq!(
            (err.c, err.d, err.s, err.t.as_deref()),
            (4011, false, Some(i as i64), Some(t)),
            "{t} {cnf}"
        );
    }
    admin.say("still connected").await;
}

#[tokio::test]
async fn a_cnf_that_is_not_an_object_is_4011_for_every_event() {
    let node = TestNode::start().await;
    let mut admin = Peer::admin(&node, "root").await;
    let events = [
        "MESSAGE_CREATE",
        "MESSAGE_DELETE",
        "START_TYPING",
        "CHANNEL_ADD",
        "CHANNEL_MOVE",
        "SYSTEM_BAN_ADD",
        "SYSTEM_BAN_REMOVE",
    ];
    for (i, t) in events.into_iter().enumerate() {
        for cnf in [json!("text"), json!(12)] {
            admin.execute_s(t, cnf.clone(), i as u64).await;
            let err = admin.error().await;
            assert_eq!(
                (err.c, err.d, err.s, err.t.as_deref(), err.m.as_deref()),
                (
                    4011,
                    false,
                    Some(i as i64),
                    Some(t),
                    Some("cnf must be an object")
                ),
                "{t} {cnf}"
            );
        }
    }
    admin.say("still connected").await;
}

#[tokio::test]
async fn any_64_bit_s_on_a_130_is_echoed_unchanged() {
    let node = TestNode::start().await;
    let mut peer = Peer::join(&node, "echo").await;
    for s in [-7, i64::MIN, i64::MAX] {
        let text = json!({"f": 130, "t": "MESSAGE_CREATE", "s": s, "cnf": {}}).to_string();
        peer.client.send_texts(&[text]).await.unwrap();
        let msg = peer.wait_for(|m| m.f != 130).await;
        let err = msg.error().expect("an error");
        assert_eq!(
            (err.c, err.d, err.s),
            (4011, false, Some(s)),
            "{}",
            msg.text
        );
    }
    peer.say("still connected").await;
}

#[tokio::test]
async fn permission_not_found_and_exists_errors_are_not_fatal() {
    let node = TestNode::start().await;
    let mut peer = Peer::join(&node, "user").await;
    let room = fresh_channel("dup");
    peer.execute_s("SYSTEM_BAN_ADD", json!({"user_id": "x"}), 1)
        .await;
    assert_eq!(peer.error().await.c, 4012);
    peer.execute_s("SYSTEM_BAN_REMOVE", json!({"user_id": "x"}), 2)
        .await;
    assert_eq!(peer.error().await.c, 4012);
    for name in ["nope-nope", "Not Valid"] {
        peer.execute_s("CHANNEL_MOVE", json!({"channel": name}), 3)
            .await;
        let err = peer.error().await;
        assert_eq!((err.c, err.d, err.s), (4013, false, Some(3)));
    }
    peer.execute("MESSAGE_DELETE", json!({"id": "123"})).await;
    assert_eq!(peer.error().await.c, 4013);
    let id = peer.say("here").await["id"].clone();
    peer.create_and_move(&room).await;
    peer.execute("MESSAGE_DELETE", json!({"id": id})).await;
    assert_eq!(peer.error().await.c, 4013, "an id of another channel");
    peer.execute("CHANNEL_ADD", json!({"name": room})).await;
    let err = peer.error().await;
    assert_eq!((err.c, err.d), (4014, false));
    peer.say("still here").await;
}

#[tokio::test]
async fn the_channel_limit_is_enforced() {
    let node = TestNode::with(|c| c.max_channels = 2).await;
    let mut peer = Peer::join(&node, "user").await;
    peer.execute("CHANNEL_ADD", json!({"name": fresh_channel("one")}))
        .await;
    peer.dispatch(gateway_shared::Event::ChannelAdd).await;
    peer.execute("CHANNEL_ADD", json!({"name": fresh_channel("two")}))
        .await;
    assert_eq!(peer.error().await.c, 4012);
}

#[tokio::test]
async fn new_sessions_over_a_users_budget_get_4008_and_resumes_do_not_count() {
    let node = TestNode::with(|c| c.session_starts_per_user = 2).await;
    let url = node.url();
    let (token, _) = user_token("starter");
    let (_first, ready) = Client::connect_present(&url, &token).await.unwrap();
    let (_second, _) = Client::connect_present(&url, &token).await.unwrap();
    // A third new session is refused, and the connection stays open.
    let (mut third, _) = Client::connect_hello(&url).await.unwrap();
    let present = json!({"f": 110, "cnf": {"token": token}}).to_string();
    third.send_text(&present).await.unwrap();
    let msg = third.expect_f(FunctionCode::Error).await.unwrap();
    let err = msg.error().unwrap();
    assert_eq!((err.c, err.d), (4008, false), "{}", msg.text);
    // A resume is not a new session: it is not counted.
    let resumed = third
        .present(&token, Some((ready.session_id, Some(0))))
        .await
        .unwrap();
    assert!(resumed.resumed);
    // Another user has a budget of their own.
    Client::connect_present(&url, &user_token("other").0)
        .await
        .unwrap();
}

#[tokio::test]
async fn executes_over_the_budget_get_4008_and_are_dropped() {
    let node = TestNode::with(|c| {
        c.rate_limit_count = 5;
        c.rate_limit_window_s = 3600;
    })
    .await;
    let mut peer = Peer::join(&node, "spammer").await;
    peer.create_and_move(&fresh_channel("spam")).await; // takes 2 tokens
    for i in 0..4 {
        peer.execute_s("MESSAGE_CREATE", json!({"content": format!("m{i}")}), i)
            .await;
    }
    // 3 tokens were left: m0..m2 pass, m3 is refused.
    let mut delivered = 0;
    loop {
        let msg = peer.next().await.unwrap();
        if let Some(err) = msg.error() {
            assert_eq!(
                (err.c, err.d, err.s, err.t.as_deref()),
                (4008, false, Some(3), Some("MESSAGE_CREATE"))
            );
            break;
        }
        delivered += 1;
    }
    assert!(delivered <= 3);
    // Heartbeats take no token and the connection stays open.
    peer.client.heartbeat().await.unwrap();
    peer.wait_for(|m| m.f == 120).await;
}

/// Requests in the burst below, all sent in one write.
const BURST: usize = 1000;
/// Rate-limit tokens of a session in the burst tests: the requests past
/// them get 4008.
const BURST_BUDGET: u32 = 600;
/// Bursts per test: the reader outrunning the writer is a race, and one
/// burst does not always lose it.
const BURST_ROUNDS: usize = 10;

fn burst_limits(c: &mut gateway_node::config::Config) {
    c.rate_limit_count = BURST_BUDGET;
    // No refill while the test runs: which requests get 4008 is exact.
    c.rate_limit_window_s = u32::MAX;
}

/// One fresh session sends `BURST` executes in one write, each earning a
/// non-fatal error: a bad `cnf` (4011) and an unknown event (4010) in
/// turn, 4008 once the budget is spent. Every answer comes, in order, and
/// the connection still answers a heartbeat.
async fn a_burst_of_failing_requests_is_answered_in_order(node: &TestNode) {
    let mut peer = Peer::join(node, "burst").await;
    let mut texts = Vec::with_capacity(BURST);
    let mut expected = Vec::with_capacity(BURST);
    for i in 0..BURST {
        let (text, code) = if i % 2 == 0 {
            (
                json!({"f": 130, "t": "MESSAGE_CREATE", "s": i, "cnf": {"content": 5}}),
                4011,
            )
        } else {
            (json!({"f": 130, "t": "NOPE", "s": i, "cnf": {}}), 4010)
        };
        texts.push(text.to_string());
        expected.push(if i < BURST_BUDGET as usize {
            code
        } else {
            4008
        });
    }
    peer.client.send_texts(&texts).await.unwrap();
    for (i, code) in expected.into_iter().enumerate() {
        // Presence dispatches of other sessions may come in between.
        let msg = peer.wait_for(|m| m.f != 130).await;
        let err = msg
            .error()
            .unwrap_or_else(|| panic!("answer {i} is not an error: {}", msg.text));
        assert_eq!(
            (err.c, err.d, err.s),
            (code, false, Some(i as i64)),
            "answer {i}: {}",
            msg.text
        );
    }
    peer.client.heartbeat().await.unwrap();
    let msg = peer.wait_for(|m| m.f != 130).await;
    assert_eq!(msg.f, 120, "{}", msg.text);
}

#[tokio::test]
async fn a_burst_of_failing_requests_is_answered_in_order_and_keeps_the_connection() {
    let node = TestNode::with(burst_limits).await;
    for _ in 0..BURST_ROUNDS {
        a_burst_of_failing_requests_is_answered_in_order(&node).await;
    }
}

#[tokio::test]
async fn a_burst_of_failing_requests_is_answered_in_order_on_redis() {
    let redis = crate::redis_server::RedisServer::start();
    let url = redis.url();
    let node = TestNode::with(|c| {
        c.redis_url = Some(url);
        burst_limits(c);
    })
    .await;
    for _ in 0..BURST_ROUNDS {
        a_burst_of_failing_requests_is_answered_in_order(&node).await;
    }
}
