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
//! - [`OuterOptimizer`].

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

/// Pins libtorch's intra-op threads: several nodes share one machine.
pub fn set_threads(n: usize) {
    tch::set_num_threads(n.max(1) as i32);
}
