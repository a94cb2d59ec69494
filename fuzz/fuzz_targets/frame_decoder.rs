//! Arbitrary bytes as they could arrive on the bridge: decoding must fail cleanly, never panic,
//! and the two decoders (whole buffer and async stream) must agree.

#![no_main]

use bridge::io::{ReadError, read_frame};
use bridge::message::Message;
use bridge::{Frame, FrameError};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

const MAX: u32 = 65536;

/// One runtime for the whole run: building one per input would dominate the time per exec.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("tokio runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    let whole = Frame::decode(data, MAX);
    if let Ok(frame) = &whole {
        let _ = Message::from_frame(frame);
        // Nothing is lost or added between the wire and a decoded frame.
        let again = frame.encode(MAX).expect("a decoded frame re-encodes");
        assert_eq!(again, data, "decode/encode changed the bytes");
    }

    // The same bytes as a stream: read frames until the stream ends or cannot be trusted.
    runtime().block_on(async {
        let mut r = data;
        let mut first = true;
        loop {
            let got = read_frame(&mut r, MAX).await;
            if first {
                // A buffer holding exactly one valid frame reads back as that frame.
                if let Ok(frame) = &whole {
                    assert_eq!(
                        got.as_ref().ok(),
                        Some(frame),
                        "stream and buffer decoders disagree"
                    );
                }
                first = false;
            }
            match got {
                Ok(frame) => {
                    let _ = Message::from_frame(&frame);
                }
                Err(ReadError::Frame(e)) if !e.is_stream_fatal() => {
                    let _ = (e.request_to_answer(), e.hresult(), e.to_string());
                }
                Err(ReadError::Frame(FrameError::TooSmall { .. }))
                | Err(ReadError::Closed)
                | Err(ReadError::Truncated { .. })
                | Err(ReadError::Io(_)) => break,
                Err(ReadError::Frame(e)) => panic!("stream-fatal error of an unexpected kind: {e}"),
            }
        }
    });
});
