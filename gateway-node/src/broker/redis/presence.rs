//! Sessions entering, moving between and leaving channels: subscribe first,
//! then the join script fixes where the session starts in the channel's
//! log. Presence entries, refreshed by the owner, and bans.

use super::batch::{failed, groups, submit, Batcher, Pending};
use super::conn::{Batch, Conn};
use super::{channel_topic, ck, sk, RedisBroker, CHANNELS, CONTROL_TOPIC, OP_TIMEOUT};
use crate::broker::memory::unix_ms;
use crate::broker::{move_body, Ban, ChannelInfo, Member, PresencePage};
use crate::hub::LocalChannel;
use crate::node::Node;
use crate::session::{Session, Unmovable};
use crate::wire::{Dispatch, Reject};
use gateway_shared::protocol::{ErrorCode, Event, User};
use redis::{AsyncCommands, RedisResult, Script};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

/// An integer in a script's reply (0 when absent).
fn script_int(v: Option<&redis::Value>) -> u64 {
    v.and_then(|v| redis::from_redis_value::<u64>(v.clone()).ok())
        .unwrap_or(0)
}

/// The CHANNEL_MOVE dispatch from the join script's snapshot:
/// `[n, member_count, gen, listed, user JSON × listed, message body …]`.
fn move_dispatch(out: &[redis::Value], channel: &str, from: &str) -> Arc<Dispatch> {
    let count = script_int(out.get(1)) as usize;
    let listed = script_int(out.get(3)) as usize;
    let strings: Vec<String> = out
        .iter()
        .skip(4)
        .filter_map(|v| redis::from_redis_value::<String>(v.clone()).ok())
        .collect();
    let members: Vec<User> = strings
        .iter()
        .take(listed)
        .filter_map(|u| serde_json::from_str(u).ok())
        .collect();
    let members: Vec<&User> = members.iter().collect();
    let history = strings.iter().skip(listed).map(|body| body.as_bytes());
    Dispatch::from_body(
        Event::ChannelMove,
        &move_body(channel, from, &members, count, history),
    )
}

/// The keys of the join and leave scripts, in their order.
const CHANNEL_KEYS: [&str; 8] = [
    "meta", "members", "users", "ujson", "order", "log", "presence", "hist",
];

impl RedisBroker {
    pub async fn new_session_id(&self) -> Result<u64, Reject> {
        let mut c = self.conn();
        self.op("session id", c.incr("gw:sid", 1)).await
    }

    pub async fn channel_names(&self) -> Result<Vec<String>, Reject> {
        let mut c = self.conn();
        let mut names: Vec<String> = self.op("channels", c.hkeys(CHANNELS)).await?;
        names.sort();
        Ok(names)
    }

    pub async fn channel_exists(&self, name: &str) -> Result<bool, Reject> {
        let mut c = self.conn();
        self.op("channel lookup", c.hexists(CHANNELS, name)).await
    }

    /// Every channel and its topic (from the registry's meta JSON).
    pub async fn channels(&self) -> Result<Vec<ChannelInfo>, Reject> {
        let mut c = self.conn();
        let all: Vec<(String, String)> = self.op("channels", c.hgetall(CHANNELS)).await?;
        let mut channels: Vec<ChannelInfo> = all
            .into_iter()
            .map(|(name, meta)| {
                let topic = serde_json::from_str::<serde_json::Value>(&meta)
                    .ok()
                    .and_then(|m| m["topic"].as_str().map(str::to_owned))
                    .unwrap_or_default();
                ChannelInfo { name, topic }
            })
            .collect();
        channels.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(channels)
    }

