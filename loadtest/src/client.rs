//! One load client: a session from setup to finish, in one task.
//!
//! # Flow
//!
//! 1. **Setup** (bounded by the plan's setup timeout, at most
//!    `connect_concurrency` at once per worker): connect, read HELLO
//!    (`hb_int`), PRESENT, wait for READY; if the plan has channels, send
//!    CHANNEL_MOVE and wait for its dispatch (retrying 4013 briefly, for a
//!    channel a cluster has not made visible everywhere yet). The outcome
//!    is recorded once: a client counts as a member of its channel only
//!    after its CHANNEL_MOVE came back.
//! 2. **Main loop**: long-lived futures raced in one `select!`: the end of
//!    the run (phase `Finish`), the reader (scans every frame, see
//!    [`Track::observe`]), the writer (heartbeats every `hb_int`; a
//!    publisher also sends its messages on schedule) and, for churners, a
//!    drop timer. The reader is only
//!    cancelled when the connection is being thrown away, which is the one
//!    safe way to cancel fastwebsockets' `read_frame`.
//! 3. **Drop and resume**: when the drop timer fires (churn) or the node
//!    closes the connection (e.g. 4016), the client drops the TCP
//!    connection without a close frame, waits, and resumes on a random URL
//!    with its session id and the last `s` it processed; the replayed
//!    dispatches then flow through the same checks as live ones.
//! 4. **Finish**: close with 1000 (which ends the session on the node).
//!
//! Checks on every dispatch (the session's `s` must go 1, 2, 3, …; message
//! ids within the channel must only grow) and the latency of every
//! MESSAGE_CREATE of this run (its nonce carries the send time) go straight
//! into the worker's atomic [`Stats`](crate::worker::Stats).

use crate::plan::Scenario;
use crate::scan::{self, Head};
use crate::worker::{bump, Ctx, Phase};
use gateway_shared::client::{connect_raw_from, RawFrame, RawReader, RawWriter};
use gateway_shared::protocol::{ErrorCode, Event, FunctionCode};
use gateway_shared::ClientError;
use rand::Rng;
use std::fmt::Write as _;
use std::future::pending;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tokio::time::{sleep, sleep_until, timeout, Instant};

/// Why a connection or setup step failed; the key names it in the report.
#[derive(Debug)]
pub enum Fail {
    Client(ClientError),
    /// The node answered with this error code.
    Gateway(u16),
    /// The node closed the connection (close code if any).
    Closed(Option<u16>),
    Timeout,
    Protocol(&'static str),
}

impl From<ClientError> for Fail {
    fn from(e: ClientError) -> Self {
        Fail::Client(e)
    }
}

impl Fail {
    /// A short, low-cardinality name for counting.
    pub fn key(&self) -> String {
        match self {
            Fail::Client(ClientError::Io(e)) => format!("io: {:?}", e.kind()),
            Fail::Client(ClientError::Refused(code)) => format!("http {code}"),
            Fail::Client(ClientError::WebSocket(e)) => format!("websocket: {e}"),
            Fail::Client(e) => format!("{e}"),
            Fail::Gateway(c) => format!("error {c}"),
            Fail::Closed(Some(c)) => format!("closed {c}"),
            Fail::Closed(None) => "closed".into(),
            Fail::Timeout => "timeout".into(),
            Fail::Protocol(m) => format!("protocol: {m}"),
        }
    }
}

impl std::fmt::Display for Fail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.key())
    }
}

/// What READY said.
#[derive(Debug, Clone, Copy)]
pub struct Ready {
    pub session_id: u64,
    pub resumed: bool,
    pub hb_int: Duration,
}

/// A session's view of its dispatches; survives reconnects.
#[derive(Debug, Default)]
pub struct Track {
    pub session_id: u64,
    /// The last dispatch `s` processed (0 before the first).
    pub last_s: u64,
    /// The largest message id seen in the channel.
    pub last_msg_id: u64,
    /// When the last MESSAGE_CREATE of this run arrived (µs since the
    /// epoch): kept here, not in a shared atomic written per delivery.
    pub last_delivery_us: u64,
}

pub(crate) fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

const DISPATCH: u16 = FunctionCode::Dispatch.code();
const ERROR: u16 = FunctionCode::Error.code();
const HEARTBEAT: u16 = FunctionCode::Heartbeat.code();

