//! The HTTP application: configuration, shared state, routes and middleware.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use dagmm_model::Verdict;
use serde::Serialize;
use serde_json::Value;
use tower_http::timeout::TimeoutLayer;
use utoipa::{OpenApi, ToSchema};

use crate::error::{ApiError, ErrorBody};
use crate::metrics::Metrics;
use crate::registry::{LoadedModel, ModelMap, Registry, ReloadReport};
use crate::request::{self, ScoreRequest};

/// Limits and access settings of the HTTP server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Most samples one request may carry.
    pub max_samples: usize,
    /// Requests taking longer are answered 408.
    pub request_timeout: Duration,
    /// When set, every route except the health checks needs `Authorization: Bearer <token>`.
    pub auth_token: Option<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 1 << 20,
            max_samples: 1000,
            request_timeout: Duration::from_secs(10),
            auth_token: None,
        }
    }
}

/// State shared by every handler.
pub struct AppState {
    pub registry: Registry,
    pub metrics: Metrics,
    pub config: ServerConfig,
}

/// Which model a verdict came from.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelRef {
    pub name: String,
    /// SHA-256 of the bundle body.
    pub sha256: String,
    pub trained_at: String,
}

/// The verdict on one sample, with the echo fields and the model it came from.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ScoredSample {
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub id: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub timestamp: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    pub model: ModelRef,
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub verdict: Verdict,
}

/// Response of `POST /v1/score`: one result per sample, in request order.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ScoreResponse {
    pub results: Vec<ScoredSample>,
}

/// Pick the model for a sample: explicit name, else the host's own model, else the only model
/// or the one named `default`.
pub fn resolve_model(
    models: &ModelMap,
    explicit: Option<&str>,
    host: Option<&str>,
    field: &str,
) -> Result<Arc<LoadedModel>, ApiError> {
    if let Some(name) = explicit {
        return models.get(name).cloned().ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "unknown_model",
                format!("no model named `{name}` is loaded"),
            )
            .field(field)
        });
    }
    if let Some(m) = host.and_then(|h| models.get(h)) {
        return Ok(m.clone());
    }
    if models.len() == 1 {
        return Ok(models.values().next().expect("one model").clone());
    }
    models.get("default").cloned().ok_or_else(|| {
        ApiError::bad_request(
            "model_required",
            format!("{} models are loaded and none is named `default` or matches the host; name one in `model`", models.len()),
        )
        .field(field)
    })
}

/// Pick one parsed sample's model (the sample's own, else the request's `model`, else by host)
/// and check its values.
fn resolve_sample(
    models: &ModelMap,
    request_model: Option<&str>,
    sample: &request::Sample,
) -> Result<(Arc<LoadedModel>, Vec<f64>), ApiError> {
    let explicit = sample.model.as_deref().or(request_model);
    let model_field = if sample.model.is_some() {
        format!("{}.model", sample.path)
    } else {
        "model".to_string()
    };
    let model = resolve_model(
        models,
        explicit,
        sample.host.as_deref(),
        model_field.trim_start_matches('.'),
    )?;
    let values = request::metric_values(sample, &model.explainer)?;
    Ok((model, values))
}

fn scored_sample(model: &LoadedModel, sample: &request::Sample, verdict: Verdict) -> ScoredSample {
    ScoredSample {
        id: sample.id.clone(),
        timestamp: sample.timestamp.clone(),
        host: sample.host.clone(),
        model: ModelRef {
            name: model.name.clone(),
            sha256: model.sha256.clone(),
            trained_at: model.trained_at.clone(),
        },
        verdict,
    }
}

/// Score one parsed sample: pick its model, check its values and explain the verdict. Used
/// where each sample succeeds or fails on its own (the stream path).
pub fn score_sample(
    models: &ModelMap,
    request_model: Option<&str>,
    sample: &request::Sample,
    scratch: &mut Option<dagmm_model::scorer::Scratch>,
) -> Result<(Arc<LoadedModel>, ScoredSample), ApiError> {
    let (model, values) = resolve_sample(models, request_model, sample)?;
    let s = scratch.get_or_insert_with(|| model.explainer.scorer().new_scratch());
    let verdict = model.explainer.verdict(&values, s);
    let scored = scored_sample(&model, sample, verdict);
    Ok((model, scored))
}

