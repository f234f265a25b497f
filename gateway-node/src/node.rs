//! The node: configuration, the local session registry, the backend, and
//! the session lifecycle (PRESENT, resume, end, expiry, drain).

use crate::auth::{Identity, TokenRules, Verifier};
use crate::broker::Broker;
use crate::config::Config;
use crate::connection::Conn;
use crate::hub::Hub;
use crate::metrics::{Metrics, ResumeResult};
use crate::session::{AttachError, Limits, Session};
use crate::wire::{self, as_int, Dispatch, Reject};
use base64::Engine;
use bytes::Bytes;
use gateway_shared::protocol::{
    ErrorCode, Event, FunctionCode, GatewayDown, Ready, ReadyUser, PROTOCOL_VERSION,
};
use parking_lot::Mutex;
use simd_json::BorrowedValue as Value;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tracing::info;

/// Largest session id: ids stay exact in JavaScript.
pub const MAX_SESSION_ID: u64 = (1 << 53) - 1;

/// Runs `work` to its end in a task of its own, even if the caller (a
/// connection's reader, dropped when the connection closes) stops waiting:
/// a CHANNEL_MOVE or a take-over stopped half-way would leave a session in
/// none of its streams.
pub(crate) async fn to_the_end<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T, Reject>> + Send + 'static,
) -> Result<T, Reject> {
    tokio::spawn(work)
        .await
        .unwrap_or_else(|_| Err(Reject::new(ErrorCode::UnknownError, "request failed")))
}

/// Sessions a draining node parks at once (each a pipeline and a presence
/// refresh at Redis).
const PARK_IN_FLIGHT: usize = 64;

pub struct Node {
    pub config: Config,
    pub node_id: String,
    pub verifier: Verifier,
    pub metrics: Arc<Metrics>,
    pub broker: Broker,
    /// Local fan-out: channel → this node's sessions.
    pub hub: Arc<Hub>,
    /// Pre-encoded HELLO, the same for every connection.
    pub hello_frame: Bytes,
    pub limits: Limits,
    /// The secret `POST /dev/token` signs with, in development mode only.
    pub dev_secret: Option<Box<[u8]>>,
    /// The server API's keys (none: the API is off).
    pub api_keys: crate::api::Keys,
    /// Sessions owned by this node, connected or within their resume window.
    sessions: Mutex<HashMap<u64, Arc<Session>>>,
    /// Set when the node starts draining: `/readyz` fails, no new sockets.
    pub draining: AtomicBool,
    conn_ids: AtomicU64,
    /// Every connection's PRESENT deadline and heartbeat timeout.
    pub deadlines: crate::connection::Deadlines,
    /// Each user's budget of new sessions (`None`: off).
    session_starts: Option<crate::admission::SessionStarts>,
}

/// A decoded PRESENT (110) `cnf`.
#[derive(Debug)]
pub struct PresentRequest {
    pub token: String,
    pub resume: Option<(u64, u64)>,
}

impl PresentRequest {
    /// Wrong types are decode errors (4002): 110 is not an event, so its
    /// `cnf` is checked at the payload level. A missing token fails
    /// authentication (4004).
    pub fn decode(cnf: Option<&Value<'_>>) -> Result<Self, Reject> {
        let decode = |m: &'static str| Reject::new(ErrorCode::DecodeError, m);
        let Some(Value::Object(cnf)) = cnf else {
            return Err(decode("cnf of 110 must be an object"));
        };
        let token = match cnf.get("token") {
            None => {
                return Err(Reject::new(
                    ErrorCode::AuthenticationFailed,
                    "token missing",
                ))
            }
            Some(Value::String(t)) => t.to_string(),
            Some(_) => return Err(decode("token must be a string")),
        };
        let int =
            |key: &str, min: i128, max: i128, m: &'static str| -> Result<Option<u64>, Reject> {
                match cnf.get(key) {
                    None | Some(Value::Static(simd_json::StaticNode::Null)) => Ok(None),
                    Some(v) => as_int(v)
                        .filter(|i| (min..=max).contains(i))
                        .map(|i| Some(i as u64))
                        .ok_or_else(|| decode(m)),
                }
            };
        let session_id = int(
            "session_id",
            1,
            MAX_SESSION_ID as i128,
            "session_id must be a positive integer below 2^53",
        )?;
        let s = int("s", 0, u64::MAX as i128, "s must be a non-negative integer")?;
        Ok(Self {
            token,
            resume: session_id.map(|id| (id, s.unwrap_or(0))),
        })
    }
}

