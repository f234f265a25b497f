//! HS256 tokens as PROTOCOL.md section 3 defines them.

use crate::protocol::Claims;
use jsonwebtoken::{encode, EncodingKey, Header};
use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch.
pub fn unix_now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Signs `claims` with HS256.
pub fn mint(secret: &[u8], claims: &Claims) -> String {
    encode(
        &Header::default(),
        claims,
        &EncodingKey::from_secret(secret),
    )
    .expect("HS256 encoding of plain claims cannot fail")
}

/// Claims valid for `ttl_s` seconds from now.
pub fn claims(sub: &str, name: &str, admin: bool, ttl_s: u64) -> Claims {
    Claims {
        sub: sub.to_owned(),
        name: name.to_owned(),
        admin,
        exp: unix_now_s() + ttl_s,
        iss: None,
        aud: None,
    }
}
