//! A session: who it is, its sequence counter and replay ring, and the
//! connection it is attached to, if any.
//!
//! The ring is also the outbound queue. Delivering a dispatch numbers it and
//! appends it to the ring; the attached connection's writer copies every
//! entry after `sent` into its socket buffer. A resume only moves `sent`
//! back to the client's `s`. So there is one bounded buffer per session,
//! the slow-consumer rule is `seq - sent > outbound_limit`, and a replay is
//! the ordinary write path. The ring holds `replay` dispatches before the
//! unsent ones and every unsent one up to one past the outbound limit
//! ([`Limits::held`]): a client closed with 4016, or dropped with a backlog,
//! still finds everything after what it read, and `replay` more may arrive
//! before it resumes. What a resume replays is owed, not late: the
//! slow-consumer rule counts only what came after the attach
//! (`seq - max(sent, attach_seq)`), and the ring keeps the owed part on top.
//! A resume more than `replay + outbound_limit + 1` behind is refused, which
//! bounds the ring at twice that.
//!
//! Locking: channel fan-out takes a channel lock and then each member's
//! session lock, never the other way round. Under a session lock only the
//! attached connection's own locks are taken: `inner` and `handoff`
//! (leaves: queueing READY on attach, the rest of a frame cut short), and
//! `io` only with `try_lock` (a direct write), because the writer holds
//! `io` while it takes the session lock to encode what is unsent. Nothing
//! here is held across an `.await`.

use crate::auth::Identity;
use crate::connection::{Conn, DirectWrite};
use crate::metrics::Metrics;
use crate::ring::{Block, Ring};
use crate::wire::Dispatch;
use bytes::BytesMut;
use gateway_shared::protocol::{User, TYPING_COALESCE_MS};
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Per-session limits, copied from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Dispatches held for replay before the unsent ones (`--replay-buffer`).
    pub replay: usize,
    /// Unsent dispatches before a client is a slow consumer.
    pub outbound_limit: usize,
    /// Write from the fan-out when nothing is queued ([`Conn::write_direct`]).
    pub direct_writes: bool,
    /// Token bucket size.
    pub rate_burst: f64,
    /// Tokens added per second.
    pub rate_per_s: f64,
}

impl Limits {
    /// How many dispatches a session holds when `unsent` of them have not
    /// been written, `owed` of those replayed by a resume: `replay` before
    /// them, and the unsent ones up to one past the outbound limit (a slow
    /// consumer's whole backlog) beyond what is owed.
    pub fn held(&self, unsent: u64, owed: u64) -> usize {
        self.replay + unsent.min(self.outbound_limit as u64 + 1 + owed) as usize
    }

    /// The most a resume may replay, and what a session keeps of its
    /// dispatches when it moves to another node.
    pub fn max_held(&self) -> usize {
        self.held(u64::MAX, 0)
    }
}

/// A token bucket: `burst` tokens, refilled continuously.
#[derive(Debug)]
pub struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn full(burst: f64, now: Instant) -> Self {
        Self {
            tokens: burst,
            last: now,
        }
    }

    /// The tokens the bucket holds at `now`.
    fn level(&self, burst: f64, per_s: f64, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        (self.tokens + elapsed * per_s).min(burst)
    }

    /// Whether the bucket has refilled to `burst` by `now`.
    pub fn is_full(&self, burst: f64, per_s: f64, now: Instant) -> bool {
        self.level(burst, per_s, now) >= burst
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, burst: f64, per_s: f64, now: Instant) -> bool {
        self.tokens = self.level(burst, per_s, now);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Who writes a delivered dispatch to the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writes {
    /// The fan-out itself, when direct writes are on and nothing is queued
    /// ([`Conn::write_direct`]); otherwise the connection's writer task.
    Direct,
    /// The connection's writer task: the node is behind (more events wait
    /// to be fanned out), and the writers batch frames and share the work
    /// over the runtime's threads.
    Queued,
}

/// Why a session's channel cannot be taken ([`Session::begin_move`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Unmovable {
    Ended,
    /// Another move (or a take-over) has it.
    Moving,
}

/// Why a connection cannot attach.
#[derive(Debug, PartialEq, Eq)]
pub enum AttachError {
    /// The session ended (closed with 1000, banned, expired).
    Ended,
    /// Dispatches after the client's `s` are no longer held, or `s` is
    /// ahead of what was ever sent.
    Gap,
}

