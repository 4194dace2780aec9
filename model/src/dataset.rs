//! In-memory labelled datasets and the shards nodes train on.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::idx::read_idx;
use crate::{ModelError, Result};

/// The shape of one record's input.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageShape {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

impl ImageShape {
    pub fn len(&self) -> usize {
        self.channels * self.height * self.width
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Labelled images, pixels as bytes (scaled to [0, 1] and normalised per
/// channel when batched).
#[derive(Clone, Debug)]
pub struct Dataset {
    pub name: String,
    pub shape: ImageShape,
    pub classes: usize,
    pixels: Vec<u8>,
    labels: Vec<u8>,
}

impl Dataset {
    pub fn new(name: &str, shape: ImageShape, classes: usize, pixels: Vec<u8>, labels: Vec<u8>) -> Result<Self> {
        let bad = |detail: String| ModelError::BadDataset {
            name: name.to_string(),
            detail,
        };
        if shape.is_empty() {
            return Err(bad("records have no pixels".into()));
        }
        if pixels.len() != labels.len() * shape.len() {
            return Err(bad(format!(
                "{} pixel bytes for {} labels of {} pixels each",
                pixels.len(),
                labels.len(),
                shape.len()
            )));
        }
        if let Some((i, l)) = labels.iter().enumerate().find(|(_, &l)| l as usize >= classes) {
            return Err(bad(format!(
                "label {l} of record {i} is out of range (classes: {classes})"
            )));
        }
        Ok(Self {
            name: name.to_string(),
            shape,
            classes,
            pixels,
            labels,
        })
    }

    /// Reads an IDX image file and its IDX label file (gzipped or not).
    pub fn from_idx(name: &str, images: &Path, labels: &Path, classes: usize) -> Result<Self> {
        let img = read_idx(images)?;
        let lab = read_idx(labels)?;
        if img.dims.len() != 3 {
            return Err(ModelError::BadDataFile {
                path: images.to_path_buf(),
                offset: 3,
                detail: format!("expected 3 dimensions (count, rows, cols), got {:?}", img.dims),
            });
        }
        if lab.dims.len() != 1 || lab.dims[0] != img.dims[0] {
            return Err(ModelError::BadDataFile {
                path: labels.to_path_buf(),
                offset: 4,
                detail: format!("label dims {:?} do not match {} images", lab.dims, img.dims[0]),
            });
        }
        if let Some(i) = lab.data.iter().position(|&l| l as usize >= classes) {
            return Err(ModelError::BadDataFile {
                path: labels.to_path_buf(),
                offset: 8 + i as u64,
                detail: format!("label {} is out of range (classes: {classes})", lab.data[i]),
            });
        }
        let shape = ImageShape {
            channels: 1,
            height: img.dims[1],
            width: img.dims[2],
        };
        Self::new(name, shape, classes, img.data, lab.data)
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn pixels(&self) -> &[u8] {
        &self.pixels
    }

    pub fn labels(&self) -> &[u8] {
        &self.labels
    }

    /// Shard `index` of `count`: every `count`-th record from `index`, so
    /// every shard sees the same class mix.
    pub fn shard(&self, index: usize, count: usize) -> Result<Self> {
        if count == 0 || index >= count {
            return Err(ModelError::BadDataset {
                name: self.name.clone(),
                detail: format!("shard {index}/{count} does not exist"),
            });
        }
        let rec = self.shape.len();
        let picks: Vec<usize> = (index..self.len()).step_by(count).collect();
        self.select(&picks, &format!("{}[{index}/{count}]", self.name), rec)
    }

    /// The records at `picks`, in that order.
    pub fn subset(&self, picks: &[usize], name: &str) -> Result<Self> {
        self.select(picks, name, self.shape.len())
    }

    fn select(&self, picks: &[usize], name: &str, rec: usize) -> Result<Self> {
        let mut pixels = Vec::with_capacity(picks.len() * rec);
        let mut labels = Vec::with_capacity(picks.len());
        for &i in picks {
            if i >= self.len() {
                return Err(ModelError::BadDataset {
                    name: self.name.clone(),
                    detail: format!("record {i} out of {}", self.len()),
                });
            }
            pixels.extend_from_slice(&self.pixels[i * rec..(i + 1) * rec]);
            labels.push(self.labels[i]);
        }
        Self::new(name, self.shape, self.classes, pixels, labels)
    }

    /// The block schema of these records.
    pub fn schema(&self) -> crate::blocks::Schema {
        crate::blocks::Schema::Image {
            channels: self.shape.channels,
            height: self.shape.height,
            width: self.shape.width,
            classes: self.classes,
        }
    }

    /// The records in block layout (`[label][pixels]`).
    pub fn to_records(&self) -> Vec<u8> {
        let rec = self.shape.len();
        let mut out = Vec::with_capacity(self.len() * (rec + 1));
        for (i, l) in self.labels.iter().enumerate() {
            out.push(*l);
            out.extend_from_slice(&self.pixels[i * rec..(i + 1) * rec]);
        }
        out
    }

    pub fn label_histogram(&self) -> Vec<u64> {
        let mut h = vec![0u64; self.classes];
        for &l in &self.labels {
            h[l as usize] += 1;
        }
        h
    }

    /// A content hash over shape, classes, pixels and labels.
    pub fn fingerprint(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new_derive_key("meshtrain dataset v1");
        for v in [self.shape.channels, self.shape.height, self.shape.width, self.classes] {
            h.update(&(v as u64).to_le_bytes());
        }
        h.update(&self.pixels);
        h.update(&self.labels);
        *h.finalize().as_bytes()
    }

    /// Per-channel mean and standard deviation of pixels scaled to [0, 1].
    pub fn channel_stats(&self) -> Vec<(f64, f64)> {
        let c = self.shape.channels;
        let hw = self.shape.height * self.shape.width;
        let mut sum = vec![0f64; c];
        let mut sq = vec![0f64; c];
        for rec in self.pixels.chunks_exact(self.shape.len()) {
            for ch in 0..c {
                for &p in &rec[ch * hw..(ch + 1) * hw] {
                    let v = p as f64 / 255.0;
                    sum[ch] += v;
                    sq[ch] += v * v;
                }
            }
        }
        let n = (self.len() * hw).max(1) as f64;
        (0..c)
            .map(|ch| {
                let mean = sum[ch] / n;
                (mean, (sq[ch] / n - mean * mean).max(0.0).sqrt())
            })
            .collect()
    }
}

/// A named, well-known dataset on disk: its train and test splits.
pub struct DataSplits {
    pub train: Dataset,
    pub test: Dataset,
}

impl DataSplits {
    /// Fashion-MNIST (or MNIST) as Debian ships it: four gzipped IDX files.
    pub fn idx_dir(name: &str, dir: &Path) -> Result<Self> {
        let file = |stem: &str| -> Result<std::path::PathBuf> {
            for candidate in [format!("{stem}.gz"), stem.to_string()] {
                let p = dir.join(&candidate);
                if p.exists() {
                    return Ok(p);
                }
            }
            Err(ModelError::BadDataset {
                name: name.to_string(),
                detail: format!("{} has no {stem}[.gz]", dir.display()),
            })
        };
        let train = Dataset::from_idx(
            &format!("{name}/train"),
            &file("train-images-idx3-ubyte")?,
            &file("train-labels-idx1-ubyte")?,
            10,
        )?;
        let test = Dataset::from_idx(
            &format!("{name}/test"),
            &file("t10k-images-idx3-ubyte")?,
            &file("t10k-labels-idx1-ubyte")?,
            10,
        )?;
        Ok(Self { train, test })
    }

    /// Hash of both splits: what a RunSpec names as its dataset.
    pub fn fingerprint(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new_derive_key("meshtrain data splits v1");
        h.update(&self.train.fingerprint());
        h.update(&self.test.fingerprint());
        *h.finalize().as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Dataset {
        let shape = ImageShape {
            channels: 1,
            height: 2,
            width: 2,
        };
        let pixels = (0..40).map(|i| i as u8).collect();
        let labels = (0..10).map(|i| (i % 3) as u8).collect();
        Dataset::new("tiny", shape, 3, pixels, labels).unwrap()
    }

    #[test]
    fn shards_partition_the_records() {
        let d = tiny();
        let shards: Vec<_> = (0..3).map(|i| d.shard(i, 3).unwrap()).collect();
        assert_eq!(shards.iter().map(|s| s.len()).sum::<usize>(), d.len());
        assert_eq!(shards[1].pixels()[..4], [4, 5, 6, 7]);
        assert!(d.shard(3, 3).is_err());
    }

    #[test]
    fn out_of_range_label_is_named() {
        let shape = ImageShape {
            channels: 1,
            height: 1,
            width: 1,
        };
        let err = Dataset::new("x", shape, 2, vec![0, 0], vec![0, 5])
            .unwrap_err()
            .to_string();
        assert!(err.contains("label 5 of record 1"), "{err}");
    }

    #[test]
    fn histogram_and_fingerprint() {
        let d = tiny();
        assert_eq!(d.label_histogram(), vec![4, 3, 3]);
        let mut other = d.clone();
        other.labels[0] = 1;
        assert_ne!(d.fingerprint(), other.fingerprint());
    }
}
