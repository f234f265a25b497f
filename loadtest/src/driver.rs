//! The driver: runs one scenario of a [`Plan`] end to end over its workers
//! and builds the [`Report`].
//!
//! # Flow
//!
//! 1. Scrape every node's `/metrics` (memory before the run).
//! 2. Create the plan's channels from one setup session, before any load
//!    client connects, so no client receives a storm of CHANNEL_ADD
//!    dispatches. An existing channel (4014) is fine; 4008 is waited out.
//! 3. Start the workers: one in this process (`--workers 1`), or K worker
//!    processes (this executable re-run with the hidden `__worker`
//!    subcommand, see [`crate::worker`]); from here on both look the same,
//!    a command sender and a stream of events.
//! 4. Wait until every worker has set up its clients.
//! 5. `connect`: hold for `--hold-s`, then scrape memory again.
//!    `fanout`/`churn`: send Go, wait until every worker has stopped
//!    publishing (each reports its exact sent and member counts), compute
//!    the expected deliveries, and drain until they all arrived or the
//!    drain time is over.
//! 6. Finish, collect every worker's tally, merge, report.
//!
//! A progress line goes to stderr every second. The whole run is bounded
//! by the plan's `max_run_s`; workers bound themselves by it as well.

use crate::client::{self, next_text};
use crate::nodes;
use crate::plan::{Plan, Scenario};
use crate::report::{NodeReport, Report, Tally, Timing};
use crate::scan;
use crate::worker::{self, Assignment, Command, Event, Progress};
use anyhow::{anyhow, bail, Context as _, Result};
use gateway_shared::protocol::{ErrorCode, Event as ProtocolEvent, FunctionCode};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin};
use tokio::sync::mpsc;
use tokio::time::{sleep, sleep_until, timeout, timeout_at, Instant};

/// How the driver runs, beside the plan.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Print a progress line every second on stderr.
    pub progress: bool,
    /// The executable worker processes run (default: this one).
    pub worker_exe: Option<PathBuf>,
}

/// Runs the plan; fails only when the run itself could not happen.
pub async fn run(plan: Plan, opts: &Options) -> Result<Report> {
    plan.validate()?;
    // Workers stop by themselves at `max_run_s`; the margin lets their
    // final tallies arrive.
    let bound = Duration::from_secs_f64(plan.max_run_s + 15.0);
    match timeout(bound, run_inner(&plan, opts)).await {
        Ok(result) => result,
        Err(_) => bail!(
            "the run exceeded its hard time bound of {:.0} s (--max-run-s)",
            plan.max_run_s
        ),
    }
}

/// One worker, as the driver sees it.
enum Link {
    Local(mpsc::Sender<Command>),
    Process {
        /// `None` once closed: EOF tells the worker its driver is done.
        stdin: Option<ChildStdin>,
        /// Boxed: a `Child` is large, and links sit in a `Vec`.
        child: Box<Child>,
    },
}

impl Link {
    async fn send(&mut self, cmd: Command) {
        match self {
            Link::Local(tx) => {
                let _ = tx.send(cmd).await;
            }
            Link::Process {
                stdin: Some(stdin), ..
            } => {
                let mut line = serde_json::to_vec(&cmd).expect("commands serialize");
                line.push(b'\n');
                let _ = stdin.write_all(&line).await;
                let _ = stdin.flush().await;
            }
            Link::Process { stdin: None, .. } => {}
        }
    }
}

/// All workers and what they reported so far.
struct Fleet {
    links: Vec<Link>,
    events: mpsc::Receiver<(usize, Event)>,
    progress: Vec<Progress>,
    setup_done: Vec<bool>,
    stopped: Vec<Option<(Vec<u64>, Vec<u64>)>>,
    done: Vec<Option<Tally>>,
    failed: Vec<Option<String>>,
    show: bool,
    started: Instant,
    label: &'static str,
    last_line: Instant,
    last_delivered: u64,
    clients: usize,
}

