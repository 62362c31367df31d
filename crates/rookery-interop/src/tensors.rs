//! Named f32 tensors read from, and written to, safetensors bytes: the in-memory form in which
//! one format's weights are renamed into another's.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

/// Name -> (shape, row-major values).
pub type Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// Every float parameter of `model` as f32 under its dotted module path (`visual.conv1.weight`).
pub fn of_module<B: burn::prelude::Backend, M: burn::module::Module<B>>(model: &M) -> Tensors {
    collect(model, true)
}

/// The shape of every float parameter of `model` under its dotted module path (values left
/// empty: nothing is copied off the device).
pub fn shapes_of<B: burn::prelude::Backend, M: burn::module::Module<B>>(model: &M) -> Tensors {
    collect(model, false)
}

fn collect<B: burn::prelude::Backend, M: burn::module::Module<B>>(
    model: &M,
    values: bool,
) -> Tensors {
    use burn::module::{ModuleVisitor, Param};
    use burn::prelude::Tensor;
    struct Collect {
        stack: Vec<String>,
        out: Tensors,
        values: bool,
    }
    impl<B: burn::prelude::Backend> ModuleVisitor<B> for Collect {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.stack.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.stack.pop();
        }
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
            let t = p.val();
            let shape = t.dims().to_vec();
            let data = match self.values {
                true => t.into_data().convert::<f32>().to_vec::<f32>().expect("f32"),
                false => Vec::new(),
            };
            self.out.insert(self.stack.join("."), (shape, data));
        }
    }
    let mut c = Collect {
        stack: Vec::new(),
        out: Tensors::new(),
        values,
    };
    model.visit(&mut c);
    c.out
}

/// Every tensor of the safetensors file `path` as f32 (F16 and BF16 are widened, saying so),
/// except the stale `position_ids` buffers older transformers saved. Other dtypes are refused
/// naming the tensor.
pub fn read_f32(path: &Path) -> Result<Tensors> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st = SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{}: not a safetensors file", path.display()))?;
    let mut out = Tensors::new();
    let mut widened = None;
    for (name, view) in st.tensors() {
        if name.ends_with("position_ids") {
            continue;
        }
        let raw = view.data();
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => raw
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::BF16 => {
                widened = Some("bf16");
                raw.chunks_exact(2)
                    .map(|b| {
                        burn::tensor::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
                    })
                    .collect()
            }
            Dtype::F16 => {
                widened = Some("f16");
                raw.chunks_exact(2)
                    .map(|b| {
                        burn::tensor::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()
                    })
                    .collect()
            }
            d => bail!(
                "{}: tensor {name} has dtype {d:?}; weights must be F32, BF16 or F16",
                path.display()
            ),
        };
        out.insert(name, (view.shape().to_vec(), values));
    }
    if let Some(d) = widened {
        tracing::info!(file = %path.display(), "{d} weights cast to f32 on load");
    }
    Ok(out)
}

/// Every tensor of the PyTorch checkpoint `path` (`torch.save` of a state dict, or of a dict
/// holding it under `state_dict` or `model_state_dict`; a `module.` prefix from
/// DistributedDataParallel dropped) as f32, read by burn-store's pickle reader.
pub fn read_pytorch_f32(path: &Path) -> Result<Tensors> {
    use burn_store::pytorch::PytorchReader;
    let err = |e: burn_store::pytorch::PytorchError| anyhow::anyhow!("{}: {e}", path.display());
    let mut reader = PytorchReader::new(path).map_err(err)?;
    // Training checkpoints nest the weights beside the optimizer's state: Lightning under
    // `state_dict`, OpenFlamingo's training script under `model_state_dict`.
    let nested = ["model_state_dict", "state_dict"].into_iter().find(|top| {
        reader
            .keys()
            .iter()
            .any(|k| k.starts_with(&format!("{top}.")))
    });
    if let Some(top) = nested {
        reader = PytorchReader::with_top_level_key(path, top).map_err(err)?;
    }
    let mut out = Tensors::new();
    for (name, snap) in reader.into_tensors() {
        let data = snap
            .to_data()
            .map_err(|e| anyhow::anyhow!("{}: tensor {name}: {e:?}", path.display()))?;
        let shape = data.shape.to_vec();
        let values = data
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| anyhow::anyhow!("{}: tensor {name}: {e:?}", path.display()))?;
        let name = name.strip_prefix("module.").unwrap_or(&name).to_string();
        out.insert(name, (shape, values));
    }
    Ok(out)
}

