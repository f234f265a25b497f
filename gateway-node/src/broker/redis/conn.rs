//! The connection. A node holds one socket per Redis server, whatever the
//! number of its sessions: a multiplexed RESP3 connection that carries
//! both the commands and the pub/sub messages.
//!
//! - **Commands** from every caller share it: concurrent ones are
//!   pipelined as they come, so Redis reads many in one `read` and answers
//!   them in one `write`. Nothing is checked out or health-checked per
//!   operation; a lost connection is re-established by the client library,
//!   and the operations in flight fail with 4018 meanwhile.
//! - **Pub/sub** messages arrive on it as RESP3 pushes. Subscriptions are
//!   made only by the subscription task (`PubSub`, a second handle on the
//!   same socket): classic `SUBSCRIBE` on one Redis, sharded `SSUBSCRIBE`
//!   on Redis Cluster, where each channel's messages come from the master
//!   of its slot. The client library resubscribes after a reconnect or a
//!   slot move; the node fills what it missed from the logs.
//! - One socket for both, not two: the reply to a node's own publish and
//!   the publish's message to that node leave Redis in one `write`, which
//!   is a third of Redis' writes per message on two nodes.
//!
//! Cluster mode is this file's difference: scripts and pipelines are the
//! same on both, because every script touches one slot.
//!
//! On a cluster the client library's connection holds every command
//! while it refreshes the topology, which a node that never answers makes
//! slow, and a refresh has hung for good (tokio 1.54 with redis-rs 1.8;
//! see docs/ARCHITECTURE.md, "A shard that stops answering"). The
//! subscription task probes the connection (`PubSub::probe`) and replaces
//! it whole (`PubSub::replace`) when it no longer answers even a PING to
//! any node; every handle follows, as they all go through one [`Cluster`].

use super::{Settings, OP_TIMEOUT};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{
    Cmd, ConnectionInfo, IntoConnectionInfo, Pipeline, PushInfo, RedisFuture, RedisResult,
    TlsCertificates, Value,
};
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::Duration;

/// How long a cluster connection has to answer a PING (`PubSub::probe`):
/// a live node answers in well under a millisecond, and a topology
/// refresh that holds every command takes up to about two (a connection
/// and a response timeout to a node that never answers); a connection
/// that hung does not answer at all.
const PROBE_TIMEOUT: Duration = OP_TIMEOUT;

/// How long each master has to answer the connection check
/// (`PubSub::client_ids`), which runs every second: a live one answers in
/// well under a millisecond.
const CHECK_TIMEOUT: Duration = Duration::from_millis(500);

/// The command handle (cheap to clone: clones share the socket).
#[derive(Clone)]
pub(super) enum Conn {
    Single(ConnectionManager),
    Cluster(Arc<Cluster>),
}

/// The cluster connection in use, shared by every handle, and the client
/// that makes a new one when it has to be replaced.
pub(super) struct Cluster {
    client: ClusterClient,
    current: parking_lot::Mutex<ClusterConnection>,
}

impl Cluster {
    /// The connection in use (a handle: clones share its sockets).
    fn get(&self) -> ClusterConnection {
        self.current.lock().clone()
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => {
                let mut conn = c.get();
                Box::pin(async move { conn.req_packed_command(cmd).await })
            }
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
            Self::Cluster(c) => {
                let mut conn = c.get();
                Box::pin(async move { conn.req_packed_commands(pipeline, offset, count).await })
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(_) => 0,
        }
    }
}

/// The subscription handle, on the same socket.
pub(super) enum PubSub {
    Single(ConnectionManager),
    Cluster(Arc<Cluster>),
}

impl PubSub {
    /// Subscribes to `topic`: classic pub/sub on one Redis, sharded on a
    /// cluster.
    pub async fn subscribe(&mut self, topic: &str) -> RedisResult<()> {
        match self {
            Self::Single(c) => c.subscribe(topic).await,
            Self::Cluster(c) => c.get().ssubscribe(topic).await,
        }
    }

