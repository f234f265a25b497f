//! `smoke`: two clients exercise one of everything and every step is
//! checked against PROTOCOL.md. Used by `helm test` and CI: any violation
//! fails the run.
//!
//! # Flow
//!
//! Alice presents on the first URL, Bob on the second (the first again when
//! there is one). Then, each step printed as a PASS or FAIL line:
//! HELLO, PRESENT/READY, heartbeat, CHANNEL_ADD (seen by both: it is
//! cluster-wide), CHANNEL_MOVE of both (Alice sees ROOM_USER_ADD for Bob),
//! MESSAGE_CREATE (Bob receives Alice's message with its nonce, Alice her
//! own), START_TYPING (Alice sees Bob typing), MESSAGE_DELETE (both), then
//! Bob's TCP connection drops without a close frame, Alice writes while he
//! is away, and Bob resumes on the next URL of the list: READY must say
//! `resumed: true` with the same session and replay exactly the missed
//! message with the next `s`. Finally Bob closes with 1000 and Alice sees
//! ROOM_USER_REMOVE.
//!
//! Throughout, every dispatch of both clients must be numbered 1, 2, 3, …
//! and no error (150) may arrive; the first failure stops the run, since
//! later steps build on earlier ones.
//!
//! This scenario uses the full-parse [`Client`]: it sends a handful of
//! messages, and checks their contents.

use crate::plan::random_run_id;
use gateway_shared::protocol::{
    ChannelAdd, ChannelMove, Event, FunctionCode, Hello, MessageCreate, MessageDelete, Ready,
    RoomUser, StartTyping, MAX_PAYLOAD,
};
use gateway_shared::{token, Client, ServerMessage};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::time::{Duration, Instant};

/// How long any one expected message may take.
const WAIT: Duration = Duration::from_secs(5);

/// One checked step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    /// What was wrong, for a failed step.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// The outcome of a smoke run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SmokeReport {
    pub scenario: String,
    pub run_id: String,
    pub passed: bool,
    pub checks: Vec<Check>,
    pub duration_s: f64,
}

type Step<T> = Result<T, String>;

/// A presented client whose dispatch numbering is checked on every message.
struct Peer {
    name: &'static str,
    client: Client,
    token: String,
    user_id: String,
    session_id: u64,
    last_s: u64,
}

impl Peer {
    /// The next message; a gap, a duplicate or an error is a failure.
    async fn next(&mut self) -> Step<ServerMessage> {
        let msg = self
            .client
            .next_message(WAIT)
            .await
            .map_err(|e| format!("{}: {e}", self.name))?;
        if msg.f == FunctionCode::Dispatch.code() {
            let s = msg
                .s
                .ok_or_else(|| format!("{}: dispatch without s: {}", self.name, msg.text))?;
            if s != self.last_s + 1 {
                return Err(format!(
                    "{}: dispatch s={s} after s={} (gap or duplicate): {}",
                    self.name, self.last_s, msg.text
                ));
            }
            self.last_s = s;
        }
        if let Some(err) = msg.error() {
            return Err(format!("{}: unexpected error {err:?}", self.name));
        }
        Ok(msg)
    }

    /// Skips messages (still checking them) until `pred` holds, within WAIT.
    async fn wait_for(
        &mut self,
        what: &str,
        mut pred: impl FnMut(&ServerMessage) -> bool,
    ) -> Step<ServerMessage> {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            let msg = self.next().await?;
            if pred(&msg) {
                return Ok(msg);
            }
        }
        Err(format!("{}: no {what} within {WAIT:?}", self.name))
    }

    /// Waits for a dispatch of `event` whose typed body satisfies `pred`.
    async fn dispatch<T: serde::de::DeserializeOwned>(
        &mut self,
        event: Event,
        mut pred: impl FnMut(&T) -> bool,
    ) -> Step<T> {
        let msg = self
            .wait_for(event.name(), |m| {
                m.is_dispatch(event) && m.body::<T>().is_ok_and(|b| pred(&b))
            })
            .await?;
        msg.body().map_err(|e| e.to_string())
    }

    async fn execute(&mut self, event: Event, cnf: serde_json::Value) -> Step<()> {
        self.client
            .execute(event.name(), cnf, None)
            .await
            .map_err(|e| format!("{}: sending {}: {e}", self.name, event.name()))
    }
}

/// Runs the smoke test; `on_check` sees every step as it finishes.
/// What the smoke test mints its tokens with: the cluster's secret, and
/// the issuer and audience it requires, if any.
#[derive(Debug, Clone, Copy)]
pub struct Minter<'a> {
    pub secret: &'a str,
    pub issuer: Option<&'a str>,
    pub audience: Option<&'a str>,
}

