//! What provider authors need and should not write again: shell quoting
//! and env-name checks shared by every provider that builds a shell
//! command line (SSH, E2B, Daytona, exe.dev, Kubernetes, Modal, workspace
//! sync).

/// POSIX single-quoting for `sh`: the value in `'…'`, each `'` written as
/// `'\''`. Safe for any byte string the shell can hold (NUL excepted).
///
/// ```
/// use paperclip_env_core::provider::support::shell_quote;
/// assert_eq!(shell_quote("it's"), r"'it'\''s'");
/// assert_eq!(shell_quote(""), "''");
/// assert_eq!(shell_quote("$HOME `x` \\"), r"'$HOME `x` \'");
/// ```
pub fn shell_quote(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        if c == '\'' {
            out.push_str(r"'\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    out
}

/// Whether `key` may be exported by `sh`: `^[A-Za-z_][A-Za-z0-9_]*$`.
///
/// ```
/// use paperclip_env_core::provider::support::valid_env_key;
/// assert!(valid_env_key("PAPERCLIP_RUN_ID") && valid_env_key("_x1"));
/// assert!(!valid_env_key("1A") && !valid_env_key("A-B") && !valid_env_key(""));
/// ```
pub fn valid_env_key(key: &str) -> bool {
    let mut chars = key.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_values_survive_a_real_shell() {
        for value in [
            "plain",
            "it's",
            "'",
            "''",
            "a b\tc\nd",
            "$(rm -rf /)",
            "\\'\"",
            "é ü 漢",
        ] {
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("printf %s {}", shell_quote(value)))
                .output()
                .expect("sh runs");
            assert_eq!(String::from_utf8_lossy(&out.stdout), value);
        }
    }
}
