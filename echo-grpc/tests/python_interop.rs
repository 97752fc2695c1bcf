//! Interop with another language: Python's grpcio, with stubs generated from
//! proto/echo.proto by grpcio-tools, talks to our server.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use echo_core::testkit::{python_interpreter, workspace_root};
use echo_core::{Server, Spec};
use serde_json::Value;

/// Runs a command to completion within `limit`, killing it past that; returns stdout.
async fn run(cmd: &mut Command, limit: Duration) -> String {
    let out_file = tempfile::NamedTempFile::new().unwrap();
    let err_file = tempfile::NamedTempFile::new().unwrap();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out_file.reopen().unwrap())
        .stderr(err_file.reopen().unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} took over {limit:?}; stderr:\n{}",
                std::fs::read_to_string(err_file.path()).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let stdout = std::fs::read_to_string(out_file.path()).unwrap();
    let stderr = std::fs::read_to_string(err_file.path()).unwrap();
    assert!(
        status.success(),
        "{cmd:?} failed ({status}):\n{stdout}\n{stderr}"
    );
    stdout
}

/// Generates the Python stubs for proto/echo.proto into `dir`.
async fn generate_stubs(py: &Path, dir: &Path) {
    let proto_dir = workspace_root().join("proto");
    run(
        Command::new(py)
            .args(["-m", "grpc_tools.protoc", "-I"])
            .arg(&proto_dir)
            .arg(format!("--python_out={}", dir.display()))
            .arg(format!("--grpc_python_out={}", dir.display()))
            .arg(proto_dir.join("echo.proto")),
        Duration::from_secs(60),
    )
    .await;
    assert!(dir.join("echo_pb2.py").exists() && dir.join("echo_pb2_grpc.py").exists());
}

struct Py {
    exe: PathBuf,
    stubs: PathBuf,
    script: PathBuf,
}

impl Py {
    async fn call(&self, target: &str, conn: &[String], args: &[&str]) -> Value {
        let mut cmd = Command::new(&self.exe);
        cmd.arg(&self.script)
            .arg("--stubs")
            .arg(&self.stubs)
            .arg("--target")
            .arg(target)
            .args(conn)
            .args(args);
        let out = run(&mut cmd, Duration::from_secs(60)).await;
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("bad JSON {out:?}: {e}"))
    }
}

fn target(url: &str) -> String {
    url.split("://").nth(1).unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_interops_with_our_server() {
    common::bounded(180, async {
        let exe = python_interpreter();
        let tmp = tempfile::tempdir().unwrap();
        let stubs = tmp.path().join("stubs");
        std::fs::create_dir_all(&stubs).unwrap();
        generate_stubs(&exe, &stubs).await;
        let py = Py {
            exe,
            stubs,
            script: workspace_root().join("python").join("grpc_client.py"),
        };

        let spec = Spec::from_json(
            r#"{"obs": {"shape": [3, 4], "dtype": "float32"},
                "act": {"shape": [], "dtype": "int64"},
                "done": {"shape": [], "dtype": "bool"},
                "info": {"rgb": {"shape": [2, 2, 3], "dtype": "uint8"}, "q": {"shape": [2], "dtype": "float16"}}}"#,
        )
        .unwrap();
        let server = Server::builder(spec.clone())
            .batch_size(8)
            .registry(echo_grpc::registry())
            .build()
            .unwrap();
        let consumer = {
            let server = server.clone();
            tokio::spawn(async move {
                let mut bytes = Vec::new();
                let mut buf = Vec::new();
                while let Some(batch) = server.next_batch().await {
                    for k in 0..batch.len() {
                        batch.copy_sample(k, &mut buf);
                        bytes.extend_from_slice(&buf);
                    }
                }
                bytes
            })
        };
        let certs = common::certs(&["localhost"]);
        let secure = server
            .listen(&format!(
                "grpcs://127.0.0.1:0?cert={}&key={}&token=py-secret",
                certs.cert.display(),
                certs.key.display()
            ))
            .await
            .unwrap();
        let plain = server.listen("grpc://127.0.0.1:0").await.unwrap();
        let tls_args = |token: Option<&str>| {
            let mut v = vec![
                "--ca".to_string(),
                certs.cert.display().to_string(),
                "--domain".into(),
                "localhost".into(),
            ];
            if let Some(t) = token {
                v.extend(["--token".into(), t.into()]);
            }
            v
        };

        // Push over TLS with the token: 50 samples, 3 per message.
        let pushed = tmp.path().join("pushed.bin");
        let r = py
            .call(
                &target(&secure),
                &tls_args(Some("py-secret")),
                &["push", "--count", "50", "--per-message", "3", "--out", pushed.to_str().unwrap()],
            )
            .await;
        assert_eq!(r["sent"], 50, "{r}");
        assert_eq!(r["acked"], 50, "{r}");
        assert_eq!(r["payload_size"], spec.payload_size() as u64, "{r}");
        let names: Vec<&str> = r["leaves"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l[0].as_str().unwrap())
            .collect();
        assert_eq!(names, ["act", "done", "info.q", "info.rgb", "obs"]);

        // A wrong-size payload over plaintext: INVALID_ARGUMENT naming both sizes,
        // after the message before it was acknowledged.
        let good = tmp.path().join("good.bin");
        let r = py
            .call(&target(&plain), &[], &["bad-size", "--out", good.to_str().unwrap()])
            .await;
        let ps = spec.payload_size();
        assert_eq!(r["code"], "INVALID_ARGUMENT", "{r}");
        assert_eq!(r["acked"], 2, "{r}");
        let details = r["details"].as_str().unwrap();
        assert!(
            details.contains(&format!("{ps} bytes")) && details.contains(&format!("got {} bytes", ps + 1)),
            "{details}"
        );

        // Without the token, or with a wrong one: UNAUTHENTICATED, nothing stored.
        let before = server.metrics().transports["grpcs"].samples;
        for token in [None, Some("not-it")] {
            let r = py.call(&target(&secure), &tls_args(token), &["denied"]).await;
            assert_eq!(r["get_spec"], "UNAUTHENTICATED", "{token:?}: {r}");
            assert_eq!(r["push"], "UNAUTHENTICATED", "{token:?}: {r}");
        }
        assert_eq!(server.metrics().transports["grpcs"].samples, before);

        server.shutdown().await.unwrap();
        let got = consumer.await.unwrap();
        let mut want = std::fs::read(&pushed).unwrap();
        want.extend(std::fs::read(&good).unwrap());
        assert_eq!(got.len(), want.len(), "52 samples of {ps} bytes");
        assert!(got == want, "the batches differ from what Python sent");
    })
    .await
}
