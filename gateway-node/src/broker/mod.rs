//! The backend: everything that is cluster-wide. Channels and their
//! history, presence, bans, session ids, and the fan-out of channel events
//! to the sessions in them.
//!
//! `Broker` is an enum rather than a trait object: calls are static, and
//! async methods need no boxing. The in-memory backend runs one node on its
//! own; the Redis backend runs a cluster.

pub mod memory;
pub mod redis;

use crate::node::Node;
use crate::session::Session;
use crate::wire::Reject;
use gateway_shared::protocol::User;
use std::sync::Arc;

pub use self::redis::RedisBroker;
pub use memory::Memory;

pub enum Broker {
    Memory(Memory),
    /// Boxed: much larger than the memory backend.
    Redis(Box<RedisBroker>),
}

/// A ban as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ban {
    pub reason: String,
    /// Unix ms when it ends; `None` is permanent.
    pub until: Option<u64>,
}

impl Broker {
    pub async fn new_session_id(&self) -> Result<u64, Reject> {
        match self {
            Self::Memory(m) => Ok(m.new_session_id()),
            Self::Redis(r) => r.new_session_id().await,
        }
    }

    /// Every channel name, sorted.
    pub async fn channel_names(&self) -> Result<Vec<String>, Reject> {
        match self {
            Self::Memory(m) => Ok(m.channel_names()),
            Self::Redis(r) => r.channel_names().await,
        }
    }

    pub async fn is_banned(&self, user_id: &str) -> Result<bool, Reject> {
        match self {
            Self::Memory(m) => Ok(m.is_banned(user_id)),
            Self::Redis(r) => r.is_banned(user_id).await,
        }
    }

    /// A new session enters the cluster-wide event stream and its first
    /// channel (whose others get ROOM_USER_ADD).
    pub async fn start_session(&self, session: &Arc<Session>) -> Result<(), Reject> {
        match self {
            Self::Memory(m) => {
                m.attach_global(session);
                m.join(session, &session.channel(), None)
            }
            Self::Redis(r) => r.start_session(session).await,
        }
    }

    /// An ended session leaves its channel (ROOM_USER_REMOVE) and the
    /// cluster-wide stream.
    pub async fn end_session(&self, session: &Arc<Session>) -> Result<(), Reject> {
        match self {
            Self::Memory(m) => {
                m.end_session(session);
                Ok(())
            }
            Self::Redis(r) => r.end_session(session).await,
        }
    }

    /// CHANNEL_MOVE: leave the current channel, enter `to`, and dispatch the
    /// CHANNEL_MOVE snapshot to the mover before any event of `to`.
    pub async fn move_to(
        &self,
        node: &Node,
        session: &Arc<Session>,
        to: &str,
    ) -> Result<(), Reject> {
        match self {
            Self::Memory(m) => m.move_to(session, to),
            Self::Redis(r) => r.move_to(node, session, to).await,
        }
    }

    /// MESSAGE_CREATE in `channel` by `author`: a session's message, or
    /// one the server API publishes. Both take the same path, so they are
    /// numbered and ordered alike. The channel must exist (on Redis the
    /// caller checks: a session's channel always does).
    pub async fn publish_message(
        &self,
        channel: &Arc<str>,
        author: &User,
        content: &str,
        nonce: Option<&str>,
    ) -> Result<Published, Reject> {
        match self {
            Self::Memory(m) => m.publish_message(channel, author, content, nonce),
            Self::Redis(r) => r.publish_message(channel, author, content, nonce).await,
        }
    }

    /// MESSAGE_DELETE of message `id` in `channel`.
    pub async fn delete_message(
        &self,
        channel: &str,
        id: u64,
        by: DeleteAs<'_>,
    ) -> Result<(), Reject> {
        match self {
            Self::Memory(m) => m.delete_message(channel, id, by),
            Self::Redis(r) => r.delete_message(channel, id, by).await,
        }
    }

