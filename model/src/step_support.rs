//! What the training steps with passes of our own share: reading and writing flex tensors as
//! plain f64 values, and handing gradients to the parents that need them.

use burn::backend::Flex;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::flex::FlexTensor;
use burn::tensor::{DType, TensorData};

/// A flex tensor's values as f64, whatever its float type and layout.
pub(crate) fn to_f64(tensor: &FlexTensor) -> Vec<f64> {
    let contiguous;
    let tensor = if tensor.is_contiguous() {
        tensor
    } else {
        contiguous = tensor.to_contiguous();
        &contiguous
    };
    match tensor.dtype() {
        DType::F64 => tensor.as_slice::<f64>().map(<[f64]>::to_vec),
        DType::F32 => tensor
            .as_slice::<f32>()
            .map(|v| v.iter().map(|&x| f64::from(x)).collect()),
        _ => None,
    }
    .or_else(|| {
        // Any other float type, or a view narrower than its buffer: burn converts.
        tensor
            .to_contiguous()
            .into_data()
            .convert::<f64>()
            .try_into_vec::<f64>()
            .ok()
    })
    .expect("a float tensor converts to f64")
}

/// f64 values as a flex tensor of `dtype` (f32 or f64).
pub(crate) fn from_f64(
    values: Vec<f64>,
    shape: impl Into<burn::tensor::Shape>,
    dtype: DType,
) -> FlexTensor {
    let data = TensorData::new(values, shape.into());
    FlexTensor::from_data(if dtype == DType::F64 {
        data
    } else {
        data.convert_dtype(dtype)
    })
}

/// Registers each gradient with its parent, skipping parents that need none (`None`).
pub(crate) fn register_gradients<const N: usize>(
    grads: &mut Gradients,
    parents: [Option<NodeId>; N],
    values: [FlexTensor; N],
) {
    for (parent, value) in parents.into_iter().zip(values) {
        if let Some(id) = parent {
            grads.register::<Flex>(id, value);
        }
    }
}
