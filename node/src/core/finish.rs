//! After the last round: evaluate the final anchor, then linger while
//! peers still fetch from us and our copies of their chains complete.

use std::collections::HashSet;

use meshtrain_ledger::AuthorId;
use meshtrain_model::EvalReport;
use tracing::{info, warn};

use super::{Core, Effect, Millis, Phase, Timer};

/// Draining ends once nobody fetched from us for this long ...
const QUIET_MS: Millis = 1500;
/// ... and we drained at least this long.
const MIN_DRAIN_MS: Millis = 500;
/// How often draining looks whether it is over.
const DRAIN_CHECK_MS: Millis = 250;

impl Core {
    pub(super) fn on_evaluated(&mut self, round: u64, report: EvalReport) {
        if !matches!(self.phase, Phase::Finishing) {
            return;
        }
        let eval = report.summary;
        info!(
            round,
            test_acc = format_args!("{:.4}", eval.accuracy),
            test_loss = format_args!("{:.4}", eval.loss),
            perplexity = eval.perplexity,
            roc_auc = eval.roc_auc,
            macro_f1 = eval.macro_f1,
            "final evaluation"
        );
        self.final_eval = Some(report);
        self.set_phase(Phase::Draining);
        self.arm(Timer::Drain, self.now + DRAIN_CHECK_MS);
    }

    pub(super) fn drain_tick(&mut self) {
        if !matches!(self.phase, Phase::Draining) {
            return;
        }
        let elapsed = self.now.saturating_sub(self.phase_since);
        let complete = self.chains_complete();
        let quiet = self.now.saturating_sub(self.last_served) > QUIET_MS;
        if (complete && quiet && elapsed > MIN_DRAIN_MS) || elapsed > self.cfg.drain {
            if !complete {
                warn!("leaving with incomplete chains (drain timeout)");
            }
            self.set_phase(Phase::Done);
            self.emit(Effect::Finished);
            return;
        }
        self.arm(Timer::Drain, self.now + DRAIN_CHECK_MS);
    }

    /// Whether we hold every connected member's record for the last round
    /// (a member that left cannot add to its chain any more).
    fn chains_complete(&self) -> bool {
        let last = self.end_round.saturating_sub(1);
        let authors: HashSet<AuthorId> = self.connected_authors();
        authors.iter().all(|a| self.head_round(a).is_some_and(|r| r >= last))
    }
}
