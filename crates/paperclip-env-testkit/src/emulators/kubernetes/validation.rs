//! Object validation as the API server does it for the kinds the
//! Kubernetes provider writes, with the apimachinery messages: object names
//! (DNS-1123 label for namespaces, subdomain otherwise), label keys and
//! values, annotation keys, Secret data keys, quota and LimitRange
//! quantities (min ≤ default request ≤ default ≤ max), pod specs (container names,
//! images, env names, resource quantities and requests ≤ limits, volume
//! mounts, restart policy), Job specs, NetworkPolicies, and the CRD schemas
//! of `Sandbox` (`spec.podTemplate` required, quantity pattern) and
//! `CiliumNetworkPolicy` (`matchName`/`matchPattern` patterns). A refusal is
//! a 422 `Invalid` `metav1.Status` whose `details.causes` list every
//! problem; a quantity a built-in type cannot decode is a 400, as the
//! server's JSON decoder answers. Also: Job defaulting (selector,
//! completions, parallelism, backoffLimit, template labels).

use serde_json::{Value, json};

use super::store::{ApiError, ResourceType};

const DNS1123_LABEL: &str = "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')";
const DNS1123_SUBDOMAIN: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const LABEL_VALUE: &str = "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')";
const NAME_PART: &str = "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')";
const QUALIFIED_NAME: &str = "a qualified name must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]') with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')";
const CONFIG_KEY: &str = "a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')";
const ENV_NAME: &str = "a valid environment variable name must consist of alphabetic characters, digits, '_', '-', or '.', and must not start with a digit (e.g. 'my.env-name',  or 'MY_ENV.NAME',  or 'MyEnvName1', regex used for validation is '[-._a-zA-Z][-._a-zA-Z0-9]*')";
const QUANTITY_REGEX: &str = "^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$";
const CRD_QUANTITY_PATTERN: &str = "^(\\+|-)?(([0-9]+(\\.[0-9]*)?)|(\\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\\+|-)?(([0-9]+(\\.[0-9]*)?)|(\\.[0-9]+))))?$";
const FQDN_MATCH_NAME: &str = "^([-a-zA-Z0-9_]+[.]?)+$";
const FQDN_MATCH_PATTERN: &str = "^([-a-zA-Z0-9_*]+[.]?)+$";
/// The API server's limit on the total size of an object's annotations.
const ANNOTATIONS_MAX: usize = 256 * 1024;

/// One `details.causes` entry.
#[derive(Debug, Clone)]
struct Cause {
    reason: &'static str,
    field: String,
    message: String,
}

/// Field errors collected over one object.
#[derive(Debug, Default)]
pub(crate) struct Errors {
    causes: Vec<Cause>,
    /// A decode failure (400) that precedes validation.
    decode: Option<String>,
}

fn shown(value: &Value) -> String {
    match value {
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

impl Errors {
    fn push(&mut self, reason: &'static str, field: impl Into<String>, message: String) {
        self.causes.push(Cause {
            reason,
            field: field.into(),
            message,
        });
    }

    fn invalid(&mut self, field: impl Into<String>, value: &Value, detail: &str) {
        self.push(
            "FieldValueInvalid",
            field,
            format!("Invalid value: {}: {detail}", shown(value)),
        );
    }

    fn required(&mut self, field: impl Into<String>, detail: &str) {
        let message = if detail.is_empty() {
            "Required value".to_owned()
        } else {
            format!("Required value: {detail}")
        };
        self.push("FieldValueRequired", field, message);
    }

    fn not_supported(&mut self, field: impl Into<String>, value: &Value, supported: &[&str]) {
        let list: Vec<String> = supported.iter().map(|s| format!("{s:?}")).collect();
        self.push(
            "FieldValueNotSupported",
            field,
            format!(
                "Unsupported value: {}: supported values: {}",
                shown(value),
                list.join(", ")
            ),
        );
    }

    fn not_found(&mut self, field: impl Into<String>, value: &Value) {
        self.push(
            "FieldValueNotFound",
            field,
            format!("Not found: {}", shown(value)),
        );
    }

    fn duplicate(&mut self, field: impl Into<String>, value: &Value) {
        self.push(
            "FieldValueDuplicate",
            field,
            format!("Duplicate value: {}", shown(value)),
        );
    }

    /// The error a real server answers, or `Ok` when nothing was found.
    pub(crate) fn into_result(self, rt: &ResourceType, name: &str) -> Result<(), ApiError> {
        if let Some(message) = self.decode {
            return Err(ApiError::bad_request(format!(
                "{kind} in version \"{version}\" cannot be handled as a {kind}: {message}",
                kind = rt.kind,
                version = rt.versions.first().cloned().unwrap_or_default()
            )));
        }
        if self.causes.is_empty() {
            return Ok(());
        }
        let parts: Vec<String> = self
            .causes
            .iter()
            .map(|c| format!("{}: {}", c.field, c.message))
            .collect();
        let summary = if parts.len() == 1 {
            parts[0].clone()
        } else {
            format!("[{}]", parts.join(", "))
        };
        let mut details = json!({"name": name, "kind": rt.kind,
            "causes": self.causes.iter().map(|c| json!({"reason": c.reason, "message": c.message, "field": c.field})).collect::<Vec<_>>()});
        if !rt.group.is_empty() {
            details["group"] = json!(rt.group);
        }
        Err(ApiError {
            code: 422,
            reason: "Invalid",
            message: format!("{} \"{name}\" is invalid: {summary}", rt.kind),
            details,
        })
    }
}

pub(crate) fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

pub(crate) fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        })
}

