//! The server API (`/api/v1/`, docs/PROTOCOL.md section 8, "Server API"):
//! every operation on the in-memory backend, the same ones across two nodes
//! on one real Redis (any node serves any call), keys, validation, size
//! limits, metrics, and the OpenAPI document against the served routes.

use crate::cluster::Store;
use crate::harness::*;
use gateway_shared::protocol::Event;
use gateway_shared::{Client, ClientError};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const KEY: &str = "first-api-key-0123456789";
const ROTATED: &str = "second-api-key-0123456789";

/// An answer of the API.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The `error.code` of an error answer, checking its shape.
    fn code(&self) -> String {
        let body = self.json();
        assert!(body["error"]["message"].is_string(), "{}", self.body);
        body["error"]["code"].as_str().unwrap().to_owned()
    }
}

/// One HTTP/1.1 request on its own connection. `key` goes in
/// `Authorization: Bearer`; a `body` is sent as `content_type`.
async fn request(
    node: &TestNode,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<(&str, &[u8])>,
) -> Answer {
    let mut stream = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
        node.addr
    );
    if let Some(key) = key {
        head.push_str(&format!("Authorization: Bearer {key}\r\n"));
    }
    let (content_type, bytes) = body.unwrap_or(("", b""));
    if body.is_some() {
        head.push_str(&format!(
            "Content-Type: {content_type}\r\nContent-Length: {}\r\n",
            bytes.len()
        ));
    } else if method != "GET" {
        head.push_str("Content-Length: 0\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.unwrap();
    // A refused body may be answered before it is all sent.
    let _ = stream.write_all(bytes).await;
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    let mut lines = head.lines();
    let status = lines.next().unwrap()[9..12].parse().unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(n, v)| (n.to_owned(), v.to_owned()))
        .collect();
    Answer {
        status,
        headers,
        body: body.to_owned(),
    }
}

async fn get(node: &TestNode, path: &str) -> Answer {
    request(node, "GET", path, Some(KEY), None).await
}

async fn send(node: &TestNode, method: &str, path: &str, body: Value) -> Answer {
    let body = body.to_string();
    request(
        node,
        method,
        path,
        Some(KEY),
        Some(("application/json", body.as_bytes())),
    )
    .await
}

async fn api_node() -> TestNode {
    TestNode::with(|c| c.api_keys = Some(format!("{KEY},{ROTATED}"))).await
}

/// Creates a channel through the API.
async fn create_channel(node: &TestNode, name: &str) {
    let created = send(node, "POST", "/api/v1/channels", json!({"name": name})).await;
    assert_eq!(created.status, 201, "{}", created.body);
}

/// Publishes through the API; returns the message as answered.
async fn publish(node: &TestNode, channel: &str, content: &str) -> Value {
    let path = format!("/api/v1/channels/{channel}/messages");
    let answer = send(node, "POST", &path, json!({"content": content})).await;
    assert_eq!(answer.status, 201, "{}", answer.body);
    answer.json()
}

#[tokio::test]
async fn with_no_key_the_api_is_off_and_says_so() {
    let node = TestNode::start().await;
    for path in ["/api/v1/channels", "/api/v1/openapi.json", "/api/v1/nope"] {
        let answer = request(&node, "GET", path, Some(KEY), None).await;
        assert_eq!(answer.status, 404, "{path}");
        assert_eq!(answer.code(), "api_disabled");
    }
}