struct State {
    /// Sequence number of the latest dispatch.
    seq: u64,
    /// The latest dispatches, contiguous, the last one numbered `seq`
    /// (so the first is `seq + 1 - ring.len()`: no number is stored).
    ring: Ring,
    /// The connection receiving this session's dispatches.
    conn: Option<Arc<Conn>>,
    /// Highest sequence number handed to `conn`'s writer; while detached,
    /// what the last connection was handed (what came after is unsent).
    sent: u64,
    /// `seq` when the connection attached: what it replays up to there is
    /// owed to it, and does not count towards the slow-consumer rule.
    attach_seq: u64,
    /// The channel the session is in.
    channel: Arc<str>,
    /// When the connection went away, while detached.
    detached_at: Option<Instant>,
    /// Ended sessions take no dispatches and cannot be resumed.
    ended: bool,
    /// A CHANNEL_MOVE (or a park, which never gives it back) is changing
    /// the session's channel: one at a time.
    moving: bool,
    bucket: TokenBucket,
    last_typing: Option<Instant>,
}

impl State {
    /// What the attached connection replays and has not written yet.
    fn owed(&self) -> u64 {
        self.attach_seq.saturating_sub(self.sent)
    }
}

pub struct Session {
    pub id: u64,
    /// The user as dispatched (`{"id","name"}`): the token's identity,
    /// kept once (with `admin` beside it).
    pub user: User,
    pub admin: bool,
    /// Reserved for end-to-end encryption; fixed for the session's life.
    pub enc_key: String,
    limits: Limits,
    metrics: Arc<Metrics>,
    state: Mutex<State>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .field("user", &self.user.id)
            .finish()
    }
}

impl Session {
    pub fn new(
        id: u64,
        identity: Identity,
        enc_key: String,
        channel: Arc<str>,
        limits: Limits,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let now = Instant::now();
        metrics.session_state(None, Some(false));
        Arc::new(Self {
            id,
            user: User {
                id: identity.id,
                name: identity.name,
            },
            admin: identity.admin,
            enc_key,
            limits,
            metrics,
            state: Mutex::new(State {
                seq: 0,
                ring: Ring::default(),
                conn: None,
                sent: 0,
                attach_seq: 0,
                channel,
                detached_at: Some(now),
                ended: false,
                moving: false,
                bucket: TokenBucket::full(limits.rate_burst, now),
                last_typing: None,
            }),
        })
    }

    /// Numbers `dispatch` for this session, keeps it for replay, and writes
    /// it (directly when the connection has nothing queued, else by waking
    /// the writer). A client more than `outbound_limit` behind is detached
    /// and its connection closed with 4016.
    pub fn deliver(&self, dispatch: &Arc<Dispatch>) {
        self.deliver_with(dispatch, Writes::Direct);
    }

    /// [`deliver`](Self::deliver), saying who may write it.
    pub fn deliver_with(&self, dispatch: &Arc<Dispatch>, writes: Writes) {
        self.admit(writes, |ring| ring.push(Arc::clone(dispatch)));
    }

    /// [`deliver`](Self::deliver) for an event of the session's channel,
    /// held in slot `slot` of the channel's log `block` (shared with the
    /// other members).
    pub fn deliver_shared(&self, block: &Arc<Block>, slot: u8, writes: Writes) {
        self.admit(writes, |ring| ring.push_shared(block, slot));
    }

    fn admit(&self, writes: Writes, push: impl FnOnce(&mut Ring)) {
        let mut st = self.state.lock();
        if st.ended {
            return;
        }
        st.seq += 1;
        let seq = st.seq;
        // Room first, then the new entry: pushing first would take the ring
        // one past its limit and double its allocation for good. (The
        // writer trims what it has sent past `replay`, in `commit`.)
        let held = self.limits.held(seq - st.sent, st.owed());
        while st.ring.len() >= held {
            st.ring.pop_front();
        }
        push(&mut st.ring);
        let Some(conn) = &st.conn else { return };
        if seq - st.sent.max(st.attach_seq) > self.limits.outbound_limit as u64 {
            let conn = st.conn.take().expect("checked above");
            st.detached_at = Some(Instant::now());
            drop(st);
            self.metrics.session_state(Some(true), Some(false));
            self.metrics.slow_consumers.inc();
            conn.close_fatal(
                gateway_shared::ErrorCode::SlowConsumer,
                "outbound queue overflowed",
                false,
            );
        } else {
            let direct = self.limits.direct_writes
                && writes == Writes::Direct
                && seq == st.sent + 1
                && st.ring.last().is_some_and(|d| {
                    let written = conn.write_direct(|buf| d.encode(seq, buf));
                    if written != DirectWrite::Refused {
                        self.metrics.dispatch_sent(d, Instant::now());
                    }
                    if written == DirectWrite::Cut {
                        self.metrics.direct_writes_cut.inc();
                    }
                    written != DirectWrite::Refused
                });
            if direct {
                st.sent = seq;
            } else {
                conn.wake();
            }
        }
    }

