//! A node's local block store: content-addressed data blocks and the
//! manifests that list them, as files. Every read re-checks the hash, so a
//! corrupted block is noticed when it is loaded (and fetched again).

use std::path::{Path, PathBuf};

use meshtrain_model::blocks::block_hash;
use meshtrain_model::Manifest;

use crate::NodeError;

#[derive(Clone, Debug)]
pub struct BlockStore {
    dir: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> NodeError + '_ {
    move |source| NodeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn is_hex_name(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|c| c.is_ascii_hexdigit())
}

impl BlockStore {
    pub fn open(dir: &Path) -> Result<Self, NodeError> {
        for sub in ["blocks", "manifests"] {
            let p = dir.join(sub);
            std::fs::create_dir_all(&p).map_err(io(&p))?;
        }
        Ok(Self { dir: dir.to_path_buf() })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn block_path(&self, hash: &str) -> PathBuf {
        self.dir.join("blocks").join(format!("{hash}.blk"))
    }

    fn manifest_path(&self, id: &str) -> PathBuf {
        self.dir.join("manifests").join(format!("{id}.json"))
    }

    pub fn has_block(&self, hash: &str) -> bool {
        is_hex_name(hash) && self.block_path(hash).exists()
    }

    /// Stores a block after checking that its bytes hash to its name.
    pub fn put_block(&self, hash: &str, bytes: &[u8]) -> Result<(), NodeError> {
        if !is_hex_name(hash) || block_hash(bytes) != hash {
            return Err(NodeError::BlockCorrupt { hash: hash.to_string() });
        }
        write_atomic(&self.block_path(hash), bytes)
    }

    /// A block's bytes, checked against its name. A corrupted file is
    /// removed (so that it is fetched again) and reported as absent.
    pub fn block(&self, hash: &str) -> Result<Option<Vec<u8>>, NodeError> {
        if !is_hex_name(hash) {
            return Ok(None);
        }
        let path = self.block_path(hash);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(&path)(e)),
        };
        if block_hash(&bytes) != hash {
            tracing::warn!(block = %&hash[..8], path = %path.display(), "corrupted block on disk; removing it to fetch it again");
            std::fs::remove_file(&path).map_err(io(&path))?;
            return Ok(None);
        }
        Ok(Some(bytes))
    }

    /// The file of a block, once its bytes are checked against its name
    /// (for a TorchScript module, which libtorch loads from a path).
    pub fn block_file(&self, hash: &str) -> Result<Option<PathBuf>, NodeError> {
        Ok(self.block(hash)?.map(|_| self.block_path(hash)))
    }

    pub fn put_manifest(&self, manifest: &Manifest) -> Result<String, NodeError> {
        let id = manifest.id();
        write_atomic(&self.manifest_path(&id), &manifest.to_bytes())?;
        Ok(id)
    }

    /// The manifest with dataset id `id`, checked against its id.
    pub fn manifest(&self, id: &str) -> Result<Option<Manifest>, NodeError> {
        if !is_hex_name(id) {
            return Ok(None);
        }
        let path = self.manifest_path(id);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(&path)(e)),
        };
        let m = Manifest::from_bytes(&bytes, &path.display().to_string())?;
        if m.id() != id {
            return Err(NodeError::ManifestCorrupt {
                path: path.to_path_buf(),
            });
        }
        Ok(Some(m))
    }

    /// Ids of every manifest in the store.
    pub fn manifest_ids(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.dir.join("manifests")) else {
            return Vec::new();
        };
        let mut ids: Vec<String> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".json"))
                    .map(String::from)
            })
            .filter(|n| is_hex_name(n))
            .collect();
        ids.sort();
        ids
    }

    /// The bytes to serve for `hash`: a block, or a manifest by its id.
    pub fn serve(&self, hash: &str) -> Result<Option<Vec<u8>>, NodeError> {
        if let Some(b) = self.block(hash)? {
            return Ok(Some(b));
        }
        Ok(self.manifest(hash)?.map(|m| m.to_bytes()))
    }
}

/// Writes through a temporary file and a rename, so a crash or a full disk
/// leaves the old file or none, never half of one; a failed write removes
/// its temporary file.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), NodeError> {
    let tmp = path.with_extension("tmp");
    let written = std::fs::write(&tmp, bytes)
        .map_err(io(&tmp))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(io(path)));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_checked_on_the_way_in_and_out() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlockStore::open(dir.path()).unwrap();
        let bytes = b"some records".to_vec();
        let h = block_hash(&bytes);
        assert!(store.put_block(&h, b"other").is_err());
        store.put_block(&h, &bytes).unwrap();
        assert_eq!(store.block(&h).unwrap(), Some(bytes.clone()));

        // flip a byte on disk: detected at load time and removed
        let path = dir.path().join("blocks").join(format!("{h}.blk"));
        let mut bad = bytes;
        bad[0] ^= 1;
        std::fs::write(&path, bad).unwrap();
        assert_eq!(store.block(&h).unwrap(), None);
        assert!(!store.has_block(&h));
        assert_eq!(store.block("../../etc/passwd").unwrap(), None);
    }
}
