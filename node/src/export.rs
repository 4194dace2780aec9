//! The trained model, taken home: a node writes the final anchor it ended
//! on (`final-anchor.safetensors`: one flat vector with its hash, and its
//! model's layout: names, shapes, which tensors are integers), and
//! `meshtrain model export` turns it into a safetensors file whose tensors
//! carry the names and shapes PyTorch uses, so the original module loads it
//! with `load_state_dict`. The layout travels with the vector, so exporting
//! needs neither the model's file nor libtorch.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use meshtrain_ledger::{RunId, WeightsHash};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use crate::{NodeError, RunSpec};

pub const FINAL_FILE: &str = "final-anchor.safetensors";

fn bad(path: &Path, detail: impl Into<String>) -> NodeError {
    NodeError::Checkpoint {
        path: path.to_path_buf(),
        detail: detail.into(),
    }
}

/// One tensor of a model's flat vector, in layout order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Tensor {
    pub name: String,
    pub shape: Vec<usize>,
    /// Held as integers by the model (exported as int64).
    pub integer: bool,
}

/// The tensors of a model, in the order its vector lays them out.
pub fn layout_of(layout: &meshtrain_model::Layout) -> Vec<Tensor> {
    layout
        .params
        .iter()
        .map(|p| Tensor {
            name: p.name.clone(),
            shape: p.shape.iter().map(|&d| d.max(0) as usize).collect(),
            integer: p.integer,
        })
        .collect()
}

/// Writes the anchor a node ended its run on (temp file and rename: a crash
/// leaves the last one or none).
pub fn save_final(dir: &Path, run_id: &RunId, round: u64, anchor: &[f32], layout: &[Tensor]) -> Result<(), NodeError> {
    let path = dir.join(FINAL_FILE);
    let bytes = crate::checkpoint::bytes_of(anchor);
    let view = TensorView::new(Dtype::F32, vec![anchor.len()], &bytes).map_err(|e| bad(&path, e.to_string()))?;
    let meta: HashMap<String, String> = [
        ("run_id".to_string(), run_id.to_string()),
        ("round".to_string(), round.to_string()),
        ("anchor_hash".to_string(), WeightsHash::of_f32(anchor).to_string()),
        (
            "layout".to_string(),
            serde_json::to_string(layout).map_err(|e| bad(&path, e.to_string()))?,
        ),
    ]
    .into();
    let out = safetensors::tensor::serialize([("anchor", view)], Some(meta))
        .map_err(|e| bad(&path, format!("serialising: {e}")))?;
    crate::blockstore::write_atomic(&path, &out)
}

/// The final anchor a node wrote, checked against the hash beside it.
pub struct FinalAnchor {
    pub run_id: RunId,
    pub round: u64,
    pub anchor: Vec<f32>,
    pub hash: WeightsHash,
    pub layout: Vec<Tensor>,
}

pub fn load_final(dir: &Path) -> Result<FinalAnchor, NodeError> {
    let path = dir.join(FINAL_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(bad(&path, "no such file: the node has not finished a run here"))
        }
        Err(source) => return Err(NodeError::Io { path, source }),
    };
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(&path, e.to_string()))?;
    let meta = meta.metadata().clone().unwrap_or_default();
    let get = |k: &str| {
        meta.get(k)
            .cloned()
            .ok_or_else(|| bad(&path, format!("no `{k}` in its metadata")))
    };
    let run_id: RunId = get("run_id")?.parse().map_err(|e| bad(&path, format!("run id: {e}")))?;
    let round: u64 = get("round")?.parse().map_err(|_| bad(&path, "bad round"))?;
    let layout: Vec<Tensor> =
        serde_json::from_str(&get("layout")?).map_err(|e| bad(&path, format!("its layout: {e}")))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(&path, e.to_string()))?;
    let view = st.tensor("anchor").map_err(|e| bad(&path, format!("anchor: {e}")))?;
    if view.dtype() != Dtype::F32 {
        return Err(bad(&path, "the anchor is not f32"));
    }
    let anchor = crate::checkpoint::floats(&view);
    let hash = WeightsHash::of_f32(&anchor);
    if hash.to_string() != get("anchor_hash")? {
        return Err(bad(&path, "its weights do not match the hash in its metadata"));
    }
    let total: usize = layout.iter().map(|t| t.shape.iter().product::<usize>()).sum();
    if total != anchor.len() {
        return Err(bad(
            &path,
            format!("its layout holds {total} values, its anchor {}", anchor.len()),
        ));
    }
    Ok(FinalAnchor {
        run_id,
        round,
        anchor,
        hash,
        layout,
    })
}

/// What an export wrote.
#[derive(Debug, Serialize)]
pub struct Exported {
    pub out: PathBuf,
    pub run_id: String,
    pub anchor: String,
    pub round: u64,
    pub model: String,
    pub tensors: usize,
    pub values: usize,
}

