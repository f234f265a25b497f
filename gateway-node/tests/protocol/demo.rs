//! The demo chat page and the development token endpoint (`POST
//! /dev/token`): the page is on unless `--demo false`; tokens are minted
//! only in development mode.

use crate::harness::*;
use gateway_shared::Client;
use serde_json::Value;

#[tokio::test]
async fn the_page_and_the_client_are_served_from_the_binary() {
    let node = TestNode::start().await;
    let (status, head, body) = http("GET", &node.http("/"), None).await;
    assert_eq!(status, 200);
    assert!(head.contains("content-type: text/html"), "{head}");
    assert!(head.contains("content-security-policy: default-src 'none'"));
    assert!(body.contains("/static/app.js"));
    for (path, needle) in [
        ("/static/app.js", "GatewayClient"),
        ("/static/gateway-client.js", "export class GatewayClient"),
        ("/static/style.css", "#messages"),
    ] {
        let (status, head, body) = http("GET", &node.http(path), None).await;
        assert_eq!(status, 200, "{path}");
        assert!(head.contains("x-content-type-options: nosniff"), "{path}");
        assert!(body.contains(needle), "{path}");
    }
    assert_eq!(http_get(&node.http("/static/nope.js")).await.0, 404);
    // The WebSocket is still at `/` for clients of the original note.
    let (_, ready) =
        Client::connect_present(&format!("ws://{}/", node.addr), &user_token("page").0)
            .await
            .unwrap();
    assert!(!ready.resumed);
}

#[tokio::test]
async fn demo_false_turns_the_page_off() {
    let node = TestNode::with(|c| c.demo = false).await;
    let (status, body) = http_get(&node.http("/")).await;
    assert_eq!(status, 426);
    assert!(body.contains("connect with a WebSocket"));
    assert_eq!(http_get(&node.http("/static/app.js")).await.0, 404);
    assert_eq!(
        http_get(&node.http("/static/gateway-client.js")).await.0,
        404
    );
}

#[tokio::test]
async fn with_a_configured_secret_there_is_no_token_endpoint() {
    let node = TestNode::start().await;
    for method in ["POST", "GET"] {
        let (status, _, _) = http(method, &node.http("/dev/token"), Some(r#"{"name":"x"}"#)).await;
        assert_eq!(status, 404, "{method}");
    }
}

#[tokio::test]
async fn in_development_mode_a_token_is_minted_for_a_typed_name() {
    let node = TestNode::with(|c| c.dev = true).await;
    let (status, head, body) = http(
        "POST",
        &node.http("/dev/token"),
        Some(r#"{"name":"  Zoë  "}"#),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(head.contains("cache-control: no-store"));
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["user"]["name"], "Zoë");
    assert_eq!(body["user"]["id"], "dev-Zoë");
    let token = body["token"].as_str().unwrap().to_owned();
    let (_, ready) = Client::connect_present(&node.url(), &token).await.unwrap();
    assert_eq!(ready.user.name, "Zoë");
    assert_eq!(ready.user.id, "dev-Zoë");
    assert!(!ready.user.admin, "development tokens are never admin");
}

#[tokio::test]
async fn the_token_endpoint_refuses_bad_requests() {
    let node = TestNode::with(|c| c.dev = true).await;
    let url = node.http("/dev/token");
    let long = format!(r#"{{"name":"{}"}}"#, "n".repeat(33));
    let huge = format!(r#"{{"name":"{}"}}"#, "n".repeat(2000));
    for (body, want) in [
        ("not json", 400),
        (r#"["name"]"#, 400),
        (r#"{"name":7}"#, 400),
        (r#"{"name":"   "}"#, 400),
        (r#"{"name":"a\u0007b"}"#, 400),
        (long.as_str(), 400),
        (huge.as_str(), 413),
    ] {
        let (status, _, answer) = http("POST", &url, Some(body)).await;
        assert_eq!(status, want, "{body}");
        let answer: Value = serde_json::from_str(&answer).unwrap();
        assert!(answer["error"]["message"].is_string(), "{body}");
    }
    assert_eq!(http("GET", &url, None).await.0, 405);
}
