#![allow(dead_code)]
//! A bare WebSocket client on a plain socket, for clients that misbehave
//! in ways a real client library will not: heads sent a byte at a time,
//! heads too large, a chosen source address, a tiny receive buffer, a
//! client that presents and then never reads again.

use std::net::{IpAddr, SocketAddr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// The head of a WebSocket upgrade to `/gateway`, with `extra` header
/// lines (each ending in `\r\n`) before the blank line.
pub fn upgrade_head(addr: SocketAddr, extra: &str) -> String {
    format!(
        "GET /gateway HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// A TCP connection to `addr`, from `from` if given, with a receive
/// buffer of `recv_buf` bytes if given (set before connecting, so the
/// window it announces stays small).
pub async fn connect(
    addr: SocketAddr,
    from: Option<IpAddr>,
    recv_buf: Option<u32>,
) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    if let Some(ip) = from {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    if let Some(size) = recv_buf {
        socket.set_recv_buffer_size(size)?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// One upgraded (or refused) connection.
pub struct RawWs {
    pub stream: TcpStream,
    /// The HTTP status of the answer to the upgrade.
    pub status: u16,
    /// Bytes read after the response head, not yet looked at.
    pub buf: Vec<u8>,
}

impl RawWs {
    /// Sends the upgrade head on `stream` and reads the response head.
    pub async fn upgrade(mut stream: TcpStream, extra: &str) -> std::io::Result<Self> {
        let addr = stream.peer_addr()?;
        stream
            .write_all(upgrade_head(addr, extra).as_bytes())
            .await?;
        let mut buf = Vec::new();
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let status = head
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .ok_or(std::io::ErrorKind::InvalidData)?;
        buf.drain(..end);
        Ok(Self {
            stream,
            status,
            buf,
        })
    }

    /// Sends `text` as one masked text frame.
    pub async fn send_text(&mut self, text: &str) -> std::io::Result<()> {
        let payload = text.as_bytes();
        let mut frame = vec![0x81];
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
        }
        let mask = [0x12, 0x34, 0x56, 0x78];
        frame.extend_from_slice(&mask);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        self.stream.write_all(&frame).await
    }

    /// Reads until `needle` has been seen in what the node sent; false if
    /// the connection ended first. (A byte search, not a frame parser:
    /// enough to wait for READY, `"f":140`.)
    pub async fn read_until(&mut self, needle: &[u8]) -> bool {
        loop {
            if let Some(i) = self.buf.windows(needle.len()).position(|w| w == needle) {
                self.buf.drain(..i + needle.len());
                return true;
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The payload of the next frame the node sends (unmasked, as a
    /// server's are), whole; `None` if the connection ended first.
    pub async fn next_payload(&mut self) -> Option<Vec<u8>> {
        loop {
            if let Some((start, len)) = frame_bounds(&self.buf) {
                let payload = self.buf[start..start + len].to_vec();
                self.buf.drain(..start + len);
                return Some(payload);
            }
            let mut chunk = [0u8; 16 * 1024];
            match self.stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads frames until one whose payload holds `needle`; false if the
    /// connection ended first. Unlike [`read_until`](Self::read_until),
    /// it stops at a frame's end.
    pub async fn until_payload(&mut self, needle: &[u8]) -> bool {
        while let Some(payload) = self.next_payload().await {
            if payload.windows(needle.len()).any(|w| w == needle) {
                return true;
            }
        }
        false
    }

    /// Reads and throws away everything until the node closes the
    /// connection.
    pub async fn until_closed(&mut self) {
        let mut chunk = [0u8; 16 * 1024];
        while matches!(self.stream.read(&mut chunk).await, Ok(n) if n > 0) {}
    }
}

/// Where the payload of the unmasked frame at the start of `buf` lies
/// (offset, length), once all of it is there.
fn frame_bounds(buf: &[u8]) -> Option<(usize, usize)> {
    let (start, len) = match *buf.get(1)? & 0x7f {
        126 => (
            4,
            u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as usize,
        ),
        127 => (
            10,
            u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize,
        ),
        n => (2, n as usize),
    };
    (buf.len() >= start + len).then_some((start, len))
}