/// Writes the final anchor of the node in `dir` to `out` with the model's
/// parameter names and shapes. Floats go as f32, integer buffers (a batch
/// norm's batch count) as int64, as the model holds them (truncated, as
/// loading the anchor into the model does).
pub fn export(dir: &Path, out: &Path, spec: &RunSpec) -> Result<Exported, NodeError> {
    let fin = load_final(dir)?;
    if fin.run_id != spec.run_id() {
        return Err(bad(
            &dir.join(FINAL_FILE),
            format!("belongs to run {}, the node's ledger to {}", fin.run_id, spec.run_id()),
        ));
    }
    let mut data: Vec<(&str, Dtype, Vec<u8>, &[usize])> = Vec::with_capacity(fin.layout.len());
    let mut off = 0;
    for t in &fin.layout {
        let n: usize = t.shape.iter().product();
        let vals = &fin.anchor[off..off + n];
        off += n;
        let (dtype, bytes): (Dtype, Vec<u8>) = if t.integer {
            (
                Dtype::I64,
                vals.iter().flat_map(|&v| (v as i64).to_le_bytes()).collect(),
            )
        } else {
            (Dtype::F32, crate::checkpoint::bytes_of(vals))
        };
        data.push((&t.name, dtype, bytes, &t.shape));
    }
    let views = data
        .iter()
        .map(|(name, dtype, bytes, shape)| {
            TensorView::new(*dtype, shape.to_vec(), bytes)
                .map(|v| (*name, v))
                .map_err(|e| bad(out, format!("tensor {name}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let meta: HashMap<String, String> = [
        ("run_id".to_string(), fin.run_id.to_string()),
        ("anchor_hash".to_string(), fin.hash.to_string()),
        ("round".to_string(), fin.round.to_string()),
        ("model".to_string(), spec.model.arch.to_string()),
    ]
    .into();
    let bytes = safetensors::tensor::serialize(views, Some(meta)).map_err(|e| bad(out, format!("serialising: {e}")))?;
    std::fs::write(out, bytes).map_err(|source| NodeError::Io {
        path: out.to_path_buf(),
        source,
    })?;
    Ok(Exported {
        out: out.to_path_buf(),
        run_id: fin.run_id.to_string(),
        anchor: fin.hash.to_string(),
        round: fin.round,
        model: spec.model.arch.to_string(),
        tensors: fin.layout.len(),
        values: fin.anchor.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_final_anchor_goes_out_under_its_names() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunId([5; 32]);
        let layout = vec![
            Tensor {
                name: "bn.num_batches_tracked".into(),
                shape: vec![],
                integer: true,
            },
            Tensor {
                name: "fc.weight".into(),
                shape: vec![2, 3],
                integer: false,
            },
        ];
        let anchor = vec![41.7, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        save_final(dir.path(), &run, 9, &anchor, &layout).unwrap();
        let fin = load_final(dir.path()).unwrap();
        assert_eq!(
            (fin.run_id, fin.round, &fin.anchor, &fin.layout),
            (run, 9, &anchor, &layout)
        );

        let out = dir.path().join("model.safetensors");
        // The file was written for another run than the ledger's: refused.
        let spec = crate::RunSpec::default_for(meshtrain_model::Arch::Mlp, &crate::runspec::tests::manifest());
        let err = export(dir.path(), &out, &spec).unwrap_err().to_string();
        assert!(err.contains("belongs to run"), "{err}");
        save_final(dir.path(), &spec.run_id(), 9, &anchor, &layout).unwrap();
        let done = export(dir.path(), &out, &spec).unwrap();
        assert_eq!((done.tensors, done.values), (2, 7));
        let file = std::fs::read(&out).unwrap();
        let st = SafeTensors::deserialize(&file).unwrap();
        let count = st.tensor("bn.num_batches_tracked").unwrap();
        assert_eq!((count.dtype(), count.shape()), (Dtype::I64, &[][..]));
        assert_eq!(count.data(), 41i64.to_le_bytes());
        let w = st.tensor("fc.weight").unwrap();
        assert_eq!((w.dtype(), w.shape()), (Dtype::F32, &[2, 3][..]));
        assert_eq!(w.data()[..4], 1.0f32.to_le_bytes());

        // A damaged file is named, not exported.
        let path = dir.path().join(FINAL_FILE);
        let mut raw = std::fs::read(&path).unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 0x40;
        std::fs::write(&path, raw).unwrap();
        let err = export(dir.path(), &out, &spec).unwrap_err().to_string();
        assert!(err.contains(FINAL_FILE) && err.contains("hash"), "{err}");
        std::fs::remove_file(&path).unwrap();
        let err = export(dir.path(), &out, &spec).unwrap_err().to_string();
        assert!(err.contains("has not finished a run"), "{err}");
    }
}
