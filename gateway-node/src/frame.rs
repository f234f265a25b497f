//! Reading client frames (RFC 6455 section 5), with a buffer sized to
//! what arrives.
//!
//! fastwebsockets' reader keeps an 8 KiB buffer per connection for its
//! whole life. An idle gateway connection needs none: this reader waits
//! for bytes with a buffer on the stack, keeps only what arrived, grows to
//! one frame (never past the payload limit, which is checked on the header
//! before any of the payload is read), and lets go of its buffer once
//! every frame in it was handed out. Client frames must be masked; the
//! unmasking is fastwebsockets' own.

use bytes::{Buf, BytesMut};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::Poll;
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Room made for each read into a buffer that holds part of a frame.
const READ_ROOM: usize = 256;
/// The stack buffer a read into an empty buffer goes through: a burst of
/// small frames comes in one read.
const STACK_READ: usize = 4096;

/// One frame from the client, unmasked.
#[derive(Debug)]
pub struct Frame {
    pub fin: bool,
    pub opcode: u8,
    pub payload: BytesMut,
}

#[derive(Debug, PartialEq, Eq)]
pub enum ReadError {
    /// The connection ended (EOF or an I/O error).
    Closed,
    /// A frame announces more than `max_payload` bytes.
    TooLarge,
    /// Not a valid client frame.
    Protocol(&'static str),
}

pub struct FrameReader<R> {
    io: R,
    buf: BytesMut,
    max_payload: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(io: R, max_payload: usize) -> Self {
        Self {
            io,
            buf: BytesMut::new(),
            max_payload,
        }
    }

    /// A reader that first consumes `buffered` (bytes read past the
    /// handshake).
    pub fn with_buffered(io: R, max_payload: usize, buffered: &[u8]) -> Self {
        Self {
            io,
            buf: BytesMut::from(buffered),
            max_payload,
        }
    }

    /// Reads until the buffer holds at least `n` bytes.
    async fn fill(&mut self, n: usize) -> Result<(), ReadError> {
        while self.buf.len() < n {
            if self.buf.is_empty() {
                std::future::poll_fn(|cx| self.poll_first_bytes(cx, n)).await?;
                continue;
            }
            let want = (n - self.buf.len()).max(READ_ROOM);
            self.buf.reserve(want);
            match self.io.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return Err(ReadError::Closed),
                Ok(_) => {}
            }
        }
        Ok(())
    }

