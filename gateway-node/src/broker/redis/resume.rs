//! Resume on another node: the owner parks the session (its held
//! dispatches and log cursors go to Redis), the new node claims it, takes
//! it over and catches it up from the logs before joining the hub.

use super::publish::parse_entry;
use super::{
    channel_topic, ck, node_topic, sk, RedisBroker, CLAIM_TIMEOUT, GLOBAL_LOG, GLOBAL_META,
};
use crate::auth::Identity;
use crate::hub::LocalChannel;
use crate::metrics::ResumeResult;
use crate::node::Node;
use crate::session::{Session, Unmovable};
use crate::wire::{Dispatch, Reject};
use gateway_shared::protocol::ErrorCode;
use redis::AsyncCommands;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::oneshot;
use tracing::debug;

/// A session as stored in `gw:{s:ID}`.
struct StoredSession {
    identity: Identity,
    enc_key: String,
    channel: String,
    owner: String,
    state: String,
    seq: u64,
    ccur: u64,
    gcur: u64,
    /// Generations of the channel and global logs the cursors refer to.
    cgen: u64,
    ggen: u64,
}

/// The largest sequence number or log cursor a stored session may hold:
/// 2^53 - 1, beyond any a session reaches (and beyond a JavaScript
/// client's exact integers). A record above it was not written by a node,
/// and is not resumed (its arithmetic would overflow).
const MAX_STORED_N: u64 = (1 << 53) - 1;

impl StoredSession {
    fn from_map(map: &HashMap<String, String>) -> Option<Self> {
        let get = |k: &str| map.get(k).cloned();
        let num = |k: &str| map.get(k).and_then(|v| v.parse().ok()).unwrap_or(0);
        let n = |k: &str| Some(num(k)).filter(|&n| n <= MAX_STORED_N);
        Some(Self {
            identity: Identity {
                id: get("uid")?,
                name: get("name")?,
                admin: get("admin").as_deref() == Some("1"),
            },
            enc_key: get("key")?,
            channel: get("ch")?,
            owner: get("owner").unwrap_or_default(),
            state: get("state").unwrap_or_default(),
            seq: n("seq")?,
            ccur: n("ccur")?,
            gcur: n("gcur")?,
            cgen: num("cgen"),
            ggen: num("ggen"),
        })
    }
}

/// How long a park waits for a CHANNEL_MOVE (or a take-over) of its session
/// to end: with the park's own write, within the claimer's `CLAIM_TIMEOUT`.
const MOVE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

impl RedisBroker {
    /// Parks a local session for another node: its held dispatches and
    /// log cursors go to Redis. The caller closes its connection.
    pub async fn park(&self, session: &Arc<Session>) -> Result<bool, Reject> {
        // A move in progress changes the channel and where the session is
        // in it: wait for it to end (a few round trips), and keep the
        // channel, so that no move starts after.
        let waited = tokio::time::Instant::now();
        loop {
            match session.begin_move() {
                Ok(()) => break,
                Err(Unmovable::Moving) if waited.elapsed() < MOVE_WAIT => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(_) => return Ok(false),
            }
        }
        let channel = session.channel();
        let local = self.hub.get(&channel);
        let cgen = local.as_ref().map_or(0, |c| c.gen());
        let ccur = local
            .and_then(|c| c.detach_with_cursor(session.id))
            .unwrap_or(0);
        let ggen = self.hub.global.gen();
        let gcur = self.hub.global.detach_with_cursor(session.id).unwrap_or(0);
        let Some((_conn, seq, ring)) = session.park() else {
            return Ok(false);
        };
        let key = sk(session.id);
        let buf = format!("{key}:buf");
        let window = self.window_ms() as i64;
        let mut pipe = redis::pipe();
        pipe.hset_multiple(
            &key,
            &[
                ("state", "parked".to_owned()),
                ("seq", seq.to_string()),
                ("ccur", ccur.to_string()),
                ("gcur", gcur.to_string()),
                ("cgen", cgen.to_string()),
                ("ggen", ggen.to_string()),
                ("ch", channel.to_string()),
            ],
        )
        .ignore()
        .pexpire(&key, window)
        .ignore()
        .del(&buf)
        .ignore();
        let entries: Vec<Vec<u8>> = ring
            .iter()
            .map(|(s, d)| {
                let mut e = format!("{s} {} ", d.event.name()).into_bytes();
                e.extend_from_slice(d.body());
                e
            })
            .collect();
        if !entries.is_empty() {
            pipe.rpush(&buf, entries)
                .ignore()
                .pexpire(&buf, window)
                .ignore();
        }
        let mut c = self.conn();
        // An error here leaves the session ended on this node and not
        // parked in Redis: the caller ends it for good and says so.
        self.op("park", pipe.query_async::<()>(&mut c)).await?;
        // Parked: a presence entry not refreshed now only expires sooner.
        if let Err(e) = self.touch_presence(session.id, &channel).await {
            debug!(session = session.id, error = %e.message, "presence of a parked session not refreshed");
        }
        debug!(session = session.id, seq, ccur, gcur, "parked");
        Ok(true)
    }

