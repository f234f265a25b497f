//! Protocol facts, defined once: function codes, error codes, event names and
//! the typed `cnf` bodies of every message (see `docs/PROTOCOL.md`).

use serde::{Deserialize, Serialize};

/// Protocol version announced in READY.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest client message, in bytes, after fragment reassembly.
pub const MAX_PAYLOAD: usize = 4096;
/// Longest `content` of MESSAGE_CREATE, in Unicode code points.
pub const MAX_CONTENT_CHARS: usize = 2000;
/// Longest `nonce` of MESSAGE_CREATE, in bytes.
pub const MAX_NONCE_LEN: usize = 64;
/// Longest `topic` of CHANNEL_ADD and `reason` of SYSTEM_BAN_ADD, in code points.
pub const MAX_TOPIC_CHARS: usize = 256;
/// Longest channel name (`^[a-z0-9][a-z0-9_-]{0,31}$`).
pub const MAX_CHANNEL_NAME_LEN: usize = 32;
/// Longest user id (`sub` claim), in code points.
pub const MAX_USER_ID_CHARS: usize = 64;
/// Longest display name (`name` claim), in code points.
pub const MAX_USER_NAME_CHARS: usize = 32;
/// Members listed in a CHANNEL_MOVE dispatch.
pub const MOVE_MEMBER_LIMIT: usize = 100;
/// Messages of history in a CHANNEL_MOVE dispatch.
pub const MOVE_HISTORY_LIMIT: usize = 50;
/// START_TYPING dispatches at most once per session per this many ms.
pub const TYPING_COALESCE_MS: u64 = 3000;

/// The `f` field of a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum FunctionCode {
    Hello = 100,
    Present = 110,
    Heartbeat = 120,
    Dispatch = 130,
    Ready = 140,
    Error = 150,
}

impl FunctionCode {
    pub const fn code(self) -> u16 {
        self as u16
    }

    /// Codes a client may send; any other gets 4001.
    pub const fn client_may_send(self) -> bool {
        matches!(self, Self::Present | Self::Heartbeat | Self::Dispatch)
    }
}

impl TryFrom<u64> for FunctionCode {
    type Error = u64;

    fn try_from(value: u64) -> Result<Self, u64> {
        Ok(match value {
            100 => Self::Hello,
            110 => Self::Present,
            120 => Self::Heartbeat,
            130 => Self::Dispatch,
            140 => Self::Ready,
            150 => Self::Error,
            other => return Err(other),
        })
    }
}

/// Error codes of section 4. A fatal (`d: true`) error closes the WebSocket
/// with the same number as close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    UnknownError = 4000,
    UnknownFunction = 4001,
    DecodeError = 4002,
    NotPresented = 4003,
    AuthenticationFailed = 4004,
    AlreadyPresented = 4005,
    PayloadTooLarge = 4006,
    RateLimited = 4008,
    SessionTimedOut = 4009,
    UnknownEvent = 4010,
    InvalidEventData = 4011,
    PermissionDenied = 4012,
    NotFound = 4013,
    AlreadyExists = 4014,
    Banned = 4015,
    SlowConsumer = 4016,
    SessionReplaced = 4017,
    Unavailable = 4018,
    /// The application's backend ended the user's sessions (server API,
    /// `POST /api/v1/users/{id}/disconnect`). Not a ban: a new PRESENT
    /// is let in; the old session is gone (no resume).
    Disconnected = 4019,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 19] = [
        Self::UnknownError,
        Self::UnknownFunction,
        Self::DecodeError,
        Self::NotPresented,
        Self::AuthenticationFailed,
        Self::AlreadyPresented,
        Self::PayloadTooLarge,
        Self::RateLimited,
        Self::SessionTimedOut,
        Self::UnknownEvent,
        Self::InvalidEventData,
        Self::PermissionDenied,
        Self::NotFound,
        Self::AlreadyExists,
        Self::Banned,
        Self::SlowConsumer,
        Self::SessionReplaced,
        Self::Unavailable,
        Self::Disconnected,
    ];

    pub const fn code(self) -> u16 {
        self as u16
    }

    /// The `d` flag: true when the node closes the connection after it.
    pub const fn is_fatal(self) -> bool {
        !matches!(
            self,
            Self::UnknownError
                | Self::RateLimited
                | Self::UnknownEvent
                | Self::InvalidEventData
                | Self::PermissionDenied
                | Self::NotFound
                | Self::AlreadyExists
                | Self::Unavailable
        )
    }

    /// Whether the session survives the close and can be resumed. Only a
    /// ban or a disconnect by the server API ends it; every other fatal
    /// error leaves it resumable (section 6).
    pub const fn session_survives(self) -> bool {
        !matches!(self, Self::Banned | Self::Disconnected)
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::UnknownError => "UNKNOWN_ERROR",
            Self::UnknownFunction => "UNKNOWN_FUNCTION",
            Self::DecodeError => "DECODE_ERROR",
            Self::NotPresented => "NOT_PRESENTED",
            Self::AuthenticationFailed => "AUTHENTICATION_FAILED",
            Self::AlreadyPresented => "ALREADY_PRESENTED",
            Self::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            Self::RateLimited => "RATE_LIMITED",
            Self::SessionTimedOut => "SESSION_TIMED_OUT",
            Self::UnknownEvent => "UNKNOWN_EVENT",
            Self::InvalidEventData => "INVALID_EVENT_DATA",
            Self::PermissionDenied => "PERMISSION_DENIED",
            Self::NotFound => "NOT_FOUND",
            Self::AlreadyExists => "ALREADY_EXISTS",
            Self::Banned => "BANNED",
            Self::SlowConsumer => "SLOW_CONSUMER",
            Self::SessionReplaced => "SESSION_REPLACED",
            Self::Unavailable => "UNAVAILABLE",
            Self::Disconnected => "DISCONNECTED",
        }
    }
}

