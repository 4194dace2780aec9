//! Model definitions, their parameter layout, and deterministic genesis.
//!
//! Every node must start from the same bytes. libtorch's initialisers depend
//! on its RNG and build, so genesis weights are drawn here in plain Rust from
//! the run seed, per parameter name, with PyTorch's default init rules.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};

use crate::blocks::Schema;
use crate::script::{ScriptModule, StateTensor};
use crate::zoo::{self, TransformerConfig};
use crate::{ModelError, Result};

/// The model architectures a run can name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Arch {
    /// 784-256-128-10 multilayer perceptron (any input size).
    Mlp,
    /// Two conv blocks (conv, batch norm, ReLU, max-pool) then two dense
    /// layers: about 0.42M parameters on 28x28x1, 0.55M on 32x32x3.
    Cnn,
    /// One LSTM layer: classifies images read row by row, or predicts the
    /// next byte of text.
    Lstm,
    /// A dense autoencoder trained on normal records only; its
    /// reconstruction error scores anomalies.
    Autoencoder,
    /// A small decoder-only transformer over bytes.
    CharTransformer,
    /// A user's TorchScript module, named in the run spec by its file's
    /// hash (`model.script`), with the task given there.
    #[serde(rename = "torchscript")]
    Script,
}

impl Arch {
    pub const ALL: [Arch; 5] = [
        Arch::Mlp,
        Arch::Cnn,
        Arch::Lstm,
        Arch::Autoencoder,
        Arch::CharTransformer,
    ];

    /// What the model learns on records of `schema`.
    pub fn task(self, schema: &Schema) -> Result<Task> {
        match (self, schema) {
            (Arch::Mlp | Arch::Cnn | Arch::Lstm, Schema::Image { classes, .. }) => {
                Ok(Task::Classify { classes: *classes })
            }
            (Arch::Autoencoder, Schema::Image { .. }) => Ok(Task::Reconstruct),
            (Arch::Lstm | Arch::CharTransformer, Schema::Text { seq_len }) if *seq_len >= 2 => Ok(Task::NextByte),
            _ => Err(ModelError::ShapeMismatch {
                model: self.to_string(),
                expected: match self {
                    Arch::Mlp | Arch::Cnn | Arch::Autoencoder => "image records".into(),
                    Arch::Lstm => "image or text records".into(),
                    Arch::CharTransformer => "text records of at least 2 bytes".into(),
                    Arch::Script => "the task its run spec names".into(),
                },
                got: format!("{schema:?}"),
            }),
        }
    }
}

impl Task {
    /// The task a TorchScript module is trained for (`classify`,
    /// `reconstruct` or `next-token`), on records of `schema`.
    pub fn named(name: &str, schema: &Schema) -> Result<Task> {
        match (name, schema) {
            ("classify", Schema::Image { classes, .. }) => Ok(Task::Classify { classes: *classes }),
            ("reconstruct", Schema::Image { .. }) => Ok(Task::Reconstruct),
            ("next-token", Schema::Text { seq_len }) if *seq_len >= 2 => Ok(Task::NextByte),
            ("classify" | "reconstruct" | "next-token", _) => Err(ModelError::TaskMismatch {
                task: name.to_string(),
                expected: if name == "next-token" {
                    "text records of at least 2 bytes".into()
                } else {
                    "image records".into()
                },
                got: format!("{schema:?}"),
            }),
            _ => Err(ModelError::UnknownTask(name.to_string())),
        }
    }
}

/// What a model is trained to do, which fixes its loss and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    /// Cross-entropy over classes; accuracy, per-class F1, confusion matrix.
    Classify { classes: usize },
    /// Mean squared reconstruction error; ROC-AUC of the error as an
    /// anomaly score.
    Reconstruct,
    /// Cross-entropy of the next byte at every position, in nats per
    /// character; perplexity.
    NextByte,
}

