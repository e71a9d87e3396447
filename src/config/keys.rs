//! Every configuration key, declared once: its table, name, kind of value (with bounds),
//! default and, from the same lines, the serde struct that reads it (`deny_unknown_fields`,
//! so a typo is an error). Validation reads bounds and defaults from here, the README
//! tables and `config.toml` are checked against it (`docs_tests.rs`), and an unknown key
//! gets a suggestion from it. What a key *means* is README prose; cross-key rules
//! (min <= max, burst needs rate, one discovery source) stay code in `validate`.

use serde::Deserialize;
use toml::Spanned;

use super::GlobalConfig;
use super::admin::MAX_SOCKET_PATH;
use super::raw::{Scalar, Text, TextList};
use super::{AddressFamily, Balance, DataPath, HashKey, LogFormat, ProxyProtocol};

/// The table a key lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Section {
    Global,
    Resolver,
    Service,
    Health,
}

impl Section {
    pub(crate) const ALL: [Section; 4] = [
        Section::Global,
        Section::Resolver,
        Section::Service,
        Section::Health,
    ];

    /// How error messages name a key of this table: `global.admin`, but a service's own
    /// keys bare (`balance`), since the message already names the service.
    pub(crate) fn prefix(self) -> &'static str {
        match self {
            Section::Global => "global.",
            Section::Resolver => "resolver.",
            Section::Service => "",
            Section::Health => "health.",
        }
    }

    /// The table's header as written in the file.
    pub(crate) fn header(self) -> &'static str {
        match self {
            Section::Global => "[global]",
            Section::Resolver => "[resolver]",
            Section::Service => "[[service]]",
            Section::Health => "[service.health]",
        }
    }

    pub(crate) fn keys(self) -> Vec<&'static Key> {
        match self {
            Section::Global => GLOBAL.all(),
            Section::Resolver => RESOLVER.all(),
            Section::Service => SERVICE.all(),
            Section::Health => HEALTH.all(),
        }
    }
}

/// One key: where it lives, what it takes, what it is when left out.
#[derive(Debug)]
pub(crate) struct Key {
    pub(crate) section: Section,
    pub(crate) name: &'static str,
    pub(crate) kind: Kind,
    pub(crate) default: DefaultValue,
}

impl Key {
    /// The key as error messages name it (see [`Section::prefix`]).
    pub(crate) fn path(&self) -> String {
        format!("{}{}", self.section.prefix(), self.name)
    }
}

/// What a key's value must be. The generic kinds (durations, integers, words, switches,
/// networks) are checked by `values` from this alone; the others name a check of their own.
#[derive(Debug)]
pub(crate) enum Kind {
    /// A human duration ("250ms"); `positive`: "0s" is refused.
    Duration {
        positive: bool,
    },
    /// A duration in whole seconds within `min_secs..=max_secs`, or `true` (the default) or
    /// `false` (off).
    DurationOrSwitch {
        min_secs: u64,
        max_secs: u64,
    },
    /// An integer within `min..=max` (`None`: the target type's limit).
    Integer {
        min: i64,
        max: Option<i64>,
    },
    /// One of these words (checked through the value's [`Keyword`] impl, which declares
    /// them).
    Words(
        #[cfg_attr(
            not(test),
            allow(dead_code, reason = "for the docs only: docs_tests.rs renders it")
        )]
        &'static [&'static str],
    ),
    /// The word or a count from 1 to `max`.
    WordOrCount {
        word: &'static str,
        max: i64,
    },
    Bool,
    /// An `IP:port`.
    Address,
    /// A list of `IP:port`, no repeats.
    Addresses,
    /// A list of CIDR networks or single IPs.
    Networks,
    /// A list of `IP` or `IP:port`.
    Nameservers,
    /// A file path; `max_bytes` when the OS limits it.
    Path {
        #[cfg_attr(
            not(test),
            allow(dead_code, reason = "for the docs only: docs_tests.rs renders it")
        )]
        max_bytes: Option<usize>,
    },
    /// A DNS name, checked for shape.
    DnsName,
    /// A service name: letters, digits, '-', '_', '.'.
    Name,
    /// A rate like "50/s".
    Rate,
}

/// What a key is when the file leaves it out.
#[derive(Debug)]
pub(crate) enum DefaultValue {
    /// The key must be written.
    Required,
    /// As if this string were written (durations and words: `"30s"`, `"maglev"`).
    Text(&'static str),
    Integer(i64),
    Bool(bool),
    /// An empty list.
    Empty,
    /// No value: the feature is off or derived; the text says what that means.
    Unset(
        #[cfg_attr(
            not(test),
            allow(dead_code, reason = "for the docs only: docs_tests.rs renders it")
        )]
        &'static str,
    ),
}

