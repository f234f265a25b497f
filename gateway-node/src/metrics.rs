//! Prometheus metrics of one node (its own registry, so several nodes can
//! run in one process). Label sets are bounded: function codes, event
//! names, error codes and a few fixed words; never user or session ids.

use crate::wire::Dispatch;
use gateway_shared::protocol::{ErrorCode, Event, FunctionCode};
use prometheus::{
    Counter, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::time::Instant;

pub struct Metrics {
    /// This node's `gateway_*` metrics.
    registry: Registry,
    /// The `process_*` metrics, unprefixed as Prometheus expects them.
    process: Registry,
    pub connections: IntGauge,
    sessions_live: IntGauge,
    sessions_detached: IntGauge,
    frames_received: IntCounterVec,
    events_executed: IntCounterVec,
    /// Resolved per event once: the writer counts every frame, and a label
    /// lookup per frame would hash strings on the hot path.
    dispatches_sent: Vec<IntCounter>,
    errors_sent: IntCounterVec,
    fanout_delay: Histogram,
    resumes: IntCounterVec,
    pub slow_consumers: IntCounter,
    /// Direct writes the socket took only in part (the writer finished
    /// them): how often a connection's buffer filled mid-frame.
    pub direct_writes_cut: IntCounter,
    /// Connections refused or cut before a session, by the limit that did
    /// it (docs/DEPLOY.md, "Security and abuse limits").
    refused: IntCounterVec,
    /// Times a reader stopped reading its client until its replies were
    /// written: clients that send faster than they read.
    pub reads_held_back: IntCounter,
    pub broker_errors: IntCounter,
    pub broker_publish: Histogram,
    /// Messages per script call to Redis (the publish batches).
    pub redis_publish_batch: Histogram,
    /// Channel logs (and the cluster-wide one) that the backend lost events
    /// of: their sessions on this node were ended with 1012.
    pub log_resets: IntCounter,
    /// CPU seconds of this process at the kernel's 10 ms resolution
    /// (`process_cpu_seconds_total` has whole seconds only).
    cpu_seconds: Counter,
    /// Server API requests by route template and HTTP status.
    api_requests: IntCounterVec,
    /// Server API latency by route template.
    api_duration: HistogramVec,
}

/// Label values of `gateway_frames_received_total`.
const FRAME_LABELS: [&str; 7] = ["100", "110", "120", "130", "140", "150", "invalid"];
/// Label values of `gateway_connections_refused_total`.
const REFUSED_LABELS: [&str; 5] = [
    "node_full",
    "address_full",
    "draining",
    "header_timeout",
    "head_too_large",
];

/// Why a connection was refused or cut before it had a session.
#[derive(Debug, Clone, Copy)]
pub enum Refused {
    /// `--max-connections` (503).
    NodeFull = 0,
    /// `--max-connections-per-ip` (429).
    AddressFull = 1,
    /// The node drains (503).
    Draining = 2,
    /// No complete request head within `--http-header-timeout-ms`.
    HeaderTimeout = 3,
    /// A request head over the size cap (431).
    HeadTooLarge = 4,
}

/// Label values of `gateway_resumes_total`.
const RESUME_LABELS: [&str; 4] = ["local", "remote", "parked", "failed"];

/// Outcome label of `gateway_resumes_total`.
#[derive(Debug, Clone, Copy)]
pub enum ResumeResult {
    Local = 0,
    Remote = 1,
    Parked = 2,
    Failed = 3,
}

impl Metrics {
    pub fn new(node_id: &str) -> Self {
        let registry = Registry::new_custom(
            Some("gateway".into()),
            Some([("node".to_owned(), node_id.to_owned())].into()),
        )
        .expect("valid registry");
        let connections = IntGauge::new("connections", "Open WebSocket connections").unwrap();
        let sessions = IntGaugeVec::new(
            Opts::new("sessions", "Sessions on this node by state"),
            &["state"],
        )
        .unwrap();
        let frames_received = IntCounterVec::new(
            Opts::new(
                "frames_received_total",
                "Client messages received by function code",
            ),
            &["f"],
        )
        .unwrap();
        let events_executed = IntCounterVec::new(
            Opts::new("events_executed_total", "Client executes by event"),
            &["t"],
        )
        .unwrap();
        let dispatches = IntCounterVec::new(
            Opts::new(
                "dispatches_sent_total",
                "Dispatches written to sockets by event",
            ),
            &["t"],
        )
        .unwrap();
        let errors_sent = IntCounterVec::new(
            Opts::new("errors_sent_total", "Errors sent to clients by code"),
            &["code"],
        )
        .unwrap();
        let fanout_delay = Histogram::with_opts(
            HistogramOpts::new(
                "fanout_delay_seconds",
                "Time from an event reaching this node (its publication, in memory) to its frame being written to a socket",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
        )
        .unwrap();
        let resumes = IntCounterVec::new(
            Opts::new("resumes_total", "Resume attempts by result"),
            &["result"],
        )
        .unwrap();
        let slow_consumers = IntCounter::new(
            "slow_consumers_total",
            "Connections closed with 4016 because the client read too slowly",
        )
        .unwrap();
        let direct_writes_cut = IntCounter::new(
            "direct_writes_cut_total",
            "Dispatch frames the fan-out began writing and the connection's writer finished (the socket took part)",
        )
        .unwrap();
        let refused = IntCounterVec::new(
            Opts::new(
                "connections_refused_total",
                "Connections refused or cut before a session, by the limit that did it",
            ),
            &["reason"],
        )
        .unwrap();
        let reads_held_back = IntCounter::new(
            "reads_held_back_total",
            "Times a connection stopped reading requests until its replies were written",
        )
        .unwrap();
        let broker_errors =
            IntCounter::new("broker_errors_total", "Failed backend operations").unwrap();
        let cpu_seconds = Counter::new(
            "cpu_seconds_total",
            "CPU seconds (user + system) this node's process has used, at 10 ms resolution",
        )
        .unwrap();
        let log_resets = IntCounter::new(
            "log_resets_total",
            "Channel logs that lost events in the backend (failover, trim); their sessions here ended with 1012",
        )
        .unwrap();
        let broker_publish = Histogram::with_opts(
            HistogramOpts::new("broker_publish_seconds", "Time to publish one event").buckets(
                vec![
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                ],
            ),
        )
        .unwrap();
        let redis_publish_batch = Histogram::with_opts(
            HistogramOpts::new(
                "redis_publish_batch_messages",
                "Messages sent to Redis in one script call",
            )
            .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]),
        )
        .unwrap();
        let api_requests = IntCounterVec::new(
            Opts::new(
                "api_requests_total",
                "Server API requests by route template and HTTP status",
            ),
            &["route", "status"],
        )
        .unwrap();
        let api_duration = HistogramVec::new(
            HistogramOpts::new(
                "api_request_duration_seconds",
                "Time to answer a server API request, by route template",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
            &["route"],
        )
        .unwrap();
        for c in [
            Box::new(connections.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(sessions.clone()),
            Box::new(frames_received.clone()),
            Box::new(events_executed.clone()),
            Box::new(dispatches.clone()),
            Box::new(errors_sent.clone()),
            Box::new(fanout_delay.clone()),
            Box::new(resumes.clone()),
            Box::new(slow_consumers.clone()),
            Box::new(direct_writes_cut.clone()),
            Box::new(refused.clone()),
            Box::new(reads_held_back.clone()),
            Box::new(broker_errors.clone()),
            Box::new(broker_publish.clone()),
            Box::new(redis_publish_batch.clone()),
            Box::new(log_resets.clone()),
            Box::new(cpu_seconds.clone()),
            Box::new(api_requests.clone()),
            Box::new(api_duration.clone()),
        ] {
            registry.register(c).expect("unique metric names");
        }
        // Process metrics (RSS, CPU, open files) without the `gateway_` prefix.
        let process = Registry::new();
        #[cfg(target_os = "linux")]
        process
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("process collector registers once");
        let dispatches_sent = Event::ALL
            .iter()
            .map(|e| dispatches.with_label_values(&[e.name()]))
            .collect();
        // Every known label value exists from the start, at zero, so that
        // dashboards and rate() alerts see a series before the first event
        // (Prometheus' own advice for labelled metrics).
        for f in FRAME_LABELS {
            frames_received.with_label_values(&[f]);
        }
        for e in Event::ALL {
            events_executed.with_label_values(&[e.name()]);
        }
        for code in ErrorCode::ALL {
            errors_sent.with_label_values(&[itoa::Buffer::new().format(code.code())]);
        }
        for result in RESUME_LABELS {
            resumes.with_label_values(&[result]);
        }
        for reason in REFUSED_LABELS {
            refused.with_label_values(&[reason]);
        }
        let api_routes = crate::api::ROUTES
            .iter()
            .map(|r| (r.template, r.statuses))
            .chain([crate::api::UNMATCHED, crate::api::DISABLED]);
        for (route, statuses) in api_routes {
            api_duration.with_label_values(&[route]);
            for status in statuses {
                api_requests.with_label_values(&[route, itoa::Buffer::new().format(*status)]);
            }
        }
        Self {
            connections,
            sessions_live: sessions.with_label_values(&["live"]),
            sessions_detached: sessions.with_label_values(&["detached"]),
            frames_received,
            events_executed,
            dispatches_sent,
            errors_sent,
            fanout_delay,
            resumes,
            slow_consumers,
            direct_writes_cut,
            refused,
            reads_held_back,
            broker_errors,
            broker_publish,
            redis_publish_batch,
            log_resets,
            cpu_seconds,
            api_requests,
            api_duration,
            registry,
            process,
        }
    }

    /// Moves one session between the `live` and `detached` gauges (`None`:
    /// created or ended).
    pub fn session_state(&self, from_live: Option<bool>, to_live: Option<bool>) {
        match from_live {
            Some(true) => self.sessions_live.dec(),
            Some(false) => self.sessions_detached.dec(),
            None => {}
        }
        match to_live {
            Some(true) => self.sessions_live.inc(),
            Some(false) => self.sessions_detached.inc(),
            None => {}
        }
    }

    pub fn refused(&self, why: Refused) {
        self.refused
            .with_label_values(&[REFUSED_LABELS[why as usize]])
            .inc();
    }

    pub fn frame_received(&self, f: Option<FunctionCode>) {
        let label = match f {
            Some(FunctionCode::Hello) => FRAME_LABELS[0],
            Some(FunctionCode::Present) => FRAME_LABELS[1],
            Some(FunctionCode::Heartbeat) => FRAME_LABELS[2],
            Some(FunctionCode::Dispatch) => FRAME_LABELS[3],
            Some(FunctionCode::Ready) => FRAME_LABELS[4],
            Some(FunctionCode::Error) => FRAME_LABELS[5],
            None => FRAME_LABELS[6],
        };
        self.frames_received.with_label_values(&[label]).inc();
    }

    pub fn event_executed(&self, event: Event) {
        self.events_executed
            .with_label_values(&[event.name()])
            .inc();
    }

    pub fn error_sent(&self, code: ErrorCode) {
        let mut digits = itoa::Buffer::new();
        self.errors_sent
            .with_label_values(&[digits.format(code.code())])
            .inc();
    }

    pub fn resume(&self, result: ResumeResult) {
        let label = RESUME_LABELS[result as usize];
        self.resumes.with_label_values(&[label]).inc();
    }

    /// Counts one server API request. `route` is a route template (or
    /// a fixed word for unmatched paths): bounded, never a raw path.
    pub fn api_request(&self, route: &'static str, status: u16, started: Instant) {
        let mut digits = itoa::Buffer::new();
        self.api_requests
            .with_label_values(&[route, digits.format(status)])
            .inc();
        self.api_duration
            .with_label_values(&[route])
            .observe(started.elapsed().as_secs_f64());
    }

    /// Counts one written dispatch and its fan-out delay.
    pub fn dispatch_sent(&self, dispatch: &Dispatch, now: Instant) {
        self.dispatches_sent[dispatch.event as usize].inc();
        self.fanout_delay.observe(
            now.saturating_duration_since(dispatch.created)
                .as_secs_f64(),
        );
    }

    /// The Prometheus text exposition of this node's metrics and the process's.
    pub fn render(&self) -> Vec<u8> {
        if let Some(now) = process_cpu_seconds() {
            let delta = now - self.cpu_seconds.get();
            if delta > 0.0 {
                self.cpu_seconds.inc_by(delta);
            }
        }
        let mut families = self.registry.gather();
        families.extend(self.process.gather());
        let mut out = Vec::with_capacity(8192);
        TextEncoder::new()
            .encode(&families, &mut out)
            .expect("text encoding to a Vec cannot fail");
        out
    }
}

/// User + system CPU seconds of this process, from /proc/self/stat (in
/// USER_HZ ticks, 100 a second on Linux).
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which is in parentheses and may hold
    // spaces: state is field 3, utime 14 and stime 15.
    let rest = stat.rsplit_once(')')?.1;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(text: &str, name: &str, label: &str) -> Option<String> {
        text.lines()
            .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
            .map(|l| l.rsplit(' ').next().unwrap().to_owned())
    }

    #[test]
    fn every_known_label_value_is_a_series_from_the_start() {
        let text = String::from_utf8(Metrics::new("n1").render()).unwrap();
        for code in ErrorCode::ALL {
            let label = format!("code=\"{}\"", code.code());
            assert_eq!(
                series(&text, "gateway_errors_sent_total", &label).as_deref(),
                Some("0"),
                "{label}"
            );
        }
        for result in RESUME_LABELS {
            let label = format!("result=\"{result}\"");
            assert_eq!(
                series(&text, "gateway_resumes_total", &label).as_deref(),
                Some("0")
            );
        }
        for f in FRAME_LABELS {
            let label = format!("f=\"{f}\"");
            assert_eq!(
                series(&text, "gateway_frames_received_total", &label).as_deref(),
                Some("0")
            );
        }
        for e in Event::ALL {
            let label = format!("t=\"{}\"", e.name());
            assert_eq!(
                series(&text, "gateway_events_executed_total", &label).as_deref(),
                Some("0")
            );
            assert_eq!(
                series(&text, "gateway_dispatches_sent_total", &label).as_deref(),
                Some("0")
            );
        }
    }

    #[test]
    fn the_process_cpu_counter_reads_this_process() {
        // Burn some CPU (well over the 10 ms resolution), then render.
        let mut x = 0u64;
        for i in 0..50_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let text = String::from_utf8(Metrics::new("n1").render()).unwrap();
        let value: f64 = series(&text, "gateway_cpu_seconds_total", "node=\"n1\"")
            .expect("the series is rendered")
            .parse()
            .unwrap();
        assert!(value > 0.0, "{value}");
    }

    #[test]
    fn counting_moves_the_right_series() {
        let m = Metrics::new("n1");
        m.error_sent(ErrorCode::RateLimited);
        m.resume(ResumeResult::Parked);
        let text = String::from_utf8(m.render()).unwrap();
        let value = |name, label| series(&text, name, label);
        assert_eq!(
            value("gateway_errors_sent_total", "code=\"4008\"").as_deref(),
            Some("1")
        );
        assert_eq!(
            value("gateway_errors_sent_total", "code=\"4009\"").as_deref(),
            Some("0")
        );
        assert_eq!(
            value("gateway_resumes_total", "result=\"parked\"").as_deref(),
            Some("1")
        );
        assert_eq!(
            value("gateway_resumes_total", "result=\"failed\"").as_deref(),
            Some("0")
        );
    }

    /// The alert rules shipped in deploy/ name only metrics a fresh node
    /// already exposes: a typo or a renamed metric would make an alert
    /// that never fires.
    #[test]
    fn every_metric_the_alert_rules_use_is_exposed_from_the_start() {
        let rules = include_str!("../../deploy/prometheus/alerts.yml");
        let text = String::from_utf8(Metrics::new("n1").render()).unwrap();
        let exposed: std::collections::HashSet<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .collect();
        let mut used = 0;
        for word in rules.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("gateway_") || word.starts_with("process_") {
                used += 1;
                assert!(
                    exposed.contains(word),
                    "alerts.yml uses {word}, which no node exposes"
                );
            }
        }
        assert!(used >= 5, "the rules name metrics");
    }
}