impl FromStr for Arch {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self> {
        Arch::ALL
            .into_iter()
            .find(|a| a.to_string() == s)
            .ok_or_else(|| ModelError::UnknownModel(s.to_string()))
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Arch::Mlp => "mlp",
            Arch::Cnn => "cnn",
            Arch::Lstm => "lstm",
            Arch::Autoencoder => "autoencoder",
            Arch::CharTransformer => "char-transformer",
            Arch::Script => "torchscript",
        })
    }
}

/// How one parameter tensor starts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    Uniform { bound: f32 },
    Const(f32),
}

/// One named parameter (or buffer) tensor of a model.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<i64>,
    pub numel: usize,
    pub init: Init,
    /// False for buffers such as batch-norm running statistics: they are
    /// exchanged and averaged, but they are not gradients.
    pub trainable: bool,
    /// Held as integers by the model (a batch-norm's batch count): carried
    /// as floats in the weight vector, exported as int64.
    pub integer: bool,
}

/// The order in which a model's tensors are flattened into one vector: by
/// name, so that every node lays out the same vector the same way.
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    pub params: Vec<ParamSpec>,
    pub total: usize,
}

impl Layout {
    fn from_shapes(shapes: &BTreeMap<String, Vec<i64>>) -> Self {
        let mut params = Vec::with_capacity(shapes.len());
        let mut total = 0;
        for (name, shape) in shapes {
            let numel = shape.iter().product::<i64>().max(0) as usize;
            let init = init_rule(name, shape, shapes);
            total += numel;
            params.push(ParamSpec {
                name: name.clone(),
                shape: shape.clone(),
                numel,
                init,
                trainable: !name.ends_with(".running_mean") && !name.ends_with(".running_var"),
                integer: false,
            });
        }
        Self { params, total }
    }

    /// Index ranges of the non-trainable buffers in the flat vector.
    pub fn buffer_ranges(&self) -> Vec<std::ops::Range<usize>> {
        let mut out = Vec::new();
        let mut off = 0;
        for p in &self.params {
            if !p.trainable {
                out.push(off..off + p.numel);
            }
            off += p.numel;
        }
        out
    }

    /// Genesis weights of a built-in model for `seed`: identical on every
    /// machine (see [`Network::genesis`], which also covers TorchScript).
    pub(crate) fn genesis(&self, seed: u64) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.total);
        for p in &self.params {
            match p.init {
                Init::Const(c) => out.extend(std::iter::repeat_n(c, p.numel)),
                Init::Uniform { bound } => {
                    let mut key = blake3::Hasher::new_derive_key("meshtrain genesis param v1");
                    key.update(&seed.to_le_bytes());
                    key.update(p.name.as_bytes());
                    let mut rng = ChaCha8Rng::from_seed(*key.finalize().as_bytes());
                    // 24 random bits per value, mapped by hand so that genesis
                    // does not depend on how a rand release samples floats.
                    out.extend((0..p.numel).map(|_| {
                        let unit = (rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32;
                        bound * (2.0 * unit - 1.0)
                    }));
                }
            }
        }
        out
    }
}

fn fan_in(shape: &[i64]) -> f32 {
    shape.iter().skip(1).product::<i64>().max(1) as f32
}

/// PyTorch's defaults: weights and biases of dense and conv layers are
/// U(±1/sqrt(fan_in)); LSTM weights and biases U(±1/sqrt(hidden)); batch
/// and layer norm scales 1, shifts 0, running stats 0 and 1.
fn init_rule(name: &str, shape: &[i64], all: &BTreeMap<String, Vec<i64>>) -> Init {
    let (prefix, leaf) = name.rsplit_once('.').unwrap_or(("", name));
    let weight = all.get(&format!("{prefix}.weight"));
    let is_norm = all.contains_key(&format!("{prefix}.running_mean")) || weight.is_some_and(|w| w.len() == 1);
    match leaf {
        "running_mean" => Init::Const(0.0),
        "running_var" => Init::Const(1.0),
        "weight" if is_norm || shape.len() == 1 => Init::Const(1.0),
        "bias" if is_norm => Init::Const(0.0),
        "bias" => Init::Uniform {
            bound: 1.0 / weight.map(|w| fan_in(w)).unwrap_or(1.0).sqrt(),
        },
        l if l.starts_with("weight_") || l.starts_with("bias_") => Init::Uniform {
            bound: 1.0 / ((shape.first().copied().unwrap_or(4) / 4).max(1) as f32).sqrt(),
        },
        _ => Init::Uniform {
            bound: 1.0 / fan_in(shape).sqrt(),
        },
    }
}

