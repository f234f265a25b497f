//! Redis failing under the gateway: the master of a busy channel's slot
//! killed under traffic, and a channel log that went back (what a replica
//! that lagged its master brings after a failover). Every session stays
//! gapless in `s` (checked by `Peer::next`), nothing is delivered twice,
//! and no accepted message is lost silently: each member receives it, or
//! is closed with 1012 and starts over (`resumed: false`), as
//! docs/PROTOCOL.md says.

use crate::cluster::Store;
use crate::harness::*;
use crate::redis_server::{redis_cli, RedisCluster};
use gateway_shared::protocol::{Event, FunctionCode};
use gateway_shared::ClientError;
use serde_json::json;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// What one member saw.
pub(crate) struct Seen {
    pub name: String,
    /// MESSAGE_CREATE contents, in order of arrival.
    pub received: Vec<String>,
    /// Own messages sent (as `s` 1, 2, …) and those refused with an error.
    pub sent: u64,
    pub refused: HashSet<u64>,
    /// How its connection ended, if it did before "done".
    pub closed: Option<Option<u16>>,
}

impl Seen {
    /// Own messages the gateway accepted: sent and not refused.
    fn accepted(&self) -> Vec<String> {
        (1..=self.sent)
            .filter(|s| !self.refused.contains(s))
            .map(|s| format!("{}-{s}", self.name))
            .collect()
    }
}

/// Shared by the members of a test.
pub(crate) struct Traffic {
    /// MESSAGE_CREATE dispatches received by all members.
    pub received: AtomicU64,
    /// Publishers done talking whose every message was answered (echoed
    /// or refused), or that were closed.
    pub settled: AtomicU64,
}

/// Reads everything until a "done" message or the close; while `talk`
/// says so and `publish` is set, also sends a message every `every`.
pub(crate) async fn member(
    mut peer: Peer,
    name: String,
    publish: bool,
    every: Duration,
    mut talk: watch::Receiver<bool>,
    traffic: Arc<Traffic>,
) -> (Seen, Peer) {
    let mut seen = Seen {
        name,
        received: Vec::new(),
        sent: 0,
        refused: HashSet::new(),
        closed: None,
    };
    let own = format!("{}-", seen.name);
    let mut echoed = 0;
    let mut settled = !publish;
    let mut tick = tokio::time::interval(every);
    loop {
        let talking = publish && *talk.borrow();
        if !talking && !settled && echoed + seen.refused.len() as u64 >= seen.sent {
            settled = true;
            traffic.settled.fetch_add(1, Ordering::Relaxed);
        }
        tokio::select! {
            _ = tick.tick(), if talking => {
                let s = seen.sent + 1;
                let content = format!("{}-{s}", seen.name);
                if peer
                    .client
                    .execute("MESSAGE_CREATE", json!({ "content": content }), Some(s))
                    .await
                    .is_ok()
                {
                    seen.sent = s;
                }
            }
            _ = talk.changed(), if talking => {}
            msg = peer.next() => match msg {
                Ok(m) if m.is_dispatch(Event::MessageCreate) => {
                    let content = m.cnf["content"].as_str().unwrap().to_owned();
                    traffic.received.fetch_add(1, Ordering::Relaxed);
                    if content.starts_with(&own) {
                        echoed += 1;
                    }
                    if content == "done" {
                        break;
                    }
                    seen.received.push(content);
                }
                Ok(m) if m.f == FunctionCode::Error.code() => {
                    let err = m.error().unwrap();
                    assert!(matches!(err.c, 4018 | 4000), "{}: {}", seen.name, m.text);
                    let s = err.s.unwrap_or_else(|| panic!("{}: {}", seen.name, m.text));
                    seen.refused.insert(s as u64);
                }
                Ok(_) => {}
                Err(ClientError::Closed(code)) => {
                    seen.closed = Some(code);
                    break;
                }
                Err(e) => panic!("{}: {e}", seen.name),
            }
        }
    }
    if !settled {
        traffic.settled.fetch_add(1, Ordering::Relaxed);
    }
    (seen, peer)
}

/// Polls `counter` until it reaches `target` (bounded by the harness'
/// wait): the members report progress through it.
pub(crate) async fn until(counter: &AtomicU64, target: u64) {
    eventually_async("the members' progress", WAIT * 3, || async {
        match counter.load(Ordering::Relaxed) {
            n if n >= target => Ok(()),
            n => Err(format!("stuck at {n} of {target}")),
        }
    })
    .await
}

