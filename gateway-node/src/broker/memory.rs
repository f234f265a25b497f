//! The in-memory backend: one node on its own, no Redis. A product
//! feature (one command starts a working gateway), not a test double.
//!
//! Each channel is one mutex over its members, presence and history.
//! Publishing numbers the event and delivers it to every member while
//! holding that mutex, so every session sees a channel's events in one
//! order and a message id is larger than every id before it in the channel.

use super::{fanout, Ban};
use crate::session::Session;
use crate::wire::{Dispatch, Reject};
use gateway_shared::protocol::{
    ChannelAdd, ErrorCode, Event, MessageCreate, MessageDelete, RoomUser, StartTyping, User,
    MOVE_HISTORY_LIMIT, MOVE_MEMBER_LIMIT,
};
use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Message ids: milliseconds since the Unix epoch in the high bits, a
/// counter in the low 22, never smaller than the previous id.
pub struct IdGenerator {
    last: AtomicU64,
}

impl IdGenerator {
    pub fn new() -> Self {
        Self {
            last: AtomicU64::new(0),
        }
    }

    pub fn next(&self) -> u64 {
        let floor = unix_ms() << 22;
        let mut prev = self.last.load(Ordering::Relaxed);
        loop {
            let id = floor.max(prev + 1);
            match self
                .last
                .compare_exchange_weak(prev, id, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return id,
                Err(actual) => prev = actual,
            }
        }
    }
}

impl Default for IdGenerator {
    fn default() -> Self {
        Self::new()
    }
}

struct StoredMessage {
    id: u64,
    author_id: String,
    /// The MESSAGE_CREATE dispatch; its body is the history item.
    dispatch: Arc<Dispatch>,
}

struct Presence {
    user: User,
    /// Sessions of this user in the channel.
    sessions: u32,
    /// Join order, for listing the first members.
    order: u64,
}

struct ChannelInner {
    members: HashMap<u64, Arc<Session>>,
    users: HashMap<String, Presence>,
    by_order: BTreeMap<u64, String>,
    next_order: u64,
    /// Latest messages, oldest first; ids ascending.
    history: VecDeque<StoredMessage>,
}

struct Channel {
    name: Arc<str>,
    inner: Mutex<ChannelInner>,
}

impl Channel {
    fn new(name: &str) -> Arc<Self> {
        Arc::new(Self {
            name: Arc::from(name),
            inner: Mutex::new(ChannelInner {
                members: HashMap::new(),
                users: HashMap::new(),
                by_order: BTreeMap::new(),
                next_order: 0,
                history: VecDeque::new(),
            }),
        })
    }
}

pub struct Memory {
    channels: RwLock<BTreeMap<String, Arc<Channel>>>,
    bans: Mutex<HashMap<String, Ban>>,
    next_session: AtomicU64,
    ids: IdGenerator,
    presence_threshold: usize,
    history_retain: usize,
}

impl Memory {
    pub fn new(default_channel: &str, presence_threshold: usize, history_retain: usize) -> Self {
        let mut channels = BTreeMap::new();
        channels.insert(default_channel.to_owned(), Channel::new(default_channel));
        Self {
            channels: RwLock::new(channels),
            bans: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(1),
            ids: IdGenerator::new(),
            presence_threshold,
            history_retain,
        }
    }

    fn channel(&self, name: &str) -> Option<Arc<Channel>> {
        self.channels.read().get(name).cloned()
    }

