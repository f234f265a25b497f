//! The Redis backend: any number of nodes sharing one Redis, or one Redis
//! Cluster, behave as one gateway.
//!
//! # Layout
//!
//! Every key of one chat channel shares the hash tag `{c:NAME}`, every key
//! of one session `{s:ID}`, the cluster-wide ones `{g}`, so each script
//! touches one slot, and on a Redis Cluster each channel lives on the
//! master of its slot. Nothing on the path of a message or a heartbeat
//! touches a key outside the channel's or the session's slot.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `gw:{g}:channels` | hash | name → meta JSON |
//! | `gw:{g}:meta`, `gw:{g}:log` | hash, stream | `gen`, and the log of cluster-wide events |
//! | `gw:{g}:epoch` | string | random id of the data set (a Redis that lost it has another) |
//! | `gw:{c:NAME}:meta` | hash | `gen` (log generation), `lastid` (last message id), `ord` |
//! | `gw:{c:NAME}:log` | stream | the channel's events, entry id `0-n` (`XADD 0-*`: the log counts its events); also its history: a message is stored once, here |
//! | `gw:{c:NAME}:hist` | string | where the last history walk found messages and deletions in the log (`lua/history.lua`) |
//! | `gw:{c:NAME}:members` | hash | session id → user id |
//! | `gw:{c:NAME}:users`, `:ujson`, `:order` | hash, hash, zset | per user: sessions, JSON, join order |
//! | `gw:{c:NAME}:presence` | zset | session id → expiry (ms), refreshed by the owner |
//! | `gw:{s:ID}` | hash | session: user, channel, owner, state, seq, cursors and their generations; TTL = resume window |
//! | `gw:{s:ID}:buf` | list | `"<seq> <EVENT> <body>"` parked for a resume |
//! | `gw:ban:USER` | string | the ban; TTL = its duration |
//! | `gw:sid` | counter | session ids |
//! | `gw:node:ID`, `gw:nodeidx:I` | strings | node liveness and message-id bits, with TTLs |
//! | `gw:{g}:nodes` | hash | node id → `"<ms> <sessions>"`, written every upkeep round (the server API's cluster info; entries older than 15 s are dropped) |
//!
//! Pub/sub (classic on one Redis, sharded on a cluster, each topic in its
//! keys' slot): `gw:{c:NAME}` and `gw:{g}` carry
//! `"<n> <except> <EVENT> <body>"` (`n = 0`: not logged, e.g.
//! START_TYPING, not for session `except`) and `"reset <gen> <n>"` (the
//! log starts a new generation); `gw:{g}:ctl` carries `"ban <user>"` and
//! `"disconnect <user>"` (the server API);
//! `gw:{n:ID}` claims and replies.
//!
//! # Flow
//!
//! Publishing is one script: append to the log (whose entry id is the
//! event's `n`), publish. A node subscribes to a channel while it has a
//! local member there, and hands every message to the [`Hub`], which
//! delivers in `n` order and asks for a re-read of the log when it sees a
//! gap (a dropped subscription, a queue overflow). A session entering a
//! channel subscribes first, then runs the join script, whose result fixes
//! its position in the log.
//!
//! Resume elsewhere: the new node asks the owner to park the session
//! (`claim`). The owner leaves the hub, records the session's sequence
//! number and log cursors, and writes its held dispatches to `:buf`; once
//! that is stored it closes the old socket (4017), and not if it failed.
//! The new node takes the parked session over (one script), replays
//! `:buf`, reads the channel and global logs after the cursors, and joins
//! the hub where the catch-up ended. A drained node
//! parks every session the same way; a crashed node parks nothing, so its
//! sessions resume as new ones (`resumed: false`), never with a gap.
//!
//! Failover: replication is asynchronous, so a promoted replica can lack
//! the last events of its master, and would number new events with `n`s
//! that nodes already delivered. After any lost connection a node checks
//! each of its streams (`lua/verify.lua`): a counter behind what it
//! delivered, or another event at its position, starts a new generation
//! of that log (`reset`), and every node ends that channel's sessions with
//! 1012; their clients resume to `resumed: false`. A gap the log no longer
//! holds ends them the same way. A loss is never silent.
//!
//! # Files
//!
//! One file per part of the flow, each adding to `impl RedisBroker`:
//!
//! | file | part |
//! |---|---|
//! | `mod.rs` | the broker, its settings, `connect`, key names, the deadline every operation runs under |
//! | `conn.rs` | the one connection (commands and pub/sub), one Redis or a cluster; per-slot batches |
//! | `batch.rs` | self-clocked batches: the messages and the leaves of every session go to Redis several to a script call |
//! | `publish.rs` | publishing (messages, deletes, typing, new channels) and reading the logs |
//! | `pubsub.rs` | subscriptions, live messages to the hub, gap fills, checks after a lost connection, claim requests |
//! | `presence.rs` | sessions entering, moving between and leaving channels; presence; bans |
//! | `resume.rs` | parking a session, claiming it from its owner, taking it over, catching it up |
//! | `upkeep.rs` | start-up keys and node index, liveness, presence refresh and sweep, a Redis that lost its data |
//! | `lua/` | the scripts, one a file; `head.lua`, `emit.lua` (the one way events other than messages enter a log) and `history.lua` are put in front of those that call them |

