//! An async client for the gateway.
//!
//! One reader task per connection reads frames and hands parsed messages to
//! the owner through a bounded queue, so [`Client::recv`] is cancel-safe
//! (fastwebsockets' `read_frame` is not) and can be raced against timeouts.
//! A client that stops calling `recv` stops reading its socket once the
//! queue is full, exactly like a slow real client.

use crate::protocol::{self, ErrorBody, FunctionCode, Hello, Present, Ready};
use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Payload, Role, WebSocketRead, WebSocketWrite};
use http_body_util::Empty;
use hyper::header::{CONNECTION, HOST, UPGRADE};
use hyper::upgrade::Upgraded;
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::time::Duration;
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

type Io = TokioIo<Upgraded>;

/// Messages queued between the reader task and the owner.
const INCOMING_QUEUE: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid gateway url {0:?} (expected ws://host:port/path)")]
    Url(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("websocket: {0}")]
    WebSocket(#[from] fastwebsockets::WebSocketError),
    #[error("handshake refused with HTTP {0}")]
    Refused(u16),
    #[error("connection closed (close code {0:?})")]
    Closed(Option<u16>),
    #[error("timed out waiting for the gateway")]
    Timeout,
    #[error("gateway error {0:?}")]
    Gateway(ErrorBody),
    #[error("unexpected message: {0}")]
    Unexpected(String),
}

/// One message from the node, with its raw text kept for assertions.
#[derive(Debug, Clone)]
pub struct ServerMessage {
    pub f: u16,
    pub s: Option<u64>,
    pub t: Option<String>,
    pub cnf: Value,
    pub text: String,
}

impl ServerMessage {
    fn parse(text: String) -> Result<Self, String> {
        let value: Value = serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
        let f = value
            .get("f")
            .and_then(Value::as_u64)
            .ok_or_else(|| format!("no f: {text}"))? as u16;
        Ok(Self {
            f,
            s: value.get("s").and_then(Value::as_u64),
            t: value.get("t").and_then(Value::as_str).map(str::to_owned),
            cnf: value.get("cnf").cloned().unwrap_or(Value::Null),
            text,
        })
    }

    pub fn is_dispatch(&self, event: protocol::Event) -> bool {
        self.f == FunctionCode::Dispatch.code() && self.t.as_deref() == Some(event.name())
    }

    /// The error body when this is a 150.
    pub fn error(&self) -> Option<ErrorBody> {
        (self.f == FunctionCode::Error.code())
            .then(|| serde_json::from_value(self.cnf.clone()).ok())
            .flatten()
    }

    /// The `cnf` as a typed body.
    pub fn body<T: serde::de::DeserializeOwned>(&self) -> Result<T, ClientError> {
        serde_json::from_value(self.cnf.clone())
            .map_err(|e| ClientError::Unexpected(format!("{e}: {}", self.text)))
    }
}

/// What the reader task hands over.
#[derive(Debug, Clone)]
pub enum Incoming {
    Message(ServerMessage),
    /// The node closed the connection (with its close code) or it dropped.
    Closed(Option<u16>),
}

/// A connection to one gateway node.
pub struct Client {
    /// The write half, raw: frames are masked and encoded here, so that
    /// several can leave in one write ([`Client::send_texts`]).
    write: WriteHalf<Io>,
    /// Encoded frames waiting for their write.
    out: Vec<u8>,
    /// Parsed messages from the reader task.
    incoming: mpsc::Receiver<Incoming>,
    /// The reader task, aborted on drop so the socket goes away with us.
    reader: JoinHandle<()>,
    /// The close code once the connection ended.
    closed: Option<Option<u16>>,
}

struct SpawnExecutor;

impl<F> hyper::rt::Executor<F> for SpawnExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(fut);
    }
}

/// Splits `ws://host:port/path?query` into the address and the request path.
fn parse_url(url: &str) -> Result<(String, String), ClientError> {
    let rest = url
        .strip_prefix("ws://")
        .ok_or_else(|| ClientError::Url(url.to_owned()))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => match rest.find('?') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        },
    };
    let path = if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_owned()
    };
    if authority.is_empty() {
        return Err(ClientError::Url(url.to_owned()));
    }
    let authority = if authority.contains(':') {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    Ok((authority, path))
}

/// Opens a TCP connection to `authority`, from `source` (port chosen by
/// the kernel) when given. A load generator spreads its connections over
/// several source addresses (127.0.0.2, 127.0.0.3, … on loopback) so that
/// it is not limited to one address's ephemeral ports.
async fn tcp_connect(authority: &str, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let Some(source) = source else {
        return TcpStream::connect(authority).await;
    };
    let mut last = None;
    for addr in tokio::net::lookup_host(authority).await? {
        if addr.is_ipv4() != source.is_ipv4() {
            continue;
        }
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.bind(SocketAddr::new(source, 0))?;
        match socket.connect(addr).await {
            Ok(stream) => return Ok(stream),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{authority} has no address of the family of {source}"),
        )
    }))
}

