//! One WebSocket connection: two tasks around a shared [`Conn`], and the
//! fan-out writing to its socket directly while nothing is queued.
//!
//! # Implementation flow
//!
//! 1. `serve` shares the socket (a TCP stream is read and written by
//!    readiness through one `Arc`; another stream is split in two halves).
//!    The **reader** only reads frames,
//!    reassembles fragments (refusing anything over 4096 bytes before
//!    buffering it), and runs each message through the [`Handler`]: the
//!    session state machine HELLO → PRESENTED → LIVE. Each message earns at
//!    most one reply (READY, an error, a heartbeat answer, a pong), queued
//!    as a control frame.
//! 2. The **writer** task writes everything the fan-out does not. Woken
//!    through `Conn::wake`, it takes the attached session's unsent
//!    dispatches and the queued control frames, encodes them into one
//!    buffer and writes it with one syscall, holding `io` so that no
//!    direct write (`Conn::write_direct`, from the fan-out while the
//!    connection has nothing queued) comes between.
//! 3. The **supervisor** (the task running `serve`, which also polls the
//!    reader in place) waits for either side to finish, and then detaches
//!    or ends the session.
//! 4. One task per node, [`watch_deadlines`], enforces every connection's
//!    PRESENT deadline and heartbeat timeout ([`Deadlines`]): a timer per
//!    connection cost each one's task about a hundred bytes more.
//!
//! # Backpressure
//!
//! Replies are bounded by holding back the reader, not by closing: before
//! it reads a frame, the reader waits until fewer than `CONTROL_LIMIT`
//! replies are queued or being written. A client that sends a burst of
//! requests is read more slowly (TCP pushes back on its sends) and gets
//! every answer, in order. Only a client that does not read is a slow
//! consumer (4016): more than `outbound_limit` dispatches unsent
//! ([`Session::deliver`]), or a socket that takes no byte for `hb_int`
//! (the writer's stall deadline). While the reader is held back the
//! client's heartbeats wait unread, so the heartbeat timeout leaves the
//! verdict to the stall deadline.
//!
//! Reading a frame is not cancel-safe (a frame half read would be lost), so
//! the reader is raced only against the close signal: the supervisor polls
//! the one reader future in place, and drops it only once the connection
//! is over.

use crate::frame::{self, FrameReader, ReadError};
use crate::node::Node;
use crate::session::Session;
use crate::wire::{self, Envelope, Reject};
use bytes::{Bytes, BytesMut};
use gateway_shared::protocol::{ErrorCode, FunctionCode, MAX_PAYLOAD};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tracing::{debug, Instrument};

type Io = TokioIo<Upgraded>;

/// Control frames (replies, errors, pongs) queued or being written at
/// most: the reader reads the next request only while fewer are unwritten.
const CONTROL_LIMIT: usize = 64;
/// Bytes of dispatches the writer takes per batch, at most.
const WRITE_BATCH: usize = 64 * 1024;
/// And at least, when the socket took less last time.
const MIN_BATCH: usize = 4 * 1024;
/// How long the writer may take to flush its last frames at close.
const CLOSE_FLUSH: Duration = Duration::from_secs(5);
/// After that, how long it has to write the close frame alone, the
/// dispatches still unsent left for a resume.
const CLOSE_LAST: Duration = Duration::from_secs(1);

/// How the connection is to end.
#[derive(Debug, Clone)]
struct CloseRequest {
    /// Error and close frames to write last (empty when the peer is gone).
    frames: Bytes,
    /// Write the unsent dispatches first (drain, protocol errors), or
    /// discard them (slow consumer: they stay in the ring for a resume).
    flush: bool,
    /// The client closed with 1000: the session ends.
    ends_session: bool,
}

struct ConnInner {
    control: VecDeque<Bytes>,
    close: Option<CloseRequest>,
    session: Option<Arc<Session>>,
}

/// What the reader, the writer, the supervisor and the sessions share about
/// one connection.
pub struct Conn {
    pub id: u64,
    /// Wakes the writer.
    wake: Notify,
    /// Wakes the supervisor when a close is requested.
    close_signal: Notify,
    /// Wakes the reader when replies were written or a close is requested.
    room: Notify,
    /// Control frames queued or taken by the writer, not yet written. The
    /// reader waits while there are `CONTROL_LIMIT`.
    unwritten: AtomicUsize,
    /// Set while the reader waits for room: the client's heartbeats may be
    /// waiting unread behind our own replies.
    held_back: AtomicBool,
    /// Set with the close request: the writer checks it without a lock.
    closing: AtomicBool,
    /// Bumped whenever the session changes, so that the writer's copy of
    /// it is refreshed without taking a lock on every wake.
    session_version: AtomicU64,
    /// Milliseconds after `started` of the last heartbeat.
    last_beat_ms: AtomicU64,
    /// Milliseconds after `started` when the request the reader is on (a
    /// PRESENT or an execute, which may wait for the backend) began;
    /// `IDLE` between requests. Frames behind it wait unread meanwhile.
    busy_from_ms: AtomicU64,
    /// Time the reader spent on requests since the last heartbeat (before
    /// PRESENT: since connecting), added to the deadline: a heartbeat
    /// that waited unread behind a slow request was not late.
    grace_ms: AtomicU64,
    presented: AtomicBool,
    started: Instant,
    inner: Mutex<ConnInner>,
    /// Whether the fan-out may write to this connection's socket
    /// (`--direct-writes`): only then is the socket put in `io`, and only
    /// then does the writer take `io` for each batch.
    shares_socket: bool,
    /// Whoever writes to the socket holds this: the writer while it offers
    /// a batch, the fan-out while it writes a dispatch straight to the
    /// socket ([`Conn::write_direct`]). It holds the socket for the latter
    /// (TCP connections with `shares_socket` only; `None` once the
    /// connection is over).
    io: Mutex<Option<Arc<TcpStream>>>,
    /// The writer owes the socket the rest of a frame (its own, or one the
    /// fan-out began, in `handoff`): nobody else writes until it is done.
    owed_pending: AtomicBool,
    /// The rest of a frame the fan-out wrote in part, for the writer.
    handoff: Mutex<Option<Bytes>>,
}

/// `Conn::busy_from_ms` between requests.
const IDLE: u64 = u64::MAX;

/// What became of a dispatch offered to [`Conn::write_direct`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirectWrite {
    /// Written whole.
    Written,
    /// Begun: the socket took part of it and the writer owes it the rest,
    /// before anything else.
    Cut,
    /// Not written: the writer will.
    Refused,
}

