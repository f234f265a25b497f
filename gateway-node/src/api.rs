//! The server API: application backends publish, moderate and inspect over
//! HTTP on the node's port, under `/api/v1/`, without holding a WebSocket.
//! Its contract is `gateway-node/api/openapi.json` (served at
//! `/api/v1/openapi.json`); a protocol test checks that the routes below
//! and the document agree.
//!
//! # Flow of a request
//!
//! 1. `server::route` hands every path under `/api/v1/` to [`handle`].
//! 2. With no key configured the API is off: 404 `api_disabled`, whatever
//!    the path.
//! 3. The path is matched against [`ROUTES`] (templates such as
//!    `/api/v1/channels/{channel}/messages`): no template, 404; a template
//!    without that method, 405 with `Allow`.
//! 4. Every route but the OpenAPI document needs `Authorization: Bearer
//!    <key>`; the key is compared with every configured key in constant
//!    time (401 with `WWW-Authenticate` otherwise).
//! 5. A body must be `application/json` (415), at most 4096 bytes like a
//!    client's message (413), and an object (400). Its fields are checked
//!    by the same functions that check the matching client events
//!    (`events::message_fields`, `channel_fields`, `ban_terms`, …).
//! 6. The operation goes through the broker exactly as a client's event
//!    does: a published message takes the next place in its channel's log
//!    (numbered and ordered like any other), a ban or a disconnect reaches
//!    every node over the control topic.
//! 7. Errors are `{"error":{"code":"…","message":"…"}}`; every request is
//!    counted by route template and status.

use crate::broker::{Ban, DeleteAs, MessageBody, Published};
use crate::events::{self, Fields};
use crate::node::Node;
use crate::wire::Reject;
use bytes::Bytes;
use gateway_shared::protocol::{
    ErrorCode, User, MAX_PAYLOAD, MAX_USER_ID_CHARS, MAX_USER_NAME_CHARS,
};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;
use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

/// Where the API lives.
pub const PREFIX: &str = "/api/v1";
/// The OpenAPI 3.1 document of the API, served as is.
pub const OPENAPI: &str = include_str!("../api/openapi.json");
/// Page size when a request names none.
pub const DEFAULT_LIMIT: usize = 50;
/// Largest page a request may ask for.
pub const MAX_LIMIT: usize = 100;
/// Longest API key, in bytes (see `config::Config::api_keys`).
const MAX_KEY_LEN: usize = 256;

/// The author of API messages and channels when the request names none.
const SYSTEM_ID: &str = "system";
const SYSTEM_NAME: &str = "System";

/// What a route does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    OpenApi,
    Cluster,
    ListChannels,
    CreateChannel,
    Presence,
    History,
    Publish,
    DeleteMessage,
    Ban,
    Unban,
    Disconnect,
}

/// One route: a method and a path template; `{name}` matches one
/// non-empty, percent-decoded path segment.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    /// `GET`, `POST`, `PUT` or `DELETE`.
    pub method: &'static str,
    /// The path as the OpenAPI document writes it; also the metrics label.
    pub template: &'static str,
    /// What runs when it matches.
    op: Op,
    /// Every status it may answer, as documented (the metrics start each
    /// at zero; a test compares them with the document).
    pub statuses: &'static [u16],
}

const fn route(
    method: &'static str,
    template: &'static str,
    op: Op,
    statuses: &'static [u16],
) -> Route {
    Route {
        method,
        template,
        op,
        statuses,
    }
}