    /// Asks `owner` to park session `id`; true when it did.
    async fn claim(&self, owner: &str, id: u64) -> Result<bool, Reject> {
        let mut c = self.conn();
        let alive: bool = self
            .op("node lookup", c.exists(format!("gw:node:{owner}")))
            .await?;
        if !alive {
            return Ok(false);
        }
        let req = self.claim_ids.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.claims.lock().insert(req, tx);
        let msg = format!("claim {id} {} {req}", self.settings.node_id);
        let sent: Result<i64, _> = self
            .op(
                "claim",
                self.publish_cmd(&node_topic(owner), &msg)
                    .query_async(&mut c),
            )
            .await;
        let parked = match sent {
            Ok(_) => matches!(tokio::time::timeout(CLAIM_TIMEOUT, rx).await, Ok(Ok(true))),
            Err(e) => {
                self.claims.lock().remove(&req);
                return Err(e);
            }
        };
        self.claims.lock().remove(&req);
        Ok(parked)
    }

    /// Resume of a session this node does not hold: claim it from its
    /// owner if needed, take it over, and catch it up from the logs. `None`
    /// when it cannot be resumed without a gap.
    pub async fn take_over(
        &self,
        node: &Node,
        identity: &Identity,
        id: u64,
    ) -> Result<Option<(Arc<Session>, ResumeResult)>, Reject> {
        let mut c = self.conn();
        let map: HashMap<String, String> = self.op("session", c.hgetall(sk(id))).await?;
        drop(c);
        let Some(stored) = StoredSession::from_map(&map) else {
            return Ok(None);
        };
        if stored.identity.id != identity.id {
            return Err(Reject::new(
                ErrorCode::AuthenticationFailed,
                "session belongs to another user",
            ));
        }
        // Parked (its node drained) or claimed from a live owner.
        let how = if stored.state == "parked" {
            ResumeResult::Parked
        } else {
            ResumeResult::Remote
        };
        if stored.state != "parked"
            && (stored.owner == self.settings.node_id || !self.claim(&stored.owner, id).await?)
        {
            // The owner is gone (crashed), or does not hold it: the owner
            // may have parked it meanwhile, so look again once.
            let mut c = self.conn();
            let state: Option<String> = self.op("session", c.hget(sk(id), "state")).await?;
            if state.as_deref() != Some("parked") {
                return Ok(None);
            }
        }
        let mut c = self.conn();
        let key = sk(id);
        let buf: Option<Vec<String>> = self
            .op(
                "take over",
                self.scripts
                    .take
                    .key(&key)
                    .key(format!("{key}:buf"))
                    .arg(&self.settings.node_id)
                    .arg(self.window_ms())
                    .invoke_async(&mut c),
            )
            .await?;
        let Some(buf) = buf else { return Ok(None) };
        let map: HashMap<String, String> = self.op("session", c.hgetall(&key)).await?;
        drop(c);
        let Some(stored) = StoredSession::from_map(&map) else {
            return Ok(None);
        };
        let ring: Vec<(u64, Arc<Dispatch>)> = buf
            .iter()
            .filter_map(|e| {
                let (seq, rest) = e.split_once(' ')?;
                Some((seq.parse().ok()?, parse_entry(rest)?))
            })
            .collect();
        let session = Session::restore(
            id,
            stored.identity.clone(),
            stored.enc_key.clone(),
            Arc::from(stored.channel.as_str()),
            stored.seq,
            ring,
            node.limits,
            Arc::clone(&node.metrics),
        );
        // Its channel taken first (a park that finds it waits until it is in
        // its streams), then held by the node (a reset of a log meanwhile
        // ends it too). Subscribe first, then read the logs: whatever is
        // published after the read arrives live and the hub drops what the
        // read covered.
        let _ = session.begin_move();
        node.hold(&session);
        let local = self.hub.pin(&stored.channel);
        let caught_up = self.catch_up(&session, &local, &stored).await;
        session.end_move();
        match caught_up {
            Ok(true) if !session.is_ended() => {
                // Refreshed by the upkeep from now on if this fails.
                if let Err(e) = self.touch_presence(id, &stored.channel).await {
                    debug!(session = id, error = %e.message, "presence of a resumed session not refreshed");
                }
                Ok(Some((session, how)))
            }
            // Ended meanwhile (its channel's log was reset).
            Ok(true) => Ok(None),
            caught_up => {
                // Events it missed are gone, or Redis failed part-way: the
                // session ends here, out of every stream it entered.
                local.unpin();
                node.forget(id);
                // A connection that resumed it here meanwhile learns it.
                if let Some(conn) = session.end().flatten() {
                    conn.close_with(1012, "session could not be resumed", false);
                }
                let _ = self.end_session(&session).await;
                caught_up.map(|_| None)
            }
        }
    }