/// Checks what the members saw: nobody got a message twice, and every
/// accepted message reached every member that was not closed with 1012;
/// those closed resume to a new session.
pub(crate) async fn check(seen: &[(Seen, Peer)], url: &str) -> (usize, usize) {
    let accepted: Vec<String> = seen.iter().flat_map(|(s, _)| s.accepted()).collect();
    let mut reset = 0;
    for (s, peer) in seen {
        let unique: HashSet<&String> = s.received.iter().collect();
        assert_eq!(
            unique.len(),
            s.received.len(),
            "{} got a message twice",
            s.name
        );
        match s.closed {
            None => {
                let missing: Vec<&String> =
                    accepted.iter().filter(|m| !unique.contains(m)).collect();
                assert!(missing.is_empty(), "{} silently missed {missing:?}", s.name);
            }
            Some(Some(1012)) => {
                reset += 1;
                let (_, ready) = peer.resume_at(url).await;
                assert!(!ready.resumed, "{} resumed after a reset", s.name);
            }
            Some(other) => panic!("{} closed with {other:?}", s.name),
        }
    }
    (accepted.len(), reset)
}

/// A node on the Redis Cluster at `url` (seed URLs) whose rate limit lets
/// the tests' publishers talk as fast as they like, and whose heartbeat
/// deadline outlasts a slow failover: the tests' clients do not heartbeat,
/// and a cluster on a loaded machine can take over 30 s (1.5 × the default
/// 20 s interval) to flag a master failed and promote its replica; their
/// clients were then closed with 4009 mid-test.
async fn busy_node(url: String) -> TestNode {
    TestNode::with(move |c| {
        c.redis_url = Some(url);
        c.redis_cluster = true;
        c.rate_limit_count = 1_000_000;
        c.hb_int_ms = 600_000;
    })
    .await
}

#[tokio::test]
async fn a_master_failover_under_traffic_loses_nothing_silently() {
    let mut cluster = RedisCluster::start();
    let url = cluster.seed_urls();
    let (a, b) = (busy_node(url.clone()).await, busy_node(url).await);
    let room = fresh_channel("failover");
    // The admin stays out of the room (unread, it would back up) until the end.
    let mut admin = Peer::admin(&a, "admin").await;
    admin.execute("CHANNEL_ADD", json!({ "name": room })).await;
    admin.dispatch(Event::ChannelAdd).await;
    let (talk_tx, talk) = watch::channel(true);
    let traffic = Arc::new(Traffic {
        received: AtomicU64::new(0),
        settled: AtomicU64::new(0),
    });
    // Two publishers (one per node) and two readers, all in the room
    // before anyone talks.
    let mut peers = Vec::new();
    for (i, node) in [&a, &b, &a, &b].into_iter().enumerate() {
        let mut peer = Peer::join(node, &format!("m{i}")).await;
        peer.move_to(&room).await;
        peers.push(peer);
    }
    let mut tasks = Vec::new();
    for (i, peer) in peers.into_iter().enumerate() {
        tasks.push(tokio::spawn(member(
            peer,
            format!("m{i}"),
            i < 2,
            Duration::from_millis(10),
            talk.clone(),
            Arc::clone(&traffic),
        )));
    }
    until(&traffic.received, 100).await;

    let master = cluster.master_for_key(&format!("gw:{{c:{room}}}:meta"));
    cluster.kill(master);
    let promoted = tokio::task::spawn_blocking(move || {
        let promoted = cluster.wait_failover(master);
        (cluster, promoted)
    });
    let (cluster, promoted) = promoted.await.unwrap();
    // Traffic flows again through the promoted master.
    let before = traffic.received.load(Ordering::Relaxed);
    until(&traffic.received, before + 100).await;
    talk_tx.send(false).unwrap();
    until(&traffic.settled, 2).await;

    // Everyone reads until this last message, or was closed.
    admin.move_to(&room).await;
    admin.say("done").await;
    let mut seen = Vec::new();
    for task in tasks {
        seen.push(tokio::time::timeout(WAIT * 3, task).await.unwrap().unwrap());
    }
    let (accepted, reset) = check(&seen, &a.url()).await;
    let refused: usize = seen.iter().map(|(s, _)| s.refused.len()).sum();
    eprintln!(
        "failover :{master} -> :{promoted}: {accepted} accepted, {refused} refused (4018), {reset} sessions reset"
    );
    assert!(accepted > 0);
    drop(cluster);
}