/// Score a parsed request against a model snapshot; the first bad sample fails the whole
/// request, as HTTP callers expect. Samples of the same model are scored `LANES` per pass; the
/// numbers are those of scoring each alone.
pub fn score_request(
    models: &ModelMap,
    req: &ScoreRequest,
) -> Result<Vec<(Arc<LoadedModel>, ScoredSample)>, ApiError> {
    let resolved = req
        .samples
        .iter()
        .map(|sample| resolve_sample(models, req.model.as_deref(), sample))
        .collect::<Result<Vec<_>, _>>()?;
    let mut verdicts: Vec<Option<Verdict>> = vec![None; resolved.len()];
    // Sample indices grouped by model, in request order within each group.
    let mut order: Vec<usize> = (0..resolved.len()).collect();
    order.sort_by_key(|&i| Arc::as_ptr(&resolved[i].0) as usize);
    let mut scratch = None;
    for group in order.chunk_by(|&a, &b| Arc::ptr_eq(&resolved[a].0, &resolved[b].0)) {
        let explainer = &resolved[group[0]].0.explainer;
        let rows: Vec<&[f64]> = group.iter().map(|&i| resolved[i].1.as_slice()).collect();
        let s = scratch.get_or_insert_with(|| explainer.scorer().new_scratch());
        for (&i, v) in group.iter().zip(explainer.verdicts(&rows, s)) {
            verdicts[i] = Some(v);
        }
    }
    Ok(resolved
        .into_iter()
        .zip(verdicts)
        .zip(&req.samples)
        .map(|(((model, _), verdict), sample)| {
            let scored = scored_sample(&model, sample, verdict.expect("every sample scored"));
            (model, scored)
        })
        .collect())
}

/// Count one verdict in the Prometheus metrics.
pub fn record_verdict(m: &Metrics, model: &LoadedModel, s: &ScoredSample) {
    m.scored.with_label_values(&[model.name.as_str()]).inc();
    if s.verdict.anomaly {
        m.anomalies
            .with_label_values(&[model.name.as_str(), s.verdict.severity.as_str()])
            .inc();
    }
    let host = m.host_label(s.host.as_deref().unwrap_or(""));
    m.last_energy
        .with_label_values(&[model.name.as_str(), host.as_str()])
        .set(s.verdict.energy);
}

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| {
            let mime = mime.trim().to_ascii_lowercase();
            mime == "application/json" || mime.ends_with("+json")
        })
}

/// Score samples.
#[utoipa::path(
    post,
    path = "/v1/score",
    request_body(content = crate::request::ScoreRequestDoc, description = "One sample object, or {model?, samples: [...]}"),
    responses(
        (status = 200, description = "One verdict per sample", body = ScoreResponse),
        (status = 400, description = "Malformed request", body = ErrorBody),
        (status = 401, description = "Missing or wrong token", body = ErrorBody),
        (status = 404, description = "Unknown model", body = ErrorBody),
        (status = 413, description = "Body too large or too many samples", body = ErrorBody),
        (status = 415, description = "Not JSON", body = ErrorBody),
        (status = 422, description = "Invalid or missing metric value", body = ErrorBody),
    )
)]
pub async fn score(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    if !is_json(&headers) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as application/json",
        )
        .field("content-type"));
    }
    let bytes: Bytes = axum::body::to_bytes(body, state.config.max_body_bytes)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("request body exceeds {} bytes", state.config.max_body_bytes),
            )
            .field("body")
        })?;
    let req = request::parse(&bytes, state.config.max_samples)?;
    let models = state.registry.snapshot();
    let scored = score_request(&models, &req)?;
    let mut results = Vec::with_capacity(scored.len());
    for (model, s) in scored {
        record_verdict(&state.metrics, &model, &s);
        results.push(s);
    }
    Ok(axum::Json(ScoreResponse { results }).into_response())
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", responses((status = 200, description = "Process up")))]
pub async fn healthz() -> &'static str {
    "ok"
}

/// Models are loaded and their checksums verified.
#[utoipa::path(get, path = "/readyz", responses((status = 200, description = "Ready"), (status = 503, description = "No model loaded", body = ErrorBody)))]
pub async fn readyz(State(state): State<Arc<AppState>>) -> Result<&'static str, ApiError> {
    if state.registry.snapshot().is_empty() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "no model is loaded",
        ));
    }
    Ok("ready")
}