/// Every route of the API. The OpenAPI document lists exactly these.
pub const ROUTES: &[Route] = &[
    route("GET", "/api/v1/openapi.json", Op::OpenApi, &[200]),
    route("GET", "/api/v1/cluster", Op::Cluster, &[200, 401, 503]),
    route(
        "GET",
        "/api/v1/channels",
        Op::ListChannels,
        &[200, 401, 503],
    ),
    route(
        "POST",
        "/api/v1/channels",
        Op::CreateChannel,
        &[201, 400, 401, 409, 413, 415, 503],
    ),
    route(
        "GET",
        "/api/v1/channels/{channel}/presence",
        Op::Presence,
        &[200, 400, 401, 404, 503],
    ),
    route(
        "GET",
        "/api/v1/channels/{channel}/messages",
        Op::History,
        &[200, 400, 401, 404, 503],
    ),
    route(
        "POST",
        "/api/v1/channels/{channel}/messages",
        Op::Publish,
        &[201, 400, 401, 404, 413, 415, 503],
    ),
    route(
        "DELETE",
        "/api/v1/channels/{channel}/messages/{message_id}",
        Op::DeleteMessage,
        &[204, 400, 401, 404, 503],
    ),
    route(
        "PUT",
        "/api/v1/bans/{user_id}",
        Op::Ban,
        &[200, 400, 401, 413, 415, 503],
    ),
    route(
        "DELETE",
        "/api/v1/bans/{user_id}",
        Op::Unban,
        &[204, 400, 401, 503],
    ),
    route(
        "POST",
        "/api/v1/users/{user_id}/disconnect",
        Op::Disconnect,
        &[202, 400, 401, 503],
    ),
];

/// The metrics label of requests no route matched (400, 404, 405), and
/// their statuses.
pub const UNMATCHED: (&str, &[u16]) = ("unmatched", &[400, 404, 405]);
/// The metrics label of requests while the API is off (404).
pub const DISABLED: (&str, &[u16]) = ("disabled", &[404]);

/// The configured API keys. Each is held padded to [`MAX_KEY_LEN`] so
/// that a comparison always reads the same number of bytes.
pub struct Keys {
    /// Each key's length and its bytes, zero-padded.
    keys: Vec<(usize, [u8; MAX_KEY_LEN])>,
}

impl Keys {
    pub fn new(keys: Vec<String>) -> Self {
        Self {
            keys: keys
                .iter()
                .filter(|k| k.len() <= MAX_KEY_LEN)
                .map(|k| (k.len(), padded(k.as_bytes())))
                .collect(),
        }
    }

    /// No key: the API is off.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether `presented` is one of the keys. Constant time: every key is
    /// compared, over all of its padded bytes, whatever matches.
    pub fn accepts(&self, presented: &[u8]) -> bool {
        let len = presented.len();
        let presented = padded(&presented[..len.min(MAX_KEY_LEN)]);
        let mut any = 0u8;
        for (key_len, key) in &self.keys {
            let mut diff = u8::from(*key_len != len);
            for (a, b) in key.iter().zip(presented.iter()) {
                diff |= a ^ b;
            }
            any |= u8::from(std::hint::black_box(diff) == 0);
        }
        any == 1
    }
}

fn padded(bytes: &[u8]) -> [u8; MAX_KEY_LEN] {
    let mut out = [0u8; MAX_KEY_LEN];
    out[..bytes.len()].copy_from_slice(bytes);
    out
}

/// An error answer: HTTP status, a stable code string, and a message for
/// humans.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    /// Stable, for programs (`invalid_request`, `not_found`, …).
    code: &'static str,
    /// For humans; the validators' messages are the WebSocket's.
    message: Cow<'static, str>,
    /// For 405: the methods the path takes.
    allow: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<Cow<'static, str>>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            allow: None,
        }
    }

    fn invalid(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }
}

/// The backend's and the validators' rejections, as HTTP: the one place
/// where protocol error codes become statuses.
impl From<Reject> for ApiError {
    fn from(r: Reject) -> Self {
        let (status, code) = match r.code {
            ErrorCode::InvalidEventData | ErrorCode::DecodeError => {
                (StatusCode::BAD_REQUEST, "invalid_request")
            }
            ErrorCode::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            ErrorCode::AlreadyExists => (StatusCode::CONFLICT, "channel_exists"),
            // The API acts as an admin: the one refusal left is CHANNEL_ADD
            // past --max-channels.
            ErrorCode::PermissionDenied => (StatusCode::CONFLICT, "channel_limit_reached"),
            ErrorCode::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        Self::new(status, code, r.message)
    }
}

type ApiResult = Result<Response<Full<Bytes>>, ApiError>;

fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn json_value(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    json_response(status, serde_json::to_vec(value).expect("json serializes"))
}

fn no_content() -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::NO_CONTENT;
    response
}

