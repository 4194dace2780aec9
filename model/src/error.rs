use std::path::PathBuf;

/// Everything that can go wrong in the model crate, in a user's terms.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: {detail} (at byte offset {offset})")]
    BadDataFile { path: PathBuf, offset: u64, detail: String },

    /// A text file's fault, where a line number is what a person looks for.
    #[error("{path}: line {line}: {detail}")]
    BadDataLine { path: PathBuf, line: u64, detail: String },

    #[error("dataset {name}: {detail}")]
    BadDataset { name: String, detail: String },

    #[error("unknown model `{0}` (known: mlp, cnn, lstm, autoencoder, char-transformer, torchscript:FILE)")]
    UnknownModel(String),

    #[error("unknown task `{0}` (known: classify, reconstruct, next-token)")]
    UnknownTask(String),

    #[error("task `{task}` needs {expected}; the data has {got}")]
    TaskMismatch {
        task: String,
        expected: String,
        got: String,
    },

    #[error("TorchScript module {path}: {detail}")]
    Script { path: PathBuf, detail: String },

    #[error("model `{model}` expects {expected} inputs, the data has {got}")]
    ShapeMismatch {
        model: String,
        expected: String,
        got: String,
    },

    #[error("weight vector has {got} values, the model has {expected} parameters")]
    ParamCount { expected: usize, got: usize },

    #[error("malformed delta payload: {0}")]
    Codec(String),

    #[error("bad codec spec `{spec}`: {detail}")]
    CodecSpec { spec: String, detail: String },

    #[error("bad aggregator spec `{spec}`: {detail}")]
    AggregatorSpec { spec: String, detail: String },

    #[error("device: {0}")]
    Device(String),

    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;
