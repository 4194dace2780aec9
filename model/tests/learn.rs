//! Each model of the zoo learns: on a small slice of real data, a short run
//! lowers the held-out loss and beats chance by a clear margin.

use std::path::Path;

use meshtrain_model::{
    evaluate, Arch, DataSplits, Device, EvalReport, InMemory, Network, Records, Schema, TrainConfig, Trainer,
};

const FMNIST: &str = "/usr/share/datasets/fashion-mnist";

fn fashion(train: usize, test: usize) -> (Schema, Vec<u8>, Records) {
    let dir = Path::new(FMNIST);
    assert!(
        dir.exists(),
        "{FMNIST} is missing: scripts/setup.sh installs Debian's dataset-fashion-mnist"
    );
    let d = DataSplits::idx_dir("fashion-mnist", dir).unwrap();
    let tr = d.train.subset(&(0..train).collect::<Vec<_>>(), "train").unwrap();
    let te = d.test.subset(&(0..test).collect::<Vec<_>>(), "test").unwrap();
    (tr.schema(), tr.to_records(), Records::from(&te))
}

/// The first 128 KiB of tinyshakespeare (public domain), as 65-byte
/// records; the last tenth is held out.
fn shakespeare() -> (Schema, Vec<u8>, Records) {
    let text = include_bytes!("data/tinyshakespeare-head.txt");
    let schema = Schema::Text { seq_len: 65 };
    let n = text.len() / 65;
    let cut = n - n / 10;
    let test = Records::new("shakespeare/test", schema.clone(), text[cut * 65..n * 65].to_vec()).unwrap();
    (schema, text[..cut * 65].to_vec(), test)
}

/// Honest training (no flipped labels) with these settings.
fn train_config(batch_size: usize, lr: f64, anomaly_class: Option<usize>) -> TrainConfig {
    TrainConfig {
        batch_size,
        lr,
        label_flip: false,
        anomaly_class,
    }
}

/// Trains `arch` for `steps` and returns its evaluation before and after.
fn fit(
    arch: Arch,
    data: (Schema, Vec<u8>, Records),
    steps: usize,
    lr: f64,
    anomaly: Option<usize>,
) -> (EvalReport, EvalReport) {
    tch::manual_seed(7);
    let (schema, train, test) = data;
    let mut net = Network::new(arch, &schema, Device::Cpu).unwrap();
    let genesis = net.genesis(1);
    net.load_flat(&genesis).unwrap();
    let before = evaluate(&net, &test, anomaly).unwrap();
    let source = InMemory::new(schema, train, 3).unwrap();
    let cfg = train_config(64, lr, anomaly);
    let mut t = Trainer::new(net, Box::new(source), cfg).unwrap();
    let stats = t.train_steps(steps).unwrap();
    assert!(stats.mean_loss.is_finite());
    let after = t.evaluate(&test).unwrap();
    eprintln!("{arch}: {:?} -> {:?}", before.summary, after.summary);
    assert!(after.summary.loss < before.summary.loss, "{arch}: loss did not fall");
    (before, after)
}

fn assert_classifier(arch: Arch, steps: usize, min_acc: f32) {
    let (_, after) = fit(arch, fashion(4000, 1000), steps, 1e-3, None);
    let s = after.summary;
    assert!(s.accuracy > min_acc, "{arch}: accuracy {} (chance 0.10)", s.accuracy);
    let confusion = after.confusion.expect("a classifier reports its confusion matrix");
    assert_eq!(confusion.total(), 1000);
    assert_eq!(after.per_class.len(), 10);
    assert!((confusion.accuracy() as f32 - s.accuracy).abs() < 1e-6);
    assert!(
        s.macro_f1.unwrap() > min_acc - 0.15,
        "{arch}: macro F1 {:?}",
        s.macro_f1
    );
}

#[test]
fn mlp_learns_fashion_mnist() {
    assert_classifier(Arch::Mlp, 150, 0.65);
}

#[test]
fn cnn_learns_fashion_mnist() {
    assert_classifier(Arch::Cnn, 120, 0.65);
}

#[test]
fn lstm_classifies_image_rows() {
    assert_classifier(Arch::Lstm, 200, 0.5);
}

