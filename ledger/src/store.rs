//! The RocksDB store behind a ledger.
//!
//! Column families (DESIGN §4): `records` (author‖seq → signed record),
//! `heads` (author → head), `payloads` (hash → bytes), `payload_index`
//! (round‖hash → length, for retention), `verdicts` (seq → own signed block),
//! `proofs` (author‖seq → equivocation proof) and `meta`.
//!
//! Every event is one `WriteBatch`, so a `kill -9` leaves either all of an
//! event or none of it. Appends re-check each chain link against the stored
//! head, so the store never holds a broken chain whatever its caller does.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, Direction, IteratorMode, Options, ReadOptions,
    WriteBatch, WriteOptions, DB,
};

use crate::chain::Head;
use crate::meta::FORMAT_VERSION;
use crate::ops::{check_append, check_payload, check_verdict, Batch, Op, Store};
use crate::verdict::VerdictHead;
use crate::wire::{decode_exact, encode};
use crate::{
    AuthorId, EquivocationProof, LedgerError, PayloadHash, Result, RunMeta, Seq, SignedRecord, SignedVerdictBlock,
    VerifiedRecord,
};

pub(crate) const CF_RECORDS: &str = "records";
pub(crate) const CF_HEADS: &str = "heads";
pub(crate) const CF_PAYLOADS: &str = "payloads";
const CF_PAYLOAD_INDEX: &str = "payload_index";
pub(crate) const CF_VERDICTS: &str = "verdicts";
pub(crate) const CF_PROOFS: &str = "proofs";
const CF_META: &str = "meta";
const ALL_CFS: [&str; 7] = [
    CF_RECORDS,
    CF_HEADS,
    CF_PAYLOADS,
    CF_PAYLOAD_INDEX,
    CF_VERDICTS,
    CF_PROOFS,
    CF_META,
];

const META_FORMAT: &[u8] = b"format";
const META_RUN: &[u8] = b"run";
const META_VERDICT_HEAD: &[u8] = b"verdict_head";
const META_JOIN_PREFIX: &[u8] = b"join/";

/// How long payloads are kept. Records, heads and verdicts are kept forever.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Retention {
    /// Keep payloads of the last this many rounds (None: all rounds).
    pub rounds: Option<u64>,
    /// Keep at most this many payload bytes, dropping the oldest rounds first.
    pub bytes: Option<u64>,
}

impl Retention {
    pub const KEEP_ALL: Retention = Retention {
        rounds: None,
        bytes: None,
    };
}

#[derive(Clone, Copy, Debug, Default)]
pub struct StoreOptions {
    /// fsync every write batch. Off, a `kill -9` still loses nothing that was
    /// written (the WAL is in the page cache); on, a power cut loses nothing.
    pub sync_writes: bool,
}

/// Mutable state shared by writers: cached heads, so that appends need no
/// read from disk to check their links.
struct WriterState {
    heads: HashMap<AuthorId, Head>,
    verdict_head: Option<VerdictHead>,
    records: u64,
}

/// A node's ledger: author chains, payloads, its own verdict chain and the
/// equivocation proofs it has seen, for one run.
pub struct Ledger {
    db: DB,
    path: PathBuf,
    meta: RunMeta,
    sync_writes: bool,
    read_only: bool,
    state: Mutex<WriterState>,
}

impl Drop for Ledger {
    fn drop(&mut self) {
        // Flush memtables on close, so that the next open (an audit, say)
        // reads SST files instead of replaying a large WAL into memory.
        if !self.read_only {
            for name in ALL_CFS {
                if let Ok(cf) = cf(&self.db, name) {
                    let _ = self.db.flush_cf(cf);
                }
            }
        }
    }
}

/// Read options for whole-column scans: no block-cache pollution (memory
/// stays flat however large the ledger), generous readahead.
fn scan_options() -> ReadOptions {
    let mut o = ReadOptions::default();
    o.fill_cache(false);
    o.set_readahead_size(2 << 20);
    o
}

fn seq_key(author: &AuthorId, seq: Seq) -> [u8; 40] {
    let mut key = [0u8; 40];
    key[..32].copy_from_slice(&author.0);
    key[32..].copy_from_slice(&seq.0.to_be_bytes());
    key
}

fn split_seq_key(column: &'static str, key: &[u8]) -> Result<(AuthorId, Seq)> {
    if key.len() != 40 {
        return Err(LedgerError::Corrupt {
            column,
            key: hex::encode(key),
            detail: format!("key of {} bytes, expected 40", key.len()),
        });
    }
    let author = AuthorId::from_slice(&key[..32])?;
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&key[32..]);
    Ok((author, Seq(u64::from_be_bytes(seq))))
}

fn corrupt(column: &'static str, key: &[u8], err: LedgerError) -> LedgerError {
    LedgerError::Corrupt {
        column,
        key: hex::encode(key),
        detail: err.to_string(),
    }
}

