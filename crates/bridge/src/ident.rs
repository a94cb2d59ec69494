//! The `type` field of a frame header.
//!
//! ```text
//!  31..28  27..20    19..8    7..0
//!  kind    category  number   version
//! ```
//! kind: request 1, response 2, notification 3. Category: compute system 0x001 (compute service
//! 0x002 exists in the layout but has no v4 messages). Version is always 1. A response's type is
//! its request's type with kind 2.

use std::fmt;

const KIND_SHIFT: u32 = 28;
const CATEGORY_SHIFT: u32 = 20;
const NUMBER_SHIFT: u32 = 8;
const CATEGORY_MASK: u32 = 0x0ff0_0000;
const NUMBER_MASK: u32 = 0x000f_ff00;
const VERSION_MASK: u32 = 0x0000_00ff;

/// The compute-system category, the only one with v4 messages.
pub const CATEGORY_COMPUTE_SYSTEM: u32 = 0x001;
/// The compute-service category (reserved in the layout).
pub const CATEGORY_COMPUTE_SERVICE: u32 = 0x002;
/// The message version carried in the low byte.
pub const MESSAGE_VERSION: u32 = 1;

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Request = 1,
    Response = 2,
    Notification = 3,
}

/// Compute-system message numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rpc {
    Create = 0x1,
    Start = 0x2,
    ShutdownGraceful = 0x3,
    ShutdownForced = 0x4,
    ExecuteProcess = 0x5,
    WaitForProcess = 0x6,
    SignalProcess = 0x7,
    ResizeConsole = 0x8,
    GetProperties = 0x9,
    ModifySettings = 0xa,
    NegotiateProtocol = 0xb,
    DumpStacks = 0xc,
    DeleteContainerState = 0xd,
    UpdateContainer = 0xe,
    LifecycleNotification = 0xf,
}

impl Rpc {
    /// Every v4 compute-system message, in number order.
    pub const ALL: [Rpc; 15] = [
        Rpc::Create,
        Rpc::Start,
        Rpc::ShutdownGraceful,
        Rpc::ShutdownForced,
        Rpc::ExecuteProcess,
        Rpc::WaitForProcess,
        Rpc::SignalProcess,
        Rpc::ResizeConsole,
        Rpc::GetProperties,
        Rpc::ModifySettings,
        Rpc::NegotiateProtocol,
        Rpc::DumpStacks,
        Rpc::DeleteContainerState,
        Rpc::UpdateContainer,
        Rpc::LifecycleNotification,
    ];

    pub fn from_number(n: u32) -> Option<Rpc> {
        Rpc::ALL.get((n as usize).checked_sub(1)?).copied()
    }

    pub fn number(self) -> u32 {
        self as u32
    }

    pub fn name(self) -> &'static str {
        match self {
            Rpc::Create => "Create",
            Rpc::Start => "Start",
            Rpc::ShutdownGraceful => "ShutdownGraceful",
            Rpc::ShutdownForced => "ShutdownForced",
            Rpc::ExecuteProcess => "ExecuteProcess",
            Rpc::WaitForProcess => "WaitForProcess",
            Rpc::SignalProcess => "SignalProcess",
            Rpc::ResizeConsole => "ResizeConsole",
            Rpc::GetProperties => "GetProperties",
            Rpc::ModifySettings => "ModifySettings",
            Rpc::NegotiateProtocol => "NegotiateProtocol",
            Rpc::DumpStacks => "DumpStacks",
            Rpc::DeleteContainerState => "DeleteContainerState",
            Rpc::UpdateContainer => "UpdateContainer",
            Rpc::LifecycleNotification => "LifecycleNotification",
        }
    }
}

/// Notification numbers (only the container notification exists in v4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NotificationKind {
    Container = 0x1,
}

/// A decoded, known message identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Identifier {
    Request(Rpc),
    Response(Rpc),
    Notification(NotificationKind),
}

/// A `type` value that names no v4 message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unknown message type {raw:#010x}")]
pub struct UnknownType {
    pub raw: u32,
}

impl Identifier {
    /// The container notification, `0x30100101`.
    pub const CONTAINER_NOTIFICATION: Identifier =
        Identifier::Notification(NotificationKind::Container);

    fn compose(kind: Kind, number: u32) -> u32 {
        ((kind as u32) << KIND_SHIFT)
            | (CATEGORY_COMPUTE_SYSTEM << CATEGORY_SHIFT)
            | (number << NUMBER_SHIFT)
            | MESSAGE_VERSION
    }

