//! A mesh on text: `data import --format text`, then two nodes train the
//! character transformer together with early stopping. Both must report
//! the language model's figures (nats per character, perplexity), stop at
//! the same round without any message about it (they evaluate the same
//! anchor on the same held-out split), and audit clean.

use std::time::Duration;

use meshtrain_tests::{founders_file, import, results, spawn_node, spec_for, wait_all_clean, wait_listen};

#[test]
fn two_nodes_train_the_char_transformer_and_stop_together() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let text = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../model/tests/data/tinyshakespeare-head.txt"
    );
    let store = import(
        tmp.path(),
        &["--format", "text", "--seq-len", "65", "--block-size", "16965", text],
    );
    // A learning rate this high overfits 2,000 records within a few
    // rounds, so early stopping fires well before round 40.
    let founders = founders_file(tmp.path(), &[tmp.path().join("n0"), tmp.path().join("n1")]);
    let spec = spec_for(
        tmp.path(),
        &store,
        &[
            "--founders",
            founders.to_str().expect("utf-8 path"),
            "--model",
            "char-transformer",
            "--rounds",
            "40",
            "--local-steps",
            "5",
            "--batch-size",
            "32",
            "--lr",
            "1e-2",
            "--patience",
            "2",
        ],
    );

    let store = store.to_str().expect("utf-8 path");
    let common = [
        "--wait-peers",
        "1",
        "--drain-s",
        "2",
        "--checkpoint-every",
        "0",
        "--device",
        "cpu",
    ];
    let mut first = spawn_node(
        &tmp.path().join("n0"),
        &spec,
        "0/2",
        None,
        &[&common[..], &["--data", store]].concat(),
    );
    let info = wait_listen(&mut first, Duration::from_secs(60));
    let boot = format!("{}/p2p/{}", info.addr, info.peer_id);
    let second = spawn_node(&tmp.path().join("n1"), &spec, "1/2", Some(&boot), &common);
    let mut nodes = vec![first, second];
    wait_all_clean(&mut nodes, Duration::from_secs(600));

    let reports: Vec<_> = nodes.iter().map(|n| results(&n.dir)).collect();
    for r in &reports {
        let ppl = r.final_task.perplexity.expect("a language model reports perplexity");
        assert!(r.final_test_loss < 4.0, "{} nats/char", r.final_test_loss);
        assert!((ppl - r.final_test_loss.exp()).abs() < 1e-2 * ppl);
        assert!(r.final_task.roc_auc.is_none() && r.final_task.macro_f1.is_none());
        assert!(r.stopped_early_at.is_some(), "early stopping never fired in 40 rounds");
        assert!(r.best_round.is_some());
    }
    assert_eq!(
        reports[0].stopped_early_at, reports[1].stopped_early_at,
        "the nodes stopped at different rounds"
    );
    let stop = reports[0].stopped_early_at.unwrap_or(0);
    assert!(stop < 40);
    assert_eq!(reports[0].rounds_completed, stop);
}
