//! Stage 2: Flamingo on interleaved pages. The vision tower comes from a stage-1 CLIP
//! checkpoint or another project's CLIP, the language model from a stage-"lm" checkpoint or an
//! HF causal LM, both frozen; only the
//! Perceiver Resampler, the gated cross-attention blocks and the `<image>`/`<|endofchunk|>`
//! embeddings train.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use anyhow::{bail, Context, Result};
use burn::module::{Module, ParamId};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::DType;
use rookery_data::loader::{ImageNorm, Mode};
use rookery_data::pages::{PageBatch, Pages};
use rookery_data::TextTokenizer;
use rookery_dist::Communicator;
use rookery_model::flamingo::{Flamingo, FlamingoConfig, LanguageModel, LmConfig, VisionTower};
use rookery_model::precision::FrozenDtype;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{Report, Stage};
use crate::causal::causal_local;
use crate::checkpoint;
use crate::config::RunConfig;
use crate::optim::PathIds;
use crate::parallel::GradSync;
use crate::step::LocalGrads;
use crate::trainer::TrainStage;
use rookery_eval::fewshot::{held_out_questions, perplexity, question_answering};
use rookery_eval::input::page_logits;
use rookery_eval::openflamingo::Example;

/// `[flamingo]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FlamingoRunConfig {
    /// The stage-1 CLIP run directory (its latest checkpoint) or checkpoint directory whose
    /// vision tower is used, frozen.
    pub vision_from: PathBuf,
    /// The frozen language model: a stage-"lm" run directory or checkpoint directory, or an HF
    /// causal LM's directory (Llama family or GPT-2, with its `tokenizer.json`; the run then
    /// tokenizes with that tokenizer, extended by the new tokens).
    pub lm_from: PathBuf,
    /// SHA-256 of the two sources' weights (of the shards' hashes for a sharded LM), recorded
    /// by the run (leave empty).
    pub vision_sha256: String,
    pub lm_sha256: String,
    /// An OpenFlamingo checkpoint to continue from (its released `checkpoint.pt`, or a
    /// `rookery export --format open_flamingo` file): the resampler, the gated blocks and the
    /// embedding rows start from it instead of fresh (empty: fresh). Its model must be built
    /// on the same vision encoder and LM, at the sizes `[flamingo.model]` states.
    pub init_from: PathBuf,
    /// SHA-256 of `init_from`, recorded by the run (leave empty).
    pub init_sha256: String,
    /// Learning-rate multiplier of the tanh gates (`attn_gate`, `ff_gate`). 1 trains them like
    /// every other new parameter, as OpenFlamingo does; from 0 the gates open slowly, and on a
    /// budget of a few hundred steps a faster gate lets the image path in sooner.
    pub gate_lr_mult: f64,
    /// What the frozen vision tower and LM are held and run in: "auto" (bf16 on CUDA, f32 on
    /// CPU), "f32" or "bf16"; the trained parts stay f32 ([`rookery_model::precision`]).
    pub frozen_dtype: FrozenDtype,
    /// The model; its `vision` and `lm` are taken from the two sources.
    pub model: FlamingoConfig,
}

impl Default for FlamingoRunConfig {
    fn default() -> Self {
        FlamingoRunConfig {
            vision_from: PathBuf::from("runs/clip-tiny"),
            lm_from: PathBuf::from("runs/lm-tiny"),
            vision_sha256: String::new(),
            lm_sha256: String::new(),
            init_from: PathBuf::new(),
            init_sha256: String::new(),
            gate_lr_mult: 1.0,
            frozen_dtype: FrozenDtype::default(),
            model: FlamingoConfig::default(),
        }
    }
}

