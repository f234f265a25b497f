//! The in-memory backend: one node on its own, no Redis. A product
//! feature (one command starts a working gateway), not a test double.
//!
//! Each channel is one mutex over its members, presence and history.
//! Publishing numbers the event and delivers it to every member while
//! holding that mutex, so every session sees a channel's events in one
//! order and a message id is larger than every id before it in the channel.

use super::{
    Ban, ChannelInfo, DeleteAs, HistoryPage, Member, MessageBody, PresencePage, Published,
};
use crate::hub::Hub;
use crate::session::{Session, Writes};
use crate::wire::{Dispatch, Reject};
use gateway_shared::protocol::{
    ChannelAdd, ErrorCode, Event, MessageDelete, RoomUser, StartTyping, User, MOVE_HISTORY_LIMIT,
    MOVE_MEMBER_LIMIT,
};
use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Message ids: `ms * 10^6 + node * 10^3 + counter` in decimal, that is
/// the Unix milliseconds followed by three digits of node number (each
/// live node holds its own, 0-999) and three of a counter that only ever
/// goes up, wrapping at 1000 into the next millisecond. Unique across
/// nodes, increasing per node, below 2^63 until the year 2262.
///
/// The decimal layout (rather than bit fields) lets the Redis message
/// script, which has no 64-bit integers, move an id past its channel's
/// last one by raising only the millisecond part.
pub struct IdGenerator {
    node: u64,
    /// `(ms, counter)` of the last id.
    last: parking_lot::Mutex<(u64, u64)>,
}

/// A message id split as the Redis script handles it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageId {
    pub ms: u64,
    /// `node * 1000 + counter`, 0-999999.
    pub suffix: u64,
}

impl MessageId {
    pub fn value(self) -> u64 {
        self.ms * 1_000_000 + self.suffix
    }
}

impl IdGenerator {
    pub fn new(node: u64) -> Self {
        Self {
            node: node % 1000,
            last: parking_lot::Mutex::new((0, 999)),
        }
    }

    pub fn next(&self) -> MessageId {
        let mut last = self.last.lock();
        let counter = (last.1 + 1) % 1000;
        // A wrapped counter must not go back within a millisecond.
        let floor = if counter == 0 { last.0 + 1 } else { last.0 };
        let ms = unix_ms().max(floor);
        *last = (ms, counter);
        MessageId {
            ms,
            suffix: self.node * 1000 + counter,
        }
    }

