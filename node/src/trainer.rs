//! The training thread: owns the model replica (a tensor is `Send`, not
//! `Sync`), trains H steps from each anchor, and encodes the delta with error
//! feedback. The event loop talks to it only through channels.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use meshtrain_model::{DeltaEncoder, EvalReport, Network, RecordSource, Records, TrainConfig, Trainer};
use tokio::sync::mpsc;
use tracing::{debug, error};

use crate::attack::Attack;
use crate::core::score::Scores;
use crate::core::Trained;

pub enum TrainerCmd {
    /// Evaluate `anchor` on the test set, train H steps from it, encode the delta.
    Round {
        round: u64,
        anchor: Arc<Vec<f32>>,
        steps: usize,
        /// Evaluate the anchor on the test set first.
        evaluate: bool,
    },
    /// Encode a colluding attacker's crafted delta (as `like`'s round).
    Craft { delta: Vec<f32>, like: Box<Trained> },
    /// Only evaluate `anchor` (the final weights).
    Evaluate { round: u64, anchor: Arc<Vec<f32>> },
    /// Score each delta, applied alone to `anchor`, on the scoring sample.
    Score {
        round: u64,
        anchor: Arc<Vec<f32>>,
        deltas: Vec<Arc<Vec<f32>>>,
    },
    /// Train on other blocks from now on (the placement changed), with
    /// their label counts when the run adjusts logits by them.
    SetSource {
        source: Box<dyn RecordSource>,
        prior: Option<Vec<u64>>,
    },
    /// Snapshot this thread's residual and Adam state for a checkpoint of
    /// `round` (the shell writes it, off this thread: training goes on).
    Snapshot { round: u64 },
    /// Restore the residual and Adam state of a checkpoint.
    Restore {
        residual: Vec<f32>,
        adam: meshtrain_model::AdamState,
    },
}

pub enum TrainerReply {
    RoundDone {
        trained: Box<Trained>,
        /// How long evaluating the anchor (when asked), loading anchor and
        /// residual into the replica, the local steps and encoding the
        /// delta took.
        eval: Option<Duration>,
        load: Duration,
        train: Duration,
        encode: Duration,
    },
    Crafted(Box<Trained>),
    Scored {
        round: u64,
        scores: Result<Scores, String>,
        took: Duration,
    },
    Evaluated {
        round: u64,
        report: EvalReport,
        took: Duration,
    },
    /// The residual and Adam state for a checkpoint of `round`.
    Snapshot {
        round: u64,
        state: Result<(Vec<f32>, meshtrain_model::AdamState), String>,
        took: Duration,
    },
    Failed(String),
}

pub struct TrainerHandle {
    pub cmd: std::sync::mpsc::Sender<TrainerCmd>,
    pub replies: mpsc::UnboundedReceiver<TrainerReply>,
    pub thread: JoinHandle<()>,
}

impl TrainerHandle {
    /// Closes the command channel and waits for the thread to finish the
    /// step it is on; what it panicked with, if it did.
    pub fn stop(self) -> Option<String> {
        drop(self.cmd);
        self.thread
            .join()
            .err()
            .map(|panic| crate::shell::panic_message(panic.as_ref()))
    }
}

/// Starts the training thread. `net`, the shard's batches, `test` and the
/// loss-scoring sample (if the run scores) move into it. `prior`: the
/// shard's label counts, to train with logit adjustment.
#[allow(clippy::too_many_arguments)]
pub fn spawn(
    net: Network,
    shard: Box<dyn RecordSource>,
    test: Records,
    score: Option<Records>,
    cfg: TrainConfig,
    mut encoder: DeltaEncoder,
    attack: Option<Attack>,
    prior: Option<Vec<u64>>,
) -> Result<TrainerHandle, crate::NodeError> {
    let mut trainer = Trainer::new(net, shard, cfg)?;
    trainer.set_label_prior(prior.as_deref());
    let mut attacker = attack.map(crate::attack::Attacker::new);
    let (cmd_tx, cmd_rx) = std::sync::mpsc::channel::<TrainerCmd>();
    let (reply_tx, reply_rx) = mpsc::unbounded_channel();
    let thread = std::thread::Builder::new()
        .name("trainer".into())
        .spawn(move || {
            meshtrain_model::apply_threads();
            while let Ok(cmd) = cmd_rx.recv() {
                let reply = match cmd {
                    TrainerCmd::Round {
                        round,
                        anchor,
                        steps,
                        evaluate,
                    } => run_round(&mut trainer, &test, &mut encoder, &mut attacker, round, &anchor, steps, evaluate),
                    TrainerCmd::Craft { delta, like } => match encoder.encode(&delta) {
                        Ok(e) => TrainerReply::Crafted(Box::new(Trained {
                            payload: e.bytes,
                            decoded: Arc::new(e.decoded),
                            ..*like
                        })),
                        Err(e) => TrainerReply::Failed(format!("encoding the crafted update: {e}")),
                    },
                    TrainerCmd::SetSource { source, prior } => {
                        trainer.set_source(source);
                        trainer.set_label_prior(prior.as_deref());
                        continue;
                    }
                    TrainerCmd::Restore { residual, adam } => {
                        if let Err(e) = encoder.set_residual(residual).and_then(|_| trainer.set_optimizer_state(&adam)) {
                            tracing::warn!(error = %e, "checkpoint state does not fit; starting the residual and Adam afresh");
                        }
                        continue;
                    }
                    TrainerCmd::Snapshot { round } => {
                        let started = Instant::now();
                        let state = trainer
                            .optimizer_state()
                            .map(|adam| (encoder.residual().to_vec(), adam))
                            .map_err(|e| e.to_string());
                        TrainerReply::Snapshot {
                            round,
                            state,
                            took: started.elapsed(),
                        }
                    }
                    TrainerCmd::Score { round, anchor, deltas } => {
                        let started = Instant::now();
                        let scores = match &score {
                            Some(sample) => score_deltas(&mut trainer, sample, &anchor, &deltas).map_err(|e| e.to_string()),
                            None => Err("this node has no scoring sample".to_string()),
                        };
                        TrainerReply::Scored {
                            round,
                            scores,
                            took: started.elapsed(),
                        }
                    }
                    TrainerCmd::Evaluate { round, anchor } => {
                        let started = Instant::now();
                        trainer
                            .load(&anchor)
                            .and_then(|_| trainer.evaluate(&test))
                            .map(|report| TrainerReply::Evaluated {
                                round,
                                report,
                                took: started.elapsed(),
                            })
                            .unwrap_or_else(|e| TrainerReply::Failed(e.to_string()))
                    }
                };
                if reply_tx.send(reply).is_err() {
                    break;
                }
            }
            debug!("trainer thread stops");
        })
        .map_err(|source| crate::NodeError::Thread { name: "trainer", source })?;
    Ok(TrainerHandle {
        cmd: cmd_tx,
        replies: reply_rx,
        thread,
    })
}