impl Ledger {
    /// Opens the ledger at `path` for `meta`'s run, creating it if absent.
    /// An existing ledger of another run or a newer format is refused.
    pub fn open_or_create(path: &Path, meta: &RunMeta, options: StoreOptions) -> Result<Self> {
        let exists = path.join("CURRENT").exists();
        let mut opts = Options::default();
        opts.create_if_missing(!exists);
        opts.create_missing_column_families(true);
        // A WAL file is deleted only once every column family with data in
        // it has flushed; the small ones (heads, the payload index) fill
        // their memtables slowly, so by default the WAL grew to 7 x 8 MiB x
        // 2 x 4 = 448 MiB before RocksDB forced them out, whatever payload
        // retention dropped. Past this much WAL, it flushes them.
        opts.set_max_total_wal_size(MAX_WAL_BYTES);
        let db = open_db(path, &opts, false)?;
        // A crash between RocksDB creating the store and the meta write
        // leaves a store without meta; with nothing in it, finish creating it.
        let half_created = exists && {
            let meta_cf = cf(&db, CF_META)?;
            let no_meta = db
                .get_cf(meta_cf, META_FORMAT)
                .map_err(|e| store_err(path, e))?
                .is_none();
            let no_records = db
                .iterator_cf(cf(&db, CF_RECORDS)?, IteratorMode::Start)
                .next()
                .is_none();
            no_meta && no_records
        };
        let ledger = if exists && !half_created {
            let ledger = Self::from_db(db, path, options, false)?;
            if ledger.meta.run_id != meta.run_id {
                return Err(LedgerError::OtherRun {
                    path: path.to_path_buf(),
                    expected: meta.run_id,
                    found: ledger.meta.run_id,
                });
            }
            if ledger.meta.owner != meta.owner {
                return Err(LedgerError::NotALedger {
                    path: path.to_path_buf(),
                    detail: format!("it is kept by {}, not by {}", ledger.meta.owner, meta.owner),
                });
            }
            ledger
        } else {
            meta.check()?;
            let mut batch = WriteBatch::default();
            let cf = cf(&db, CF_META)?;
            batch.put_cf(cf, META_FORMAT, FORMAT_VERSION.to_le_bytes());
            batch.put_cf(cf, META_RUN, meta.to_bytes());
            let mut wo = WriteOptions::default();
            wo.set_sync(true);
            db.write_opt(batch, &wo).map_err(|e| store_err(path, e))?;
            Self::from_db(db, path, options, false)?
        };
        Ok(ledger)
    }

    /// Reads every block of every table file of every column family and
    /// checks its checksum (RocksDB's `VerifyChecksum`): a byte flipped in a
    /// table no read touches (an index, a head nobody asked for) is found,
    /// and the error names the file it sits in.
    pub fn verify_checksums(&self) -> Result<()> {
        use rocksdb::AsRawPtr;
        let mut err: *mut std::ffi::c_char = std::ptr::null_mut();
        // SAFETY: the handle is `self.db`'s and outlives the call; on failure
        // RocksDB sets `err` to a string it allocated, which is copied and
        // freed with RocksDB's own `free` below.
        unsafe {
            librocksdb_sys::rocksdb_verify_checksum(self.db.as_raw_ptr(), &mut err);
        }
        if err.is_null() {
            return Ok(());
        }
        // SAFETY: non-null, NUL-terminated, allocated by RocksDB (above).
        let detail = unsafe {
            let text = std::ffi::CStr::from_ptr(err).to_string_lossy().into_owned();
            librocksdb_sys::rocksdb_free(err.cast());
            text
        };
        Err(LedgerError::Checksum {
            path: self.path.clone(),
            detail,
        })
    }

    /// Opens an existing ledger without writing to it (for audits).
    pub fn open_read_only(path: &Path) -> Result<Self> {
        if !path.join("CURRENT").exists() {
            return Err(LedgerError::NotALedger {
                path: path.to_path_buf(),
                detail: "no RocksDB CURRENT file".into(),
            });
        }
        let db = open_db(path, &Options::default(), true)?;
        Self::from_db(db, path, StoreOptions::default(), true)
    }

