//! The API server's syntax rules for the values the driver puts into
//! objects (apimachinery `validation`): DNS names, label keys and values,
//! annotation keys, Secret keys, environment variable names, resource
//! quantities, and Cilium's `toFQDNs.matchName` pattern. Config validation
//! applies them so a bad value is refused with its field named, before a
//! cluster answers 422.

/// A DNS-1123 label: at most 63 lower-case alphanumerics or `-`, starting
/// and ending with an alphanumeric (namespace names).
pub fn is_dns1123_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A DNS-1123 subdomain: at most 253 characters, dot-separated labels of
/// lower-case alphanumerics and `-` (most object names).
pub fn is_dns1123_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && s.split('.').all(|part| {
            !part.is_empty()
                && part.as_bytes()[0].is_ascii_alphanumeric()
                && part.as_bytes()[part.len() - 1].is_ascii_alphanumeric()
        })
}

/// The name part of a qualified name (and a non-empty label value): at most
/// 63 alphanumerics, `-`, `_` or `.`, starting and ending alphanumeric.
fn is_name_part(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()
}

/// A label value: empty, or a name part (at most 63 characters).
///
/// ```
/// use paperclip_env_providers::kubernetes::validation::is_label_value;
/// assert!(is_label_value("acme-inc") && is_label_value(""));
/// assert!(!is_label_value("Acme, Inc."));
/// ```
pub fn is_label_value(s: &str) -> bool {
    s.is_empty() || is_name_part(s)
}

/// A qualified name (label keys, annotation keys): `[prefix/]name`, the
/// prefix a DNS-1123 subdomain, the name a name part.
///
/// ```
/// use paperclip_env_providers::kubernetes::validation::is_qualified_name;
/// assert!(is_qualified_name("eks.amazonaws.com/role-arn"));
/// assert!(!is_qualified_name("bad key!") && !is_qualified_name("/x"));
/// ```
pub fn is_qualified_name(s: &str) -> bool {
    match s.split_once('/') {
        Some((prefix, name)) => is_dns1123_subdomain(prefix) && is_name_part(name),
        None => is_name_part(s),
    }
}

/// A Secret or ConfigMap data key: at most 253 of `[-._a-zA-Z0-9]`, not
/// `.` or `..` and not starting with `..`.
pub fn is_config_map_key(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        && s != "."
        && !s.starts_with("..")
}

/// A portable environment variable name (`[A-Za-z_][A-Za-z0-9_]*`): what
/// `envFrom` keeps and what a shell can export.
pub fn is_env_var_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Cilium's CRD pattern for `toFQDNs[].matchName`: `^([-a-zA-Z0-9_]+[.]?)+$`.
///
/// ```
/// use paperclip_env_providers::kubernetes::validation::is_fqdn_match_name;
/// assert!(is_fqdn_match_name("api.anthropic.com") && is_fqdn_match_name("example.com."));
/// assert!(!is_fqdn_match_name("*.example.com") && !is_fqdn_match_name("a..b"));
/// ```
pub fn is_fqdn_match_name(s: &str) -> bool {
    let body = s.strip_suffix('.').unwrap_or(s);
    !body.is_empty()
        && body.split('.').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// A resource quantity in nano-units (`1` → 1e9, `250m` → 2.5e8, `1Ki` →
/// 1.024e12), rounded up as the API server rounds sub-nano precision;
/// `None` when `s` is not a quantity (`<sign><number><suffix>`, suffix one
/// of `Ki Mi Gi Ti Pi Ei`, `n u m k M G T P E`, or `e<exponent>`).
///
/// ```
/// use paperclip_env_providers::kubernetes::validation::parse_quantity;
/// assert_eq!(parse_quantity("250m"), Some(250_000_000));
/// assert_eq!(parse_quantity("2Gi"), Some(2 * (1 << 30) * 1_000_000_000));
/// assert_eq!(parse_quantity("1e3"), Some(1_000 * 1_000_000_000));
/// assert_eq!(parse_quantity("two"), None);
/// ```
pub fn parse_quantity(s: &str) -> Option<i128> {
    let (negative, rest) = match s.as_bytes().first()? {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    let split = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    let (number, suffix) = rest.split_at(split);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') {
        return None;
    }
    if whole.len() + fraction.len() > 30 {
        return None;
    }
    // value = digits * 10^(-fraction.len()) * multiplier
    let digits: i128 = format!("{whole}{fraction}").parse().ok()?;
    let (binary, decimal_exp): (i128, i32) = match suffix {
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
            let digits_only = exp.strip_prefix(['+', '-']).unwrap_or(exp);
            if digits_only.is_empty() || !digits_only.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            (1, exp.parse::<i32>().ok().filter(|e| e.abs() <= 18)?)
        }
    };
    // Nano-units: shift by 9, minus the fraction's digits.
    let shift = decimal_exp + 9 - fraction.len() as i32;
    let scaled = digits.checked_mul(binary)?;
    let value = if shift >= 0 {
        scaled.checked_mul(10i128.checked_pow(shift as u32)?)?
    } else {
        let divisor = 10i128.checked_pow((-shift) as u32)?;
        (scaled + divisor - 1) / divisor
    };
    Some(if negative { -value } else { value })
}

