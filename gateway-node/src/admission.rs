//! Admission of WebSocket connections: the node-wide cap
//! (`--max-connections`) and the per-address cap
//! (`--max-connections-per-ip`); and of new sessions: the per-user budget
//! of session starts (`--session-starts-per-user`, [`SessionStarts`]).
//!
//! A [`Ticket`] is taken before the upgrade is answered and moves into the
//! connection's task; dropping it gives both places back. The drain waits
//! for every ticket through the node-wide semaphore.

use crate::session::TokenBucket;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The node holds `--max-connections` WebSockets (HTTP 503).
    NodeFull,
    /// The address holds `--max-connections-per-ip` WebSockets (HTTP 429).
    AddressFull,
}

/// The caps of one node.
pub struct Admission {
    /// One permit per WebSocket the node may hold.
    connections: Arc<Semaphore>,
    /// `max_connections`, to wait for all permits at drain.
    max: u32,
    /// Open WebSockets per client address; `None` when the per-address cap
    /// is off (the default: behind a load balancer every client has its
    /// address).
    per_ip: Option<Arc<PerIp>>,
}

struct PerIp {
    max: usize,
    /// Only addresses with at least one connection are present, so the map
    /// is bounded by the node-wide cap.
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// A WebSocket's place in the caps, given back on drop.
pub struct Ticket {
    _permit: OwnedSemaphorePermit,
    /// Boxed: the ticket lives in every connection's task, and the
    /// per-address cap is off by default.
    _slot: Option<Box<Slot>>,
}

/// One connection counted for an address; uncounted on drop.
struct Slot {
    per_ip: Arc<PerIp>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.per_ip.open.lock();
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

impl Admission {
    /// `max_per_ip` 0 turns the per-address cap off.
    pub fn new(max_connections: usize, max_per_ip: usize) -> Self {
        Self {
            connections: Arc::new(Semaphore::new(max_connections)),
            max: max_connections as u32,
            per_ip: (max_per_ip > 0).then(|| {
                Arc::new(PerIp {
                    max: max_per_ip,
                    open: Mutex::new(HashMap::new()),
                })
            }),
        }
    }

    /// A ticket for one more WebSocket from `ip`, or why not.
    pub fn admit(&self, ip: IpAddr) -> Result<Ticket, Refusal> {
        // The address first: a refused address never holds a node permit,
        // and a full node drops the address slot again.
        let slot = match &self.per_ip {
            None => None,
            Some(per_ip) => {
                let mut open = per_ip.open.lock();
                let n = open.entry(ip).or_insert(0);
                if *n >= per_ip.max {
                    return Err(Refusal::AddressFull);
                }
                *n += 1;
                Some(Box::new(Slot {
                    per_ip: Arc::clone(per_ip),
                    ip,
                }))
            }
        };
        let permit = Arc::clone(&self.connections)
            .try_acquire_owned()
            .map_err(|_| Refusal::NodeFull)?;
        Ok(Ticket {
            _permit: permit,
            _slot: slot,
        })
    }

    /// Waits until every ticket is given back, for at most `grace`; false
    /// if some are still out.
    pub async fn wait_empty(&self, grace: Duration) -> bool {
        tokio::time::timeout(grace, self.connections.acquire_many(self.max))
            .await
            .is_ok()
    }
}

/// New sessions each user may start on this node: a burst of `per_minute`,
/// refilled over a minute. A session lives for the resume window after its
/// connection drops, so without a budget one valid token could fill a
/// node (and Redis) with sessions by presenting and dropping in a loop.
/// Resumes are not counted.
pub struct SessionStarts {
    burst: f64,
    per_s: f64,
    buckets: Mutex<Buckets>,
}

struct Buckets {
    by_user: HashMap<Box<str>, TokenBucket>,
    /// Size at which full buckets are dropped (a full bucket is what an
    /// absent user gets): twice what was left after the last time.
    prune_at: usize,
}

/// Users tracked before the first pruning.
const PRUNE_FROM: usize = 1024;

impl SessionStarts {
    /// `per_minute` 0 turns the budget off.
    pub fn new(per_minute: u32) -> Option<Self> {
        (per_minute > 0).then(|| Self {
            burst: f64::from(per_minute),
            per_s: f64::from(per_minute) / 60.0,
            buckets: Mutex::new(Buckets {
                by_user: HashMap::new(),
                prune_at: PRUNE_FROM,
            }),
        })
    }