    /// START_TYPING to the channel's other sessions.
    pub async fn typing(&self, session: &Arc<Session>) -> Result<(), Reject> {
        match self {
            Self::Memory(m) => {
                m.typing(session);
                Ok(())
            }
            Self::Redis(r) => r.typing(session).await,
        }
    }

    /// CHANNEL_ADD: registers the channel and dispatches it cluster-wide.
    pub async fn add_channel(
        &self,
        name: &str,
        topic: &str,
        created_by: &User,
        max_channels: usize,
    ) -> Result<(), Reject> {
        match self {
            Self::Memory(m) => m.add_channel(name, topic, created_by, max_channels),
            Self::Redis(r) => r.add_channel(name, topic, created_by).await,
        }
    }

    /// SYSTEM_BAN_ADD: stores the ban and ends the user's sessions on every
    /// node with 4015.
    pub async fn ban(&self, node: &Node, user_id: &str, ban: Ban) -> Result<(), Reject> {
        match self {
            Self::Memory(m) => {
                m.ban(user_id, ban);
                node.kick_user(user_id).await;
                Ok(())
            }
            // Every node (this one included) kicks on the control message.
            Self::Redis(r) => r.ban(user_id, &ban).await,
        }
    }

    /// Ends every session of `user_id`, on every node, with 4019 (the
    /// server API).
    pub async fn disconnect_user(&self, node: &Node, user_id: &str) -> Result<(), Reject> {
        match self {
            Self::Memory(_) => {
                node.disconnect_user(user_id).await;
                Ok(())
            }
            // Every node (this one included) acts on the control message.
            Self::Redis(r) => r.disconnect_user(user_id).await,
        }
    }

    pub async fn channel_exists(&self, name: &str) -> Result<bool, Reject> {
        match self {
            Self::Memory(m) => Ok(m.channel_exists(name)),
            Self::Redis(r) => r.channel_exists(name).await,
        }
    }

    /// Every channel with its topic, sorted by name.
    pub async fn channels(&self) -> Result<Vec<ChannelInfo>, Reject> {
        match self {
            Self::Memory(m) => Ok(m.channels()),
            Self::Redis(r) => r.channels().await,
        }
    }

    /// A page of `channel`'s members (distinct users, in the order they
    /// entered), after position `after`.
    pub async fn presence(
        &self,
        channel: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<PresencePage, Reject> {
        match self {
            Self::Memory(m) => m.presence(channel, after, limit),
            Self::Redis(r) => r.presence(channel, after, limit).await,
        }
    }

    /// A page of `channel`'s history, newest first: messages with an id
    /// below `before`.
    pub async fn history(
        &self,
        channel: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<HistoryPage, Reject> {
        match self {
            Self::Memory(m) => m.history(channel, before, limit),
            Self::Redis(r) => r.history(channel, before, limit).await,
        }
    }

    /// The live nodes of the cluster and their session counts.
    pub async fn nodes(&self, node: &Node) -> Result<Vec<NodeInfo>, Reject> {
        match self {
            Self::Memory(_) => Ok(vec![NodeInfo {
                id: node.node_id.clone(),
                sessions: node.session_count(),
            }]),
            Self::Redis(r) => r.nodes(node).await,
        }
    }

    pub async fn unban(&self, user_id: &str) -> Result<(), Reject> {
        match self {
            Self::Memory(m) => {
                m.unban(user_id);
                Ok(())
            }
            Self::Redis(r) => r.unban(user_id).await,
        }
    }

    /// Resume of a session this node does not hold (Redis: held by another
    /// node or parked). `None`: it cannot be resumed without a gap.
    pub async fn take_over(
        &self,
        node: &Node,
        identity: &crate::auth::Identity,
        id: u64,
    ) -> Result<Option<(Arc<Session>, crate::metrics::ResumeResult)>, Reject> {
        match self {
            Self::Memory(_) => Ok(None),
            Self::Redis(r) => r.take_over(node, identity, id).await,
        }
    }

    /// Parks a local session so that another node can resume it. Memory:
    /// nothing outlives the node, so nothing is parked.
    pub async fn park(&self, session: &Arc<Session>) -> Result<bool, Reject> {
        match self {
            Self::Memory(_) => Ok(false),
            Self::Redis(r) => r.park(session).await,
        }
    }

    /// Starts the backend's background tasks.
    pub fn start(&self, node: &Arc<Node>) {
        if let Self::Redis(r) = self {
            r.start(node);
        }
    }

    /// Stops them (and, on Redis, leaves the node registry).
    pub async fn stop(&self) {
        if let Self::Redis(r) = self {
            r.stop().await;
        }
    }

    /// Whether the backend is reachable (for `/readyz`).
    pub async fn is_healthy(&self) -> bool {
        match self {
            Self::Memory(_) => true,
            Self::Redis(r) => r.is_healthy(),
        }
    }
}

/// A message as published: its final id and timestamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    pub id: u64,
    pub ts: u64,
}

/// Who deletes a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteAs<'a> {
    /// A user, who may delete only their own messages.
    Author(&'a str),
    /// An admin session, or the server API: any message.
    Admin,
}

/// A channel as listed by the server API.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ChannelInfo {
    pub name: String,
    pub topic: String,
}

