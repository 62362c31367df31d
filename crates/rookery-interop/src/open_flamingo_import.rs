//! An OpenFlamingo checkpoint's trained parts read into a rookery Flamingo built on the same
//! vision encoder and LM: OpenFlamingo's released `checkpoint.pt` (a PyTorch pickle of
//! `filter_state_dict_to_trainable`'s state dict; a training checkpoint's
//! `model_state_dict` and DDP's `module.` prefix are read too) or a `rookery export --format
//! open_flamingo` file. Names and layouts: [`crate::open_flamingo_names`].
//!
//! OpenFlamingo trains the whole input embedding table (and an untied output embedding), so
//! the checkpoint's tables replace the LM's rows (they stay frozen in rookery) and its rows of
//! `<image>` and `<|endofchunk|>` become the trained new-token rows. Frozen parts a full state
//! dict may carry (`vision_encoder.*`, the LM's own layers) are skipped: they come from
//! `vision_from` and `lm_from`. A trained tensor missing, one left over (another depth,
//! `cross_attn_every_n_layers` or LM layout), or a shape that differs is refused by name.

use std::path::Path;

use anyhow::{bail, Context, Result};
use burn::prelude::*;
use burn_store::{ModuleSnapshot, SafetensorsStore};
use rookery_model::flamingo::{Flamingo, FlamingoConfig};

use crate::open_flamingo_export::trained_shapes;
use crate::open_flamingo_names::{embedding, head, trained, Layout};
use crate::tensors::{read_f32, read_pytorch_f32, transpose, Tensors};

/// What [`load_trained`] took from the checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loaded {
    /// Trained tensors set (resampler, gated blocks, the new-token rows).
    pub trained: usize,
    /// Rows of the embedding (and of an untied head) replaced.
    pub embedding_rows: usize,
    /// Tensors of frozen parts skipped.
    pub skipped: usize,
}

/// The tensors of an OpenFlamingo checkpoint file: safetensors by extension, else a PyTorch
/// pickle.
pub fn read(path: &Path) -> Result<Tensors> {
    let t = match path.extension().and_then(|e| e.to_str()) {
        Some("safetensors") => read_f32(path)?,
        _ => read_pytorch_f32(path)?,
    };
    if t.is_empty() {
        bail!("{}: no tensors", path.display());
    }
    Ok(t)
}

/// Sets the trained parts of `model` (built from `cfg`, its towers loaded) from the
/// OpenFlamingo checkpoint at `path` (see the module docs).
pub fn load_trained<B: Backend>(
    model: Flamingo<B>,
    cfg: &FlamingoConfig,
    path: &Path,
) -> Result<(Flamingo<B>, Loaded)> {
    let mut theirs = read(path)?;
    let name = path.display().to_string();
    let mut ours = trained_parts(&model, cfg, &mut theirs, &name)?;
    let trained = ours.len() + 1;
    let rows = embedding_rows(&model, cfg, &mut theirs, &mut ours, &name)?;
    // Checked here, not on the model: its frozen towers (most of it) came from their files.
    if let Some((k, _)) = ours
        .iter()
        .find(|(_, t)| t.1.iter().any(|x| !x.is_finite()))
    {
        bail!("{name}: the values set into {k} are not all finite (a diverged run?)");
    }
    let skipped = refuse_left_over(theirs, &name)?;
    let mut store =
        SafetensorsStore::from_bytes(Some(crate::tensors::to_bytes(&ours)?)).allow_partial(true);
    let mut model = model;
    let res = model
        .load_from(&mut store)
        .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    if !res.errors.is_empty() || !res.unused.is_empty() {
        bail!(
            "{name}: does not fit this model: {:?} {:?}",
            res.errors,
            res.unused
        );
    }
    let model = model.fix_frozen();
    let loaded = Loaded {
        trained,
        embedding_rows: rows,
        skipped,
    };
    Ok((model, loaded))
}

/// The resampler's and the gated blocks' tensors taken out of `theirs`, under rookery's paths
/// and layouts; refuses a missing one or a shape that differs from `model`'s.
fn trained_parts<B: Backend>(
    model: &Flamingo<B>,
    cfg: &FlamingoConfig,
    theirs: &mut Tensors,
    name: &str,
) -> Result<Tensors> {
    let shapes = trained_shapes(model);
    let mut ours = Tensors::new();
    let (mut missing, mut misfit) = (Vec::new(), Vec::new());
    for n in trained(cfg) {
        let t = match (theirs.remove(&n.theirs), n.layout) {
            (Some(t), Layout::Transposed) => transpose(t),
            (Some(t), Layout::Same) => t,
            // OpenFlamingo's resampler has no frame embedding unless given frames.
            (None, _) if n.ours == "resampler.frame_embs" => continue,
            (None, _) => {
                missing.push(n.theirs);
                continue;
            }
        };
        let want = &shapes[&n.ours].0;
        if &t.0 != want {
            misfit.push(format!(
                "{} is {:?}, this model's {} {want:?}",
                n.theirs, t.0, n.ours
            ));
        }
        ours.insert(n.ours, t);
    }
    if !misfit.is_empty() {
        bail!(
            "{name}: shapes differ from [flamingo.model]'s: {} (set its sizes to the checkpoint's)",
            misfit.join("; ")
        );
    }
    if !missing.is_empty() {
        bail!(
            "{name}: {} trained tensor(s) of this model missing, e.g. {:?} (set [flamingo.model] \
             to the checkpoint's sizes and cross_attn_every_n_layers)",
            missing.len(),
            &missing[..missing.len().min(4)]
        );
    }
    Ok(ours)
}

