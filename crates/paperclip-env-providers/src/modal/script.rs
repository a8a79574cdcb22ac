//! The login-shell wrapper Modal commands run in (spec 23 §5 step 3, shared
//! with the Modal plugin): profiles sourced, `cd`, env inlined, then `exec`.

use std::collections::BTreeMap;

use paperclip_env_core::provider::support::{shell_quote, valid_env_key};
use paperclip_env_core::{Error, Result};

/// The `sh -lc` script for a command. Stdin is streamed by the router, so
/// there is no redirect.
pub(crate) fn login_script(
    command: &str,
    args: &[String],
    cwd: &str,
    env: &BTreeMap<String, String>,
) -> Result<String> {
    if let Some(key) = env.keys().find(|k| !valid_env_key(k)) {
        return Err(Error::InvalidInput {
            what: "environment variable",
            message: format!("Invalid sandbox environment variable key: {key}"),
        });
    }
    let words = std::iter::once(command)
        .chain(args.iter().map(String::as_str))
        .map(shell_quote)
        .collect::<Vec<_>>()
        .join(" ");
    let exec = if env.is_empty() {
        format!("exec {words}")
    } else {
        let assignments = env
            .iter()
            .map(|(k, v)| format!("{k}={}", shell_quote(v)))
            .collect::<Vec<_>>()
            .join(" ");
        format!("exec env {assignments} {words}")
    };
    Ok([
        "if [ -f /etc/profile ]; then . /etc/profile >/dev/null 2>&1 || true; fi".to_owned(),
        "if [ -f \"$HOME/.profile\" ]; then . \"$HOME/.profile\" >/dev/null 2>&1 || true; fi".to_owned(),
        "if [ -f \"$HOME/.bash_profile\" ]; then . \"$HOME/.bash_profile\" >/dev/null 2>&1 || true; elif [ -f \"$HOME/.bashrc\" ]; then . \"$HOME/.bashrc\" >/dev/null 2>&1 || true; fi".to_owned(),
        "if [ -f \"$HOME/.zprofile\" ]; then . \"$HOME/.zprofile\" >/dev/null 2>&1 || true; fi".to_owned(),
        "export NVM_DIR=\"${NVM_DIR:-$HOME/.nvm}\"".to_owned(),
        "[ -s \"$NVM_DIR/nvm.sh\" ] && . \"$NVM_DIR/nvm.sh\" >/dev/null 2>&1 || true".to_owned(),
        format!("cd {}", shell_quote(cwd)),
        exec,
    ]
    .join(" && "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_exec_line_and_bad_keys() {
        let env = BTreeMap::from([("FOO".to_owned(), "bar".to_owned())]);
        let script = login_script("printf", &["hello".to_owned()], "/w", &env).unwrap_or_default();
        assert!(
            script.ends_with("&& cd '/w' && exec env FOO='bar' 'printf' 'hello'"),
            "{script}"
        );
        let bad = BTreeMap::from([("1BAD".to_owned(), "x".to_owned())]);
        let err = login_script("true", &[], "/", &bad)
            .map(|_| ())
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("Invalid sandbox environment variable key: 1BAD")
        );
    }
}
