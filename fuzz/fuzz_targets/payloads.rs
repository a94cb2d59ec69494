//! Arbitrary bytes as the JSON body of every message type: parsing must fail cleanly or produce
//! a message that encodes and parses again (the agent answers with what it parsed).

#![no_main]

use bridge::message::{ContainerNotification, Message, Request, Response};
use bridge::{Frame, Identifier, Rpc};
use libfuzzer_sys::fuzz_target;

/// Re-encodes a parsed message and parses the result: a message the library built must be one
/// it can read.
fn round_trip(msg: &Message, ident: Identifier) {
    let frame = msg.to_frame(7).expect("a parsed message encodes");
    assert_eq!(frame.ident, ident);
    let bytes = frame.encode(u32::MAX).expect("no limit");
    let back = Frame::decode(&bytes, u32::MAX).expect("own frame decodes");
    if let Err(e) = Message::from_frame(&back) {
        panic!(
            "{ident}: re-encoded body does not parse: {e}\nbody: {}",
            String::from_utf8_lossy(&back.body)
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let frame_as = |ident| Frame {
        ident,
        id: 1,
        body: data.to_vec(),
    };
    for rpc in Rpc::ALL {
        let ident = Identifier::Request(rpc);
        if let Ok(r) = Request::parse(rpc, &frame_as(ident)) {
            round_trip(&Message::Request(r), ident);
        }
        let ident = Identifier::Response(rpc);
        if let Ok(r) = Response::parse(rpc, &frame_as(ident)) {
            round_trip(&Message::Response(r), ident);
        }
    }
    let ident = Identifier::CONTAINER_NOTIFICATION;
    if let Ok(n) = frame_as(ident).parse::<ContainerNotification>() {
        round_trip(&Message::Notification(n), ident);
    }
});
