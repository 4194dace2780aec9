//! The bodies of the models beyond plain layer stacks: an LSTM over image
//! rows or bytes, and a small decoder-only transformer over bytes.

use tch::nn::{self, ModuleT, RNN};
use tch::{Kind, Tensor};

/// Byte vocabulary of the language models.
pub const VOCAB: i64 = 256;
pub const LSTM_HIDDEN: i64 = 128;
pub const LSTM_EMBED: i64 = 64;

/// Sequence classification: an image's rows are the time steps, and the
/// last hidden state is classified.
#[derive(Debug)]
pub struct LstmClassifier {
    lstm: nn::LSTM,
    head: nn::Linear,
}

impl LstmClassifier {
    pub fn new(p: &nn::Path, step_features: i64, classes: i64) -> Self {
        Self {
            lstm: nn::lstm(p / "lstm", step_features, LSTM_HIDDEN, Default::default()),
            head: nn::linear(p / "head", LSTM_HIDDEN, classes, Default::default()),
        }
    }
}

impl ModuleT for LstmClassifier {
    fn forward_t(&self, xs: &Tensor, _train: bool) -> Tensor {
        // [N, C, H, W] -> [N, H, C*W]
        let s = xs.size();
        let seq = xs.permute([0, 2, 1, 3]).reshape([s[0], s[2], s[1] * s[3]]);
        let (out, _) = self.lstm.seq(&seq);
        out.select(1, -1).apply(&self.head)
    }
}

/// Next-step prediction over bytes: logits for every position.
#[derive(Debug)]
pub struct LstmLm {
    embed: nn::Embedding,
    lstm: nn::LSTM,
    head: nn::Linear,
}

impl LstmLm {
    pub fn new(p: &nn::Path) -> Self {
        Self {
            embed: nn::embedding(p / "embed", VOCAB, LSTM_EMBED, Default::default()),
            lstm: nn::lstm(p / "lstm", LSTM_EMBED, LSTM_HIDDEN, Default::default()),
            head: nn::linear(p / "head", LSTM_HIDDEN, VOCAB, Default::default()),
        }
    }
}

impl ModuleT for LstmLm {
    fn forward_t(&self, tokens: &Tensor, _train: bool) -> Tensor {
        let (out, _) = self.lstm.seq(&tokens.apply(&self.embed));
        out.apply(&self.head)
    }
}

/// Size of the character transformer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransformerConfig {
    pub width: i64,
    pub heads: i64,
    pub layers: i64,
    /// Longest context (positions with a learnt embedding).
    pub context: i64,
}

#[derive(Debug)]
struct Block {
    ln1: nn::LayerNorm,
    qkv: nn::Linear,
    proj: nn::Linear,
    ln2: nn::LayerNorm,
    fc: nn::Linear,
    out: nn::Linear,
    heads: i64,
}

impl Block {
    fn new(p: &nn::Path, width: i64, heads: i64) -> Self {
        let lin = Default::default;
        Self {
            ln1: nn::layer_norm(p / "ln1", vec![width], Default::default()),
            qkv: nn::linear(p / "qkv", width, 3 * width, lin()),
            proj: nn::linear(p / "proj", width, width, lin()),
            ln2: nn::layer_norm(p / "ln2", vec![width], Default::default()),
            fc: nn::linear(p / "fc", width, 4 * width, lin()),
            out: nn::linear(p / "out", 4 * width, width, lin()),
            heads,
        }
    }

    /// Pre-norm causal self-attention, then a GELU MLP, each residual.
    fn forward(&self, x: &Tensor) -> Tensor {
        let s = x.size();
        let (n, t, d) = (s[0], s[1], s[2]);
        let qkv = x.apply(&self.ln1).apply(&self.qkv).split(d, -1);
        let heads = |z: &Tensor| z.view([n, t, self.heads, d / self.heads]).transpose(1, 2);
        let y = Tensor::scaled_dot_product_attention(
            &heads(&qkv[0]),
            &heads(&qkv[1]),
            &heads(&qkv[2]),
            None::<Tensor>,
            0.0,
            true,
            None,
            false,
        );
        let x = x + y.transpose(1, 2).contiguous().view([n, t, d]).apply(&self.proj);
        let m = x.apply(&self.ln2).apply(&self.fc).gelu("none").apply(&self.out);
        x + m
    }
}

/// A small decoder-only language model over bytes.
#[derive(Debug)]
pub struct CharTransformer {
    tokens: nn::Embedding,
    positions: Tensor,
    blocks: Vec<Block>,
    ln_f: nn::LayerNorm,
    head: nn::Linear,
}

impl CharTransformer {
    pub fn new(p: &nn::Path, c: TransformerConfig) -> Self {
        Self {
            tokens: nn::embedding(p / "tok_emb", VOCAB, c.width, Default::default()),
            positions: p.var("pos_emb", &[c.context, c.width], nn::Init::Const(0.0)),
            blocks: (0..c.layers)
                .map(|i| Block::new(&(p / format!("h{i}")), c.width, c.heads))
                .collect(),
            ln_f: nn::layer_norm(p / "ln_f", vec![c.width], Default::default()),
            head: nn::linear(p / "head", c.width, VOCAB, Default::default()),
        }
    }
}

impl ModuleT for CharTransformer {
    fn forward_t(&self, tokens: &Tensor, _train: bool) -> Tensor {
        let t = tokens.size()[1];
        let mut x = tokens.apply(&self.tokens) + self.positions.narrow(0, 0, t).to_kind(Kind::Float);
        for b in &self.blocks {
            x = b.forward(&x);
        }
        x.apply(&self.ln_f).apply(&self.head)
    }
}

/// The autoencoder's layers: D -> 128 -> 32 -> 128 -> D, pixels out in
/// [0, 1] through a sigmoid.
pub fn autoencoder(p: &nn::Path, d: i64) -> nn::SequentialT {
    let lin = Default::default;
    nn::seq_t()
        .add_fn(|x| x.flatten(1, -1))
        .add(nn::linear(p / "enc1", d, 128, lin()))
        .add_fn(|x| x.relu())
        .add(nn::linear(p / "enc2", 128, 32, lin()))
        .add_fn(|x| x.relu())
        .add(nn::linear(p / "dec1", 32, 128, lin()))
        .add_fn(|x| x.relu())
        .add(nn::linear(p / "dec2", 128, d, lin()))
        .add_fn(|x| x.sigmoid())
}
