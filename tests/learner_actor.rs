//! The learner/actor pair of the examples: `python/actor.py` (id-echo's Python
//! `TcpClient`) sends rollout steps of `examples/rl_spec.json` to an echo server
//! serving TCP, as `examples/learner.rs` does; every step arrives once, in
//! per-actor order, with the values the script documents.
//!
//! Needs the project's Python venv (`scripts/setup-python.sh`).
#![cfg(feature = "tcp")]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use echo::{Batch, Server, Spec};
use echo_core::testkit::{python_interpreter, workspace_root};

fn rl_spec_path() -> PathBuf {
    workspace_root().join("examples").join("rl_spec.json")
}

fn learner(spec: &Spec, batch: usize) -> Server {
    Server::builder(spec.clone())
        .batch_size(batch)
        .registry(echo::registry())
        .build()
        .unwrap()
}

/// Runs `python/actor.py` with `args`, killing it after `secs`.
fn run_actor(args: &[String], secs: u64) -> Output {
    let script = workspace_root().join("python").join("actor.py");
    let mut child = Command::new(python_interpreter())
        .arg(&script)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", script.display()));
    let deadline = Instant::now() + Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "actor.py {args:?} did not exit within {secs} s; stdout: {}; stderr: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn port_of(url: &str) -> String {
    url.trim_end_matches('/')
        .rsplit(':')
        .next()
        .unwrap()
        .to_string()
}

fn scalar<T: echo::Element>(batch: &Batch, name: &str) -> Vec<T> {
    batch
        .leaf_by_name(name)
        .unwrap_or_else(|| panic!("no leaf {name}"))
        .as_slice::<T>()
        .unwrap()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_actors_feed_the_learner_every_step_once_in_order() {
    let spec = Spec::from_json(&std::fs::read_to_string(rl_spec_path()).unwrap()).unwrap();
    let (actors, steps, batch_size) = (3usize, 48usize, 16usize);
    let server = learner(&spec, batch_size);
    let url = server.listen("tcp://127.0.0.1:0").await.unwrap();

    let args: Vec<String> = [
        "--port",
        &port_of(&url),
        "--actors",
        &actors.to_string(),
        "--steps",
        &steps.to_string(),
        "--max-inflight",
        "8",
        "--timeout",
        "60",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let actor = tokio::task::spawn_blocking(move || run_actor(&args, 90));

    let mut next_step: HashMap<i32, i32> = HashMap::new();
    let mut episodes_ended = 0;
    for _ in 0..actors * steps / batch_size {
        let batch = tokio::time::timeout(Duration::from_secs(90), server.next_batch())
            .await
            .expect("a batch within 90 s")
            .expect("the server is running");
        assert_eq!(batch.len(), batch_size);
        assert_eq!(
            batch.leaf_by_name("obs").unwrap().shape(),
            [batch_size, 4, 84, 84]
        );
        let ids = scalar::<i32>(&batch, "actor");
        let step = scalar::<i32>(&batch, "step");
        let action = scalar::<i32>(&batch, "action");
        let reward = scalar::<f32>(&batch, "reward");
        let logits = batch.leaf_by_name("policy.logits").unwrap().shape();
        let done = batch.leaf_by_name("done").unwrap().bytes();
        let obs = batch.leaf_by_name("obs").unwrap().bytes();
        let value = scalar::<f32>(&batch, "policy.value");
        for k in 0..batch_size {
            let (a, s) = (ids[k], step[k]);
            let want = next_step.entry(a).or_insert(0);
            assert_eq!(s, *want, "actor {a}: step {s} arrived, expected {want}");
            *want += 1;
            assert_eq!(action[k], s % logits[1] as i32, "action of ({a}, {s})");
            assert_eq!(
                reward[k],
                (f64::from(s) / 100.0) as f32,
                "reward of ({a}, {s})"
            );
            assert_eq!(done[k] != 0, s % 100 == 99, "done of ({a}, {s})");
            episodes_ended += usize::from(done[k] != 0);
            let fill = (a + s) % 100;
            let frame = &obs[k * 4 * 84 * 84..(k + 1) * 4 * 84 * 84];
            assert!(
                frame.iter().all(|&b| i32::from(b) == fill),
                "obs of ({a}, {s})"
            );
            assert_eq!(value[k], fill as f32, "policy.value of ({a}, {s})");
        }
    }
    let out = actor.await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "actor.py failed ({}): {stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("total: {} steps", actors * steps)),
        "{stdout}"
    );
    assert_eq!(next_step.len(), actors);
    assert!(
        next_step.values().all(|&n| n == steps as i32),
        "{next_step:?}"
    );
    assert_eq!(episodes_ended, 0, "48 steps end no 100-step episode");

    server.shutdown().await.unwrap();
    assert!(server.next_batch().await.is_none(), "nothing extra arrived");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_actor_with_another_spec_is_refused_and_says_why() {
    let spec = Spec::from_json(&std::fs::read_to_string(rl_spec_path()).unwrap()).unwrap();
    let server = learner(&spec, 4);
    let url = server.listen("tcp://127.0.0.1:0").await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let other: PathBuf = dir.path().join("other.json");
    let text = std::fs::read_to_string(rl_spec_path())
        .unwrap()
        .replace("[4, 84, 84]", "[4, 64, 64]");
    std::fs::write(&other, &text).unwrap();
    assert_ne!(Spec::from_json(&text).unwrap().wire(), spec.wire());

    let args: Vec<String> = vec![
        "--port".into(),
        port_of(&url),
        "--actors".into(),
        "1".into(),
        "--spec".into(),
        path_str(&other),
    ];
    let out = tokio::task::spawn_blocking(move || run_actor(&args, 60))
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("Server spec mismatch") && stderr.contains("[4, 84, 84]"),
        "{stderr}"
    );
    assert_eq!(server.metrics().samples_inserted_total, 0);
    server.shutdown().await.unwrap();
}

fn path_str(p: &Path) -> String {
    p.to_str().expect("a UTF-8 temp path").to_string()
}
