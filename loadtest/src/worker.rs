//! A worker: runs its share of a plan's clients in this process and
//! reports to the driver.
//!
//! # Flow
//!
//! 1. The worker launches its clients (`i mod K = w`) at its share of the
//!    ramp rate, at most `connect_concurrency` setting up at once. Each
//!    client task connects, presents, joins its channel, reports the
//!    outcome, then stays in its main loop (reading, heartbeating).
//! 2. Once every client has an outcome the worker emits
//!    [`Event::SetupDone`] and waits for the driver.
//! 3. [`Command::Go`] switches the [`Phase`] to `Publish`: publishers send
//!    their messages on a schedule counted from that instant, churners start
//!    dropping connections. When the publishing time has passed and every
//!    publisher has sent its share (at the latest, the publishing time
//!    plus a grace) the phase becomes `Drain`
//!    and the worker emits [`Event::Stopped`] with its exact sent and
//!    member counts, from which the driver computes the expected total.
//! 4. [`Command::Finish`] (or the end of the stdin pipe, or the hard time
//!    bound) switches to `Finish`: clients close with 1000 and end; the
//!    worker emits [`Event::Done`] with its [`Tally`].
//!
//! [`Event::Progress`] goes out every 250 ms throughout.
//!
//! All clients record into one [`Stats`] of atomics: a counter bump per
//! frame instead of a message to a collector task per frame.
//!
//! As a separate process (`--workers K`), the same loop runs behind
//! [`serve_stdio`]: the assignment arrives as the first line of stdin,
//! commands as further lines, and events leave as JSON lines on stdout.

use crate::client;
use crate::hist::SharedHistogram;
use crate::plan::Plan;
use crate::report::Tally;
use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch, Notify, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{sleep_until, Instant};

/// Where a run is; every client watches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Connecting and joining; after that, holding.
    Setup,
    /// Publishers send; churners drop and resume.
    Publish,
    /// Sending is over; stragglers are still counted.
    Drain,
    /// Close and report.
    Finish,
}

/// Driver → worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Command {
    Go,
    Finish,
}

/// Live counters, cumulative.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub setup_ok: u64,
    pub setup_failed: u64,
    pub sent: u64,
    pub delivered: u64,
    pub resumes: u64,
    pub problems: u64,
    pub rate_limited: u64,
}

impl Progress {
    pub fn add(&mut self, o: &Progress) {
        self.setup_ok += o.setup_ok;
        self.setup_failed += o.setup_failed;
        self.sent += o.sent;
        self.delivered += o.delivered;
        self.resumes += o.resumes;
        self.problems += o.problems;
        self.rate_limited += o.rate_limited;
    }
}

/// Worker → driver.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Progress(Progress),
    SetupDone(Progress),
    /// Publishing is over in this worker: exact counts for the expected
    /// total.
    Stopped {
        sent: Vec<u64>,
        members: Vec<u64>,
    },
    Done(Box<Tally>),
    Failed {
        error: String,
    },
}

/// The counters all of a worker's clients record into.
pub struct Stats {
    pub setup_ok: AtomicU64,
    pub setup_failed: AtomicU64,
    pub ok_per_url: Vec<AtomicU64>,
    pub members: Vec<AtomicU64>,
    pub sent: Vec<AtomicU64>,
    pub delivered: AtomicU64,
    pub duplicated: AtomicU64,
    pub seq_gaps: AtomicU64,
    pub order_violations: AtomicU64,
    pub foreign: AtomicU64,
    pub resumes: AtomicU64,
    pub resumed_false: AtomicU64,
    pub resume_failed: AtomicU64,
    pub rate_limited: AtomicU64,
    pub heartbeat_acks: AtomicU64,
    pub malformed: AtomicU64,
    pub latency: SharedHistogram,
    pub connect_latency: SharedHistogram,
    pub resume_latency: SharedHistogram,
    pub heartbeat_latency: SharedHistogram,
    /// Rare events, keyed by code or reason; never touched per message.
    pub errors: Mutex<BTreeMap<String, u64>>,
    pub closes: Mutex<BTreeMap<String, u64>>,
    pub setup_errors: Mutex<BTreeMap<String, u64>>,
    /// Microseconds from the worker's start to the last setup outcome.
    pub last_setup_us: AtomicU64,
    /// The latest of the clients' last deliveries, folded in as each ends.
    pub last_delivery_us: AtomicU64,
}

