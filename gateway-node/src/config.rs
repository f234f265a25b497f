//! The node's configuration: one struct, parsed from flags and `GATEWAY_…`
//! environment variables, validated once at start, then passed down.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The secret `--dev` uses. Refused outside `--dev`.
pub const DEV_SECRET: &str = "gateway-development-secret-not-for-production";
/// Shortest JWT secret accepted, in bytes.
pub const MIN_SECRET_LEN: usize = 32;
/// Shortest server API key accepted, in bytes.
pub const MIN_API_KEY_LEN: usize = 16;

#[derive(Debug, Parser)]
#[command(
    name = "gateway-node",
    version,
    about = "A Discord-style real-time WebSocket gateway node"
)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// `serve` is what runs without a subcommand.
    #[command(flatten)]
    pub serve: Config,
}

#[derive(Debug, Subcommand)]
// Parsed once at start: the size of a variant does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Run a gateway node (the default).
    Serve(Config),
    /// Print a signed token for connecting to a node.
    Token(TokenArgs),
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The cluster's JWT secret.
    #[arg(long, env = "GATEWAY_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: String,
    /// User id (`sub` claim), 1-64 characters.
    #[arg(long)]
    pub sub: String,
    /// Display name (`name` claim), 1-32 characters.
    #[arg(long)]
    pub name: String,
    /// Make the user an admin.
    #[arg(long)]
    pub admin: bool,
    /// Lifetime of the token in seconds.
    #[arg(long, default_value_t = 3600)]
    pub ttl_s: u64,
    /// Issuer (`iss`), for a cluster that requires one; inside a node's
    /// container the node's own setting.
    #[arg(long, env = "GATEWAY_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Audience (`aud`), for a cluster that requires one; inside a node's
    /// container the node's own setting.
    #[arg(long, env = "GATEWAY_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Every setting of a node. Flags and environment variables carry the same