/// 32 random bytes, base64url without padding.
fn new_enc_key() -> String {
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

impl Node {
    // Called once, by `build`, with what it resolved from the config.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Config,
        node_id: String,
        secret: &[u8],
        rules: &TokenRules,
        hub: Arc<Hub>,
        broker: Broker,
        metrics: Arc<Metrics>,
        api_keys: crate::api::Keys,
    ) -> Self {
        let limits = Limits {
            replay: config.replay_buffer,
            outbound_limit: config.outbound_limit,
            direct_writes: config.direct_writes,
            rate_burst: config.rate_limit_count as f64,
            rate_per_s: config.rate_limit_count as f64 / config.rate_limit_window_s as f64,
        };
        let session_starts = crate::admission::SessionStarts::new(config.session_starts_per_user);
        Self {
            hello_frame: wire::hello_frame(config.hb_int_ms),
            verifier: Verifier::new(secret, rules),
            dev_secret: config.dev.then(|| secret.into()),
            limits,
            api_keys,
            config,
            node_id,
            metrics,
            broker,
            hub,
            sessions: Mutex::new(HashMap::new()),
            draining: AtomicBool::new(false),
            conn_ids: AtomicU64::new(1),
            deadlines: Default::default(),
            session_starts,
        }
    }

    pub fn next_conn_id(&self) -> u64 {
        self.conn_ids.fetch_add(1, Ordering::Relaxed)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    fn session(&self, id: u64) -> Option<Arc<Session>> {
        self.sessions.lock().get(&id).cloned()
    }

    /// Holds a session: a new one, or one being taken over from the
    /// backend before it enters its streams (whatever ends the sessions of
    /// a stream meanwhile, a reset of its log, sees it too).
    pub(crate) fn hold(&self, session: &Arc<Session>) {
        self.sessions.lock().insert(session.id, Arc::clone(session));
    }

    /// Forgets a session: ended, parked, or whose take-over failed.
    pub(crate) fn forget(&self, id: u64) {
        self.sessions.lock().remove(&id);
    }

    /// How many sessions this node holds (connected or resumable).
    pub fn session_count(&self) -> u64 {
        self.sessions.lock().len() as u64
    }

    /// Every session of this node.
    pub fn local_sessions(&self) -> Vec<Arc<Session>> {
        self.sessions.lock().values().cloned().collect()
    }

    fn ready_frame(
        &self,
        session: &Session,
        channel: &str,
        channels: &[String],
        resumed: bool,
    ) -> Bytes {
        wire::message_frame(
            FunctionCode::Ready,
            &Ready {
                v: PROTOCOL_VERSION,
                session_id: session.id,
                enc_key: session.enc_key.clone(),
                resumed,
                user: ReadyUser {
                    id: session.user.id.clone(),
                    name: session.user.name.clone(),
                    admin: session.admin,
                },
                channel: channel.to_owned(),
                channels: channels.to_vec(),
            },
        )
    }

    /// PRESENT: authenticates, then resumes the asked-for session or starts
    /// a new one, and sends READY (and the replay) on `conn`.
    pub async fn present(
        self: &Arc<Self>,
        conn: &Arc<Conn>,
        request: PresentRequest,
    ) -> Result<Arc<Session>, Reject> {
        let identity = self
            .verifier
            .verify(&request.token)
            .map_err(|m| Reject::new(ErrorCode::AuthenticationFailed, m))?;
        if self.broker.is_banned(&identity.id).await? {
            return Err(Reject::new(ErrorCode::Banned, "user is banned"));
        }
        if let Some((session_id, s)) = request.resume {
            if let Some(session) = self.try_resume(conn, &identity, session_id, s).await? {
                return Ok(session);
            }
        }
        if let Some(starts) = &self.session_starts {
            if !starts.take(&identity.id, Instant::now()) {
                return Err(Reject::new(
                    ErrorCode::RateLimited,
                    "too many new sessions for this user; present again later",
                ));
            }
        }
        self.new_session(conn, identity).await
    }

    async fn try_resume(
        self: &Arc<Self>,
        conn: &Arc<Conn>,
        identity: &Identity,
        session_id: u64,
        s: u64,
    ) -> Result<Option<Arc<Session>>, Reject> {
        let (session, how) = match self.session(session_id) {
            Some(session) => (session, ResumeResult::Local),
            None => match self.take_over(identity, session_id).await? {
                Some((session, how)) => (session, how),
                None => {
                    self.metrics.resume(ResumeResult::Failed);
                    return Ok(None);
                }
            },
        };
        if session.user.id != identity.id {
            return Err(Reject::new(
                ErrorCode::AuthenticationFailed,
                "session belongs to another user",
            ));
        }
        // The session is in its streams already: a channel added after this
        // read reaches it as a dispatch.
        let channels = self.broker.channel_names().await?;
        conn.set_session(Arc::clone(&session));
        // READY is queued under the session lock, before the session
        // attaches: it precedes the replay on the wire.
        let attached = session.attach(conn, s, |channel| {
            conn.send(self.ready_frame(&session, channel, &channels, true));
        });
        match attached {
            Ok(replaced) => {
                if let Some(old) = replaced {
                    self.metrics.error_sent(ErrorCode::SessionReplaced);
                    old.close_fatal(
                        ErrorCode::SessionReplaced,
                        "session resumed on another connection",
                        false,
                    );
                }
                self.metrics.resume(how);
                Ok(Some(session))
            }
            Err(err) => {
                // Not this connection's session: it is unpresented again
                // (its PRESENT deadline runs on) and its close ends nothing.
                conn.clear_session();
                self.metrics.resume(ResumeResult::Failed);
                // A detached session whose missed dispatches are gone is of
                // no use to anyone: end it now rather than at expiry.
                if err == AttachError::Gap && session.conn().is_none() {
                    self.end_session(&session).await;
                }
                Ok(None)
            }
        }
    }

    /// A resume of a session this node does not hold. The take-over holds
    /// the session in `sessions` itself, and runs in a task of its own: a
    /// connection closing meanwhile must not stop it half-way (the session
    /// held, its channel taken, in none of its streams).
    async fn take_over(
        self: &Arc<Self>,
        identity: &Identity,
        session_id: u64,
    ) -> Result<Option<(Arc<Session>, ResumeResult)>, Reject> {
        let (node, identity) = (Arc::clone(self), identity.clone());
        to_the_end(async move { node.broker.take_over(&node, &identity, session_id).await }).await
    }

    async fn new_session(
        &self,
        conn: &Arc<Conn>,
        identity: Identity,
    ) -> Result<Arc<Session>, Reject> {
        let id = self.broker.new_session_id().await?;
        let channel: Arc<str> = Arc::from(self.config.default_channel.as_str());
        let session = Session::new(
            id,
            identity,
            new_enc_key(),
            Arc::clone(&channel),
            self.limits,
            Arc::clone(&self.metrics),
        );
        self.hold(&session);
        // The session enters its streams before READY is sent: whatever a
        // client does once it saw our READY reaches the new session.
        // Dispatches that arrive meanwhile wait in its ring.
        if let Err(e) = self.broker.start_session(&session).await {
            self.end_session(&session).await;
            return Err(e);
        }
        // Read after entering the cluster-wide stream: a channel added later
        // arrives as a dispatch.
        let channels = match self.broker.channel_names().await {
            Ok(channels) => channels,
            Err(e) => {
                self.end_session(&session).await;
                return Err(e);
            }
        };
        // The writer must know the session before it is woken for it.
        conn.set_session(Arc::clone(&session));
        // Ended meanwhile (a ban landed during PRESENT): no READY for it; a
        // PRESENT sent again meets the ban.
        session
            .attach(conn, 0, |channel| {
                conn.send(self.ready_frame(&session, channel, &channels, false));
            })
            .map_err(|_| {
                conn.clear_session();
                Reject::new(
                    ErrorCode::UnknownError,
                    "session ended while presenting; present again",
                )
            })?;
        info!(session = id, user = %session.user.id, "session started");
        Ok(session)
    }

    /// Ends a session: it leaves its channel (ROOM_USER_REMOVE) and cannot
    /// be resumed. Returns its connection, if one was attached.
    pub async fn end_session(&self, session: &Arc<Session>) -> Option<Arc<Conn>> {
        let conn = session.end()?;
        self.ended(session, conn).await
    }

    /// Ends `session` if connection `conn_id` is attached to it (it closed
    /// with 1000); a session another connection resumed meanwhile goes on.
    pub async fn end_session_from(&self, session: &Arc<Session>, conn_id: u64) {
        if let Some(conn) = session.end_from(conn_id) {
            self.ended(session, conn).await;
        }
    }

    async fn ended(&self, session: &Arc<Session>, conn: Option<Arc<Conn>>) -> Option<Arc<Conn>> {
        self.forget(session.id);
        if let Err(e) = self.broker.end_session(session).await {
            tracing::warn!(session = session.id, error = %e.message, "ending the session in the backend failed");
        }
        info!(session = session.id, user = %session.user.id, "session ended");
        conn
    }

    /// Ends every session of this node without telling the backend (it
    /// lost them) and closes their connections with `code`.
    pub async fn end_all_sessions(&self, code: u16, reason: &str) {
        let sessions: Vec<_> = self.sessions.lock().drain().map(|(_, s)| s).collect();
        for session in sessions {
            if let Some(Some(conn)) = session.end() {
                conn.close_with(code, reason, false);
            }
        }
    }

    /// Ends the sessions in `channel` (every session, for `None`) because
    /// the backend lost events they should have had: each connection
    /// closes with 1012, and a resume starts over (`resumed: false`).
    pub async fn end_sessions_in(&self, channel: Option<&str>, reason: &str) {
        let sessions: Vec<_> = self
            .sessions
            .lock()
            .values()
            .filter(|s| channel.is_none_or(|c| *s.channel() == *c))
            .cloned()
            .collect();
        for session in sessions {
            if let Some(conn) = self.end_session(&session).await {
                conn.close_with(1012, reason, false);
            }
        }
    }

    pub fn has_session(&self, id: u64) -> bool {
        self.sessions.lock().contains_key(&id)
    }

    /// Parks session `id` for the node that claims it: its connection is
    /// closed with 4017. False when this node does not hold it.
    pub async fn park_for_claim(&self, id: u64) -> bool {
        let Some(session) = self.session(id) else {
            return false;
        };
        self.park_closing(session, |conn| {
            self.metrics.error_sent(ErrorCode::SessionReplaced);
            conn.close_fatal(
                ErrorCode::SessionReplaced,
                "session resumed on another node",
                false,
            );
        })
        .await
    }

    /// Parks `session`; true when it was, and then its connection, if any,
    /// is closed by `close`. One that could not be parked ends here.
    async fn park_closing(&self, session: Arc<Session>, close: impl FnOnce(&Conn)) -> bool {
        let conn = session.conn();
        match self.broker.park(&session).await {
            Ok(true) => {
                self.forget(session.id);
                if let Some(conn) = conn {
                    close(&conn);
                }
                true
            }
            Ok(false) => false,
            Err(e) => {
                self.parking_failed(&session, conn, &e).await;
                false
            }
        }
    }

    /// A session that stopped here but could not be parked in Redis is
    /// lost: it is ended for good (it leaves its channel), and its
    /// connection closed with 1012, so that the client's resume answers
    /// `resumed: false` instead of the connection staying open and silent.
    async fn parking_failed(&self, session: &Arc<Session>, conn: Option<Arc<Conn>>, e: &Reject) {
        tracing::warn!(session = session.id, error = %e.message, "parking failed; session ended");
        self.forget(session.id);
        // Its records in Redis are left alone: a write that timed out may
        // have landed, and then the claiming node takes the session over.
        // If not, its keys expire with the resume window, and its presence
        // entry, no longer refreshed, with it: the sweep then removes it from
        // its channel (ROOM_USER_REMOVE), up to a window late.
        if let Some(conn) = conn {
            conn.close_with(1012, "session could not be handed over; it ended", false);
        }
    }

    /// Parks every session of this node (the end of a drain), so that they
    /// resume elsewhere with nothing lost: `PARK_IN_FLIGHT` at a time, as
    /// one after another a node of 100,000 sessions would need minutes of
    /// round trips, past its termination grace.
    pub async fn park_all(&self) {
        use futures_util::StreamExt;
        let sessions = self.local_sessions();
        let parked = futures_util::stream::iter(sessions.iter().cloned())
            .map(|session| self.park_one(session))
            .buffer_unordered(PARK_IN_FLIGHT)
            .fold(0usize, |n, parked| {
                std::future::ready(n + usize::from(parked))
            })
            .await;
        if parked > 0 {
            info!(
                parked,
                of = sessions.len(),
                "sessions parked for other nodes"
            );
        }
    }

    /// Parks one session of the drain; true when it was. Its connection
    /// was closed already by the drain's announcement, unless it presented
    /// after that: then it learns here to resume.
    async fn park_one(&self, session: Arc<Session>) -> bool {
        self.park_closing(session, |conn| {
            conn.close_with(1012, "service restart", false)
        })
        .await
    }

    /// Ends every session of `user_id` on this node with 4015.
    pub async fn kick_user(&self, user_id: &str) {
        self.end_user_sessions(user_id, ErrorCode::Banned, "user is banned")
            .await;
    }

    /// Ends every session of `user_id` on this node with 4019 (the server
    /// API's disconnect).
    pub async fn disconnect_user(&self, user_id: &str) {
        self.end_user_sessions(
            user_id,
            ErrorCode::Disconnected,
            "disconnected by the server",
        )
        .await;
    }

    /// Ends the sessions of `user_id` (no resume) and closes their
    /// connections with the fatal `code`.
    async fn end_user_sessions(&self, user_id: &str, code: ErrorCode, why: &'static str) {
        let sessions: Vec<_> = self
            .local_sessions()
            .into_iter()
            .filter(|s| s.user.id == user_id)
            .collect();
        for session in sessions {
            if let Some(conn) = self.end_session(&session).await {
                self.metrics.error_sent(code);
                conn.close_fatal(code, why, false);
            }
        }
    }

    /// Ends the sessions whose resume window has run out.
    pub async fn sweep_expired(&self) {
        let now = Instant::now();
        let window = self.config.resume_window();
        let expired: Vec<_> = self
            .local_sessions()
            .into_iter()
            .filter(|s| s.expired(now, window))
            .collect();
        for session in expired {
            self.end_session(&session).await;
        }
    }

    /// Drain: GATEWAY_DOWN to every session, then close with 1012 once it
    /// is written. Sessions stay resumable.
    pub fn announce_shutdown(&self) {
        self.draining.store(true, Ordering::Release);
        let dispatch = Dispatch::new(
            Event::GatewayDown,
            &GatewayDown {
                reason: "node shutting down".into(),
                reconnect: true,
            },
        );
        for session in self.local_sessions() {
            if let Some(conn) = session.conn() {
                session.deliver(&dispatch);
                conn.close_with(1012, "service restart", false);
            }
        }
    }
}
