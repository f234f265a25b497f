//! Client-executable events (130): validation of each `cnf`, then the
//! backend call. Every rejection here is non-fatal (section 4).
//!
//! The server API (`api`) validates its request bodies with the same
//! functions (`message_fields`, `channel_fields`, `ban_terms`, …), so the
//! rules cannot differ between the two.

use crate::broker::memory::unix_ms;
use crate::broker::{Ban, DeleteAs};
use crate::node::Node;
use crate::session::Session;
use crate::wire::{as_int, Dispatch, Envelope, Reject};
use gateway_shared::protocol::{
    is_valid_channel_name, BanAdd, BanRemove, ErrorCode, Event, MAX_CONTENT_CHARS, MAX_NONCE_LEN,
    MAX_TOPIC_CHARS, MAX_USER_ID_CHARS,
};
use simd_json::{BorrowedValue as Value, StaticNode};
use std::sync::Arc;
use std::time::Instant;

fn invalid(m: &'static str) -> Reject {
    Reject::new(ErrorCode::InvalidEventData, m)
}

/// The fields of an event's `cnf` (or of a server API request body). An
/// absent `cnf` reads as `{}`; one that is not an object has no fields (so
/// required ones are missing).
pub(crate) struct Fields<'v> {
    obj: Option<&'v simd_json::borrowed::Object<'v>>,
    is_object: bool,
}

impl<'v> Fields<'v> {
    pub(crate) fn new(cnf: Option<&'v Value<'v>>) -> Self {
        match cnf {
            None => Self {
                obj: None,
                is_object: true,
            },
            Some(Value::Object(obj)) => Self {
                obj: Some(obj),
                is_object: true,
            },
            Some(_) => Self {
                obj: None,
                is_object: false,
            },
        }
    }

    pub(crate) fn require_object(&self) -> Result<(), Reject> {
        if self.is_object {
            Ok(())
        } else {
            Err(invalid("cnf must be an object"))
        }
    }

    pub(crate) fn get(&self, key: &str) -> Option<&'v Value<'v>> {
        self.obj
            .and_then(|o| o.get(key))
            .filter(|v| !matches!(v, Value::Static(StaticNode::Null)))
    }

    pub(crate) fn str(
        &self,
        key: &str,
        wrong_type: &'static str,
    ) -> Result<Option<&'v str>, Reject> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_ref())),
            Some(_) => Err(invalid(wrong_type)),
        }
    }
}

/// Runs one execute. The caller has checked the session and the rate limit.
pub async fn execute(
    node: &Arc<Node>,
    session: &Arc<Session>,
    env: &Envelope<'_>,
) -> Result<(), Reject> {
    let Some(t) = env.t else {
        return Err(Reject::new(ErrorCode::UnknownEvent, "t is missing"));
    };
    let event = Event::from_name(t)
        .filter(|e| e.client_executable())
        .ok_or_else(|| Reject::new(ErrorCode::UnknownEvent, "unknown event"))?;
    node.metrics.event_executed(event);
    let fields = Fields::new(env.cnf);
    fields.require_object()?;
    match event {
        Event::MessageCreate => message_create(node, session, &fields).await,
        Event::MessageDelete => message_delete(node, session, &fields).await,
        Event::StartTyping => {
            if session.typing_due(Instant::now()) {
                node.broker.typing(session).await?;
            }
            Ok(())
        }
        Event::ChannelAdd => channel_add(node, session, &fields).await,
        Event::ChannelMove => {
            let channel = fields
                .str("channel", "channel must be a string")?
                .ok_or_else(|| invalid("channel is missing"))?
                .to_owned();
            let (node, session) = (Arc::clone(node), Arc::clone(session));
            crate::node::to_the_end(
                async move { node.broker.move_to(&node, &session, &channel).await },
            )
            .await
        }
        Event::SystemBanAdd => ban_add(node, session, &fields).await,
        Event::SystemBanRemove => ban_remove(node, session, &fields).await,
        Event::RoomUserAdd | Event::RoomUserRemove | Event::GatewayDown => {
            unreachable!("dispatch-only events are filtered above")
        }
    }
}

/// MESSAGE_CREATE's `content` and `nonce`.
pub(crate) fn message_fields<'v>(
    fields: &Fields<'v>,
) -> Result<(&'v str, Option<&'v str>), Reject> {
    let content = fields
        .str("content", "content must be a string")?
        .ok_or_else(|| invalid("content is missing"))?;
    let chars = content.chars().count();
    if chars == 0 || chars > MAX_CONTENT_CHARS {
        return Err(invalid("content must be 1-2000 characters"));
    }
    let nonce = fields.str("nonce", "nonce must be a string")?;
    if nonce.is_some_and(|n| n.len() > MAX_NONCE_LEN) {
        return Err(invalid("nonce must be at most 64 bytes"));
    }
    Ok((content, nonce))
}