    fn from_db(db: DB, path: &Path, options: StoreOptions, read_only: bool) -> Result<Self> {
        let meta_cf = cf(&db, CF_META)?;
        let format = db
            .get_cf(meta_cf, META_FORMAT)
            .map_err(|e| store_err(path, e))?
            .ok_or_else(|| LedgerError::NotALedger {
                path: path.to_path_buf(),
                detail: "no format version in meta".into(),
            })?;
        let format: [u8; 4] = format.as_slice().try_into().map_err(|_| LedgerError::Corrupt {
            column: CF_META,
            key: "format".into(),
            detail: format!("{} bytes, expected 4", format.len()),
        })?;
        let format = u32::from_le_bytes(format);
        if format < FORMAT_VERSION {
            return Err(LedgerError::OlderFormat {
                path: path.to_path_buf(),
                found: format,
                supported: FORMAT_VERSION,
            });
        }
        if format > FORMAT_VERSION {
            return Err(LedgerError::NewerFormat {
                path: path.to_path_buf(),
                found: format,
                supported: FORMAT_VERSION,
            });
        }
        let meta_bytes = db
            .get_cf(meta_cf, META_RUN)
            .map_err(|e| store_err(path, e))?
            .ok_or_else(|| LedgerError::NotALedger {
                path: path.to_path_buf(),
                detail: "no run metadata".into(),
            })?;
        let meta = RunMeta::from_bytes(&meta_bytes).map_err(|e| corrupt(CF_META, META_RUN, e))?;
        let verdict_head = match db.get_cf(meta_cf, META_VERDICT_HEAD).map_err(|e| store_err(path, e))? {
            Some(bytes) => Some(
                decode_exact::<VerdictHead>(&bytes, "verdict head")
                    .map_err(|e| corrupt(CF_META, META_VERDICT_HEAD, e))?,
            ),
            None => None,
        };

        let mut heads = HashMap::new();
        let mut records = 0u64;
        for item in db.iterator_cf(cf(&db, CF_HEADS)?, IteratorMode::Start) {
            let (key, value) = item.map_err(|e| store_err(path, e))?;
            let author = AuthorId::from_slice(&key).map_err(|e| corrupt(CF_HEADS, &key, e))?;
            let head: Head = decode_exact(&value, "head").map_err(|e| corrupt(CF_HEADS, &key, e))?;
            records += head.seq.0 + 1;
            heads.insert(author, head);
        }
        Ok(Self {
            db,
            path: path.to_path_buf(),
            meta,
            sync_writes: options.sync_writes,
            read_only,
            state: Mutex::new(WriterState {
                heads,
                verdict_head,
                records,
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn meta(&self) -> &RunMeta {
        &self.meta
    }

    fn state(&self) -> MutexGuard<'_, WriterState> {
        // A panic elsewhere while holding the lock leaves the cache as it was
        // before the failed commit (commit updates it only after the write).
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn cf(&self, name: &'static str) -> Result<&ColumnFamily> {
        cf(&self.db, name)
    }

    fn err(&self, e: rocksdb::Error) -> LedgerError {
        store_err(&self.path, e)
    }

    pub fn head(&self, author: &AuthorId) -> Option<Head> {
        self.state().heads.get(author).copied()
    }

    pub fn heads(&self) -> Vec<(AuthorId, Head)> {
        let mut heads: Vec<_> = self.state().heads.iter().map(|(a, h)| (*a, *h)).collect();
        heads.sort_by_key(|(a, _)| *a);
        heads
    }

    /// Records held, over all authors.
    pub fn record_count(&self) -> u64 {
        self.state().records
    }

    pub fn verdict_head(&self) -> Option<VerdictHead> {
        self.state().verdict_head
    }

    pub fn record(&self, author: &AuthorId, seq: Seq) -> Result<Option<SignedRecord>> {
        let key = seq_key(author, seq);
        match self.db.get_cf(self.cf(CF_RECORDS)?, key).map_err(|e| self.err(e))? {
            Some(bytes) => Ok(Some(
                SignedRecord::from_bytes(&bytes).map_err(|e| corrupt(CF_RECORDS, &key, e))?,
            )),
            None => Ok(None),
        }
    }

    /// Up to `limit` consecutive records of `author` starting at `from`.
    pub fn records_from(&self, author: &AuthorId, from: Seq, limit: usize) -> Result<Vec<SignedRecord>> {
        let start = seq_key(author, from);
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_RECORDS)?, IteratorMode::From(&start, Direction::Forward))
        {
            if out.len() >= limit {
                break;
            }
            let (key, value) = item.map_err(|e| self.err(e))?;
            if key.len() != 40 || key[..32] != author.0 {
                break;
            }
            out.push(SignedRecord::from_bytes(&value).map_err(|e| corrupt(CF_RECORDS, &key, e))?);
        }
        Ok(out)
    }

    /// Streams every record in key order (by author, then seq), for audits.
    pub fn iter_records(&self) -> Result<impl Iterator<Item = Result<(AuthorId, Seq, Vec<u8>)>> + '_> {
        let it = self
            .db
            .iterator_cf_opt(self.cf(CF_RECORDS)?, scan_options(), IteratorMode::Start);
        Ok(it.map(move |item| {
            let (key, value) = item.map_err(|e| self.err(e))?;
            let (author, seq) = split_seq_key(CF_RECORDS, &key)?;
            Ok((author, seq, value.into_vec()))
        }))
    }

    pub fn has_payload(&self, hash: &PayloadHash) -> Result<bool> {
        Ok(self
            .db
            .get_pinned_cf(self.cf(CF_PAYLOADS)?, hash.0)
            .map_err(|e| self.err(e))?
            .is_some())
    }

    /// The length of a stored payload, without copying it out.
    pub fn payload_len(&self, hash: &PayloadHash) -> Result<Option<u64>> {
        Ok(self
            .db
            .get_pinned_cf(self.cf(CF_PAYLOADS)?, hash.0)
            .map_err(|e| self.err(e))?
            .map(|v| v.len() as u64))
    }

    /// A stored payload, checked against its hash on the way out so that a
    /// corrupted disk is never served to peers.
    pub fn payload(&self, hash: &PayloadHash) -> Result<Option<Vec<u8>>> {
        match self.db.get_cf(self.cf(CF_PAYLOADS)?, hash.0).map_err(|e| self.err(e))? {
            Some(bytes) => {
                let got = PayloadHash::of(&bytes);
                if got != *hash {
                    return Err(LedgerError::Corrupt {
                        column: CF_PAYLOADS,
                        key: hash.to_string(),
                        detail: format!("stored bytes hash to {got}"),
                    });
                }
                Ok(Some(bytes))
            }
            None => Ok(None),
        }
    }

    /// Streams every stored payload as (name, bytes), for audits.
    pub fn iter_payloads(&self) -> Result<impl Iterator<Item = Result<(PayloadHash, Vec<u8>)>> + '_> {
        let it = self
            .db
            .iterator_cf_opt(self.cf(CF_PAYLOADS)?, scan_options(), IteratorMode::Start);
        Ok(it.map(move |item| {
            let (key, value) = item.map_err(|e| self.err(e))?;
            let hash = PayloadHash::from_slice(&key).map_err(|e| corrupt(CF_PAYLOADS, &key, e))?;
            Ok((hash, value.into_vec()))
        }))
    }

    /// The own verdict chain, oldest first, as raw bytes with their seq.
    pub fn iter_verdicts(&self) -> Result<impl Iterator<Item = Result<(u64, Vec<u8>)>> + '_> {
        let it = self
            .db
            .iterator_cf_opt(self.cf(CF_VERDICTS)?, scan_options(), IteratorMode::Start);
        Ok(it.map(move |item| {
            let (key, value) = item.map_err(|e| self.err(e))?;
            let seq: [u8; 8] = key.as_ref().try_into().map_err(|_| LedgerError::Corrupt {
                column: CF_VERDICTS,
                key: hex::encode(&key),
                detail: "verdict key is not 8 bytes".into(),
            })?;
            Ok((u64::from_be_bytes(seq), value.into_vec()))
        }))
    }

