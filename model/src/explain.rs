//! Verdicts on raw samples: energy, cutoff, severity, percentile and per-metric explanation.
//!
//! **Contributions** are counterfactual energy drops: for each metric j, the sample is scored
//! again with x_j replaced by the model's expected value (its reconstruction x'_j), and the
//! contribution is how much lower the energy gets, max(0, E(x) − E(x with x_j := x'_j)),
//! normalised to sum to 1. It measures each metric's effect on the score the cutoff is applied to
//! — not merely its reconstruction error, which ignores the mixture — and costs only D + 1
//! forward passes (D = 4). When no single substitution lowers the energy, the shares fall back to
//! each metric's squared reconstruction error, and to equal shares if even those are all zero.

use serde::{Deserialize, Serialize};

use crate::scorer::{LANES, Scorer, Scratch};
use crate::thresholds::PercentileIndex;
use crate::{DagmmModel, ModelError};

/// Above or below what the model expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Above,
    Below,
}

/// One metric's part in a verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricExplanation {
    pub metric: String,
    pub unit: String,
    pub value: f64,
    /// What the model expected, in the metric's own unit (reconstruction, inverse-transformed).
    pub expected: f64,
    pub direction: Direction,
    /// Share of the anomaly attributed to this metric; shares sum to 1. In f32: seven
    /// significant digits are more than a share needs, and batch output stores half the bytes.
    pub contribution: f32,
    /// The value lies outside the range seen in training.
    pub out_of_range: bool,
}

/// The verdict on one raw sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub energy: f64,
    pub cutoff: f64,
    pub anomaly: bool,
    pub severity: String,
    /// Where the energy falls in the training-energy distribution (0–100).
    pub percentile: f64,
    /// Any input lies outside the range seen in training: the model is extrapolating.
    pub out_of_range: bool,
    /// Metric with the largest contribution.
    pub top_metric: String,
    pub explanation: Vec<MetricExplanation>,
}

/// The numbers of a verdict, without names or explanation objects.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Assessment {
    pub energy: f64,
    pub anomaly: bool,
    pub percentile: f64,
    /// Index (in the model's feature order) of the metric with the largest contribution.
    pub top: usize,
}

/// A scorer bound to its model's preprocessing and thresholds: raw values in, verdicts out.
#[derive(Debug, Clone)]
pub struct Explainer {
    model: DagmmModel,
    scorer: Scorer,
    percentiles: PercentileIndex,
}

/// Energies at or below this are treated as equal when comparing counterfactuals.
const MIN_DROP: f64 = 1e-12;

impl Explainer {
    pub fn new(model: DagmmModel) -> Self {
        let scorer = Scorer::new(&model);
        let percentiles = PercentileIndex::new(&model.thresholds);
        Self {
            model,
            scorer,
            percentiles,
        }
    }

    pub fn model(&self) -> &DagmmModel {
        &self.model
    }

    pub fn scorer(&self) -> &Scorer {
        &self.scorer
    }

    /// The model's [`Thresholds::percentile_rank`](crate::thresholds::Thresholds::percentile_rank)
    /// of an energy, through a bucket index built once per model.
    pub fn percentile_rank(&self, energy: f64) -> f64 {
        self.percentiles.rank(&self.model.thresholds, energy)
    }

    /// Check one raw sample against each feature's valid range; the error names the feature.
    pub fn validate(&self, raw: &[f64]) -> Result<(), ModelError> {
        let features = &self.model.preprocessor.features;
        if raw.len() != features.len() {
            return Err(ModelError::InvalidSample {
                field: "sample".into(),
                why: format!("expected {} metrics, got {}", features.len(), raw.len()),
            });
        }
        for (spec, &v) in features.iter().zip(raw) {
            let why = if !v.is_finite() {
                Some(format!("{v} is not a finite number"))
            } else if spec.min_valid.is_some_and(|lo| v < lo)
                || spec.max_valid.is_some_and(|hi| v > hi)
            {
                Some(format!(
                    "{v} is outside the valid range [{}, {}]",
                    spec.min_valid.map_or("-inf".into(), |x| x.to_string()),
                    spec.max_valid.map_or("inf".into(), |x| x.to_string())
                ))
            } else {
                None
            };
            if let Some(why) = why {
                return Err(ModelError::InvalidSample {
                    field: spec.name.clone(),
                    why,
                });
            }
        }
        Ok(())
    }

