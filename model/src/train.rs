//! The local training loop: H steps of the inner optimiser on a shard.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::adam::{Adam, AdamState};
use crate::blocks::Schema;
use crate::dataset::Dataset;
use crate::net::Network;
use crate::stream::RecordSource;
use crate::{ModelError, Result};

/// Inner-loop hyper-parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub batch_size: usize,
    /// Adam's learning rate.
    pub lr: f64,
    /// Training-data attack: train on flipped labels (`classes - 1 - y`).
    /// Only for testnets and tests.
    pub label_flip: bool,
}

/// What a burst of local steps did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepStats {
    pub steps: u64,
    pub samples: u64,
    pub mean_loss: f32,
}

/// Loss and accuracy over a held-out set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub loss: f32,
    pub accuracy: f32,
    pub samples: u64,
}

/// Turns image records (`[label][pixels]`) into a normalised float batch
/// on `device`.
fn record_tensors(schema: &Schema, records: &[u8], device: Device, flip: bool) -> Result<(Tensor, Tensor)> {
    let Schema::Image {
        channels,
        height,
        width,
        classes,
    } = *schema
    else {
        return Err(ModelError::ShapeMismatch {
            model: "image model".into(),
            expected: "image records".into(),
            got: format!("{schema:?}"),
        });
    };
    let rec = schema.record_size();
    let n = records.len() / rec;
    let mut pixels = Vec::with_capacity(n * (rec - 1));
    let mut labels = Vec::with_capacity(n);
    for r in records.chunks_exact(rec) {
        pixels.extend_from_slice(&r[1..]);
        let l = r[0] as i64;
        labels.push(if flip { classes as i64 - 1 - l } else { l });
    }
    let shape = crate::ImageShape { channels, height, width };
    batch_tensors(&pixels, &labels, shape, device)
}

/// Turns image bytes and labels into a normalised float batch on `device`.
fn batch_tensor(data: &Dataset, picks: &[usize], device: Device) -> Result<(Tensor, Tensor)> {
    let rec = data.shape.len();
    let mut pixels = Vec::with_capacity(picks.len() * rec);
    let mut labels = Vec::with_capacity(picks.len());
    for &i in picks {
        pixels.extend_from_slice(&data.pixels()[i * rec..(i + 1) * rec]);
        labels.push(data.labels()[i] as i64);
    }
    batch_tensors(&pixels, &labels, data.shape, device)
}

fn batch_tensors(pixels: &[u8], labels: &[i64], s: crate::ImageShape, device: Device) -> Result<(Tensor, Tensor)> {
    // Pixels map to [0, 1], as torchvision's ToTensor does.
    let xs = Tensor::from_slice(pixels)
        .f_to_device(device)?
        .f_to_kind(Kind::Float)?
        .f_view([labels.len() as i64, s.channels as i64, s.height as i64, s.width as i64])?
        .f_div_scalar(255.0)?;
    let ys = Tensor::from_slice(labels).f_to_device(device)?;
    Ok((xs, ys))
}

/// Mean cross-entropy of logits against class indices, with errors (not
/// panics) on shape or index trouble.
fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    Ok(logits
        .f_log_softmax(-1, Kind::Float)?
        .f_nll_loss(targets, None::<Tensor>, tch::Reduction::Mean, -100)?)
}

/// Owns one model replica, its inner optimiser and where its batches come
/// from. Lives on the training thread (a tensor is `Send` but not `Sync`).
pub struct Trainer {
    net: Network,
    opt: Adam,
    source: Box<dyn RecordSource>,
    cfg: TrainConfig,
}

impl Trainer {
    pub fn new(net: Network, source: Box<dyn RecordSource>, cfg: TrainConfig) -> Result<Self> {
        if source.is_empty() {
            return Err(ModelError::BadDataset {
                name: "training shard".into(),
                detail: "the shard is empty".into(),
            });
        }
        let fits = matches!(*source.schema(), Schema::Image { channels, height, width, classes }
            if crate::ImageShape { channels, height, width } == net.input && classes == net.classes);
        if !fits {
            return Err(ModelError::ShapeMismatch {
                model: net.arch.to_string(),
                expected: format!("{:?} with {} classes", net.input, net.classes),
                got: format!("{:?}", source.schema()),
            });
        }
        if cfg.batch_size == 0 {
            return Err(ModelError::BadDataset {
                name: "training shard".into(),
                detail: "batch size 0".into(),
            });
        }
        let opt = Adam::new(&net, cfg.lr);
        Ok(Self { net, opt, source, cfg })
    }

    pub fn network(&self) -> &Network {
        &self.net
    }

    pub fn shard_len(&self) -> usize {
        self.source.len()
    }

    /// The inner optimiser's state, for checkpoints.
    pub fn optimizer_state(&self) -> Result<AdamState> {
        self.opt.state()
    }

    pub fn set_optimizer_state(&mut self, state: &AdamState) -> Result<()> {
        self.opt.set_state(state)
    }

    /// Trains on other records from now on (the optimiser state stays).
    pub fn set_source(&mut self, source: Box<dyn RecordSource>) {
        self.source = source;
    }

    pub fn load(&mut self, weights: &[f32]) -> Result<()> {
        self.net.load_flat(weights)
    }

    pub fn weights(&self) -> Result<Vec<f32>> {
        self.net.flat()
    }

    /// Runs `steps` optimiser steps on shuffled mini-batches of the shard.
    pub fn train_steps(&mut self, steps: usize) -> Result<StepStats> {
        let mut total = 0f64;
        let mut samples = 0u64;
        for _ in 0..steps {
            let records = self.source.next_batch(self.cfg.batch_size)?;
            let (xs, ys) = record_tensors(self.source.schema(), &records, self.net.device(), self.cfg.label_flip)?;
            let logits = self.net.forward(&xs, true);
            let loss = cross_entropy(&logits, &ys)?;
            self.opt.zero_grad();
            loss.f_backward()?;
            self.opt.step()?;
            total += loss.f_double_value(&[])?;
            samples += ys.size()[0] as u64;
        }
        Ok(StepStats {
            steps: steps as u64,
            samples,
            mean_loss: if steps == 0 { 0.0 } else { (total / steps as f64) as f32 },
        })
    }

    /// Loss and accuracy of the current weights on `data`.
    pub fn evaluate(&self, data: &Dataset) -> Result<Evaluation> {
        evaluate(&self.net, data)
    }
}

/// Loss and accuracy of `net` on `data`, in batches, without gradients.
pub fn evaluate(net: &Network, data: &Dataset) -> Result<Evaluation> {
    if data.shape != net.input {
        return Err(ModelError::ShapeMismatch {
            model: net.arch.to_string(),
            expected: format!("{:?}", net.input),
            got: format!("{:?}", data.shape),
        });
    }
    let mut loss = 0f64;
    let mut correct = 0i64;
    let n = data.len();
    tch::no_grad(|| -> Result<()> {
        let idx: Vec<usize> = (0..n).collect();
        for chunk in idx.chunks(1000) {
            let (xs, ys) = batch_tensor(data, chunk, net.device())?;
            let logits = net.forward(&xs, false);
            let l = cross_entropy(&logits, &ys)?;
            loss += l.f_double_value(&[])? * chunk.len() as f64;
            let pred = logits.f_argmax(-1, false)?;
            correct += pred.f_eq_tensor(&ys)?.f_sum(Kind::Int64)?.f_int64_value(&[])?;
        }
        Ok(())
    })?;
    Ok(Evaluation {
        loss: (loss / n.max(1) as f64) as f32,
        accuracy: correct as f32 / n.max(1) as f32,
        samples: n as u64,
    })
}