impl Conn {
    fn new(id: u64, shares_socket: bool) -> Self {
        Self {
            id,
            shares_socket,
            wake: Notify::new(),
            close_signal: Notify::new(),
            room: Notify::new(),
            unwritten: AtomicUsize::new(0),
            held_back: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            session_version: AtomicU64::new(0),
            last_beat_ms: AtomicU64::new(0),
            busy_from_ms: AtomicU64::new(IDLE),
            grace_ms: AtomicU64::new(0),
            presented: AtomicBool::new(false),
            started: Instant::now(),
            inner: Mutex::new(ConnInner {
                control: VecDeque::new(),
                close: None,
                session: None,
            }),
            io: Mutex::new(None),
            owed_pending: AtomicBool::new(false),
            handoff: Mutex::new(None),
        }
    }

    /// Writes one dispatch frame (built by `encode`) straight to the
    /// socket, from the fan-out, when nothing is queued before it: no
    /// unwritten control frame (a READY goes first), nothing owed, not
    /// closing, and the writer not at the socket. Says whether the frame is
    /// the socket's (all of it written, or the rest handed to the writer)
    /// or left to the writer.
    ///
    /// Hot path: at moderate load a dispatch is one `write` from the
    /// thread that fans it out, with no task woken; the writer task is for
    /// backlogs. The caller holds the session's lock, so frames of the
    /// session leave in their order.
    pub fn write_direct(&self, encode: impl FnOnce(&mut BytesMut)) -> DirectWrite {
        // Cheap refusals first; `closing` is looked at again under the lock,
        // which the close path takes after setting it.
        if self.closing.load(Ordering::Acquire) || self.unwritten.load(Ordering::Acquire) != 0 {
            return DirectWrite::Refused;
        }
        let Some(io) = self.io.try_lock() else {
            return DirectWrite::Refused;
        };
        let Some(socket) = io.as_ref() else {
            return DirectWrite::Refused;
        };
        if self.owed_pending.load(Ordering::Acquire) || self.closing.load(Ordering::Acquire) {
            return DirectWrite::Refused;
        }
        DIRECT.with_borrow_mut(|buf| {
            buf.clear();
            encode(buf);
            // A plain non-blocking `send` on the descriptor rather than
            // tokio's `try_write`: that first reads the socket's readiness
            // word, a cache line of its own that the kernel's TCP work has
            // usually evicted by the next event (6 % of a node's CPU in
            // stalls at 40,000 deliveries/s, docs/BENCHMARKS.md). If the
            // socket is full, the writer (tokio's readiness path) goes on.
            match socket2::SockRef::from(&**socket).send(buf) {
                Ok(n) if n == buf.len() => DirectWrite::Written,
                Ok(n) => {
                    *self.handoff.lock() = Some(Bytes::copy_from_slice(&buf[n..]));
                    self.owed_pending.store(true, Ordering::Release);
                    self.wake();
                    DirectWrite::Cut
                }
                // Full, or broken (the writer finds out): the writer's.
                Err(_) => DirectWrite::Refused,
            }
        })
    }

    /// Wakes the writer (new dispatches or control frames).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Queues a control frame. The queue stays bounded because the reader,
    /// which queues at most one reply per message, waits for room
    /// (`room_for_reply`) before reading the next one. Once a close was
    /// asked for, frames are dropped: nothing follows a close.
    pub fn send(&self, frame: Bytes) {
        let mut inner = self.inner.lock();
        if inner.close.is_some() {
            return;
        }
        inner.control.push_back(frame);
        self.unwritten.fetch_add(1, Ordering::Relaxed);
        drop(inner);
        self.wake();
    }

    /// Waits until one more reply fits, or the connection is closing.
    /// Returns whether it had to wait. Cancel-safe; it holds no lock.
    async fn room_for_reply(&self) -> bool {
        let mut waited = false;
        loop {
            let written = self.room.notified();
            tokio::pin!(written);
            // Registered before the check: a write finishing in between
            // still wakes us.
            written.as_mut().enable();
            if self.unwritten.load(Ordering::Acquire) < CONTROL_LIMIT
                || self.closing.load(Ordering::Acquire)
            {
                self.held_back.store(false, Ordering::Release);
                return waited;
            }
            self.held_back.store(true, Ordering::Release);
            waited = true;
            written.await;
        }
    }

    /// The writer wrote (or dropped) `n` control frames.
    fn replies_written(&self, n: usize) {
        if n > 0 {
            self.unwritten.fetch_sub(n, Ordering::Release);
            self.room.notify_one();
        }
    }

    fn request_close(&self, req: CloseRequest) {
        let mut inner = self.inner.lock();
        if inner.close.is_none() {
            inner.close = Some(req);
            self.closing.store(true, Ordering::Release);
        }
        drop(inner);
        self.wake();
        self.close_signal.notify_one();
        self.room.notify_one();
    }

    /// Sends a fatal error (150 with `d: true`) and closes with its code.
    pub fn close_fatal(&self, code: ErrorCode, message: &'static str, flush: bool) {
        self.close_rejected(&Reject::new(code, message), None, None, flush);
    }

    /// Sends the fatal `reject` (echoing the request's `s` and `t`) and
    /// closes with its code.
    pub fn close_rejected(&self, reject: &Reject, s: Option<i64>, t: Option<&str>, flush: bool) {
        let mut frames = BytesMut::new();
        frames.extend_from_slice(&wire::error_frame(reject, s, t));
        frames.extend_from_slice(&wire::close_frame(reject.code.code(), &reject.message));
        self.request_close(CloseRequest {
            frames: frames.freeze(),
            flush,
            ends_session: false,
        });
    }

    /// Closes with a plain close frame (1012 on drain, the echo of the
    /// client's close).
    pub fn close_with(&self, code: u16, reason: &str, ends_session: bool) {
        self.request_close(CloseRequest {
            frames: wire::close_frame(code, reason),
            flush: true,
            ends_session,
        });
    }

    /// The close asked for goes out without the dispatches still unsent.
    fn stop_flushing(&self) {
        if let Some(close) = self.inner.lock().close.as_mut() {
            close.flush = false;
        }
        self.wake();
    }

    /// The peer is gone: stop without writing anything.
    fn close_quiet(&self) {
        self.request_close(CloseRequest {
            frames: Bytes::new(),
            flush: false,
            ends_session: false,
        });
    }

    fn close_request(&self) -> Option<CloseRequest> {
        self.inner.lock().close.clone()
    }

    pub fn set_session(&self, session: Arc<Session>) {
        self.inner.lock().session = Some(session);
        self.session_version.fetch_add(1, Ordering::Release);
        self.presented.store(true, Ordering::Release);
    }

    /// Undoes [`set_session`](Self::set_session) when the session could
    /// not be attached: the connection is not presented.
    pub fn clear_session(&self) {
        self.inner.lock().session = None;
        self.session_version.fetch_add(1, Ordering::Release);
        self.presented.store(false, Ordering::Release);
    }