/// One loaded model, for `GET /v1/models`.
#[derive(Serialize, ToSchema)]
pub struct ModelInfo {
    pub name: String,
    pub sha256: String,
    pub trained_at: String,
    pub path: String,
    /// Feature names, units and transforms, in input order.
    #[schema(value_type = Object)]
    pub features: Value,
    #[schema(value_type = Object)]
    pub thresholds: Value,
    #[schema(value_type = Object)]
    pub training: Value,
}

/// List loaded models with their features, cutoffs and training summary.
#[utoipa::path(get, path = "/v1/models", responses((status = 200, body = Vec<ModelInfo>)))]
pub async fn list_models(State(state): State<Arc<AppState>>) -> axum::Json<Vec<ModelInfo>> {
    let models = state.registry.snapshot();
    let infos = models
        .values()
        .map(|m| {
            let model = m.explainer.model();
            let t = &model.thresholds;
            ModelInfo {
                name: m.name.clone(),
                sha256: m.sha256.clone(),
                trained_at: m.trained_at.clone(),
                path: m.path.display().to_string(),
                features: serde_json::to_value(&model.preprocessor.features).unwrap_or(Value::Null),
                thresholds: serde_json::json!({
                    "percentile": t.percentile,
                    "cutoff": t.cutoff,
                    "severities": t.severities,
                }),
                training: serde_json::to_value(&m.training).unwrap_or(Value::Null),
            }
        })
        .collect();
    axum::Json(infos)
}

/// Reload bundles from disk; failures are reported and the old versions keep serving.
#[utoipa::path(post, path = "/v1/admin/reload", responses((status = 200, body = ReloadReport)))]
pub async fn reload(State(state): State<Arc<AppState>>) -> axum::Json<ReloadReport> {
    axum::Json(reload_now(&state).await)
}

/// Reload on a blocking thread (bundle parsing is CPU and disk work) and count the outcome.
pub async fn reload_now(state: &Arc<AppState>) -> ReloadReport {
    let s = state.clone();
    let report = tokio::task::spawn_blocking(move || s.registry.reload())
        .await
        .unwrap_or_default();
    let outcome = if report.failed.is_empty() {
        "ok"
    } else {
        "partial"
    };
    state.metrics.reloads.with_label_values(&[outcome]).inc();
    report
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format")))]
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let text = state.metrics.render(&state.registry.snapshot());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "dagmm-serve",
        description = "Score server-metric samples with DAGMM models"
    ),
    paths(score, healthz, readyz, list_models, reload, metrics),
    components(schemas(
        ScoreResponse,
        ScoredSample,
        ModelRef,
        ModelInfo,
        ErrorBody,
        ReloadReport
    ))
)]
pub struct ApiDoc;

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        ApiDoc::openapi().to_json().unwrap_or_default(),
    )
        .into_response()
}

/// Routes that answer without a token.
const PUBLIC_ROUTES: [&str; 2] = ["/healthz", "/readyz"];

async fn require_token(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let Some(token) = &state.config.auth_token else {
        return next.run(req).await;
    };
    if PUBLIC_ROUTES.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(p) if constant_time_eq(p.as_bytes(), token.as_bytes()) => next.run(req).await,
        Some(_) => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_token",
            "the bearer token is not valid",
        )
        .into_response(),
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing_token",
            "send Authorization: Bearer <token>",
        )
        .into_response(),
    }
}

/// Token comparison whose time does not depend on where the first difference is.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn record_metrics(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let start = Instant::now();
    let response = next.run(req).await;
    let status = response.status().as_u16().to_string();
    let labels = [route.as_str(), status.as_str()];
    state.metrics.requests.with_label_values(&labels).inc();
    state
        .metrics
        .latency
        .with_label_values(&labels)
        .observe(start.elapsed().as_secs_f64());
    response
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

/// Metrics, health, readiness and reload only: the HTTP face of a stream-only replica.
pub fn ops_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/v1/admin/reload", post(reload))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(state)
}

/// The router with every route and layer.
pub fn router(state: Arc<AppState>) -> Router {
    let timeout = state.config.request_timeout;
    Router::new()
        .route("/v1/score", post(score))
        .route("/score", post(score))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/v1/models", get(list_models))
        .route("/v1/admin/reload", post(reload))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            timeout,
        ))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            record_metrics,
        ))
        .with_state(state)
}
