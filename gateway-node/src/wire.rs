//! Bytes on the wire: the server's WebSocket frames, pre-encoded server
//! messages, shared dispatch bodies, and the decoding of client envelopes.
//!
//! Server frames are never masked or fragmented, so we write them ourselves
//! straight into the writer's buffer: many frames then leave in one syscall.

use bytes::{BufMut, Bytes, BytesMut};
use gateway_shared::protocol::{ErrorBody, ErrorCode, Event, FunctionCode, Hello, MAX_PAYLOAD};
use serde::Serialize;
use simd_json::{BorrowedValue as Value, StaticNode};
use std::sync::Arc;
use std::time::Instant;

pub const OP_TEXT: u8 = 0x1;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PONG: u8 = 0xA;

/// Appends a FIN frame header for a payload of `len` bytes.
pub fn put_frame_header(buf: &mut BytesMut, opcode: u8, len: usize) {
    buf.put_u8(0x80 | opcode);
    if len < 126 {
        buf.put_u8(len as u8);
    } else if len <= u16::MAX as usize {
        buf.put_u8(126);
        buf.put_u16(len as u16);
    } else {
        buf.put_u8(127);
        buf.put_u64(len as u64);
    }
}

/// One complete frame as bytes.
pub fn frame(opcode: u8, payload: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(payload.len() + 10);
    put_frame_header(&mut buf, opcode, payload.len());
    buf.put_slice(payload);
    buf.freeze()
}

/// A text frame carrying `value` as JSON.
pub fn json_frame<T: Serialize>(value: &T) -> Bytes {
    let json = serde_json::to_vec(value).expect("protocol types serialize");
    frame(OP_TEXT, &json)
}

/// A close frame with `code` and a short reason (cut to the 123 bytes a
/// control frame allows).
pub fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut reason = reason.as_bytes();
    if reason.len() > 123 {
        reason = &reason[..123];
    }
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(reason);
    frame(OP_CLOSE, &payload)
}

#[derive(Serialize)]
struct Message<'a, T> {
    f: u16,
    cnf: &'a T,
}

pub fn hello_frame(hb_int_ms: u64) -> Bytes {
    let hello = Hello {
        hb_int: hb_int_ms,
        max_payload: MAX_PAYLOAD,
    };
    json_frame(&Message {
        f: FunctionCode::Hello.code(),
        cnf: &hello,
    })
}

/// The heartbeat answer, a complete frame: nothing to allocate per beat.
pub fn heartbeat_frame() -> Bytes {
    Bytes::from_static(b"\x81\x09{\"f\":120}")
}

pub fn message_frame<T: Serialize>(f: FunctionCode, cnf: &T) -> Bytes {
    json_frame(&Message { f: f.code(), cnf })
}

/// A rejection of a client request: the error code and the `m` text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    pub code: ErrorCode,
    pub message: std::borrow::Cow<'static, str>,
}