/// names (`--hb-int-ms` / `GATEWAY_HB_INT_MS`).
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Address to listen on (WebSocket, health and metrics share it).
    #[arg(long, env = "GATEWAY_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Redis URL for a cluster of nodes (with --redis-cluster: one or more
    /// seed URLs, comma-separated; `unix:///path/redis.sock` for a Redis
    /// on the same host); absent, the node runs alone in memory.
    #[arg(long, env = "GATEWAY_REDIS_URL")]
    pub redis_url: Option<String>,
    /// The Redis is a Redis Cluster (7.0+): sharded pub/sub, commands
    /// routed by slot.
    #[arg(long, env = "GATEWAY_REDIS_CLUSTER", default_value_t = false)]
    pub redis_cluster: bool,
    /// Redis ACL user (overrides one in the URL).
    #[arg(long, env = "GATEWAY_REDIS_USERNAME")]
    pub redis_username: Option<String>,
    /// Redis password, for AUTH (overrides one in the URL).
    #[arg(long, env = "GATEWAY_REDIS_PASSWORD", hide_env_values = true)]
    pub redis_password: Option<String>,
    /// How long a node gathers messages before sending them to Redis
    /// together, in µs, on top of its self-clocked batches (0: a batch goes
    /// when the one before it is answered). Longer saves Redis CPU per
    /// message at the cost of that much latency.
    #[arg(long, env = "GATEWAY_REDIS_PUBLISH_BATCH_US", default_value_t = 0)]
    pub redis_publish_batch_us: u64,
    /// PEM file of the CA that signed the Redis servers' certificates
    /// (rediss://); default: the system's trusted roots.
    #[arg(long, env = "GATEWAY_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,
    /// HS256 secret of the cluster's tokens, at least 32 bytes.
    #[arg(long, env = "GATEWAY_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// File holding the JWT secret (trailing newline ignored).
    #[arg(long, env = "GATEWAY_JWT_SECRET_FILE", conflicts_with = "jwt_secret")]
    pub jwt_secret_file: Option<PathBuf>,
    /// A previous HS256 secret that still verifies tokens while the secret
    /// is rotated (docs/DEPLOY.md); tokens are never signed with it.
    #[arg(long, env = "GATEWAY_JWT_PREVIOUS_SECRET", hide_env_values = true)]
    pub jwt_previous_secret: Option<String>,
    /// File holding the previous JWT secret (trailing newline ignored).
    #[arg(
        long,
        env = "GATEWAY_JWT_PREVIOUS_SECRET_FILE",
        conflicts_with = "jwt_previous_secret"
    )]
    pub jwt_previous_secret_file: Option<PathBuf>,
    /// When set, tokens must carry this issuer (`iss`).
    #[arg(long, env = "GATEWAY_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// When set, tokens must carry this audience (`aud`); when not, an
    /// `aud` in a token is ignored.
    #[arg(long, env = "GATEWAY_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Keys of the server API (`/api/v1/`), comma-separated: while a key
    /// is rotated, the old and the new one both work. With no key (here or
    /// in --api-keys-file) the API is off.
    #[arg(long, env = "GATEWAY_API_KEYS", hide_env_values = true)]
    pub api_keys: Option<String>,
    /// File of server API keys, one a line (or comma-separated); adds to
    /// --api-keys.
    #[arg(long, env = "GATEWAY_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// This node's id in the cluster; default: the host name or a random one.
    #[arg(long, env = "GATEWAY_NODE_ID")]
    pub node_id: Option<String>,
    /// Heartbeat interval announced in HELLO, in ms; also how long a
    /// socket may take no byte before its client is a slow consumer.
    #[arg(long, env = "GATEWAY_HB_INT_MS", default_value_t = 20_000)]
    pub hb_int_ms: u64,
    /// How long a disconnected session stays resumable, in seconds.
    #[arg(long, env = "GATEWAY_RESUME_WINDOW_S", default_value_t = 60)]
    pub resume_window_s: u64,
    /// Dispatches a session holds for replay on resume, before those not
    /// yet written (held too, up to one past `--outbound-limit`).
    #[arg(long, env = "GATEWAY_REPLAY_BUFFER", default_value_t = 1000)]
    pub replay_buffer: usize,
    /// Executes (code 130) a session may send per window (the burst).
    #[arg(long, env = "GATEWAY_RATE_LIMIT_COUNT", default_value_t = 120)]
    pub rate_limit_count: u32,
    /// The rate-limit window in seconds; tokens refill at count/window per s.
    #[arg(long, env = "GATEWAY_RATE_LIMIT_WINDOW_S", default_value_t = 60)]
    pub rate_limit_window_s: u32,
    /// New sessions one user may start on this node per minute (a burst of
    /// this many, refilled over a minute); a PRESENT over it gets 4008.
    /// Resumes do not count. 0 turns the budget off.
    #[arg(long, env = "GATEWAY_SESSION_STARTS_PER_USER", default_value_t = 60)]
    pub session_starts_per_user: u32,
    /// Dispatches queued unsent before a client is a slow consumer (4016).
    #[arg(long, env = "GATEWAY_OUTBOUND_LIMIT", default_value_t = 1024)]
    pub outbound_limit: usize,
    /// Write a dispatch to its socket from the thread that fans it out
    /// when the connection has nothing queued and the node keeps up (no
    /// further event waiting to be fanned out), instead of waking the
    /// connection's writer task: less CPU per delivery. `false` leaves
    /// every write to the writer tasks (docs/BENCHMARKS.md, "Direct
    /// writes").
    #[arg(long, env = "GATEWAY_DIRECT_WRITES", default_value_t = true, action = clap::ArgAction::Set)]
    pub direct_writes: bool,
    /// WebSocket connections this node admits at once.
    #[arg(long, env = "GATEWAY_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: usize,
    /// WebSocket connections one client address may hold at once (429
    /// beyond); 0 turns the cap off. Leave it off behind a proxy or load
    /// balancer that hides client addresses.
    #[arg(long, env = "GATEWAY_MAX_CONNECTIONS_PER_IP", default_value_t = 0)]
    pub max_connections_per_ip: usize,
    /// Kernel send buffer of each client socket, in bytes (the kernel
    /// doubles it); 0 leaves it to the kernel's autotuning, which lets a
    /// client that stops reading hold up to `net.ipv4.tcp_wmem`'s maximum
    /// (4 MiB by default) before the slow-consumer rule counts.
    #[arg(long, env = "GATEWAY_TCP_SEND_BUFFER", default_value_t = 65_536)]
    pub tcp_send_buffer: usize,
    /// How long a client may take to send an HTTP request head (the
    /// WebSocket upgrade included), in ms; then the connection is closed.
    #[arg(long, env = "GATEWAY_HTTP_HEADER_TIMEOUT_MS", default_value_t = 10_000)]
    pub http_header_timeout_ms: u64,
    /// How long a draining node waits for its clients to go, in seconds.
    #[arg(long, env = "GATEWAY_DRAIN_GRACE_S", default_value_t = 10)]
    pub drain_grace_s: u64,
    /// The channel new sessions start in (always exists).
    #[arg(long, env = "GATEWAY_DEFAULT_CHANNEL", default_value = "general")]
    pub default_channel: String,
    /// ROOM_USER_ADD/REMOVE go out only while a channel has at most this many members.
    #[arg(long, env = "GATEWAY_PRESENCE_THRESHOLD", default_value_t = 1000)]
    pub presence_threshold: usize,
    /// Channels the cluster holds at most (CHANNEL_ADD beyond it gets 4012).
    #[arg(long, env = "GATEWAY_MAX_CHANNELS", default_value_t = 10_000)]
    pub max_channels: usize,
    /// Messages a channel keeps for history and MESSAGE_DELETE.
    #[arg(long, env = "GATEWAY_HISTORY_RETAIN", default_value_t = 1000)]
    pub history_retain: usize,
    /// Runtime worker threads; default: one per CPU. Give a node as many
    /// as the cores it really gets (its CPU limit in Kubernetes).
    #[arg(long, env = "GATEWAY_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// Log format.
    #[arg(long, env = "GATEWAY_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Development mode: allows the built-in development secret and serves
    /// `POST /dev/token`, which mints a token for any name. Implied when a
    /// lone node starts without a secret.
    #[arg(long, env = "GATEWAY_DEV", default_value_t = false)]
    pub dev: bool,
    /// Serve the demo chat page at `/` (`--demo false` turns it off).
    #[arg(long, env = "GATEWAY_DEMO", default_value_t = true, action = clap::ArgAction::Set)]
    pub demo: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:0".parse().expect("valid address"),
            redis_url: None,
            redis_cluster: false,
            redis_username: None,
            redis_password: None,
            redis_ca_file: None,
            redis_publish_batch_us: 0,
            jwt_secret: None,
            jwt_secret_file: None,
            jwt_previous_secret: None,
            jwt_previous_secret_file: None,
            jwt_issuer: None,
            jwt_audience: None,
            api_keys: None,
            api_keys_file: None,
            node_id: None,
            hb_int_ms: 20_000,
            resume_window_s: 60,
            replay_buffer: 1000,
            rate_limit_count: 120,
            rate_limit_window_s: 60,
            outbound_limit: 1024,
            direct_writes: true,
            max_connections: 100_000,
            max_connections_per_ip: 0,
            http_header_timeout_ms: 10_000,
            tcp_send_buffer: 65_536,
            drain_grace_s: 10,
            default_channel: "general".into(),
            presence_threshold: 1000,
            max_channels: 10_000,
            history_retain: 1000,
            session_starts_per_user: 60,
            log_format: LogFormat::Text,
            worker_threads: None,
            dev: false,
            demo: true,
        }
    }
}

