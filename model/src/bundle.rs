//! The saved model bundle: one self-describing file per model.
//!
//! Layout: a header line `DAGMM-BUNDLE <format version> sha256:<hex of the body>` and a JSON
//! body. JSON keeps the bundle readable with any tool; the checksum catches truncation and
//! bit rot before a damaged model can score anything.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::TrainConfig;
use crate::training::EpochLosses;
use crate::{DagmmModel, ModelError};

const MAGIC: &str = "DAGMM-BUNDLE";
/// Bumped whenever the body's meaning changes; loading another version is an error.
pub const FORMAT_VERSION: u32 = 1;
/// File extension of bundles.
pub const EXTENSION: &str = "dagmm";

/// What training saw and did, kept with the model so every verdict can be traced back.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TrainingSummary {
    /// Host or group the model was trained for (`None`: all rows).
    pub group: Option<String>,
    /// Input files or patterns.
    pub source: Vec<String>,
    pub rows_used: usize,
    /// Rows removed before training, by reason.
    pub rows_dropped: BTreeMap<String, usize>,
    /// Values clipped into their valid range, by feature.
    pub values_clipped: BTreeMap<String, usize>,
    /// First and last timestamp of the training window (RFC 3339), when known.
    pub time_range: Option<(String, String)>,
    pub final_losses: Option<EpochLosses>,
    pub train_config: Option<TrainConfig>,
    pub seconds: f64,
}

/// The bundle body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bundle {
    pub name: String,
    /// RFC 3339 creation time.
    pub created_at: String,
    pub model: DagmmModel,
    pub training: TrainingSummary,
    /// Loss parts per epoch.
    pub history: Vec<EpochLosses>,
}

/// A bundle read from disk, with the checksum it was verified against.
#[derive(Debug, Clone)]
pub struct LoadedBundle {
    pub bundle: Bundle,
    /// Hex SHA-256 of the body: identifies the exact model.
    pub sha256: String,
}