    /// Never again an id below millisecond `ms` (another node's clock was
    /// ahead and the channel moved our id up to it).
    pub fn advance_to(&self, ms: u64) {
        let mut last = self.last.lock();
        if ms > last.0 {
            last.0 = ms;
        }
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

/// A channel's state: its log position, presence and history.
struct ChannelState {
    /// `n` of the channel's latest event.
    n: u64,
    /// Every session in the channel (its user is the session's own).
    sessions: HashSet<u64>,
    users: HashMap<String, Presence>,
    by_order: BTreeMap<u64, String>,
    next_order: u64,
    /// Latest messages, oldest first; ids ascending.
    history: VecDeque<StoredMessage>,
}

struct Channel {
    name: Arc<str>,
    /// Set at creation, listed by the server API.
    topic: String,
    state: Mutex<ChannelState>,
}

impl Channel {
    fn new(name: &str, topic: &str) -> Arc<Self> {
        Arc::new(Self {
            name: Arc::from(name),
            topic: topic.to_owned(),
            state: Mutex::new(ChannelState {
                n: 0,
                sessions: HashSet::new(),
                users: HashMap::new(),
                by_order: BTreeMap::new(),
                next_order: 0,
                history: VecDeque::new(),
            }),
        })
    }
}

pub struct Memory {
    hub: Arc<Hub>,
    channels: RwLock<BTreeMap<String, Arc<Channel>>>,
    /// `n` of the latest cluster-wide event.
    global_n: Mutex<u64>,
    bans: Mutex<HashMap<String, Ban>>,
    next_session: AtomicU64,
    ids: IdGenerator,
    presence_threshold: usize,
    history_retain: usize,
}

impl Memory {
    pub fn new(
        hub: Arc<Hub>,
        default_channel: &str,
        presence_threshold: usize,
        history_retain: usize,
    ) -> Self {
        let mut channels = BTreeMap::new();
        channels.insert(
            default_channel.to_owned(),
            Channel::new(default_channel, ""),
        );
        Self {
            hub,
            channels: RwLock::new(channels),
            global_n: Mutex::new(0),
            bans: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(1),
            ids: IdGenerator::new(0),
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

    pub fn channel_exists(&self, name: &str) -> bool {
        self.channels.read().contains_key(name)
    }

    pub fn channels(&self) -> Vec<ChannelInfo> {
        self.channels
            .read()
            .values()
            .map(|c| ChannelInfo {
                name: c.name.to_string(),
                topic: c.topic.clone(),
            })
            .collect()
    }

    pub fn presence(
        &self,
        name: &str,
        after: Option<u64>,
        limit: usize,
    ) -> Result<PresencePage, Reject> {
        let channel = self
            .channel(name)
            .ok_or_else(|| Reject::new(ErrorCode::NotFound, "unknown channel"))?;
        let state = channel.state.lock();
        let from = after.map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded);
        let mut page = state.by_order.range((from, std::ops::Bound::Unbounded));
        let mut members = Vec::with_capacity(limit.min(state.users.len()));
        let mut last = None;
        for (&order, id) in page.by_ref().take(limit) {
            if let Some(p) = state.users.get(id) {
                members.push(Member {
                    user: p.user.clone(),
                    sessions: u64::from(p.sessions),
                });
            }
            last = Some(order);
        }
        Ok(PresencePage {
            members,
            member_count: state.users.len() as u64,
            next: last.filter(|_| page.next().is_some()),
        })
    }

    pub fn history(
        &self,
        name: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<HistoryPage, Reject> {
        let channel = self
            .channel(name)
            .ok_or_else(|| Reject::new(ErrorCode::NotFound, "unknown channel"))?;
        let state = channel.state.lock();
        // History is in id order: everything before `end` is older.
        let end = before.map_or(state.history.len(), |before| {
            state.history.partition_point(|m| m.id < before)
        });
        let start = end.saturating_sub(limit);
        let messages = state
            .history
            .range(start..end)
            .rev()
            .map(|m| m.dispatch.body().to_vec())
            .collect();
        Ok(HistoryPage {
            messages,
            next: (start > 0 && start < end).then(|| state.history[start].id),
        })
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

    /// Appends an event to the channel's log and hands it to the hub, under
    /// the channel lock: the hub sees the log's order.
    fn publish(&self, channel: &Channel, state: &mut ChannelState, dispatch: Arc<Dispatch>) {
        self.publish_with(channel, state, dispatch, Writes::Direct);
    }

    fn publish_with(
        &self,
        channel: &Channel,
        state: &mut ChannelState,
        dispatch: Arc<Dispatch>,
        writes: Writes,
    ) {
        state.n += 1;
        if let Some(local) = self.hub.get(&channel.name) {
            local.on_event(state.n, dispatch, writes);
        }
    }

    /// Puts a new session into the cluster-wide event stream.
    pub fn attach_global(&self, session: &Arc<Session>) {
        let n = self.global_n.lock();
        let _ = self.hub.global.attach(session, *n, None);
    }

    fn enter(&self, channel: &Channel, state: &mut ChannelState, session: &Arc<Session>) {
        state.sessions.insert(session.id);
        let order = state.next_order;
        let entry = state
            .users
            .entry(session.user.id.clone())
            .or_insert_with(|| Presence {
                user: session.user.clone(),
                sessions: 0,
                order,
            });
        entry.sessions += 1;
        if entry.sessions == 1 {
            state.by_order.insert(order, session.user.id.clone());
            state.next_order += 1;
        }
        if state.users.len() <= self.presence_threshold {
            let dispatch = Dispatch::new(
                Event::RoomUserAdd,
                &RoomUser {
                    channel: channel.name.to_string(),
                    user: session.user.clone(),
                    session_id: session.id,
                },
            );
            self.publish(channel, state, dispatch);
        }
    }

    /// Enters `name`: presence to the others, then (for a move) the
    /// CHANNEL_MOVE snapshot to the session before any event of the channel.
    pub fn join(
        &self,
        session: &Arc<Session>,
        name: &str,
        moved_from: Option<&str>,
    ) -> Result<(), Reject> {
        let channel = self
            .channel(name)
            .ok_or_else(|| Reject::new(ErrorCode::NotFound, "unknown channel"))?;
        let local = self.hub.pin(name);
        let mut state = channel.state.lock();
        // A session ended meanwhile (banned) must not come back as a ghost.
        if session.is_ended() {
            local.unpin();
            return Ok(());
        }
        self.enter(&channel, &mut state, session);
        let first = moved_from.map(|from| {
            Dispatch::from_body(Event::ChannelMove, &move_body(&channel, &state, from))
        });
        // Under the channel lock the hub is exactly at `state.n`, so this
        // cannot fail; if it did, the session is not left half in.
        local.attach(session, state.n, first.as_ref()).map_err(|_| {
            local.unpin();
            Reject::new(ErrorCode::UnknownError, "channel fan-out fell behind")
        })
    }

    /// An ended session leaves its channel and the cluster-wide stream.
    pub fn end_session(&self, session: &Arc<Session>) {
        self.hub.global.detach(session.id);
        self.leave(session, &session.channel());
    }

    pub fn leave(&self, session: &Arc<Session>, name: &str) {
        let Some(channel) = self.channel(name) else {
            return;
        };
        let mut state = channel.state.lock();
        if !state.sessions.remove(&session.id) {
            return;
        }
        if let Some(local) = self.hub.get(name) {
            local.detach(session.id);
        }
        // Presence is announced while the channel, with the leaver, is small
        // enough: whoever got the ADD also gets the REMOVE.
        if state.users.len() <= self.presence_threshold {
            let dispatch = Dispatch::new(
                Event::RoomUserRemove,
                &RoomUser {
                    channel: channel.name.to_string(),
                    user: session.user.clone(),
                    session_id: session.id,
                },
            );
            self.publish(&channel, &mut state, dispatch);
        }
        if let Some(entry) = state.users.get_mut(&session.user.id) {
            entry.sessions -= 1;
            if entry.sessions == 0 {
                let order = entry.order;
                state.users.remove(&session.user.id);
                state.by_order.remove(&order);
            }
        }
    }

    pub fn move_to(&self, session: &Arc<Session>, to: &str) -> Result<(), Reject> {
        let target = self
            .channel(to)
            .ok_or_else(|| Reject::new(ErrorCode::NotFound, "unknown channel"))?;
        let from = session.channel();
        if &*from == to {
            let state = target.state.lock();
            session.deliver(&Dispatch::from_body(
                Event::ChannelMove,
                &move_body(&target, &state, &from),
            ));
            return Ok(());
        }
        // The session names its new channel first: an end racing with the
        // move then leaves the right one (see `join`).
        session.set_channel(Arc::clone(&target.name));
        self.leave(session, &from);
        self.join(session, to, Some(&from))
    }

    pub fn publish_message(
        &self,
        name: &str,
        author: &User,
        content: &str,
        nonce: Option<&str>,
    ) -> Result<Published, Reject> {
        let channel = self
            .channel(name)
            .ok_or_else(|| Reject::new(ErrorCode::NotFound, "unknown channel"))?;
        // Another publisher in the channel at the same moment means it is
        // busy: its writers take this message (they batch, and share the
        // work over the threads) instead of this fan-out writing it.
        let (mut state, writes) = match channel.state.try_lock() {
            Some(state) => (state, Writes::Direct),
            None => (channel.state.lock(), Writes::Queued),
        };
        let id = self.ids.next().value();
        let ts = unix_ms();
        let dispatch = Dispatch::new(
            Event::MessageCreate,
            &MessageBody {
                id: itoa::Buffer::new().format(id),
                channel: &channel.name,
                author,
                content,
                ts,
                nonce,
            },
        );
        state.history.push_back(StoredMessage {
            id,
            author_id: author.id.clone(),
            dispatch: Arc::clone(&dispatch),
        });
        if state.history.len() > self.history_retain {
            state.history.pop_front();
        }
        self.publish_with(&channel, &mut state, dispatch, writes);
        Ok(Published { id, ts })
    }

    pub fn delete_message(&self, name: &str, id: u64, by: DeleteAs<'_>) -> Result<(), Reject> {
        let not_found = || Reject::new(ErrorCode::NotFound, "unknown message");
        let channel = self.channel(name).ok_or_else(not_found)?;
        let mut state = channel.state.lock();
        let index = state
            .history
            .binary_search_by_key(&id, |m| m.id)
            .map_err(|_| not_found())?;
        if matches!(by, DeleteAs::Author(user) if state.history[index].author_id != user) {
            return Err(Reject::new(
                ErrorCode::PermissionDenied,
                "only the author or an admin may delete a message",
            ));
        }
        state.history.remove(index);
        let dispatch = Dispatch::new(
            Event::MessageDelete,
            &MessageDelete {
                id: id.to_string(),
                channel: channel.name.to_string(),
            },
        );
        self.publish(&channel, &mut state, dispatch);
        Ok(())
    }

    /// START_TYPING goes to the others only; it is not part of the log, so
    /// it is delivered directly to the local members.
    pub fn typing(&self, session: &Arc<Session>) {
        let Some(channel) = self.channel(&session.channel()) else {
            return;
        };
        let dispatch = Dispatch::new(
            Event::StartTyping,
            &StartTyping {
                channel: channel.name.to_string(),
                user: session.user.clone(),
                ts: unix_ms(),
            },
        );
        if let Some(local) = self.hub.get(&channel.name) {
            local.deliver_except(&dispatch, session.id, Writes::Direct);
        }
    }

    /// Registers a channel and dispatches CHANNEL_ADD to every session.
    pub fn add_channel(
        &self,
        name: &str,
        topic: &str,
        created_by: &User,
        max_channels: usize,
    ) -> Result<(), Reject> {
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
        channels.insert(name.to_owned(), Channel::new(name, topic));
        drop(channels);
        let dispatch = Dispatch::new(
            Event::ChannelAdd,
            &ChannelAdd {
                name: name.to_owned(),
                topic: topic.to_owned(),
                created_by: created_by.clone(),
            },
        );
        let mut n = self.global_n.lock();
        *n += 1;
        self.hub.global.on_event(*n, dispatch, Writes::Direct);
        Ok(())
    }
}

/// The CHANNEL_MOVE body: written by hand around the stored history
/// bodies, which are not serialized again.
fn move_body(channel: &Channel, state: &ChannelState, from: &str) -> Vec<u8> {
    let members: Vec<&User> = state
        .by_order
        .values()
        .take(MOVE_MEMBER_LIMIT)
        .filter_map(|id| state.users.get(id).map(|p| &p.user))
        .collect();
    let skip = state.history.len().saturating_sub(MOVE_HISTORY_LIMIT);
    let history = state.history.iter().skip(skip).map(|m| m.dispatch.body());
    super::move_body(&channel.name, from, &members, state.users.len(), history)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_only_grow() {
        let ids = IdGenerator::new(3);
        let mut prev = 0;
        for _ in 0..10_000 {
            let id = ids.next();
            assert!(id.value() > prev, "{id:?}");
            assert_eq!(id.suffix / 1000, 3, "node digits");
            prev = id.value();
        }
        assert!(prev < 1 << 63);
        let ahead = unix_ms() + 5000;
        ids.advance_to(ahead);
        assert!(ids.next().ms >= ahead);
    }
}
