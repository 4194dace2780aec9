//! What stands in for the model in a simulation: a small quadratic per node
//! (each node's shard pulls the weights towards its own target), trained in
//! closed form, and encoded with the real codec and error feedback. Cheap
//! and deterministic, so thousands of seeds run in seconds, while
//! everything the protocol sees (payload bytes, hashes, the aggregator's
//! inputs) is as real as in a node.

use meshtrain_ledger::{RunMeta, WeightsHash};
use meshtrain_model::{
    AggregatorSpec, Arch, CodecSpec, DeltaEncoder, EvalReport, Evaluation, ModelError, Schema, StepStats,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::attack::{Attacker, Update};
use crate::replay::ModelShape;
use crate::runspec::{Admission, DataSpec, ExchangeSpec, ModelSpec, RoundSpec, RunSpec, TrainSpec};

/// Step size of the stand-in's local steps.
const INNER_LR: f32 = 0.03;
/// How far the shared optimum moves per round: learning goes on, so honest
/// deltas keep a common direction (as real ones do), rather than cancelling
/// out around a reached optimum, where any robust rule flags half of them.
const DRIFT: f32 = 0.1;
/// How far one node's optimum lies from the shared one (its shard's skew).
const SKEW: f32 = 0.03;

/// The run spec every simulated node shares.
pub fn sim_spec(rounds: u64, codec: CodecSpec, aggregator: AggregatorSpec, seed: u64, admission: Admission) -> RunSpec {
    RunSpec {
        name: "simulation".into(),
        seed,
        model: ModelSpec {
            arch: Arch::Mlp,
            anomaly_class: None,
            script: None,
        },
        data: DataSpec {
            dataset: "quadratic".into(),
            manifest: "0".repeat(64),
            partition: "iid".into(),
            replication: 1,
            schema: Schema::Image {
                channels: 1,
                height: 2,
                width: 2,
                classes: 2,
            },
        },
        train: TrainSpec {
            batch_size: 1,
            lr: 1e-3,
            local_steps: 10,
            label_prior: false,
        },
        exchange: ExchangeSpec {
            codec,
            aggregator,
            outer_lr: 0.7,
            outer_momentum: 0.9,
            nesterov: true,
            staleness: 1,
            staleness_decay: 0.5,
            score: None,
        },
        rounds: RoundSpec {
            count: rounds,
            max_wait_ms: 3000,
            min_wait_ms: 500,
            patience: None,
        },
        admission,
    }
}

/// The stand-in model's genesis: deterministic from the seed, like a real one.
pub fn shape(params: usize, seed: u64) -> ModelShape {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x9e11);
    ModelShape {
        genesis: (0..params).map(|_| rng.random_range(-1.0..1.0)).collect(),
        buffers: Vec::new(),
    }
}

pub fn meta(spec: &RunSpec, owner: meshtrain_ledger::AuthorId, shape: &ModelShape) -> RunMeta {
    let run_spec = spec.canonical_bytes();
    RunMeta {
        run_id: meshtrain_ledger::RunId::of_spec(&run_spec),
        owner,
        genesis_weights: WeightsHash::of_f32(&shape.genesis),
        run_spec,
    }
}

/// The shared optimum at `round`: it drifts as learning goes on.
fn optimum(params: usize, seed: u64, round: u64) -> Vec<f32> {
    let mut shared = ChaCha8Rng::seed_from_u64(seed ^ 0x7a56);
    (0..params)
        .map(|i| shared.random_range(-2.0f32..2.0) + DRIFT * round as f32 * if i % 2 == 0 { 1.0 } else { -1.0 })
        .collect()
}

/// Node `index`'s own offset from the shared optimum (non-IID by a little).
pub fn skew(params: usize, seed: u64, index: usize) -> Vec<f32> {
    let mut own = ChaCha8Rng::seed_from_u64(seed ^ 0x0ff5 ^ ((index as u64 + 1) << 20));
    (0..params).map(|_| own.random_range(-SKEW..SKEW)).collect()
}

/// One simulated node's trainer: its encoder (error feedback) and, for an
/// attacker, the same [`Attacker`] a real node's trainer runs.
pub struct StandIn {
    skew: Vec<f32>,
    params: usize,
    pub encoder: DeltaEncoder,
    pub attacker: Option<Attacker>,
    seed: u64,
    index: usize,
    local_steps: usize,
}

impl StandIn {
    pub fn new(spec: &RunSpec, params: usize, seed: u64, index: usize, attack: Option<crate::attack::Attack>) -> Self {
        Self {
            skew: skew(params, seed, index),
            params,
            encoder: DeltaEncoder::new(spec.exchange.codec, params),
            attacker: attack.map(Attacker::new),
            seed,
            index,
            local_steps: spec.train.local_steps,
        }
    }

    /// H local steps of gradient descent on 0.5·|w − target|² from
    /// anchor + residual, plus a little seeded noise, encoded.
    pub fn train(&mut self, round: u64, anchor: &[f32]) -> Result<(Update, StepStats), ModelError> {
        let mut rng =
            ChaCha8Rng::seed_from_u64(self.seed ^ ((self.index as u64) << 32) ^ round.wrapping_mul(0x51_7cc1));
        let start: Vec<f32> = anchor.iter().zip(self.encoder.residual()).map(|(a, e)| a + e).collect();
        let target: Vec<f32> = optimum(self.params, self.seed, round)
            .iter()
            .zip(&self.skew)
            .map(|(o, s)| o + s)
            .collect();
        let pull = 1.0 - (1.0 - INNER_LR).powi(self.local_steps as i32);
        let delta: Vec<f32> = start
            .iter()
            .zip(&target)
            .map(|(w, t)| pull * (t - w) + rng.random_range(-0.01f32..0.01))
            .collect();
        let loss = 0.5 * start.iter().zip(&target).map(|(w, t)| (w - t) * (w - t)).sum::<f32>();
        let stats = StepStats {
            steps: self.local_steps as u64,
            samples: self.local_steps as u64,
            mean_loss: loss,
        };
        let update = match self.attacker.as_mut() {
            Some(a) => a.make_update(round, delta, &mut self.encoder)?,
            None => {
                let e = self.encoder.encode(&delta)?;
                Update {
                    payload: e.bytes,
                    decoded: e.decoded,
                    twin: None,
                }
            }
        };
        Ok((update, stats))
    }
}

/// The stand-in's "test set": the distance to the shared optimum of `round`.
pub fn evaluate(anchor: &[f32], params: usize, seed: u64, round: u64) -> EvalReport {
    let optimum = optimum(params, seed, round);
    let loss = 0.5 * anchor.iter().zip(&optimum).map(|(w, t)| (w - t) * (w - t)).sum::<f32>();
    EvalReport {
        summary: Evaluation {
            loss,
            accuracy: 1.0 / (1.0 + loss),
            samples: 1,
            ..Default::default()
        },
        ..Default::default()
    }
}