fn is_name_part(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()
}

/// The messages of `IsQualifiedName` for `key` (empty when valid).
fn qualified_name_problems(key: &str) -> Vec<String> {
    let parts: Vec<&str> = key.split('/').collect();
    let (prefix, name) = match parts.as_slice() {
        [name] => (None, *name),
        [prefix, name] => (Some(*prefix), *name),
        _ => return vec![QUALIFIED_NAME.to_owned()],
    };
    let mut out = Vec::new();
    if let Some(prefix) = prefix {
        if prefix.is_empty() {
            out.push("prefix part must be non-empty".to_owned());
        } else if !is_dns1123_subdomain(prefix) {
            out.push(format!("prefix part {DNS1123_SUBDOMAIN}"));
        }
    }
    if name.is_empty() {
        out.push("name part must be non-empty".to_owned());
    } else if name.len() > 63 {
        out.push("name part must be no more than 63 characters".to_owned());
    } else if !is_name_part(name) {
        out.push(NAME_PART.to_owned());
    }
    out
}

fn label_value_problems(value: &str) -> Vec<String> {
    let mut out = Vec::new();
    if value.len() > 63 {
        out.push("must be no more than 63 characters".to_owned());
    }
    let shaped = value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && value
            .as_bytes()
            .first()
            .is_some_and(u8::is_ascii_alphanumeric)
        && value
            .as_bytes()
            .last()
            .is_some_and(u8::is_ascii_alphanumeric);
    if !value.is_empty() && !shaped {
        out.push(LABEL_VALUE.to_owned());
    }
    out
}

fn check_labels(errors: &mut Errors, labels: Option<&Value>, field: &str) {
    let Some(map) = labels.and_then(Value::as_object) else {
        return;
    };
    for (key, value) in map {
        for problem in qualified_name_problems(key) {
            errors.invalid(field, &json!(key), &problem);
        }
        match value.as_str() {
            Some(text) => {
                for problem in label_value_problems(text) {
                    errors.invalid(field, value, &problem);
                }
            }
            None => errors.invalid(field, value, "label values must be strings"),
        }
    }
}

