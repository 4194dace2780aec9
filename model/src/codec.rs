//! The delta codec: what goes on the wire in place of a dense weight delta.
//!
//! `encode(Δ + e)` compresses, and the residual `e = (Δ + e) − decode(c)` is
//! kept for the next round (error feedback), so nothing the codec drops is
//! lost for good.
//!
//! Wire format, version 2 (all integers little-endian):
//!
//! ```text
//! "MTD" 0x02 | mode u8 | n u32 (parameter count) | body | exact
//!   dense: n × f32            fp16 / bf16: n × u16
//!   top-k: k u32 | chunk u32 | index-mode u8 (0 varint gaps, 1 bitmap)
//!          | index-bytes u32 | indices | ceil(k/chunk) × f32 scales
//!          | int8: k × i8   sign: ceil(k/8) bytes, bit set = negative
//!   exact: ranges u32 | ranges × (start u32 | len u32 | len × f32)
//! ```
//!
//! The exact ranges carry values that must not be approximated, whatever
//! the mode: batch-norm running statistics, which a sign or int8 code
//! would turn into nonsense (the model then evaluates at chance).
//!
//! Decoding checks every length against the bytes actually present before it
//! allocates, so hostile input costs at most what it weighs.

use std::fmt;
use std::str::FromStr;

use half::{bf16, f16};
use serde::{Deserialize, Serialize};

use crate::ModelError;

const MAGIC: [u8; 4] = *b"MTD\x02";
const HEADER: usize = 9;
/// Values that share one scale in the top-k modes.
pub const SCALE_CHUNK: usize = 256;

/// Why a payload does not decode. The node turns each into a reject reason.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CodecError {
    #[error("malformed payload: {0}")]
    Malformed(String),
    #[error("payload carries {got} parameters, the model has {expected}")]
    WrongShape { expected: usize, got: usize },
    #[error("non-finite value at position {0}")]
    NonFinite(usize),
}

impl From<CodecError> for ModelError {
    fn from(e: CodecError) -> Self {
        ModelError::Codec(e.to_string())
    }
}

fn malformed(detail: impl Into<String>) -> CodecError {
    CodecError::Malformed(detail.into())
}

/// A compression mode, as named on the command line.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CodecSpec {
    /// fp32, bit-exact (the baseline).
    Dense,
    Fp16,
    Bf16,
    /// The fraction `rho` of largest-magnitude values, int8 with a scale per chunk.
    TopKInt8 {
        rho: f32,
    },
    /// The fraction `rho` of largest-magnitude values, as signs with a mean-magnitude scale per chunk.
    TopKSign {
        rho: f32,
    },
}

impl CodecSpec {
    /// What a new run uses unless told otherwise: the top tenth of each
    /// delta in int8, 20x smaller than dense and 10x smaller than half
    /// precision, the rest carried to the next round (error feedback). Safe
    /// behind CenteredClip since its leave-one-out test; as accurate as half
    /// precision on short runs (3 nodes, 8 rounds of 20 steps: 78.6 %
    /// against 79.3 %) and long ones, and faster (docs/figures.md, issue
    /// 18). The top 1 % (`topk-int8:0.01`, 90x smaller again) learns less
    /// per round at first (66 % there) and suits long runs on slow links;
    /// `--codec fp16` or `dense` choose the others.
    pub const DEFAULT: CodecSpec = CodecSpec::TopKInt8 { rho: 0.1 };
    /// The same, as the command line spells it.
    pub const DEFAULT_NAME: &'static str = "topk-int8:0.1";

    fn mode(&self) -> u8 {
        match self {
            CodecSpec::Dense => 0,
            CodecSpec::Fp16 => 1,
            CodecSpec::Bf16 => 2,
            CodecSpec::TopKInt8 { .. } => 3,
            CodecSpec::TopKSign { .. } => 4,
        }
    }

    /// How many values top-k keeps out of `n` (at least one).
    pub fn kept(&self, n: usize) -> usize {
        match self {
            CodecSpec::TopKInt8 { rho } | CodecSpec::TopKSign { rho } => {
                ((n as f64 * *rho as f64).ceil() as usize).clamp(1.min(n), n)
            }
            _ => n,
        }
    }
}

