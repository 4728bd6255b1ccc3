//! Helpers shared by the unit tests.

use burn::tensor::{DType, Device, Tensor, TensorData};

/// A leaf tensor of `dtype` holding `values`, whose gradient the test will read.
pub(crate) fn leaf(values: Vec<f64>, dims: [usize; 2], dtype: DType, device: &Device) -> Tensor<2> {
    Tensor::<2>::from_data(TensorData::new(values, dims), device)
        .cast(dtype)
        .detach()
        .require_grad()
}

/// Asserts that each named series of a fused step is within `tolerance` of its composed
/// reference, relative to the reference's largest magnitude, and that the reference is not all
/// zeros (a comparison of zeros would prove nothing).
pub(crate) fn assert_close_to_reference(
    names: &[&str],
    fused: &[Vec<f64>],
    reference: &[Vec<f64>],
    tolerance: f64,
) {
    assert_eq!(names.len(), fused.len());
    for ((name, got), want) in names.iter().zip(fused).zip(reference) {
        assert_eq!(got.len(), want.len(), "{name}: length");
        let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
        assert!(scale > 0.0, "{name} is all zeros");
        for (at, (a, b)) in got.iter().zip(want).enumerate() {
            assert!(
                (a - b).abs() <= tolerance * scale,
                "{name}[{at}]: fused {a}, reference {b} (tolerance {tolerance} × {scale})"
            );
        }
    }
}

/// Whether two buffers hold the same values bit for bit (so −0 differs from 0, and NaNs
/// compare by their bits), and as many.
pub(crate) fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Held by tests that pin threads to CPUs, which the process shares: one at a time sees the
/// CPUs it claims as the only ones claimed.
pub(crate) static PINNING: std::sync::Mutex<()> = std::sync::Mutex::new(());
