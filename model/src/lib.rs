//! Everything about tensors in meshtrain, with no networking and no storage
//! engine: model definitions, datasets and batching, the local training loop,
//! flattening weights to one vector, the delta codec, robust aggregation and
//! the outer optimiser.
//!
//! It knows nothing of peers, signatures or RocksDB; the node hands it plain
//! vectors and bytes.
//!
//! Main types:
//! - [`Network`] (with its [`Layout`] and deterministic genesis) over the
//!   model zoo of [`Arch`]: MLP, CNN, LSTM, autoencoder, character
//!   transformer, each with its [`Task`] (loss and metrics), and [`Trainer`];
//! - [`evaluate`] into an [`EvalReport`] (accuracy, per-class F1 and the
//!   confusion matrix, ROC-AUC, perplexity) and [`metrics::EarlyStopping`];
//! - [`Dataset`] / [`DataSplits`];
//! - [`codec::DeltaEncoder`] and [`codec::decode`];
//! - [`aggregate::aggregate`] with [`AggregatorSpec`];
//! - [`OuterOptimizer`];
//! - [`script::ScriptModule`], a user's TorchScript module (through a small
//!   C++ shim, csrc/script.cpp, for what tch does not expose).

pub mod adam;
pub mod aggregate;
pub mod blocks;
pub mod codec;
pub mod dataset;
mod error;
pub mod formats;
pub mod idx;
pub mod metrics;
pub mod net;
pub mod outer;
pub mod script;
pub mod stream;
pub mod train;
mod zoo;

pub use adam::AdamState;
pub use aggregate::{AggInput, AggVerdict, Aggregate, AggregatorSpec};
pub use blocks::{BlockInfo, Manifest, Schema};
pub use codec::{CodecError, CodecSpec, DeltaEncoder};
pub use dataset::{DataSplits, Dataset, ImageShape};
pub use error::{ModelError, Result};
pub use net::{Arch, Layout, Network, Task};
pub use outer::{OuterConfig, OuterOptimizer};
pub use stream::{BlockReader, BlockStream, InMemory, RecordSource};
pub use tch::Device;
pub use train::{evaluate, EvalReport, Evaluation, Records, StepStats, TrainConfig, Trainer};

/// Where tensors live: `auto` picks CUDA when libtorch sees a GPU.
pub fn device(choice: &str) -> Result<Device> {
    match choice {
        "auto" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        "cuda" if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
        "cuda" => Err(ModelError::Device(
            "cuda was asked for, but libtorch sees no CUDA device".into(),
        )),
        other => Err(ModelError::Device(format!(
            "unknown device `{other}` (auto, cpu or cuda)"
        ))),
    }
}

static THREADS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Chooses libtorch's intra-op threads for the thread that trains, which
/// takes them with [`apply_threads`]; the calling thread (which only builds
/// the model) keeps one. OpenMP keeps a team per thread that runs parallel
/// kernels, and once a process's teams hold more threads than there are
/// cores, libgomp stops spinning between kernels and puts its workers to
/// sleep: a two-thread local step of the MLP took three times as long as a
/// one-thread step until only the trainer had a team.
pub fn set_threads(n: usize) {
    THREADS.store(n.max(1), std::sync::atomic::Ordering::Relaxed);
    tch::set_num_threads(1);
}

/// Applies the count [`set_threads`] chose to the calling thread.
pub fn apply_threads() {
    let n = THREADS.load(std::sync::atomic::Ordering::Relaxed);
    if n > 0 {
        tch::set_num_threads(n as i32);
    }
}