    fn session(&self) -> Option<Arc<Session>> {
        self.inner.lock().session.clone()
    }

    /// Closes the connection if its deadline has passed (see
    /// [`watch_deadlines`]).
    fn expire(&self, now: Instant, hb_int: Duration, metrics: &crate::metrics::Metrics) {
        // Busy first: a request that ends meanwhile adds its time to the
        // grace before it says so (`end_request`).
        let busy = self.busy_from_ms.load(Ordering::Acquire) != IDLE;
        let (deadline, code) = self.deadline(hb_int);
        if deadline > now || self.closing.load(Ordering::Acquire) {
            return;
        }
        if busy && (code == ErrorCode::SessionTimedOut || now < self.started + hb_int * 2) {
            // The reader is on a request (bounded by the backend's
            // timeout): we are slow, not the client. Its time is added to
            // the deadline when it ends. Before PRESENT, never past twice
            // the PRESENT deadline: PRESENTs are not rate limited.
            return;
        }
        if code == ErrorCode::SessionTimedOut && self.held_back.load(Ordering::Acquire) {
            // We stopped reading, not the client: its heartbeat may be
            // waiting unread behind replies the writer has yet to write.
            // The writer's stall deadline ends a connection whose client
            // does not read.
            self.beat();
            return;
        }
        let m = if code == ErrorCode::NotPresented {
            "no PRESENT in time"
        } else {
            "heartbeat missed"
        };
        metrics.error_sent(code);
        self.close_fatal(code, m, false);
    }

    fn beat(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.last_beat_ms.store(ms, Ordering::Relaxed);
        if self.presented.load(Ordering::Acquire) {
            self.grace_ms.store(0, Ordering::Relaxed);
        }
    }

    /// The reader begins a request that may wait for the backend.
    fn begin_request(&self) {
        let ms = self.started.elapsed().as_millis() as u64;
        self.busy_from_ms.store(ms, Ordering::Release);
    }

    /// The request ended: its time is added to the deadline.
    fn end_request(&self) {
        let from = self.busy_from_ms.load(Ordering::Acquire);
        if from != IDLE {
            let ms = self.started.elapsed().as_millis() as u64;
            self.grace_ms
                .fetch_add(ms.saturating_sub(from), Ordering::Relaxed);
        }
        // After the grace: the watcher that sees it idle sees the grace.
        self.busy_from_ms.store(IDLE, Ordering::Release);
    }

    /// When the connection times out: `hb_int` after connecting without a
    /// PRESENT, 1.5 × `hb_int` after the last heartbeat once presented;
    /// later by the time the reader spent on requests meanwhile.
    fn deadline(&self, hb_int: Duration) -> (Instant, ErrorCode) {
        let grace = Duration::from_millis(self.grace_ms.load(Ordering::Relaxed));
        if self.presented.load(Ordering::Acquire) {
            let last = Duration::from_millis(self.last_beat_ms.load(Ordering::Relaxed));
            (
                self.started + last + hb_int * 3 / 2 + grace,
                ErrorCode::SessionTimedOut,
            )
        } else {
            // At most twice the PRESENT deadline, however many PRESENTs
            // waited for the backend.
            (
                self.started + hb_int + grace.min(hb_int),
                ErrorCode::NotPresented,
            )
        }
    }
}

/// Serves one upgraded WebSocket until it closes.
///
/// Not an `async fn`: the stream is unwrapped before the future is built,
/// so the task holds only the future of [`serve_inner`] for the stream
/// found (an `async fn` kept room for both streams, the match's temporaries
/// and the span beside it, about 250 bytes more per connection).
pub fn serve(node: Arc<Node>, io: Io) -> impl std::future::Future<Output = ()> {
    use futures_util::future::Either;
    let conn = Arc::new(Conn::new(node.next_conn_id(), node.config.direct_writes));
    // At debug level only: a live span costs each connection about half a
    // kilobyte (the subscriber's record of it and its formatted fields)
    // and an enter and exit on every poll. The info-level lines of a
    // session carry its id and user themselves.
    let span = tracing::debug_span!("conn", node = %node.node_id, conn = conn.id, session = tracing::field::Empty, user = tracing::field::Empty);
    // Hot path: back to the TCP stream itself, shared by reader, writer
    // and fan-out, which need no lock between them (tokio::io::split takes
    // one on every read and write) and only `&TcpStream` each. Bytes hyper
    // read past the handshake go first.
    match io.into_inner().downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => {
            let stream = Arc::new(parts.io.into_inner());
            let read = SharedStream(Arc::clone(&stream));
            let reader = FrameReader::with_buffered(read, MAX_PAYLOAD, &parts.read_buf);
            // `read_buf` is a view into hyper's whole read buffer (8 KiB):
            // kept in this scope, it would stay allocated for the life of
            // the connection.
            drop(parts.read_buf);
            if conn.shares_socket {
                *conn.io.lock() = Some(Arc::clone(&stream));
            }
            Either::Left(serve_inner(node, conn, reader, SharedStream(stream)).instrument(span))
        }
        Err(upgraded) => {
            let (read, write) = tokio::io::split(TokioIo::new(upgraded));
            let reader = FrameReader::new(read, MAX_PAYLOAD);
            Either::Right(serve_inner(node, conn, reader, write).instrument(span))
        }
    }
}

/// Serves one connection over any byte stream already past the WebSocket
/// handshake (an in-memory pipe, for the fuzz targets and tests): the same
/// path as [`serve`] from the first frame on.
pub async fn serve_stream<R, W>(node: Arc<Node>, read: R, write: W)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let conn = Arc::new(Conn::new(node.next_conn_id(), false));
    serve_inner(node, conn, FrameReader::new(read, MAX_PAYLOAD), write).await
}

async fn serve_inner<R, W>(node: Arc<Node>, conn: Arc<Conn>, ws: FrameReader<R>, write: W)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    node.metrics.connections.inc();
    // We answer pings and closes ourselves, as control frames through the
    // writer.
    conn.beat();
    conn.send(node.hello_frame.clone());

    let hb_int = node.config.hb_int();
    // The writer logs nothing: no span to enter on each of its many polls.
    let writer = tokio::spawn(write_loop(Arc::clone(&conn), write, hb_int));
    // The reader runs inside this task, not beside it: one task fewer per
    // connection. It is polled in place until it ends or a close is asked
    // for (never dropped half-way through a frame, except when the
    // connection is over); the node's watcher enforces its deadlines.
    {
        let reader = read_loop(Handler::new(Arc::clone(&node), Arc::clone(&conn)), ws);
        let _watched = node.deadlines.watch(&conn);
        tokio::select! {
            biased;
            _ = reader => {}
            _ = conn.close_signal.notified() => {}
        }
    }
    // The reader ended on its own without asking to close: the peer is gone.
    conn.close_quiet();
    // Boxed: only a closing connection needs room for these timers.
    if let Some(WriterEnd::Stalled) = Box::pin(writer_end(&conn, writer)).await {
        node.metrics.slow_consumers.inc();
        debug!("socket took nothing for hb_int; closed as a slow consumer");
    }

    if let Some(session) = conn.session() {
        let ends = conn.close_request().is_some_and(|c| c.ends_session);
        if ends {
            // Boxed: the backend's future is large and would otherwise size
            // this task (one per connection) for its whole life.
            Box::pin(node.end_session_from(&session, conn.id)).await;
        } else if session.detach(conn.id) {
            debug!(session = session.id, "detached; resumable");
        }
    }
    // The fan-out writes no more to this socket.
    *conn.io.lock() = None;
    node.metrics.connections.dec();
}