/// Makes any string a valid label value that stays unique: a value that is
/// already valid is kept as is; anything else becomes its cleaned form
/// (other characters → `-`, at most 54 characters, alphanumeric ends)
/// plus `-` and 8 hex digits of its SHA-256, so distinct inputs never share
/// a label. The raw value belongs in an annotation.
///
/// ```
/// use paperclip_env_providers::kubernetes::validation::{label_value, is_label_value};
/// assert_eq!(label_value("run-1"), "run-1");
/// let acme = label_value("Acme, Inc.");
/// assert!(acme.starts_with("Acme--Inc-") && is_label_value(&acme));
/// assert!(is_label_value(&label_value(&"x".repeat(100))));
/// ```
pub fn label_value(value: &str) -> String {
    use sha2::{Digest, Sha256};
    if is_label_value(value) {
        return value.to_owned();
    }
    let cleaned: String = value
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(54)
        .collect();
    let head = cleaned.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    let digest = Sha256::digest(value.as_bytes());
    let hex: String = digest.iter().take(4).map(|b| format!("{b:02x}")).collect();
    if head.is_empty() {
        hex
    } else {
        format!("{head}-{hex}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_parse_like_the_api_server() {
        let gi = 1i128 << 30;
        let cases = [
            ("1", Some(1_000_000_000)),
            ("0.5", Some(500_000_000)),
            (".5", Some(500_000_000)),
            ("100m", Some(100_000_000)),
            ("1n", Some(1)),
            ("128Mi", Some(128 * (1 << 20) * 1_000_000_000)),
            ("1.5Gi", Some(gi * 1_500_000_000)),
            ("2G", Some(2_000_000_000 * 1_000_000_000)),
            ("1E3", Some(1_000_000_000_000)),
            ("-1", Some(-1_000_000_000)),
            ("", None),
            ("1 Gi", None),
            ("1GB", None),
            ("1.2.3", None),
            ("m", None),
            ("1e", None),
            ("abc", None),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_quantity(text), expected, "{text}");
        }
    }

    #[test]
    fn names_keys_and_values() {
        assert!(is_dns1123_subdomain("pc-abc.env") && !is_dns1123_subdomain("a..b"));
        assert!(!is_dns1123_subdomain(&"a".repeat(254)) && !is_dns1123_subdomain("A"));
        assert!(is_qualified_name("paperclip.io/company-id") && is_qualified_name("app"));
        assert!(!is_qualified_name("a/b/c") && !is_qualified_name(&"k".repeat(64)));
        assert!(!is_label_value(&"v".repeat(64)) && !is_label_value("-x"));
        assert!(is_config_map_key("ANTHROPIC_API_KEY") && is_config_map_key("a.b-c"));
        assert!(
            !is_config_map_key("BAD KEY") && !is_config_map_key("..x") && !is_config_map_key(".")
        );
        assert!(is_env_var_name("_A1") && !is_env_var_name("1A") && !is_env_var_name("A-B"));
    }

    #[test]
    fn label_values_are_valid_and_distinct() {
        let long_a = format!("{}a", "x".repeat(70));
        let long_b = format!("{}b", "x".repeat(70));
        assert_ne!(label_value(&long_a), label_value(&long_b));
        for raw in ["Acme, Inc.", "!!!", "ünïcode", &long_a, "-lead", "trail-"] {
            let v = label_value(raw);
            assert!(is_label_value(&v) && !v.is_empty(), "{raw} -> {v}");
        }
        assert_ne!(label_value("a b"), label_value("a-b"));
    }
}
