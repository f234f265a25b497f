//! The hub: this node's local fan-out, channel → local sessions.
//!
//! Every channel event carries `n`, its position in the channel's event
//! log (1, 2, 3, … per channel, assigned by the backend). The hub delivers
//! a channel's events to its local members strictly in `n` order, exactly
//! once: a duplicate (`n` already delivered) is dropped, an event that
//! arrives early waits in `pending` until the gap before it is filled. So
//! whatever path an event takes to this node (a direct call in memory, a
//! pub/sub message, a re-read of the Redis log after a reconnect), members
//! see one order, the order of the log.
//!
//! A session entering a channel (new session, CHANNEL_MOVE, resume) has
//! seen everything up to some `from` (its snapshot, or its catch-up read of
//! the log). If the hub has delivered less than that, the session skips the
//! events up to `from`; if more, it gets the difference from `recent`.
//!
//! Cluster-wide events (CHANNEL_ADD) use the same machinery on the
//! `global` channel, of which every session is a member.
//!
//! Locking: a channel's mutex, then its members' session mutexes (and
//! under those only what session.rs says).

use crate::ring::Log;
use crate::session::{Session, Writes};
use crate::wire::Dispatch;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

/// Delivered events a channel keeps for sessions that attach behind it
/// (in the few milliseconds between a join script and the attach). Small:
/// every channel keeps them alive; further behind, the log is read.
const RECENT: usize = 128;
/// Early events a channel holds while waiting for a gap to be filled.
const PENDING_LIMIT: usize = 16 * 1024;

/// What the caller must do after handing the hub an event.
#[derive(Debug, PartialEq, Eq)]
pub enum Gap {
    /// Nothing: delivered, or a duplicate.
    None,
    /// Events `from..=to` are missing: read them from the log and hand them
    /// in with [`LocalChannel::on_event`].
    Missing { from: u64, to: u64 },
}

/// Why a session could not attach.
#[derive(Debug, PartialEq, Eq)]
pub enum AttachError {
    /// The events between the session's `from` and what the hub delivered
    /// are no longer in `recent`.
    TooFarBehind,
}

struct Inner {
    /// `n` of the last event delivered; `None` until the first member
    /// attaches (then the hub has no position in the log yet).
    delivered: Option<u64>,
    members: HashMap<u64, Arc<Session>>,
    /// Members that attached ahead of `delivered`: they get events after
    /// this `n` only.
    skip_until: HashMap<u64, u64>,
    /// Events that arrived ahead of a gap, by `n`.
    pending: BTreeMap<u64, Arc<Dispatch>>,
    /// The last delivered events, `(n, event)`, oldest first.
    recent: VecDeque<(u64, Arc<Dispatch>)>,
    /// A gap fill was requested and has not completed.
    filling: bool,
    /// Sessions on their way in (between looking the channel up and
    /// attaching): the channel must not be forgotten meanwhile.
    pins: usize,
    /// Where delivered events are kept for the members' rings to share.
    log: Log,
    /// The log's generation (Redis): it changes when the backend lost
    /// events of this channel, and numbers before it mean nothing after.
    gen: u64,
}

impl Inner {
    /// Forgets members and everything held, at position `delivered` of log
    /// generation `gen` (`None`: not known yet).
    fn start_over(&mut self, delivered: Option<u64>, gen: u64) {
        self.members.clear();
        self.skip_until.clear();
        self.pending.clear();
        self.recent.clear();
        self.filling = false;
        self.delivered = delivered;
        self.gen = gen;
    }
}

pub struct LocalChannel {
    pub name: Arc<str>,
    inner: Mutex<Inner>,
}

impl LocalChannel {
    fn new(name: Arc<str>) -> Arc<Self> {
        Arc::new(Self {
            name,
            inner: Mutex::new(Inner {
                delivered: None,
                members: HashMap::new(),
                skip_until: HashMap::new(),
                pending: BTreeMap::new(),
                recent: VecDeque::new(),
                filling: false,
                pins: 0,
                log: Log::default(),
                gen: 0,
            }),
        })
    }

