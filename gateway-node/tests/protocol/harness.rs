#![allow(dead_code)]
//! Real nodes on port 0 and real clients, for the protocol tests.

use gateway_node::config::Config;
use gateway_shared::protocol::{ErrorBody, Event, FunctionCode, Ready};
use gateway_shared::token;
use gateway_shared::{Client, ClientError, ServerMessage};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const SECRET: &str = "test-secret-test-secret-test-secret!";
pub const WAIT: Duration = Duration::from_secs(10);

/// A node running in this process until dropped or shut down.
pub struct TestNode {
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestNode {
    pub async fn start() -> Self {
        Self::with(|_| {}).await
    }

    pub async fn with(tune: impl FnOnce(&mut Config)) -> Self {
        let mut config = Config::default();
        tune(&mut config);
        let node = gateway_node::build(config, SECRET)
            .await
            .expect("valid test config");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(gateway_node::run(listener, node, async {
            let _ = rx.await;
        }));
        Self {
            addr,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    pub fn url(&self) -> String {
        format!("ws://{}/gateway", self.addr)
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Starts the drain and waits for `run` to return.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT, task)
                .await
                .expect("drain ends")
                .unwrap();
        }
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

static USERS: AtomicU64 = AtomicU64::new(1);

/// A token for a fresh user id.
pub fn user_token(name: &str) -> (String, String) {
    let id = format!("{name}-{}", USERS.fetch_add(1, Ordering::Relaxed));
    (token_for(&id, name, false), id)
}

pub fn token_for(id: &str, name: &str, admin: bool) -> String {
    token::mint(SECRET.as_bytes(), &token::claims(id, name, admin, 3600))
}

/// A presented client that checks that its dispatches are numbered
/// 1, 2, 3, … with no gap and no duplicate.
pub struct Peer {
    pub client: Client,
    pub ready: Ready,
    pub token: String,
    pub user_id: String,
    /// The last dispatch sequence number received.
    pub last_s: u64,
}

impl Peer {
    pub async fn join(node: &TestNode, name: &str) -> Self {
        let (token, user_id) = user_token(name);
        Self::present(&node.url(), token, user_id).await
    }

    pub async fn admin(node: &TestNode, name: &str) -> Self {
        let user_id = format!("{name}-{}", USERS.fetch_add(1, Ordering::Relaxed));
        let token = token_for(&user_id, name, true);
        Self::present(&node.url(), token, user_id).await
    }

    pub async fn present(url: &str, token: String, user_id: String) -> Self {
        let (client, ready) = Client::connect_present(url, &token).await.expect("present");
        Self {
            client,
            ready,
            token,
            user_id,
            last_s: 0,
        }
    }

    pub fn session_id(&self) -> u64 {
        self.ready.session_id
    }

    /// Presents this peer's session again on a new connection to `url`
    /// (after the last dispatch it got); returns the client and READY.
    pub async fn resume_at(&self, url: &str) -> (Client, Ready) {
        let (mut client, _) = Client::connect_hello(url).await.unwrap();
        let ready = client
            .present(&self.token, Some((self.session_id(), Some(self.last_s))))
            .await
            .unwrap();
        (client, ready)
    }

    /// The next message, checking dispatch numbering.
    pub async fn next(&mut self) -> Result<ServerMessage, ClientError> {
        let msg = self.client.next_message(WAIT).await?;
        if msg.f == FunctionCode::Dispatch.code() {
            let s = msg.s.expect("dispatch carries s");
            assert_eq!(s, self.last_s + 1, "gap or duplicate before {}", msg.text);
            self.last_s = s;
        }
        Ok(msg)
    }

    /// Skips messages (checking numbering) until `pred` holds.
    pub async fn wait_for(
        &mut self,
        mut pred: impl FnMut(&ServerMessage) -> bool,
    ) -> ServerMessage {
        loop {
            let msg = self.next().await.expect("message before timeout");
            if pred(&msg) {
                return msg;
            }
        }
    }

    /// Waits for the dispatch of `event` and returns it.
    pub async fn dispatch(&mut self, event: Event) -> ServerMessage {
        self.wait_for(|m| m.is_dispatch(event)).await
    }

    /// Waits for an error (150) and returns its body.
    pub async fn error(&mut self) -> ErrorBody {
        self.wait_for(|m| m.f == FunctionCode::Error.code())
            .await
            .error()
            .unwrap()
    }

    pub async fn execute(&mut self, event: &str, cnf: Value) {
        self.client.execute(event, cnf, None).await.expect("send");
    }

    pub async fn execute_s(&mut self, event: &str, cnf: Value, s: u64) {
        self.client
            .execute(event, cnf, Some(s))
            .await
            .expect("send");
    }

    /// Creates a channel and moves into it; returns the CHANNEL_MOVE cnf.
    pub async fn create_and_move(&mut self, channel: &str) -> Value {
        self.execute("CHANNEL_ADD", json!({"name": channel})).await;
        self.wait_for(|m| m.is_dispatch(Event::ChannelAdd) && m.cnf["name"] == channel)
            .await;
        self.move_to(channel).await
    }

    pub async fn move_to(&mut self, channel: &str) -> Value {
        self.execute("CHANNEL_MOVE", json!({"channel": channel}))
            .await;
        self.dispatch(Event::ChannelMove).await.cnf
    }

    pub async fn say(&mut self, content: &str) -> Value {
        self.execute("MESSAGE_CREATE", json!({"content": content}))
            .await;
        self.wait_for(|m| m.is_dispatch(Event::MessageCreate) && m.cnf["content"] == content)
            .await
            .cnf
    }

    /// Waits for the node to close the connection; returns the close code.
    pub async fn closed(&mut self) -> Option<u16> {
        self.client.closed().await.expect("closed in time")
    }
}

/// Waits for a fatal error `code` (`d: true`) and the close with the same
/// code.
pub async fn expect_fatal(client: &mut Client, code: u16) {
    let msg = client.expect_f(FunctionCode::Error).await.unwrap();
    let err = msg.error().unwrap();
    assert_eq!((err.c, err.d), (code, true), "{}", msg.text);
    assert_eq!(client.closed().await.unwrap(), Some(code));
}

static CHANNELS: AtomicU64 = AtomicU64::new(1);

/// Calls `check` until it returns `Some`, for at most `WAIT`, yielding to
/// the runtime (and the nodes on it) between calls; panics with `what`.
/// For state nothing announces (a server's client list, a counter).
pub async fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// [`eventually`] for a check that awaits (an HTTP request, a metric):
/// `Err` says what it saw, for the panic when `wait` is over.
pub async fn eventually_async<T, Fut>(
    what: &str,
    wait: Duration,
    mut check: impl FnMut() -> Fut,
) -> T
where
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(seen) => assert!(tokio::time::Instant::now() < deadline, "{what}: {seen}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `path` on `node` until it answers `status`.
pub async fn until_status(node: &TestNode, path: &str, status: u16) {
    let url = &node.http(path);
    eventually_async(&format!("{path} answers {status}"), WAIT, || async move {
        match http_get(url).await.0 {
            got if got == status => Ok(()),
            got => Err(format!("it is {got}")),
        }
    })
    .await
}

/// A channel name no other test uses.
pub fn fresh_channel(prefix: &str) -> String {
    format!("{prefix}-{}", CHANNELS.fetch_add(1, Ordering::Relaxed))
}

/// The value of a metric (summed over its label sets) on the node at
/// `addr`.
pub async fn metric(addr: SocketAddr, name: &str) -> u64 {
    metric_where(addr, name, "").await
}

/// [`metric`] summed over the series whose labels include `label` (for
/// example `reason="node_full"`; empty: every series).
pub async fn metric_where(addr: SocketAddr, name: &str, label: &str) -> u64 {
    let (_, metrics) = http_get(&format!("http://{addr}/metrics")).await;
    let labelled = format!("{name}{{");
    let plain = format!("{name} ");
    metrics
        .lines()
        .filter(|l| {
            (l.starts_with(&labelled) && l.contains(label))
                || (label.is_empty() && l.starts_with(&plain))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// A plain HTTP GET; returns the status and the body.
pub async fn http_get(url: &str) -> (u16, String) {
    let (status, _, body) = http("GET", url, None).await;
    (status, body)
}

/// A plain HTTP request; returns the status, the head (lower-cased) and the
/// body.
pub async fn http(method: &str, url: &str, body: Option<&str>) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_at(rest.find('/').unwrap());
    let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
    let body = body.unwrap_or("");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response[9..12].parse().unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (status, head.to_lowercase(), body.to_owned())
}