fn counters(n: usize) -> Vec<AtomicU64> {
    (0..n).map(|_| AtomicU64::new(0)).collect()
}

fn load(v: &[AtomicU64]) -> Vec<u64> {
    v.iter().map(|a| a.load(Ordering::Relaxed)).collect()
}

pub(crate) fn bump(map: &Mutex<BTreeMap<String, u64>>, key: String) {
    let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
    *map.entry(key).or_default() += 1;
}

impl Stats {
    fn new(plan: &Plan) -> Self {
        Self {
            setup_ok: AtomicU64::new(0),
            setup_failed: AtomicU64::new(0),
            ok_per_url: counters(plan.url_count()),
            members: counters(plan.tracked_channels()),
            sent: counters(plan.tracked_channels()),
            delivered: AtomicU64::new(0),
            duplicated: AtomicU64::new(0),
            seq_gaps: AtomicU64::new(0),
            order_violations: AtomicU64::new(0),
            foreign: AtomicU64::new(0),
            resumes: AtomicU64::new(0),
            resumed_false: AtomicU64::new(0),
            resume_failed: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            heartbeat_acks: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
            latency: SharedHistogram::default(),
            connect_latency: SharedHistogram::default(),
            resume_latency: SharedHistogram::default(),
            heartbeat_latency: SharedHistogram::default(),
            errors: Mutex::default(),
            closes: Mutex::default(),
            setup_errors: Mutex::default(),
            last_setup_us: AtomicU64::new(0),
            last_delivery_us: AtomicU64::new(0),
        }
    }

    fn map(m: &Mutex<BTreeMap<String, u64>>) -> BTreeMap<String, u64> {
        m.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn progress(&self) -> Progress {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let rare = |m: &Mutex<BTreeMap<String, u64>>| Self::map(m).values().sum::<u64>();
        Progress {
            setup_ok: r(&self.setup_ok),
            setup_failed: r(&self.setup_failed),
            sent: load(&self.sent).iter().sum(),
            delivered: r(&self.delivered),
            resumes: r(&self.resumes),
            problems: r(&self.duplicated)
                + r(&self.seq_gaps)
                + r(&self.order_violations)
                + r(&self.malformed)
                + r(&self.resume_failed)
                + rare(&self.errors)
                + rare(&self.closes),
            rate_limited: r(&self.rate_limited),
        }
    }

    fn tally(&self, clients: u64) -> Tally {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Tally {
            clients,
            connect_ok: r(&self.setup_ok),
            connect_failed: r(&self.setup_failed),
            connect_s: r(&self.last_setup_us) as f64 / 1e6,
            connect_latency: self.connect_latency.snapshot(),
            ok_per_url: load(&self.ok_per_url),
            members: load(&self.members),
            sent: load(&self.sent),
            delivered: r(&self.delivered),
            duplicated: r(&self.duplicated),
            seq_gaps: r(&self.seq_gaps),
            order_violations: r(&self.order_violations),
            foreign: r(&self.foreign),
            latency: self.latency.snapshot(),
            last_delivery_us: r(&self.last_delivery_us),
            resumes: r(&self.resumes),
            resumed_false: r(&self.resumed_false),
            resume_failed: r(&self.resume_failed),
            resume_latency: self.resume_latency.snapshot(),
            rate_limited: r(&self.rate_limited),
            errors: Self::map(&self.errors),
            closes: Self::map(&self.closes),
            setup_errors: Self::map(&self.setup_errors),
            heartbeat_acks: r(&self.heartbeat_acks),
            heartbeat_latency: self.heartbeat_latency.snapshot(),
            malformed: r(&self.malformed),
        }
    }
}

/// What every client task of a worker shares.
pub struct Ctx {
    pub plan: Plan,
    pub stats: Stats,
    pub phase: watch::Sender<Phase>,
    /// When publishing started: the origin of every publisher's schedule.
    pub go_at: OnceLock<Instant>,
    /// The same instant on the wall clock, in µs (nonces carry wall-clock
    /// times, which the worker processes of one machine share).
    pub go_wall_us: OnceLock<u64>,
    /// Publishers set up and not yet done sending.
    pub active_publishers: AtomicUsize,
    /// Woken on every setup outcome.
    pub setup_notify: Notify,
    /// Caps setups in flight.
    pub setup_permits: Arc<Semaphore>,
    /// The `content` of every message.
    pub content: String,
    pub started: Instant,
    /// The 4008 hint is printed once per process.
    pub rate_hint_shown: AtomicBool,
    /// Every client of this worker has its setup outcome: from here on
    /// heartbeat round trips are timed (during the ramp, setups delay
    /// them; that is the connect latency's story, not the heartbeat's).
    pub all_set_up: AtomicBool,
}

impl Ctx {
    pub fn new(plan: Plan) -> Arc<Self> {
        let (phase, _) = watch::channel(Phase::Setup);
        Arc::new(Self {
            stats: Stats::new(&plan),
            setup_permits: Arc::new(Semaphore::new(plan.connect_concurrency)),
            content: "x".repeat(plan.content_bytes.max(1)),
            plan,
            phase,
            go_at: OnceLock::new(),
            go_wall_us: OnceLock::new(),
            active_publishers: AtomicUsize::new(0),
            setup_notify: Notify::new(),
            started: Instant::now(),
            rate_hint_shown: AtomicBool::new(false),
            all_set_up: AtomicBool::new(false),
        })
    }

