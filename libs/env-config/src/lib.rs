//! Configuration from environment variables: typed, with defaults, and with errors
//! that name the variable and its value (configuration values here are addresses,
//! sizes and durations; secrets are read elsewhere and never parsed through this).

use std::str::FromStr;

/// A variable that is set but does not parse.
#[derive(Debug, thiserror::Error)]
#[error("{name}={value:?} is invalid: {reason}")]
pub struct EnvError {
    pub name: String,
    pub value: String,
    pub reason: String,
}

/// `name` parsed, or `None` when unset.
pub fn parse_opt<T: FromStr>(name: &str) -> Result<Option<T>, EnvError>
where
    T::Err: std::fmt::Display,
{
    let Ok(value) = std::env::var(name) else {
        return Ok(None);
    };
    value.parse().map(Some).map_err(|e: T::Err| EnvError {
        name: name.to_owned(),
        reason: e.to_string(),
        value,
    })
}

/// `name` parsed, or `default` when unset.
pub fn parse_or<T: FromStr>(name: &str, default: T) -> Result<T, EnvError>
where
    T::Err: std::fmt::Display,
{
    Ok(parse_opt(name)?.unwrap_or(default))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_gives_the_default_and_a_bad_value_names_the_variable() {
        assert_eq!(
            parse_or("VM0_ENV_CONFIG_TEST_UNSET", 7u16).expect("unset"),
            7
        );
        // PATH is set wherever tests run, and is no port number.
        let err = parse_or::<u16>("PATH", 1).expect_err("PATH is not a port");
        assert!(err.to_string().starts_with("PATH=\""), "{err}");
        assert!(parse_opt::<String>("PATH").expect("a string").is_some());
    }
}