impl Track {
    /// Checks and counts one frame; returns its envelope for the caller's
    /// own logic (setup waits for particular replies).
    ///
    /// Hot path: a positional scan of the envelope, and for MESSAGE_CREATE
    /// two field scans; no allocation.
    pub fn observe<'a>(&mut self, frame: &'a [u8], ctx: &Ctx) -> Option<Head<'a>> {
        let stats = &ctx.stats;
        let Some(head) = scan::head(frame) else {
            stats.malformed.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        match head.f {
            DISPATCH => {
                let Some(s) = head.s else {
                    stats.malformed.fetch_add(1, Ordering::Relaxed);
                    return Some(head);
                };
                if s <= self.last_s {
                    stats.duplicated.fetch_add(1, Ordering::Relaxed);
                    return Some(head);
                }
                if s > self.last_s + 1 {
                    stats.seq_gaps.fetch_add(1, Ordering::Relaxed);
                }
                self.last_s = s;
                if head.t == Some(Event::MessageCreate.name()) {
                    self.message(frame, ctx);
                }
            }
            HEARTBEAT => {
                stats.heartbeat_acks.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        Some(head)
    }

    fn message(&mut self, frame: &[u8], ctx: &Ctx) {
        let stats = &ctx.stats;
        let Some(sent_us) = scan::rstr_field(frame, "nonce").and_then(|n| parse_nonce(n, ctx))
        else {
            stats.foreign.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let id = scan::str_field(frame, "id").and_then(|id| id.parse::<u64>().ok());
        let Some(id) = id else {
            stats.malformed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if id == self.last_msg_id {
            stats.duplicated.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if id < self.last_msg_id {
            stats.order_violations.fetch_add(1, Ordering::Relaxed);
        } else {
            self.last_msg_id = id;
        }
        stats.delivered.fetch_add(1, Ordering::Relaxed);
        let now = now_us();
        self.last_delivery_us = now;
        stats.latency.record(now.saturating_sub(sent_us));
    }
}

/// The send time (µs since the epoch) of a nonce `<run>.<j>.<k>.<µs>` of
/// this run.
fn parse_nonce(nonce: &str, ctx: &Ctx) -> Option<u64> {
    let rest = nonce
        .strip_prefix(ctx.plan.run_id.as_str())?
        .strip_prefix('.')?;
    rest.rsplit('.').next()?.parse().ok()
}

/// Counts an error (150) that arrived outside of a setup step.
fn count_error(frame: &[u8], ctx: &Ctx) {
    match scan::u64_field(frame, "c") {
        Some(c) if c == u64::from(ErrorCode::RateLimited.code()) => ctx.rate_limited(),
        Some(c) => bump(&ctx.stats.errors, c.to_string()),
        None => {
            ctx.stats.malformed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A live connection.
pub struct Conn {
    pub reader: RawReader,
    pub writer: RawWriter,
}

impl Conn {
    /// Ends the session: a close 1000, then waits (2 s at most) for the
    /// node's answer, its close or the end of the stream, before dropping
    /// the socket. Dropped at once, a socket with unread bytes is reset,
    /// and the node can meet the reset before it reads the close: the
    /// session is then left resumable, not ended (about one in twenty of
    /// 2,000 sessions in some runs of bench/100k.sh, seen as members left
    /// in the channel).
    pub async fn close_normally(mut self) {
        let _ = timeout(Duration::from_secs(2), async {
            if self.writer.close(1000).await.is_err() {
                return;
            }
            // A frame cut by the reader dropped before this one reads as
            // an error: that ends the wait too.
            while let Ok(RawFrame::Text(_)) = self.reader.next().await {}
        })
        .await;
    }
}

pub async fn next_text(reader: &mut RawReader) -> Result<bytes::Bytes, Fail> {
    match reader.next().await? {
        RawFrame::Text(b) => Ok(b),
        RawFrame::Closed(code) => Err(Fail::Closed(code)),
    }
}

/// Connects, reads HELLO, presents (new session or resume) and waits for
/// READY.
pub async fn open(
    url: &str,
    source: Option<IpAddr>,
    token: &str,
    resume: Option<(u64, u64)>,
) -> Result<(Conn, Ready), Fail> {
    let (mut reader, mut writer) = connect_raw_from(url, source).await?;
    let hello = next_text(&mut reader).await?;
    let hb_int = match scan::head(&hello) {
        Some(h) if h.f == FunctionCode::Hello.code() => scan::u64_field(&hello, "hb_int")
            .filter(|&ms| ms > 0)
            .ok_or(Fail::Protocol("HELLO without hb_int"))?,
        _ => return Err(Fail::Protocol("first frame is not HELLO")),
    };
    let mut present = String::with_capacity(token.len() + 80);
    let _ = write!(present, r#"{{"f":110,"cnf":{{"token":"{token}""#);
    if let Some((session_id, s)) = resume {
        let _ = write!(present, r#","session_id":{session_id},"s":{s}"#);
    }
    present.push_str("}}");
    writer.send_text(present.as_bytes()).await?;
    loop {
        let frame = next_text(&mut reader).await?;
        let Some(h) = scan::head(&frame) else {
            return Err(Fail::Protocol("unparsable frame before READY"));
        };
        match h.f {
            140 => {
                let session_id = scan::u64_field(&frame, "session_id")
                    .ok_or(Fail::Protocol("READY without session_id"))?;
                let resumed = scan::bool_field(&frame, "resumed")
                    .ok_or(Fail::Protocol("READY without resumed"))?;
                return Ok((
                    Conn { reader, writer },
                    Ready {
                        session_id,
                        resumed,
                        hb_int: Duration::from_millis(hb_int),
                    },
                ));
            }
            ERROR => {
                let code = scan::u64_field(&frame, "c").unwrap_or(0) as u16;
                return Err(Fail::Gateway(code));
            }
            DISPATCH => return Err(Fail::Protocol("dispatch before READY")),
            _ => continue,
        }
    }
}

/// Moves into `channel` and waits for the CHANNEL_MOVE dispatch, counting
/// everything that arrives meanwhile.
async fn join(conn: &mut Conn, channel: &str, track: &mut Track, ctx: &Ctx) -> Result<(), Fail> {
    let request = format!(r#"{{"f":130,"t":"CHANNEL_MOVE","cnf":{{"channel":"{channel}"}}}}"#);
    for _ in 0..20 {
        conn.writer.send_text(request.as_bytes()).await?;
        loop {
            let frame = next_text(&mut conn.reader).await?;
            let Some(h) = track.observe(&frame, ctx) else {
                continue;
            };
            if h.f == DISPATCH && h.t == Some(Event::ChannelMove.name()) {
                return Ok(());
            }
            if h.f == ERROR {
                match scan::u64_field(&frame, "c").unwrap_or(0) as u16 {
                    c if c == ErrorCode::NotFound.code() => break,
                    c if c == ErrorCode::RateLimited.code() => {
                        ctx.rate_limited();
                        break;
                    }
                    c => return Err(Fail::Gateway(c)),
                }
            }
        }
        // Read nothing while waiting: the retry is short, and a dispatch
        // missed meanwhile only waits in the socket.
        sleep(Duration::from_millis(250)).await;
    }
    Err(Fail::Protocol("CHANNEL_MOVE kept failing"))
}

/// A publisher's schedule and message buffer.
struct Publisher {
    /// Publisher number, in the nonce.
    j: usize,
    channel: usize,
    /// The next message number.
    k: u64,
    total: u64,
    /// Offset of this publisher's schedule, spreading publishers evenly
    /// over one interval instead of all sending at once.
    offset: Duration,
    interval: Duration,
    /// The message being built; reused, so sending allocates nothing.
    buf: String,
    ctx: Arc<Ctx>,
    done: bool,
}

impl Publisher {
    fn new(ctx: Arc<Ctx>, j: usize, channel: usize) -> Self {
        let plan = &ctx.plan;
        let interval = plan.publish_interval();
        ctx.active_publishers.fetch_add(1, Ordering::Relaxed);
        Self {
            j,
            channel,
            k: 0,
            total: plan.messages_per_publisher(),
            offset: interval.mul_f64(j as f64 / plan.publishers as f64),
            interval,
            buf: String::with_capacity(plan.content_bytes + 128),
            ctx,
            done: false,
        }
    }

    fn finish(&mut self) {
        if !self.done {
            self.done = true;
            self.ctx.active_publishers.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Waits until the next message is due; never returns once this
    /// publisher is done. Cancel-safe: all state lives in `self`.
    async fn due(&mut self, phase: &mut watch::Receiver<Phase>) {
        loop {
            if self.done {
                return pending().await;
            }
            let now_phase = *phase.borrow_and_update();
            match now_phase {
                Phase::Setup => {
                    if phase.changed().await.is_err() {
                        return pending().await;
                    }
                    continue;
                }
                Phase::Publish if self.k < self.total => {}
                _ => {
                    self.finish();
                    continue;
                }
            }
            let Some(&go) = self.ctx.go_at.get() else {
                return pending().await;
            };
            let at = go + self.due_after_go();
            tokio::select! {
                _ = sleep_until(at) => return,
                changed = phase.changed() => if changed.is_err() {
                    return pending().await;
                },
            }
        }
    }

    /// When message `k` is due, counted from Go.
    fn due_after_go(&self) -> Duration {
        self.offset + self.interval.mul_f64(self.k as f64)
    }

    /// The next message, stamped with the time it was due: a publisher the
    /// tester's own load held up adds that delay to the latency measured,
    /// instead of hiding it.
    fn message(&mut self) -> &[u8] {
        let due = match self.ctx.go_wall_us.get() {
            Some(go) => go + self.due_after_go().as_micros() as u64,
            None => now_us(),
        };
        self.buf.clear();
        let _ = write!(
            self.buf,
            r#"{{"f":130,"t":"MESSAGE_CREATE","cnf":{{"content":"{}","nonce":"{}.{}.{}.{}"}}}}"#,
            self.ctx.content, self.ctx.plan.run_id, self.j, self.k, due
        );
        self.buf.as_bytes()
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.finish();
    }
}

/// How a connection's main loop ended.
enum Ended {
    Finish,
    /// Churn: time to drop the connection.
    Drop,
    /// The node closed it (close code) or it broke.
    Broken(Option<u16>),
}

/// Microseconds since the worker started, at least 1: the clock of a
/// connection's `heartbeat_sent`, which its reader and writer share (when
/// its unanswered heartbeat left; 0 while none is outstanding).
fn since_start_us(ctx: &Ctx) -> u64 {
    (ctx.started.elapsed().as_micros() as u64).max(1)
}

async fn read_loop(
    reader: &mut RawReader,
    track: &mut Track,
    ctx: &Ctx,
    heartbeat_sent: &AtomicU64,
) -> Ended {
    loop {
        match reader.next().await {
            Ok(RawFrame::Text(frame)) => {
                if let Some(h) = track.observe(&frame, ctx) {
                    if h.f == ERROR {
                        count_error(&frame, ctx);
                    } else if h.f == HEARTBEAT {
                        let sent = heartbeat_sent.swap(0, Ordering::Relaxed);
                        if sent != 0 && ctx.all_set_up.load(Ordering::Relaxed) {
                            let rtt = since_start_us(ctx).saturating_sub(sent);
                            ctx.stats.heartbeat_latency.record(rtt);
                        }
                    }
                }
            }
            Ok(RawFrame::Closed(code)) => return Ended::Broken(code),
            Err(_) => return Ended::Broken(None),
        }
    }
}

async fn write_loop(
    writer: &mut RawWriter,
    hb_int: Duration,
    mut publisher: Option<&mut Publisher>,
    mut phase: watch::Receiver<Phase>,
    heartbeat_sent: &AtomicU64,
    ctx: &Ctx,
) -> Ended {
    let mut heartbeat = tokio::time::interval_at(Instant::now() + hb_int, hb_int);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = heartbeat.tick() => {
                // With an ack still outstanding (a round trip over
                // hb_int), that one stays timed from its own send; the
                // node answers in order, so this one's ack goes untimed.
                let _ = heartbeat_sent.compare_exchange(
                    0,
                    since_start_us(ctx),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
                if writer.heartbeat().await.is_err() {
                    return Ended::Broken(None);
                }
            }
            _ = async {
                match publisher.as_deref_mut() {
                    Some(p) => p.due(&mut phase).await,
                    None => pending().await,
                }
            } => {
                let Some(p) = publisher.as_deref_mut() else { continue };
                let channel = p.channel;
                if writer.send_text(p.message()).await.is_err() {
                    return Ended::Broken(None);
                }
                p.k += 1;
                p.ctx.stats.sent[channel].fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Resolves when `phase` reaches `target` (or the sender is gone).
async fn reach(mut phase: watch::Receiver<Phase>, target: Phase) {
    let _ = phase.wait_for(|p| *p >= target).await;
}

/// Churn: resolves at a random moment during publishing when this client
/// should drop its connection. Drops are a Poisson process of rate
/// `drops_per_s / churners` per client, so `drops_per_s` over all of them.
async fn drop_timer(ctx: &Ctx, mut phase: watch::Receiver<Phase>) {
    let Some(churn) = ctx.plan.churn.as_ref() else {
        return pending().await;
    };
    // Copy the phase out: the guard `wait_for` returns must not be held.
    let now = phase
        .wait_for(|p| *p >= Phase::Publish)
        .await
        .map(|p| *p)
        .ok();
    if now != Some(Phase::Publish) {
        return pending().await;
    }
    let churners = (ctx.plan.clients - ctx.plan.publishers).max(1) as f64;
    let mean_s = churners / churn.drops_per_s;
    let u: f64 = rand::rng().random_range(f64::EPSILON..1.0);
    let at = Instant::now() + Duration::from_secs_f64(-mean_s * u.ln());
    let publish_end = ctx
        .go_at
        .get()
        .map(|go| *go + Duration::from_secs_f64(ctx.plan.duration_s));
    if publish_end.is_some_and(|end| at >= end) {
        return pending().await;
    }
    let publishing_ended = tokio::select! {
        _ = sleep_until(at) => false,
        _ = phase.wait_for(|p| *p > Phase::Publish) => true,
    };
    if publishing_ended {
        pending().await
    }
}

/// One client, from setup to finish.
pub async fn run(ctx: Arc<Ctx>, i: usize) {
    let mut track = Track::default();
    session(&ctx, i, &mut track).await;
    ctx.stats
        .last_delivery_us
        .fetch_max(track.last_delivery_us, Ordering::Relaxed);
}

async fn session(ctx: &Arc<Ctx>, i: usize, track: &mut Track) {
    let plan = &ctx.plan;
    let user_id = plan.user_id(i);
    let ttl = plan.max_run_s as u64 + 3600;
    let token = plan.token(&user_id, &format!("lt{i}"), ttl);
    let url_index = plan.url_of(i);
    let source = plan.source_ip_of(i);
    let channel = plan.channel_of(i);
    let channel_name = channel.map(|c| plan.channel_name(c));
    // The channel this client is counted in (the default channel, as 0,
    // for `connect --fanout-at-end` without channels).
    let tracked = plan.tracked_channel_of(i);

    // 1. Setup, bounded.
    let setup = async {
        let _permit = ctx.setup_permits.acquire().await;
        let started = Instant::now();
        let result = timeout(Duration::from_secs_f64(plan.setup_timeout_s), async {
            let (mut conn, ready) = open(&plan.urls[url_index], source, &token, None).await?;
            track.session_id = ready.session_id;
            if let Some(name) = &channel_name {
                join(&mut conn, name, track, ctx).await?;
            }
            Ok::<_, Fail>((conn, ready))
        })
        .await
        .unwrap_or(Err(Fail::Timeout));
        (result, started.elapsed())
    };
    let (result, took) = setup.await;
    let stats = &ctx.stats;
    let (mut conn, ready) = match result {
        Ok(ok) => ok,
        Err(fail) => {
            stats.setup_failed.fetch_add(1, Ordering::Relaxed);
            bump(&stats.setup_errors, fail.key());
            ctx.setup_outcome();
            return;
        }
    };
    stats.connect_latency.record(took.as_micros() as u64);
    stats.ok_per_url[url_index].fetch_add(1, Ordering::Relaxed);
    if let Some(c) = tracked {
        stats.members[c].fetch_add(1, Ordering::Relaxed);
    }
    stats.setup_ok.fetch_add(1, Ordering::Relaxed);
    ctx.setup_outcome();

    let mut publisher = match (plan.publisher_of(i), tracked) {
        (Some(j), Some(c)) => Some(Publisher::new(ctx.clone(), j, c)),
        _ => None,
    };
    let churner = plan.scenario == Scenario::Churn && publisher.is_none();
    let mut hb_int = ready.hb_int;
    let heartbeat_sent = AtomicU64::new(0);

    // 2. Main loop; 3. drop and resume.
    loop {
        heartbeat_sent.store(0, Ordering::Relaxed);
        let ended = {
            let Conn { reader, writer } = &mut conn;
            tokio::select! {
                biased;
                _ = reach(ctx.phase.subscribe(), Phase::Finish) => Ended::Finish,
                ended = read_loop(reader, track, ctx, &heartbeat_sent) => ended,
                ended = write_loop(
                    writer, hb_int, publisher.as_mut(), ctx.phase.subscribe(), &heartbeat_sent, ctx,
                ) => ended,
                _ = async {
                    if churner { drop_timer(ctx, ctx.phase.subscribe()).await } else { pending().await }
                } => Ended::Drop,
            }
        };
        let down = match ended {
            Ended::Finish => {
                // 4. A normal close ends the session on the node.
                conn.close_normally().await;
                return;
            }
            Ended::Drop => {
                let max = plan.churn.as_ref().map_or(0, |c| c.down_ms_max);
                Duration::from_millis(rand::rng().random_range(0..=max))
            }
            Ended::Broken(code) => {
                if ctx.phase() == Phase::Finish {
                    return;
                }
                let key = code.map_or_else(|| "none".to_string(), |c| c.to_string());
                bump(&stats.closes, key);
                if code == Some(ErrorCode::Banned.code()) {
                    return;
                }
                Duration::from_millis(100)
            }
        };
        drop(conn);
        match resume(ctx, source, &token, channel_name.as_deref(), track, down).await {
            Some((new_conn, ready)) => {
                conn = new_conn;
                hb_int = ready.hb_int;
            }
            None => return,
        }
    }
}

/// How long a client keeps trying to resume; the node's default resume
/// window is 60 s.
const RESUME_FOR: Duration = Duration::from_secs(30);

/// Waits `down`, then resumes on a random URL; starts over in the channel
/// when the node answers `resumed: false`.
async fn resume(
    ctx: &Ctx,
    source: Option<IpAddr>,
    token: &str,
    channel: Option<&str>,
    track: &mut Track,
    down: Duration,
) -> Option<(Conn, Ready)> {
    let stats = &ctx.stats;
    sleep(down).await;
    let give_up = Instant::now() + RESUME_FOR;
    let mut backoff = Duration::from_millis(50);
    // From the first attempt: failed ones and their backoff count too.
    let started = Instant::now();
    while Instant::now() < give_up && ctx.phase() != Phase::Finish {
        let url = &ctx.plan.urls[rand::rng().random_range(0..ctx.plan.urls.len())];
        let resume = Some((track.session_id, track.last_s));
        let attempt = timeout(Duration::from_secs(10), open(url, source, token, resume))
            .await
            .unwrap_or(Err(Fail::Timeout));
        match attempt {
            Ok((mut conn, ready)) => {
                stats
                    .resume_latency
                    .record(started.elapsed().as_micros() as u64);
                stats.resumes.fetch_add(1, Ordering::Relaxed);
                if !ready.resumed {
                    // A new session: numbering restarts, and it starts in
                    // the default channel.
                    stats.resumed_false.fetch_add(1, Ordering::Relaxed);
                    track.session_id = ready.session_id;
                    track.last_s = 0;
                    if let Some(name) = channel {
                        if let Err(fail) = join(&mut conn, name, track, ctx).await {
                            bump(&stats.setup_errors, format!("rejoin: {}", fail.key()));
                            return None;
                        }
                    }
                }
                return Some((conn, ready));
            }
            Err(Fail::Gateway(c)) if c == ErrorCode::Banned.code() => break,
            Err(_) => {
                sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
    // A run that finished while this client was away is not a failed
    // resume: the client just never tried.
    if ctx.phase() != Phase::Finish {
        stats.resume_failed.fetch_add(1, Ordering::Relaxed);
    }
    None
}
