//! Where training batches come from: records in memory, or streamed from a
//! node's local blocks through a bounded window that is shuffled across
//! blocks (never a full copy of the shard in memory).

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::blocks::Schema;
use crate::{ModelError, Result};

/// Yields batches of whole records in the schema's block layout.
pub trait RecordSource: Send {
    fn schema(&self) -> &Schema;
    /// Records per epoch.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The next `n` records (fewer only if the source holds fewer), as one
    /// contiguous buffer; epochs wrap around with a fresh shuffle.
    fn next_batch(&mut self, n: usize) -> Result<Vec<u8>>;
}

/// Records held in memory, reshuffled every epoch.
pub struct InMemory {
    schema: Schema,
    records: Vec<u8>,
    order: Vec<usize>,
    cursor: usize,
    rng: ChaCha8Rng,
}

impl InMemory {
    pub fn new(schema: Schema, records: Vec<u8>, seed: u64) -> Result<Self> {
        let rs = schema.record_size();
        if !records.len().is_multiple_of(rs) {
            return Err(ModelError::BadDataset {
                name: "in-memory records".into(),
                detail: format!("{} bytes is not a whole number of {rs}-byte records", records.len()),
            });
        }
        let n = records.len() / rs;
        Ok(Self {
            schema,
            records,
            order: (0..n).collect(),
            cursor: usize::MAX,
            rng: ChaCha8Rng::seed_from_u64(seed),
        })
    }
}

impl RecordSource for InMemory {
    fn schema(&self) -> &Schema {
        &self.schema
    }

    fn len(&self) -> usize {
        self.order.len()
    }

    fn next_batch(&mut self, n: usize) -> Result<Vec<u8>> {
        let rs = self.schema.record_size();
        let n = n.min(self.order.len());
        let mut out = Vec::with_capacity(n * rs);
        for _ in 0..n {
            if self.cursor >= self.order.len() {
                self.order.shuffle(&mut self.rng);
                self.cursor = 0;
            }
            let i = self.order[self.cursor];
            self.cursor += 1;
            out.extend_from_slice(&self.records[i * rs..(i + 1) * rs]);
        }
        Ok(out)
    }
}

/// Reads one block's verified bytes.
pub trait BlockReader: Send {
    fn blocks(&self) -> usize;
    fn records_in(&self, block: usize) -> usize;
    fn read(&mut self, block: usize) -> Result<Vec<u8>>;
}

/// Streams records from blocks: each epoch visits the blocks in a fresh
/// random order, `window` blocks at a time, shuffling records across the
/// window. Memory stays at `window` blocks.
pub struct BlockStream<R: BlockReader> {
    schema: Schema,
    reader: R,
    window: usize,
    rng: ChaCha8Rng,
    block_order: Vec<usize>,
    next_block: usize,
    buffer: Vec<u8>,
    picks: Vec<usize>,
    cursor: usize,
    total: usize,
}

impl<R: BlockReader> BlockStream<R> {
    pub fn new(schema: Schema, reader: R, window: usize, seed: u64) -> Result<Self> {
        let total = (0..reader.blocks()).map(|b| reader.records_in(b)).sum();
        if total == 0 {
            return Err(ModelError::BadDataset {
                name: "block stream".into(),
                detail: "no records in the local blocks".into(),
            });
        }
        Ok(Self {
            schema,
            block_order: (0..reader.blocks()).collect(),
            next_block: usize::MAX,
            reader,
            window: window.max(1),
            rng: ChaCha8Rng::seed_from_u64(seed),
            buffer: Vec::new(),
            picks: Vec::new(),
            cursor: 0,
            total,
        })
    }

    fn refill(&mut self) -> Result<()> {
        let rs = self.schema.record_size();
        self.buffer.clear();
        // A reader may come back empty for a block it cannot read right now
        // (its owner fetches it again); give up only if none is readable.
        let mut empty_reads = 0;
        while self.buffer.is_empty() {
            if empty_reads > self.block_order.len() {
                return Err(ModelError::BadDataset {
                    name: "block stream".into(),
                    detail: "none of the local blocks is readable".into(),
                });
            }
            for _ in 0..self.window {
                if self.next_block >= self.block_order.len() {
                    if !self.buffer.is_empty() {
                        break; // finish this epoch's window first
                    }
                    self.block_order.shuffle(&mut self.rng);
                    self.next_block = 0;
                }
                let b = self.block_order[self.next_block];
                self.next_block += 1;
                let bytes = self.reader.read(b)?;
                if bytes.is_empty() {
                    empty_reads += 1;
                }
                self.buffer.extend_from_slice(&bytes);
            }
        }
        self.picks = (0..self.buffer.len() / rs).collect();
        self.picks.shuffle(&mut self.rng);
        self.cursor = 0;
        Ok(())
    }
}

impl<R: BlockReader> RecordSource for BlockStream<R> {
    fn schema(&self) -> &Schema {
        &self.schema
    }

    fn len(&self) -> usize {
        self.total
    }

    fn next_batch(&mut self, n: usize) -> Result<Vec<u8>> {
        let rs = self.schema.record_size();
        let mut out = Vec::with_capacity(n * rs);
        for _ in 0..n.min(self.total) {
            if self.cursor >= self.picks.len() {
                self.refill()?;
            }
            let i = self.picks[self.cursor];
            self.cursor += 1;
            out.extend_from_slice(&self.buffer[i * rs..(i + 1) * rs]);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Mem {
        blocks: Vec<Vec<u8>>,
        reads: usize,
    }

    impl BlockReader for Mem {
        fn blocks(&self) -> usize {
            self.blocks.len()
        }
        fn records_in(&self, b: usize) -> usize {
            self.blocks[b].len() / 2
        }
        fn read(&mut self, b: usize) -> Result<Vec<u8>> {
            self.reads += 1;
            Ok(self.blocks[b].clone())
        }
    }

    fn schema() -> Schema {
        Schema::Image {
            channels: 1,
            height: 1,
            width: 1,
            classes: 256,
        }
    }

    #[test]
    fn every_record_once_per_epoch_across_blocks() {
        // 10 blocks of 4 two-byte records; record k = [k, k]
        let blocks = (0..10u8)
            .map(|b| (0..4u8).flat_map(|r| [b * 4 + r, b * 4 + r]).collect())
            .collect();
        let mut s = BlockStream::new(schema(), Mem { blocks, reads: 0 }, 3, 1).unwrap();
        assert_eq!(s.len(), 40);
        let mut seen = Vec::new();
        for _ in 0..10 {
            let b = s.next_batch(4).unwrap();
            seen.extend(b.chunks(2).map(|r| r[0]));
        }
        seen.sort();
        assert_eq!(seen, (0..40).collect::<Vec<u8>>());
        // a window mixes records of different blocks in one batch
        let b = s.next_batch(6).unwrap();
        let distinct: std::collections::HashSet<u8> = b.chunks(2).map(|r| r[0] / 4).collect();
        assert!(distinct.len() > 1);
    }

    #[test]
    fn in_memory_reshuffles_each_epoch() {
        let records: Vec<u8> = (0..20u8).flat_map(|k| [k, k]).collect();
        let mut s = InMemory::new(schema(), records, 3).unwrap();
        let a = s.next_batch(20).unwrap();
        let b = s.next_batch(20).unwrap();
        assert_ne!(a, b);
        let mut x: Vec<u8> = a.chunks(2).map(|r| r[0]).collect();
        x.sort();
        assert_eq!(x, (0..20).collect::<Vec<u8>>());
        assert!(InMemory::new(schema(), vec![1, 2, 3], 0).is_err());
    }
}