/// Connects to `url` (from `source`, when given), performs the WebSocket
/// handshake and returns the two halves of the stream.
async fn handshake(
    url: &str,
    source: Option<IpAddr>,
) -> Result<(ReadHalf<Io>, WriteHalf<Io>), ClientError> {
    let (authority, path) = parse_url(url)?;
    let stream = tcp_connect(&authority, source).await?;
    stream.set_nodelay(true)?;
    let request = Request::builder()
        .method("GET")
        .uri(path)
        .header(HOST, authority.as_str())
        .header(UPGRADE, "websocket")
        .header(CONNECTION, "upgrade")
        .header(
            "Sec-WebSocket-Key",
            fastwebsockets::handshake::generate_key(),
        )
        .header("Sec-WebSocket-Version", "13")
        .body(Empty::<Bytes>::new())
        .map_err(|e| ClientError::Unexpected(e.to_string()))?;
    let (ws, _) = match fastwebsockets::handshake::client(&SpawnExecutor, request, stream).await {
        Ok(ok) => ok,
        Err(fastwebsockets::WebSocketError::InvalidStatusCode(code)) => {
            return Err(ClientError::Refused(code))
        }
        Err(e) => return Err(e.into()),
    };
    Ok(tokio::io::split(ws.into_inner()))
}

/// Appends `payload` as one masked client frame.
fn encode_frame(out: &mut Vec<u8>, fin: bool, opcode: OpCode, payload: &[u8]) {
    let mut frame = Frame::new(fin, opcode, None, Payload::Owned(payload.to_vec()));
    frame.mask();
    let mut scratch = Vec::new();
    out.extend_from_slice(frame.write(&mut scratch));
}

impl Client {
    /// Opens the WebSocket; the HELLO is the first message [`recv`] returns.
    ///
    /// [`recv`]: Client::recv
    pub async fn connect(url: &str) -> Result<Self, ClientError> {
        let (read, write) = handshake(url, None).await?;
        // Only the read side goes through fastwebsockets; it never writes
        // (auto-pong and auto-close are off), hence the sink.
        let (mut read, _) =
            fastwebsockets::after_handshake_split(read, tokio::io::sink(), Role::Client);
        read.set_auto_close(false);
        read.set_auto_pong(false);
        let (tx, incoming) = mpsc::channel(INCOMING_QUEUE);
        let reader = tokio::spawn(async move { read_loop(&mut read, tx).await });
        Ok(Self {
            write,
            out: Vec::new(),
            incoming,
            reader,
            closed: None,
        })
    }

    /// Connects and returns the client with the node's HELLO.
    pub async fn connect_hello(url: &str) -> Result<(Self, Hello), ClientError> {
        let mut client = Self::connect(url).await?;
        let hello = client.expect_f(FunctionCode::Hello).await?;
        Ok((client, hello.body()?))
    }

    /// Connects, reads HELLO and presents `token`; returns READY.
    pub async fn connect_present(url: &str, token: &str) -> Result<(Self, Ready), ClientError> {
        let (mut client, _) = Self::connect_hello(url).await?;
        let ready = client.present(token, None).await?;
        Ok((client, ready))
    }

    /// Sends a 110 (new session, or resume with `(session_id, s)`) and waits
    /// for READY.
    pub async fn present(
        &mut self,
        token: &str,
        resume: Option<(u64, Option<u64>)>,
    ) -> Result<Ready, ClientError> {
        let present = Present {
            token: token.to_owned(),
            session_id: resume.map(|r| r.0),
            s: resume.and_then(|r| r.1),
        };
        self.send_json(&serde_json::json!({"f": 110, "cnf": present}))
            .await?;
        self.expect_f(FunctionCode::Ready).await?.body()
    }