impl TryFrom<u16> for ErrorCode {
    type Error = u16;

    fn try_from(value: u16) -> Result<Self, u16> {
        Self::ALL
            .iter()
            .copied()
            .find(|c| c.code() == value)
            .ok_or(value)
    }
}

/// Event names carried in `t` of code 130.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Event {
    MessageCreate,
    MessageDelete,
    StartTyping,
    SystemBanAdd,
    SystemBanRemove,
    ChannelAdd,
    ChannelMove,
    RoomUserAdd,
    RoomUserRemove,
    GatewayDown,
}

impl Event {
    pub const ALL: [Event; 10] = [
        Self::MessageCreate,
        Self::MessageDelete,
        Self::StartTyping,
        Self::SystemBanAdd,
        Self::SystemBanRemove,
        Self::ChannelAdd,
        Self::ChannelMove,
        Self::RoomUserAdd,
        Self::RoomUserRemove,
        Self::GatewayDown,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Self::MessageCreate => "MESSAGE_CREATE",
            Self::MessageDelete => "MESSAGE_DELETE",
            Self::StartTyping => "START_TYPING",
            Self::SystemBanAdd => "SYSTEM_BAN_ADD",
            Self::SystemBanRemove => "SYSTEM_BAN_REMOVE",
            Self::ChannelAdd => "CHANNEL_ADD",
            Self::ChannelMove => "CHANNEL_MOVE",
            Self::RoomUserAdd => "ROOM_USER_ADD",
            Self::RoomUserRemove => "ROOM_USER_REMOVE",
            Self::GatewayDown => "GATEWAY_DOWN",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|e| e.name() == name)
    }

    /// Events a client may execute; the others are dispatch-only (4010).
    pub const fn client_executable(self) -> bool {
        !matches!(
            self,
            Self::RoomUserAdd | Self::RoomUserRemove | Self::GatewayDown
        )
    }
}

/// Whether `name` is a valid channel name: `^[a-z0-9][a-z0-9_-]{0,31}$`.
pub fn is_valid_channel_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_CHANNEL_NAME_LEN
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes
            .iter()
            .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// A user as dispatched: `{"id":"u1","name":"alice"}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct User {
    pub id: String,
    pub name: String,
}

/// Claims of the HS256 token presented with code 110.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub admin: bool,
    pub exp: u64,
    /// Issuer, for clusters that require one (`--jwt-issuer`). Any JSON
    /// here: the node's verifier checks it, when configured to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<serde_json::Value>,
    /// Audience, for clusters that require one (`--jwt-audience`): a
    /// string or an array of them (RFC 7519, 4.1.3), checked likewise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<serde_json::Value>,
}