    /// Takes one start for `user` at `now`; false when the budget is spent.
    pub fn take(&self, user: &str, now: Instant) -> bool {
        let (burst, per_s) = (self.burst, self.per_s);
        let mut b = self.buckets.lock();
        if b.by_user.len() >= b.prune_at {
            // Refilled buckets hold nothing an absent entry would not.
            b.by_user
                .retain(|_, bucket| !bucket.is_full(burst, per_s, now));
            b.prune_at = (b.by_user.len() * 2).max(PRUNE_FROM);
        }
        match b.by_user.get_mut(user) {
            Some(bucket) => bucket.take(burst, per_s, now),
            None => {
                let mut bucket = TokenBucket::full(burst, now);
                let took = bucket.take(burst, per_s, now);
                b.by_user.insert(user.into(), bucket);
                took
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn a_users_session_starts_refill_over_a_minute_and_others_are_apart() {
        let starts = SessionStarts::new(3).unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(starts.take("ann", t0));
        }
        assert!(!starts.take("ann", t0), "the burst is spent");
        assert!(
            starts.take("bob", t0),
            "another user has a budget of its own"
        );
        // One start comes back every 20 s (3 a minute).
        assert!(!starts.take("ann", t0 + Duration::from_secs(19)));
        assert!(starts.take("ann", t0 + Duration::from_secs(40)));
        assert!(SessionStarts::new(0).is_none(), "0 is off");
    }

    #[test]
    fn only_refilled_buckets_are_pruned() {
        let starts = SessionStarts::new(2).unwrap();
        let t0 = Instant::now();
        assert!(starts.take("spent", t0));
        assert!(starts.take("spent", t0));
        // With "spent", PRUNE_FROM users: the next start prunes.
        for i in 1..PRUNE_FROM {
            assert!(starts.take(&format!("u{i}"), t0));
        }
        // A minute on, everyone else has refilled and goes at the next
        // start; "spent" is refilled too and goes as well, losing nothing.
        let later = t0 + Duration::from_secs(60);
        assert!(starts.take("new", later));
        assert_eq!(starts.buckets.lock().by_user.len(), 1);
        // Within the minute a spent bucket is kept.
        let starts = SessionStarts::new(2).unwrap();
        assert!(starts.take("spent", t0));
        assert!(starts.take("spent", t0));
        // With "spent", PRUNE_FROM users: the next start prunes.
        for i in 1..PRUNE_FROM {
            assert!(starts.take(&format!("u{i}"), t0));
        }
        assert!(starts.take("new", t0 + Duration::from_secs(1)));
        assert_eq!(starts.buckets.lock().by_user.len(), PRUNE_FROM + 1);
        assert!(!starts.take("spent", t0 + Duration::from_secs(1)));
    }

    #[test]
    fn an_address_over_its_cap_is_refused_and_others_are_not() {
        let admission = Admission::new(10, 2);
        let a1 = admission.admit(ip(1)).unwrap();
        let _a2 = admission.admit(ip(1)).unwrap();
        assert_eq!(admission.admit(ip(1)).err(), Some(Refusal::AddressFull));
        let _b1 = admission.admit(ip(2)).unwrap();
        drop(a1);
        let _a3 = admission.admit(ip(1)).unwrap();
    }

    #[test]
    fn a_full_node_refuses_and_gives_the_address_slot_back() {
        let admission = Admission::new(1, 1);
        let a = admission.admit(ip(1)).unwrap();
        assert_eq!(admission.admit(ip(2)).err(), Some(Refusal::NodeFull));
        drop(a);
        let _b = admission.admit(ip(2)).unwrap();
        let per_ip = admission.per_ip.as_ref().unwrap();
        assert_eq!(per_ip.open.lock().len(), 1, "only ip(2) is counted");
    }

    #[test]
    fn without_a_per_address_cap_only_the_node_cap_counts() {
        let admission = Admission::new(3, 0);
        let tickets: Vec<Ticket> = (0..3).map(|_| admission.admit(ip(1)).unwrap()).collect();
        assert_eq!(admission.admit(ip(1)).err(), Some(Refusal::NodeFull));
        drop(tickets);
        assert!(admission.admit(ip(1)).is_ok());
    }
}
