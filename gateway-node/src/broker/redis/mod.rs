//! The Redis backend: any number of nodes sharing one Redis behave as one
//! gateway.
//!
//! # Layout
//!
//! Every key of one chat channel shares the hash tag `{c:NAME}`, every key
//! of one session `{s:ID}`, the cluster-wide ones `{g}`, so each script
//! touches one slot.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `gw:{g}:channels` | hash | name → meta JSON |
//! | `gw:{g}:meta`, `gw:{g}:log` | hash, stream | `n` and log of cluster-wide events |
//! | `gw:{c:NAME}:meta` | hash | `n` (last event), `lastid` (last message id), `ord` |
//! | `gw:{c:NAME}:log` | stream | the channel's events, entry id `0-n` |
//! | `gw:{c:NAME}:hist` | list | `"<id> <MESSAGE_CREATE body>"`, oldest first |
//! | `gw:{c:NAME}:members` | hash | session id → user id |
//! | `gw:{c:NAME}:users`, `:ujson`, `:order` | hash, hash, zset | per user: sessions, JSON, join order |
//! | `gw:{s:ID}` | hash | session: user, channel, owner, state, seq, cursors; TTL = resume window |
//! | `gw:{s:ID}:buf` | list | `"<seq> <EVENT> <body>"` parked for a resume |
//! | `gw:presence` | zset | `"<channel>\|<session>"` → expiry (ms), refreshed by the owner |
//! | `gw:ban:USER` | string | the ban; TTL = its duration |
//! | `gw:sid` | counter | session ids |
//! | `gw:node:ID`, `gw:nodeidx:I` | strings | node liveness and message-id bits, with TTLs |
//!
//! Pub/sub: `gw:{c:NAME}` and `gw:{g}` carry `"<n> <except> <EVENT> <body>"`
//! (`n = 0`: not logged, e.g. START_TYPING, not for session `except`);
//! `gw:ctl` carries `"ban <user>"`; `gw:{n:ID}` carries claims and replies.
//!
//! # Flow
//!
//! Publishing is one script: count `n`, append to the log, publish. A node
//! subscribes to a channel while it has a local member there, and hands
//! every message to the [`Hub`], which delivers in `n` order and asks for
//! a re-read of the log when it sees a gap (a dropped subscription, a
//! queue overflow). A session entering a channel subscribes first, then
//! runs the join script, whose result fixes its position in the log.
//!
//! Resume elsewhere: the new node asks the owner to park the session
//! (`claim`). The owner closes the old socket (4017), leaves the hub,
//! records the session's sequence number and log cursors, and writes its
//! held dispatches to `:buf`. The new node takes the parked session over
//! (one script), replays `:buf`, reads the channel and global logs after
//! the cursors, and joins the hub where the catch-up ended. A drained node
//! parks every session the same way; a crashed node parks nothing, so its
//! sessions resume as new ones (`resumed: false`), never with a gap.

use super::memory::{unix_ms, IdGenerator};
use super::Ban;
use crate::auth::Identity;
use crate::hub::{Gap, Hub, LocalChannel};
use crate::metrics::{Metrics, ResumeResult};
use crate::node::Node;
use crate::session::Session;
use crate::wire::{Dispatch, Reject};
use deadpool_redis::{Pool, PoolConfig, Runtime, Timeouts};
use gateway_shared::protocol::{ChannelAdd, ErrorCode, Event, MessageDelete, StartTyping, User};
use parking_lot::Mutex;
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, PushInfo, PushKind, RedisResult, Script};
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

/// Longest a single backend operation may take before the request fails
/// with 4018.
const OP_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a node waits for the owner of a session to park it.
const CLAIM_TIMEOUT: Duration = Duration::from_secs(3);
/// Events a channel log keeps (for catch-up on resume and gap fills).
const LOG_RETAIN: usize = 10_000;
/// Pub/sub messages queued between the connection and the hub; past it
/// messages are dropped and recovered from the log as a gap.
const PUSH_QUEUE: usize = 64 * 1024;
/// Presence entries one sweep removes at most.
const SWEEP_BATCH: isize = 500;

fn ck(name: &str, suffix: &str) -> String {
    format!("gw:{{c:{name}}}:{suffix}")
}
fn channel_topic(name: &str) -> String {
    format!("gw:{{c:{name}}}")
}
fn sk(id: u64) -> String {
    format!("gw:{{s:{id}}}")
}
fn node_topic(node: &str) -> String {
    format!("gw:{{n:{node}}}")
}
const GLOBAL_TOPIC: &str = "gw:{g}";
const GLOBAL_META: &str = "gw:{g}:meta";
const GLOBAL_LOG: &str = "gw:{g}:log";
const CHANNELS: &str = "gw:{g}:channels";
const CONTROL_TOPIC: &str = "gw:ctl";
const PRESENCE: &str = "gw:presence";
const EPOCH: &str = "gw:{g}:epoch";

/// Appends an event to a log and publishes it: the one way events enter a
/// log, so the log order and the live order agree on every node.
const PUBLISH_LUA: &str = r#"
local function emit(meta, log, topic, d, retain)
  local n = redis.call('HINCRBY', meta, 'n', 1)
  redis.call('XADD', log, 'MAXLEN', '~', retain, '0-' .. n, 'd', d)
  redis.call('PUBLISH', topic, n .. ' 0 ' .. d)
  return n