/// The channel's log set back by `back` events, as a promoted
/// replica that had not received them would have them; with `rewrite`,
/// other events then take those numbers (published by a node that did not
/// notice, so other nodes drop them as duplicates). Then every node's
/// connection to Redis is cut, so that they check their logs.
fn set_back(store: &Store, room: &str, back: u64, rewrite: bool) {
    let log = format!("gw:{{c:{room}}}:log");
    let topic = format!("gw:{{c:{room}}}");
    let n = last_logged(store, &log);
    for k in n - back + 1..=n {
        store.cli(&log, &["XDEL", &log, &format!("0-{k}")]);
    }
    store.cli(&log, &["XSETID", &log, &format!("0-{}", n - back)]);
    if rewrite {
        for k in n - back + 1..=n {
            let d = ghost_message(room, k, &format!("other-{k}"));
            store.cli(&log, &["XADD", &log, &format!("0-{k}"), "d", &d]);
            store.cli(&topic, &["PUBLISH", &topic, &format!("{k} 0 {d}")]);
        }
    }
    store.cli(&topic, &["CLIENT", "KILL", "TYPE", "pubsub"]);
}

/// Logs `missed` events in `room` that no node is told of, then trims the
/// log to its last entry and drops the nodes' subscriptions: when they
/// read what they missed, it is gone, as for a node that fell more than
/// the log's length behind.
fn trim_past_what_was_read(store: &Store, room: &str, missed: u64) {
    let log = format!("gw:{{c:{room}}}:log");
    let n = last_logged(store, &log);
    for k in n + 1..=n + missed {
        let d = ghost_message(room, k, &format!("missed-{k}"));
        store.cli(&log, &["XADD", &log, &format!("0-{k}"), "d", &d]);
    }
    store.cli(&log, &["XTRIM", &log, "MAXLEN", "1"]);
    store.cli(&log, &["CLIENT", "KILL", "TYPE", "pubsub"]);
}

/// The `n` of the last event in the channel log `log` (entry id `0-n`).
fn last_logged(store: &Store, log: &str) -> u64 {
    let last = store.cli(log, &["XREVRANGE", log, "+", "-", "COUNT", "1"]);
    last.lines().next().unwrap()[2..].parse().unwrap()
}

/// A log entry of a MESSAGE_CREATE with id `id` in `room`, by a "ghost"
/// no node published.
fn ghost_message(room: &str, id: u64, content: &str) -> String {
    format!(
        r#"MESSAGE_CREATE {{"id":"{id}","channel":"{room}","author":{{"id":"ghost","name":"ghost"}},"content":"{content}","ts":1}}"#
    )
}

/// A Redis of its own and two nodes on it.
async fn two_nodes_on_one_redis() -> (Store, TestNode, TestNode) {
    let store = Store::one();
    let node = |store: &Store| {
        let url = store.url();
        TestNode::with(move |c| c.redis_url = Some(url))
    };
    let (a, b) = (node(&store).await, node(&store).await);
    (store, a, b)
}

/// `harm` does something to the room's log that loses events the nodes'
/// sessions should have had.
async fn a_log_that_lost_events_ends_its_sessions(harm: impl FnOnce(&Store, &str)) {
    let (store, a, b) = two_nodes_on_one_redis().await;
    let room = fresh_channel("back");
    let mut alice = Peer::join(&a, "alice").await;
    alice.create_and_move(&room).await;
    let mut bob = Peer::join(&b, "bob").await;
    bob.move_to(&room).await;
    let mut carol = Peer::join(&b, "carol").await; // elsewhere: untouched
    for i in 0..3 {
        let sent = alice.say(&format!("m{i}")).await;
        assert_eq!(bob.dispatch(Event::MessageCreate).await.cnf, sent);
    }
    harm(&store, &room);

    // Both nodes notice: the room's sessions end, and start over.
    for (peer, node) in [(&mut alice, &a), (&mut bob, &b)] {
        assert_eq!(peer.closed().await, Some(1012));
        assert!(!peer.resume_at(&node.url()).await.1.resumed);
    }
    // The channel goes on, numbered past everything delivered before.
    let mut alice = Peer::join(&a, "alice2").await;
    alice.move_to(&room).await;
    let mut bob = Peer::join(&b, "bob2").await;
    bob.move_to(&room).await;
    let sent = alice.say("after").await;
    assert_eq!(bob.dispatch(Event::MessageCreate).await.cnf, sent);
    // A session in another channel lives on.
    carol.client.heartbeat().await.unwrap();
    carol
        .wait_for(|m| m.f == FunctionCode::Heartbeat.code())
        .await;
    let (_, metrics) = http_get(&b.http("/metrics")).await;
    assert!(metrics.contains("gateway_log_resets_total{"), "{metrics}");
}

#[tokio::test]
async fn a_log_whose_counter_went_back_ends_its_sessions() {
    a_log_that_lost_events_ends_its_sessions(|store, room| set_back(store, room, 2, false)).await;
}

#[tokio::test]
async fn a_log_whose_numbers_were_reused_ends_its_sessions() {
    a_log_that_lost_events_ends_its_sessions(|store, room| set_back(store, room, 2, true)).await;
}

