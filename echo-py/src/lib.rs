//! Python bindings for echo's learner side (module `echo_rs._native`; the
//! Python package `echo_rs` in `python/` wraps it with pytree handling).
//!
//! A `Server` owns an echo server and the Tokio runtime its transports run
//! on, listening on any URL the facade's registry knows (`tcp://`, `unix://`,
//! `grpc://`, `grpcs://`, `quic://`). `Server.sample` waits for a whole batch
//! without holding the GIL and returns it as a `Batch`, whose leaves are
//! `LeafBuffer`s: read-only Python buffers pointing straight into the batch
//! ring. numpy arrays made from them (`np.frombuffer`) keep the leaf, and with
//! it the batch, alive; the ring slots go back to the writers once every array
//! of the batch is gone. Nothing is copied after ingress. A `Client` connects
//! to any such URL for actors written in Python.
//!
//! Built and tested by `scripts/test-python-binding.sh` (maturin into the
//! project's venv, then the Python tests in `tests/`).

use std::ffi::c_int;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use echo::{DType, Leaf, Spec};
use pyo3::create_exception;
use pyo3::exceptions::{PyConnectionError, PyRuntimeError, PyTimeoutError, PyValueError};
use pyo3::prelude::*;
use pyo3::{ffi, IntoPyObjectExt};

/// How long a wait for a batch runs without the GIL before it checks for
/// signals (Ctrl-C) and its own timeout.
const POLL: Duration = Duration::from_millis(50);

create_exception!(
    _native,
    ConnectionClosedError,
    PyConnectionError,
    "Sending after close, or after the server went away (id-echo's name for it)."
);

/// An echo error as a Python exception, with echo's message (what was
/// expected, what came): bad configuration or input, and a server whose spec
/// differs, as `ValueError` (as id-echo's client raises them), a closed
/// connection as `ConnectionClosedError`, a timeout as `TimeoutError`, other
/// I/O and TLS refusals as `ConnectionError`, the rest as `RuntimeError`.
fn py_err(e: echo::Error) -> PyErr {
    let msg = e.to_string();
    match e {
        echo::Error::Spec(_)
        | echo::Error::SpecMismatch(_)
        | echo::Error::Wire(_)
        | echo::Error::Url { .. }
        | echo::Error::UnknownScheme { .. }
        | echo::Error::PayloadSize { .. }
        | echo::Error::Config(_) => PyValueError::new_err(msg),
        echo::Error::ConnectionClosed(_) => ConnectionClosedError::new_err(msg),
        echo::Error::Timeout(_) => PyTimeoutError::new_err(msg),
        echo::Error::Io(_) | echo::Error::Tls(_) => PyConnectionError::new_err(msg),
        _ => PyRuntimeError::new_err(msg),
    }
}

/// `(name, shape, dtype)` triples as a spec, with the dtype named on error.
fn spec_of(leaves: Vec<(String, Vec<u32>, String)>) -> PyResult<Spec> {
    let leaves = leaves
        .into_iter()
        .map(|(name, shape, dtype)| {
            let dt = dtype.parse::<DType>().map_err(|_| {
                PyValueError::new_err(format!(
                    "leaf {name:?}: dtype {dtype:?} is not supported; expected one of {}",
                    DType::NAMES.join(", ")
                ))
            })?;
            Ok(Leaf::new(name, shape, dt))
        })
        .collect::<PyResult<Vec<_>>>()?;
    Spec::new(leaves).map_err(|e| PyValueError::new_err(e.to_string()))
}

/// `seconds` from now, or `None` for no limit (also when it is too far off
/// to represent); an error naming `what` for a negative or NaN value.
fn deadline(what: &str, seconds: Option<f64>) -> PyResult<Option<Instant>> {
    match seconds {
        None => Ok(None),
        Some(t) if t >= 0.0 => Ok(Duration::try_from_secs_f64(t)
            .ok()
            .and_then(|d| Instant::now().checked_add(d))),
        Some(t) => Err(PyValueError::new_err(format!(
            "{what} must be a number of seconds >= 0, got {t}"
        ))),
    }
}

