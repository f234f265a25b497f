//! What one run does, decided once by the driver and handed unchanged to
//! every worker (in-process, or as JSON to a worker process).
//!
//! Everything that must agree across workers is a pure function of the
//! plan and a client's global index `i` (0 ≤ i < clients), so workers never
//! need to talk to each other:
//!
//! - worker `w` of `K` runs the clients with `i mod K = w`;
//! - client `i` connects to `urls[i mod U]` as user `lt-<run>-u<i>`;
//! - client `i` lives in channel `(i div U) mod C`, named `lt-<run>-<c>`,
//!   so every channel has members on every node;
//! - client `i` connects from source address `source_ips[i mod S]` (when
//!   `--source-ips` gives S of them);
//! - publisher `j` (0 ≤ j < P) is client `U·j + (j mod U)`: it sits in
//!   channel `j mod C` on node `j mod U`, so with P ≥ C every channel has a
//!   publisher and publishers are spread over nodes and workers.

use anyhow::{bail, Result};
use gateway_shared::protocol::{is_valid_channel_name, MAX_CONTENT_CHARS};
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    Connect,
    Fanout,
    Churn,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Fanout => "fanout",
            Self::Churn => "churn",
        }
    }
}

/// How clients drop and resume in `churn`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChurnPlan {
    /// Connection drops per second over all non-publishing clients.
    pub drops_per_s: f64,
    /// A dropped client waits a random 0..=this many ms before resuming,
    /// so dispatches pile up in its replay ring meanwhile.
    pub down_ms_max: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub scenario: Scenario,
    /// Gateway WebSocket URLs; clients are spread over them round-robin.
    pub urls: Vec<String>,
    /// The cluster's HS256 secret, to mint tokens.
    pub secret: String,
    /// The issuer and audience the cluster requires of tokens, if any.
    #[serde(default)]
    pub issuer: Option<String>,
    #[serde(default)]
    pub audience: Option<String>,
    /// Tags user ids, channel names and nonces, so concurrent or earlier
    /// runs against the same cluster do not mix.
    pub run_id: String,
    /// Clients over all workers.
    pub clients: usize,
    /// New connections per second over all workers.
    pub ramp_per_s: f64,
    /// Connection attempts in flight at once, per worker.
    pub connect_concurrency: usize,
    /// How long a client may take to connect, present and join its channel.
    pub setup_timeout_s: f64,
    /// `connect`: how long the sessions are held after all are up.
    pub hold_s: f64,
    /// Channels the clients are spread over (0: stay in the default channel).
    pub channels: usize,
    /// Clients that publish.
    pub publishers: usize,
    /// Messages per second over all publishers.
    pub rate: f64,
    /// How long publishers send.
    pub duration_s: f64,
    /// After sending stops, how long to wait for the last deliveries.
    pub drain_s: f64,
    /// Length of every message's `content`.
    pub content_bytes: usize,
    /// `churn` only.
    pub churn: Option<ChurnPlan>,
    /// Worker processes (1: run in this process).
    pub workers: usize,
    /// Runtime threads per process (1: a current-thread runtime).
    pub threads: usize,
    /// Hard bound on the whole run; every process stops by itself after it.
    pub max_run_s: f64,
    /// Redis servers whose CPU (`INFO cpu`) the report gives for the run.
    #[serde(default)]
    pub redis: Vec<String>,
    /// Local addresses the clients connect from, round-robin (empty: the
    /// kernel's choice).
    #[serde(default)]
    pub source_ips: Vec<IpAddr>,
    /// `connect`: after the hold, client 0 sends one MESSAGE_CREATE into
    /// its channel (channel 0, or the default channel without
    /// `--channels`) and every member's delivery is counted and timed.
    #[serde(default)]
    pub fanout_at_end: bool,
    /// `connect`: messages sent into the clients' channel before they
    /// come (so that every move into it reads history).
    #[serde(default)]
    pub history: usize,
}

/// Most addresses `--source-ips` may name (a /16).
pub const MAX_SOURCE_IPS: usize = 65_536;

