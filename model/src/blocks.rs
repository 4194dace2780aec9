//! HDFS-style blocks: fixed-size runs of whole records, named by their
//! blake3 hash, and the manifest that lists them. The dataset id is the
//! manifest's hash, so a dataset is content-addressed end to end and needs
//! no name node.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{ModelError, Result};

pub const MANIFEST_VERSION: u32 = 1;
/// 4 MiB, not HDFS's 64 MiB: the datasets a mesh trains on here are tens
/// of MB (Fashion-MNIST's training split is 47 MB), and at 64 MiB they are
/// one block, which every member must fetch whole to train on its part.
pub const DEFAULT_BLOCK_SIZE: usize = 4 << 20;

/// What one record is, and how it is laid out in a block.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Schema {
    /// `[label u8][pixels: channels x height x width u8, channel-major]`.
    Image {
        channels: usize,
        height: usize,
        width: usize,
        classes: usize,
    },
    /// `[label u16 LE][features: f32 LE each]`.
    Table {
        features: Vec<String>,
        label: String,
        classes: usize,
    },
    /// `[seq_len bytes of text]` (labels are the next bytes).
    Text { seq_len: usize },
}

impl Schema {
    pub fn record_size(&self) -> usize {
        match self {
            Schema::Image {
                channels,
                height,
                width,
                ..
            } => channels
                .saturating_mul(*height)
                .saturating_mul(*width)
                .saturating_add(1),
            Schema::Table { features, .. } => features.len().saturating_mul(4).saturating_add(2),
            Schema::Text { seq_len } => *seq_len,
        }
    }

    pub fn classes(&self) -> Option<usize> {
        match self {
            Schema::Image { classes, .. } | Schema::Table { classes, .. } => Some(*classes),
            Schema::Text { .. } => None,
        }
    }

    /// The class of a record (None for text).
    pub fn label(&self, record: &[u8]) -> Option<usize> {
        match self {
            Schema::Image { .. } => record.first().map(|l| *l as usize),
            Schema::Table { .. } => (record.len() >= 2).then(|| u16::from_le_bytes([record[0], record[1]]) as usize),
            Schema::Text { .. } => None,
        }
    }

    fn check(&self) -> std::result::Result<(), String> {
        match self.record_size() {
            0 => return Err("records of zero bytes".into()),
            n if n > MAX_RECORD_SIZE => return Err(format!("records of {n} bytes (at most {MAX_RECORD_SIZE})")),
            _ => {}
        }
        match self {
            Schema::Image { classes, .. } if *classes == 0 || *classes > 256 => {
                Err(format!("{classes} classes (1..=256)"))
            }
            Schema::Table { classes, features, .. } if *classes == 0 || *classes > 65536 || features.is_empty() => {
                Err("a table needs features and 1..=65536 classes".into())
            }
            _ => Ok(()),
        }
    }
}

/// The largest record a schema may describe (a 4096 x 4096 RGB image is
/// 48 MiB); larger sizes are a corrupt or hostile manifest.
const MAX_RECORD_SIZE: usize = 1 << 30;

/// One block, as the manifest lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockInfo {
    /// blake3 of the block's bytes, hex.
    pub hash: String,
    pub bytes: u64,
    pub records: u64,
    /// Records per class (empty for text).
    pub label_histogram: Vec<u64>,
}

/// Lists a dataset's blocks by split (`train`, `test`). Its hash is the
/// dataset id that a RunSpec names.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub version: u32,
    pub name: String,
    pub schema: Schema,
    pub record_size: usize,
    pub splits: BTreeMap<String, Vec<BlockInfo>>,
}

pub fn block_hash(bytes: &[u8]) -> String {
    blake3::Hasher::new_derive_key("meshtrain data block v1")
        .update(bytes)
        .finalize()
        .to_hex()
        .to_string()
}

impl Manifest {
    pub fn new(name: &str, schema: Schema) -> Self {
        Self {
            version: MANIFEST_VERSION,
            name: name.to_string(),
            record_size: schema.record_size(),
            schema,
            splits: BTreeMap::new(),
        }
    }

