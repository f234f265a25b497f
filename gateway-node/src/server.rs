//! The listener: accept loop, HTTP routes, admission, and drain.
//!
//! One port serves the WebSocket (`/gateway` and `/`), `/healthz`,
//! `/readyz`, `/metrics`, the demo chat page (`/`, `/static/…`) with its
//! development token endpoint (`POST /dev/token`), and the server API
//! under `/api/v1/` (`api`). A semaphore caps WebSocket connections; a
//! permit moves into each connection task and is released when it ends.

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
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

/// How long a client may take to send its HTTP request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

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
    admission: Arc<Semaphore>,
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
                return Ok(text(StatusCode::SERVICE_UNAVAILABLE, "node is draining\n"));
            }
            let Ok(permit) = admission.try_acquire_owned() else {
                return Ok(text(StatusCode::SERVICE_UNAVAILABLE, "node is full\n"));
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
            tokio::spawn(async move {
                match upgrade.await {
                    Ok(ws) => connection::serve(node, ws.into_inner()).await,
                    Err(e) => debug!(error = %e, "upgrade failed"),
                }
                drop(permit);
            });
            let (parts, _) = response.into_parts();
            Ok(Response::from_parts(parts, Full::new(Bytes::new())))
        }
        _ => Ok(match demo::asset(path) {
            Some(asset) if node.config.demo => asset,
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }),
    }
}

/// Accepts connections until `shutdown` resolves, then drains: GATEWAY_DOWN
/// and 1012 to every session, and waits up to the drain grace for them to
/// go.
pub async fn serve(node: Arc<Node>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
    let admission = Arc::new(Semaphore::new(node.config.max_connections));
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
        let node = Arc::clone(&node);
        let admission = Arc::clone(&admission);
        tokio::spawn(async move {
            let service =
                service_fn(move |req| route(Arc::clone(&node), Arc::clone(&admission), req));
            let result = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
            if let Err(e) = result {
                debug!(%peer, error = %e, "http connection ended with an error");
            }
        });
    }
    drop(listener);
    info!("draining");
    node.announce_shutdown();
    let all = node.config.max_connections as u32;
    let grace = node.config.drain_grace();
    if tokio::time::timeout(grace, admission.acquire_many(all))
        .await
        .is_err()
    {
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
