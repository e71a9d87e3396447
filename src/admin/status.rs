//! `/status`: one JSON document of the services (DNS state, every backend and its health),
//! the listeners (pauses, backlog) and the process (descriptor budget), read now. Its shape
//! is an interface operators script against: fields are added, never renamed or removed.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use serde_json::{Value, json};

use super::AdminState;
use crate::health::now_ms;
use crate::pool::{BackendState, BackendStatus};
use crate::proxy::backlog::Backlog;
use crate::proxy::listener::{ListenerStatus, Pause};
use crate::service::Service;

pub(super) fn render(state: &AdminState) -> String {
    let services: Vec<Value> = state.services.load().iter().map(|s| service(s)).collect();
    let now = now_ms();
    let listeners: Vec<Value> = listeners_with_backlog(state)
        .into_iter()
        .map(|(l, backlog)| listener(&l, backlog, now))
        .collect();
    let process = state.process.lock().clone().map(|(budget, tracker)| {
        json!({
            "fd_limit": budget.limit,
            "fd_reserve": budget.reserve,
            "fd_open": crate::fd_budget::open_fds(),
            "connection_cap": budget.connection_cap,
            "proxied_connections": tracker.open(),
            "admin_slots": budget.admin_slots,
        })
    });
    let body = json!({
        "services": services,
        "listeners": listeners,
        "process": process,
        "reload": state.last_reload(),
    });
    let mut text = serde_json::to_string_pretty(&body).unwrap_or_else(|_| "{}".to_owned());
    text.push('\n');
    text
}

fn service(s: &Service) -> Value {
    let cfg = s.config();
    let now = now_ms();
    let backends: Vec<Value> = s
        .pool
        .states()
        .into_iter()
        .map(|b| backend(&b, now))
        .collect();
    let dns = &s.discovery_status;
    json!({
        "name": s.name,
        "listen": cfg.listen.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "srv": cfg.srv,
        "balance": format!("{:?}", cfg.balance).to_lowercase(),
        "active_connections": s.stats.active.load(Ordering::Relaxed),
        "dns": {
            "stale": dns.stale.load(Ordering::Relaxed),
            "refreshes": dns.refreshes.load(Ordering::Relaxed),
            "failures": dns.failures.load(Ordering::Relaxed),
            "last_error": dns.last_error.lock().clone(),
            "empty_hold": dns.absence.lock().as_ref().map(|a| json!({
                "in_hold": a.in_hold(),
                "emptied": a.emptied,
                "reason": a.reason,
                "since_unix_ms": a.since_unix_ms,
                "until_unix_ms": a.until_unix_ms,
                "remaining_ms": a.remaining_ms(),
            })),
        },
        "backends": backends,
    })
}

fn backend(status: &BackendStatus, now: u64) -> Value {
    let BackendStatus {
        backend: b,
        priority,
        weight,
        state,
    } = status;
    let mut v = json!({
        "address": b.addr().to_string(),
        "target": &*b.key.target,
        "port": b.key.port,
        "priority": priority,
        "weight": weight,
        "state": state.label(),
        "active_connections": b.active(),
        "connections": b.stats.connections.load(Ordering::Relaxed),
        "connect_failures": b.stats.connect_failures.load(Ordering::Relaxed),
        "consecutive_failures": b.health.consecutive_failures(),
        "ejections": b.health.total_ejections(),
    });
    match *state {
        BackendState::Ejected { until_ms, failures } => {
            v["ejected_for_ms"] = json!(until_ms.saturating_sub(now));
            v["reason"] = json!(format!("{failures} consecutive failures"));
        }
        BackendState::Draining { connections } => {
            v["reason"] = json!(format!("removed from DNS; {connections} connections open"));
        }
        BackendState::Standby => v["reason"] = json!("a preferred tier has usable backends"),
        BackendState::AddressUnused { until_ms, failures } => {
            v["ejected_for_ms"] = json!(until_ms.saturating_sub(now));
            v["reason"] = json!(format!(
                "this address fails ({failures} consecutive failures); the target is served on its other addresses"
            ));
        }
        BackendState::Active if b.is_removal_pending() => {
            v["reason"] = json!(
                "left out of the latest DNS answer; kept until the next lookup confirms the removal"
            );
        }
        BackendState::Active if b.health.is_held(now) => {
            v["reason"] = json!(format!(
                "{} consecutive failures; kept in service by max_ejected_percent",
                b.health.consecutive_failures()
            ));
        }
        BackendState::Active => {}
    }
    v
}

fn listener(l: &ListenerStatus, backlog: Option<Backlog>, now: u64) -> Value {
    let paused = l.paused();
    json!({
        "address": l.addr.to_string(),
        "service": l.service_name(),
        "accepting": paused.is_none(),
        "paused_reason": paused.map(|(reason, _)| reason.label()),
        "paused_for_ms": paused.map(|(_, since)| now.saturating_sub(since)),
        "backlog": backlog.map(|b| b.queued),
        "backlog_capacity": backlog_capacity(),
        "pauses": Pause::ALL
            .iter()
            .map(|r| (r.label().to_owned(), json!(l.pauses_total(*r))))
            .collect::<serde_json::Map<_, _>>(),
    })
}

/// The listeners with their accept queues, read now.
pub(super) fn listeners_with_backlog(
    state: &AdminState,
) -> Vec<(Arc<ListenerStatus>, Option<Backlog>)> {
    let listeners = state.listeners.load();
    let inodes: Vec<u64> = listeners.iter().filter_map(|l| l.inode()).collect();
    let backlogs = crate::proxy::backlog::read(&inodes);
    listeners
        .iter()
        .map(|l| {
            let backlog = l.inode().and_then(|i| backlogs.get(&i).copied());
            (Arc::clone(l), backlog)
        })
        .collect()
}

pub(super) fn backlog_capacity() -> Option<u64> {
    crate::proxy::backlog::capacity(crate::proxy::listener::BACKLOG as u64)
}