    /// Unsubscribes from `topics`; on a cluster one by one, as topics of
    /// different slots cannot share a command.
    pub async fn unsubscribe(&mut self, topics: &[String]) -> RedisResult<()> {
        match self {
            Self::Single(c) => c.unsubscribe(topics).await,
            Self::Cluster(c) => {
                let mut c = c.get();
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
            Self::Cluster(c) => cmd.query_async::<Value>(&mut c.get()).await,
        };
        result.is_ok()
    }

    /// On a cluster: whether the connection still answers at all, a PING
    /// to any one node it holds, within `PROBE_TIMEOUT`. (`ping` asks
    /// every master, so one shard down fails it.) Always true on one
    /// Redis.
    pub async fn probe(&self) -> bool {
        let Self::Cluster(c) = self else {
            return true;
        };
        let mut conn = c.get();
        let ping = conn.route_command(
            redis::cmd("PING"),
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
        );
        matches!(tokio::time::timeout(PROBE_TIMEOUT, ping).await, Ok(Ok(_)))
    }

    /// The id Redis gives this connection's client on every master it
    /// holds (`CLIENT ID` on each), with the slots that master serves: a
    /// new id means the client library replaced that connection, and the
    /// subscriptions on it may be gone (see `subscription_task`). One Redis
    /// is one master named `""` serving every slot. Masters that do not
    /// answer within `CHECK_TIMEOUT` are left out.
    pub async fn client_ids(&self) -> Vec<(Master, i64)> {
        let cmd = redis::cmd("CLIENT").arg("ID").to_owned();
        let c = match self {
            Self::Single(c) => {
                let mut c = c.clone();
                let id = tokio::time::timeout(CHECK_TIMEOUT, cmd.query_async::<i64>(&mut c)).await;
                return match id {
                    Ok(Ok(id)) => vec![(Master::whole(), id)],
                    _ => Vec::new(),
                };
            }
            Self::Cluster(c) => c.get(),
        };
        let slots = ask(
            &mut c.clone(),
            cluster_slots(),
            SingleNodeRoutingInfo::Random,
        )
        .await;
        let Some(slots) = slots else {
            return Vec::new();
        };
        let asks = masters(&slots).into_iter().map(|master| {
            let (mut c, cmd) = (c.clone(), cmd.clone());
            async move {
                match ask(&mut c, cmd, master.at()).await {
                    Some(Value::Int(id)) => Some((master, id)),
                    _ => None,
                }
            }
        });
        futures_util::future::join_all(asks)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// The slots `master` serves as it tells them itself (`CLUSTER SLOTS`
    /// asked of it: right after a slot moved to it, another node's answer
    /// can still give that slot to the old owner); `None` when it does not
    /// answer within `CHECK_TIMEOUT`. On one Redis, every slot.
    pub async fn own_slots(&self, master: &Master) -> Option<Master> {
        let Self::Cluster(c) = self else {
            return Some(Master::whole());
        };
        let slots = ask(&mut c.get(), cluster_slots(), master.at()).await?;
        let own = masters(&slots)
            .into_iter()
            .find(|m| m.host == master.host && m.port == master.port);
        Some(own.unwrap_or_else(|| Master {
            slots: Vec::new(),
            ..master.clone()
        }))
    }

    /// On a cluster: replaces the connection with a new one, which every
    /// handle uses from then on; the old one ends when its last command
    /// does. The new one has no subscriptions: the caller makes them again.
    pub async fn replace(&self) -> Result<(), String> {
        let Self::Cluster(c) = self else {
            return Ok(());
        };
        let conn = tokio::time::timeout(OP_TIMEOUT * 2, c.client.get_async_connection())
            .await
            .map_err(|_| "connecting to Redis Cluster timed out".to_owned())?
            .map_err(|e| format!("redis cluster connection: {e}"))?;
        *c.current.lock() = conn;
        Ok(())
    }

    /// Subscribes to every one of `topics` at once (a topic whose shard
    /// does not answer does not hold the others up); how many failed.
    pub async fn subscribe_all<'a>(&self, topics: impl Iterator<Item = &'a String>) -> Vec<String> {
        let runs = topics.map(|topic| {
            let mut handle = match self {
                Self::Single(c) => Self::Single(c.clone()),
                Self::Cluster(c) => Self::Cluster(Arc::clone(c)),
            };
            async move {
                let ok = matches!(
                    tokio::time::timeout(OP_TIMEOUT, handle.subscribe(topic)).await,
                    Ok(Ok(()))
                );
                (!ok).then(|| topic.clone())
            }
        });
        futures_util::future::join_all(runs)
            .await
            .into_iter()
            .flatten()
            .collect()
    }
}

/// `cmd` asked of one node of the cluster; `None` on an error or no
/// answer within `CHECK_TIMEOUT`.
async fn ask(c: &mut ClusterConnection, cmd: Cmd, at: SingleNodeRoutingInfo) -> Option<Value> {
    let reply = c.route_command(cmd, RoutingInfo::SingleNode(at));
    tokio::time::timeout(CHECK_TIMEOUT, reply).await.ok()?.ok()
}

fn cluster_slots() -> Cmd {
    redis::cmd("CLUSTER").arg("SLOTS").to_owned()
}

/// A Redis master as `CLUSTER SLOTS` tells it: where it is and which
/// slots it serves.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct Master {
    pub host: String,
    pub port: u16,
    pub slots: Vec<RangeInclusive<u16>>,
}