    /// Canonical bytes: JSON in declaration order (maps are sorted).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a manifest always serialises")
    }

    /// The dataset id.
    pub fn id(&self) -> String {
        blake3::Hasher::new_derive_key("meshtrain manifest v1")
            .update(&self.to_bytes())
            .finalize()
            .to_hex()
            .to_string()
    }

    /// Parses and checks a manifest (from disk or from a peer).
    pub fn from_bytes(bytes: &[u8], origin: &str) -> Result<Self> {
        let bad = |detail: String| ModelError::BadDataset {
            name: origin.to_string(),
            detail,
        };
        if bytes.len() > 64 << 20 {
            return Err(bad("manifest larger than 64 MiB".into()));
        }
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| bad(format!("not a manifest: {e}")))?;
        if m.version != MANIFEST_VERSION {
            return Err(bad(format!(
                "manifest version {} (this build reads {MANIFEST_VERSION})",
                m.version
            )));
        }
        m.schema.check().map_err(|e| bad(format!("schema: {e}")))?;
        if m.record_size != m.schema.record_size() {
            return Err(bad(format!(
                "record size {} does not match the schema's {}",
                m.record_size,
                m.schema.record_size()
            )));
        }
        for (split, blocks) in &m.splits {
            let total = blocks.iter().try_fold(0u64, |t, b| t.checked_add(b.records));
            if total.is_none() {
                return Err(bad(format!("{split}: more records than a u64 counts")));
            }
            for b in blocks {
                if b.records.checked_mul(m.record_size as u64) != Some(b.bytes) {
                    return Err(bad(format!(
                        "{split} block {}: {} bytes for {} records",
                        b.hash, b.bytes, b.records
                    )));
                }
                if b.hash.len() != 64 || !b.hash.bytes().all(|c| c.is_ascii_hexdigit()) {
                    return Err(bad(format!(
                        "{split}: block name `{}` is not a blake3 hex hash",
                        b.hash
                    )));
                }
                if let Some(c) = m.schema.classes() {
                    let sum = b.label_histogram.iter().try_fold(0u64, |acc, x| acc.checked_add(*x));
                    if b.label_histogram.len() != c || sum != Some(b.records) {
                        return Err(bad(format!(
                            "{split} block {}: label histogram does not add up",
                            b.hash
                        )));
                    }
                }
            }
        }
        Ok(m)
    }

    pub fn blocks(&self, split: &str) -> &[BlockInfo] {
        self.splits.get(split).map(Vec::as_slice).unwrap_or(&[])
    }

    // Saturating: `from_bytes` refuses a manifest whose totals overflow,
    // but one built in memory is not checked.
    pub fn records(&self, split: &str) -> u64 {
        self.blocks(split).iter().fold(0u64, |t, b| t.saturating_add(b.records))
    }

    pub fn label_histogram(&self, split: &str) -> Vec<u64> {
        let mut h = vec![0u64; self.schema.classes().unwrap_or(0)];
        for b in self.blocks(split) {
            for (a, x) in h.iter_mut().zip(&b.label_histogram) {
                *a = a.saturating_add(*x);
            }
        }
        h
    }

    /// Checks a block's bytes against its listing.
    pub fn verify_block(&self, info: &BlockInfo, bytes: &[u8]) -> Result<()> {
        let bad = |detail: String| ModelError::BadDataset {
            name: format!("{} block {}", self.name, info.hash),
            detail,
        };
        if bytes.len() as u64 != info.bytes {
            return Err(bad(format!("{} bytes, the manifest says {}", bytes.len(), info.bytes)));
        }
        let got = block_hash(bytes);
        if got != info.hash {
            return Err(bad(format!("content hashes to {got}")));
        }
        Ok(())
    }
}

/// Packs records into blocks of at most `block_size` bytes (whole records
/// only) and hands each finished block to `emit`.
pub struct BlockBuilder<'a> {
    schema: Schema,
    target: usize,
    buf: Vec<u8>,
    histogram: Vec<u64>,
    emit: Box<dyn FnMut(BlockInfo, Vec<u8>) -> Result<()> + 'a>,
}

impl<'a> BlockBuilder<'a> {
    pub fn new(schema: Schema, block_size: usize, emit: impl FnMut(BlockInfo, Vec<u8>) -> Result<()> + 'a) -> Self {
        let rs = schema.record_size();
        // At least one record per block, whatever the requested size.
        let target = (block_size / rs).max(1) * rs;
        let classes = schema.classes().unwrap_or(0);
        Self {
            schema,
            target,
            buf: Vec::with_capacity(target.min(64 << 20)),
            histogram: vec![0; classes],
            emit: Box::new(emit),
        }
    }