/// The forward pass: a built-in model over a VarStore, or a user's
/// TorchScript module (which holds its own tensors).
enum Body {
    Builtin(Box<dyn ModuleT>),
    Script {
        module: ScriptModule,
        /// The module file's own weights, its genesis.
        genesis: Vec<f32>,
    },
}

/// A model instance: its variables and forward pass, on one device.
pub struct Network {
    pub arch: Arch,
    /// The records it trains on.
    pub schema: Schema,
    pub task: Task,
    vs: nn::VarStore,
    body: Body,
    /// Variables in layout order, shallow handles into `vs`.
    vars: Vec<Tensor>,
    layout: Layout,
}

impl fmt::Debug for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Network({}, {} params)", self.arch, self.layout.total)
    }
}

/// The character transformer's size for sequences of `seq_len` bytes.
pub fn transformer_config(seq_len: usize) -> TransformerConfig {
    TransformerConfig {
        width: 128,
        heads: 4,
        layers: 2,
        context: seq_len.saturating_sub(1).max(1) as i64,
    }
}

impl Network {
    /// The model `arch` for records of `schema`, on `device`.
    pub fn new(arch: Arch, schema: &Schema, device: Device) -> Result<Self> {
        let task = arch.task(schema)?;
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let body: Box<dyn ModuleT> = match (arch, schema) {
            (Arch::Mlp, Schema::Image { classes, .. }) => {
                let d = schema.record_size() as i64 - 1;
                Box::new(
                    nn::seq_t()
                        .add_fn(|x| x.flatten(1, -1))
                        .add(nn::linear(&root / "fc1", d, 256, Default::default()))
                        .add_fn(|x| x.relu())
                        .add(nn::linear(&root / "fc2", 256, 128, Default::default()))
                        .add_fn(|x| x.relu())
                        .add(nn::linear(&root / "fc3", 128, *classes as i64, Default::default())),
                )
            }
            (
                Arch::Cnn,
                Schema::Image {
                    channels,
                    height,
                    width,
                    classes,
                },
            ) => {
                if height % 4 != 0 || width % 4 != 0 {
                    return Err(ModelError::ShapeMismatch {
                        model: arch.to_string(),
                        expected: "height and width divisible by 4".into(),
                        got: format!("{height}x{width}"),
                    });
                }
                let conv = nn::ConvConfig {
                    padding: 1,
                    ..Default::default()
                };
                let flat = 64 * (height / 4) as i64 * (width / 4) as i64;
                Box::new(
                    nn::seq_t()
                        .add(nn::conv2d(&root / "conv1", *channels as i64, 32, 3, conv))
                        .add(nn::batch_norm2d(&root / "bn1", 32, Default::default()))
                        .add_fn(|x| x.relu().max_pool2d_default(2))
                        .add(nn::conv2d(&root / "conv2", 32, 64, 3, conv))
                        .add(nn::batch_norm2d(&root / "bn2", 64, Default::default()))
                        .add_fn(|x| x.relu().max_pool2d_default(2))
                        .add_fn(|x| x.flatten(1, -1))
                        .add(nn::linear(&root / "fc1", flat, 128, Default::default()))
                        .add_fn(|x| x.relu())
                        .add(nn::linear(&root / "fc2", 128, *classes as i64, Default::default())),
                )
            }
            (
                Arch::Lstm,
                Schema::Image {
                    channels,
                    width,
                    classes,
                    ..
                },
            ) => Box::new(zoo::LstmClassifier::new(
                &root,
                (channels * width) as i64,
                *classes as i64,
            )),
            (Arch::Lstm, Schema::Text { .. }) => Box::new(zoo::LstmLm::new(&root)),
            (Arch::Autoencoder, Schema::Image { .. }) => {
                Box::new(zoo::autoencoder(&root, schema.record_size() as i64 - 1))
            }
            (Arch::CharTransformer, Schema::Text { seq_len }) => {
                Box::new(zoo::CharTransformer::new(&root, transformer_config(*seq_len)))
            }
            // `task` above refused every other pairing, and TorchScript
            // modules are built by `Network::script`.
            _ => {
                return Err(ModelError::ShapeMismatch {
                    model: arch.to_string(),
                    expected: "a supported record layout".into(),
                    got: format!("{schema:?}"),
                })
            }
        };
        let named = vs.variables();
        let shapes: BTreeMap<String, Vec<i64>> = named.iter().map(|(n, t)| (n.clone(), t.size())).collect();
        let layout = Layout::from_shapes(&shapes);
        let vars = layout.params.iter().map(|p| named[&p.name].shallow_clone()).collect();
        Ok(Self {
            arch,
            schema: schema.clone(),
            task,
            vs,
            body: Body::Builtin(body),
            vars,
            layout,
        })
    }