impl Minter<'_> {
    /// A token of the cluster for user `sub`, valid `ttl_s` seconds.
    pub fn token(&self, sub: &str, name: &str, ttl_s: u64) -> String {
        let claims =
            token::claims(sub, name, false, ttl_s).with_iss_aud(self.issuer, self.audience);
        token::mint(self.secret.as_bytes(), &claims)
    }
}

impl<'a> From<&'a str> for Minter<'a> {
    fn from(secret: &'a str) -> Self {
        Self {
            secret,
            issuer: None,
            audience: None,
        }
    }
}

pub async fn run(
    urls: &[String],
    minter: Minter<'_>,
    mut on_check: impl FnMut(&Check),
) -> SmokeReport {
    let started = Instant::now();
    let run_id = random_run_id();
    let mut report = SmokeReport {
        scenario: "smoke".into(),
        run_id: run_id.clone(),
        ..Default::default()
    };
    let mut record = |name: &str, result: Step<()>| -> bool {
        let check = Check {
            name: name.into(),
            ok: result.is_ok(),
            detail: result.err().unwrap_or_default(),
        };
        on_check(&check);
        let ok = check.ok;
        report.checks.push(check);
        ok
    };
    // The whole script is bounded, whatever the node does.
    let script = steps(urls, minter, &run_id, &mut record);
    match tokio::time::timeout(Duration::from_secs(120), script).await {
        Ok(()) => {}
        Err(_) => {
            record("time bound", Err("the smoke test took over 120 s".into()));
        }
    }
    report.passed = !report.checks.is_empty() && report.checks.iter().all(|c| c.ok);
    report.duration_s = started.elapsed().as_secs_f64();
    report
}