    pub fn verdict(&self, seq: u64) -> Result<Option<SignedVerdictBlock>> {
        let key = seq.to_be_bytes();
        match self.db.get_cf(self.cf(CF_VERDICTS)?, key).map_err(|e| self.err(e))? {
            Some(bytes) => Ok(Some(
                SignedVerdictBlock::from_bytes(&bytes).map_err(|e| corrupt(CF_VERDICTS, &key, e))?,
            )),
            None => Ok(None),
        }
    }

    /// The node's joins, oldest first.
    pub fn joins(&self) -> Result<Vec<crate::JoinRecord>> {
        let cf = self.cf(CF_META)?;
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(cf, IteratorMode::From(META_JOIN_PREFIX, Direction::Forward))
        {
            let (key, value) = item.map_err(|e| self.err(e))?;
            if !key.starts_with(META_JOIN_PREFIX) {
                break;
            }
            out.push(crate::JoinRecord::from_bytes(&value).map_err(|e| corrupt(CF_META, &key, e))?);
        }
        Ok(out)
    }

    pub fn iter_proofs(&self) -> Result<impl Iterator<Item = Result<(Vec<u8>, Vec<u8>)>> + '_> {
        let it = self
            .db
            .iterator_cf_opt(self.cf(CF_PROOFS)?, scan_options(), IteratorMode::Start);
        Ok(it.map(move |item| {
            let (key, value) = item.map_err(|e| self.err(e))?;
            Ok((key.into_vec(), value.into_vec()))
        }))
    }

    pub fn proofs(&self) -> Result<Vec<EquivocationProof>> {
        let mut out = Vec::new();
        for item in self.iter_proofs()? {
            let (key, value) = item?;
            out.push(EquivocationProof::from_bytes(&value).map_err(|e| corrupt(CF_PROOFS, &key, e))?);
        }
        Ok(out)
    }

    pub fn has_proof_against(&self, author: &AuthorId) -> Result<bool> {
        let start = seq_key(author, Seq(0));
        let found = self
            .db
            .iterator_cf(self.cf(CF_PROOFS)?, IteratorMode::From(&start, Direction::Forward))
            .next()
            .transpose()
            .map_err(|e| self.err(e))?
            .is_some_and(|(key, _)| key.len() == 40 && key[..32] == author.0);
        Ok(found)
    }

    /// Total payload bytes held (sums the retention index).
    pub fn payload_bytes(&self) -> Result<u64> {
        let mut total = 0u64;
        for item in self.db.iterator_cf(self.cf(CF_PAYLOAD_INDEX)?, IteratorMode::Start) {
            let (_, value) = item.map_err(|e| self.err(e))?;
            total += index_len(&value);
        }
        Ok(total)
    }

    /// Starts an event. Writers are serialised: the returned batch holds the
    /// lock until it is committed or dropped.
    pub fn begin(&self) -> Event<'_> {
        Event {
            ledger: self,
            state: self.state(),
            batch: WriteBatch::default(),
            new_heads: HashMap::new(),
            new_records: 0,
            new_verdict_head: None,
            sync: self.sync_writes,
        }
    }

    /// Drops payloads outside `retention`, oldest rounds first, in one event.
    pub fn apply_retention(&self, retention: Retention, current_round: u64) -> Result<u64> {
        if retention == Retention::KEEP_ALL {
            return Ok(0);
        }
        let mut index = Vec::new();
        let mut total = 0u64;
        for item in self.db.iterator_cf(self.cf(CF_PAYLOAD_INDEX)?, IteratorMode::Start) {
            let (key, value) = item.map_err(|e| self.err(e))?;
            let len = index_len(&value);
            total += len;
            index.push((key, len));
        }
        let keep_from = retention
            .rounds
            .map(|r| current_round.saturating_sub(r.saturating_sub(1)))
            .unwrap_or(0);
        let mut event = self.begin();
        let mut dropped = 0u64;
        for (key, len) in index {
            if key.len() != 40 {
                continue;
            }
            let round = u64::from_be_bytes(key[..8].try_into().unwrap_or([0; 8]));
            let over_bytes = retention.bytes.is_some_and(|b| total > b);
            if round >= keep_from && !over_bytes {
                break;
            }
            event.batch.delete_cf(self.cf(CF_PAYLOADS)?, &key[8..]);
            event.batch.delete_cf(self.cf(CF_PAYLOAD_INDEX)?, &key);
            total = total.saturating_sub(len);
            dropped += 1;
        }
        event.commit()?;
        Ok(dropped)
    }
}