impl FlamingoRunConfig {
    /// The checks of `[flamingo]` that need no source (`(key, reason)`); the shapes the
    /// sources give are checked when the run resolves them.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let mult = self.gate_lr_mult;
        if !(mult.is_finite() && mult > 0.0) {
            return Err((
                "flamingo.gate_lr_mult".into(),
                format!("must be a number > 0, not {mult}"),
            ));
        }
        let (f, r) = (&self.model, &self.model.resampler);
        let sizes = [
            ("cross_attn_every_n_layers", f.cross_attn_every_n_layers),
            ("xattn_heads", f.xattn_heads),
            ("xattn_dim_head", f.xattn_dim_head),
            ("xattn_ff_mult", f.xattn_ff_mult),
            ("resampler.latents", r.latents),
            ("resampler.depth", r.depth),
            ("resampler.heads", r.heads),
            ("resampler.dim_head", r.dim_head),
            ("resampler.ff_mult", r.ff_mult),
            ("resampler.max_frames", r.max_frames),
        ];
        match sizes.iter().find(|(_, v)| *v == 0) {
            Some((k, _)) => Err((format!("flamingo.model.{k}"), "must be at least 1".into())),
            None => Ok(()),
        }
    }
}

pub struct FlamingoStage {
    cfg: RunConfig,
    tokenizer: Arc<TextTokenizer>,
    questions: OnceLock<Vec<Example>>,
}

/// A source checkpoint's directory and resolved config, refusing one of another stage.
fn source(path: &Path, key: &str, stage: TrainStage) -> Result<(PathBuf, RunConfig)> {
    let dir = checkpoint::resolve(path).with_context(|| format!("flamingo.{key}"))?;
    let cfg = RunConfig::load(&dir.join("config.toml"), &[])
        .with_context(|| format!("flamingo.{key}: {}", dir.display()))?;
    if cfg.train.stage != stage {
        bail!(
            "flamingo.{key} = {}: that checkpoint is of stage \"{}\", not \"{stage}\"",
            path.display(),
            cfg.train.stage
        );
    }
    Ok((dir, cfg))
}

impl FlamingoStage {
    fn model_config(&self) -> &FlamingoConfig {
        &self.cfg.flamingo.model
    }
}

/// What `[flamingo] vision_from` holds: a CLIP (its vision tower is used) or a SigLIP.
enum VisionSource {
    Clip(rookery_model::ClipConfig),
    Siglip(rookery_model::siglip::SiglipConfig),
}

/// Where `[flamingo] vision_from` points: the directory read and its model's config. A rookery
/// CLIP checkpoint or run directory, a CLIP in another format (`rookery export`, open_clip, HF;
/// [`rookery_interop::detect_clip`]), or an HF SigLIP (`SiglipModel` or `SiglipVisionModel`).
fn vision_source(path: &Path) -> Result<(PathBuf, VisionSource)> {
    if checkpoint::is_rookery_run(path) {
        let (dir, cfg) = source(path, "vision_from", TrainStage::Clip)?;
        return Ok((dir, VisionSource::Clip(cfg.model)));
    }
    let key = || format!("flamingo.vision_from = {}", path.display());
    if rookery_interop::is_siglip(path) {
        let cfg = rookery_interop::hf_siglip::config(path).with_context(key)?;
        return Ok((path.to_path_buf(), VisionSource::Siglip(cfg)));
    }
    let cfg = rookery_interop::clip_config(path).with_context(key)?;
    Ok((path.to_path_buf(), VisionSource::Clip(cfg)))
}

/// The weight files of a source directory [`resolve`] found, in the order they are hashed.
fn weight_files(dir: &Path, vision: bool) -> Result<Vec<PathBuf>> {
    if checkpoint::is_rookery_run(dir) {
        return Ok(vec![dir.join("model.safetensors")]);
    }
    if !vision || rookery_interop::is_siglip(dir) {
        return rookery_interop::lm_weight_files(dir);
    }
    Ok(match rookery_interop::detect_clip(dir)? {
        rookery_interop::ClipFormat::Hf => rookery_interop::tensors::hf_weight_files(dir)?,
        _ => {
            let st = dir.join(rookery_interop::open_clip::WEIGHTS);
            vec![match st.is_file() {
                true => st,
                false => rookery_interop::open_clip::pickle(dir).unwrap_or(st),
            }]
        }
    })
}

/// The dtype `cfg`'s frozen towers are held in on `device` (`flamingo.frozen_dtype`).
pub fn frozen_dtype<B: Backend>(cfg: &RunConfig, device: &B::Device) -> Result<DType> {
    cfg.flamingo
        .frozen_dtype
        .resolve::<B>(device)
        .map_err(anyhow::Error::msg)
}

