//! A server dropped without a shutdown lets its drainer threads go (and with
//! them the batch ring), also while a client is still sending into a full ring.
//! A test binary of its own: it counts this process's drainer threads.

use std::time::{Duration, Instant};

use echo_core::{ClientOptions, Registry, Server, Spec};

/// Threads of this process named like ingress drainers (`echo-drainer-N`).
fn drainer_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("echo-drainer"))
        .count()
}

/// Waits up to 10 s for the drainer thread count to be `want`.
fn wait_for_drainers(want: usize, what: &str) {
    let started = Instant::now();
    while drainer_threads() != want {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{what}: {} drainer threads, expected {want}",
            drainer_threads()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_server_dropped_without_shutdown_lets_its_drainers_go() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let base = drainer_threads();

    // Idle.
    let server = Server::builder(Spec::bytes(8).unwrap())
        .batch_size(4)
        .drainers(3)
        .build()
        .unwrap();
    wait_for_drainers(base + 3, "a new server");
    drop(server);
    wait_for_drainers(base, "an idle server dropped");

    // A client still sending, the ring (2 batches of 4) full, drainers blocked
    // writing into it and more queued behind them.
    let server = Server::builder(Spec::bytes(8).unwrap())
        .batch_size(4)
        .num_buffers(2)
        .queue_size(2)
        .drainers(2)
        .registry(Registry::with_core())
        .build()
        .unwrap();
    let url = rt.block_on(server.listen("mem://dropped")).unwrap();
    let sender = rt.spawn(async move {
        let mut c = Registry::with_core()
            .connect(&url, &Spec::bytes(8).unwrap(), &ClientOptions::default())
            .await
            .unwrap();
        let mut n = 0u64;
        while c.send(&[7; 8]).await.is_ok() {
            n += 1;
        }
        n
    });
    let started = Instant::now();
    while server.metrics().push_blocked_count == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the ring never filled: {:?}",
            server.metrics()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    wait_for_drainers(base + 2, "a loaded server");
    drop(server);
    wait_for_drainers(base, "a server dropped with a full ring");
    sender.abort();
}