    /// Attaches `conn`, replaying everything after `from_seq`. `on_attach`
    /// runs under the lock with the session's channel, before any dispatch
    /// can reach `conn` (it queues READY). Returns the connection it
    /// replaces, which the caller closes with 4017.
    pub fn attach(
        &self,
        conn: &Arc<Conn>,
        from_seq: u64,
        on_attach: impl FnOnce(&str),
    ) -> Result<Option<Arc<Conn>>, AttachError> {
        let mut st = self.state.lock();
        if st.ended {
            return Err(AttachError::Ended);
        }
        let first_held = st.seq + 1 - st.ring.len() as u64;
        if from_seq > st.seq
            || from_seq + 1 < first_held
            || st.seq - from_seq > self.limits.max_held() as u64
        {
            return Err(AttachError::Gap);
        }
        on_attach(&st.channel);
        let old = st.conn.replace(Arc::clone(conn));
        let was_live = old.is_some();
        st.sent = from_seq;
        st.attach_seq = st.seq;
        st.detached_at = None;
        drop(st);
        self.metrics.session_state(Some(was_live), Some(true));
        conn.wake();
        Ok(old)
    }

    /// Detaches `conn` if it is still the attached one; the session stays
    /// resumable for the window.
    pub fn detach(&self, conn_id: u64) -> bool {
        let mut st = self.state.lock();
        if st.conn.as_ref().is_some_and(|c| c.id == conn_id) {
            st.conn = None;
            st.detached_at = Some(Instant::now());
            drop(st);
            self.metrics.session_state(Some(true), Some(false));
            true
        } else {
            false
        }
    }

    /// Ends the session: no more dispatches, no resume. Returns the attached
    /// connection (for the caller to close), or `None` if already ended.
    pub fn end(&self) -> Option<Option<Arc<Conn>>> {
        self.end_if(|_| true)
    }

    /// [`end`](Self::end), only while `conn_id` is the attached connection:
    /// a connection that closes with 1000 ends its own session, not one
    /// another connection has resumed since.
    pub fn end_from(&self, conn_id: u64) -> Option<Option<Arc<Conn>>> {
        self.end_if(|conn| conn.is_some_and(|c| c.id == conn_id))
    }

    fn end_if(
        &self,
        attached: impl FnOnce(Option<&Arc<Conn>>) -> bool,
    ) -> Option<Option<Arc<Conn>>> {
        let mut st = self.state.lock();
        if st.ended || !attached(st.conn.as_ref()) {
            return None;
        }
        st.ended = true;
        st.ring.clear();
        let conn = st.conn.take();
        drop(st);
        self.metrics.session_state(Some(conn.is_some()), None);
        Some(conn)
    }

    /// A session taken over from the backend (resume on another node):
    /// `ring` holds its last dispatches, numbered up to `seq`.
    #[allow(clippy::too_many_arguments)]
    pub fn restore(
        id: u64,
        identity: Identity,
        enc_key: String,
        channel: Arc<str>,
        seq: u64,
        ring: Vec<(u64, Arc<Dispatch>)>,
        limits: Limits,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let session = Self::new(id, identity, enc_key, channel, limits, metrics);
        {
            let mut st = session.state.lock();
            st.seq = seq;
            // Keep the contiguous run that ends at `seq` (at most what a
            // session can hold), all of it unsent until a client attaches:
            // catching up from the logs must not push it out.
            let run = ring
                .iter()
                .rev()
                .zip((0..=seq).rev())
                .take(limits.max_held())
                .take_while(|((s, _), want)| s == want)
                .count();
            let skip = ring.len() - run;
            for (_, d) in ring.into_iter().skip(skip) {
                st.ring.push(d);
            }
            st.sent = seq.saturating_sub(run as u64);
        }
        session
    }

