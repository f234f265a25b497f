//! Publishing and the logs: messages, deletes, typing and new channels.
//! A logged event is appended to its log, whose entry id is its `n`, and
//! published in the same script (`lua/emit.lua`; messages go through the
//! per-node `publish_task`, in batches, with `lua/message.lua`);
//! `read_log` reads a log back for gap fills, joins and resumes.

use super::batch::{failed, groups, submit, Batcher};
use super::conn::Conn;
use super::{
    channel_topic, ck, RedisBroker, CHANNELS, GLOBAL_LOG, GLOBAL_TOPIC, LOG_RETAIN,
    PUBLISH_DEADLINE,
};
use crate::broker::memory::unix_ms;
use crate::broker::{DeleteAs, HistoryPage, MessageBody, Published};
use crate::metrics::Metrics;
use crate::session::Session;
use crate::wire::{Dispatch, Reject};
use gateway_shared::protocol::{ChannelAdd, ErrorCode, Event, MessageDelete, StartTyping, User};
use redis::{RedisResult, Script};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// `"<EVENT> <body>"` (a log entry).
pub(super) fn parse_entry(d: &str) -> Option<Arc<Dispatch>> {
    let (event, body) = d.split_once(' ')?;
    Some(Dispatch::from_body(
        Event::from_name(event)?,
        body.as_bytes(),
    ))
}

