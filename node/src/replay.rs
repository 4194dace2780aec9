//! Replay audit: recomputes a node's anchor weights round by round from
//! genesis, the merged deltas it kept and the aggregation it recorded, and
//! checks every anchor hash in its verdict chain. It proves the model is the
//! product of the recorded updates and nothing else.
//!
//! Aggregation and the outer step are plain deterministic Rust, so the replay
//! is bit-exact on the same machine.

use meshtrain_ledger::{LedgerError, RejectReason, Store, Verdict, VerdictEntry, WeightsHash};
use meshtrain_model::{aggregate::aggregate, codec, AggInput, AggVerdict, Network, OuterConfig, OuterOptimizer};
use serde::Serialize;

use crate::blockstore::BlockStore;
use crate::{NodeError, RunSpec};

#[derive(Debug, Default, Serialize)]
pub struct ReplayReport {
    pub ok: bool,
    pub blocks: u64,
    pub deltas: u64,
    /// Points where the node took the mesh's anchor over (from its joins).
    pub joins: u64,
    pub final_anchor: String,
    /// The first block that did not reproduce, and why.
    pub problem: Option<String>,
}

/// Whether an entry was an input of the aggregator (rather than refused
/// before it: protocol offences, stale or unavailable updates).
fn was_aggregated(entry: &VerdictEntry) -> bool {
    match &entry.verdict {
        Verdict::Merged { .. } | Verdict::Clipped { .. } => true,
        Verdict::Rejected { reason } => matches!(reason, RejectReason::Outlier(_)),
        // Judged in a pass of its own; it weighs nothing in the anchor.
        Verdict::Probation { .. } => false,
    }
}

fn same_verdict(recorded: &Verdict, replayed: &AggVerdict) -> bool {
    match (recorded, replayed) {
        (Verdict::Merged { weight: a }, AggVerdict::Merged { weight: b }) => a == b,
        (Verdict::Clipped { factor: a, weight: w }, AggVerdict::Clipped { factor: b, weight: v }) => a == b && w == v,
        (
            Verdict::Rejected {
                reason: RejectReason::Outlier(a),
            },
            AggVerdict::Rejected { reason: b },
        ) => a == b,
        _ => false,
    }
}

/// Where a replay ends: the anchor and outer state after the last block.
pub struct ReplayState {
    pub anchor: Vec<f32>,
    pub anchor_hash: WeightsHash,
    pub velocity: Vec<f32>,
    pub report: ReplayReport,
}

/// What a replay needs of the model: its genesis weights and which ranges
/// are buffers (stepped plainly by the outer optimiser).
#[derive(Clone, Debug)]
pub struct ModelShape {
    pub genesis: Vec<f32>,
    pub buffers: Vec<std::ops::Range<usize>>,
}

impl ModelShape {
    /// The shape of the spec's model (built once on the CPU); a TorchScript
    /// module is read from `store`.
    pub fn of_spec(spec: &RunSpec, store: Option<&BlockStore>) -> Result<Self, NodeError> {
        let net = match (store, &spec.model.script) {
            (Some(store), _) => crate::model_file::network(spec, store, meshtrain_model::Device::Cpu)?,
            (None, Some(script)) => {
                return Err(NodeError::Replay(format!(
                    "the run trains a TorchScript module ({}): name a block store that holds it (`ledger replay DIR --blocks STORE`)",
                    &script.file[..16]
                )))
            }
            (None, None) => Network::new(spec.model.arch, &spec.data.schema, meshtrain_model::Device::Cpu)?,
        };
        Ok(Self {
            genesis: net.genesis(spec.seed),
            buffers: net.layout().buffer_ranges(),
        })
    }
}

/// Replays a ledger; a run of a TorchScript module needs the block store
/// that holds the module's file.
pub fn replay<S: Store + ?Sized>(ledger: &S, store: Option<&BlockStore>) -> Result<ReplayReport, NodeError> {
    let spec = RunSpec::from_canonical(&ledger.meta().run_spec)?;
    Ok(replay_core(ledger, &ModelShape::of_spec(&spec, store)?)?.report)
}