/// A runtime for the transports, its threads named `name`.
fn runtime(threads: usize, name: &str) -> PyResult<tokio::runtime::Runtime> {
    if threads == 0 {
        return Err(PyValueError::new_err("threads must be at least 1, got 0"));
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name(name)
        .enable_all()
        .build()
        .map_err(|e| PyRuntimeError::new_err(format!("starting the runtime: {e}")))
}

/// An echo server receiving samples on its listeners and handing out whole
/// batches.
#[pyclass(module = "echo_rs._native", frozen)]
struct Server {
    server: echo::Server,
    /// Runs the transports; dropped (and its threads stopped) with the server.
    runtime: tokio::runtime::Runtime,
    urls: Vec<String>,
    /// The graceful shutdown `close` started, until `sample` sees its end.
    closing: Mutex<Option<tokio::task::JoinHandle<echo::Result<()>>>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        // Dropped without being drained (no `close`, or `close` and not
        // sampled to the end): nobody will consume, so stop at once. Otherwise
        // the runtime's drop would wait for a shutdown that waits for ring
        // space, with the GIL held.
        self.server.abort();
    }
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("urls", &self.urls).finish()
    }
}

#[pymethods]
impl Server {
    /// `leaves`: `(name, shape, dtype)` per leaf, in the order clients send
    /// them (optree's flatten order for id-echo's `TcpClient`); `listen`: URLs
    /// to bind (port 0 picks a free port; `urls` tells which).
    #[new]
    // One argument per Python keyword argument.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (leaves, batch_size, listen, num_buffers=3, queue_size=8, threads=2, max_connections=None))]
    fn new(
        py: Python<'_>,
        leaves: Vec<(String, Vec<u32>, String)>,
        batch_size: usize,
        listen: Vec<String>,
        num_buffers: usize,
        queue_size: usize,
        threads: usize,
        max_connections: Option<usize>,
    ) -> PyResult<Self> {
        let spec = spec_of(leaves)?;
        let runtime = runtime(threads, "echo-rs-server")?;
        let mut builder = echo::Server::builder(spec)
            .batch_size(batch_size)
            .num_buffers(num_buffers)
            .queue_size(queue_size)
            .registry(echo::registry());
        if let Some(n) = max_connections {
            builder = builder.max_connections(n);
        }
        let server = builder.build().map_err(py_err)?;
        let urls = py.detach(|| {
            runtime.block_on(async {
                let mut urls = Vec::with_capacity(listen.len());
                for url in &listen {
                    urls.push(server.listen(url).await?);
                }
                Ok::<_, echo::Error>(urls)
            })
        });
        let urls = match urls {
            Ok(urls) => urls,
            Err(e) => {
                // Unbind whatever did bind before the failing URL.
                let _ = py.detach(|| runtime.block_on(server.shutdown()));
                return Err(py_err(e));
            }
        };
        Ok(Server {
            server,
            runtime,
            urls,
            closing: Mutex::new(None),
        })
    }

    /// The bound URLs, in the order given (port 0 replaced by the real port).
    #[getter]
    fn urls(&self) -> Vec<String> {
        self.urls.clone()
    }

    /// Samples per batch.
    #[getter]
    fn batch_size(&self) -> usize {
        self.server.batch_size()
    }