/// Waits for the writer to write its last frames; `None` if it had to be
/// stopped.
async fn writer_end(
    conn: &Conn,
    mut writer: tokio::task::JoinHandle<WriterEnd>,
) -> Option<WriterEnd> {
    if let Ok(ended) = tokio::time::timeout(CLOSE_FLUSH, &mut writer).await {
        return ended.ok();
    }
    // A reader too slow for the backlog still gets the close frame (1012
    // on a drain: reconnect at once), not a cut connection; what is unsent
    // stays held for its resume.
    conn.stop_flushing();
    match tokio::time::timeout(CLOSE_LAST, &mut writer).await {
        Ok(ended) => ended.ok(),
        Err(_) => {
            writer.abort();
            None
        }
    }
}

/// Shards of [`Deadlines`]: connections come and go on every worker thread.
const DEADLINE_SHARDS: usize = 16;

/// Every connection of a node whose deadline is watched, for
/// [`watch_deadlines`]: slots in a few vectors, about 8 bytes a
/// connection, instead of a timer in each connection's task.
#[derive(Default)]
pub struct Deadlines {
    shards: [Mutex<Slots>; DEADLINE_SHARDS],
}

#[derive(Default)]
struct Slots {
    conns: Vec<Option<Arc<Conn>>>,
    free: Vec<u32>,
}

/// A connection's slot in [`Deadlines`], given back when dropped.
#[must_use]
pub struct Watched<'a> {
    shard: &'a Mutex<Slots>,
    index: u32,
}

impl Deadlines {
    /// Watches `conn`'s deadline until the guard is dropped.
    pub fn watch(&self, conn: &Arc<Conn>) -> Watched<'_> {
        let shard = &self.shards[conn.id as usize % DEADLINE_SHARDS];
        let mut slots = shard.lock();
        let index = match slots.free.pop() {
            Some(index) => {
                slots.conns[index as usize] = Some(Arc::clone(conn));
                index
            }
            None => {
                slots.conns.push(Some(Arc::clone(conn)));
                (slots.conns.len() - 1) as u32
            }
        };
        Watched { shard, index }
    }

    /// Connections watched now.
    #[cfg(test)]
    fn len(&self) -> usize {
        let shards = self.shards.iter().map(|s| {
            let slots = s.lock();
            slots.conns.len() - slots.free.len()
        });
        shards.sum()
    }

    /// Closes every watched connection whose deadline has passed.
    fn expire(&self, now: Instant, hb_int: Duration, metrics: &crate::metrics::Metrics) {
        let mut due = Vec::new();
        for shard in &self.shards {
            // Collected under the lock, closed after it: a close takes the
            // connection's own locks.
            due.extend(
                shard
                    .lock()
                    .conns
                    .iter()
                    .flatten()
                    .filter(|conn| conn.deadline(hb_int).0 <= now)
                    .cloned(),
            );
            for conn in due.drain(..) {
                conn.expire(now, hb_int, metrics);
            }
        }
    }
}

impl Drop for Watched<'_> {
    fn drop(&mut self) {
        let mut slots = self.shard.lock();
        slots.conns[self.index as usize] = None;
        slots.free.push(self.index);
    }
}

/// How late a deadline may be met, at most: the watcher's period.
fn deadline_tick(hb_int: Duration) -> Duration {
    (hb_int / 10).min(Duration::from_secs(1))
}

/// The node's deadline watcher: every [`deadline_tick`], closes the
/// connections past their PRESENT deadline (4003) or heartbeat timeout
/// (4009). A deadline is never met early, and at most a tick late. Ends
/// with the node.
pub async fn watch_deadlines(node: std::sync::Weak<Node>) {
    let Some(hb_int) = node.upgrade().map(|n| n.config.hb_int()) else {
        return;
    };
    let mut ticks = tokio::time::interval(deadline_tick(hb_int));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(node) = node.upgrade() else {
            return;
        };
        node.deadlines.expire(Instant::now(), hb_int, &node.metrics);
    }
}

/// How the writer ended.
#[derive(Debug, PartialEq, Eq)]
enum WriterEnd {
    /// Closed as asked, or the peer went away.
    Closed,
    /// The socket took nothing for the stall deadline: a slow consumer.
    Stalled,
}

/// Why a write failed.
enum WriteError {
    Gone,
    Stalled,
}

/// Writes all of `buf`, failing when the socket takes nothing for `stall`.
///
/// Hot path: the deadline costs a clock read per write; its timer is only
/// registered when a write has to wait.
async fn write_or_stall<W: AsyncWrite + Unpin>(
    io: &mut W,
    mut buf: &[u8],
    stall: Duration,
) -> Result<(), WriteError> {
    while !buf.is_empty() {
        match tokio::time::timeout(stall, io.write(buf)).await {
            Err(_) => return Err(WriteError::Stalled),
            Ok(Ok(0) | Err(_)) => return Err(WriteError::Gone),
            Ok(Ok(n)) => buf = &buf[n..],
        }
    }
    Ok(())
}

thread_local! {
    /// Where a writer builds its batch. The batch is offered to the socket
    /// before the task yields, so one buffer per runtime thread serves every
    /// connection on it; a connection keeps only what its socket did not
    /// take (see [`offer`]).
    static BATCH: RefCell<BytesMut> = RefCell::new(BytesMut::new());
    /// Where the fan-out builds a frame it writes straight to a socket.
    static DIRECT: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

/// A TCP connection shared by its reader, its writer task and the fan-out
/// ([`Conn::write_direct`]), which each only need `&TcpStream`: the
/// reader waits on its read readiness, the writer on its write readiness
/// (tokio keeps a waker for each). One `Arc` for all three, so that the
/// fan-out reaches the descriptor through one allocation, not two (an
/// `Arc` of tokio's write half holds another `Arc` of the stream): a cache
/// miss less per direct write.
struct SharedStream(Arc<TcpStream>);

impl AsyncRead for SharedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let stream: &TcpStream = &self.0;
        loop {
            std::task::ready!(stream.poll_read_ready(cx))?;
            match stream.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for SharedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let stream: &TcpStream = &self.0;
        loop {
            std::task::ready!(stream.poll_write_ready(cx))?;
            match stream.try_write(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                other => return Poll::Ready(other),
            }
        }
    }

    fn poll_flush(
        self: Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Poll::Ready(socket2::SockRef::from(&*self.0).shutdown(std::net::Shutdown::Write))
    }
}