    /// Whether a log still holds what a parked cursor refers to: the same
    /// generation, and a counter not behind the cursor (a replica that
    /// lagged before a failover can be, until some node notices).
    async fn log_intact(
        &self,
        meta: &str,
        log: &str,
        cursor: u64,
        gen: u64,
    ) -> Result<bool, Reject> {
        let (n, now) = self.log_head(meta, log).await?;
        Ok(n >= cursor && now == gen)
    }

    async fn catch_up(
        &self,
        session: &Arc<Session>,
        local: &LocalChannel,
        stored: &StoredSession,
    ) -> Result<bool, Reject> {
        let (channel, ccur, gcur) = (stored.channel.as_str(), stored.ccur, stored.gcur);
        self.subscribe(channel_topic(channel)).await?;
        if !self
            .log_intact(GLOBAL_META, GLOBAL_LOG, gcur, stored.ggen)
            .await?
            || !self
                .log_intact(&ck(channel, "meta"), &ck(channel, "log"), ccur, stored.cgen)
                .await?
        {
            return Ok(false);
        }
        // The position this session brings is in that generation of the
        // log: a channel new to this node must not start at generation 0,
        // or its next check of the log would take it for a reset (1012).
        local.init_gen(stored.cgen);
        let Some(global) = self.read_log(GLOBAL_LOG, gcur).await? else {
            return Ok(false);
        };
        let Some(events) = self.read_log(&ck(channel, "log"), ccur).await? else {
            return Ok(false);
        };
        let gpos = global.last().map_or(gcur, |e| e.0);
        for (_, d) in &global {
            session.deliver(d);
        }
        if !self
            .attach_at(&self.hub.global, GLOBAL_LOG, session, gpos, None)
            .await?
        {
            return Ok(false);
        }
        let cpos = events.last().map_or(ccur, |e| e.0);
        for (_, d) in &events {
            session.deliver(d);
        }
        self.attach_at(local, &ck(channel, "log"), session, cpos, None)
            .await
    }
}