/// The anchor and outer state a node reaches by replaying its ledger (used
/// to resume when the checkpoint is older than the verdict chain).
pub fn replay_state<S: Store + ?Sized>(ledger: &S, shape: &ModelShape) -> Result<ReplayState, NodeError> {
    let state = replay_core(ledger, shape)?;
    match &state.report.problem {
        Some(p) => Err(NodeError::Replay(p.clone())),
        None => Ok(state),
    }
}

/// An adopted anchor and outer state.
type JoinedState = (Vec<f32>, Vec<f32>);

/// A join the replay resumes from: the adopted anchor and outer state.
fn joined_state<S: Store + ?Sized>(
    ledger: &S,
    round: u64,
    base: &WeightsHash,
    base_outer: &WeightsHash,
    params: usize,
) -> Result<Option<JoinedState>, NodeError> {
    // The latest join onto that anchor at this round or before: a node
    // that skips rounds the mesh gave up keeps its anchor, so the block
    // after the skip builds on what it took over rounds earlier.
    let Some(join) = ledger
        .joins()?
        .into_iter()
        .filter(|j| j.round <= round && j.anchor == *base && j.outer_state == *base_outer)
        .max_by_key(|j| j.round)
    else {
        return Ok(None);
    };
    // A permissioned run's roster says whose votes count: the join needs
    // half of it or more behind the anchor.
    let spec = RunSpec::from_canonical(&ledger.meta().run_spec)?;
    if join.votes.is_empty() && join.anchor != ledger.meta().genesis_weights {
        return Err(NodeError::Replay(format!(
            "the join at round {round} takes an anchor without votes that is not genesis"
        )));
    }
    if let (Ok(Some(roster)), false) = (spec.admission.roster(), join.votes.is_empty()) {
        let voters = join.votes.iter().filter(|v| roster.contains(&v.voter())).count();
        if 2 * voters < roster.len() {
            return Err(NodeError::Replay(format!(
                "the join at round {round} has the votes of {voters} of the {} members, fewer than half",
                roster.len()
            )));
        }
    }
    let (Some(a), Some(o)) = (
        ledger.payload(&join.anchor_payload)?,
        ledger.payload(&join.outer_payload)?,
    ) else {
        return Ok(None);
    };
    let anchor = codec::decode(&a, params).map_err(|e| NodeError::Replay(format!("joined anchor: {e}")))?;
    let outer = match codec::peek_len(&o) {
        Ok(0) => Vec::new(),
        _ => codec::decode(&o, params).map_err(|e| NodeError::Replay(format!("joined outer state: {e}")))?,
    };
    Ok(Some((anchor, outer)))
}