impl FromStr for CodecSpec {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, ModelError> {
        let bad = |detail: &str| ModelError::CodecSpec {
            spec: s.to_string(),
            detail: detail.to_string(),
        };
        let (name, arg) = match s.split_once(':') {
            Some((n, a)) => (n, Some(a)),
            None => (s, None),
        };
        let rho = || -> Result<f32, ModelError> {
            let a = arg.ok_or_else(|| bad("needs a fraction, e.g. topk-int8:0.01"))?;
            let rho: f32 = a.parse().map_err(|_| bad("the fraction is not a number"))?;
            if !(rho > 0.0 && rho <= 1.0) {
                return Err(bad("the fraction must be in (0, 1]"));
            }
            Ok(rho)
        };
        let no_arg = |spec: CodecSpec| match arg {
            None => Ok(spec),
            Some(_) => Err(bad("takes no argument")),
        };
        match name {
            "dense" => no_arg(CodecSpec::Dense),
            "fp16" => no_arg(CodecSpec::Fp16),
            "bf16" => no_arg(CodecSpec::Bf16),
            "topk-int8" => Ok(CodecSpec::TopKInt8 { rho: rho()? }),
            "topk-sign" => Ok(CodecSpec::TopKSign { rho: rho()? }),
            _ => Err(bad("known codecs: dense, fp16, bf16, topk-int8:RHO, topk-sign:RHO")),
        }
    }
}

impl fmt::Display for CodecSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CodecSpec::Dense => f.write_str("dense"),
            CodecSpec::Fp16 => f.write_str("fp16"),
            CodecSpec::Bf16 => f.write_str("bf16"),
            CodecSpec::TopKInt8 { rho } => write!(f, "topk-int8:{rho}"),
            CodecSpec::TopKSign { rho } => write!(f, "topk-sign:{rho}"),
        }
    }
}

impl Serialize for CodecSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for CodecSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// One encoded delta, with what the receivers will decode from it.
pub struct Encoded {
    pub bytes: Vec<u8>,
    pub decoded: Vec<f32>,
}

/// Encodes deltas with error feedback; the residual is per node and must be
/// checkpointed with it.
#[derive(Clone, Debug)]
pub struct DeltaEncoder {
    spec: CodecSpec,
    residual: Vec<f32>,
    /// Index ranges always sent exactly (batch-norm buffers).
    exact: Vec<std::ops::Range<usize>>,
}

impl DeltaEncoder {
    pub fn new(spec: CodecSpec, params: usize) -> Self {
        Self {
            spec,
            residual: vec![0.0; params],
            exact: Vec::new(),
        }
    }

    /// Sends these index ranges exactly, outside the lossy code (ranges
    /// beyond the parameter count are clipped to it).
    pub fn with_exact_ranges(mut self, ranges: Vec<std::ops::Range<usize>>) -> Self {
        let n = self.residual.len();
        self.exact = ranges
            .into_iter()
            .map(|r| r.start.min(n)..r.end.min(n))
            .filter(|r| !r.is_empty())
            .collect();
        self
    }

    pub fn spec(&self) -> CodecSpec {
        self.spec
    }

    pub fn residual(&self) -> &[f32] {
        &self.residual
    }

    /// Restores a checkpointed residual.
    pub fn set_residual(&mut self, residual: Vec<f32>) -> Result<(), ModelError> {
        if residual.len() != self.residual.len() {
            return Err(ModelError::ParamCount {
                expected: self.residual.len(),
                got: residual.len(),
            });
        }
        self.residual = residual;
        Ok(())
    }

    /// Encodes `delta + residual` and keeps what the encoding lost.
    pub fn encode(&mut self, delta: &[f32]) -> Result<Encoded, ModelError> {
        if delta.len() != self.residual.len() {
            return Err(ModelError::ParamCount {
                expected: self.residual.len(),
                got: delta.len(),
            });
        }
        let mut x = std::mem::take(&mut self.residual);
        for (r, d) in x.iter_mut().zip(delta) {
            *r += *d;
        }
        let bytes = encode_with_exact(self.spec, &x, &self.exact);
        let decoded = decode(&bytes, x.len())?;
        for (r, d) in x.iter_mut().zip(&decoded) {
            *r -= *d;
        }
        self.residual = x;
        Ok(Encoded { bytes, decoded })
    }
}

