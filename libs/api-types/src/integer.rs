//! Integer fields as JSON Schema defines them: `51.0` is the integer 51 (an
//! integer-valued number), which serde alone refuses for `u32`. Used with
//! `#[serde(deserialize_with = ...)]` on every integer a request carries, so
//! what the OpenAPI document calls an integer is what the server takes.

use std::fmt;
use std::marker::PhantomData;

use serde::Deserializer;
use serde::de::{Error, Visitor};

struct Integer<T>(PhantomData<T>);

impl<T: TryFrom<u64>> Visitor<'_> for Integer<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a non-negative integer")
    }

    fn visit_u64<E: Error>(self, v: u64) -> Result<T, E> {
        T::try_from(v).map_err(|_| E::custom(format!("{v} is out of range")))
    }

    fn visit_i64<E: Error>(self, v: i64) -> Result<T, E> {
        u64::try_from(v)
            .map_err(|_| E::custom(format!("{v} is negative")))
            .and_then(|v| self.visit_u64(v))
    }

    fn visit_f64<E: Error>(self, v: f64) -> Result<T, E> {
        // 2^53: beyond it a float no longer names one integer.
        if v.fract() == 0.0 && (0.0..=9_007_199_254_740_992.0).contains(&v) {
            self.visit_u64(v as u64)
        } else {
            Err(E::custom(format!("{v} is not a non-negative integer")))
        }
    }
}

/// A non-negative integer, also when written `51.0`.
pub fn integer<'de, D: Deserializer<'de>, T: TryFrom<u64>>(d: D) -> Result<T, D::Error> {
    d.deserialize_any(Integer(PhantomData))
}

/// [`integer`] or `null`.
pub fn optional_integer<'de, D: Deserializer<'de>, T: TryFrom<u64>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    struct Optional<T>(PhantomData<T>);
    impl<'de, T: TryFrom<u64>> Visitor<'de> for Optional<T> {
        type Value = Option<T>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "a non-negative integer or null")
        }
        fn visit_none<E: Error>(self) -> Result<Option<T>, E> {
            Ok(None)
        }
        fn visit_unit<E: Error>(self) -> Result<Option<T>, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Option<T>, D::Error> {
            integer(d).map(Some)
        }
    }
    d.deserialize_option(Optional(PhantomData))
}

#[cfg(test)]
mod tests {
    #[derive(serde::Deserialize, Debug)]
    struct T {
        #[serde(deserialize_with = "super::integer")]
        n: u32,
        #[serde(default, deserialize_with = "super::optional_integer")]
        o: Option<u32>,
    }

    #[test]
    fn integer_valued_numbers_are_integers() {
        let t: T = serde_json::from_str(r#"{"n": 51.0, "o": 2}"#).expect("parses");
        assert_eq!((t.n, t.o), (51, Some(2)));
        let t: T = serde_json::from_str(r#"{"n": 7, "o": null}"#).expect("parses");
        assert_eq!((t.n, t.o), (7, None));
        let t: T = serde_json::from_str(r#"{"n": 7}"#).expect("parses");
        assert_eq!(t.o, None);
        for bad in [
            r#"{"n": 1.5}"#,
            r#"{"n": -1}"#,
            r#"{"n": 5000000000}"#,
            r#"{"n": "1"}"#,
            r#"{"n": 1e300}"#,
        ] {
            assert!(serde_json::from_str::<T>(bad).is_err(), "{bad}");
        }
    }
}