/// Why a configuration was refused; the node prints it and exits.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{0}")]
    Invalid(String),
}

fn invalid(msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(msg.into())
}

impl Config {
    pub fn hb_int(&self) -> Duration {
        Duration::from_millis(self.hb_int_ms)
    }

    pub fn resume_window(&self) -> Duration {
        Duration::from_secs(self.resume_window_s)
    }

    pub fn http_header_timeout(&self) -> Duration {
        Duration::from_millis(self.http_header_timeout_ms)
    }

    pub fn drain_grace(&self) -> Duration {
        Duration::from_secs(self.drain_grace_s)
    }

    /// The secret from `--jwt-secret` or `--jwt-secret-file`, if any.
    pub fn secret(&self) -> Result<Option<String>, ConfigError> {
        read_secret(&self.jwt_secret, &self.jwt_secret_file, "--jwt-secret-file")
    }

    /// The previous secret (rotation), from `--jwt-previous-secret` or its
    /// file, if any.
    pub fn previous_secret(&self) -> Result<Option<String>, ConfigError> {
        read_secret(
            &self.jwt_previous_secret,
            &self.jwt_previous_secret_file,
            "--jwt-previous-secret-file",
        )
    }

    /// The server API's keys from --api-keys and --api-keys-file; empty:
    /// the API is off. Each key is 16-256 printable ASCII characters.
    pub fn api_keys(&self) -> Result<Vec<String>, ConfigError> {
        let mut text = self.api_keys.clone().unwrap_or_default();
        if let Some(path) = &self.api_keys_file {
            let file = std::fs::read_to_string(path).map_err(|e| {
                invalid(format!(
                    "cannot read --api-keys-file {}: {e}",
                    path.display()
                ))
            })?;
            text.push(',');
            text.push_str(&file);
        }
        let keys: Vec<String> = text
            .split([',', '\n', '\r'])
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(str::to_owned)
            .collect();
        for key in &keys {
            if !(MIN_API_KEY_LEN..=256).contains(&key.len())
                || !key.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(invalid(format!(
                    "every API key must be {MIN_API_KEY_LEN}-256 printable ASCII characters without spaces"
                )));
            }
        }
        Ok(keys)
    }

    /// Checks every value; the secret itself is checked by [`Config::secret`]
    /// callers through [`check_secret`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(100..=600_000).contains(&self.hb_int_ms) {
            return Err(invalid("--hb-int-ms must be between 100 and 600000"));
        }
        if !(1..=86_400).contains(&self.resume_window_s) {
            return Err(invalid("--resume-window-s must be between 1 and 86400"));
        }
        if !(1..=100_000).contains(&self.replay_buffer) {
            return Err(invalid("--replay-buffer must be between 1 and 100000"));
        }
        if self.rate_limit_count == 0 || self.rate_limit_window_s == 0 {
            return Err(invalid(
                "--rate-limit-count and --rate-limit-window-s must be positive",
            ));
        }
        if !(1..=100_000).contains(&self.outbound_limit) {
            return Err(invalid("--outbound-limit must be between 1 and 100000"));
        }
        if self.max_connections == 0 || self.max_connections > (u32::MAX >> 3) as usize {
            return Err(invalid("--max-connections must be positive"));
        }
        if self.max_connections_per_ip > self.max_connections {
            return Err(invalid(
                "--max-connections-per-ip must be at most --max-connections (0: off)",
            ));
        }
        if self.tcp_send_buffer != 0 && !(4096..=16 << 20).contains(&self.tcp_send_buffer) {
            return Err(invalid(
                "--tcp-send-buffer must be 0 (the kernel's choice) or 4096 to 16777216 bytes",
            ));
        }
        if !(100..=600_000).contains(&self.http_header_timeout_ms) {
            return Err(invalid(
                "--http-header-timeout-ms must be between 100 and 600000",
            ));
        }
        if !gateway_shared::protocol::is_valid_channel_name(&self.default_channel) {
            return Err(invalid(
                "--default-channel must match ^[a-z0-9][a-z0-9_-]{0,31}$",
            ));
        }
        if self.max_channels == 0 {
            return Err(invalid("--max-channels must be positive"));
        }
        if !(gateway_shared::protocol::MOVE_HISTORY_LIMIT..=100_000).contains(&self.history_retain)
        {
            return Err(invalid("--history-retain must be between 50 and 100000"));
        }
        if let Some(urls) = &self.redis_url {
            let urls: Vec<&str> = urls.split(',').map(str::trim).collect();
            let unix = |u: &&str| u.starts_with("unix://") || u.starts_with("redis+unix://");
            if urls.iter().any(unix) {
                if urls.len() > 1 || self.redis_cluster {
                    return Err(invalid(
                        "a unix:// --redis-url is one Redis on this host, not a cluster",
                    ));
                }
            } else if urls
                .iter()
                .any(|u| !(u.starts_with("redis://") || u.starts_with("rediss://")))
            {
                return Err(invalid(
                    "--redis-url must be redis:// or rediss:// URLs, comma-separated, or one unix:// socket path",
                ));
            }
            if urls.len() > 1 && !self.redis_cluster {
                return Err(invalid(
                    "several --redis-url seeds need --redis-cluster; a single Redis takes one URL",
                ));
            }
        }
        if self.jwt_issuer.as_deref() == Some("") || self.jwt_audience.as_deref() == Some("") {
            return Err(invalid(
                "--jwt-issuer and --jwt-audience must not be empty when given",
            ));
        }
        if self.redis_publish_batch_us > 100_000 {
            return Err(invalid(
                "--redis-publish-batch-us must be at most 100000 (100 ms)",
            ));
        }
        if self.worker_threads.is_some_and(|n| n == 0 || n > 1024) {
            return Err(invalid("--worker-threads must be between 1 and 1024"));
        }
        if let Some(id) = &self.node_id {
            if id.is_empty() || id.len() > 128 || id.contains(['{', '}', ' ']) {
                return Err(invalid(
                    "--node-id must be 1-128 characters without spaces or braces",
                ));
            }
        }
        Ok(())
    }
}

