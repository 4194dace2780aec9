//! The local training loop: H steps of the inner optimiser on a shard.

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::adam::{Adam, AdamState};
use crate::blocks::Schema;
use crate::dataset::Dataset;
use crate::metrics::{self, ClassScore, Confusion, Detection};
use crate::net::{Network, Task};
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
    /// Records of this class are the anomalies: the autoencoder never
    /// trains on them, and its evaluation scores them as positives.
    #[serde(default)]
    pub anomaly_class: Option<usize>,
}

/// What a burst of local steps did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepStats {
    pub steps: u64,
    pub samples: u64,
    pub mean_loss: f32,
}

/// The headline figures of one evaluation on a held-out set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// The task's loss: cross-entropy (nats per character for language
    /// models), or the autoencoder's mean squared error on normal records.
    pub loss: f32,
    /// Classifiers: accuracy; language models: next-byte accuracy;
    /// autoencoder: accuracy of flagging anomalies at its threshold.
    pub accuracy: f32,
    pub samples: u64,
    /// Language models: `exp(loss)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub perplexity: Option<f32>,
    /// Autoencoder: ROC-AUC of the reconstruction error as anomaly score.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub roc_auc: Option<f32>,
    /// Classifiers: unweighted mean F1 over classes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub macro_f1: Option<f32>,
}

/// Everything one evaluation measured.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub summary: Evaluation,
    /// Classifiers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confusion: Option<Confusion>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub per_class: Vec<ClassScore>,
    /// Autoencoder: the operating point at its threshold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detection: Option<Detection>,
}

/// The autoencoder flags records whose error exceeds this quantile of the
/// normal records' errors: a 5% false-positive budget.
pub const NORMAL_QUANTILE: f64 = 0.95;

/// Whole records of one schema, held in memory (an evaluation split).
#[derive(Clone, Debug)]
pub struct Records {
    pub name: String,
    pub schema: Schema,
    bytes: Vec<u8>,
}

impl Records {
    pub fn new(name: &str, schema: Schema, bytes: Vec<u8>) -> Result<Self> {
        let rs = schema.record_size();
        if rs == 0 || !bytes.len().is_multiple_of(rs) {
            return Err(ModelError::BadDataset {
                name: name.to_string(),
                detail: format!("{} bytes is not a whole number of {rs}-byte records", bytes.len()),
            });
        }
        Ok(Self {
            name: name.to_string(),
            schema,
            bytes,
        })
    }

    pub fn len(&self) -> usize {
        self.bytes.len() / self.schema.record_size()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// `n` records spread evenly over these (all of them if there are no
    /// more): a small fixed sample every holder of the same records draws
    /// alike.
    pub fn spread(&self, n: usize) -> Records {
        let rs = self.schema.record_size();
        let len = self.len();
        let take = n.min(len);
        let mut bytes = Vec::with_capacity(take * rs);
        for i in 0..take {
            let at = i * len / take.max(1);
            bytes.extend_from_slice(&self.bytes[at * rs..(at + 1) * rs]);
        }
        Records {
            name: format!("{} ({take} spread)", self.name),
            schema: self.schema.clone(),
            bytes,
        }
    }
}

impl From<&Dataset> for Records {
    fn from(d: &Dataset) -> Self {
        Self {
            name: d.name.clone(),
            schema: d.schema(),
            bytes: d.to_records(),
        }
    }
}

/// A batch as tensors: images `[N, C, H, W]` in [0, 1] with class labels,
/// or byte sequences `[N, T-1]` with the next byte at each position.
struct Batch {
    xs: Tensor,
    ys: Tensor,
    /// Image labels as read (before any flip), for the metrics.
    labels: Vec<usize>,
}

/// Turns records of `schema` into a batch on `device`. `skip` drops the
/// records of one class (normal-only training); `flip` flips labels.
fn batch(schema: &Schema, records: &[u8], device: Device, flip: bool, skip: Option<usize>) -> Result<Batch> {
    let rec = schema.record_size();
    match *schema {
        Schema::Image {
            channels,
            height,
            width,
            classes,
        } => {
            let mut pixels = Vec::with_capacity(records.len());
            let mut ys = Vec::with_capacity(records.len() / rec);
            let mut labels = Vec::with_capacity(records.len() / rec);
            for r in records.chunks_exact(rec) {
                let l = r[0] as usize;
                if skip == Some(l) {
                    continue;
                }
                pixels.extend_from_slice(&r[1..]);
                labels.push(l);
                ys.push(if flip {
                    (classes - 1 - l.min(classes - 1)) as i64
                } else {
                    l as i64
                });
            }
            // Pixels map to [0, 1], as torchvision's ToTensor does.
            let xs = Tensor::from_slice(&pixels)
                .f_to_device(device)?
                .f_to_kind(Kind::Float)?
                .f_view([labels.len() as i64, channels as i64, height as i64, width as i64])?
                .f_div_scalar(255.0)?;
            let ys = Tensor::from_slice(&ys).f_to_device(device)?;
            Ok(Batch { xs, ys, labels })
        }
        Schema::Text { seq_len } if seq_len >= 2 => {
            let n = (records.len() / rec) as i64;
            let all = Tensor::from_slice(&records[..n as usize * rec])
                .f_to_kind(Kind::Int64)?
                .f_view([n, seq_len as i64])?
                .f_to_device(device)?;
            let t = seq_len as i64 - 1;
            Ok(Batch {
                xs: all.f_narrow(1, 0, t)?,
                ys: all.f_narrow(1, 1, t)?,
                labels: Vec::new(),
            })
        }
        _ => Err(ModelError::ShapeMismatch {
            model: "model zoo".into(),
            expected: "image records, or text records of at least 2 bytes".into(),
            got: format!("{schema:?}"),
        }),
    }
}

/// Mean cross-entropy of logits against class indices, with errors (not
/// panics) on shape or index trouble.
fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let k = *logits.size().last().unwrap_or(&1);
    Ok(logits.f_reshape([-1, k])?.f_log_softmax(-1, Kind::Float)?.f_nll_loss(
        &targets.f_reshape([-1])?,
        None::<Tensor>,
        tch::Reduction::Mean,
        -100,
    )?)
}