impl Fleet {
    async fn start(plan: &Plan, opts: &Options) -> Result<Self> {
        let (tx, events) = mpsc::channel(64 * plan.workers);
        let mut links = Vec::with_capacity(plan.workers);
        if plan.workers == 1 {
            let (cmd_tx, cmd_rx) = mpsc::channel(8);
            let (ev_tx, mut ev_rx) = mpsc::channel(64);
            tokio::spawn(worker::run(plan.clone(), 0, cmd_rx, ev_tx));
            let tx = tx.clone();
            tokio::spawn(async move {
                while let Some(ev) = ev_rx.recv().await {
                    if tx.send((0, ev)).await.is_err() {
                        return;
                    }
                }
            });
            links.push(Link::Local(cmd_tx));
        } else {
            let exe = match &opts.worker_exe {
                Some(exe) => exe.clone(),
                None => std::env::current_exe().context("finding this executable")?,
            };
            for index in 0..plan.workers {
                links.push(spawn_process(&exe, index, plan, tx.clone()).await?);
            }
        }
        let n = plan.workers;
        let now = Instant::now();
        Ok(Self {
            links,
            events,
            progress: vec![Progress::default(); n],
            setup_done: vec![false; n],
            stopped: vec![None; n],
            done: vec![None; n],
            failed: vec![None; n],
            show: opts.progress,
            started: now,
            label: "setup",
            last_line: now,
            last_delivered: 0,
            clients: plan.clients,
        })
    }

    fn apply(&mut self, w: usize, event: Event) {
        match event {
            Event::Progress(p) => self.progress[w] = p,
            Event::SetupDone(p) => {
                self.progress[w] = p;
                self.setup_done[w] = true;
            }
            Event::Stopped { sent, members } => self.stopped[w] = Some((sent, members)),
            Event::Done(tally) => self.done[w] = Some(*tally),
            Event::Failed { error } => self.failed[w] = Some(error),
        }
    }

    fn total(&self) -> Progress {
        let mut total = Progress::default();
        for p in &self.progress {
            total.add(p);
        }
        total
    }

    fn all_done(&self) -> bool {
        self.done.iter().all(Option::is_some)
    }

    fn print_line(&mut self) {
        let now = Instant::now();
        let p = self.total();
        let dt = now.duration_since(self.last_line).as_secs_f64().max(1e-3);
        let rate = p.delivered.saturating_sub(self.last_delivered) as f64 / dt;
        self.last_line = now;
        self.last_delivered = p.delivered;
        if self.show {
            eprintln!(
                "[{:>6.1}s] {:<7} clients {}/{} (failed {}) | sent {} | delivered {} ({:.0}/s) | \
                 resumes {} | rate-limited {} | problems {}",
                self.started.elapsed().as_secs_f64(),
                self.label,
                p.setup_ok,
                self.clients,
                p.setup_failed,
                p.sent,
                p.delivered,
                rate,
                p.resumes,
                p.rate_limited,
                p.problems
            );
        }
    }

    /// Handles events until `cond` holds (true), `deadline` passes or every
    /// worker is done (false). A failed worker fails the run.
    async fn until(
        &mut self,
        deadline: Option<Instant>,
        mut cond: impl FnMut(&Fleet) -> bool,
    ) -> Result<bool> {
        loop {
            if let Some((w, error)) = self
                .failed
                .iter()
                .enumerate()
                .find_map(|(w, e)| e.as_ref().map(|e| (w, e)))
            {
                bail!("worker {w} failed: {error}");
            }
            if cond(self) {
                return Ok(true);
            }
            if self.all_done() {
                return Ok(false);
            }
            let far = Instant::now() + Duration::from_secs(3600);
            tokio::select! {
                event = self.events.recv() => match event {
                    Some((w, event)) => self.apply(w, event),
                    None => bail!("every worker is gone"),
                },
                _ = sleep_until(self.last_line + Duration::from_secs(1)) => self.print_line(),
                _ = sleep_until(deadline.unwrap_or(far)), if deadline.is_some() => return Ok(false),
            }
        }
    }

    async fn broadcast(&mut self, cmd: Command) {
        for link in &mut self.links {
            link.send(cmd).await;
        }
    }

    /// Finishes every worker and returns the merged tally.
    async fn finish(&mut self) -> Result<Tally> {
        self.label = "finish";
        self.broadcast(Command::Finish).await;
        let deadline = Instant::now() + Duration::from_secs(20);
        self.until(Some(deadline), Fleet::all_done).await?;
        let mut tally = Tally::default();
        for (w, done) in self.done.iter().enumerate() {
            match done {
                Some(t) => tally.merge(t),
                None => bail!("worker {w} sent no final report"),
            }
        }
        for link in &mut self.links {
            if let Link::Process { stdin, child } = link {
                drop(stdin.take());
                if timeout(Duration::from_secs(5), child.wait()).await.is_err() {
                    let _ = child.start_kill();
                }
            }
        }
        Ok(tally)
    }
}