    /// Parks the session for another node: no more dispatches here. Returns
    /// the attached connection, the latest sequence number and the held
    /// dispatches, or `None` if it already ended.
    #[allow(clippy::type_complexity)]
    pub fn park(&self) -> Option<(Option<Arc<Conn>>, u64, Vec<(u64, Arc<Dispatch>)>)> {
        let mut st = self.state.lock();
        if st.ended {
            return None;
        }
        st.ended = true;
        let first = st.seq + 1 - st.ring.len() as u64;
        let ring = st
            .ring
            .take()
            .into_iter()
            .enumerate()
            .map(|(i, d)| (first + i as u64, d))
            .collect();
        let conn = st.conn.take();
        let seq = st.seq;
        drop(st);
        self.metrics.session_state(Some(conn.is_some()), None);
        Some((conn, seq, ring))
    }

    pub fn is_ended(&self) -> bool {
        self.state.lock().ended
    }

    /// Takes the session's channel for a move (or a park).
    pub fn begin_move(&self) -> Result<(), Unmovable> {
        let mut st = self.state.lock();
        if st.ended {
            return Err(Unmovable::Ended);
        }
        if st.moving {
            return Err(Unmovable::Moving);
        }
        st.moving = true;
        Ok(())
    }

    /// Gives the channel back after a move.
    pub fn end_move(&self) {
        self.state.lock().moving = false;
    }

    /// Whether the session has been detached for longer than `window`.
    pub fn expired(&self, now: Instant, window: Duration) -> bool {
        let st = self.state.lock();
        !st.ended
            && st
                .detached_at
                .is_some_and(|t| now.saturating_duration_since(t) >= window)
    }

    /// The attached connection, if any.
    pub fn conn(&self) -> Option<Arc<Conn>> {
        self.state.lock().conn.clone()
    }

    pub fn channel(&self) -> Arc<str> {
        Arc::clone(&self.state.lock().channel)
    }

    pub fn set_channel(&self, channel: Arc<str>) {
        self.state.lock().channel = channel;
    }

    /// The latest sequence number.
    pub fn seq(&self) -> u64 {
        self.state.lock().seq
    }

    /// Takes a rate-limit token for one execute.
    pub fn take_rate_token(&self, now: Instant) -> bool {
        let limits = self.limits;
        self.state
            .lock()
            .bucket
            .take(limits.rate_burst, limits.rate_per_s, now)
    }

    /// Whether a START_TYPING from this session should be dispatched now
    /// (at most one per session per 3 s).
    pub fn typing_due(&self, now: Instant) -> bool {
        let mut st = self.state.lock();
        let due = st.last_typing.is_none_or(|t| {
            now.saturating_duration_since(t) >= Duration::from_millis(TYPING_COALESCE_MS)
        });
        if due {
            st.last_typing = Some(now);
        }
        due
    }

    /// Encodes dispatches `conn_id` has not been sent yet into `buf`, up to
    /// about `budget` bytes, without marking them sent: the writer tries
    /// the socket first and then [`commit`](Self::commit)s what it took.
    /// Returns the number of the first one encoded and how many.
    ///
    /// Hot path: frames are built under the lock straight from the shared
    /// bodies, with no clone of the dispatches and no per-frame allocation.
    pub fn encode_unsent(&self, conn_id: u64, buf: &mut BytesMut, budget: usize) -> (u64, usize) {
        let st = self.state.lock();
        if st.conn.as_ref().is_none_or(|c| c.id != conn_id) || st.sent >= st.seq {
            return (0, 0);
        }
        let first = st.seq + 1 - st.ring.len() as u64;
        let start = (st.sent + 1).saturating_sub(first) as usize;
        let start_len = buf.len();
        let mut encoded = 0;
        for (i, dispatch) in st.ring.iter_from(start).enumerate() {
            let i = start + i;
            if buf.len() - start_len >= budget {
                break;
            }
            dispatch.encode(first + i as u64, buf);
            encoded += 1;
        }
        (st.sent + 1, encoded)
    }

    /// Marks `count` dispatches from number `from` as handed to the socket
    /// of `conn_id`. Returns whether more are waiting; nothing changes when
    /// the connection is no longer the attached one or `from` is not the
    /// next unsent number (a resume moved it).
    pub fn commit(&self, conn_id: u64, from: u64, count: usize) -> bool {
        let mut st = self.state.lock();
        if st.conn.as_ref().is_none_or(|c| c.id != conn_id) || st.sent + 1 != from {
            return false;
        }
        let first = st.seq + 1 - st.ring.len() as u64;
        let start = from.saturating_sub(first) as usize;
        let now = Instant::now();
        for dispatch in st.ring.iter_from(start).take(count) {
            self.metrics.dispatch_sent(dispatch, now);
        }
        st.sent += count as u64;
        // What was held for a backlog now written goes back to `replay`.
        let held = self.limits.held(st.seq - st.sent, st.owed());
        while st.ring.len() > held {
            st.ring.pop_front();
        }
        st.sent < st.seq
    }
}

