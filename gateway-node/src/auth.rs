//! Token verification: HS256 only, `exp` required, claims checked for the
//! lengths PROTOCOL.md gives. Any other algorithm (including `none`) fails.

use gateway_shared::protocol::{Claims, MAX_USER_ID_CHARS, MAX_USER_NAME_CHARS};
use jsonwebtoken::{decode, errors::ErrorKind, Algorithm, DecodingKey, Validation};

/// Who a session belongs to, from a verified token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub id: String,
    pub name: String,
    pub admin: bool,
}

/// Verifies tokens against the cluster's secret.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl Verifier {
    pub fn new(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp"]);
        // Expired means expired: no grace beyond the token's own `exp`.
        validation.leeway = 0;
        validation.validate_exp = true;
        Self {
            key: DecodingKey::from_secret(secret),
            validation,
        }
    }

    /// The identity in `token`, or the reason (sent as the 4004 message).
    pub fn verify(&self, token: &str) -> Result<Identity, &'static str> {
        let claims = decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => "token expired",
                ErrorKind::InvalidSignature => "token signature invalid",
                ErrorKind::InvalidAlgorithm => "token algorithm must be HS256",
                ErrorKind::MissingRequiredClaim(_) => "token claim missing",
                ErrorKind::Json(_) => "token claims invalid",
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
        let v = Verifier::new(SECRET);
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
        let v = Verifier::new(SECRET);
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
}