/// Parses `--source-ips`: comma-separated addresses and inclusive IPv4
/// ranges, e.g. `127.0.0.2-127.0.0.9,127.0.1.1`.
pub fn parse_source_ips(spec: &str) -> Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            None => out.push(
                part.parse::<IpAddr>()
                    .map_err(|_| anyhow::anyhow!("{part:?} is not an IP address"))?,
            ),
            Some((a, b)) => {
                let parse = |x: &str| {
                    x.trim()
                        .parse::<Ipv4Addr>()
                        .map_err(|_| anyhow::anyhow!("{x:?} in {part:?} is not an IPv4 address"))
                };
                let (a, b) = (u32::from(parse(a)?), u32::from(parse(b)?));
                if a > b {
                    bail!("the range {part:?} runs backwards");
                }
                if (b - a) as usize >= MAX_SOURCE_IPS {
                    bail!("the range {part:?} has more than {MAX_SOURCE_IPS} addresses");
                }
                out.extend((a..=b).map(|ip| IpAddr::V4(Ipv4Addr::from(ip))));
            }
        }
        if out.len() > MAX_SOURCE_IPS {
            bail!("--source-ips names more than {MAX_SOURCE_IPS} addresses");
        }
    }
    if out.is_empty() {
        bail!("--source-ips names no address");
    }
    Ok(out)
}

/// A random run id: 6 characters of `[a-z0-9]`.
pub fn random_run_id() -> String {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..6)
        .map(|_| CHARS[rng.random_range(0..CHARS.len())] as char)
        .collect()
}

/// A finite number above zero (NaN is not).
fn positive(x: f64) -> bool {
    x.is_finite() && x > 0.0
}

/// A finite number, zero or more.
fn non_negative(x: f64) -> bool {
    x.is_finite() && x >= 0.0
}

impl Plan {
    /// A token of this cluster for user `sub`, valid `ttl_s` seconds.
    pub fn token(&self, sub: &str, name: &str, ttl_s: u64) -> String {
        crate::smoke::Minter {
            secret: &self.secret,
            issuer: self.issuer.as_deref(),
            audience: self.audience.as_deref(),
        }
        .token(sub, name, ttl_s)
    }

    /// Checks what would otherwise fail half-way through a run.
    pub fn validate(&self) -> Result<()> {
        if self.urls.is_empty() {
            bail!("--urls needs at least one ws://host:port/gateway URL");
        }
        for url in &self.urls {
            if !url.starts_with("ws://") {
                bail!("{url:?} is not a ws:// URL");
            }
        }
        if self.secret.is_empty() {
            bail!("a JWT secret is required (--jwt-secret or GATEWAY_JWT_SECRET)");
        }
        if self.run_id.is_empty()
            || self.run_id.len() > 12
            || !self
                .run_id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        {
            bail!("--run-id must be 1-12 characters of [a-z0-9]");
        }
        if self.clients == 0 {
            bail!("--clients must be at least 1");
        }
        if self.workers == 0 || self.workers > self.clients {
            bail!("--workers must be between 1 and --clients");
        }
        if self.threads == 0 {
            bail!("--threads must be at least 1");
        }
        if !positive(self.ramp_per_s) || self.connect_concurrency == 0 {
            bail!("--ramp-per-s and --connect-concurrency must be positive");
        }
        if !positive(self.setup_timeout_s) || !positive(self.max_run_s) {
            bail!("--setup-timeout-s and --max-run-s must be positive");
        }
        if !non_negative(self.hold_s) || !non_negative(self.drain_s) {
            bail!("--hold-s and --drain-s must be zero or more");
        }
        if self.channels > 0 && !is_valid_channel_name(&self.channel_name(self.channels - 1)) {
            bail!("too many channels for a valid channel name");
        }
        if self.scenario == Scenario::Connect && self.fanout_at_end && self.publishers != 1 {
            bail!("--fanout-at-end has one publisher");
        }
        if self.scenario != Scenario::Connect {
            if self.channels == 0 {
                bail!("--channels must be at least 1");
            }
            if self.fanout_at_end {
                bail!("--fanout-at-end is a `connect` option");
            }
            let max_publishers = self.clients.div_ceil(self.urls.len());
            if self.publishers == 0 || self.publishers_clients_end() > self.clients {
                bail!(
                    "--publishers must be between 1 and about clients/urls \
                     ({max_publishers} here)"
                );
            }
            if !positive(self.rate) || !positive(self.duration_s) {
                bail!("--rate and --duration-s must be positive");
            }
            if self.content_bytes == 0 || self.content_bytes > MAX_CONTENT_CHARS {
                bail!("--content-bytes must be 1-{MAX_CONTENT_CHARS}");
            }
        }
        if let Some(churn) = &self.churn {
            if !positive(churn.drops_per_s) {
                bail!("--drops-per-s must be positive");
            }
            if self.publishers >= self.clients {
                bail!("churn needs clients that do not publish");
            }
        }
        Ok(())
    }

