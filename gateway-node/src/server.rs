//! The listener: accept loop, HTTP routes, admission, and drain.
//!
//! One port serves the WebSocket (`/gateway` and `/`), `/healthz`,
//! `/readyz`, `/metrics`, the demo chat page (`/`, `/static/…`) with its
//! development token endpoint (`POST /dev/token`), and the server API
//! under `/api/v1/` (`api`). [`Admission`] caps WebSocket connections, per
//! node and per client address; its ticket moves into each connection task
//! and is released when it ends.
//!
//! Abuse limits on the HTTP side (docs/DEPLOY.md, "Security and abuse
//! limits"): a request head must arrive within `--http-header-timeout-ms`
//! and fit in [`MAX_HEAD_BYTES`], or the connection is closed (431 for a
//! head too large); each socket's kernel send buffer is capped
//! (`--tcp-send-buffer`).

use crate::admission::{Admission, Refusal, Ticket};
use crate::metrics::Refused;
use crate::node::Node;
use crate::{connection, demo};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

/// Largest HTTP request head (request line and headers) read; a larger one
/// gets 431. Also hyper's read buffer cap, so a connection still sending its
/// head holds at most this much (hyper's default is about 400 KiB).
pub const MAX_HEAD_BYTES: usize = 16 * 1024;

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Whether the query allows this protocol version (`v` absent or `1`).
fn version_ok(query: Option<&str>) -> bool {
    query
        .unwrap_or("")
        .split('&')
        .filter_map(|pair| pair.strip_prefix("v="))
        .all(|v| v == "1")
}