fn header(mode: u8, n: usize, body: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + body);
    out.extend_from_slice(&MAGIC);
    out.push(mode);
    out.extend_from_slice(&(n as u32).to_le_bytes());
    out
}

/// Encodes `x` in one shot (no error feedback).
pub fn encode(spec: CodecSpec, x: &[f32]) -> Vec<u8> {
    encode_with_exact(spec, x, &[])
}

/// Encodes `x`, with the values in `exact` (in-range, non-overlapping
/// ranges) sent as they are and left out of the lossy code.
pub fn encode_with_exact(spec: CodecSpec, x: &[f32], exact: &[std::ops::Range<usize>]) -> Vec<u8> {
    let mut lossy;
    let body_input = if exact.is_empty() {
        x
    } else {
        lossy = x.to_vec();
        for r in exact {
            lossy[r.clone()].iter_mut().for_each(|v| *v = 0.0);
        }
        &lossy[..]
    };
    let mut out = encode_body(spec, body_input);
    out.extend_from_slice(&(exact.len() as u32).to_le_bytes());
    for r in exact {
        out.extend_from_slice(&(r.start as u32).to_le_bytes());
        out.extend_from_slice(&(r.len() as u32).to_le_bytes());
        for v in &x[r.clone()] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    out
}

fn encode_body(spec: CodecSpec, x: &[f32]) -> Vec<u8> {
    let n = x.len();
    match spec {
        CodecSpec::Dense => {
            let mut out = header(spec.mode(), n, 4 * n);
            for v in x {
                out.extend_from_slice(&v.to_le_bytes());
            }
            out
        }
        CodecSpec::Fp16 => {
            let mut out = header(spec.mode(), n, 2 * n);
            for v in x {
                let clamped = v.clamp(-f16::MAX.to_f32(), f16::MAX.to_f32());
                out.extend_from_slice(&f16::from_f32(clamped).to_bits().to_le_bytes());
            }
            out
        }
        CodecSpec::Bf16 => {
            let mut out = header(spec.mode(), n, 2 * n);
            for v in x {
                out.extend_from_slice(&bf16::from_f32(*v).to_bits().to_le_bytes());
            }
            out
        }
        CodecSpec::TopKInt8 { .. } | CodecSpec::TopKSign { .. } => encode_topk(spec, x),
    }
}

/// Indices of the `k` largest |x|, ascending.
pub fn top_k_indices(x: &[f32], k: usize) -> Vec<u32> {
    let n = x.len();
    if k >= n {
        return (0..n as u32).collect();
    }
    if k == 0 {
        return Vec::new();
    }
    let mut mags: Vec<f32> = x.iter().map(|v| v.abs()).collect();
    let (_, kth, _) = mags.select_nth_unstable_by(n - k, |a, b| a.total_cmp(b));
    let threshold = *kth;
    let above = x.iter().filter(|v| v.abs() > threshold).count();
    let mut ties_left = k - above;
    let mut out = Vec::with_capacity(k);
    for (i, v) in x.iter().enumerate() {
        let m = v.abs();
        if m > threshold || (m == threshold && ties_left > 0) {
            if m == threshold {
                ties_left -= 1;
            }
            out.push(i as u32);
        }
    }
    out
}

fn put_varint(out: &mut Vec<u8>, mut v: u32) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Varint gaps or a bitmap, whichever is smaller.
fn encode_indices(indices: &[u32], n: usize) -> (u8, Vec<u8>) {
    let mut gaps = Vec::with_capacity(indices.len() * 2);
    let mut next = 0u32;
    for &i in indices {
        put_varint(&mut gaps, i - next);
        next = i + 1;
    }
    let bitmap_len = n.div_ceil(8);
    if gaps.len() <= bitmap_len {
        return (0, gaps);
    }
    let mut bitmap = vec![0u8; bitmap_len];
    for &i in indices {
        bitmap[i as usize / 8] |= 1 << (i % 8);
    }
    (1, bitmap)
}

fn encode_topk(spec: CodecSpec, x: &[f32]) -> Vec<u8> {
    let n = x.len();
    let k = spec.kept(n);
    let indices = top_k_indices(x, k);
    let values: Vec<f32> = indices.iter().map(|&i| x[i as usize]).collect();
    let (index_mode, index_bytes) = encode_indices(&indices, n);
    let chunks = k.div_ceil(SCALE_CHUNK);
    let mut out = header(spec.mode(), n, 13 + index_bytes.len() + 4 * chunks + k);
    out.extend_from_slice(&(k as u32).to_le_bytes());
    out.extend_from_slice(&(SCALE_CHUNK as u32).to_le_bytes());
    out.push(index_mode);
    out.extend_from_slice(&(index_bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(&index_bytes);
    let sign = matches!(spec, CodecSpec::TopKSign { .. });
    let scales: Vec<f32> = values
        .chunks(SCALE_CHUNK)
        .map(|c| {
            let s = if sign {
                c.iter().map(|v| v.abs()).sum::<f32>() / c.len() as f32
            } else {
                c.iter().fold(0f32, |m, v| m.max(v.abs()))
            };
            if s.is_finite() {
                s
            } else {
                0.0
            }
        })
        .collect();
    for s in &scales {
        out.extend_from_slice(&s.to_le_bytes());
    }
    if sign {
        let mut bits = vec![0u8; k.div_ceil(8)];
        for (j, v) in values.iter().enumerate() {
            if *v < 0.0 {
                bits[j / 8] |= 1 << (j % 8);
            }
        }
        out.extend_from_slice(&bits);
    } else {
        for (c, chunk) in values.chunks(SCALE_CHUNK).enumerate() {
            let s = scales[c];
            for v in chunk {
                let q = if s > 0.0 {
                    (v / s * 127.0).round().clamp(-127.0, 127.0)
                } else {
                    0.0
                };
                out.push(q as i8 as u8);
            }
        }
    }
    out
}

/// A cursor over untrusted bytes that refuses to read past the end.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize, what: &str) -> Result<&'a [u8], CodecError> {
        let end = self
            .pos
            .checked_add(len)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| {
                malformed(format!(
                    "{what} needs {len} bytes at offset {}, only {} left",
                    self.pos,
                    self.bytes.len() - self.pos
                ))
            })?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32, CodecError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u8(&mut self, what: &str) -> Result<u8, CodecError> {
        Ok(self.take(1, what)?[0])
    }
}

/// The parameter count a payload claims, read from its header only.
pub fn peek_len(bytes: &[u8]) -> Result<usize, CodecError> {
    if bytes.len() < HEADER || bytes[..4] != MAGIC {
        return Err(malformed("no MTD v2 header"));
    }
    Ok(u32::from_le_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]) as usize)
}

