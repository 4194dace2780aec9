//! Source formats, parsed into block records (see [`crate::blocks::Schema`]):
//! IDX (MNIST, Fashion-MNIST), CIFAR-10 binary, CSV with a label column, and
//! plain text. Every error names the file and the byte offset or line.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use crate::blocks::Schema;
use crate::idx::read_idx;
use crate::{ModelError, Result};

fn bad(path: &Path, offset: u64, detail: impl Into<String>) -> ModelError {
    ModelError::BadDataFile {
        path: PathBuf::from(path),
        offset,
        detail: detail.into(),
    }
}

/// An IDX image file and its label file, as `[label][pixels]` records.
pub fn idx_records(images: &Path, labels: &Path, mut sink: impl FnMut(&[u8]) -> Result<()>) -> Result<Schema> {
    let img = read_idx(images)?;
    let lab = read_idx(labels)?;
    if img.dims.len() != 3 {
        return Err(bad(
            images,
            3,
            format!("expected 3 dimensions (count, rows, cols), got {:?}", img.dims),
        ));
    }
    if lab.dims.len() != 1 || lab.dims[0] != img.dims[0] {
        return Err(bad(
            labels,
            4,
            format!("label dims {:?} do not match {} images", lab.dims, img.dims[0]),
        ));
    }
    let (h, w) = (img.dims[1], img.dims[2]);
    let classes = 10;
    let mut record = vec![0u8; 1 + h * w];
    for (i, label) in lab.data.iter().enumerate() {
        if *label as usize >= classes {
            return Err(bad(
                labels,
                8 + i as u64,
                format!("label {label} is out of range (0..{classes})"),
            ));
        }
        record[0] = *label;
        record[1..].copy_from_slice(&img.data[i * h * w..(i + 1) * h * w]);
        sink(&record)?;
    }
    Ok(Schema::Image {
        channels: 1,
        height: h,
        width: w,
        classes,
    })
}

pub const CIFAR10_RECORD: usize = 3073;

/// The schema of CIFAR-10's binary batches: 1 label byte, then 3x32x32
/// pixels, channel-major (red, green, blue planes).
pub fn cifar10_schema() -> Schema {
    Schema::Image {
        channels: 3,
        height: 32,
        width: 32,
        classes: 10,
    }
}

/// A CIFAR-10 binary batch file: its records are already in block layout.
pub fn cifar10_records(path: &Path, mut sink: impl FnMut(&[u8]) -> Result<()>) -> Result<Schema> {
    let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if bytes.is_empty() {
        return Err(bad(path, 0, "empty file"));
    }
    if bytes.len() % CIFAR10_RECORD != 0 {
        let whole = bytes.len() / CIFAR10_RECORD;
        return Err(bad(
            path,
            (whole * CIFAR10_RECORD) as u64,
            format!(
                "truncated: record {whole} has {} of its 3073 bytes",
                bytes.len() % CIFAR10_RECORD
            ),
        ));
    }
    for (i, rec) in bytes.chunks_exact(CIFAR10_RECORD).enumerate() {
        if rec[0] > 9 {
            return Err(bad(
                path,
                (i * CIFAR10_RECORD) as u64,
                format!("label {} of record {i} is out of range (0..10)", rec[0]),
            ));
        }
        sink(rec)?;
    }
    Ok(cifar10_schema())
}

/// A CSV file with a header row. `label` names the column holding the class
/// (a non-negative integer); every other column is a numeric feature.
/// `is_test(row)` sends a row to the test split.
pub fn csv_records(
    path: &Path,
    label: &str,
    is_test: impl Fn(u64) -> bool,
    mut sink: impl FnMut(bool, &[u8]) -> Result<()>,
) -> Result<Schema> {
    let file = std::fs::File::open(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut line = String::new();
    let line_err = |n: u64, detail: String| ModelError::BadDataLine {
        path: path.to_path_buf(),
        line: n,
        detail,
    };
    let read = |reader: &mut BufReader<std::fs::File>, line: &mut String, n: u64| -> Result<bool> {
        line.clear();
        let got = reader.read_line(line).map_err(|e| line_err(n, e.to_string()))?;
        Ok(got > 0)
    };
    if !read(&mut reader, &mut line, 1)? {
        return Err(line_err(1, "empty file, expected a header row".into()));
    }
    let header: Vec<String> = line
        .trim_end_matches(['\n', '\r'])
        .split(',')
        .map(|c| c.trim().to_string())
        .collect();
    let label_col = header
        .iter()
        .position(|c| c == label)
        .ok_or_else(|| line_err(1, format!("no column named `{label}` (columns: {})", header.join(", "))))?;
    let features: Vec<String> = header
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != label_col)
        .map(|(_, c)| c.clone())
        .collect();
    if features.is_empty() {
        return Err(line_err(1, "no feature columns besides the label".into()));
    }
    let mut record = vec![0u8; 2 + 4 * features.len()];
    let mut classes = 0usize;
    let mut n = 1u64;
    let mut row = 0u64;
    while read(&mut reader, &mut line, n + 1)? {
        n += 1;
        let text = line.trim_end_matches(['\n', '\r']);
        if text.trim().is_empty() {
            continue;
        }
        let cells: Vec<&str> = text.split(',').collect();
        if cells.len() != header.len() {
            return Err(line_err(
                n,
                format!("{} cells, the header has {}", cells.len(), header.len()),
            ));
        }
        let mut f = 0;
        for (i, cell) in cells.iter().enumerate() {
            let cell = cell.trim();
            if i == label_col {
                let l: u32 = cell.parse().map_err(|_| {
                    line_err(
                        n,
                        format!("label `{cell}` is not a class index (a non-negative integer)"),
                    )
                })?;
                if l > u16::MAX as u32 {
                    return Err(line_err(n, format!("label {l} is out of range (at most 65535)")));
                }
                record[..2].copy_from_slice(&(l as u16).to_le_bytes());
                classes = classes.max(l as usize + 1);
            } else {
                let v: f32 = cell
                    .parse()
                    .map_err(|_| line_err(n, format!("column `{}`: `{cell}` is not a number", header[i])))?;
                if !v.is_finite() {
                    return Err(line_err(n, format!("column `{}`: `{cell}` is not finite", header[i])));
                }
                record[2 + 4 * f..6 + 4 * f].copy_from_slice(&v.to_le_bytes());
                f += 1;
            }
        }
        sink(is_test(row), &record)?;
        row += 1;
    }
    if row == 0 {
        return Err(line_err(n, "no data rows".into()));
    }
    Ok(Schema::Table {
        features,
        label: label.to_string(),
        classes,
    })
}

