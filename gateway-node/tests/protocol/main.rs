//! The protocol of docs/PROTOCOL.md, end to end: real nodes on port 0,
//! the real client from `gateway-shared`.

mod harness;
mod rawws;

mod api;

mod connect;
mod demo;
mod errors;
mod events;
mod floods;
mod lifecycle;
mod resume;

mod cluster;
mod failover;
mod faults;
mod netns;
mod proxy;
mod redis_cluster;
mod redis_server;