    /// Energies of up to L validated raw samples, scored side by side (lanes past
    /// `rows.len()` are padding and get 0): the first pass of [`Explainer::assess_lanes`], so
    /// each equals its row's verdict energy. The scaled rows are left in the scratch.
    pub fn energies_lanes<const L: usize>(&self, rows: &[&[f64]], s: &mut Scratch) -> [f64; L] {
        assert!(rows.len() <= L, "{} rows for {L} lanes", rows.len());
        let p = &self.model.preprocessor;
        let d = p.features.len();
        let mut x = std::mem::take(&mut s.lanes_x);
        x.clear();
        x.resize(d * L, 0.0);
        for (r, raw) in rows.iter().enumerate() {
            for (j, &v) in raw.iter().enumerate().take(d) {
                x[j * L + r] = p.scale(j, v) as f32;
            }
        }
        let energies = self.scorer.energies_lanes::<L>(&x, rows.len(), s);
        s.lanes_x = x;
        energies
    }

    /// Energy of one raw sample (no explanation).
    pub fn energy(&self, raw: &[f64], s: &mut Scratch) -> f64 {
        let p = &self.model.preprocessor;
        let mut x = std::mem::take(&mut s.lanes_x);
        x.clear();
        x.extend(raw.iter().enumerate().map(|(j, &v)| p.scale(j, v) as f32));
        let e = self.scorer.energy_scaled(&x, s);
        s.lanes_x = x;
        e
    }

    /// The numbers of a verdict without its names (call [`Explainer::validate`] first). The
    /// sample's reconstruction and per-metric shares are left in `s.expected` and `s.shares`.
    pub fn assess(&self, raw: &[f64], s: &mut Scratch) -> Assessment {
        self.assess_lanes::<1>(&[raw], s)[0]
    }

    /// [`Explainer::assess`] on up to L raw samples at once (L ≤ [`crate::scorer::LANES`] is
    /// what batch scoring uses); lanes past `rows.len()` are padding. Each row's numbers are
    /// exactly those of scoring it alone. Reconstructions and shares are left row-major in
    /// `s.expected` and `s.shares` (`rows.len() × features`).
    pub fn assess_lanes<const L: usize>(
        &self,
        rows: &[&[f64]],
        s: &mut Scratch,
    ) -> [Assessment; L] {
        let p = &self.model.preprocessor;
        let t = &self.model.thresholds;
        let d = p.features.len();
        let used = rows.len();
        let energies = self.energies_lanes::<L>(rows, s);
        // The drops are taken in f32 from the same codes: the f64 energy above is the one
        // reported, and the shares the drops become are f32.
        let energies_f32 = self.scorer.last_energies_f32::<L>(used, s);
        let x = std::mem::take(&mut s.lanes_x);
        let mut x_hat = std::mem::take(&mut s.lanes_expected);
        x_hat.clear();
        x_hat.extend_from_slice(self.scorer.reconstruction_lanes(s));

        // Energy drop when metric j takes its expected value, for every row at once.
        let mut counterfactual = std::mem::take(&mut s.lanes_counterfactual);
        let mut shares = std::mem::take(&mut s.shares);
        shares.clear();
        shares.resize(used * d, 0.0);
        for j in 0..d {
            counterfactual.clear();
            counterfactual.extend_from_slice(&x);
            counterfactual[j * L..(j + 1) * L].copy_from_slice(&x_hat[j * L..(j + 1) * L]);
            let without_j = self
                .scorer
                .energies_f32_lanes::<L>(&counterfactual, used, s);
            for r in 0..used {
                shares[r * d + j] = f64::from((energies_f32[r] - without_j[r]).max(0.0));
            }
        }

        let mut expected = std::mem::take(&mut s.expected);
        expected.clear();
        let mut out = [Assessment::default(); L];
        for (r, (row_shares, a)) in shares.chunks_exact_mut(d).zip(&mut out).enumerate() {
            expected.extend((0..d).map(|j| x_hat[j * L + r]));
            if row_shares.iter().sum::<f64>() <= MIN_DROP {
                for (j, share) in row_shares.iter_mut().enumerate() {
                    *share = f64::from(x[j * L + r] - x_hat[j * L + r]).powi(2);
                }
            }
            let total: f64 = row_shares.iter().sum();
            if total > MIN_DROP {
                row_shares.iter_mut().for_each(|v| *v /= total);
            } else {
                row_shares.fill(1.0 / d as f64);
            }
            let top = row_shares
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map_or(0, |(j, _)| j);
            let energy = energies[r];
            *a = Assessment {
                energy,
                anomaly: t.is_anomaly(energy),
                percentile: self.percentile_rank(energy),
                top,
            };
        }
        s.lanes_x = x;
        s.lanes_expected = x_hat;
        s.lanes_counterfactual = counterfactual;
        s.expected = expected;
        s.shares = shares;
        out
    }

