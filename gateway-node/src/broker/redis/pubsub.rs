//! The pub/sub connection: one task owns it and its subscriptions, another
//! hands what arrives to the hub. Gaps are filled from the logs, and claim
//! requests from other nodes are answered here.

use super::conn::PubSub;
use super::{
    channel_topic, ck, node_topic, RedisBroker, SubRequest, CONTROL_TOPIC, GLOBAL_LOG, GLOBAL_META,
    GLOBAL_TOPIC, OP_TIMEOUT,
};
use crate::broker::Broker;
use crate::hub::Gap;
use crate::node::Node;
use crate::wire::{Dispatch, Reject};
use gateway_shared::protocol::{ErrorCode, Event};
use redis::{AsyncCommands, PushInfo, PushKind};
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

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

    /// Fills a gap of `channel` (`None`: the global stream) from its log.
    async fn fill(&self, channel: Option<&str>, from: u64, to: u64) {
        let (local, log) = match channel {
            Some(name) => match self.hub.get(name) {
                Some(local) => (local, ck(name, "log")),
                None => return,
            },
            None => (Arc::clone(&self.hub.global), GLOBAL_LOG.to_owned()),
        };
        let mut range = Some((from, to));
        while let Some((from, to)) = range.take() {
            match self.read_log(&log, from - 1).await {
                Ok(Some(events)) => {
                    let complete = events.iter().any(|e| e.0 >= to);
                    for (n, d) in events {
                        let _ = local.on_event(n, d);
                    }
                    if !complete {
                        warn!(channel = ?channel, from, to, "events missing from the log; skipping them");
                        local.skip_gap();
                    }
                }
                Ok(None) => {
                    warn!(channel = ?channel, from, to, "events trimmed from the log; skipping them");
                    local.skip_gap();
                }
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            if let Gap::Missing { from, to } = local.fill_done() {
                range = Some((from, to));
            }
        }
    }

    /// After the pub/sub connection came back: read what every local
    /// channel may have missed.
    async fn resync(&self) {
        let mut c = self.conn();
        let mut targets: Vec<(Option<Arc<str>>, String)> = self
            .hub
            .names()
            .into_iter()
            .map(|n| (Some(Arc::clone(&n)), ck(&n, "meta")))
            .collect();
        targets.push((None, GLOBAL_META.to_owned()));
        for (name, meta) in targets {
            let n: Option<u64> = match self.op("resync", c.hget(&meta, "n")).await {
                Ok(n) => n,
                Err(_) => return,
            };
            let local = match &name {
                Some(name) => self.hub.get(name),
                None => Some(Arc::clone(&self.hub.global)),
            };
            let (Some(n), Some(local)) = (n, local) else {
                continue;
            };
            if let Some(pos) = local.position() {
                if n > pos {
                    self.fill(name.as_deref(), pos + 1, n).await;
                }
            }
        }
    }

    async fn handle_push(&self, node: &Arc<Node>, info: PushInfo) {
        if info.kind == PushKind::Disconnection {
            warn!("redis pub/sub connection lost; it resubscribes when it returns");
            self.healthy.store(false, Ordering::Relaxed);
            return;
        }
        if info.kind == PushKind::Subscribe {
            return;
        }
        let Some(msg) = redis::Msg::from_push_info(info) else {
            return;
        };
        let topic = msg.get_channel_name();
        let payload = msg.get_payload_bytes();
        if let Some(name) = topic
            .strip_prefix("gw:{c:")
            .and_then(|t| t.strip_suffix('}'))
        {
            self.on_channel_message(node, Some(name), payload);
        } else if topic == GLOBAL_TOPIC {
            self.on_channel_message(node, None, payload);
        } else if topic == CONTROL_TOPIC {
            if let Some(user) = std::str::from_utf8(payload)
                .ok()
                .and_then(|p| p.strip_prefix("ban "))
            {
                let node = Arc::clone(node);
                let user = user.to_owned();
                tokio::spawn(async move { node.kick_user(&user).await });
            }
        } else if topic == node_topic(&self.settings.node_id) {
            self.on_control(node, payload);
        }
    }

    fn on_channel_message(&self, node: &Arc<Node>, name: Option<&str>, payload: &[u8]) {
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
            local.deliver_except(&dispatch, except);
            return;
        }
        if let Gap::Missing { from, to } = local.on_event(n, dispatch) {
            let node = Arc::clone(node);
            let name = name.map(str::to_owned);
            tokio::spawn(async move {
                if let Broker::Redis(r) = &node.broker {
                    r.fill(name.as_deref(), from, to).await;
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

/// Owns the pub/sub connection: every (un)subscribe goes through here, in
/// order, so a subscribe is never undone by an older unsubscribe.
pub(super) async fn subscription_task(
    mut pubsub: PubSub,
    mut requests: mpsc::Receiver<SubRequest>,
    node: Weak<Node>,
    node_id: String,
) {
    let mut subscribed: HashSet<String> = [
        GLOBAL_TOPIC.to_owned(),
        CONTROL_TOPIC.to_owned(),
        node_topic(&node_id),
    ]
    .into();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
            },
            _ = tick.tick() => {
                // Keeps the connection checked: a lost one reconnects and
                // resubscribes on this command.
                let Some(node) = node.upgrade() else { return };
                let ok = pubsub.ping().await;
                if let Broker::Redis(r) = &node.broker {
                    let was = r.healthy.swap(ok && r.ping().await, Ordering::Relaxed);
                    if ok && !was {
                        info!("redis is back; reading what the channels missed");
                        let node = Arc::clone(&node);
                        tokio::spawn(async move {
                            if let Broker::Redis(r) = &node.broker {
                                r.resync().await;
                            }
                        });
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
}

pub(super) async fn push_task(mut messages: mpsc::Receiver<PushInfo>, node: Weak<Node>) {
    while let Some(info) = messages.recv().await {
        let Some(node) = node.upgrade() else { return };
        if let Broker::Redis(r) = &node.broker {
            r.handle_push(&node, info).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
