//! Signing keys of authors.

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

impl AuthorId {
    pub(crate) fn verifying_key(&self) -> Result<VerifyingKey, LedgerError> {
        VerifyingKey::from_bytes(&self.0).map_err(|_| LedgerError::BadAuthorKey { author: *self })
    }
}

/// Verifies one signature strictly (rejecting malleable and small-order forms).
pub(crate) fn verify_one(author: &AuthorId, message: &[u8], signature: &SignatureBytes) -> bool {
    let Ok(key) = author.verifying_key() else {
        return false;
    };
    let sig = ed25519_dalek::Signature::from_bytes(&signature.0);
    key.verify_strict(message, &sig).is_ok()
}