async fn route(
    node: Arc<Node>,
    admission: Arc<Admission>,
    peer: IpAddr,
    mut req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path();
    // The server API answers every method and its own errors (JSON).
    if path == crate::api::PREFIX || path.starts_with("/api/v1/") {
        return Ok(crate::api::handle(node, req).await);
    }
    if path == "/dev/token" {
        return Ok(match &node.dev_secret {
            None => text(StatusCode::NOT_FOUND, "not found\n"),
            Some(_) if req.method() != Method::POST => {
                text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
            }
            Some(secret) => demo::mint_token(secret, req).await,
        });
    }
    if req.method() != Method::GET {
        return Ok(text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"));
    }
    match path {
        "/healthz" => Ok(text(StatusCode::OK, "ok\n")),
        "/readyz" => Ok(if !node.is_draining() && node.broker.is_healthy().await {
            text(StatusCode::OK, "ready\n")
        } else {
            text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
        }),
        "/metrics" => {
            let mut response = Response::new(Full::new(Bytes::from(node.metrics.render())));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            Ok(response)
        }
        "/gateway" | "/" => {
            if !fastwebsockets::upgrade::is_upgrade_request(&req) {
                if path == "/" && node.config.demo {
                    return Ok(demo::asset(path).expect("the page exists"));
                }
                return Ok(text(
                    StatusCode::UPGRADE_REQUIRED,
                    "connect with a WebSocket at /gateway\n",
                ));
            }
            if !version_ok(req.uri().query()) {
                return Ok(text(
                    StatusCode::BAD_REQUEST,
                    "unsupported protocol version; use v=1\n",
                ));
            }
            if node.is_draining() {
                node.metrics.refused(Refused::Draining);
                return Ok(text(StatusCode::SERVICE_UNAVAILABLE, "node is draining\n"));
            }
            let ticket = match admission.admit(peer) {
                Ok(ticket) => ticket,
                Err(Refusal::NodeFull) => {
                    node.metrics.refused(Refused::NodeFull);
                    return Ok(text(StatusCode::SERVICE_UNAVAILABLE, "node is full\n"));
                }
                Err(Refusal::AddressFull) => {
                    node.metrics.refused(Refused::AddressFull);
                    return Ok(text(
                        StatusCode::TOO_MANY_REQUESTS,
                        "too many connections from your address\n",
                    ));
                }
            };
            let (response, upgrade) = match fastwebsockets::upgrade::upgrade(&mut req) {
                Ok(ok) => ok,
                Err(_) => {
                    return Ok(text(
                        StatusCode::BAD_REQUEST,
                        "invalid WebSocket handshake\n",
                    ))
                }
            };
            tokio::spawn(serve_upgraded(node, upgrade, ticket));
            let (parts, _) = response.into_parts();
            Ok(Response::from_parts(parts, Full::new(Bytes::new())))
        }
        _ => Ok(match demo::asset(path) {
            Some(asset) if node.config.demo => asset,
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }),
    }
}

/// The connection's task, one per connection: the upgrade, then the
/// WebSocket, holding the admission ticket throughout.
///
/// Combinators rather than an `async fn`: the task's future is then the
/// upgrade's or the connection's, one at a time, with the ticket beside
/// it. An `async fn` kept the stream, its node and ticket arguments and a
/// temporary besides, which tipped every connection's task into a larger
/// allocation (tokio allocates tasks in 128-byte lines).
pub(crate) fn serve_upgraded(
    node: Arc<Node>,
    upgrade: fastwebsockets::upgrade::UpgradeFut,
    ticket: Ticket,
) -> impl Future<Output = ()> {
    use futures_util::future::{Either, FutureExt};
    upgrade.then(move |upgraded| match upgraded {
        Ok(ws) => {
            Either::Left(connection::serve(node, ws.into_inner()).map(move |()| drop(ticket)))
        }
        Err(e) => {
            debug!(error = %e, "upgrade failed");
            Either::Right(std::future::ready(()))
        }
    })
}

/// Accepts connections until `shutdown` resolves, then drains: GATEWAY_DOWN
/// and 1012 to every session, and waits up to the drain grace for them to
/// go.
pub async fn serve(node: Arc<Node>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
    let admission = Arc::new(Admission::new(
        node.config.max_connections,
        node.config.max_connections_per_ip,
    ));
    let sweeper = {
        let node = Arc::clone(&node);
        tokio::spawn(async move {
            let period = (node.config.resume_window() / 4)
                .clamp(Duration::from_millis(100), Duration::from_secs(1));
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                node.sweep_expired().await;
            }
        })
    };
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(ok) => {
                backoff = Duration::from_millis(5);
                ok
            }
            Err(e) => {
                // Out of file descriptors and the like: never fatal.
                warn!(error = %e, "accept failed; backing off");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        if node.config.tcp_send_buffer > 0 {
            // Without it, a client that stops reading can pin up to 4 MiB
            // of kernel memory (tcp_wmem's autotuning maximum) before the
            // slow-consumer rule sees its dispatches wait.
            let _ =
                socket2::SockRef::from(&stream).set_send_buffer_size(node.config.tcp_send_buffer);
        }
        let node = Arc::clone(&node);
        let admission = Arc::clone(&admission);
        tokio::spawn(async move {
            let header_timeout = node.config.http_header_timeout();
            let metrics = Arc::clone(&node.metrics);
            let service = service_fn(move |req| {
                route(Arc::clone(&node), Arc::clone(&admission), peer.ip(), req)
            });
            let result = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .max_header_size(MAX_HEAD_BYTES)
                .max_buf_size(MAX_HEAD_BYTES)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
            if let Err(e) = result {
                if e.is_timeout() {
                    metrics.refused(Refused::HeaderTimeout);
                } else if e.is_parse_too_large() {
                    metrics.refused(Refused::HeadTooLarge);
                }
                debug!(%peer, error = %e, "http connection ended with an error");
            }
        });
    }
    drop(listener);
    info!("draining");
    node.announce_shutdown();
    if !admission.wait_empty(node.config.drain_grace()).await {
        warn!("drain grace ran out with connections still open");
    }
    sweeper.abort();
    node.park_all().await;
    node.broker.stop().await;
    info!("drained");
}

#[cfg(test)]
mod tests {
    use super::version_ok;

    #[test]
    fn only_version_1_is_accepted() {
        assert!(version_ok(None));
        assert!(version_ok(Some("v=1")));
        assert!(version_ok(Some("x=2&v=1")));
        assert!(!version_ok(Some("v=2")));
        assert!(!version_ok(Some("v=")));
    }
}