    fn deliver(inner: &mut Inner, n: u64, dispatch: Arc<Dispatch>, writes: Writes) {
        let (block, slot) = inner.log.append(Arc::clone(&dispatch));
        for (id, session) in &inner.members {
            if inner.skip_until.get(id).is_some_and(|&skip| n <= skip) {
                continue;
            }
            session.deliver_shared(block, slot, writes);
        }
        inner.skip_until.retain(|_, skip| *skip > n);
        inner.delivered = Some(n);
        inner.recent.push_back((n, dispatch));
        if inner.recent.len() > RECENT {
            inner.recent.pop_front();
        }
    }

    /// Hands in event `n`. Delivers it (and whatever waited behind it) when
    /// it is next in order; reports a gap when events before it are missing.
    /// `writes` says whether the fan-out may write to the sockets itself.
    pub fn on_event(&self, n: u64, dispatch: Arc<Dispatch>, writes: Writes) -> Gap {
        let mut inner = self.inner.lock();
        let Some(delivered) = inner.delivered else {
            // No member has fixed our position yet: keep it for the first.
            if inner.pending.len() < PENDING_LIMIT {
                inner.pending.insert(n, dispatch);
            }
            return Gap::None;
        };
        if n <= delivered {
            return Gap::None;
        }
        if n > delivered + 1 {
            if inner.pending.len() < PENDING_LIMIT {
                inner.pending.insert(n, dispatch);
            }
            if inner.filling {
                return Gap::None;
            }
            inner.filling = true;
            return Gap::Missing {
                from: delivered + 1,
                to: n - 1,
            };
        }
        Self::deliver(&mut inner, n, dispatch, writes);
        Self::drain_pending(&mut inner);
        Gap::None
    }

    fn drain_pending(inner: &mut Inner) {
        while let Some(entry) = inner.pending.first_entry() {
            let next = inner.delivered.map_or(0, |d| d + 1);
            let n = *entry.key();
            if n < next {
                entry.remove();
            } else if n == next {
                // Events that waited behind a gap leave together: the
                // writers batch them.
                let dispatch = entry.remove();
                Self::deliver(inner, n, dispatch, Writes::Queued);
            } else {
                break;
            }
        }
        if inner.pending.is_empty() {
            inner.filling = false;
        }
    }

    /// A gap fill ended (with or without the events): allow another.
    pub fn fill_done(&self) -> Gap {
        let mut inner = self.inner.lock();
        inner.filling = false;
        let (Some(delivered), Some((&first, _))) =
            (inner.delivered, inner.pending.first_key_value())
        else {
            return Gap::None;
        };
        if first > delivered + 1 {
            inner.filling = true;
            return Gap::Missing {
                from: delivered + 1,
                to: first - 1,
            };
        }
        Gap::None
    }

    /// Gives up on events before the earliest pending one (they are gone
    /// from the log): delivery resumes after the hole.
    pub fn skip_gap(&self) {
        let mut inner = self.inner.lock();
        if let Some((&first, _)) = inner.pending.first_key_value() {
            inner.delivered = Some(first - 1);
            Self::drain_pending(&mut inner);
        }
        inner.filling = false;
    }