/// Temp files are created owner-only; a saved model should read like any other file.
/// A model or host name with everything but ASCII letters, digits, `-`, `_` and `.` replaced by
/// `_`: safe in file names and in NATS subjects alike.
pub fn plain_name_chars(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

pub fn make_readable(file: &std::fs::File) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o644))?;
    }
    let _ = file;
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Bundle {
    /// Serialise to the on-disk bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let body = serde_json::to_vec(self).expect("bundle serialises");
        let mut out = format!(
            "{MAGIC} {FORMAT_VERSION} sha256:{}\n",
            hex(&Sha256::digest(&body))
        )
        .into_bytes();
        out.extend_from_slice(&body);
        out
    }

    /// Write atomically: a temp file in the target directory, fsync, then rename over `path`.
    pub fn save(&self, path: &Path) -> Result<String, ModelError> {
        let io = |source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        };
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let bytes = self.to_bytes();
        let mut tmp = tempfile::Builder::new()
            .prefix(".dagmm-")
            .suffix(".tmp")
            .tempfile_in(dir)
            .map_err(io)?;
        tmp.write_all(&bytes).map_err(io)?;
        tmp.as_file().sync_all().map_err(io)?;
        make_readable(tmp.as_file()).map_err(io)?;
        tmp.persist(path).map_err(|e| io(e.error))?;
        let header_end = bytes.iter().position(|&b| b == b'\n').unwrap_or(0);
        Ok(String::from_utf8_lossy(&bytes[..header_end])
            .rsplit(':')
            .next()
            .unwrap_or("")
            .to_string())
    }

    /// Read and verify a bundle file.
    pub fn load(path: &Path) -> Result<LoadedBundle, ModelError> {
        let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(&bytes).map_err(|why| ModelError::Bundle {
            path: path.to_path_buf(),
            why,
        })
    }

    /// Parse and verify bundle bytes; the error says what is wrong with them.
    pub fn from_bytes(bytes: &[u8]) -> Result<LoadedBundle, String> {
        let newline = bytes
            .iter()
            .take(256)
            .position(|&b| b == b'\n')
            .ok_or("not a dagmm bundle (no header line)")?;
        let header = std::str::from_utf8(&bytes[..newline])
            .map_err(|_| "not a dagmm bundle (header is not text)")?;
        let mut parts = header.split(' ');
        if parts.next() != Some(MAGIC) {
            return Err("not a dagmm bundle (bad magic)".into());
        }
        let version: u32 = parts
            .next()
            .and_then(|v| v.parse().ok())
            .ok_or("corrupt bundle header (format version)")?;
        if version != FORMAT_VERSION {
            return Err(format!(
                "bundle format version {version} is not supported (this build reads version {FORMAT_VERSION}); retrain or use a matching release"
            ));
        }
        let expected = parts
            .next()
            .and_then(|h| h.strip_prefix("sha256:"))
            .ok_or("corrupt bundle header (checksum)")?;
        let body = &bytes[newline + 1..];
        let actual = hex(&Sha256::digest(body));
        if actual != expected {
            return Err(format!(
                "checksum mismatch (header says {expected}, content is {actual}): the file is corrupt or truncated"
            ));
        }
        let bundle: Bundle =
            serde_json::from_slice(body).map_err(|e| format!("invalid bundle body: {e}"))?;
        bundle
            .model
            .validate()
            .map_err(|e| format!("invalid model: {e}"))?;
        Ok(LoadedBundle {
            bundle,
            sha256: actual,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preprocess::{FeatureSpec, Preprocessor};
    use crate::{NetworkConfig, Scorer, fit};

    fn small_bundle() -> Bundle {
        let rows: Vec<f64> = (0..200)
            .flat_map(|i| {
                let t = f64::from(i) / 200.0;
                [
                    20.0 + 60.0 * t,
                    40.0 + 3.0 * (t * 9.0).sin(),
                    5.0 + 10.0 * t,
                    1e4 * (1.0 + 9.0 * t),
                ]
            })
            .collect();
        let pre = Preprocessor::fit(FeatureSpec::server_metrics(), &rows).unwrap();
        let cfg = TrainConfig {
            epochs: 5,
            batch_size: 64,
            ..TrainConfig::default()
        };
        let out = fit(&NetworkConfig::metrics4(), &cfg, pre, &rows, &mut |_| {}).unwrap();
        Bundle {
            name: "test".into(),
            created_at: "2026-01-01T00:00:00Z".into(),
            model: out.model,
            training: TrainingSummary {
                rows_used: 200,
                ..Default::default()
            },
            history: out.history,
        }
    }

    #[test]
    fn save_load_round_trip_gives_identical_energies() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.dagmm");
        let bundle = small_bundle();
        let hash = bundle.save(&path).unwrap();
        let loaded = Bundle::load(&path).unwrap();
        assert_eq!(loaded.sha256, hash);
        assert_eq!(loaded.bundle, bundle);
        let x: Vec<f32> = (0..400).map(|i| (i % 17) as f32 / 10.0).collect();
        assert_eq!(
            Scorer::new(&bundle.model).energies_scaled(&x),
            Scorer::new(&loaded.bundle.model).energies_scaled(&x)
        );
        // Nothing but the bundle is left in the directory.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn flipped_byte_truncation_and_wrong_version_are_clear_errors() {
        let bytes = small_bundle().to_bytes();
        let mut flipped = bytes.clone();
        let i = bytes.len() / 2;
        flipped[i] ^= 0x01;
        assert!(
            Bundle::from_bytes(&flipped)
                .unwrap_err()
                .contains("checksum mismatch")
        );
        assert!(
            Bundle::from_bytes(&bytes[..bytes.len() - 10])
                .unwrap_err()
                .contains("checksum mismatch")
        );
        let other_version = String::from_utf8(bytes.clone()).unwrap().replacen(
            "DAGMM-BUNDLE 1 ",
            "DAGMM-BUNDLE 7 ",
            1,
        );
        assert!(
            Bundle::from_bytes(other_version.as_bytes())
                .unwrap_err()
                .contains("version 7")
        );
        assert!(
            Bundle::from_bytes(b"PAR1 garbage")
                .unwrap_err()
                .contains("not a dagmm bundle")
        );
        assert!(Bundle::from_bytes(b"").is_err());
        let missing = Bundle::load(Path::new("/nonexistent/m.dagmm"))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("/nonexistent/m.dagmm"));
    }
}
