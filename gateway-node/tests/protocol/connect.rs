//! HELLO, PRESENT, READY, heartbeats, HTTP routes.

use crate::harness::*;
use gateway_shared::protocol::{FunctionCode, Hello};
use gateway_shared::{Client, ClientError};

#[tokio::test]
async fn hello_announces_heartbeat_interval_and_payload_limit() {
    let node = TestNode::with(|c| c.hb_int_ms = 3000).await;
    for path in ["/gateway", "/", "/gateway?v=1"] {
        let url = format!("ws://{}{path}", node.addr);
        let (_client, hello) = Client::connect_hello(&url).await.unwrap();
        assert_eq!(
            hello,
            Hello {
                hb_int: 3000,
                max_payload: 4096
            }
        );
    }
}

#[tokio::test]
async fn other_protocol_versions_are_refused_with_http_400() {
    let node = TestNode::start().await;
    let err = Client::connect(&format!("ws://{}/gateway?v=2", node.addr))
        .await
        .err()
        .unwrap();
    assert!(matches!(err, ClientError::Refused(400)), "{err:?}");
}

#[tokio::test]
async fn a_plain_request_at_the_gateway_path_is_426() {
    let node = TestNode::start().await;
    for path in ["/gateway", "/gateway?v=1"] {
        let (status, body) = http_get(&node.http(path)).await;
        assert_eq!(status, 426, "{path}: {body}");
    }
}

#[tokio::test]
async fn present_answers_ready_with_a_new_session() {
    let node = TestNode::start().await;
    let (token, user_id) = user_token("alice");
    let (_client, ready) = Client::connect_present(&node.url(), &token).await.unwrap();
    assert_eq!(ready.v, 1);
    assert!(!ready.resumed);
    assert!(ready.session_id > 0 && ready.session_id < 1 << 53);
    assert_eq!(ready.user.id, user_id);
    assert_eq!(ready.user.name, "alice");
    assert!(!ready.user.admin);
    assert_eq!(ready.channel, "general");
    assert!(ready.channels.contains(&"general".to_owned()));
    use base64::Engine;
    let key = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(&ready.enc_key)
        .unwrap();
    assert_eq!(key.len(), 32);
}

#[tokio::test]
async fn heartbeats_are_answered_before_and_after_present() {
    let node = TestNode::start().await;
    let (mut client, _) = Client::connect_hello(&node.url()).await.unwrap();
    client.heartbeat().await.unwrap();
    assert_eq!(
        client.expect_f(FunctionCode::Heartbeat).await.unwrap().text,
        r#"{"f":120}"#
    );
    let (token, _) = user_token("bob");
    client.present(&token, None).await.unwrap();
    client.heartbeat().await.unwrap();
    client.expect_f(FunctionCode::Heartbeat).await.unwrap();
}

#[tokio::test]
async fn health_readiness_and_metrics_are_served() {
    let node = TestNode::start().await;
    let _peer = Peer::join(&node, "m").await;
    assert_eq!(http_get(&node.http("/healthz")).await.0, 200);
    assert_eq!(http_get(&node.http("/readyz")).await.0, 200);
    let (status, body) = http_get(&node.http("/metrics")).await;
    assert_eq!(status, 200);
    assert!(body.contains("gateway_connections"), "{body}");
    assert!(body.contains("gateway_sessions{"), "{body}");
    assert_eq!(http_get(&node.http("/nope")).await.0, 404);
}
