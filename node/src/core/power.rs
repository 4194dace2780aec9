//! Voting power: who is admitted to a run and how much each key's vote
//! weighs, as this node sees it. Every count the protocol takes (votes on
//! anchors, the updates a round waits for, block placement, the aggregate's
//! weights) goes through here, never through raw peers or keys, so keys an
//! attacker makes for free buy nothing.

use std::collections::{BTreeSet, HashMap};

use meshtrain_ledger::{AuthorId, Verdict, VerdictEntry};

/// The run's admission rule, parsed.
#[derive(Clone, Debug, PartialEq)]
pub enum Rule {
    /// A roster; one vote each, nobody else admitted.
    Permissioned(BTreeSet<AuthorId>),
    /// Anyone admitted; a vote once merged in this many rounds, and the
    /// founders' from the start.
    Open {
        earn_rounds: u64,
        founders: BTreeSet<AuthorId>,
    },
}

impl Rule {
    /// The rule a run spec's admission section gives.
    pub fn of(admission: &crate::runspec::Admission) -> Result<Self, String> {
        Ok(match admission.roster()? {
            Some(roster) => Rule::Permissioned(roster),
            None => match admission {
                crate::runspec::Admission::Open { earn_rounds, .. } => Rule::Open {
                    earn_rounds: *earn_rounds,
                    founders: admission.founders()?,
                },
                crate::runspec::Admission::Permissioned { .. } => Rule::Permissioned(BTreeSet::new()),
            },
        })
    }

    /// The roster, when there is one.
    pub fn roster(&self) -> Option<&BTreeSet<AuthorId>> {
        match self {
            Rule::Permissioned(r) => Some(r),
            Rule::Open { .. } => None,
        }
    }
}

/// Whether a verdict earns its author a round's credit: merged at full
/// weight, or on probation and passing at full weight.
pub fn earns(v: &Verdict) -> bool {
    match v {
        Verdict::Merged { .. } => true,
        Verdict::Probation { factor } => *factor >= 1.0,
        _ => false,
    }
}

#[derive(Clone, Debug)]
pub struct Power {
    rule: Rule,
    /// Open runs: the rounds in which each key's update was merged (by this
    /// node's own verdicts).
    merged: HashMap<AuthorId, BTreeSet<u64>>,
    /// Open runs: the members whose signed attestations named the anchor
    /// this node started from when it joined (or rejoined) a running mesh
    /// without a view of its own: one vote each, as the checkpoint it
    /// trusted (weak subjectivity). Without them a node that restarts after
    /// the others earned their votes would count nobody's vote, and follow
    /// nobody.
    vouched: BTreeSet<AuthorId>,
    /// This node's own key: in an open run its own earned vote counts only
    /// beside someone else's, so that a node that spent the rounds alone
    /// (partitioned, or restarted early) does not become the one voter of
    /// its own view and follow only itself.
    me: Option<AuthorId>,
}

impl Power {
    pub fn new(rule: Rule) -> Self {
        Self {
            rule,
            merged: HashMap::new(),
            vouched: BTreeSet::new(),
            me: None,
        }
    }

    /// The node's own key (see `me`).
    pub fn with_me(mut self, me: AuthorId) -> Self {
        self.me = Some(me);
        self
    }

    /// Open runs: gives the members that vouched for our starting anchor a
    /// vote each (see `vouched`).
    pub fn vouch(&mut self, voters: impl IntoIterator<Item = AuthorId>) {
        if self.is_open() {
            self.vouched.extend(voters);
        }
    }

    fn earned(&self, author: &AuthorId, earn_rounds: u64) -> bool {
        self.merged.get(author).is_some_and(|r| r.len() as u64 >= earn_rounds) || self.vouched.contains(author)
    }

    pub fn rule(&self) -> &Rule {
        &self.rule
    }

    /// Whether keys earn their votes (an open run) rather than a roster
    /// fixing them.
    pub fn is_open(&self) -> bool {
        matches!(self.rule, Rule::Open { .. })
    }

    /// Whether `author` may take part at all.
    pub fn admitted(&self, author: &AuthorId) -> bool {
        match &self.rule {
            Rule::Permissioned(roster) => roster.contains(author),
            Rule::Open { .. } => true,
        }
    }

    /// The weight of `author`'s vote: 0 or 1.
    pub fn of(&self, author: &AuthorId) -> u64 {
        match &self.rule {
            Rule::Permissioned(roster) => u64::from(roster.contains(author)),
            Rule::Open { earn_rounds, founders } => u64::from(
                founders.contains(author)
                    || (self.earned(author, *earn_rounds) && (Some(*author) != self.me || self.total() > 0)),
            ),
        }
    }

    /// Every key whose vote counts here (sorted).
    pub fn holders(&self) -> Vec<AuthorId> {
        let mut keys: BTreeSet<AuthorId> = match &self.rule {
            Rule::Permissioned(roster) => roster.clone(),
            Rule::Open { founders, .. } => founders
                .iter()
                .chain(self.merged.keys())
                .chain(&self.vouched)
                .copied()
                .collect(),
        };
        keys.retain(|a| self.of(a) > 0);
        keys.into_iter().collect()
    }

    /// The run's whole voting power, as far as this node knows it.
    pub fn total(&self) -> u64 {
        match &self.rule {
            Rule::Permissioned(roster) => roster.len() as u64,
            Rule::Open { earn_rounds, founders } => {
                let earned: BTreeSet<&AuthorId> = self
                    .merged
                    .keys()
                    .filter(|a| self.earned(a, *earn_rounds))
                    .chain(&self.vouched)
                    .collect();
                if founders.is_empty() && earned.iter().all(|a| Some(**a) == self.me) {
                    // Nobody but us: no view yet.
                    return 0;
                }
                earned.union(&founders.iter().collect()).count() as u64
            }
        }
    }