impl Reject {
    pub fn new(code: ErrorCode, message: impl Into<std::borrow::Cow<'static, str>>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// The 150 frame for `reject`, echoing the request's `s` and `t`.
pub fn error_frame(reject: &Reject, s: Option<i64>, t: Option<&str>) -> Bytes {
    let body = ErrorBody {
        c: reject.code.code(),
        d: reject.code.is_fatal(),
        m: Some(reject.message.to_string()),
        s,
        t: t.map(str::to_owned),
    };
    message_frame(FunctionCode::Error, &body)
}

/// The frame prefix of every dispatch, before the sequence number.
const DISPATCH_HEAD: &[u8] = br#"{"f":130,"s":"#;

/// One event, serialized once for all of its recipients.
///
/// Hot path: fan-out to N sessions shares this one allocation; each
/// recipient's frame is `DISPATCH_HEAD + seq + tail`, copied straight into
/// the writer's buffer, so nothing is serialized per recipient.
#[derive(Debug)]
pub struct Dispatch {
    pub event: Event,
    /// `,"t":"NAME","cnf":BODY}`.
    tail: Box<[u8]>,
    /// Where BODY starts in `tail`.
    body_start: usize,
    /// When this node made the dispatch (on Redis: when the pub/sub push or
    /// the log read reached it; in memory: at publication), for the
    /// fan-out delay histogram.
    pub created: Instant,
}

impl Dispatch {
    pub fn new<T: Serialize>(event: Event, body: &T) -> Arc<Self> {
        let body = serde_json::to_vec(body).expect("protocol types serialize");
        Self::from_body(event, &body)
    }

    /// A dispatch around an already serialized `cnf`.
    pub fn from_body(event: Event, body: &[u8]) -> Arc<Self> {
        let mut tail = Vec::with_capacity(body.len() + event.name().len() + 16);
        tail.extend_from_slice(br#","t":""#);
        tail.extend_from_slice(event.name().as_bytes());
        tail.extend_from_slice(br#"","cnf":"#);
        let body_start = tail.len();
        tail.extend_from_slice(body);
        tail.push(b'}');
        Arc::new(Self {
            event,
            tail: tail.into_boxed_slice(),
            body_start,
            created: Instant::now(),
        })
    }

    /// The serialized `cnf`.
    pub fn body(&self) -> &[u8] {
        &self.tail[self.body_start..self.tail.len() - 1]
    }

    /// Bytes this dispatch holds (for bounding rings by size).
    pub fn size(&self) -> usize {
        self.tail.len()
    }

    /// Appends the complete WebSocket frame of this dispatch as number `seq`.
    pub fn encode(&self, seq: u64, buf: &mut BytesMut) {
        let mut digits = itoa::Buffer::new();
        let seq = digits.format(seq).as_bytes();
        let len = DISPATCH_HEAD.len() + seq.len() + self.tail.len();
        buf.reserve(len + 10);
        put_frame_header(buf, OP_TEXT, len);
        buf.put_slice(DISPATCH_HEAD);
        buf.put_slice(seq);
        buf.put_slice(&self.tail);
    }
}

/// A decoded client payload: the envelope fields, `cnf` left as parsed.
#[derive(Debug)]
pub struct Envelope<'v> {
    pub f: FunctionCode,
    /// `t` (or `e`) of a 130.
    pub t: Option<&'v str>,
    /// `s` of a 130: the request number echoed in errors.
    pub s: Option<i64>,
    pub cnf: Option<&'v Value<'v>>,
}

fn decode_err(m: &'static str) -> Reject {
    Reject::new(ErrorCode::DecodeError, m)
}

/// An integer JSON number, if `v` is one.
pub fn as_int(v: &Value<'_>) -> Option<i128> {
    match v {
        Value::Static(StaticNode::I64(i)) => Some(*i as i128),
        Value::Static(StaticNode::U64(u)) => Some(*u as i128),
        _ => None,
    }
}

/// Decodes the envelope of one client message (PROTOCOL.md section 2).
/// `s`, `t` and the type of `cnf` are only checked on codes that use them.
pub fn decode_envelope<'v>(root: &'v Value<'v>) -> Result<Envelope<'v>, Reject> {
    let Value::Object(obj) = root else {
        return Err(decode_err("payload must be a JSON object"));
    };
    let f = obj.get("f").ok_or_else(|| decode_err("f is missing"))?;
    let f = as_int(f).ok_or_else(|| decode_err("f must be an integer"))?;
    let f = u64::try_from(f)
        .ok()
        .and_then(|f| FunctionCode::try_from(f).ok())
        .filter(|f| f.client_may_send())
        .ok_or_else(|| Reject::new(ErrorCode::UnknownFunction, "unknown function code"))?;
    let cnf = obj
        .get("cnf")
        .filter(|v| !matches!(v, Value::Static(StaticNode::Null)));
    let mut env = Envelope {
        f,
        t: None,
        s: None,
        cnf,
    };
    if f == FunctionCode::Dispatch {
        let t = obj.get("t").or_else(|| obj.get("e"));
        env.t = match t {
            None | Some(Value::Static(StaticNode::Null)) => None,
            Some(Value::String(t)) => Some(t.as_ref()),
            Some(_) => return Err(decode_err("t must be a string")),
        };
        env.s = match obj.get("s") {
            None | Some(Value::Static(StaticNode::Null)) => None,
            Some(s) => Some(
                as_int(s)
                    .and_then(|s| i64::try_from(s).ok())
                    .ok_or_else(|| decode_err("s must be an integer"))?,
            ),
        };
    }
    if matches!(f, FunctionCode::Dispatch | FunctionCode::Present) {
        match cnf {
            None | Some(Value::Object(_)) | Some(Value::String(_)) => {}
            Some(v) if as_int(v).is_some() => {}
            Some(_) => return Err(decode_err("cnf must be an object, a string or an integer")),
        }
    }
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(text: &str) -> Result<(FunctionCode, Option<String>, Option<i64>), ErrorCode> {
        let mut bytes = text.as_bytes().to_vec();
        let value = simd_json::to_borrowed_value(&mut bytes).map_err(|_| ErrorCode::DecodeError)?;
        decode_envelope(&value)
            .map(|e| (e.f, e.t.map(str::to_owned), e.s))
            .map_err(|r| r.code)
    }

    #[test]
    fn envelopes_decode_or_map_to_their_error_code() {
        use ErrorCode::*;
        assert_eq!(decode(r#"{"f":120}"#).unwrap().0, FunctionCode::Heartbeat);
        assert_eq!(
            decode(r#"{"f":130,"t":"X","s":7}"#).unwrap(),
            (FunctionCode::Dispatch, Some("X".into()), Some(7))
        );
        assert_eq!(decode(r#"{"f":130,"e":"X"}"#).unwrap().1, Some("X".into()));
        // s and t are ignored on other codes.
        assert!(decode(r#"{"f":120,"t":5,"s":"x"}"#).is_ok());
        for (text, code) in [
            ("nope", DecodeError),
            ("[1]", DecodeError),
            ("{}", DecodeError),
            (r#"{"f":"120"}"#, DecodeError),
            (r#"{"f":120.5}"#, DecodeError),
            (r#"{"f":130,"t":5}"#, DecodeError),
            (r#"{"f":130,"t":"X","s":"1"}"#, DecodeError),
            (r#"{"f":130,"t":"X","s":1.5}"#, DecodeError),
            (r#"{"f":130,"t":"X","cnf":[1]}"#, DecodeError),
            (r#"{"f":110,"cnf":true}"#, DecodeError),
            (r#"{"f":100}"#, UnknownFunction),
            (r#"{"f":140}"#, UnknownFunction),
            (r#"{"f":150}"#, UnknownFunction),
            (r#"{"f":999}"#, UnknownFunction),
            (r#"{"f":-1}"#, UnknownFunction),
        ] {
            assert_eq!(decode(text).unwrap_err(), code, "{text}");
        }
    }

    #[test]
    fn dispatch_frames_wrap_the_shared_body() {
        let d = Dispatch::from_body(Event::MessageDelete, br#"{"id":"1","channel":"c"}"#);
        assert_eq!(d.body(), br#"{"id":"1","channel":"c"}"#);
        let mut buf = BytesMut::new();
        d.encode(42, &mut buf);
        let text = br#"{"f":130,"s":42,"t":"MESSAGE_DELETE","cnf":{"id":"1","channel":"c"}}"#;
        assert_eq!(buf[0], 0x81);
        assert_eq!(buf[1] as usize, text.len());
        assert_eq!(&buf[2..], text);
    }

    #[test]
    fn the_static_heartbeat_frame_is_a_text_frame_of_its_payload() {
        assert_eq!(heartbeat_frame(), frame(OP_TEXT, br#"{"f":120}"#));
    }

    #[test]
    fn frame_headers_use_the_right_length_form() {
        for (len, head) in [(125usize, 2usize), (126, 4), (65535, 4), (65536, 10)] {
            let mut buf = BytesMut::new();
            put_frame_header(&mut buf, OP_TEXT, len);
            assert_eq!(buf.len(), head, "{len}");
        }
        let close = close_frame(4016, "slow");
        assert_eq!(&close[..], b"\x88\x06\x0f\xb0slow");
    }
}
