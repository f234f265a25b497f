//! Connections. Each node holds two, whatever the number of its sessions:
//!
//! - the **command connection**, shared by every caller: a multiplexed
//!   connection (one socket per Redis server) on which concurrent commands
//!   are pipelined as they come, so Redis reads many in one `read` and
//!   answers them in one `write`. Nothing is checked out or health-checked
//!   per operation; a lost connection is re-established by the client
//!   library, and the operations in flight fail with 4018 meanwhile.
//! - the **pub/sub connection**, owned by the subscription task (RESP3, so
//!   messages arrive as pushes): classic `SUBSCRIBE` on one Redis, sharded
//!   `SSUBSCRIBE` on Redis Cluster, where each channel's messages come from
//!   the master of its slot. The client library resubscribes after a
//!   reconnect or a slot move; the node fills what it missed from the logs.
//!
//! Cluster mode is this file's difference: scripts and pipelines are the
//! same on both, because every script touches one slot.

use super::OP_TIMEOUT;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, PushInfo, RedisFuture, RedisResult, Value};
use std::time::Duration;

/// The command connection (cheap to clone: clones share the socket).
#[derive(Clone)]
pub(super) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// The pub/sub connection.
pub(super) enum PubSub {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl PubSub {
    /// Subscribes to `topic`: classic pub/sub on one Redis, sharded on a
    /// cluster.
    pub async fn subscribe(&mut self, topic: &str) -> RedisResult<()> {
        match self {
            Self::Single(c) => c.subscribe(topic).await,
            Self::Cluster(c) => c.ssubscribe(topic).await,
        }
    }

    /// Unsubscribes from `topics`; on a cluster one by one, as topics of
    /// different slots cannot share a command.
    pub async fn unsubscribe(&mut self, topics: &[String]) -> RedisResult<()> {
        match self {
            Self::Single(c) => c.unsubscribe(topics).await,
            Self::Cluster(c) => {
                for topic in topics {
                    c.sunsubscribe(topic).await?;
                }
                Ok(())
            }
        }
    }

    /// Checks the connection; a lost one reconnects on this command.
    pub async fn ping(&mut self) -> bool {
        let cmd = redis::cmd("PING");
        let result = match self {
            Self::Single(c) => cmd.query_async::<Value>(c).await,
            Self::Cluster(c) => cmd.query_async::<Value>(c).await,
        };
        result.is_ok()
    }
}

/// `--redis-url` as seed URLs: one for a single Redis, one or more
/// (comma-separated) for a cluster.
pub(super) fn seed_urls(url: &str, cluster: bool) -> Result<Vec<String>, String> {
    let urls: Vec<String> = url
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect();
    match (urls.len(), cluster) {
        (0, _) => Err("--redis-url is empty".into()),
        (1, _) | (_, true) => Ok(urls),
        _ => Err("several Redis URLs need --redis-cluster (a single Redis takes one)".into()),
    }
}

/// Opens both connections; `push` receives the pub/sub messages.
pub(super) async fn connect(
    urls: &[String],
    cluster: bool,
    push: impl Fn(PushInfo) + Send + Sync + 'static,
) -> Result<(Conn, PubSub), String> {
    let push = move |info: PushInfo| {
        push(info);
        Ok::<(), redis::aio::SendError>(())
    };
    let deadline = |what: &'static str| {
        let shown = urls.join(",");
        move |_| format!("{what} to Redis at {shown} timed out")
    };
    if cluster {
        let builder = || {
            ClusterClientBuilder::new(urls.to_vec())
                .connection_timeout(OP_TIMEOUT)
                .response_timeout(OP_TIMEOUT)
        };
        let commands = builder()
            .build()
            .map_err(|e| format!("redis cluster url: {e}"))?;
        let pubsub = builder()
            .use_protocol(redis::ProtocolVersion::RESP3)
            .push_sender(push)
            .build()
            .map_err(|e| format!("redis cluster url: {e}"))?;
        let commands = tokio::time::timeout(OP_TIMEOUT * 2, commands.get_async_connection())
            .await
            .map_err(deadline("connecting"))?
            .map_err(|e| format!("redis cluster connection: {e}"))?;
        let pubsub = tokio::time::timeout(OP_TIMEOUT * 2, pubsub.get_async_connection())
            .await
            .map_err(deadline("connecting"))?
            .map_err(|e| format!("redis cluster pub/sub connection: {e}"))?;
        return Ok((Conn::Cluster(commands), PubSub::Cluster(pubsub)));
    }
    let url = &urls[0];
    let config = || {
        ConnectionManagerConfig::new()
            .set_connection_timeout(Some(OP_TIMEOUT))
            .set_response_timeout(Some(OP_TIMEOUT))
            .set_max_delay(Duration::from_secs(2))
    };
    let client = redis::Client::open(url.as_str()).map_err(|e| format!("redis url: {e}"))?;
    let commands = tokio::time::timeout(
        OP_TIMEOUT * 2,
        client.get_connection_manager_with_config(config()),
    )
    .await
    .map_err(deadline("connecting"))?
    .map_err(|e| format!("redis connection: {e}"))?;
    let sep = if url.contains('?') { '&' } else { '?' };
    let client = redis::Client::open(format!("{url}{sep}protocol=resp3"))
        .map_err(|e| format!("redis url: {e}"))?;
    let pubsub = tokio::time::timeout(
        OP_TIMEOUT * 2,
        client.get_connection_manager_with_config(
            config()
                .set_push_sender(push)
                .set_automatic_resubscription(),
        ),
    )
    .await
    .map_err(deadline("connecting"))?
    .map_err(|e| format!("redis pub/sub connection: {e}"))?;
    Ok((Conn::Single(commands), PubSub::Single(pubsub)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_urls_take_one_redis_or_a_cluster_list() {
        assert_eq!(
            seed_urls("redis://a:1/", false).unwrap(),
            vec!["redis://a:1/"]
        );
        assert_eq!(
            seed_urls("redis://a:1, redis://b:2,", true).unwrap(),
            vec!["redis://a:1", "redis://b:2"]
        );
        assert!(seed_urls("redis://a:1,redis://b:2", false)
            .unwrap_err()
            .contains("--redis-cluster"));
        assert!(seed_urls(" , ", true).is_err());
    }
}
