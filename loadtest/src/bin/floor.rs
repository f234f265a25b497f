//! `floor`: what delivering one dispatch frame to one loopback socket costs
//! with nothing but the write, the floor for the gateway's CPU per delivery
//! (docs/BENCHMARKS.md, "CPU per delivery against the floor").
//!
//! It opens `--sockets` loopback TCP connections (listener side: the
//! writer's, with the gateway's 64 KiB send buffer and TCP_NODELAY; client
//! side: the readers'), pre-builds one WebSocket text frame carrying the
//! MESSAGE_CREATE dispatch the gateway sends in `loadtest fanout` (same
//! fields, same lengths), and for each message writes that frame to every
//! socket with one `write` per socket: one delivery. Messages come at
//! `--rate` deliveries/s (`--rate 0`: as fast as the writer goes) for
//! `--duration-s`.
//!
//! Readers run in this process on a thread of their own (one tokio task
//! per socket, draining and counting bytes); only the writer's CPU is
//! counted, read from `/proc/self/task/TID/schedstat` of the writer
//! thread(s) at the first and after the last write. On loopback a write
//! also runs the receiver's TCP work in the writer's context, as it does
//! for the gateway's writes to the load clients.
//!
//! `--mode blocking`: one thread, blocking sockets, a plain write loop.
//! `--mode tokio`: one tokio task per socket woken per message (a
//! current-thread runtime, or `--threads N` workers), each writing the
//! frame with one `write`.
//!
//! Prints one JSON line; exits 1 if the readers did not get every byte.

use anyhow::{bail, ensure, Context as _, Result};
use clap::{Parser, ValueEnum};
use gateway_shared::protocol::{MessageCreate, User};
use serde::Serialize;
use std::io::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Mode {
    /// One thread, blocking writes.
    Blocking,
    /// One tokio task per socket.
    Tokio,
}

#[derive(Debug, Parser)]
#[command(
    name = "floor",
    about = "The cost of one pre-built dispatch frame per write() to N loopback sockets"
)]
struct Args {
    /// Loopback connections (one delivery per socket per message).
    #[arg(long, default_value_t = 2000)]
    sockets: usize,
    /// Deliveries per second over all sockets (0: as fast as possible).
    #[arg(long, default_value_t = 40_000.0)]
    rate: f64,
    /// How long to send.
    #[arg(long, default_value_t = 10.0)]
    duration_s: f64,
    #[arg(long, value_enum, default_value_t = Mode::Blocking)]
    mode: Mode,
    /// Runtime threads of `--mode tokio` (1: a current-thread runtime).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Message content length, as `loadtest fanout --content-bytes`.
    #[arg(long, default_value_t = 32)]
    content_bytes: usize,
    /// Pad or cut the content so that the whole frame has this many bytes
    /// (0: as the content length gives).
    #[arg(long, default_value_t = 0)]
    frame_bytes: usize,
    /// SO_SNDBUF of the writer's sockets, as the gateway's
    /// `--tcp-send-buffer` (0: the kernel's autotuning).
    #[arg(long, default_value_t = 65_536)]
    send_buffer: u32,
    /// Print the frame (escaped) on stderr and exit.
    #[arg(long)]
    show_frame: bool,
}

/// The report line.
#[derive(Debug, Serialize)]
struct Report {
    mode: Mode,
    threads: usize,
    sockets: usize,
    frame_bytes: usize,
    target_deliveries_per_s: f64,
    messages: u64,
    deliveries: u64,
    wall_s: f64,
    deliveries_per_s: f64,
    /// Writer thread(s), user + system, from schedstat (ns resolution).
    cpu_s: f64,
    /// The same split from /proc/…/stat (clock ticks).
    user_s: f64,
    sys_s: f64,
    us_per_delivery: f64,
    /// Most a message started after its scheduled time.
    max_late_ms: f64,
    received_bytes: u64,
    lossless: bool,
}

/// The sequence number in the frame (a session's `s` in a run: 4 digits).
const SEQ: u64 = 1234;