/// A secret given inline or in a file (trailing newline ignored).
fn read_secret(
    inline: &Option<String>,
    file: &Option<PathBuf>,
    flag: &str,
) -> Result<Option<String>, ConfigError> {
    if let Some(secret) = inline {
        return Ok(Some(secret.clone()));
    }
    match file {
        None => Ok(None),
        Some(path) => std::fs::read_to_string(path)
            .map(|s| Some(s.trim_end_matches(['\n', '\r']).to_owned()))
            .map_err(|e| invalid(format!("cannot read {flag} {}: {e}", path.display()))),
    }
}

/// The host name (the pod name in Kubernetes), or a random id.
pub fn default_node_id() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty() && h.len() <= 128 && !h.contains(['{', '}', ' ']))
        .unwrap_or_else(|| format!("node-{:08x}", rand::random::<u32>()))
}

/// Refuses secrets that are too short, and the development secret outside
/// `--dev`.
pub fn check_secret(secret: &str, dev: bool) -> Result<(), ConfigError> {
    if secret.len() < MIN_SECRET_LEN {
        return Err(invalid(format!(
            "the JWT secret must be at least {MIN_SECRET_LEN} bytes (got {})",
            secret.len()
        )));
    }
    if secret == DEV_SECRET && !dev {
        return Err(invalid(
            "the built-in development secret is only allowed with --dev",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        let cli = Cli::try_parse_from(std::iter::once("gateway-node").chain(args.iter().copied()))?;
        Ok(match cli.command {
            Some(Command::Serve(c)) => c,
            _ => cli.serve,
        })
    }

    #[test]
    fn defaults_match_the_protocol() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.hb_int_ms, 20_000);
        assert_eq!(c.resume_window_s, 60);
        assert_eq!(c.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(c.default_channel, "general");
        assert!(c.demo, "the demo page is on unless turned off");
        assert_eq!(c.max_connections_per_ip, 0, "no per-address cap by default");
        assert_eq!(c.http_header_timeout_ms, 10_000);
        assert_eq!(c.tcp_send_buffer, 65_536);
        assert!(!c.dev);
        c.validate().unwrap();
    }

    #[test]
    fn the_demo_page_is_turned_off_with_demo_false() {
        assert!(!parse(&["--demo", "false"]).unwrap().demo);
        assert!(parse(&["--demo", "true"]).unwrap().demo);
        assert!(parse(&["--demo", "maybe"]).is_err());
    }

    #[test]
    fn serve_subcommand_and_bare_flags_are_the_same() {
        let a = parse(&["serve", "--hb-int-ms", "3000"]).unwrap();
        let b = parse(&["--hb-int-ms", "3000"]).unwrap();
        assert_eq!(a.hb_int_ms, 3000);
        assert_eq!(b.hb_int_ms, 3000);
    }

    #[test]
    fn invalid_values_are_refused_with_a_message() {
        assert!(parse(&["--hb-int-ms", "abc"]).is_err());
        let c = parse(&["--hb-int-ms", "5"]).unwrap();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--hb-int-ms"));
        let c = parse(&["--default-channel", "Bad Name"]).unwrap();
        assert!(c.validate().is_err());
        let c = parse(&["--redis-url", "http://x"]).unwrap();
        assert!(c.validate().is_err());
        let c = parse(&["--redis-url", "redis://a:1,redis://b:2"]).unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("--redis-cluster"), "{err}");
        let c = parse(&["--redis-url", "redis://a:1,redis://b:2", "--redis-cluster"]).unwrap();
        assert!(c.validate().is_ok());
        let c = parse(&["--redis-url", "redis://a:1,http://b:2", "--redis-cluster"]).unwrap();
        assert!(c.validate().is_err());
        let c = parse(&["--redis-url", "unix:///run/redis.sock"]).unwrap();
        assert!(c.validate().is_ok());
        let c = parse(&["--redis-url", "unix:///run/redis.sock", "--redis-cluster"]).unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("not a cluster"), "{err}");
        let c = parse(&["--redis-url", "unix:///a.sock,redis://b:2"]).unwrap();
        assert!(c.validate().is_err());
        let c = parse(&["--tcp-send-buffer", "100"]).unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("--tcp-send-buffer"), "{err}");
        assert!(parse(&["--tcp-send-buffer", "0"])
            .unwrap()
            .validate()
            .is_ok());
        let c = parse(&["--http-header-timeout-ms", "50"]).unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("--http-header-timeout-ms"), "{err}");
        let c = parse(&["--max-connections", "10", "--max-connections-per-ip", "11"]).unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("--max-connections-per-ip"), "{err}");
        let c = parse(&["--redis-publish-batch-us", "100001"]).unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("--redis-publish-batch-us"), "{err}");
    }

    #[test]
    fn api_keys_come_from_the_flag_and_the_file() {
        let c = parse(&[]).unwrap();
        assert!(c.api_keys().unwrap().is_empty(), "no key: the API is off");
        let c = parse(&["--api-keys", "k1-0123456789abcdef, k2-0123456789abcdef"]).unwrap();
        assert_eq!(
            c.api_keys().unwrap(),
            ["k1-0123456789abcdef", "k2-0123456789abcdef"]
        );
        let file = std::env::temp_dir().join(format!("gw-api-keys-{}", std::process::id()));
        std::fs::write(&file, "k3-0123456789abcdef\nk4-0123456789abcdef\n").unwrap();
        let path = file.display().to_string();
        let c = parse(&[
            "--api-keys",
            "k1-0123456789abcdef",
            "--api-keys-file",
            &path,
        ])
        .unwrap();
        assert_eq!(c.api_keys().unwrap().len(), 3);
        std::fs::remove_file(&file).unwrap();
        let c = parse(&["--api-keys", "short"]).unwrap();
        assert!(c.api_keys().unwrap_err().to_string().contains("API key"));
        let c = parse(&["--api-keys-file", "/nonexistent/keys"]).unwrap();
        assert!(c.api_keys().is_err());
    }

    #[test]
    fn short_and_development_secrets_are_refused() {
        assert!(check_secret("short", false).is_err());
        assert!(check_secret(DEV_SECRET, false).is_err());
        assert!(check_secret(DEV_SECRET, true).is_ok());
        assert!(check_secret(&"k".repeat(32), false).is_ok());
    }
}
