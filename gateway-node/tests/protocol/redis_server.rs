//! A real `redis-server` on a free port in a temporary directory, stopped
//! on drop; and a real Redis Cluster of six of them (3 masters, 3 replicas).
//! Tests never touch a Redis they did not start.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// With `start_tls`: the TLS port (beside the plain one, for admin).
    tls_port: Option<u16>,
}

static DIRS: AtomicU64 = AtomicU64::new(0);

/// A fresh, empty directory under the system temp dir, unique to this
/// process and call.
pub fn temp_dir(kind: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "gateway-{kind}-{}-{}",
        std::process::id(),
        DIRS.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Ports of the cluster nodes tests killed, and their bus ports: never
/// handed out again by this process. A killed master's replicas keep
/// reconnecting to its address until the failover; one that reached
/// another test's server there would copy that server's data set (empty)
/// and be promoted with it (seen once: a key written with `WAIT 1` was
/// gone from the promoted replica).
static RETIRED: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());

fn retired(port: u16) -> bool {
    RETIRED.lock().unwrap().contains(&port)
}

pub fn free_port() -> u16 {
    // Held until one is chosen, so that the next bind gets another port.
    let mut held = Vec::new();
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        if !retired(port) {
            return port;
        }
        held.push(listener);
    }
}

/// Starts `redis-server` on 127.0.0.1:`port` with `dir` as its working
/// directory, without RDB snapshots, plus `extra` arguments, and waits for
/// its "Ready to accept connections". An error (with the end of its log) if
/// it exits first, e.g. because the port was taken meanwhile.
fn spawn_redis(port: u16, dir: &Path, extra: &[&str]) -> Result<Child, String> {
    spawn_redis_with(Command::new("redis-server"), port, dir, extra)
}

/// [`spawn_redis`] with `command` as the program (`redis-server`, or
/// `ip netns exec NS redis-server` to start it in a network namespace).
pub fn spawn_redis_with(
    mut command: Command,
    port: u16,
    dir: &Path,
    extra: &[&str],
) -> Result<Child, String> {
    let mut child = command
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
        ])
        .args(extra)
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start redis-server ({e}): install it, e.g. `apt-get install redis-server`"
            )
        });
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut log = Vec::new();
    loop {
        match lines.next() {
            Some(Ok(line)) if line.contains("Ready to accept connections") => break,
            Some(Ok(line)) => log.push(line),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                let tail = log[log.len().saturating_sub(5)..].join("\n");
                return Err(format!(
                    "redis-server on port {port} exited before it was ready:\n{tail}"
                ));
            }
        }
    }
    // Keep draining its output so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Ok(child)
}

/// Makes, in `dir`, a CA (`ca.crt`) and a certificate for 127.0.0.1
/// signed by it (`redis.crt`, `redis.key`), with openssl.
fn make_certs(dir: &Path) {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap_or_else(|e| panic!("cannot run openssl ({e})"));
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "1",
                "-subj",
                "/CN=gateway test CA",
            ],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                "redis.key",
                "-out",
                "redis.csr",
                "-subj",
                "/CN=127.0.0.1",
            ],
        ]
        .concat(),
    );
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "redis.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "redis.crt",
        "-days",
        "1",
        "-extfile",
        "san.ext",
    ]);
}

/// The TLS flags of a server whose certificates `make_certs` made in
/// `dir`, listening with TLS on `tls_port`.
fn tls_args(dir: &Path, tls_port: u16) -> Vec<String> {
    let file = |name: &str| dir.join(name).display().to_string();
    vec![
        "--tls-port".into(),
        tls_port.to_string(),
        "--tls-cert-file".into(),
        file("redis.crt"),
        "--tls-key-file".into(),
        file("redis.key"),
        "--tls-ca-cert-file".into(),
        file("ca.crt"),
        "--tls-auth-clients".into(),
        "no".into(),
    ]
}

/// Ports that speak only TLS, with the CA that signed their certificate:
/// admin calls to them add `--tls --cacert`.
static TLS_ONLY: std::sync::Mutex<Vec<(u16, PathBuf)>> = std::sync::Mutex::new(Vec::new());

fn tls_ca_of(port: u16) -> Option<PathBuf> {
    let ports = TLS_ONLY.lock().unwrap();
    ports
        .iter()
        .find(|(p, _)| *p == port)
        .map(|(_, ca)| ca.clone())
}