/// A MESSAGE_CREATE body of `loadtest fanout`, its ids, names, timestamps
/// and nonce as long as a run's, with `content` characters of content.
fn message_body(content: usize) -> MessageCreate {
    let run = "k3x9qa"; // loadtest's run id: 6 characters
    MessageCreate {
        id: "1764510000000001042".into(), // ms × 10^6 + node × 1000 + counter
        channel: format!("lt-{run}-0"),
        author: User {
            id: format!("lt-{run}-u1042"),
            name: "lt1042".into(),
        },
        content: "x".repeat(content),
        ts: 1_764_510_000_000,
        nonce: Some(format!("{run}.12.153.1764510000000123")),
    }
}

/// What the gateway writes for `body` as dispatch number SEQ:
/// `{"f":130,"s":SEQ,"t":"MESSAGE_CREATE","cnf":BODY}` in one unmasked
/// text frame (gateway-node/src/wire.rs, `Dispatch::encode`; the test
/// below holds the two equal).
fn frame_of(body: &MessageCreate) -> Vec<u8> {
    let mut payload = format!(r#"{{"f":130,"s":{SEQ},"t":"MESSAGE_CREATE","cnf":"#).into_bytes();
    payload.extend_from_slice(&serde_json::to_vec(body).expect("serializes"));
    payload.push(b'}');
    let mut frame = vec![0x81];
    match payload.len() {
        n if n < 126 => frame.push(n as u8),
        n if n <= usize::from(u16::MAX) => {
            frame.push(126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&payload);
    frame
}

/// The frame of a message with `content_bytes` of content, or padded to
/// exactly `frame_bytes` (when not 0).
fn dispatch_frame(content_bytes: usize, frame_bytes: usize) -> Result<Vec<u8>> {
    let build = |content: usize| frame_of(&message_body(content));
    if frame_bytes == 0 {
        return Ok(build(content_bytes));
    }
    // The frame grows by one byte per content byte, except where its
    // length header goes from 2 to 4 bytes (payload 126).
    let base = build(1).len() - 1;
    let mut content = frame_bytes.saturating_sub(base).max(1);
    // Bounded: around a header-length step no content length may fit.
    for _ in 0..1 << 16 {
        let frame = build(content);
        match frame.len().cmp(&frame_bytes) {
            std::cmp::Ordering::Equal => return Ok(frame),
            std::cmp::Ordering::Greater if content > 1 => content -= 1,
            std::cmp::Ordering::Less => content += 1,
            _ => break,
        }
    }
    bail!(
        "no frame of exactly {frame_bytes} bytes (the smallest is {})",
        base + 1
    )
}

/// This thread's id, from the /proc/thread-self link ("PID/task/TID").
fn thread_id() -> Result<String> {
    let link = std::fs::read_link("/proc/thread-self").context("reading /proc/thread-self")?;
    Ok(link
        .file_name()
        .context("/proc/thread-self")?
        .to_string_lossy()
        .into_owned())
}

/// CPU a thread used so far: (schedstat ns, utime ticks, stime ticks).
#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    ns: u64,
    utime: u64,
    stime: u64,
}

impl Cpu {
    /// What was used between `earlier` and this reading.
    fn since(&self, earlier: &Cpu) -> Cpu {
        Cpu {
            ns: self.ns - earlier.ns,
            utime: self.utime - earlier.utime,
            stime: self.stime - earlier.stime,
        }
    }

    fn of(tid: &str) -> Result<Self> {
        let sched = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))
            .context("reading schedstat")?;
        let ns = sched
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .context("parsing schedstat")?;
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat"))
            .context("reading stat")?;
        // Fields after the ")" that ends the command name: state is field
        // 3, utime 14 and stime 15.
        let rest = stat.rsplit_once(')').context("parsing stat")?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |n: usize| -> Result<u64> {
            fields
                .get(n - 3)
                .and_then(|v| v.parse().ok())
                .context("parsing stat")
        };
        Ok(Self {
            ns,
            utime: field(14)?,
            stime: field(15)?,
        })
    }

    fn sum(tids: &[String]) -> Result<Self> {
        let mut total = Self::default();
        for tid in tids {
            let c = Self::of(tid)?;
            total.ns += c.ns;
            total.utime += c.utime;
            total.stime += c.stime;
        }
        Ok(total)
    }
}

