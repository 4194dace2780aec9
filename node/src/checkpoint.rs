//! Checkpoints: what a node needs to resume after `kill -9` beyond what its
//! ledger holds. Written every K rounds by atomic rename, in safetensors:
//! the anchor weights, the outer optimiser's momentum, the codec's error
//! feedback residual and the inner Adam state, with the round and hashes as
//! metadata.

use std::collections::HashMap;
use std::path::Path;

use meshtrain_ledger::{RunId, WeightsHash};
use meshtrain_model::AdamState;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::NodeError;

pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";

#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub run_id: RunId,
    /// The round these anchor weights start.
    pub round: u64,
    pub anchor: Vec<f32>,
    pub velocity: Vec<f32>,
    pub residual: Vec<f32>,
    pub adam: AdamState,
}

/// A float vector's little-endian bytes, as safetensors stores F32.
pub(crate) fn bytes_of(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// An F32 tensor's values.
pub(crate) fn floats(view: &TensorView<'_>) -> Vec<f32> {
    view.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

impl Checkpoint {
    pub fn anchor_hash(&self) -> WeightsHash {
        WeightsHash::of_f32(&self.anchor)
    }

    /// The checkpoint as a safetensors file.
    pub fn to_bytes(&self) -> Result<Vec<u8>, String> {
        let tensors = [
            ("anchor", bytes_of(&self.anchor)),
            ("velocity", bytes_of(&self.velocity)),
            ("residual", bytes_of(&self.residual)),
            ("adam_m", bytes_of(&self.adam.m)),
            ("adam_v", bytes_of(&self.adam.v)),
        ];
        let views: Vec<(&str, TensorView<'_>)> = tensors
            .iter()
            .map(|(name, b)| {
                TensorView::new(Dtype::F32, vec![b.len() / 4], b)
                    .map(|v| (*name, v))
                    .map_err(|e| format!("tensor {name}: {e}"))
            })
            .collect::<Result<_, _>>()?;
        let meta: HashMap<String, String> = [
            ("run_id".to_string(), self.run_id.to_string()),
            ("round".to_string(), self.round.to_string()),
            ("adam_step".to_string(), self.adam.step.to_string()),
            ("anchor_hash".to_string(), self.anchor_hash().to_string()),
        ]
        .into();
        safetensors::tensor::serialize(views, Some(meta)).map_err(|e| format!("serialising: {e}"))
    }

    /// Writes `DIR/checkpoint.safetensors` atomically (temp file,
    /// rename): a crash leaves the old checkpoint or the new one, whole.
    pub fn save(&self, dir: &Path) -> Result<(), NodeError> {
        let path = dir.join(CHECKPOINT_FILE);
        let bytes = self.to_bytes().map_err(|detail| NodeError::Checkpoint {
            path: path.clone(),
            detail,
        })?;
        let io = |source| NodeError::Io {
            path: path.clone(),
            source,
        };
        // Written whole, then renamed over the last one, but not synced: a
        // checkpoint only saves replaying the ledger (which is durable), and
        // one torn by a power cut fails its checks at load and is set aside.
        // A sync per checkpoint cost the MLP's lone node more than a tenth
        // of its rounds (docs/figures.md, issue 18).
        let tmp = dir.join(format!("{CHECKPOINT_FILE}.tmp"));
        if let Err(e) = std::fs::write(&tmp, &bytes) {
            let _ = std::fs::remove_file(&tmp);
            return Err(io(e));
        }
        std::fs::rename(&tmp, &path).map_err(io)
    }

    /// Reads the checkpoint in `dir`, if there is one; a corrupt or foreign
    /// one is an error naming the file.
    pub fn load(dir: &Path, run_id: &RunId) -> Result<Option<Self>, NodeError> {
        let path = dir.join(CHECKPOINT_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(NodeError::Io { path, source }),
        };
        Self::from_bytes(&bytes, run_id)
            .map(Some)
            .map_err(|detail| NodeError::Checkpoint { path, detail })
    }

    /// Decodes a checkpoint file (untrusted: torn, corrupt or another
    /// run's); the error says what is wrong with it.
    pub fn from_bytes(bytes: &[u8], run_id: &RunId) -> Result<Self, String> {
        let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| e.to_string())?;
        let meta = meta.metadata().clone().unwrap_or_default();
        let get = |k: &str| meta.get(k).cloned().ok_or_else(|| format!("no `{k}` in its metadata"));
        let found: RunId = get("run_id")?.parse().map_err(|e| format!("run id: {e}"))?;
        if found != *run_id {
            return Err(format!("belongs to run {found}, not {run_id}"));
        }
        let round: u64 = get("round")?.parse().map_err(|_| "bad round".to_string())?;
        let step: u64 = get("adam_step")?.parse().map_err(|_| "bad adam step".to_string())?;
        let st = SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
        let t = |name: &str| {
            let view = st.tensor(name).map_err(|e| format!("{name}: {e}"))?;
            if view.dtype() != Dtype::F32 {
                return Err(format!("{name}: {:?} values, not F32", view.dtype()));
            }
            Ok(floats(&view))
        };
        let cp = Checkpoint {
            run_id: found,
            round,
            anchor: t("anchor")?,
            velocity: t("velocity")?,
            residual: t("residual")?,
            adam: AdamState {
                step,
                m: t("adam_m")?,
                v: t("adam_v")?,
            },
        };
        if cp.anchor_hash().to_string() != get("anchor_hash")? {
            return Err("its anchor does not match the hash in its metadata".into());
        }
        Ok(cp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunId([3; 32]);
        let cp = Checkpoint {
            run_id: run,
            round: 7,
            anchor: vec![1.0, 2.0, 3.0],
            velocity: vec![0.5; 3],
            residual: vec![0.0, -1.0, 0.25],
            adam: AdamState {
                step: 12,
                m: vec![0.1, 0.2],
                v: vec![0.3, 0.4],
            },
        };
        assert_eq!(Checkpoint::load(dir.path(), &run).unwrap(), None);
        cp.save(dir.path()).unwrap();
        assert_eq!(Checkpoint::load(dir.path(), &run).unwrap(), Some(cp));
        assert!(Checkpoint::load(dir.path(), &RunId([4; 32])).is_err());
        std::fs::write(dir.path().join(CHECKPOINT_FILE), b"garbage").unwrap();
        let err = Checkpoint::load(dir.path(), &run).unwrap_err().to_string();
        assert!(err.contains(CHECKPOINT_FILE), "{err}");
    }

    #[test]
    fn a_tensor_that_is_not_f32_is_refused_not_misread() {
        let run = RunId([3; 32]);
        let cp = Checkpoint {
            run_id: run,
            round: 1,
            anchor: vec![1.0; 4],
            velocity: vec![0.0; 4],
            residual: vec![0.0; 4],
            adam: AdamState {
                step: 1,
                m: vec![0.0; 4],
                v: vec![0.0; 4],
            },
        };
        let good = cp.to_bytes().unwrap();
        assert_eq!(Checkpoint::from_bytes(&good, &run).unwrap(), cp);
        // The same metadata, with the anchor's 16 bytes declared as F16.
        let st = SafeTensors::deserialize(&good).unwrap();
        let (_, meta) = SafeTensors::read_metadata(&good).unwrap();
        let names = ["anchor", "velocity", "residual", "adam_m", "adam_v"];
        let views: Vec<(&str, TensorView<'_>)> = names
            .iter()
            .map(|n| {
                let t = st.tensor(n).unwrap();
                let dtype = if *n == "anchor" { Dtype::F16 } else { Dtype::F32 };
                let shape = if *n == "anchor" { vec![8] } else { vec![4] };
                (*n, TensorView::new(dtype, shape, t.data()).unwrap())
            })
            .collect();
        let bad = safetensors::tensor::serialize(views, meta.metadata().clone()).unwrap();
        let err = Checkpoint::from_bytes(&bad, &run).unwrap_err();
        assert!(err.contains("anchor") && err.contains("F32"), "{err}");
    }
}