/// Requests that wait for a stalled Redis (writes paused) hold up the
/// heartbeat sent behind them past the heartbeat timeout: the node was
/// slow, not the client, so it gets its answers (4018) and the heartbeat
/// answered, not 4009. Before, the heartbeat timeout ran on meanwhile.
#[tokio::test]
async fn a_heartbeat_behind_requests_to_a_stalled_redis_is_not_late() {
    let store = Store::one();
    let url = store.url();
    // Heartbeat timeout 1.5 s; each request waits up to 2 s for Redis.
    let node = TestNode::with(move |c| {
        c.redis_url = Some(url);
        c.hb_int_ms = 1000;
    })
    .await;
    let mut alice = Peer::join(&node, "alice").await;
    alice.client.heartbeat().await.unwrap();
    alice
        .wait_for(|m| m.f == FunctionCode::Heartbeat.code())
        .await;
    let port = store.ports()[0];
    assert_eq!(redis_cli(port, &["CLIENT", "PAUSE", "5000", "WRITE"]), "OK");
    for i in 0..2 {
        alice
            .execute(
                "MESSAGE_CREATE",
                json!({ "content": format!("stalled {i}") }),
            )
            .await;
    }
    alice.client.heartbeat().await.unwrap();
    for _ in 0..2 {
        assert_eq!(alice.error().await.c, 4018);
    }
    alice
        .wait_for(|m| m.f == FunctionCode::Heartbeat.code())
        .await;
    redis_cli(port, &["CLIENT", "UNPAUSE"]);
}

/// A log whose generation went back (a failover lost the write of a
/// reset, and with it maybe the events after it) is as lost as one whose
/// counter went back: its sessions end with 1012 on every node, and the
/// channel goes on in a generation past both. Before, the nodes ignored a
/// generation lower than theirs and went on with the log as it was.
#[tokio::test]
async fn a_log_whose_generation_went_back_ends_its_sessions() {
    let (store, a, b) = two_nodes_on_one_redis().await;
    let room = fresh_channel("genback");
    let mut admin = Peer::admin(&a, "admin").await;
    admin.execute("CHANNEL_ADD", json!({ "name": room })).await;
    admin.dispatch(Event::ChannelAdd).await;
    let meta = format!("gw:{{c:{room}}}:meta");
    store.cli(&meta, &["HSET", &meta, "gen", "2"]);
    let mut alice = Peer::join(&a, "alice").await;
    alice.move_to(&room).await;
    let mut bob = Peer::join(&b, "bob").await;
    bob.move_to(&room).await;
    let sent = alice.say("m0").await;
    assert_eq!(bob.dispatch(Event::MessageCreate).await.cnf, sent);
    store.cli(&meta, &["HSET", &meta, "gen", "1"]);
    store.cli(&meta, &["CLIENT", "KILL", "TYPE", "pubsub"]);
    for (peer, node) in [(&mut alice, &a), (&mut bob, &b)] {
        assert_eq!(peer.closed().await, Some(1012));
        assert!(!peer.resume_at(&node.url()).await.1.resumed);
    }
    assert_eq!(store.cli(&meta, &["HGET", &meta, "gen"]), "3");
    let mut alice = Peer::join(&a, "alice2").await;
    alice.move_to(&room).await;
    let mut bob = Peer::join(&b, "bob2").await;
    bob.move_to(&room).await;
    let sent = alice.say("after").await;
    assert_eq!(bob.dispatch(Event::MessageCreate).await.cnf, sent);
}

/// A session resumed on a node that did not hold its channel brings the
/// log's generation with it: when that node checks the log after losing
/// its connection, it fills in what it missed instead of taking the
/// channel for one that was reset (which ended its sessions with 1012).
#[tokio::test]
async fn a_session_resumed_elsewhere_keeps_its_channels_generation() {
    let (store, a, b) = two_nodes_on_one_redis().await;
    let room = fresh_channel("gen");
    let mut admin = Peer::admin(&a, "admin").await;
    admin.execute("CHANNEL_ADD", json!({ "name": room })).await;
    admin.dispatch(Event::ChannelAdd).await;
    // The channel's log was reset once before anyone came.
    let meta = format!("gw:{{c:{room}}}:meta");
    store.cli(&meta, &["HSET", &meta, "gen", "1"]);
    let mut alice = Peer::join(&a, "alice").await;
    alice.move_to(&room).await;
    alice.say("before").await;
    let (client, ready) = alice.resume_at(&b.url()).await;
    assert!(ready.resumed);
    alice.client = client;
    // An event node b was not told of, then its subscription cut: it
    // reads the log, finds the event and delivers it.
    let log = format!("gw:{{c:{room}}}:log");
    let n = last_logged(&store, &log);
    let unheard = ghost_message(&room, 99_999_999_999_999_999, "unheard");
    store.cli(
        &log,
        &["XADD", &log, &format!("0-{}", n + 1), "d", &unheard],
    );
    store.cli(&log, &["CLIENT", "KILL", "TYPE", "pubsub"]);
    let got = alice.dispatch(Event::MessageCreate).await;
    assert_eq!(got.cnf["content"], "unheard");
}