/// The id of a MESSAGE_CREATE body (`{"id":"123",…`).
fn message_id(body: &[u8]) -> Option<u64> {
    let rest = body.strip_prefix(br#"{"id":""#)?;
    let end = rest.iter().position(|&b| b == b'"')?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

/// `0-<n>` → n.
fn entry_n(id: &str) -> Option<u64> {
    id.strip_prefix("0-")?.parse().ok()
}

impl RedisBroker {
    pub async fn publish_message(
        &self,
        channel: &Arc<str>,
        author: &User,
        content: &str,
        nonce: Option<&str>,
    ) -> Result<Published, Reject> {
        let started = std::time::Instant::now();
        let id = self.ids().next();
        let ts = unix_ms();
        // Everything after the id: the script puts the final id in front.
        let full = serde_json::to_string(&MessageBody {
            id: "",
            channel,
            author,
            content,
            ts,
            nonce,
        })
        .expect("message serializes");
        let deadline_ms = ts as i64
            + self.clock_offset_ms.load(Ordering::Relaxed)
            + PUBLISH_DEADLINE.as_millis() as i64;
        let replied = submit(&self.publisher, |reply| PublishJob {
            // The session's own name: no copy per message.
            channel: Arc::clone(channel),
            body: full,
            ms: id.ms,
            suffix: id.suffix,
            deadline_ms,
            reply,
        })
        .await?;
        let (_, final_id): (u64, String) = self.op("publish", replied).await?;
        if let Some(ms) = final_id.get(..13).and_then(|ms| ms.parse::<u64>().ok()) {
            if ms > id.ms {
                self.ids().advance_to(ms);
            }
        }
        self.metrics
            .broker_publish
            .observe(started.elapsed().as_secs_f64());
        Ok(Published {
            id: final_id.parse().unwrap_or(id.value()),
            ts,
        })
    }

    pub async fn delete_message(
        &self,
        name: &str,
        id: u64,
        by: DeleteAs<'_>,
    ) -> Result<(), Reject> {
        let body = serde_json::to_string(&MessageDelete {
            id: id.to_string(),
            channel: name.to_owned(),
        })
        .expect("serializes");
        let (uid, admin) = match by {
            DeleteAs::Author(uid) => (uid, "0"),
            DeleteAs::Admin => ("", "1"),
        };
        let mut c = self.conn();
        let mut inv = self.scripts.delete.prepare_invoke();
        inv.key(ck(name, "meta"))
            .key(ck(name, "log"))
            .key(ck(name, "hist"));
        inv.arg(channel_topic(name))
            .arg(id)
            .arg(uid)
            .arg(admin)
            .arg(body)
            .arg(self.settings.log_retain())
            .arg(self.settings.history_retain);
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

    /// A page of a channel's history, newest first (`lua/messages.lua`).
    pub async fn history(
        &self,
        name: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<HistoryPage, Reject> {
        if !self.channel_exists(name).await? {
            return Err(Reject::new(ErrorCode::NotFound, "unknown channel"));
        }
        let mut inv = self.scripts.messages.prepare_invoke();
        inv.key(ck(name, "meta"))
            .key(ck(name, "log"))
            .key(ck(name, "hist"));
        inv.arg(self.settings.history_retain)
            .arg(before.map(|b| b.to_string()).unwrap_or_default())
            .arg(limit);
        let mut messages: Vec<Vec<u8>> = self
            .op("history", inv.invoke_async(&mut self.conn()))
            .await?;
        // The script reads one more than asked: whether older ones remain.
        let more = messages.len() > limit;
        messages.truncate(limit);
        let next = if more {
            messages.last().and_then(|m| message_id(m))
        } else {
            None
        };
        Ok(HistoryPage { messages, next })
    }

    pub async fn typing(&self, session: &Arc<Session>) -> Result<(), Reject> {
        let name = session.channel();
        let body = serde_json::to_string(&StartTyping {
            channel: name.to_string(),
            user: session.user.clone(),
            ts: unix_ms(),
        })
        .expect("serializes");
        let mut c = self.conn();
        let payload = format!("0 {} START_TYPING {body}", session.id);
        let _: () = self
            .op(
                "typing",
                self.publish_cmd(&channel_topic(&name), &payload)
                    .query_async(&mut c),
            )
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
        let mut c = self.conn();
        let mut inv = self.scripts.add_channel.prepare_invoke();
        inv.key(CHANNELS).key(GLOBAL_LOG);
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

    /// Reads `log` after `after`; `None` when the events right after it are
    /// gone (trimmed), so the reader cannot continue without a gap.
    pub(super) async fn read_log(
        &self,
        log: &str,
        after: u64,
    ) -> Result<Option<Vec<(u64, Arc<Dispatch>)>>, Reject> {
        let mut c = self.conn();
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
}

/// A message on its way to Redis, and who waits for the script's reply.
pub(super) struct PublishJob {
    channel: Arc<str>,
    /// The MESSAGE_CREATE body with an empty id: the script puts the final
    /// id in front of what follows `{"id":"`.
    body: String,
    ms: u64,
    suffix: u64,
    /// In Redis' clock: past it the script does not publish the message.
    /// A request stuck on a cut link would otherwise run once the link is
    /// back, after its sender was told 4018 (not accepted).
    deadline_ms: i64,
    reply: oneshot::Sender<RedisResult<(u64, String)>>,
}

/// Sends the messages of every session of this node to Redis in
/// self-clocked batches (`batch.rs`): one script call (on a cluster, one
/// per channel, all in one write) that Redis reads, runs and answers in
/// one wake-up, which is most of what it spends per message at moderate
/// rates. `window` makes a batch also wait that long after its first
/// message, trading latency for fewer wake-ups still.
pub(super) async fn publish_task(
    jobs: mpsc::Receiver<PublishJob>,
    conn: Conn,
    script: Arc<Script>,
    log_retain: usize,
    window: Duration,
    cluster: bool,
    metrics: Arc<Metrics>,
) {
    // No limit on batches in flight: a message's sender gives up at the
    // operation deadline, and one that reaches Redis after it is dropped.
    let mut batcher = Batcher::new(jobs, window, usize::MAX);
    while let Some(batch) = batcher.next().await {
        // One script call per group: the whole batch on one Redis; on a
        // cluster, the messages of each channel (a call stays in one slot).
        let groups = groups(batch, |a, b| !cluster || a.channel == b.channel);
        for group in &groups {
            metrics.redis_publish_batch.observe(group.len() as f64);
        }
        let (conn, script) = (conn.clone(), Arc::clone(&script));
        batcher.send_each(groups, move |group| {
            let (mut conn, script) = (conn.clone(), Arc::clone(&script));
            async move {
                let mut inv = script.prepare_invoke();
                inv.arg(log_retain);
                for job in &group {
                    inv.key(ck(&job.channel, "meta"))
                        .key(ck(&job.channel, "log"));
                    inv.arg(channel_topic(&job.channel))
                        .arg(&job.body[r#"{"id":"""#.len()..])
                        .arg(format!("{:013}", job.ms))
                        .arg(format!("{:06}", job.suffix));
                }
                // The batch's earliest deadline, last.
                inv.arg(
                    group
                        .iter()
                        .map(|j| j.deadline_ms)
                        .min()
                        .unwrap_or(i64::MAX),
                );
                let result: RedisResult<Vec<(u64, String)>> = inv.invoke_async(&mut conn).await;
                match result {
                    Ok(done) if done.len() == group.len() => {
                        for (job, done) in group.into_iter().zip(done) {
                            let _ = job.reply.send(Ok(done));
                        }
                    }
                    Ok(done) if done.is_empty() => {
                        reply_all(group, "reached Redis after its deadline")
                    }
                    Ok(_) => reply_all(group, "the message script answered a batch short"),
                    Err(e) => reply_all(group, &e.to_string()),
                }
            }
        });
    }
}

/// Fails every message of a batch with `why`.
fn reply_all(group: Vec<PublishJob>, why: &str) {
    for job in group {
        let _ = job.reply.send(Err(failed("publish failed", why)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_entries_parse() {
        let d = parse_entry(r#"ROOM_USER_ADD {"a":1}"#).unwrap();
        assert_eq!(d.body(), br#"{"a":1}"#);
        assert_eq!(entry_n("0-42"), Some(42));
        assert_eq!(entry_n("5-1"), None);
        assert_eq!(message_id(br#"{"id":"17","channel":"c"}"#), Some(17));
        assert_eq!(message_id(b"{}"), None);
    }
}
