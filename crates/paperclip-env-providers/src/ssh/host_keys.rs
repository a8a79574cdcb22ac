//! Host-key verification against OpenSSH `known_hosts` text (spec 27 §3).
//!
//! Supported: `hostpatterns keytype base64 [comment]` lines, comma-separated
//! patterns with `*`/`?` wildcards and `!` negation, `[host]:port` for
//! non-default ports, hashed `|1|salt|hash` entries, `@revoked` (rejects).
//! `@cert-authority` lines are never a source of trust (host certificates are
//! not supported), so a host known only through one is rejected.
//! The lookup name is the bare host for port 22 and `[host]:port` otherwise,
//! exactly like OpenSSH: an entry `[h]:22` does not match port 22.

use std::path::PathBuf;

use hmac::{KeyInit, Mac};
use russh::keys::{HashAlg, PublicKey};

/// Why a host key was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKeyRejection {
    /// No entry names this host.
    UnknownHost,
    /// Entries name this host, but with other keys.
    Mismatch,
    /// The key is listed as `@revoked`.
    Revoked,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Marker {
    None,
    Revoked,
    CertAuthority,
}

#[derive(Debug, Clone)]
enum Hosts {
    Patterns(Vec<String>),
    Hashed { salt: Vec<u8>, hash: Vec<u8> },
}

#[derive(Debug, Clone)]
struct Entry {
    marker: Marker,
    hosts: Hosts,
    key: PublicKey,
}

/// Parsed `known_hosts` entries. Malformed lines are skipped (like OpenSSH).
#[derive(Debug, Clone, Default)]
pub struct KnownHosts {
    entries: Vec<Entry>,
}

/// The name OpenSSH looks up for `host:port`.
pub fn lookup_name(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_owned()
    } else {
        format!("[{host}]:{port}")
    }
}

/// `*` and `?` glob match, case-insensitive (host names).
fn glob(pattern: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while n < name.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p].eq_ignore_ascii_case(&name[n])) {
            p += 1;
            n += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some(p);
            mark = n;
            p += 1;
        } else if let Some(s) = star {
            p = s + 1;
            mark += 1;
            n = mark;
        } else {
            return false;
        }
    }
    while p < pattern.len() && pattern[p] == b'*' {
        p += 1;
    }
    p == pattern.len()
}

fn hashed_matches(salt: &[u8], hash: &[u8], name: &str) -> bool {
    let Ok(mut mac) = hmac::Hmac::<sha1::Sha1>::new_from_slice(salt) else {
        return false;
    };
    mac.update(name.as_bytes());
    mac.verify_slice(hash).is_ok()
}

impl Hosts {
    fn matches(&self, name: &str) -> bool {
        match self {
            Hosts::Hashed { salt, hash } => hashed_matches(salt, hash, name),
            Hosts::Patterns(patterns) => {
                let mut positive = false;
                for pat in patterns {
                    if let Some(neg) = pat.strip_prefix('!') {
                        if glob(neg.as_bytes(), name.as_bytes()) {
                            return false;
                        }
                    } else if glob(pat.as_bytes(), name.as_bytes()) {
                        positive = true;
                    }
                }
                positive
            }
        }
    }
}

fn parse_hosts(field: &str) -> Option<Hosts> {
    if let Some(rest) = field.strip_prefix("|1|") {
        let (salt, hash) = rest.split_once('|')?;
        let b64 = data_encoding::BASE64;
        return Some(Hosts::Hashed {
            salt: b64.decode(salt.as_bytes()).ok()?,
            hash: b64.decode(hash.as_bytes()).ok()?,
        });
    }
    let patterns: Vec<String> = field
        .split(',')
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect();
    (!patterns.is_empty()).then_some(Hosts::Patterns(patterns))
}

impl KnownHosts {
    /// Parses `known_hosts` text.
    pub fn parse(text: &str) -> Self {
        let mut entries = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut words = line.split_whitespace();
            let Some(mut first) = words.next() else {
                continue;
            };
            let marker = match first {
                "@revoked" => Marker::Revoked,
                "@cert-authority" => Marker::CertAuthority,
                m if m.starts_with('@') => continue,
                _ => Marker::None,
            };
            if marker != Marker::None {
                match words.next() {
                    Some(w) => first = w,
                    None => continue,
                }
            }
            let (Some(_keytype), Some(b64)) = (words.next(), words.next()) else {
                continue;
            };
            let (Some(hosts), Ok(key)) = (
                parse_hosts(first),
                russh::keys::parse_public_key_base64(b64),
            ) else {
                continue;
            };
            entries.push(Entry { marker, hosts, key });
        }
        KnownHosts { entries }
    }

    /// Reads and merges files that exist (missing files are skipped).
    pub fn from_files(paths: &[PathBuf]) -> Self {
        let mut all = KnownHosts::default();
        for path in paths {
            if let Ok(text) = std::fs::read_to_string(path) {
                all.entries.extend(KnownHosts::parse(&text).entries);
            }
        }
        all
    }

    /// The process user's `~/.ssh/known_hosts` plus `/etc/ssh/ssh_known_hosts`.
    pub fn default_files() -> Vec<PathBuf> {
        let mut files = Vec::new();
        if let Some(home) = std::env::var_os("HOME") {
            files.push(PathBuf::from(home).join(".ssh").join("known_hosts"));
        }
        files.push(PathBuf::from("/etc/ssh/ssh_known_hosts"));
        files
    }

    /// Number of usable entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there is no usable entry.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Checks `key` for `host:port`.
    pub fn verify(&self, host: &str, port: u16, key: &PublicKey) -> Result<(), HostKeyRejection> {
        let name = lookup_name(host, port);
        let same = |e: &Entry| e.key.key_data() == key.key_data();
        let matching: Vec<&Entry> = self
            .entries
            .iter()
            .filter(|e| e.hosts.matches(&name))
            .collect();
        if matching
            .iter()
            .any(|e| e.marker == Marker::Revoked && same(e))
            || self
                .entries
                .iter()
                .any(|e| e.marker == Marker::Revoked && same(e) && e.hosts.matches("*"))
        {
            return Err(HostKeyRejection::Revoked);
        }
        let plain: Vec<&&Entry> = matching
            .iter()
            .filter(|e| e.marker == Marker::None)
            .collect();
        if plain.iter().any(|e| same(e)) {
            Ok(())
        } else if plain.is_empty() {
            Err(HostKeyRejection::UnknownHost)
        } else {
            Err(HostKeyRejection::Mismatch)
        }
    }
}