    pub fn phase(&self) -> Phase {
        *self.phase.borrow()
    }

    fn set_phase(&self, phase: Phase) {
        self.phase.send_replace(phase);
    }

    /// Records a client's setup outcome.
    pub fn setup_outcome(&self) {
        let us = self.started.elapsed().as_micros() as u64;
        self.stats.last_setup_us.fetch_max(us, Ordering::Relaxed);
        self.setup_notify.notify_one();
    }

    /// Prints how to lift the rate limit, once.
    pub fn rate_limited(&self) {
        self.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
        if !self.rate_hint_shown.swap(true, Ordering::Relaxed) {
            eprintln!(
                "loadtest: the node answered 4008 RATE_LIMITED: publishers send faster than \
                 the per-session limit (default 120 per 60 s). Start the nodes with e.g. \
                 GATEWAY_RATE_LIMIT_COUNT=1000000 for load tests."
            );
        }
    }
}

/// How long publishers may run late before the worker stops them.
const PUBLISH_GRACE: Duration = Duration::from_secs(5);
/// How long clients get to close cleanly at the end.
const FINISH_GRACE: Duration = Duration::from_secs(5);
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// Runs worker `index` of `plan` until finished; events go to `events`.
pub async fn run(
    plan: Plan,
    index: usize,
    mut commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event>,
) -> Tally {
    let mine: Vec<usize> = (0..plan.clients).filter(|&i| plan.runs(index, i)).collect();
    let deadline = Instant::now() + Duration::from_secs_f64(plan.max_run_s);
    let ramp_step = Duration::from_secs_f64(plan.workers as f64 / plan.ramp_per_s);
    let publishing_s = plan.duration_s;
    let ctx = Ctx::new(plan);
    let mut tasks = JoinSet::new();
    let mut launched = 0usize;
    let mut setup_reported = false;
    // While publishing: (the earliest, the latest) moment to stop. Not
    // before the planned duration, even when this worker's publishers are
    // done (or it has none), so its churners keep churning meanwhile.
    let mut publish_until: Option<(Instant, Instant)> = None;
    let mut progress = tokio::time::interval(PROGRESS_EVERY);

    loop {
        let setup_done = {
            let s = &ctx.stats;
            (s.setup_ok.load(Ordering::Relaxed) + s.setup_failed.load(Ordering::Relaxed)) as usize
                == mine.len()
        };
        if setup_done && !setup_reported {
            setup_reported = true;
            ctx.all_set_up.store(true, Ordering::Relaxed);
            let _ = events.send(Event::SetupDone(ctx.stats.progress())).await;
        }
        if let Some((earliest, latest)) = publish_until {
            let now = Instant::now();
            let publishers_done = ctx.active_publishers.load(Ordering::Relaxed) == 0;
            if (publishers_done && now >= earliest) || now >= latest {
                publish_until = None;
                ctx.set_phase(Phase::Drain);
                let stopped = Event::Stopped {
                    sent: load(&ctx.stats.sent),
                    members: load(&ctx.stats.members),
                };
                let _ = events.send(stopped).await;
            }
        }
        let next_launch = ctx.started + ramp_step * launched as u32;
        let publish_check = publish_until.map(|_| Instant::now() + Duration::from_millis(20));
        tokio::select! {
            _ = sleep_until(next_launch), if launched < mine.len() => {
                tasks.spawn(client::run(ctx.clone(), mine[launched]));
                launched += 1;
            }
            _ = ctx.setup_notify.notified(), if !setup_reported => {}
            _ = sleep_until(publish_check.unwrap_or(deadline)), if publish_check.is_some() => {}
            _ = progress.tick() => {
                let _ = events.send(Event::Progress(ctx.stats.progress())).await;
            }
            cmd = commands.recv() => match cmd {
                Some(Command::Go) => {
                    if ctx.phase() == Phase::Setup {
                        let now = Instant::now();
                        let _ = ctx.go_wall_us.set(crate::client::now_us());
                        let _ = ctx.go_at.set(now);
                        let planned = now + Duration::from_secs_f64(publishing_s);
                        publish_until = Some((planned, planned + PUBLISH_GRACE));
                        ctx.set_phase(Phase::Publish);
                    }
                }
                Some(Command::Finish) => break,
                // The driver is gone: stop rather than run unattended.
                None => break,
            },
            _ = sleep_until(deadline) => {
                eprintln!("loadtest worker {index}: hard time bound reached, finishing");
                break;
            }
        }
    }

    ctx.set_phase(Phase::Finish);
    let drained = tokio::time::timeout(FINISH_GRACE, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tasks.abort_all();
    }
    let tally = ctx.stats.tally(mine.len() as u64);
    let _ = events.send(Event::Done(Box::new(tally.clone()))).await;
    tally
}

/// The first line a worker process reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Assignment {
    pub index: usize,
    pub plan: Plan,
}

