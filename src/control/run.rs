//! The process's life under systemd: the signals (HUP reloads, USR1 reopens the access log,
//! TERM and INT drain, a second one cuts), sd_notify's READY, RELOADING, STOPPING, STATUS and
//! the watchdog. What a reload or a drain does is `Server`'s; this file only sequences them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::{error, info, warn};

use super::{ControlError, Server, cut_connections};
use crate::access_log;
use crate::config::Config;
use crate::proxy::LogThrottle;

/// Sends a state to systemd; a no-op when NOTIFY_SOCKET is unset.
fn notify(states: &[NotifyState]) {
    // A socket that went away would otherwise log on every watchdog tick.
    static FAILURE_LOG: LogThrottle = LogThrottle::new(Duration::from_secs(60));
    if let Err(e) = sd_notify::notify(states) {
        if FAILURE_LOG.allow() {
            warn!(error = %e, "sd_notify failed");
        }
    }
}

/// The STATUS= line: what runs and how the last reload went. One line, because the notify
/// protocol is newline-separated and a multi-line error would be cut into bogus fields.
fn status_line(server: &Server) -> String {
    let line = format!(
        "{}; {}",
        server.summary(),
        server.admin_state().last_reload()
    );
    line.replace(['\n', '\r'], " ")
}

/// Runs srvlb until SIGTERM or SIGINT: the body of `srvlb run`.
pub async fn run(config_path: PathBuf, config: Config) -> Result<(), ControlError> {
    // Installed before anything else: SIGHUP's default action would kill the process, and a
    // HUP that arrives while starting is then delivered as a reload once the loop runs.
    let mut signals = Signals::install()?;
    let mut server = start(config).await?;
    serve(&mut server, &mut signals, &config_path).await;
    stop(server, &mut signals).await;
    Ok(())
}

/// The signals srvlb acts on, installed together.
struct Signals {
    hangup: Signal,
    terminate: Signal,
    interrupt: Signal,
    user1: Signal,
}

impl Signals {
    fn install() -> Result<Signals, ControlError> {
        let install = |kind| signal(kind).map_err(ControlError::Signals);
        Ok(Signals {
            hangup: install(SignalKind::hangup())?,
            terminate: install(SignalKind::terminate())?,
            interrupt: install(SignalKind::interrupt())?,
            user1: install(SignalKind::user_defined1())?,
        })
    }
}

/// Starts the server and tells systemd it is ready, or why it failed to start.
async fn start(config: Config) -> Result<Server, ControlError> {
    let server = match Server::start(config).await {
        Ok(server) => server,
        Err(e) => {
            let status = format!("failed to start: {e}").replace(['\n', '\r'], " ");
            notify(&[NotifyState::Status(&status)]);
            return Err(e);
        }
    };
    info!(summary = %server.summary(), "srvlb ready");
    // Server::start returned: every listener is bound and accepting.
    notify(&[
        NotifyState::Ready,
        NotifyState::Status(&status_line(&server)),
    ]);
    Ok(server)
}

/// Serves until the first SIGTERM or SIGINT: reloads on SIGHUP, reopens the access log on
/// SIGUSR1, and keeps the watchdog and STATUS= fed.
async fn serve(server: &mut Server, signals: &mut Signals, config_path: &Path) {
    let watchdog = sd_notify::watchdog_enabled();
    let mut watchdog_tick = tokio::time::interval(
        watchdog
            .map(|d| d / 2)
            .unwrap_or(Duration::from_secs(3600))
            .max(Duration::from_millis(100)),
    );
    let mut status_tick = tokio::time::interval(Duration::from_secs(10));

    // A reload runs inside this loop, so HUPs that arrive meanwhile are not lost: tokio keeps
    // one pending notification for them and the next iteration reloads again, reading the file
    // as it is then. Several pending HUPs coalesce into that one reload.
    loop {
        tokio::select! {
            _ = signals.hangup.recv() => reload(server, config_path).await,
            // logrotate has moved the access log away: write to a new file at its path.
            _ = signals.user1.recv() => access_log::reopen(),
            _ = signals.terminate.recv() => break,
            _ = signals.interrupt.recv() => break,
            _ = watchdog_tick.tick(), if watchdog.is_some() => notify(&[NotifyState::Watchdog]),
            _ = status_tick.tick() => notify(&[NotifyState::Status(&status_line(server))]),
        }
    }
}

/// Drains for the configured grace, or cuts at once on a second stop signal.
async fn stop(server: Server, signals: &mut Signals) {
    let grace = server.config.global.shutdown_grace;
    info!(connections = server.tracker().open(), "shutting down");
    notify(&[
        NotifyState::Stopping,
        NotifyState::Status("stopping: draining connections"),
    ]);
    // A second SIGTERM/SIGINT (`systemctl stop` again, Ctrl-C twice) means "stop now": the
    // operator has chosen to cut what is left rather than wait out the grace period. The
    // drain is abandoned; returning ends the runtime, which closes every connection.
    let tracker = server.tracker().clone();
    tokio::select! {
        () = server.shutdown(grace) => info!("srvlb stopped"),
        _ = signals.terminate.recv() => {
            warn!("second stop signal (SIGTERM): closing the remaining connections now");
            cut_connections(&tracker).await;
        }
        _ = signals.interrupt.recv() => {
            warn!("second stop signal (SIGINT): closing the remaining connections now");
            cut_connections(&tracker).await;
        }
    }
}

/// One SIGHUP: read, validate, apply; on any error the running configuration stays.
async fn reload(server: &mut Server, path: &Path) {
    let mut states = vec![NotifyState::Reloading];
    // Type=notify-reload needs MONOTONIC_USEC with RELOADING=1 to match the reload it asked for.
    match NotifyState::monotonic_usec_now() {
        Ok(now) => states.push(now),
        Err(e) => warn!(error = %e, "cannot read CLOCK_MONOTONIC for MONOTONIC_USEC"),
    }
    notify(&states);
    let result = match Config::load(path) {
        Ok(next) => server.apply(next).await,
        Err(e) => Err(ControlError::Config(e)),
    };
    match result {
        Ok(()) => {
            info!(summary = %server.summary(), "configuration reloaded");
            server.admin_state().record_reload(true, "ok".to_owned());
        }
        Err(e) => {
            // `error` is exactly what `srvlb check` prints for the same file.
            error!(error = %e, "reload refused; the previous configuration keeps serving");
            server.admin_state().record_reload(false, e.to_string());
        }
    }
    notify(&[
        NotifyState::Ready,
        NotifyState::Status(&status_line(server)),
    ]);
}
