//! Results: a worker's raw [`Tally`], merged across workers, and the final
//! [`Report`] built from the merged tally (JSON for tooling, a table for
//! people).
//!
//! A tally keeps what cannot be recomputed after merging in raw form: sent
//! messages and members per channel (the expected delivery count is
//! `Σ sent[c] · members[c]`, which only the merged vectors give right when
//! a channel's members and publishers sit in different workers), and
//! histograms as buckets rather than percentiles.

use crate::hist::Snapshot;
use crate::plan::Plan;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// What one worker counted. Every field merges by sum except `connect_s`
/// (the longest connect phase) and the histograms (bucket-wise).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    /// Clients this tally covers.
    pub clients: u64,
    pub connect_ok: u64,
    pub connect_failed: u64,
    /// Seconds from the first connect to the last setup outcome.
    pub connect_s: f64,
    /// Connect + HELLO + PRESENT + READY (+ CHANNEL_MOVE), in µs.
    pub connect_latency: Snapshot,
    /// Clients set up per URL (same order as the plan's `urls`).
    pub ok_per_url: Vec<u64>,
    /// Clients set up per channel.
    pub members: Vec<u64>,
    /// Messages sent per channel.
    pub sent: Vec<u64>,
    /// MESSAGE_CREATE dispatches of this run received (duplicates not
    /// included).
    pub delivered: u64,
    /// Dispatches received twice: an `s` at or below the last one, or a
    /// message id equal to the previous one of the channel.
    pub duplicated: u64,
    /// Dispatches whose `s` skipped ahead of `last + 1`.
    pub seq_gaps: u64,
    /// MESSAGE_CREATE whose id was lower than the previous one seen in the
    /// channel (the channel's order broke).
    pub order_violations: u64,
    /// MESSAGE_CREATE dispatches not from this run.
    pub foreign: u64,
    /// Send → receive, in µs.
    pub latency: Snapshot,
    /// When the last of these deliveries arrived (µs since the epoch; 0
    /// before the first).
    pub last_delivery_us: u64,
    pub resumes: u64,
    /// Resumes answered with `resumed: false`.
    pub resumed_false: u64,
    /// Resumes that never got a READY.
    pub resume_failed: u64,
    /// Reconnect start → READY, in µs.
    pub resume_latency: Snapshot,
    /// Errors 4008 received.
    pub rate_limited: u64,
    /// Other errors (150) received, by code.
    pub errors: BTreeMap<String, u64>,
    /// Connections the node closed (or that broke) while they should have
    /// stayed up, by close code ("none" when there was no close frame).
    pub closes: BTreeMap<String, u64>,
    /// Why setups failed, by reason.
    pub setup_errors: BTreeMap<String, u64>,
    pub heartbeat_acks: u64,
    /// HEARTBEAT sent → HEARTBEAT_ACK received, in µs, once the worker's
    /// clients were all set up.
    #[serde(default)]
    pub heartbeat_latency: Snapshot,
    /// Frames that were not a JSON object with `f`, or dispatches with no `s`.
    pub malformed: u64,
}

fn add_vec(into: &mut Vec<u64>, from: &[u64]) {
    if into.len() < from.len() {
        into.resize(from.len(), 0);
    }
    for (a, b) in into.iter_mut().zip(from) {
        *a += b;
    }
}

fn add_map(into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>) {
    for (k, v) in from {
        *into.entry(k.clone()).or_default() += v;
    }
}

impl Tally {
    pub fn merge(&mut self, other: &Tally) {
        self.clients += other.clients;
        self.connect_ok += other.connect_ok;
        self.connect_failed += other.connect_failed;
        self.connect_s = self.connect_s.max(other.connect_s);
        self.connect_latency.merge(&other.connect_latency);
        add_vec(&mut self.ok_per_url, &other.ok_per_url);
        add_vec(&mut self.members, &other.members);
        add_vec(&mut self.sent, &other.sent);
        self.delivered += other.delivered;
        self.duplicated += other.duplicated;
        self.seq_gaps += other.seq_gaps;
        self.order_violations += other.order_violations;
        self.foreign += other.foreign;
        self.latency.merge(&other.latency);
        self.last_delivery_us = self.last_delivery_us.max(other.last_delivery_us);
        self.resumes += other.resumes;
        self.resumed_false += other.resumed_false;
        self.resume_failed += other.resume_failed;
        self.resume_latency.merge(&other.resume_latency);
        self.rate_limited += other.rate_limited;
        add_map(&mut self.errors, &other.errors);
        add_map(&mut self.closes, &other.closes);
        add_map(&mut self.setup_errors, &other.setup_errors);
        self.heartbeat_acks += other.heartbeat_acks;
        self.heartbeat_latency.merge(&other.heartbeat_latency);
        self.malformed += other.malformed;
    }