impl RedisServer {
    pub fn start() -> Self {
        let dir = temp_dir("redis");
        let mut server = Self {
            port: free_port(),
            dir,
            child: None,
            tls_port: None,
        };
        server.spawn();
        server
    }

    /// A server that also listens with TLS, its certificate (for
    /// 127.0.0.1) signed by a CA made for it (`ca_file`).
    pub fn start_tls() -> Self {
        let dir = temp_dir("redis-tls");
        make_certs(&dir);
        let mut server = Self {
            port: free_port(),
            dir,
            child: None,
            tls_port: Some(free_port()),
        };
        server.spawn();
        server
    }

    /// `rediss://` URL of a server started with `start_tls`.
    pub fn tls_url(&self) -> String {
        format!(
            "rediss://127.0.0.1:{}/",
            self.tls_port.expect("started with TLS")
        )
    }

    /// The CA that signed the certificate of a `start_tls` server.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// `unix://` URL of the server's Unix socket (every server has one).
    pub fn unix_url(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("redis.sock")
    }

    /// Starts the process and waits for its "Ready to accept connections".
    fn spawn(&mut self) {
        // Data survives a restart, as with any production Redis.
        let mut args: Vec<String> = ["--appendonly", "yes", "--appendfsync", "always"]
            .map(String::from)
            .to_vec();
        args.extend([
            "--unixsocket".to_owned(),
            self.socket().display().to_string(),
            "--unixsocketperm".to_owned(),
            "700".to_owned(),
        ]);
        if let Some(tls_port) = self.tls_port {
            args.extend(tls_args(&self.dir, tls_port));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let child = spawn_redis(self.port, &self.dir, &args).unwrap_or_else(|e| panic!("{e}"));
        self.child = Some(child);
    }

    /// Stops the process (SIGKILL) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port with the same data.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Starts it again on the same port with no data, as a Redis without
    /// persistence comes back.
    pub fn restart_empty(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
        std::fs::create_dir_all(&self.dir).unwrap();
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster of three masters and three replicas on 127.0.0.1, each
/// node its own `redis-server` in its own temporary directory; every process
/// is killed and every directory removed on drop. Admin calls go through
/// `redis-cli`, so the harness needs no client of its own.
pub struct RedisCluster {
    nodes: Vec<ClusterNode>,
    /// What `kill` saw of a master just before killing it.
    killed: HashMap<u16, Killed>,
    /// With `start_tls`: the directory of the certificates; every node then
    /// speaks only TLS, to clients, replicas and the cluster bus.
    tls: Option<PathBuf>,
}

struct ClusterNode {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// Stopped with SIGSTOP (`freeze`): it accepts connections but never
    /// answers, so the harness does not ask it anything.
    frozen: bool,
}

struct Killed {
    id: String,
    replicas: Vec<u16>,
}

/// One line of CLUSTER NODES, as seen by the node asked.
struct NodeLine {
    id: String,
    port: u16,
    flags: Vec<String>,
    master_id: Option<String>,
    /// Inclusive slot ranges it serves (importing/migrating markers left out).
    slots: Vec<(u16, u16)>,
}

impl NodeLine {
    fn has_flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }

    fn serves(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(a, b)| (a..=b).contains(&slot))
    }
}

const CLUSTER_NODE_ARGS: [&str; 10] = [
    "--cluster-enabled",
    "yes",
    "--cluster-config-file",
    "nodes.conf",
    "--cluster-node-timeout",
    "2000",
    "--appendonly",
    "no",
    // Replicas sync at once instead of after the default 5 s wait for
    // more replicas to join the same diskless transfer.
    "--repl-diskless-sync-delay",
    "0",
];
const BUS_PORT_OFFSET: u16 = 10_000;
const START_DEADLINE: Duration = Duration::from_secs(30);
const FAILOVER_DEADLINE: Duration = Duration::from_secs(30);

/// `n` distinct free ports for cluster nodes: each below 55536 with its bus
/// port (port + 10000) free too, and none equal to a `taken` port or bus
/// port. Every socket stays bound until the `n` are chosen, so they differ.
fn free_cluster_ports(n: usize, taken: &[u16]) -> Vec<u16> {
    let clashes = |p: u16| {
        taken
            .iter()
            .any(|&t| p == t || p == t + BUS_PORT_OFFSET || p + BUS_PORT_OFFSET == t)
    };
    let mut held = Vec::new();
    let mut ports = Vec::new();
    for _ in 0..10_000 {
        if ports.len() == n {
            return ports;
        }
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        held.push(listener);
        if port > u16::MAX - BUS_PORT_OFFSET
            || clashes(port)
            || retired(port)
            || retired(port + BUS_PORT_OFFSET)
        {
            continue;
        }
        if let Ok(bus) = TcpListener::bind(("127.0.0.1", port + BUS_PORT_OFFSET)) {
            held.push(bus);
            ports.push(port);
        }
    }
    panic!(
        "found only {} of {n} free ports below 55536 with a free bus port",
        ports.len()
    );
}

/// Runs `redis-cli -e -h 127.0.0.1 -p <port> <args>`: its output, or `None`
/// if it fails (the node is down, or the reply is an error: `-e`).
fn try_redis_cli(port: u16, args: &[&str]) -> Option<String> {
    let mut cli = Command::new("redis-cli");
    if let Some(ca) = tls_ca_of(port) {
        cli.arg("--tls").arg("--cacert").arg(ca);
    }
    let out = cli
        .args(["-e", "-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run redis-cli ({e}): install it, e.g. `apt-get install redis-tools`")
        });
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    out.status.success().then_some(text)
}