impl Master {
    /// One Redis: every slot, no address.
    fn whole() -> Self {
        Self {
            host: String::new(),
            port: 0,
            slots: vec![0..=SLOTS - 1],
        }
    }

    /// `host:port`, or `""` for one Redis.
    pub fn name(&self) -> String {
        if self.host.is_empty() {
            String::new()
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Whether `key` (a key or a shard channel) lives on this master.
    pub fn holds(&self, key: &str) -> bool {
        let slot = key_slot(key);
        self.slots.iter().any(|r| r.contains(&slot))
    }

    /// Routing to this master by its address.
    fn at(&self) -> SingleNodeRoutingInfo {
        SingleNodeRoutingInfo::ByAddress {
            host: self.host.clone(),
            port: self.port,
        }
    }
}

/// Hash slots in Redis Cluster.
const SLOTS: u16 = 16384;

/// The hash slot of a key, as Redis Cluster computes it: CRC16 (XMODEM)
/// of its [`hash_tag`], modulo 16384. (redis-rs computes it too, but
/// keeps the number private.)
pub(super) fn key_slot(key: &str) -> u16 {
    let mut crc: u16 = 0;
    for &byte in hash_tag(key).as_bytes() {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % SLOTS
}

/// The masters in a `CLUSTER SLOTS` reply, each once with all its ranges:
/// every range is `[start, end, [host, port, id, …], replicas…]`.
fn masters(slots: &Value) -> Vec<Master> {
    let Value::Array(ranges) = slots else {
        return Vec::new();
    };
    let mut masters: Vec<Master> = Vec::new();
    for range in ranges {
        let Value::Array(range) = range else { continue };
        let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(master))) =
            (range.first(), range.get(1), range.get(2))
        else {
            continue;
        };
        let (Ok(start), Ok(end)) = (u16::try_from(*start), u16::try_from(*end)) else {
            continue;
        };
        let host = match master.first() {
            Some(Value::BulkString(h)) => String::from_utf8_lossy(h).into_owned(),
            Some(Value::SimpleString(h)) => h.clone(),
            _ => continue,
        };
        let Some(Value::Int(port)) = master.get(1) else {
            continue;
        };
        let Ok(port) = u16::try_from(*port) else {
            continue;
        };
        // An unknown endpoint ("" or "?") cannot be asked by address.
        if host.is_empty() || host == "?" {
            continue;
        }
        match masters
            .iter_mut()
            .find(|m| m.host == host && m.port == port)
        {
            Some(m) => m.slots.push(start..=end),
            None => masters.push(Master {
                host,
                port,
                slots: vec![start..=end],
            }),
        }
    }
    masters
}

/// Commands sent together without waiting for each other: one pipeline on
/// one Redis; on a cluster one pipeline per hash tag (a cluster pipeline
/// must stay in one slot), all of them in flight at once.
pub(super) struct Batch {
    cluster: bool,
    pipes: Vec<(String, Pipeline)>,
}

impl Batch {
    pub fn new(cluster: bool) -> Self {
        Self {
            cluster,
            pipes: Vec::new(),
        }
    }