/// Every Redis of `store` lets the nodes' connections at the keys
/// matching `patterns` only (`ACL SETUSER default resetkeys …`), or at
/// every key again with `None`.
fn only_keys(store: &Store, patterns: Option<&[&str]>) {
    for port in store.ports() {
        let mut args = vec!["ACL", "SETUSER", "default"];
        match patterns {
            Some(patterns) => {
                args.push("resetkeys");
                args.extend(patterns);
            }
            None => args.push("allkeys"),
        }
        assert_eq!(redis_cli(port, &args), "OK");
    }
}

/// A CHANNEL_MOVE that Redis refuses part-way (the new channel's keys are
/// out of reach; the old channel was left already) answers 4018 and puts
/// the session back where it was: it receives its old channel, and moved
/// again once Redis answers, the new one. Before, it was left in no
/// channel, receiving nothing, and a second move changed nothing.
#[tokio::test]
async fn a_channel_move_refused_part_way_leaves_the_session_where_it_was() {
    let store = Store::one();
    let url = store.url();
    let node = TestNode::with(move |c| c.redis_url = Some(url)).await;
    let room = fresh_channel("limbo");
    let mut carol = Peer::join(&node, "carol").await;
    carol.create_and_move(&room).await;
    let mut bob = Peer::join(&node, "bob").await;
    let mut alice = Peer::join(&node, "alice").await;
    only_keys(
        &store,
        Some(&[
            "~gw:{g}*",
            "~gw:{c:general}*",
            "~gw:{s:*",
            "~gw:sid",
            "~gw:ban:*",
            "~gw:node*",
        ]),
    );
    alice
        .execute("CHANNEL_MOVE", json!({ "channel": room }))
        .await;
    assert_eq!(alice.error().await.c, 4018);
    let sent = bob.say("still in general?").await;
    assert_eq!(alice.dispatch(Event::MessageCreate).await.cnf, sent);
    only_keys(&store, None);
    alice.move_to(&room).await;
    let sent = carol.say("welcome").await;
    assert_eq!(alice.dispatch(Event::MessageCreate).await.cnf, sent);
}

/// A node asked to hand a session over that cannot park it in Redis (its
/// session keys are read-only here) ends it for good: the old connection
/// is closed with 1012 and the resume answers `resumed: false`. Before, the
/// old connection stayed open, answering heartbeats and receiving nothing.
#[tokio::test]
async fn a_session_that_cannot_be_parked_ends_visibly() {
    let (store, a, b) = two_nodes_on_one_redis().await;
    let alice = Peer::join(&a, "alice").await;
    let mut old = alice.client;
    only_keys(
        &store,
        Some(&[
            "%R~gw:{s:*",
            "~gw:{g}*",
            "~gw:{c:*",
            "~gw:sid",
            "~gw:ban:*",
            "~gw:node*",
        ]),
    );
    let (mut client, _) = gateway_shared::Client::connect_hello(&b.url())
        .await
        .unwrap();
    let resume = Some((alice.ready.session_id, Some(alice.last_s)));
    // Not resumed; and the new session it falls back to needs those keys
    // too (4018).
    match client.present(&alice.token, resume).await {
        Err(gateway_shared::ClientError::Gateway(e)) => assert_eq!(e.c, 4018),
        Ok(ready) => assert!(!ready.resumed),
        Err(e) => panic!("{e}"),
    }
    only_keys(&store, None);
    assert_eq!(old.closed().await.unwrap(), Some(1012));
    let (mut client, _) = gateway_shared::Client::connect_hello(&b.url())
        .await
        .unwrap();
    assert!(!client.present(&alice.token, resume).await.unwrap().resumed);
}

