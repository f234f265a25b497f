//! The command line: flags → [`Plan`], a runtime, the driver (or a worker
//! process, or the smoke test), then the table, the JSON file and the exit
//! code.
//!
//! Exit codes: 0 a clean run; 1 the run could not happen (or no client
//! could set up a session), or smoke failed;
//! 2 the run found protocol violations (duplicates, gaps, reordering,
//! deliveries beyond those expected, malformed frames, `resumed: false` in
//! churn). Loss is a measurement, not a violation: it
//! is reported (and warned about) but exits 0.

use crate::driver::{self, Options};
use crate::plan::{parse_source_ips, random_run_id, ChurnPlan, Plan, Scenario};
use crate::report::Report;
use crate::{smoke, worker};
use anyhow::{Context as _, Result};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "loadtest",
    version,
    about = "Load generator and smoke test for the gateway"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Worker processes to spread the clients over; each is a separate
    /// process with its own open-file limit.
    #[arg(long, global = true, default_value_t = 1)]
    pub workers: usize,
    /// Write the machine-readable report to FILE.
    #[arg(long, global = true, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Runtime threads per process (1: a current-thread runtime).
    #[arg(long, global = true, default_value_t = 1)]
    pub threads: usize,
    /// No progress lines on stderr.
    #[arg(long, global = true)]
    pub quiet: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Open and PRESENT N sessions at a ramp rate and hold them; reports
    /// the connect rate and each node's memory per session.
    Connect(ConnectArgs),
    /// Members spread over channels, publishers sending at a fixed total
    /// rate; reports loss, duplicates, order and end-to-end latency.
    Fanout(FanoutArgs),
    /// Fan-out traffic while clients drop their TCP connections at random
    /// and resume; reports resumes, their latency and any gap.
    Churn(ChurnArgs),
    /// Two clients, one of everything; exits non-zero on any violation.
    Smoke(Target),
    /// A worker process of `--workers` (reads its assignment on stdin).
    #[command(name = "__worker", hide = true)]
    Worker,
}

/// Where the load goes.
#[derive(Debug, Clone, Args)]
pub struct Target {
    /// Gateway URLs, comma-separated (ws://host:port/gateway); clients are
    /// spread over them round-robin.
    #[arg(long, value_delimiter = ',', required = true)]
    pub urls: Vec<String>,
    /// The cluster's JWT secret (HS256), to mint the clients' tokens.
    #[arg(long, env = "GATEWAY_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: String,
    /// The issuer (`iss`) the cluster requires of tokens, if any.
    #[arg(long, env = "GATEWAY_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// The audience (`aud`) the cluster requires of tokens, if any.
    #[arg(long, env = "GATEWAY_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Redis servers of the cluster, comma-separated (redis://host:port);
    /// the report of connect, fanout and churn then gives their CPU seconds
    /// for the run (`INFO cpu`); smoke ignores it.
    #[arg(long, value_delimiter = ',')]
    pub redis: Vec<String>,
}

/// How clients are brought up, and the run's bounds.
#[derive(Debug, Clone, Args)]
pub struct Setup {
    /// New connections per second, over all workers.
    #[arg(long, default_value_t = 1000.0)]
    pub ramp_per_s: f64,
    /// Setups (connect to CHANNEL_MOVE) in flight at once, per worker.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// How long one client's setup may take before it counts as failed.
    #[arg(long, default_value_t = 30.0)]
    pub setup_timeout_s: f64,
    /// Tag of user ids, channels and nonces (default: random); reuse it to
    /// reuse the channels of an earlier run.
    #[arg(long)]
    pub run_id: Option<String>,
    /// Hard bound on the whole run in seconds (default: derived from the
    /// other flags, with a margin).
    #[arg(long)]
    pub max_run_s: Option<f64>,
    /// Local addresses to connect from, round-robin over the clients:
    /// comma-separated addresses and IPv4 ranges, e.g.
    /// `127.0.0.2-127.0.0.9`. Each address has its own ephemeral ports
    /// (about 28,000 with Linux' default range), so more addresses, more
    /// connections. Default: the kernel's choice.
    #[arg(long, value_name = "LIST")]
    pub source_ips: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    #[command(flatten)]
    pub target: Target,
    #[command(flatten)]
    pub setup: Setup,
    /// Sessions to open.
    #[arg(long, default_value_t = 1000)]
    pub clients: usize,
    /// How long to hold them (heartbeating) once all are up.
    #[arg(long, default_value_t = 10.0)]
    pub hold_s: f64,
    /// Spread the sessions over this many channels (0: they stay in the
    /// default channel).
    #[arg(long, default_value_t = 0)]
    pub channels: usize,
    /// After the hold, one client sends one message into its channel (the
    /// default channel without `--channels`, else channel 0) and the
    /// report counts and times its deliveries to every member.
    #[arg(long)]
    pub fanout_at_end: bool,
    /// With `--fanout-at-end`: how long to wait for the deliveries.
    #[arg(long, default_value_t = 30.0)]
    pub drain_s: f64,
    /// Before the clients come, one more sends this many messages into
    /// their channel (channel 0 with `--channels`), so that every move
    /// into it reads history while presence events pile up after them.
    #[arg(long, default_value_t = 0)]
    pub history: usize,
}

