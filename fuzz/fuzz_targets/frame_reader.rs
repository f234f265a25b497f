//! The client-frame reader against a reference decoder written here from
//! RFC 6455 §5.2: for any bytes, the same frames (fin, opcode, unmasked
//! payload) and the same verdict where they stop, and never a payload over
//! the limit.
#![no_main]

use gateway_node::frame::{FrameReader, ReadError};
use libfuzzer_sys::fuzz_target;

const MAX: usize = 4096;

#[derive(Debug, PartialEq)]
enum End {
    Closed,
    TooLarge,
    Protocol,
}

/// RFC 6455 §5.2, plainly: what a server must accept from a client.
fn reference(mut data: &[u8]) -> (Vec<(bool, u8, Vec<u8>)>, End) {
    let mut frames = Vec::new();
    loop {
        if data.len() < 2 {
            return (frames, End::Closed);
        }
        let (b0, b1) = (data[0], data[1]);
        let fin = b0 & 0x80 != 0;
        let opcode = b0 & 0x0F;
        if b0 & 0x70 != 0 || ![0, 1, 2, 8, 9, 10].contains(&opcode) || b1 & 0x80 == 0 {
            return (frames, End::Protocol);
        }
        let (len, at) = match b1 & 0x7F {
            126 if data.len() >= 4 => (u16::from_be_bytes([data[2], data[3]]) as u64, 4),
            127 if data.len() >= 10 => (u64::from_be_bytes(data[2..10].try_into().unwrap()), 10),
            126 | 127 => return (frames, End::Closed),
            n => (n as u64, 2),
        };
        if opcode >= 8 && (!fin || len > 125) {
            return (frames, End::Protocol);
        }
        if len > MAX as u64 {
            return (frames, End::TooLarge);
        }
        let len = len as usize;
        if data.len() < at + 4 + len {
            return (frames, End::Closed);
        }
        let mask = &data[at..at + 4];
        let payload = data[at + 4..at + 4 + len]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i % 4])
            .collect();
        frames.push((fin, opcode, payload));
        data = &data[at + 4 + len..];
    }
}

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let (frames, end) = runtime.block_on(async {
        let mut reader = FrameReader::new(data, MAX);
        let mut frames = Vec::new();
        loop {
            match reader.next().await {
                Ok(f) => {
                    assert!(f.payload.len() <= MAX);
                    frames.push((f.fin, f.opcode, f.payload.to_vec()));
                }
                Err(ReadError::Closed) => return (frames, End::Closed),
                Err(ReadError::TooLarge) => return (frames, End::TooLarge),
                Err(ReadError::Protocol(_)) => return (frames, End::Protocol),
            }
        }
    });
    assert_eq!((frames, end), reference(data));
});