/// Plain text cut into `seq_len`-byte records (a trailing partial record is
/// dropped). The last `test_fraction` of the text is the test split, kept
/// contiguous so that no test text leaks into training windows.
pub fn text_records(
    path: &Path,
    seq_len: usize,
    test_fraction: f64,
    mut sink: impl FnMut(bool, &[u8]) -> Result<()>,
) -> Result<Schema> {
    if seq_len == 0 {
        return Err(bad(path, 0, "sequence length 0"));
    }
    let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let records = bytes.len() / seq_len;
    if records < 2 {
        return Err(bad(
            path,
            bytes.len() as u64,
            format!("{} bytes make fewer than two {seq_len}-byte records", bytes.len()),
        ));
    }
    let test_from = records - ((records as f64 * test_fraction).round() as usize).clamp(1, records - 1);
    for (i, rec) in bytes.chunks_exact(seq_len).enumerate() {
        sink(i >= test_from, rec)?;
    }
    Ok(Schema::Text { seq_len })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cifar10_files_written_in_the_real_layout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data_batch_1.bin");
        let mut bytes = Vec::new();
        for i in 0..5u8 {
            bytes.push(i % 10);
            bytes.extend((0..3072).map(|p| (p % 251) as u8 ^ i));
        }
        std::fs::write(&path, &bytes).unwrap();
        let mut recs = Vec::new();
        let schema = cifar10_records(&path, |r| {
            recs.push(r.to_vec());
            Ok(())
        })
        .unwrap();
        assert_eq!(schema.record_size(), 3073);
        assert_eq!(recs.len(), 5);
        assert_eq!(recs[3][0], 3);

        std::fs::write(&path, &bytes[..3073 * 2 + 100]).unwrap();
        let err = cifar10_records(&path, |_| Ok(())).unwrap_err().to_string();
        assert!(err.contains("truncated") && err.contains("offset 6146"), "{err}");
        bytes[3073] = 12;
        std::fs::write(&path, &bytes).unwrap();
        let err = cifar10_records(&path, |_| Ok(())).unwrap_err().to_string();
        assert!(err.contains("label 12") && err.contains("offset 3073"), "{err}");
    }

    #[test]
    fn csv_parses_and_names_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.csv");
        std::fs::write(&path, "amount,class,age\n1.5,0,30\n2.5,1,40\n").unwrap();
        let mut rows = Vec::new();
        let schema = csv_records(
            &path,
            "class",
            |_| false,
            |_, r| {
                rows.push(r.to_vec());
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(
            schema,
            Schema::Table {
                features: vec!["amount".into(), "age".into()],
                label: "class".into(),
                classes: 2
            }
        );
        assert_eq!(rows[1][..2], [1, 0]);
        assert_eq!(f32::from_le_bytes(rows[1][2..6].try_into().unwrap()), 2.5);

        for (body, want) in [
            ("amount,class,age\n1,0\n", "line 2: 2 cells"),
            ("amount,class,age\n1,0,x\n", "line 2: column `age`: `x` is not a number"),
            ("amount,class,age\n1,0,3\n1,1.5,3\n", "line 3: label `1.5`"),
            ("amount,class,age\n1,-1,3\n", "label `-1`"),
            ("a,b\n1,2\n", "no column named `class`"),
            ("", "empty file"),
        ] {
            std::fs::write(&path, body).unwrap();
            let err = csv_records(&path, "class", |_| false, |_, _| Ok(()))
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{body:?}: {err}");
            assert!(err.contains("t.csv"), "{err}");
            // A line is where a person looks; no byte offset beside it.
            assert!(!err.contains("offset"), "{err}");
        }
    }

    #[test]
    fn text_is_windowed_with_a_contiguous_test_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.txt");
        std::fs::write(&path, "abcdefghijklmnopqrstuvwxyz").unwrap();
        let mut split = Vec::new();
        text_records(&path, 5, 0.2, |test, r| {
            split.push((test, r.to_vec()));
            Ok(())
        })
        .unwrap();
        assert_eq!(split.len(), 5);
        assert_eq!(split.iter().filter(|(t, _)| *t).count(), 1);
        assert!(split[4].0 && split[4].1 == b"uvwxy");
    }
}