    /// Deliveries the sent messages call for: each message reaches every
    /// member of its channel, the sender included.
    pub fn expected(&self) -> u64 {
        self.sent
            .iter()
            .zip(&self.members)
            .map(|(s, m)| s * m)
            .sum()
    }
}

/// Percentiles in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
    /// Samples behind these numbers.
    pub count: u64,
}

impl Percentiles {
    /// From a histogram of microseconds.
    pub fn from_us(h: &Snapshot) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            p50: ms(h.quantile(0.5)),
            p90: ms(h.quantile(0.9)),
            p99: ms(h.quantile(0.99)),
            p999: ms(h.quantile(0.999)),
            max: ms(h.max),
            mean: h.mean() / 1000.0,
            count: h.count(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConnectReport {
    pub ok: u64,
    pub failed: u64,
    /// Sessions set up per second during the connect phase.
    pub per_s: f64,
}

/// One node, from its `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeReport {
    pub url: String,
    /// `process_resident_memory_bytes` with the run's sessions up.
    pub rss_bytes: Option<u64>,
    /// `gateway_sessions{state="live"}` at the same moment.
    pub sessions: Option<u64>,
    /// `process_resident_memory_bytes` before the run.
    pub rss_before_bytes: Option<u64>,
    /// Sessions this run set up on the node.
    pub sessions_opened: u64,
    /// (rss − rss_before) / sessions_opened.
    pub bytes_per_session: Option<f64>,
    /// CPU seconds (user + system) the node used from before the clients
    /// came to the end of the run (`gateway_cpu_seconds_total`, else
    /// `process_cpu_seconds_total`).
    #[serde(default)]
    pub cpu_s: Option<f64>,
}

/// The final report. The first fields are read by other tooling: keep
/// their names.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub scenario: String,
    pub clients: u64,
    pub sent: u64,
    pub expected: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicated: u64,
    /// Sequence gaps plus channel-order violations.
    pub out_of_order: u64,
    pub deliveries_per_s: f64,
    pub latency_ms: Percentiles,
    pub connect: ConnectReport,
    pub nodes: Vec<NodeReport>,
    /// Wall time of the whole run.
    pub duration_s: f64,

    pub run_id: String,
    pub workers: usize,
    pub channels: usize,
    pub publishers: usize,
    /// Target messages per second.
    pub rate: f64,
    /// From the start of publishing to the last delivery.
    pub traffic_s: f64,
    pub seq_gaps: u64,
    pub order_violations: u64,
    pub foreign: u64,
    pub rate_limited: u64,
    pub errors: BTreeMap<String, u64>,
    pub closes: BTreeMap<String, u64>,
    pub setup_errors: BTreeMap<String, u64>,
    pub heartbeat_acks: u64,
    /// Round trip of HEARTBEAT → HEARTBEAT_ACK, once every client of the
    /// worker was set up.
    #[serde(default)]
    pub heartbeat_latency_ms: Percentiles,
    pub malformed: u64,
    pub connect_latency_ms: Percentiles,
    pub resumes: u64,
    pub resumed_false: u64,
    pub resume_failed: u64,
    pub resume_latency_ms: Percentiles,
    /// CPU seconds the `--redis` servers used over the run (`INFO cpu`),
    /// all together; absent without `--redis`.
    #[serde(default)]
    pub redis_cpu_s: Option<f64>,
    /// Broken protocol guarantees, one line each; empty on a clean run.
    pub violations: Vec<String>,
    /// Observations that are not violations (loss under overload, hints).
    pub warnings: Vec<String>,
}

/// Timings the driver measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timing {
    pub duration_s: f64,
    pub traffic_s: f64,
}

impl Timing {
    /// The traffic window: from the moment publishing began (`go_us`, wall
    /// clock) to the last delivery. Only when nothing was delivered, the
    /// driver's own wait (`waited_s`), which ends when it notices the
    /// drain is over: up to a progress interval (250 ms) late, so it would
    /// understate the rate.
    pub fn traffic_s(go_us: u64, last_delivery_us: u64, waited_s: f64) -> f64 {
        if go_us > 0 && last_delivery_us > go_us {
            (last_delivery_us - go_us) as f64 / 1e6
        } else {
            waited_s
        }
    }
}