/// Per-record mean squared reconstruction error, `[N]`.
fn reconstruction_error(out: &Tensor, xs: &Tensor) -> Result<Tensor> {
    let target = xs.f_flatten(1, -1)?;
    Ok(out.f_sub(&target)?.f_square()?.f_mean_dim(1, false, Kind::Float)?)
}

/// The training loss of `net` on a batch; a classifier's logits shifted by
/// `prior` (the shard's log label prior) first, when given.
fn loss(net: &Network, b: &Batch, train: bool, prior: Option<&Tensor>) -> Result<Tensor> {
    let out = net.forward(&b.xs, train)?;
    match net.task {
        Task::Classify { .. } => match prior {
            Some(p) => cross_entropy(&out.f_add(p)?, &b.ys),
            None => cross_entropy(&out, &b.ys),
        },
        Task::NextByte => cross_entropy(&out, &b.ys),
        Task::Reconstruct => Ok(reconstruction_error(&out, &b.xs)?.f_mean(Kind::Float)?),
    }
}

/// Owns one model replica, its inner optimiser and where its batches come
/// from. Lives on the training thread (a tensor is `Send` but not `Sync`).
pub struct Trainer {
    net: Network,
    opt: Adam,
    source: Box<dyn RecordSource>,
    cfg: TrainConfig,
    /// log p(y) of the shard's labels, added to the logits in training.
    prior: Option<Tensor>,
}