#[cfg(test)]
impl Session {
    /// The bodies held in the ring, oldest first.
    pub(crate) fn held_bodies(&self) -> Vec<String> {
        let st = self.state.lock();
        st.ring
            .iter_from(0)
            .map(|d| String::from_utf8_lossy(d.body()).into_owned())
            .collect()
    }

    /// A session for unit tests.
    pub(crate) fn for_test(id: u64) -> Arc<Self> {
        let identity = Identity {
            id: format!("u{id}"),
            name: "t".into(),
            admin: false,
        };
        let limits = Limits {
            replay: 100,
            outbound_limit: 100,
            direct_writes: false,
            rate_burst: 1.0,
            rate_per_s: 1.0,
        };
        Self::new(
            id,
            identity,
            String::new(),
            Arc::from("c"),
            limits,
            Arc::new(Metrics::new("t")),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_shared::protocol::Event;

    /// A parked session's dispatches come back as the run that ends at its
    /// sequence number, at most a ring of them; older ones past a gap stay
    /// behind (a resume from before the gap is refused, not half replayed).
    #[test]
    fn a_restored_ring_keeps_the_run_that_ends_at_seq() {
        let body = |s: u64| format!("{{\"s\":{s}}}");
        let ring = |list: &[u64]| -> Vec<(u64, Arc<Dispatch>)> {
            list.iter()
                .map(|&s| {
                    (
                        s,
                        Dispatch::from_body(Event::MessageCreate, body(s).as_bytes()),
                    )
                })
                .collect()
        };
        let restored = |seq, list: &[u64], limit: usize| {
            let mut limits = Session::for_test(1).limits;
            // At most `limit` held: `limit - 1` before the unsent ones, and
            // one past an outbound limit of 0.
            limits.replay = limit - 1;
            limits.outbound_limit = 0;
            let identity = Identity {
                id: "u".into(),
                name: "n".into(),
                admin: false,
            };
            let metrics = Arc::new(Metrics::new("t"));
            let session = Session::restore(
                1,
                identity,
                String::new(),
                Arc::from("c"),
                seq,
                ring(list),
                limits,
                metrics,
            );
            session.held_bodies()
        };
        let bodies = |list: &[u64]| list.iter().map(|&s| body(s)).collect::<Vec<_>>();
        assert_eq!(restored(7, &[3, 5, 6, 7], 100), bodies(&[5, 6, 7]));
        assert_eq!(restored(7, &[3, 5, 6, 7], 2), bodies(&[6, 7]));
        assert_eq!(restored(8, &[5, 6, 7], 100), bodies(&[]));
        assert_eq!(restored(7, &[], 100), bodies(&[]));
        assert_eq!(restored(2, &[0, 1, 2], 100), bodies(&[0, 1, 2]));
    }

    /// One move of a session's channel at a time; none once it ended (a
    /// park takes the channel for good).
    #[test]
    fn a_sessions_channel_is_moved_by_one_at_a_time() {
        let session = Session::for_test(1);
        assert_eq!(session.begin_move(), Ok(()));
        assert_eq!(
            session.begin_move(),
            Err(Unmovable::Moving),
            "a move is running"
        );
        session.end_move();
        assert_eq!(session.begin_move(), Ok(()));
        session.end_move();
        session.end();
        assert_eq!(session.begin_move(), Err(Unmovable::Ended), "ended");
    }

    #[test]
    fn token_bucket_allows_a_burst_then_refills() {
        let t0 = Instant::now();
        let mut b = TokenBucket::full(3.0, t0);
        assert!(b.take(3.0, 1.0, t0));
        assert!(b.take(3.0, 1.0, t0));
        assert!(b.take(3.0, 1.0, t0));
        assert!(!b.take(3.0, 1.0, t0));
        assert!(!b.take(3.0, 1.0, t0 + Duration::from_millis(500)));
        assert!(b.take(3.0, 1.0, t0 + Duration::from_millis(1000)));
        // Never more than the burst, however long it waited.
        let later = t0 + Duration::from_secs(100);
        for _ in 0..3 {
            assert!(b.take(3.0, 1.0, later));
        }
        assert!(!b.take(3.0, 1.0, later));
    }
}
