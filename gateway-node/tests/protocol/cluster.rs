//! Several nodes on one real Redis, or on a real Redis Cluster (three
//! masters, three replicas), behave as one gateway. Every test here runs
//! against both (modules `one_redis` and `redis_cluster` at the end), but
//! those that stop or empty a single Redis.

use crate::harness::*;
use crate::redis_server::{redis_cli, RedisCluster, RedisServer};
use gateway_shared::protocol::Event;
use gateway_shared::Client;
use serde_json::{json, Value};

/// The Redis that the nodes of a test share.
pub enum Store {
    One(RedisServer),
    Cluster(RedisCluster),
}

impl Store {
    pub fn one() -> Self {
        Self::One(RedisServer::start())
    }

    pub fn cluster() -> Self {
        Self::Cluster(RedisCluster::start())
    }

    /// `GATEWAY_REDIS_URL`: one URL, or the cluster's seeds.
    pub fn url(&self) -> String {
        match self {
            Self::One(r) => r.url(),
            Self::Cluster(c) => c.seed_urls(),
        }
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// A node's configuration for this store.
    pub fn configure(&self, config: &mut gateway_node::config::Config) {
        config.redis_url = Some(self.url());
        config.redis_cluster = self.is_cluster();
    }

    /// Runs a command with `redis-cli` where `key` lives.
    pub fn cli(&self, key: &str, args: &[&str]) -> String {
        match self {
            Self::One(r) => redis_cli(r.port, args),
            Self::Cluster(c) => redis_cli(c.master_for_key(key), args),
        }
    }

    /// The port of the server that holds `key`.
    pub fn server_for(&self, key: &str) -> u16 {
        match self {
            Self::One(r) => r.port,
            Self::Cluster(c) => c.master_for_key(key),
        }
    }

    /// Every server's port (masters and replicas).
    pub fn ports(&self) -> Vec<u16> {
        match self {
            Self::One(r) => vec![r.port],
            Self::Cluster(c) => c.running().collect(),
        }
    }

    /// Nodes subscribed to `topic` (sharded on a cluster).
    pub fn subscribers(&self, topic: &str) -> u64 {
        let which = if self.is_cluster() {
            "SHARDNUMSUB"
        } else {
            "NUMSUB"
        };
        let out = self.cli(topic, &["PUBSUB", which, topic]);
        out.lines().nth(1).unwrap_or("0").trim().parse().unwrap()
    }
}

async fn node_on(store: &Store, tune: impl FnOnce(&mut gateway_node::config::Config)) -> TestNode {
    TestNode::with(|c| {
        store.configure(c);
        tune(c);
    })
    .await
}

/// A message from a member on `a` reaches a member on `b` (in a fresh
/// channel), and returns the two members.
pub async fn message_crosses(a: &TestNode, b: &TestNode, tag: &str) -> (Peer, Peer) {
    let room = fresh_channel(tag);
    let mut alice = Peer::join(a, "alice").await;
    alice.create_and_move(&room).await;
    let mut bob = Peer::join(b, "bob").await;
    bob.move_to(&room).await;
    let sent = alice.say(&format!("{tag} across")).await;
    assert_eq!(bob.dispatch(Event::MessageCreate).await.cnf, sent);
    (alice, bob)
}

async fn two_nodes(store: &Store) -> (TestNode, TestNode) {
    (node_on(store, |_| {}).await, node_on(store, |_| {}).await)
}

async fn message_to_channel_reaches_members_on_the_other_node(store: &Store) {
    let (a, b) = two_nodes(store).await;
    let room = fresh_channel("x");
    let mut alice = Peer::join(&a, "alice").await;
    let mut bob = Peer::join(&b, "bob").await;
    alice.create_and_move(&room).await;
    let moved = bob.move_to(&room).await;
    assert_eq!(moved["member_count"], 2);
    let add = alice.dispatch(Event::RoomUserAdd).await.cnf;
    assert_eq!(add["user"]["id"], bob.user_id.as_str());

    let sent = alice.say("across").await;
    let got = bob.dispatch(Event::MessageCreate).await.cnf;
    assert_eq!(sent, got);
    let reply = bob.say("back").await;
    assert_eq!(alice.dispatch(Event::MessageCreate).await.cnf, reply);
    let first: u64 = sent["id"].as_str().unwrap().parse().unwrap();
    let second: u64 = reply["id"].as_str().unwrap().parse().unwrap();
    assert!(second > first);

    // History and deletes are cluster-wide too.
    bob.execute("MESSAGE_DELETE", json!({"id": sent["id"]}))
        .await;
    assert_eq!(bob.error().await.c, 4012);
    alice
        .execute("MESSAGE_DELETE", json!({"id": sent["id"]}))
        .await;
    assert_eq!(
        bob.dispatch(Event::MessageDelete).await.cnf["id"],
        sent["id"]
    );
    let again = bob.move_to(&room).await;
    let history: Vec<_> = again["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].clone())
        .collect();
    assert_eq!(history, [json!("back")]);

    // Typing crosses nodes and skips the sender.
    alice.execute("START_TYPING", json!({})).await;
    assert_eq!(
        bob.dispatch(Event::StartTyping).await.cnf["user"]["id"],
        alice.user_id.as_str()
    );
}

async fn channel_add_and_bans_reach_every_node(store: &Store) {
    let (a, b) = two_nodes(store).await;
    let mut admin = Peer::admin(&a, "root").await;
    let mut far = Peer::join(&b, "far").await;
    let name = fresh_channel("new");
    admin.execute("CHANNEL_ADD", json!({"name": name})).await;
    assert_eq!(
        far.dispatch(Event::ChannelAdd).await.cnf["name"],
        name.as_str()
    );
    admin.execute("CHANNEL_ADD", json!({"name": name})).await;
    assert_eq!(admin.error().await.c, 4014);
    let (_c, ready) = Client::connect_present(&b.url(), &user_token("late").0)
        .await
        .unwrap();
    assert!(ready.channels.contains(&name));

    admin
        .execute("SYSTEM_BAN_ADD", json!({"user_id": far.user_id}))
        .await;
    admin.dispatch(Event::SystemBanAdd).await;
    let err = far.error().await;
    assert_eq!((err.c, err.d), (4015, true));
    assert_eq!(far.closed().await, Some(4015));
    for node in [&a, &b] {
        let (mut c, _) = Client::connect_hello(&node.url()).await.unwrap();
        let err = c.present(&far.token, None).await.unwrap_err();
        assert!(
            matches!(err, gateway_shared::ClientError::Gateway(ref e) if e.c == 4015),
            "{err:?}"
        );
    }
}

/// Resumes `peer`'s session on `node` after its connection dropped.
async fn resume_on(node: &TestNode, peer: Peer) -> Peer {
    let Peer {
        client,
        token,
        user_id,
        last_s,
        ready,
        ..
    } = peer;
    client.abort();
    let (mut client, _) = Client::connect_hello(&node.url()).await.unwrap();
    let ready2 = client
        .present(&token, Some((ready.session_id, Some(last_s))))
        .await
        .unwrap();
    assert!(ready2.resumed, "resume of {} failed", ready.session_id);
    assert_eq!(ready2.session_id, ready.session_id);
    Peer {
        client,
        ready: ready2,
        token,
        user_id,
        last_s,
    }
}

async fn resume_on_the_other_node_replays_what_was_missed(store: &Store) {
    let (a, b) = two_nodes(store).await;
    let room = fresh_channel("hop");
    let mut alice = Peer::join(&b, "alice").await;
    let mut bob = Peer::join(&a, "bob").await;
    alice.create_and_move(&room).await;
    bob.move_to(&room).await;
    alice.say("seen").await;
    bob.dispatch(Event::MessageCreate).await;
    // Bob's connection drops; he comes back on node b while alice talks.
    let talker = tokio::spawn(async move {
        for i in 0..20 {
            alice.say(&format!("m{i}")).await;
        }
        alice
    });
    let mut bob = resume_on(&b, bob).await;
    let mut alice = talker.await.unwrap();
    alice.say("after").await;
    let mut contents = Vec::new();
    loop {
        let msg = bob.next().await.unwrap();
        if msg.is_dispatch(Event::MessageCreate) {
            let content = msg.cnf["content"].as_str().unwrap().to_owned();
            contents.push(content.clone());
            if content == "after" {
                break;
            }
        }
    }
    let expected: Vec<String> = (0..20)
        .map(|i| format!("m{i}"))
        .chain(["after".to_owned()])
        .collect();
    assert_eq!(contents, expected, "every message once, in order");
}

async fn a_resume_ahead_of_the_session_elsewhere_starts_a_new_one(store: &Store) {
    let (a, b) = two_nodes(store).await;
    let room = fresh_channel("ahead");
    let mut alice = Peer::join(&b, "alice").await;
    let mut bob = Peer::join(&a, "bob").await;
    alice.create_and_move(&room).await;
    bob.move_to(&room).await;
    let ahead = (bob.session_id(), bob.last_s + 100);
    bob.client.abort();
    crate::resume::resume_ahead_is_a_new_session(&b.url(), &bob.token, ahead, &mut alice).await;
}

/// Only a channel's last `history_retain` messages can be deleted.
async fn a_message_past_the_retained_history_cannot_be_deleted(store: &Store) {
    let node = node_on(store, |c| c.history_retain = 50).await;
    crate::events::only_retained_messages_can_be_deleted(&node, 50).await;
}

async fn resume_elsewhere_closes_the_old_connection_with_4017(store: &Store) {
    let (a, b) = two_nodes(store).await;
    let mut old = Peer::join(&a, "dup").await;
    let (mut client, _) = Client::connect_hello(&b.url()).await.unwrap();
    let ready = client
        .present(&old.token, Some((old.session_id(), Some(0))))
        .await
        .unwrap();
    assert!(ready.resumed);
    let err = old.error().await;
    assert_eq!((err.c, err.d), (4017, true));
    assert_eq!(old.closed().await, Some(4017));
}

async fn another_users_session_cannot_be_resumed_on_any_node(store: &Store) {
    let (a, b) = two_nodes(store).await;
    let victim = Peer::join(&a, "victim").await;
    let (mut c, _) = Client::connect_hello(&b.url()).await.unwrap();
    let err = c
        .present(&user_token("thief").0, Some((victim.session_id(), None)))
        .await
        .unwrap_err();
    assert!(
        matches!(err, gateway_shared::ClientError::Gateway(ref e) if e.c == 4004),
        "{err:?}"
    );
    // Unknown sessions start anew.
    let (mut c, _) = Client::connect_hello(&b.url()).await.unwrap();
    assert!(
        !c.present(&user_token("x").0, Some((1 << 40, None)))
            .await
            .unwrap()
            .resumed
    );
}

/// A parked session whose stored numbers no node could have written (a
/// sequence number at the end of `u64`) resumes as a new session instead
/// of overflowing.
#[tokio::test]
async fn a_parked_session_with_impossible_numbers_resumes_as_new() {
    let store = Store::one();
    let (a, b) = two_nodes(&store).await;
    let mut bob = Peer::join(&a, "bob").await;
    let drain = tokio::spawn(a.shutdown());
    bob.dispatch(Event::GatewayDown).await;
    assert_eq!(bob.closed().await, Some(1012));
    drain.await.unwrap();
    let key = format!("gw:{{s:{}}}", bob.session_id());
    assert_eq!(store.cli(&key, &["HGET", &key, "state"]).trim(), "parked");
    store.cli(&key, &["HSET", &key, "seq", "18446744073709551615"]);
    let (mut client, ready) = bob.resume_at(&b.url()).await;
    assert!(!ready.resumed);
    assert_ne!(ready.session_id, bob.session_id());
    client.heartbeat().await.unwrap();
}

async fn drain_parks_sessions_and_they_resume_elsewhere_without_loss(store: &Store) {
    let (a, b) = two_nodes(store).await;
    let room = fresh_channel("drain");
    let mut talker = Peer::join(&b, "talker").await;
    talker.create_and_move(&room).await;
    let mut listeners = Vec::new();
    for i in 0..5 {
        let mut p = Peer::join(&a, &format!("l{i}")).await;
        p.move_to(&room).await;
        listeners.push(p);
    }
    talker.say("before").await;
    let drain = tokio::spawn(a.shutdown());
    for p in &mut listeners {
        p.dispatch(Event::GatewayDown).await;
        assert_eq!(p.closed().await, Some(1012));
    }
    drain.await.unwrap();
    for i in 0..10 {
        talker.say(&format!("while-{i}")).await;
    }
    for p in listeners {
        let mut p = resume_on(&b, p).await;
        let mut seen = Vec::new();
        while seen.last().map(String::as_str) != Some("while-9") {
            let msg = p.next().await.unwrap();
            if msg.is_dispatch(Event::MessageCreate) {
                seen.push(msg.cnf["content"].as_str().unwrap().to_owned());
            }
        }
        let expected: Vec<String> = std::iter::once("before".to_owned())
            .chain((0..10).map(|i| format!("while-{i}")))
            .collect();
        // `before` may have been read before the drain; the rest must all come.
        let tail = &expected[expected.len() - seen.len().min(expected.len())..];
        assert!(seen.ends_with(&expected[1..]), "{seen:?}");
        assert_eq!(seen, tail);
    }
    let (_, metrics) = http_get(&b.http("/metrics")).await;
    assert!(
        metrics.contains(r#"gateway_resumes_total{result="parked",node="#),
        "{metrics}"
    );
}

#[tokio::test]
async fn redis_outage_gives_4018_then_recovers() {
    let mut store = Store::one();
    let node = node_on(&store, |_| {}).await;
    let Store::One(redis) = &mut store else {
        unreachable!()
    };
    let room = fresh_channel("outage");
    let mut alice = Peer::join(&node, "alice").await;
    alice.create_and_move(&room).await;
    redis.stop();
    alice
        .execute_s("MESSAGE_CREATE", json!({"content": "lost?"}), 5)
        .await;
    let err = alice.error().await;
    assert_eq!((err.c, err.d, err.s), (4018, false, Some(5)));
    let (status, _) = http_get(&node.http("/readyz")).await;
    assert_eq!(status, 503);
    // A PRESENT that needs the backend is refused, not fatally.
    let (mut late, _) = Client::connect_hello(&node.url()).await.unwrap();
    let (late_token, _) = user_token("late");
    let err = late.present(&late_token, None).await.unwrap_err();
    assert!(
        matches!(err, gateway_shared::ClientError::Gateway(ref e) if e.c == 4018 && !e.d),
        "{err:?}"
    );
    redis.restart();
    // The node reconnects by itself: wait until it is ready again.
    until_status(&node, "/readyz", 200).await;
    assert_eq!(alice.say("back").await["content"], "back");
    // The refused client presents again on the same connection.
    assert!(!late.present(&late_token, None).await.unwrap().resumed);
    let mut bob = Peer::join(&node, "bob").await;
    bob.move_to(&room).await;
    alice.say("both").await;
    assert_eq!(
        bob.dispatch(Event::MessageCreate).await.cnf["content"],
        "both"
    );
}

/// A node in its own process, to be killed with SIGKILL.
struct NodeProcess {
    child: std::process::Child,
    url: String,
}

impl NodeProcess {
    fn start(store: &Store, resume_window_s: u64) -> Self {
        use std::io::BufRead;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_gateway-node"))
            .arg("serve")
            .env("GATEWAY_LISTEN", format!("127.0.0.1:{port}"))
            .env("GATEWAY_REDIS_URL", store.url())
            .env("GATEWAY_REDIS_CLUSTER", store.is_cluster().to_string())
            .env("GATEWAY_JWT_SECRET", SECRET)
            .env("GATEWAY_RESUME_WINDOW_S", resume_window_s.to_string())
            .env("GATEWAY_NODE_ID", format!("doomed-{port}"))
            .env("GATEWAY_LOG", "info")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        loop {
            match lines.next() {
                Some(Ok(line)) if line.contains("listening") => break,
                Some(Ok(_)) => continue,
                _ => panic!("node process exited before listening"),
            }
        }
        std::thread::spawn(move || for _ in lines {});
        Self {
            child,
            url: format!("ws://127.0.0.1:{port}/gateway"),
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn a_killed_nodes_sessions_resume_as_new_and_leave_their_channels(store: &Store) {
    let survivor = node_on(store, |c| c.resume_window_s = 2).await;
    let mut doomed = NodeProcess::start(store, 2);
    let room = fresh_channel("crash");
    let mut watcher = Peer::join(&survivor, "watcher").await;
    watcher.create_and_move(&room).await;
    let (token, user_id) = user_token("victim");
    let mut victim = Peer::present(&doomed.url, token, user_id).await;
    victim.move_to(&room).await;
    watcher.dispatch(Event::RoomUserAdd).await;
    watcher.say("hello").await;
    victim.dispatch(Event::MessageCreate).await;

    doomed.child.kill().unwrap(); // SIGKILL: no drain, nothing parked
    doomed.child.wait().unwrap();
    assert_eq!(victim.closed().await, None, "the socket just dropped");

    // Its session resumes as a new one on the survivor: never a silent gap.
    let (mut client, _) = Client::connect_hello(&survivor.url()).await.unwrap();
    let ready = client
        .present(
            &victim.token,
            Some((victim.session_id(), Some(victim.last_s))),
        )
        .await
        .unwrap();
    assert!(!ready.resumed);
    assert_ne!(ready.session_id, victim.session_id());

    // The dead session's presence expires and is swept, once.
    let left = watcher
        .wait_for(|m| {
            m.is_dispatch(Event::RoomUserRemove) && m.cnf["session_id"] == victim.session_id()
        })
        .await;
    assert_eq!(left.cnf["user"]["id"], victim.user_id.as_str());
}

/// Scores (expiry times) of a channel's presence entries, by session id.
fn presence_expiries(store: &Store, room: &str) -> std::collections::HashMap<String, u64> {
    let key = format!("gw:{{c:{room}}}:presence");
    let out = store.cli(&key, &["ZRANGE", &key, "0", "-1", "WITHSCORES"]);
    let words: Vec<&str> = out.split_whitespace().collect();
    words
        .chunks(2)
        .filter(|pair| pair.len() == 2)
        .map(|pair| (pair[0].to_owned(), pair[1].parse().unwrap()))
        .collect()
}

async fn every_live_members_presence_is_refreshed(store: &Store) {
    // A short window: upkeep rounds every 500 ms.
    let node = node_on(store, |c| c.resume_window_s = 2).await;
    let room = fresh_channel("refresh");
    let mut peers = Vec::new();
    for name in ["a", "b", "c"] {
        let mut peer = Peer::join(&node, name).await;
        if peers.is_empty() {
            peer.create_and_move(&room).await;
        } else {
            peer.move_to(&room).await;
        }
        peers.push(peer);
    }
    let first = presence_expiries(store, &room);
    assert_eq!(first.len(), 3, "{first:?}");
    // Refreshed together (one ZADD for the channel): every entry's expiry
    // moves forward, none is swept as expired.
    eventually("every member's expiry moves forward", || {
        let now = presence_expiries(store, &room);
        assert_eq!(now.len(), 3, "no live member swept: {now:?}");
        first.iter().all(|(id, &t)| now[id] > t).then_some(())
    })
    .await;
}

async fn a_node_subscribes_to_a_channel_only_while_it_has_members_there(store: &Store) {
    let node = node_on(store, |_| {}).await;
    let room = fresh_channel("subs");
    let mut peer = Peer::join(&node, "p").await;
    let topic = format!("gw:{{c:{room}}}");
    assert_eq!(store.subscribers(&topic), 0);
    peer.create_and_move(&room).await;
    assert_eq!(store.subscribers(&topic), 1);
    peer.move_to("general").await;
    // Unsubscribing is batched: it happens within a few seconds.
    eventually("unsubscribed", || {
        (store.subscribers(&topic) == 0).then_some(())
    })
    .await;
}

async fn a_node_that_joins_later_does_not_replay_old_cluster_events(store: &Store) {
    let a = node_on(store, |_| {}).await;
    let mut admin = Peer::admin(&a, "root").await;
    for _ in 0..3 {
        admin
            .execute("CHANNEL_ADD", json!({"name": fresh_channel("old")}))
            .await;
        admin.dispatch(Event::ChannelAdd).await;
    }
    let b = node_on(store, |_| {}).await;
    let mut late = Peer::join(&b, "late").await;
    let name = fresh_channel("new");
    admin.execute("CHANNEL_ADD", json!({"name": name})).await;
    let first = late.next().await.unwrap();
    assert!(first.is_dispatch(Event::ChannelAdd), "{}", first.text);
    assert_eq!(
        first.cnf["name"],
        name.as_str(),
        "only what happened after READY"
    );
    assert_eq!(first.s, Some(1));
}

#[tokio::test]
async fn a_redis_that_lost_its_data_ends_sessions_instead_of_leaving_gaps() {
    let mut store = Store::one();
    let node = node_on(&store, |c| c.resume_window_s = 2).await;
    let Store::One(redis) = &mut store else {
        unreachable!()
    };
    let room = fresh_channel("lost");
    let mut alice = Peer::join(&node, "alice").await;
    alice.create_and_move(&room).await;
    alice.say("before").await;
    redis.restart_empty();
    // The node notices the new data set and closes its sessions.
    assert_eq!(alice.closed().await, Some(1012));
    let (client, ready) = alice.resume_at(&node.url()).await;
    assert!(!ready.resumed, "nothing to resume from");
    let mut alice = Peer {
        client,
        ready,
        token: alice.token,
        user_id: alice.user_id,
        last_s: 0,
    };
    let mut bob = Peer::join(&node, "bob").await;
    alice.say("fresh start").await;
    assert_eq!(
        bob.dispatch(Event::MessageCreate).await.cnf["content"],
        "fresh start"
    );
}

async fn a_node_whose_clock_is_behind_still_orders_its_messages_after_the_last(store: &Store) {
    let node = node_on(store, |_| {}).await;
    let room = fresh_channel("skew");
    let mut alice = Peer::join(&node, "alice").await;
    alice.create_and_move(&room).await;
    // Another node, its clock an hour ahead, published the last message.
    let ahead_ms = gateway_node::broker::memory::unix_ms() + 3_600_000;
    let last = format!("{ahead_ms:013}042007");
    let meta = format!("gw:{{c:{room}}}:meta");
    store.cli(&meta, &["HSET", &meta, "lastid", &last]);
    let first: u64 = alice.say("one").await["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let second: u64 = alice.say("two").await["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(first > last.parse::<u64>().unwrap(), "{first} after {last}");
    assert!(second > first);
}

#[tokio::test]
async fn channels_and_their_subscriptions_spread_over_every_master() {
    let store = Store::cluster();
    let node = node_on(&store, |_| {}).await;
    let Store::Cluster(cluster) = &store else {
        unreachable!()
    };
    let masters = cluster.masters();
    // Two channels on each master, chosen by where their slot is.
    let mut chosen: Vec<(u16, String)> = Vec::new();
    while masters
        .iter()
        .any(|m| chosen.iter().filter(|(o, _)| o == m).count() < 2)
    {
        let room = fresh_channel("spread");
        let owner = cluster.master_for_key(&format!("gw:{{c:{room}}}"));
        if chosen.iter().filter(|(o, _)| *o == owner).count() < 2 {
            chosen.push((owner, room));
        }
    }
    let mut peers = Vec::new();
    for (_, room) in &chosen {
        let mut peer = Peer::join(&node, "spread").await;
        peer.create_and_move(room).await;
        peer.say("here").await;
        peers.push(peer);
    }
    for (owner, room) in &chosen {
        // Asked directly (no -c): another master would answer MOVED.
        for suffix in ["meta", "log", "members", "presence"] {
            let key = format!("gw:{{c:{room}}}:{suffix}");
            assert_eq!(
                redis_cli(*owner, &["EXISTS", &key]),
                "1",
                "{key} on :{owner}"
            );
        }
        let topic = format!("gw:{{c:{room}}}");
        let subscribed = redis_cli(*owner, &["PUBSUB", "SHARDCHANNELS", &topic]);
        assert_eq!(subscribed, topic, "sharded subscription on :{owner}");
    }
}

async fn a_redis_that_requires_auth_takes_a_password_or_an_acl_user(store: &Store) {
    let url = store.url();
    let configure =
        |c: &mut gateway_node::config::Config, user: Option<&str>, password: Option<&str>| {
            c.redis_url = Some(url.clone());
            c.redis_cluster = store.is_cluster();
            c.redis_username = user.map(str::to_owned);
            c.redis_password = password.map(str::to_owned);
        };
    // From here on every server requires AUTH: the default user has a
    // password, and user `gw` its own (channels included: `&*`).
    for port in store.ports() {
        redis_cli(
            port,
            &[
                "ACL", "SETUSER", "gw", "on", ">gw-pass", "~*", "&*", "+@all",
            ],
        );
        redis_cli(port, &["CONFIG", "SET", "masterauth", "main-pass"]);
        redis_cli(port, &["CONFIG", "SET", "requirepass", "main-pass"]);
    }
    let start = |user: Option<&str>, password: Option<&str>| {
        let mut config = gateway_node::config::Config::default();
        configure(&mut config, user, password);
        async move { gateway_node::build(config, SECRET).await.map(|_| ()) }
    };
    let refused = start(None, None).await.unwrap_err().to_string();
    assert!(
        refused.contains("uthenticat") || refused.contains("NOAUTH"),
        "{refused}"
    );
    let refused = start(Some("gw"), Some("wrong"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("WRONGPASS") || refused.contains("uthenticat"),
        "{refused}"
    );

    let with = |user: Option<&'static str>, password: &'static str| {
        TestNode::with(move |c| configure(c, user, Some(password)))
    };
    let a = with(None, "main-pass").await;
    let b = with(Some("gw"), "gw-pass").await;
    message_crosses(&a, &b, "auth").await;
}

#[tokio::test]
async fn a_redis_cluster_over_tls_with_a_private_ca() {
    let cluster = RedisCluster::start_tls();
    let (url, ca) = (cluster.seed_urls(), cluster.ca_file());
    assert!(url.starts_with("rediss://"), "{url}");
    let node = || {
        let (url, ca) = (url.clone(), ca.clone());
        TestNode::with(move |c| {
            c.redis_url = Some(url);
            c.redis_cluster = true;
            c.redis_ca_file = Some(ca);
        })
    };
    let (a, b) = (node().await, node().await);
    message_crosses(&a, &b, "tls-cluster").await;
}

#[tokio::test]
async fn a_redis_over_tls_with_a_private_ca() {
    let redis = RedisServer::start_tls();
    let (url, ca) = (redis.tls_url(), redis.ca_file());
    // The CA is not among the system's roots: refused, and said so.
    let config = gateway_node::config::Config {
        redis_url: Some(url.clone()),
        ..Default::default()
    };
    let refused = gateway_node::build(config, SECRET)
        .await
        .map(|_| ())
        .unwrap_err();
    assert!(
        refused.to_string().to_lowercase().contains("certificate"),
        "{refused}"
    );

    let node = || {
        let (url, ca) = (url.clone(), ca.clone());
        TestNode::with(move |c| {
            c.redis_url = Some(url);
            c.redis_ca_file = Some(ca);
        })
    };
    let (a, b) = (node().await, node().await);
    message_crosses(&a, &b, "tls").await;
}

/// A Redis on the same host, over its Unix socket: commands and pub/sub
/// both go through the socket, not TCP.
#[tokio::test]
async fn a_redis_on_this_host_over_its_unix_socket() {
    let redis = RedisServer::start();
    let url = redis.unix_url();
    let node = || {
        let url = url.clone();
        TestNode::with(move |c| c.redis_url = Some(url))
    };
    let (a, b) = (node().await, node().await);
    message_crosses(&a, &b, "unix").await;
    let socket = url.trim_start_matches("unix://");
    let over_socket = redis_cli(redis.port, &["CLIENT", "LIST"])
        .lines()
        .filter(|l| l.contains(socket))
        .count();
    assert_eq!(over_socket, 2, "one connection per node, over the socket");
}

async fn batched_publishing_keeps_every_senders_order(store: &Store) {
    // Messages gathered for 3 ms before they go to Redis together.
    senders_race_and_keep_their_order(store, 3_000, false).await;
}

async fn self_clocked_publishing_keeps_every_senders_order(store: &Store) {
    // No window: a batch goes when the one before it is answered.
    senders_race_and_keep_their_order(store, 0, false).await;
}

async fn with_direct_writes_racing_senders_keep_their_order(store: &Store) {
    // Events that arrive while others wait go to the writer tasks, the
    // rest straight to the sockets: the reader sees one order either way.
    senders_race_and_keep_their_order(store, 0, true).await;
}

async fn senders_race_and_keep_their_order(store: &Store, window_us: u64, direct_writes: bool) {
    let node = || {
        node_on(store, |c| {
            c.redis_publish_batch_us = window_us;
            c.direct_writes = direct_writes;
            c.rate_limit_count = 1_000_000;
        })
    };
    let (a, b) = (node().await, node().await);
    let room = fresh_channel("batch");
    let mut admin = Peer::admin(&a, "admin").await;
    admin.create_and_move(&room).await;
    let mut senders = Vec::new();
    for (i, node) in [&a, &b, &a].into_iter().enumerate() {
        let mut p = Peer::join(node, &format!("s{i}")).await;
        p.move_to(&room).await;
        senders.push(p);
    }
    let mut reader = Peer::join(&b, "reader").await;
    reader.move_to(&room).await;
    // Every sender sends 50 messages in one write: they race each other.
    for (i, p) in senders.iter_mut().enumerate() {
        let frames: Vec<String> = (0..50)
            .map(|k| {
                json!({"f": 130, "t": "MESSAGE_CREATE", "cnf": {"content": format!("s{i}-{k}")}})
                    .to_string()
            })
            .collect();
        p.client.send_texts(&frames).await.unwrap();
    }
    let mut seen: Vec<Vec<u32>> = vec![Vec::new(); 3];
    while seen.iter().map(Vec::len).sum::<usize>() < 150 {
        let m = reader.dispatch(Event::MessageCreate).await;
        let content = m.cnf["content"].as_str().unwrap();
        let (who, k) = content.split_once('-').unwrap();
        let who: usize = who[1..].parse().unwrap();
        seen[who].push(k.parse().unwrap());
    }
    for (i, ks) in seen.iter().enumerate() {
        assert_eq!(
            *ks,
            (0..50).collect::<Vec<u32>>(),
            "sender {i}: every message once, in order"
        );
    }
    // Every message went to Redis in exactly one batch.
    let batched = metric(a.addr, "gateway_redis_publish_batch_messages_sum").await
        + metric(b.addr, "gateway_redis_publish_batch_messages_sum").await;
    assert_eq!(batched, 150);
}

/// Sessions that end at the same moment leave together (several to a
/// script call): each one's ROOM_USER_REMOVE once, and a user with a
/// session still there stays a member.
/// A watcher on `b` who creates `room`, and `n` members of it on `a`.
async fn watched_room(a: &TestNode, b: &TestNode, room: &str, n: usize) -> (Peer, Vec<Peer>) {
    let mut watcher = Peer::join(b, "watcher").await;
    watcher.create_and_move(room).await;
    let mut members = Vec::new();
    for i in 0..n {
        let mut p = Peer::join(a, &format!("member{i}")).await;
        p.move_to(room).await;
        members.push(p);
    }
    (watcher, members)
}

/// Each of `ids` leaves (ROOM_USER_REMOVE), once, and no one else.
async fn each_leaves_once(watcher: &mut Peer, ids: &[u64]) {
    let mut gone = std::collections::HashSet::new();
    while gone.len() < ids.len() {
        let left = watcher.dispatch(Event::RoomUserRemove).await.cnf;
        let id = left["session_id"].as_u64().unwrap();
        assert!(ids.contains(&id), "only the leavers leave: {left}");
        assert!(gone.insert(id), "{id} left twice");
    }
}

/// Closes each with 1000 and waits for the echo: the node has taken it
/// as the end of the session (a drain's 1012 would park it instead).
async fn end_all(peers: Vec<Peer>) {
    let closing = peers.into_iter().map(|mut p| async move {
        p.client.close(1000).await.unwrap();
        assert_eq!(p.client.closed().await.unwrap(), Some(1000));
    });
    futures_util::future::join_all(closing).await;
}

/// The server of `room` takes no writes for `ms` (`CLIENT PAUSE … WRITE`).
fn pause_writes(store: &Store, room: &str, ms: u32) {
    let meta = format!("gw:{{c:{room}}}:meta");
    assert_eq!(
        store.cli(&meta, &["CLIENT", "PAUSE", &ms.to_string(), "WRITE"]),
        "OK"
    );
}

/// After the leavers' node stopped: only the watcher is a member of
/// `room`, and the leavers' session keys are gone.
fn only_the_watcher_is_left(store: &Store, room: &str, ids: &[u64]) {
    let members = format!("gw:{{c:{room}}}:members");
    assert_eq!(
        store.cli(&members, &["HLEN", &members]),
        "1",
        "only the watcher is left once the node has stopped"
    );
    for id in ids {
        let key = format!("gw:{{s:{id}}}");
        let buf = format!("{key}:buf");
        assert_eq!(
            store.cli(&key, &["EXISTS", &key, &buf]),
            "0",
            "session {id}'s keys are gone"
        );
    }
}

async fn sessions_that_end_together_all_leave(store: &Store) {
    let (a, b) = two_nodes(store).await;
    let room = fresh_channel("exodus");
    let (mut watcher, leavers) = watched_room(&a, &b, &room, 30).await;
    // A second session of the first leaver's user, which stays.
    let mut twin = Peer::present(
        &a.url(),
        leavers[0].token.clone(),
        leavers[0].user_id.clone(),
    )
    .await;
    twin.move_to(&room).await;
    let ids: Vec<u64> = leavers.iter().map(Peer::session_id).collect();
    end_all(leavers).await;
    each_leaves_once(&mut watcher, &ids).await;
    // Members now: the watcher, the twin's user, and a newcomer.
    let mut newcomer = Peer::join(&b, "newcomer").await;
    let moved = newcomer.move_to(&room).await;
    assert_eq!(moved["member_count"], 3, "{moved}");
}

/// Sessions that end just before their node stops still leave, and their
/// keys go: the node does not wait for a leave when a session ends, but it
/// waits for those it queued before it stops.
async fn sessions_that_end_as_their_node_stops_still_leave(store: &Store) {
    let (a, b) = two_nodes(store).await;
    // On a cluster, a channel on another master than the node registry,
    // whose removal is the last thing a stopping node sends: the leaves'
    // replies do not come before it on the same socket.
    let registry = store.server_for("gw:{g}:nodes");
    let room = std::iter::repeat_with(|| fresh_channel("lastcall"))
        .find(|r| !store.is_cluster() || store.server_for(&format!("gw:{{c:{r}}}")) != registry)
        .unwrap();
    let (mut watcher, leavers) = watched_room(&a, &b, &room, 20).await;
    let ids: Vec<u64> = leavers.iter().map(Peer::session_id).collect();
    // The channel's server takes no writes for a while: the leaves are
    // still at Redis when the node is told to stop.
    pause_writes(store, &room, 700);
    end_all(leavers).await;
    a.shutdown().await;
    only_the_watcher_is_left(store, &room, &ids);
    each_leaves_once(&mut watcher, &ids).await;
    let mut newcomer = Peer::join(&b, "newcomer").await;
    let moved = newcomer.move_to(&room).await;
    assert_eq!(moved["member_count"], 2, "{moved}");
}

/// An ended session's leave that fails is made again: here the call is
/// at Redis, held by a pause, when its connection is killed, so Redis
/// never runs it; the node reconnects and sends it again. (On a cluster the
/// client library also retries a call whose connection broke.)
async fn an_ended_sessions_leave_that_fails_is_made_again(store: &Store) {
    let (a, b) = two_nodes(store).await;
    let room = fresh_channel("retry");
    let (mut watcher, leavers) = watched_room(&a, &b, &room, 5).await;
    let ids: Vec<u64> = leavers.iter().map(Peer::session_id).collect();
    pause_writes(store, &room, 1500);
    end_all(leavers).await;
    // The leave call, held by the pause: a client blocked in EVALSHA.
    let meta = format!("gw:{{c:{room}}}:meta");
    let held = eventually("no leave call held by the pause", || {
        let clients = store.cli(&meta, &["CLIENT", "LIST"]);
        clients
            .lines()
            .find(|l| {
                let flags = l.split(" flags=").nth(1).and_then(|f| f.split(' ').next());
                flags.is_some_and(|f| f.contains('b')) && l.contains(" cmd=evalsha ")
            })
            .and_then(|l| l.strip_prefix("id="))
            .and_then(|l| l.split(' ').next())
            .map(str::to_owned)
    })
    .await;
    assert_eq!(store.cli(&meta, &["CLIENT", "KILL", "ID", &held]), "1");
    each_leaves_once(&mut watcher, &ids).await;
    a.shutdown().await;
    only_the_watcher_is_left(store, &room, &ids);
}

/// Comes into `room` and leaves it `times` times: two presence events in
/// its log each time.
async fn come_and_go(walker: &mut Peer, room: &str, times: usize) {
    for _ in 0..times {
        walker.move_to(room).await;
        walker.move_to("general").await;
    }
}

/// What a node of an older version logs for a message (its `lastid` too)
/// or a deletion, leaving everything else as it is.
fn log_as_an_older_version(store: &Store, room: &str, d: &str, last_id: Option<&str>) {
    let meta = format!("gw:{{c:{room}}}:meta");
    let log = format!("gw:{{c:{room}}}:log");
    store.cli(&log, &["XADD", &log, "0-*", "d", d]);
    if let Some(id) = last_id {
        store.cli(&meta, &["HSET", &meta, "lastid", id]);
    }
}

/// A message id just after `id`.
fn next_id(id: &Value) -> String {
    (id.as_str().unwrap().parse::<u64>().unwrap() + 1).to_string()
}

/// Each walk of the history (every move into the room is one) reads what
/// was logged since the last and the messages that walk found, not the
/// runs of presence events between them (one longer than a read of 256
/// entries, short ones, none); the snapshot and deletions still see
/// every message and every deletion, those an older version logged with
/// no walk's knowledge too, and a walk that must go below what the last
/// one found reads on.
async fn history_reads_past_presence_events_by_what_the_last_walk_found(store: &Store) {
    let node = node_on(store, |c| c.rate_limit_count = 100_000).await;
    let room = fresh_channel("sparse");
    let mut alice = Peer::join(&node, "alice").await;
    let mut walker = Peer::join(&node, "walker").await;
    alice.create_and_move(&room).await;
    let mut said: Vec<(String, Value)> = Vec::new();
    for content in ["old0", "old1"] {
        said.push((content.into(), alice.say(content).await["id"].clone()));
    }
    // An older version logs a message, and deletes old1.
    let legacy = next_id(&said[1].1);
    let author = json!({"id": alice.user_id, "name": "alice"});
    let message = |id: &str, content: &str| {
        format!(
            r#"MESSAGE_CREATE {{"id":"{id}","channel":"{room}","author":{author},"content":"{content}","ts":1700000000000}}"#
        )
    };
    log_as_an_older_version(store, &room, &message(&legacy, "legacy"), Some(&legacy));
    let old1 = said.pop().unwrap().1;
    let delete = |id: &Value| format!(r#"MESSAGE_DELETE {{"id":{id},"channel":"{room}"}}"#);
    log_as_an_older_version(store, &room, &delete(&old1), None);
    said.push(("legacy".into(), json!(legacy)));
    come_and_go(&mut walker, &room, 130).await;
    for i in 0..55 {
        let content = format!("m{i}");
        said.push((content.clone(), alice.say(&content).await["id"].clone()));
        if i % 10 == 3 {
            come_and_go(&mut walker, &room, 1 + i % 4).await;
        }
    }
    // The newest, one in the middle, and the older version's.
    for content in ["m54", "m10", "legacy"] {
        let at = said.iter().position(|(c, _)| c == content).unwrap();
        let (_, id) = said.remove(at);
        alice.execute("MESSAGE_DELETE", json!({"id": id})).await;
        let deleted = alice.dispatch(Event::MessageDelete).await.cnf;
        assert_eq!(deleted["id"], id, "{content} deleted");
    }
    come_and_go(&mut walker, &room, 3).await;
    // The newest entry is an older version's.
    let tail = next_id(&said.last().unwrap().1);
    log_as_an_older_version(store, &room, &message(&tail, "tail"), Some(&tail));
    said.push(("tail".into(), json!(tail)));

    let mut bob = Peer::join(&node, "bob").await;
    let contents = |moved: Value| -> Vec<String> {
        moved["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["content"].as_str().unwrap().to_owned())
            .collect()
    };
    let kept: Vec<String> = said.iter().map(|(c, _)| c.clone()).collect();
    assert_eq!(contents(bob.move_to(&room).await), kept[kept.len() - 50..]);
    // With fewer than 50 left, the walk reaches the log's start.
    for (_, id) in said.drain(5..) {
        alice.execute("MESSAGE_DELETE", json!({"id": id})).await;
        alice.dispatch(Event::MessageDelete).await;
    }
    assert_eq!(
        contents(bob.move_to(&room).await),
        ["old0", "m0", "m1", "m2", "m3"]
    );
    // A record of another generation, or above the log's newest entry (a
    // log made again), is not trusted: these would hide every message.
    let log = format!("gw:{{c:{room}}}:log");
    let newest = store.cli(&log, &["XREVRANGE", &log, "+", "-", "COUNT", "1"]);
    let newest: u64 = newest
        .lines()
        .find_map(|l| l.trim().strip_prefix("0-"))
        .and_then(|n| n.parse().ok())
        .expect("the log's newest entry");
    let hist = format!("gw:{{c:{room}}}:hist");
    for record in [
        format!("7 {newest} 0 1"),
        format!("0 {} 0 1", newest + 1000),
    ] {
        store.cli(&hist, &["SET", &hist, &record]);
        assert_eq!(
            contents(bob.move_to(&room).await),
            ["old0", "m0", "m1", "m2", "m3"],
            "with the record {record}"
        );
    }
}

/// Each test above that takes a `Store`, on one Redis and on a cluster.
macro_rules! on_each_store {
    ($($test:ident),* $(,)?) => {
        mod one_redis {
            $(#[tokio::test]
            async fn $test() {
                super::$test(&super::Store::one()).await
            })*
        }
        mod redis_cluster {
            $(#[tokio::test]
            async fn $test() {
                super::$test(&super::Store::cluster()).await
            })*
        }
    };
}

on_each_store!(
    message_to_channel_reaches_members_on_the_other_node,
    channel_add_and_bans_reach_every_node,
    resume_on_the_other_node_replays_what_was_missed,
    resume_elsewhere_closes_the_old_connection_with_4017,
    a_resume_ahead_of_the_session_elsewhere_starts_a_new_one,
    a_message_past_the_retained_history_cannot_be_deleted,
    another_users_session_cannot_be_resumed_on_any_node,
    drain_parks_sessions_and_they_resume_elsewhere_without_loss,
    a_killed_nodes_sessions_resume_as_new_and_leave_their_channels,
    a_node_subscribes_to_a_channel_only_while_it_has_members_there,
    every_live_members_presence_is_refreshed,
    a_node_that_joins_later_does_not_replay_old_cluster_events,
    a_node_whose_clock_is_behind_still_orders_its_messages_after_the_last,
    a_redis_that_requires_auth_takes_a_password_or_an_acl_user,
    batched_publishing_keeps_every_senders_order,
    self_clocked_publishing_keeps_every_senders_order,
    with_direct_writes_racing_senders_keep_their_order,
    sessions_that_end_together_all_leave,
    sessions_that_end_as_their_node_stops_still_leave,
    an_ended_sessions_leave_that_fails_is_made_again,
    history_reads_past_presence_events_by_what_the_last_walk_found,
);