fn error_response(e: &ApiError) -> Response<Full<Bytes>> {
    let mut response = json_value(
        e.status,
        &json!({"error": {"code": e.code, "message": e.message}}),
    );
    let headers = response.headers_mut();
    match e.status {
        StatusCode::UNAUTHORIZED => {
            headers.insert(
                hyper::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"gateway-api\""),
            );
        }
        StatusCode::SERVICE_UNAVAILABLE => {
            headers.insert(hyper::header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        _ => {}
    }
    if let Some(v) = e
        .allow
        .as_deref()
        .and_then(|a| HeaderValue::from_str(a).ok())
    {
        headers.insert(ALLOW, v);
    }
    response
}

/// How a path matched.
#[derive(Debug, PartialEq, Eq)]
enum Matched {
    Route(usize, Vec<String>),
    /// The path is a route's, not the method.
    WrongMethod(Vec<&'static str>),
    NoRoute,
    /// A segment that does not percent-decode to UTF-8.
    BadPath,
}

/// Decodes `%XX` escapes; `None` for a broken escape or bytes that are
/// not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn match_route(method: &Method, path: &str) -> Matched {
    let segments: Vec<&str> = path.split('/').collect();
    let mut allowed = Vec::new();
    for (index, route) in ROUTES.iter().enumerate() {
        let template: Vec<&str> = route.template.split('/').collect();
        if template.len() != segments.len() {
            continue;
        }
        let mut params = Vec::new();
        let mut matches = true;
        for (t, s) in template.iter().zip(&segments) {
            if t.starts_with('{') {
                if s.is_empty() {
                    matches = false;
                    break;
                }
                match percent_decode(s) {
                    Some(p) => params.push(p),
                    None => return Matched::BadPath,
                }
            } else if t != s {
                matches = false;
                break;
            }
        }
        if !matches {
            continue;
        }
        if route.method == method.as_str() {
            return Matched::Route(index, params);
        }
        allowed.push(route.method);
    }
    if allowed.is_empty() {
        Matched::NoRoute
    } else {
        Matched::WrongMethod(allowed)
    }
}

/// The value of query parameter `name` (the first one), decoded.
fn query_param(query: Option<&str>, name: &str) -> Result<Option<String>, ApiError> {
    for pair in query.unwrap_or("").split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if key == name {
            return percent_decode(&value.replace('+', " "))
                .map(Some)
                .ok_or_else(|| ApiError::invalid(format!("{name} is not valid UTF-8")));
        }
    }
    Ok(None)
}

/// `limit`: 1 to [`MAX_LIMIT`], [`DEFAULT_LIMIT`] when absent.
fn limit_param(query: Option<&str>) -> Result<usize, ApiError> {
    match query_param(query, "limit")? {
        None => Ok(DEFAULT_LIMIT),
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n) && v.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(|| ApiError::invalid("limit must be an integer from 1 to 100")),
    }
}

/// A cursor (`cursor`, `before`): a decimal number, as the API gave it.
fn cursor_param(query: Option<&str>, name: &'static str) -> Result<Option<u64>, ApiError> {
    match query_param(query, name)? {
        None => Ok(None),
        Some(v) => v
            .parse::<u64>()
            .ok()
            .filter(|_| v.bytes().all(|b| b.is_ascii_digit()))
            .map(Some)
            .ok_or_else(|| ApiError::invalid(format!("{name} is not a cursor this API gave"))),
    }
}

/// Whether the request says its body is JSON.
fn is_json(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| {
            let v = v.trim();
            v.eq_ignore_ascii_case("application/json")
                || (v.len() > 5 && v.as_bytes()[v.len() - 5..].eq_ignore_ascii_case(b"+json"))
        })
}

/// Reads a JSON body of at most [`MAX_PAYLOAD`] bytes; an empty one is
/// `None`.
async fn read_body(req: Request<Incoming>) -> Result<Option<Vec<u8>>, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "the body must be at most 4096 bytes",
        )
    };
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_PAYLOAD as u64) {
        return Err(too_large());
    }
    let json = is_json(&req);
    // Never more than the limit is buffered.
    let body = Limited::new(req.into_body(), MAX_PAYLOAD)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                too_large()
            } else {
                ApiError::invalid("the body could not be read")
            }
        })?
        .to_bytes();
    if body.is_empty() {
        return Ok(None);
    }
    if !json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "the body must be application/json",
        ));
    }
    Ok(Some(body.to_vec()))
}

