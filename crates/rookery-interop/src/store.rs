//! Reading and writing safetensors with burn-store as every rookery file is: strictly (every
//! tensor present, shapes checked, values finite) and reproducibly (the same weights give the
//! same bytes).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use burn::module::Module;
use burn_store::{ModuleSnapshot, SafetensorsStore};

/// A safetensors writer whose bytes depend on the weights only: burn-store's default metadata
/// is a `HashMap` of three entries, serialised in a different order each run, so equal weights
/// gave files with different hashes. One entry, `format = pt`, as PyTorch's writers put it.
pub fn safetensors_writer(path: impl Into<PathBuf>) -> SafetensorsStore {
    SafetensorsStore::from_file(path)
        .overwrite(true)
        .clear_metadata()
        .metadata("format", "pt")
}

/// Refuses weights with a NaN or infinite value, naming the first such tensor.
pub fn check_finite<B: burn::prelude::Backend, M: Module<B>>(model: &M) -> Result<()> {
    for t in model.collect(None, None, false) {
        let data = t
            .to_data()
            .map_err(|e| anyhow::anyhow!("{}: {e:?}", t.full_path()))?;
        let values = data.convert::<f32>();
        let values = values
            .as_slice::<f32>()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let bad = values.iter().filter(|v| !v.is_finite()).count();
        if bad > 0 {
            bail!(
                "tensor {} holds {bad} non-finite value(s) of {}",
                t.full_path(),
                values.len()
            );
        }
    }
    Ok(())
}

/// `load_from` through `store`, refusing missing and unexpected tensors, shape errors and
/// non-finite values
/// (weights of a diverged run: evaluated, they score as perfect since every comparison with
/// NaN is false), each naming `path`.
pub fn load_strict<B: burn::prelude::Backend, M: Module<B>>(
    mut model: M,
    store: &mut SafetensorsStore,
    path: &Path,
) -> Result<M> {
    let res = model
        .load_from(store)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    // burn-store reports a LayerNorm's `weight`/`bias` as unused under the file's names even
    // when its PyTorch adapter applied them as `gamma`/`beta`.
    let applied = |name: &str| res.applied.iter().any(|a| a == name);
    let unexpected: Vec<&String> = res
        .unused
        .iter()
        .filter(|u| {
            let adapted = u
                .strip_suffix(".weight")
                .map(|p| format!("{p}.gamma"))
                .or_else(|| u.strip_suffix(".bias").map(|p| format!("{p}.beta")));
            !adapted.is_some_and(|a| applied(&a))
        })
        .collect();
    if !res.errors.is_empty() || !res.missing.is_empty() || !unexpected.is_empty() {
        bail!(
            "{}: missing {:?}, unexpected {:?}, errors {:?}",
            path.display(),
            res.missing,
            unexpected,
            res.errors
        );
    }
    check_finite(&model).with_context(|| format!("{}", path.display()))?;
    Ok(model)
}
