#![allow(dead_code)]
//! A TCP proxy that makes a link slow and lossy, as a wide-area or mobile
//! network is, for the fault tests. This kernel has no `netem`, so the
//! delay is made here.
//!
//! Each direction of each connection is delayed on its own: every chunk
//! read is written `latency ± jitter` later. Loss is modelled as TCP
//! shows it to the application: a lost segment is retransmitted, so no
//! byte is lost, but the chunk arrives a retransmission timeout late
//! (`rto`, Linux' minimum is 200 ms) and everything behind it waits too
//! (TCP delivers in order). A chunk is "lost" with probability `loss`. A
//! chunk may be several segments on a real link; counting it as one
//! makes loss per byte lower than `loss` for large writes, which is the
//! usual case only for bulk transfers, not for this traffic.
//!
//! [`DelayProxy::freeze`] makes every open connection a zombie, as a link
//! that died without a reset (a NAT that forgot the flow, a phone that
//! changed networks): nothing more is forwarded and nothing is closed.
//! New connections work.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// What the link does to each chunk, in each direction.
#[derive(Debug, Clone, Copy)]
pub struct Faults {
    pub latency: Duration,
    pub jitter: Duration,
    /// Probability that a chunk is retransmitted.
    pub loss: f64,
    pub rto: Duration,
}

impl Faults {
    /// 50 ± 20 ms each way, 1 % of chunks retransmitted after 200 ms.
    pub fn lossy_wan() -> Self {
        Self {
            latency: Duration::from_millis(50),
            jitter: Duration::from_millis(20),
            loss: 0.01,
            rto: Duration::from_millis(200),
        }
    }

    /// The delay of one chunk.
    fn delay(&self) -> Duration {
        let jitter = self.jitter.as_secs_f64() * (2.0 * rand::random::<f64>() - 1.0);
        let mut delay = (self.latency.as_secs_f64() + jitter).max(0.0);
        if rand::random::<f64>() < self.loss {
            delay += self.rto.as_secs_f64();
        }
        Duration::from_secs_f64(delay)
    }
}

/// A proxy on 127.0.0.1 to one upstream address; stops (and drops every
/// connection) on drop.
pub struct DelayProxy {
    pub addr: SocketAddr,
    /// Connections opened before this generation are frozen.
    generation: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl DelayProxy {
    pub async fn start(upstream: SocketAddr, faults: Faults) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let generation = Arc::new(AtomicU64::new(0));
        let task = {
            let generation = Arc::clone(&generation);
            tokio::spawn(async move {
                // Dropped with this task: every connection goes with it.
                let mut conns = JoinSet::new();
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        continue;
                    };
                    let born = generation.load(Ordering::Relaxed);
                    let generation = Arc::clone(&generation);
                    conns.spawn(async move {
                        let Ok(server) = TcpStream::connect(upstream).await else {
                            return;
                        };
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        let (cr, cw) = client.into_split();
                        let (sr, sw) = server.into_split();
                        let alive = move || generation.load(Ordering::Relaxed) == born;
                        tokio::join!(
                            pump(cr, sw, faults, alive.clone()),
                            pump(sr, cw, faults, alive),
                        );
                    });
                    while conns.try_join_next().is_some() {}
                }
            })
        };
        Self {
            addr,
            generation,
            task,
        }
    }

    /// Every connection open now stops forwarding, without closing.
    pub fn freeze(&self) {
        self.generation.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Forwards one direction with the link's delays, in order; once `alive`
/// turns false it holds both ends open and forwards nothing more.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    faults: Faults,
    alive: impl Fn() -> bool + Clone + Send + 'static,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader = {
        let alive = alive.clone();
        async move {
            let mut last_due = Instant::now();
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = match from.read(&mut buf).await {
                    Ok(0) | Err(_) => return from,
                    Ok(n) => n,
                };
                if !alive() {
                    std::future::pending::<()>().await;
                }
                // In order: a chunk never overtakes the one before it.
                let due = (Instant::now() + faults.delay()).max(last_due);
                last_due = due;
                if tx.send((due, buf[..n].to_vec())).is_err() {
                    return from;
                }
            }
        }
    };
    let writer = async move {
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if !alive() {
                std::future::pending::<()>().await;
            }
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
        // The sender closed its side: pass the close on, after the data.
        let _ = to.shutdown().await;
    };
    let (_from, ()) = tokio::join!(reader, writer);
}
