//! The pub/sub connection: one task owns it and its subscriptions, another
//! hands what arrives to the hub. Gaps are filled from the logs, and claim
//! requests from other nodes are answered here.

use super::conn::{Master, PubSub};
use super::{
    channel_topic, ck, node_topic, RedisBroker, SubRequest, CONTROL_TOPIC, GLOBAL_LOG, GLOBAL_META,
    GLOBAL_TOPIC, OP_TIMEOUT,
};
use crate::broker::Broker;
use crate::hub::{Gap, LocalChannel};
use crate::node::Node;
use crate::session::Writes;
use crate::wire::{Dispatch, Reject};
use futures_util::StreamExt;
use gateway_shared::protocol::{ErrorCode, Event};
use redis::{PushInfo, PushKind};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

/// Streams `resync` checks at once.
const RESYNC_CONCURRENCY: usize = 16;

/// `"reset <gen> <n>"`: the log starts over (see `lua/verify.lua`).
fn parse_reset(payload: &[u8]) -> Option<(u64, u64)> {
    let text = std::str::from_utf8(payload.strip_prefix(b"reset ")?).ok()?;
    let (gen, n) = text.split_once(' ')?;
    Some((gen.parse().ok()?, n.parse().ok()?))
}

/// A delivered event as its log entry stores it: `"<EVENT> <body>"`.
fn log_entry(d: &Dispatch) -> String {
    format!("{} {}", d.event.name(), String::from_utf8_lossy(d.body()))
}

/// `"<n> <except> <EVENT> <body>"`.
fn parse_live(payload: &[u8]) -> Option<(u64, u64, Event, &[u8])> {
    let mut parts = payload.splitn(4, |&b| b == b' ');
    let n = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
    let except = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
    let event = Event::from_name(std::str::from_utf8(parts.next()?).ok()?)?;
    Some((n, except, event, parts.next()?))
}