impl Report {
    pub fn build(plan: &Plan, tally: &Tally, timing: Timing, nodes: Vec<NodeReport>) -> Self {
        let sent: u64 = tally.sent.iter().sum();
        let expected = tally.expected();
        let mut report = Report {
            scenario: plan.scenario.name().into(),
            clients: plan.clients as u64,
            sent,
            expected,
            delivered: tally.delivered,
            lost: expected.saturating_sub(tally.delivered),
            duplicated: tally.duplicated,
            out_of_order: tally.seq_gaps + tally.order_violations,
            deliveries_per_s: if timing.traffic_s > 0.0 {
                tally.delivered as f64 / timing.traffic_s
            } else {
                0.0
            },
            latency_ms: Percentiles::from_us(&tally.latency),
            connect: ConnectReport {
                ok: tally.connect_ok,
                failed: tally.connect_failed,
                per_s: if tally.connect_s > 0.0 {
                    tally.connect_ok as f64 / tally.connect_s
                } else {
                    0.0
                },
            },
            nodes,
            duration_s: timing.duration_s,
            run_id: plan.run_id.clone(),
            workers: plan.workers,
            channels: plan.channels,
            publishers: plan.publishers,
            rate: plan.rate,
            traffic_s: timing.traffic_s,
            seq_gaps: tally.seq_gaps,
            order_violations: tally.order_violations,
            foreign: tally.foreign,
            rate_limited: tally.rate_limited,
            errors: tally.errors.clone(),
            closes: tally.closes.clone(),
            setup_errors: tally.setup_errors.clone(),
            heartbeat_acks: tally.heartbeat_acks,
            heartbeat_latency_ms: Percentiles::from_us(&tally.heartbeat_latency),
            malformed: tally.malformed,
            connect_latency_ms: Percentiles::from_us(&tally.connect_latency),
            resumes: tally.resumes,
            resumed_false: tally.resumed_false,
            resume_failed: tally.resume_failed,
            resume_latency_ms: Percentiles::from_us(&tally.resume_latency),
            violations: Vec::new(),
            warnings: Vec::new(),
            redis_cpu_s: None,
        };
        report.judge();
        report
    }

    /// Fills `violations` and `warnings`.
    fn judge(&mut self) {
        let mut v = Vec::new();
        if self.duplicated > 0 {
            v.push(format!("{} duplicated dispatches", self.duplicated));
        }
        if self.seq_gaps > 0 {
            v.push(format!(
                "{} gaps in a session's sequence numbers",
                self.seq_gaps
            ));
        }
        if self.order_violations > 0 {
            v.push(format!(
                "{} messages out of channel order",
                self.order_violations
            ));
        }
        if self.delivered > self.expected {
            v.push(format!(
                "{} deliveries more than expected",
                self.delivered - self.expected
            ));
        }
        if self.malformed > 0 {
            v.push(format!("{} malformed frames", self.malformed));
        }
        if self.scenario == "churn" && self.resumed_false > 0 {
            v.push(format!(
                "{} resumes answered resumed:false (in a single node, or a \
                 cluster, within the window, every resume must succeed)",
                self.resumed_false
            ));
        }
        let mut w = Vec::new();
        if self.lost > 0 {
            w.push(format!(
                "{} of {} expected deliveries lost ({:.3} %)",
                self.lost,
                self.expected,
                100.0 * self.lost as f64 / self.expected.max(1) as f64
            ));
        }
        if self.rate_limited > 0 {
            w.push(format!(
                "{} messages refused with 4008 (rate limited): start the nodes \
                 with a higher limit, e.g. GATEWAY_RATE_LIMIT_COUNT=1000000",
                self.rate_limited
            ));
        }
        if self.connect.failed > 0 {
            w.push(format!(
                "{} clients failed to set up: {:?}",
                self.connect.failed, self.setup_errors
            ));
        }
        if !self.closes.is_empty() {
            w.push(format!(
                "connections closed by the node or broken: {:?}",
                self.closes
            ));
        }
        if !self.errors.is_empty() {
            w.push(format!("errors received: {:?}", self.errors));
        }
        self.violations = v;
        self.warnings = w;
    }