#[cfg(test)]
impl Ledger {
    /// Raw access for corruption tests.
    pub(crate) fn raw_get(&self, column: &'static str, key: &[u8]) -> Option<Vec<u8>> {
        self.db.get_cf(self.cf(column).ok()?, key).ok().flatten()
    }

    pub(crate) fn raw_put(&self, column: &'static str, key: &[u8], value: &[u8]) {
        let cf = self.cf(column).expect("column");
        self.db.put_cf(cf, key, value).expect("raw put");
    }

    /// Writes every column's memtable out to table files.
    pub(crate) fn flush_tables(&self) {
        for name in ALL_CFS {
            self.db.flush_cf(self.cf(name).expect("column")).expect("flush");
        }
    }

    pub(crate) fn raw_keys(&self, column: &'static str) -> Vec<Vec<u8>> {
        let cf = self.cf(column).expect("column");
        self.db
            .iterator_cf(cf, IteratorMode::Start)
            .map(|kv| kv.expect("iterate").0.into_vec())
            .collect()
    }
}

fn index_len(value: &[u8]) -> u64 {
    value.try_into().map(u64::from_le_bytes).unwrap_or(0)
}

/// One atomic ledger event: records, payloads, a verdict block, proofs.
/// Nothing is visible until [`Event::commit`]; dropping it writes nothing.
pub struct Event<'a> {
    ledger: &'a Ledger,
    state: MutexGuard<'a, WriterState>,
    batch: WriteBatch,
    new_heads: HashMap<AuthorId, Head>,
    new_records: u64,
    new_verdict_head: Option<VerdictHead>,
    sync: bool,
}

impl Event<'_> {
    fn current_head(&self, author: &AuthorId) -> Option<Head> {
        self.new_heads
            .get(author)
            .or_else(|| self.state.heads.get(author))
            .copied()
    }

    /// fsyncs this event even when sync writes are off (own records: a node
    /// must never lose a record it may already have published).
    pub fn sync(&mut self) -> &mut Self {
        self.sync = true;
        self
    }

    /// Appends a verified record. Its link is checked again against the head
    /// as of this event, records earlier in the same event included.
    pub fn append(&mut self, record: &VerifiedRecord) -> Result<&mut Self> {
        let rec = &record.signed().record;
        check_append(&self.ledger.meta, self.current_head(&rec.author), rec)?;
        let head = record.head();
        self.batch.put_cf(
            self.ledger.cf(CF_RECORDS)?,
            seq_key(&rec.author, rec.seq),
            record.signed().to_bytes(),
        );
        self.batch
            .put_cf(self.ledger.cf(CF_HEADS)?, rec.author.0, encode(&head));
        self.new_heads.insert(rec.author, head);
        self.new_records += 1;
        Ok(self)
    }

    /// Stores a payload under its hash, indexed by `round` for retention.
    pub fn payload(&mut self, hash: &PayloadHash, round: u64, bytes: &[u8]) -> Result<&mut Self> {
        check_payload(hash, bytes)?;
        self.batch.put_cf(self.ledger.cf(CF_PAYLOADS)?, hash.0, bytes);
        let mut key = [0u8; 40];
        key[..8].copy_from_slice(&round.to_be_bytes());
        key[8..].copy_from_slice(&hash.0);
        self.batch.put_cf(
            self.ledger.cf(CF_PAYLOAD_INDEX)?,
            key,
            (bytes.len() as u64).to_le_bytes(),
        );
        Ok(self)
    }

    /// Appends the owner's next verdict block. It must be signed by the owner
    /// and extend the verdict chain.
    pub fn verdict(&mut self, block: &SignedVerdictBlock) -> Result<&mut Self> {
        let new_head = check_verdict(
            &self.ledger.meta,
            self.new_verdict_head.or(self.state.verdict_head),
            block,
        )?;
        let b = &block.block;
        self.batch
            .put_cf(self.ledger.cf(CF_VERDICTS)?, b.seq.to_be_bytes(), block.to_bytes());
        self.batch
            .put_cf(self.ledger.cf(CF_META)?, META_VERDICT_HEAD, encode(&new_head));
        self.new_verdict_head = Some(new_head);
        Ok(self)
    }

    /// Records a join with the anchor and outer state it adopted (stored as
    /// payloads), after checking its votes.
    pub fn join(&mut self, join: &crate::JoinRecord, anchor: &[u8], outer: &[u8]) -> Result<&mut Self> {
        join.verify(&self.ledger.meta.run_id)?;
        self.payload(&join.anchor_payload, join.round, anchor)?;
        self.payload(&join.outer_payload, join.round, outer)?;
        // By round, then anchor: a node can take two anchors over in one
        // round (it went back, then took the round rebuilt), and replay
        // needs both (keyed by round alone, the second overwrote the first).
        let mut key = META_JOIN_PREFIX.to_vec();
        key.extend_from_slice(&join.round.to_be_bytes());
        key.extend_from_slice(&join.anchor.0);
        self.batch.put_cf(self.ledger.cf(CF_META)?, key, join.to_bytes());
        Ok(self)
    }

    /// Keeps an equivocation proof (after checking it).
    pub fn proof(&mut self, proof: &EquivocationProof) -> Result<&mut Self> {
        proof.verify()?;
        self.batch.put_cf(
            self.ledger.cf(CF_PROOFS)?,
            seq_key(&proof.author(), proof.seq()),
            proof.to_bytes(),
        );
        Ok(self)
    }

    /// Writes the event atomically, then updates the cached heads.
    pub fn commit(mut self) -> Result<()> {
        let mut wo = WriteOptions::default();
        wo.set_sync(self.sync);
        let batch = std::mem::take(&mut self.batch);
        self.ledger.db.write_opt(batch, &wo).map_err(|e| self.ledger.err(e))?;
        let new_heads = std::mem::take(&mut self.new_heads);
        self.state.heads.extend(new_heads);
        self.state.records += self.new_records;
        if let Some(h) = self.new_verdict_head {
            self.state.verdict_head = Some(h);
        }
        Ok(())
    }
}