impl RedisBroker {
    pub(super) async fn subscribe(&self, topic: String) -> Result<(), Reject> {
        let (tx, rx) = oneshot::channel();
        self.subs
            .send(SubRequest::Subscribe(topic, tx))
            .await
            .map_err(|_| Reject::new(ErrorCode::Unavailable, "node is shutting down"))?;
        match tokio::time::timeout(OP_TIMEOUT * 2, rx).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(self.unavailable("subscribe", e)),
            _ => Err(self.unavailable("subscribe", "timed out")),
        }
    }

    /// The local channel `name` (`None`: the global stream) and its keys:
    /// meta, log, topic.
    fn stream(&self, name: Option<&str>) -> Option<(Arc<LocalChannel>, String, String, String)> {
        match name {
            Some(name) => Some((
                self.hub.get(name)?,
                ck(name, "meta"),
                ck(name, "log"),
                channel_topic(name),
            )),
            None => Some((
                Arc::clone(&self.hub.global),
                GLOBAL_META.to_owned(),
                GLOBAL_LOG.to_owned(),
                GLOBAL_TOPIC.to_owned(),
            )),
        }
    }

    /// Fills a gap of `channel` (`None`: the global stream) from its log.
    /// Events gone from the log are a loss: the channel starts over. False
    /// when the log could not be read: then every stream is checked again
    /// once Redis answers (`healthy` false has the next tick resync), as
    /// nothing else would ask for a gap in a channel gone quiet.
    async fn fill(&self, node: &Node, channel: Option<&str>, from: u64, to: u64) -> bool {
        let Some((local, _, log, _)) = self.stream(channel) else {
            return true;
        };
        let mut range = Some((from, to));
        let mut failures = 0;
        while let Some((from, to)) = range.take() {
            match self.read_log(&log, from - 1).await {
                Ok(Some(events)) if events.iter().any(|e| e.0 >= to) => {
                    for (n, d) in events {
                        let _ = local.on_event(n, d, Writes::Queued);
                    }
                }
                Ok(_) => {
                    warn!(channel = ?channel, from, to, "events gone from the log");
                    local.fill_done();
                    self.lost_events(node, channel).await;
                    return true;
                }
                Err(_) => {
                    failures += 1;
                    if failures == FILL_TRIES {
                        local.fill_done();
                        self.healthy.store(false, Ordering::Relaxed);
                        return false;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    range = Some((from, to));
                    continue;
                }
            }
            if let Gap::Missing { from, to } = local.fill_done() {
                range = Some((from, to));
            }
        }
        true
    }

    /// Events this node's sessions in `channel` should have had are gone:
    /// they end, and the channel starts over at the log's head.
    async fn lost_events(&self, node: &Node, channel: Option<&str>) {
        let Some((_, meta, log, _)) = self.stream(channel) else {
            return;
        };
        if let Ok((n, gen)) = self.log_head(&meta, &log).await {
            self.restart_local(node, channel, n, gen).await;
        }
    }

    /// After the subscriptions were lost (a reconnect, a failover): checks
    /// every local channel's log against what was delivered from it, and
    /// reads what was missed. Each stream on its own, a few at a time: one
    /// whose shard does not answer does not keep the others from catching
    /// up. False when Redis failed for any (the caller tries again later).
    pub(super) async fn resync(&self, node: &Node) -> bool {
        let mut streams: Vec<Option<Arc<str>>> = self.hub.names().into_iter().map(Some).collect();
        streams.push(None);
        // Boxed: the stream's future must be `Send` for every lifetime.
        type Check<'a> = std::pin::Pin<Box<dyn Future<Output = Result<(), Reject>> + Send + 'a>>;
        let mut checks: Vec<Check<'_>> = Vec::with_capacity(streams.len());
        for name in &streams {
            checks.push(Box::pin(self.verify(node, name.as_deref())));
        }
        let results: Vec<Result<(), Reject>> = futures_util::stream::iter(checks)
            .buffer_unordered(RESYNC_CONCURRENCY)
            .collect()
            .await;
        let failed = results.iter().filter(|r| r.is_err()).count();
        if failed > 0 {
            debug!(
                failed,
                "resync incomplete; it runs again when Redis is back"
            );
        }
        failed == 0
    }

    /// Checks one stream with `lua/verify.lua`: a log that lost what this
    /// node delivered (a failover to a replica that lagged) starts over in
    /// a new generation, on every node; otherwise reads what was missed.
    pub(super) async fn verify(&self, node: &Node, name: Option<&str>) -> Result<(), Reject> {
        let Some((local, meta, log, topic)) = self.stream(name) else {
            return Ok(());
        };
        let Some(pos) = local.position() else {
            return Ok(());
        };
        let entry = local
            .delivered_event(pos)
            .map(|d| log_entry(&d))
            .unwrap_or_default();
        let mut inv = self.scripts.verify.prepare_invoke();
        inv.key(meta).key(log);
        inv.arg(pos).arg(entry).arg(local.gen()).arg(topic);
        let (status, gen, n): (String, u64, u64) = self
            .op("verify", inv.invoke_async(&mut self.conn()))
            .await?;
        if status == "reset" {
            self.restart_stream(node, name, n, gen).await;
        } else if n > pos && !self.fill(node, name, pos + 1, n).await {
            return Err(self.unavailable("verify", "the log could not be read"));
        }
        Ok(())
    }

    /// A `reset` to generation `gen` at `n` (from `verify` here or on
    /// another node): applied once, as generations only grow.
    pub(super) async fn restart_stream(&self, node: &Node, name: Option<&str>, n: u64, gen: u64) {
        match self.stream(name) {
            Some((local, ..)) if local.gen() < gen => self.restart_local(node, name, n, gen).await,
            _ => {}
        }
    }

    /// This node's sessions in `name` miss events the log no longer has:
    /// they end with 1012, so that their clients start over
    /// (`resumed: false`) instead of missing events silently, and the
    /// stream goes on at `n` of generation `gen`.
    async fn restart_local(&self, node: &Node, name: Option<&str>, n: u64, gen: u64) {
        let Some((local, ..)) = self.stream(name) else {
            return;
        };
        tracing::error!(channel = ?name, gen, n, "events of this log are lost; its sessions here end so that clients start over");
        self.metrics.log_resets.inc();
        local.restart_at(n, gen);
        node.end_sessions_in(name, "events lost in the backend; resume to start over")
            .await;
    }

    /// `writes`: whether a channel event's fan-out may write to the
    /// sockets itself (nothing else waits in the queue).
    async fn handle_push(&self, node: &Arc<Node>, info: PushInfo, writes: Writes) {
        match info.kind {
            PushKind::Disconnection => {
                warn!("a redis connection was lost; subscriptions are checked when it returns");
                self.healthy.store(false, Ordering::Relaxed);
                return;
            }
            PushKind::Unsubscribe | PushKind::SUnsubscribe => {
                // Ours, or Redis dropping a slot's subscriptions (it moved
                // or failed over): the subscription task tells them apart.
                // Never waited for: this task fans out every channel, and
                // the subscription task can be seconds behind after a slot
                // move dropped thousands of topics. When its queue is full,
                // the next tick subscribes and checks every stream instead.
                if let Some(topic) = push_topic(&info) {
                    if self.subs.try_send(SubRequest::Dropped(topic)).is_err() {
                        self.lost_pushes.store(true, Ordering::Relaxed);
                    }
                }
                return;
            }
            PushKind::Subscribe | PushKind::SSubscribe => {
                if let Some(stream) = push_topic(&info).as_deref().and_then(stream_of) {
                    self.check_subscribed(node, stream);
                }
                return;
            }
            _ => {}
        }
        let Some(msg) = redis::Msg::from_push_info(info) else {
            return;
        };
        let topic = msg.get_channel_name();
        let payload = msg.get_payload_bytes();
        if let Some(stream) = stream_of(topic) {
            self.on_channel_message(node, stream, payload, writes);
        } else if topic == CONTROL_TOPIC {
            let Ok(text) = std::str::from_utf8(payload) else {
                return;
            };
            // `ban <user>` or `disconnect <user>`: end that user's sessions here.
            let (ban, user) = match (text.strip_prefix("ban "), text.strip_prefix("disconnect ")) {
                (Some(user), _) => (true, user),
                (None, Some(user)) => (false, user),
                (None, None) => return,
            };
            let (node, user) = (Arc::clone(node), user.to_owned());
            tokio::spawn(async move {
                if ban {
                    node.kick_user(&user).await
                } else {
                    node.disconnect_user(&user).await
                }
            });
        } else if topic == node_topic(&self.settings.node_id) {
            self.on_control(node, payload);
        }
    }

    /// Redis confirmed a subscription to `stream`'s topic: one the node
    /// asked for, or one the client library renewed by itself. On a
    /// cluster the library replaces a connection that was slow to answer
    /// during a topology refresh and subscribes on the new one later,
    /// telling the node nothing else (no disconnection, no unsubscribe):
    /// what was published in between reached no node through pub/sub, but
    /// it is in the log, so the stream is checked against it. A refresh
    /// renews every subscription at once; one check per stream runs at a
    /// time, and runs again once if confirmations came meanwhile.
    fn check_subscribed(&self, node: &Arc<Node>, stream: Option<&str>) {
        let key = stream.map(str::to_owned);
        {
            let mut checks = self.checks.lock();
            if let Some(again) = checks.get_mut(&key) {
                *again = true;
                return;
            }
            checks.insert(key.clone(), false);
        }
        let node = Arc::clone(node);
        tokio::spawn(async move {
            let Broker::Redis(r) = &node.broker else {
                return;
            };
            loop {
                // Tried again while Redis fails (a shard down elsewhere
                // holds up the client library's commands); past that, the
                // stream is checked with every other when Redis is back.
                let mut tries = 0;
                while r.verify(&node, key.as_deref()).await.is_err() {
                    tries += 1;
                    if tries == CHECK_TRIES {
                        r.healthy.store(false, Ordering::Relaxed);
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                let mut checks = r.checks.lock();
                match checks.get_mut(&key) {
                    Some(again) if *again => *again = false,
                    _ => {
                        checks.remove(&key);
                        return;
                    }
                }
            }
        });
    }

    fn on_channel_message(
        &self,
        node: &Arc<Node>,
        name: Option<&str>,
        payload: &[u8],
        writes: Writes,
    ) {
        if let Some((gen, n)) = parse_reset(payload) {
            let node = Arc::clone(node);
            let name = name.map(str::to_owned);
            tokio::spawn(async move {
                if let Broker::Redis(r) = &node.broker {
                    r.restart_stream(&node, name.as_deref(), n, gen).await;
                }
            });
            return;
        }
        let Some((n, except, event, body)) = parse_live(payload) else {
            self.metrics.broker_errors.inc();
            return;
        };
        let local = match name {
            Some(name) => match self.hub.get(name) {
                Some(local) => local,
                None => return,
            },
            None => Arc::clone(&self.hub.global),
        };
        // Serialized once per node; every local member shares it.
        let dispatch = Dispatch::from_body(event, body);
        if n == 0 {
            local.deliver_except(&dispatch, except, writes);
            return;
        }
        if let Gap::Missing { from, to } = local.on_event(n, dispatch, writes) {
            let node = Arc::clone(node);
            let name = name.map(str::to_owned);
            tokio::spawn(async move {
                if let Broker::Redis(r) = &node.broker {
                    r.fill(&node, name.as_deref(), from, to).await;
                }
            });
        }
    }

    fn on_control(&self, node: &Arc<Node>, payload: &[u8]) {
        let Ok(text) = std::str::from_utf8(payload) else {
            return;
        };
        let parts: Vec<&str> = text.split(' ').collect();
        match parts.as_slice() {
            ["claim", id, from, req] => {
                let (Ok(id), Ok(req)) = (id.parse::<u64>(), req.parse::<u64>()) else {
                    return;
                };
                let node = Arc::clone(node);
                let from = (*from).to_owned();
                tokio::spawn(async move {
                    let parked = node.park_for_claim(id).await;
                    if let Broker::Redis(r) = &node.broker {
                        let reply =
                            format!("reply {req} {}", if parked { "parked" } else { "unknown" });
                        let _ = r
                            .op(
                                "claim reply",
                                r.publish_cmd(&node_topic(&from), &reply)
                                    .query_async::<i64>(&mut r.conn()),
                            )
                            .await;
                    }
                });
            }
            ["reply", req, result] => {
                if let Ok(req) = req.parse::<u64>() {
                    if let Some(tx) = self.claims.lock().remove(&req) {
                        let _ = tx.send(*result == "parked");
                    }
                }
            }
            _ => {}
        }
    }
}

/// The topic a (un)subscribe confirmation names.
fn push_topic(info: &PushInfo) -> Option<String> {
    redis::from_redis_value(info.data.first()?.clone()).ok()
}

/// The stream a topic carries: a chat channel's, the global one (`None`),
/// or none at all (control topics).
fn stream_of(topic: &str) -> Option<Option<&str>> {
    if topic == GLOBAL_TOPIC {
        return Some(None);
    }
    topic
        .strip_prefix("gw:{c:")
        .and_then(|t| t.strip_suffix('}'))
        .map(Some)
}

/// Reads of a gap's events from the log, 200 ms apart, before the fill
/// gives up and leaves it to the next check of every stream.
const FILL_TRIES: u32 = 5;

/// Attempts at checking a stream after a subscription confirmation
/// (`RedisBroker::check_subscribed`), each up to `OP_TIMEOUT`, half a second
/// apart.
const CHECK_TRIES: u32 = 20;

/// Probes in a row that the cluster connection failed before it is
/// replaced (see `PubSub::probe`): one may hit a node that just stopped,
/// or a slow refresh; a connection that hung fails every one.
const WEDGED_PROBES: u32 = 3;

/// Owns the subscriptions: every (un)subscribe goes through here, in
/// order, so a subscribe is never undone by an older unsubscribe.
pub(super) async fn subscription_task(
    mut pubsub: PubSub,
    mut requests: mpsc::Receiver<SubRequest>,
    node: Weak<Node>,
    node_id: String,
    cluster: bool,
) {
    let mut subscribed: HashSet<String> = [
        GLOBAL_TOPIC.to_owned(),
        CONTROL_TOPIC.to_owned(),
        node_topic(&node_id),
    ]
    .into();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failed_probes = 0;
    // The id of this node's connection on each master (`renewed`).
    let mut connections = HashMap::new();
    // Topics a subscribe failed for (a refused or lost reply): tried again
    // every tick until one takes. Nothing else would: the client library
    // renews its subscriptions only when it reconnects.
    let mut unconfirmed: HashSet<String> = HashSet::new();
    loop {
        tokio::select! {
            request = requests.recv() => match request {
                None => return,
                Some(SubRequest::Subscribe(topic, ack)) => {
                    let result = if subscribed.contains(&topic) { Ok(()) } else { pubsub.subscribe(&topic).await };
                    if result.is_ok() {
                        subscribed.insert(topic);
                    }
                    let _ = ack.send(result);
                }
                Some(SubRequest::Dropped(topic)) => {
                    // Our own unsubscribes left `subscribed` before they
                    // were sent: this one is Redis dropping a slot's
                    // subscriptions (it moved, or its master failed over).
                    if !subscribed.contains(&topic) {
                        continue;
                    }
                    let Some(node) = node.upgrade() else { return };
                    let Broker::Redis(r) = &node.broker else { return };
                    warn!(topic, "redis dropped a subscription; subscribing again");
                    // Its confirmation has the stream checked for what it
                    // missed meanwhile (`check_subscribed`).
                    if pubsub.subscribe(&topic).await.is_err() {
                        // Tried again on the next tick.
                        r.healthy.store(false, Ordering::Relaxed);
                        unconfirmed.insert(topic);
                    }
                }
            },
            _ = tick.tick() => {
                // Keeps the connection checked: a lost one reconnects and
                // resubscribes on this command.
                let Some(node) = node.upgrade() else { return };
                let Broker::Redis(r) = &node.broker else { return };
                // A cluster connection that answers nothing, not even a
                // PING to a live node, is replaced (see `conn`).
                if pubsub.probe().await {
                    failed_probes = 0;
                } else {
                    failed_probes += 1;
                    r.healthy.store(false, Ordering::Relaxed);
                    if failed_probes >= WEDGED_PROBES {
                        failed_probes = 0;
                        unconfirmed = r.replace_connection(&node, &mut pubsub, &subscribed).await;
                        connections.clear();
                    }
                    continue;
                }
                let ok = pubsub.ping().await;
                let was = r.healthy.swap(ok, Ordering::Relaxed);
                let lost = ok && r.lost_pushes.swap(false, Ordering::Relaxed);
                let back = ok && (!was || lost);
                // The client library replaces connections by itself (one
                // slow to answer its check during a topology refresh) and
                // subscribes again on the new one, but on a cluster it asks
                // a master for all of its shard channels in one SSUBSCRIBE,
                // which Redis refuses when they span several slots
                // (CROSSSLOT): the subscriptions there are gone, and
                // nothing tells the node. So each connection's id is
                // checked every second, also while a shard is down (`ok`
                // false: the others' channels go on).
                let renewed = renewed(&mut connections, pubsub.client_ids().await);
                if !renewed.is_empty() {
                    let masters: Vec<String> = renewed.iter().map(Master::name).collect();
                    warn!(?masters, "the redis client replaced a connection; subscribing again");
                }
                if back {
                    info!(back = !was, lost_pushes = lost, "checking the subscriptions and what the channels missed");
                }
                // Topics again, all at once, each on its own deadline (a
                // topic whose shard is down does not hold up the others):
                // every one after a lost connection on a cluster, where a
                // slot may have a new master; those of the renewed masters'
                // slots after a renewed connection (with a shard down that
                // can be every second: not all of a node's channels each
                // time). The confirmations have the streams read from
                // their logs.
                let tried: Vec<&String> = if back && (cluster || lost) {
                    subscribed.iter().collect()
                } else if !renewed.is_empty() {
                    let mut own = Vec::new();
                    for master in &renewed {
                        own.push(pubsub.own_slots(master).await);
                    }
                    on_renewed(&subscribed, &renewed, &own)
                } else {
                    Vec::new()
                };
                // And those that failed before.
                let mut topics: HashSet<&String> = tried.into_iter().collect();
                topics.extend(unconfirmed.iter().filter(|t| subscribed.contains(*t)));
                let failed_topics = pubsub.subscribe_all(topics.into_iter()).await;
                let failed = failed_topics.len();
                unconfirmed = failed_topics.into_iter().collect();
                if back {
                    r.spawn_resync(&node, failed);
                } else if failed > 0 {
                    r.healthy.store(false, Ordering::Relaxed);
                }
                // Channels with no local member: unsubscribe, batched.
                let empty: Vec<String> = r.hub.take_empty().iter().map(|n| channel_topic(n)).filter(|t| subscribed.contains(t)).collect();
                if !empty.is_empty() && pubsub.unsubscribe(&empty).await.is_ok() {
                    for t in empty {
                        subscribed.remove(&t);
                    }
                }
            }
        }
    }
}

/// Records the connections' ids (`PubSub::client_ids`, by master) and
/// returns the masters whose connection is new since the last check:
/// replaced, or to a master not seen before (one promoted by a failover).
/// The first check only records.
fn renewed(known: &mut HashMap<String, i64>, ids: Vec<(Master, i64)>) -> Vec<Master> {
    let first = known.is_empty();
    let mut renewed = Vec::new();
    for (master, id) in ids {
        match known.insert(master.name(), id) {
            Some(old) if old == id => {}
            None if first => {}
            _ => renewed.push(master),
        }
    }
    renewed
}

/// The topics to subscribe again after the connections to `renewed`
/// were replaced: those in the renewed masters' slots, as both the node
/// that answered `CLUSTER SLOTS` and each master itself (`own`, in the
/// same order) tell them, since the former's view can lag behind a slot
/// just moved; every topic when a master did not answer for itself.
fn on_renewed<'a>(
    subscribed: &'a HashSet<String>,
    renewed: &[Master],
    own: &[Option<Master>],
) -> Vec<&'a String> {
    let all = own.iter().any(Option::is_none);
    let masters = renewed.iter().chain(own.iter().flatten());
    subscribed
        .iter()
        .filter(|t| all || masters.clone().any(|m| m.holds(t)))
        .collect()
}