/// The frozen vision tower of the CLIP at `path`: a rookery checkpoint or run directory, or a
/// CLIP directory of another format.
pub fn load_vision<B: Backend>(path: &Path, device: &B::Device) -> Result<VisionTower<B>> {
    if checkpoint::is_rookery_run(path) {
        let dir = checkpoint::resolve(path)?;
        let cfg = RunConfig::load(&dir.join("config.toml"), &[])?;
        let clip = cfg.model.init::<B>(device);
        let clip = checkpoint::load_weights(clip, &dir.join("model.safetensors"))?;
        return Ok(VisionTower::Clip(clip.visual));
    }
    if rookery_interop::is_siglip(path) {
        let cfg = rookery_interop::hf_siglip::config(path)?;
        let model = rookery_interop::hf_siglip::load(cfg.init::<B>(device), path, &cfg)?;
        return Ok(VisionTower::Siglip(model.vision));
    }
    let cfg = rookery_interop::clip_config(path)?;
    let clip = rookery_interop::load_clip(cfg.init::<B>(device), path)?;
    Ok(VisionTower::Clip(clip.visual))
}

/// The language model of the stage-"lm" checkpoint in `dir`.
pub fn load_lm<B: Backend>(dir: &Path, device: &B::Device) -> Result<LanguageModel<B>> {
    let cfg = RunConfig::load(&dir.join("config.toml"), &[])?;
    let lm = cfg.lm.init::<B>(device);
    checkpoint::load_weights(lm, &dir.join("model.safetensors"))
}

/// The frozen language model `[flamingo] lm_from` names, shaped as `cfg` (the resolved
/// `flamingo.model.lm`): a rookery stage-"lm" checkpoint or run directory, or an HF causal LM
/// whose vocabulary grows by the added tokens.
pub fn load_source_lm<B: Backend>(
    path: &Path,
    cfg: &LmConfig,
    device: &B::Device,
) -> Result<LanguageModel<B>> {
    if checkpoint::is_rookery_run(path) {
        return load_lm(&checkpoint::resolve(path)?, device);
    }
    rookery_interop::load_lm(cfg.init::<B>(device), path, cfg)
        .with_context(|| format!("flamingo.lm_from = {}", path.display()))
}

/// Where `[flamingo] lm_from` points: the directory read, its LM config, and the weight files
/// hashed into the resolved config.
fn lm_source(cfg: &RunConfig) -> Result<(PathBuf, LmConfig)> {
    let path = &cfg.flamingo.lm_from;
    if checkpoint::is_rookery_run(path) {
        let (dir, lcfg) = source(path, "lm_from", TrainStage::Lm)?;
        let ours = std::fs::read(&cfg.data.tokenizer)
            .with_context(|| format!("data.tokenizer = {}", cfg.data.tokenizer.display()))?;
        let lm_tokenizer = crate::checkpoint::tokenizer_of(&dir, &lcfg);
        if ours != std::fs::read(&lm_tokenizer).unwrap_or_default() {
            bail!("data.tokenizer = {} differs from the tokenizer the language model in {} was trained with ({}): token ids would not match", cfg.data.tokenizer.display(), dir.display(), lm_tokenizer.display());
        }
        return Ok((dir, lcfg.lm));
    }
    let lm = rookery_interop::lm_config(path)
        .with_context(|| format!("flamingo.lm_from = {}", path.display()))?;
    Ok((path.clone(), lm))
}

/// `cfg` with, when `[flamingo] lm_from` is another project's LM, its tokenizer extended as
/// OpenFlamingo does ([`rookery_interop::open_flamingo::extend_tokenizer`]) into the run
/// directory's `tokenizer.json`, which becomes `data.tokenizer`, with the LM's special tokens
/// in `data.special_tokens`. Other runs are returned as they are.
pub fn with_lm_tokenizer(cfg: &RunConfig) -> Result<RunConfig> {
    let mut cfg = cfg.clone();
    let path = cfg.flamingo.lm_from.clone();
    if cfg.train.stage != TrainStage::Flamingo || checkpoint::is_rookery_run(&path) {
        return Ok(cfg);
    }
    let run_dir = cfg.run_dir();
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("creating run directory {}", run_dir.display()))?;
    let out = run_dir.join("tokenizer.json");
    let e = rookery_interop::open_flamingo::extend_tokenizer(&path, &out)
        .with_context(|| format!("flamingo.lm_from = {}", path.display()))?;
    cfg.data.tokenizer = out;
    cfg.data.special_tokens = rookery_data::SpecialTokens {
        bos: e.bos,
        eos: e.eos,
        pad: e.pad,
    };
    Ok(cfg)
}

