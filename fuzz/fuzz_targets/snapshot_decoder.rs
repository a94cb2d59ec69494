//! Arbitrary bytes as a shim's snapshot file (what a new host process reads to take over a
//! UVM): decoding must fail cleanly, never panic, and allocate only in proportion to the bytes
//! it was given (the header's length is a claim to check, not a size to allocate); whatever
//! decodes must encode and decode again to the same snapshot.
//!
//! The input is tried twice: as a whole file, and as a body behind a header that fits it (a
//! mutated body rarely keeps its CRC, so without the second form the JSON decoder would hardly
//! be reached).

#![no_main]

use ferry::snapshot::{self, Snapshot, SnapshotError};
use ferry_fuzz::{Metered, measure};
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: Metered = Metered;

/// Memory a decode may use whatever its input: serde_json's scratch space, error messages.
const FIXED: usize = 64 << 10;
/// And per input byte: a few bytes of JSON (`"",`) can become a 24-byte String in a Vec
/// whose capacity doubles.
const PER_BYTE: usize = 32;

fn decode(bytes: &[u8]) -> Result<Snapshot, SnapshotError> {
    let (result, usage) = measure(|| snapshot::decode(bytes));
    let bound = FIXED + PER_BYTE * bytes.len();
    assert!(
        usage.peak <= bound,
        "decoding {} bytes took {} bytes of memory at once (bound {bound})",
        bytes.len(),
        usage.peak
    );
    result
}

fn check(bytes: &[u8]) {
    match decode(bytes) {
        Ok(snap) => {
            let again = snapshot::encode(&snap).expect("a decoded snapshot encodes");
            let back = decode(&again).expect("an encoded snapshot decodes");
            assert_eq!(back, snap, "encode/decode changed the snapshot");
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);

    let mut framed = format!(
        "FERRY-SNAPSHOT {} {} {:08x}\n",
        snapshot::VERSION,
        data.len(),
        crc32fast::hash(data)
    )
    .into_bytes();
    framed.extend_from_slice(data);
    check(&framed);
});
