//! Appends to a ledger forever, as a node would: records of 8 authors, each
//! with its payload, and after every 8 records a signed verdict block, every
//! event one WriteBatch. Resumes from whatever the store holds. The crash
//! test kills it with SIGKILL at random points.
//!
//! Usage: ledger_writer DIR [--sync]

use meshtrain_ledger::{
    AuthorKey, Ledger, PayloadHash, RunId, RunMeta, Seq, StoreOptions, UpdateRecord, Verdict, VerdictBlock,
    VerdictEntry, VerifiedRecord, WeightsHash, RECORD_VERSION, VERDICT_VERSION,
};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let dir = args.get(1).ok_or("usage: ledger_writer DIR [--sync]")?;
    let sync = args.iter().any(|a| a == "--sync");
    let owner = AuthorKey::from_secret([1; 32]);
    let spec = b"crash-test".to_vec();
    let meta = RunMeta {
        run_id: RunId::of_spec(&spec),
        owner: owner.author(),
        genesis_weights: WeightsHash([0; 32]),
        run_spec: spec,
    };
    let ledger = Ledger::open_or_create(std::path::Path::new(dir), &meta, StoreOptions { sync_writes: sync })?;
    let authors: Vec<AuthorKey> = (10..18u8).map(|i| AuthorKey::from_secret([i; 32])).collect();
    let mut pending = Vec::new();
    let mut i = 0usize;
    loop {
        let k = &authors[i % authors.len()];
        i += 1;
        let head = ledger.head(&k.author());
        let (seq, prev) = match head {
            None => (Seq(0), meta.genesis_link()),
            Some(h) => (h.seq.next(), h.hash),
        };
        let payload: Vec<u8> = (0..(64 + seq.0 % 512)).map(|b| (b as u8) ^ (seq.0 as u8)).collect();
        let signed = UpdateRecord {
            version: RECORD_VERSION,
            run_id: meta.run_id,
            author: k.author(),
            seq,
            prev,
            round: seq.0,
            base_hash: WeightsHash([0; 32]),
            base_outer: WeightsHash([0; 32]),
            made_from: WeightsHash([0; 32]),
            made_outer: WeightsHash([0; 32]),
            merged: Vec::new(),
            waited: Vec::new(),
            payload_hash: PayloadHash::of(&payload),
            payload_len: payload.len() as u64,
            n_samples: 64,
            train_loss: 1.0,
        }
        .sign(k);
        let verified = VerifiedRecord::extend(signed, &meta.run_id, head, meta.genesis_link())?;
        pending.push(VerdictEntry {
            author: k.author(),
            seq,
            record_hash: verified.hash(),
            round: seq.0,
            prior: 0.0,
            verdict: Verdict::Merged { weight: 0.125 },
        });
        let mut event = ledger.begin();
        event
            .append(&verified)?
            .payload(&verified.signed().record.payload_hash, seq.0, &payload)?;
        if pending.len() == authors.len() {
            let (vseq, vprev) = match ledger.verdict_head() {
                None => (0, meta.verdict_genesis()),
                Some(h) => (h.seq + 1, h.hash),
            };
            let block = VerdictBlock {
                version: VERDICT_VERSION,
                run_id: meta.run_id,
                owner: owner.author(),
                seq: vseq,
                prev: vprev,
                round: vseq,
                base_anchor: WeightsHash([0; 32]),
                base_outer: WeightsHash([0; 32]),
                new_anchor: WeightsHash([1; 32]),
                outer_state: WeightsHash([0; 32]),
                entries: std::mem::take(&mut pending),
            }
            .sign(&owner);
            event.verdict(&block)?;
        }
        event.commit()?;
    }
}