    /// The raw `type` value.
    pub fn to_u32(self) -> u32 {
        match self {
            Identifier::Request(rpc) => Self::compose(Kind::Request, rpc.number()),
            Identifier::Response(rpc) => Self::compose(Kind::Response, rpc.number()),
            Identifier::Notification(n) => Self::compose(Kind::Notification, n as u32),
        }
    }

    /// Decodes a raw `type`, refusing anything that is not a v4 compute-system message.
    pub fn from_u32(raw: u32) -> Result<Identifier, UnknownType> {
        let unknown = UnknownType { raw };
        let category = (raw & CATEGORY_MASK) >> CATEGORY_SHIFT;
        let number = (raw & NUMBER_MASK) >> NUMBER_SHIFT;
        if category != CATEGORY_COMPUTE_SYSTEM || raw & VERSION_MASK != MESSAGE_VERSION {
            return Err(unknown);
        }
        match raw >> KIND_SHIFT {
            1 => Rpc::from_number(number)
                .map(Identifier::Request)
                .ok_or(unknown),
            2 => Rpc::from_number(number)
                .map(Identifier::Response)
                .ok_or(unknown),
            3 if number == NotificationKind::Container as u32 => {
                Ok(Identifier::CONTAINER_NOTIFICATION)
            }
            _ => Err(unknown),
        }
    }

    pub fn kind(self) -> Kind {
        match self {
            Identifier::Request(_) => Kind::Request,
            Identifier::Response(_) => Kind::Response,
            Identifier::Notification(_) => Kind::Notification,
        }
    }

    /// The response identifier answering this request (None for responses and notifications).
    pub fn response(self) -> Option<Identifier> {
        match self {
            Identifier::Request(rpc) => Some(Identifier::Response(rpc)),
            _ => None,
        }
    }
}

/// Best-effort reading of a raw type that failed to decode: if its kind bits say "request", the
/// sender expects an answer, and the answer's type is the same value with kind 2.
pub fn raw_is_request(raw: u32) -> bool {
    raw >> KIND_SHIFT == Kind::Request as u32
}

/// The raw response type for a raw request type (kind bits replaced by 2).
pub fn raw_response_type(raw: u32) -> u32 {
    (raw & !(0xf << KIND_SHIFT)) | ((Kind::Response as u32) << KIND_SHIFT)
}

impl fmt::Display for Identifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identifier::Request(rpc) => write!(f, "Request({})", rpc.name()),
            Identifier::Response(rpc) => write!(f, "Response({})", rpc.name()),
            Identifier::Notification(_) => write!(f, "Notify(Container)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_match_hcsshim() {
        let expect = [
            (Rpc::Create, 0x10100101),
            (Rpc::Start, 0x10100201),
            (Rpc::ShutdownGraceful, 0x10100301),
            (Rpc::ShutdownForced, 0x10100401),
            (Rpc::ExecuteProcess, 0x10100501),
            (Rpc::WaitForProcess, 0x10100601),
            (Rpc::SignalProcess, 0x10100701),
            (Rpc::ResizeConsole, 0x10100801),
            (Rpc::GetProperties, 0x10100901),
            (Rpc::ModifySettings, 0x10100a01),
            (Rpc::NegotiateProtocol, 0x10100b01),
            (Rpc::DumpStacks, 0x10100c01),
            (Rpc::DeleteContainerState, 0x10100d01),
            (Rpc::UpdateContainer, 0x10100e01),
            (Rpc::LifecycleNotification, 0x10100f01),
        ];
        for (rpc, raw) in expect {
            assert_eq!(Identifier::Request(rpc).to_u32(), raw, "{rpc:?}");
            assert_eq!(Identifier::from_u32(raw), Ok(Identifier::Request(rpc)));
            let resp = raw - 0x1000_0000 + 0x2000_0000;
            assert_eq!(Identifier::Response(rpc).to_u32(), resp);
            assert_eq!(Identifier::from_u32(resp), Ok(Identifier::Response(rpc)));
            assert_eq!(raw_response_type(raw), resp);
        }
        assert_eq!(Identifier::CONTAINER_NOTIFICATION.to_u32(), 0x30100101);
    }

    #[test]
    fn unknown_types_are_refused() {
        for raw in [
            0u32,
            0x10100001, // number 0
            0x10101001, // number 0x10
            0x10100102, // version 2
            0x10200101, // compute service category
            0x40100101, // kind 4
            0x30100201, // notification number 2
            u32::MAX,
        ] {
            assert_eq!(
                Identifier::from_u32(raw),
                Err(UnknownType { raw }),
                "{raw:#x}"
            );
        }
    }
}