/// What one offer to the socket did.
struct Offered {
    /// Control frames it took out of the queue (written or owed).
    replies: usize,
    /// Dispatches are still waiting after this batch.
    more: bool,
}

/// The byte after the frame that starts at `at` (a server frame: FIN,
/// unmasked, as [`wire::put_frame_header`] writes it).
fn frame_end(buf: &[u8], at: usize) -> usize {
    let (head, len) = match buf[at + 1] & 0x7f {
        126 => (4, u16::from_be_bytes([buf[at + 2], buf[at + 3]]) as usize),
        127 => {
            let mut len = [0; 8];
            len.copy_from_slice(&buf[at + 2..at + 10]);
            (10, u64::from_be_bytes(len) as usize)
        }
        n => (2, n as usize),
    };
    at + head + len
}

/// Builds one batch (the session's unsent dispatches, up to `*budget`
/// bytes, behind the queued control frames) in this thread's [`BATCH`] and
/// offers it to the socket with one non-blocking write.
///
/// Only frames the socket took are marked sent. The rest of a frame it took
/// in part, or the first frame when it took nothing, goes to `owed` (to be
/// written before anything else); every other dispatch stays unsent in the
/// session's ring, where it costs a pointer, and is encoded again next time.
/// So a connection whose client reads slowly holds at most a frame and its
/// replies, not a batch. `*budget` follows what the socket takes.
///
/// Hot path: no allocation, and no copy when the socket takes everything.
#[allow(clippy::too_many_arguments)]
fn offer<W: AsyncWrite + Unpin>(
    cx: &mut std::task::Context<'_>,
    io: &mut W,
    conn: &Conn,
    session: Option<&Session>,
    discard: bool,
    budget: &mut usize,
    owed: &mut BytesMut,
) -> Result<Offered, WriteError> {
    // Shut out the fan-out's direct writes while this batch is offered.
    let _io = conn.shares_socket.then(|| conn.io.lock());
    // The rest of a frame the fan-out began goes before anything else. Here
    // `owed` is empty, so a pending debt can only be such a frame: the
    // handoff's lock is taken only then, not per batch.
    if conn.owed_pending.load(Ordering::Acquire) {
        if let Some(rest) = conn.handoff.lock().take() {
            owed.extend_from_slice(&rest);
            return Ok(Offered {
                replies: 0,
                more: true,
            });
        }
    }
    BATCH.with_borrow_mut(|buf| {
        buf.clear();
        // Dispatches are taken before control frames: a READY queued before
        // its session attached is then always in this batch too, and it
        // goes first.
        let (from, encoded) = match session {
            Some(session) if !discard => session.encode_unsent(conn.id, buf, *budget),
            _ => (0, 0),
        };
        // Taken whole, so that an idle connection holds no queue (a reply
        // now and then allocates one for itself).
        let control = std::mem::take(&mut conn.inner.lock().control);
        let replies = control.len();
        let mut control_len = 0;
        if !discard {
            for frame in &control {
                buf.extend_from_slice(frame);
                control_len += frame.len();
            }
        }
        drop(control);
        if control_len > 0 {
            buf.rotate_right(control_len);
        }
        if buf.is_empty() {
            return Ok(Offered {
                replies,
                more: false,
            });
        }
        let took = match Pin::new(&mut *io).poll_write(cx, buf) {
            Poll::Ready(Ok(0) | Err(_)) => return Err(WriteError::Gone),
            Poll::Ready(Ok(n)) => n,
            Poll::Pending => 0,
        };
        // Keep whole frames: up to the end of the one the socket stopped in
        // (at least the control frames, and one frame when it took nothing,
        // so that the stall deadline applies to the wait for it).
        let must = took.max(control_len).max(1);
        let mut cut = control_len;
        let mut committed = 0;
        while cut < must && cut < buf.len() {
            cut = frame_end(buf, cut);
            committed += 1;
        }
        owed.extend_from_slice(&buf[took..cut]);
        if !owed.is_empty() {
            conn.owed_pending.store(true, Ordering::Release);
        }
        if took < buf.len() {
            *budget = took.clamp(MIN_BATCH, WRITE_BATCH);
        } else {
            *budget = (*budget * 2).min(WRITE_BATCH);
        }
        let more = match session {
            Some(session) if encoded > 0 => session.commit(conn.id, from, committed),
            _ => false,
        };
        Ok(Offered { replies, more })
    })
}

async fn write_loop<W: AsyncWrite + Unpin>(
    conn: Arc<Conn>,
    mut io: W,
    stall: Duration,
) -> WriterEnd {
    // Bytes owed to the socket (see `offer`); empty, holding no memory,
    // unless the client reads slowly.
    let mut owed = BytesMut::new();
    let mut owed_replies = 0;
    let mut budget = WRITE_BATCH;
    // Kept here so each wake costs no lock for it; refreshed when the
    // connection's session changes (a resume that fell back to a new one).
    let mut session: Option<Arc<Session>> = None;
    let mut version = 0;
    loop {
        conn.wake.notified().await;
        loop {
            // Whatever comes next, a frame begun is finished first.
            if !owed.is_empty() {
                // Boxed: its stall timer would otherwise size every
                // writer's task, though only a client that reads slowly
                // ever waits here.
                match Box::pin(write_or_stall(&mut io, &owed, stall)).await {
                    Ok(()) => {}
                    Err(WriteError::Gone) => {
                        conn.close_quiet();
                        return WriterEnd::Closed;
                    }
                    Err(WriteError::Stalled) => {
                        // Nothing more can be written: a frame may be cut.
                        conn.close_fatal(ErrorCode::SlowConsumer, "socket not writable", false);
                        return WriterEnd::Stalled;
                    }
                }
                owed = BytesMut::new();
                conn.owed_pending.store(false, Ordering::Release);
                conn.replies_written(std::mem::take(&mut owed_replies));
            }
            let close = if conn.closing.load(Ordering::Acquire) {
                conn.close_request()
            } else {
                None
            };
            let discard = close.as_ref().is_some_and(|c| !c.flush);
            let current = conn.session_version.load(Ordering::Acquire);
            if current != version {
                version = current;
                session = conn.session();
            }
            let offered = std::future::poll_fn(|cx| {
                Poll::Ready(offer(
                    cx,
                    &mut io,
                    &conn,
                    session.as_deref(),
                    discard,
                    &mut budget,
                    &mut owed,
                ))
            })
            .await;
            let offered = match offered {
                Ok(offered) => offered,
                Err(_) => {
                    conn.close_quiet();
                    return WriterEnd::Closed;
                }
            };
            if !owed.is_empty() {
                // Replies count as written once they are.
                owed_replies = offered.replies;
                continue;
            }
            // Written (or dropped): the reader may take the next requests.
            conn.replies_written(offered.replies);
            if offered.more {
                continue;
            }
            if let Some(close) = close {
                // A direct write that saw no close yet finishes first; any
                // later one sees `closing`.
                drop(conn.io.lock());
                if !close.frames.is_empty() {
                    let _ = io.write_all(&close.frames).await;
                }
                let _ = io.shutdown().await;
                return WriterEnd::Closed;
            }
            break;
        }
    }
}