impl Ledger {
    /// Applies a batch as one event.
    pub fn write(&self, batch: Batch) -> Result<()> {
        let mut event = self.begin();
        if batch.sync {
            event.sync();
        }
        for op in &batch.ops {
            match op {
                Op::Append(record) => event.append(record)?,
                Op::Payload { hash, round, bytes } => event.payload(hash, *round, bytes)?,
                Op::Verdict(block) => event.verdict(block)?,
                Op::Join { join, anchor, outer } => event.join(join, anchor, outer)?,
                Op::Proof(proof) => event.proof(proof)?,
            };
        }
        event.commit()
    }
}

impl Store for Ledger {
    fn meta(&self) -> &RunMeta {
        Ledger::meta(self)
    }
    fn head(&self, author: &AuthorId) -> Option<Head> {
        Ledger::head(self, author)
    }
    fn heads(&self) -> Vec<(AuthorId, Head)> {
        Ledger::heads(self)
    }
    fn record(&self, author: &AuthorId, seq: Seq) -> Result<Option<SignedRecord>> {
        Ledger::record(self, author, seq)
    }
    fn records_from(&self, author: &AuthorId, from: Seq, limit: usize) -> Result<Vec<SignedRecord>> {
        Ledger::records_from(self, author, from, limit)
    }
    fn has_payload(&self, hash: &PayloadHash) -> Result<bool> {
        Ledger::has_payload(self, hash)
    }
    fn payload(&self, hash: &PayloadHash) -> Result<Option<Vec<u8>>> {
        Ledger::payload(self, hash)
    }
    fn verdict_head(&self) -> Option<VerdictHead> {
        Ledger::verdict_head(self)
    }
    fn verdict(&self, seq: u64) -> Result<Option<SignedVerdictBlock>> {
        Ledger::verdict(self, seq)
    }
    fn joins(&self) -> Result<Vec<crate::JoinRecord>> {
        Ledger::joins(self)
    }
    fn has_proof_against(&self, author: &AuthorId) -> Result<bool> {
        Ledger::has_proof_against(self, author)
    }
    fn write(&self, batch: Batch) -> Result<()> {
        Ledger::write(self, batch)
    }
    fn apply_retention(&self, retention: Retention, current_round: u64) -> Result<u64> {
        Ledger::apply_retention(self, retention, current_round)
    }
}

/// Block cache shared by all column families of one ledger. Index and filter
/// blocks live in it too, so memory stays bounded however large the ledger.
const BLOCK_CACHE_BYTES: usize = 32 << 20;

fn cf_options(cache: &Cache) -> Options {
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(cache);
    table.set_cache_index_and_filter_blocks(true);
    table.set_pin_l0_filter_and_index_blocks_in_cache(true);
    // Point lookups of payloads that were never stored are common (audits).
    table.set_bloom_filter(10.0, false);
    let mut o = Options::default();
    o.set_block_based_table_factory(&table);
    // Memtables of 8 MiB, not RocksDB's 64: a node holds at most a few
    // payloads per column family in memory, and a write that needs disk
    // space meets a full disk within a few rounds, not after 64 MiB of
    // payloads went into a WAL file allocated before the disk filled.
    o.set_write_buffer_size(MEMTABLE_BYTES);
    o
}