/// The message traffic of `fanout` and `churn`.
#[derive(Debug, Clone, Args)]
pub struct Traffic {
    /// Clients (members), publishers included.
    #[arg(long, default_value_t = 100)]
    pub clients: usize,
    /// Channels the members are spread over.
    #[arg(long, default_value_t = 1)]
    pub channels: usize,
    /// Clients that publish (at most about clients / number of URLs).
    #[arg(long, default_value_t = 1)]
    pub publishers: usize,
    /// Messages per second over all publishers.
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// How long publishers send.
    #[arg(long, default_value_t = 10.0)]
    pub duration_s: f64,
    /// After sending stops, how long to wait for the last deliveries.
    #[arg(long, default_value_t = 5.0)]
    pub drain_s: f64,
    /// Length of each message's content (1-2000).
    #[arg(long, default_value_t = 32)]
    pub content_bytes: usize,
}

#[derive(Debug, Clone, Args)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub target: Target,
    #[command(flatten)]
    pub setup: Setup,
    #[command(flatten)]
    pub traffic: Traffic,
}

#[derive(Debug, Clone, Args)]
pub struct ChurnArgs {
    #[command(flatten)]
    pub target: Target,
    #[command(flatten)]
    pub setup: Setup,
    #[command(flatten)]
    pub traffic: Traffic,
    /// Connection drops per second, over all non-publishing clients.
    #[arg(long, default_value_t = 5.0)]
    pub drops_per_s: f64,
    /// A dropped client stays away a random 0..=this many ms.
    #[arg(long, default_value_t = 500)]
    pub down_ms_max: u64,
}

/// Globals that go into every plan.
struct Globals {
    workers: usize,
    threads: usize,
}

fn base_plan(scenario: Scenario, target: Target, setup: &Setup, g: &Globals) -> Result<Plan> {
    let source_ips = match &setup.source_ips {
        Some(spec) => parse_source_ips(spec).context("--source-ips")?,
        None => Vec::new(),
    };
    Ok(Plan {
        scenario,
        urls: target.urls,
        secret: target.jwt_secret,
        issuer: target.jwt_issuer,
        audience: target.jwt_audience,
        redis: target.redis,
        run_id: setup.run_id.clone().unwrap_or_else(random_run_id),
        clients: 0,
        ramp_per_s: setup.ramp_per_s,
        connect_concurrency: setup.connect_concurrency,
        setup_timeout_s: setup.setup_timeout_s,
        hold_s: 0.0,
        channels: 0,
        publishers: 0,
        rate: 0.0,
        duration_s: 0.0,
        drain_s: 0.0,
        content_bytes: 1,
        churn: None,
        workers: g.workers,
        threads: g.threads,
        max_run_s: 0.0,
        source_ips,
        fanout_at_end: false,
        history: 0,
    })
}

fn with_traffic(mut plan: Plan, t: &Traffic) -> Plan {
    plan.clients = t.clients;
    plan.channels = t.channels;
    plan.publishers = t.publishers;
    plan.rate = t.rate;
    plan.duration_s = t.duration_s;
    plan.drain_s = t.drain_s;
    plan.content_bytes = t.content_bytes;
    plan
}

/// The default hard bound: every phase at its longest, plus a margin.
fn default_max_run_s(plan: &Plan) -> f64 {
    let ramp = plan.clients as f64 / plan.ramp_per_s;
    let channels = 60.0 + plan.channels as f64 / 10.0;
    let main = match plan.scenario {
        Scenario::Connect if plan.fanout_at_end => {
            plan.hold_s + plan.duration_s + 5.0 + plan.drain_s
        }
        Scenario::Connect => plan.hold_s,
        _ => plan.duration_s + 5.0 + plan.drain_s,
    };
    ramp + plan.setup_timeout_s + channels + main + 30.0
}

fn finish_plan(mut plan: Plan, max_run_s: Option<f64>) -> Plan {
    plan.max_run_s = max_run_s.unwrap_or_else(|| default_max_run_s(&plan));
    plan
}

