//! The loaded models, swapped atomically on reload.
//!
//! Requests take an `Arc` of the model they start with, so a reload never changes a model under
//! a request in flight; a bundle that fails to load is reported and its previous version (if
//! any) keeps serving.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use dagmm_model::bundle::EXTENSION;
use dagmm_model::{Bundle, Explainer, TrainingSummary};
use serde::Serialize;

/// One servable model.
#[derive(Debug)]
pub struct LoadedModel {
    pub name: String,
    pub path: PathBuf,
    /// SHA-256 of the bundle body: identifies the exact model.
    pub sha256: String,
    /// When the bundle was created (RFC 3339).
    pub trained_at: String,
    pub training: TrainingSummary,
    pub explainer: Explainer,
}

/// Models by name.
pub type ModelMap = BTreeMap<String, Arc<LoadedModel>>;

/// What a (re)load did.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct ReloadReport {
    /// Models now serving, by name.
    pub loaded: Vec<String>,
    /// Bundles that failed to load, with the reason; a previous version keeps serving.
    pub failed: Vec<FailedBundle>,
    /// Models whose bundle disappeared and that no longer serve.
    pub removed: Vec<String>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct FailedBundle {
    pub path: String,
    pub error: String,
}

/// The set of models behind the server.
pub struct Registry {
    source: PathBuf,
    models: ArcSwap<ModelMap>,
    last_report: Mutex<ReloadReport>,
}

/// Bundle files a `--models` argument names: one file, or every `.dagmm` file in a directory.
fn bundle_paths(source: &Path) -> std::io::Result<Vec<PathBuf>> {
    if source.is_dir() {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(source)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == EXTENSION))
            .collect();
        paths.sort();
        Ok(paths)
    } else if source.is_file() {
        Ok(vec![source.to_path_buf()])
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{}: no such file or directory", source.display()),
        ))
    }
}

/// Load one bundle; its name is the file stem.
pub fn load_model(path: &Path) -> Result<LoadedModel, String> {
    let loaded = Bundle::load(path).map_err(|e| e.to_string())?;
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(LoadedModel {
        name,
        path: path.to_path_buf(),
        sha256: loaded.sha256,
        trained_at: loaded.bundle.created_at,
        training: loaded.bundle.training,
        explainer: Explainer::new(loaded.bundle.model),
    })
}

impl Registry {
    /// Load every bundle `source` names. Fails only when none can be loaded.
    pub fn open(source: &Path) -> Result<Self, String> {
        let registry = Self {
            source: source.to_path_buf(),
            models: ArcSwap::from_pointee(ModelMap::new()),
            last_report: Mutex::new(ReloadReport::default()),
        };
        let report = registry.reload();
        if registry.snapshot().is_empty() {
            let why = match report.failed.first() {
                Some(f) => format!("{}: {}", f.path, f.error),
                None => format!("{}: no .{EXTENSION} bundles found", source.display()),
            };
            return Err(why);
        }
        Ok(registry)
    }

    /// Re-read the bundles. Unchanged files (same checksum) keep their loaded model.
    pub fn reload(&self) -> ReloadReport {
        let current = self.snapshot();
        let mut next = ModelMap::new();
        let mut report = ReloadReport::default();
        match bundle_paths(&self.source) {
            Err(e) => {
                // The whole source vanished: keep serving what we have.
                report.failed.push(FailedBundle {
                    path: self.source.display().to_string(),
                    error: e.to_string(),
                });
                next = (*current).clone();
            }
            Ok(paths) => {
                for path in paths {
                    match load_model(&path) {
                        Ok(model) => {
                            let keep = current
                                .get(&model.name)
                                .filter(|m| m.sha256 == model.sha256)
                                .cloned();
                            next.insert(
                                model.name.clone(),
                                keep.unwrap_or_else(|| Arc::new(model)),
                            );
                        }
                        Err(error) => {
                            report.failed.push(FailedBundle {
                                path: path.display().to_string(),
                                error,
                            });
                            let stem = path
                                .file_stem()
                                .map(|s| s.to_string_lossy().into_owned())
                                .unwrap_or_default();
                            if let Some(old) = current.get(&stem) {
                                next.insert(stem, old.clone());
                            }
                        }
                    }
                }
                report.removed = current
                    .keys()
                    .filter(|k| !next.contains_key(*k))
                    .cloned()
                    .collect();
            }
        }
        report.loaded = next.keys().cloned().collect();
        for f in &report.failed {
            tracing::warn!(path = %f.path, error = %f.error, "bundle failed to load; previous version (if any) keeps serving");
        }
        tracing::info!(models = ?report.loaded, removed = ?report.removed, "models loaded");
        self.models.store(Arc::new(next));
        *self.last_report.lock().expect("not poisoned") = report.clone();
        report
    }

    /// The models serving now.
    pub fn snapshot(&self) -> Arc<ModelMap> {
        self.models.load_full()
    }

    pub fn last_report(&self) -> ReloadReport {
        self.last_report.lock().expect("not poisoned").clone()
    }
}