/// Parses `body` (`None`: `{}`) and hands its fields to `f`.
fn with_fields<T>(
    body: Option<Vec<u8>>,
    f: impl FnOnce(&Fields<'_>) -> Result<T, ApiError>,
) -> Result<T, ApiError> {
    let Some(body) = body else {
        return f(&Fields::new(None));
    };
    // simd-json refuses integers beyond 64 bits, which are valid JSON:
    // serde_json reads them (as floats) first, and its output is what the
    // validators see. At most 4096 bytes, off the hot path.
    let value: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|_| ApiError::invalid("the body is not valid JSON"))?;
    let mut body = serde_json::to_vec(&value).expect("json serializes");
    let value = simd_json::to_borrowed_value(&mut body)
        .map_err(|_| ApiError::invalid("the body is not valid JSON"))?;
    if !matches!(value, simd_json::BorrowedValue::Object(_)) {
        return Err(ApiError::invalid("the body must be a JSON object"));
    }
    f(&Fields::new(Some(&value)))
}

/// An optional user object in a body (`author`, `created_by`); the system
/// author when absent. The same limits as a token's `sub` and `name`.
fn author_field(fields: &Fields<'_>, key: &'static str) -> Result<User, ApiError> {
    use simd_json::prelude::*;
    let Some(value) = fields.get(key) else {
        return Ok(User {
            id: SYSTEM_ID.into(),
            name: SYSTEM_NAME.into(),
        });
    };
    let bad = || {
        ApiError::invalid(format!(
            "{key} must be {{id: 1-64 chars, name: 1-32 chars}}"
        ))
    };
    let obj = value.as_object().ok_or_else(bad)?;
    let id = obj.get("id").and_then(|v| v.as_str()).ok_or_else(bad)?;
    let name = obj.get("name").and_then(|v| v.as_str()).ok_or_else(bad)?;
    let (id_len, name_len) = (id.chars().count(), name.chars().count());
    if !(1..=MAX_USER_ID_CHARS).contains(&id_len) || !(1..=MAX_USER_NAME_CHARS).contains(&name_len)
    {
        return Err(bad());
    }
    Ok(User {
        id: id.to_owned(),
        name: name.to_owned(),
    })
}

/// Answers one request under `/api/v1/`.
pub async fn handle(node: Arc<Node>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let started = Instant::now();
    let (label, result) = dispatch(&node, req).await;
    let response = result.unwrap_or_else(|e| {
        if e.status.is_server_error() {
            tracing::warn!(route = label, code = e.code, message = %e.message, "server API request failed");
        }
        error_response(&e)
    });
    node.metrics
        .api_request(label, response.status().as_u16(), started);
    response
}

/// Routes and runs a request; returns the metrics label (the route
/// template) with the answer.
async fn dispatch(node: &Node, req: Request<Incoming>) -> (&'static str, ApiResult) {
    if node.api_keys.is_empty() {
        return (
            DISABLED.0,
            Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "api_disabled",
                "the server API is off: no API key is configured (--api-keys)",
            )),
        );
    }
    let (index, params) = match match_route(req.method(), req.uri().path()) {
        Matched::Route(index, params) => (index, params),
        Matched::WrongMethod(allowed) => {
            let allow = allowed.join(", ");
            let mut e = ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("this path takes {allow}"),
            );
            e.allow = Some(allow);
            return (UNMATCHED.0, Err(e));
        }
        Matched::NoRoute => {
            return (
                UNMATCHED.0,
                Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    "no such route",
                )),
            )
        }
        Matched::BadPath => {
            return (
                UNMATCHED.0,
                Err(ApiError::invalid("a path segment is not valid UTF-8")),
            )
        }
    };
    let route = ROUTES[index];
    if route.op != Op::OpenApi && !authorized(node, &req) {
        return (
            route.template,
            Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "send Authorization: Bearer <API key>",
            )),
        );
    }
    (route.template, run(node, route.op, params, req).await)
}