fn check_metadata(errors: &mut Errors, object: &Value, name_is_label: bool) {
    let name = object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if name_is_label {
        if name.len() > 63 {
            errors.invalid(
                "metadata.name",
                &json!(name),
                "must be no more than 63 characters",
            );
        } else if !is_dns1123_label(name) {
            errors.invalid("metadata.name", &json!(name), DNS1123_LABEL);
        }
    } else if name.len() > 253 {
        errors.invalid(
            "metadata.name",
            &json!(name),
            "must be no more than 253 characters",
        );
    } else if !is_dns1123_subdomain(name) {
        errors.invalid("metadata.name", &json!(name), DNS1123_SUBDOMAIN);
    }
    check_labels(
        errors,
        object.pointer("/metadata/labels"),
        "metadata.labels",
    );
    if let Some(annotations) = object
        .pointer("/metadata/annotations")
        .and_then(Value::as_object)
    {
        let mut total = 0;
        for (key, value) in annotations {
            total += key.len() + value.as_str().map(str::len).unwrap_or(0);
            for problem in qualified_name_problems(&key.to_lowercase()) {
                errors.invalid("metadata.annotations", &json!(key), &problem);
            }
        }
        if total > ANNOTATIONS_MAX {
            errors.push(
                "FieldValueTooLong",
                "metadata.annotations",
                format!("Too long: may not be more than {ANNOTATIONS_MAX} bytes"),
            );
        }
    }
}

/// A quantity's value in nano-units; `None` when it does not parse.
pub(crate) fn quantity(text: &str) -> Option<i128> {
    let (negative, rest) = match text.as_bytes().first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    let split = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    let (number, suffix) = rest.split_at(split);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if (whole.is_empty() && fraction.is_empty())
        || fraction.contains('.')
        || whole.len() + fraction.len() > 30
    {
        return None;
    }
    let digits: i128 = format!("{whole}{fraction}").parse().ok()?;
    let (binary, exponent): (i128, i32) = match suffix {
        "" => (1, 0),
        "Ki" => (1 << 10, 0),
        "Mi" => (1 << 20, 0),
        "Gi" => (1 << 30, 0),
        "Ti" => (1 << 40, 0),
        "Pi" => (1 << 50, 0),
        "Ei" => (1 << 60, 0),
        "n" => (1, -9),
        "u" => (1, -6),
        "m" => (1, -3),
        "k" => (1, 3),
        "M" => (1, 6),
        "G" => (1, 9),
        "T" => (1, 12),
        "P" => (1, 15),
        "E" => (1, 18),
        other => {
            let exp = other.strip_prefix(['e', 'E'])?;
            let bare = exp.strip_prefix(['+', '-']).unwrap_or(exp);
            if bare.is_empty() || !bare.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            (1, exp.parse::<i32>().ok().filter(|e| e.abs() <= 18)?)
        }
    };
    let shift = exponent + 9 - fraction.len() as i32;
    let scaled = digits.checked_mul(binary)?;
    let value = if shift >= 0 {
        scaled.checked_mul(10i128.checked_pow(shift as u32)?)?
    } else {
        let divisor = 10i128.checked_pow((-shift) as u32)?;
        (scaled + divisor - 1) / divisor
    };
    Some(if negative { -value } else { value })
}

/// A quantity string as the API server prints a sum: whole units, `m`, or
/// binary suffixes for exact byte multiples.
pub(crate) fn format_quantity(resource: &str, nano: i128) -> String {
    const NANO: i128 = 1_000_000_000;
    let memory_like = resource.contains("memory") || resource.contains("storage");
    if memory_like && nano % NANO == 0 {
        let bytes = nano / NANO;
        for (suffix, size) in [("Gi", 1i128 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)] {
            if bytes != 0 && bytes % size == 0 {
                return format!("{}{suffix}", bytes / size);
            }
        }
        return bytes.to_string();
    }
    if nano % NANO == 0 {
        (nano / NANO).to_string()
    } else if nano % 1_000_000 == 0 {
        format!("{}m", nano / 1_000_000)
    } else {
        format!("{nano}n")
    }
}

/// Where a pod spec sits and how strictly its quantities are decoded.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PodSpecIn {
    /// A built-in type (Pod, Job): full validation, quantities decoded (400).
    BuiltIn,
    /// Job template: as built-in, restart policy Never/OnFailure.
    JobTemplate,
    /// A CRD's embedded template: structural schema only (422 pattern).
    Crd,
}

fn check_quantity(
    errors: &mut Errors,
    field: &str,
    value: &Value,
    mode: PodSpecIn,
) -> Option<i128> {
    let text = match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => String::new(),
    };
    match quantity(&text) {
        Some(v) => {
            if v < 0 && mode != PodSpecIn::Crd {
                errors.invalid(field, value, "must be greater than or equal to 0");
            }
            Some(v)
        }
        None => {
            if mode == PodSpecIn::Crd {
                errors.invalid(
                    field,
                    value,
                    &format!("{field} in body should match '{CRD_QUANTITY_PATTERN}'"),
                );
            } else if errors.decode.is_none() {
                errors.decode = Some(format!(
                    "quantities must match the regular expression '{QUANTITY_REGEX}'"
                ));
            }
            None
        }
    }
}