    /// Adds `session`, which has seen this channel's events up to `from`.
    /// `first` (the CHANNEL_MOVE snapshot) is delivered to it before any
    /// event of the channel.
    /// On success, releases the pin the caller took with [`Hub::pin`]; on
    /// failure the caller still holds it (to retry, or to `unpin`).
    pub fn attach(
        &self,
        session: &Arc<Session>,
        from: u64,
        first: Option<&Arc<Dispatch>>,
    ) -> Result<(), AttachError> {
        let mut inner = self.inner.lock();
        if session.is_ended() {
            // Ended meanwhile (a ban, a reset of the log): no ghost member.
            inner.pins = inner.pins.saturating_sub(1);
            return Ok(());
        }
        let delivered = match inner.delivered {
            Some(d) => d,
            None => {
                inner.delivered = Some(from);
                from
            }
        };
        if delivered > from {
            let oldest = inner.recent.front().map_or(u64::MAX, |e| e.0);
            if oldest > from + 1 {
                return Err(AttachError::TooFarBehind);
            }
        }
        if let Some(first) = first {
            session.deliver(first);
        }
        if delivered > from {
            for (n, dispatch) in &inner.recent {
                if *n > from {
                    session.deliver(dispatch);
                }
            }
        } else if from > delivered {
            inner.skip_until.insert(session.id, from);
        }
        inner.members.insert(session.id, Arc::clone(session));
        inner.pins = inner.pins.saturating_sub(1);
        Self::drain_pending(&mut inner);
        Ok(())
    }

    /// Delivers an event that is not part of the log (START_TYPING) to
    /// every member but one.
    pub fn deliver_except(&self, dispatch: &Arc<Dispatch>, except: u64, writes: Writes) {
        let inner = self.inner.lock();
        for (id, session) in &inner.members {
            if *id != except {
                session.deliver_with(dispatch, writes);
            }
        }
    }

    /// Whether `session_id` is attached here.
    pub fn is_member(&self, session_id: u64) -> bool {
        self.inner.lock().members.contains_key(&session_id)
    }

    /// Removes `session` and returns its cursor (see [`Self::cursor`]),
    /// in one step: no event can fall between the two.
    pub fn detach_with_cursor(&self, session_id: u64) -> Option<u64> {
        let mut inner = self.inner.lock();
        let cursor = inner.delivered.map(|d| {
            inner
                .skip_until
                .get(&session_id)
                .copied()
                .unwrap_or(0)
                .max(d)
        });
        inner.members.remove(&session_id);
        inner.skip_until.remove(&session_id);
        cursor
    }

    /// The `n` of the last delivered event, if the position is known.
    pub fn position(&self) -> Option<u64> {
        self.inner.lock().delivered
    }

    /// The event delivered as `n`, if it is still among the recent ones.
    pub fn delivered_event(&self, n: u64) -> Option<Arc<Dispatch>> {
        let inner = self.inner.lock();
        let oldest = inner.recent.front()?.0;
        let at = n.checked_sub(oldest)? as usize;
        inner
            .recent
            .get(at)
            .filter(|e| e.0 == n)
            .map(|e| Arc::clone(&e.1))
    }

    /// The generation of the log this channel's position refers to.
    pub fn gen(&self) -> u64 {
        self.inner.lock().gen
    }

    /// Sets the generation when the position is not known yet (the first
    /// member attaches).
    pub fn init_gen(&self, gen: u64) {
        let mut inner = self.inner.lock();
        if inner.delivered.is_none() {
            inner.gen = gen;
        }
    }

    /// Starts over at `n` of generation `gen`: the backend lost events, the
    /// members (ended by the caller) are forgotten with everything held.
    pub fn restart_at(&self, n: u64, gen: u64) {
        self.inner.lock().start_over(Some(n), gen);
    }

    /// Fixes the position in the log when it is not known yet.
    pub fn init_position(&self, n: u64) {
        let mut inner = self.inner.lock();
        if inner.delivered.is_none() {
            inner.delivered = Some(n);
            Self::drain_pending(&mut inner);
        }
    }

    /// Removes `session`; returns how many members remain.
    pub fn detach(&self, session_id: u64) -> usize {
        let mut inner = self.inner.lock();
        inner.members.remove(&session_id);
        inner.skip_until.remove(&session_id);
        inner.members.len()
    }

    /// The `n` up to which `session_id` has been handed this channel's
    /// events (its cursor in the log, for parking).
    pub fn cursor(&self, session_id: u64) -> Option<u64> {
        let inner = self.inner.lock();
        let delivered = inner.delivered?;
        Some(
            inner
                .skip_until
                .get(&session_id)
                .copied()
                .unwrap_or(0)
                .max(delivered),
        )
    }

