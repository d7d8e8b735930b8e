//! How im-server and im-storage-worker read their settings: flags, then
//! `IM_*` environment variables (both through clap), then a TOML file named
//! by `--config`, then built-in defaults. One implementation for both
//! binaries, so a file that works for one works the same way for the other.

use std::path::Path;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Why settings could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Flags, variables or file are malformed, or the file has unknown keys.
    #[error("invalid configuration: {0}")]
    Parse(String),
}

/// Parses `args` (and the environment) into `C`; if `file` picks a path
/// from the result, the TOML file's keys (flag names without the dashes)
/// fill in every setting not given as a flag or variable.
pub fn load<C, I, T>(args: I, file: impl Fn(&C) -> Option<&Path>) -> Result<C, SettingsError>
where
    C: CommandFactory + FromArgMatches + Serialize + DeserializeOwned,
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    // Prints --help/--version or a usage error and exits, like any CLI.
    let matches = C::command().get_matches_from(args);
    let config = C::from_arg_matches(&matches).map_err(|e| SettingsError::Parse(e.to_string()))?;
    let Some(path) = file(&config).map(Path::to_path_buf) else {
        return Ok(config);
    };
    let text = std::fs::read_to_string(&path).map_err(|source| SettingsError::Read {
        path: path.clone(),
        source,
    })?;
    let table: toml::Table =
        toml::from_str(&text).map_err(|e| SettingsError::Parse(e.to_string()))?;
    overlay(&config, &matches, table)
}

/// `config` with every key of `file` applied that was not given explicitly
/// (on the command line or in the environment).
fn overlay<C: Serialize + DeserializeOwned>(
    config: &C,
    matches: &ArgMatches,
    file: toml::Table,
) -> Result<C, SettingsError> {
    let mut merged =
        toml::Table::try_from(config).map_err(|e| SettingsError::Parse(e.to_string()))?;
    for (key, value) in file {
        let id = key.replace('-', "_");
        let explicit = matches!(
            matches
                .try_get_raw(&id)
                .ok()
                .and_then(|_| matches.value_source(&id)),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        );
        if !explicit {
            merged.insert(key, value);
        }
    }
    merged
        .try_into()
        .map_err(|e: toml::de::Error| SettingsError::Parse(e.to_string()))
}
