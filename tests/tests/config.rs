//! `data inspect --plot` on an imported store; `spec new` refusals (no
//! roster or founders; a Dirichlet partition of blocks that mix classes);
//! then `node run --config
//! FILE`: the file from `meshtrain config default` works
//! once its required keys are filled in; MESHTRAIN_<KEY> variables override
//! the file and flags override both; an unknown key is an error naming it.

use std::process::Command;

use meshtrain_tests::{founders_file, import_fashion_mnist, meshtrain_bin, spec_for, spec_refused};

#[test]
fn config_file_environment_and_flags_in_that_order() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = import_fashion_mnist(tmp.path());
    // The operator's look at the data first: every block verified, a plot.
    let plot = tmp.path().join("inspect.png");
    let out = Command::new(meshtrain_bin())
        .args(["data", "inspect"])
        .arg(&store)
        .arg("--plot")
        .arg(&plot)
        .output()
        .expect("data inspect");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        std::fs::metadata(&plot).map(|m| m.len() > 1000).unwrap_or(false),
        "no plot written"
    );
    // Who takes part must be said: a bare spec is refused, naming how.
    let err = spec_refused(&store, &["--rounds", "3"]);
    assert!(
        err.contains("--founders FILE") && err.contains("identity show"),
        "{err}"
    );
    let err = spec_refused(&store, &["--admission", "open"]);
    assert!(err.contains("--founders FILE is missing"), "{err}");
    // Label skew over blocks that mix classes would be IID in disguise.
    let err = spec_refused(&store, &["--partition", "dirichlet:0.5"]);
    assert!(err.contains("--sort-by-label"), "{err}");
    let founders = founders_file(tmp.path(), &[tmp.path().join("node")]);
    let spec = spec_for(
        tmp.path(),
        &store,
        &[
            "--rounds",
            "3",
            "--local-steps",
            "5",
            "--nodes",
            "1",
            "--founders",
            founders.to_str().expect("utf-8 path"),
        ],
    );

    let defaults = Command::new(meshtrain_bin())
        .args(["config", "default"])
        .output()
        .expect("config default");
    assert!(defaults.status.success());
    let node_dir = tmp.path().join("node");
    let text = String::from_utf8(defaults.stdout)
        .expect("utf-8")
        .replace(
            "# data_dir =",
            &format!("data_dir = {:?}", node_dir.display().to_string()),
        )
        .replace("# run =", &format!("run = {:?}", spec.display().to_string()))
        .replace("# data =", &format!("data = {:?}", store.display().to_string()))
        .replace(
            "listen = [\"/ip4/0.0.0.0/tcp/0\"]",
            "listen = [\"/ip4/127.0.0.1/tcp/0\"]",
        )
        .replace("drain_s = 30", "drain_s = 0")
        .replace("checkpoint_every = 5", "checkpoint_every = 0")
        // Only the flag below makes this run possible.
        .replace("shard = \"0/1\"", "shard = \"7/1\"");
    let config = tmp.path().join("node.toml");
    std::fs::write(&config, &text).expect("write config");

    let out = Command::new(meshtrain_bin())
        .args(["node", "run", "--config"])
        .arg(&config)
        .args(["--shard", "0/1"])
        .env("MESHTRAIN_CHECKPOINT_EVERY", "1")
        .output()
        .expect("node run --config");
    assert!(
        out.status.success(),
        "node run --config failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(node_dir.join("results.json").exists(), "the file's data_dir was used");
    assert!(
        node_dir.join("checkpoint.safetensors").exists(),
        "the environment overrode checkpoint_every = 0"
    );

    std::fs::write(&config, format!("{text}\nbogus_key = 1\n")).expect("write config");
    let out = Command::new(meshtrain_bin())
        .args(["node", "run", "--config"])
        .arg(&config)
        .output()
        .expect("node run --config");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("unknown key `bogus_key`"), "{err}");
}