/// The checkpoint's embedding (and untied head) rows over the LM's, under rookery's paths, and
/// its rows of the new tokens as `new_tokens`; the number of rows replaced.
fn embedding_rows<B: Backend>(
    model: &Flamingo<B>,
    cfg: &FlamingoConfig,
    theirs: &mut Tensors,
    ours: &mut Tensors,
    name: &str,
) -> Result<usize> {
    let key = embedding(cfg);
    let (shape, rows) = theirs
        .remove(&key)
        .with_context(|| format!("{name}: no {key} (the embedding with the new tokens' rows)"))?;
    let [table_rows, d] = model.lm.wte.weight.dims();
    let (n, ids) = (shape[0], [model.image_token, model.eoc_token]);
    if shape.len() != 2 || shape[1] != d || n > table_rows {
        bail!("{name}: {key} is {shape:?}; this model's embedding is [{table_rows}, {d}]");
    }
    if ids.iter().any(|&id| id as usize >= n) {
        bail!("{name}: {key} has {n} rows, fewer than the ids of <image> and <|endofchunk|> ({ids:?}) need");
    }
    let values =
        |t: Tensor<B, 2>| -> Vec<f32> { t.into_data().convert::<f32>().to_vec().expect("f32") };
    let mut wte = values(model.lm.wte.weight.val());
    wte[..n * d].copy_from_slice(&rows);
    ours.insert("lm.wte.weight".into(), (vec![table_rows, d], wte));
    let new: Vec<f32> = ids
        .iter()
        .flat_map(|&id| rows[id as usize * d..(id as usize + 1) * d].to_vec())
        .collect();
    ours.insert("new_tokens".into(), (vec![2, d], new));
    untied_head_rows(model, cfg, theirs, ours, &shape, name)?;
    Ok(n)
}

/// An untied head's rows from the checkpoint over the LM's (OpenFlamingo trains it too, when
/// its run made it trainable); a tied head is the embedding, already set.
fn untied_head_rows<B: Backend>(
    model: &Flamingo<B>,
    cfg: &FlamingoConfig,
    theirs: &mut Tensors,
    ours: &mut Tensors,
    embedding_shape: &[usize],
    name: &str,
) -> Result<()> {
    let found = head(cfg)
        .iter()
        .find_map(|k| Some((*k, theirs.remove(*k)?)));
    let Some((key, (shape, rows))) = found.filter(|_| !model.tied) else {
        return Ok(());
    };
    if shape != embedding_shape {
        bail!("{name}: {key} is {shape:?}, the embedding {embedding_shape:?}");
    }
    // rookery's head is [D, V]: as rows [V, D], the first n replaced, back.
    let [d, v] = model.lm.lm_head.weight.dims();
    let values: Vec<f32> = model
        .lm
        .lm_head
        .weight
        .val()
        .into_data()
        .convert::<f32>()
        .to_vec()
        .expect("f32");
    let (as_rows, mut head) = transpose((vec![d, v], values));
    head[..rows.len()].copy_from_slice(&rows);
    ours.insert("lm.lm_head.weight".into(), transpose((as_rows, head)));
    Ok(())
}

/// Skips the frozen parts a full state dict carries; refuses anything else left over, naming
/// it (trained tensors of another layout would otherwise be dropped without a word).
fn refuse_left_over(theirs: Tensors, name: &str) -> Result<usize> {
    let frozen = |k: &str| {
        k.starts_with("vision_encoder.")
            || (k.starts_with("lang_encoder.") && !k.contains("gated_cross_attn"))
    };
    let (skipped, left): (Vec<String>, Vec<String>) = theirs.into_keys().partition(|k| frozen(k));
    if !left.is_empty() {
        bail!(
            "{name}: {} tensor(s) this model has no place for, e.g. {:?} (a checkpoint of \
             another resampler depth, cross_attn_every_n_layers or LM layout?)",
            left.len(),
            &left[..left.len().min(4)]
        );
    }
    if !skipped.is_empty() {
        tracing::info!(
            skipped = skipped.len(),
            "{name}: frozen parts in the checkpoint skipped (taken from vision_from / lm_from)"
        );
    }
    Ok(skipped.len())
}
