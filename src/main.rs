//! The `srvlb` command: `run` (the default) serves a configuration until SIGTERM, `check`
//! validates one like `nginx -t` and prints the plan. Exit codes: 0 ok, 1 invalid
//! configuration, 2 runtime failure (a listener that cannot be bound, ...).

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use srvlb::config::{Config, LogFormat};
use tracing_subscriber::EnvFilter;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DEFAULT_CONFIG: &str = "/etc/srvlb/config.toml";

#[derive(Parser)]
#[command(
    name = "srvlb",
    version,
    about = "Layer-4 TCP load balancer driven by DNS SRV records"
)]
struct Cli {
    /// Configuration file (for the default `run` command).
    #[arg(long, short, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the configuration until SIGTERM/SIGINT; SIGHUP reloads it.
    Run,
    /// Validate the configuration and print what srvlb would do, then exit.
    Check {
        /// Also perform the DNS lookups and print the backends each service would use.
        #[arg(long)]
        resolve: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let path = cli.config.unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
    let config = match Config::load(&path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(1);
        }
    };
    match cli.command {
        Some(Command::Check { resolve }) => check(&config, resolve),
        Some(Command::Run) | None => run(path, config),
    }
}

fn check(config: &Config, resolve: bool) -> ExitCode {
    print!("{}", config.plan());
    print!("{}", process_plan(config));
    if resolve {
        let runtime = match runtime(&mut tokio::runtime::Builder::new_current_thread()) {
            Ok(rt) => rt,
            Err(code) => return code,
        };
        if !runtime.block_on(print_resolution(config)) {
            return ExitCode::from(1);
        }
    }
    println!("configuration ok");
    ExitCode::SUCCESS
}

/// The part of the plan that depends on the process, not the file: the descriptor cap.
fn process_plan(config: &Config) -> String {
    use srvlb::fd_budget::FdBudget;
    let sockets = config
        .services
        .iter()
        .map(|s| s.listen.len())
        .sum::<usize>()
        + usize::from(config.global.admin.is_some())
        + usize::from(config.global.admin_socket.is_some());
    let budget = FdBudget::current(sockets);
    let max_connections = config
        .services
        .iter()
        .map(|s| s.max_connections)
        .fold(0, usize::saturating_add);
    let mut out = format!("\nprocess\n  {:<19}{budget}\n", "connection cap");
    out.push_str(&format!(
        "  {:<19}from this process's RLIMIT_NOFILE; under systemd LimitNOFILE= sets it\n",
        ""
    ));
    if max_connections > budget.connection_cap {
        out.push_str(&format!(
            "  {:<19}the services' max_connections add up to {max_connections}: the cap applies first\n",
            ""
        ));
    }
    out
}

/// Looks every SRV name up once and prints the backends; false when a lookup failed.
async fn print_resolution(config: &Config) -> bool {
    use srvlb::discovery::{Answer, build_resolver, lookup_srv, static_endpoints};
    let resolver = match build_resolver(&config.resolver) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{e}");
            return false;
        }
    };
    let mut ok = true;
    for service in &config.services {
        println!("service \"{}\" resolves to:", service.name);
        if let Some(srv) = &service.srv {
            match lookup_srv(&resolver, srv, &Default::default()).await {
                Answer::Found {
                    endpoints,
                    ttl,
                    unresolved,
                } => {
                    for ep in endpoints {
                        println!(
                            "  {:<40} priority {:<5} weight {:<5} {}",
                            format!("{}:{}", ep.target, ep.port),
                            ep.priority,
                            ep.weight,
                            ep.addr
                        );
                    }
                    println!("  (SRV {srv}, ttl {ttl}s)");
                    if let Some(u) = unresolved {
                        println!(
                            "  ({} of {} targets not resolved: {})",
                            u.skipped, u.targets, u.error
                        );
                    }
                }
                Answer::Absent(why) => println!("  SRV {srv}: {why}"),
                Answer::Failed(why) => {
                    println!("  SRV {srv}: lookup failed: {why}");
                    ok = false;
                }
            }
        }
        for ep in static_endpoints(&service.static_backends) {
            println!("  {:<40} static (last-resort tier)", ep.addr);
        }
    }
    ok
}

fn run(path: PathBuf, config: Config) -> ExitCode {
    init_logging(config.global.log_format);
    // The control runtime: signals, discovery, the admin endpoint. Connections run on the
    // worker threads `control` starts (see `srvlb::workers`), each a runtime of its own.
    let runtime = match runtime(&mut tokio::runtime::Builder::new_current_thread()) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let outcome = runtime.block_on(srvlb::control::run(path, config));
    // The lines of the connections closed last are still queued: write them out.
    srvlb::access_log::finish();
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "srvlb failed");
            eprintln!("srvlb: {e}");
            ExitCode::from(2)
        }
    }
}

/// Builds a runtime with I/O and timers, or says why not (exit code 2).
fn runtime(builder: &mut tokio::runtime::Builder) -> Result<tokio::runtime::Runtime, ExitCode> {
    builder.enable_all().build().map_err(|e| {
        eprintln!("cannot start the runtime: {e}");
        ExitCode::from(2)
    })
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("SRVLB_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour codes only on a terminal: journald and log files get plain text.
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
