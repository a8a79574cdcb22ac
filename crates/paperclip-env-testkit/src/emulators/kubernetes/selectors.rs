//! Label and field selectors as the API server parses them on LIST/watch:
//! `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`, `k`, `!k`, joined by
//! commas; field selectors accept `=`, `==` and `!=` on dotted paths.

use serde_json::Value;

/// One requirement of a selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Requirement {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// Splits on commas outside parentheses.
fn terms(selector: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut current = String::new();
    for c in selector.chars() {
        match c {
            '(' => {
                depth += 1;
                current.push(c);
            }
            ')' => {
                depth -= 1;
                current.push(c);
            }
            ',' if depth == 0 => out.push(std::mem::take(&mut current)),
            _ => current.push(c),
        }
    }
    out.push(current);
    out.into_iter()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
        .collect()
}

fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 317
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn value_list(rest: &str) -> Option<Vec<String>> {
    let inner = rest.trim().strip_prefix('(')?.strip_suffix(')')?;
    Some(
        inner
            .split(',')
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .collect(),
    )
}

/// Parses a label selector; the error names the bad term.
pub(crate) fn parse_labels(selector: &str) -> Result<Vec<Requirement>, String> {
    let mut out = Vec::new();
    for term in terms(selector) {
        let bad = || format!("unable to parse requirement: invalid label selector term {term:?}");
        let requirement = if let Some(key) = term.strip_prefix('!') {
            Requirement::NotExists(key.trim().to_owned())
        } else if let Some((key, rest)) = term.split_once(" notin ") {
            Requirement::NotIn(key.trim().to_owned(), value_list(rest).ok_or_else(bad)?)
        } else if let Some((key, rest)) = term.split_once(" in ") {
            Requirement::In(key.trim().to_owned(), value_list(rest).ok_or_else(bad)?)
        } else if let Some((key, value)) = term.split_once("!=") {
            Requirement::NotEq(key.trim().to_owned(), value.trim().to_owned())
        } else if let Some((key, value)) = term.split_once("==") {
            Requirement::Eq(key.trim().to_owned(), value.trim().to_owned())
        } else if let Some((key, value)) = term.split_once('=') {
            Requirement::Eq(key.trim().to_owned(), value.trim().to_owned())
        } else {
            Requirement::Exists(term.clone())
        };
        let key = match &requirement {
            Requirement::Eq(k, _)
            | Requirement::NotEq(k, _)
            | Requirement::In(k, _)
            | Requirement::NotIn(k, _)
            | Requirement::Exists(k)
            | Requirement::NotExists(k) => k,
        };
        if !valid_key(key) {
            return Err(bad());
        }
        out.push(requirement);
    }
    Ok(out)
}

/// Parses a field selector (`metadata.name=x,status.phase!=Running`).
pub(crate) fn parse_fields(selector: &str) -> Result<Vec<Requirement>, String> {
    let mut out = Vec::new();
    for term in terms(selector) {
        let requirement = if let Some((key, value)) = term.split_once("!=") {
            Requirement::NotEq(key.trim().to_owned(), value.trim().to_owned())
        } else if let Some((key, value)) = term.split_once("==") {
            Requirement::Eq(key.trim().to_owned(), value.trim().to_owned())
        } else if let Some((key, value)) = term.split_once('=') {
            Requirement::Eq(key.trim().to_owned(), value.trim().to_owned())
        } else {
            return Err(format!(
                "invalid selector: '{term}'; can't understand '{term}'"
            ));
        };
        out.push(requirement);
    }
    Ok(out)
}

fn label(object: &Value, key: &str) -> Option<String> {
    object
        .pointer("/metadata/labels")
        .and_then(|labels| labels.get(key))
        .and_then(Value::as_str)
        .map(str::to_owned)
}

fn field(object: &Value, path: &str) -> Option<String> {
    let pointer = format!("/{}", path.replace('.', "/"));
    match object.pointer(&pointer)? {
        Value::String(s) => Some(s.clone()),
        Value::Null => None,
        other => Some(other.to_string()),
    }
}

fn satisfies(requirement: &Requirement, lookup: impl Fn(&str) -> Option<String>) -> bool {
    match requirement {
        Requirement::Eq(k, v) => lookup(k).as_deref() == Some(v.as_str()),
        Requirement::NotEq(k, v) => lookup(k).as_deref() != Some(v.as_str()),
        Requirement::In(k, vs) => lookup(k).is_some_and(|x| vs.contains(&x)),
        Requirement::NotIn(k, vs) => lookup(k).is_none_or(|x| !vs.contains(&x)),
        Requirement::Exists(k) => lookup(k).is_some(),
        Requirement::NotExists(k) => lookup(k).is_none(),
    }
}

/// Whether `object`'s labels satisfy every requirement.
pub(crate) fn labels_match(requirements: &[Requirement], object: &Value) -> bool {
    requirements
        .iter()
        .all(|r| satisfies(r, |k| label(object, k)))
}

/// Whether `object`'s fields satisfy every requirement (an absent
/// `metadata.namespace` reads as empty, as the API server does).
pub(crate) fn fields_match(requirements: &[Requirement], object: &Value) -> bool {
    requirements.iter().all(|r| {
        satisfies(r, |k| {
            field(object, k).or_else(|| (k == "metadata.namespace").then(String::new))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_operator_filters_labels() {
        let pod = json!({"metadata": {"labels": {"app": "web", "tier": "front"}}});
        let cases = [
            ("app=web", true),
            ("app==web", true),
            ("app!=web", false),
            ("app in (api, web)", true),
            ("app notin (web)", false),
            ("tier", true),
            ("!tier", false),
            ("!missing", true),
            ("app=web,tier=back", false),
            ("missing!=x", true),
        ];
        for (selector, expected) in cases {
            let parsed = parse_labels(selector).unwrap_or_default();
            assert_eq!(labels_match(&parsed, &pod), expected, "{selector}");
        }
    }

    #[test]
    fn malformed_terms_are_rejected() {
        assert!(parse_labels("app in web").is_err());
        assert!(parse_labels("bad key=x").is_err());
        assert!(parse_fields("metadata.name").is_err());
    }

    #[test]
    fn field_selectors_read_dotted_paths() {
        let pod = json!({"metadata": {"name": "a"}, "status": {"phase": "Running"}});
        let parsed = parse_fields("metadata.name=a,status.phase!=Failed").unwrap_or_default();
        assert!(fields_match(&parsed, &pod));
        let parsed = parse_fields("metadata.namespace=").unwrap_or_default();
        assert!(fields_match(&parsed, &pod));
    }
}
