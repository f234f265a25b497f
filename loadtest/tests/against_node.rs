//! The load tester against a real node started in this process: `smoke`,
//! then `fanout` in-process and over two worker processes, then a short
//! `churn`. Every run must be clean: nothing lost, duplicated or out of
//! order. No timing thresholds: only counts are asserted.

use gateway_loadtest::driver::{self, Options};
use gateway_loadtest::plan::{ChurnPlan, Plan, Scenario};
use gateway_loadtest::report::Report;
use gateway_loadtest::smoke;
use gateway_node::config::Config;
use std::path::PathBuf;
use tokio::sync::oneshot;

const SECRET: &str = "loadtest-secret-loadtest-secret-!!";

/// Starts a node on port 0; it stops when the sender is dropped.
async fn start_node() -> (String, oneshot::Sender<()>) {
    start_node_with(Config::default()).await
}

async fn start_node_with(config: Config) -> (String, oneshot::Sender<()>) {
    let config = Config {
        // Publishers send faster than the default 120 per minute.
        rate_limit_count: 1_000_000,
        ..config
    };
    let node = gateway_node::build(config, SECRET)
        .await
        .expect("valid config");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(gateway_node::run(listener, node, async {
        let _ = rx.await;
    }));
    (format!("ws://{addr}/gateway"), tx)
}

fn fanout_plan(url: &str, run_id: &str) -> Plan {
    Plan {
        scenario: Scenario::Fanout,
        urls: vec![url.to_owned()],
        secret: SECRET.into(),
        issuer: None,
        audience: None,
        run_id: run_id.into(),
        clients: 20,
        ramp_per_s: 1000.0,
        connect_concurrency: 64,
        setup_timeout_s: 10.0,
        hold_s: 0.0,
        channels: 2,
        publishers: 2,
        rate: 50.0,
        duration_s: 2.0,
        drain_s: 5.0,
        content_bytes: 16,
        churn: None,
        workers: 1,
        threads: 1,
        max_run_s: 60.0,
        redis: Vec::new(),
        source_ips: Vec::new(),
        fanout_at_end: false,
        history: 0,
    }
}

fn assert_clean(report: &Report) {
    let json = serde_json::to_string_pretty(report).unwrap();
    assert_eq!(report.connect.failed, 0, "{json}");
    assert_eq!(report.connect.ok, report.clients, "{json}");
    assert!(report.sent > 0, "{json}");
    assert_eq!(report.lost, 0, "{json}");
    assert_eq!(report.duplicated, 0, "{json}");
    assert_eq!(report.out_of_order, 0, "{json}");
    assert_eq!(report.delivered, report.expected, "{json}");
    assert_eq!(report.rate_limited, 0, "{json}");
    assert!(report.violations.is_empty(), "{json}");
    assert_eq!(report.latency_ms.count, report.delivered, "{json}");
}

