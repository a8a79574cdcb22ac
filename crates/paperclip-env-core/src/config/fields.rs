//! A small reader over a JSON object that records every problem it meets.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

use super::ConfigIssue;

/// Reads fields of one object, collecting issues instead of stopping.
pub(crate) struct Fields<'a> {
    object: Map<String, Value>,
    prefix: &'a str,
    seen: BTreeSet<String>,
    pub(crate) issues: Vec<ConfigIssue>,
}

impl<'a> Fields<'a> {
    /// Reads `value`; a non-object reads as `{}` (Paperclip's `parseObject`).
    pub(crate) fn new(value: &Value, prefix: &'a str) -> Self {
        Fields {
            object: value.as_object().cloned().unwrap_or_default(),
            prefix,
            seen: BTreeSet::new(),
            issues: Vec::new(),
        }
    }

    pub(crate) fn path(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.prefix)
        }
    }

    pub(crate) fn issue(&mut self, key: &str, message: impl Into<String>) {
        let field = self.path(key);
        self.issues.push(ConfigIssue::new(field, message));
    }

    /// The raw value; `null` counts as absent.
    pub(crate) fn raw(&mut self, key: &str) -> Option<Value> {
        self.seen.insert(key.to_owned());
        match self.object.get(key) {
            None | Some(Value::Null) => None,
            Some(v) => Some(v.clone()),
        }
    }

    /// A trimmed string; blank or absent gives `missing` as the issue message.
    pub(crate) fn required_trimmed(&mut self, key: &str, missing: &str) -> Option<String> {
        match self.raw(key) {
            Some(Value::String(s)) if !s.trim().is_empty() => Some(s.trim().to_owned()),
            Some(Value::String(_)) | None => {
                self.issue(key, missing);
                None
            }
            Some(_) => {
                self.issue(key, format!("{} must be a string.", self.path(key)));
                None
            }
        }
    }

    /// An optional trimmed string; blank → `None`.
    pub(crate) fn optional_trimmed(&mut self, key: &str) -> Option<String> {
        match self.raw(key) {
            Some(Value::String(s)) => Some(s.trim().to_owned()).filter(|s| !s.is_empty()),
            None => None,
            Some(_) => {
                self.issue(key, format!("{} must be a string.", self.path(key)));
                None
            }
        }
    }

    /// A boolean (strings are rejected).
    pub(crate) fn bool_or(&mut self, key: &str, default: bool) -> bool {
        match self.raw(key) {
            None => default,
            Some(Value::Bool(b)) => b,
            Some(_) => {
                self.issue(key, format!("{} must be a boolean.", self.path(key)));
                default
            }
        }
    }

    /// An integer in `min..=max`, coerced from a number or a numeric string.
    pub(crate) fn coerced_int(&mut self, key: &str, min: i64, max: i64) -> Option<i64> {
        let raw = self.raw(key)?;
        let parsed = match &raw {
            Value::Number(n) => n.as_f64(),
            Value::String(s) => s.trim().parse::<f64>().ok(),
            _ => None,
        };
        match parsed {
            Some(n) if n.fract() == 0.0 && n >= min as f64 && n <= max as f64 => Some(n as i64),
            Some(n) if n.fract() != 0.0 => {
                self.issue(key, format!("{} must be an integer.", self.path(key)));
                None
            }
            Some(_) => {
                self.issue(
                    key,
                    format!("{} must be between {min} and {max}.", self.path(key)),
                );
                None
            }
            None => {
                self.issue(key, format!("{} must be a number.", self.path(key)));
                None
            }
        }
    }

    /// Rejects keys that were never read (zod `.strict()`).
    pub(crate) fn reject_unknown(&mut self) {
        let unknown: Vec<String> = self
            .object
            .keys()
            .filter(|k| !self.seen.contains(*k))
            .cloned()
            .collect();
        for key in unknown {
            self.issue(&key, format!("Unrecognized key \"{key}\"."));
        }
    }

    /// Keys never read, with their values (passthrough schemas).
    pub(crate) fn rest(&self) -> Map<String, Value> {
        self.object
            .iter()
            .filter(|(k, _)| !self.seen.contains(*k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}