/// Runs the steps in order, stopping at the first failure.
async fn steps(
    urls: &[String],
    minter: Minter<'_>,
    run_id: &str,
    record: &mut impl FnMut(&str, Step<()>) -> bool,
) {
    if urls.is_empty() {
        record("urls", Err("no URL given".into()));
        return;
    }
    let url_a = &urls[0];
    let url_b = &urls[1 % urls.len()];
    let url_resume = &urls[2 % urls.len()];
    macro_rules! step {
        ($name:expr, $body:expr) => {
            match $body {
                Ok(v) => {
                    record($name, Ok(()));
                    v
                }
                Err(e) => {
                    record($name, Err(e));
                    return;
                }
            }
        };
    }

    let mut alice = step!(
        "hello and present (alice)",
        present(url_a, minter, run_id, "alice").await
    );
    step!(
        "heartbeat answered",
        async {
            alice.client.heartbeat().await.map_err(|e| e.to_string())?;
            alice
                .wait_for("heartbeat", |m| m.f == FunctionCode::Heartbeat.code())
                .await
                .map(drop)
        }
        .await
    );
    let mut bob = step!(
        "hello and present (bob)",
        present(url_b, minter, run_id, "bob").await
    );

    let channel = format!("lt-{run_id}-smoke");
    let alice_id = alice.user_id.clone();
    step!(
        "CHANNEL_ADD reaches every session",
        async {
            alice
                .execute(
                    Event::ChannelAdd,
                    json!({"name": channel, "topic": "smoke"}),
                )
                .await?;
            for peer in [&mut alice, &mut bob] {
                let add: ChannelAdd = peer
                    .dispatch(Event::ChannelAdd, |b: &ChannelAdd| b.name == channel)
                    .await?;
                if add.topic != "smoke" || add.created_by.id != alice_id {
                    return Err(format!("{}: CHANNEL_ADD body {add:?}", peer.name));
                }
            }
            Ok(())
        }
        .await
    );

    step!(
        "CHANNEL_MOVE and ROOM_USER_ADD",
        async {
            alice
                .execute(Event::ChannelMove, json!({"channel": channel}))
                .await?;
            let moved: ChannelMove = alice
                .dispatch(Event::ChannelMove, |_: &ChannelMove| true)
                .await?;
            if moved.channel != channel || moved.member_count != 1 {
                return Err(format!("alice: CHANNEL_MOVE body {moved:?}"));
            }
            bob.execute(Event::ChannelMove, json!({"channel": channel}))
                .await?;
            let moved: ChannelMove = bob
                .dispatch(Event::ChannelMove, |_: &ChannelMove| true)
                .await?;
            if moved.channel != channel || moved.member_count != 2 {
                return Err(format!("bob: CHANNEL_MOVE body {moved:?}"));
            }
            let bob_id = bob.user_id.clone();
            alice
                .dispatch(Event::RoomUserAdd, |r: &RoomUser| {
                    r.channel == channel && r.user.id == bob_id
                })
                .await
                .map(drop)
        }
        .await
    );

    let nonce = format!("{run_id}-n1");
    let message_id = step!(
        "MESSAGE_CREATE reaches the channel, sender included",
        async {
            alice
                .execute(
                    Event::MessageCreate,
                    json!({"content": "smoke hello", "nonce": nonce}),
                )
                .await?;
            let mine: MessageCreate = alice
                .dispatch(Event::MessageCreate, |m: &MessageCreate| {
                    m.nonce.as_deref() == Some(nonce.as_str())
                })
                .await?;
            let theirs: MessageCreate = bob
                .dispatch(Event::MessageCreate, |_: &MessageCreate| true)
                .await?;
            if theirs != mine || mine.content != "smoke hello" || mine.channel != channel {
                return Err(format!("bodies differ or are wrong: {mine:?} / {theirs:?}"));
            }
            if mine.author.id != alice.user_id {
                return Err(format!("author is {:?}", mine.author));
            }
            Ok(mine.id)
        }
        .await
    );

    step!(
        "START_TYPING reaches the others",
        async {
            bob.execute(Event::StartTyping, json!({})).await?;
            let bob_id = bob.user_id.clone();
            alice
                .dispatch(Event::StartTyping, |t: &StartTyping| {
                    t.user.id == bob_id && t.channel == channel
                })
                .await
                .map(drop)
        }
        .await
    );

    step!(
        "MESSAGE_DELETE reaches the channel",
        async {
            alice
                .execute(Event::MessageDelete, json!({"id": message_id}))
                .await?;
            for peer in [&mut alice, &mut bob] {
                peer.dispatch(Event::MessageDelete, |d: &MessageDelete| {
                    d.id == message_id && d.channel == channel
                })
                .await?;
            }
            Ok(())
        }
        .await
    );

    let bob = step!(
        "resume after a dropped connection replays what was missed",
        async {
            let session_id = bob.session_id;
            let last_s = bob.last_s;
            let Peer {
                client,
                token,
                user_id,
                ..
            } = bob;
            // No close frame: the node sees the TCP connection end.
            client.abort();
            alice
                .execute(Event::MessageCreate, json!({"content": "while away"}))
                .await?;
            alice
                .dispatch(Event::MessageCreate, |m: &MessageCreate| {
                    m.content == "while away"
                })
                .await?;
            let (mut client, hello) = Client::connect_hello(url_resume)
                .await
                .map_err(|e| format!("bob: reconnecting: {e}"))?;
            check_hello(&hello)?;
            let ready = client
                .present(&token, Some((session_id, Some(last_s))))
                .await
                .map_err(|e| format!("bob: resume: {e}"))?;
            if !ready.resumed || ready.session_id != session_id {
                return Err(format!(
                    "bob: READY resumed={} session_id={} (wanted true, {session_id})",
                    ready.resumed, ready.session_id
                ));
            }
            let mut bob = Peer {
                name: "bob",
                client,
                token,
                user_id,
                session_id,
                last_s,
            };
            let missed = bob.next().await?;
            let body: MessageCreate = missed.body().map_err(|e| e.to_string())?;
            if !missed.is_dispatch(Event::MessageCreate) || body.content != "while away" {
                return Err(format!("bob: first replayed dispatch is {}", missed.text));
            }
            Ok(bob)
        }
        .await
    );
    let mut bob = bob;

    step!(
        "close 1000 ends the session (ROOM_USER_REMOVE)",
        async {
            bob.client.close(1000).await.map_err(|e| e.to_string())?;
            let bob_id = bob.user_id.clone();
            alice
                .dispatch(Event::RoomUserRemove, |r: &RoomUser| {
                    r.user.id == bob_id && r.channel == channel
                })
                .await?;
            let _ = alice.client.close(1000).await;
            Ok(())
        }
        .await
    );
}

fn check_hello(hello: &Hello) -> Step<()> {
    if hello.hb_int == 0 || hello.max_payload != MAX_PAYLOAD {
        return Err(format!("HELLO {hello:?}"));
    }
    Ok(())
}

async fn present(url: &str, minter: Minter<'_>, run_id: &str, name: &'static str) -> Step<Peer> {
    let user_id = format!("lt-{run_id}-{name}");
    let token = minter.token(&user_id, name, 3600);
    let (mut client, hello) = Client::connect_hello(url)
        .await
        .map_err(|e| format!("{name}: connecting to {url}: {e}"))?;
    check_hello(&hello)?;
    let ready: Ready = client
        .present(&token, None)
        .await
        .map_err(|e| format!("{name}: PRESENT: {e}"))?;
    if ready.resumed
        || ready.session_id == 0
        || ready.user.id != user_id
        || ready.channel.is_empty()
    {
        return Err(format!("{name}: READY {ready:?}"));
    }
    Ok(Peer {
        name,
        client,
        token,
        user_id,
        session_id: ready.session_id,
        last_s: 0,
    })
}
