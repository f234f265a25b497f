#![allow(dead_code)]
//! A network namespace joined to this one by veth pairs, for cutting links
//! with nftables: a Redis runs inside it, nodes (in this process) reach it
//! across the links, and a drop rule in the namespace cuts one link as a
//! failed switch or a partition would: packets vanish, nothing is reset.
//!
//! Needs root (or CAP_NET_ADMIN), `ip` (iproute2) and `nft` (nftables);
//! [`Netns::create`] says why when it cannot, and the tests skip. Every
//! namespace and link is removed on drop, also when a test fails.

use crate::redis_server::{free_port, spawn_redis_with, temp_dir};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// One veth pair: `host` stays here, `inside` is in the namespace.
pub struct Link {
    host: String,
    inside: String,
    pub host_ip: Ipv4Addr,
    pub inside_ip: Ipv4Addr,
}

pub struct Netns {
    pub name: String,
    pub links: Vec<Link>,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Runs `program args`; its stderr as the error when it fails.
fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The rules of the namespace: two chains that accept everything until a
/// link is cut.
const TABLE: &str = "table inet gwfault {
    chain input { type filter hook input priority 0; policy accept; }
    chain output { type filter hook output priority 0; policy accept; }
}";

impl Netns {
    /// A namespace with `links` veth pairs, each its own /30 in
    /// 10.213.0.0/16 (chosen from the process id and a counter, so that
    /// concurrent test processes do not share one); or why it cannot be
    /// made here.
    pub fn create(links: usize) -> Result<Self, String> {
        run("nft", &["--version"])?;
        let pid = std::process::id();
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let name = format!("gwf-{pid}-{n}");
        run("ip", &["netns", "add", &name])?;
        // From here on, drop removes what was made.
        let mut ns = Self {
            name,
            links: Vec::new(),
        };
        for k in 0..links as u32 {
            let block = (pid.wrapping_mul(64) + n * 4 + k) % 16_384;
            let base = u32::from(Ipv4Addr::new(10, 213, 0, 0)) + block * 4;
            // Interface names are at most 15 bytes.
            let tag = format!("{}{n}{k}", pid % 100_000);
            let link = Link {
                host: format!("gfh{tag}"),
                inside: format!("gfi{tag}"),
                host_ip: Ipv4Addr::from(base + 1),
                inside_ip: Ipv4Addr::from(base + 2),
            };
            run(
                "ip",
                &[
                    "link",
                    "add",
                    &link.host,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &link.inside,
                ],
            )?;
            let (host, inside) = (link.host.clone(), link.inside.clone());
            let (host_ip, inside_ip) = (
                format!("{}/30", link.host_ip),
                format!("{}/30", link.inside_ip),
            );
            ns.links.push(link);
            run("ip", &["link", "set", &inside, "netns", &ns.name])?;
            run("ip", &["addr", "add", &host_ip, "dev", &host])?;
            run("ip", &["link", "set", &host, "up"])?;
            ns.exec_ok("ip", &["addr", "add", &inside_ip, "dev", &inside])?;
            ns.exec_ok("ip", &["link", "set", &inside, "up"])?;
        }
        ns.exec_ok("ip", &["link", "set", "lo", "up"])?;
        let mut nft = ns.command("nft");
        nft.args(["-f", "-"]).stdin(Stdio::piped());
        let mut child = nft.spawn().map_err(|e| format!("cannot run nft: {e}"))?;
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().unwrap();
            stdin
                .write_all(TABLE.as_bytes())
                .map_err(|e| e.to_string())?;
        }
        if !child.wait().map_err(|e| e.to_string())?.success() {
            return Err("nft could not load the namespace's table".into());
        }
        Ok(ns)
    }

    /// `program` to be run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }

    fn exec_ok(&self, program: &str, args: &[&str]) -> Result<(), String> {
        let mut full = vec!["netns", "exec", &self.name, program];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Drops every packet on link `k`, both ways.
    pub fn cut(&self, k: usize) {
        let dev = &self.links[k].inside;
        self.exec_ok(
            "nft",
            &[
                "add", "rule", "inet", "gwfault", "input", "iifname", dev, "drop",
            ],
        )
        .unwrap();
        self.exec_ok(
            "nft",
            &[
                "add", "rule", "inet", "gwfault", "output", "oifname", dev, "drop",
            ],
        )
        .unwrap();
    }

    /// Lets every link carry packets again.
    pub fn mend(&self) {
        for chain in ["input", "output"] {
            self.exec_ok("nft", &["flush", "chain", "inet", "gwfault", chain])
                .unwrap();
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting one end of a pair deletes both; the namespace goes once
        // nothing runs in it.
        for link in &self.links {
            let _ = run("ip", &["link", "del", &link.host]);
        }
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// A namespace for a fault test, or `None` after saying on stderr why the
/// test is skipped.
pub fn netns_or_skip(test: &str, links: usize) -> Option<Netns> {
    match Netns::create(links) {
        Ok(ns) => Some(ns),
        Err(why) => {
            eprintln!(
                "SKIPPED {test}: network namespaces are not available here ({why}); \
                 it needs root, iproute2 and nftables"
            );
            None
        }
    }
}

/// A `redis-server` inside a namespace, listening on the inside address
/// of every link; killed (and its directory removed) on drop. Drop it
/// before its namespace.
pub struct NsRedis {
    pub port: u16,
    addrs: Vec<Ipv4Addr>,
    dir: PathBuf,
    child: Child,
}

impl NsRedis {
    pub fn start(ns: &Netns) -> Self {
        let addrs: Vec<Ipv4Addr> = ns.links.iter().map(|l| l.inside_ip).collect();
        let binds: Vec<String> = addrs.iter().map(Ipv4Addr::to_string).collect();
        let dir = temp_dir("redis-netns");
        let port = free_port();
        let mut extra = vec!["--appendonly", "yes", "--protected-mode", "no", "--bind"];
        extra.extend(binds.iter().map(String::as_str));
        let child = spawn_redis_with(ns.command("redis-server"), port, &dir, &extra)
            .unwrap_or_else(|e| panic!("{e}"));
        Self {
            port,
            addrs,
            dir,
            child,
        }
    }

    /// The URL that reaches it across link `k`.
    pub fn url(&self, k: usize) -> String {
        format!("redis://{}:{}/", self.addrs[k], self.port)
    }
}

impl Drop for NsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