/// A 2-d `[r, c]` tensor transposed to `[c, r]` (PyTorch's `[out, in]` Linear weights to
/// burn's `[in, out]`, or open_clip's `x @ proj` matrices to HF's Linear weights).
pub fn transpose((shape, data): (Vec<usize>, Vec<f32>)) -> (Vec<usize>, Vec<f32>) {
    let (r, c) = (shape[0], shape[1]);
    let mut t = vec![0.0; data.len()];
    for i in 0..r {
        for j in 0..c {
            t[j * r + i] = data[i * c + j];
        }
    }
    (vec![c, r], t)
}

/// The weight files of the HF model in `dir`, in the order they are read:
/// `model.safetensors`, the shards `model.safetensors.index.json` lists, `pytorch_model.bin`,
/// or the shards `pytorch_model.bin.index.json` lists; an error naming the directory and
/// these names when none is there.
pub fn hf_weight_files(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    for single in ["model.safetensors", "pytorch_model.bin"] {
        if dir.join(single).is_file() {
            return Ok(vec![dir.join(single)]);
        }
    }
    for index in [
        "model.safetensors.index.json",
        "pytorch_model.bin.index.json",
    ] {
        let path = dir.join(index);
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        let v: serde_json::Value = serde_json::from_slice(&bytes)
            .with_context(|| format!("{}: not JSON", path.display()))?;
        let shards: std::collections::BTreeSet<&str> = v["weight_map"]
            .as_object()
            .with_context(|| format!("{}: no weight_map", path.display()))?
            .values()
            .filter_map(serde_json::Value::as_str)
            .collect();
        return Ok(shards.into_iter().map(|s| dir.join(s)).collect());
    }
    bail!(
        "{}: no weights: expected model.safetensors, model.safetensors.index.json with its shards, pytorch_model.bin or pytorch_model.bin.index.json",
        dir.display()
    )
}

/// Every tensor of the HF model in `dir` ([`hf_weight_files`]) as f32: safetensors files
/// directly, PyTorch pickles through burn-store's reader.
pub fn read_hf(dir: &Path) -> Result<Tensors> {
    let mut all = Tensors::new();
    for f in hf_weight_files(dir)? {
        let part = match f.extension().is_some_and(|e| e == "bin") {
            true => read_pytorch_f32(&f)?,
            false => read_f32(&f)?,
        };
        all.extend(part);
    }
    Ok(all)
}

/// `tensors` as the bytes of an f32 safetensors file.
pub fn to_bytes(tensors: &Tensors) -> Result<Vec<u8>> {
    let raw: Vec<(&String, Vec<u8>, &Vec<usize>)> = tensors
        .iter()
        .map(|(k, (shape, v))| (k, v.iter().flat_map(|x| x.to_le_bytes()).collect(), shape))
        .collect();
    let views = raw
        .iter()
        .map(|(k, b, s)| Ok(((*k).clone(), TensorView::new(Dtype::F32, (*s).clone(), b)?)))
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    Ok(safetensors::serialize(views, None)?)
}

/// Writes `tensors` to the safetensors file `path` in f32 or bf16, with the `format = pt`
/// metadata PyTorch users' loaders expect; names sorted, so equal tensors give equal bytes.
pub fn write(tensors: &Tensors, path: &Path, bf16: bool) -> Result<()> {
    let bytes: Vec<(&String, Vec<u8>, &Vec<usize>)> = tensors
        .iter()
        .map(|(k, (s, v))| {
            let b = match bf16 {
                true => v
                    .iter()
                    .flat_map(|x| burn::tensor::bf16::from_f32(*x).to_bits().to_le_bytes())
                    .collect(),
                false => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            };
            (k, b, s)
        })
        .collect();
    let dtype = if bf16 { Dtype::BF16 } else { Dtype::F32 };
    let views = bytes
        .iter()
        .map(|(k, b, s)| Ok(((*k).clone(), TensorView::new(dtype, (*s).clone(), b)?)))
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), path)
        .with_context(|| format!("writing {}", path.display()))
}