fn replay_core<S: Store + ?Sized>(ledger: &S, shape: &ModelShape) -> Result<ReplayState, NodeError> {
    let meta = ledger.meta();
    let spec = RunSpec::from_canonical(&meta.run_spec)?;
    let mut anchor = shape.genesis.clone();
    let params = anchor.len();
    let mut report = ReplayReport::default();
    let fail = |mut report: ReplayReport, problem: String, anchor: Vec<f32>| {
        report.problem = Some(problem);
        Ok(ReplayState {
            anchor_hash: WeightsHash::of_f32(&anchor),
            anchor,
            velocity: Vec::new(),
            report,
        })
    };
    if WeightsHash::of_f32(&anchor) != meta.genesis_weights {
        return fail(
            report,
            "genesis weights from the run's seed do not match the ledger's genesis hash".into(),
            anchor,
        );
    }
    let mut outer = OuterOptimizer::new(
        OuterConfig {
            lr: spec.exchange.outer_lr,
            momentum: spec.exchange.outer_momentum,
            nesterov: spec.exchange.nesterov,
        },
        params,
        shape.buffers.clone(),
    );

    let last = ledger.verdict_head().map(|h| h.seq);
    for seq in (0..).take_while(|s| last.is_some_and(|l| *s <= l)) {
        let signed = ledger.verdict(seq)?.ok_or_else(|| LedgerError::Corrupt {
            column: "verdicts",
            key: seq.to_string(),
            detail: "missing below the verdict head".into(),
        })?;
        let block = &signed.block;
        let here = format!("verdict block {seq} (round {})", block.round);
        // The node may have taken the mesh's anchor over here: a repair
        // can keep the weights and take another outer state (simulator,
        // `--byzantine 2 --attack sign-flip`, seed 548 with a shorter first
        // round: a node that rebuilt a round made the others' weights with
        // other momentum, and its ledger did not replay).
        if WeightsHash::of_f32(&anchor) != block.base_anchor
            || WeightsHash::of_f32(outer.velocity()) != block.base_outer
        {
            match joined_state(ledger, block.round, &block.base_anchor, &block.base_outer, params)? {
                Some((a, v)) => {
                    anchor = a;
                    outer.set_velocity(v);
                    report.joins += 1;
                }
                None => {
                    return fail(
                        report,
                        format!("{here}: its base anchor (weights and outer state) is not the replayed one"),
                        anchor,
                    )
                }
            }
        }
        let mut inputs: Vec<&VerdictEntry> = block.entries.iter().filter(|e| was_aggregated(e)).collect();
        inputs.sort_by(|a, b| a.round.cmp(&b.round).then(a.author.cmp(&b.author)));
        let mut deltas = Vec::with_capacity(inputs.len());
        for e in &inputs {
            let record = ledger
                .record(&e.author, e.seq)?
                .filter(|r| r.hash() == e.record_hash)
                .ok_or_else(|| LedgerError::Corrupt {
                    column: "records",
                    key: format!("{}/{}", e.author, e.seq),
                    detail: format!("{here} merged a record the ledger does not hold"),
                })?;
            let Some(payload) = ledger.payload(&record.record.payload_hash)? else {
                return fail(
                    report,
                    format!(
                        "{here}: the payload of {}/{} was not retained; replay needs every payload",
                        e.author, e.seq
                    ),
                    anchor,
                );
            };
            let delta = codec::decode(&payload, params)
                .map_err(|err| NodeError::Replay(format!("{here}: payload of {}/{}: {err}", e.author, e.seq)))?;
            deltas.push(delta);
        }
        // The recorded prior may discount (admission shares) but never
        // exceed what the staleness rule allows.
        for e in &inputs {
            let allowed = spec
                .exchange
                .staleness_decay
                .powi(block.round.saturating_sub(e.round) as i32);
            if !(e.prior > 0.0 && e.prior <= allowed) {
                return fail(
                    report,
                    format!(
                        "{here}: {}/{} was aggregated at prior weight {}, the rules allow at most {allowed}",
                        e.author.short(),
                        e.seq,
                        e.prior
                    ),
                    anchor,
                );
            }
        }
        let agg_inputs: Vec<AggInput<'_>> = inputs
            .iter()
            .zip(&deltas)
            .map(|(e, d)| AggInput {
                delta: d,
                weight: e.prior,
            })
            .collect();
        let result = aggregate(spec.exchange.aggregator, &agg_inputs);
        for (e, v) in inputs.iter().zip(&result.verdicts) {
            if !same_verdict(&e.verdict, v) {
                return fail(
                    report,
                    format!(
                        "{here}: recorded {:?} for {}/{}, the aggregator gives {v:?}",
                        e.verdict,
                        e.author.short(),
                        e.seq
                    ),
                    anchor,
                );
            }
        }
        if !result.update.is_empty() {
            outer.step(&mut anchor, &result.update);
        }
        if WeightsHash::of_f32(&anchor) != block.new_anchor {
            return fail(
                report,
                format!("{here}: the replayed anchor does not hash to the recorded one"),
                anchor,
            );
        }
        if WeightsHash::of_f32(outer.velocity()) != block.outer_state {
            return fail(
                report,
                format!("{here}: the replayed outer state does not hash to the recorded one"),
                anchor,
            );
        }
        report.blocks += 1;
        report.deltas += inputs.len() as u64;
    }
    let anchor_hash = WeightsHash::of_f32(&anchor);
    report.final_anchor = anchor_hash.to_string();
    report.ok = true;
    Ok(ReplayState {
        anchor_hash,
        velocity: outer.velocity().to_vec(),
        anchor,
        report,
    })
}
