//! The node's one ed25519 key: its ledger author id and its libp2p peer id.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use meshtrain_gossip::libp2p::identity::Keypair;
use meshtrain_ledger::AuthorKey;

use crate::NodeError;

pub const IDENTITY_FILE: &str = "identity.key";

/// The node's key, in both forms.
pub struct Identity {
    pub author: AuthorKey,
    pub keypair: Keypair,
}

impl Identity {
    fn from_secret(secret: [u8; 32], path: &Path) -> Result<Self, NodeError> {
        let mut bytes = secret;
        let keypair = Keypair::ed25519_from_bytes(&mut bytes).map_err(|e| NodeError::Identity {
            path: path.to_path_buf(),
            detail: format!("not an ed25519 secret key: {e}"),
        })?;
        Ok(Self {
            author: AuthorKey::from_secret(secret),
            keypair,
        })
    }

    /// Loads `DIR/identity.key`, or creates it (mode 0600) on first start.
    /// A key file readable by others is refused, as ssh refuses one.
    pub fn load_or_create(data_dir: &Path) -> Result<Self, NodeError> {
        let path = data_dir.join(IDENTITY_FILE);
        let err = |detail: String| NodeError::Identity {
            path: path.clone(),
            detail,
        };
        if path.exists() {
            let meta = std::fs::metadata(&path).map_err(|e| err(e.to_string()))?;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(err(format!(
                    "mode {mode:o} lets others read the key; run `chmod 600 {}`",
                    path.display()
                )));
            }
            let text = std::fs::read_to_string(&path).map_err(|e| err(e.to_string()))?;
            let bytes = hex::decode(text.trim()).map_err(|_| err("not 64 hex digits".into()))?;
            let secret: [u8; 32] = bytes
                .try_into()
                .map_err(|b: Vec<u8>| err(format!("{} bytes, expected 32", b.len())))?;
            return Self::from_secret(secret, &path);
        }
        std::fs::create_dir_all(data_dir).map_err(|source| NodeError::Io {
            path: data_dir.to_path_buf(),
            source,
        })?;
        let mut secret = [0u8; 32];
        rand::fill(&mut secret);
        let tmp = data_dir.join(format!("{IDENTITY_FILE}.tmp"));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| err(e.to_string()))?;
        writeln!(f, "{}", hex::encode(secret)).map_err(|e| err(e.to_string()))?;
        f.sync_all().map_err(|e| err(e.to_string()))?;
        std::fs::rename(&tmp, &path).map_err(|e| err(e.to_string()))?;
        Self::from_secret(secret, &path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_with_mode_0600_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let a = Identity::load_or_create(dir.path()).unwrap();
        let mode = std::fs::metadata(dir.path().join(IDENTITY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let b = Identity::load_or_create(dir.path()).unwrap();
        assert_eq!(a.author.author(), b.author.author());
        // the libp2p peer id embeds the same public key
        let pk = meshtrain_gossip::ed25519_of(&a.keypair.public().to_peer_id()).unwrap();
        assert_eq!(pk, a.author.author().0);
    }

    #[test]
    fn open_or_corrupt_key_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        Identity::load_or_create(dir.path()).unwrap();
        let p = dir.path().join(IDENTITY_FILE);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(Identity::load_or_create(dir.path())
            .err()
            .unwrap()
            .to_string()
            .contains("chmod 600"));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&p, "zz").unwrap();
        assert!(Identity::load_or_create(dir.path()).is_err());
    }
}
