//! Reading the few fields the load tester needs out of a server frame
//! without parsing it.
//!
//! Hot path: every received frame goes through [`head`], and every
//! MESSAGE_CREATE through [`str_field`]/[`rstr_field`]. A full JSON parse
//! per frame would cost more than the rest of the receive path together
//! and could make the load tester the bottleneck it is meant to measure.
//!
//! Nodes write dispatches as `{"f":130,"s":<n>,"t":"<T>","cnf":…}` with the
//! envelope fields first and in that order (see the node's `wire` module),
//! so [`head`] reads them by position. A frame in any other shape falls
//! back to a real (borrowing) JSON parse of the envelope, so the scanner is
//! never wrong, only slower, on a node that orders its fields differently.
//!
//! The field helpers look for `"key":` in the raw text. That is exact for
//! the values read here (message ids, nonces, channel names, error codes):
//! a JSON string that contains `"key":` has its quotes escaped, so the
//! pattern cannot match inside another string.

use serde::Deserialize;

/// The envelope of one server message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head<'a> {
    /// Function code.
    pub f: u16,
    /// Sequence number of a dispatch.
    pub s: Option<u64>,
    /// Event name of a dispatch.
    pub t: Option<&'a str>,
}

/// The envelope of `frame`, or `None` when it is not a JSON object with an
/// integer `f`.
pub fn head(frame: &[u8]) -> Option<Head<'_>> {
    fast_head(frame).or_else(|| slow_head(frame))
}

fn fast_head(frame: &[u8]) -> Option<Head<'_>> {
    let rest = frame.strip_prefix(br#"{"f":"#)?;
    let (f, mut rest) = leading_u64(rest)?;
    let f = u16::try_from(f).ok()?;
    let mut head = Head {
        f,
        s: None,
        t: None,
    };
    if let Some(after) = rest.strip_prefix(br#","s":"#) {
        let (s, after) = leading_u64(after)?;
        head.s = Some(s);
        rest = after;
    }
    if let Some(after) = rest.strip_prefix(br#","t":""#) {
        let end = after.iter().position(|&b| b == b'"' || b == b'\\')?;
        if after[end] != b'"' {
            return None;
        }
        head.t = Some(std::str::from_utf8(&after[..end]).ok()?);
        rest = &after[end + 1..];
    }
    // Anything but the end of the object or the next field means the frame
    // is not in the shape assumed here (e.g. "s" after "t").
    matches!(rest.first(), Some(b'}') | Some(b',')).then_some(head)
}

/// The envelope read by a real JSON parse, borrowing `t` from the frame.
fn slow_head(frame: &[u8]) -> Option<Head<'_>> {
    #[derive(Deserialize)]
    struct Envelope<'a> {
        f: u16,
        #[serde(default)]
        s: Option<u64>,
        #[serde(default, borrow)]
        t: Option<&'a str>,
    }
    let env: Envelope<'_> = serde_json::from_slice(frame).ok()?;
    Some(Head {
        f: env.f,
        s: env.s,
        t: env.t,
    })
}

/// The decimal number at the start of `bytes`, and what follows it.
fn leading_u64(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let len = bytes.iter().take_while(|b| b.is_ascii_digit()).count();
    if len == 0 || len > 19 {
        return None;
    }
    let mut n = 0u64;
    for &b in &bytes[..len] {
        n = n * 10 + u64::from(b - b'0');
    }
    Some((n, &bytes[len..]))
}

/// Where `"key":` ends in `frame`, searching from the start (`from_end`
/// false) or from the end.
fn find_key(frame: &[u8], key: &str, from_end: bool) -> Option<usize> {
    let key = key.as_bytes();
    let pattern_len = key.len() + 3;
    if frame.len() < pattern_len {
        return None;
    }
    let is_match = |i: usize| {
        frame[i] == b'"'
            && frame[i + 1..i + 1 + key.len()] == *key
            && frame[i + 1 + key.len()] == b'"'
            && frame[i + 2 + key.len()] == b':'
    };
    let last = frame.len() - pattern_len;
    let found = if from_end {
        (0..=last).rev().find(|&i| is_match(i))
    } else {
        (0..=last).find(|&i| is_match(i))
    };
    found.map(|i| i + pattern_len)
}

fn string_at(frame: &[u8], at: usize) -> Option<&str> {
    let rest = frame[at..].strip_prefix(b"\"")?;
    let end = rest.iter().position(|&b| b == b'"' || b == b'\\')?;
    if rest[end] != b'"' {
        // An escaped string: none of the fields read here has one.
        return None;
    }
    std::str::from_utf8(&rest[..end]).ok()
}

/// The first string field `key` in `frame` (at any depth), when its value
/// has no escapes.
pub fn str_field<'a>(frame: &'a [u8], key: &str) -> Option<&'a str> {
    string_at(frame, find_key(frame, key, false)?)
}