/// Where stage 2's frozen parts come from: checkpoint directories, or other projects'.
pub struct Sources {
    pub vision: PathBuf,
    pub lm: PathBuf,
}

/// `cfg` with stage 2's shapes taken from its sources' configs, no weights read: the vision
/// tower's, and the LM's with its vocabulary grown to the tokenizer's `vocab` entries;
/// `tokens` are the ids of `<image>` and `<|endofchunk|>`. Refuses an image size or sequence
/// length the sources do not take.
pub fn resolve(
    cfg: &RunConfig,
    vocab: usize,
    tokens: (usize, usize),
) -> Result<(RunConfig, Sources)> {
    let mut cfg = cfg.clone();
    let (set_model, set_norm) = (cfg.flamingo.model.clone(), cfg.data.image_norm.clone());
    let (vdir, vcfg) = vision_source(&cfg.flamingo.vision_from)?;
    let (ldir, mut lm) = lm_source(&cfg)?;
    // Tokens added to the LM's tokenizer get rows of their own.
    lm.vocab_size = lm.vocab_size.max(vocab);
    let f = &mut cfg.flamingo;
    match vcfg {
        VisionSource::Clip(c) => {
            f.model.vision = c.vision.clone();
            f.model.vision_embed_dim = c.embed_dim;
            f.model.siglip = None;
        }
        VisionSource::Siglip(c) => f.model.siglip = Some(c),
    }
    // The tower sees images prepared as it was trained on them.
    cfg.data.image_norm = match f.model.siglip {
        Some(_) => rookery_data::loader::ImageNorm::siglip(),
        None => Default::default(),
    };
    f.model.lm = lm;
    (f.model.image_token, f.model.eoc_token) = tokens;
    if cfg.data.image_size as usize != f.model.image_size() {
        bail!(
            "data.image_size is {} but the vision tower of {} takes {}",
            cfg.data.image_size,
            vdir.display(),
            f.model.image_size()
        );
    }
    if cfg.data.interleaved.max_tokens > f.model.lm.context_length {
        bail!(
            "data.interleaved.max_tokens = {} exceeds the context of the language model in {} ({})",
            cfg.data.interleaved.max_tokens,
            ldir.display(),
            f.model.lm.context_length
        );
    }
    refuse_set_by_hand(
        &set_model,
        &cfg.flamingo.model,
        &set_norm,
        &cfg.data.image_norm,
    )?;
    let sources = Sources {
        vision: vdir,
        lm: ldir,
    };
    Ok((cfg, sources))
}

/// Refuses a key stage 2 fills in from its sources (the towers' shapes, the token ids, the
/// image normalisation) that the config set by hand to another value: it would be replaced
/// without a word. A value equal to the source's (a resolved config.toml) is accepted.
fn refuse_set_by_hand(
    set: &FlamingoConfig,
    resolved: &FlamingoConfig,
    set_norm: &ImageNorm,
    norm: &ImageNorm,
) -> Result<()> {
    let d = FlamingoConfig::default();
    let by_hand = |eq_default: bool, eq_source: bool| !eq_default && !eq_source;
    let keys = [
        (
            by_hand(set.vision == d.vision, set.vision == resolved.vision),
            "flamingo.model.vision",
        ),
        (
            by_hand(set.siglip == d.siglip, set.siglip == resolved.siglip),
            "flamingo.model.siglip",
        ),
        (
            by_hand(
                set.vision_embed_dim == d.vision_embed_dim,
                set.vision_embed_dim == resolved.vision_embed_dim,
            ),
            "flamingo.model.vision_embed_dim",
        ),
        (
            by_hand(set.lm == d.lm, set.lm == resolved.lm),
            "flamingo.model.lm",
        ),
        (
            by_hand(
                (set.image_token, set.eoc_token) == (d.image_token, d.eoc_token),
                (set.image_token, set.eoc_token) == (resolved.image_token, resolved.eoc_token),
            ),
            "flamingo.model.image_token / eoc_token",
        ),
        (
            by_hand(*set_norm == ImageNorm::default(), set_norm == norm),
            "data.image_norm",
        ),
    ];
    match keys.iter().find(|(hand, _)| *hand) {
        Some((_, key)) => bail!("{key} is filled in from flamingo.vision_from, flamingo.lm_from and the tokenizer, but the config sets it to something else: remove it from the config"),
        None => Ok(()),
    }
}