    /// Adds `cmd`, whose keys share the slot of `key`.
    pub fn add(&mut self, key: &str, cmd: Cmd) {
        let tag = if self.cluster { hash_tag(key) } else { "" };
        let pipe = match self.pipes.iter().position(|(t, _)| t == tag) {
            Some(i) => &mut self.pipes[i].1,
            None => {
                self.pipes.push((tag.to_owned(), Pipeline::new()));
                &mut self.pipes.last_mut().expect("just pushed").1
            }
        };
        pipe.add_command(cmd).ignore();
    }

    pub async fn run(self, conn: &Conn) -> RedisResult<()> {
        let runs = self.pipes.into_iter().map(|(_, pipe)| {
            let mut conn = conn.clone();
            async move { pipe.query_async::<()>(&mut conn).await }
        });
        for result in futures_util::future::join_all(runs).await {
            result?;
        }
        Ok(())
    }
}

/// The part of a key that picks its slot: what stands between the first
/// `{` and the next `}`, or the whole key.
fn hash_tag(key: &str) -> &str {
    key.split_once('{')
        .and_then(|(_, rest)| rest.split_once('}'))
        .map(|(tag, _)| tag)
        .filter(|tag| !tag.is_empty())
        .unwrap_or(key)
}

/// TLS (`rediss://`) with rustls and its ring provider; the CA from
/// `--redis-ca-file`, or the system's roots. `None` without a CA file.
fn tls_certificates(
    urls: &[String],
    settings: &Settings,
) -> Result<Option<TlsCertificates>, String> {
    if urls.iter().any(|u| u.starts_with("rediss://")) {
        // Several providers could be compiled in; name the one we ship.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    let Some(path) = &settings.ca_file else {
        return Ok(None);
    };
    let pem =
        std::fs::read(path).map_err(|e| format!("--redis-ca-file {}: {e}", path.display()))?;
    Ok(Some(TlsCertificates {
        client_tls: None,
        root_cert: Some(pem),
    }))
}

/// One URL's connection settings, with RESP3 (pushes) and the configured
/// credentials.
fn connection_info(url: &str, settings: &Settings) -> Result<ConnectionInfo, String> {
    let info = url
        .into_connection_info()
        .map_err(|e| format!("redis url {url:?}: {e}"))?;
    let mut redis = info
        .redis_settings()
        .clone()
        .set_protocol(redis::ProtocolVersion::RESP3);
    if let Some(username) = &settings.username {
        redis = redis.set_username(username);
    }
    if let Some(password) = &settings.password {
        redis = redis.set_password(password);
    }
    Ok(info.set_redis_settings(redis))
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

/// Opens the connection: `push` receives the pub/sub messages.
pub(super) async fn connect(
    urls: &[String],
    settings: &Settings,
    push: impl Fn(PushInfo) + Send + Sync + 'static,
) -> Result<(Conn, PubSub), String> {
    let mut infos = urls
        .iter()
        .map(|url| connection_info(url, settings))
        .collect::<Result<Vec<_>, _>>()?;
    let push = move |info: PushInfo| {
        push(info);
        Ok::<(), redis::aio::SendError>(())
    };
    let shown = urls.join(",");
    let certs = tls_certificates(urls, settings)?;
    if settings.cluster {
        let mut builder = ClusterClientBuilder::new(infos);
        if let Some(certs) = certs {
            builder = builder.certs(certs);
        }
        let client = builder
            .push_sender(push)
            .connection_timeout(OP_TIMEOUT)
            .response_timeout(OP_TIMEOUT)
            .build()
            .map_err(|e| format!("redis cluster url: {e}"))?;
        let conn = tokio::time::timeout(OP_TIMEOUT * 2, client.get_async_connection())
            .await
            .map_err(|_| format!("connecting to Redis Cluster at {shown} timed out"))?
            .map_err(|e| format!("redis cluster connection: {e}"))?;
        let cluster = Arc::new(Cluster {
            client,
            current: parking_lot::Mutex::new(conn),
        });
        return Ok((
            Conn::Cluster(Arc::clone(&cluster)),
            PubSub::Cluster(cluster),
        ));
    }
    let info = infos.swap_remove(0);
    let client = match certs {
        Some(certs) => redis::Client::build_with_tls(info, certs),
        None => redis::Client::open(info),
    }
    .map_err(|e| format!("redis url: {e}"))?;
    // One plain attempt first: a refused AUTH or a wrong address is told
    // as it is, where the connection manager would retry until timed out.
    let probe = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(OP_TIMEOUT))
        .set_response_timeout(Some(OP_TIMEOUT));
    client
        .get_multiplexed_async_connection_with_config(&probe)
        .await
        .map_err(|e| format!("redis connection to {shown}: {e}"))?;
    let config = ConnectionManagerConfig::new()
        .set_push_sender(push)
        .set_automatic_resubscription()
        .set_connection_timeout(Some(OP_TIMEOUT))
        .set_response_timeout(Some(OP_TIMEOUT))
        .set_max_delay(Duration::from_secs(2));
    let conn = tokio::time::timeout(
        OP_TIMEOUT * 2,
        client.get_connection_manager_with_config(config),
    )
    .await
    .map_err(|_| format!("connecting to Redis at {shown} timed out"))?
    .map_err(|e| format!("redis connection: {e}"))?;
    Ok((Conn::Single(conn.clone()), PubSub::Single(conn)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_slots_give_each_master_once() {
        let node = |host: &str, port: i64| {
            Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let range = |start: i64, master: Value, replica: Value| {
            Value::Array(vec![
                Value::Int(start),
                Value::Int(start + 9),
                master,
                replica,
            ])
        };
        let slots = Value::Array(vec![
            range(0, node("10.0.0.1", 7000), node("10.0.0.2", 7001)),
            range(10, node("10.0.0.3", 7002), node("10.0.0.4", 7003)),
            range(20, node("10.0.0.1", 7000), node("10.0.0.2", 7001)),
            range(30, node("?", 7004), node("10.0.0.5", 7005)),
            Value::Int(1),
        ]);
        let master = |host: &str, port, slots: &[(u16, u16)]| Master {
            host: host.to_owned(),
            port,
            slots: slots.iter().map(|&(a, b)| a..=b).collect(),
        };
        assert_eq!(
            masters(&slots),
            vec![
                master("10.0.0.1", 7000, &[(0, 9), (20, 29)]),
                master("10.0.0.3", 7002, &[(10, 19)])
            ]
        );
        assert!(masters(&Value::Nil).is_empty());
    }

    #[test]
    fn key_slots_are_redis_cluster_slots() {
        // Values from CLUSTER KEYSLOT of a cluster-enabled Redis 7.0.
        assert_eq!(key_slot("123456789"), 0x31c3);
        assert_eq!(key_slot("foo"), 12182);
        assert_eq!(key_slot("bar"), 5061);
        // The hash tag alone counts; an empty one does not.
        assert_eq!(key_slot("{user1000}.following"), 3443);
        assert_eq!(key_slot("foo{}{bar}"), 8363);
        assert_eq!(key_slot("foo{{bar}}zap"), 4015);
        assert_eq!(key_slot("gw:{c:general}"), 9276);
        let master = Master {
            host: "h".to_owned(),
            port: 1,
            slots: vec![5000..=5100, 12000..=12200],
        };
        assert!(master.holds("foo") && master.holds("bar") && !master.holds("123456789"));
        assert!(Master::whole().holds("123456789"));
    }

    #[test]
    fn keys_group_by_their_hash_tag() {
        assert_eq!(hash_tag("gw:{c:a b}:meta"), "c:a b");
        assert_eq!(hash_tag("gw:{s:7}"), "s:7");
        assert_eq!(hash_tag("gw:ban:u1"), "gw:ban:u1");
        assert_eq!(hash_tag("gw:{}:x"), "gw:{}:x");
    }

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