fn clock_ticks() -> f64 {
    // sysconf(_SC_CLK_TCK) needs libc; Linux has been 100 for decades
    // on every architecture this runs on, and `getconf CLK_TCK` says so.
    100.0
}

/// The connected pairs: (writer side, reader side).
fn connect(
    n: usize,
    send_buffer: u32,
) -> Result<(Vec<std::net::TcpStream>, Vec<std::net::TcpStream>)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4()?;
        if send_buffer > 0 {
            // Accepted sockets inherit the listener's buffer sizes.
            socket.set_send_buffer_size(send_buffer)?;
        }
        socket.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let listener = socket.listen(4096)?;
        let addr = listener.local_addr()?;
        let accept = tokio::spawn(async move {
            let mut out = Vec::with_capacity(n);
            while out.len() < n {
                let (s, _) = listener.accept().await?;
                s.set_nodelay(true)?;
                out.push(s);
            }
            anyhow::Ok(out)
        });
        let mut readers = Vec::with_capacity(n);
        // In batches, to stay within the listen backlog.
        for chunk in (0..n).collect::<Vec<_>>().chunks(512) {
            let conns = chunk
                .iter()
                .map(|_| tokio::spawn(tokio::net::TcpStream::connect(addr)));
            for c in conns.collect::<Vec<_>>() {
                readers.push(c.await??);
            }
        }
        let writers = accept.await??;
        // Pair order does not matter: every writer socket gets every
        // message, every reader drains whatever its socket carries.
        let writers = writers
            .into_iter()
            .map(|s| s.into_std())
            .collect::<std::io::Result<Vec<_>>>()?;
        let readers = readers
            .into_iter()
            .map(|s| s.into_std())
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok((writers, readers))
    })
}

/// Drains every reader socket on a thread of its own; the returned
/// counter has the bytes received so far.
fn start_readers(
    readers: Vec<std::net::TcpStream>,
    stop: Arc<AtomicBool>,
) -> (Arc<AtomicU64>, std::thread::JoinHandle<Result<()>>) {
    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    let handle = std::thread::Builder::new()
        .name("floor-readers".into())
        .spawn(move || -> Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let mut tasks = Vec::with_capacity(readers.len());
                for s in readers {
                    s.set_nonblocking(true)?;
                    let mut s = tokio::net::TcpStream::from_std(s)?;
                    let counter = counter.clone();
                    tasks.push(tokio::spawn(async move {
                        let mut buf = vec![0u8; 8192];
                        loop {
                            match s.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => {
                                    counter.fetch_add(n as u64, Ordering::Relaxed);
                                }
                            }
                        }
                    }));
                }
                while !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                for t in tasks {
                    t.abort();
                }
                anyhow::Ok(())
            })
        })
        .expect("spawning the reader thread");
    (received, handle)
}

/// The schedule: message k (from 0) is due at `start + k × interval`.
struct Schedule {
    interval: Option<Duration>,
    messages: Option<u64>,
    duration: Duration,
}

impl Schedule {
    fn new(args: &Args) -> Self {
        let duration = Duration::from_secs_f64(args.duration_s);
        if args.rate > 0.0 {
            let per_s = args.rate / args.sockets as f64;
            Self {
                interval: Some(Duration::from_secs_f64(1.0 / per_s)),
                messages: Some((args.duration_s * per_s).round().max(1.0) as u64),
                duration,
            }
        } else {
            Self {
                interval: None,
                messages: None,
                duration,
            }
        }
    }

    /// When message `k` is due, or None when the run is over.
    fn due(&self, start: Instant, k: u64) -> Option<Instant> {
        match (self.interval, self.messages) {
            (Some(i), Some(m)) => (k < m).then(|| start + i * k as u32),
            _ => (start.elapsed() < self.duration).then(Instant::now),
        }
    }
}