    /// The report as a table for people.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let mut row = |k: &str, v: String| {
            let _ = writeln!(out, "  {k:<22} {v}");
        };
        row(
            "scenario",
            format!(
                "{} (run {}, {} worker{})",
                self.scenario,
                self.run_id,
                self.workers,
                if self.workers == 1 { "" } else { "s" }
            ),
        );
        row("duration", format!("{:.1} s", self.duration_s));
        row(
            "clients",
            format!(
                "{} ({} ok, {} failed, {:.0} sessions/s)",
                self.clients, self.connect.ok, self.connect.failed, self.connect.per_s
            ),
        );
        row("connect latency", ms_line(&self.connect_latency_ms));
        row("heartbeat rtt", ms_line(&self.heartbeat_latency_ms));
        for node in &self.nodes {
            let mib = |b: u64| format!("{:.1} MiB", b as f64 / 1048576.0);
            let mut line = format!(
                "rss {} sessions {}",
                node.rss_bytes.map(mib).unwrap_or_else(|| "?".into()),
                node.sessions
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "?".into()),
            );
            if let Some(cpu) = node.cpu_s {
                let _ = write!(line, " cpu {cpu:.2} s");
            }
            if let Some(b) = node.bytes_per_session {
                let _ = write!(
                    line,
                    " ({:.1} KiB per session over {} opened)",
                    b / 1024.0,
                    node.sessions_opened
                );
            }
            row(&format!("node {}", node.url), line);
        }
        if let Some(cpu) = self.redis_cpu_s {
            let per = if self.sent > 0 {
                format!(" ({:.1} us per message sent)", cpu / self.sent as f64 * 1e6)
            } else {
                String::new()
            };
            row("redis cpu", format!("{cpu:.2} s{per}"));
        }
        if self.scenario != "connect" || self.sent > 0 {
            row(
                "traffic",
                format!(
                    "{} channels, {} publishers, {} msg/s target, {:.1} s",
                    self.channels, self.publishers, self.rate, self.traffic_s
                ),
            );
            row("sent", self.sent.to_string());
            row("expected", self.expected.to_string());
            row(
                "delivered",
                format!("{} ({:.0}/s)", self.delivered, self.deliveries_per_s),
            );
            row("lost", self.lost.to_string());
            row("duplicated", self.duplicated.to_string());
            row(
                "out of order",
                format!(
                    "{} ({} seq gaps, {} channel order)",
                    self.out_of_order, self.seq_gaps, self.order_violations
                ),
            );
            row("latency", ms_line(&self.latency_ms));
        }
        if self.scenario == "churn" {
            row(
                "resumes",
                format!(
                    "{} ({} resumed:false, {} failed)",
                    self.resumes, self.resumed_false, self.resume_failed
                ),
            );
            row("resume latency", ms_line(&self.resume_latency_ms));
        }
        row("rate limited", self.rate_limited.to_string());
        for line in &self.violations {
            row("VIOLATION", line.clone());
        }
        for line in &self.warnings {
            row("warning", line.clone());
        }
        out
    }
}

