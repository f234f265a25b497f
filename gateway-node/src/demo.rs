//! The demo chat page and the development token endpoint.
//!
//! The page (`web/`) and the JavaScript client it runs on
//! (`clients/js/src/index.js`) are compiled into the binary: nothing is
//! read from disk or fetched from elsewhere. `--demo false` turns the page
//! off. `POST /dev/token` mints a token for a typed name, and exists only in
//! development mode (`--dev`, or a lone node started without a secret):
//! with a configured secret there is no way to mint tokens over HTTP.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};

/// How long a development token lives.
const DEV_TOKEN_TTL_S: u64 = 24 * 3600;
/// The largest body `POST /dev/token` reads.
const DEV_TOKEN_BODY_LIMIT: usize = 1024;

/// The page allows only its own scripts and styles, and WebSockets to the
/// node that served it.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                   img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
                   form-action 'none'; frame-ancestors 'none'";

struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static str,
}

const ASSETS: &[Asset] = &[
    Asset {
        path: "/",
        content_type: "text/html; charset=utf-8",
        body: include_str!("../web/index.html"),
    },
    Asset {
        path: "/static/app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../web/app.js"),
    },
    Asset {
        path: "/static/style.css",
        content_type: "text/css; charset=utf-8",
        body: include_str!("../web/style.css"),
    },
    Asset {
        path: "/static/gateway-client.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_str!("../../clients/js/src/index.js"),
    },
];

/// The page's file at `path`, if there is one.
pub fn asset(path: &str) -> Option<Response<Full<Bytes>>> {
    let asset = ASSETS.iter().find(|a| a.path == path)?;
    let mut response = Response::new(Full::new(Bytes::from_static(asset.body.as_bytes())));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("content-security-policy", HeaderValue::from_static(CSP));
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    Some(response)
}

fn json(status: StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
        .headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn refuse(status: StatusCode, message: &str) -> Response<Full<Bytes>> {
    json(
        status,
        serde_json::json!({ "error": { "message": message } }),
    )
}

/// `POST /dev/token` with `{"name": "…"}`: a token for user `dev-<name>`,
/// valid for a day, signed with the node's (development) secret.
pub async fn mint_token(secret: &[u8], req: Request<Incoming>) -> Response<Full<Bytes>> {
    let body = match Limited::new(req.into_body(), DEV_TOKEN_BODY_LIMIT)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(_) => return refuse(StatusCode::PAYLOAD_TOO_LARGE, "body over 1024 bytes"),
    };
    let name = match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(serde_json::Value::Object(fields)) => match fields.get("name") {
            Some(serde_json::Value::String(name)) => name.trim().to_owned(),
            _ => return refuse(StatusCode::BAD_REQUEST, "name must be a string"),
        },
        _ => return refuse(StatusCode::BAD_REQUEST, "body must be a JSON object"),
    };
    let len = name.chars().count();
    if !(1..=32).contains(&len) || name.chars().any(char::is_control) {
        return refuse(
            StatusCode::BAD_REQUEST,
            "name must be 1-32 characters, without control characters",
        );
    }
    let id = format!("dev-{name}");
    let claims = gateway_shared::token::claims(&id, &name, false, DEV_TOKEN_TTL_S);
    json(
        StatusCode::OK,
        serde_json::json!({
            "token": gateway_shared::token::mint(secret, &claims),
            "user": { "id": id, "name": name },
            "expires_in_s": DEV_TOKEN_TTL_S,
        }),
    )
}