    /// Open runs: credits the authors whose update for `round` our verdicts
    /// for it merged at full weight (not clipped), or would have (on
    /// probation). Only in rounds that half
    /// the voting power took part in: a node left alone with a crowd of
    /// fresh keys (partitioned, or gone back to an old anchor that they
    /// claim too) must not hand them votes for being merged among
    /// themselves.
    pub fn credit_round(&mut self, round: u64, entries: &[VerdictEntry]) {
        if !self.is_open() {
            return;
        }
        let current = entries.iter().filter(|e| e.round == round);
        let voters_merged: u64 = current
            .clone()
            .filter(|e| !e.verdict.is_rejected())
            .map(|e| self.of(&e.author))
            .sum();
        if 2 * voters_merged < self.total() {
            return;
        }
        let keys: Vec<AuthorId> = current.filter(|e| earns(&e.verdict)).map(|e| e.author).collect();
        self.credit(round, keys);
    }

    /// Open runs: credits `keys` with `round`, as agreed by the votes (see
    /// [`super::agreement::agreed_credits`]).
    pub fn credit(&mut self, round: u64, keys: impl IntoIterator<Item = AuthorId>) {
        if !self.is_open() {
            return;
        }
        for k in keys {
            self.merged.entry(k).or_default().insert(round);
        }
    }

    /// Whether `author`'s updates are on probation: judged, but weighing
    /// nothing (open runs, a key without a vote once anybody has one).
    pub fn on_probation(&self, author: &AuthorId) -> bool {
        self.is_open() && self.total() > 0 && self.of(author) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(n: u8) -> AuthorId {
        AuthorId([n; 32])
    }

    #[test]
    fn a_roster_gives_one_vote_each_and_admits_nobody_else() {
        let p = Power::new(Rule::Permissioned([a(1), a(2), a(3)].into()));
        assert_eq!(p.total(), 3);
        assert_eq!(p.of(&a(2)), 1);
        assert_eq!(p.of(&a(9)), 0);
        assert!(!p.admitted(&a(9)));
    }

    fn merged(author: AuthorId, round: u64) -> VerdictEntry {
        VerdictEntry {
            author,
            seq: meshtrain_ledger::Seq(round),
            record_hash: meshtrain_ledger::RecordHash([round as u8; 32]),
            round,
            prior: 1.0,
            verdict: Verdict::Merged { weight: 0.5 },
        }
    }

    fn open(earn_rounds: u64, founders: &[u8]) -> Power {
        Power::new(Rule::Open {
            earn_rounds,
            founders: founders.iter().map(|n| a(*n)).collect(),
        })
    }

    #[test]
    fn open_votes_are_earned_by_merged_rounds_and_capped() {
        let mut p = open(2, &[]);
        assert!(p.admitted(&a(9)));
        p.credit_round(0, &[merged(a(1), 0)]);
        p.credit_round(0, &[merged(a(1), 0)]);
        assert_eq!(p.of(&a(1)), 0, "one round, counted once");
        assert!(!p.on_probation(&a(5)), "nobody has a vote yet: everyone weighs alike");
        p.credit_round(1, &[merged(a(1), 1)]);
        p.credit_round(2, &[merged(a(1), 2)]);
        assert_eq!(p.of(&a(1)), 1, "never more than one vote");
        assert_eq!(p.total(), 1);
        assert!(!p.on_probation(&a(1)));
        assert!(
            p.on_probation(&a(5)),
            "once anybody votes, the unearned are on probation"
        );
        let mut clipped = merged(a(2), 3);
        clipped.verdict = Verdict::Clipped {
            factor: 0.5,
            weight: 0.5,
        };
        for r in 3..9 {
            clipped.round = r;
            p.credit_round(r, &[merged(a(1), r), clipped.clone()]);
        }
        assert_eq!(p.of(&a(2)), 0, "clipped updates earn nothing");
        // Probation verdicts earn at full weight only.
        let judged = |author, r, factor| VerdictEntry {
            verdict: Verdict::Probation { factor },
            ..merged(author, r)
        };
        for r in 9..12 {
            p.credit_round(r, &[merged(a(1), r), judged(a(3), r, 1.0), judged(a(4), r, 0.9)]);
        }
        assert_eq!((p.of(&a(3)), p.of(&a(4))), (1, 0));
    }

    #[test]
    fn founders_vote_from_the_start_and_crowds_earn_nothing_without_them() {
        let mut p = open(1, &[1, 2, 3]).with_me(a(1));
        assert_eq!((p.total(), p.of(&a(2)), p.of(&a(7))), (3, 1, 0));
        // Alone with fresh keys (a partition, or an old anchor they claim):
        // one founder of three took part, so nobody earns.
        p.credit_round(5, &[merged(a(1), 5), merged(a(7), 5), merged(a(8), 5)]);
        assert_eq!((p.of(&a(7)), p.total()), (0, 3));
        // With two of three founders merged, the round counts.
        p.credit_round(6, &[merged(a(1), 6), merged(a(2), 6), merged(a(7), 6)]);
        assert_eq!((p.of(&a(7)), p.total()), (1, 4));
    }

    #[test]
    fn our_own_vote_alone_is_no_view() {
        let mut p = open(1, &[]).with_me(a(1));
        p.credit_round(0, &[merged(a(1), 0)]);
        assert_eq!(
            (p.total(), p.of(&a(1))),
            (0, 0),
            "a node that merged only itself has no view"
        );
        p.credit_round(1, &[merged(a(1), 1), merged(a(2), 1)]);
        assert_eq!((p.total(), p.of(&a(1)), p.of(&a(2))), (2, 1, 1));
    }
}