    pub fn new_session_id(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    pub fn channel_names(&self) -> Vec<String> {
        self.channels.read().keys().cloned().collect()
    }

    pub fn is_banned(&self, user_id: &str) -> bool {
        let mut bans = self.bans.lock();
        match bans.get(user_id) {
            None => false,
            Some(ban) if ban.until.is_some_and(|until| until <= unix_ms()) => {
                bans.remove(user_id);
                false
            }
            Some(_) => true,
        }
    }

    pub fn ban(&self, user_id: &str, ban: Ban) {
        self.bans.lock().insert(user_id.to_owned(), ban);
    }

    pub fn unban(&self, user_id: &str) {
        self.bans.lock().remove(user_id);
    }

    /// Adds `session` to the channel under its lock; presence goes to the
    /// others while the channel is small enough.
    fn enter(&self, channel: &Channel, inner: &mut ChannelInner, session: &Arc<Session>) {
        inner.members.insert(session.id, Arc::clone(session));
        let order = inner.next_order;
        let entry = inner
            .users
            .entry(session.user.id.clone())
            .or_insert_with(|| Presence {
                user: session.user.clone(),
                sessions: 0,
                order,
            });
        entry.sessions += 1;
        if entry.sessions == 1 {
            inner.by_order.insert(order, session.user.id.clone());
            inner.next_order += 1;
        }
        if inner.users.len() <= self.presence_threshold {
            let dispatch = Dispatch::new(
                Event::RoomUserAdd,
                &RoomUser {
                    channel: channel.name.to_string(),
                    user: session.user.clone(),
                    session_id: session.id,
                },
            );
            fanout(inner.members.values(), &dispatch, Some(session.id));
        }
    }

    pub fn join(&self, session: &Arc<Session>, name: &str) -> Result<(), Reject> {
        let channel = self
            .channel(name)
            .ok_or_else(|| Reject::new(ErrorCode::NotFound, "unknown channel"))?;
        let mut inner = channel.inner.lock();
        // A session ended meanwhile (banned) must not come back as a ghost.
        if !session.is_ended() {
            self.enter(&channel, &mut inner, session);
        }
        Ok(())
    }

    pub fn leave(&self, session: &Arc<Session>, name: &str) {
        let Some(channel) = self.channel(name) else {
            return;
        };
        let mut inner = channel.inner.lock();
        if inner.members.remove(&session.id).is_none() {
            return;
        }
        // Presence is announced while the channel, with the leaver, is small
        // enough: whoever got the ADD also gets the REMOVE.
        if inner.users.len() <= self.presence_threshold {
            let dispatch = Dispatch::new(
                Event::RoomUserRemove,
                &RoomUser {
                    channel: channel.name.to_string(),
                    user: session.user.clone(),
                    session_id: session.id,
                },
            );
            fanout(inner.members.values(), &dispatch, None);
        }
        if let Some(entry) = inner.users.get_mut(&session.user.id) {
            entry.sessions -= 1;
            if entry.sessions == 0 {
                let order = entry.order;
                inner.users.remove(&session.user.id);
                inner.by_order.remove(&order);
            }
        }
    }

    /// The CHANNEL_MOVE body: written by hand around the stored history
    /// bodies, which are not serialized again.
    fn move_body(channel: &Channel, inner: &ChannelInner, from: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(br#"{"channel":"#);
        serde_json::to_writer(&mut out, &*channel.name).expect("string serializes");
        out.extend_from_slice(br#","from":"#);
        serde_json::to_writer(&mut out, from).expect("string serializes");
        out.extend_from_slice(br#","members":"#);
        let members: Vec<&User> = inner
            .by_order
            .values()
            .take(MOVE_MEMBER_LIMIT)
            .filter_map(|id| inner.users.get(id).map(|p| &p.user))
            .collect();
        serde_json::to_writer(&mut out, &members).expect("users serialize");
        out.extend_from_slice(br#","member_count":"#);
        out.extend_from_slice(itoa::Buffer::new().format(inner.users.len()).as_bytes());
        out.extend_from_slice(br#","history":["#);
        let skip = inner.history.len().saturating_sub(MOVE_HISTORY_LIMIT);
        for (i, message) in inner.history.iter().skip(skip).enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(message.dispatch.body());
        }
        out.extend_from_slice(b"]}");
        out
    }

    pub fn move_to(&self, session: &Arc<Session>, to: &str) -> Result<(), Reject> {
        let target = self
            .channel(to)
            .ok_or_else(|| Reject::new(ErrorCode::NotFound, "unknown channel"))?;
        let from = session.channel();
        if &*from == to {
            let inner = target.inner.lock();
            session.deliver(&Dispatch::from_body(
                Event::ChannelMove,
                &Self::move_body(&target, &inner, &from),
            ));
            return Ok(());
        }
        // The session names its new channel first: an end racing with the
        // move then leaves the right one (see `join`).
        session.set_channel(Arc::clone(&target.name));
        self.leave(session, &from);
        let mut inner = target.inner.lock();
        if session.is_ended() {
            return Ok(());
        }
        self.enter(&target, &mut inner, session);
        // Under the channel lock: nothing of the new channel can come first.
        session.deliver(&Dispatch::from_body(
            Event::ChannelMove,
            &Self::move_body(&target, &inner, &from),
        ));
        Ok(())
    }

    pub fn publish_message(
        &self,
        session: &Arc<Session>,
        content: &str,
        nonce: Option<&str>,
    ) -> Result<(), Reject> {
        let channel = self
            .channel(&session.channel())
            .ok_or_else(|| Reject::new(ErrorCode::NotFound, "unknown channel"))?;
        let mut inner = channel.inner.lock();
        let id = self.ids.next();
        let dispatch = Dispatch::new(
            Event::MessageCreate,
            &MessageCreate {
                id: id.to_string(),
                channel: channel.name.to_string(),
                author: session.user.clone(),
                content: content.to_owned(),
                ts: unix_ms(),
                nonce: nonce.map(str::to_owned),
            },
        );
        fanout(inner.members.values(), &dispatch, None);
        inner.history.push_back(StoredMessage {
            id,
            author_id: session.user.id.clone(),
            dispatch,
        });
        if inner.history.len() > self.history_retain {
            inner.history.pop_front();
        }
        Ok(())
    }

    pub fn delete_message(&self, session: &Arc<Session>, id: u64) -> Result<(), Reject> {
        let not_found = || Reject::new(ErrorCode::NotFound, "unknown message");
        let channel = self.channel(&session.channel()).ok_or_else(not_found)?;
        let mut inner = channel.inner.lock();
        let index = inner
            .history
            .binary_search_by_key(&id, |m| m.id)
            .map_err(|_| not_found())?;
        if inner.history[index].author_id != session.user.id && !session.identity.admin {
            return Err(Reject::new(
                ErrorCode::PermissionDenied,
                "only the author or an admin may delete a message",
            ));
        }
        inner.history.remove(index);
        let dispatch = Dispatch::new(
            Event::MessageDelete,
            &MessageDelete {
                id: id.to_string(),
                channel: channel.name.to_string(),
            },
        );
        fanout(inner.members.values(), &dispatch, None);
        Ok(())
    }

    pub fn typing(&self, session: &Arc<Session>) {
        let Some(channel) = self.channel(&session.channel()) else {
            return;
        };
        let inner = channel.inner.lock();
        let dispatch = Dispatch::new(
            Event::StartTyping,
            &StartTyping {
                channel: channel.name.to_string(),
                user: session.user.clone(),
                ts: unix_ms(),
            },
        );
        fanout(inner.members.values(), &dispatch, Some(session.id));
    }

    /// Registers a channel; returns the CHANNEL_ADD dispatch for everyone.
    pub fn add_channel(
        &self,
        name: &str,
        topic: &str,
        created_by: &User,
        max_channels: usize,
    ) -> Result<Arc<Dispatch>, Reject> {
        let mut channels = self.channels.write();
        if channels.contains_key(name) {
            return Err(Reject::new(
                ErrorCode::AlreadyExists,
                "channel already exists",
            ));
        }
        if channels.len() >= max_channels {
            return Err(Reject::new(
                ErrorCode::PermissionDenied,
                "channel limit reached",
            ));
        }
        channels.insert(name.to_owned(), Channel::new(name));
        Ok(Dispatch::new(
            Event::ChannelAdd,
            &ChannelAdd {
                name: name.to_owned(),
                topic: topic.to_owned(),
                created_by: created_by.clone(),
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_only_grow() {
        let ids = IdGenerator::new();
        let mut prev = 0;
        for _ in 0..10_000 {
            let id = ids.next();
            assert!(id > prev);
            prev = id;
        }
        assert!(prev < 1 << 63);
    }
}