    /// The TorchScript module saved at `path`, trained for `task` (see
    /// [`Task::named`]) on records of `schema`. Its parameters and buffers
    /// keep the module's own names and are laid out by name; its genesis is
    /// the weights in the file. The module must take a batch as the
    /// built-in models do (images as float `[N, C, H, W]` in [0, 1]; text as
    /// int64 byte ids `[N, T]`) and return logits `[N, classes]`, a
    /// reconstruction `[N, C*H*W]` or next-byte logits `[N, T, 256]`; a
    /// module that does not is refused here, naming the mismatch.
    pub fn script(path: &Path, task: &str, schema: &Schema, device: Device) -> Result<Self> {
        let task = Task::named(task, schema)?;
        let module = ScriptModule::load(path, device)?;
        let state = module.state()?;
        if state.is_empty() {
            return Err(ModelError::Script {
                path: path.to_path_buf(),
                detail: "the module has no parameters to train".into(),
            });
        }
        let mut by_name: BTreeMap<String, StateTensor> = BTreeMap::new();
        for t in state {
            if !matches!(
                t.tensor.kind(),
                Kind::Float
                    | Kind::Double
                    | Kind::Half
                    | Kind::BFloat16
                    | Kind::Int64
                    | Kind::Int
                    | Kind::Int16
                    | Kind::Int8
                    | Kind::Uint8
            ) {
                return Err(ModelError::Script {
                    path: path.to_path_buf(),
                    detail: format!(
                        "`{}` holds {:?} values, which cannot be exchanged",
                        t.name,
                        t.tensor.kind()
                    ),
                });
            }
            // A tensor registered twice (shared weights) is one tensor.
            by_name.entry(t.name.clone()).or_insert(t);
        }
        let mut params = Vec::with_capacity(by_name.len());
        let mut vars = Vec::with_capacity(by_name.len());
        let mut total = 0;
        for (name, t) in by_name {
            let shape = t.tensor.size();
            let numel = shape.iter().product::<i64>().max(0) as usize;
            let integer = !t.tensor.is_floating_point();
            total += numel;
            params.push(ParamSpec {
                name,
                shape,
                numel,
                init: Init::Const(0.0),
                trainable: !t.buffer && !integer && t.tensor.requires_grad(),
                integer,
            });
            vars.push(t.tensor);
        }
        let layout = Layout { params, total };
        let mut net = Self {
            arch: Arch::Script,
            schema: schema.clone(),
            task,
            vs: nn::VarStore::new(device),
            body: Body::Script {
                module,
                genesis: Vec::new(),
            },
            vars,
            layout,
        };
        net.check_io(path)?;
        let genesis = net.flat()?;
        if let Body::Script { genesis: g, .. } = &mut net.body {
            *g = genesis;
        }
        Ok(net)
    }