    /// Waits for the next whole batch (after `close`, the rest, the last one
    /// maybe shorter, then `None`). Releases the GIL while waiting; Ctrl-C
    /// interrupts it; `timeout` (seconds) raises `TimeoutError`.
    #[pyo3(signature = (timeout=None))]
    fn sample(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<Batch>> {
        let deadline = deadline("timeout", timeout)?;
        loop {
            let wait = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()).min(POLL),
                None => POLL,
            };
            let got = py.detach(|| {
                // The timer is made inside the runtime (it needs its clock).
                self.runtime
                    .block_on(async { tokio::time::timeout(wait, self.server.next_batch()).await })
            });
            match got {
                Ok(Some(batch)) => return Ok(Some(Batch { batch })),
                Ok(None) => {
                    // The store is closed: the shutdown is at its last step.
                    let closing = self
                        .closing
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .take();
                    if let Some(task) = closing {
                        py.detach(|| self.runtime.block_on(task))
                            .map_err(|e| PyRuntimeError::new_err(format!("shutdown: {e}")))?
                            .map_err(py_err)?;
                    }
                    return Ok(None);
                }
                Err(_) => {
                    py.check_signals()?;
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Err(PyTimeoutError::new_err(format!(
                            "no batch within {} s",
                            timeout.unwrap_or_default()
                        )));
                    }
                }
            }
        }
    }

    /// Feeds whole payloads in-process (one or more, back to back), as if a
    /// client had sent them; waits for ring space. Other lengths are refused
    /// (`ValueError`, by the store).
    fn submit(&self, py: Python<'_>, payloads: &[u8]) -> PyResult<()> {
        py.detach(|| self.runtime.block_on(self.server.submit(payloads)))
            .map_err(py_err)
    }

    /// A snapshot of the server's metrics, as JSON text (the package parses it).
    fn metrics_json(&self) -> PyResult<String> {
        serde_json::to_string(&self.server.metrics())
            .map_err(|e| PyRuntimeError::new_err(e.to_string()))
    }

    /// Starts a graceful shutdown and returns: listeners stop accepting,
    /// connections close, and what they had queued goes into the ring, which
    /// `sample` hands out (the last batch maybe shorter) before it returns
    /// `None`. Keep sampling until then: a full ring waits for the learner.
    /// Safe to call twice.
    fn close(&self) {
        let mut closing = self.closing.lock().unwrap_or_else(|p| p.into_inner());
        if closing.is_none() && !self.server.is_shutting_down() {
            let server = self.server.clone();
            *closing = Some(self.runtime.spawn(async move { server.shutdown().await }));
        }
    }
}

/// A batch taken from the ring; its slots are the learner's until this object
/// and every buffer and array made from it are gone.
#[pyclass(module = "echo_rs._native", frozen)]
struct Batch {
    batch: echo::Batch,
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.batch.fmt(f)
    }
}

#[pymethods]
impl Batch {
    /// Samples in the batch (the batch size, or fewer for the last one after
    /// `close`).
    fn __len__(&self) -> usize {
        self.batch.len()
    }

    /// The batch's sequence number (0, 1, 2, ...).
    #[getter]
    fn seq(&self) -> u64 {
        self.batch.seq()
    }

    /// One read-only buffer per leaf, in spec order: `len(self) x` the leaf's
    /// bytes, contiguous.
    fn leaves(slf: Bound<'_, Self>) -> PyResult<Vec<Py<PyAny>>> {
        let n = slf.get().batch.spec().leaves().len();
        (0..n)
            .map(|index| {
                LeafBuffer {
                    batch: slf.clone().unbind(),
                    index,
                }
                .into_py_any(slf.py())
            })
            .collect()
    }
}

/// One leaf of a [`Batch`] as a read-only Python buffer into the ring.
#[pyclass(module = "echo_rs._native", frozen)]
struct LeafBuffer {
    batch: Py<Batch>,
    index: usize,
}

impl std::fmt::Debug for LeafBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeafBuffer")
            .field("index", &self.index)
            .finish()
    }
}

#[pymethods]
impl LeafBuffer {
    /// # Safety
    ///
    /// Called by Python with a valid `view` to fill.
    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let bytes = slf.get().batch.get().batch.leaf(slf.get().index).bytes();
        // A spec's payload is at most isize::MAX / 4 bytes (Spec::new), and
        // a leaf is one payload's part times the batch's samples in a ring
        // that was allocated: the length fits.
        let len = bytes.len() as isize;
        // SAFETY: `view` is Python's to fill (PyBuffer_FillInfo refuses a null
        // one, and a writable request since we pass readonly = 1, each with
        // BufferError and `view->obj` left NULL); the bytes stay valid and
        // unchanged while `slf` lives (it holds the batch, whose slots no
        // writer touches until the batch is dropped), and PyBuffer_FillInfo
        // stores a new reference to `slf` in the view, so they outlive it.
        let rc = unsafe {
            ffi::PyBuffer_FillInfo(
                view,
                slf.as_ptr(),
                bytes.as_ptr() as *mut std::ffi::c_void,
                len,
                1,
                flags,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(PyErr::fetch(slf.py()))
        }
    }