mod batch;
mod conn;
mod presence;
mod publish;
mod pubsub;
mod resume;
mod upkeep;

use self::conn::{Conn, PubSub};
use self::pubsub::{push_task, subscription_task};
use self::upkeep::maintenance_task;
use super::memory::IdGenerator;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::node::Node;
use crate::wire::Reject;
use gateway_shared::protocol::ErrorCode;
use parking_lot::Mutex;
use redis::{PushInfo, PushKind, RedisResult, Script};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{info, warn};

/// Longest a single backend operation may take before the request fails
/// with 4018.
const OP_TIMEOUT: Duration = Duration::from_secs(2);
/// A message reaching Redis later than this after it was sent is not
/// published (its sender got 4018 at `OP_TIMEOUT`, or is about to): the
/// rest of `OP_TIMEOUT` covers the reply's way back and an error in the
/// measured clock offset.
const PUBLISH_DEADLINE: Duration = Duration::from_millis(1500);
/// How long a node waits for the owner of a session to park it.
const CLAIM_TIMEOUT: Duration = Duration::from_secs(3);
/// Events a channel log keeps (for catch-up on resume and gap fills).
const LOG_RETAIN: usize = 10_000;
/// Messages, or leaves, waiting for their batch task; past it, sessions wait.
const PUBLISH_QUEUE: usize = 4096;
/// Pub/sub messages queued between the connection and the hub; past it
/// messages are dropped and recovered from the log as a gap.
const PUSH_QUEUE: usize = 64 * 1024;
/// Presence entries one sweep removes at most, per channel.
const SWEEP_BATCH: isize = 500;
/// Channels one upkeep round sweeps.
const SWEEP_CHANNELS: usize = 500;

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
const CONTROL_TOPIC: &str = "gw:{g}:ctl";
const EPOCH: &str = "gw:{g}:epoch";
/// The node registry (cluster info of the server API).
const NODES: &str = "gw:{g}:nodes";
/// How long a node's registry entry counts without a refresh.
const NODE_TTL_MS: u64 = 15_000;