/// A cluster that requires an issuer and an audience: smoke and the
/// scenarios mint tokens with them when told, and are refused without.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_carry_the_issuer_and_audience_a_cluster_requires() {
    let (url, _stop) = start_node_with(Config {
        jwt_issuer: Some("https://auth.example".into()),
        jwt_audience: Some("chat".into()),
        ..Config::default()
    })
    .await;
    let urls = std::slice::from_ref(&url);
    let refused = smoke::run(urls, SECRET.into(), |_| {}).await;
    assert!(!refused.passed, "tokens without iss and aud were accepted");
    let minter = smoke::Minter {
        secret: SECRET,
        issuer: Some("https://auth.example"),
        audience: Some("chat"),
    };
    let report = smoke::run(urls, minter, |_| {}).await;
    assert!(report.passed, "{:#?}", report.checks);
    let plan = Plan {
        issuer: Some("https://auth.example".into()),
        audience: Some("chat".into()),
        ..fanout_plan(&url, "itiss1")
    };
    let report = driver::run(plan, &Options::default()).await.unwrap();
    assert_eq!(report.connect.failed, 0);
    assert_eq!(report.delivered, report.expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke_fanout_and_churn_run_clean_against_a_real_node() {
    let (url, _stop) = start_node().await;

    // smoke: every step passes.
    let report = smoke::run(std::slice::from_ref(&url), SECRET.into(), |_| {}).await;
    assert!(report.passed, "{:#?}", report.checks);
    assert!(report.checks.len() >= 9, "{:#?}", report.checks);

    // fanout in this process: 20 members in 2 channels, 2 publishers, 50
    // messages/s for 2 s: 100 messages, each to the 10 members of its
    // channel.
    let opts = Options::default();
    let report = driver::run(fanout_plan(&url, "itfan1"), &opts)
        .await
        .unwrap();
    assert_clean(&report);
    assert_eq!(report.sent, 100);
    assert_eq!(report.expected, 1000);

    // The same over two worker processes (this crate's binary): members,
    // publishers and channels split across processes, reports merged.
    let mut plan = fanout_plan(&url, "itfan2");
    plan.workers = 2;
    plan.duration_s = 1.0;
    let opts = Options {
        progress: false,
        worker_exe: Some(PathBuf::from(env!("CARGO_BIN_EXE_loadtest"))),
    };
    let report = driver::run(plan, &opts).await.unwrap();
    assert_clean(&report);
    assert_eq!(report.expected, 500);

    // churn: members drop their connections and resume while messages
    // flow; the replay must leave no gap and no duplicate.
    let mut plan = fanout_plan(&url, "itchurn");
    plan.scenario = Scenario::Churn;
    plan.duration_s = 1.5;
    plan.churn = Some(ChurnPlan {
        drops_per_s: 20.0,
        down_ms_max: 100,
    });
    let report = driver::run(plan, &Options::default()).await.unwrap();
    assert_clean(&report);
    assert!(report.resumes > 0, "{report:#?}");
    assert_eq!(report.resumed_false, 0);
    assert_eq!(report.resume_failed, 0);
}

/// `connect --fanout-at-end` from two source addresses: every session
/// heartbeats during the hold (timed), then one message reaches all of
/// them in the default channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_from_source_ips_holds_heartbeats_and_fans_out_once() {
    let (url, _stop) = start_node_with(Config {
        hb_int_ms: 200,
        ..Config::default()
    })
    .await;
    let mut plan = fanout_plan(&url, "itconn1");
    plan.scenario = Scenario::Connect;
    plan.channels = 0;
    plan.publishers = 1;
    plan.rate = 1.0;
    plan.duration_s = 1.0;
    plan.hold_s = 1.0;
    plan.fanout_at_end = true;
    plan.source_ips = vec!["127.0.0.2".parse().unwrap(), "127.0.0.3".parse().unwrap()];
    let report = driver::run(plan, &Options::default()).await.unwrap();
    assert_clean(&report);
    assert_eq!(report.sent, 1);
    assert_eq!(report.expected, 20);
    assert!(report.heartbeat_latency_ms.count > 0, "{report:#?}");
    assert!(report.heartbeat_latency_ms.count <= report.heartbeat_acks);
}

#[tokio::test]
async fn connect_with_history_sends_the_messages_before_the_clients_come() {
    let (url, _stop) = start_node().await;
    let mut plan = fanout_plan(&url, "ithist1");
    plan.scenario = Scenario::Connect;
    plan.channels = 1;
    plan.hold_s = 0.5;
    plan.history = 3;
    let report = driver::run(plan.clone(), &Options::default())
        .await
        .unwrap();
    assert_eq!(report.connect.failed, 0, "{report:#?}");
    assert_eq!(report.connect.ok, 20, "{report:#?}");
    // The channel's snapshot holds them.
    let token = gateway_shared::token::mint(
        SECRET.as_bytes(),
        &gateway_shared::token::claims("reader", "reader", false, 60),
    );
    let (mut client, _) = gateway_shared::Client::connect_present(&url, &token)
        .await
        .unwrap();
    client
        .execute(
            "CHANNEL_MOVE",
            serde_json::json!({"channel": plan.channel_name(0)}),
            None,
        )
        .await
        .unwrap();
    let moved = loop {
        let msg = client
            .next_message(std::time::Duration::from_secs(10))
            .await
            .unwrap();
        if msg.is_dispatch(gateway_shared::protocol::Event::ChannelMove) {
            break msg.cnf;
        }
    };
    let history: Vec<&str> = moved["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(history, ["history 0", "history 1", "history 2"]);
}