#[tokio::test]
async fn calls_need_one_of_the_configured_keys() {
    let node = api_node().await;
    let none = request(&node, "GET", "/api/v1/channels", None, None).await;
    assert_eq!(none.status, 401);
    assert_eq!(none.code(), "unauthorized");
    assert!(none
        .header("www-authenticate")
        .unwrap()
        .starts_with("Bearer"));
    for wrong in ["wrong-key-0123456789abc", "first-api-key-012345678", ""] {
        let answer = request(&node, "GET", "/api/v1/channels", Some(wrong), None).await;
        assert_eq!(answer.status, 401, "{wrong:?}");
    }
    // Both keys of a rotation work.
    for key in [KEY, ROTATED] {
        let answer = request(&node, "GET", "/api/v1/channels", Some(key), None).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
    }
    // Another scheme is not a bearer key.
    let mut stream = tokio::net::TcpStream::connect(node.addr).await.unwrap();
    stream
        .write_all(
            format!("GET /api/v1/channels HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {KEY}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    assert!(raw.starts_with("HTTP/1.1 401"), "{raw}");
}

/// A published message takes the next place among the client's messages:
/// `member` (in `channel`, on any node) sees `say`, the API's message and
/// `say` again in that order, numbered with no gap (`Peer::next` checks).
async fn published_message_is_ordered_with_client_messages(
    api: &TestNode,
    member: &mut Peer,
    speaker: &mut Peer,
    channel: &str,
) {
    let first = speaker.say("from a client").await;
    let before_s = member.last_s;
    let published = publish(api, channel, "from the backend").await;
    assert_eq!(
        published["author"],
        json!({"id": "system", "name": "System"})
    );
    assert_eq!(published["channel"], channel);
    let third = speaker.say("from a client again").await;

    let got: Vec<Value> = {
        let mut got = Vec::new();
        while got.len() < 3 {
            let msg = member.dispatch(Event::MessageCreate).await;
            got.push(msg.cnf);
        }
        got
    };
    assert_eq!(got, vec![first.clone(), published.clone(), third.clone()]);
    assert!(member.last_s > before_s);
    let ids: Vec<u64> = got
        .iter()
        .map(|m| m["id"].as_str().unwrap().parse().unwrap())
        .collect();
    assert!(ids[0] < ids[1] && ids[1] < ids[2], "{ids:?}");
}

#[tokio::test]
async fn a_published_message_reaches_members_numbered_and_ordered_like_client_ones() {
    let node = api_node().await;
    let room = fresh_channel("pub");
    create_channel(&node, &room).await;
    let mut member = Peer::join(&node, "member").await;
    member.move_to(&room).await;
    let mut speaker = Peer::join(&node, "speaker").await;
    speaker.move_to(&room).await;
    member.dispatch(Event::RoomUserAdd).await;
    published_message_is_ordered_with_client_messages(&node, &mut member, &mut speaker, &room)
        .await;

    // A named author and a nonce, as a client's would be.
    let path = format!("/api/v1/channels/{room}/messages");
    let answer = send(
        &node,
        "POST",
        &path,
        json!({"content": "deploy done", "nonce": "n-1", "author": {"id": "ci", "name": "CI bot"}}),
    )
    .await;
    assert_eq!(answer.status, 201, "{}", answer.body);
    let got = member.dispatch(Event::MessageCreate).await.cnf;
    assert_eq!(got, answer.json());
    assert_eq!(got["author"], json!({"id": "ci", "name": "CI bot"}));
    assert_eq!(got["nonce"], "n-1");

    // Unknown fields are ignored, even integers beyond 64 bits; null is
    // absent, as in a client's cnf.
    let body = br#"{"content":"big","x":123456789012345678901234567890,"nonce":null}"#;
    let answer = request(
        &node,
        "POST",
        &path,
        Some(KEY),
        Some(("application/json", body)),
    )
    .await;
    assert_eq!(answer.status, 201, "{}", answer.body);
    assert!(answer.json().get("nonce").is_none());
}

/// Channels: create (CHANNEL_ADD to every session, on every node), a
/// second create is 409, and the list has it with its topic.
async fn channels_are_created_and_listed(api: &TestNode, watcher: &mut Peer) {
    let name = fresh_channel("made");
    let answer = send(
        api,
        "POST",
        "/api/v1/channels",
        json!({"name": name, "topic": "release notes"}),
    )
    .await;
    assert_eq!(answer.status, 201, "{}", answer.body);
    assert_eq!(answer.json()["created_by"]["id"], "system");
    let added = watcher.dispatch(Event::ChannelAdd).await.cnf;
    assert_eq!(added["name"], name.as_str());
    assert_eq!(added["topic"], "release notes");

    let again = send(api, "POST", "/api/v1/channels", json!({"name": name})).await;
    assert_eq!(again.status, 409);
    assert_eq!(again.code(), "channel_exists");

    let list = get(api, "/api/v1/channels").await;
    assert_eq!(list.status, 200);
    let channels = list.json()["channels"].as_array().unwrap().clone();
    assert!(channels.contains(&json!({"name": name, "topic": "release notes"})));
    assert!(channels.iter().any(|c| c["name"] == "general"));
}

/// History: newest first, `limit` per page, `next_cursor` passed back as
/// `before`, deleted messages left out; a delete reaches the channel.
async fn history_pages_newest_first_and_deletes(api: &TestNode, other: &TestNode) {
    let room = fresh_channel("hist");
    create_channel(api, &room).await;
    let mut member = Peer::join(other, "reader").await;
    member.move_to(&room).await;
    let mut ids = Vec::new();
    for i in 1..=6 {
        ids.push(publish(api, &room, &format!("m{i}")).await["id"].clone());
    }
    // Deleting m2, by any author: the API deletes as an admin would.
    let path = format!(
        "/api/v1/channels/{room}/messages/{}",
        ids[1].as_str().unwrap()
    );
    let deleted = request(api, "DELETE", &path, Some(KEY), None).await;
    assert_eq!(deleted.status, 204, "{}", deleted.body);
    let gone = member.dispatch(Event::MessageDelete).await.cnf;
    assert_eq!(gone, json!({"id": ids[1], "channel": room}));
    let again = request(api, "DELETE", &path, Some(KEY), None).await;
    assert_eq!(again.status, 404);
    assert_eq!(again.code(), "not_found");

    let page = |before: Option<String>| {
        let path = match before {
            None => format!("/api/v1/channels/{room}/messages?limit=2"),
            Some(b) => format!("/api/v1/channels/{room}/messages?limit=2&before={b}"),
        };
        async move { get(other, &path).await.json() }
    };
    let contents = |page: &Value| -> Vec<String> {
        page["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["content"].as_str().unwrap().to_owned())
            .collect()
    };
    let first = page(None).await;
    assert_eq!(first["channel"], room.as_str());
    assert_eq!(contents(&first), ["m6", "m5"]);
    let second = page(first["next_cursor"].as_str().map(str::to_owned)).await;
    assert_eq!(contents(&second), ["m4", "m3"]);
    assert_eq!(
        second["next_cursor"], ids[2],
        "the oldest message of the page"
    );
    let third = page(second["next_cursor"].as_str().map(str::to_owned)).await;
    assert_eq!(contents(&third), ["m1"]);
    assert!(third["next_cursor"].is_null(), "the last page says so");
    let all = get(other, &format!("/api/v1/channels/{room}/messages"))
        .await
        .json();
    assert_eq!(contents(&all), ["m6", "m5", "m4", "m3", "m1"]);
    assert!(all["next_cursor"].is_null());
    assert_eq!(all["messages"][0]["id"], ids[5]);
}

/// Presence: distinct users in the order they entered, `limit` per page,
/// an opaque `cursor`, the member count.
async fn presence_pages_in_join_order(api: &TestNode, other: &TestNode) {
    let room = fresh_channel("who");
    create_channel(api, &room).await;
    let mut peers = Vec::new();
    for (i, name) in ["ann", "ben", "cat"].iter().enumerate() {
        let node = if i % 2 == 0 { api } else { other };
        let mut peer = Peer::join(node, name).await;
        peer.move_to(&room).await;
        peers.push(peer);
    }
    // A second session of ann counts once, with 2 sessions.
    let (mut second, _) = Client::connect_present(&other.url(), &peers[0].token)
        .await
        .unwrap();
    second
        .execute("CHANNEL_MOVE", json!({"channel": room}), None)
        .await
        .unwrap();
    second
        .wait_for(|m| m.is_dispatch(Event::ChannelMove))
        .await
        .unwrap();

    let first = get(api, &format!("/api/v1/channels/{room}/presence?limit=2")).await;
    assert_eq!(first.status, 200, "{}", first.body);
    let first = first.json();
    assert_eq!(first["member_count"], 3);
    let ids = |page: &Value| -> Vec<String> {
        page["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["user"]["id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        ids(&first),
        [peers[0].user_id.clone(), peers[1].user_id.clone()]
    );
    assert_eq!(first["members"][0]["sessions"], 2);
    assert_eq!(first["members"][1]["sessions"], 1);
    let cursor = first["next_cursor"].as_str().unwrap();
    let second = get(
        other,
        &format!("/api/v1/channels/{room}/presence?limit=2&cursor={cursor}"),
    )
    .await
    .json();
    assert_eq!(ids(&second), [peers[2].user_id.clone()]);
    assert!(second["next_cursor"].is_null());

    let unknown = get(api, "/api/v1/channels/no-such-room/presence").await;
    assert_eq!(unknown.status, 404);
    let unknown = get(api, "/api/v1/channels/no-such-room/messages").await;
    assert_eq!(unknown.status, 404);
}

/// Ban through `api`: the user's session on `home` ends with 4015, a new
/// PRESENT on any node is refused; unban lets them in again.
async fn ban_and_unban(api: &TestNode, home: &TestNode) {
    let mut target = Peer::join(home, "target").await;
    let path = format!("/api/v1/bans/{}", target.user_id);
    let answer = send(
        api,
        "PUT",
        &path,
        json!({"reason": "spam", "duration_s": 3600}),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let ban = answer.json();
    assert_eq!(ban["user_id"], target.user_id.as_str());
    assert_eq!(ban["reason"], "spam");
    assert!(ban["until"].as_u64().unwrap() > 0);
    let err = target.error().await;
    assert_eq!((err.c, err.d), (4015, true));
    assert_eq!(target.closed().await, Some(4015));
    for node in [api, home] {
        let (mut c, _) = Client::connect_hello(&node.url()).await.unwrap();
        let err = c.present(&target.token, None).await.unwrap_err();
        assert!(
            matches!(err, ClientError::Gateway(ref e) if e.c == 4015),
            "{err:?}"
        );
    }
    let unbanned = request(api, "DELETE", &path, Some(KEY), None).await;
    assert_eq!(unbanned.status, 204, "{}", unbanned.body);
    let (_c, ready) = Client::connect_present(&home.url(), &target.token)
        .await
        .expect("unbanned user presents");
    assert!(!ready.resumed);
    // A ban without a body is permanent.
    let permanent = request(api, "PUT", &path, Some(KEY), None).await;
    assert_eq!(permanent.status, 200, "{}", permanent.body);
    assert!(permanent.json()["until"].is_null());
    request(api, "DELETE", &path, Some(KEY), None).await;
}

/// Disconnect through `api`: every session of the user, here on `home`
/// and on `api`, gets 4019 and ends (a resume starts over); another user's
/// session is untouched, and the user may connect again.
async fn disconnect_ends_every_session_of_the_user(api: &TestNode, home: &TestNode) {
    let mut there = Peer::join(home, "kicked").await;
    let mut here = Peer::present(&api.url(), there.token.clone(), there.user_id.clone()).await;
    let mut bystander = Peer::join(home, "bystander").await;
    let path = format!("/api/v1/users/{}/disconnect", there.user_id);
    let answer = request(api, "POST", &path, Some(KEY), None).await;
    assert_eq!(answer.status, 202, "{}", answer.body);
    assert_eq!(answer.json()["user_id"], there.user_id.as_str());
    for peer in [&mut there, &mut here] {
        let err = peer.error().await;
        assert_eq!((err.c, err.d), (4019, true));
        assert_eq!(peer.closed().await, Some(4019));
    }
    // The session is gone: a resume starts a new one.
    let (_c, ready) = there.resume_at(&home.url()).await;
    assert!(!ready.resumed);
    bystander.say("still here").await;
}

async fn cluster_info_lists_nodes_and_sessions(api: &TestNode, expect_nodes: usize) {
    let _peer = Peer::join(api, "counted").await;
    let answer = get(api, "/api/v1/cluster").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let info = answer.json();
    let nodes = info["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), expect_nodes, "{info}");
    assert!(nodes.iter().any(|n| n["sessions"].as_u64().unwrap() >= 1));
    let total: u64 = nodes.iter().map(|n| n["sessions"].as_u64().unwrap()).sum();
    assert_eq!(info["sessions"], total);
}

#[tokio::test]
async fn every_operation_on_the_memory_backend() {
    let node = api_node().await;
    let mut watcher = Peer::join(&node, "watcher").await;
    channels_are_created_and_listed(&node, &mut watcher).await;
    history_pages_newest_first_and_deletes(&node, &node).await;
    presence_pages_in_join_order(&node, &node).await;
    ban_and_unban(&node, &node).await;
    disconnect_ends_every_session_of_the_user(&node, &node).await;
    cluster_info_lists_nodes_and_sessions(&node, 1).await;
    assert_eq!(
        get(&node, "/api/v1/cluster").await.json()["backend"],
        "memory"
    );
}

/// Two nodes on `store` (one real Redis, or a Redis Cluster), each with
/// its own id.
async fn two_redis_nodes(store: &Store) -> (TestNode, TestNode) {
    let on = |id: &'static str| {
        move |c: &mut gateway_node::config::Config| {
            store.configure(c);
            c.node_id = Some(id.to_owned());
            c.api_keys = Some(format!("{KEY},{ROTATED}"));
        }
    };
    (
        TestNode::with(on("api-a")).await,
        TestNode::with(on("api-b")).await,
    )
}

/// Registry entries no node wrote (a timestamp at the end of time, one
/// that is not a number) are stale: left out and removed, not a crash.
#[tokio::test]
async fn registry_entries_no_node_wrote_are_dropped() {
    let store = Store::one();
    let (a, _b) = two_redis_nodes(&store).await;
    let nodes = "gw:{g}:nodes";
    store.cli(nodes, &["HSET", nodes, "future", "18446744073709551615 5"]);
    store.cli(nodes, &["HSET", nodes, "garbage", "soon 5"]);
    let answer = get(&a, "/api/v1/cluster").await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let ids: Vec<String> = answer.json()["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, ["api-a", "api-b"]);
    assert_eq!(store.cli(nodes, &["HEXISTS", nodes, "future"]).trim(), "0");
    assert_eq!(store.cli(nodes, &["HEXISTS", nodes, "garbage"]).trim(), "0");
}

#[tokio::test]
async fn any_node_serves_any_call_on_one_redis() {
    any_node_serves_any_call(&Store::one()).await;
}

#[tokio::test]
async fn any_node_serves_any_call_on_a_redis_cluster() {
    any_node_serves_any_call(&Store::cluster()).await;
}

async fn any_node_serves_any_call(store: &Store) {
    let (a, b) = two_redis_nodes(store).await;

    // Published through A, to a member on B, among a client's messages.
    let room = fresh_channel("far");
    create_channel(&a, &room).await;
    let mut member = Peer::join(&b, "member").await;
    member.move_to(&room).await;
    let mut speaker = Peer::join(&b, "speaker").await;
    speaker.move_to(&room).await;
    member.dispatch(Event::RoomUserAdd).await;
    published_message_is_ordered_with_client_messages(&a, &mut member, &mut speaker, &room).await;

    let mut watcher = Peer::join(&b, "watcher").await;
    channels_are_created_and_listed(&a, &mut watcher).await;
    history_pages_newest_first_and_deletes(&a, &b).await;
    presence_pages_in_join_order(&a, &b).await;
    // A ban through B ends the session on A.
    ban_and_unban(&b, &a).await;
    disconnect_ends_every_session_of_the_user(&b, &a).await;

    let info = get(&a, "/api/v1/cluster").await.json();
    assert_eq!(info["backend"], "redis");
    let ids: Vec<&str> = info["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["api-a", "api-b"], "{info}");
    // This node's own count is current.
    let own = &info["nodes"][0]["sessions"];
    assert!(own.as_u64().unwrap() >= 1, "{info}");

    // A drained node leaves the registry.
    b.shutdown().await;
    let info = get(&a, "/api/v1/cluster").await.json();
    assert_eq!(info["nodes"].as_array().unwrap().len(), 1, "{info}");
}

#[tokio::test]
async fn invalid_requests_get_the_websocket_rules_and_json_errors() {
    let node = api_node().await;
    let room = fresh_channel("val");
    create_channel(&node, &room).await;
    let messages = format!("/api/v1/channels/{room}/messages");
    let invalid = |answer: Answer, why: &str| {
        assert_eq!(answer.status, 400, "{why}: {}", answer.body);
        assert_eq!(answer.code(), "invalid_request", "{why}");
        answer.json()["error"]["message"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    // The same rules and messages as MESSAGE_CREATE over the WebSocket.
    let m = invalid(
        send(&node, "POST", &messages, json!({"content": ""})).await,
        "empty",
    );
    assert_eq!(m, "content must be 1-2000 characters");
    let long = "é".repeat(2001);
    invalid(
        send(&node, "POST", &messages, json!({"content": long})).await,
        "long",
    );
    invalid(
        send(&node, "POST", &messages, json!({"content": 5})).await,
        "type",
    );
    invalid(send(&node, "POST", &messages, json!({})).await, "missing");
    invalid(
        send(
            &node,
            "POST",
            &messages,
            json!({"content": "x", "nonce": "n".repeat(65)}),
        )
        .await,
        "nonce",
    );
    invalid(
        send(
            &node,
            "POST",
            &messages,
            json!({"content": "x", "author": {"id": ""}}),
        )
        .await,
        "author",
    );
    invalid(
        send(&node, "POST", &messages, json!([1])).await,
        "not an object",
    );
    let broken = request(
        &node,
        "POST",
        &messages,
        Some(KEY),
        Some(("application/json", b"{")),
    )
    .await;
    invalid(broken, "not JSON");
    let no_body = request(&node, "POST", &messages, Some(KEY), None).await;
    invalid(no_body, "no body");
    invalid(
        send(
            &node,
            "POST",
            "/api/v1/channels",
            json!({"name": "Bad Name"}),
        )
        .await,
        "channel name",
    );
    invalid(
        send(
            &node,
            "PUT",
            "/api/v1/bans/someone",
            json!({"duration_s": 0}),
        )
        .await,
        "duration",
    );
    let long_user = format!("/api/v1/bans/{}", "u".repeat(65));
    invalid(send(&node, "PUT", &long_user, json!({})).await, "user id");
    for query in ["limit=0", "limit=101", "limit=x", "before=abc"] {
        invalid(get(&node, &format!("{messages}?{query}")).await, query);
    }
    invalid(
        get(
            &node,
            &format!("/api/v1/channels/{room}/presence?cursor=-1"),
        )
        .await,
        "cursor",
    );
    invalid(
        request(&node, "DELETE", &format!("{messages}/12x"), Some(KEY), None).await,
        "message id",
    );

    // Not JSON, too large, unknown channel, route and method.
    let text = request(
        &node,
        "POST",
        &messages,
        Some(KEY),
        Some(("text/plain", b"hi")),
    )
    .await;
    assert_eq!(text.status, 415);
    assert_eq!(text.code(), "unsupported_media_type");
    let big = json!({"content": "x".repeat(1500), "pad": "y".repeat(3000)}).to_string();
    let big = request(
        &node,
        "POST",
        &messages,
        Some(KEY),
        Some(("application/json", big.as_bytes())),
    )
    .await;
    assert_eq!(big.status, 413);
    assert_eq!(big.code(), "payload_too_large");
    let nowhere = send(
        &node,
        "POST",
        "/api/v1/channels/nowhere/messages",
        json!({"content": "x"}),
    )
    .await;
    assert_eq!(nowhere.status, 404);
    assert_eq!(nowhere.code(), "not_found");
    let unknown = get(&node, "/api/v1/nope").await;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.code(), "not_found");
    let wrong = request(&node, "PATCH", "/api/v1/channels", Some(KEY), None).await;
    assert_eq!(wrong.status, 405);
    assert_eq!(wrong.code(), "method_not_allowed");
    assert_eq!(wrong.header("allow"), Some("GET, POST"));
}

#[tokio::test]
async fn api_requests_are_counted_by_route_template_and_status() {
    let node = api_node().await;
    publish(&node, "general", "counted").await;
    get(&node, "/api/v1/channels/no-such/presence").await;
    let (status, metrics) = http_get(&node.http("/metrics")).await;
    assert_eq!(status, 200);
    let counted = |route: &str, status: &str| {
        metrics.lines().any(|l| {
            l.starts_with("gateway_api_requests_total{")
                && l.contains(&format!(r#"route="{route}""#))
                && l.contains(&format!(r#"status="{status}""#))
                && l.ends_with(" 1")
        })
    };
    assert!(
        counted("/api/v1/channels/{channel}/messages", "201"),
        "{metrics}"
    );
    assert!(
        counted("/api/v1/channels/{channel}/presence", "404"),
        "{metrics}"
    );
    assert!(metrics.contains("gateway_api_request_duration_seconds_bucket"));
    // Series that saw nothing yet exist at zero (rate() alerts see them).
    assert!(metrics
        .lines()
        .any(|l| l.starts_with("gateway_api_requests_total{")
            && l.contains(r#"route="/api/v1/bans/{user_id}""#)
            && l.contains(r#"status="503""#)
            && l.ends_with(" 0")));
    assert!(!metrics.contains("no-such"), "raw paths are never labels");
}

#[tokio::test]
async fn the_openapi_document_and_the_served_routes_agree() {
    let node = api_node().await;
    let served = request(&node, "GET", "/api/v1/openapi.json", None, None).await;
    assert_eq!(served.status, 200, "the document needs no key");
    let doc = served.json();
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(
        doc,
        serde_json::from_str::<Value>(gateway_node::api::OPENAPI).unwrap(),
        "the served document is the one in the repository"
    );

    let methods = [
        "get", "put", "post", "delete", "patch", "head", "options", "trace",
    ];
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in methods {
            if item.get(method).is_some() {
                documented.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    let routed: BTreeSet<(String, String)> = gateway_node::api::ROUTES
        .iter()
        .map(|r| (r.method.to_owned(), r.template.to_owned()))
        .collect();
    assert_eq!(documented, routed, "documented routes == routed ones");
    // And each route's statuses (which the metrics start at zero).
    for route in gateway_node::api::ROUTES {
        let responses = doc["paths"][route.template][route.method.to_lowercase()]["responses"]
            .as_object()
            .unwrap();
        let documented: BTreeSet<u16> = responses.keys().map(|s| s.parse().unwrap()).collect();
        let declared: BTreeSet<u16> = route.statuses.iter().copied().collect();
        assert_eq!(documented, declared, "{} {}", route.method, route.template);
    }

    // And the node really serves each documented route: with no key it is
    // 401 (not 404 or 405), but the document itself.
    for (method, template) in &documented {
        let path = template
            .replace("{channel}", "general")
            .replace("{message_id}", "1")
            .replace("{user_id}", "someone");
        let answer = request(&node, method, &path, None, None).await;
        let public = doc["paths"][template][method.to_lowercase()]["security"] == json!([]);
        let want = if public { 200 } else { 401 };
        assert_eq!(answer.status, want, "{method} {path}: {}", answer.body);
        // Every documented error status of the operation is declared.
        let responses = &doc["paths"][template][method.to_lowercase()]["responses"];
        if !public {
            assert!(
                responses.get("401").is_some(),
                "{method} {template} documents 401"
            );
        }
    }
}

#[tokio::test]
async fn an_unreachable_backend_is_503_unavailable() {
    let mut store = Store::one();
    let (node, _other) = two_redis_nodes(&store).await;
    let Store::One(redis) = &mut store else {
        unreachable!()
    };
    redis.stop();
    for answer in [
        get(&node, "/api/v1/channels").await,
        send(
            &node,
            "POST",
            "/api/v1/channels/general/messages",
            json!({"content": "x"}),
        )
        .await,
        send(&node, "PUT", "/api/v1/bans/someone", json!({})).await,
    ] {
        assert_eq!(answer.status, 503, "{}", answer.body);
        assert_eq!(answer.code(), "unavailable");
        assert_eq!(answer.header("retry-after"), Some("1"));
    }
    // Recovery after Redis returns is the broker's, tested in cluster.rs
    // (redis_outage_gives_4018_then_recovers); the API uses the same calls.
}
