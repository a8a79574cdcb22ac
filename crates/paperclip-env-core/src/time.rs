//! Timestamps in Paperclip's JSON form: ISO-8601, UTC, millisecond precision,
//! `Z` suffix (`2026-05-11T10:00:00.000Z`).

use chrono::{DateTime, SubsecRound, Utc};

/// A UTC instant.
pub type Timestamp = DateTime<Utc>;

/// Now, truncated to milliseconds so stored and serialized values agree.
pub fn now() -> Timestamp {
    Utc::now().trunc_subsecs(3)
}

/// Formats an instant the way Paperclip stores it.
pub fn to_iso(ts: &Timestamp) -> String {
    ts.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

/// Parses an ISO-8601 instant; `None` when empty or unparsable
/// (spec 00 §5.4.1 Decision: an unparsable provider expiry is treated as null).
pub fn parse_iso(value: &str) -> Option<Timestamp> {
    let value = value.trim();
    if value.is_empty() {
        return None;
    }
    DateTime::parse_from_rfc3339(value)
        .ok()
        .map(|d| d.with_timezone(&Utc).trunc_subsecs(3))
}

/// Serde adapter for required timestamps.
pub mod iso {
    use super::*;
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    /// Serialize.
    pub fn serialize<S: Serializer>(ts: &Timestamp, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&to_iso(ts))
    }

    /// Deserialize.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Timestamp, D::Error> {
        let raw = String::deserialize(d)?;
        parse_iso(&raw).ok_or_else(|| D::Error::custom(format!("invalid timestamp {raw:?}")))
    }
}

/// Serde adapter for optional timestamps.
pub mod iso_opt {
    use super::*;
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    /// Serialize.
    pub fn serialize<S: Serializer>(ts: &Option<Timestamp>, s: S) -> Result<S::Ok, S::Error> {
        match ts {
            Some(ts) => s.serialize_str(&to_iso(ts)),
            None => s.serialize_none(),
        }
    }

    /// Deserialize.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Timestamp>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(raw) => parse_iso(&raw)
                .map(Some)
                .ok_or_else(|| D::Error::custom(format!("invalid timestamp {raw:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_millis() {
        let ts = parse_iso("2026-05-11T10:00:00.000Z").unwrap();
        assert_eq!(to_iso(&ts), "2026-05-11T10:00:00.000Z");
        let ts = parse_iso("2026-05-11T12:00:00.123456+02:00").unwrap();
        assert_eq!(to_iso(&ts), "2026-05-11T10:00:00.123Z");
        assert!(parse_iso("").is_none());
        assert!(parse_iso("yesterday").is_none());
    }
}