/// A message id: a decimal string.
pub(crate) fn parse_message_id(id: &str) -> Result<u64, Reject> {
    id.parse()
        .ok()
        .filter(|_| id.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| invalid("id must be a decimal string"))
}

/// CHANNEL_ADD's `name` and `topic`.
pub(crate) fn channel_fields<'v>(fields: &Fields<'v>) -> Result<(&'v str, &'v str), Reject> {
    let name = fields
        .str("name", "name must be a string")?
        .ok_or_else(|| invalid("name is missing"))?;
    if !is_valid_channel_name(name) {
        return Err(invalid("name must match ^[a-z0-9][a-z0-9_-]{0,31}$"));
    }
    let topic = fields.str("topic", "topic must be a string")?.unwrap_or("");
    if topic.chars().count() > MAX_TOPIC_CHARS {
        return Err(invalid("topic must be at most 256 characters"));
    }
    Ok((name, topic))
}

async fn message_create(
    node: &Node,
    session: &Arc<Session>,
    fields: &Fields<'_>,
) -> Result<(), Reject> {
    let (content, nonce) = message_fields(fields)?;
    node.broker
        .publish_message(&session.channel(), &session.user, content, nonce)
        .await
        .map(|_| ())
}

async fn message_delete(
    node: &Node,
    session: &Arc<Session>,
    fields: &Fields<'_>,
) -> Result<(), Reject> {
    let id = fields
        .str("id", "id must be a decimal string")?
        .ok_or_else(|| invalid("id is missing"))?;
    let id = parse_message_id(id)?;
    let by = if session.admin {
        DeleteAs::Admin
    } else {
        DeleteAs::Author(&session.user.id)
    };
    node.broker.delete_message(&session.channel(), id, by).await
}

async fn channel_add(
    node: &Node,
    session: &Arc<Session>,
    fields: &Fields<'_>,
) -> Result<(), Reject> {
    let (name, topic) = channel_fields(fields)?;
    node.broker
        .add_channel(name, topic, &session.user, node.config.max_channels)
        .await
}

fn require_admin(session: &Session) -> Result<(), Reject> {
    if session.admin {
        Ok(())
    } else {
        Err(Reject::new(ErrorCode::PermissionDenied, "admin only"))
    }
}

fn user_id<'v>(fields: &Fields<'v>) -> Result<&'v str, Reject> {
    let user_id = fields
        .str("user_id", "user_id must be a string")?
        .ok_or_else(|| invalid("user_id is missing"))?;
    check_user_id(user_id)?;
    Ok(user_id)
}

/// A user id: 1-64 characters.
pub(crate) fn check_user_id(user_id: &str) -> Result<(), Reject> {
    let len = user_id.chars().count();
    if len == 0 || len > MAX_USER_ID_CHARS {
        return Err(invalid("user_id must be 1-64 characters"));
    }
    Ok(())
}

/// SYSTEM_BAN_ADD's `reason` and `duration_s`, as the ban to store.
pub(crate) fn ban_terms(fields: &Fields<'_>) -> Result<Ban, Reject> {
    let reason = fields
        .str("reason", "reason must be a string")?
        .unwrap_or("");
    if reason.chars().count() > MAX_TOPIC_CHARS {
        return Err(invalid("reason must be at most 256 characters"));
    }
    let until = match fields.get("duration_s") {
        None => None,
        Some(v) => {
            let secs = as_int(v)
                .filter(|s| (1..=MAX_BAN_S).contains(s))
                .ok_or_else(|| invalid("duration_s must be a positive integer"))?;
            Some(unix_ms() + secs as u64 * 1000)
        }
    };
    Ok(Ban {
        reason: reason.to_owned(),
        until,
    })
}

/// Longest ban with a duration: 100 years.
pub(crate) const MAX_BAN_S: i128 = 100 * 365 * 86_400;

async fn ban_add(node: &Node, session: &Arc<Session>, fields: &Fields<'_>) -> Result<(), Reject> {
    require_admin(session)?;
    let user_id = user_id(fields)?;
    if user_id == session.user.id {
        return Err(invalid("you cannot ban yourself"));
    }
    let ban = ban_terms(fields)?;
    let (reason, until) = (ban.reason.clone(), ban.until);
    node.broker.ban(node, user_id, ban).await?;
    session.deliver(&Dispatch::new(
        Event::SystemBanAdd,
        &BanAdd {
            user_id: user_id.to_owned(),
            reason,
            until,
        },
    ));
    Ok(())
}

async fn ban_remove(
    node: &Node,
    session: &Arc<Session>,
    fields: &Fields<'_>,
) -> Result<(), Reject> {
    require_admin(session)?;
    let user_id = user_id(fields)?;
    node.broker.unban(user_id).await?;
    session.deliver(&Dispatch::new(
        Event::SystemBanRemove,
        &BanRemove {
            user_id: user_id.to_owned(),
        },
    ));
    Ok(())
}
