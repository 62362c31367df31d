//! A burn-store adapter that casts float tensors to one dtype, so files in bf16 or f16 load
//! into f32 models and exports can be written in bf16.

use std::rc::Rc;

use burn::tensor::DType;
use burn_store::{ModuleAdapter, TensorSnapshot};

/// Casts float tensors to `to` (and 0-d tensors to `[1]` when loading HF/open_clip files).
#[derive(Clone)]
pub struct Cast {
    pub to: DType,
}

impl ModuleAdapter for Cast {
    fn adapt(&self, s: &TensorSnapshot) -> TensorSnapshot {
        let float = matches!(s.dtype, DType::F32 | DType::BF16 | DType::F16 | DType::F64);
        let scalar = s.shape.num_dims() == 0;
        if (!float || s.dtype == self.to) && !scalar {
            return s.clone();
        }
        let (f, to) = (s.clone_data_fn(), if float { self.to } else { s.dtype });
        let shape = if scalar {
            burn::tensor::Shape::new([1])
        } else {
            s.shape.clone()
        };
        let shape2 = shape.clone();
        TensorSnapshot::from_closure(
            Rc::new(move || {
                let mut d = f()?;
                if d.dtype != to {
                    d = d.convert_dtype(to);
                }
                d.shape = shape2.clone();
                Ok(d)
            }),
            to,
            shape,
            s.path_stack.clone().unwrap_or_default(),
            s.container_stack.clone().unwrap_or_default(),
            s.tensor_id.unwrap_or_default(),
        )
    }
    fn clone_box(&self) -> Box<dyn ModuleAdapter> {
        Box::new(self.clone())
    }
}