/// What one writer run did.
struct Written {
    messages: u64,
    wall: Duration,
    cpu: Cpu,
    max_late: Duration,
}

fn write_blocking(
    writers: Vec<std::net::TcpStream>,
    frame: &[u8],
    schedule: &Schedule,
) -> Result<Written> {
    let mut writers = writers;
    for s in &writers {
        s.set_nonblocking(false)?;
    }
    let tid = thread_id()?;
    let cpu0 = Cpu::of(&tid)?;
    let start = Instant::now();
    let mut k = 0;
    let mut max_late = Duration::ZERO;
    while let Some(at) = schedule.due(start, k) {
        let now = Instant::now();
        if at > now {
            std::thread::sleep(at - now);
        } else {
            max_late = max_late.max(now - at);
        }
        for s in &mut writers {
            // One write per delivery; a short write (never seen with a
            // 64 KiB buffer and a reader draining) finishes the frame.
            let n = s.write(frame)?;
            if n < frame.len() {
                s.write_all(&frame[n..])?;
            }
        }
        k += 1;
    }
    let wall = start.elapsed();
    let cpu1 = Cpu::of(&tid)?;
    Ok(Written {
        messages: k,
        wall,
        cpu: cpu1.since(&cpu0),
        max_late,
    })
}

fn write_tokio(
    writers: Vec<std::net::TcpStream>,
    frame: &[u8],
    schedule: &Schedule,
    threads: usize,
) -> Result<Written> {
    let tids = Arc::new(Mutex::new(Vec::<String>::new()));
    let rt = if threads <= 1 {
        tids.lock().unwrap().push(thread_id()?);
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        let t = tids.clone();
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .on_thread_start(move || {
                if let Ok(id) = thread_id() {
                    t.lock().unwrap().push(id);
                }
            })
            .build()?
    };
    let frame: Arc<[u8]> = frame.into();
    rt.block_on(async {
        // Let every worker thread start (and register) before counting.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (tx, rx) = tokio::sync::watch::channel(0u64);
        let sockets = writers.len() as u64;
        // Frames written so far; `progress` is told each time a message
        // has reached every socket.
        let completed = Arc::new(AtomicU64::new(0));
        let progress = Arc::new(tokio::sync::Notify::new());
        let mut tasks = Vec::with_capacity(writers.len());
        for s in writers {
            s.set_nonblocking(true)?;
            let mut s = tokio::net::TcpStream::from_std(s)?;
            let mut rx = rx.clone();
            let frame = frame.clone();
            let (completed, progress) = (completed.clone(), progress.clone());
            tasks.push(tokio::spawn(async move {
                let mut done = 0u64;
                loop {
                    let target = *rx.borrow_and_update();
                    while done < target {
                        s.write_all(&frame).await?;
                        done += 1;
                        if (completed.fetch_add(1, Ordering::AcqRel) + 1) % sockets == 0 {
                            progress.notify_one();
                        }
                    }
                    if rx.changed().await.is_err() {
                        return anyhow::Ok(done);
                    }
                }
            }));
        }
        drop(rx);
        let tids: Vec<String> = tids.lock().unwrap().clone();
        let cpu0 = Cpu::sum(&tids)?;
        let start = Instant::now();
        let mut k = 0;
        let mut max_late = Duration::ZERO;
        while let Some(at) = schedule.due(start, k) {
            let now = Instant::now();
            if at > now {
                tokio::time::sleep_until(at.into()).await;
            } else {
                max_late = max_late.max(now - at);
            }
            // At most two messages in flight: behind schedule (and at
            // --rate 0, where this is the pace) the writers set the pace.
            while completed.load(Ordering::Acquire) < k.saturating_sub(1) * sockets {
                progress.notified().await;
            }
            k += 1;
            tx.send_replace(k);
        }
        drop(tx);
        let mut total = 0;
        for t in tasks {
            total += t.await??;
        }
        let wall = start.elapsed();
        let cpu1 = Cpu::sum(&tids)?;
        ensure!(
            total == k * sockets,
            "the writers wrote {total} frames for {k} messages to {sockets} sockets"
        );
        Ok(Written {
            messages: k,
            wall,
            cpu: cpu1.since(&cpu0),
            max_late,
        })
    })
}

