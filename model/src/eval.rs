//! Detection metrics of anomaly scores against 0/1 labels (1 = anomaly, the positive class).

use serde::{Deserialize, Serialize};

/// Precision, recall and F1 of a cutoff, plus threshold-free ROC-AUC and PR-AUC.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Detection {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub roc_auc: f64,
    /// Average precision (area under the precision-recall curve, step interpolation).
    pub pr_auc: f64,
    pub true_positives: usize,
    pub false_positives: usize,
    pub false_negatives: usize,
}

/// Metrics for flagging `score > cutoff`. Scores must be finite.
pub fn detection(scores: &[f64], labels: &[bool], cutoff: f64) -> Detection {
    let mut tp = 0;
    let mut fp = 0;
    let mut fn_ = 0;
    for (&s, &l) in scores.iter().zip(labels) {
        match (s > cutoff, l) {
            (true, true) => tp += 1,
            (true, false) => fp += 1,
            (false, true) => fn_ += 1,
            (false, false) => {}
        }
    }
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let precision = ratio(tp, tp + fp);
    let recall = ratio(tp, tp + fn_);
    let f1 = if precision + recall == 0.0 {
        0.0
    } else {
        2.0 * precision * recall / (precision + recall)
    };
    Detection {
        precision,
        recall,
        f1,
        roc_auc: roc_auc(scores, labels),
        pr_auc: average_precision(scores, labels),
        true_positives: tp,
        false_positives: fp,
        false_negatives: fn_,
    }
}

/// Indices sorted by descending score.
fn by_score_desc(scores: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    order
}

/// Probability that a random positive outscores a random negative (ties count half).
pub fn roc_auc(scores: &[f64], labels: &[bool]) -> f64 {
    let order = by_score_desc(scores);
    let positives = labels.iter().filter(|&&l| l).count();
    let negatives = labels.len() - positives;
    if positives == 0 || negatives == 0 {
        return f64::NAN;
    }
    // Walk groups of tied scores; each negative in a group beats the positives seen before it.
    let mut positives_above = 0usize;
    let mut wins = 0.0;
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        let (mut pos, mut neg) = (0usize, 0usize);
        while j < order.len() && scores[order[j]] == scores[order[i]] {
            if labels[order[j]] {
                pos += 1
            } else {
                neg += 1
            }
            j += 1;
        }
        wins += neg as f64 * (positives_above as f64 + 0.5 * pos as f64);
        positives_above += pos;
        i = j;
    }
    wins / (positives as f64 * negatives as f64)
}

/// Average precision: Σ over thresholds of (recall step) × precision, tied scores as one step.
pub fn average_precision(scores: &[f64], labels: &[bool]) -> f64 {
    let order = by_score_desc(scores);
    let positives = labels.iter().filter(|&&l| l).count();
    if positives == 0 {
        return f64::NAN;
    }
    let (mut tp, mut seen, mut ap) = (0usize, 0usize, 0.0);
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        let mut new_tp = 0;
        while j < order.len() && scores[order[j]] == scores[order[i]] {
            new_tp += usize::from(labels[order[j]]);
            j += 1;
        }
        seen += j - i;
        tp += new_tp;
        ap += (new_tp as f64 / positives as f64) * (tp as f64 / seen as f64);
        i = j;
    }
    ap
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perfectly_separated_scores_give_perfect_metrics() {
        let scores = [0.1, 0.2, 0.3, 5.0, 6.0];
        let labels = [false, false, false, true, true];
        let d = detection(&scores, &labels, 1.0);
        assert_eq!(
            (d.precision, d.recall, d.f1, d.roc_auc, d.pr_auc),
            (1.0, 1.0, 1.0, 1.0, 1.0)
        );
    }

    #[test]
    fn metrics_match_a_hand_computation() {
        // Flagged above 0.5: scores 0.9 (pos), 0.8 (neg), 0.7 (pos) -> tp 2, fp 1, fn 1.
        let scores = [0.9, 0.8, 0.7, 0.4, 0.3];
        let labels = [true, false, true, true, false];
        let d = detection(&scores, &labels, 0.5);
        assert!((d.precision - 2.0 / 3.0).abs() < 1e-12);
        assert!((d.recall - 2.0 / 3.0).abs() < 1e-12);
        // Pairs (pos, neg): 6; positive wins: 0.9>0.8, 0.9>0.3, 0.7>0.3, 0.4>0.3 = 4.
        assert!((d.roc_auc - 4.0 / 6.0).abs() < 1e-12);
        // AP = 1/3·1 + 1/3·(2/3) + 1/3·(3/4).
        assert!((d.pr_auc - (1.0 + 2.0 / 3.0 + 0.75) / 3.0).abs() < 1e-12);
    }

    #[test]
    fn ties_count_half() {
        assert_eq!(roc_auc(&[1.0, 1.0], &[true, false]), 0.5);
    }
}
