//! Parsing and checking `POST /v1/score` bodies, field by field, so every mistake is reported
//! with the JSON path of the field that caused it.

use dagmm_model::Explainer;
use serde::Serialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

use crate::error::ApiError;

/// Fields of a sample that are not metrics.
const SAMPLE_META: [&str; 4] = ["id", "timestamp", "host", "model"];

/// One sample as sent: metric values plus optional echo fields.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name → value, as sent (checked against the model later).
    pub metrics: Map<String, Value>,
    pub id: Option<Value>,
    pub timestamp: Option<Value>,
    pub host: Option<String>,
    /// Per-sample model override.
    pub model: Option<String>,
    /// JSON path prefix used in error fields (`samples[3]` or empty).
    pub path: String,
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoreRequest {
    pub model: Option<String>,
    pub samples: Vec<Sample>,
}

/// Request body schema, for the OpenAPI document: either this object or one bare sample.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct ScoreRequestDoc {
    /// Model name (default: the sample's host if a model has that name, else the only or `default` model).
    model: Option<String>,
    samples: Vec<SampleDoc>,
}

/// A sample: the model's metrics (by default `cpu_usage`, `mem_usage`, `disk_busy`, `net_in_bps`)
/// plus optional `id`, `timestamp` and `host`, echoed back.
#[derive(Serialize, ToSchema)]
#[allow(dead_code)]
pub struct SampleDoc {
    cpu_usage: f64,
    mem_usage: f64,
    disk_busy: f64,
    net_in_bps: f64,
    id: Option<String>,
    timestamp: Option<String>,
    host: Option<String>,
}

fn text_field(obj: &Map<String, Value>, key: &str, path: &str) -> Result<Option<String>, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ApiError::invalid(
            join(path, key),
            format!("`{key}` must be a string"),
        )),
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn parse_sample(value: &Value, path: String) -> Result<Sample, ApiError> {
    let Value::Object(obj) = value else {
        let field = if path.is_empty() {
            "body".to_string()
        } else {
            path
        };
        return Err(ApiError::invalid(field, "a sample must be a JSON object"));
    };
    let mut metrics = obj.clone();
    for k in SAMPLE_META {
        metrics.remove(k);
    }
    Ok(Sample {
        id: obj.get("id").filter(|v| !v.is_null()).cloned(),
        timestamp: obj.get("timestamp").filter(|v| !v.is_null()).cloned(),
        host: text_field(obj, "host", &path)?,
        model: text_field(obj, "model", &path)?,
        metrics,
        path,
    })
}

/// Parse a body: one sample object, or `{"model"?, "samples": [...]}`.
pub fn parse(body: &[u8], max_samples: usize) -> Result<ScoreRequest, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request("malformed_json", format!("body is not valid JSON: {e}"))
            .field("body")
    })?;
    let Value::Object(obj) = &value else {
        return Err(
            ApiError::bad_request("malformed_json", "body must be a JSON object").field("body"),
        );
    };
    let Some(samples) = obj.get("samples") else {
        let sample = parse_sample(&value, String::new())?;
        return Ok(ScoreRequest {
            model: sample.model.clone(),
            samples: vec![sample],
        });
    };
    if let Some(extra) = obj.keys().find(|k| *k != "samples" && *k != "model") {
        return Err(ApiError::invalid(
            extra.clone(),
            format!("unknown field `{extra}` (expected `model` and `samples`)"),
        ));
    }
    let Value::Array(items) = samples else {
        return Err(ApiError::invalid("samples", "`samples` must be an array"));
    };
    if items.is_empty() {
        return Err(ApiError::invalid("samples", "`samples` is empty"));
    }
    if items.len() > max_samples {
        return Err(ApiError::new(
            axum::http::StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_samples",
            format!(
                "{} samples in one request; the limit is {max_samples}",
                items.len()
            ),
        )
        .field("samples"));
    }
    let samples = items
        .iter()
        .enumerate()
        .map(|(i, v)| parse_sample(v, format!("samples[{i}]")))
        .collect::<Result<_, _>>()?;
    Ok(ScoreRequest {
        model: text_field(obj, "model", "")?,
        samples,
    })
}

/// The sample's metric values in the model's feature order, checked for presence, type,
/// finiteness and valid range; unknown fields are errors.
pub fn metric_values(sample: &Sample, explainer: &Explainer) -> Result<Vec<f64>, ApiError> {
    let features = &explainer.model().preprocessor.features;
    if let Some(extra) = sample
        .metrics
        .keys()
        .find(|k| !features.iter().any(|f| &f.name == *k))
    {
        let expected: Vec<&str> = features.iter().map(|f| f.name.as_str()).collect();
        return Err(ApiError::invalid(
            join(&sample.path, extra),
            format!(
                "unknown metric `{extra}` (this model takes {})",
                expected.join(", ")
            ),
        ));
    }
    let mut values = Vec::with_capacity(features.len());
    for spec in features {
        let field = join(&sample.path, &spec.name);
        let v = match sample.metrics.get(&spec.name) {
            None | Some(Value::Null) => {
                return Err(ApiError::invalid(
                    field,
                    format!("missing metric `{}`", spec.name),
                ));
            }
            Some(Value::Number(n)) => n
                .as_f64()
                .ok_or_else(|| ApiError::invalid(&field, "not a representable number"))?,
            Some(other) => {
                return Err(ApiError::invalid(
                    field,
                    format!("`{}` must be a number, got {other}", spec.name),
                ));
            }
        };
        values.push(v);
    }
    explainer.validate(&values).map_err(|e| match e {
        dagmm_model::ModelError::InvalidSample { field, why } => {
            ApiError::invalid(join(&sample.path, &field), why)
        }
        other => ApiError::invalid(sample.path.clone(), other.to_string()),
    })?;
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_sample_and_batch_shapes_parse() {
        let one = parse(
            br#"{"cpu_usage":1,"mem_usage":2,"disk_busy":3,"net_in_bps":4,"host":"a","id":7}"#,
            10,
        )
        .unwrap();
        assert_eq!(one.samples.len(), 1);
        assert_eq!(one.samples[0].host.as_deref(), Some("a"));
        assert_eq!(one.samples[0].metrics.len(), 4);
        let many = parse(
            br#"{"model":"m","samples":[{"cpu_usage":1},{"cpu_usage":2}]}"#,
            10,
        )
        .unwrap();
        assert_eq!((many.model.as_deref(), many.samples.len()), (Some("m"), 2));
        assert_eq!(many.samples[1].path, "samples[1]");
    }

    #[test]
    fn malformed_bodies_are_rejected_with_codes() {
        assert_eq!(parse(b"{not json", 10).unwrap_err().code, "malformed_json");
        assert_eq!(parse(b"[1,2]", 10).unwrap_err().code, "malformed_json");
        assert_eq!(
            parse(br#"{"samples":[{},{},{}]}"#, 2).unwrap_err().code,
            "too_many_samples"
        );
        assert_eq!(
            parse(br#"{"samples":[]}"#, 2).unwrap_err().field.as_deref(),
            Some("samples")
        );
        assert_eq!(
            parse(br#"{"samples":[1]}"#, 2)
                .unwrap_err()
                .field
                .as_deref(),
            Some("samples[0]")
        );
        assert_eq!(
            parse(br#"{"samples":[{}],"x":1}"#, 2)
                .unwrap_err()
                .field
                .as_deref(),
            Some("x")
        );
    }
}