impl Claims {
    /// These claims with the issuer and audience a cluster requires, if any.
    pub fn with_iss_aud(mut self, iss: Option<&str>, aud: Option<&str>) -> Self {
        self.iss = iss.map(Into::into);
        self.aud = aud.map(Into::into);
        self
    }
}

/// `cnf` of code 100.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub hb_int: u64,
    pub max_payload: usize,
}

/// `cnf` of code 110.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Present {
    pub token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s: Option<u64>,
}

/// The user in READY, with the admin flag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadyUser {
    pub id: String,
    pub name: String,
    pub admin: bool,
}

/// `cnf` of code 140.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ready {
    pub v: u32,
    pub session_id: u64,
    pub enc_key: String,
    pub resumed: bool,
    pub user: ReadyUser,
    pub channel: String,
    pub channels: Vec<String>,
}

/// `cnf` of code 150.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub c: u16,
    pub d: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub m: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub t: Option<String>,
}

/// Dispatch `cnf` of MESSAGE_CREATE (also the items of CHANNEL_MOVE history).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageCreate {
    pub id: String,
    pub channel: String,
    pub author: User,
    pub content: String,
    pub ts: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<String>,
}

/// Dispatch `cnf` of MESSAGE_DELETE.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MessageDelete {
    pub id: String,
    pub channel: String,
}

/// Dispatch `cnf` of START_TYPING.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StartTyping {
    pub channel: String,
    pub user: User,
    pub ts: u64,
}

/// Dispatch `cnf` of CHANNEL_ADD.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChannelAdd {
    pub name: String,
    pub topic: String,
    pub created_by: User,
}

/// Dispatch `cnf` of CHANNEL_MOVE.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChannelMove {
    pub channel: String,
    pub from: String,
    pub members: Vec<User>,
    pub member_count: u64,
    pub history: Vec<MessageCreate>,
}

/// Dispatch `cnf` of ROOM_USER_ADD and ROOM_USER_REMOVE.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoomUser {
    pub channel: String,
    pub user: User,
    pub session_id: u64,
}

/// Dispatch `cnf` of SYSTEM_BAN_ADD.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BanAdd {
    pub user_id: String,
    pub reason: String,
    pub until: Option<u64>,
}

/// Dispatch `cnf` of SYSTEM_BAN_REMOVE.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BanRemove {
    pub user_id: String,
}

/// Dispatch `cnf` of GATEWAY_DOWN.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GatewayDown {
    pub reason: String,
    pub reconnect: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_code_round_trips_and_has_its_d_flag() {
        let fatal = [
            4001, 4002, 4003, 4004, 4005, 4006, 4009, 4015, 4016, 4017, 4019,
        ];
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::try_from(code.code()), Ok(code));
            assert_eq!(code.is_fatal(), fatal.contains(&code.code()), "{code:?}");
            assert!(!code.name().is_empty());
        }
        assert_eq!(ErrorCode::try_from(4007), Err(4007));
        assert!(!ErrorCode::Banned.session_survives());
        assert!(!ErrorCode::Disconnected.session_survives());
        assert!(ErrorCode::SlowConsumer.session_survives());
    }

    #[test]
    fn function_codes_round_trip() {
        for f in [100u64, 110, 120, 130, 140, 150] {
            assert_eq!(FunctionCode::try_from(f).unwrap().code() as u64, f);
        }
        assert!(FunctionCode::try_from(101).is_err());
        assert!(!FunctionCode::Hello.client_may_send());
        assert!(FunctionCode::Dispatch.client_may_send());
    }

    #[test]
    fn event_names_round_trip_and_dispatch_only_ones_are_marked() {
        for e in Event::ALL {
            assert_eq!(Event::from_name(e.name()), Some(e));
        }
        assert_eq!(Event::from_name("message_create"), None);
        assert!(!Event::RoomUserAdd.client_executable());
        assert!(!Event::GatewayDown.client_executable());
        assert!(Event::ChannelMove.client_executable());
    }

    #[test]
    fn channel_names_follow_the_pattern() {
        for ok in ["general", "a", "0", "a-b_c", &"x".repeat(32)] {
            assert!(is_valid_channel_name(ok), "{ok}");
        }
        for bad in ["", "-a", "_a", "A", "a b", "é", &"x".repeat(33)] {
            assert!(!is_valid_channel_name(bad), "{bad}");
        }
    }
}