/// Polls `check` until it holds, for at most `WAIT`.
async fn until_true(what: &str, mut check: impl FnMut() -> bool) {
    tokio::time::timeout(WAIT, async {
        while !check() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}"));
}

/// How many times the ACL log of the Redis on `port` says a subscription
/// to `topic` was refused (Redis groups such entries, with a count).
fn refusals(port: u16, topic: &str) -> u64 {
    let log = redis_cli(port, &["ACL", "LOG"]);
    let lines: Vec<&str> = log.lines().map(str::trim).collect();
    let mut total = 0;
    for entry in lines.split(|l| *l == "count").skip(1) {
        let count: u64 = entry.first().and_then(|c| c.parse().ok()).unwrap_or(0);
        if entry.windows(2).any(|w| w[0] == "object" && w[1] == topic) {
            total += count;
        }
    }
    total
}

/// On one Redis, a channel's topic that cannot be subscribed again after
/// a reconnect (refused by an ACL here, as a Redis that answers errors for
/// a while would) is tried again every second until it takes, and the
/// channel's messages flow again. Before, only the client library's own
/// resubscription and one attempt by the node were made, and the channel
/// stayed silent on that node for good, with `/readyz` green.
#[tokio::test]
async fn a_topic_refused_after_a_reconnect_is_subscribed_again_later() {
    let store = Store::one();
    let url = store.url();
    let node = TestNode::with(move |c| c.redis_url = Some(url)).await;
    let room = fresh_channel("resub");
    let topic = format!("gw:{{c:{room}}}");
    let mut bob = Peer::join(&node, "bob").await;
    bob.create_and_move(&room).await;
    bob.say("before").await;
    // Redis disconnects the clients subscribed to a channel an ACL no
    // longer allows; subscribing to it is refused until it does again.
    let port = store.ports()[0];
    redis_cli(port, &["ACL", "LOG", "RESET"]);
    let mut args = vec!["ACL", "SETUSER", "default", "resetchannels"];
    args.extend(["&gw:{g}*", "&gw:{n:*", "&gw:{c:general}"]);
    assert_eq!(redis_cli(port, &args), "OK");
    // Asked again and refused: by the client library on its reconnect,
    // by the node for the renewed connection, and then by the node again
    // a second later (before, nothing asked after the first two).
    until_true("the node keeps asking", || refusals(port, &topic) >= 3).await;
    assert_eq!(store.subscribers(&topic), 0);
    assert_eq!(
        redis_cli(port, &["ACL", "SETUSER", "default", "allchannels"]),
        "OK"
    );
    // Its own message comes back to bob through the node's subscription.
    bob.say("after").await;
}

/// A gap a node finds when it checks a quiet channel's log (after losing
/// its subscription) is filled even when reading the log fails at first
/// (`XRANGE` refused by an ACL here; the check itself does not use it):
/// the node checks again once Redis answers. Before, the failed read
/// ended the fill, the check counted as done, and the event stayed
/// undelivered until the channel's next one.
#[tokio::test]
async fn a_gap_whose_log_read_fails_is_filled_later() {
    let store = Store::one();
    let url = store.url();
    // No presence events: the node holds no event of the channel, so its
    // check of the log needs no `XRANGE`.
    let node = TestNode::with(move |c| {
        c.redis_url = Some(url);
        c.presence_threshold = 0;
    })
    .await;
    // The default channel, so that nothing is dispatched on the global
    // stream either (whose check would otherwise fail and retry it all).
    let room = "general";
    let mut bob = Peer::join(&node, "bob").await;
    let port = store.ports()[0];
    redis_cli(port, &["ACL", "LOG", "RESET"]);
    assert_eq!(
        redis_cli(port, &["ACL", "SETUSER", "default", "-xrange"]),
        "OK"
    );
    let log = format!("gw:{{c:{room}}}:log");
    let unheard = ghost_message(room, 99_999_999_999_999_999, "unheard");
    store.cli(&log, &["XADD", &log, "0-*", "d", &unheard]);
    store.cli(&log, &["CLIENT", "KILL", "TYPE", "pubsub"]);
    // The fill tries five times, then every stream is checked again and
    // it tries again; before, it gave up after its check's few attempts.
    until_true("the node keeps trying to read the gap", || {
        refusals(port, "xrange") >= 6
    })
    .await;
    assert_eq!(
        redis_cli(port, &["ACL", "SETUSER", "default", "+xrange"]),
        "OK"
    );
    let got = bob.dispatch(Event::MessageCreate).await;
    assert_eq!(got.cnf["content"], "unheard");
}

#[tokio::test]
async fn sessions_further_behind_than_the_log_holds_end_with_1012() {
    a_log_that_lost_events_ends_its_sessions(|store, room| trim_past_what_was_read(store, room, 5))
        .await;
}

/// Ids of the clients connected to the server on `port`.
fn client_ids(port: u16) -> HashSet<u64> {
    redis_cli(port, &["CLIENT", "LIST"])
        .lines()
        .filter_map(|l| l.strip_prefix("id=")?.split(' ').next()?.parse().ok())
        .collect()
}

/// The client library replaces a connection by itself when it fails a
/// check during a topology refresh, and subscribes again on the new one,
/// asking a master for all of its shard channels in one SSUBSCRIBE: Redis
/// refuses that when they span several slots (CROSSSLOT), and nothing
/// tells the node (no disconnection, no unsubscribe). Here the room's
/// master refuses PING (an ACL) while a slot moved under node A makes it
/// refresh: its connection there is replaced, and the room's
/// subscription lost. The node notices the new connection, subscribes
/// again, and reads what was published meanwhile from the log: alice gets
/// bob's message with nothing more sent to show the gap.
#[tokio::test]
async fn a_connection_the_client_library_replaced_is_subscribed_again() {
    let cluster = RedisCluster::start();
    let url = cluster.seed_urls();
    let (a, b) = (busy_node(url.clone()).await, busy_node(url).await);
    let key = |channel: &str| format!("gw:{{c:{channel}}}:meta");
    let slot = |channel: &str| cluster.slot(&key(channel));
    let room = fresh_channel("replaced");
    let master = cluster.master_for_key(&key(&room));
    // A second channel of node A on that master, in another slot: the
    // library's one SSUBSCRIBE for both is refused.
    let other = loop {
        let name = fresh_channel("neighbour");
        if cluster.master_for_key(&key(&name)) == master && slot(&name) != slot(&room) {
            break name;
        }
    };
    let mut alice = Peer::join(&a, "alice").await;
    alice.create_and_move(&room).await;
    let mut bob = Peer::join(&b, "bob").await;
    bob.move_to(&room).await;
    let mut carol = Peer::join(&a, "carol").await;
    carol.create_and_move(&other).await;
    say_until_accepted(&mut alice, "before", WAIT).await;
    receive(&mut bob, "before", WAIT).await;

    let before = client_ids(master);
    redis_cli(master, &["ACL", "SETUSER", "default", "-ping"]);
    let moved = fresh_channel("moved");
    cluster.move_empty_slot(&key(&moved));
    let mut dave = Peer::join(&a, "dave").await;
    dave.create_and_move(&moved).await;
    // Node A's old connection to the master is gone.
    eventually("the client library replaces its connection", || {
        (!before.is_subset(&client_ids(master))).then_some(())
    })
    .await;
    redis_cli(master, &["ACL", "SETUSER", "default", "+ping"]);

    say_until_accepted(&mut bob, "meanwhile", WAIT).await;
    receive(&mut alice, "meanwhile", WAIT).await;
    say_until_accepted(&mut bob, "after", WAIT).await;
    let got = alice.dispatch(Event::MessageCreate).await.cnf;
    assert_eq!(got["content"], "after", "{got}");
}

/// After a lost connection a node subscribes to every topic again and
/// reads every stream's log, also when some topic cannot be subscribed
/// (its shard is down; here an ACL refuses it): the others' missed events
/// are read. Before, the first topic that failed stopped both, so while a
/// shard was down no stream was ever read again. The event alice should
/// get is written to the log only, and the ACL change cuts the node's
/// connection to that master (Redis disconnects clients subscribed to a
/// channel they may no longer use).
#[tokio::test]
async fn a_topic_that_cannot_be_subscribed_does_not_stop_the_others_catching_up() {
    let store = Store::cluster();
    let a = busy_node(store.url()).await;
    let live = fresh_channel("live");
    let refused = fresh_channel("refused");
    let mut alice = Peer::join(&a, "alice").await;
    alice.create_and_move(&live).await;
    let mut carol = Peer::join(&a, "carol").await;
    carol.create_and_move(&refused).await;
    say_until_accepted(&mut alice, "before", WAIT).await;

    let log = format!("gw:{{c:{live}}}:log");
    let n = last_logged(&store, &log) + 1;
    let missed = ghost_message(&live, n, "missed");
    store.cli(&log, &["XADD", &log, &format!("0-{n}"), "d", &missed]);
    // Every channel but the refused one stays allowed, on every server.
    let only_live = format!("&gw:{{c:{live}}}");
    for server in store.ports() {
        let args = [
            "ACL",
            "SETUSER",
            "default",
            "resetchannels",
            "&gw:{g}*",
            "&gw:{n:*",
            &only_live,
        ];
        assert_eq!(redis_cli(server, &args), "OK");
    }

    let got = alice.dispatch(Event::MessageCreate).await.cnf;
    assert_eq!(got["content"], "missed", "{got}");
    alice
        .execute("MESSAGE_CREATE", json!({ "content": "after" }))
        .await;
    let got = alice.dispatch(Event::MessageCreate).await.cnf;
    assert_eq!(got["content"], "after", "{got}");
}

/// Sends `content` to `peer`'s channel until the node accepts it (its echo
/// comes back); a refusal (4018, while a node replaces a connection that
/// stopped answering) is answered by sending it again. Panics if it is not
/// accepted within `within`.
async fn say_until_accepted(peer: &mut Peer, content: &str, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{content:?} was not accepted within {within:?}"
        );
        peer.execute("MESSAGE_CREATE", json!({ "content": content }))
            .await;
        let m = peer
            .wait_for(|m| {
                (m.is_dispatch(Event::MessageCreate) && m.cnf["content"] == content)
                    || m.f == FunctionCode::Error.code()
            })
            .await;
        if m.f != FunctionCode::Error.code() {
            return;
        }
        assert_eq!(m.error().unwrap().c, 4018, "{}", m.text);
    }
}