    /// A page of a channel's members (`lua/members.lua`).
    pub async fn presence(
        &self,
        name: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<PresencePage, Reject> {
        if !self.channel_exists(name).await? {
            return Err(Reject::new(ErrorCode::NotFound, "unknown channel"));
        }
        let mut inv = self.scripts.members.prepare_invoke();
        inv.key(ck(name, "order"))
            .key(ck(name, "ujson"))
            .key(ck(name, "users"));
        inv.arg(after.map_or_else(|| "-inf".to_owned(), |a| format!("({a}")))
            .arg(limit + 1);
        let out: Vec<redis::Value> = self
            .op("presence", inv.invoke_async(&mut self.conn()))
            .await?;
        let member_count = script_int(out.first());
        let rows: Vec<&[redis::Value]> = out[1.min(out.len())..].chunks(3).collect();
        let more = rows.len() > limit;
        let mut members = Vec::with_capacity(limit.min(rows.len()));
        let mut last = None;
        for row in rows.into_iter().take(limit) {
            last = Some(script_int(row.first()));
            let json = row
                .get(1)
                .and_then(|v| redis::from_redis_value::<String>(v.clone()).ok())
                .unwrap_or_default();
            if let Ok(user) = serde_json::from_str::<User>(&json) {
                members.push(Member {
                    user,
                    sessions: script_int(row.get(2)),
                });
            }
        }
        Ok(PresencePage {
            members,
            member_count,
            next: last.filter(|_| more),
        })
    }

    pub async fn is_banned(&self, user_id: &str) -> Result<bool, Reject> {
        let mut c = self.conn();
        self.op("ban lookup", c.exists(format!("gw:ban:{user_id}")))
            .await
    }

    fn user_json(user: &User) -> String {
        serde_json::to_string(user).expect("user serializes")
    }

    /// Runs the join script; returns `[n, member_count, gen, snapshot…]`.
    async fn join_script(
        &self,
        session: &Session,
        name: &str,
        snapshot: bool,
    ) -> Result<Vec<redis::Value>, Reject> {
        let mut c = self.conn();
        let channel_json = serde_json::to_string(name).expect("string serializes");
        let mut inv = self.scripts.join.prepare_invoke();
        for suffix in CHANNEL_KEYS {
            inv.key(ck(name, suffix));
        }
        inv.arg(session.id)
            .arg(&session.user.id)
            .arg(Self::user_json(&session.user))
            .arg(self.settings.presence_threshold)
            .arg(channel_topic(name))
            .arg(channel_json)
            .arg(self.settings.log_retain())
            .arg(if snapshot { "1" } else { "0" })
            .arg(self.settings.history_retain)
            .arg(unix_ms() + self.window_ms());
        self.op("join", inv.invoke_async(&mut c)).await
    }

    /// Leaves `name` through the node's leave batches (`leave_task`).
    pub(super) async fn leave_script(&self, session_id: u64, name: &str) -> Result<(), Reject> {
        let replied = submit(&self.leaver, |reply| LeaveJob {
            channel: Arc::from(name),
            session_id,
            reply: Some(reply),
            attempts: 0,
        })
        .await?;
        self.op("leave", replied).await
    }

    pub(super) async fn touch_presence(&self, session_id: u64, name: &str) -> Result<(), Reject> {
        let mut c = self.conn();
        let expiry = unix_ms() + self.window_ms();
        self.op("presence", c.zadd(ck(name, "presence"), session_id, expiry))
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
        let n = script_int(out.first());
        local.init_gen(script_int(out.get(2)));
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
    pub(super) async fn attach_at(
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
                    // Read first: a move whose read fails goes back to its
                    // old channel, and must not have sent its snapshot.
                    let Some(events) = self.read_log(log, from).await? else {
                        return Ok(false);
                    };
                    if let Some(first) = first.take() {
                        session.deliver(&first);
                    }
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
        let mut c = self.conn();
        let key = sk(session.id);
        let mut pipe = redis::pipe();
        pipe.hset_multiple(
            &key,
            &[
                ("uid", session.user.id.as_str()),
                ("name", session.user.name.as_str()),
                ("admin", if session.admin { "1" } else { "0" }),
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

    /// Ends a session in Redis: its leave and the removal of its keys are
    /// queued for the leave batches, and not waited for. The session is
    /// already gone from this node, so nothing can resume it meanwhile (a
    /// claim finds no owner holding it, and it was never parked); a
    /// thousand sessions that end at once wait for room in the queue, not
    /// for Redis. A leave that fails is made again (`LEAVE_ATTEMPTS`);
    /// after that it is logged once per call, and done by the presence
    /// sweep once the entry this node no longer refreshes expires; the
    /// keys expire with the resume window.
    pub async fn end_session(&self, session: &Arc<Session>) -> Result<(), Reject> {
        self.hub.global.detach(session.id);
        let channel = session.channel();
        if let Some(local) = self.hub.get(&channel) {
            local.detach(session.id);
        }
        self.ending.add();
        let queued = self.leaver.send(LeaveJob::ended(channel, session.id)).await;
        if queued.is_err() {
            self.ending.done(1);
            return Err(Reject::new(ErrorCode::Unavailable, "node is shutting down"));
        }
        Ok(())
    }

    /// CHANNEL_MOVE. A move refused part-way (4018) puts the session back
    /// where it was, so that it is always in exactly one channel's stream;
    /// if even that fails, the session is ended (its connection closed with
    /// 1012) rather than left receiving nothing. The caller runs it to its
    /// end even if the connection closes meanwhile.
    pub async fn move_to(
        &self,
        node: &Node,
        session: &Arc<Session>,
        to: &str,
    ) -> Result<(), Reject> {
        match session.begin_move() {
            Ok(()) => {}
            Err(Unmovable::Ended) => {
                return Err(Reject::new(ErrorCode::Unavailable, "session ended"))
            }
            Err(Unmovable::Moving) => {
                return Err(Reject::new(
                    ErrorCode::Unavailable,
                    "a channel move is in progress; retry",
                ))
            }
        }
        let moved = self.move_taken(node, session, to).await;
        session.end_move();
        moved
    }

    /// [`move_to`](Self::move_to), the session's channel taken.
    async fn move_taken(
        &self,
        node: &Node,
        session: &Arc<Session>,
        to: &str,
    ) -> Result<(), Reject> {
        if !self.channel_exists(to).await? {
            return Err(Reject::new(ErrorCode::NotFound, "unknown channel"));
        }
        let from = session.channel();
        let local = self.hub.get(&from);
        if &*from == to && local.as_ref().is_some_and(|l| l.is_member(session.id)) {
            // Already a member: the script only reads the snapshot.
            let out = self.join_script(session, to, true).await?;
            session.deliver(&move_dispatch(&out, to, &from));
            return Ok(());
        }
        // Out of `from` first: none of its events reaches the session after
        // its CHANNEL_MOVE. Where it was is kept, to go back if need be.
        let cursor = local.and_then(|l| l.detach_with_cursor(session.id));
        let moved = self.switch(session, &from, to).await;
        if moved.is_err() && !session.is_ended() && !self.go_back(session, &from, to, cursor).await
        {
            tracing::warn!(
                session = session.id,
                "a failed CHANNEL_MOVE could not be undone; session ended"
            );
            if let Some(conn) = node.end_session(session).await {
                conn.close_with(1012, "channel move failed", false);
            }
        }
        moved
    }

    async fn switch(&self, session: &Arc<Session>, from: &str, to: &str) -> Result<(), Reject> {
        self.leave_script(session.id, from).await?;
        self.record_channel(session, to).await?;
        session.set_channel(Arc::from(to));
        self.join(session, to, Some(from)).await
    }

    /// Records the session's channel. With its expiry: a session ended
    /// meanwhile had its keys deleted, and this must not make one again
    /// that never expires.
    async fn record_channel(&self, session: &Session, channel: &str) -> Result<(), Reject> {
        let key = sk(session.id);
        let mut pipe = redis::pipe();
        pipe.hset(&key, "ch", channel)
            .ignore()
            .pexpire(&key, self.window_ms() as i64)
            .ignore();
        let mut c = self.conn();
        self.op("session", pipe.query_async::<()>(&mut c)).await
    }

    /// Puts a session whose move to `to` failed back into `from`, at
    /// `cursor` (where it had been when it left; `None`: the channel had
    /// no position yet), with what it missed meanwhile read from the log.
    /// Joining again is harmless where it never left. False when it could
    /// not be done.
    async fn go_back(
        &self,
        session: &Arc<Session>,
        from: &str,
        to: &str,
        cursor: Option<u64>,
    ) -> bool {
        session.set_channel(Arc::from(from));
        // Its membership in `to` may have been recorded already.
        let _ = self.leave_script(session.id, to).await;
        if let Some(local) = self.hub.get(to) {
            local.detach(session.id);
        }
        let local = self.hub.pin(from);
        let back = async {
            self.subscribe(channel_topic(from)).await?;
            let out = self.join_script(session, from, false).await?;
            local.init_gen(script_int(out.get(2)));
            self.record_channel(session, from).await?;
            let at = cursor.unwrap_or_else(|| script_int(out.first()));
            self.attach_at(&local, &ck(from, "log"), session, at, None)
                .await
        };
        match back.await {
            Ok(true) => true,
            _ => {
                local.unpin();
                false
            }
        }
    }

    pub async fn ban(&self, user_id: &str, ban: &Ban) -> Result<(), Reject> {
        let mut c = self.conn();
        let key = format!("gw:ban:{user_id}");
        let value = serde_json::json!({"reason": ban.reason, "until": ban.until}).to_string();
        let () = match ban.until {
            Some(until) => {
                let ttl = until.saturating_sub(unix_ms()).max(1);
                self.op("ban", c.pset_ex(&key, value, ttl)).await?
            }
            None => self.op("ban", c.set(&key, value)).await?,
        };
        // Stored first: a kicked client that reconnects meets the ban.
        let _: i64 = self
            .op(
                "ban",
                self.publish_cmd(CONTROL_TOPIC, &format!("ban {user_id}"))
                    .query_async(&mut c),
            )
            .await?;
        Ok(())
    }

    /// Asks every node (this one included) to end `user_id`'s sessions
    /// with 4019, on the control topic bans use.
    pub async fn disconnect_user(&self, user_id: &str) -> Result<(), Reject> {
        let mut c = self.conn();
        let _: i64 = self
            .op(
                "disconnect",
                self.publish_cmd(CONTROL_TOPIC, &format!("disconnect {user_id}"))
                    .query_async(&mut c),
            )
            .await?;
        Ok(())
    }

    pub async fn unban(&self, user_id: &str) -> Result<(), Reject> {
        let mut c = self.conn();
        let _: () = self.op("unban", c.del(format!("gw:ban:{user_id}"))).await?;
        Ok(())
    }
}

/// Leave batches a node has at Redis at most: a mass close (100,000
/// sessions) is seconds of Redis work, and sent at once, the calls at the
/// back of the queue would only add to the wait of everything else the
/// node asks. A batch is up to 256 leaves, sent as one script call per
/// channel (and the ended sessions' key deletions beside them); four such
/// batches are tens of milliseconds of Redis work. The rest waits in the
/// node's queue, and the sessions that ended wait for room in it.
const LEAVES_IN_FLIGHT: usize = 4;

/// Calls an ended session's leave gets: a call that timed out may not have
/// been sent at all (the client library drops a command whose caller gave
/// up before it was written), and a leave is safe to repeat (a session
/// no longer a member leaves nothing and logs nothing).
const LEAVE_ATTEMPTS: u8 = 3;

/// A session leaving a channel, and who waits for the script's reply.
pub(super) struct LeaveJob {
    channel: Arc<str>,
    session_id: u64,
    /// The caller waiting for the leave; `None` for a session that ended,
    /// whose keys go too (`RedisBroker::end_session`).
    reply: Option<oneshot::Sender<RedisResult<()>>>,
    /// Calls made for it before this one (ended sessions only).
    attempts: u8,
}

impl LeaveJob {
    pub(super) fn ended(channel: Arc<str>, session_id: u64) -> Self {
        Self {
            channel,
            session_id,
            reply: None,
            attempts: 0,
        }
    }
}

pub(super) struct LeaveSettings {
    pub threshold: usize,
    pub log_retain: usize,
    pub cluster: bool,
}

/// What each leave call needs, shared by the calls in flight.
struct Leaves {
    conn: Conn,
    script: Arc<Script>,
    settings: LeaveSettings,
    ending: Arc<Pending>,
    /// The queue itself, to try an ended session's leave again (weak: the
    /// broker's handle is what keeps the queue open).
    again: mpsc::WeakSender<LeaveJob>,
}

/// Sends the leaves in self-clocked batches: one script call per channel,
/// and for the sessions that ended, one DEL of their keys each, pipelined.
pub(super) async fn leave_task(
    jobs: mpsc::Receiver<LeaveJob>,
    again: mpsc::WeakSender<LeaveJob>,
    conn: Conn,
    script: Arc<Script>,
    settings: LeaveSettings,
    ending: Arc<Pending>,
) {
    let leaves = Arc::new(Leaves {
        conn,
        script,
        settings,
        ending,
        again,
    });
    let mut batcher = Batcher::new(jobs, Duration::ZERO, LEAVES_IN_FLIGHT);
    while let Some(batch) = batcher.next().await {
        let groups = groups(batch, |a, b| a.channel == b.channel);
        let leaves = Arc::clone(&leaves);
        batcher.send_each(groups, move |group| Arc::clone(&leaves).call(group));
    }
}

impl Leaves {
    /// One leave call for a channel's group of jobs, and the deletion of
    /// the ended sessions' keys beside it.
    async fn call(self: Arc<Self>, group: Vec<LeaveJob>) {
        let name = Arc::clone(&group[0].channel);
        let mut inv = self.script.prepare_invoke();
        for suffix in CHANNEL_KEYS {
            inv.key(ck(&name, suffix));
        }
        inv.arg(self.settings.threshold)
            .arg(channel_topic(&name))
            .arg(serde_json::to_string(&*name).expect("string serializes"))
            .arg(self.settings.log_retain);
        let mut keys = Batch::new(self.settings.cluster);
        for job in &group {
            inv.arg(job.session_id);
            if job.reply.is_none() {
                let key = sk(job.session_id);
                let mut del = redis::cmd("DEL");
                del.arg(&key).arg(format!("{key}:buf"));
                keys.add(&key, del);
            }
        }
        let ended = group.iter().filter(|j| j.reply.is_none()).count();
        let mut conn = self.conn.clone();
        let left = async {
            match tokio::time::timeout(OP_TIMEOUT, inv.invoke_async::<i64>(&mut conn)).await {
                Ok(result) => result.map(drop),
                Err(_) => Err(failed("leave failed", "timed out")),
            }
        };
        let deleted = async {
            if ended == 0 {
                return Ok(());
            }
            match tokio::time::timeout(OP_TIMEOUT, keys.run(&self.conn)).await {
                Ok(result) => result,
                Err(_) => Err(failed("session keys", "timed out")),
            }
        };
        let (left, deleted) = futures_util::future::join(left, deleted).await;
        let why = left.as_ref().err().map(|e| e.to_string());
        let mut again = Vec::new();
        for job in group {
            match job.reply {
                Some(reply) => {
                    let _ = reply.send(match &why {
                        None => Ok(()),
                        Some(why) => Err(failed("leave failed", why)),
                    });
                }
                None => again.push(job),
            }
        }
        let Some(e) = why.or_else(|| deleted.err().map(|e| e.to_string())) else {
            self.ending.done(again.len());
            return;
        };
        again.retain(|job| job.attempts + 1 < LEAVE_ATTEMPTS);
        let given_up = ended - again.len();
        if given_up > 0 {
            warn!(
                channel = %name,
                sessions = given_up,
                error = %e,
                "ended sessions' leave failed {LEAVE_ATTEMPTS} times; the presence sweep removes them once their presence expires"
            );
            self.ending.done(given_up);
        }
        if again.is_empty() {
            return;
        }
        // Queued again from a task of its own: a call in flight waiting for
        // room in the queue could wait for the batches behind it.
        let Some(queue) = self.again.upgrade() else {
            self.ending.done(again.len());
            return;
        };
        let ending = Arc::clone(&self.ending);
        tokio::spawn(async move {
            for mut job in again {
                job.attempts += 1;
                if queue.send(job).await.is_err() {
                    ending.done(1);
                }
            }
        });
    }
}