    /// One past the largest client index a publisher has.
    fn publishers_clients_end(&self) -> usize {
        (0..self.publishers)
            .map(|j| self.publisher_client(j) + 1)
            .max()
            .unwrap_or(0)
    }

    pub fn url_count(&self) -> usize {
        self.urls.len()
    }

    /// The index in `urls` of client `i`'s node.
    pub fn url_of(&self, i: usize) -> usize {
        i % self.urls.len()
    }

    /// The channel client `i` moves into, if the plan has channels.
    pub fn channel_of(&self, i: usize) -> Option<usize> {
        (self.channels > 0).then(|| (i / self.urls.len()) % self.channels)
    }

    /// Channels whose members and messages are counted: the plan's, or for
    /// `connect --fanout-at-end` without channels the default channel, as
    /// channel 0.
    pub fn tracked_channels(&self) -> usize {
        if self.channels == 0 && self.fanout_at_end {
            1
        } else {
            self.channels
        }
    }

    /// The counted channel client `i` is a member of (see
    /// [`tracked_channels`](Self::tracked_channels)).
    pub fn tracked_channel_of(&self, i: usize) -> Option<usize> {
        match self.channel_of(i) {
            Some(c) => Some(c),
            None => (self.tracked_channels() == 1).then_some(0),
        }
    }

    /// The local address client `i` connects from, if the plan names any.
    pub fn source_ip_of(&self, i: usize) -> Option<IpAddr> {
        (!self.source_ips.is_empty()).then(|| self.source_ips[i % self.source_ips.len()])
    }

    pub fn channel_name(&self, c: usize) -> String {
        format!("lt-{}-{c}", self.run_id)
    }

    pub fn user_id(&self, i: usize) -> String {
        format!("lt-{}-u{i}", self.run_id)
    }

    /// The client index of publisher `j`.
    pub fn publisher_client(&self, j: usize) -> usize {
        let u = self.urls.len();
        u * j + j % u
    }

    /// The publisher number of client `i`, if it publishes.
    pub fn publisher_of(&self, i: usize) -> Option<usize> {
        if self.scenario == Scenario::Connect && !self.fanout_at_end {
            return None;
        }
        let j = i / self.urls.len();
        (j < self.publishers && self.publisher_client(j) == i).then_some(j)
    }

    /// Whether worker `w` runs client `i`.
    pub fn runs(&self, w: usize, i: usize) -> bool {
        i % self.workers == w
    }

    /// Time between two messages of one publisher.
    pub fn publish_interval(&self) -> Duration {
        Duration::from_secs_f64(self.publishers as f64 / self.rate)
    }

    /// Messages one publisher sends in the run.
    pub fn messages_per_publisher(&self) -> u64 {
        (self.duration_s * self.rate / self.publishers as f64).ceil() as u64
    }
}