async fn spawn_process(
    exe: &PathBuf,
    index: usize,
    plan: &Plan,
    tx: mpsc::Sender<(usize, Event)>,
) -> Result<Link> {
    let mut child = tokio::process::Command::new(exe)
        .arg("__worker")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting worker process {}", exe.display()))?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let stdout = child.stdout.take().expect("stdout is piped");
    // The assignment (with the secret) goes through the pipe, not argv,
    // where any user could read it.
    let mut line = serde_json::to_vec(&Assignment {
        index,
        plan: plan.clone(),
    })?;
    line.push(b'\n');
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let mut saw_done = false;
        while let Ok(Some(line)) = lines.next_line().await {
            let event = match serde_json::from_str::<Event>(&line) {
                Ok(event) => event,
                Err(e) => Event::Failed {
                    error: format!("unreadable event {line:?}: {e}"),
                },
            };
            saw_done |= matches!(event, Event::Done(_));
            if tx.send((index, event)).await.is_err() {
                return;
            }
        }
        if !saw_done {
            let error = "the worker process exited without a report".to_string();
            let _ = tx.send((index, Event::Failed { error })).await;
        }
    });
    // Written after the reader exists, so a worker that dies at once is
    // still reported.
    stdin
        .write_all(&line)
        .await
        .context("sending the worker its assignment")?;
    stdin.flush().await?;
    Ok(Link::Process {
        stdin: Some(stdin),
        child: Box::new(child),
    })
}

/// Distinct nodes of the URL list, each with the indices of its URLs.
fn node_groups(plan: &Plan) -> Vec<(String, Vec<usize>)> {
    let mut groups: Vec<(String, Vec<usize>)> = Vec::new();
    for (i, url) in plan.urls.iter().enumerate() {
        let key = nodes::authority(url).unwrap_or(url).to_owned();
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => v.push(i),
            None => groups.push((key, vec![i])),
        }
    }
    groups
}

/// The `--redis` servers' CPU seconds so far, all together (`None` if
/// there are none, or one did not answer).
async fn redis_cpu(plan: &Plan) -> Option<f64> {
    if plan.redis.is_empty() {
        return None;
    }
    let mut total = 0.0;
    for url in &plan.redis {
        total += nodes::redis_cpu(url).await?;
    }
    Some(total)
}

async fn scrape_all(plan: &Plan) -> Vec<Option<nodes::Sample>> {
    let mut out = Vec::new();
    for (_, urls) in node_groups(plan) {
        out.push(nodes::scrape(&plan.urls[urls[0]]).await);
    }
    out
}

fn node_reports(
    plan: &Plan,
    before: &[Option<nodes::Sample>],
    after: &[Option<nodes::Sample>],
    tally: &Tally,
) -> Vec<NodeReport> {
    node_groups(plan)
        .into_iter()
        .enumerate()
        .map(|(n, (_, urls))| {
            let opened: u64 = urls
                .iter()
                .map(|&u| tally.ok_per_url.get(u).copied().unwrap_or(0))
                .sum();
            let before = before.get(n).copied().flatten();
            let after = after.get(n).copied().flatten();
            let rss = after.and_then(|s| s.rss_bytes);
            let rss_before = before.and_then(|s| s.rss_bytes);
            let cpu_s = match (
                before.and_then(|s| s.cpu_seconds),
                after.and_then(|s| s.cpu_seconds),
            ) {
                (Some(b), Some(a)) => Some(a - b),
                _ => None,
            };
            NodeReport {
                cpu_s,
                url: plan.urls[urls[0]].clone(),
                rss_bytes: rss,
                sessions: after.and_then(|s| s.live_sessions),
                rss_before_bytes: rss_before,
                sessions_opened: opened,
                bytes_per_session: match (rss, rss_before) {
                    (Some(a), Some(b)) if opened > 0 => Some((a as f64 - b as f64) / opened as f64),
                    _ => None,
                },
            }
        })
        .collect()
}

/// A session of its own for work before the clients come (user
/// `lt-<run>-<who>`, presented on the first node); `doing` names the work
/// in errors.
async fn setup_session(plan: &Plan, who: &str, doing: &str) -> Result<client::Conn> {
    let url = &plan.urls[0];
    let user = format!("lt-{}-{who}", plan.run_id);
    let token = plan.token(&user, "loadtest", 3600);
    let (conn, _) = timeout(
        Duration::from_secs(10),
        client::open(url, None, &token, None),
    )
    .await
    .unwrap_or(Err(client::Fail::Timeout))
    .map_err(|f| anyhow!("{doing}: cannot present on {url}: {f}"))?;
    Ok(conn)
}