    pub fn member_count(&self) -> usize {
        self.inner.lock().members.len()
    }

    /// Releases a pin taken by [`Hub::pin`] without attaching.
    pub fn unpin(&self) {
        let mut inner = self.inner.lock();
        inner.pins = inner.pins.saturating_sub(1);
    }

    fn is_unused(&self) -> bool {
        let inner = self.inner.lock();
        inner.members.is_empty() && inner.pins == 0
    }

    /// Forgets the position in the log (after the node lost its
    /// subscription with no member left to care).
    pub fn reset_if_empty(&self) -> bool {
        let mut inner = self.inner.lock();
        if inner.members.is_empty() {
            inner.start_over(None, 0);
            true
        } else {
            false
        }
    }
}

/// All local channels of this node, and the global one.
pub struct Hub {
    channels: Mutex<HashMap<Arc<str>, Arc<LocalChannel>>>,
    pub global: Arc<LocalChannel>,
}

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

impl Hub {
    pub fn new() -> Self {
        Self {
            channels: Mutex::new(HashMap::new()),
            global: LocalChannel::new(Arc::from("")),
        }
    }

    /// The local channel, created on first use.
    pub fn channel(&self, name: &str) -> Arc<LocalChannel> {
        let mut channels = self.channels.lock();
        if let Some(c) = channels.get(name) {
            return Arc::clone(c);
        }
        let c = LocalChannel::new(Arc::from(name));
        channels.insert(Arc::clone(&c.name), Arc::clone(&c));
        c
    }

    /// The local channel, pinned until the session attaches (or `unpin`):
    /// [`Hub::take_empty`] leaves it alone meanwhile.
    pub fn pin(&self, name: &str) -> Arc<LocalChannel> {
        let mut channels = self.channels.lock();
        let c = match channels.get(name) {
            Some(c) => Arc::clone(c),
            None => {
                let c = LocalChannel::new(Arc::from(name));
                channels.insert(Arc::clone(&c.name), Arc::clone(&c));
                c
            }
        };
        c.inner.lock().pins += 1;
        c
    }

    pub fn get(&self, name: &str) -> Option<Arc<LocalChannel>> {
        self.channels.lock().get(name).cloned()
    }

    /// Forgets every channel and member and the position in every log
    /// (the backend lost its data and starts over).
    pub fn reset(&self) {
        self.channels.lock().clear();
        self.global.inner.lock().start_over(None, 0);
    }

    /// Channels with no local member: candidates to unsubscribe. They are
    /// forgotten here.
    pub fn take_empty(&self) -> Vec<Arc<str>> {
        let mut channels = self.channels.lock();
        let empty: Vec<Arc<str>> = channels
            .iter()
            .filter(|(_, c)| c.is_unused())
            .map(|(name, _)| Arc::clone(name))
            .collect();
        for name in &empty {
            channels.remove(name);
        }
        empty
    }