    /// Waits for bytes with no buffer of its own: they are read on the
    /// stack, then kept in a buffer of their size (or of the `n` bytes
    /// awaited, when more).
    fn poll_first_bytes(
        &mut self,
        cx: &mut std::task::Context<'_>,
        n: usize,
    ) -> Poll<Result<(), ReadError>> {
        let mut space = [MaybeUninit::<u8>::uninit(); STACK_READ];
        let mut read = ReadBuf::uninit(&mut space);
        match Pin::new(&mut self.io).poll_read(cx, &mut read) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(_)) => Poll::Ready(Err(ReadError::Closed)),
            Poll::Ready(Ok(())) if read.filled().is_empty() => Poll::Ready(Err(ReadError::Closed)),
            Poll::Ready(Ok(())) => {
                let got = read.filled();
                let mut buf = BytesMut::with_capacity(got.len().max(n));
                buf.extend_from_slice(got);
                self.buf = buf;
                Poll::Ready(Ok(()))
            }
        }
    }

    pub async fn next(&mut self) -> Result<Frame, ReadError> {
        self.next_within(self.max_payload).await
    }

    /// [`next`](Self::next), where a continuation frame may carry at most
    /// `room` bytes (what the message's earlier fragments left of the
    /// limit): nothing of one that would take it over is read.
    pub async fn next_within(&mut self, room: usize) -> Result<Frame, ReadError> {
        // Every frame in the buffer was handed out: let go of it (the
        // frames handed out keep their part alive while they need it). An
        // empty view still holds the allocation it was split from.
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
        }
        self.fill(2).await?;
        let (b0, b1) = (self.buf[0], self.buf[1]);
        if b0 & 0x70 != 0 {
            return Err(ReadError::Protocol("reserved bits set"));
        }
        let fin = b0 & 0x80 != 0;
        let opcode = b0 & 0x0F;
        if !matches!(
            opcode,
            OP_CONTINUATION | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG
        ) {
            return Err(ReadError::Protocol("unknown opcode"));
        }
        if b1 & 0x80 == 0 {
            return Err(ReadError::Protocol("client frames must be masked"));
        }
        let extra = match b1 & 0x7F {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        self.fill(2 + extra).await?;
        let len = match extra {
            0 => (b1 & 0x7F) as u64,
            2 => u16::from_be_bytes([self.buf[2], self.buf[3]]) as u64,
            _ => u64::from_be_bytes(self.buf[2..10].try_into().expect("8 bytes")),
        };
        let control = opcode >= OP_CLOSE;
        if control && (!fin || len > 125) {
            return Err(ReadError::Protocol("invalid control frame"));
        }
        // Checked on the header: nothing of a frame over the limit is read.
        if len > self.max_payload as u64 || (opcode == OP_CONTINUATION && len > room as u64) {
            return Err(ReadError::TooLarge);
        }
        let len = len as usize;
        let header = 2 + extra + 4;
        self.fill(header + len).await?;
        let mask: [u8; 4] = self.buf[2 + extra..header].try_into().expect("4 bytes");
        self.buf.advance(header);
        let mut payload = self.buf.split_to(len);
        fastwebsockets::unmask(&mut payload, mask);
        Ok(Frame {
            fin,
            opcode,
            payload,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn masked(b0: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1u8, 2, 3, 4];
        let mut out = vec![b0];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xFFFF => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    async fn read_all(bytes: Vec<u8>, max: usize) -> Vec<Result<(bool, u8, Vec<u8>), ReadError>> {
        let (mut tx, rx) = tokio::io::duplex(64);
        tokio::spawn(async move {
            // Dribble the bytes to exercise partial reads.
            for chunk in bytes.chunks(3) {
                tx.write_all(chunk).await.unwrap();
            }
        });
        let mut reader = FrameReader::new(rx, max);
        let mut out = Vec::new();
        loop {
            match reader.next().await {
                Ok(f) => out.push(Ok((f.fin, f.opcode, f.payload.to_vec()))),
                Err(ReadError::Closed) => return out,
                Err(e) => {
                    out.push(Err(e));
                    return out;
                }
            }
        }
    }

    #[tokio::test]
    async fn frames_of_every_length_form_are_read_and_unmasked() {
        let big = vec![b'x'; 300];
        let mut bytes = masked(0x81, b"hello");
        bytes.extend(masked(0x01, &big));
        bytes.extend(masked(0x80, b"end"));
        bytes.extend(masked(0x89, b"p"));
        let got = read_all(bytes, 4096).await;
        assert_eq!(got[0], Ok((true, OP_TEXT, b"hello".to_vec())));
        assert_eq!(got[1], Ok((false, OP_TEXT, big)));
        assert_eq!(got[2], Ok((true, OP_CONTINUATION, b"end".to_vec())));
        assert_eq!(got[3], Ok((true, OP_PING, b"p".to_vec())));
        assert_eq!(got.len(), 4);
    }

    /// A continuation frame that would take its message over the limit is
    /// refused on its header: its payload is never read (here it is never
    /// sent, so reading it would wait for ever). A control frame in the
    /// middle of the message is not held to the room left.
    #[tokio::test]
    async fn a_fragment_past_the_room_left_is_refused_on_its_header() {
        let (mut tx, rx) = tokio::io::duplex(8192);
        let mut reader = FrameReader::new(rx, 4096);
        let whole = masked(0x00, &[b'x'; 3000]);
        let header = whole[..8].to_vec(); // 2 + 2 (length) + 4 (mask)
        tx.write_all(&masked(0x89, b"ping")).await.unwrap();
        tx.write_all(&header).await.unwrap();
        let ping = reader.next_within(2).await.unwrap();
        assert_eq!(ping.opcode, OP_PING);
        let refused =
            tokio::time::timeout(std::time::Duration::from_secs(5), reader.next_within(2000))
                .await
                .expect("decided on the header");
        assert!(matches!(refused, Err(ReadError::TooLarge)));
    }

    /// Between frames an idle connection holds no read buffer; a burst
    /// read at once is handed out frame by frame from one buffer.
    #[tokio::test]
    async fn an_idle_reader_holds_no_buffer() {
        let (mut tx, rx) = tokio::io::duplex(8192);
        let mut reader = FrameReader::new(rx, 4096);
        let mut burst = masked(0x81, b"one");
        burst.extend(masked(0x81, &[b'x'; 1000]));
        tx.write_all(&burst).await.unwrap();
        let first = reader.next().await.unwrap();
        assert_eq!(&first.payload[..], b"one");
        assert!(
            !reader.buf.is_empty(),
            "the second frame came in the same read"
        );
        let mut second = reader.next().await.unwrap().payload;
        assert_eq!(second.len(), 1000);
        drop(first);
        {
            // Waiting for the next frame.
            let mut next = std::pin::pin!(reader.next());
            assert!(futures_util::FutureExt::now_or_never(next.as_mut()).is_none());
            // The last frame handed out is now the only holder of the
            // read's allocation: it can take all of it back.
            second.clear();
            assert!(
                second.try_reclaim(burst.len()),
                "the reader let go of its buffer"
            );
            tx.write_all(&masked(0x89, b"p")).await.unwrap();
            assert_eq!(next.await.unwrap().opcode, OP_PING);
        }
        assert_eq!(reader.buf.capacity(), 0, "a read is kept at its size");
    }

    #[tokio::test]
    async fn the_limit_is_inclusive_and_checked_on_the_header() {
        let ok = read_all(masked(0x81, &[b'a'; 4096]), 4096).await;
        assert!(matches!(&ok[0], Ok((true, OP_TEXT, p)) if p.len() == 4096));
        // Only the header of the 4097-byte frame is sent: refused at once.
        let header = masked(0x81, &[b'a'; 4097])[..8].to_vec();
        assert_eq!(read_all(header, 4096).await, [Err(ReadError::TooLarge)]);
        let mut huge = vec![0x81, 0x80 | 127];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        huge.extend_from_slice(&[0; 4]);
        assert_eq!(read_all(huge, 4096).await, [Err(ReadError::TooLarge)]);
    }

    #[tokio::test]
    async fn invalid_frames_are_refused() {
        let unmasked = vec![0x81, 0x02, b'h', b'i'];
        assert!(matches!(
            read_all(unmasked, 4096).await[0],
            Err(ReadError::Protocol(_))
        ));
        let reserved = masked(0xC1, b"x");
        assert!(matches!(
            read_all(reserved, 4096).await[0],
            Err(ReadError::Protocol(_))
        ));
        let opcode = masked(0x83, b"x");
        assert!(matches!(
            read_all(opcode, 4096).await[0],
            Err(ReadError::Protocol(_))
        ));
        let fragmented_ping = masked(0x09, b"x");
        assert!(matches!(
            read_all(fragmented_ping, 4096).await[0],
            Err(ReadError::Protocol(_))
        ));
    }
}
