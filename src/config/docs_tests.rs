//! The operator's documentation checked against the key declarations (`keys.rs`): the
//! README's reference tables (key, type and default columns, one row per key in declaration
//! order) and the sample `config.toml` (every key shown with its default, nothing else).
//! A failure prints what to paste, so a new key costs its declaration plus its prose.

use super::keys::{DefaultValue, Key, Kind, Section};
use super::values::either;

const README: &str = include_str!("../../README.md");
const SAMPLE: &str = include_str!("../../config.toml");

/// The README's "type" column for a key.
fn type_doc(kind: &Kind) -> String {
    let quoted = |words: &[&str]| either(words.iter().map(|w| format!("`{w:?}`")));
    match kind {
        Kind::Duration { positive: false } => "duration".to_owned(),
        Kind::Duration { positive: true } => "duration, > 0".to_owned(),
        Kind::DurationOrSwitch { min_secs, max_secs } => {
            format!("duration ({min_secs}s to {max_secs}s), `true` or `false`")
        }
        Kind::Integer { min, max: None } => format!("integer ≥ {min}"),
        Kind::Integer {
            min,
            max: Some(max),
        } => format!("integer {min}–{max}"),
        Kind::Words(words) => quoted(words),
        Kind::WordOrCount { word, max } => format!("`{word:?}` or 1 to {max}"),
        Kind::Bool => "`true` or `false`".to_owned(),
        Kind::Address => "address".to_owned(),
        Kind::Addresses => "list of addresses".to_owned(),
        Kind::Networks => "list of networks".to_owned(),
        Kind::Nameservers => "list of `\"IP\"`, `\"IP:port\"`, `\"[IPv6]:port\"`".to_owned(),
        Kind::Path {
            max_bytes: Some(max),
        } => format!("path (at most {max} bytes)"),
        Kind::Path { max_bytes: None } => "path".to_owned(),
        Kind::DnsName => "DNS name".to_owned(),
        Kind::Name => "string".to_owned(),
        Kind::Rate => quoted(&["N/s", "N/m", "N/h", "N/duration"]),
    }
}

/// The README's "default" column for a key.
fn default_doc(default: &DefaultValue) -> String {
    match default {
        DefaultValue::Required => "**required**".to_owned(),
        DefaultValue::Text(text) => format!("`{text:?}`"),
        DefaultValue::Integer(n) => format!("`{n}`"),
        DefaultValue::Bool(b) => format!("`{b}`"),
        DefaultValue::Empty => "`[]`".to_owned(),
        DefaultValue::Unset(what) => (*what).to_owned(),
    }
}

/// The table rows under the README heading of `section`: `(key, whole row)`.
fn readme_rows(section: Section) -> Vec<(String, String)> {
    let heading = format!("### {}", section.header());
    let Some(start) = README.lines().position(|l| l == heading) else {
        panic!("README.md has no heading {heading:?}");
    };
    README
        .lines()
        .skip(start + 1)
        .take_while(|l| !l.starts_with("### ") && !l.starts_with("## "))
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            let key = l.split('`').nth(1).unwrap_or_default().to_owned();
            (key, l.to_owned())
        })
        .collect()
}

/// The row the declaration of `key` asks for, keeping the README's meaning.
fn expected_row(key: &Key, rows: &[(String, String)]) -> String {
    let meaning = rows
        .iter()
        .find(|(name, _)| name == key.name)
        .and_then(|(_, row)| row.splitn(4, " | ").nth(3))
        .map_or("TODO: what it does, its unit, an example. |", str::trim);
    format!(
        "| `{}` | {} | {} | {meaning}",
        key.name,
        type_doc(&key.kind),
        default_doc(&key.default)
    )
}

#[test]
fn readme_tables_match_the_key_declarations() {
    let mut wrong = Vec::new();
    for section in Section::ALL {
        let rows = readme_rows(section);
        let expected: Vec<String> = section
            .keys()
            .into_iter()
            .map(|key| expected_row(key, &rows))
            .collect();
        let actual: Vec<String> = rows.into_iter().map(|(_, row)| row).collect();
        if actual != expected {
            wrong.push(format!(
                "### {}\n\n| key | type | default | meaning |\n| --- | --- | --- | --- |\n{}",
                section.header(),
                expected.join("\n")
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "README.md's configuration reference differs from src/config/keys.rs; the tables \
         should read:\n\n{}",
        wrong.join("\n\n")
    );
}

/// The lines of `config.toml` from the header of `section`'s (first) table to the next
/// table header.
fn sample_part(section: Section) -> Vec<&'static str> {
    let headers: Vec<&str> = Section::ALL.iter().map(|s| s.header()).collect();
    SAMPLE
        .lines()
        .skip_while(|l| *l != section.header())
        .skip(1)
        .take_while(|l| !headers.contains(l))
        .collect()
}

/// The key a sample line sets or shows commented out (`# key = ...`, `key = ...`).
fn sample_key(line: &str) -> Option<&str> {
    let line = line.strip_prefix("# ").unwrap_or(line);
    let (name, _) = line.split_once('=')?;
    let name = name.trim_end();
    let is_key = !name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase() || c == '_');
    is_key.then_some(name)
}

/// What the sample's "Default:" line must say for `default`; `None`: only that it has one.
fn sample_default(default: &DefaultValue) -> Option<String> {
    match default {
        DefaultValue::Text(text) => Some(format!("{text:?}")),
        DefaultValue::Integer(n) => Some(n.to_string()),
        DefaultValue::Bool(b) => Some(b.to_string()),
        DefaultValue::Empty => Some("[]".to_owned()),
        DefaultValue::Required | DefaultValue::Unset(_) => None,
    }
}

/// Problems with how the sample shows `key` in `part` (its table's lines).
fn sample_problem(key: &Key, part: &[&str]) -> Option<String> {
    let Some(first) = part.iter().position(|l| sample_key(l) == Some(key.name)) else {
        return Some(format!("{} is not shown", key.path()));
    };
    // The key's comment block: from its first line to the next blank one.
    let block: Vec<&str> = part[first..]
        .iter()
        .copied()
        .take_while(|l| !l.trim().is_empty())
        .collect();
    if let DefaultValue::Required = key.default {
        return (!block.iter().any(|l| l.contains("REQUIRED")))
            .then(|| format!("{} is not marked REQUIRED", key.path()));
    }
    let defaults: Vec<&str> = block
        .iter()
        .copied()
        .filter(|l| l.starts_with("#   Default"))
        .collect();
    match sample_default(&key.default) {
        _ if defaults.is_empty() => Some(format!("{} has no \"#   Default:\" line", key.path())),
        Some(value) if !defaults.iter().any(|l| l.contains(&value)) => Some(format!(
            "{}: the \"Default:\" line does not say {value}",
            key.path()
        )),
        _ => None,
    }
}

#[test]
fn sample_config_shows_every_key_with_its_default() {
    let mut problems = Vec::new();
    for section in Section::ALL {
        let part = sample_part(section);
        let keys = section.keys();
        problems.extend(keys.iter().filter_map(|key| sample_problem(key, &part)));
        for name in part.iter().filter_map(|l| sample_key(l)) {
            if !keys.iter().any(|k| k.name == name) {
                problems.push(format!("{name} in {} is not a key", section.header()));
            }
        }
    }
    assert!(problems.is_empty(), "config.toml: {problems:#?}");
}