impl RedisBroker {
    /// Replaces a cluster connection that stopped answering, subscribes
    /// again on the new one, and checks every stream for what it missed
    /// meanwhile; streams whose shard does not answer are checked when
    /// Redis is back (`healthy` stays false).
    async fn replace_connection(
        &self,
        node: &Arc<Node>,
        pubsub: &mut PubSub,
        subscribed: &HashSet<String>,
    ) -> HashSet<String> {
        warn!("the redis cluster connection stopped answering; replacing it");
        self.metrics.broker_errors.inc();
        if let Err(e) = pubsub.replace().await {
            warn!(error = %e, "replacing the redis cluster connection failed; trying again");
            return HashSet::new();
        }
        let failed = pubsub.subscribe_all(subscribed.iter()).await;
        info!(
            topics = subscribed.len(),
            failed = failed.len(),
            "redis cluster connection replaced; subscribed again"
        );
        self.spawn_resync(node, failed.len());
        failed.into_iter().collect()
    }

    /// Checks every stream against its log in the background, one such
    /// check at a time (with a shard down one can outlast a tick: each of
    /// its streams waits for its deadline); `failed` topics could not be
    /// subscribed again. Any failure leaves `healthy` false, so that the
    /// next tick subscribes and checks again.
    fn spawn_resync(&self, node: &Arc<Node>, failed: usize) {
        if self.resyncing.swap(true, Ordering::AcqRel) {
            self.healthy.store(false, Ordering::Relaxed);
            return;
        }
        let node = Arc::clone(node);
        tokio::spawn(async move {
            if let Broker::Redis(r) = &node.broker {
                if !r.resync(&node).await || failed > 0 {
                    r.healthy.store(false, Ordering::Relaxed);
                }
                r.resyncing.store(false, Ordering::Release);
            }
        });
    }
}

