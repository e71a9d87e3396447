//! The tables beside the services: `[global]`, `[resolver]` and a service's
//! `[service.health]`. Each key is one call to its kind's check (bounds and default from
//! `keys.rs`); what is left here are the keys with a check of their own and the rules
//! between keys.

use std::num::NonZeroUsize;
use std::ops::Range;
use std::path::PathBuf;

use toml::Spanned;

use super::super::admin;
use super::super::error::Problem;
use super::super::keys::{GLOBAL, HEALTH, Kind, RESOLVER};
use super::super::raw::{RawGlobal, RawHealth, RawResolver, Scalar};
use super::super::values::{
    duration, integer, keyword, nameserver, ordered, socket_addr, undeclared,
};
use super::super::{GlobalConfig, HealthConfig, ResolverConfig};

/// `[global]`, and the span of `admin` for the check against the listeners.
pub(super) fn global(raw: RawGlobal) -> Result<(GlobalConfig, Option<Range<usize>>), Problem> {
    let k = &GLOBAL;
    let admin = match &raw.admin {
        Some(text) => Some(socket_addr(text, "", &k.admin.path())?),
        None => None,
    };
    let log_format = keyword(&k.log_format, raw.log_format.as_ref(), "")?;
    let shutdown_grace = duration(&k.shutdown_grace, raw.shutdown_grace.as_ref(), "")?;
    let access_log = match &raw.access_log {
        Some(text) if text.get_ref().is_empty() => {
            return Err(Problem::at(
                text.span(),
                format!(
                    "{}: empty path; leave the key out for no access log",
                    k.access_log.path()
                ),
            ));
        }
        Some(text) => Some(PathBuf::from(text.get_ref())),
        None => None,
    };
    let admin_socket = raw
        .admin_socket
        .as_ref()
        .map(admin::socket_path)
        .transpose()?;
    let admin_token = raw
        .admin_token_file
        .as_ref()
        .map(admin::token_file)
        .transpose()?;
    let config = GlobalConfig {
        admin,
        admin_socket,
        admin_token,
        log_format,
        shutdown_grace,
        access_log,
        access_log_format: keyword(&k.access_log_format, raw.access_log_format.as_ref(), "")?,
        workers: workers(raw.workers.as_ref())?,
    };
    Ok((config, raw.admin.map(|a| a.span())))
}

/// `global.workers`: `"auto"` (the default: one per CPU) or a count from 1 to
/// `GlobalConfig::MAX_WORKERS`.
fn workers(value: Option<&Spanned<Scalar>>) -> Result<Option<NonZeroUsize>, Problem> {
    let key = &GLOBAL.workers;
    let Some(value) = value else {
        return Ok(None);
    };
    let Kind::WordOrCount { word, max } = key.kind else {
        return Err(undeclared(key, "word-or-count kind"));
    };
    match value.get_ref() {
        Scalar::Text(text) if text == word => Ok(None),
        Scalar::Integer(n) if (1..=max).contains(n) => {
            Ok(usize::try_from(*n).ok().and_then(NonZeroUsize::new))
        }
        other => Err(Problem::at(
            value.span(),
            format!(
                "{}: expected {word:?} or a number of threads from 1 to {max}, not {other}",
                key.path()
            ),
        )),
    }
}

pub(super) fn resolver(raw: RawResolver) -> Result<ResolverConfig, Problem> {
    let k = &RESOLVER;
    let nameservers = raw
        .nameservers
        .iter()
        .flatten()
        .map(|text| nameserver(&k.nameservers, text))
        .collect::<Result<Vec<_>, _>>()?;
    let timeout = duration(&k.timeout, raw.timeout.as_ref(), "")?;
    let min_refresh = duration(&k.min_refresh, raw.min_refresh.as_ref(), "")?;
    let max_refresh = duration(&k.max_refresh, raw.max_refresh.as_ref(), "")?;
    ordered(
        (&k.min_refresh, min_refresh, raw.min_refresh.as_ref()),
        (&k.max_refresh, max_refresh, raw.max_refresh.as_ref()),
        "",
    )?;
    Ok(ResolverConfig {
        nameservers,
        timeout,
        min_refresh,
        max_refresh,
        empty_hold: duration(&k.empty_hold, raw.empty_hold.as_ref(), "")?,
        family: keyword(&k.family, raw.family.as_ref(), "")?,
    })
}

/// `[service.health]` of the service whose messages start with `p`.
pub(super) fn health(raw: RawHealth, p: &str) -> Result<HealthConfig, Problem> {
    let k = &HEALTH;
    let consecutive_failures = integer(
        &k.consecutive_failures,
        raw.consecutive_failures.as_ref(),
        p,
    )?;
    let base_ejection = duration(&k.base_ejection, raw.base_ejection.as_ref(), p)?;
    let max_ejection = duration(&k.max_ejection, raw.max_ejection.as_ref(), p)?;
    ordered(
        (&k.base_ejection, base_ejection, raw.base_ejection.as_ref()),
        (&k.max_ejection, max_ejection, raw.max_ejection.as_ref()),
        p,
    )?;
    Ok(HealthConfig {
        consecutive_failures,
        base_ejection,
        max_ejection,
        max_ejected_percent: integer(&k.max_ejected_percent, raw.max_ejected_percent.as_ref(), p)?,
    })
}