    /// Runs the module once on two empty records of its schema and checks
    /// what comes back against its task.
    fn check_io(&self, path: &Path) -> Result<()> {
        let device = self.device();
        let (xs, input) = match self.schema {
            Schema::Image {
                channels,
                height,
                width,
                ..
            } => (
                Tensor::zeros([2, channels as i64, height as i64, width as i64], (Kind::Float, device)),
                format!("float [2, {channels}, {height}, {width}]"),
            ),
            Schema::Text { seq_len } => (
                Tensor::zeros([2, seq_len as i64 - 1], (Kind::Int64, device)),
                format!("int64 [2, {}]", seq_len - 1),
            ),
            Schema::Table { .. } => {
                return Err(ModelError::Script {
                    path: path.to_path_buf(),
                    detail: "table records are not trainable by any model yet".into(),
                })
            }
        };
        let mismatch = |detail: String| ModelError::Script {
            path: path.to_path_buf(),
            detail,
        };
        let out = tch::no_grad(|| self.forward(&xs, false)).map_err(|e| {
            mismatch(format!(
                "its forward fails on a batch of the dataset's records ({input}): {e}"
            ))
        })?;
        let expected: Vec<i64> = match (self.task, &self.schema) {
            (Task::Classify { classes }, _) => vec![2, classes as i64],
            (Task::Reconstruct, s) => vec![2, s.record_size() as i64 - 1],
            (Task::NextByte, Schema::Text { seq_len }) => vec![2, *seq_len as i64 - 1, 256],
            (Task::NextByte, _) => vec![],
        };
        if out.size() != expected || !out.is_floating_point() {
            return Err(mismatch(format!(
                "given {input}, it returns {:?} {:?}; {} needs float {:?}",
                out.kind(),
                out.size(),
                match self.task {
                    Task::Classify { .. } => "classify (logits per class)",
                    Task::Reconstruct => "reconstruct (the flattened record)",
                    Task::NextByte => "next-token (logits over 256 bytes per position)",
                },
                expected
            )));
        }
        Ok(())
    }