/// The held-out loss on `sample` of the anchor moved by the mean of all
/// the deltas, and by the mean of all but each one (leave one out). The
/// replica is reloaded before every round's training, so what this leaves
/// in it does not matter.
fn score_deltas(
    trainer: &mut Trainer,
    sample: &Records,
    anchor: &[f32],
    deltas: &[Arc<Vec<f32>>],
) -> Result<Scores, meshtrain_model::ModelError> {
    let sum = crate::core::score::sum_of(deltas, anchor.len());
    let mut w = vec![0f32; anchor.len()];
    let mut loss_at = |trainer: &mut Trainer, leave: Option<usize>| {
        crate::core::score::moved(anchor, &sum, deltas, leave, &mut w);
        trainer.load(&w)?;
        Ok::<f32, meshtrain_model::ModelError>(trainer.evaluate(sample)?.summary.loss)
    };
    let with_all = loss_at(trainer, None)?;
    let mut without = Vec::with_capacity(deltas.len());
    for i in 0..deltas.len() {
        without.push(loss_at(trainer, Some(i))?);
    }
    Ok(Scores { with_all, without })
}

#[allow(clippy::too_many_arguments)]
fn run_round(
    trainer: &mut Trainer,
    test: &Records,
    encoder: &mut DeltaEncoder,
    attacker: &mut Option<crate::attack::Attacker>,
    round: u64,
    anchor: &[f32],
    steps: usize,
    evaluate: bool,
) -> TrainerReply {
    let result = (|| -> Result<TrainerReply, meshtrain_model::ModelError> {
        let started = Instant::now();
        let eval = if evaluate {
            trainer.load(anchor)?;
            Some(trainer.evaluate(test)?.summary)
        } else {
            None
        };
        let eval_took = evaluate.then(|| started.elapsed());
        // Train from anchor + residual: the progress the codec has not sent
        // yet stays in the replica instead of being learned again (which
        // error feedback would then send twice).
        let started = Instant::now();
        let start: Vec<f32> = anchor.iter().zip(encoder.residual()).map(|(a, e)| a + e).collect();
        trainer.load(&start)?;
        let load = started.elapsed();
        let started = Instant::now();
        let stats = trainer.train_steps(steps)?;
        let train = started.elapsed();
        let started = Instant::now();
        let mut delta = trainer.weights()?;
        for (d, s) in delta.iter_mut().zip(&start) {
            *d -= *s;
        }
        let trained = match attacker {
            Some(a) => a.make_update(round, delta, encoder)?,
            None => {
                let encoded = encoder.encode(&delta)?;
                crate::attack::Update {
                    payload: encoded.bytes,
                    decoded: encoded.decoded,
                    twin: None,
                }
            }
        };
        Ok(TrainerReply::RoundDone {
            trained: Box::new(Trained {
                round,
                eval,
                stats,
                payload: trained.payload,
                decoded: Arc::new(trained.decoded),
                twin: trained.twin,
                train_ms: train.as_millis() as u64,
            }),
            eval: eval_took,
            load,
            train,
            encode: started.elapsed(),
        })
    })();
    result.unwrap_or_else(|e| {
        error!(round, error = %e, "training round failed");
        TrainerReply::Failed(e.to_string())
    })
}