fn check_pod_spec(errors: &mut Errors, spec: Option<&Value>, path: &str, mode: PodSpecIn) {
    let Some(spec) = spec.filter(|s| s.is_object()) else {
        if mode != PodSpecIn::Crd {
            errors.required(format!("{path}.containers"), "");
        }
        return;
    };
    let volumes: Vec<String> = spec
        .get("volumes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|v| v.get("name").and_then(Value::as_str).map(str::to_owned))
        .collect();
    if mode != PodSpecIn::Crd {
        for (i, name) in volumes.iter().enumerate() {
            if !is_dns1123_label(name) {
                errors.invalid(
                    format!("{path}.volumes[{i}].name"),
                    &json!(name),
                    DNS1123_LABEL,
                );
            }
            if volumes[..i].contains(name) {
                errors.duplicate(format!("{path}.volumes[{i}].name"), &json!(name));
            }
        }
        match spec.get("restartPolicy").and_then(Value::as_str) {
            None if mode == PodSpecIn::JobTemplate => errors.required(
                format!("{path}.restartPolicy"),
                "valid values: \"OnFailure\", \"Never\"",
            ),
            Some(p) if mode == PodSpecIn::JobTemplate && !matches!(p, "OnFailure" | "Never") => {
                errors.not_supported(
                    format!("{path}.restartPolicy"),
                    &json!(p),
                    &["OnFailure", "Never"],
                )
            }
            Some(p) if !matches!(p, "Always" | "OnFailure" | "Never") => errors.not_supported(
                format!("{path}.restartPolicy"),
                &json!(p),
                &["Always", "OnFailure", "Never"],
            ),
            _ => {}
        }
        for field in ["serviceAccountName", "runtimeClassName"] {
            if let Some(name) = spec.get(field).and_then(Value::as_str)
                && !name.is_empty()
                && !is_dns1123_subdomain(name)
            {
                errors.invalid(format!("{path}.{field}"), &json!(name), DNS1123_SUBDOMAIN);
            }
        }
    }
    let containers = spec.get("containers").and_then(Value::as_array);
    if containers.is_none_or(|c| c.is_empty()) {
        errors.required(format!("{path}.containers"), "");
    }
    let mut names: Vec<String> = Vec::new();
    for (i, c) in containers.into_iter().flatten().enumerate() {
        let at = format!("{path}.containers[{i}]");
        let name = c.get("name").and_then(Value::as_str).unwrap_or_default();
        if name.is_empty() {
            errors.required(format!("{at}.name"), "");
        } else if mode != PodSpecIn::Crd {
            if !is_dns1123_label(name) {
                errors.invalid(format!("{at}.name"), &json!(name), DNS1123_LABEL);
            }
            if names.iter().any(|n| n == name) {
                errors.duplicate(format!("{at}.name"), &json!(name));
            }
        }
        names.push(name.to_owned());
        if mode == PodSpecIn::Crd {
            for kind in ["requests", "limits"] {
                for (resource, value) in c
                    .pointer(&format!("/resources/{kind}"))
                    .and_then(Value::as_object)
                    .into_iter()
                    .flatten()
                {
                    check_quantity(
                        errors,
                        &format!("{at}.resources.{kind}.{resource}"),
                        value,
                        mode,
                    );
                }
            }
            continue;
        }
        if c.get("image")
            .and_then(Value::as_str)
            .is_none_or(|s| s.trim().is_empty())
        {
            errors.required(format!("{at}.image"), "");
        }
        for (j, var) in c
            .get("env")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let var_name = var.get("name").and_then(Value::as_str).unwrap_or_default();
            let ok = var_name
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_alphabetic() || b"-._".contains(&b))
                && var_name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
            if var_name.is_empty() {
                errors.required(format!("{at}.env[{j}].name"), "");
            } else if !ok {
                errors.invalid(format!("{at}.env[{j}].name"), &json!(var_name), ENV_NAME);
            }
        }
        for (j, mount) in c
            .get("volumeMounts")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let volume = mount
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if !volumes.iter().any(|v| v == volume) {
                errors.not_found(format!("{at}.volumeMounts[{j}].name"), &json!(volume));
            }
            if mount
                .get("mountPath")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
            {
                errors.required(format!("{at}.volumeMounts[{j}].mountPath"), "");
            }
        }
        let mut parsed: Vec<(&str, String, i128, Value)> = Vec::new();
        for kind in ["requests", "limits"] {
            for (resource, value) in c
                .pointer(&format!("/resources/{kind}"))
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
            {
                let field = format!("{at}.resources.{kind}[{resource}]");
                if let Some(v) = check_quantity(errors, &field, value, mode) {
                    parsed.push((kind, resource.clone(), v, value.clone()));
                }
            }
        }
        for (kind, resource, request, value) in &parsed {
            if *kind != "requests" {
                continue;
            }
            if let Some((_, _, limit, limit_value)) = parsed
                .iter()
                .find(|(k, r, _, _)| *k == "limits" && r == resource)
                && request > limit
            {
                errors.invalid(
                    format!("{at}.resources.requests"),
                    value,
                    &format!(
                        "must be less than or equal to {resource} limit of {}",
                        limit_value
                            .as_str()
                            .map(str::to_owned)
                            .unwrap_or_else(|| limit_value.to_string())
                    ),
                );
            }
        }
    }
}