/// Reads the assignment (blocking: done before the runtime exists, since
/// the plan says how many threads the runtime gets).
pub fn read_assignment() -> Result<Assignment> {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("reading the worker assignment from stdin")?;
    serde_json::from_str(&line).context("parsing the worker assignment")
}

/// Runs a worker process: commands from stdin, events as JSON lines on
/// stdout, until finished.
pub async fn serve_stdio(assignment: Assignment) -> Result<()> {
    let (cmd_tx, cmd_rx) = mpsc::channel(8);
    let (ev_tx, mut ev_rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            match serde_json::from_str::<Command>(&line) {
                Ok(cmd) => {
                    if cmd_tx.send(cmd).await.is_err() {
                        return;
                    }
                }
                Err(e) => eprintln!("loadtest worker: bad command {line:?}: {e}"),
            }
        }
        // EOF: dropping `cmd_tx` tells the worker its driver is gone.
    });
    let worker = tokio::spawn(run(assignment.plan, assignment.index, cmd_rx, ev_tx));
    let mut stdout = tokio::io::stdout();
    while let Some(event) = ev_rx.recv().await {
        let mut line = serde_json::to_vec(&event)?;
        line.push(b'\n');
        stdout.write_all(&line).await?;
        stdout.flush().await?;
    }
    worker.await?;
    Ok(())
}