/// How the server's host key is checked.
#[derive(Debug, Clone)]
pub enum HostKeyPolicy {
    /// Accept only keys listed for the host (strict checking).
    Strict(KnownHosts),
    /// Accept any key (`strictHostKeyChecking: false`); the fingerprint is logged at warn.
    AcceptAny,
}

impl HostKeyPolicy {
    /// The policy of an `ssh` config: strict with the given text, strict
    /// with the process user's files when `known_hosts` is `None`, or
    /// accept-any when not strict.
    pub fn from_config(strict: bool, known_hosts: Option<&str>) -> Self {
        match (strict, known_hosts) {
            (false, _) => HostKeyPolicy::AcceptAny,
            (true, Some(text)) => HostKeyPolicy::Strict(KnownHosts::parse(text)),
            (true, None) => {
                HostKeyPolicy::Strict(KnownHosts::from_files(&KnownHosts::default_files()))
            }
        }
    }

    /// Checks `key` for `host:port`.
    pub fn check(&self, host: &str, port: u16, key: &PublicKey) -> Result<(), HostKeyRejection> {
        match self {
            HostKeyPolicy::AcceptAny => {
                tracing::warn!(
                    host,
                    port,
                    fingerprint = %key.fingerprint(HashAlg::Sha256),
                    "SSH host key accepted without verification (strictHostKeyChecking is false)"
                );
                Ok(())
            }
            HostKeyPolicy::Strict(known) => known.verify(host, port, key),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIDVOpC2QJSZt9/hO2PJnlHp5C12yQxflWCI+3bvfT8PP";
    const OTHER: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIAAbeg6EYwpjRwtZ3mfRjZdQc5xYbvpk2aivSzjJ9y3Q";

    fn key(b64: &str) -> PublicKey {
        russh::keys::parse_public_key_base64(b64).unwrap()
    }

    #[test]
    fn port_22_uses_bare_host_others_bracketed() {
        let kh = KnownHosts::parse(&format!("h ssh-ed25519 {KEY}\n[h]:2222 ssh-ed25519 {KEY}"));
        assert_eq!(kh.verify("h", 22, &key(KEY)), Ok(()));
        assert_eq!(kh.verify("h", 2222, &key(KEY)), Ok(()));
        assert_eq!(
            kh.verify("h", 2200, &key(KEY)),
            Err(HostKeyRejection::UnknownHost)
        );
        let only_bracketed = KnownHosts::parse(&format!("[h]:22 ssh-ed25519 {KEY}"));
        assert_eq!(
            only_bracketed.verify("h", 22, &key(KEY)),
            Err(HostKeyRejection::UnknownHost)
        );
    }

    #[test]
    fn patterns_negation_comments_and_mismatch() {
        let kh = KnownHosts::parse(&format!(
            "# comment\n\n*.example.com,!bad.example.com ssh-ed25519 {KEY} c\ngarbage line\n"
        ));
        assert_eq!(kh.len(), 1);
        assert_eq!(kh.verify("a.example.com", 22, &key(KEY)), Ok(()));
        assert_eq!(
            kh.verify("bad.example.com", 22, &key(KEY)),
            Err(HostKeyRejection::UnknownHost)
        );
        assert_eq!(
            kh.verify("a.example.com", 22, &key(OTHER)),
            Err(HostKeyRejection::Mismatch)
        );
    }

    #[test]
    fn revoked_and_cert_authority() {
        let kh = KnownHosts::parse(&format!(
            "h ssh-ed25519 {KEY}\n@revoked h ssh-ed25519 {KEY}\n@cert-authority g ssh-ed25519 {OTHER}"
        ));
        assert_eq!(
            kh.verify("h", 22, &key(KEY)),
            Err(HostKeyRejection::Revoked)
        );
        assert_eq!(
            kh.verify("g", 22, &key(OTHER)),
            Err(HostKeyRejection::UnknownHost)
        );
    }

    #[test]
    fn glob_basics() {
        assert!(glob(b"*", b"anything"));
        assert!(glob(b"h?st", b"HOST"));
        assert!(!glob(b"h?st", b"hoost"));
        assert!(glob(b"10.0.*.1", b"10.0.33.1"));
    }
}
