//! `paperclip-env conformance --env FILE`: the testkit's conformance suite
//! against any configured environment.
//!
//! For a `driver: "sandbox"` environment the Part A lines (spec 11) run
//! against the provider its `config.provider` names, configured like every
//! other command (env fallbacks, `--plugin` files); then the runtime lines
//! (`R1`…) run through the runtime for every driver. Secret references are
//! read from `PAPERCLIP_SECRET_<ID>`; inline secrets stay in memory. Leases
//! live in memory too: nothing is written to the state file, and everything
//! the run created is released before the process exits, also after SIGINT
//! or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use paperclip_env_core::Error;
use paperclip_env_core::secret::EnvSecretResolver;
use paperclip_env_testkit::conformance::live::{LiveOutcome, LiveSuite};
use paperclip_env_testkit::conformance::{Level, LineResult, Outcome};
use serde_json::{Value, json};

use crate::{Cli, Registry, print_json, read_environment};

/// The providers' env fallbacks that hold secrets.
const FALLBACK_SECRETS: [&str; 4] = [
    "E2B_API_KEY",
    "NOVITA_API_KEY",
    "DAYTONA_API_KEY",
    "EXE_API_KEY",
];

/// Options of `paperclip-env conformance`.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub(crate) environment: PathBuf,
    pub(crate) only: Vec<String>,
    pub(crate) list: bool,
    pub(crate) call_timeout: Duration,
    pub(crate) json: bool,
}

fn level_name(level: Level) -> &'static str {
    match level {
        Level::Must => "MUST",
        Level::Should => "SHOULD",
    }
}

fn outcome_parts(outcome: &Outcome) -> (&'static str, Option<&str>) {
    match outcome {
        Outcome::Passed => ("pass", None),
        Outcome::Failed(m) => ("fail", Some(m)),
        Outcome::Warning(m) => ("warn", Some(m)),
        Outcome::Skipped(m) => ("skip", Some(m)),
    }
}

fn line_text(line: &LineResult) -> String {
    let (tag, detail) = outcome_parts(&line.outcome);
    let detail = detail.map(|d| format!(": {d}")).unwrap_or_default();
    format!(
        "{:<4}  {:<6}  {:<5}  {}{detail}",
        tag.to_ascii_uppercase(),
        level_name(line.level),
        line.id,
        line.title
    )
}

fn line_json(line: &LineResult) -> Value {
    let (tag, detail) = outcome_parts(&line.outcome);
    json!({
        "id": line.id,
        "level": level_name(line.level),
        "title": line.title,
        "outcome": tag,
        "message": detail,
    })
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Counts {
    passed: usize,
    failed: usize,
    warnings: usize,
    skipped: usize,
}

fn counts(outcome: &LiveOutcome) -> Counts {
    let mut c = Counts::default();
    for line in &outcome.report.lines {
        match line.outcome {
            Outcome::Passed => c.passed += 1,
            Outcome::Failed(_) => c.failed += 1,
            Outcome::Warning(_) => c.warnings += 1,
            Outcome::Skipped(_) => c.skipped += 1,
        }
    }
    c
}

/// SIGINT or SIGTERM, whichever comes first (never, if neither handler installs).
fn interrupted() -> Result<impl std::future::Future<Output = ()>, Error> {
    use tokio::signal::unix::{SignalKind, signal};
    let handler = |kind: SignalKind, name: &str| {
        signal(kind).map_err(|e| Error::invalid_field("signal", format!("{name} handler: {e}")))
    };
    let mut interrupt = handler(SignalKind::interrupt(), "SIGINT")?;
    let mut terminate = handler(SignalKind::terminate(), "SIGTERM")?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    })
}

/// Runs the suite; the exit code is 0 when every MUST line held and cleanup
/// was clean, 1 otherwise, 130 when interrupted.
pub(crate) async fn run(cli: &Cli, options: Options) -> Result<ExitCode, Error> {
    // Handlers first: a Ctrl-C during setup must still reach the teardown.
    let cancel = interrupted()?;
    let environment = read_environment(&options.environment)?;
    let registry = Registry::from_cli(cli)?;
    let mut builder = LiveSuite::builder(environment.clone())
        .secrets(Arc::new(EnvSecretResolver::new()))
        .only(options.only.clone())
        .call_timeout(options.call_timeout);
    // Credentials the providers read from their env fallbacks must stay
    // out of metadata and lease rows as much as the config's own secrets.
    for var in FALLBACK_SECRETS {
        if let Ok(value) = std::env::var(var) {
            builder = builder.secret_value(value.trim());
        }
    }
    for provider in registry.providers {
        builder = builder.provider(provider);
    }
    for driver in registry.drivers {
        builder = builder.driver(driver);
    }
    let suite = builder.build()?;
    let provider = environment
        .config
        .get("provider")
        .and_then(Value::as_str)
        .filter(|_| environment.driver == "sandbox");
    let target = match provider {
        Some(p) => format!("{} ({}, provider {p})", environment.id, environment.driver),
        None => format!("{} ({})", environment.id, environment.driver),
    };
    if options.list {
        let lines = suite.lines();
        if options.json {
            print_json(&Value::Array(
                lines
                    .iter()
                    .map(|l| json!({"id": l.id, "level": level_name(l.level), "title": l.title}))
                    .collect(),
            ));
        } else {
            for l in lines {
                println!("{:<6}  {:<5}  {}", level_name(l.level), l.id, l.title);
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    if !options.json {
        println!("conformance of {target}: {} lines", suite.lines().len());
    }
    let started = Instant::now();
    let json_mode = options.json;
    let outcome = suite
        .run(
            |line| {
                use std::io::Write;
                // Each line as it completes (a live account takes minutes);
                // with --json, on stderr, so stdout stays one document.
                if json_mode {
                    let _ = writeln!(std::io::stderr(), "{}", line_text(line));
                } else {
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "{}", line_text(line));
                    let _ = out.flush();
                }
            },
            cancel,
        )
        .await;
    let elapsed = started.elapsed();
    let c = counts(&outcome);
    let cleanup = &outcome.cleanup;
    if options.json {
        print_json(&json!({
            "environment": {"id": environment.id, "driver": environment.driver, "provider": provider},
            "lines": outcome.report.lines.iter().map(line_json).collect::<Vec<_>>(),
            "summary": {
                "passed": c.passed,
                "failed": c.failed,
                "warnings": c.warnings,
                "skipped": c.skipped,
                "elapsedMs": u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
            },
            "interrupted": outcome.interrupted,
            "cleanup": {
                "releasedLeases": cleanup.released_leases,
                "destroyedResources": cleanup.destroyed_resources,
                "errors": cleanup.errors,
            },
            "ok": outcome.passed(),
        }));
    } else {
        if outcome.interrupted {
            println!("interrupted after {} lines", outcome.report.lines.len());
        }
        let left = if cleanup.is_clean() {
            "clean".to_owned()
        } else {
            format!("{} problems", cleanup.errors.len())
        };
        println!(
            "{} passed, {} failed (MUST), {} warnings (SHOULD), {} skipped in {:.1}s; cleanup {left}: {} leases released, {} resources destroyed",
            c.passed,
            c.failed,
            c.warnings,
            c.skipped,
            elapsed.as_secs_f64(),
            cleanup.released_leases.len(),
            cleanup.destroyed_resources.len(),
        );
        for error in &cleanup.errors {
            println!("cleanup: {error}");
        }
    }
    Ok(if outcome.interrupted {
        ExitCode::from(130)
    } else if outcome.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
