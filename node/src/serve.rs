//! Answers peers' fetch requests from the ledger (run on a blocking thread
//! by the node, inline by the simulator).

use meshtrain_gossip::{FetchRequest, FetchResponse, HeadInfo};
use meshtrain_ledger::{AuthorId, PayloadHash, Seq, Store};

/// Most records sent in one answer.
pub const MAX_RECORDS_PER_RESPONSE: u32 = 256;
/// Most chain heads sent in one answer (and taken from one).
pub const MAX_HEADS_PER_RESPONSE: usize = 4096;

pub fn answer<S: Store + ?Sized>(ledger: &S, request: &FetchRequest) -> FetchResponse {
    let result = match request {
        FetchRequest::Payload { hash } => ledger.payload(&PayloadHash(*hash)).map(|p| match p {
            Some(bytes) => FetchResponse::Payload(bytes),
            None => FetchResponse::NotFound,
        }),
        FetchRequest::Records { author, from_seq, max } => {
            let max = (*max).clamp(1, MAX_RECORDS_PER_RESPONSE) as usize;
            ledger
                .records_from(&AuthorId(*author), Seq(*from_seq), max)
                .map(|records| {
                    if records.is_empty() {
                        FetchResponse::NotFound
                    } else {
                        FetchResponse::Records(records.iter().map(|r| r.to_bytes()).collect())
                    }
                })
        }
        FetchRequest::Heads => Ok(FetchResponse::Heads({
            let mut heads: Vec<HeadInfo> = ledger
                .heads()
                .into_iter()
                .map(|(author, head)| HeadInfo {
                    author: author.0,
                    seq: head.seq.0,
                    hash: head.hash.0,
                })
                .collect();
            // No more than a node accepts: in an open run fresh keys can
            // make any number of one-record chains; the longest go first.
            if heads.len() > MAX_HEADS_PER_RESPONSE {
                heads.sort_unstable_by(|a, b| b.seq.cmp(&a.seq).then(a.author.cmp(&b.author)));
                heads.truncate(MAX_HEADS_PER_RESPONSE);
            }
            heads
        })),
        // Answered by the event loop, which holds the anchor and the votes.
        FetchRequest::Anchor { .. }
        | FetchRequest::FinalVote
        | FetchRequest::FinalVoteOf { .. }
        | FetchRequest::RoundVerdict { .. }
        | FetchRequest::Block { .. } => Ok(FetchResponse::NotFound),
    };
    result.unwrap_or_else(|e| FetchResponse::Refused(format!("ledger error: {e}")))
}
