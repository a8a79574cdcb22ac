//! Shell scripts the E2B and Novita providers run (spec 20 §4.1, spec 21 §3.9).

use std::collections::BTreeMap;
use std::sync::OnceLock;

use paperclip_env_core::{Error, Result};
use regex::Regex;

/// Single-quotes a word for `sh`, each `'` becoming `'\''`.
pub use paperclip_env_core::provider::support::shell_quote as quote;

fn env_key_pattern() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new("^[A-Za-z_][A-Za-z0-9_]*$").expect("static pattern"))
}

fn check_env(env: &BTreeMap<String, String>) -> Result<()> {
    for key in env.keys() {
        if !env_key_pattern().is_match(key) {
            return Err(Error::InvalidInput {
                what: "environment variable",
                message: format!("Invalid sandbox environment variable key: {key}"),
            });
        }
    }
    Ok(())
}

fn exec_line(command: &str, args: &[String], env: &BTreeMap<String, String>) -> String {
    let words = std::iter::once(command)
        .chain(args.iter().map(String::as_str))
        .map(quote)
        .collect::<Vec<_>>()
        .join(" ");
    if env.is_empty() {
        format!("exec {words}")
    } else {
        let assignments = env
            .iter()
            .map(|(k, v)| format!("{k}={}", quote(v)))
            .collect::<Vec<_>>()
            .join(" ");
        format!("exec env {assignments} {words}")
    }
}

/// E2B's login-shell script: profile sourcing, nvm, then `exec`.
pub fn e2b_script(
    command: &str,
    args: &[String],
    env: &BTreeMap<String, String>,
    stdin_path: Option<&str>,
) -> Result<String> {
    check_env(env)?;
    let mut exec = exec_line(command, args, env);
    if let Some(path) = stdin_path {
        exec.push_str(&format!(" < {}", quote(path)));
    }
    Ok([
        "if [ -f /etc/profile ]; then . /etc/profile >/dev/null 2>&1 || true; fi",
        "if [ -f \"$HOME/.profile\" ]; then . \"$HOME/.profile\" >/dev/null 2>&1 || true; fi",
        "if [ -f \"$HOME/.bash_profile\" ]; then . \"$HOME/.bash_profile\" >/dev/null 2>&1 || true; elif [ -f \"$HOME/.bashrc\" ]; then . \"$HOME/.bashrc\" >/dev/null 2>&1 || true; fi",
        "if [ -f \"$HOME/.zprofile\" ]; then . \"$HOME/.zprofile\" >/dev/null 2>&1 || true; fi",
        "export NVM_DIR=\"${NVM_DIR:-$HOME/.nvm}\"",
        "[ -s \"$NVM_DIR/nvm.sh\" ] && . \"$NVM_DIR/nvm.sh\" >/dev/null 2>&1 || true",
        exec.as_str(),
    ]
    .join(" && "))
}

/// Novita's script: `set -e`, `cd`, one `export` per variable, then `exec`.
pub fn novita_script(
    command: &str,
    args: &[String],
    cwd: Option<&str>,
    env: &BTreeMap<String, String>,
    stdin_path: Option<&str>,
) -> Result<String> {
    check_env(env)?;
    let mut lines = vec!["set -e".to_owned()];
    let cwd = cwd.map(str::trim).filter(|c| !c.is_empty()).unwrap_or("/");
    lines.push(format!("cd {}", quote(cwd)));
    for (k, v) in env {
        lines.push(format!("export {k}={};", quote(v)));
    }
    let mut exec = exec_line(command, args, &BTreeMap::new());
    if let Some(path) = stdin_path {
        exec.push_str(&format!(" < {}", quote(path)));
    }
    lines.push(exec);
    Ok(lines.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_and_scripts() {
        assert_eq!(quote("it's"), r"'it'\''s'");
        let env = BTreeMap::from([("FOO".to_owned(), "bar".to_owned())]);
        let s = e2b_script("printf", &["hello".into()], &env, None).unwrap();
        assert!(s.contains(".profile"));
        assert!(s.ends_with("exec env FOO='bar' 'printf' 'hello'"));
        let s = e2b_script(
            "printf",
            &["hello".into()],
            &BTreeMap::new(),
            Some("/tmp/paperclip-stdin-1"),
        )
        .unwrap();
        assert!(s.ends_with("exec 'printf' 'hello' < '/tmp/paperclip-stdin-1'"));
        let bad = BTreeMap::from([("1BAD".to_owned(), "x".to_owned())]);
        assert_eq!(
            e2b_script("x", &[], &bad, None).unwrap_err().to_string(),
            "invalid environment variable: Invalid sandbox environment variable key: 1BAD"
        );
        let n = novita_script("cat", &[], Some("/w"), &env, Some("/tmp/s")).unwrap();
        assert_eq!(
            n,
            "set -e\ncd '/w'\nexport FOO='bar';\nexec 'cat' < '/tmp/s'"
        );
    }
}
