//! Upkeep: the keys and node index taken at start, and a periodic round
//! that keeps this node's liveness and presence fresh, sweeps the presence
//! of crashed nodes' sessions, and notices a Redis that lost its data.

use super::conn::Batch;
use super::{
    ck, sk, Conn, RedisBroker, CHANNELS, EPOCH, GLOBAL_LOG, GLOBAL_META, NODES, NODE_TTL_MS,
    SWEEP_BATCH, SWEEP_CHANNELS,
};
use crate::broker::memory::unix_ms;
use crate::broker::{Broker, NodeInfo};
use crate::node::Node;
use crate::wire::Reject;
use redis::RedisResult;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tracing::debug;

/// Members refreshed by one ZADD of the upkeep round.
const PRESENCE_PER_ZADD: usize = 512;

impl RedisBroker {
    /// Makes sure the default channel exists and returns the data set's
    /// epoch: a random id written once, so that a Redis that lost its data
    /// (restarted empty) is noticed by a changed epoch.
    pub(super) async fn prepare_keys(&self, conn: &mut Conn) -> RedisResult<String> {
        let meta = serde_json::json!({"topic": "", "created_by": null}).to_string();
        let mut pipe = redis::pipe();
        pipe.hset_nx(CHANNELS, &self.settings.default_channel, meta)
            .ignore()
            .set_nx(EPOCH, format!("{:016x}", rand::random::<u64>()))
            .ignore()
            .get(EPOCH);
        let (epoch,): (String,) = pipe.query_async(conn).await?;
        Ok(epoch)
    }

    /// Measures Redis' clock against ours (half the round trip counted
    /// each way), for the deadlines messages carry.
    pub(super) async fn measure_clock(&self, conn: &mut Conn) -> RedisResult<()> {
        let before = unix_ms() as i64;
        let (secs, micros): (i64, i64) = redis::cmd("TIME").query_async(conn).await?;
        let after = unix_ms() as i64;
        let redis_ms = secs * 1000 + micros / 1000;
        self.clock_offset_ms
            .store(redis_ms - (before + after) / 2, Ordering::Relaxed);
        Ok(())
    }

    /// A number 0..1000 no other live node holds, for message ids.
    pub(super) async fn claim_node_index(&self, conn: &mut Conn) -> RedisResult<u64> {
        let start = rand::random::<u64>() % 1000;
        for i in 0..1000 {
            let index = (start + i) % 1000;
            let ok: Option<String> = redis::cmd("SET")
                .arg(format!("gw:nodeidx:{index}"))
                .arg(&self.settings.node_id)
                .arg("NX")
                .arg("PX")
                .arg(60_000)
                .query_async(conn)
                .await?;
            if ok.is_some() {
                return Ok(index);
            }
        }
        Err(redis::RedisError::from((
            redis::ErrorKind::Client,
            "no free node index (1000 nodes?)",
        )))
    }

    /// Writes this node's entry in the node registry: `"<ms> <sessions>"`.
    pub(super) async fn register(&self, conn: &mut Conn, sessions: u64) -> RedisResult<()> {
        redis::cmd("HSET")
            .arg(NODES)
            .arg(&self.settings.node_id)
            .arg(format!("{} {sessions}", unix_ms()))
            .query_async::<i64>(conn)
            .await
            .map(|_| ())
    }

    /// The nodes whose registry entry is fresh, with their session counts
    /// as of their last upkeep round (this node's: as of now). Stale
    /// entries (a crashed node) are removed on the way.
    pub async fn nodes(&self, node: &Node) -> Result<Vec<NodeInfo>, Reject> {
        let mut c = self.conn();
        let all: Vec<(String, String)> = self
            .op(
                "nodes",
                redis::cmd("HGETALL").arg(NODES).query_async(&mut c),
            )
            .await?;
        let now = unix_ms();
        let mut nodes = Vec::with_capacity(all.len());
        let mut stale = Vec::new();
        for (id, entry) in all {
            let (at, sessions) = entry
                .split_once(' ')
                .and_then(|(at, n)| Some((at.parse::<u64>().ok()?, n.parse::<u64>().ok()?)))
                .unwrap_or((0, 0));
            if id == self.settings.node_id {
                continue;
            }
            // Older than the TTL, or as far in the future (no node's
            // clock: a record not written by a node): stale.
            if at.saturating_add(NODE_TTL_MS) < now || at > now.saturating_add(NODE_TTL_MS) {
                stale.push(id);
            } else {
                nodes.push(NodeInfo { id, sessions });
            }
        }
        nodes.push(NodeInfo {
            id: self.settings.node_id.clone(),
            sessions: node.session_count(),
        });
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        if !stale.is_empty() {
            let _ = self
                .op(
                    "nodes",
                    redis::cmd("HDEL")
                        .arg(NODES)
                        .arg(&stale)
                        .query_async::<i64>(&mut c),
                )
                .await;
        }
        Ok(nodes)
    }

