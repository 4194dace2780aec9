//! A user's TorchScript module (scripts/torchscript_cnn.py, scripted with the
//! project's virtualenv) as a `Network`: its parameters and batch-norm
//! buffers are laid out by PyTorch's names, its genesis is the file's
//! weights, it learns, and a wrong input is an error, not a panic.

use std::path::{Path, PathBuf};
use std::process::Command;

use meshtrain_model::{DataSplits, Device, InMemory, Network, Records, Task, TrainConfig, Trainer};
use tch::{Kind, Tensor};

fn module(dir: &Path) -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repo root");
    let python = repo.join(".venv/bin/python");
    assert!(python.exists(), "{} is missing: run scripts/setup.sh", python.display());
    let out = dir.join("cnn.pt");
    let run = Command::new(python)
        .arg(repo.join("scripts/torchscript_cnn.py"))
        .arg("save")
        .arg(&out)
        .output()
        .expect("run python");
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    out
}

#[test]
fn a_torchscript_cnn_is_laid_out_by_name_and_learns() {
    let tmp = tempfile::tempdir().unwrap();
    let path = module(tmp.path());
    let d = DataSplits::idx_dir("fashion-mnist", Path::new("/usr/share/datasets/fashion-mnist")).unwrap();
    let schema = d.train.schema();
    let net = Network::script(&path, "classify", &schema, Device::Cpu).unwrap();
    assert_eq!(net.task, Task::Classify { classes: 10 });
    let layout = net.layout().clone();
    let names: Vec<&str> = layout.params.iter().map(|p| p.name.as_str()).collect();
    // PyTorch's own names, sorted: parameters and buffers alike.
    assert!(names.windows(2).all(|w| w[0] < w[1]), "{names:?}");
    for n in [
        "features.0.weight",
        "features.1.running_var",
        "features.1.num_batches_tracked",
        "head.3.bias",
    ] {
        assert!(names.contains(&n), "{n} missing from {names:?}");
    }
    let spec = |n: &str| layout.params.iter().find(|p| p.name == n).unwrap();
    assert!(spec("features.0.weight").trainable && !spec("features.0.weight").integer);
    assert!(!spec("features.1.running_mean").trainable);
    assert!(spec("features.1.num_batches_tracked").integer && !spec("features.1.num_batches_tracked").trainable);
    assert_eq!(layout.buffer_ranges().len(), 6, "two batch norms: mean, var, count");

    // Genesis is the file's weights, the same whenever it is loaded.
    let genesis = net.genesis(1);
    assert_eq!(
        genesis,
        net.genesis(2),
        "a module's genesis does not depend on the seed"
    );
    let again = Network::script(&path, "classify", &schema, Device::Cpu).unwrap();
    assert_eq!(again.flat().unwrap(), genesis);
    let running_var = layout
        .params
        .iter()
        .take_while(|p| p.name != "features.1.running_var")
        .map(|p| p.numel)
        .sum::<usize>();
    assert!(genesis[running_var..running_var + 32].iter().all(|&v| v == 1.0));

    // A wrong input is an error that says so.
    let bad = Tensor::zeros([2, 3, 5, 5], (Kind::Float, Device::Cpu));
    let err = net.forward(&bad, false).unwrap_err().to_string();
    assert!(
        err.contains("channels") || err.contains("shape") || err.contains("size"),
        "{err}"
    );

    // It learns, and training moves the batch-norm statistics too.
    let tr = d.train.subset(&(0..2000).collect::<Vec<_>>(), "train").unwrap();
    let te = d.test.subset(&(0..500).collect::<Vec<_>>(), "test").unwrap();
    let test = Records::from(&te);
    let source = InMemory::new(schema, tr.to_records(), 3).unwrap();
    let cfg = TrainConfig {
        batch_size: 64,
        lr: 1e-3,
        label_flip: false,
        anomaly_class: None,
    };
    let mut t = Trainer::new(net, Box::new(source), cfg).unwrap();
    let before = t.evaluate(&test).unwrap().summary;
    t.train_steps(40).unwrap();
    let after = t.evaluate(&test).unwrap().summary;
    assert!(
        after.loss < before.loss && after.accuracy > 0.6,
        "{before:?} -> {after:?}"
    );
    let w = t.weights().unwrap();
    assert_ne!(w[running_var..running_var + 32], genesis[running_var..running_var + 32]);
    // Loading a vector back (the anchor each round) reaches every tensor.
    t.load(&genesis).unwrap();
    assert_eq!(t.weights().unwrap(), genesis);
}
