//! Turns the raw file into a [`Config`]: parses the document, checks each table on its own
//! (`tables.rs`, `service.rs`) and then the rules that span services (unique names, listen
//! addresses that can all be bound, admin beside them), and reports the first problem with
//! the span of the value (or table) at fault.

mod service;
mod tables;

use std::net::SocketAddr;
use std::ops::Range;
use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use super::error::{Problem, line_column};
use super::keys::GLOBAL;
use super::raw::{RawFile, RawService};
use super::{Config, ServiceConfig};
use service::{CheckedService, service};
use tables::{global, resolver};

const NO_SERVICES: &str =
    "no services defined; add at least one [[service]] table with name, listen and srv or static";

pub(crate) fn config(text: &str, source: PathBuf) -> Result<Config, Problem> {
    let document = DeTable::parse(text).map_err(|e| Problem::from_toml(&e, ""))?;
    // Kept aside before the top-level pass consumes the document; see `RawFile::service`.
    let service_values = document.get_ref().get("service").cloned();
    let file = RawFile::deserialize(toml::de::Deserializer::from(document))
        .map_err(|e| Problem::from_toml(&e, ""))?;

    let (global, admin_span) = global(file.global.unwrap_or_default())?;
    let resolver = resolver(file.resolver.unwrap_or_default())?;
    let service_values = service_values.ok_or_else(|| Problem::whole_file(NO_SERVICES))?;
    let (services, listeners) = services(service_values, text)?;
    if let (Some(admin), Some(span)) = (global.admin, admin_span) {
        if let Some((taken, owner)) = listeners.conflict(admin) {
            return Err(Problem::at(
                span,
                format!(
                    "{} {admin} collides with listen address {taken} of service {owner:?}",
                    GLOBAL.admin.path()
                ),
            ));
        }
    }
    Ok(Config {
        source,
        global,
        resolver,
        services,
    })
}

/// The `[[service]]` array: each service checked on its own, then against the ones before
/// it (names and listen addresses in file order, so a conflict blames the later one).
fn services(
    values: Spanned<DeValue<'_>>,
    text: &str,
) -> Result<(Vec<ServiceConfig>, Listeners), Problem> {
    let list_span = values.span();
    let DeValue::Array(array) = values.into_inner() else {
        // RawFile already demanded an array; this only guards against that changing.
        return Err(Problem::at(
            list_span,
            "service must be an array of tables ([[service]])",
        ));
    };
    if array.is_empty() {
        return Err(Problem::at(list_span, NO_SERVICES));
    }
    let mut services: Vec<ServiceConfig> = Vec::new();
    let mut name_lines: Vec<usize> = Vec::new();
    let mut listeners = Listeners::default();
    for (index, value) in array.into_iter().enumerate() {
        let CheckedService {
            service,
            name_span,
            listen_spans,
        } = one_service(value, index)?;
        if let Some(earlier) = services.iter().position(|s| s.name == service.name) {
            return Err(Problem::at(
                name_span,
                format!(
                    "service {:?}: name is already used by the service on line {}",
                    service.name, name_lines[earlier]
                ),
            ));
        }
        for (addr, span) in service.listen.iter().zip(listen_spans) {
            listeners.add(*addr, &service.name, span)?;
        }
        name_lines.push(line_column(text, name_span.start).0);
        services.push(service);
    }
    Ok((services, listeners))
}

/// One element of the array, deserialized (toml's own errors prefixed with the service) and
/// checked on its own.
fn one_service(value: Spanned<DeValue<'_>>, index: usize) -> Result<CheckedService, Problem> {
    let header = value.span();
    let prefix = toml_error_prefix(&value, index);
    if !value.get_ref().is_table() {
        return Err(Problem::at(
            header,
            "each service must be a table ([[service]] or {name = ...})",
        ));
    }
    let raw = RawService::deserialize(ValueDeserializer::from(value))
        .map_err(|e| Problem::from_toml(&e, &prefix))?;
    service(raw, header, index)
}

/// Prefix for toml's own errors inside a service: its name when it has a string one, else
/// its position, so "unknown field" still says which service.
fn toml_error_prefix(value: &Spanned<DeValue<'_>>, index: usize) -> String {
    match value
        .get_ref()
        .get("name")
        .and_then(|n| n.get_ref().as_str())
    {
        Some(name) => format!("service {name:?}: "),
        None => format!("service #{}: ", index + 1),
    }
}

/// Every listen address taken so far and by whom.
#[derive(Default)]
struct Listeners {
    taken: Vec<(SocketAddr, String)>,
}

impl Listeners {
    /// The first taken address that `addr` could not be bound beside: the same address, or
    /// the same port and family where either side is the wildcard (which takes the port on
    /// every interface of that family).
    fn conflict(&self, addr: SocketAddr) -> Option<(SocketAddr, &str)> {
        self.taken
            .iter()
            .find(|(taken, _)| {
                taken.port() == addr.port()
                    && taken.is_ipv4() == addr.is_ipv4()
                    && (taken.ip() == addr.ip()
                        || taken.ip().is_unspecified()
                        || addr.ip().is_unspecified())
            })
            .map(|(taken, owner)| (*taken, owner.as_str()))
    }

    fn add(&mut self, addr: SocketAddr, service: &str, span: Range<usize>) -> Result<(), Problem> {
        if let Some((taken, owner)) = self.conflict(addr) {
            let p = format!("service {service:?}: ");
            let message = match (taken == addr, owner == service) {
                (true, false) => {
                    format!("{p}listen address {addr} is already used by service {owner:?}")
                }
                (false, false) => format!(
                    "{p}listen address {addr} overlaps {taken} of service {owner:?} \
                     (a wildcard address takes the port on every interface)"
                ),
                // Exact repeats within one service are caught while parsing the list.
                (_, true) => format!(
                    "{p}listen address {addr} overlaps {taken} of the same service \
                     (a wildcard address takes the port on every interface)"
                ),
            };
            return Err(Problem::at(span, message));
        }
        self.taken.push((addr, service.to_string()));
        Ok(())
    }
}
