//! Fuzz the frame decoder and both message decoders with arbitrary stream bytes.
//! Run with `cargo +nightly fuzz run frame_decoder` from the repository root.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use meridian_protocol::{ClientToRelay, FrameDecoder, RelayToClient};

fuzz_target!(|data: &[u8]| {
    let whole = Bytes::copy_from_slice(data);
    let _ = ClientToRelay::decode(&whole);
    let _ = RelayToClient::decode(&whole);
    let mut decoder = FrameDecoder::new();
    for piece in data.chunks(7) {
        decoder.push(piece);
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => {
                    if let Ok(message) = ClientToRelay::decode(&frame) {
                        assert_eq!(message.to_bytes(), frame);
                    }
                    if let Ok(message) = RelayToClient::decode(&frame) {
                        assert_eq!(message.to_bytes(), frame);
                    }
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