/// `LimitRange` items: quantities decode, and min ≤ default request ≤
/// default ≤ max per resource, in the API server's words.
fn check_limit_range(errors: &mut Errors, object: &Value) {
    for (i, item) in object
        .pointer("/spec/limits")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let at = format!("spec.limits[{i}]");
        let mut parsed: std::collections::BTreeMap<(&str, String), (i128, String)> =
            std::collections::BTreeMap::new();
        for section in [
            "max",
            "min",
            "default",
            "defaultRequest",
            "maxLimitRequestRatio",
        ] {
            for (resource, value) in item
                .get(section)
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
            {
                let field = format!("{at}.{section}[{resource}]");
                if let Some(v) = check_quantity(errors, &field, value, PodSpecIn::BuiltIn) {
                    let text = value
                        .as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| value.to_string());
                    parsed.insert((section, resource.clone()), (v, text));
                }
            }
        }
        let get =
            |section: &str, resource: &str| parsed.get(&(section, resource.to_owned())).cloned();
        let resources: std::collections::BTreeSet<String> =
            parsed.keys().map(|(_, r)| r.clone()).collect();
        for resource in resources {
            let pairs = [
                ("min", "max", "min value {a} is greater than max value {b}"),
                (
                    "default",
                    "max",
                    "default value {a} is greater than max value {b}",
                ),
                (
                    "defaultRequest",
                    "max",
                    "default request value {a} is greater than max value {b}",
                ),
                (
                    "min",
                    "defaultRequest",
                    "min value {a} is greater than default request value {b}",
                ),
                (
                    "defaultRequest",
                    "default",
                    "default request value {a} is greater than default limit value {b}",
                ),
            ];
            for (lower, upper, template) in pairs {
                if let (Some((a, a_text)), Some((b, b_text))) =
                    (get(lower, &resource), get(upper, &resource))
                    && a > b
                {
                    errors.invalid(
                        format!("{at}.{lower}[{resource}]"),
                        &json!(a_text),
                        &template.replace("{a}", &a_text).replace("{b}", &b_text),
                    );
                }
            }
        }
    }
}

fn non_negative(errors: &mut Errors, object: &Value, pointer: &str, field: &str) {
    if let Some(v) = object.pointer(pointer)
        && v.as_i64().is_none_or(|n| n < 0)
    {
        errors.invalid(field, v, "must be greater than or equal to 0");
    }
}

fn is_cidr(text: &str) -> bool {
    let Some((addr, prefix)) = text.split_once('/') else {
        return false;
    };
    match (addr.parse::<std::net::IpAddr>(), prefix.parse::<u8>()) {
        (Ok(std::net::IpAddr::V4(_)), Ok(p)) => p <= 32 && !prefix.starts_with('+'),
        (Ok(std::net::IpAddr::V6(_)), Ok(p)) => p <= 128 && !prefix.starts_with('+'),
        _ => false,
    }
}