    /// Bytes in this leaf's buffer.
    fn __len__(&self) -> usize {
        self.batch.get().batch.leaf(self.index).bytes().len()
    }
}

/// A client of any transport in the registry, for actors in Python: sends
/// whole payloads with at most `max_inflight` unacknowledged.
#[pyclass(module = "echo_rs._native", frozen)]
struct Client {
    client: Mutex<Box<dyn echo::Client>>,
    runtime: tokio::runtime::Runtime,
    payload_size: usize,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").finish_non_exhaustive()
    }
}

impl Client {
    /// Runs `f` on the client without the GIL (one call at a time).
    fn run<T>(
        &self,
        py: Python<'_>,
        f: impl for<'c> FnOnce(&'c mut Box<dyn echo::Client>) -> BoxFuture<'c, echo::Result<T>> + Send,
    ) -> PyResult<T>
    where
        T: Send,
    {
        py.detach(|| {
            let mut client = self.client.lock().unwrap_or_else(|p| p.into_inner());
            self.runtime.block_on(f(&mut client))
        })
        .map_err(py_err)
    }
}

/// A boxed future borrowing the client.
type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

#[pymethods]
impl Client {
    /// Connects to `url` (any scheme the registry knows), checking that the
    /// server's spec is `leaves` (`(name, shape, dtype)` in wire order).
    #[new]
    #[pyo3(signature = (url, leaves, max_inflight=32, connect_timeout=10.0, threads=1))]
    fn new(
        py: Python<'_>,
        url: &str,
        leaves: Vec<(String, Vec<u32>, String)>,
        max_inflight: usize,
        connect_timeout: f64,
        threads: usize,
    ) -> PyResult<Self> {
        let spec = spec_of(leaves)?;
        let payload_size = spec.payload_size();
        if !(connect_timeout.is_finite() && connect_timeout > 0.0) {
            return Err(PyValueError::new_err(format!(
                "connect_timeout must be a number of seconds > 0, got {connect_timeout}"
            )));
        }
        let connect_timeout = Duration::try_from_secs_f64(connect_timeout).map_err(|_| {
            PyValueError::new_err(format!(
                "connect_timeout of {connect_timeout} s is too long"
            ))
        })?;
        let options = echo::ClientOptions {
            max_inflight,
            connect_timeout,
            ..echo::ClientOptions::default()
        };
        let runtime = runtime(threads, "echo-rs-client")?;
        let client = py
            .detach(|| runtime.block_on(echo::registry().connect(url, &spec, &options)))
            .map_err(py_err)?;
        Ok(Client {
            client: Mutex::new(client),
            runtime,
            payload_size,
        })
    }

    /// Bytes per payload.
    #[getter]
    fn payload_size(&self) -> usize {
        self.payload_size
    }

    /// Sends one payload (every leaf's bytes, in wire order), waiting while
    /// `max_inflight` are unacknowledged.
    fn send(&self, py: Python<'_>, payload: Vec<u8>) -> PyResult<()> {
        let payload = bytes::Bytes::from(payload);
        self.run(py, move |c| Box::pin(c.send_bytes(payload)))
    }

    /// Waits until every payload sent is acknowledged.
    fn wait(&self, py: Python<'_>) -> PyResult<()> {
        self.run(py, |c| Box::pin(c.wait()))
    }

    /// Flushes and closes the connection. Safe to call twice.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        self.run(py, |c| Box::pin(c.close()))
    }

    /// `(sent, acknowledged)` payloads so far (after a `send` in progress on
    /// another thread returns; waits without the GIL).
    fn counts(&self, py: Python<'_>) -> (u64, u64) {
        let stats = py.detach(|| {
            self.client
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .stats()
        });
        (stats.sent, stats.acked)
    }
}

/// The native half of the `echo_rs` package.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Server>()?;
    m.add_class::<Client>()?;
    // For benchmarks, which want a release build (`maturin develop --release`).
    m.add("DEBUG_BUILD", cfg!(debug_assertions))?;
    m.add(
        "ConnectionClosedError",
        m.py().get_type::<ConnectionClosedError>(),
    )?;
    m.add_class::<Batch>()?;
    m.add_class::<LeafBuffer>()?;
    Ok(())
}
