use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A point in time, microseconds since the Unix epoch; serialized as RFC 3339 in UTC
/// with millisecond precision (`2024-01-15T10:00:00.123Z`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub fn now() -> Self {
        Timestamp(Utc::now().timestamp_micros())
    }

    pub fn micros(self) -> i64 {
        self.0
    }

    pub fn to_rfc3339(self) -> String {
        match Utc.timestamp_micros(self.0).single() {
            Some(t) => t.to_rfc3339_opts(SecondsFormat::Millis, true),
            None => String::from("1970-01-01T00:00:00.000Z"),
        }
    }

    /// Parses an RFC 3339 / ISO 8601 date-time with an offset (`2024-01-01T00:00:00Z`).
    pub fn parse(s: &str) -> Option<Self> {
        DateTime::parse_from_rfc3339(s)
            .ok()
            .map(|t| Timestamp(t.with_timezone(&Utc).timestamp_micros()))
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_rfc3339())
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Timestamp::parse(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("invalid RFC 3339 timestamp '{s}'")))
    }
}

impl utoipa::PartialSchema for Timestamp {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
                utoipa::openapi::KnownFormat::DateTime,
            )))
            .examples([serde_json::json!("2024-01-15T10:00:00.000Z")])
            .into()
    }
}

impl utoipa::ToSchema for Timestamp {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_rfc3339() {
        let t = Timestamp::parse("2024-01-15T10:00:05.123Z").expect("parse");
        assert_eq!(t.to_rfc3339(), "2024-01-15T10:00:05.123Z");
        let offset = Timestamp::parse("2024-01-15T12:00:05+02:00").expect("parse");
        assert_eq!(offset.to_rfc3339(), "2024-01-15T10:00:05.000Z");
        assert!(Timestamp::parse("2024-01-15").is_none());
        assert!(Timestamp::parse("yesterday").is_none());
    }
}