#[cfg(test)]
pub(crate) fn test_plan(scenario: Scenario) -> Plan {
    Plan {
        scenario,
        urls: vec!["ws://127.0.0.1:1/gateway".into()],
        secret: "x".repeat(32),
        issuer: None,
        audience: None,
        run_id: "abc123".into(),
        clients: 20,
        ramp_per_s: 1000.0,
        connect_concurrency: 64,
        setup_timeout_s: 10.0,
        hold_s: 1.0,
        channels: 2,
        publishers: 2,
        rate: 50.0,
        duration_s: 2.0,
        drain_s: 2.0,
        content_bytes: 16,
        churn: None,
        workers: 1,
        threads: 1,
        max_run_s: 60.0,
        redis: Vec::new(),
        source_ips: Vec::new(),
        fanout_at_end: false,
        history: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishers_cover_channels_and_nodes() {
        let mut plan = test_plan(Scenario::Fanout);
        plan.urls = vec!["ws://a/".into(), "ws://b/".into(), "ws://c/".into()];
        plan.clients = 300;
        plan.channels = 4;
        plan.publishers = 8;
        plan.validate().unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for j in 0..plan.publishers {
            let i = plan.publisher_client(j);
            assert_eq!(plan.publisher_of(i), Some(j));
            assert_eq!(plan.channel_of(i), Some(j % 4));
            assert_eq!(plan.url_of(i), j % 3);
            seen.insert(i);
        }
        assert_eq!(seen.len(), 8);
        let publishers = (0..plan.clients)
            .filter(|&i| plan.publisher_of(i).is_some())
            .count();
        assert_eq!(publishers, 8);
        // Every channel has members on every node.
        for c in 0..4 {
            let nodes: std::collections::BTreeSet<_> = (0..plan.clients)
                .filter(|&i| plan.channel_of(i) == Some(c))
                .map(|i| plan.url_of(i))
                .collect();
            assert_eq!(nodes.len(), 3, "channel {c}");
        }
    }

    #[test]
    fn connect_moves_into_its_channels_only_when_asked() {
        let mut plan = test_plan(Scenario::Connect);
        plan.channels = 2;
        assert_eq!(plan.channel_of(0), Some(0));
        assert_eq!(plan.channel_of(1), Some(1));
        assert!((0..plan.clients).all(|i| plan.publisher_of(i).is_none()));
        plan.channels = 0;
        assert!((0..plan.clients).all(|i| plan.channel_of(i).is_none()));
    }

    #[test]
    fn workers_split_clients_without_overlap() {
        let mut plan = test_plan(Scenario::Fanout);
        plan.workers = 3;
        for i in 0..plan.clients {
            assert_eq!((0..3).filter(|&w| plan.runs(w, i)).count(), 1);
        }
    }

    #[test]
    fn bad_plans_are_refused() {
        let ok = test_plan(Scenario::Fanout);
        ok.validate().unwrap();
        let mut p = ok.clone();
        p.publishers = 21;
        assert!(p.validate().is_err());
        let mut p = ok.clone();
        p.run_id = "Bad".into();
        assert!(p.validate().is_err());
        let mut p = ok.clone();
        p.urls = vec!["http://x/".into()];
        assert!(p.validate().is_err());
        let mut p = ok.clone();
        p.rate = 0.0;
        assert!(p.validate().is_err());
        let mut p = ok.clone();
        p.rate = f64::NAN;
        assert!(p.validate().is_err());
        let mut p = ok.clone();
        p.workers = 30;
        assert!(p.validate().is_err());
        let mut p = ok;
        p.fanout_at_end = true;
        assert!(p.validate().is_err());
        assert_eq!(random_run_id().len(), 6);
    }

    #[test]
    fn source_ips_parse_from_lists_and_ranges() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            parse_source_ips("127.0.0.2-127.0.0.4").unwrap(),
            vec![ip("127.0.0.2"), ip("127.0.0.3"), ip("127.0.0.4")]
        );
        // Ranges cross octets; single addresses and IPv6 mix in.
        assert_eq!(
            parse_source_ips("10.0.0.255-10.0.1.0, ::1,127.0.0.9").unwrap(),
            vec![ip("10.0.0.255"), ip("10.0.1.0"), ip("::1"), ip("127.0.0.9")]
        );
        assert_eq!(parse_source_ips("127.0.0.5-127.0.0.5").unwrap().len(), 1);
        for bad in [
            "",
            ",",
            "127.0.0.9-127.0.0.2",
            "127.0.0.300",
            "localhost",
            "::1-::2",
            "10.0.0.0-10.1.0.0",
        ] {
            assert!(parse_source_ips(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            parse_source_ips("10.0.0.0-10.0.255.255").unwrap().len(),
            65_536
        );
    }

    #[test]
    fn clients_spread_over_source_ips_and_the_fanout_reaches_the_default_channel() {
        let mut plan = test_plan(Scenario::Connect);
        plan.channels = 0;
        plan.publishers = 1;
        plan.fanout_at_end = true;
        plan.source_ips = parse_source_ips("127.0.0.2-127.0.0.4").unwrap();
        plan.validate().unwrap();
        assert_eq!(plan.source_ip_of(0), Some("127.0.0.2".parse().unwrap()));
        assert_eq!(plan.source_ip_of(5), Some("127.0.0.4".parse().unwrap()));
        // One publisher, client 0; everyone counts as a member of the
        // default channel (tracked as channel 0) and nobody moves.
        let publishers: Vec<usize> = (0..plan.clients)
            .filter(|&i| plan.publisher_of(i).is_some())
            .collect();
        assert_eq!(publishers, vec![0]);
        assert_eq!(plan.tracked_channels(), 1);
        assert!((0..plan.clients).all(|i| plan.tracked_channel_of(i) == Some(0)));
        assert!((0..plan.clients).all(|i| plan.channel_of(i).is_none()));
        // Without the fan-out, connect has no publisher and tracks nothing.
        plan.fanout_at_end = false;
        assert!((0..plan.clients).all(|i| plan.publisher_of(i).is_none()));
        assert_eq!(plan.tracked_channels(), 0);
        assert_eq!(plan.source_ip_of(1), Some("127.0.0.3".parse().unwrap()));
        plan.source_ips.clear();
        assert_eq!(plan.source_ip_of(1), None);
    }
}