fn run(args: &Args) -> Result<bool> {
    ensure!(args.sockets > 0, "--sockets must be at least 1");
    ensure!(args.duration_s > 0.0, "--duration-s must be above 0");
    ensure!(args.rate >= 0.0, "--rate must be 0 or more");
    let frame = dispatch_frame(args.content_bytes, args.frame_bytes)?;
    if args.show_frame {
        eprintln!(
            "{} bytes: {}",
            frame.len(),
            String::from_utf8_lossy(&frame).escape_debug()
        );
        return Ok(true);
    }
    // Bounded whatever happens: setup, sending and draining get a minute
    // more than the sending itself.
    let limit = Duration::from_secs_f64(args.duration_s + 60.0);
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        eprintln!("floor: still running after {limit:?}; giving up");
        std::process::exit(3);
    });
    let (writers, readers) = connect(args.sockets, args.send_buffer)?;
    let stop = Arc::new(AtomicBool::new(false));
    let (received, reader_thread) = start_readers(readers, stop.clone());
    let schedule = Schedule::new(args);
    // The writer gets a thread of its own, so that its CPU is its alone.
    let w = {
        let frame = frame.clone();
        let (mode, threads) = (args.mode, args.threads);
        std::thread::Builder::new()
            .name("floor-writer".into())
            .spawn(move || match mode {
                Mode::Blocking => write_blocking(writers, &frame, &schedule),
                Mode::Tokio => write_tokio(writers, &frame, &schedule, threads),
            })?
            .join()
            .map_err(|_| anyhow::anyhow!("the writer thread panicked"))??
    };
    let deliveries = w.messages * args.sockets as u64;
    let expected = deliveries * frame.len() as u64;
    let deadline = Instant::now() + Duration::from_secs(10);
    while received.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::Relaxed);
    reader_thread
        .join()
        .map_err(|_| anyhow::anyhow!("the reader thread panicked"))??;
    let received = received.load(Ordering::Relaxed);
    let cpu_s = w.cpu.ns as f64 / 1e9;
    let report = Report {
        mode: args.mode,
        threads: if args.mode == Mode::Tokio {
            args.threads.max(1)
        } else {
            1
        },
        sockets: args.sockets,
        frame_bytes: frame.len(),
        target_deliveries_per_s: args.rate,
        messages: w.messages,
        deliveries,
        wall_s: w.wall.as_secs_f64(),
        deliveries_per_s: deliveries as f64 / w.wall.as_secs_f64(),
        cpu_s,
        user_s: w.cpu.utime as f64 / clock_ticks(),
        sys_s: w.cpu.stime as f64 / clock_ticks(),
        us_per_delivery: if deliveries > 0 {
            cpu_s / deliveries as f64 * 1e6
        } else {
            0.0
        },
        max_late_ms: w.max_late.as_secs_f64() * 1e3,
        received_bytes: received,
        lossless: received == expected,
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(report.lossless)
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("floor: the readers did not receive every byte written");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("floor: {e:#}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_node::wire::Dispatch;
    use gateway_shared::protocol::Event;

    #[test]
    fn the_frame_is_what_the_gateway_writes() {
        for content in [1, 32, 100, 2000] {
            let body = message_body(content);
            let mut buf = bytes::BytesMut::new();
            Dispatch::new(Event::MessageCreate, &body).encode(SEQ, &mut buf);
            assert_eq!(frame_of(&body), buf.to_vec(), "content {content}");
        }
    }

    #[test]
    fn frames_come_in_the_size_asked_for() {
        assert_eq!(dispatch_frame(32, 0).unwrap().len(), 257);
        for size in [226, 257, 300, 4000] {
            assert_eq!(dispatch_frame(32, size).unwrap().len(), size);
        }
        assert!(dispatch_frame(32, 178).is_err());
    }
}