/// Creates the plan's channels from one session before the clients come.
pub async fn create_channels(plan: &Plan) -> Result<()> {
    if plan.channels == 0 {
        return Ok(());
    }
    let mut conn = setup_session(plan, "setup", "creating channels").await?;
    let deadline = Instant::now() + Duration::from_secs_f64(60.0 + plan.channels as f64 / 10.0);
    let prefix = format!("lt-{}-", plan.run_id);
    let mut pending: BTreeSet<usize> = (0..plan.channels).collect();
    let mut hinted = false;
    while !pending.is_empty() {
        // Batches keep the requests within the default burst of 120.
        let batch: Vec<usize> = pending.iter().take(100).copied().collect();
        for &c in &batch {
            let request = format!(
                r#"{{"f":130,"t":"CHANNEL_ADD","s":{},"cnf":{{"name":"{}"}}}}"#,
                c + 1,
                plan.channel_name(c)
            );
            conn.writer
                .send_text(request.as_bytes())
                .await
                .map_err(|e| anyhow!("creating channels: {e}"))?;
        }
        let mut answered = 0;
        let mut limited = false;
        while answered < batch.len() {
            let frame = timeout_at(deadline, next_text(&mut conn.reader))
                .await
                .map_err(|_| anyhow!("creating channels: timed out ({} left)", pending.len()))?
                .map_err(|f| anyhow!("creating channels: {f}"))?;
            let Some(head) = scan::head(&frame) else {
                continue;
            };
            if head.f == FunctionCode::Dispatch.code()
                && head.t == Some(ProtocolEvent::ChannelAdd.name())
            {
                let created = scan::str_field(&frame, "name")
                    .and_then(|n| n.strip_prefix(prefix.as_str()))
                    .and_then(|n| n.parse::<usize>().ok());
                if let Some(c) = created {
                    if pending.remove(&c) {
                        answered += 1;
                    }
                }
            } else if head.f == FunctionCode::Error.code() {
                let code = scan::u64_field(&frame, "c").unwrap_or(0) as u16;
                let channel = scan::u64_field(&frame, "s").map(|s| s as usize - 1);
                answered += 1;
                if code == ErrorCode::AlreadyExists.code() {
                    if let Some(c) = channel {
                        pending.remove(&c);
                    }
                } else if code == ErrorCode::RateLimited.code() {
                    limited = true;
                } else {
                    bail!("creating channels: the node answered error {code}");
                }
            }
        }
        if limited {
            if !hinted {
                hinted = true;
                eprintln!(
                    "loadtest: 4008 RATE_LIMITED while creating {} channels; waiting it out \
                     (start the nodes with e.g. GATEWAY_RATE_LIMIT_COUNT=1000000 to avoid this)",
                    plan.channels
                );
            }
            sleep(Duration::from_secs(1)).await;
        }
    }
    conn.close_normally().await;
    Ok(())
}