end
"#;

const JOIN_LUA: &str = r#"
-- KEYS: meta members users ujson order log hist
-- ARGV: sid uid user_json threshold topic channel_json retain want_snapshot
local n = tonumber(redis.call('HGET', KEYS[1], 'n') or '0')
if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 1 then
  if redis.call('HINCRBY', KEYS[3], ARGV[2], 1) == 1 then
    local ord = redis.call('HINCRBY', KEYS[1], 'ord', 1)
    redis.call('ZADD', KEYS[5], ord, ARGV[2])
    redis.call('HSET', KEYS[4], ARGV[2], ARGV[3])
  end
  if redis.call('HLEN', KEYS[3]) <= tonumber(ARGV[4]) then
    local d = 'ROOM_USER_ADD {"channel":' .. ARGV[6] .. ',"user":' .. ARGV[3] .. ',"session_id":' .. ARGV[1] .. '}'
    n = emit(KEYS[1], KEYS[6], ARGV[5], d, ARGV[7])
  end
end
local out = {n, redis.call('HLEN', KEYS[3])}
if ARGV[8] == '1' then
  local ids = redis.call('ZRANGE', KEYS[5], 0, 99)
  local users = {}
  if #ids > 0 then users = redis.call('HMGET', KEYS[4], unpack(ids)) end
  table.insert(out, #users)
  for _, u in ipairs(users) do table.insert(out, u or '{}') end
  for _, h in ipairs(redis.call('LRANGE', KEYS[7], -50, -1)) do table.insert(out, h) end
end
return out
"#;

const LEAVE_LUA: &str = r#"
-- KEYS: meta members users ujson order log
-- ARGV: sid threshold topic channel_json retain
local uid = redis.call('HGET', KEYS[2], ARGV[1])
if not uid then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
local ujson = redis.call('HGET', KEYS[4], uid) or '{}'
if redis.call('HLEN', KEYS[3]) <= tonumber(ARGV[2]) then
  local d = 'ROOM_USER_REMOVE {"channel":' .. ARGV[4] .. ',"user":' .. ujson .. ',"session_id":' .. ARGV[1] .. '}'
  emit(KEYS[1], KEYS[6], ARGV[3], d, ARGV[5])
end
if redis.call('HINCRBY', KEYS[3], uid, -1) <= 0 then
  redis.call('HDEL', KEYS[3], uid)
  redis.call('ZREM', KEYS[5], uid)
  redis.call('HDEL', KEYS[4], uid)
end
return 1
"#;

const MESSAGE_LUA: &str = r#"
-- KEYS: meta log hist
-- ARGV: topic rest retain ms(13 digits) suffix(6 digits) hist_retain
-- The id is ms .. suffix; if it is not above the channel's last id (another
-- node's clock is ahead), its millisecond part moves just past the last one.
local id = ARGV[4] .. ARGV[5]
local last = redis.call('HGET', KEYS[1], 'lastid') or ''
if #id == #last and id <= last then
  id = string.format('%013d', tonumber(string.sub(last, 1, 13)) + 1) .. ARGV[5]
end
redis.call('HSET', KEYS[1], 'lastid', id)
local body = '{"id":"' .. id .. '"' .. ARGV[2]
redis.call('RPUSH', KEYS[3], id .. ' ' .. body)
redis.call('LTRIM', KEYS[3], -tonumber(ARGV[6]), -1)
return {emit(KEYS[1], KEYS[2], ARGV[1], 'MESSAGE_CREATE ' .. body, ARGV[3]), id}
"#;

const DELETE_LUA: &str = r#"
-- KEYS: meta log hist
-- ARGV: topic id uid admin body retain
local prefix = ARGV[2] .. ' '
for _, e in ipairs(redis.call('LRANGE', KEYS[3], 0, -1)) do
  if string.sub(e, 1, #prefix) == prefix then
    local msg = cjson.decode(string.sub(e, #prefix + 1))
    if msg.author.id ~= ARGV[3] and ARGV[4] ~= '1' then return -2 end
    redis.call('LREM', KEYS[3], 1, e)
    return emit(KEYS[1], KEYS[2], ARGV[1], 'MESSAGE_DELETE ' .. ARGV[5], ARGV[6])
  end
end
return -1
"#;

const ADD_CHANNEL_LUA: &str = r#"
-- KEYS: channels global_meta global_log
-- ARGV: name meta_json max body retain topic
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return -1 end
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then return -2 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return emit(KEYS[2], KEYS[3], ARGV[6], 'CHANNEL_ADD ' .. ARGV[4], ARGV[5])
"#;

/// Takes a parked session over: it becomes live, owned by this node.
const TAKE_LUA: &str = r#"
-- KEYS: session buf   ARGV: node window_ms
if redis.call('HGET', KEYS[1], 'state') ~= 'parked' then return false end
redis.call('HSET', KEYS[1], 'state', 'live', 'owner', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local buf = redis.call('LRANGE', KEYS[2], 0, -1)
redis.call('DEL', KEYS[2])
return buf
"#;

fn script(body: &str) -> Script {
    Script::new(&format!("{PUBLISH_LUA}\n{body}"))
}

struct Scripts {
    join: Script,
    leave: Script,
    message: Script,
    delete: Script,
    add_channel: Script,
    take: Script,
}

/// What the Redis backend needs from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub url: String,
    pub node_id: String,
    pub default_channel: String,
    pub presence_threshold: usize,
    pub history_retain: usize,
    pub max_channels: usize,
    pub resume_window: Duration,
}

/// The pub/sub connection, its messages and the subscription requests,
/// waiting for `start` to hand them to their tasks.
type PendingStart = (
    ConnectionManager,
    mpsc::Receiver<PushInfo>,
    mpsc::Receiver<SubRequest>,
);

/// Requests to the task that owns the pub/sub connection.
enum SubRequest {
    Subscribe(String, oneshot::Sender<RedisResult<()>>),
}

pub struct RedisBroker {
    hub: Arc<Hub>,
    pool: Pool,
    settings: Settings,
    metrics: Arc<Metrics>,
    scripts: Scripts,
    ids: OnceLock<IdGenerator>,
    /// This node's message-id bits, held in `gw:nodeidx:I` while it lives.
    node_index: AtomicU64,
    healthy: AtomicBool,
    subs: mpsc::Sender<SubRequest>,
    /// Taken by `start`: the pub/sub connection and its messages.
    pending_start: Mutex<Option<PendingStart>>,
    claims: Mutex<HashMap<u64, oneshot::Sender<bool>>>,
    claim_ids: AtomicU64,
    /// The epoch of the Redis data set this node works with.
    epoch: Mutex<String>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

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
}

impl StoredSession {
    fn from_map(map: &HashMap<String, String>) -> Option<Self> {
        let get = |k: &str| map.get(k).cloned();
        let num = |k: &str| map.get(k).and_then(|v| v.parse().ok()).unwrap_or(0);
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
            seq: num("seq"),
            ccur: num("ccur"),
            gcur: num("gcur"),
        })
    }
}

/// An integer in a script's reply (0 when absent).
fn script_int(v: Option<&redis::Value>) -> u64 {
    v.and_then(|v| redis::from_redis_value::<u64>(v.clone()).ok())
        .unwrap_or(0)
}

/// The CHANNEL_MOVE dispatch from the join script's snapshot:
/// `[n, member_count, listed, user JSON × listed, "<id> <body>" …]`.
fn move_dispatch(out: &[redis::Value], channel: &str, from: &str) -> Arc<Dispatch> {
    let count = script_int(out.get(1)) as usize;
    let listed = script_int(out.get(2)) as usize;
    let strings: Vec<String> = out
        .iter()
        .skip(3)
        .filter_map(|v| redis::from_redis_value::<String>(v.clone()).ok())
        .collect();
    let members: Vec<User> = strings
        .iter()
        .take(listed)
        .filter_map(|u| serde_json::from_str(u).ok())
        .collect();
    let members: Vec<&User> = members.iter().collect();
    let history = strings
        .iter()
        .skip(listed)
        .filter_map(|h| h.split_once(' ').map(|(_, body)| body.as_bytes()));
    Dispatch::from_body(
        Event::ChannelMove,
        &super::move_body(channel, from, &members, count, history),
    )
}

/// `"<n> <except> <EVENT> <body>"`.
fn parse_live(payload: &[u8]) -> Option<(u64, u64, Event, &[u8])> {
    let mut parts = payload.splitn(4, |&b| b == b' ');
    let n = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
    let except = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
    let event = Event::from_name(std::str::from_utf8(parts.next()?).ok()?)?;
    Some((n, except, event, parts.next()?))
}

/// `"<EVENT> <body>"` (a log entry).
fn parse_entry(d: &str) -> Option<Arc<Dispatch>> {
    let (event, body) = d.split_once(' ')?;
    Some(Dispatch::from_body(
        Event::from_name(event)?,
        body.as_bytes(),
    ))
}

/// `0-<n>` → n.
fn entry_n(id: &str) -> Option<u64> {
    id.strip_prefix("0-")?.parse().ok()
}

impl RedisBroker {
    /// Connects (pool and pub/sub) and prepares the cluster-wide keys.
    pub async fn connect(
        settings: Settings,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, String> {
        let mut cfg = deadpool_redis::Config::from_url(settings.url.clone());
        cfg.pool = Some(PoolConfig {
            max_size: 64,
            timeouts: Timeouts {
                wait: Some(OP_TIMEOUT),
                create: Some(OP_TIMEOUT),
                recycle: Some(OP_TIMEOUT),
            },
            ..PoolConfig::default()
        });
        let pool = cfg
            .create_pool(Some(Runtime::Tokio1))
            .map_err(|e| format!("redis pool: {e}"))?;

        let sep = if settings.url.contains('?') { '&' } else { '?' };
        let client = redis::Client::open(format!("{}{sep}protocol=resp3", settings.url))
            .map_err(|e| format!("redis url: {e}"))?;
        let (push_tx, push_rx) = mpsc::channel(PUSH_QUEUE);
        let push_metrics = Arc::clone(&metrics);
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_push_sender(move |info: PushInfo| {
                // Full: drop it; the hub sees the gap and re-reads the log.
                if push_tx.try_send(info).is_err() {
                    push_metrics.broker_errors.inc();
                }
                Ok::<(), redis::aio::SendError>(())
            })
            .set_automatic_resubscription()
            .set_connection_timeout(Some(OP_TIMEOUT))
            .set_response_timeout(Some(OP_TIMEOUT))
            .set_max_delay(Duration::from_secs(2));
        let pubsub = tokio::time::timeout(
            OP_TIMEOUT * 2,
            client.get_connection_manager_with_config(config),
        )
        .await
        .map_err(|_| format!("connecting to Redis at {} timed out", settings.url))?
        .map_err(|e| format!("redis pub/sub connection: {e}"))?;
        // The cluster-wide stream is subscribed from the start, and our
        // position in it read after subscribing: a session that starts on
        // this node gets the events after that, not the whole log.
        let mut pubsub = pubsub;
        for topic in [
            GLOBAL_TOPIC.to_owned(),
            CONTROL_TOPIC.to_owned(),
            node_topic(&settings.node_id),
        ] {
            pubsub
                .subscribe(&topic)
                .await
                .map_err(|e| format!("redis subscribe {topic}: {e}"))?;
        }
        let (subs, sub_rx) = mpsc::channel(1024);
        let broker = Self {
            hub,
            pool,
            settings,
            metrics,
            scripts: Scripts {
                join: script(JOIN_LUA),
                leave: script(LEAVE_LUA),
                message: script(MESSAGE_LUA),
                delete: script(DELETE_LUA),
                add_channel: script(ADD_CHANNEL_LUA),
                take: Script::new(TAKE_LUA),
            },
            ids: OnceLock::new(),
            node_index: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
            subs,
            pending_start: Mutex::new(Some((pubsub, push_rx, sub_rx))),
            claims: Mutex::new(HashMap::new()),
            claim_ids: AtomicU64::new(1),
            epoch: Mutex::new(String::new()),
            tasks: Mutex::new(Vec::new()),
        };
        let mut conn = broker.conn().await.map_err(|r| r.message.to_string())?;
        let epoch = broker
            .prepare_keys(&mut conn)
            .await
            .map_err(|e| format!("redis: {e}"))?;
        *broker.epoch.lock() = epoch;
        let global: Option<u64> = redis::cmd("HGET")
            .arg(GLOBAL_META)
            .arg("n")
            .query_async(&mut conn)
            .await
            .map_err(|e| format!("redis: {e}"))?;
        broker.hub.global.init_position(global.unwrap_or(0));
        let index = broker
            .claim_node_index(&mut conn)
            .await
            .map_err(|e| format!("redis: {e}"))?;
        let _ = broker.ids.set(IdGenerator::new(index));
        broker.node_index.store(index, Ordering::Relaxed);
        info!(node = %broker.settings.node_id, index, "connected to redis");
        Ok(broker)
    }

    /// Makes sure the default channel exists and returns the data set's
    /// epoch: a random id written once, so that a Redis that lost its data
    /// (restarted empty) is noticed by a changed epoch.
    async fn prepare_keys(&self, conn: &mut deadpool_redis::Connection) -> RedisResult<String> {
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

    /// A number 0..1000 no other live node holds, for message ids.
    async fn claim_node_index(&self, conn: &mut deadpool_redis::Connection) -> RedisResult<u64> {
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

    fn ids(&self) -> &IdGenerator {
        self.ids.get().expect("set in connect")
    }

    fn window_ms(&self) -> u64 {
        self.settings.resume_window.as_millis() as u64
    }

    fn unavailable(&self, what: &str, e: impl std::fmt::Display) -> Reject {
        self.metrics.broker_errors.inc();
        warn!(error = %e, "redis: {what} failed");
        Reject::new(ErrorCode::Unavailable, "backend unavailable; retry later")
    }

    async fn conn(&self) -> Result<deadpool_redis::Connection, Reject> {
        self.pool
            .get()
            .await
            .map_err(|e| self.unavailable("connect", e))
    }

    /// Runs one Redis operation with the backend deadline.
    async fn op<T>(
        &self,
        what: &str,
        fut: impl Future<Output = RedisResult<T>>,
    ) -> Result<T, Reject> {
        match tokio::time::timeout(OP_TIMEOUT, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.unavailable(what, e)),
            Err(_) => Err(self.unavailable(what, "timed out")),
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Starts the background tasks: pub/sub, subscriptions, liveness,
    /// presence refresh and sweep.
    pub fn start(&self, node: &Arc<Node>) {
        let Some((pubsub, push_rx, sub_rx)) = self.pending_start.lock().take() else {
            return;
        };
        let weak = Arc::downgrade(node);
        let mut tasks = self.tasks.lock();
        tasks.push(tokio::spawn(subscription_task(
            pubsub,
            sub_rx,
            weak.clone(),
            self.settings.node_id.clone(),
        )));
        tasks.push(tokio::spawn(push_task(push_rx, weak.clone())));
        tasks.push(tokio::spawn(maintenance_task(weak)));
    }

    /// Stops the background tasks (the node is gone).
    pub fn stop(&self) {
        for task in self.tasks.lock().drain(..) {
            task.abort();
        }
    }

    async fn subscribe(&self, topic: String) -> Result<(), Reject> {
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

    pub async fn new_session_id(&self) -> Result<u64, Reject> {
        let mut c = self.conn().await?;
        self.op("session id", c.incr("gw:sid", 1)).await
    }

    pub async fn channel_names(&self) -> Result<Vec<String>, Reject> {
        let mut c = self.conn().await?;
        let mut names: Vec<String> = self.op("channels", c.hkeys(CHANNELS)).await?;
        names.sort();
        Ok(names)
    }

    async fn channel_exists(&self, name: &str) -> Result<bool, Reject> {
        let mut c = self.conn().await?;
        self.op("channel lookup", c.hexists(CHANNELS, name)).await
    }

    pub async fn is_banned(&self, user_id: &str) -> Result<bool, Reject> {
        let mut c = self.conn().await?;
        self.op("ban lookup", c.exists(format!("gw:ban:{user_id}")))
            .await
    }

    fn user_json(user: &User) -> String {
        serde_json::to_string(user).expect("user serializes")
    }

    /// Runs the join script; returns `(n, member_count, snapshot)`.
    async fn join_script(
        &self,
        session: &Session,
        name: &str,
        snapshot: bool,
    ) -> Result<Vec<redis::Value>, Reject> {
        let mut c = self.conn().await?;
        let channel_json = serde_json::to_string(name).expect("string serializes");
        let mut inv = self.scripts.join.prepare_invoke();
        for suffix in ["meta", "members", "users", "ujson", "order", "log", "hist"] {
            inv.key(ck(name, suffix));
        }
        inv.arg(session.id)
            .arg(&session.user.id)
            .arg(Self::user_json(&session.user))
            .arg(self.settings.presence_threshold)
            .arg(channel_topic(name))
            .arg(channel_json)
            .arg(LOG_RETAIN)
            .arg(if snapshot { "1" } else { "0" });
        self.op("join", inv.invoke_async(&mut c)).await
    }

    async fn leave_script(&self, session_id: u64, name: &str) -> Result<(), Reject> {
        let mut c = self.conn().await?;
        let channel_json = serde_json::to_string(name).expect("string serializes");
        let mut inv = self.scripts.leave.prepare_invoke();
        for suffix in ["meta", "members", "users", "ujson", "order", "log"] {
            inv.key(ck(name, suffix));
        }
        inv.arg(session_id)
            .arg(self.settings.presence_threshold)
            .arg(channel_topic(name))
            .arg(channel_json)
            .arg(LOG_RETAIN);
        let _: i64 = self.op("leave", inv.invoke_async(&mut c)).await?;
        let _: () = self
            .op("presence", c.zrem(PRESENCE, format!("{name}|{session_id}")))
            .await?;
        Ok(())
    }

    async fn touch_presence(&self, session_id: u64, name: &str) -> Result<(), Reject> {
        let mut c = self.conn().await?;
        let expiry = unix_ms() + self.window_ms();
        self.op(
            "presence",
            c.zadd(PRESENCE, format!("{name}|{session_id}"), expiry),
        )
        .await
    }

    /// Enters `name`: subscribe first, then the join script, whose `n` is
    /// where this session starts in the channel's log.
    pub async fn join(
        &self,
        session: &Arc<Session>,
        name: &str,
        moved_from: Option<&str>,
    ) -> Result<(), Reject> {
        let local = self.hub.pin(name);
        let result = self.join_pinned(session, &local, name, moved_from).await;
        if result.is_err() {
            local.unpin();
        }
        result
    }

    async fn join_pinned(
        &self,
        session: &Arc<Session>,
        local: &LocalChannel,
        name: &str,
        moved_from: Option<&str>,
    ) -> Result<(), Reject> {
        self.subscribe(channel_topic(name)).await?;
        let out = self
            .join_script(session, name, moved_from.is_some())
            .await?;
        self.touch_presence(session.id, name).await?;
        let n = script_int(out.first());
        let first = moved_from.map(|from| move_dispatch(&out, name, from));
        if session.is_ended() {
            local.unpin();
            return Ok(());
        }
        if self
            .attach_at(local, &ck(name, "log"), session, n, first)
            .await?
        {
            Ok(())
        } else {
            Err(Reject::new(
                ErrorCode::Unavailable,
                "channel log unavailable; retry",
            ))
        }
    }

    /// Attaches `session`, which has seen the channel up to `from`, to the
    /// hub, `first` before anything else. If the hub has already delivered
    /// past what it keeps, the difference is read from `log` and handed
    /// over first. False when the log no longer has it.
    async fn attach_at(
        &self,
        local: &LocalChannel,
        log: &str,
        session: &Arc<Session>,
        mut from: u64,
        mut first: Option<Arc<Dispatch>>,
    ) -> Result<bool, Reject> {
        for _ in 0..4 {
            match local.attach(session, from, first.as_ref()) {
                Ok(()) => return Ok(true),
                Err(crate::hub::AttachError::TooFarBehind) => {
                    if let Some(first) = first.take() {
                        session.deliver(&first);
                    }
                    let Some(events) = self.read_log(log, from).await? else {
                        return Ok(false);
                    };
                    for (n, d) in events {
                        session.deliver(&d);
                        from = n;
                    }
                }
            }
        }
        Ok(false)
    }

    pub async fn start_session(&self, session: &Arc<Session>) -> Result<(), Reject> {
        let mut c = self.conn().await?;
        let key = sk(session.id);
        let mut pipe = redis::pipe();
        pipe.hset_multiple(
            &key,
            &[
                ("uid", session.identity.id.as_str()),
                ("name", session.identity.name.as_str()),
                ("admin", if session.identity.admin { "1" } else { "0" }),
                ("key", session.enc_key.as_str()),
                ("ch", &session.channel()),
                ("owner", self.settings.node_id.as_str()),
                ("state", "live"),
            ],
        )
        .ignore()
        .pexpire(&key, self.window_ms() as i64)
        .ignore();
        let _: () = self.op("session", pipe.query_async(&mut c)).await?;
        drop(c);
        let global = self.hub.global.position().unwrap_or(0);
        let _ = self.hub.global.attach(session, global, None);
        self.join(session, &session.channel(), None).await
    }

    pub async fn end_session(&self, session: &Arc<Session>) -> Result<(), Reject> {
        self.hub.global.detach(session.id);
        let channel = session.channel();
        if let Some(local) = self.hub.get(&channel) {
            local.detach(session.id);
        }
        self.leave_script(session.id, &channel).await?;
        let mut c = self.conn().await?;
        let key = sk(session.id);
        let _: () = self
            .op("session", c.del(&[key.clone(), format!("{key}:buf")]))
            .await?;
        Ok(())
    }

    pub async fn move_to(&self, session: &Arc<Session>, to: &str) -> Result<(), Reject> {
        if !self.channel_exists(to).await? {
            return Err(Reject::new(ErrorCode::NotFound, "unknown channel"));
        }
        let from = session.channel();
        if &*from == to {
            // Already a member: the script only reads the snapshot.
            let out = self.join_script(session, to, true).await?;
            session.deliver(&move_dispatch(&out, to, &from));
            return Ok(());
        }
        if let Some(local) = self.hub.get(&from) {
            local.detach(session.id);
        }
        session.set_channel(Arc::from(to));
        self.leave_script(session.id, &from).await?;
        let mut c = self.conn().await?;
        let _: () = self.op("session", c.hset(sk(session.id), "ch", to)).await?;
        drop(c);
        self.join(session, to, Some(&from)).await
    }

    pub async fn publish_message(
        &self,
        session: &Arc<Session>,
        content: &str,
        nonce: Option<&str>,
    ) -> Result<(), Reject> {
        let name = session.channel();
        let started = std::time::Instant::now();
        let id = self.ids().next();
        // Everything after the id: the script puts the final id in front.
        let full = serde_json::to_string(&super::MessageBody {
            id: "",
            channel: &name,
            author: &session.user,
            content,
            ts: unix_ms(),
            nonce,
        })
        .expect("message serializes");
        let rest = &full[r#"{"id":"""#.len()..];
        let mut c = self.conn().await?;
        let mut inv = self.scripts.message.prepare_invoke();
        inv.key(ck(&name, "meta"))
            .key(ck(&name, "log"))
            .key(ck(&name, "hist"));
        inv.arg(channel_topic(&name))
            .arg(rest)
            .arg(LOG_RETAIN)
            .arg(format!("{:013}", id.ms))
            .arg(format!("{:06}", id.suffix))
            .arg(self.settings.history_retain);
        let (_, final_id): (u64, String) = self.op("publish", inv.invoke_async(&mut c)).await?;
        if let Some(ms) = final_id.get(..13).and_then(|ms| ms.parse::<u64>().ok()) {
            if ms > id.ms {
                self.ids().advance_to(ms);
            }
        }
        self.metrics
            .broker_publish
            .observe(started.elapsed().as_secs_f64());
        Ok(())
    }

    pub async fn delete_message(&self, session: &Arc<Session>, id: u64) -> Result<(), Reject> {
        let name = session.channel();
        let body = serde_json::to_string(&MessageDelete {
            id: id.to_string(),
            channel: name.to_string(),
        })
        .expect("serializes");
        let mut c = self.conn().await?;
        let mut inv = self.scripts.delete.prepare_invoke();
        inv.key(ck(&name, "meta"))
            .key(ck(&name, "log"))
            .key(ck(&name, "hist"));
        inv.arg(channel_topic(&name))
            .arg(id)
            .arg(&session.user.id)
            .arg(if session.identity.admin { "1" } else { "0" })
            .arg(body)
            .arg(LOG_RETAIN);
        let n: i64 = self.op("delete", inv.invoke_async(&mut c)).await?;
        match n {
            -1 => Err(Reject::new(ErrorCode::NotFound, "unknown message")),
            -2 => Err(Reject::new(
                ErrorCode::PermissionDenied,
                "only the author or an admin may delete a message",
            )),
            _ => Ok(()),
        }
    }

    pub async fn typing(&self, session: &Arc<Session>) -> Result<(), Reject> {
        let name = session.channel();
        let body = serde_json::to_string(&StartTyping {
            channel: name.to_string(),
            user: session.user.clone(),
            ts: unix_ms(),
        })
        .expect("serializes");
        let mut c = self.conn().await?;
        let payload = format!("0 {} START_TYPING {body}", session.id);
        let _: () = self
            .op("typing", c.publish(channel_topic(&name), payload))
            .await?;
        Ok(())
    }

    pub async fn add_channel(
        &self,
        name: &str,
        topic: &str,
        created_by: &User,
    ) -> Result<(), Reject> {
        let body = serde_json::to_string(&ChannelAdd {
            name: name.to_owned(),
            topic: topic.to_owned(),
            created_by: created_by.clone(),
        })
        .expect("serializes");
        let meta = serde_json::json!({"topic": topic, "created_by": created_by}).to_string();
        let mut c = self.conn().await?;
        let mut inv = self.scripts.add_channel.prepare_invoke();
        inv.key(CHANNELS).key(GLOBAL_META).key(GLOBAL_LOG);
        inv.arg(name)
            .arg(meta)
            .arg(self.settings.max_channels)
            .arg(body)
            .arg(LOG_RETAIN)
            .arg(GLOBAL_TOPIC);
        let n: i64 = self.op("channel add", inv.invoke_async(&mut c)).await?;
        match n {
            -1 => Err(Reject::new(
                ErrorCode::AlreadyExists,
                "channel already exists",
            )),
            -2 => Err(Reject::new(
                ErrorCode::PermissionDenied,
                "channel limit reached",
            )),
            _ => Ok(()),
        }
    }

    pub async fn ban(&self, user_id: &str, ban: &Ban) -> Result<(), Reject> {
        let mut c = self.conn().await?;
        let key = format!("gw:ban:{user_id}");
        let value = serde_json::json!({"reason": ban.reason, "until": ban.until}).to_string();
        let mut pipe = redis::pipe();
        match ban.until {
            Some(until) => pipe.pset_ex(&key, value, until.saturating_sub(unix_ms()).max(1)),
            None => pipe.set(&key, value),
        };
        pipe.ignore();
        pipe.publish(CONTROL_TOPIC, format!("ban {user_id}"))
            .ignore();
        self.op("ban", pipe.query_async::<()>(&mut c)).await
    }

    pub async fn unban(&self, user_id: &str) -> Result<(), Reject> {
        let mut c = self.conn().await?;
        let _: () = self.op("unban", c.del(format!("gw:ban:{user_id}"))).await?;
        Ok(())
    }

    /// Parks a local session for another node: its held dispatches and
    /// log cursors go to Redis. The caller closes its connection.
    pub async fn park(&self, session: &Arc<Session>) -> Result<bool, Reject> {
        let channel = session.channel();
        let ccur = self
            .hub
            .get(&channel)
            .and_then(|c| c.detach_with_cursor(session.id))
            .unwrap_or(0);
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
        pipe.zadd(
            PRESENCE,
            format!("{channel}|{}", session.id),
            unix_ms() + self.window_ms(),
        )
        .ignore();
        let mut c = self.conn().await?;
        self.op("park", pipe.query_async::<()>(&mut c)).await?;
        debug!(session = session.id, seq, ccur, gcur, "parked");
        Ok(true)
    }

    /// Asks `owner` to park session `id`; true when it did.
    async fn claim(&self, owner: &str, id: u64) -> Result<bool, Reject> {
        let mut c = self.conn().await?;
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
        let sent: Result<i64, _> = self.op("claim", c.publish(node_topic(owner), msg)).await;
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

    /// Reads `log` after `after`; `None` when the events right after it are
    /// gone (trimmed), so the reader cannot continue without a gap.
    async fn read_log(
        &self,
        log: &str,
        after: u64,
    ) -> Result<Option<Vec<(u64, Arc<Dispatch>)>>, Reject> {
        let mut c = self.conn().await?;
        let entries: Vec<(String, HashMap<String, String>)> = self
            .op(
                "log read",
                redis::cmd("XRANGE")
                    .arg(log)
                    .arg(format!("(0-{after}"))
                    .arg("+")
                    .query_async(&mut c),
            )
            .await?;
        let mut out = Vec::with_capacity(entries.len());
        let mut expect = after + 1;
        for (id, fields) in entries {
            let Some(n) = entry_n(&id) else { continue };
            if n != expect {
                return Ok(None);
            }
            let Some(d) = fields.get("d").and_then(|d| parse_entry(d)) else {
                return Ok(None);
            };
            out.push((n, d));
            expect += 1;
        }
        Ok(Some(out))
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
        let mut c = self.conn().await?;
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
            let mut c = self.conn().await?;
            let state: Option<String> = self.op("session", c.hget(sk(id), "state")).await?;
            if state.as_deref() != Some("parked") {
                return Ok(None);
            }
        }
        let mut c = self.conn().await?;
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
            stored.identity,
            stored.enc_key,
            Arc::from(stored.channel.as_str()),
            stored.seq,
            ring,
            node.limits,
            Arc::clone(&node.metrics),
        );
        // Subscribe first, then read the logs: whatever is published after
        // the read arrives live and the hub drops what the read covered.
        let local = self.hub.pin(&stored.channel);
        let caught_up = self
            .catch_up(&session, &local, &stored.channel, stored.ccur, stored.gcur)
            .await;
        match caught_up {
            Ok(true) => {
                self.touch_presence(id, &stored.channel).await?;
                Ok(Some((session, how)))
            }
            Ok(false) => {
                local.unpin();
                // Events it missed are gone: the session ends here.
                let _ = self.end_session(&session).await;
                Ok(None)
            }
            Err(e) => {
                local.unpin();
                Err(e)
            }
        }
    }

    async fn catch_up(
        &self,
        session: &Arc<Session>,
        local: &LocalChannel,
        channel: &str,
        ccur: u64,
        gcur: u64,
    ) -> Result<bool, Reject> {
        self.subscribe(channel_topic(channel)).await?;
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
        let mut c = match self.conn().await {
            Ok(c) => c,
            Err(_) => return,
        };
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
                if let super::Broker::Redis(r) = &node.broker {
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
                    if let super::Broker::Redis(r) = &node.broker {
                        if let Ok(mut c) = r.conn().await {
                            let reply = format!(
                                "reply {req} {}",
                                if parked { "parked" } else { "unknown" }
                            );
                            let _ = r
                                .op(
                                    "claim reply",
                                    c.publish::<_, _, i64>(node_topic(&from), reply),
                                )
                                .await;
                        }
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

    /// One round of upkeep: liveness, presence of local sessions, sweep of
    /// expired presence (sessions of crashed nodes).
    async fn maintain(&self, node: &Node) -> Result<(), Reject> {
        let mut c = self.conn().await?;
        let epoch = self.op("epoch", self.prepare_keys(&mut c)).await?;
        if epoch != *self.epoch.lock() {
            drop(c);
            self.data_lost(node, epoch).await;
            return Ok(());
        }
        let now = unix_ms();
        let window = self.window_ms();
        let mut pipe = redis::pipe();
        pipe.set_options(
            format!("gw:node:{}", self.settings.node_id),
            now,
            redis::SetOptions::default().with_expiration(redis::SetExpiry::PX(15_000)),
        )
        .ignore();
        for session in node.local_sessions() {
            let channel = session.channel();
            pipe.zadd(PRESENCE, format!("{channel}|{}", session.id), now + window)
                .ignore();
            pipe.pexpire(sk(session.id), window as i64).ignore();
        }
        pipe.pexpire(
            format!("gw:nodeidx:{}", self.node_index.load(Ordering::Relaxed)),
            60_000,
        )
        .ignore();
        self.op("upkeep", pipe.query_async::<()>(&mut c)).await?;
        let expired: Vec<String> = self
            .op(
                "sweep",
                redis::cmd("ZRANGEBYSCORE")
                    .arg(PRESENCE)
                    .arg("-inf")
                    .arg(now)
                    .arg("LIMIT")
                    .arg(0)
                    .arg(SWEEP_BATCH)
                    .query_async(&mut c),
            )
            .await?;
        drop(c);
        for entry in expired {
            let Some((channel, id)) = entry.rsplit_once('|') else {
                continue;
            };
            let Ok(id) = id.parse::<u64>() else { continue };
            if node.has_session(id) {
                continue;
            }
            // The script removes the member once, so only one node sends
            // the ROOM_USER_REMOVE.
            self.leave_script(id, channel).await?;
        }
        Ok(())
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
        let mut c = match self.conn().await {
            Ok(c) => c,
            Err(_) => return,
        };
        let global: Option<u64> = self
            .op("global position", c.hget(GLOBAL_META, "n"))
            .await
            .unwrap_or(None);
        self.hub.global.init_position(global.unwrap_or(0));
        *self.epoch.lock() = epoch;
    }

    async fn ping(&self) -> bool {
        let Ok(mut c) = self.pool.get().await else {
            return false;
        };
        matches!(
            tokio::time::timeout(OP_TIMEOUT, redis::cmd("PING").query_async::<String>(&mut c))
                .await,
            Ok(Ok(_))
        )
    }
}

/// Owns the pub/sub connection: every (un)subscribe goes through here, in
/// order, so a subscribe is never undone by an older unsubscribe.
async fn subscription_task(
    mut pubsub: ConnectionManager,
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
                let ok = redis::cmd("PING").query_async::<String>(&mut pubsub).await.is_ok();
                if let super::Broker::Redis(r) = &node.broker {
                    let was = r.healthy.swap(ok && r.ping().await, Ordering::Relaxed);
                    if ok && !was {
                        info!("redis is back; reading what the channels missed");
                        let node = Arc::clone(&node);
                        tokio::spawn(async move {
                            if let super::Broker::Redis(r) = &node.broker {
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

async fn push_task(mut messages: mpsc::Receiver<PushInfo>, node: Weak<Node>) {
    while let Some(info) = messages.recv().await {
        let Some(node) = node.upgrade() else { return };
        if let super::Broker::Redis(r) = &node.broker {
            r.handle_push(&node, info).await;
        }
    }
}

async fn maintenance_task(node: Weak<Node>) {
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
        if let super::Broker::Redis(r) = &node.broker {
            if let Err(e) = r.maintain(&node).await {
                debug!(error = %e.message, "upkeep failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_messages_and_log_entries_parse() {
        let (n, except, event, body) =
            parse_live(br#"12 0 MESSAGE_DELETE {"id":"1","channel":"a b"}"#).unwrap();
        assert_eq!((n, except, event), (12, 0, Event::MessageDelete));
        assert_eq!(body, br#"{"id":"1","channel":"a b"}"#);
        assert!(parse_live(b"x 0 MESSAGE_DELETE {}").is_none());
        assert!(parse_live(b"1 0 NOPE {}").is_none());
        let d = parse_entry(r#"ROOM_USER_ADD {"a":1}"#).unwrap();
        assert_eq!(d.body(), br#"{"a":1}"#);
        assert_eq!(entry_n("0-42"), Some(42));
        assert_eq!(entry_n("5-1"), None);
    }
}
