//! `paperclip-env doctor`: per configured environment (the `--env` files and
//! every environment the state file's leases name), whether its credentials
//! are present, whether it answers a probe, and how far the service's clock
//! is from ours (lease expiry and the reaper compare timestamps across it).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use paperclip_env_core::secret::{EnvSecretResolver, SecretRef};
use paperclip_env_core::{Environment, Error};
use serde_json::{Value, json};

use crate::{App, print_json, read_environment};

/// Skew beyond which `doctor` fails the clock check.
const MAX_SKEW: Duration = Duration::from_secs(30);

/// One check's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Ok,
    Warn,
    Fail,
}

impl Verdict {
    fn name(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Warn => "warn",
            Verdict::Fail => "fail",
        }
    }
}

struct Check {
    name: &'static str,
    verdict: Verdict,
    detail: String,
}

fn set(var: &str) -> bool {
    std::env::var_os(var).is_some_and(|v| !v.is_empty())
}

/// Every secret reference in `value`.
fn secret_refs(value: &Value, out: &mut Vec<SecretRef>) {
    if let Some(reference) = SecretRef::from_config_value(value) {
        out.push(reference);
        return;
    }
    match value {
        Value::Object(map) => map.values().for_each(|v| secret_refs(v, out)),
        Value::Array(items) => items.iter().for_each(|v| secret_refs(v, out)),
        _ => {}
    }
}

/// The provider's credential: a config field or its env fallback.
fn credential_sources(
    env: &Environment,
) -> Option<(&'static [&'static str], &'static [&'static str])> {
    let provider = env.config.get("provider").and_then(Value::as_str);
    Some(match (env.driver.as_str(), provider) {
        ("sandbox", Some("e2b")) => (&["apiKey"], &["E2B_API_KEY"]),
        ("sandbox", Some("novita")) => (&["apiKey"], &["NOVITA_API_KEY"]),
        ("sandbox", Some("daytona")) => (&["apiKey"], &["DAYTONA_API_KEY"]),
        ("sandbox", Some("exe-dev")) => (&["apiKey"], &["EXE_API_KEY"]),
        ("sandbox", Some("modal")) => (&["tokenSecret"], &[]),
        ("sandbox", Some("cloudflare")) => (&["bridgeAuthToken"], &[]),
        ("sandbox", Some("kubernetes")) => (&["kubeconfig", "inCluster"], &[]),
        ("ssh", _) => (&["privateKey", "privateKeySecretRef", "identityFile"], &[]),
        _ => return None,
    })
}

fn credentials(env: &Environment) -> Check {
    let resolver = EnvSecretResolver::new();
    let mut refs = Vec::new();
    secret_refs(&env.config, &mut refs);
    let missing: Vec<String> = refs
        .iter()
        .map(|r| resolver.var_for(&r.secret_id))
        .filter(|var| !set(var))
        .collect();
    if !missing.is_empty() {
        return Check {
            name: "credentials",
            verdict: Verdict::Fail,
            detail: format!(
                "secret references unresolvable: {} not set",
                missing.join(", ")
            ),
        };
    }
    let Some((fields, vars)) = credential_sources(env) else {
        return Check {
            name: "credentials",
            verdict: Verdict::Ok,
            detail: format!(
                "{} secret reference(s) resolvable; the driver needs no other credential",
                refs.len()
            ),
        };
    };
    let in_config: Vec<&str> = fields
        .iter()
        .copied()
        .filter(|f| env.config.get(*f).is_some_and(|v| !v.is_null() && v != ""))
        .collect();
    let from_env: Vec<&str> = vars.iter().copied().filter(|v| set(v)).collect();
    let (verdict, detail) = match (in_config.first(), from_env.first()) {
        (Some(field), _) => (Verdict::Ok, format!("`{field}` in the config")),
        (None, Some(var)) => (Verdict::Ok, format!("{var} set")),
        (None, None) if vars.is_empty() => (
            Verdict::Fail,
            format!("the config has none of {}", fields.join(", ")),
        ),
        (None, None) => (
            Verdict::Fail,
            format!(
                "neither {} in the config nor {} set",
                fields.join("/"),
                vars.join("/")
            ),
        ),
    };
    Check {
        name: "credentials",
        verdict,
        detail,
    }
}

async fn reachability(app: &App, env: &Environment, deadline: Duration) -> Check {
    let started = Instant::now();
    let (verdict, detail) = match tokio::time::timeout(deadline, app.runtime.probe(env)).await {
        Err(_) => (Verdict::Fail, format!("no answer within {deadline:?}")),
        Ok(Err(e)) => (Verdict::Fail, e.to_string()),
        Ok(Ok(result)) => (
            if result.ok {
                Verdict::Ok
            } else {
                Verdict::Fail
            },
            format!(
                "probe {} in {} ms: {}",
                if result.ok { "ok" } else { "failed" },
                started.elapsed().as_millis(),
                result.summary
            ),
        ),
    };
    Check {
        name: "reachable",
        verdict,
        detail,
    }
}