/// `cfg` with stage 2's shapes resolved as a run would resolve them, writing nothing: the
/// tokenizer a run would use (an HF LM's own, extended in memory; without its tokenizer.json,
/// OpenFlamingo's three tokens are assumed after the LM's vocabulary, and the returned note
/// says so). For `rookery train --dry-run` and memory estimates before any download is
/// complete.
pub fn resolve_dry(cfg: &RunConfig) -> Result<(RunConfig, Option<String>)> {
    let path = &cfg.flamingo.lm_from;
    if checkpoint::is_rookery_run(path) {
        let tk = TextTokenizer::of(&cfg.data)?;
        let sp = rookery_data::interleaved::Specials::of(&tk).map_err(anyhow::Error::msg)?;
        let (r, _) = resolve(cfg, tk.vocab_size, (sp.image as usize, sp.eoc as usize))?;
        return Ok((r, None));
    }
    let lm = rookery_interop::lm_config(path)
        .with_context(|| format!("flamingo.lm_from = {}", path.display()))?;
    if !path.join("tokenizer.json").is_file() {
        let v = lm.vocab_size;
        let (r, _) = resolve(cfg, v + 3, (v + 1, v))?;
        let note = format!(
            "{}: no tokenizer.json; assumed <|endofchunk|>, <image>, <PAD> after its {v} tokens",
            path.display()
        );
        return Ok((r, Some(note)));
    }
    let tmp = std::env::temp_dir().join(format!("rookery-dry-run-{}.json", std::process::id()));
    let e = rookery_interop::open_flamingo::extend_tokenizer(path, &tmp);
    let tk = e.and_then(|_| Ok(TextTokenizer::from_file(&tmp)?));
    let _ = std::fs::remove_file(&tmp);
    let tk = tk?;
    let sp = rookery_data::interleaved::Specials::of(&tk).map_err(anyhow::Error::msg)?;
    let (r, _) = resolve(cfg, tk.vocab_size, (sp.image as usize, sp.eoc as usize))?;
    Ok((r, None))
}

fn sha256_all(paths: &[PathBuf]) -> Result<String> {
    match paths {
        [one] => checkpoint::sha256(one),
        many => {
            use sha2::{Digest, Sha256};
            let mut h = Sha256::new();
            for p in many {
                h.update(checkpoint::sha256(p)?.as_bytes());
            }
            Ok(format!("{:x}", h.finalize()))
        }
    }
}

impl<B: AutodiffBackend> Stage<B> for FlamingoStage {
    type Model = Flamingo<B>;
    type Prep = Pages;

    fn new(cfg: &RunConfig, tokenizer: Arc<TextTokenizer>) -> Result<Self> {
        let sp = rookery_data::interleaved::Specials::of(&tokenizer).map_err(anyhow::Error::msg)?;
        let tokens = (sp.image as usize, sp.eoc as usize);
        let (mut cfg, sources) = resolve(cfg, tokenizer.vocab_size, tokens)?;
        let f = &mut cfg.flamingo;
        f.vision_sha256 = sha256_all(&weight_files(&sources.vision, true)?)?;
        f.lm_sha256 = sha256_all(&weight_files(&sources.lm, false)?)?;
        if !f.init_from.as_os_str().is_empty() {
            f.init_sha256 = checkpoint::sha256(&f.init_from)
                .with_context(|| format!("flamingo.init_from = {}", f.init_from.display()))?;
        }
        let (v, l) = (sources.vision.display(), sources.lm.display());
        tracing::info!(vision = %v, lm = %l, "stage 2 starts from these checkpoints");
        Ok(FlamingoStage {
            cfg,
            tokenizer,
            questions: OnceLock::new(),
        })
    }

