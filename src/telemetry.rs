//! Logging: `RUST_LOG` filters (default `info`); text or one JSON object per line (`--log-format json`,
//! or `MAILPOD_LOG_FORMAT=json` for every subcommand). Each reconcile runs in a span naming its object.

use tracing_subscriber::EnvFilter;

/// How log lines look.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Logging as `MAILPOD_LOG_FORMAT` says (text when unset).
pub fn init() {
    let json = std::env::var("MAILPOD_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    init_with(if json {
        LogFormat::Json
    } else {
        LogFormat::Text
    });
}

pub fn init_with(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal: a pod's log (or a file) gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Json => builder.json().with_current_span(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    // A second init (tests) keeps the first subscriber.
    let _ = result;
}
