//! Names and labels (spec 26 §2).

use std::collections::BTreeMap;

use rand::Rng;
use sha2::{Digest, Sha256};

/// `paperclip.io/managed-by` value on every object the driver creates.
pub const MANAGED_BY: &str = "paperclip-k8s-plugin";
/// Crockford base32, lowercase.
const ULID_ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";

/// A lowercase ULID: 10 chars of milliseconds, 16 random chars.
pub fn ulid(now_ms: u64) -> String {
    let mut out = String::with_capacity(26);
    for i in (0..10).rev() {
        out.push(ULID_ALPHABET[((now_ms >> (5 * i)) & 31) as usize] as char);
    }
    let mut rng = rand::rng();
    for _ in 0..16 {
        out.push(ULID_ALPHABET[rng.random_range(0..32)] as char);
    }
    out
}

/// The workload name / provider lease id, `pc-<ulid>` (`^pc-[0-9a-z]{26}$`).
///
/// ```
/// let name = paperclip_env_providers::kubernetes::workload_name();
/// assert_eq!(name.len(), 29);
/// assert!(name.starts_with("pc-"));
/// ```
pub fn workload_name() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    format!("pc-{}", ulid(now))
}

/// Whether `s` is an RFC 1123 DNS label (namespace names).
pub fn is_rfc1123_label(s: &str) -> bool {
    super::validation::is_dns1123_label(s)
}

/// `deriveCompanySlug` (spec 26 §2.1, RECOMMENDED variant): lowercase, runs of
/// other characters → `-`, trimmed of `-`; longer than `max` → the first
/// `max - 9` characters, `-`, and 8 hex of sha256(input); empty → `company`.
///
/// ```
/// use paperclip_env_providers::kubernetes::derive_company_slug;
/// assert_eq!(derive_company_slug("Acme, Inc.", 53), "acme-inc");
/// ```
pub fn derive_company_slug(input: &str, max: usize) -> String {
    let lower = input.to_lowercase();
    let mut slug = String::new();
    let mut in_run = false;
    for c in lower.chars() {
        if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' {
            slug.push(c);
            in_run = false;
        } else if !in_run {
            slug.push('-');
            in_run = true;
        }
    }
    let slug = slug.trim_matches('-').to_owned();
    if slug.is_empty() {
        return "company".into();
    }
    if slug.len() <= max {
        return slug;
    }
    let digest = Sha256::digest(input.as_bytes());
    let hex: String = digest.iter().take(4).map(|b| format!("{b:02x}")).collect();
    let keep = max.saturating_sub(9);
    let head = slug[..keep].trim_end_matches('-');
    format!("{head}-{hex}")
}

/// The tenant namespace: prefix + (slug or the slug derived from the company id), within 63 characters.
///
/// ```
/// use paperclip_env_providers::kubernetes::tenant_namespace;
/// assert_eq!(
///     tenant_namespace("paperclip-", None, "11111111-1111-1111-1111-111111111111"),
///     "paperclip-11111111-1111-1111-1111-111111111111"
/// );
/// ```
pub fn tenant_namespace(prefix: &str, slug: Option<&str>, company_id: &str) -> String {
    match slug {
        Some(s) => format!("{prefix}{s}"),
        None => {
            let max = 63usize.saturating_sub(prefix.len()).max(10);
            format!("{prefix}{}", derive_company_slug(company_id, max))
        }
    }
}

/// `<workload><suffix>` capped at 253 characters: an over-long workload part
/// becomes `head + "-" + last 25` so the total is exactly 253.
///
/// ```
/// use paperclip_env_providers::kubernetes::child_name;
/// assert_eq!(child_name("pc-abc", "-env"), "pc-abc-env");
/// assert_eq!(child_name(&"x".repeat(300), "-egress").len(), 253);
/// ```
pub fn child_name(workload: &str, suffix: &str) -> String {
    const MAX: usize = 253;
    if workload.len() + suffix.len() <= MAX {
        return format!("{workload}{suffix}");
    }
    let room = MAX - suffix.len();
    let tail = &workload[workload.len() - 25..];
    let head = &workload[..room - 26];
    format!("{head}-{tail}{suffix}")
}

/// Run labels (spec 26 §2.3), each value made a valid label value (a raw
/// value that is not one keeps a hashed form; see [`label_value`]).
pub fn run_labels(run_id: &str, company_id: &str, adapter: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("paperclip.io/run-id".to_owned(), label_value(run_id)),
        ("paperclip.io/agent-id".to_owned(), label_value(run_id)),
        (
            "paperclip.io/company-id".to_owned(),
            label_value(company_id),
        ),
        ("paperclip.io/adapter".to_owned(), label_value(adapter)),
        ("paperclip.io/managed-by".to_owned(), MANAGED_BY.to_owned()),
    ])
}

/// Makes a label value valid and unique (see [`super::validation::label_value`]).
pub fn label_value(value: &str) -> String {
    super::validation::label_value(value)
}

/// 32 random bytes as 64 lowercase hex chars.
pub fn bootstrap_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ulid_shape_and_time_prefix() {
        let id = ulid(0);
        assert_eq!(&id[..10], "0000000000");
        assert_eq!(id.len(), 26);
        assert_eq!(&ulid(31)[..10], "000000000z");
        let name = workload_name();
        assert!(name.len() == 29 && name[3..].bytes().all(|b| ULID_ALPHABET.contains(&b)));
    }

    #[test]
    fn slugs_and_namespaces() {
        assert_eq!(derive_company_slug("  Acme, Inc.  ", 53), "acme-inc");
        assert_eq!(derive_company_slug("!!!", 53), "company");
        let long = "a".repeat(60);
        let slug = derive_company_slug(&long, 53);
        assert_eq!(slug.len(), 53);
        assert!(slug.starts_with(&"a".repeat(44)));
        let other = derive_company_slug(&format!("{}b", "a".repeat(59)), 53);
        assert_ne!(slug, other, "ids sharing a prefix never collide");
        let ns = tenant_namespace("paperclip-", None, &long);
        assert!(ns.len() == 63 && is_rfc1123_label(&ns));
        assert_eq!(tenant_namespace("p-", Some("acme"), "x"), "p-acme");
    }

    #[test]
    fn child_names_cap_at_253_keeping_the_tail() {
        assert_eq!(child_name("pc-workload", "-egress"), "pc-workload-egress");
        let long = format!("{}{}", "h".repeat(250), "t".repeat(25));
        let capped = child_name(&long, "-egress");
        assert_eq!(capped.len(), 253);
        assert!(capped.ends_with(&format!("-{}-egress", "t".repeat(25))));
    }

    #[test]
    fn labels_and_tokens() {
        let labels = run_labels("run-1", "co", "claude_local");
        assert_eq!(labels["paperclip.io/agent-id"], "run-1");
        assert_eq!(labels["paperclip.io/managed-by"], MANAGED_BY);
        let cleaned = label_value("conformance run/1!");
        assert!(cleaned.starts_with("conformance-run-1-") && cleaned.len() == 26);
        assert_eq!(
            run_labels("Acme, Inc.", "x", "a")["paperclip.io/run-id"].len(),
            18
        );
        let t = bootstrap_token();
        assert!(
            t.len() == 64
                && t.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
    }
}
