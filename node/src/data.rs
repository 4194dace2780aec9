//! `meshtrain data import` and `meshtrain data inspect`: turning source
//! files into content-addressed blocks with a manifest, and checking them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use meshtrain_model::blocks::{BlockBuilder, Schema};
use meshtrain_model::{formats, BlockInfo, Manifest};
use serde::Serialize;

use crate::blockstore::BlockStore;
use crate::NodeError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Idx,
    Cifar10,
    Csv,
    Text,
}

#[derive(Clone, Debug)]
pub struct ImportOptions {
    pub format: Format,
    pub sources: Vec<PathBuf>,
    pub out: PathBuf,
    pub block_size: usize,
    pub name: Option<String>,
    pub label_column: Option<String>,
    /// Order records by class before packing (label-skewed blocks, for
    /// Dirichlet partitions).
    pub sort_by_label: bool,
    /// CSV and text: the share of records held out as the test split.
    pub test_fraction: f64,
    /// Text: bytes per record.
    pub seq_len: usize,
}

#[derive(Debug, Serialize)]
pub struct ImportReport {
    pub dataset_id: String,
    pub manifest: PathBuf,
    pub name: String,
    pub records: BTreeMap<String, u64>,
    pub blocks: usize,
    pub bytes: u64,
    pub source_bytes: u64,
    pub seconds: f64,
    /// Source bytes read per second.
    pub mb_per_s: f64,
}

/// Writes finished blocks to the store and remembers them by split.
struct Packer<'s> {
    store: &'s BlockStore,
    block_size: usize,
    blocks: std::cell::RefCell<Vec<(String, BlockInfo)>>,
    error: std::cell::RefCell<Option<NodeError>>,
    /// Blocks written so far (drawn only when stderr is a terminal).
    bar: indicatif::ProgressBar,
}

impl<'s> Packer<'s> {
    fn builder<'p>(&'p self, split: &str, schema: &Schema) -> BlockBuilder<'p> {
        let split = split.to_string();
        BlockBuilder::new(schema.clone(), self.block_size, move |info, bytes| {
            if let Err(e) = self.store.put_block(&info.hash, &bytes) {
                self.error.borrow_mut().get_or_insert(e);
            }
            self.blocks.borrow_mut().push((split.clone(), info));
            self.bar.inc(1);
            Ok(())
        })
    }

    fn finish(self) -> Result<BTreeMap<String, Vec<BlockInfo>>, NodeError> {
        self.bar.finish_and_clear();
        if let Some(e) = self.error.into_inner() {
            return Err(e);
        }
        let mut splits: BTreeMap<String, Vec<BlockInfo>> = BTreeMap::new();
        for (split, info) in self.blocks.into_inner() {
            splits.entry(split).or_default().push(info);
        }
        Ok(splits)
    }
}

fn idx_pairs(sources: &[PathBuf]) -> Result<Vec<(String, PathBuf, PathBuf)>, NodeError> {
    let mut files = Vec::new();
    for s in sources {
        // The system's own words ("No such file or directory"), not "no
        // IDX pairs" for a path that is not there.
        if let Err(source) = std::fs::metadata(s) {
            return Err(NodeError::Io {
                path: s.clone(),
                source,
            });
        }
        if s.is_dir() {
            let entries = std::fs::read_dir(s).map_err(|source| NodeError::Io {
                path: s.clone(),
                source,
            })?;
            files.extend(entries.filter_map(|e| e.ok()).map(|e| e.path()));
        } else {
            files.push(s.clone());
        }
    }
    let mut images: BTreeMap<String, PathBuf> = BTreeMap::new();
    let mut labels: BTreeMap<String, PathBuf> = BTreeMap::new();
    for f in files {
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        if let Some((prefix, _)) = name.split_once("-images") {
            images.insert(prefix.to_string(), f);
        } else if let Some((prefix, _)) = name.split_once("-labels") {
            labels.insert(prefix.to_string(), f);
        }
    }
    let mut pairs = Vec::new();
    for (prefix, img) in images {
        let Some(lab) = labels.remove(&prefix) else {
            return Err(NodeError::Import(format!(
                "{}: no matching {prefix}-labels file",
                img.display()
            )));
        };
        let split = if prefix.starts_with("t10k") || prefix.contains("test") {
            "test"
        } else {
            "train"
        };
        pairs.push((split.to_string(), img, lab));
    }
    if pairs.is_empty() {
        return Err(NodeError::Import(
            "no IDX image/label file pairs (NAME-images-idx3-ubyte[.gz] with NAME-labels-idx1-ubyte[.gz])".into(),
        ));
    }
    Ok(pairs)
}

