//! # gateway-shared
//!
//! What the gateway node and its clients agree on, written once:
//!
//! - [`protocol`]: function codes, error codes (with their `d` flag), event
//!   names, and the typed `cnf` body of every message.
//! - [`token`]: minting the HS256 tokens that PRESENT carries.
//! - [`client`]: an async WebSocket client for the gateway, used by the
//!   node's tests and by the load tester.

pub mod client;
pub mod protocol;
pub mod token;

pub use client::{Client, ClientError, Incoming, ServerMessage};
pub use protocol::{ErrorCode, Event, FunctionCode};