const MEMTABLE_BYTES: usize = 8 << 20;

const MAX_WAL_BYTES: u64 = 4 * MEMTABLE_BYTES as u64;

/// Payloads (hundreds of KB each, written once, read by audits, deleted by
/// retention) go to blob files, and only their small references through
/// the LSM tree: with them in SST files a small ledger was rewritten (and
/// LZ4-compressed again) whole at each compaction (a 4-node testnet's node
/// wrote 290 MB of compaction output for a 110 MB ledger; with the
/// software CRC, RocksDB's threads had a fifth of the mesh's CPU). Blobs
/// are compressed once, when written: LZ4 takes a fifth off
/// half-precision deltas.
fn payload_options(base: &Options) -> Options {
    let mut o = base.clone();
    o.set_enable_blob_files(true);
    o.set_min_blob_size(1024);
    o.set_blob_file_size(64 << 20);
    o.set_blob_compression_type(rocksdb::DBCompressionType::Lz4);
    o.set_enable_blob_gc(true);
    o
}

fn open_db(path: &Path, opts: &Options, read_only: bool) -> Result<DB> {
    let cache = Cache::new_lru_cache(BLOCK_CACHE_BYTES);
    let base = cf_options(&cache);
    let descriptors: Vec<ColumnFamilyDescriptor> = ALL_CFS
        .iter()
        .map(|name| {
            let opts = if *name == CF_PAYLOADS {
                payload_options(&base)
            } else {
                base.clone()
            };
            ColumnFamilyDescriptor::new(*name, opts)
        })
        .collect();
    let result = if read_only {
        DB::open_cf_descriptors_read_only(opts, path, descriptors, false)
    } else {
        DB::open_cf_descriptors(opts, path, descriptors)
    };
    result.map_err(|e| {
        let msg = e.to_string();
        if msg.contains("does not exist")
            || msg.contains("Column families not opened")
            || msg.contains("Column family not found")
            || msg.contains("Invalid column family")
        {
            LedgerError::NotALedger {
                path: path.to_path_buf(),
                detail: msg,
            }
        } else {
            store_err(path, e)
        }
    })
}

fn cf<'a>(db: &'a DB, name: &'static str) -> Result<&'a ColumnFamily> {
    db.cf_handle(name).ok_or_else(|| LedgerError::Corrupt {
        column: name,
        key: String::new(),
        detail: "column family missing".into(),
    })
}