#[test]
fn autoencoder_scores_an_unseen_class_as_anomalous() {
    // Class 8 (bags) never reaches the trainer. Untrained, the error ranks
    // bags below the rest (ROC-AUC about 0.33); training has to turn it round.
    let (before, after) = fit(Arch::Autoencoder, fashion(4000, 1000), 300, 1e-3, Some(8));
    let auc = after.summary.roc_auc.expect("the autoencoder reports ROC-AUC");
    let untrained = before.summary.roc_auc.unwrap_or(1.0);
    assert!(
        auc > 0.85 && auc > untrained + 0.2,
        "ROC-AUC {auc} (chance 0.5; untrained {untrained})"
    );
    let d = after.detection.expect("an operating point");
    assert!(d.anomalies > 50 && d.normals > 800, "{d:?}");
    assert!(d.false_positive_rate <= 0.06, "{d:?}");
    assert!(after.confusion.is_none());
}

fn assert_language_model(arch: Arch, steps: usize, lr: f64) {
    let (before, after) = fit(arch, shakespeare(), steps, lr, None);
    // Uniform over bytes is ln 256 = 5.55 nats; letter frequencies alone
    // give about 3.3.
    assert!(before.summary.loss > 5.0, "{:?}", before.summary);
    assert!(after.summary.loss < 3.0, "{arch}: {} nats/char", after.summary.loss);
    let ppl = after.summary.perplexity.unwrap();
    assert!((ppl - after.summary.loss.exp()).abs() < 1e-3);
    assert!(
        after.summary.accuracy > 0.2,
        "{arch}: next-byte accuracy {}",
        after.summary.accuracy
    );
}

#[test]
fn lstm_predicts_the_next_byte() {
    assert_language_model(Arch::Lstm, 250, 3e-3);
}

#[test]
fn char_transformer_learns_shakespeare() {
    assert_language_model(Arch::CharTransformer, 200, 1e-3);
}

#[test]
fn models_refuse_data_they_cannot_read() {
    let (schema, train, _) = shakespeare();
    let err = Network::new(Arch::Cnn, &schema, Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("cnn") && err.contains("image"), "{err}");
    let net = Network::new(Arch::Lstm, &schema, Device::Cpu).unwrap();
    let image = Schema::Image {
        channels: 1,
        height: 28,
        width: 28,
        classes: 10,
    };
    let source = InMemory::new(image, vec![0; 785], 1).unwrap();
    let cfg = train_config(4, 1e-3, None);
    assert!(Trainer::new(net, Box::new(source), cfg).is_err());
    assert!(Records::new("x", schema, train[..100].to_vec()).is_err());
}

/// Logit adjustment: on a shard of two classes, plain training drives the
/// other eight classes' logits down (the shard's prior goes into the
/// biases); with the shard's label prior added in training, they are left
/// near where they started, so the shared model is not pulled toward
/// this shard's classes.
#[test]
fn a_label_prior_keeps_a_skewed_shard_from_burying_absent_classes() {
    let d = DataSplits::idx_dir("fashion-mnist", Path::new(FMNIST)).unwrap();
    let picks: Vec<usize> = (0..d.train.len())
        .filter(|&i| d.train.labels()[i] < 2)
        .take(1000)
        .collect();
    let shard = d.train.subset(&picks, "two-classes").unwrap();
    let counts = shard.label_histogram();
    assert_eq!(counts.iter().skip(2).sum::<u64>(), 0);
    let probe = d.test.subset(&(0..200).collect::<Vec<_>>(), "probe").unwrap();
    let xs = tch::Tensor::from_slice(probe.pixels())
        .view([200, 1, 28, 28])
        .to_kind(tch::Kind::Float)
        / 255.0;
    // Mean raw logit of the absent classes minus that of the present ones.
    let gap = |prior: bool| -> f64 {
        tch::manual_seed(7);
        let mut net = Network::new(Arch::Mlp, &shard.schema(), Device::Cpu).unwrap();
        net.load_flat(&net.genesis(1)).unwrap();
        let source = InMemory::new(shard.schema(), shard.to_records(), 3).unwrap();
        let cfg = train_config(64, 1e-3, None);
        let mut t = Trainer::new(net, Box::new(source), cfg).unwrap();
        t.set_label_prior(prior.then_some(counts.as_slice()));
        t.train_steps(60).unwrap();
        let logits = t.network().forward(&xs, false).unwrap();
        let present = logits.narrow(1, 0, 2).mean(tch::Kind::Float).double_value(&[]);
        let absent = logits.narrow(1, 2, 8).mean(tch::Kind::Float).double_value(&[]);
        absent - present
    };
    let (plain, adjusted) = (gap(false), gap(true));
    eprintln!("absent minus present logits: plain {plain:.3}, with the prior {adjusted:.3}");
    assert!(
        adjusted > plain + 2.0,
        "plain {plain:.3}, adjusted {adjusted:.3}: the prior did not spare the absent classes"
    );
}
