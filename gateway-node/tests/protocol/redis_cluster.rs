//! The Redis Cluster harness itself: three masters split the slots, keys
//! with different hash tags spread over all of them, and a replica takes
//! over the slots of a killed master without losing a replicated write.

use crate::redis_server::{redis_cli, RedisCluster};
use std::collections::BTreeSet;
use std::time::Instant;

#[test]
fn redis_cluster_spreads_keys_over_three_masters_and_fails_over() {
    let began = Instant::now();
    let mut cluster = RedisCluster::start();
    eprintln!(
        "redis cluster (3 masters, 3 replicas) up in {:?}",
        began.elapsed()
    );

    let masters = cluster.masters();
    assert_eq!(masters.len(), 3, "masters: {masters:?}");
    let served: Vec<usize> = masters.iter().map(|&m| cluster.slots_served(m)).collect();
    assert!(
        served.iter().all(|&n| n > 0),
        "slots per master: {served:?}"
    );
    assert_eq!(served.iter().sum::<usize>(), 16384);
    let seeds = cluster.seed_urls();
    let expected: Vec<String> = masters
        .iter()
        .map(|p| format!("redis://127.0.0.1:{p}"))
        .collect();
    assert_eq!(seeds.split(',').collect::<Vec<_>>(), expected);

    // Slots 15495, 3300 and 7365: one per third of the slot space.
    let keys = ["{a}:k", "{b}:k", "{c}:k"];
    let seed = masters[0];
    for key in keys {
        assert_eq!(redis_cli(seed, &["-c", "SET", key, key]), "OK");
    }
    let owners: BTreeSet<u16> = keys
        .iter()
        .map(|key| {
            let owner = cluster.master_for_key(key);
            // Asked directly, without -c: a wrong owner answers MOVED.
            assert_eq!(redis_cli(owner, &["GET", key]), *key);
            owner
        })
        .collect();
    assert_eq!(owners.into_iter().collect::<Vec<_>>(), masters);

    let key = keys[0];
    let old = cluster.master_for_key(key);
    // The write is on a replica before its master dies.
    assert_eq!(redis_cli(old, &["WAIT", "1", "10000"]), "1");
    cluster.kill(old);
    let began = Instant::now();
    let promoted = cluster.wait_failover(old);
    eprintln!(
        "failover of :{old} to :{promoted} took {:?}",
        began.elapsed()
    );

    assert_ne!(promoted, old);
    assert_eq!(cluster.master_for_key(key), promoted);
    let info = redis_cli(promoted, &["INFO", "replication"]);
    assert!(info.lines().any(|l| l.trim() == "role:master"), "{info}");
    assert_eq!(redis_cli(promoted, &["GET", key]), key);
    let masters_after = cluster.masters();
    assert_eq!(masters_after.len(), 3, "masters: {masters_after:?}");
    assert!(masters_after.contains(&promoted) && !masters_after.contains(&old));
    // The keys on the other masters are still there.
    let live_seed = masters_after[0];
    for key in &keys[1..] {
        assert_eq!(redis_cli(live_seed, &["-c", "GET", key]), *key);
    }
    drop(cluster);
}