fn store_err(path: &Path, source: rocksdb::Error) -> LedgerError {
    LedgerError::Store {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::record::tests::key;
    use crate::record::RECORD_VERSION;
    use crate::{RecordHash, RunId, UpdateRecord, WeightsHash};

    pub(crate) fn meta_for(owner: &crate::AuthorKey) -> RunMeta {
        // (shared with the audit tests)
        let spec = b"spec".to_vec();
        RunMeta {
            run_id: RunId::of_spec(&spec),
            owner: owner.author(),
            genesis_weights: WeightsHash([5; 32]),
            run_spec: spec,
        }
    }

    pub(crate) fn split(key: &[u8]) -> (AuthorId, Seq) {
        split_seq_key(CF_RECORDS, key).unwrap()
    }

    /// A new ledger in a temp dir, owned by key 1.
    fn fresh() -> (tempfile::TempDir, RunMeta, Ledger) {
        let dir = tempfile::tempdir().unwrap();
        let meta = meta_for(&key(1));
        let ledger = Ledger::open_or_create(dir.path(), &meta, StoreOptions::default()).unwrap();
        (dir, meta, ledger)
    }

    pub(crate) fn rec(
        meta: &RunMeta,
        k: &crate::AuthorKey,
        seq: u64,
        prev: RecordHash,
        payload: &[u8],
    ) -> SignedRecord {
        UpdateRecord {
            version: RECORD_VERSION,
            run_id: meta.run_id,
            author: k.author(),
            seq: Seq(seq),
            prev,
            round: seq,
            base_hash: WeightsHash([0; 32]),
            base_outer: WeightsHash([0; 32]),
            made_from: WeightsHash([0; 32]),
            made_outer: WeightsHash([0; 32]),
            merged: Vec::new(),
            waited: Vec::new(),
            payload_hash: PayloadHash::of(payload),
            payload_len: payload.len() as u64,
            n_samples: 10,
            train_loss: 1.0,
        }
        .sign(k)
    }

    #[test]
    fn append_reopen_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let owner = key(1);
        let meta = meta_for(&owner);
        let author = key(2);
        {
            let ledger = Ledger::open_or_create(dir.path(), &meta, StoreOptions::default()).unwrap();
            let mut prev = meta.genesis_link();
            for seq in 0..5u64 {
                let payload = seq.to_le_bytes();
                let r = rec(&meta, &author, seq, prev, &payload);
                let v = VerifiedRecord::extend(
                    r.clone(),
                    &meta.run_id,
                    ledger.head(&author.author()),
                    meta.genesis_link(),
                )
                .unwrap();
                prev = v.hash();
                let mut ev = ledger.begin();
                ev.append(&v)
                    .unwrap()
                    .payload(&r.record.payload_hash, seq, &payload)
                    .unwrap();
                ev.commit().unwrap();
            }
        }
        let ledger = Ledger::open_read_only(dir.path()).unwrap();
        assert_eq!(ledger.record_count(), 5);
        assert_eq!(ledger.head(&author.author()).unwrap().seq, Seq(4));
        let got = ledger.records_from(&author.author(), Seq(2), 10).unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(got[0].record.seq, Seq(2));
        assert_eq!(ledger.payload_bytes().unwrap(), 40);
    }

    #[test]
    fn append_refuses_broken_links_and_drops_whole_event() {
        let (_dir, meta, ledger) = fresh();
        let a = key(2);
        let r0 = rec(&meta, &a, 0, meta.genesis_link(), b"p");
        let v0 = VerifiedRecord::extend(r0, &meta.run_id, None, meta.genesis_link()).unwrap();
        let mut ev = ledger.begin();
        ev.append(&v0).unwrap();
        // The same record twice in one event does not extend the chain.
        assert!(matches!(ev.append(&v0), Err(LedgerError::ChainGap { .. })));
        drop(ev);
        assert_eq!(ledger.record_count(), 0);
        assert!(ledger.head(&a.author()).is_none());
    }

    #[test]
    fn other_run_and_newer_format_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let owner = key(1);
        let meta = meta_for(&owner);
        drop(Ledger::open_or_create(dir.path(), &meta, StoreOptions::default()).unwrap());
        let mut other = meta.clone();
        other.run_spec = b"other".to_vec();
        other.run_id = RunId::of_spec(&other.run_spec);
        let err = Ledger::open_or_create(dir.path(), &other, StoreOptions::default())
            .err()
            .unwrap();
        assert!(matches!(err, LedgerError::OtherRun { .. }), "{err}");

        {
            let db = open_db(dir.path(), &Options::default(), false).unwrap();
            db.put_cf(cf(&db, CF_META).unwrap(), META_FORMAT, 99u32.to_le_bytes())
                .unwrap();
        }
        let err = Ledger::open_read_only(dir.path()).err().unwrap();
        assert!(matches!(err, LedgerError::NewerFormat { found: 99, .. }), "{err}");
    }

    #[test]
    fn missing_and_garbage_dirs_get_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = Ledger::open_read_only(&dir.path().join("nope")).err().unwrap();
        assert!(matches!(err, LedgerError::NotALedger { .. }), "{err}");

        std::fs::write(dir.path().join("CURRENT"), b"garbage\n").unwrap();
        let err = Ledger::open_read_only(dir.path()).err().unwrap();
        assert!(err.to_string().contains(&dir.path().display().to_string()), "{err}");
    }

    /// Space of dropped payloads must come back (the WAL is capped, and
    /// blob garbage collection rides on compactions), or a node keeping a
    /// few rounds of payloads would still fill its disk.
    #[test]
    fn retention_keeps_the_disk_bounded() {
        let (dir, _meta, ledger) = fresh();
        let retention = Retention {
            rounds: Some(10),
            bytes: None,
        };
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let rounds = 1500u64;
        let size = 128 << 10;
        for round in 0..rounds {
            // Incompressible, like weight deltas are to LZ4 in the worst case.
            let bytes: Vec<u8> = (0..size / 8)
                .flat_map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state.to_le_bytes()
                })
                .collect();
            let mut ev = ledger.begin();
            ev.payload(&PayloadHash::of(&bytes), round, &bytes).unwrap();
            ev.commit().unwrap();
            ledger.apply_retention(retention, round).unwrap();
        }
        let on_disk: u64 = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        let written = rounds * size as u64;
        eprintln!("{written} payload bytes written, {on_disk} on disk");
        assert!(on_disk < written / 3, "{on_disk} bytes on disk of {written} written");
    }

    #[test]
    fn retention_drops_oldest_rounds() {
        let (_dir, _meta, ledger) = fresh();
        for round in 0..10u64 {
            let bytes = vec![round as u8; 100];
            let mut ev = ledger.begin();
            ev.payload(&PayloadHash::of(&bytes), round, &bytes).unwrap();
            ev.commit().unwrap();
        }
        let dropped = ledger
            .apply_retention(
                Retention {
                    rounds: Some(3),
                    bytes: None,
                },
                9,
            )
            .unwrap();
        assert_eq!(dropped, 7);
        assert!(ledger.payload(&PayloadHash::of(&[9u8; 100])).unwrap().is_some());
        assert!(ledger.payload(&PayloadHash::of(&[6u8; 100])).unwrap().is_none());
        let dropped = ledger
            .apply_retention(
                Retention {
                    rounds: None,
                    bytes: Some(150),
                },
                9,
            )
            .unwrap();
        assert_eq!(dropped, 2);
        assert_eq!(ledger.payload_bytes().unwrap(), 100);
    }
}
