//! The IDX format of MNIST and Fashion-MNIST, gzipped or not.
//!
//! Header: two zero bytes, a type byte (0x08 = unsigned byte), a dimension
//! count, then one big-endian u32 per dimension, then the data.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::{ModelError, Result};

/// An IDX array of unsigned bytes.
#[derive(Debug, Clone)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Reads a whole IDX file, transparently gunzipping it when it starts with the
/// gzip magic. Errors name the file and the offset.
pub fn read_idx(path: &Path) -> Result<IdxArray> {
    let raw = std::fs::read(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::with_capacity(raw.len() * 4);
        flate2::read::MultiGzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(|e| bad(path, 0, format!("not a valid gzip stream: {e}")))?;
        out
    } else {
        raw
    };
    parse_idx(path, &bytes)
}

fn bad(path: &Path, offset: u64, detail: impl Into<String>) -> ModelError {
    ModelError::BadDataFile {
        path: PathBuf::from(path),
        offset,
        detail: detail.into(),
    }
}

/// Parses IDX bytes already in memory (offsets refer to the decompressed bytes).
pub fn parse_idx(path: &Path, bytes: &[u8]) -> Result<IdxArray> {
    if bytes.len() < 4 {
        return Err(bad(
            path,
            0,
            format!("file is {} bytes, too short for an IDX header", bytes.len()),
        ));
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(bad(
            path,
            0,
            format!("bad magic {:02x}{:02x}, expected 0000", bytes[0], bytes[1]),
        ));
    }
    if bytes[2] != 0x08 {
        return Err(bad(
            path,
            2,
            format!("element type 0x{:02x} is not unsigned byte (0x08)", bytes[2]),
        ));
    }
    let ndims = bytes[3] as usize;
    if ndims == 0 || ndims > 4 {
        return Err(bad(path, 3, format!("{ndims} dimensions; expected 1 to 4")));
    }
    let header = 4 + 4 * ndims;
    if bytes.len() < header {
        return Err(bad(path, bytes.len() as u64, "truncated inside the dimension list"));
    }
    let mut dims = Vec::with_capacity(ndims);
    for i in 0..ndims {
        let off = 4 + 4 * i;
        let d = u32::from_be_bytes([bytes[off], bytes[off + 1], bytes[off + 2], bytes[off + 3]]) as usize;
        dims.push(d);
    }
    let expected = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad(path, 4, format!("dimensions {dims:?} overflow")))?;
    let have = bytes.len() - header;
    if have < expected {
        return Err(bad(
            path,
            bytes.len() as u64,
            format!("truncated: dimensions {dims:?} need {expected} data bytes, file has {have}"),
        ));
    }
    if have > expected {
        return Err(bad(
            path,
            (header + expected) as u64,
            format!("{} unexpected bytes after the data", have - expected),
        ));
    }
    Ok(IdxArray {
        dims,
        data: bytes[header..].to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn parses_and_rejects() {
        let p = Path::new("x.idx");
        let a = parse_idx(p, &idx(&[2, 3], &[1, 2, 3, 4, 5, 6])).unwrap();
        assert_eq!(a.dims, vec![2, 3]);
        assert_eq!(a.data.len(), 6);

        let err = parse_idx(p, &idx(&[2, 3], &[1, 2, 3])).unwrap_err().to_string();
        assert!(err.contains("truncated") && err.contains("x.idx"), "{err}");

        let mut wrong = idx(&[1], &[0]);
        wrong[0] = 0x42;
        let err = parse_idx(p, &wrong).unwrap_err().to_string();
        assert!(err.contains("magic"), "{err}");

        let mut float = idx(&[1], &[0]);
        float[2] = 0x0d;
        assert!(parse_idx(p, &float).unwrap_err().to_string().contains("element type"));
        assert!(parse_idx(p, &[0, 0]).is_err());
        assert!(parse_idx(p, &idx(&[1], &[1, 2]))
            .unwrap_err()
            .to_string()
            .contains("unexpected bytes"));
    }

    #[test]
    fn reads_gzip() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.gz");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&idx(&[4], &[9, 8, 7, 6])).unwrap();
        std::fs::write(&path, enc.finish().unwrap()).unwrap();
        let a = read_idx(&path).unwrap();
        assert_eq!(a.data, vec![9, 8, 7, 6]);

        std::fs::write(&path, [0x1f, 0x8b, 1, 2, 3]).unwrap();
        assert!(read_idx(&path).unwrap_err().to_string().contains("gzip"));
    }
}