    /// Sends a heartbeat (120).
    pub async fn heartbeat(&mut self) -> Result<(), ClientError> {
        self.send_text(r#"{"f":120}"#).await
    }

    /// Executes an event (130) with an optional request number.
    pub async fn execute(
        &mut self,
        event: &str,
        cnf: Value,
        s: Option<u64>,
    ) -> Result<(), ClientError> {
        let mut msg = serde_json::json!({"f": 130, "t": event, "cnf": cnf});
        if let Some(s) = s {
            msg["s"] = s.into();
        }
        self.send_json(&msg).await
    }

    pub async fn send_json(&mut self, value: &Value) -> Result<(), ClientError> {
        self.send_text(&value.to_string()).await
    }

    pub async fn send_text(&mut self, text: &str) -> Result<(), ClientError> {
        self.send_frame(true, OpCode::Text, text.as_bytes()).await
    }

    /// Sends `texts` as text messages in one write, as a client that
    /// batches its requests does: they reach the node in one read.
    pub async fn send_texts<S: AsRef<str>>(&mut self, texts: &[S]) -> Result<(), ClientError> {
        for text in texts {
            encode_frame(&mut self.out, true, OpCode::Text, text.as_ref().as_bytes());
        }
        self.flush().await
    }

    /// Sends one raw frame: for fragments, binary frames and other misuse.
    pub async fn send_frame(
        &mut self,
        fin: bool,
        opcode: OpCode,
        payload: &[u8],
    ) -> Result<(), ClientError> {
        encode_frame(&mut self.out, fin, opcode, payload);
        self.flush().await
    }

    /// Closes with `code` (1000 ends the session; others leave it resumable).
    pub async fn close(&mut self, code: u16) -> Result<(), ClientError> {
        self.send_frame(true, OpCode::Close, &code.to_be_bytes())
            .await
    }

    /// Writes the encoded frames.
    async fn flush(&mut self) -> Result<(), ClientError> {
        let result = self.write.write_all(&self.out).await;
        self.out.clear();
        Ok(result?)
    }

    /// Drops the TCP connection without a close frame, as a network failure
    /// would.
    pub fn abort(self) {
        self.reader.abort();
    }

    /// The next message or the close, `None` when nothing more will come.
    pub async fn recv(&mut self) -> Option<Incoming> {
        if let Some(code) = self.closed {
            return Some(Incoming::Closed(code));
        }
        let item = self.incoming.recv().await;
        if let Some(Incoming::Closed(code)) = item {
            self.closed = Some(code);
        }
        item
    }

    /// The next message, failing on close or after `timeout`.
    pub async fn next_message(&mut self, timeout: Duration) -> Result<ServerMessage, ClientError> {
        match tokio::time::timeout(timeout, self.recv()).await {
            Err(_) => Err(ClientError::Timeout),
            Ok(Some(Incoming::Message(m))) => Ok(m),
            Ok(Some(Incoming::Closed(code))) => Err(ClientError::Closed(code)),
            Ok(None) => Err(ClientError::Closed(None)),
        }
    }

    /// Skips messages until one satisfies `pred` (within 10 s in all).
    pub async fn wait_for(
        &mut self,
        mut pred: impl FnMut(&ServerMessage) -> bool,
    ) -> Result<ServerMessage, ClientError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let msg = self.next_message(left).await?;
            if pred(&msg) {
                return Ok(msg);
            }
        }
    }

    /// Waits for the next message with function code `f`; a 150 on the way
    /// is returned as [`ClientError::Gateway`].
    pub async fn expect_f(&mut self, f: FunctionCode) -> Result<ServerMessage, ClientError> {
        let msg = self
            .wait_for(|m| m.f == f.code() || m.f == FunctionCode::Error.code())
            .await?;
        match msg.error() {
            Some(err) if f != FunctionCode::Error => Err(ClientError::Gateway(err)),
            _ => Ok(msg),
        }
    }

    /// Waits for the connection to end and returns its close code.
    pub async fn closed(&mut self) -> Result<Option<u16>, ClientError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.recv()).await {
                Err(_) => return Err(ClientError::Timeout),
                Ok(Some(Incoming::Message(_))) => continue,
                Ok(Some(Incoming::Closed(code))) => return Ok(code),
                Ok(None) => return Ok(None),
            }
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

async fn read_loop(read: &mut WebSocketRead<ReadHalf<Io>>, tx: mpsc::Sender<Incoming>) {
    // Auto-pong and auto-close are off, so nothing is ever sent from here.
    let mut no_send =
        |_: Frame<'_>| -> Pin<Box<dyn Future<Output = Result<(), std::io::Error>> + Send>> {
            Box::pin(async { Ok(()) })
        };
    loop {
        let frame = match read.read_frame(&mut no_send).await {
            Ok(frame) => frame,
            Err(_) => {
                let _ = tx.send(Incoming::Closed(None)).await;
                return;
            }
        };
        match frame.opcode {
            OpCode::Text => {
                let text = match String::from_utf8(frame.payload.to_vec()) {
                    Ok(text) => text,
                    Err(_) => continue,
                };
                let item = match ServerMessage::parse(text) {
                    Ok(msg) => Incoming::Message(msg),
                    Err(_) => continue,
                };
                if tx.send(item).await.is_err() {
                    return;
                }
            }
            OpCode::Close => {
                let code = (frame.payload.len() >= 2)
                    .then(|| u16::from_be_bytes([frame.payload[0], frame.payload[1]]));
                let _ = tx.send(Incoming::Closed(code)).await;
                return;
            }
            _ => {}
        }
    }
}