/// Waits for the MESSAGE_CREATE of `content`, for at most `within`.
async fn receive(peer: &mut Peer, content: &str, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match peer.next().await {
            Ok(m) if m.is_dispatch(Event::MessageCreate) && m.cnf["content"] == content => {
                return;
            }
            Ok(_) | Err(ClientError::Timeout) => {}
            Err(e) => panic!("waiting for {content:?}: {e}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{content:?} not received within {within:?}"
        );
    }
}

/// One shard stops answering while holding its slots: its replica is
/// stopped (SIGSTOP: it accepts connections and never answers, like a
/// frozen machine or a blackhole), then its master killed, so nothing can
/// take over. Both nodes keep publishing into that shard's channel (refused
/// with 4018), and a channel on another shard keeps carrying messages from
/// one node to the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_that_stops_answering_leaves_the_other_shards_working() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn,gateway_node=info,redis=info")
        .with_test_writer()
        .try_init();
    let mut cluster = RedisCluster::start();
    for port in cluster.running().collect::<Vec<_>>() {
        // As the repro has it: the live shards serve, the dead one is down.
        redis_cli(
            port,
            &["CONFIG", "SET", "cluster-require-full-coverage", "no"],
        );
    }
    let url = cluster.seed_urls();
    let (a, b) = (busy_node(url.clone()).await, busy_node(url).await);
    let key = |channel: &str| format!("gw:{{c:{channel}}}:meta");
    let dead = fresh_channel("dead");
    let victim = cluster.master_for_key(&key(&dead));
    // A channel whose slot is on another master: chosen, not hoped for.
    let live = loop {
        let name = fresh_channel("live");
        if cluster.master_for_key(&key(&name)) != victim {
            break name;
        }
    };
    let mut alice = Peer::join(&a, "alice").await;
    alice.create_and_move(&live).await;
    let mut bob = Peer::join(&b, "bob").await;
    bob.move_to(&live).await;
    let mut noisy = Vec::new();
    for (i, node) in [&a, &b, &a, &b].into_iter().enumerate() {
        let mut peer = Peer::join(node, &format!("noisy{i}")).await;
        if i == 0 {
            peer.create_and_move(&dead).await;
        } else {
            peer.move_to(&dead).await;
        }
        noisy.push(peer);
    }
    say_until_accepted(&mut alice, "before", WAIT).await;
    receive(&mut bob, "before", WAIT).await;

    let replicas = cluster.replicas_of(victim);
    assert!(!replicas.is_empty(), ":{victim} has no replica");
    for &replica in &replicas {
        cluster.freeze(replica);
    }
    cluster.kill(victim);
    // Traffic into the dead shard from both nodes: its messages are
    // refused, and keep the nodes' Redis clients busy with that shard.
    let talkers: Vec<_> = noisy
        .into_iter()
        .map(|mut peer| {
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(5));
                loop {
                    tokio::select! {
                        _ = tick.tick() => {
                            let sent = peer
                                .client
                                .execute("MESSAGE_CREATE", json!({ "content": "x" }), None)
                                .await;
                            if sent.is_err() {
                                return;
                            }
                        }
                        read = peer.client.next_message(WAIT) => {
                            if matches!(read, Err(ClientError::Closed(_))) {
                                return;
                            }
                        }
                    }
                }
            })
        })
        .collect();

    // Once the cluster has given the shard up, its slots stay with a dead
    // master: every command for them is refused or redirected to it.
    let mut failed = replicas;
    failed.push(victim);
    let mut given_up = tokio::task::spawn_blocking(move || {
        cluster.wait_failed(&failed);
        cluster
    });
    // Messages in the live channel go from node to node all along: while
    // the cluster notices, and for 40 messages after it gave the shard up.
    let mut cluster = None;
    let mut after = 0;
    for i in 0.. {
        if cluster.is_none() {
            if let Ok(done) = tokio::time::timeout(Duration::ZERO, &mut given_up).await {
                cluster = Some(done.unwrap());
            }
        }
        if cluster.is_some() {
            after += 1;
            if after > 40 {
                break;
            }
        }
        let content = format!("live-{i}");
        say_until_accepted(&mut alice, &content, WAIT * 6).await;
        receive(&mut bob, &content, WAIT * 6).await;
    }
    for talker in talkers {
        talker.abort();
    }
    drop(cluster);
}