/// Decodes a payload for a model of `expected` parameters. Fails on any
/// inconsistency, an index out of range, or a non-finite value.
pub fn decode(bytes: &[u8], expected: usize) -> Result<Vec<f32>, CodecError> {
    let mut r = Reader { bytes, pos: 0 };
    let magic = r.take(4, "magic")?;
    if magic[..3] != MAGIC[..3] {
        return Err(malformed(format!("bad magic {magic:02x?}")));
    }
    if magic[3] != MAGIC[3] {
        return Err(malformed(format!(
            "format version {} (this build reads {})",
            magic[3], MAGIC[3]
        )));
    }
    let mode = r.u8("mode")?;
    let n = r.u32("parameter count")? as usize;
    if n != expected {
        return Err(CodecError::WrongShape { expected, got: n });
    }
    let mut out = match mode {
        0 => {
            let body = r.take(4 * n, "dense values")?;
            body.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect::<Vec<_>>()
        }
        1 | 2 => {
            let body = r.take(2 * n, "half values")?;
            body.chunks_exact(2)
                .map(|b| {
                    let bits = u16::from_le_bytes([b[0], b[1]]);
                    if mode == 1 {
                        f16::from_bits(bits).to_f32()
                    } else {
                        bf16::from_bits(bits).to_f32()
                    }
                })
                .collect()
        }
        3 | 4 => decode_topk(&mut r, n, mode == 4)?,
        other => return Err(malformed(format!("unknown mode {other}"))),
    };
    let ranges = r.u32("exact range count")? as usize;
    for i in 0..ranges {
        let start = r.u32("exact range start")? as usize;
        let len = r.u32("exact range length")? as usize;
        if start.checked_add(len).is_none_or(|end| end > n) {
            return Err(malformed(format!(
                "exact range {i} ({start}+{len}) exceeds the {n} parameters"
            )));
        }
        let values = r.take(4 * len, "exact values")?;
        for (slot, b) in out[start..start + len].iter_mut().zip(values.chunks_exact(4)) {
            *slot = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
    }
    if r.pos != bytes.len() {
        return Err(malformed(format!("{} trailing bytes", bytes.len() - r.pos)));
    }
    if let Some(i) = out.iter().position(|v| !v.is_finite()) {
        return Err(CodecError::NonFinite(i));
    }
    Ok(out)
}

fn decode_topk(r: &mut Reader<'_>, n: usize, sign: bool) -> Result<Vec<f32>, CodecError> {
    let k = r.u32("k")? as usize;
    if k > n {
        return Err(malformed(format!("k = {k} exceeds the {n} parameters")));
    }
    let chunk = r.u32("chunk")? as usize;
    if chunk == 0 {
        return Err(malformed("scale chunk of 0 values"));
    }
    let index_mode = r.u8("index mode")?;
    let index_len = r.u32("index length")? as usize;
    let index_bytes = r.take(index_len, "indices")?;
    let indices = match index_mode {
        0 => {
            let mut out = Vec::with_capacity(k.min(index_len));
            let mut next = 0u64;
            let mut pos = 0;
            while pos < index_bytes.len() {
                let mut v = 0u64;
                let mut shift = 0;
                loop {
                    let b = *index_bytes
                        .get(pos)
                        .ok_or_else(|| malformed("index varint runs off the end"))?;
                    pos += 1;
                    v |= ((b & 0x7f) as u64) << shift;
                    if b & 0x80 == 0 {
                        break;
                    }
                    shift += 7;
                    if shift > 28 {
                        return Err(malformed("index varint longer than 5 bytes"));
                    }
                }
                let idx = next + v;
                if idx >= n as u64 {
                    return Err(malformed(format!("index {idx} out of range (n = {n})")));
                }
                out.push(idx as usize);
                next = idx + 1;
            }
            out
        }
        1 => {
            if index_len != n.div_ceil(8) {
                return Err(malformed(format!("bitmap of {index_len} bytes for {n} parameters")));
            }
            let mut out = Vec::with_capacity(k);
            for (byte_i, &b) in index_bytes.iter().enumerate() {
                for bit in 0..8 {
                    if b & (1 << bit) != 0 {
                        let idx = byte_i * 8 + bit;
                        if idx >= n {
                            return Err(malformed(format!("bitmap sets index {idx} beyond n = {n}")));
                        }
                        out.push(idx);
                    }
                }
            }
            out
        }
        other => return Err(malformed(format!("unknown index mode {other}"))),
    };
    if indices.len() != k {
        return Err(malformed(format!("{} indices for k = {k}", indices.len())));
    }
    let chunks = k.div_ceil(chunk);
    let scale_bytes = r.take(4 * chunks, "scales")?;
    let scales: Vec<f32> = scale_bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    if let Some(c) = scales.iter().position(|s| !s.is_finite() || *s < 0.0) {
        return Err(malformed(format!(
            "scale {c} is {} (must be finite and >= 0)",
            scales[c]
        )));
    }
    let mut out = vec![0f32; n];
    if sign {
        let bits = r.take(k.div_ceil(8), "signs")?;
        for (j, &idx) in indices.iter().enumerate() {
            let neg = bits[j / 8] & (1 << (j % 8)) != 0;
            let s = scales[j / chunk];
            out[idx] = if neg { -s } else { s };
        }
    } else {
        let q = r.take(k, "int8 values")?;
        for (j, &idx) in indices.iter().enumerate() {
            let v = q[j] as i8;
            if v == i8::MIN {
                return Err(malformed(format!("int8 value -128 at position {j} (range is ±127)")));
            }
            out[idx] = v as f32 / 127.0 * scales[j / chunk];
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_default_codec_is_spelled_as_it_parses() {
        assert_eq!(
            CodecSpec::DEFAULT_NAME.parse::<CodecSpec>().unwrap(),
            CodecSpec::DEFAULT
        );
        assert_eq!(CodecSpec::DEFAULT.to_string(), CodecSpec::DEFAULT_NAME);
    }

    fn vec_strategy() -> impl Strategy<Value = Vec<f32>> {
        prop::collection::vec(-10.0f32..10.0, 1..3000)
    }

    #[test]
    fn exact_ranges_survive_lossy_modes_and_are_checked() {
        let x: Vec<f32> = (0..1000).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
        let exact = vec![10..20, 500..503];
        for spec in ["dense", "fp16", "topk-int8:0.01", "topk-sign:0.01"] {
            let spec: CodecSpec = spec.parse().unwrap();
            let bytes = encode_with_exact(spec, &x, &exact);
            let out = decode(&bytes, x.len()).unwrap();
            for r in &exact {
                assert_eq!(&out[r.clone()], &x[r.clone()], "{spec}");
            }
            // With error feedback, nothing of an exact range is left over.
            let mut enc = DeltaEncoder::new(spec, x.len()).with_exact_ranges(exact.clone());
            enc.encode(&x).unwrap();
            assert!(exact
                .iter()
                .all(|r| enc.residual()[r.clone()].iter().all(|v| *v == 0.0)));
        }
        let exact: Vec<std::ops::Range<usize>> = std::iter::once(990..1000).collect();
        let good = encode_with_exact(CodecSpec::Dense, &x, &exact);
        let tail = good.len() - 4 * 10 - 8;
        // A range past the end of the model.
        let mut bad = good.clone();
        bad[tail..tail + 4].copy_from_slice(&995u32.to_le_bytes());
        assert!(decode(&bad, 1000).unwrap_err().to_string().contains("exceeds"));
        // A length that wraps.
        let mut bad = good.clone();
        bad[tail + 4..tail + 8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&bad, 1000).is_err());
        // Values cut short, and a range count with nothing behind it.
        assert!(decode(&good[..good.len() - 3], 1000).is_err());
        let mut bad = good[..tail - 4].to_vec();
        bad.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&bad, 1000).is_err());
    }

    #[test]
    fn spec_parsing() {
        assert_eq!("dense".parse::<CodecSpec>().unwrap(), CodecSpec::Dense);
        assert_eq!(
            "topk-int8:0.01".parse::<CodecSpec>().unwrap(),
            CodecSpec::TopKInt8 { rho: 0.01 }
        );
        for bad in [
            "topk-int8",
            "topk-int8:0",
            "topk-int8:2",
            "topk-int8:x",
            "dense:1",
            "zip",
        ] {
            assert!(bad.parse::<CodecSpec>().is_err(), "{bad}");
        }
        let s: CodecSpec = "topk-sign:0.05".parse().unwrap();
        assert_eq!(s.to_string().parse::<CodecSpec>().unwrap(), s);
    }

    #[test]
    fn top_k_picks_largest_with_ties() {
        let x = [0.1, -5.0, 3.0, 3.0, 0.0, 3.0];
        assert_eq!(top_k_indices(&x, 1), vec![1]);
        assert_eq!(top_k_indices(&x, 3), vec![1, 2, 3]);
        assert_eq!(top_k_indices(&x, 6).len(), 6);
    }

    #[test]
    fn bitmap_is_used_when_dense() {
        let x: Vec<f32> = (0..1000).map(|i| i as f32).collect();
        let bytes = encode(CodecSpec::TopKInt8 { rho: 0.9 }, &x);
        assert_eq!(bytes[HEADER + 8], 1, "bitmap mode");
        let sparse = encode(CodecSpec::TopKInt8 { rho: 0.01 }, &x);
        assert_eq!(sparse[HEADER + 8], 0, "varint mode");
        assert_eq!(decode(&bytes, 1000).unwrap().iter().filter(|v| **v != 0.0).count(), 900);
    }

    #[test]
    fn hostile_payloads_error_cleanly() {
        let x: Vec<f32> = (0..100).map(|i| (i as f32 - 50.0) / 7.0).collect();
        let good = encode(CodecSpec::TopKInt8 { rho: 0.2 }, &x);
        assert!(matches!(decode(&good, 99), Err(CodecError::WrongShape { .. })));
        for cut in 0..good.len() {
            assert!(decode(&good[..cut], 100).is_err(), "truncated at {cut}");
        }
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(decode(&trailing, 100).is_err());
        // an index beyond n: a gap that jumps past the end
        let mut far = good.clone();
        far[HEADER + 13] = 0x7f;
        assert!(decode(&far, 100).is_err());
        // a NaN scale
        let dense_nan = encode(CodecSpec::Dense, &[1.0, f32::NAN]);
        assert_eq!(decode(&dense_nan, 2), Err(CodecError::NonFinite(1)));
        let mut nan_scale = good.clone();
        let idx_len = u32::from_le_bytes(nan_scale[HEADER + 9..HEADER + 13].try_into().unwrap()) as usize;
        let s = HEADER + 13 + idx_len;
        nan_scale[s..s + 4].copy_from_slice(&f32::NAN.to_le_bytes());
        assert!(decode(&nan_scale, 100).unwrap_err().to_string().contains("scale"));
        // a huge claimed count fails on the shape check before allocating
        let mut huge = good;
        huge[5..9].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&huge, 100).is_err());
    }

    proptest! {
        #[test]
        fn dense_is_identity(x in vec_strategy()) {
            let bytes = encode(CodecSpec::Dense, &x);
            prop_assert_eq!(decode(&bytes, x.len()).unwrap(), x);
        }

        #[test]
        fn half_error_is_bounded(x in vec_strategy()) {
            for (spec, rel) in [(CodecSpec::Fp16, 1.0 / 1024.0), (CodecSpec::Bf16, 1.0 / 128.0)] {
                let y = decode(&encode(spec, &x), x.len()).unwrap();
                for (a, b) in x.iter().zip(&y) {
                    // relative half-ulp plus a floor for fp16 subnormals
                    prop_assert!((a - b).abs() <= a.abs() * rel + 1e-4, "{} vs {}", a, b);
                }
            }
        }

        #[test]
        fn topk_int8_error_is_bounded(x in vec_strategy(), rho in 0.01f32..1.0) {
            let spec = CodecSpec::TopKInt8 { rho };
            let y = decode(&encode(spec, &x), x.len()).unwrap();
            let k = spec.kept(x.len());
            let kept = top_k_indices(&x, k);
            let mut mask = vec![false; x.len()];
            for &i in &kept { mask[i as usize] = true; }
            let max_kept = kept.iter().map(|&i| x[i as usize].abs()).fold(0f32, f32::max);
            for i in 0..x.len() {
                if mask[i] {
                    // quantisation error is at most half a step of its chunk's scale
                    prop_assert!((x[i] - y[i]).abs() <= max_kept / 254.0 + 1e-6);
                } else {
                    prop_assert_eq!(y[i], 0.0);
                    // and what was dropped is no larger than what was kept
                    prop_assert!(x[i].abs() <= max_kept);
                }
            }
        }

        #[test]
        fn topk_sign_preserves_chunk_mass(x in vec_strategy(), rho in 0.01f32..1.0) {
            let spec = CodecSpec::TopKSign { rho };
            let y = decode(&encode(spec, &x), x.len()).unwrap();
            let kept = top_k_indices(&x, spec.kept(x.len()));
            for chunk in kept.chunks(SCALE_CHUNK) {
                let l1_x: f32 = chunk.iter().map(|&i| x[i as usize].abs()).sum();
                let l1_y: f32 = chunk.iter().map(|&i| y[i as usize].abs()).sum();
                prop_assert!((l1_x - l1_y).abs() <= 1e-3 * l1_x.max(1.0));
                for &i in chunk {
                    let (a, b) = (x[i as usize], y[i as usize]);
                    prop_assert!(a == 0.0 || b == 0.0 || a.signum() == b.signum());
                }
            }
        }

        #[test]
        fn error_feedback_tracks_the_true_sum(
            deltas in prop::collection::vec(prop::collection::vec(-1.0f32..1.0, 200), 1..30),
            sign in any::<bool>(),
        ) {
            let spec = if sign { CodecSpec::TopKSign { rho: 0.05 } } else { CodecSpec::TopKInt8 { rho: 0.05 } };
            let mut enc = DeltaEncoder::new(spec, 200);
            let mut sent = vec![0f32; 200];
            let mut truth = vec![0f32; 200];
            for d in &deltas {
                let e = enc.encode(d).unwrap();
                for i in 0..200 { sent[i] += e.decoded[i]; truth[i] += d[i]; }
            }
            // What was transmitted plus what is still owed equals the truth.
            for i in 0..200 {
                prop_assert!((sent[i] + enc.residual()[i] - truth[i]).abs() < 1e-3);
            }
        }

        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..400), n in 0usize..200) {
            let _ = decode(&bytes, n);
        }
    }
}