pub(super) async fn push_task(mut messages: mpsc::Receiver<PushInfo>, node: Weak<Node>) {
    while let Some(info) = messages.recv().await {
        let Some(node) = node.upgrade() else { return };
        // More messages waiting means the node is behind: this event goes
        // to the writer tasks, which batch frames and spread over the
        // runtime's threads. Keeping up, the fan-out writes it itself
        // (with direct writes on), with no task woken per delivery.
        let writes = if messages.is_empty() {
            Writes::Direct
        } else {
            Writes::Queued
        };
        if let Broker::Redis(r) = &node.broker {
            r.handle_push(&node, info, writes).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_with_a_new_id_is_renewed() {
        let mut known = HashMap::new();
        let master = |host: &str| Master {
            host: host.to_owned(),
            port: 7000,
            slots: vec![0..=9],
        };
        let ids = |list: &[(&str, i64)]| list.iter().map(|(m, i)| (master(m), *i)).collect();
        let names = |masters: Vec<Master>| masters.iter().map(Master::name).collect::<Vec<_>>();
        assert!(renewed(&mut known, ids(&[("a", 1), ("b", 2)])).is_empty());
        assert!(renewed(&mut known, ids(&[("a", 1), ("b", 2)])).is_empty());
        // A master that did not answer is not renewed, nor forgotten.
        assert!(renewed(&mut known, ids(&[("b", 2)])).is_empty());
        assert_eq!(
            names(renewed(&mut known, ids(&[("a", 1), ("b", 7)]))),
            ["b:7000"]
        );
        assert_eq!(
            names(renewed(&mut known, ids(&[("a", 1), ("c", 3)]))),
            ["c:7000"]
        );
        assert!(renewed(&mut known, ids(&[("a", 1), ("b", 7), ("c", 3)])).is_empty());
    }

    #[test]
    fn a_renewed_master_has_the_topics_of_its_slots_subscribed_again() {
        use super::super::conn::key_slot;
        let master = |port, slots: &[std::ops::RangeInclusive<u16>]| Master {
            host: "h".to_owned(),
            port,
            slots: slots.to_vec(),
        };
        let topics: HashSet<String> = (0..200).map(|i| format!("gw:{{c:t{i}}}")).collect();
        fn sorted(mut v: Vec<&String>) -> Vec<&String> {
            v.sort();
            v
        }
        let want = sorted(topics.iter().filter(|t| key_slot(t) < 8192).collect());
        // By the cluster's view alone, by the master's own, by either.
        let renewed = [master(1, &[0..=8191])];
        let none = [master(1, &[])];
        assert_eq!(
            sorted(on_renewed(&topics, &renewed, &[Some(none[0].clone())])),
            want
        );
        assert_eq!(
            sorted(on_renewed(&topics, &none, &[Some(renewed[0].clone())])),
            want
        );
        let split = [master(1, &[0..=4095])];
        let rest = master(1, &[4096..=8191]);
        assert_eq!(sorted(on_renewed(&topics, &split, &[Some(rest)])), want);
        assert!(want.len() > 50 && want.len() < 150, "{}", want.len());
        // A master that does not answer for itself: every topic.
        assert_eq!(on_renewed(&topics, &renewed, &[None]).len(), topics.len());
    }

    #[test]
    fn live_messages_parse() {
        let (n, except, event, body) =
            parse_live(br#"12 0 MESSAGE_DELETE {"id":"1","channel":"a b"}"#).unwrap();
        assert_eq!((n, except, event), (12, 0, Event::MessageDelete));
        assert_eq!(body, br#"{"id":"1","channel":"a b"}"#);
        assert!(parse_live(b"x 0 MESSAGE_DELETE {}").is_none());
        assert!(parse_live(b"1 0 NOPE {}").is_none());
    }
}