fn check_network_policy(errors: &mut Errors, object: &Value) {
    let spec = object.get("spec").cloned().unwrap_or(json!({}));
    check_labels(
        errors,
        spec.pointer("/podSelector/matchLabels"),
        "spec.podSelector.matchLabels",
    );
    for (i, t) in spec
        .get("policyTypes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        if !matches!(t.as_str(), Some("Ingress" | "Egress")) {
            errors.not_supported(format!("spec.policyTypes[{i}]"), t, &["Ingress", "Egress"]);
        }
    }
    for (direction, peers_key) in [("egress", "to"), ("ingress", "from")] {
        for (i, rule) in spec
            .get(direction)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            for (j, port) in rule
                .get("ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .enumerate()
            {
                let at = format!("spec.{direction}[{i}].ports[{j}]");
                if let Some(p) = port.get("protocol")
                    && !matches!(p.as_str(), Some("TCP" | "UDP" | "SCTP"))
                {
                    errors.not_supported(format!("{at}.protocol"), p, &["SCTP", "TCP", "UDP"]);
                }
                if let Some(n) = port.get("port").and_then(Value::as_i64)
                    && !(1..=65535).contains(&n)
                {
                    errors.invalid(
                        format!("{at}.port"),
                        &json!(n),
                        "must be between 1 and 65535, inclusive",
                    );
                }
            }
            for (j, peer) in rule
                .get(peers_key)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .enumerate()
            {
                let at = format!("spec.{direction}[{i}].{peers_key}[{j}]");
                for selector in ["podSelector", "namespaceSelector"] {
                    check_labels(
                        errors,
                        peer.pointer(&format!("/{selector}/matchLabels")),
                        &format!("{at}.{selector}.matchLabels"),
                    );
                }
                if let Some(block) = peer.get("ipBlock") {
                    let cidr = block
                        .get("cidr")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    if !is_cidr(cidr) {
                        errors.invalid(
                            format!("{at}.ipBlock.cidr"),
                            &json!(cidr),
                            "must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)",
                        );
                    }
                    for (k, except) in block
                        .get("except")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .enumerate()
                    {
                        if !except.as_str().is_some_and(is_cidr) {
                            errors.invalid(
                                format!("{at}.ipBlock.except[{k}]"),
                                except,
                                "must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)",
                            );
                        }
                    }
                }
            }
        }
    }
}

fn fqdn_ok(text: &str, wildcard: bool) -> bool {
    let body = text.strip_suffix('.').unwrap_or(text);
    !body.is_empty()
        && body.split('.').all(|part| {
            !part.is_empty()
                && part.bytes().all(|b| {
                    b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || (wildcard && b == b'*')
                })
        })
}