fn authorized(node: &Node, req: &Request<Incoming>) -> bool {
    let Some(value) = req.headers().get(AUTHORIZATION) else {
        return false;
    };
    let value = value.as_bytes();
    let Some(key) = value
        .get(..7)
        .filter(|scheme| scheme.eq_ignore_ascii_case(b"bearer "))
        .map(|_| &value[7..])
    else {
        return false;
    };
    node.api_keys.accepts(key)
}

async fn run(node: &Node, op: Op, params: Vec<String>, req: Request<Incoming>) -> ApiResult {
    let query = req.uri().query().map(str::to_owned);
    let query = query.as_deref();
    let param = |i: usize| params.get(i).map(String::as_str).unwrap_or("");
    match op {
        Op::OpenApi => {
            let mut response = json_response(StatusCode::OK, OPENAPI.as_bytes().to_vec());
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/json; charset=utf-8"),
            );
            Ok(response)
        }
        Op::Cluster => {
            let nodes = node.broker.nodes(node).await?;
            let sessions: u64 = nodes.iter().map(|n| n.sessions).sum();
            let backend = match node.broker {
                crate::broker::Broker::Memory(_) => "memory",
                crate::broker::Broker::Redis(_) => "redis",
            };
            Ok(json_value(
                StatusCode::OK,
                &json!({"backend": backend, "nodes": nodes, "sessions": sessions}),
            ))
        }
        Op::ListChannels => {
            let channels = node.broker.channels().await?;
            Ok(json_value(StatusCode::OK, &json!({"channels": channels})))
        }
        Op::CreateChannel => {
            let body = read_body(req).await?;
            let (name, topic, created_by) = with_fields(body, |f| {
                let (name, topic) = events::channel_fields(f)?;
                Ok((
                    name.to_owned(),
                    topic.to_owned(),
                    author_field(f, "created_by")?,
                ))
            })?;
            node.broker
                .add_channel(&name, &topic, &created_by, node.config.max_channels)
                .await?;
            Ok(json_value(
                StatusCode::CREATED,
                &json!({"name": name, "topic": topic, "created_by": created_by}),
            ))
        }
        Op::Presence => {
            let limit = limit_param(query)?;
            let cursor = cursor_param(query, "cursor")?;
            let channel = existing_channel(node, param(0)).await?;
            let page = node.broker.presence(channel, cursor, limit).await?;
            Ok(json_value(
                StatusCode::OK,
                &json!({
                    "channel": channel,
                    "member_count": page.member_count,
                    "members": page.members,
                    "next_cursor": page.next.map(|n| n.to_string()),
                }),
            ))
        }
        Op::History => {
            let limit = limit_param(query)?;
            let before = cursor_param(query, "before")?;
            let channel = existing_channel(node, param(0)).await?;
            let page = node.broker.history(channel, before, limit).await?;
            // The messages are written as stored: already serialized.
            let mut out =
                Vec::with_capacity(64 + page.messages.iter().map(Vec::len).sum::<usize>());
            out.extend_from_slice(br#"{"channel":"#);
            serde_json::to_writer(&mut out, channel).expect("string serializes");
            out.extend_from_slice(br#","messages":["#);
            for (i, m) in page.messages.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(m);
            }
            out.extend_from_slice(br#"],"next_cursor":"#);
            match page.next {
                Some(id) => serde_json::to_writer(&mut out, &id.to_string()),
                None => serde_json::to_writer(&mut out, &()),
            }
            .expect("cursor serializes");
            out.push(b'}');
            Ok(json_response(StatusCode::OK, out))
        }
        Op::Publish => {
            let channel = param(0).to_owned();
            let body = read_body(req).await?;
            let (content, nonce, author) = with_fields(body, |f| {
                let (content, nonce) = events::message_fields(f)?;
                Ok((
                    content.to_owned(),
                    nonce.map(str::to_owned),
                    author_field(f, "author")?,
                ))
            })?;
            let channel = existing_channel(node, &channel).await?;
            let Published { id, ts } = node
                .broker
                .publish_message(&Arc::from(channel), &author, &content, nonce.as_deref())
                .await?;
            let body = serde_json::to_vec(&MessageBody {
                id: itoa::Buffer::new().format(id),
                channel,
                author: &author,
                content: &content,
                ts,
                nonce: nonce.as_deref(),
            })
            .expect("message serializes");
            Ok(json_response(StatusCode::CREATED, body))
        }
        Op::DeleteMessage => {
            let id = events::parse_message_id(param(1))
                .map_err(|_| ApiError::invalid("message_id must be a decimal string"))?;
            let channel = existing_channel(node, param(0)).await?;
            node.broker
                .delete_message(channel, id, DeleteAs::Admin)
                .await?;
            Ok(no_content())
        }
        Op::Ban => {
            let user_id = param(0).to_owned();
            events::check_user_id(&user_id)?;
            let body = read_body(req).await?;
            let Ban { reason, until } = with_fields(body, |f| Ok(events::ban_terms(f)?))?;
            node.broker
                .ban(
                    node,
                    &user_id,
                    Ban {
                        reason: reason.clone(),
                        until,
                    },
                )
                .await?;
            Ok(json_value(
                StatusCode::OK,
                &json!({"user_id": user_id, "reason": reason, "until": until}),
            ))
        }
        Op::Unban => {
            let user_id = param(0);
            events::check_user_id(user_id)?;
            node.broker.unban(user_id).await?;
            Ok(no_content())
        }
        Op::Disconnect => {
            let user_id = param(0);
            events::check_user_id(user_id)?;
            node.broker.disconnect_user(node, user_id).await?;
            Ok(json_value(
                StatusCode::ACCEPTED,
                &json!({"user_id": user_id}),
            ))
        }
    }
}

/// `name` if such a channel exists; 404 otherwise (a name that could not
/// be a channel's as well, as CHANNEL_MOVE does).
async fn existing_channel<'n>(node: &Node, name: &'n str) -> Result<&'n str, ApiError> {
    if gateway_shared::protocol::is_valid_channel_name(name)
        && node.broker.channel_exists(name).await?
    {
        Ok(name)
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "unknown channel",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_only_exactly() {
        let keys = Keys::new(vec![
            "first-key-0123456789".into(),
            "second-key-012345".into(),
        ]);
        assert!(keys.accepts(b"first-key-0123456789"));
        assert!(keys.accepts(b"second-key-012345"));
        assert!(!keys.accepts(b"first-key-012345678"), "a prefix");
        assert!(!keys.accepts(b"first-key-01234567890"), "longer");
        assert!(!keys.accepts(b""));
        assert!(!keys.accepts(&[b'x'; 1000]));
        assert!(Keys::new(Vec::new()).is_empty());
    }

    #[test]
    fn paths_match_templates_and_decode_their_segments() {
        assert_eq!(
            match_route(&Method::GET, "/api/v1/channels"),
            Matched::Route(2, vec![])
        );
        assert_eq!(
            match_route(&Method::PUT, "/api/v1/bans/a%20b%2Fc"),
            Matched::Route(8, vec!["a b/c".into()])
        );
        assert_eq!(
            match_route(&Method::PATCH, "/api/v1/channels"),
            Matched::WrongMethod(vec!["GET", "POST"])
        );
        assert_eq!(match_route(&Method::GET, "/api/v1/nope"), Matched::NoRoute);
        assert_eq!(match_route(&Method::PUT, "/api/v1/bans/"), Matched::NoRoute);
        assert_eq!(
            match_route(&Method::PUT, "/api/v1/bans/%ff"),
            Matched::BadPath
        );
        assert_eq!(
            match_route(&Method::PUT, "/api/v1/bans/%4"),
            Matched::BadPath
        );
    }

    #[test]
    fn limits_and_cursors_are_validated() {
        assert_eq!(limit_param(None).unwrap(), DEFAULT_LIMIT);
        assert_eq!(limit_param(Some("limit=100")).unwrap(), 100);
        for bad in [
            "limit=0",
            "limit=101",
            "limit=-1",
            "limit=x",
            "limit=",
            "limit=+5",
        ] {
            assert!(limit_param(Some(bad)).is_err(), "{bad}");
        }
        assert_eq!(
            cursor_param(Some("a=1&cursor=7"), "cursor").unwrap(),
            Some(7)
        );
        assert!(cursor_param(Some("cursor=abc"), "cursor").is_err());
        assert_eq!(cursor_param(Some("x=1"), "before").unwrap(), None);
    }

    #[test]
    fn the_openapi_document_is_json_3_1() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
    }
}