/// Appends an event to a log and publishes it: with `message.lua`, the
/// one way events enter a log, so the log order and the live order agree
/// on every node.
const EMIT_LUA: &str = include_str!("lua/emit.lua");
/// Walks a channel's history (its MESSAGE_CREATE log entries, newest first).
const HISTORY_LUA: &str = include_str!("lua/history.lua");
/// The `n` of a log's last event (the stream's last id).
const HEAD_LUA: &str = include_str!("lua/head.lua");
/// A log's `n` and generation.
const LOG_HEAD_LUA: &str = include_str!("lua/log_head.lua");
const JOIN_LUA: &str = include_str!("lua/join.lua");
const LEAVE_LUA: &str = include_str!("lua/leave.lua");
const MESSAGE_LUA: &str = include_str!("lua/message.lua");
const DELETE_LUA: &str = include_str!("lua/delete.lua");
const ADD_CHANNEL_LUA: &str = include_str!("lua/add_channel.lua");
/// A page of a channel's history, newest first (server API).
const MESSAGES_LUA: &str = include_str!("lua/messages.lua");
/// A page of a channel's members (server API).
const MEMBERS_LUA: &str = include_str!("lua/members.lua");
/// Takes a parked session over: it becomes live, owned by this node.
const TAKE_LUA: &str = include_str!("lua/take.lua");
/// Checks a log against what a node delivered from it (after a failover).
const VERIFY_LUA: &str = include_str!("lua/verify.lua");

/// A script: `body` with the shared functions it calls in front, and on
/// Redis Cluster sharded publishing (the topic is in the keys' slot).
fn script(body: &str, cluster: bool) -> Script {
    let mut text = String::new();
    for (name, lua) in [
        ("emit(", EMIT_LUA),
        ("history(", HISTORY_LUA),
        ("head(", HEAD_LUA),
    ] {
        if body.contains(name) {
            text.push_str(lua);
            text.push('\n');
        }
    }
    text.push_str(body);
    if cluster {
        text = text.replace("'PUBLISH'", "'SPUBLISH'");
    }
    Script::new(&text)
}

struct Scripts {
    join: Script,
    delete: Script,
    add_channel: Script,
    take: Script,
    verify: Script,
    log_head: Script,
    messages: Script,
    members: Script,
}

/// What the Redis backend needs from the configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// One Redis URL, or the seed URLs of a cluster (comma-separated).
    pub url: String,
    /// Redis Cluster: sharded pub/sub, commands routed by slot.
    pub cluster: bool,
    /// AUTH credentials, where the URLs do not carry them.
    pub username: Option<String>,
    pub password: Option<String>,
    /// CA of the servers' certificates, for `rediss://` URLs.
    pub ca_file: Option<std::path::PathBuf>,
    /// How long messages are gathered before they go to Redis together.
    pub publish_window: Duration,
    pub node_id: String,
    pub default_channel: String,
    pub presence_threshold: usize,
    pub history_retain: usize,
    pub max_channels: usize,
    pub resume_window: Duration,
}

impl Settings {
    /// Entries a channel log keeps: enough for catch-up, and at least the
    /// history (messages are kept once, in the log).
    fn log_retain(&self) -> usize {
        LOG_RETAIN.max(self.history_retain)
    }
}

/// The pub/sub connection, its messages and the subscription requests,
/// waiting for `start` to hand them to their tasks.
type PendingStart = (PubSub, mpsc::Receiver<PushInfo>, mpsc::Receiver<SubRequest>);

/// Requests to the task that owns the pub/sub connection.
enum SubRequest {
    Subscribe(String, oneshot::Sender<RedisResult<()>>),
    /// An unsubscribe push: ours, or Redis dropping a subscription.
    Dropped(String),
}