/// Runs `redis-cli -e -h 127.0.0.1 -p <port> <args>` and returns its output,
/// trimmed; panics if it fails.
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    match try_redis_cli(port, args) {
        Some(text) => text.trim().to_string(),
        None => panic!("redis-cli -p {port} {} failed", args.join(" ")),
    }
}

fn has_line(text: &str, line: &str) -> bool {
    text.lines().any(|l| l.trim() == line)
}

/// Calls `check` until it returns `Ok`, for at most `deadline`; panics with
/// `what` and the last reason `check` gave.
fn wait_until<T>(
    deadline: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let end = Instant::now() + deadline;
    loop {
        match check() {
            Ok(value) => return value,
            Err(why) if Instant::now() >= end => {
                panic!("{what}: not done within {deadline:?}; last seen: {why}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn parse_cluster_nodes(text: &str) -> Vec<NodeLine> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 8 {
                return None;
            }
            // ip:port@cport[,hostname]
            let addr = fields[1].split('@').next().unwrap();
            let port = addr.rsplit(':').next().unwrap().parse().ok()?;
            let slots = fields[8..]
                .iter()
                .filter(|s| !s.starts_with('['))
                .map(|s| match s.split_once('-') {
                    Some((a, b)) => (a.parse().unwrap(), b.parse().unwrap()),
                    None => (s.parse().unwrap(), s.parse().unwrap()),
                })
                .collect();
            Some(NodeLine {
                id: fields[0].to_string(),
                port,
                flags: fields[2].split(',').map(str::to_string).collect(),
                master_id: (fields[3] != "-").then(|| fields[3].to_string()),
                slots,
            })
        })
        .collect()
}

impl RedisCluster {
    /// Starts six nodes, joins them with `redis-cli --cluster create
    /// --cluster-replicas 1`, and waits until every node reports
    /// `cluster_state:ok` with all 16384 slots ok, sees the same 3 masters
    /// serving slots and 3 replicas, and every replica's link to its master
    /// is up.
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// The same cluster with TLS only (`rediss://` seeds), its certificates
    /// signed by a CA made for it (`ca_file`).
    pub fn start_tls() -> Self {
        let dir = temp_dir("redis-cluster-tls");
        make_certs(&dir);
        Self::start_with(Some(dir))
    }

    fn start_with(tls: Option<PathBuf>) -> Self {
        let mut cluster = Self {
            nodes: Vec::new(),
            killed: HashMap::new(),
            tls,
        };
        for port in free_cluster_ports(6, &[]) {
            cluster.spawn_node(port);
        }
        let mut create = Command::new("redis-cli");
        if let Some(dir) = &cluster.tls {
            create.arg("--tls").arg("--cacert").arg(dir.join("ca.crt"));
        }
        create.args(["--cluster", "create"]);
        for node in &cluster.nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        let out = create
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run redis-cli ({e}): install it, e.g. `apt-get install redis-tools`")
            });
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || !stdout.contains("All 16384 slots covered") {
            panic!(
                "redis-cli --cluster create failed:\n{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        wait_until(START_DEADLINE, "redis cluster start", || {
            cluster.check_ready()
        });
        cluster
    }

    /// Comma-separated `redis://127.0.0.1:P` of the current masters: the
    /// seed list `GATEWAY_REDIS_URL` takes in cluster mode.
    pub fn seed_urls(&self) -> String {
        self.masters()
            .iter()
            .map(|p| {
                let scheme = if self.tls.is_some() {
                    "rediss"
                } else {
                    "redis"
                };
                format!("{scheme}://127.0.0.1:{p}")
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The CA of a `start_tls` cluster.
    pub fn ca_file(&self) -> PathBuf {
        self.tls.as_ref().expect("started with TLS").join("ca.crt")
    }

    /// Ports of the masters that are running and not flagged as failing,
    /// sorted, as CLUSTER NODES of a running node has them.
    pub fn masters(&self) -> Vec<u16> {
        let mut masters: Vec<u16> = self
            .nodes_view()
            .into_iter()
            .filter(|n| n.has_flag("master") && !n.has_flag("fail") && !n.has_flag("fail?"))
            .map(|n| n.port)
            .filter(|&p| self.is_running(p))
            .collect();
        masters.sort_unstable();
        masters
    }

    /// The port of the master that serves `key`'s slot in the cluster's
    /// configuration (until a failover completes, that may be a dead node).
    pub fn master_for_key(&self, key: &str) -> u16 {
        let slot = self.slot(key);
        self.nodes_view()
            .into_iter()
            .find(|n| n.has_flag("master") && n.serves(slot))
            .unwrap_or_else(|| panic!("no master serves slot {slot} of {key:?}"))
            .port
    }

    /// The slot of `key`.
    pub fn slot(&self, key: &str) -> u16 {
        redis_cli(self.any_running(), &["CLUSTER", "KEYSLOT", key])
            .parse()
            .unwrap()
    }

    /// Gives the slot of `key`, which must hold no key yet, to another
    /// master (`CLUSTER SETSLOT … NODE` on every master): a client that
    /// knew the old owner is redirected with MOVED there.
    pub fn move_empty_slot(&self, key: &str) {
        let owner = self.master_for_key(key);
        let slot = self.slot(key).to_string();
        let view = self.nodes_view();
        let target = view
            .iter()
            .find(|n| n.has_flag("master") && n.port != owner && !n.slots.is_empty())
            .unwrap_or_else(|| panic!("no other master than :{owner}"));
        // The new owner first, then the old one: never two owners at once.
        let rest = self
            .masters()
            .into_iter()
            .filter(|&p| p != target.port && p != owner);
        let order: Vec<u16> = [target.port, owner].into_iter().chain(rest).collect();
        for port in order {
            let out = redis_cli(port, &["CLUSTER", "SETSLOT", &slot, "NODE", &target.id]);
            assert_eq!(
                out, "OK",
                ":{port} CLUSTER SETSLOT {slot} NODE {}",
                target.id
            );
        }
    }

    /// How many slots the node on `port` serves.
    pub fn slots_served(&self, port: u16) -> usize {
        self.nodes_view()
            .into_iter()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no node :{port} in the cluster"))
            .slots
            .iter()
            .map(|&(a, b)| usize::from(b - a) + 1)
            .sum()
    }

    /// Kills the node on `port` with SIGKILL, remembering its replicas for
    /// `wait_failover`.
    pub fn kill(&mut self, port: u16) {
        let view = self.nodes_view();
        let me = view
            .iter()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no node :{port} in the cluster"));
        let replicas = view
            .iter()
            .filter(|n| n.master_id.as_deref() == Some(me.id.as_str()))
            .map(|n| n.port)
            .collect();
        let id = me.id.clone();
        let node = self.nodes.iter_mut().find(|n| n.port == port).unwrap();
        let mut child = node
            .child
            .take()
            .unwrap_or_else(|| panic!("node :{port} is not running"));
        let _ = child.kill();
        let _ = child.wait();
        RETIRED
            .lock()
            .unwrap()
            .extend([port, port + BUS_PORT_OFFSET]);
        self.killed.insert(port, Killed { id, replicas });
    }

    /// Ports of the replicas of the master on `port`, as a running node
    /// sees them.
    pub fn replicas_of(&self, port: u16) -> Vec<u16> {
        let view = self.nodes_view();
        let me = view
            .iter()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no node :{port} in the cluster"));
        view.iter()
            .filter(|n| n.master_id.as_deref() == Some(me.id.as_str()))
            .map(|n| n.port)
            .collect()
    }

    /// Stops the node on `port` with SIGSTOP: it keeps its port, the
    /// kernel still accepts connections for it, and it never answers (a
    /// frozen machine or a network blackhole). Drop kills it as any other.
    pub fn freeze(&mut self, port: u16) {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port == port && n.child.is_some())
            .unwrap_or_else(|| panic!("node :{port} is not running"));
        let pid = node.child.as_ref().unwrap().id().to_string();
        let status = Command::new("kill")
            .args(["-STOP", &pid])
            .status()
            .unwrap_or_else(|e| panic!("cannot run kill ({e})"));
        assert!(status.success(), "kill -STOP {pid} (:{port}) failed");
        node.frozen = true;
    }

    /// Waits until every running node flags each of `ports` as failed
    /// (`fail` in CLUSTER NODES): the cluster has given them up.
    pub fn wait_failed(&self, ports: &[u16]) {
        let what = format!("nodes {ports:?} flagged as failed");
        wait_until(FAILOVER_DEADLINE, &what, || {
            for port in self.running() {
                let view = parse_cluster_nodes(
                    &try_redis_cli(port, &["CLUSTER", "NODES"])
                        .ok_or(format!(":{port} is down"))?,
                );
                for &p in ports {
                    if !view.iter().any(|n| n.port == p && n.has_flag("fail")) {
                        return Err(format!(":{port} does not flag :{p} as failed yet"));
                    }
                }
            }
            Ok(())
        })
    }

    /// Waits until a former replica of the master killed on `old_master`
    /// reports `role:master`, serves all that master's slots in every
    /// running node's view, and every running node reports `cluster_state:ok`
    /// with all 16384 slots ok. Returns the new master's port.
    pub fn wait_failover(&self, old_master: u16) -> u16 {
        let killed = self
            .killed
            .get(&old_master)
            .unwrap_or_else(|| panic!("wait_failover(:{old_master}): kill it first"));
        assert!(
            !killed.replicas.is_empty(),
            ":{old_master} had no replica to fail over to"
        );
        let what = format!("failover of master :{old_master}");
        wait_until(FAILOVER_DEADLINE, &what, || {
            let promoted = killed
                .replicas
                .iter()
                .copied()
                .filter(|&p| self.is_running(p))
                .find(|&p| {
                    try_redis_cli(p, &["INFO", "replication"])
                        .is_some_and(|info| has_line(&info, "role:master"))
                })
                .ok_or_else(|| {
                    format!("no former replica {:?} is a master yet", killed.replicas)
                })?;
            for port in self.running() {
                Self::check_cluster_ok(port)?;
                let view = parse_cluster_nodes(
                    &try_redis_cli(port, &["CLUSTER", "NODES"])
                        .ok_or(format!(":{port} is down"))?,
                );
                if view
                    .iter()
                    .any(|n| n.id == killed.id && !n.slots.is_empty())
                {
                    return Err(format!(":{port} still has :{old_master} serving slots"));
                }
                if !view
                    .iter()
                    .any(|n| n.port == promoted && n.has_flag("master"))
                {
                    return Err(format!(":{port} does not see :{promoted} as a master yet"));
                }
            }
            Ok(promoted)
        })
    }

    /// Starts a node on `port` (or on another free one if `port` was taken
    /// meanwhile) in a temporary directory of its own.
    fn spawn_node(&mut self, port: u16) {
        // Registered first, so that drop removes the directory whatever happens.
        self.nodes.push(ClusterNode {
            port,
            dir: temp_dir("redis-cluster"),
            child: None,
            frozen: false,
        });
        let mut port = port;
        for attempt in 1.. {
            let dir = self.nodes.last().unwrap().dir.clone();
            let mut args: Vec<String> = CLUSTER_NODE_ARGS.map(String::from).to_vec();
            if let Some(certs) = &self.tls {
                // TLS only: the plain port is off, the bus and replication too.
                args.extend(["--port".into(), "0".into()]);
                args.extend(tls_args(certs, port));
                args.extend(["--tls-cluster", "yes", "--tls-replication", "yes"].map(String::from));
                TLS_ONLY.lock().unwrap().push((port, certs.join("ca.crt")));
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            match spawn_redis(port, &dir, &args) {
                Ok(child) => {
                    let node = self.nodes.last_mut().unwrap();
                    node.port = port;
                    node.child = Some(child);
                    return;
                }
                Err(e) if attempt >= 5 => panic!("{e}"),
                Err(_) => {
                    // Taken between choosing and binding: start afresh elsewhere.
                    std::fs::remove_dir_all(&dir).unwrap();
                    std::fs::create_dir_all(&dir).unwrap();
                    let mut taken: Vec<u16> = self.nodes.iter().map(|n| n.port).collect();
                    taken.push(port);
                    port = free_cluster_ports(1, &taken)[0];
                }
            }
        }
    }

    fn is_running(&self, port: u16) -> bool {
        self.nodes
            .iter()
            .any(|n| n.port == port && n.child.is_some() && !n.frozen)
    }

    /// Ports of the nodes still running (and not frozen), masters and
    /// replicas.
    pub fn running(&self) -> impl Iterator<Item = u16> + '_ {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some() && !n.frozen)
            .map(|n| n.port)
    }

    fn any_running(&self) -> u16 {
        self.running()
            .next()
            .expect("every node of the cluster is dead")
    }

    /// CLUSTER NODES as a running node sees it.
    fn nodes_view(&self) -> Vec<NodeLine> {
        parse_cluster_nodes(&redis_cli(self.any_running(), &["CLUSTER", "NODES"]))
    }

    /// CLUSTER INFO of the node on `port` if it reports `cluster_state:ok`
    /// with all 16384 slots ok.
    fn check_cluster_ok(port: u16) -> Result<String, String> {
        let info = try_redis_cli(port, &["CLUSTER", "INFO"]).ok_or(format!(":{port} is down"))?;
        for want in ["cluster_state:ok", "cluster_slots_ok:16384"] {
            if !has_line(&info, want) {
                return Err(format!(":{port} does not report {want}"));
            }
        }
        Ok(info)
    }

    fn check_ready(&self) -> Result<(), String> {
        let (mut masters, mut replicas) = (0, 0);
        for port in self.running() {
            let info = Self::check_cluster_ok(port)?;
            if !has_line(&info, "cluster_known_nodes:6") {
                return Err(format!(":{port} does not know all six nodes yet"));
            }
            let repl =
                try_redis_cli(port, &["INFO", "replication"]).ok_or(format!(":{port} is down"))?;
            // Roles reach the other nodes by gossip, after `--cluster create`
            // has returned: wait until every node's view has them.
            let view = parse_cluster_nodes(
                &try_redis_cli(port, &["CLUSTER", "NODES"]).ok_or(format!(":{port} is down"))?,
            );
            let healthy = |n: &&NodeLine| {
                !["fail", "fail?", "handshake", "noaddr"]
                    .iter()
                    .any(|f| n.has_flag(f))
            };
            let seen_masters = view
                .iter()
                .filter(healthy)
                .filter(|n| n.has_flag("master") && !n.slots.is_empty())
                .count();
            let seen_replicas = view
                .iter()
                .filter(healthy)
                .filter(|n| n.has_flag("slave"))
                .count();
            if (seen_masters, seen_replicas) != (3, 3) {
                return Err(format!(
                    ":{port} sees {seen_masters} masters with slots and {seen_replicas} replicas"
                ));
            }
            if has_line(&repl, "role:master") {
                masters += 1;
            } else if has_line(&repl, "master_link_status:up") {
                replicas += 1;
            } else {
                return Err(format!(
                    ":{port} is a replica whose link to its master is not up"
                ));
            }
        }
        if (masters, replicas) != (3, 3) {
            return Err(format!("{masters} masters and {replicas} linked replicas"));
        }
        Ok(())
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            let _ = std::fs::remove_dir_all(&node.dir);
        }
        if let Some(dir) = self.tls.take() {
            // The ports may serve a plain server of another test next.
            let ports: Vec<u16> = self.nodes.iter().map(|n| n.port).collect();
            TLS_ONLY.lock().unwrap().retain(|(p, _)| !ports.contains(p));
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
