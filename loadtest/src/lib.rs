//! # gateway-loadtest
//!
//! Load generator and smoke test for the gateway (usage: docs/LOADTEST.md).
//! The binary `loadtest` is a thin `main` over [`cli`]; tests drive
//! [`driver::run`] and [`smoke::run`] directly.
//!
//! # Layout
//!
//! - [`cli`]: flags → [`plan::Plan`]; the runtime; table, JSON, exit code.
//! - [`plan`]: what a run does, and the pure functions every worker uses
//!   to agree on who is where (node, channel, publisher) without talking.
//! - [`driver`]: one run end to end: channels, workers (in-process or
//!   worker processes), phases, node metrics, the merged report.
//! - [`worker`]: one process's share of the clients, its counters and its
//!   line protocol with the driver.
//! - [`client`]: one load client: setup, the read/write loop, publishing,
//!   drop and resume, and the per-dispatch checks.
//! - [`scan`]: reading envelope fields out of frames without parsing them.
//! - [`hist`]: mergeable latency histograms (HdrHistogram).
//! - [`report`]: mergeable tallies and the final report.
//! - [`nodes`]: scraping a node's `/metrics`.
//! - [`smoke`]: the `smoke` scenario.
//!
//! # Flow of a run
//!
//! `cli` builds a plan → `driver` creates the channels, starts the workers
//! → each `worker` launches its `client`s at the ramp rate → clients set
//! up, then read and heartbeat → on Go, publishers send (nonce = send
//! time), every client checks and times what it receives → publishers
//! finish, workers report exact sent/member counts → the driver drains
//! until every expected delivery arrived or the drain time is over →
//! Finish: clients close, workers send their tallies → merge → report.

pub mod cli;
pub mod client;
pub mod driver;
pub mod hist;
pub mod nodes;
pub mod plan;
pub mod report;
pub mod scan;
pub mod smoke;
pub mod worker;