/// `connect --history N`: N messages in the clients' channel (channel 0,
/// or the default one), sent by a client of its own before the others
/// come.
async fn seed_history(plan: &Plan) -> Result<()> {
    if plan.history == 0 {
        return Ok(());
    }
    let mut conn = setup_session(plan, "history", "seeding history").await?;
    let deadline = Instant::now() + Duration::from_secs_f64(60.0 + plan.history as f64 / 100.0);
    // The session's requests are handled in order: the move comes first.
    let mut requests = Vec::new();
    if plan.channels > 0 {
        requests.push(format!(
            r#"{{"f":130,"t":"CHANNEL_MOVE","cnf":{{"channel":"{}"}}}}"#,
            plan.channel_name(0)
        ));
    }
    let mut sent = 0;
    while sent < plan.history {
        // Batches keep the requests within the default burst of 120.
        let batch = (plan.history - sent).min(100);
        requests.extend((sent..sent + batch).map(|i| {
            format!(r#"{{"f":130,"t":"MESSAGE_CREATE","cnf":{{"content":"history {i}"}}}}"#)
        }));
        for request in requests.drain(..) {
            conn.writer
                .send_text(request.as_bytes())
                .await
                .map_err(|e| anyhow!("seeding history: {e}"))?;
        }
        let mut answered = 0;
        while answered < batch {
            let frame = timeout_at(deadline, next_text(&mut conn.reader))
                .await
                .map_err(|_| anyhow!("seeding history: timed out"))?
                .map_err(|f| anyhow!("seeding history: {f}"))?;
            let Some(head) = scan::head(&frame) else {
                continue;
            };
            if head.f == FunctionCode::Error.code() {
                let code = scan::u64_field(&frame, "c").unwrap_or(0);
                bail!("seeding history: the node answered error {code}");
            }
            if head.f == FunctionCode::Dispatch.code()
                && head.t == Some(ProtocolEvent::MessageCreate.name())
            {
                answered += 1;
            }
        }
        sent += batch;
    }
    conn.close_normally().await;
    Ok(())
}

/// Go: publishers send; then waits until every worker stopped, works out
/// the expected deliveries and drains until they arrived or the drain time
/// is over. Returns when publishing began (µs on the wall clock, which the
/// workers' delivery times share) and how long the driver waited.
async fn publish_and_drain(
    fleet: &mut Fleet,
    plan: &Plan,
    warnings: &mut Vec<String>,
) -> Result<(u64, f64)> {
    fleet.label = "publish";
    let go_us = crate::client::now_us();
    fleet.broadcast(Command::Go).await;
    let go = Instant::now();
    let stop_by = go + Duration::from_secs_f64(plan.duration_s + 15.0);
    fleet
        .until(Some(stop_by), |f| f.stopped.iter().all(Option::is_some))
        .await?;
    let mut merged = Tally::default();
    for (sent, members) in fleet.stopped.iter().flatten() {
        merged.merge(&Tally {
            sent: sent.clone(),
            members: members.clone(),
            ..Default::default()
        });
    }
    let expected = merged.expected();
    fleet.label = "drain";
    let drain_end = Instant::now() + Duration::from_secs_f64(plan.drain_s);
    let complete = fleet
        .until(Some(drain_end), |f| f.total().delivered >= expected)
        .await?;
    if !complete {
        warnings.push(format!(
            "drain ended after {:.1} s with deliveries missing",
            plan.drain_s
        ));
    }
    Ok((go_us, go.elapsed().as_secs_f64()))
}

async fn run_inner(plan: &Plan, opts: &Options) -> Result<Report> {
    let started = Instant::now();
    let before = scrape_all(plan).await;
    let redis_before = redis_cpu(plan).await;
    create_channels(plan).await?;
    seed_history(plan).await?;

    let mut fleet = Fleet::start(plan, opts).await?;
    fleet
        .until(None, |f| f.setup_done.iter().all(|d| *d))
        .await?;
    fleet.print_line();

    let mut traffic = (0, 0.0);
    let mut warnings = Vec::new();
    let after = match plan.scenario {
        Scenario::Connect => {
            fleet.label = "hold";
            let hold_end = Instant::now() + Duration::from_secs_f64(plan.hold_s);
            fleet.until(Some(hold_end), |_| false).await?;
            // Memory at the end of the hold, before the fan-out's buffers.
            let mut after = scrape_all(plan).await;
            if plan.fanout_at_end {
                traffic = publish_and_drain(&mut fleet, plan, &mut warnings).await?;
                // CPU to the end of the fan-out, the span Redis' CPU covers.
                for (hold, end) in after.iter_mut().zip(scrape_all(plan).await) {
                    if let (Some(hold), Some(end)) = (hold.as_mut(), end) {
                        hold.cpu_seconds = end.cpu_seconds;
                    }
                }
            }
            after
        }
        Scenario::Fanout | Scenario::Churn => {
            traffic = publish_and_drain(&mut fleet, plan, &mut warnings).await?;
            scrape_all(plan).await
        }
    };
    let redis_after = redis_cpu(plan).await;
    fleet.print_line();
    let tally = fleet.finish().await?;
    let nodes = node_reports(plan, &before, &after, &tally);
    let timing = Timing {
        duration_s: started.elapsed().as_secs_f64(),
        traffic_s: Timing::traffic_s(traffic.0, tally.last_delivery_us, traffic.1),
    };
    let mut report = Report::build(plan, &tally, timing, nodes);
    report.redis_cpu_s = redis_before.zip(redis_after).map(|(b, a)| a - b);
    report.warnings.extend(warnings);
    Ok(report)
}