impl Trainer {
    pub fn new(net: Network, source: Box<dyn RecordSource>, cfg: TrainConfig) -> Result<Self> {
        if source.is_empty() {
            return Err(ModelError::BadDataset {
                name: "training shard".into(),
                detail: "the shard is empty".into(),
            });
        }
        if *source.schema() != net.schema {
            return Err(ModelError::ShapeMismatch {
                model: net.arch.to_string(),
                expected: format!("{:?}", net.schema),
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
        Ok(Self {
            net,
            opt,
            source,
            cfg,
            prior: None,
        })
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

    /// Logit adjustment for label skew (balanced softmax, as in FedLC):
    /// train on logits + log p(y), p the shard's label frequencies from
    /// `counts` (add-one smoothed). The network then learns the labels'
    /// likelihood, not this shard's prior, so a shard rich in one class no
    /// longer drags every bias toward it; evaluation uses the raw logits.
    /// On an even shard the shift is one constant, which softmax ignores.
    /// `None`, a task without classes or counts of another length: off.
    pub fn set_label_prior(&mut self, counts: Option<&[u64]>) {
        self.prior = match (self.net.task, counts) {
            (Task::Classify { classes }, Some(c)) if c.len() == classes && classes > 0 => {
                let total: f64 = c.iter().map(|n| *n as f64).sum::<f64>() + classes as f64;
                let logp: Vec<f32> = c.iter().map(|n| ((*n as f64 + 1.0) / total).ln() as f32).collect();
                Some(Tensor::from_slice(&logp).to_device(self.net.device()))
            }
            _ => None,
        };
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
        let mut taken = 0u64;
        let mut samples = 0u64;
        // Labels are flipped only where there are labels to learn.
        let flip = self.cfg.label_flip && matches!(self.net.task, Task::Classify { .. });
        let skip = match self.net.task {
            Task::Reconstruct => self.cfg.anomaly_class,
            _ => None,
        };
        for _ in 0..steps {
            let records = self.source.next_batch(self.cfg.batch_size)?;
            let b = batch(self.source.schema(), &records, self.net.device(), flip, skip)?;
            let n = b.xs.size()[0];
            if n == 0 {
                continue;
            }
            let loss = loss(&self.net, &b, true, self.prior.as_ref())?;
            self.opt.zero_grad();
            loss.f_backward()?;
            self.opt.step()?;
            total += loss.f_double_value(&[])?;
            taken += 1;
            samples += n as u64;
        }
        Ok(StepStats {
            steps: steps as u64,
            samples,
            mean_loss: if taken == 0 { 0.0 } else { (total / taken as f64) as f32 },
        })
    }

    /// Every metric of the current weights on `data`.
    pub fn evaluate(&self, data: &Records) -> Result<EvalReport> {
        evaluate(&self.net, data, self.cfg.anomaly_class)
    }
}

/// Every metric of `net` on `data`, in batches, without gradients. For the
/// autoencoder `anomaly` names the class scored as positive.
pub fn evaluate(net: &Network, data: &Records, anomaly: Option<usize>) -> Result<EvalReport> {
    if data.schema != net.schema {
        return Err(ModelError::ShapeMismatch {
            model: net.arch.to_string(),
            expected: format!("{:?}", net.schema),
            got: format!("{:?}", data.schema),
        });
    }
    let rec = data.schema.record_size();
    // Long sequences cost more per record; keep a chunk near 64k positions.
    let per_chunk = match data.schema {
        Schema::Text { seq_len } => (65_536 / seq_len).max(1),
        _ => 1000,
    };
    let mut loss_sum = 0f64;
    let mut loss_count = 0u64;
    let mut correct = 0i64;
    let mut predicted = 0i64;
    let mut confusion = match net.task {
        Task::Classify { classes } => Some(Confusion::new(classes)),
        _ => None,
    };
    let mut scores: Vec<f32> = Vec::new();
    let mut positive: Vec<bool> = Vec::new();
    tch::no_grad(|| -> Result<()> {
        for chunk in data.bytes().chunks(per_chunk * rec) {
            let b = batch(&data.schema, chunk, net.device(), false, None)?;
            let out = net.forward(&b.xs, false)?;
            match net.task {
                Task::Classify { .. } | Task::NextByte => {
                    let positions = b.ys.numel() as u64;
                    loss_sum += cross_entropy(&out, &b.ys)?.f_double_value(&[])? * positions as f64;
                    loss_count += positions;
                    let pred = out.f_argmax(-1, false)?;
                    correct += pred.f_eq_tensor(&b.ys)?.f_sum(Kind::Int64)?.f_int64_value(&[])?;
                    predicted += positions as i64;
                    if let Some(c) = confusion.as_mut() {
                        let pred = Vec::<i64>::try_from(&pred.f_to_device(Device::Cpu)?)?;
                        for (&t, &p) in b.labels.iter().zip(&pred) {
                            c.add(t, p.max(0) as usize);
                        }
                    }
                }
                Task::Reconstruct => {
                    let err = reconstruction_error(&out, &b.xs)?.f_to_device(Device::Cpu)?;
                    let err = Vec::<f32>::try_from(&err)?;
                    for (&e, &l) in err.iter().zip(&b.labels) {
                        let anomalous = anomaly == Some(l);
                        if !anomalous {
                            loss_sum += e as f64;
                            loss_count += 1;
                        }
                        scores.push(e);
                        positive.push(anomalous);
                    }
                }
            }
        }
        Ok(())
    })?;
    let loss = (loss_sum / loss_count.max(1) as f64) as f32;
    let mut report = EvalReport {
        summary: Evaluation {
            loss,
            accuracy: correct as f32 / predicted.max(1) as f32,
            samples: data.len() as u64,
            ..Default::default()
        },
        ..Default::default()
    };
    match net.task {
        Task::Classify { .. } => {
            if let Some(c) = &confusion {
                report.summary.macro_f1 = Some(c.macro_f1() as f32);
                report.per_class = c.per_class();
            }
            report.confusion = confusion;
        }
        Task::NextByte => report.summary.perplexity = Some(loss.exp()),
        Task::Reconstruct => {
            let normal: Vec<f32> = scores
                .iter()
                .zip(&positive)
                .filter(|(_, &p)| !p)
                .map(|(&s, _)| s)
                .collect();
            if let Some(threshold) = metrics::quantile(&normal, NORMAL_QUANTILE) {
                let d = metrics::detection(&scores, &positive, threshold);
                let right = (d.recall * d.anomalies as f64) + (1.0 - d.false_positive_rate) * d.normals as f64;
                report.summary.accuracy = (right / scores.len().max(1) as f64) as f32;
                report.detection = Some(d);
            }
            report.summary.roc_auc = metrics::roc_auc(&scores, &positive).map(|a| a as f32);
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_picks_evenly_and_never_more_than_there_are() {
        let schema = crate::blocks::Schema::Text { seq_len: 2 };
        let bytes: Vec<u8> = (0..20u8).collect();
        let r = Records::new("ten", schema, bytes).unwrap();
        let five = r.spread(5);
        assert_eq!(five.bytes(), &[0, 1, 4, 5, 8, 9, 12, 13, 16, 17]);
        assert_eq!(r.spread(50).len(), 10);
        assert!(r.spread(0).is_empty());
    }
}
