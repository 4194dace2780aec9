//! Decoding untrusted delta payloads: any bytes must give a value or a
//! clear error, never a panic, a hang or an allocation the bytes did not
//! pay for. What decodes must be finite, of the expected length, and encode
//! back to something that decodes to the same values.

#![no_main]

use libfuzzer_sys::fuzz_target;
use meshtrain_model::codec::{decode, encode, peek_len};
use meshtrain_model::CodecSpec;

fuzz_target!(|data: &[u8]| {
    // The first two bytes choose the expected parameter count, so that
    // both matching and mismatching shapes get explored.
    let (expected, bytes) = match data {
        [a, b, rest @ ..] => (usize::from(u16::from_le_bytes([*a, *b])), rest),
        _ => return,
    };
    let _ = peek_len(bytes);
    if let Ok(values) = decode(bytes, expected) {
        assert_eq!(values.len(), expected);
        assert!(values.iter().all(|v| v.is_finite()));
        let again = decode(&encode(CodecSpec::Dense, &values), expected).expect("dense round trip");
        assert_eq!(again, values);
    }
});