fn ms_line(p: &Percentiles) -> String {
    if p.count == 0 {
        return "-".into();
    }
    format!(
        "p50 {:.2} p90 {:.2} p99 {:.2} p99.9 {:.2} max {:.2} ms (n={})",
        p.p50, p.p90, p.p99, p.p999, p.max, p.count
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hist::SharedHistogram;
    use crate::plan::{test_plan, Scenario};

    fn hist(values: &[u64]) -> Snapshot {
        let h = SharedHistogram::default();
        values.iter().for_each(|&v| h.record(v));
        h.snapshot()
    }

    #[test]
    fn tallies_merge_by_channel_so_expected_is_right_across_workers() {
        // Channel 0's publisher is in worker A, its members in both.
        let a = Tally {
            clients: 10,
            connect_ok: 10,
            connect_s: 1.0,
            members: vec![5, 5],
            sent: vec![100, 0],
            delivered: 500,
            latency: hist(&[1000, 2000]),
            errors: [("4011".to_string(), 1)].into(),
            ..Default::default()
        };
        let b = Tally {
            clients: 10,
            connect_ok: 9,
            connect_failed: 1,
            connect_s: 2.0,
            members: vec![5, 4],
            sent: vec![0, 50],
            delivered: 700,
            latency: hist(&[3000]),
            errors: [("4011".to_string(), 2), ("4013".to_string(), 1)].into(),
            ..Default::default()
        };
        // Each worker alone cannot know its share of the expected count.
        assert_eq!(a.expected() + b.expected(), 100 * 5 + 50 * 4);
        let mut merged = a.clone();
        merged.merge(&b);
        assert_eq!(merged.members, vec![10, 9]);
        assert_eq!(merged.sent, vec![100, 50]);
        assert_eq!(merged.expected(), 100 * 10 + 50 * 9);
        assert_eq!(merged.delivered, 1200);
        assert_eq!(merged.connect_s, 2.0);
        assert_eq!(merged.latency, hist(&[1000, 2000, 3000]));
        assert_eq!(merged.errors["4011"], 3);
        assert_eq!(merged.errors["4013"], 1);

        let plan = test_plan(Scenario::Fanout);
        let timing = Timing {
            duration_s: 5.0,
            traffic_s: 2.0,
        };
        let report = Report::build(&plan, &merged, timing, vec![]);
        assert_eq!(report.expected, 1450);
        assert_eq!(report.lost, 250);
        assert_eq!(report.sent, 150);
        assert_eq!(report.deliveries_per_s, 600.0);
        assert_eq!(report.connect.per_s, 9.5);
        assert_eq!(report.latency_ms.max, 3.0);
        assert!(report.violations.is_empty());
        assert!(report.warnings.iter().any(|w| w.contains("250 of 1450")));
    }

    #[test]
    fn the_traffic_window_ends_at_the_last_delivery() {
        let go = 1_700_000_000_000_000;
        let mut a = Tally {
            last_delivery_us: go + 2_000_000,
            ..Default::default()
        };
        a.merge(&Tally {
            last_delivery_us: go + 10_050_000,
            ..Default::default()
        });
        assert_eq!(a.last_delivery_us, go + 10_050_000);
        // The driver noticed the end 0.2 s later; the window does not grow.
        assert_eq!(Timing::traffic_s(go, a.last_delivery_us, 10.25), 10.05);
        // Nothing delivered (or no publishing): the driver's wait.
        assert_eq!(Timing::traffic_s(go, 0, 10.25), 10.25);
        assert_eq!(Timing::traffic_s(0, 0, 0.0), 0.0);
    }

    #[test]
    fn tallies_survive_json_and_merge_into_empty() {
        let a = Tally {
            members: vec![1, 2, 3],
            resume_latency: hist(&[10, 20]),
            closes: [("none".to_string(), 1)].into(),
            ..Default::default()
        };
        let json = serde_json::to_string(&a).unwrap();
        let back: Tally = serde_json::from_str(&json).unwrap();
        assert_eq!(back, a);
        let mut empty = Tally::default();
        empty.merge(&back);
        assert_eq!(empty, a);
    }

    #[test]
    fn report_json_has_the_field_names_tooling_reads() {
        let plan = test_plan(Scenario::Fanout);
        let report = Report::build(&plan, &Tally::default(), Timing::default(), vec![]);
        let value = serde_json::to_value(&report).unwrap();
        for key in [
            "scenario",
            "clients",
            "sent",
            "expected",
            "delivered",
            "lost",
            "duplicated",
            "out_of_order",
            "deliveries_per_s",
            "latency_ms",
            "connect",
            "nodes",
            "duration_s",
        ] {
            assert!(value.get(key).is_some(), "{key}");
        }
        for key in ["p50", "p90", "p99", "p999", "max"] {
            assert!(value["latency_ms"].get(key).is_some(), "{key}");
        }
        for key in ["ok", "failed", "per_s"] {
            assert!(value["connect"].get(key).is_some(), "{key}");
        }
        let node = serde_json::to_value(NodeReport::default()).unwrap();
        for key in ["url", "rss_bytes", "sessions"] {
            assert!(node.get(key).is_some(), "{key}");
        }
    }

    #[test]
    fn violations_are_named() {
        let plan = test_plan(Scenario::Churn);
        let tally = Tally {
            duplicated: 1,
            seq_gaps: 2,
            resumed_false: 1,
            ..Default::default()
        };
        let report = Report::build(&plan, &tally, Timing::default(), vec![]);
        assert_eq!(report.out_of_order, 2);
        assert_eq!(report.violations.len(), 3, "{:?}", report.violations);
    }
}