impl DefaultValue {
    /// The default as a value of the file, for the kinds that check a [`Scalar`].
    pub(crate) fn scalar(&self) -> Option<Scalar> {
        match self {
            DefaultValue::Text(text) => Some(Scalar::Text((*text).to_owned())),
            DefaultValue::Integer(n) => Some(Scalar::Integer(*n)),
            DefaultValue::Bool(b) => Some(Scalar::Boolean(*b)),
            _ => None,
        }
    }
}

/// A keyword-valued setting: the words the file may use and the value each stands for.
pub(crate) trait Keyword: Copy + 'static {
    const WORDS: &'static [&'static str];
    /// In the order of `WORDS`.
    const VALUES: &'static [Self];

    /// The word for `self`, as the file spells it.
    fn word(self) -> &'static str;
}

/// Declares the words of a keyword enum once, each beside the variant it stands for; the
/// `match` in `word` makes a variant without a word a compile error.
macro_rules! keywords {
    ($type:ident { $($word:literal => $variant:ident),+ $(,)? }) => {
        impl Keyword for $type {
            const WORDS: &'static [&'static str] = &[$($word),+];
            const VALUES: &'static [Self] = &[$($type::$variant),+];

            fn word(self) -> &'static str {
                match self {
                    $($type::$variant => $word,)+
                }
            }
        }
    };
}

keywords!(LogFormat { "text" => Text, "json" => Json });
keywords!(AddressFamily { "any" => Any, "ipv4" => Ipv4, "ipv6" => Ipv6 });
keywords!(Balance { "maglev" => Maglev, "p2c" => P2c });
keywords!(HashKey { "client_ip" => ClientIp, "client_ip_port" => ClientIpPort });
keywords!(ProxyProtocol { "v1" => V1, "v2" => V2 });
keywords!(DataPath { "epoll" => Epoll, "io_uring" => IoUring });

/// The TOML name of a field: its Rust name, or the `as "name"` given for it (`static` is a
/// Rust keyword).
macro_rules! key_name {
    ($field:ident) => {
        stringify!($field)
    };
    ($field:ident, $rename:literal) => {
        $rename
    };
}

