//! Token verification: any string is refused or accepted without a panic;
//! a token that is accepted carries claims within the protocol's limits.
//! Inputs that are JSON objects are also signed as claims, so the checks
//! past the signature (exp, nbf, iss, aud, sub and name lengths) are
//! reached.
#![no_main]

use gateway_node::auth::{TokenRules, Verifier};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

const SECRET: &[u8] = b"fuzz-secret-fuzz-secret-fuzz-secret!";

fn verifiers() -> &'static [Verifier; 2] {
    static V: OnceLock<[Verifier; 2]> = OnceLock::new();
    V.get_or_init(|| {
        let strict = TokenRules {
            previous_secret: Some(b"previous-fuzz-secret-previous-fuzz!".to_vec()),
            issuer: Some("iss".into()),
            audience: Some("aud".into()),
        };
        [
            Verifier::new(SECRET, &TokenRules::default()),
            Verifier::new(SECRET, &strict),
        ]
    })
}

fn check(token: &str) {
    for v in verifiers() {
        if let Ok(id) = v.verify(token) {
            let (sub, name) = (id.id.chars().count(), id.name.chars().count());
            assert!(
                (1..=64).contains(&sub) && (1..=32).contains(&name),
                "{id:?}"
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    check(text);
    if let Ok(serde_json::Value::Object(claims)) = serde_json::from_str::<serde_json::Value>(text) {
        let signed = jsonwebtoken_sign(&serde_json::Value::Object(claims));
        check(&signed);
    }
});

/// HS256 over any claims JSON.
fn jsonwebtoken_sign(claims: &serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET),
    )
    .expect("HS256 over a JSON value")
}
