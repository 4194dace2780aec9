//! Signing keys of authors.

use std::cell::RefCell;
use std::collections::HashMap;

use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};

use crate::{AuthorId, LedgerError, SignatureBytes};

/// An author's ed25519 signing key. The node keeps its 32 secret bytes in its
/// data dir; the ledger only signs with it.
pub struct AuthorKey {
    signing: SigningKey,
}

impl AuthorKey {
    pub fn from_secret(secret: [u8; 32]) -> Self {
        Self {
            signing: SigningKey::from_bytes(&secret),
        }
    }

    pub fn secret(&self) -> [u8; 32] {
        self.signing.to_bytes()
    }

    pub fn author(&self) -> AuthorId {
        AuthorId(self.signing.verifying_key().to_bytes())
    }

    pub(crate) fn sign(&self, message: &[u8]) -> SignatureBytes {
        SignatureBytes(self.signing.sign(message).to_bytes())
    }
}

impl std::fmt::Debug for AuthorKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AuthorKey({})", self.author().short())
    }
}

thread_local! {
    /// Decompressed public keys: decompressing one costs about as much as
    /// half a signature check, and a node checks the same few authors again
    /// and again.
    static KEYS: RefCell<HashMap<AuthorId, VerifyingKey>> = RefCell::new(HashMap::new());
}

/// Bound on cached keys before the cache starts over.
const KEY_CACHE_CAPACITY: usize = 4096;

impl AuthorId {
    pub(crate) fn verifying_key(&self) -> Result<VerifyingKey, LedgerError> {
        if let Some(k) = KEYS.with(|c| c.borrow().get(self).copied()) {
            return Ok(k);
        }
        let key = VerifyingKey::from_bytes(&self.0).map_err(|_| LedgerError::BadAuthorKey { author: *self })?;
        KEYS.with(|c| {
            let mut c = c.borrow_mut();
            if c.len() >= KEY_CACHE_CAPACITY {
                c.clear();
            }
            c.insert(*self, key);
        });
        Ok(key)
    }
}

thread_local! {
    /// Results of signature checks already made on this thread, when the
    /// simulator asks for it: its nodes all check the same records.
    static MEMO: RefCell<Option<HashMap<[u8; 32], bool>>> = const { RefCell::new(None) };
}

/// Checks on this thread remember their results (keyed by a hash of key,
/// message and signature, so a different byte is a different check). For
/// the simulator, where every node checks every record; never on in a node.
pub fn memoize_signature_checks(on: bool) {
    MEMO.with(|m| *m.borrow_mut() = on.then(HashMap::new));
}

/// Bound on remembered checks before the memo starts over.
const MEMO_CAPACITY: usize = 1 << 20;

/// Verifies one signature strictly (rejecting malleable and small-order forms).
pub(crate) fn verify_one(author: &AuthorId, message: &[u8], signature: &SignatureBytes) -> bool {
    let check = || {
        let Ok(key) = author.verifying_key() else {
            return false;
        };
        let sig = ed25519_dalek::Signature::from_bytes(&signature.0);
        key.verify_strict(message, &sig).is_ok()
    };
    MEMO.with(|m| {
        let mut memo = m.borrow_mut();
        let Some(memo) = memo.as_mut() else {
            return check();
        };
        let id = *blake3::Hasher::new()
            .update(&author.0)
            .update(&signature.0)
            .update(message)
            .finalize()
            .as_bytes();
        if let Some(ok) = memo.get(&id) {
            return *ok;
        }
        if memo.len() >= MEMO_CAPACITY {
            memo.clear();
        }
        let ok = check();
        memo.insert(id, ok);
        ok
    })
}