/// Parses the command line and runs it.
pub fn main() -> Result<ExitCode> {
    let cli = Cli::parse();
    let g = Globals {
        workers: cli.workers,
        threads: cli.threads,
    };
    let plan = match cli.command {
        Command::Worker => {
            let assignment = worker::read_assignment()?;
            let runtime = runtime(assignment.plan.threads)?;
            let result = runtime.block_on(worker::serve_stdio(assignment));
            // The stdin reader sits in a blocking read that only the
            // driver's EOF ends; do not wait for it.
            runtime.shutdown_background();
            result?;
            return Ok(ExitCode::SUCCESS);
        }
        Command::Smoke(target) => return run_smoke(target, cli.json, cli.threads),
        Command::Connect(a) => {
            let mut plan = base_plan(Scenario::Connect, a.target, &a.setup, &g)?;
            plan.clients = a.clients;
            plan.hold_s = a.hold_s;
            plan.channels = a.channels;
            plan.history = a.history;
            if a.fanout_at_end {
                // One publisher sending one message: 1 msg/s for 1 s.
                plan.fanout_at_end = true;
                plan.publishers = 1;
                plan.rate = 1.0;
                plan.duration_s = 1.0;
                plan.drain_s = a.drain_s;
                plan.content_bytes = 32;
            }
            finish_plan(plan, a.setup.max_run_s)
        }
        Command::Fanout(a) => {
            let plan = base_plan(Scenario::Fanout, a.target, &a.setup, &g)?;
            finish_plan(with_traffic(plan, &a.traffic), a.setup.max_run_s)
        }
        Command::Churn(a) => {
            let mut plan = with_traffic(
                base_plan(Scenario::Churn, a.target, &a.setup, &g)?,
                &a.traffic,
            );
            plan.churn = Some(ChurnPlan {
                drops_per_s: a.drops_per_s,
                down_ms_max: a.down_ms_max,
            });
            finish_plan(plan, a.setup.max_run_s)
        }
    };
    plan.validate()?;
    let opts = Options {
        progress: !cli.quiet,
        worker_exe: None,
    };
    let runtime = runtime(plan.threads)?;
    let report = runtime.block_on(driver::run(plan, &opts))?;
    emit(&report, cli.json.as_ref())?;
    Ok(if report.connect.ok == 0 {
        eprintln!("loadtest: no client could set up a session");
        ExitCode::from(1)
    } else if report.violations.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

fn runtime(threads: usize) -> Result<tokio::runtime::Runtime> {
    let mut builder = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    builder.enable_all().build().context("starting the runtime")
}

/// Prints the table and writes the JSON report.
pub fn emit(report: &Report, json: Option<&PathBuf>) -> Result<()> {
    print!("{}", report.table());
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(report)?;
        std::fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn run_smoke(target: Target, json: Option<PathBuf>, threads: usize) -> Result<ExitCode> {
    let runtime = runtime(threads)?;
    let minter = smoke::Minter {
        secret: &target.jwt_secret,
        issuer: target.jwt_issuer.as_deref(),
        audience: target.jwt_audience.as_deref(),
    };
    let report = runtime.block_on(smoke::run(&target.urls, minter, |check| {
        if check.ok {
            println!("PASS {}", check.name);
        } else {
            println!("FAIL {}: {}", check.name, check.detail);
        }
    }));
    println!(
        "{} ({} checks, {:.1} s)",
        if report.passed { "PASS" } else { "FAIL" },
        report.checks.len(),
        report.duration_s
    );
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(&path, text + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(if report.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_into_a_valid_plan() {
        let cli = Cli::try_parse_from([
            "loadtest",
            "--workers",
            "2",
            "fanout",
            "--urls",
            "ws://127.0.0.1:1/gateway,ws://127.0.0.1:2/gateway",
            "--jwt-secret",
            "0123456789abcdef0123456789abcdef",
            "--clients",
            "40",
            "--channels",
            "2",
            "--publishers",
            "4",
            "--rate",
            "50",
            "--duration-s",
            "2",
            "--json",
            "out.json",
        ])
        .unwrap();
        assert_eq!(cli.workers, 2);
        assert_eq!(cli.json, Some(PathBuf::from("out.json")));
        let Command::Fanout(a) = cli.command else {
            panic!("fanout")
        };
        assert_eq!(a.target.urls.len(), 2);
        let g = Globals {
            workers: 2,
            threads: 1,
        };
        let plan = finish_plan(
            with_traffic(
                base_plan(Scenario::Fanout, a.target, &a.setup, &g).unwrap(),
                &a.traffic,
            ),
            None,
        );
        plan.validate().unwrap();
        assert!(plan.max_run_s > plan.duration_s + plan.drain_s);
    }

    #[test]
    fn connect_with_source_ips_and_a_final_fanout_parses() {
        let cli = Cli::try_parse_from([
            "loadtest",
            "--workers",
            "6",
            "connect",
            "--urls",
            "ws://127.0.0.1:1/gateway",
            "--jwt-secret",
            "0123456789abcdef0123456789abcdef",
            "--clients",
            "100000",
            "--hold-s",
            "60",
            "--source-ips",
            "127.0.0.2-127.0.0.9",
            "--fanout-at-end",
        ])
        .unwrap();
        let Command::Connect(a) = cli.command else {
            panic!("connect")
        };
        assert!(a.fanout_at_end);
        let g = Globals {
            workers: 6,
            threads: 1,
        };
        let plan = base_plan(Scenario::Connect, a.target.clone(), &a.setup, &g).unwrap();
        assert_eq!(plan.source_ips.len(), 8);
        let mut bad = a.setup.clone();
        bad.source_ips = Some("127.0.0.9-127.0.0.2".into());
        assert!(base_plan(Scenario::Connect, a.target, &bad, &g).is_err());
    }

    #[test]
    fn worker_subcommand_is_hidden_but_parses() {
        let cli = Cli::try_parse_from(["loadtest", "__worker"]).unwrap();
        assert!(matches!(cli.command, Command::Worker));
    }
}