    pub fn push(&mut self, record: &[u8]) -> Result<()> {
        debug_assert_eq!(record.len(), self.schema.record_size());
        if let Some(l) = self.schema.label(record) {
            // Tables learn their class count while parsing: grow as needed.
            if l >= self.histogram.len() {
                self.histogram.resize(l + 1, 0);
            }
            self.histogram[l] += 1;
        }
        self.buf.extend_from_slice(record);
        if self.buf.len() >= self.target {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let bytes = std::mem::replace(&mut self.buf, Vec::with_capacity(self.target.min(64 << 20)));
        let info = BlockInfo {
            hash: block_hash(&bytes),
            bytes: bytes.len() as u64,
            records: (bytes.len() / self.schema.record_size()) as u64,
            label_histogram: std::mem::replace(&mut self.histogram, vec![0; self.schema.classes().unwrap_or(0)]),
        };
        (self.emit)(info, bytes)
    }

    pub fn finish(mut self) -> Result<()> {
        self.flush()
    }
}

impl Manifest {
    /// Pads every block's histogram to the schema's class count (after a
    /// table import has learnt it).
    pub fn pad_histograms(&mut self) {
        let c = self.schema.classes().unwrap_or(0);
        for blocks in self.splits.values_mut() {
            for b in blocks {
                b.label_histogram.resize(c, 0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> Schema {
        Schema::Image {
            channels: 1,
            height: 2,
            width: 2,
            classes: 3,
        }
    }

    #[test]
    fn blocks_hold_whole_records_and_histograms() {
        let mut blocks = Vec::new();
        let mut b = BlockBuilder::new(image(), 12, |info, bytes| {
            blocks.push((info, bytes));
            Ok(())
        });
        for i in 0..7u8 {
            b.push(&[i % 3, i, i, i, i]).unwrap();
        }
        b.finish().unwrap();
        // 12 bytes fit two 5-byte records
        assert_eq!(blocks.len(), 4);
        assert!(blocks
            .iter()
            .all(|(i, bytes)| bytes.len() as u64 == i.bytes && i.bytes % 5 == 0));
        assert_eq!(blocks[0].0.label_histogram, vec![1, 1, 0]);
        assert_eq!(blocks[3].0.records, 1);
    }

    #[test]
    fn manifest_round_trip_id_and_verification() {
        let mut m = Manifest::new("tiny", image());
        let bytes = vec![0u8, 1, 2, 3, 4];
        m.splits.insert(
            "train".into(),
            vec![BlockInfo {
                hash: block_hash(&bytes),
                bytes: 5,
                records: 1,
                label_histogram: vec![1, 0, 0],
            }],
        );
        let back = Manifest::from_bytes(&m.to_bytes(), "t").unwrap();
        assert_eq!(back, m);
        assert_eq!(back.id(), m.id());
        m.verify_block(&m.blocks("train")[0], &bytes).unwrap();
        assert!(m.verify_block(&m.blocks("train")[0], &[0, 1, 2, 3, 5]).is_err());

        let mut wrong = m.clone();
        wrong.splits.get_mut("train").unwrap()[0].records = 2;
        assert!(Manifest::from_bytes(&wrong.to_bytes(), "t")
            .unwrap_err()
            .to_string()
            .contains("bytes for 2 records"));
        assert!(Manifest::from_bytes(b"{}", "t").is_err());
    }

    #[test]
    fn sizes_and_totals_that_overflow_are_refused_not_wrapped() {
        let huge = Schema::Image {
            channels: usize::MAX / 2,
            height: 3,
            width: 1,
            classes: 3,
        };
        let mut m = Manifest::new("huge", huge);
        m.record_size = m.schema.record_size();
        let err = Manifest::from_bytes(&m.to_bytes(), "t").unwrap_err().to_string();
        assert!(err.contains("records of"), "{err}");

        // Two blocks whose records add up past u64 (records of one byte).
        let text = Schema::Text { seq_len: 1 };
        let mut m = Manifest::new("many", text);
        let half = u64::MAX / 2 + 1;
        let block = |c: char| BlockInfo {
            hash: c.to_string().repeat(64),
            bytes: half,
            records: half,
            label_histogram: Vec::new(),
        };
        m.splits.insert("train".into(), vec![block('a'), block('b')]);
        let err = Manifest::from_bytes(&m.to_bytes(), "t").unwrap_err().to_string();
        assert!(err.contains("more records than"), "{err}");
        assert_eq!(m.records("train"), u64::MAX);
    }
}