    /// Names of the channels the hub holds: with local members, or kept
    /// (pinned, or empty until the subscription task takes them out).
    pub fn names(&self) -> Vec<Arc<str>> {
        self.channels.lock().keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_shared::protocol::Event;

    fn ev(n: u64) -> Arc<Dispatch> {
        Dispatch::from_body(Event::MessageDelete, n.to_string().as_bytes())
    }

    fn held(session: &Session) -> Vec<u64> {
        session
            .held_bodies()
            .iter()
            .map(|b| b.parse().unwrap())
            .collect()
    }

    #[test]
    fn events_are_delivered_in_log_order_once() {
        let c = LocalChannel::new(Arc::from("c"));
        let s = Session::for_test(1);
        c.attach(&s, 0, None).unwrap();
        assert_eq!(c.on_event(1, ev(1), Writes::Direct), Gap::None);
        assert_eq!(
            c.on_event(1, ev(1), Writes::Direct),
            Gap::None,
            "duplicate dropped"
        );
        assert_eq!(
            c.on_event(4, ev(4), Writes::Direct),
            Gap::Missing { from: 2, to: 3 }
        );
        assert_eq!(
            c.on_event(5, ev(5), Writes::Direct),
            Gap::None,
            "one fill at a time"
        );
        assert_eq!(held(&s), [1]);
        c.on_event(3, ev(3), Writes::Direct);
        c.on_event(2, ev(2), Writes::Direct);
        assert_eq!(held(&s), [1, 2, 3, 4, 5]);
        assert_eq!(c.fill_done(), Gap::None);
        assert_eq!(c.cursor(1), Some(5));
    }

    #[test]
    fn a_gap_that_cannot_be_filled_is_skipped_after_reporting() {
        let c = LocalChannel::new(Arc::from("c"));
        let s = Session::for_test(1);
        c.attach(&s, 0, None).unwrap();
        assert_eq!(
            c.on_event(3, ev(3), Writes::Direct),
            Gap::Missing { from: 1, to: 2 }
        );
        c.skip_gap();
        assert_eq!(held(&s), [3]);
    }

    #[test]
    fn a_session_ahead_of_the_hub_skips_what_it_has_seen() {
        let c = LocalChannel::new(Arc::from("c"));
        let a = Session::for_test(1);
        c.attach(&a, 0, None).unwrap();
        c.on_event(1, ev(1), Writes::Direct);
        // b's snapshot already covers events up to 3.
        let b = Session::for_test(2);
        c.attach(&b, 3, Some(&ev(100))).unwrap();
        for n in 2..=4 {
            c.on_event(n, ev(n), Writes::Direct);
        }
        assert_eq!(held(&a), [1, 2, 3, 4]);
        assert_eq!(held(&b), [100, 4]);
        assert_eq!(c.cursor(2), Some(4));
    }

    #[test]
    fn a_session_behind_the_hub_gets_the_difference_first() {
        let c = LocalChannel::new(Arc::from("c"));
        let a = Session::for_test(1);
        c.attach(&a, 0, None).unwrap();
        for n in 1..=5 {
            c.on_event(n, ev(n), Writes::Direct);
        }
        let b = Session::for_test(2);
        c.attach(&b, 3, Some(&ev(100))).unwrap();
        c.on_event(6, ev(6), Writes::Direct);
        assert_eq!(held(&b), [100, 4, 5, 6]);
    }

    #[test]
    fn the_first_member_fixes_the_position_and_early_events_wait() {
        let c = LocalChannel::new(Arc::from("c"));
        c.on_event(7, ev(7), Writes::Direct);
        c.on_event(8, ev(8), Writes::Direct);
        let s = Session::for_test(1);
        c.attach(&s, 7, None).unwrap();
        assert_eq!(held(&s), [8]);
    }

    #[test]
    fn a_session_too_far_behind_is_refused_and_keeps_its_pin() {
        let hub = Hub::new();
        let c = hub.pin("x");
        c.attach(&Session::for_test(1), 0, None).unwrap();
        for n in 1..=(RECENT as u64 + 10) {
            c.on_event(n, ev(n), Writes::Direct);
        }
        let late = Session::for_test(2);
        let c2 = hub.pin("x");
        assert_eq!(c2.attach(&late, 5, None), Err(AttachError::TooFarBehind));
        assert!(late.held_bodies().is_empty(), "nothing half delivered");
        c.detach(1);
        assert!(
            hub.take_empty().is_empty(),
            "still pinned by the late joiner"
        );
        // Caught up from elsewhere (the log), it attaches where the hub is.
        c2.attach(&late, RECENT as u64 + 10, None).unwrap();
    }

    #[test]
    fn pinned_channels_are_not_forgotten() {
        let hub = Hub::new();
        let c = hub.pin("x");
        assert!(hub.take_empty().is_empty());
        c.attach(&Session::for_test(1), 0, None).unwrap();
        assert!(hub.take_empty().is_empty());
        c.detach(1);
        assert_eq!(hub.take_empty().len(), 1);
    }
}
