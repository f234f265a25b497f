//! # gateway-node
//!
//! A node of the gateway: terminates WebSockets and speaks the protocol of
//! `docs/PROTOCOL.md`. Tests and `main` start it with [`run`] on a listener
//! they bound themselves.
//!
//! # Layout
//!
//! - [`config`]: every setting, parsed and validated once.
//! - [`server`]: accept loop, HTTP routes (`/gateway`, `/healthz`,
//!   `/readyz`, `/metrics`), HTTP abuse limits, drain.
//! - [`admission`]: the connection caps, per node and per client address.
//! - [`connection`]: one WebSocket: reader, writer and supervisor tasks;
//!   the heartbeat and PRESENT deadlines; backpressure on requests and the
//!   write stall deadline; the per-connection state machine.
//! - [`node`]: the session registry and lifecycle: PRESENT, resume, end,
//!   expiry, GATEWAY_DOWN.
//! - [`session`]: sequence numbers, the replay ring (also the outbound
//!   queue), the slow-consumer rule, rate limit, typing coalescing.
//! - [`events`]: validation and execution of client events.
//! - [`hub`]: local fan-out, channel → sessions, in the order of each
//!   channel's event log.
//! - [`broker`]: cluster-wide state; [`broker::memory`] for a single
//!   node, [`broker::redis`] for a cluster (layout, resume across nodes).
//! - [`frame`]: reading client frames with a buffer sized to what arrives.
//! - [`wire`]: server frames and encodings; the shared dispatch body.
//! - [`auth`]: HS256 token verification.
//! - [`api`]: the server API for application backends (`/api/v1/`):
//!   routes, API keys, JSON errors; its OpenAPI document is
//!   `gateway-node/api/openapi.json`.
//! - [`metrics`]: the Prometheus registry.

pub mod admission;
pub mod api;
pub mod auth;
pub mod broker;
pub mod config;
pub mod connection;
pub mod demo;
pub mod events;
pub mod frame;
pub mod hub;
pub mod metrics;
pub mod node;
pub mod ring;
pub mod server;
pub mod session;
pub mod wire;

use broker::{Broker, Memory, RedisBroker};
use config::Config;
use metrics::Metrics;
use node::Node;
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("{0}")]
    Redis(String),
}

/// A node ready to serve, built from a validated configuration: connects
/// to Redis when one is configured, else runs on the in-memory backend.
pub async fn build(config: Config, secret: &str) -> Result<Arc<Node>, StartError> {
    config.validate()?;
    config::check_secret(secret, config.dev)?;
    let previous_secret = config.previous_secret()?;
    if let Some(previous) = &previous_secret {
        config::check_secret(previous, config.dev)?;
    }
    let rules = auth::TokenRules {
        previous_secret: previous_secret.map(String::into_bytes),
        issuer: config.jwt_issuer.clone(),
        audience: config.jwt_audience.clone(),
    };
    let api_keys = config.api_keys()?;
    let node_id = config
        .node_id
        .clone()
        .unwrap_or_else(config::default_node_id);
    let metrics = Arc::new(Metrics::new(&node_id));
    let hub = Arc::new(hub::Hub::new());
    let broker = match &config.redis_url {
        None => Broker::Memory(Memory::new(
            Arc::clone(&hub),
            &config.default_channel,
            config.presence_threshold,
            config.history_retain,
        )),
        Some(url) => {
            let settings = broker::redis::Settings {
                url: url.clone(),
                cluster: config.redis_cluster,
                username: config.redis_username.clone(),
                password: config.redis_password.clone(),
                ca_file: config.redis_ca_file.clone(),
                publish_window: std::time::Duration::from_micros(config.redis_publish_batch_us),
                node_id: node_id.clone(),
                default_channel: config.default_channel.clone(),
                presence_threshold: config.presence_threshold,
                history_retain: config.history_retain,
                max_channels: config.max_channels,
                resume_window: config.resume_window(),
            };
            Broker::Redis(Box::new(
                RedisBroker::connect(settings, Arc::clone(&hub), Arc::clone(&metrics))
                    .await
                    .map_err(StartError::Redis)?,
            ))
        }
    };
    let node = Arc::new(Node::new(
        config,
        node_id,
        secret.as_bytes(),
        &rules,
        hub,
        broker,
        metrics,
        api::Keys::new(api_keys),
    ));
    if node.api_keys.is_empty() {
        tracing::info!("server API off (no --api-keys)");
    } else {
        tracing::info!(prefix = api::PREFIX, "server API on");
    }
    node.broker.start(&node);
    tokio::spawn(connection::watch_deadlines(Arc::downgrade(&node)));
    Ok(node)
}

/// Serves `listener` until `shutdown` resolves, then drains and returns.
pub async fn run(listener: TcpListener, node: Arc<Node>, shutdown: impl Future<Output = ()>) {
    server::serve(node, listener, shutdown).await
}