/// Deterministic test split for tables: a hash of the row number.
fn row_is_test(row: u64, fraction: f64) -> bool {
    let h = blake3::hash(&row.to_le_bytes());
    let x = u64::from_le_bytes(h.as_bytes()[..8].try_into().unwrap_or([0; 8]));
    (x as f64 / u64::MAX as f64) < fraction
}

pub fn import(opts: &ImportOptions) -> Result<ImportReport, NodeError> {
    if opts.sources.is_empty() {
        return Err(NodeError::Import("no source files given".into()));
    }
    if opts.block_size == 0 {
        return Err(NodeError::Import("--block-size must be positive".into()));
    }
    let started = Instant::now();
    let store = BlockStore::open(&opts.out)?;
    let source_bytes: u64 = opts
        .sources
        .iter()
        .map(|p| {
            if p.is_dir() {
                std::fs::read_dir(p)
                    .map(|d| {
                        d.filter_map(|e| e.ok())
                            .filter_map(|e| e.metadata().ok())
                            .map(|m| m.len())
                            .sum()
                    })
                    .unwrap_or(0)
            } else {
                std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
            }
        })
        .sum();

    // Image sets are small enough to hold (and sort) in memory; tables and
    // text stream straight into blocks.
    let packer = Packer {
        store: &store,
        block_size: opts.block_size,
        blocks: Default::default(),
        error: Default::default(),
        bar: indicatif::ProgressBar::new_spinner().with_style(
            indicatif::ProgressStyle::with_template("{spinner} importing: {pos} blocks written, {elapsed}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        ),
    };
    let schema = match opts.format {
        Format::Idx | Format::Cifar10 => {
            let mut records: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
            let mut found: Option<Schema> = None;
            let collect = |split: &str, out: &mut BTreeMap<String, Vec<Vec<u8>>>, r: &[u8]| {
                out.entry(split.to_string()).or_default().push(r.to_vec());
            };
            if opts.format == Format::Idx {
                for (split, img, lab) in idx_pairs(&opts.sources)? {
                    found = Some(formats::idx_records(&img, &lab, |r| {
                        collect(&split, &mut records, r);
                        Ok(())
                    })?);
                }
            } else {
                for src in &opts.sources {
                    let name = src.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                    let split = if name.contains("test") { "test" } else { "train" };
                    found = Some(formats::cifar10_records(src, |r| {
                        collect(split, &mut records, r);
                        Ok(())
                    })?);
                }
            }
            let schema = found.ok_or_else(|| NodeError::Import("no records".into()))?;
            // One file set (MNIST's t10k alone, say): hold out a test split
            // by a hash of the record number, so training never sees it.
            if records.len() == 1 && opts.test_fraction > 0.0 {
                let all = records.pop_first().map(|(_, r)| r).unwrap_or_default();
                for (i, r) in all.into_iter().enumerate() {
                    let split = if row_is_test(i as u64, opts.test_fraction) {
                        "test"
                    } else {
                        "train"
                    };
                    records.entry(split.to_string()).or_default().push(r);
                }
            }
            for (split, mut recs) in records {
                if opts.sort_by_label {
                    recs.sort_by_key(|r| r[0]);
                }
                let mut builder = packer.builder(&split, &schema);
                for r in &recs {
                    builder.push(r)?;
                }
                builder.finish()?;
            }
            schema
        }
        Format::Csv | Format::Text => {
            let mut found: Option<Schema> = None;
            for src in &opts.sources {
                // The record layout depends on the header (or the sequence
                // length) alone; the class count is learnt while parsing.
                let provisional = match opts.format {
                    Format::Csv => {
                        let label = opts
                            .label_column
                            .as_deref()
                            .ok_or_else(|| NodeError::Import("CSV import needs --label-column NAME".into()))?;
                        Schema::Table {
                            features: read_csv_header(src)?.into_iter().filter(|c| c != label).collect(),
                            label: label.to_string(),
                            classes: 1,
                        }
                    }
                    _ => Schema::Text { seq_len: opts.seq_len },
                };
                let mut train = packer.builder("train", &provisional);
                let mut test = packer.builder("test", &provisional);
                let mut sink = |is_test: bool, r: &[u8]| if is_test { test.push(r) } else { train.push(r) };
                let parsed = match (&provisional, opts.format) {
                    (Schema::Table { label, .. }, Format::Csv) => {
                        let frac = opts.test_fraction;
                        formats::csv_records(src, label, |row| row_is_test(row, frac), &mut sink)?
                    }
                    _ => formats::text_records(src, opts.seq_len, opts.test_fraction, &mut sink)?,
                };
                train.finish()?;
                test.finish()?;
                found = Some(match (found, parsed) {
                    (
                        Some(Schema::Table { classes: a, .. }),
                        Schema::Table {
                            features,
                            label,
                            classes: b,
                        },
                    ) => Schema::Table {
                        features,
                        label,
                        classes: a.max(b),
                    },
                    (_, s) => s,
                });
            }
            found.ok_or_else(|| NodeError::Import("no records".into()))?
        }
    };
    let splits = packer.finish()?;
    let name = opts.name.clone().unwrap_or_else(|| {
        opts.sources[0]
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("dataset")
            .to_string()
    });
    let mut manifest = Manifest::new(&name, schema);
    manifest.splits = splits;
    manifest.pad_histograms();
    let id = store.put_manifest(&manifest)?;
    let seconds = started.elapsed().as_secs_f64();
    let records = manifest
        .splits
        .keys()
        .map(|s| (s.clone(), manifest.records(s)))
        .collect();
    let blocks = manifest.splits.values().map(Vec::len).sum();
    let bytes = manifest.splits.values().flatten().map(|b| b.bytes).sum();
    Ok(ImportReport {
        manifest: store.dir().join("manifests").join(format!("{id}.json")),
        dataset_id: id,
        name,
        records,
        blocks,
        bytes,
        source_bytes,
        seconds,
        mb_per_s: source_bytes as f64 / 1e6 / seconds.max(1e-9),
    })
}

fn read_csv_header(path: &Path) -> Result<Vec<String>, NodeError> {
    use std::io::BufRead;
    let f = std::fs::File::open(path).map_err(|source| NodeError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut line = String::new();
    std::io::BufReader::new(f)
        .read_line(&mut line)
        .map_err(|source| NodeError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(line
        .trim_end_matches(['\n', '\r'])
        .split(',')
        .map(|c| c.trim().to_string())
        .collect())
}

/// What `data inspect` finds.
#[derive(Debug, Default, Serialize)]
pub struct InspectReport {
    pub dataset_id: String,
    pub name: String,
    pub schema: String,
    pub blocks_checked: u64,
    pub bad_blocks: Vec<String>,
    pub records: BTreeMap<String, u64>,
    pub class_balance: BTreeMap<String, Vec<u64>>,
    /// Per channel (mean, standard deviation) of pixels in [0, 1], train split.
    pub channel_stats: Vec<(f64, f64)>,
    /// Histogram of per-image mean brightness in [0, 1], 20 bins.
    pub brightness_histogram: Vec<u64>,
    /// Histogram of per-image contrast (pixel std) in [0, 0.5], 20 bins.
    pub contrast_histogram: Vec<u64>,
    /// (min, mean, max) records per block.
    pub records_per_block: (u64, f64, u64),
}

pub const HIST_BINS: usize = 20;

/// Checks every block of a dataset and computes its statistics.
pub fn inspect(dir: &Path, id: Option<&str>) -> Result<InspectReport, NodeError> {
    let store = BlockStore::open(dir)?;
    let ids = store.manifest_ids();
    let id = match id {
        Some(i) => i.to_string(),
        None => match ids.as_slice() {
            [one] => one.clone(),
            [] => {
                return Err(NodeError::Dataset {
                    dir: dir.to_path_buf(),
                    detail: "holds no manifest".into(),
                })
            }
            _ => {
                return Err(NodeError::Dataset {
                    dir: dir.to_path_buf(),
                    detail: "holds several datasets; pass --dataset ID".into(),
                })
            }
        },
    };
    let m = store.manifest(&id)?.ok_or_else(|| NodeError::Dataset {
        dir: dir.to_path_buf(),
        detail: format!("has no manifest {id}"),
    })?;
    let mut r = InspectReport {
        dataset_id: id,
        name: m.name.clone(),
        schema: format!("{:?}", m.schema),
        brightness_histogram: vec![0; HIST_BINS],
        contrast_histogram: vec![0; HIST_BINS],
        ..Default::default()
    };
    let rs = m.record_size;
    let (channels, hw) = match m.schema {
        Schema::Image {
            channels,
            height,
            width,
            ..
        } => (channels, height * width),
        _ => (0, 0),
    };
    let mut sum = vec![0f64; channels];
    let mut sq = vec![0f64; channels];
    let mut pixels_per_channel = 0u64;
    let (mut min_r, mut max_r, mut n_blocks, mut tot_r) = (u64::MAX, 0u64, 0u64, 0u64);
    for (split, blocks) in &m.splits {
        let mut balance = vec![0u64; m.schema.classes().unwrap_or(0)];
        for b in blocks {
            r.blocks_checked += 1;
            let bytes = match store.block(&b.hash)? {
                Some(bytes) if m.verify_block(b, &bytes).is_ok() => bytes,
                _ => {
                    r.bad_blocks.push(b.hash.clone());
                    continue;
                }
            };
            let mut hist = vec![0u64; balance.len()];
            for rec in bytes.chunks_exact(rs) {
                if let Some(l) = m.schema.label(rec) {
                    if let Some(h) = hist.get_mut(l) {
                        *h += 1;
                    }
                }
                if channels > 0 && split == "train" {
                    let px = &rec[1..];
                    let mut img_sum = 0f64;
                    let mut img_sq = 0f64;
                    for c in 0..channels {
                        for &p in &px[c * hw..(c + 1) * hw] {
                            let v = p as f64 / 255.0;
                            sum[c] += v;
                            sq[c] += v * v;
                            img_sum += v;
                            img_sq += v * v;
                        }
                    }
                    let n = (channels * hw) as f64;
                    let mean = img_sum / n;
                    let std = (img_sq / n - mean * mean).max(0.0).sqrt();
                    r.brightness_histogram[((mean * HIST_BINS as f64) as usize).min(HIST_BINS - 1)] += 1;
                    r.contrast_histogram[((std * 2.0 * HIST_BINS as f64) as usize).min(HIST_BINS - 1)] += 1;
                }
            }
            if channels > 0 && split == "train" {
                pixels_per_channel += (bytes.len() / rs * hw) as u64;
            }
            if hist != b.label_histogram && m.schema.classes().is_some() {
                return Err(NodeError::Import(format!(
                    "the manifest does not match block {} ({split}): it lists labels {:?}, the block holds {:?}",
                    b.hash, b.label_histogram, hist
                )));
            }
            for (a, x) in balance.iter_mut().zip(&hist) {
                *a += x;
            }
            min_r = min_r.min(b.records);
            max_r = max_r.max(b.records);
            n_blocks += 1;
            tot_r += b.records;
        }
        r.records.insert(split.clone(), m.records(split));
        r.class_balance.insert(split.clone(), balance);
    }
    r.channel_stats = (0..channels)
        .map(|c| {
            let n = pixels_per_channel.max(1) as f64;
            let mean = sum[c] / n;
            (mean, (sq[c] / n - mean * mean).max(0.0).sqrt())
        })
        .collect();
    r.records_per_block = (
        if n_blocks == 0 { 0 } else { min_r },
        tot_r as f64 / n_blocks.max(1) as f64,
        max_r,
    );
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cifar_file(dir: &Path, name: &str, n: usize, bad_label: Option<usize>) -> PathBuf {
        let mut bytes = Vec::new();
        for i in 0..n {
            bytes.push(if bad_label == Some(i) { 77 } else { (i % 10) as u8 });
            bytes.extend((0..3072).map(|p| ((p * 7 + i) % 256) as u8));
        }
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn opts(format: Format, sources: Vec<PathBuf>, out: &Path) -> ImportOptions {
        ImportOptions {
            format,
            sources,
            out: out.to_path_buf(),
            block_size: 8 * 3073,
            name: Some("t".into()),
            label_column: Some("class".into()),
            sort_by_label: false,
            test_fraction: 0.25,
            seq_len: 8,
        }
    }

    #[test]
    fn cifar10_import_inspect_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let a = cifar_file(dir.path(), "data_batch_1.bin", 30, None);
        let t = cifar_file(dir.path(), "test_batch.bin", 10, None);
        let out = dir.path().join("store");
        let rep = import(&opts(Format::Cifar10, vec![a, t], &out)).unwrap();
        assert_eq!(rep.records["train"], 30);
        assert_eq!(rep.records["test"], 10);
        assert_eq!(rep.blocks, 4 + 2);
        let ins = inspect(&out, None).unwrap();
        assert!(ins.bad_blocks.is_empty());
        assert_eq!(ins.class_balance["train"], vec![3; 10]);
        assert_eq!(ins.channel_stats.len(), 3);
        assert_eq!(ins.records_per_block.2, 8);
        assert_eq!(ins.brightness_histogram.iter().sum::<u64>(), 30);

        // corrupt one block on disk: inspect names it
        let m = BlockStore::open(&out)
            .unwrap()
            .manifest(&rep.dataset_id)
            .unwrap()
            .unwrap();
        let victim = &m.blocks("train")[1].hash;
        std::fs::write(out.join("blocks").join(format!("{victim}.blk")), b"junk").unwrap();
        let ins = inspect(&out, None).unwrap();
        assert_eq!(ins.bad_blocks, vec![victim.clone()]);

        let bad = cifar_file(dir.path(), "data_batch_2.bin", 5, Some(3));
        let err = import(&opts(Format::Cifar10, vec![bad], &dir.path().join("s2")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("data_batch_2.bin") && err.contains("label 77"), "{err}");
    }

    #[test]
    fn a_source_that_does_not_exist_is_named_as_missing() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("gone");
        for format in [Format::Idx, Format::Cifar10, Format::Csv, Format::Text] {
            let err = import(&opts(format, vec![gone.clone()], &dir.path().join("s")))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("gone") && err.contains("No such file"),
                "{format:?}: {err}"
            );
        }
    }

    #[test]
    fn csv_import_splits_rows_and_checks_the_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("fraud.csv");
        let mut text = String::from("amount,class,hour\n");
        for i in 0..200 {
            text.push_str(&format!("{}.5,{},{}\n", i, i % 2, i % 24));
        }
        std::fs::write(&csv, text).unwrap();
        let out = dir.path().join("store");
        let rep = import(&opts(Format::Csv, vec![csv], &out)).unwrap();
        let (tr, te) = (rep.records["train"], rep.records["test"]);
        assert_eq!(tr + te, 200);
        assert!((30..70).contains(&te), "{te}");
        let ins = inspect(&out, None).unwrap();
        assert_eq!(ins.class_balance["train"].len(), 2);

        // A manifest that does not match its blocks is named.
        let store = BlockStore::open(&out).unwrap();
        let mut m = store.manifest(&rep.dataset_id).unwrap().unwrap();
        let h = &mut m.splits.get_mut("train").unwrap()[0].label_histogram;
        h[0] += 1;
        h[1] -= 1;
        let id = store.put_manifest(&m).unwrap();
        let err = inspect(&out, Some(&id)).unwrap_err().to_string();
        assert!(err.contains("does not match block"), "{err}");
    }
}