/// One table's keys: from each line `field [as "name"]: RawType => kind, default;` come a
/// field of the serde struct `$raw` (`Option<RawType>`, in the order written, which is the
/// order toml's "expected one of" lists them in) and a [`Key`] of the same name in `$keys`.
/// `[table] field: Type;` lines add a sub-table that is not a key of its own.
macro_rules! section {
    (
        $(#[$doc:meta])*
        $section:ident => $raw:ident, $keys:ident $const:ident;
        $( $field:ident $(as $rename:literal)? : $ty:ty => $kind:expr, $default:expr; )+
        $( [table] $table:ident : $table_ty:ty; )*
    ) => {
        $(#[$doc])*
        #[derive(Debug, Default, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub(crate) struct $raw {
            $( $(#[serde(rename = $rename)])? pub(crate) $field: Option<$ty>, )+
            $( pub(crate) $table: Option<$table_ty>, )*
        }

        /// The keys of the same table, field by field.
        #[derive(Debug)]
        pub(crate) struct $keys {
            $( pub(crate) $field: Key, )+
        }

        pub(crate) static $const: $keys = $keys {
            $( $field: Key {
                section: Section::$section,
                name: key_name!($field $(, $rename)?),
                kind: $kind,
                default: $default,
            }, )+
        };

        impl $keys {
            /// Every key, in declaration order.
            pub(crate) fn all(&'static self) -> Vec<&'static Key> {
                vec![$( &self.$field ),+]
            }
        }
    };
}

use DefaultValue::{Bool as IsBool, Empty, Integer as IsInteger, Required, Text as Is, Unset};

// Shorthands for the declarations below.
const DURATION: Kind = Kind::Duration { positive: false };
const POSITIVE_DURATION: Kind = Kind::Duration { positive: true };
const PATH: Kind = Kind::Path { max_bytes: None };
const NO_LIMIT: DefaultValue = Unset("none (no limit)");

const fn at_least(min: i64) -> Kind {
    Kind::Integer { min, max: None }
}

section! {
    /// `[global]` as written.
    Global => RawGlobal, GlobalKeys GLOBAL;
    admin: Text => Kind::Address, Unset("none");
    admin_socket: Text => Kind::Path { max_bytes: Some(MAX_SOCKET_PATH) }, Unset("none");
    admin_token_file: Text => PATH, Unset("none (no authentication)");
    log_format: Spanned<Scalar> => Kind::Words(LogFormat::WORDS), Is("text");
    shutdown_grace: Spanned<Scalar> => DURATION, Is("30s");
    access_log: Text => PATH, Unset("none (off)");
    access_log_format: Spanned<Scalar> => Kind::Words(LogFormat::WORDS), Is("text");
    workers: Spanned<Scalar> =>
        Kind::WordOrCount { word: "auto", max: GlobalConfig::MAX_WORKERS }, Is("auto");
}

section! {
    /// `[resolver]` as written.
    Resolver => RawResolver, ResolverKeys RESOLVER;
    nameservers: Vec<Text> => Kind::Nameservers, Empty;
    timeout: Spanned<Scalar> => POSITIVE_DURATION, Is("2s");
    // A zero floor would let a TTL-0 record drive a query loop.
    min_refresh: Spanned<Scalar> => POSITIVE_DURATION, Is("1s");
    max_refresh: Spanned<Scalar> => DURATION, Is("60s");
    empty_hold: Spanned<Scalar> => DURATION, Is("30s");
    family: Spanned<Scalar> => Kind::Words(AddressFamily::WORDS), Is("any");
}

section! {
    /// One `[[service]]` table as written.
    Service => RawService, ServiceKeys SERVICE;
    name: Text => Kind::Name, Required;
    listen: TextList => Kind::Addresses, Required;
    srv: Text => Kind::DnsName, Unset("none");
    static_backends as "static": TextList => Kind::Addresses, Empty;
    balance: Spanned<Scalar> => Kind::Words(Balance::WORDS), Is("maglev");
    hash_key: Spanned<Scalar> => Kind::Words(HashKey::WORDS), Is("client_ip");
    connect_timeout: Spanned<Scalar> => POSITIVE_DURATION, Is("2s");
    // Zero would close every connection at once; there is no "disabled" meaning to give it.
    idle_timeout: Spanned<Scalar> => POSITIVE_DURATION, Is("1h");
    // The kernel counts keepalive time in whole seconds, from 1 to 32767.
    tcp_keepalive: Spanned<Scalar> =>
        Kind::DurationOrSwitch { min_secs: 1, max_secs: 32_767 }, Is("30s");
    connect_retries: Spanned<i64> => at_least(0), IsInteger(2);
    // u32 bounds the limit to what the connection semaphore can hold.
    max_connections: Spanned<i64> => at_least(1), IsInteger(10_000);
    max_connections_per_source: Spanned<i64> => at_least(1), NO_LIMIT;
    rate_per_source: Spanned<Scalar> => Kind::Rate, NO_LIMIT;
    rate_per_source_burst: Spanned<i64> => at_least(1), Unset("N of `rate_per_source`");
    allow: Vec<Text> => Kind::Networks, Empty;
    deny: Vec<Text> => Kind::Networks, Empty;
    send_proxy: Spanned<Scalar> => Kind::Words(ProxyProtocol::WORDS), Unset("none");
    accept_proxy: Spanned<Scalar> => Kind::Bool, IsBool(false);
    accept_proxy_timeout: Spanned<Scalar> => POSITIVE_DURATION, Is("5s");
    accept_proxy_from: Vec<Text> => Kind::Networks, Empty;
    data_path: Spanned<Scalar> => Kind::Words(DataPath::WORDS), Is("epoll");
    [table] health: RawHealth;
}

section! {
    /// `[service.health]` as written.
    Health => RawHealth, HealthKeys HEALTH;
    consecutive_failures: Spanned<i64> => at_least(1), IsInteger(3);
    base_ejection: Spanned<Scalar> => POSITIVE_DURATION, Is("10s");
    max_ejection: Spanned<Scalar> => DURATION, Is("5m");
    max_ejected_percent: Spanned<i64> => Kind::Integer { min: 0, max: Some(100) }, IsInteger(50);
}

/// A hint for a key toml refused, given the names it said the table accepts: the accepted
/// name closest to `unknown` when it is near enough to be a typo (at most one edit per three
/// characters), or else the table where a key of that exact name belongs. Only within a
/// table of declared keys (a service's sub-table `health` is suggested there too): the
/// top level's table names get toml's message alone.
pub(crate) fn unknown_key_hint(unknown: &str, accepted: &[&str]) -> Option<String> {
    let limit = (unknown.chars().count() / 3).max(1);
    let declared = |name: &str| {
        Section::ALL
            .iter()
            .any(|s| s.keys().iter().any(|k| k.name == name))
    };
    let typo = accepted
        .iter()
        .any(|name| declared(name))
        .then(|| {
            accepted
                .iter()
                .map(|name| (edit_distance(unknown, name), *name))
                .filter(|(distance, _)| *distance <= limit)
                .min_by_key(|(distance, _)| *distance)
        })
        .flatten();
    if let Some((_, name)) = typo {
        return Some(format!("did you mean `{name}`?"));
    }
    Section::ALL
        .iter()
        .find(|s| s.keys().iter().any(|k| k.name == unknown))
        .map(|s| format!("`{unknown}` belongs in {}", s.header()))
}

/// Levenshtein distance in characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitute = previous[j] + usize::from(ca != *cb);
            current.push(substitute.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[b.len()]
}
