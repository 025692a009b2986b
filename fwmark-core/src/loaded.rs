//! A config as fwmark uses it: the text, where it came from, its hash, the
//! validated [`Config`] and its compiled [`Ruleset`].

use std::path::Path;

use crate::{
    config::{Config, ConfigErrors, LoadError},
    ruleset::{Ruleset, RulesetError},
};

/// A config file read, validated and compiled.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub path: String,
    pub text: String,
    pub sha256: String,
    pub config: Config,
    pub ruleset: Ruleset,
}

/// Why a config cannot be used: unreadable, invalid, or not compilable
/// into map entries. Each message names the file.
#[derive(Debug, thiserror::Error)]
pub enum LoadedError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Ruleset(#[from] RulesetError),
}

impl From<ConfigErrors> for LoadedError {
    fn from(e: ConfigErrors) -> Self {
        LoadedError::Load(LoadError::Invalid(e))
    }
}

impl Loaded {
    /// Reads, validates and compiles `path`. The ruleset's warnings are in
    /// `ruleset.warnings` for the caller to show.
    pub fn read(path: &Path) -> Result<Loaded, LoadedError> {
        let display = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|error| LoadError::Read {
            path: display.clone(),
            error,
        })?;
        Loaded::from_text(&display, text)
    }

    /// Validates and compiles config text that came from `path`.
    pub fn from_text(path: &str, text: String) -> Result<Loaded, LoadedError> {
        let config = Config::parse(&text, path)?;
        let ruleset = Ruleset::compile(&config)?;
        Ok(Loaded {
            path: path.to_string(),
            sha256: sha256_hex(&text),
            text,
            config,
            ruleset,
        })
    }
}

/// SHA-256 of `text`, hex.
pub fn sha256_hex(text: &str) -> String {
    use sha2::{Digest as _, Sha256};
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
