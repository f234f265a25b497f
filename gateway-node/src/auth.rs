//! Token verification: HS256 only, `exp` required, `nbf` honoured,
//! claims checked for the lengths PROTOCOL.md gives, `iss` and `aud` when
//! configured. Any other algorithm (including `none`) fails. A previous
//! secret may verify too, so that the secret can be rotated without
//! downtime.

use gateway_shared::protocol::{Claims, MAX_USER_ID_CHARS, MAX_USER_NAME_CHARS};
use jsonwebtoken::{decode, errors::ErrorKind, Algorithm, DecodingKey, Validation};

/// Who a session belongs to, from a verified token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub id: String,
    pub name: String,
    pub admin: bool,
}

/// What a token must satisfy besides its signature.
#[derive(Debug, Clone, Default)]
pub struct TokenRules {
    /// A previous secret that still verifies (rotation).
    pub previous_secret: Option<Vec<u8>>,
    /// When set, tokens must carry this `iss`.
    pub issuer: Option<String>,
    /// When set, tokens must carry this `aud` (alone or in an array).
    pub audience: Option<String>,
}

/// Verifies tokens against the cluster's secret (and a previous one).
pub struct Verifier {
    keys: Vec<DecodingKey>,
    validation: Validation,
}

impl Verifier {
    pub fn new(secret: &[u8], rules: &TokenRules) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        let mut required = vec!["exp"];
        // Expired means expired, and not yet valid means not yet valid: no
        // grace beyond the token's own `exp` and `nbf`.
        validation.leeway = 0;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        if let Some(issuer) = &rules.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        match &rules.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                required.push("aud");
            }
            // No audience configured: an `aud` in the token is not ours to
            // judge (tokens from an identity provider often carry one).
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        let mut keys = vec![DecodingKey::from_secret(secret)];
        keys.extend(
            rules
                .previous_secret
                .as_deref()
                .map(DecodingKey::from_secret),
        );
        Self { keys, validation }
    }

    /// The identity in `token`, or the reason (sent as the 4004 message).
    pub fn verify(&self, token: &str) -> Result<Identity, &'static str> {
        let mut result = decode::<Claims>(token, &self.keys[0], &self.validation);
        for key in &self.keys[1..] {
            match &result {
                Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature) => {
                    result = decode::<Claims>(token, key, &self.validation);
                }
                _ => break,
            }
        }
        let claims = result
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => "token expired",
                ErrorKind::ImmatureSignature => "token not valid yet (nbf)",
                ErrorKind::InvalidSignature => "token signature invalid",
                ErrorKind::InvalidAlgorithm => "token algorithm must be HS256",
                ErrorKind::InvalidIssuer => "token issuer (iss) not accepted",
                ErrorKind::InvalidAudience => "token audience (aud) not accepted",
                ErrorKind::MissingRequiredClaim(claim) => match claim.as_str() {
                    "iss" => "token claim iss missing",
                    "aud" => "token claim aud missing",
                    _ => "token claim exp missing",
                },
                ErrorKind::Json(_) | ErrorKind::InvalidClaimFormat(_) => "token claims invalid",
                _ => "token malformed",
            })?
            .claims;
        let sub_len = claims.sub.chars().count();
        if sub_len == 0 || sub_len > MAX_USER_ID_CHARS {
            return Err("token sub must be 1-64 characters");
        }
        let name_len = claims.name.chars().count();
        if name_len == 0 || name_len > MAX_USER_NAME_CHARS {
            return Err("token name must be 1-32 characters");
        }
        Ok(Identity {
            id: claims.sub,
            name: claims.name,
            admin: claims.admin,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_shared::token::{claims, mint, unix_now_s};

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn a_good_token_gives_its_identity() {
        let v = Verifier::new(SECRET, &TokenRules::default());
        let id = v
            .verify(&mint(SECRET, &claims("u1", "alice", true, 60)))
            .unwrap();
        assert_eq!(
            id,
            Identity {
                id: "u1".into(),
                name: "alice".into(),
                admin: true
            }
        );
    }

    #[test]
    fn bad_tokens_are_refused_with_a_reason() {
        let v = Verifier::new(SECRET, &TokenRules::default());
        let mut expired = claims("u1", "a", false, 0);
        expired.exp = unix_now_s() - 1;
        assert_eq!(v.verify(&mint(SECRET, &expired)), Err("token expired"));
        let other = mint(
            b"another-secret-another-secret-xx",
            &claims("u1", "a", false, 60),
        );
        assert_eq!(v.verify(&other), Err("token signature invalid"));
        assert_eq!(v.verify("not.a.token"), Err("token malformed"));
        assert_eq!(v.verify(""), Err("token malformed"));
        let long = mint(SECRET, &claims(&"x".repeat(65), "a", false, 60));
        assert!(v.verify(&long).is_err());
        let no_name = mint(SECRET, &claims("u1", "", false, 60));
        assert!(v.verify(&no_name).is_err());
        // alg "none": header {"alg":"none","typ":"JWT"}, no signature.
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ1MSIsIm5hbWUiOiJhIiwiZXhwIjo0MTAyNDQ0ODAwfQ.";
        assert!(v.verify(none).is_err());
    }

    fn token(secret: &[u8], alg: Algorithm, claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(alg),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    fn base(extra: serde_json::Value) -> serde_json::Value {
        let mut claims = serde_json::json!({"sub": "u1", "name": "a", "exp": unix_now_s() + 60});
        claims
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        claims
    }

    /// A token whose header names `alg` but whose signature is HS256 with
    /// the secret: the classic confusion attack (a verifier that trusts
    /// the header, fed the public key as an HMAC secret), and `none`.
    fn with_header_alg(alg: &str) -> String {
        use base64::Engine;
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let claims = base(serde_json::json!({})).to_string();
        let input = format!(
            "{}.{}",
            b64(&format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#)),
            b64(&claims)
        );
        let signature = jsonwebtoken::crypto::sign(
            input.as_bytes(),
            &jsonwebtoken::EncodingKey::from_secret(SECRET),
            Algorithm::HS256,
        )
        .unwrap();
        format!("{input}.{signature}")
    }

    #[test]
    fn only_hs256_is_accepted_whatever_the_header_says() {
        let v = Verifier::new(SECRET, &TokenRules::default());
        for alg in ["RS256", "ES256", "PS256", "EdDSA", "HS384"] {
            assert_eq!(
                v.verify(&with_header_alg(alg)),
                Err("token algorithm must be HS256"),
                "{alg}"
            );
        }
        assert!(v.verify(&with_header_alg("none")).is_err());
        assert!(v.verify(&with_header_alg("HS256")).is_ok(), "the control");
        let hs512 = token(SECRET, Algorithm::HS512, base(serde_json::json!({})));
        assert_eq!(v.verify(&hs512), Err("token algorithm must be HS256"));
    }

    #[test]
    fn not_before_is_honoured_without_leeway() {
        let v = Verifier::new(SECRET, &TokenRules::default());
        let later = token(
            SECRET,
            Algorithm::HS256,
            base(serde_json::json!({"nbf": unix_now_s() + 30})),
        );
        assert_eq!(v.verify(&later), Err("token not valid yet (nbf)"));
        let earlier = token(
            SECRET,
            Algorithm::HS256,
            base(serde_json::json!({"nbf": unix_now_s() - 1})),
        );
        assert!(v.verify(&earlier).is_ok());
    }

    #[test]
    fn a_previous_secret_verifies_during_a_rotation_and_no_other_does() {
        const OLD: &[u8] = b"the-old-secret-the-old-secret-the-old";
        let rules = TokenRules {
            previous_secret: Some(OLD.to_vec()),
            ..TokenRules::default()
        };
        let v = Verifier::new(SECRET, &rules);
        assert!(v
            .verify(&mint(SECRET, &claims("u1", "a", false, 60)))
            .is_ok());
        assert!(v.verify(&mint(OLD, &claims("u1", "a", false, 60))).is_ok());
        let stranger = mint(
            b"a-third-secret-a-third-secret-xx",
            &claims("u1", "a", false, 60),
        );
        assert_eq!(v.verify(&stranger), Err("token signature invalid"));
        // An expired token signed with the old secret is expired, not
        // "invalid": the signature was checked first.
        let mut expired = claims("u1", "a", false, 0);
        expired.exp = unix_now_s() - 1;
        assert_eq!(v.verify(&mint(OLD, &expired)), Err("token expired"));
        // Without the rotation, the old secret no longer verifies.
        let after = Verifier::new(SECRET, &TokenRules::default());
        assert_eq!(
            after.verify(&mint(OLD, &claims("u1", "a", false, 60))),
            Err("token signature invalid")
        );
    }

    #[test]
    fn issuer_and_audience_are_checked_when_configured() {
        let rules = TokenRules {
            issuer: Some("https://auth.example".into()),
            audience: Some("gateway".into()),
            ..TokenRules::default()
        };
        let v = Verifier::new(SECRET, &rules);
        let t = |extra| token(SECRET, Algorithm::HS256, base(extra));
        let ok = serde_json::json!({"iss": "https://auth.example", "aud": "gateway"});
        assert!(v.verify(&t(ok)).is_ok());
        let in_array =
            serde_json::json!({"iss": "https://auth.example", "aud": ["other", "gateway"]});
        assert!(v.verify(&t(in_array)).is_ok());
        assert_eq!(
            v.verify(&t(serde_json::json!({"aud": "gateway"}))),
            Err("token claim iss missing")
        );
        assert_eq!(
            v.verify(&t(serde_json::json!({"iss": "https://auth.example"}))),
            Err("token claim aud missing")
        );
        assert_eq!(
            v.verify(&t(
                serde_json::json!({"iss": "https://evil.example", "aud": "gateway"})
            )),
            Err("token issuer (iss) not accepted")
        );
        assert_eq!(
            v.verify(&t(
                serde_json::json!({"iss": "https://auth.example", "aud": "other"})
            )),
            Err("token audience (aud) not accepted")
        );
    }

    #[test]
    fn without_configured_issuer_and_audience_those_claims_are_ignored() {
        let v = Verifier::new(SECRET, &TokenRules::default());
        let t = token(
            SECRET,
            Algorithm::HS256,
            base(serde_json::json!({"iss": "anyone", "aud": "anything"})),
        );
        assert!(v.verify(&t).is_ok());
    }

    #[test]
    fn an_oversized_or_garbled_token_is_refused_not_panicked_on() {
        let v = Verifier::new(SECRET, &TokenRules::default());
        let huge = format!(
            "{}.{}.{}",
            "a".repeat(1500),
            "b".repeat(1500),
            "c".repeat(900)
        );
        assert!(v.verify(&huge).is_err());
        let padded = format!(
            "{}{}",
            mint(SECRET, &claims("u1", "a", false, 60)),
            "=".repeat(3000)
        );
        assert!(v.verify(&padded).is_err());
        for junk in ["..", "a.b", "a.b.c.d", "\u{0}.\u{0}.\u{0}", "é.é.é"] {
            assert!(v.verify(junk).is_err(), "{junk:?}");
        }
    }
}