/// A frame the reader got, reduced to what the handler needs.
enum Incoming {
    Message(BytesMut),
    Ping(Bytes),
    Close(Option<u16>),
}

fn too_large() -> Reject {
    Reject::new(ErrorCode::PayloadTooLarge, "message over 4096 bytes")
}

fn decode(m: &'static str) -> Reject {
    Reject::new(ErrorCode::DecodeError, m)
}

/// The next complete message (fragments reassembled, never past the
/// limit), ping or close. `Ok(None)`: a frame that needs no answer.
async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
    partial: &mut Option<(u8, BytesMut)>,
) -> Result<Option<Incoming>, Reject> {
    let room = MAX_PAYLOAD - partial.as_ref().map_or(0, |(_, buf)| buf.len());
    let frame = match reader.next_within(room).await {
        Ok(frame) => frame,
        Err(ReadError::TooLarge) => return Err(too_large()),
        Err(ReadError::Closed) => return Ok(Some(Incoming::Close(None))),
        Err(ReadError::Protocol(m)) => return Err(decode(m)),
    };
    let payload = frame.payload;
    match frame.opcode {
        frame::OP_TEXT | frame::OP_BINARY if partial.is_none() => {
            if frame.fin {
                return complete(frame.opcode, payload).map(Some);
            }
            *partial = Some((frame.opcode, payload));
            Ok(None)
        }
        frame::OP_CONTINUATION => {
            let Some((_, buf)) = partial.as_mut() else {
                return Err(decode("continuation without a start"));
            };
            // The reader refused a fragment past the room left (`room`).
            debug_assert!(buf.len() + payload.len() <= MAX_PAYLOAD);
            buf.extend_from_slice(&payload);
            if !frame.fin {
                return Ok(None);
            }
            let (opcode, buf) = partial.take().expect("checked above");
            complete(opcode, buf).map(Some)
        }
        frame::OP_TEXT | frame::OP_BINARY => {
            Err(decode("new message before the previous one ended"))
        }
        frame::OP_CLOSE => {
            let code = (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
            Ok(Some(Incoming::Close(code)))
        }
        frame::OP_PING => Ok(Some(Incoming::Ping(payload.freeze()))),
        _ => Ok(None),
    }
}

/// A whole message: text only, valid UTF-8.
fn complete(opcode: u8, buf: BytesMut) -> Result<Incoming, Reject> {
    if opcode == frame::OP_BINARY {
        return Err(decode("binary frames are not accepted"));
    }
    if std::str::from_utf8(&buf).is_err() {
        return Err(decode("text is not valid UTF-8"));
    }
    Ok(Incoming::Message(buf))
}

async fn read_loop<R: AsyncRead + Unpin>(mut handler: Handler, mut ws: FrameReader<R>) {
    let mut partial = None;
    loop {
        // The next frame is read only once its reply has room: a client
        // that sends faster than it reads is read more slowly.
        if handler.conn.room_for_reply().await {
            handler.node.metrics.reads_held_back.inc();
        }
        match read_frame(&mut ws, &mut partial).await {
            Ok(None) => {}
            Ok(Some(Incoming::Message(mut buf))) => {
                // Boxed: the decoded message held across its handling
                // would size every connection's task for its whole life.
                if Box::pin(handler.handle(&mut buf)).await.is_break() {
                    return;
                }
            }
            Ok(Some(Incoming::Ping(payload))) => {
                handler.conn.send(wire::frame(wire::OP_PONG, &payload));
            }
            Ok(Some(Incoming::Close(code))) => {
                // Echo the close (RFC 6455 5.5.1); 1000 ends the session.
                let echo = code.filter(|c| matches!(c, 1000..=1003 | 1007..=1014 | 3000..=4999));
                handler
                    .conn
                    .close_with(echo.unwrap_or(1000), "", code == Some(1000));
                return;
            }
            Err(reject) => {
                handler.node.metrics.frame_received(None);
                handler.fatal(&reject, None, None);
                return;
            }
        }
    }
}

use std::ops::ControlFlow;

/// The session state machine of one connection: what a client message does.
pub struct Handler {
    pub node: Arc<Node>,
    pub conn: Arc<Conn>,
    session: Option<Arc<Session>>,
}

impl Handler {
    fn new(node: Arc<Node>, conn: Arc<Conn>) -> Self {
        Self {
            node,
            conn,
            session: None,
        }
    }

    fn fatal(&self, reject: &Reject, s: Option<i64>, t: Option<&str>) {
        self.node.metrics.error_sent(reject.code);
        self.conn.close_rejected(reject, s, t, true);
    }

    /// Sends `reject`; a fatal one also closes the connection.
    fn reply_error(&self, reject: &Reject, s: Option<i64>, t: Option<&str>) -> ControlFlow<()> {
        if reject.code.is_fatal() {
            self.fatal(reject, s, t);
            ControlFlow::Break(())
        } else {
            self.node.metrics.error_sent(reject.code);
            self.conn.send(wire::error_frame(reject, s, t));
            ControlFlow::Continue(())
        }
    }

    async fn handle(&mut self, buf: &mut [u8]) -> ControlFlow<()> {
        let Ok(value) = simd_json::to_borrowed_value(buf) else {
            self.node.metrics.frame_received(None);
            return self.reply_error(
                &Reject::new(ErrorCode::DecodeError, "payload is not valid JSON"),
                None,
                None,
            );
        };
        let env = match wire::decode_envelope(&value) {
            Ok(env) => env,
            Err(reject) => {
                self.node.metrics.frame_received(None);
                return self.reply_error(&reject, None, None);
            }
        };
        self.node.metrics.frame_received(Some(env.f));
        match env.f {
            FunctionCode::Heartbeat => {
                self.conn.beat();
                self.conn.send(wire::heartbeat_frame());
                ControlFlow::Continue(())
            }
            // Boxed: PRESENT and executes await the backend, whose futures
            // are large; unboxed they would size every idle reader task.
            FunctionCode::Present => {
                self.conn.begin_request();
                let presented = Box::pin(self.present(&env)).await;
                self.conn.end_request();
                match presented {
                    Ok(()) => ControlFlow::Continue(()),
                    Err(reject) => self.reply_error(&reject, None, None),
                }
            }
            FunctionCode::Dispatch => {
                self.conn.begin_request();
                let flow = self.execute(&env).await;
                self.conn.end_request();
                flow
            }
            _ => self.reply_error(
                &Reject::new(ErrorCode::UnknownFunction, "unknown function code"),
                None,
                None,
            ),
        }
    }

    async fn present(&mut self, env: &Envelope<'_>) -> Result<(), Reject> {
        if self.session.is_some() {
            return Err(Reject::new(
                ErrorCode::AlreadyPresented,
                "already presented",
            ));
        }
        let request = crate::node::PresentRequest::decode(env.cnf)?;
        let session = self.node.present(&self.conn, request).await?;
        let span = tracing::Span::current();
        span.record("session", session.id);
        span.record("user", session.user.id.as_str());
        self.session = Some(session);
        Ok(())
    }

    async fn execute(&mut self, env: &Envelope<'_>) -> ControlFlow<()> {
        let Some(session) = self.session.clone() else {
            return self.reply_error(
                &Reject::new(ErrorCode::NotPresented, "PRESENT (110) first"),
                env.s,
                env.t,
            );
        };
        if !session.take_rate_token(Instant::now()) {
            return self.reply_error(
                &Reject::new(ErrorCode::RateLimited, "rate limited; request dropped"),
                env.s,
                env.t,
            );
        }
        match Box::pin(crate::events::execute(&self.node, &session, env)).await {
            Ok(()) => ControlFlow::Continue(()),
            Err(reject) => self.reply_error(&reject, env.s, env.t),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Dispatch;
    use gateway_shared::protocol::Event;
    use tokio::io::AsyncReadExt;

    /// Splits whole server frames off the front of `buf`.
    fn take_frames(buf: &mut Vec<u8>, out: &mut Vec<serde_json::Value>) {
        while buf.len() >= 2 {
            assert_eq!(buf[0], 0x81, "a FIN text frame starts here");
            let end = match buf[1] {
                126 if buf.len() < 4 => return,
                _ => frame_end(buf, 0),
            };
            if buf.len() < end {
                return;
            }
            let head = if buf[1] == 126 { 4 } else { 2 };
            out.push(serde_json::from_slice(&buf[head..end]).expect("a frame holds JSON"));
            buf.drain(..end);
        }
    }

    /// A connection holds two tasks for its whole life, and tokio
    /// allocates a task as its future plus about 104 bytes, in 128-byte
    /// lines: the connection's task fits in six lines (768 bytes) and the
    /// writer's in three (384). Something held across an await that the
    /// futures did not hold before grows every idle connection.
    #[test]
    fn a_connection_tasks_stay_within_their_lines() {
        fn future_of<A, B, C, F: std::future::Future>(_: impl Fn(A, B, C) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        let connection = future_of(crate::server::serve_upgraded);
        let writer = future_of(write_loop::<SharedStream>);
        assert!(
            connection <= 768 - 104,
            "the connection's future is {connection} bytes"
        );
        assert!(writer <= 384 - 104, "the writer's future is {writer} bytes");
    }

    fn close_code(conn: &Conn) -> Option<u16> {
        let frames = conn.close_request()?.frames;
        // The close frame comes last: 0x88, its length, then the code.
        let at = frames.windows(2).rposition(|w| w[0] == 0x88)?;
        Some(u16::from_be_bytes([frames[at + 2], frames[at + 3]]))
    }

    /// A slow consumer (4016) resumes with its whole backlog, and what the
    /// resume replays does not count towards the outbound limit: only
    /// what comes after the attach does. A resume further behind than a
    /// session can hold is refused. (Replay buffer and outbound limit 100.)
    #[test]
    fn a_slow_consumer_resumes_with_its_backlog_owed_not_late() {
        use gateway_shared::protocol::Event;
        let session = Session::for_test(1);
        let deliver = |n: usize| {
            for i in 0..n {
                session.deliver(&crate::wire::Dispatch::from_body(
                    Event::MessageCreate,
                    i.to_string().as_bytes(),
                ));
            }
        };
        let slow = Arc::new(Conn::new(1, false));
        session.attach(&slow, 0, |_| {}).expect("attaches");
        deliver(100);
        assert_eq!(close_code(&slow), None);
        deliver(1);
        assert_eq!(close_code(&slow), Some(4016), "101 unsent");
        // 50 more while it is away; it resumes from what it read (all that
        // was written: nothing), 151 behind.
        deliver(50);
        let again = Arc::new(Conn::new(2, false));
        session
            .attach(&again, 0, |_| {})
            .expect("the backlog is held");
        deliver(100);
        assert_eq!(close_code(&again), None, "owed: only 100 came after");
        deliver(1);
        assert_eq!(close_code(&again), Some(4016), "101 after the attach");
        // A resume replays at most 100 + 101 dispatches: from 0 (252
        // behind) it is refused, from 51 everything after is held.
        let third = Arc::new(Conn::new(3, false));
        assert_eq!(
            session.attach(&third, 0, |_| {}).err(),
            Some(crate::session::AttachError::Gap)
        );
        session.attach(&third, 51, |_| {}).expect("201 behind");
        let mut buf = bytes::BytesMut::new();
        let (from, count) = session.encode_unsent(3, &mut buf, usize::MAX);
        assert_eq!((from, count), (52, 201));
        let frames = String::from_utf8_lossy(&buf);
        assert!(frames.contains(r#"{"f":130,"s":52,"#));
        assert!(frames.contains(r#"{"f":130,"s":252,"#));
        assert!(!frames.contains(r#"{"f":130,"s":51,"#));
    }

    /// A connection is watched while its guard lives, and its slot is
    /// used again after it.
    #[test]
    fn deadlines_watch_while_the_guard_lives() {
        let deadlines = Deadlines::default();
        let a = Arc::new(Conn::new(1, false));
        let b = Arc::new(Conn::new(17, false)); // the same shard as `a`
        let watched = deadlines.watch(&a);
        assert_eq!(deadlines.len(), 1);
        drop(watched);
        assert_eq!(deadlines.len(), 0);
        let _b = deadlines.watch(&b);
        let slots = deadlines.shards[1].lock();
        assert_eq!(slots.conns.len(), 1, "the freed slot was taken again");
    }

    /// The watcher closes a connection past its PRESENT deadline (4003) or
    /// heartbeat timeout (4009), never one before it, and gives a
    /// connection whose reader we hold back another interval.
    #[test]
    fn deadlines_close_only_connections_past_them() {
        let metrics = crate::metrics::Metrics::new("test");
        let hb_int = Duration::from_secs(10);
        let deadlines = Deadlines::default();
        let silent = Arc::new(Conn::new(2, false));
        let presented = Arc::new(Conn::new(3, false));
        let held_back = Arc::new(Conn::new(4, false));
        for conn in [&presented, &held_back] {
            conn.beat();
            conn.presented.store(true, Ordering::Release);
        }
        held_back.held_back.store(true, Ordering::Release);
        let _guards: Vec<_> = [&silent, &presented, &held_back]
            .into_iter()
            .map(|c| deadlines.watch(c))
            .collect();

        // Before any deadline: nothing happens.
        deadlines.expire(Instant::now(), hb_int, &metrics);
        assert_eq!(close_code(&silent), None);

        // Past the PRESENT deadline (hb_int), not the heartbeat's (1.5 ×).
        let now = silent.started + hb_int + Duration::from_millis(1);
        deadlines.expire(now, hb_int, &metrics);
        assert_eq!(close_code(&silent), Some(4003));
        assert_eq!(close_code(&presented), None);

        // Past the heartbeat's too.
        let now = presented.started + hb_int * 2;
        deadlines.expire(now, hb_int, &metrics);
        assert_eq!(close_code(&presented), Some(4009));
        assert_eq!(close_code(&held_back), None, "held back by us: beat given");
        assert_eq!(
            close_code(&silent),
            Some(4003),
            "closed once, as first asked"
        );
    }

    /// While the reader is on a request (waiting for the backend), frames
    /// behind it wait unread: no deadline closes the connection then (before
    /// PRESENT, not past twice the PRESENT deadline), and the request's
    /// time is added to the deadline after it (before PRESENT, at most
    /// `hb_int`).
    #[test]
    fn a_request_in_flight_moves_the_deadlines() {
        let metrics = crate::metrics::Metrics::new("test");
        let hb_int = Duration::from_secs(10);
        let s = Duration::from_secs;
        let deadlines = Deadlines::default();
        let unpresented = Arc::new(Conn::new(5, false));
        let presented = Arc::new(Conn::new(6, false));
        let greedy = Arc::new(Conn::new(7, false));
        presented.presented.store(true, Ordering::Release);
        presented.beat();
        let _guards: Vec<_> = [&unpresented, &presented, &greedy]
            .into_iter()
            .map(|c| deadlines.watch(c))
            .collect();
        for conn in [&unpresented, &presented, &greedy] {
            conn.busy_from_ms.store(0, Ordering::Release);
        }
        let t0 = greedy.started;
        deadlines.expire(t0 + s(15), hb_int, &metrics);
        assert_eq!(close_code(&unpresented), None, "busy: not closed");
        assert_eq!(close_code(&greedy), None, "busy: not closed");
        // Its PRESENT took 20 s: its deadline moves by hb_int at most.
        unpresented.busy_from_ms.store(IDLE, Ordering::Release);
        unpresented.grace_ms.store(20_000, Ordering::Relaxed);
        let t0 = unpresented.started;
        deadlines.expire(t0 + s(19), hb_int, &metrics);
        assert_eq!(close_code(&unpresented), None, "before 10 + 10 s");
        deadlines.expire(t0 + s(21), hb_int, &metrics);
        assert_eq!(close_code(&unpresented), Some(4003));
        let t1 = presented.started;
        deadlines.expire(t1 + s(30), hb_int, &metrics);
        assert_eq!(close_code(&presented), None, "busy: not closed");
        assert_eq!(close_code(&greedy), Some(4003), "busy, but past 2 × hb_int");
        // Its requests took 20 s: the heartbeat timeout moves by that much.
        presented.busy_from_ms.store(IDLE, Ordering::Release);
        presented.grace_ms.store(20_000, Ordering::Relaxed);
        deadlines.expire(t1 + s(34), hb_int, &metrics);
        assert_eq!(close_code(&presented), None, "before 15 + 20 s");
        // A heartbeat starts the presented one's count again, with no grace.
        presented.beat();
        let beat = Duration::from_millis(presented.last_beat_ms.load(Ordering::Relaxed));
        deadlines.expire(t1 + beat + hb_int * 2, hb_int, &metrics);
        assert_eq!(close_code(&presented), Some(4009));
    }

    /// A client that reads a few bytes at a time through a pipe smaller
    /// than two frames: the socket takes parts of frames and then nothing,
    /// yet the wire carries whole frames, every dispatch once and in order,
    /// with the replies queued in between.
    #[tokio::test]
    async fn a_slow_reader_gets_whole_frames_in_order() {
        let conn = Arc::new(Conn::new(1, false));
        let session = Session::for_test(1);
        session.attach(&conn, 0, |_| {}).expect("attaches");
        conn.set_session(Arc::clone(&session));
        let (mut client, server) = tokio::io::duplex(300);
        let writer = tokio::spawn(write_loop(
            Arc::clone(&conn),
            server,
            Duration::from_secs(60),
        ));
        // Bodies from 10 to about 250 bytes: both frame header forms.
        let count = 80;
        for i in 0..count {
            let body = serde_json::json!({ "i": i, "pad": "x".repeat(i * 3) });
            session.deliver(&Dispatch::new(Event::MessageCreate, &body));
            if i % 10 == 0 {
                conn.send(wire::heartbeat_frame());
            }
        }
        let mut bytes = Vec::new();
        let mut frames = Vec::new();
        let mut chunk = [0u8; 7];
        while frames.len() < count + count / 10 {
            let n = tokio::time::timeout(Duration::from_secs(10), client.read(&mut chunk))
                .await
                .expect("every frame arrives (none lost)")
                .expect("reads");
            assert!(n > 0, "the writer does not stop early");
            bytes.extend_from_slice(&chunk[..n]);
            take_frames(&mut bytes, &mut frames);
        }
        let dispatches: Vec<_> = frames.iter().filter(|f| f["f"] == 130).collect();
        assert_eq!(dispatches.len(), count);
        for (i, d) in dispatches.iter().enumerate() {
            assert_eq!(d["s"], i as u64 + 1, "gapless, in order");
            assert_eq!(d["cnf"]["i"], i as u64, "each number on its own body");
        }
        assert_eq!(frames.iter().filter(|f| f["f"] == 120).count(), count / 10);
        assert!(bytes.is_empty(), "nothing after the last frame");
        conn.close_with(1000, "", false);
        assert_eq!(writer.await.expect("writer ends"), WriterEnd::Closed);
    }
}
