//! The worker threads of the data path. Each worker is a thread running a single-threaded
//! tokio runtime that owns the connections it accepts from accept to close: a connection's
//! task, its timers and both its sockets stay on that thread, so its bytes never move to
//! another core's cache and no work-stealing scheduler runs beside it. Every listening
//! socket is shared by all workers (one duplicate of it registered with each worker's
//! reactor), so whichever worker is free takes the next client.
//!
//! Discovery, the admin endpoint and signal handling run on the control runtime (the one
//! `srvlb run` starts in `main.rs`), never on a worker.

use std::io;
use std::num::NonZeroUsize;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tracing::warn;

/// The period of each worker's heartbeat timer. tokio's timer driver wakes its own thread
/// (an eventfd write, then an extra epoll_wait) whenever a timer is set to fire before every
/// timer already set; a worker whose connections are all short often has none, so every new
/// connection's connect timeout did that. A timer that is always due within this period
/// makes connect and idle timeouts (2 s and more by default) never the earliest. Measured
/// with `CLOSE=1 scripts/bench-syscalls` (BENCHMARKS.md).
const HEARTBEAT: Duration = Duration::from_secs(1);

/// How long a stopping worker lets its runtime wind down (tasks are dropped, which closes
/// their sockets) before its thread ends regardless.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(1);

/// The running workers. Dropping this stops them: their connection tasks end and their
/// threads are joined, so call it only once the connections have drained or been cut.
#[derive(Debug)]
pub(crate) struct Workers {
    workers: Vec<Worker>,
}

#[derive(Debug)]
struct Worker {
    handle: Handle,
    /// Dropped (or sent) to end the worker's `block_on`.
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Workers {
    /// The number of workers for `workers = "auto"`: one per CPU this process may run on.
    pub(crate) fn auto_count() -> NonZeroUsize {
        std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN)
    }

    /// Starts `count` worker threads, named `srvlb-worker-N`.
    pub(crate) fn start(count: NonZeroUsize) -> io::Result<Workers> {
        let mut workers = Workers {
            workers: Vec::with_capacity(count.get()),
        };
        for index in 0..count.get() {
            // Dropping `workers` on an error here stops the threads already started.
            workers.workers.push(Worker::start(index)?);
        }
        Ok(workers)
    }

    /// One handle per worker, in worker order: spawning on one runs the task on that worker.
    pub(crate) fn handles(&self) -> impl ExactSizeIterator<Item = &Handle> {
        self.workers.iter().map(|w| &w.handle)
    }

    pub(crate) fn count(&self) -> usize {
        self.workers.len()
    }
}

impl Worker {
    fn start(index: usize) -> io::Result<Worker> {
        let mut builder = tokio::runtime::Builder::new_current_thread();
        builder.enable_all();
        // The io_uring data path submits a worker's queued operations (and wakes the tasks
        // whose operations completed) once per loop, just before the thread would sleep.
        #[cfg(target_os = "linux")]
        builder.on_thread_park(crate::proxy::uring::on_park);
        let runtime = builder.build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name(format!("srvlb-worker-{index}"))
            .spawn(move || {
                #[cfg(target_os = "linux")]
                crate::proxy::uring::flush_on_park();
                // Ends when the sender is used or dropped; either way the worker stops.
                runtime.block_on(async {
                    tokio::select! {
                        _ = stopped => {}
                        () = heartbeat() => {}
                    }
                });
                runtime.shutdown_timeout(SHUTDOWN_TIMEOUT);
            })?;
        Ok(Worker {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

/// Keeps one timer due within `HEARTBEAT` on the worker, forever.
async fn heartbeat() {
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                warn!("a worker thread panicked while stopping");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A task spawned on a worker runs on that worker's thread, and only there.
    #[test]
    fn tasks_run_on_their_own_worker_thread() {
        let workers = Workers::start(NonZeroUsize::new(2).expect("2")).expect("workers");
        assert_eq!(workers.count(), 2);
        let names: Vec<String> = workers
            .handles()
            .map(|h| {
                let (tx, rx) = std::sync::mpsc::channel();
                h.spawn(async move {
                    tokio::task::yield_now().await;
                    let name = std::thread::current().name().map(str::to_owned);
                    let _ = tx.send(name);
                });
                rx.recv_timeout(Duration::from_secs(5))
                    .expect("task ran")
                    .expect("named thread")
            })
            .collect();
        assert_eq!(names, ["srvlb-worker-0", "srvlb-worker-1"]);
        drop(workers);
    }
}