pub struct RedisBroker {
    hub: Arc<Hub>,
    /// The shared command connection (see `conn`).
    cmd: Conn,
    /// Messages to publish, batched by `publish::publish_task`.
    publisher: mpsc::Sender<publish::PublishJob>,
    /// Sessions leaving channels, batched by `presence::leave_task`.
    leaver: mpsc::Sender<presence::LeaveJob>,
    /// Ended sessions whose leave is queued or in flight.
    ending: Arc<batch::Pending>,
    settings: Settings,
    metrics: Arc<Metrics>,
    scripts: Scripts,
    ids: OnceLock<IdGenerator>,
    /// This node's message-id bits, held in `gw:nodeidx:I` while it lives.
    node_index: AtomicU64,
    /// When the upkeep last refreshed this node's presence entries and
    /// session keys (ms since the epoch).
    presence_refreshed_ms: AtomicU64,
    healthy: AtomicBool,
    /// A push other than a message was dropped (its queue was full).
    lost_pushes: Arc<AtomicBool>,
    /// A resync (every stream checked against its log) is running.
    resyncing: AtomicBool,
    subs: mpsc::Sender<SubRequest>,
    /// Taken by `start`: the pub/sub connection and its messages.
    pending_start: Mutex<Option<PendingStart>>,
    claims: Mutex<HashMap<u64, oneshot::Sender<bool>>>,
    /// Streams being checked after a subscription confirmation (see
    /// `pubsub::check_subscribed`): true when another confirmation came
    /// during the check, which then runs once more.
    checks: Mutex<HashMap<Option<String>, bool>>,
    claim_ids: AtomicU64,
    /// The channel registry as last read by the sweep, and how far the
    /// sweep has walked it.
    sweep: Mutex<(Vec<String>, usize)>,
    /// The epoch of the Redis data set this node works with.
    epoch: Mutex<String>,
    /// Redis' clock minus ours, in ms (measured at start and each upkeep
    /// round): messages carry their deadline in Redis' time.
    clock_offset_ms: AtomicI64,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl RedisBroker {
    /// Connects (commands and pub/sub) and prepares the cluster-wide keys.
    pub async fn connect(
        settings: Settings,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, String> {
        let urls = conn::seed_urls(&settings.url, settings.cluster)?;
        let (push_tx, push_rx) = mpsc::channel(PUSH_QUEUE);
        let push_metrics = Arc::clone(&metrics);
        let lost_pushes = Arc::new(AtomicBool::new(false));
        let lost = Arc::clone(&lost_pushes);
        let (cmd, mut pubsub) = conn::connect(&urls, &settings, move |info| {
            // Full: drop it. A message's loss shows as a gap, which the
            // hub re-reads from the log; any other push (a disconnection,
            // a dropped or renewed subscription) has the subscription task
            // subscribe and check every stream again.
            if let Err(e) = push_tx.try_send(info) {
                push_metrics.broker_errors.inc();
                if !matches!(e.into_inner().kind, PushKind::Message | PushKind::SMessage) {
                    lost.store(true, Ordering::Relaxed);
                }
            }
        })
        .await?;
        // The cluster-wide stream is subscribed from the start, and our
        // position in it read after subscribing: a session that starts on
        // this node gets the events after that, not the whole log.
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
        let cluster = settings.cluster;
        let message = Arc::new(script(MESSAGE_LUA, cluster));
        let (publisher, jobs) = mpsc::channel(PUBLISH_QUEUE);
        let publish_task = tokio::spawn(publish::publish_task(
            jobs,
            cmd.clone(),
            Arc::clone(&message),
            settings.log_retain(),
            settings.publish_window,
            cluster,
            Arc::clone(&metrics),
        ));
        let (leaver, leaves) = mpsc::channel(PUBLISH_QUEUE);
        let ending = Arc::new(batch::Pending::default());
        let leave_task = tokio::spawn(presence::leave_task(
            leaves,
            leaver.downgrade(),
            cmd.clone(),
            Arc::new(script(LEAVE_LUA, cluster)),
            presence::LeaveSettings {
                threshold: settings.presence_threshold,
                log_retain: settings.log_retain(),
                cluster,
            },
            Arc::clone(&ending),
        ));
        let broker = Self {
            hub,
            cmd,
            publisher,
            leaver,
            ending,
            settings,
            metrics,
            scripts: Scripts {
                join: script(JOIN_LUA, cluster),
                delete: script(DELETE_LUA, cluster),
                add_channel: script(ADD_CHANNEL_LUA, cluster),
                take: script(TAKE_LUA, cluster),
                verify: script(VERIFY_LUA, cluster),
                log_head: script(LOG_HEAD_LUA, cluster),
                messages: script(MESSAGES_LUA, cluster),
                members: script(MEMBERS_LUA, cluster),
            },
            ids: OnceLock::new(),
            node_index: AtomicU64::new(0),
            presence_refreshed_ms: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
            lost_pushes,
            resyncing: AtomicBool::new(false),
            subs,
            pending_start: Mutex::new(Some((pubsub, push_rx, sub_rx))),
            claims: Mutex::new(HashMap::new()),
            checks: Mutex::new(HashMap::new()),
            claim_ids: AtomicU64::new(1),
            sweep: Mutex::new((Vec::new(), 0)),
            epoch: Mutex::new(String::new()),
            clock_offset_ms: AtomicI64::new(0),
            tasks: Mutex::new(vec![publish_task, leave_task]),
        };
        let mut conn = broker.conn();
        let epoch = broker
            .prepare_keys(&mut conn)
            .await
            .map_err(|e| format!("redis: {e}"))?;
        *broker.epoch.lock() = epoch;
        broker
            .measure_clock(&mut conn)
            .await
            .map_err(|e| format!("redis: {e}"))?;
        let (global, gen) = broker
            .log_head(GLOBAL_META, GLOBAL_LOG)
            .await
            .map_err(|r| format!("redis: {}", r.message))?;
        broker.hub.global.init_gen(gen);
        broker.hub.global.init_position(global);
        let index = broker
            .claim_node_index(&mut conn)
            .await
            .map_err(|e| format!("redis: {e}"))?;
        let _ = broker.ids.set(IdGenerator::new(index));
        broker.node_index.store(index, Ordering::Relaxed);
        // In the registry from the start, not from the first upkeep round.
        broker
            .register(&mut conn, 0)
            .await
            .map_err(|e| format!("redis: {e}"))?;
        info!(node = %broker.settings.node_id, index, "connected to redis");
        Ok(broker)
    }

    fn ids(&self) -> &IdGenerator {
        self.ids.get().expect("set in connect")
    }

    /// Where a log is (`n` of its last event) and its generation.
    async fn log_head(&self, meta: &str, log: &str) -> Result<(u64, u64), Reject> {
        let mut inv = self.scripts.log_head.prepare_invoke();
        inv.key(meta).key(log);
        self.op("log head", inv.invoke_async(&mut self.conn()))
            .await
    }

    /// PUBLISH on one Redis, SPUBLISH (sharded) on a cluster.
    fn publish_cmd(&self, topic: &str, payload: &str) -> redis::Cmd {
        let mut cmd = redis::cmd(if self.settings.cluster {
            "SPUBLISH"
        } else {
            "PUBLISH"
        });
        cmd.arg(topic).arg(payload);
        cmd
    }

    fn window_ms(&self) -> u64 {
        self.settings.resume_window.as_millis() as u64
    }

    fn unavailable(&self, what: &str, e: impl std::fmt::Display) -> Reject {
        self.metrics.broker_errors.inc();
        warn!(error = %e, "redis: {what} failed");
        Reject::new(ErrorCode::Unavailable, "backend unavailable; retry later")
    }

    /// The command connection, shared: a clone is a handle, not a socket.
    fn conn(&self) -> Conn {
        self.cmd.clone()
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
            self.settings.cluster,
        )));
        tasks.push(tokio::spawn(push_task(push_rx, weak.clone())));
        tasks.push(tokio::spawn(maintenance_task(weak)));
    }

    /// Leaves the node registry and stops the background tasks (the node
    /// is gone).
    pub async fn stop(&self) {
        // The leaves of sessions that ended land first (each call is over
        // within OP_TIMEOUT; a slow or lost Redis makes this wait run out).
        if tokio::time::timeout(2 * OP_TIMEOUT, self.ending.none())
            .await
            .is_err()
        {
            warn!("stopped with ended sessions' leaves still at Redis; the presence sweep removes them");
        }
        let tasks: Vec<_> = self.tasks.lock().drain(..).collect();
        for task in tasks {
            task.abort();
        }
        // After the upkeep task is gone, so that no refresh of the entry
        // can follow its removal (commands on the shared connection run in
        // the order they were sent).
        let mut c = self.conn();
        let _ = self
            .op(
                "leave registry",
                redis::cmd("HDEL")
                    .arg(NODES)
                    .arg(&self.settings.node_id)
                    .query_async::<i64>(&mut c),
            )
            .await;
    }
}