    fn config(&self) -> &RunConfig {
        &self.cfg
    }

    fn prepare(&self, mode: Mode) -> Result<Pages> {
        Pages::new(&self.cfg.data, self.tokenizer.clone(), mode).map_err(anyhow::Error::msg)
    }

    fn init(&self, device: &B::Device) -> Flamingo<B> {
        self.model_config().init(device)
    }

    fn load_start(&self, mut model: Flamingo<B>) -> Result<Flamingo<B>> {
        let device = model.new_tokens.device();
        model.vision = load_vision(&self.cfg.flamingo.vision_from, &device)?;
        let f = &self.cfg.flamingo;
        model.lm = load_source_lm(&f.lm_from, &f.model.lm, &device)?;
        // Freezing after loading also restarts the new token rows from the loaded LM's rows.
        let mut model = model.freeze();
        if !f.init_from.as_os_str().is_empty() {
            let (from, loaded) =
                rookery_interop::open_flamingo_import::load_trained(model, &f.model, &f.init_from)
                    .with_context(|| format!("flamingo.init_from = {}", f.init_from.display()))?;
            tracing::info!(from = %f.init_from.display(), ?loaded, "trained parts continue from");
            model = from;
        }
        Ok(model.map(&mut PathIds::default()))
    }

    fn grads(
        &self,
        model: &Flamingo<B>,
        micro: Vec<PageBatch>,
        comm: &dyn Communicator<B::InnerBackend>,
        _sync: &mut GradSync<'_, B::InnerBackend>,
        device: &B::Device,
    ) -> Result<LocalGrads> {
        Ok(causal_local(model, micro, comm, |m, b, tokens| {
            page_logits(m, tokens, b, device)
        })?)
    }

    fn lr_mult(&self, model: &Flamingo<B>) -> Vec<(ParamId, f32)> {
        let k = self.cfg.flamingo.gate_lr_mult as f32;
        let gates = model
            .xattn
            .iter()
            .flat_map(|x| [x.attn_gate.id, x.ff_gate.id]);
        gates.map(|id| (id, k)).collect()
    }

    fn after_load(&self, model: Flamingo<B>) -> Flamingo<B> {
        model.fix_frozen()
    }

    fn place(&self, model: Flamingo<B>, device: &B::Device) -> Result<Flamingo<B>> {
        let dtype = frozen_dtype::<B>(&self.cfg, device)?;
        tracing::info!(?dtype, "frozen vision tower and language model held in");
        Ok(model.with_frozen_dtype(dtype))
    }

    fn log_fields(&self, model: &Flamingo<B>) -> serde_json::Map<String, serde_json::Value> {
        let gates: Vec<f32> = model
            .xattn
            .iter()
            .map(|x| x.attn_gate.val().into_scalar().elem::<f32>().tanh())
            .collect();
        let mut m = serde_json::Map::new();
        m.insert("tanh_attn_gates".into(), json!(gates));
        m
    }

    fn evaluate(&self, model: &Flamingo<B::InnerBackend>, device: &B::Device) -> Result<Report> {
        let e = &self.cfg.eval;
        let prep = <Self as Stage<B>>::prepare(self, Mode::Eval)?;
        let mut report = perplexity(&self.cfg.data, prep, e.pages, device, |tokens, b| {
            page_logits(model, tokens, b, device)
        })?;
        if !e.shots.is_empty() && e.questions > 0 {
            let qs = match self.questions.get() {
                Some(q) => q,
                None => {
                    let dir = self.cfg.run_dir().join("eval-vqa");
                    let q = held_out_questions(&self.cfg.data, e.questions, &dir)?;
                    self.questions.get_or_init(|| q)
                }
            };
            let (tk, data) = (&self.tokenizer, &self.cfg.data);
            report.acc = question_answering(model, tk, data, e, qs, device)?;
            report.questions = qs.len();
        }
        tracing::info!(perplexity = report.perplexity, acc = ?report.acc, "eval");
        Ok(Report::Text(report))
    }
}
