//! Canonical binary encoding of ledger values.
//!
//! Everything the ledger signs, hashes or stores goes through here, so that
//! one set of bytes means one value. Decoding untrusted bytes always runs
//! under a hard size limit and rejects trailing bytes.

use bincode::config::{self, Config};
use bincode::{Decode, Encode};

use crate::LedgerError;

/// No single ledger value (a record, a verdict block, a proof) may claim more
/// than this; bincode would otherwise allocate whatever a length prefix says.
pub const MAX_VALUE_BYTES: usize = 4 << 20;

fn config() -> impl Config {
    config::standard().with_limit::<MAX_VALUE_BYTES>()
}

pub(crate) fn encode<T: Encode>(value: &T) -> Vec<u8> {
    // The limit only guards decoding. Encoding plain structs into a Vec has
    // no failure mode (no I/O, no unsized collections), so a failure is a bug.
    bincode::encode_to_vec(value, config::standard()).expect("encoding plain data into a Vec cannot fail")
}

/// Decodes exactly one `T` from `bytes`, with the size limit, and fails on
/// trailing bytes.
pub(crate) fn decode_exact<T: Decode<()>>(bytes: &[u8], what: &'static str) -> Result<T, LedgerError> {
    if bytes.len() > MAX_VALUE_BYTES {
        return Err(LedgerError::Malformed {
            what,
            detail: format!("{} bytes exceeds the {MAX_VALUE_BYTES}-byte limit", bytes.len()),
        });
    }
    let (value, used) = bincode::decode_from_slice(bytes, config()).map_err(|e| LedgerError::Malformed {
        what,
        detail: e.to_string(),
    })?;
    if used != bytes.len() {
        return Err(LedgerError::Malformed {
            what,
            detail: format!("{} trailing bytes after {used}", bytes.len() - used),
        });
    }
    Ok(value)
}