/// The last string field `key` in `frame`: cheaper for fields near the end,
/// like the `nonce` of MESSAGE_CREATE.
pub fn rstr_field<'a>(frame: &'a [u8], key: &str) -> Option<&'a str> {
    string_at(frame, find_key(frame, key, true)?)
}

/// The first unsigned integer field `key` in `frame` (at any depth).
pub fn u64_field(frame: &[u8], key: &str) -> Option<u64> {
    let at = find_key(frame, key, false)?;
    leading_u64(&frame[at..]).map(|(n, _)| n)
}

/// The first boolean field `key` in `frame` (at any depth).
pub fn bool_field(frame: &[u8], key: &str) -> Option<bool> {
    let rest = &frame[find_key(frame, key, false)?..];
    if rest.starts_with(b"true") {
        Some(true)
    } else if rest.starts_with(b"false") {
        Some(false)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CREATE: &[u8] = br#"{"f":130,"s":42,"t":"MESSAGE_CREATE","cnf":{"id":"123456789","channel":"lt-ab12cd-3","author":{"id":"u1","name":"alice"},"content":"xxxx","ts":1764150000000,"nonce":"ab12cd.4.17.1764150000000123"}}"#;

    #[test]
    fn dispatch_heads_are_read_by_position() {
        assert_eq!(
            head(CREATE),
            Some(Head {
                f: 130,
                s: Some(42),
                t: Some("MESSAGE_CREATE")
            })
        );
        assert_eq!(
            head(br#"{"f":120}"#),
            Some(Head {
                f: 120,
                s: None,
                t: None
            })
        );
        let hello = br#"{"f":100,"cnf":{"hb_int":20000,"max_payload":4096}}"#;
        assert_eq!(head(hello).unwrap().f, 100);
        assert_eq!(u64_field(hello, "hb_int"), Some(20000));
    }

    #[test]
    fn other_field_orders_fall_back_to_a_parse() {
        let frame = br#"{ "t":"MESSAGE_DELETE", "cnf":{"id":"1"}, "s":7, "f":130 }"#;
        assert_eq!(
            head(frame),
            Some(Head {
                f: 130,
                s: Some(7),
                t: Some("MESSAGE_DELETE")
            })
        );
        // "s" before a non-field character is not taken by the fast path.
        assert_eq!(head(br#"{"f":130,"s":7x}"#), None);
        assert_eq!(head(b"not json"), None);
        assert_eq!(head(br#"{"s":1}"#), None);
        assert_eq!(head(br#"{"f":"130"}"#), None);
        assert_eq!(head(b""), None);
    }

    #[test]
    fn fields_are_found_from_either_end() {
        assert_eq!(str_field(CREATE, "id"), Some("123456789"));
        assert_eq!(str_field(CREATE, "channel"), Some("lt-ab12cd-3"));
        assert_eq!(
            rstr_field(CREATE, "nonce"),
            Some("ab12cd.4.17.1764150000000123")
        );
        // The last "id" is the author's.
        assert_eq!(rstr_field(CREATE, "id"), Some("u1"));
        assert_eq!(u64_field(CREATE, "ts"), Some(1_764_150_000_000));
        assert_eq!(str_field(CREATE, "missing"), None);
        assert_eq!(u64_field(CREATE, "content"), None);
    }

    #[test]
    fn keys_inside_strings_do_not_match() {
        // A content that mentions "nonce": is escaped on the wire.
        let frame =
            br#"{"f":130,"s":1,"t":"MESSAGE_CREATE","cnf":{"content":"say \"nonce\":\"x\""}}"#;
        assert_eq!(rstr_field(frame, "nonce"), None);
        // Escaped values are refused rather than returned half-read.
        let frame = br#"{"cnf":{"nonce":"a\"b"}}"#;
        assert_eq!(rstr_field(frame, "nonce"), None);
    }

    #[test]
    fn errors_and_ready_fields() {
        let error = br#"{"f":150,"cnf":{"c":4008,"d":false,"m":"rate limited","s":3,"t":"MESSAGE_CREATE"}}"#;
        let h = head(error).unwrap();
        assert_eq!((h.f, h.s, h.t), (150, None, None));
        assert_eq!(u64_field(error, "c"), Some(4008));
        assert_eq!(u64_field(error, "s"), Some(3));
        let ready =
            br#"{"f":140,"cnf":{"v":1,"session_id":9683494578353,"enc_key":"k","resumed":true}}"#;
        assert_eq!(u64_field(ready, "session_id"), Some(9_683_494_578_353));
        assert_eq!(bool_field(ready, "resumed"), Some(true));
        assert_eq!(bool_field(ready, "v"), None);
    }

    #[test]
    fn oversized_numbers_are_refused() {
        assert_eq!(head(br#"{"f":99999999999999999999}"#), None);
        assert_eq!(head(br#"{"f":70000}"#), None);
        assert_eq!(leading_u64(b"18446744073709551615"), None);
        assert_eq!(
            leading_u64(b"1844674407370955161x"),
            Some((1_844_674_407_370_955_161, &b"x"[..]))
        );
    }
}