    /// Genesis weights: drawn from `seed` for a built-in model, the file's
    /// own for a TorchScript module. Identical on every machine.
    pub fn genesis(&self, seed: u64) -> Vec<f32> {
        match &self.body {
            Body::Builtin(_) => self.layout.genesis(seed),
            Body::Script { genesis, .. } => genesis.clone(),
        }
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn param_count(&self) -> usize {
        self.layout.total
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    /// The trainable tensors (not buffers), in layout order, as handles
    /// that share storage with the model.
    pub fn trainable(&self) -> Vec<Tensor> {
        self.vars
            .iter()
            .zip(&self.layout.params)
            .filter(|(_, p)| p.trainable)
            .map(|(v, _)| v.shallow_clone())
            .collect()
    }

    pub fn forward(&self, xs: &Tensor, train: bool) -> Result<Tensor> {
        match &self.body {
            Body::Builtin(m) => Ok(m.forward_t(xs, train)),
            Body::Script { module, .. } => module.forward(xs, train),
        }
    }

    /// All parameters and buffers, flattened in layout order.
    pub fn flat(&self) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(self.layout.total);
        for v in &self.vars {
            let t = v.detach().to_device(Device::Cpu).to_kind(Kind::Float).flatten(0, -1);
            let vals = Vec::<f32>::try_from(&t)?;
            out.extend_from_slice(&vals);
        }
        Ok(out)
    }

    /// Overwrites every parameter and buffer from a flat vector.
    pub fn load_flat(&mut self, flat: &[f32]) -> Result<()> {
        if flat.len() != self.layout.total {
            return Err(ModelError::ParamCount {
                expected: self.layout.total,
                got: flat.len(),
            });
        }
        let device = self.device();
        let mut off = 0;
        tch::no_grad(|| -> Result<()> {
            for (v, p) in self.vars.iter_mut().zip(&self.layout.params) {
                let src = Tensor::from_slice(&flat[off..off + p.numel])
                    .reshape(&p.shape)
                    .to_device(device);
                v.f_copy_(&src)?;
                off += p.numel;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FMNIST: Schema = Schema::Image {
        channels: 1,
        height: 28,
        width: 28,
        classes: 10,
    };

    #[test]
    fn mlp_has_the_expected_size() {
        let n = Network::new(Arch::Mlp, &FMNIST, Device::Cpu).unwrap();
        assert_eq!(n.param_count(), 784 * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10);
    }

    #[test]
    fn cnn_is_about_half_a_million() {
        let n = Network::new(Arch::Cnn, &FMNIST, Device::Cpu).unwrap();
        assert!((400_000..600_000).contains(&n.param_count()), "{}", n.param_count());
        let cifar = Schema::Image {
            channels: 3,
            height: 32,
            width: 32,
            classes: 10,
        };
        let n = Network::new(Arch::Cnn, &cifar, Device::Cpu).unwrap();
        assert!((500_000..700_000).contains(&n.param_count()), "{}", n.param_count());
    }

    #[test]
    fn genesis_is_deterministic_and_loads() {
        let mut n = Network::new(Arch::Cnn, &FMNIST, Device::Cpu).unwrap();
        let g1 = n.layout().genesis(42);
        let g2 = n.layout().genesis(42);
        assert_eq!(g1, g2);
        assert_ne!(g1, n.layout().genesis(43));
        n.load_flat(&g1).unwrap();
        assert_eq!(n.flat().unwrap(), g1);
        // batch-norm running variance starts at one, and is a buffer
        let bn = n
            .layout()
            .params
            .iter()
            .position(|p| p.name == "bn1.running_var")
            .unwrap();
        let off: usize = n.layout().params[..bn].iter().map(|p| p.numel).sum();
        assert!(g1[off..off + 32].iter().all(|&v| v == 1.0));
        assert!(n.layout().buffer_ranges().contains(&(off..off + 32)));
        assert_eq!(n.layout().buffer_ranges().len(), 4);
        assert!(n.load_flat(&g1[1..]).is_err());
    }

    #[test]
    fn forward_shapes() {
        let n = Network::new(Arch::Cnn, &FMNIST, Device::Cpu).unwrap();
        let x = Tensor::zeros([3, 1, 28, 28], (Kind::Float, Device::Cpu));
        assert_eq!(n.forward(&x, false).unwrap().size(), vec![3, 10]);
    }

    #[test]
    fn zoo_shapes_and_sizes() {
        let text = Schema::Text { seq_len: 65 };
        let n = Network::new(Arch::Lstm, &FMNIST, Device::Cpu).unwrap();
        assert_eq!(n.task, Task::Classify { classes: 10 });
        let x = Tensor::zeros([3, 1, 28, 28], (Kind::Float, Device::Cpu));
        assert_eq!(n.forward(&x, false).unwrap().size(), vec![3, 10]);
        let n = Network::new(Arch::Autoencoder, &FMNIST, Device::Cpu).unwrap();
        assert_eq!(n.forward(&x, false).unwrap().size(), vec![3, 784]);
        for arch in [Arch::Lstm, Arch::CharTransformer] {
            let n = Network::new(arch, &text, Device::Cpu).unwrap();
            assert_eq!(n.task, Task::NextByte);
            let tokens = Tensor::zeros([2, 64], (Kind::Int64, Device::Cpu));
            assert_eq!(n.forward(&tokens, false).unwrap().size(), vec![2, 64, 256], "{arch}");
        }
        let t = Network::new(Arch::CharTransformer, &text, Device::Cpu).unwrap();
        assert!((300_000..600_000).contains(&t.param_count()), "{}", t.param_count());
        // layer-norm shifts start at zero, LSTM biases are not
        let g = t.layout().genesis(1);
        let mut off = 0;
        for p in &t.layout().params {
            if p.name == "h0.ln1.bias" {
                assert!(g[off..off + p.numel].iter().all(|&v| v == 0.0));
            }
            off += p.numel;
        }
        assert!(Network::new(Arch::CharTransformer, &FMNIST, Device::Cpu).is_err());
        assert!(Network::new(Arch::Cnn, &text, Device::Cpu).is_err());
        for a in Arch::ALL {
            assert_eq!(a.to_string().parse::<Arch>().unwrap(), a);
        }
    }
}