fn check_cilium_policy(errors: &mut Errors, object: &Value) {
    for direction in ["egress", "egressDeny"] {
        for (i, rule) in object
            .pointer(&format!("/spec/{direction}"))
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            for (j, fqdn) in rule
                .get("toFQDNs")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .enumerate()
            {
                for (key, pattern, wildcard) in [
                    ("matchName", FQDN_MATCH_NAME, false),
                    ("matchPattern", FQDN_MATCH_PATTERN, true),
                ] {
                    if let Some(value) = fqdn.get(key) {
                        let field = format!("spec.{direction}[{i}].toFQDNs[{j}].{key}");
                        if !value.as_str().is_some_and(|t| fqdn_ok(t, wildcard)) {
                            errors.invalid(
                                field.clone(),
                                value,
                                &format!("{field} in body should match '{pattern}'"),
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Validates an object about to be stored (create or update).
pub(crate) fn validate(rt: &ResourceType, object: &Value) -> Result<(), ApiError> {
    let mut errors = Errors::default();
    let name = object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let namespace_name = rt.group.is_empty() && rt.plural == "namespaces";
    check_metadata(&mut errors, object, namespace_name);
    match (rt.group.as_str(), rt.plural.as_str()) {
        ("", "secrets") | ("", "configmaps") => {
            for section in ["data", "binaryData"] {
                for key in object
                    .get(section)
                    .and_then(Value::as_object)
                    .into_iter()
                    .flatten()
                    .map(|(k, _)| k)
                {
                    let bad = key.is_empty()
                        || key.len() > 253
                        || !key
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
                        || key == "."
                        || key == ".."
                        || key.starts_with("..");
                    if bad {
                        errors.invalid(format!("{section}[{key}]"), &json!(key), CONFIG_KEY);
                    }
                }
            }
        }
        ("", "pods") => check_pod_spec(&mut errors, object.get("spec"), "spec", PodSpecIn::BuiltIn),
        ("batch", "jobs") => {
            match object.pointer("/spec/template") {
                Some(template) => {
                    check_labels(
                        &mut errors,
                        template.pointer("/metadata/labels"),
                        "spec.template.metadata.labels",
                    );
                    check_pod_spec(
                        &mut errors,
                        template.get("spec"),
                        "spec.template.spec",
                        PodSpecIn::JobTemplate,
                    );
                }
                None => errors.required("spec.template", ""),
            }
            for (pointer, field) in [
                ("/spec/backoffLimit", "spec.backoffLimit"),
                ("/spec/activeDeadlineSeconds", "spec.activeDeadlineSeconds"),
                (
                    "/spec/ttlSecondsAfterFinished",
                    "spec.ttlSecondsAfterFinished",
                ),
                ("/spec/completions", "spec.completions"),
                ("/spec/parallelism", "spec.parallelism"),
            ] {
                non_negative(&mut errors, object, pointer, field);
            }
        }
        ("", "resourcequotas") => {
            for (resource, value) in object
                .pointer("/spec/hard")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
            {
                check_quantity(
                    &mut errors,
                    &format!("spec.hard[{resource}]"),
                    value,
                    PodSpecIn::BuiltIn,
                );
            }
        }
        ("", "limitranges") => check_limit_range(&mut errors, object),
        ("networking.k8s.io", "networkpolicies") => check_network_policy(&mut errors, object),
        ("cilium.io", "ciliumnetworkpolicies") => check_cilium_policy(&mut errors, object),
        ("agents.x-k8s.io", "sandboxes") => match object.pointer("/spec/podTemplate") {
            _ if !object.get("spec").is_some_and(Value::is_object) => errors.required("spec", ""),
            Some(template) if template.is_object() => {
                if !template.get("spec").is_some_and(Value::is_object) {
                    errors.required("spec.podTemplate.spec", "");
                }
                for (key, supported) in [
                    ("operatingMode", &["Running", "Suspended"][..]),
                    ("shutdownPolicy", &["Delete", "Retain"][..]),
                ] {
                    if let Some(value) = object.pointer(&format!("/spec/{key}"))
                        && !value.as_str().is_some_and(|v| supported.contains(&v))
                    {
                        errors.not_supported(format!("spec.{key}"), value, supported);
                    }
                }
                if let Some(replicas) = object.pointer("/spec/replicas") {
                    match replicas.as_i64() {
                        Some(n) if n > 1 => errors.invalid(
                            "spec.replicas",
                            replicas,
                            "spec.replicas in body should be less than or equal to 1",
                        ),
                        Some(n) if n < 0 => errors.invalid(
                            "spec.replicas",
                            replicas,
                            "spec.replicas in body should be greater than or equal to 0",
                        ),
                        Some(_) => {}
                        None => errors.invalid(
                            "spec.replicas",
                            replicas,
                            "spec.replicas in body must be of type integer",
                        ),
                    }
                }
                check_labels(
                    &mut errors,
                    template.pointer("/metadata/labels"),
                    "spec.podTemplate.metadata.labels",
                );
                check_pod_spec(
                    &mut errors,
                    template.get("spec"),
                    "spec.podTemplate.spec",
                    PodSpecIn::Crd,
                );
            }
            _ => errors.required("spec.podTemplate", ""),
        },
        _ => {}
    }
    errors.into_result(rt, &name)
}

/// The `Sandbox` CRD's structural schema at `version`: unknown fields of
/// `spec`, `spec.podTemplate` and its `metadata` are pruned, and the
/// schema's defaults filled in (`v1beta1`: `operatingMode: Running`;
/// `v1alpha1`: `replicas: 1`; both: `shutdownPolicy: Retain`).
pub(crate) fn prune_and_default_sandbox(version: &str, object: &mut Value) {
    let known: &[&str] = if version == "v1alpha1" {
        &[
            "podTemplate",
            "replicas",
            "service",
            "shutdownPolicy",
            "shutdownTime",
            "volumeClaimTemplates",
        ]
    } else {
        &[
            "operatingMode",
            "podTemplate",
            "service",
            "shutdownPolicy",
            "shutdownTime",
            "volumeClaimTemplates",
        ]
    };
    let Some(spec) = object.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    spec.retain(|k, _| known.contains(&k.as_str()));
    let defaults: &[(&str, Value)] = if version == "v1alpha1" {
        &[("replicas", json!(1)), ("shutdownPolicy", json!("Retain"))]
    } else {
        &[
            ("operatingMode", json!("Running")),
            ("shutdownPolicy", json!("Retain")),
        ]
    };
    for (key, value) in defaults {
        spec.entry(*key).or_insert_with(|| value.clone());
    }
    if let Some(template) = spec.get_mut("podTemplate").and_then(Value::as_object_mut) {
        template.retain(|k, _| k == "metadata" || k == "spec");
        if let Some(metadata) = template.get_mut("metadata").and_then(Value::as_object_mut) {
            metadata.retain(|k, _| k == "labels" || k == "annotations");
        }
    }
}

/// The defaults the API server fills into a new Job, given its uid: the
/// selector on `batch.kubernetes.io/controller-uid`, the template labels
/// the selector and the Job controller use, completions and parallelism 1,
/// backoffLimit 6, and the policy fields.
pub(crate) fn default_job(job: &mut Value, uid: &str) {
    let name = job
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let Some(spec) = job.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    for (key, value) in [
        ("completions", json!(1)),
        ("parallelism", json!(1)),
        ("backoffLimit", json!(6)),
        ("completionMode", json!("NonIndexed")),
        ("suspend", json!(false)),
        ("podReplacementPolicy", json!("TerminatingOrFailed")),
        ("manualSelector", Value::Null),
    ] {
        if !spec.contains_key(key) && !value.is_null() {
            spec.insert(key.into(), value);
        }
    }
    let manual = spec.get("manualSelector") == Some(&json!(true));
    if !manual {
        spec.insert(
            "selector".into(),
            json!({"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}),
        );
        let template = spec.entry("template").or_insert_with(|| json!({}));
        if !template["metadata"].is_object() {
            template["metadata"] = json!({});
        }
        if !template["metadata"]["labels"].is_object() {
            template["metadata"]["labels"] = json!({});
        }
        for (k, v) in [
            ("batch.kubernetes.io/controller-uid", uid),
            ("batch.kubernetes.io/job-name", name.as_str()),
            ("controller-uid", uid),
            ("job-name", name.as_str()),
        ] {
            template["metadata"]["labels"][k] = json!(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_and_formatting() {
        assert_eq!(quantity("250m"), Some(250_000_000));
        assert_eq!(quantity("4Gi"), Some((4i128 << 30) * 1_000_000_000));
        assert_eq!(quantity("two"), None);
        assert_eq!(format_quantity("limits.cpu", 2_500_000_000), "2500m");
        assert_eq!(format_quantity("limits.cpu", 20_000_000_000), "20");
        assert_eq!(
            format_quantity("requests.memory", (512i128 << 20) * 1_000_000_000),
            "512Mi"
        );
        assert_eq!(format_quantity("pods", 3_000_000_000), "3");
    }

    #[test]
    fn label_problems_follow_apimachinery() {
        assert!(qualified_name_problems("paperclip.io/company-id").is_empty());
        assert_eq!(qualified_name_problems("a/b/c"), [QUALIFIED_NAME]);
        assert_eq!(qualified_name_problems("Bad_Prefix/x").len(), 1);
        assert!(label_value_problems("").is_empty());
        assert_eq!(label_value_problems("Acme, Inc."), [LABEL_VALUE]);
        assert_eq!(
            label_value_problems(&"a".repeat(64)),
            ["must be no more than 63 characters"]
        );
    }
}