/// One user in a presence page.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Member {
    pub user: User,
    /// The user's sessions in the channel.
    pub sessions: u64,
}

/// A page of a channel's members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresencePage {
    pub members: Vec<Member>,
    /// Distinct users in the channel.
    pub member_count: u64,
    /// Where the next page starts (the last member's join position), when
    /// there is one.
    pub next: Option<u64>,
}

/// A page of a channel's history, newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryPage {
    /// MESSAGE_CREATE bodies, as dispatched.
    pub messages: Vec<Vec<u8>>,
    /// The id of the last (oldest) message, when older ones remain.
    pub next: Option<u64>,
}

/// A node of the cluster, as the server API reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeInfo {
    pub id: String,
    pub sessions: u64,
}

/// A MESSAGE_CREATE `cnf` serialized from borrowed parts: publishing copies
/// nothing just to serialize it. Same fields, same order as
/// [`gateway_shared::protocol::MessageCreate`].
#[derive(serde::Serialize)]
pub(crate) struct MessageBody<'a> {
    pub id: &'a str,
    pub channel: &'a str,
    pub author: &'a User,
    pub content: &'a str,
    pub ts: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nonce: Option<&'a str>,
}

/// The CHANNEL_MOVE body, written by hand around the history bodies,
/// which are already serialized and are not serialized again.
pub(crate) fn move_body<'a>(
    channel: &str,
    from: &str,
    members: &[&User],
    member_count: usize,
    history: impl Iterator<Item = &'a [u8]>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(br#"{"channel":"#);
    serde_json::to_writer(&mut out, channel).expect("string serializes");
    out.extend_from_slice(br#","from":"#);
    serde_json::to_writer(&mut out, from).expect("string serializes");
    out.extend_from_slice(br#","members":"#);
    serde_json::to_writer(&mut out, members).expect("users serialize");
    out.extend_from_slice(br#","member_count":"#);
    out.extend_from_slice(itoa::Buffer::new().format(member_count).as_bytes());
    out.extend_from_slice(br#","history":["#);
    for (i, body) in history.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(body);
    }
    out.extend_from_slice(b"]}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_shared::protocol::MessageCreate;

    #[test]
    fn the_borrowed_message_body_serializes_like_the_protocol_type() {
        let user = User {
            id: "u1".into(),
            name: "alice".into(),
        };
        for nonce in [None, Some("n1")] {
            let borrowed = MessageBody {
                id: "42",
                channel: "c",
                author: &user,
                content: "hi \"there\"",
                ts: 7,
                nonce,
            };
            let owned = MessageCreate {
                id: "42".into(),
                channel: "c".into(),
                author: user.clone(),
                content: "hi \"there\"".into(),
                ts: 7,
                nonce: nonce.map(str::to_owned),
            };
            assert_eq!(
                serde_json::to_string(&borrowed).unwrap(),
                serde_json::to_string(&owned).unwrap()
            );
        }
    }
}