/// A lean connection for load generation: raw text frames in, pre-built
/// text out, no per-frame JSON parse and no reader task.
///
/// [`connect_raw`] returns the two halves of one WebSocket. The caller owns
/// both and drives them from its own task, typically as two long-lived
/// futures in one `select!` (one reading, one writing), so a connection
/// costs one task and frames are handled where they are read, without a
/// queue in between. Dropping both halves drops the TCP connection without
/// a close frame, as a network failure would.
pub async fn connect_raw(url: &str) -> Result<(RawReader, RawWriter), ClientError> {
    connect_raw_from(url, None).await
}

/// [`connect_raw`] from a given local address (the kernel picks the port).
pub async fn connect_raw_from(
    url: &str,
    source: Option<IpAddr>,
) -> Result<(RawReader, RawWriter), ClientError> {
    let (read, write) = handshake(url, source).await?;
    let (mut read, write) = fastwebsockets::after_handshake_split(read, write, Role::Client);
    // Nothing is ever answered from the read half: the node sends no pings,
    // and a close from the node ends the connection for the caller.
    read.set_auto_close(false);
    read.set_auto_pong(false);
    Ok((
        RawReader {
            read: fastwebsockets::FragmentCollectorRead::new(read),
        },
        RawWriter {
            write,
            scratch: Vec::with_capacity(256),
        },
    ))
}

/// One message from the node, unparsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawFrame {
    /// A complete text message (fragments already joined).
    Text(Bytes),
    /// The node closed the connection, with its close code when it gave one.
    Closed(Option<u16>),
}

/// The read half of [`connect_raw`].
pub struct RawReader {
    read: fastwebsockets::FragmentCollectorRead<ReadHalf<Io>>,
}

impl RawReader {
    /// The next text message or the close. Pings, pongs and binary frames
    /// are skipped.
    ///
    /// Not cancel-safe (fastwebsockets' `read_frame` is not): cancelling it
    /// can lose a partly read frame, so only cancel it when the connection
    /// is being thrown away.
    pub async fn next(&mut self) -> Result<RawFrame, ClientError> {
        let mut no_send =
            |_: Frame<'_>| -> Pin<Box<dyn Future<Output = Result<(), std::io::Error>> + Send>> {
                Box::pin(async { Ok(()) })
            };
        loop {
            let frame = self.read.read_frame(&mut no_send).await?;
            match frame.opcode {
                OpCode::Text => {
                    // The read buffer hands out its own bytes: no copy here.
                    let bytes = match frame.payload {
                        Payload::Bytes(b) => b.freeze(),
                        other => Bytes::from(Vec::from(other)),
                    };
                    return Ok(RawFrame::Text(bytes));
                }
                OpCode::Close => {
                    let code = (frame.payload.len() >= 2)
                        .then(|| u16::from_be_bytes([frame.payload[0], frame.payload[1]]));
                    return Ok(RawFrame::Closed(code));
                }
                _ => continue,
            }
        }
    }
}

/// The write half of [`connect_raw`].
pub struct RawWriter {
    write: WebSocketWrite<WriteHalf<Io>>,
    /// Client frames are masked in place; reusing one buffer for that saves
    /// an allocation per message sent.
    scratch: Vec<u8>,
}

impl RawWriter {
    /// Sends one text message, `text` being the complete JSON payload.
    pub async fn send_text(&mut self, text: &[u8]) -> Result<(), ClientError> {
        self.scratch.clear();
        self.scratch.extend_from_slice(text);
        let frame = Frame::new(
            true,
            OpCode::Text,
            None,
            Payload::BorrowedMut(&mut self.scratch),
        );
        self.write.write_frame(frame).await?;
        Ok(())
    }

    /// Sends a heartbeat (120).
    pub async fn heartbeat(&mut self) -> Result<(), ClientError> {
        self.send_text(br#"{"f":120}"#).await
    }

    /// Sends a close frame with `code` (1000 ends the session).
    pub async fn close(&mut self, code: u16) -> Result<(), ClientError> {
        self.write.write_frame(Frame::close(code, b"")).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::parse_url;

    #[test]
    fn urls_split_into_address_and_path() {
        assert_eq!(
            parse_url("ws://127.0.0.1:8080/gateway?v=1").unwrap(),
            ("127.0.0.1:8080".into(), "/gateway?v=1".into())
        );
        assert_eq!(
            parse_url("ws://localhost").unwrap(),
            ("localhost:80".into(), "/".into())
        );
        assert_eq!(
            parse_url("ws://h:1?v=1").unwrap(),
            ("h:1".into(), "/?v=1".into())
        );
        assert!(parse_url("http://h:1/").is_err());
        assert!(parse_url("ws:///x").is_err());
    }
}