/// The HTTP endpoint whose `Date` header tells the service's time.
fn clock_url(env: &Environment) -> Option<String> {
    let provider = env.config.get("provider").and_then(Value::as_str)?;
    let field = |key: &str| {
        env.config
            .get(key)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    let var = |key: &str| std::env::var(key).ok().filter(|s| !s.is_empty());
    let e2b_like = |prefix: &str, domain: &str| {
        field("apiUrl")
            .or_else(|| var(&format!("{prefix}_API_URL")))
            .or_else(|| {
                let domain = field("domain")
                    .or_else(|| var(&format!("{prefix}_DOMAIN")))
                    .unwrap_or_else(|| domain.to_owned());
                Some(format!("https://api.{domain}"))
            })
    };
    match provider {
        "e2b" => e2b_like("E2B", "e2b.app"),
        "novita" => e2b_like("NOVITA", "us-phx-1.sandbox.novita.ai"),
        "daytona" => field("apiUrl")
            .or_else(|| var("DAYTONA_API_URL"))
            .or_else(|| Some("https://app.daytona.io/api".into())),
        "exe-dev" => field("apiUrl").or_else(|| Some("https://exe.dev/exec".into())),
        "cloudflare" => field("bridgeBaseUrl"),
        _ => None,
    }
}

async fn clock(env: &Environment, deadline: Duration) -> Check {
    let Some(url) = clock_url(env) else {
        return Check {
            name: "clock",
            verdict: Verdict::Warn,
            detail: "not measured: the driver has no HTTP endpoint to compare with".into(),
        };
    };
    let client = match reqwest::Client::builder().timeout(deadline).build() {
        Ok(client) => client,
        Err(e) => {
            return Check {
                name: "clock",
                verdict: Verdict::Warn,
                detail: format!("not measured: {e}"),
            };
        }
    };
    let sent = SystemTime::now();
    let response = client.head(&url).send().await;
    let received = SystemTime::now();
    let date = response.as_ref().ok().and_then(|r| {
        r.headers()
            .get(reqwest::header::DATE)
            .and_then(|d| d.to_str().ok())
            .and_then(|d| httpdate::parse_http_date(d).ok())
    });
    let Some(server) = date else {
        return Check {
            name: "clock",
            verdict: Verdict::Warn,
            detail: match response {
                Err(e) => format!("not measured: {url} did not answer: {e}"),
                Ok(_) => format!("not measured: {url} sent no Date header"),
            },
        };
    };
    // The server stamped its Date somewhere between send and receive.
    let half = received.duration_since(sent).unwrap_or_default() / 2;
    let ours = sent + half;
    let (ahead, by) = match server.duration_since(ours) {
        Ok(d) => (true, d),
        Err(e) => (false, e.duration()),
    };
    // Date has whole seconds: anything under 1.5 s is within its precision.
    let secs = by.as_secs_f64();
    let signed = if ahead { secs } else { -secs };
    let verdict = if by > MAX_SKEW {
        Verdict::Fail
    } else {
        Verdict::Ok
    };
    Check {
        name: "clock",
        verdict,
        detail: format!("skew {signed:+.1} s against {url} (Date header, ±1 s)"),
    }
}

async fn environments(app: &App, files: &[PathBuf]) -> Result<Vec<Environment>, Error> {
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for file in files {
        let env = read_environment(file)?;
        seen.insert(env.id.clone());
        out.push(env);
    }
    let ids: BTreeSet<String> = app
        .state
        .list_all()
        .await?
        .into_iter()
        .filter_map(|l| l.environment_id)
        .collect();
    for id in ids {
        if seen.insert(id.clone())
            && let Some(env) = app.runtime.environment_store().get(&id).await?
        {
            out.push(env);
        }
    }
    Ok(out)
}

/// Runs `doctor`; exits 1 when any check fails.
pub(crate) async fn run(
    app: &App,
    files: &[PathBuf],
    deadline: Duration,
) -> Result<ExitCode, Error> {
    let environments = environments(app, files).await?;
    if environments.is_empty() {
        return Err(Error::invalid_field(
            "env",
            "no environment to check: pass --env FILE or acquire a lease first",
        ));
    }
    let mut failed = false;
    let mut reports = Vec::new();
    for env in &environments {
        let checks = vec![
            credentials(env),
            reachability(app, env, deadline).await,
            clock(env, deadline).await,
        ];
        failed |= checks.iter().any(|c| c.verdict == Verdict::Fail);
        let provider = env.config.get("provider").and_then(Value::as_str);
        if app.json {
            reports.push(json!({
                "environment": {"id": env.id, "name": env.name, "driver": env.driver, "provider": provider},
                "checks": checks.iter().map(|c| json!({
                    "check": c.name, "verdict": c.verdict.name(), "detail": c.detail,
                })).collect::<Vec<_>>(),
            }));
        } else {
            match provider.filter(|_| env.driver == "sandbox") {
                Some(p) => println!("{} ({}, provider {p})", env.id, env.driver),
                None => println!("{} ({})", env.id, env.driver),
            }
            for c in &checks {
                println!("  {:<4}  {:<11}  {}", c.verdict.name(), c.name, c.detail);
            }
        }
    }
    if app.json {
        print_json(&Value::Array(reports));
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}
