//! Whole connections over an in-memory pipe, from the first frame on:
//! envelopes of every `f`, PRESENT, every event's `cnf`, fragments,
//! control frames and raw bytes, on a node with the memory backend.
//! Whatever a client sends, the node must answer without a panic and end
//! the connection once the client's side closes (a hang fails too).
//!
//! Input: byte 0 picks whether a valid PRESENT (as a user or an admin)
//! goes first; then each step is a header byte (its low 2 bits: a text
//! frame, a text message in two fragments, a control frame, or raw bytes),
//! a 2-byte length and that many bytes. A close (1000) ends every script.
#![no_main]

use gateway_node::config::Config;
use gateway_node::node::Node;
use libfuzzer_sys::fuzz_target;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SECRET: &str = "fuzz-secret-fuzz-secret-fuzz-secret!";

struct World {
    runtime: tokio::runtime::Runtime,
    node: Arc<Node>,
    user: Vec<u8>,
    admin: Vec<u8>,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let config = Config {
            rate_limit_count: 1_000_000,
            resume_window_s: 1,
            ..Config::default()
        };
        let node = runtime
            .block_on(gateway_node::build(config, SECRET))
            .expect("a valid configuration");
        let present = |admin| {
            let claims = gateway_shared::token::claims("fuzz", "fuzz", admin, 100 * 365 * 86400);
            let token = gateway_shared::token::mint(SECRET.as_bytes(), &claims);
            format!(r#"{{"f":110,"cnf":{{"token":"{token}"}}}}"#).into_bytes()
        };
        World {
            runtime,
            node,
            user: present(false),
            admin: present(true),
        }
    })
}

/// A client frame: masked, as RFC 6455 requires of clients.
fn frame(out: &mut Vec<u8>, b0: u8, payload: &[u8], mask: [u8; 4]) {
    out.push(b0);
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xFFFF => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
}

/// What the client writes, from the fuzzer's bytes.
fn script(world: &World, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let Some((&first, mut rest)) = data.split_first() else {
        return out;
    };
    let mask = [first, first.wrapping_mul(31), 0x5a, 0xc3];
    match first % 3 {
        0 => frame(&mut out, 0x81, &world.user, mask),
        1 => frame(&mut out, 0x81, &world.admin, mask),
        _ => {}
    }
    while rest.len() >= 3 {
        let header = rest[0];
        let len = (u16::from_le_bytes([rest[1], rest[2]]) as usize).min(rest.len() - 3);
        let body = &rest[3..3 + len];
        rest = &rest[3 + len..];
        match header & 3 {
            0 => frame(&mut out, 0x81, body, mask),
            1 => {
                let cut = (header as usize >> 2) % (body.len() + 1);
                frame(&mut out, 0x01, &body[..cut], mask);
                frame(&mut out, 0x80, &body[cut..], mask);
            }
            2 => {
                // Ping, pong or close (fin set), or any opcode with fin clear.
                let opcode = [0x89, 0x8A, 0x88, 0x09][(header as usize >> 2) % 4];
                frame(&mut out, opcode, &body[..body.len().min(125)], mask);
            }
            _ => out.extend_from_slice(body),
        }
    }
    // A normal close, so that the session ends rather than waiting out its
    // resume window among the next inputs' sessions (each new one would
    // dispatch to all of them). Inputs that closed otherwise leave theirs
    // resumable until the sweep below.
    frame(&mut out, 0x88, &1000u16.to_be_bytes(), mask);
    out
}

fuzz_target!(|data: &[u8]| {
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let world = world();
    let bytes = script(world, data);
    world.runtime.block_on(async {
        let (client, server) = tokio::io::duplex(8192);
        let (read, write) = tokio::io::split(server);
        let serving = tokio::spawn(gateway_node::connection::serve_stream(
            Arc::clone(&world.node),
            read,
            write,
        ));
        let (mut from_node, mut to_node) = tokio::io::split(client);
        let reading = tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            while matches!(from_node.read(&mut buf).await, Ok(n) if n > 0) {}
        });
        let _ = to_node.write_all(&bytes).await;
        let _ = to_node.shutdown().await;
        drop(to_node);
        tokio::time::timeout(Duration::from_secs(10), serving)
            .await
            .expect("the node ends a connection whose client has closed")
            .expect("no panic");
        let _ = reading.await;
        if RUNS.fetch_add(1, Ordering::Relaxed) % 64 == 0 {
            // Sessions left resumable end after the 1 s window.
            world.node.sweep_expired().await;
        }
    });
});