    /// One round of upkeep: liveness, presence of local sessions, sweep of
    /// expired presence (sessions of crashed nodes).
    async fn maintain(&self, node: &Node) -> Result<(), Reject> {
        let mut c = self.conn();
        let epoch = self.op("epoch", self.prepare_keys(&mut c)).await?;
        if epoch != *self.epoch.lock() {
            drop(c);
            self.data_lost(node, epoch).await;
            return Ok(());
        }
        self.op("clock", self.measure_clock(&mut c)).await?;
        drop(c);
        let now = unix_ms();
        let window = self.window_ms();
        let mut batch = Batch::new(self.settings.cluster);
        let mut cmd = redis::cmd("SET");
        let node_key = format!("gw:node:{}", self.settings.node_id);
        cmd.arg(&node_key).arg(now).arg("PX").arg(NODE_TTL_MS);
        batch.add(&node_key, cmd);
        let mut cmd = redis::cmd("HSET");
        cmd.arg(NODES)
            .arg(&self.settings.node_id)
            .arg(format!("{now} {}", node.session_count()));
        batch.add(NODES, cmd);
        let index_key = format!("gw:nodeidx:{}", self.node_index.load(Ordering::Relaxed));
        let mut cmd = redis::cmd("PEXPIRE");
        cmd.arg(&index_key).arg(60_000);
        batch.add(&index_key, cmd);
        // Presence entries and session keys live for the resume window;
        // refreshed every third of it, they always have two thirds left
        // (every round would be a dozen times more Redis work for nothing:
        // at 100,000 sessions it was a third of Redis' CPU). One ZADD per
        // channel (up to PRESENCE_PER_ZADD members) rather than one per
        // session; a session's own key, in a slot of its own, needs its
        // own PEXPIRE.
        let refresh =
            now.saturating_sub(self.presence_refreshed_ms.load(Ordering::Relaxed)) >= window / 3;
        let mut by_channel: HashMap<Arc<str>, Vec<u64>> = HashMap::new();
        let sessions = if refresh {
            node.local_sessions()
        } else {
            Vec::new()
        };
        for session in sessions {
            by_channel
                .entry(session.channel())
                .or_default()
                .push(session.id);
            let key = sk(session.id);
            let mut cmd = redis::cmd("PEXPIRE");
            cmd.arg(&key).arg(window);
            batch.add(&key, cmd);
        }
        for (channel, ids) in by_channel {
            let presence = ck(&channel, "presence");
            for ids in ids.chunks(PRESENCE_PER_ZADD) {
                let mut cmd = redis::cmd("ZADD");
                cmd.arg(&presence);
                for id in ids {
                    cmd.arg(now + window).arg(id);
                }
                batch.add(&presence, cmd);
            }
        }
        self.op("upkeep", batch.run(&self.cmd)).await?;
        if refresh {
            self.presence_refreshed_ms.store(now, Ordering::Relaxed);
        }
        self.sweep(node, now).await
    }

    /// Removes the presence of sessions whose owner stopped refreshing it
    /// (a crashed node), in the next `SWEEP_CHANNELS` channels of the
    /// registry: every node walks all channels, a slice per round.
    async fn sweep(&self, node: &Node, now: u64) -> Result<(), Reject> {
        let channels = self.sweep_slice().await?;
        let reads = channels.iter().map(|channel| {
            let mut c = self.conn();
            let mut cmd = redis::cmd("ZRANGEBYSCORE");
            cmd.arg(ck(channel, "presence"))
                .arg("-inf")
                .arg(now)
                .arg("LIMIT")
                .arg(0)
                .arg(SWEEP_BATCH);
            async move { cmd.query_async::<Vec<u64>>(&mut c).await }
        });
        let expired = self
            .op("sweep", async {
                futures_util::future::join_all(reads)
                    .await
                    .into_iter()
                    .collect::<RedisResult<Vec<_>>>()
            })
            .await?;
        for (channel, ids) in channels.iter().zip(expired) {
            for id in ids {
                if node.has_session(id) {
                    continue;
                }
                // The script removes the member once, so only one node
                // sends the ROOM_USER_REMOVE.
                self.leave_script(id, channel).await?;
            }
        }
        Ok(())
    }

    /// The next channels to sweep; the registry is read again after each
    /// full pass.
    async fn sweep_slice(&self) -> Result<Vec<String>, Reject> {
        let at = {
            let sweep = self.sweep.lock();
            (sweep.1 < sweep.0.len()).then_some(sweep.1)
        };
        if at.is_none() {
            let names = self.channel_names().await?;
            *self.sweep.lock() = (names, 0);
        }
        let mut sweep = self.sweep.lock();
        let (names, cursor) = &mut *sweep;
        let end = (*cursor + SWEEP_CHANNELS).min(names.len());
        let slice = names[*cursor..end].to_vec();
        *cursor = end;
        Ok(slice)
    }

    /// Redis came back without its data: every counter, log, presence
    /// entry and parked session is gone. The sessions of this node cannot
    /// continue without a gap, so they end (their clients reconnect and
    /// get `resumed: false`), and the hub starts over at the new logs.
    async fn data_lost(&self, node: &Node, epoch: String) {
        tracing::error!("redis lost its data (new epoch); ending this node's sessions so that clients start over");
        self.metrics.broker_errors.inc();
        node.end_all_sessions(1012, "backend restarted").await;
        self.hub.reset();
        let (global, gen) = self
            .log_head(GLOBAL_META, GLOBAL_LOG)
            .await
            .unwrap_or((0, 0));
        self.hub.global.init_gen(gen);
        self.hub.global.init_position(global);
        *self.epoch.lock() = epoch;
    }
}

pub(super) async fn maintenance_task(node: Weak<Node>) {
    let Some(period) = node.upgrade().map(|n| {
        (n.config.resume_window() / 4).clamp(Duration::from_millis(250), Duration::from_secs(5))
    }) else {
        return;
    };
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(node) = node.upgrade() else { return };
        if let Broker::Redis(r) = &node.broker {
            if let Err(e) = r.maintain(&node).await {
                debug!(error = %e.message, "upkeep failed");
            }
        }
    }
}