    /// Full verdict on one raw sample (call [`Explainer::validate`] first).
    pub fn verdict(&self, raw: &[f64], s: &mut Scratch) -> Verdict {
        let a = self.assess(raw, s);
        self.verdict_of(raw, &a, &s.expected, &s.shares)
    }

    /// Full verdicts on validated raw samples, [`LANES`] per pass where there are enough (a
    /// pass on sixteen lanes costs about 2.5 one-row passes). Each equals [`Explainer::verdict`]
    /// on its row.
    pub fn verdicts(&self, rows: &[&[f64]], s: &mut Scratch) -> Vec<Verdict> {
        let d = self.model.preprocessor.features.len();
        let mut out = Vec::with_capacity(rows.len());
        for block in rows.chunks(LANES) {
            if block.len() <= 2 {
                out.extend(block.iter().map(|raw| self.verdict(raw, s)));
                continue;
            }
            let assessed = self.assess_lanes::<LANES>(block, s);
            for (r, (raw, a)) in block.iter().zip(&assessed).enumerate() {
                let span = r * d..(r + 1) * d;
                out.push(self.verdict_of(raw, a, &s.expected[span.clone()], &s.shares[span]));
            }
        }
        out
    }

    fn verdict_of(&self, raw: &[f64], a: &Assessment, expected: &[f32], shares: &[f64]) -> Verdict {
        let p = &self.model.preprocessor;
        let t = &self.model.thresholds;
        let explanation: Vec<MetricExplanation> = p
            .features
            .iter()
            .enumerate()
            .map(|(j, spec)| {
                let expected = p.unscale(j, f64::from(expected[j]));
                MetricExplanation {
                    metric: spec.name.clone(),
                    unit: spec.unit.clone(),
                    value: raw[j],
                    expected,
                    direction: if raw[j] >= expected {
                        Direction::Above
                    } else {
                        Direction::Below
                    },
                    contribution: shares[j] as f32,
                    out_of_range: p.out_of_range(j, raw[j]),
                }
            })
            .collect();
        Verdict {
            energy: a.energy,
            cutoff: t.cutoff,
            anomaly: a.anomaly,
            severity: t.severity(a.energy).to_string(),
            percentile: a.percentile,
            out_of_range: explanation.iter().any(|e| e.out_of_range),
            top_metric: p.features[a.top].name.clone(),
            explanation,
        }
    }
}
