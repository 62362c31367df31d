//! `rookery`: train CLIP and Flamingo-style vision-language models.

mod cmd;

/// Training and decoding allocate and free many large buffers per step; glibc returns each to
/// the OS (mmap/munmap), so every op pays page faults. mimalloc keeps freed pages for reuse.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in the `mimalloc.h` of mimalloc v3, which libmimalloc-sys builds
/// (it names no constant for it).
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;
/// v3's default purge delay in ms; reading it back confirms the option index above (another
/// mimalloc version with another layout is then left alone).
const MI_DEFAULT_PURGE_DELAY: std::ffi::c_long = 1000;

/// Stops mimalloc from handing freed memory back to the OS: a training step frees and
/// reallocates the same activation sizes every step, and each purge (1 s after a free) made a
/// later step fault the pages in again and have the kernel zero them (8% of the CPU samples of a
/// clip-tiny bench run, 65k page faults; 0.75k with this). Memory stays at the peak of a step,
/// which every step reaches anyway. A `MIMALLOC_PURGE_DELAY` set in the environment is left as
/// it is.
#[allow(unsafe_code)]
fn keep_freed_pages() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: mimalloc's option calls take plain integers, touch only mimalloc's option table,
    // and are documented as callable at any time from any thread.
    unsafe {
        if libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) == MI_DEFAULT_PURGE_DELAY {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1);
        }
    }
}

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "rookery",
    version,
    about = "Train CLIP-style vision-language models on webdataset shards"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model from a TOML config (synthesizes the embedded dataset when it is absent).
    Train {
        /// Config file, e.g. configs/clip-tiny.toml.
        config: PathBuf,
        /// Override a key: --set section.key=value (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Continue from the run directory's latest checkpoint (same as train.resume = "auto").
        #[arg(long)]
        resume: bool,
        /// Start over in a run directory that holds an earlier run, deleting its checkpoints
        /// and metrics first (same as train.overwrite = true).
        #[arg(long, conflicts_with = "resume")]
        overwrite: bool,
        /// Resolve and check the config (stage 2: against its sources' configs, no weights
        /// read), print the parameter counts and the memory a rank needs at least, and stop
        /// before any work.
        #[arg(long)]
        dry_run: bool,
    },
    /// Evaluate a checkpoint on its held-out data (CLIP: recall@1/5/10 and zero-shot on the
    /// synthetic labels; text stages: perplexity and k-shot accuracy), or any CLIP on a set in
    /// CLIP_benchmark's layouts: --task zeroshot|retrieval --data DIR.
    Eval(Box<cmd::eval::EvalArgs>),
    /// Export a checkpoint's weights as safetensors plus config.json: CLIP with open_clip (or
    /// HF) key names; Flamingo's trained parts (`--full`: the whole model too).
    Export {
        /// Checkpoint directory (or a run directory, meaning its latest checkpoint).
        checkpoint: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Weight dtype: f32 or bf16.
        #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
        dtype: String,
        /// Key names: open_clip, hf (HF transformers CLIPModel; `from_pretrained(DIR)`), or
        /// open_flamingo for a Flamingo checkpoint (`load_state_dict(strict=False)`).
        #[arg(long, default_value = "open_clip", value_parser = ["open_clip", "hf", "open_flamingo"])]
        format: String,
        /// Flamingo: also write the frozen vision tower and LM (model.safetensors).
        #[arg(long)]
        full: bool,
    },
    /// L2-normalised image and text embeddings (safetensors: `image` [N, E], `text` [M, E])
    /// from a rookery checkpoint or run, a `rookery export`, open_clip or HF CLIP directory.
    Embed(cmd::embed::EmbedArgs),
    /// Continue a prompt of text and images with a Flamingo checkpoint or export:
    /// rookery generate --weights DIR --prompt "<image>q: how many circles? a:" --images a.png;
    /// or text alone with an HF Llama-family LM directory (its own tokenizer).
    Generate {
        /// Flamingo checkpoint, run directory or export.
        #[arg(long)]
        weights: PathBuf,
        /// Text with an <image> where each image goes.
        #[arg(long)]
        prompt: String,
        /// One image file per <image>, in order.
        #[arg(long, num_args = 0..)]
        images: Vec<PathBuf>,
        /// Or the frames of one video, in order, for a prompt's single <image> (at most the
        /// model's flamingo.model.resampler.max_frames).
        #[arg(long, num_args = 1.., conflicts_with = "images")]
        video: Vec<PathBuf>,
        #[arg(long, default_value_t = 20)]
        max_new_tokens: usize,
        /// 0: greedy; else sample among the k most likely tokens.
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        #[arg(long, default_value_t = 1.0)]
        temperature: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Draw a run's curves from its metrics.jsonl.
    Plot {
        run_dir: PathBuf,
        /// Output file (.png or .svg); default RUN_DIR/metrics.png.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Time one training step (forward + backward + AdamW) on random inputs, no loader.
    Bench {
        /// Config whose [model] to build.
        config: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        #[arg(long, default_value_t = 64)]
        batch: usize,
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Split the batch over this many thread ranks, as `[dist] world_size` does in training.
        #[arg(long, default_value_t = 1)]
        ranks: usize,
        /// Text vocabulary size for the random tokens.
        #[arg(long, default_value_t = 64)]
        vocab: usize,
    },
    /// Start a job's ranks (torchrun-style variables; through mpirun for dist.backend = "mpi")
    /// and stop them all when one fails: rookery launch --nproc-per-node 2 -- train CONFIG.
    Launch(cmd::launch::LaunchArgs),
    /// Data tools: synthesize, inspect, benchmark.
    Data {
        #[command(subcommand)]
        command: cmd::data::DataCommand,
    },
    /// What a run here will use and what is missing: build, CPU, memory, GPUs and driver,
    /// NVRTC and CUDA headers, NCCL, MPI.
    Doctor {
        /// Also run one training step of this config's model (CLIP, or stage 2's Flamingo with
        /// random towers of its shapes) on this build's backend and on the CPU reference from
        /// the same weights, and compare loss, gradients and updated weights (exit status 1
        /// past the tolerance: 2e-2 on CUDA, 1e-4 on the CPU's generic path, 5e-2 with stage
        /// 2's frozen towers in bf16).
        #[arg(long, value_name = "CONFIG")]
        parity: Option<PathBuf>,
        /// Overrides for the --parity config (key=value).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// The --parity step's batch size.
        #[arg(long, default_value_t = 32)]
        batch: usize,
        /// Write the --parity result here as JSON.
        #[arg(long, value_name = "FILE")]
        json: Option<PathBuf>,
    },
}

fn main() -> anyhow::Result<()> {
    keep_freed_pages();
    tracing_subscriber::fmt()
        .with_env_filter(
            // burn-collective prints its whole config at `info` for every rank it registers.
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,burn_collective=warn".into()),
        )
        .with_writer(std::io::stderr)
        // No colour codes in a file or a batch job's log.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Cli::parse().command {
        Command::Train {
            config,
            set,
            dry_run: true,
            ..
        } => cmd::train::dry_run(&config, &set),
        Command::Train {
            config,
            set,
            resume,
            overwrite,
            ..
        } => cmd::train::run(&config, &set, resume, overwrite),
        Command::Eval(args) => cmd::eval::run(&args),
        Command::Export {
            checkpoint,
            out,
            dtype,
            format,
            full,
        } => cmd::train::export(&checkpoint, &out, dtype == "bf16", &format, full),
        Command::Generate {
            weights,
            prompt,
            images,
            video,
            max_new_tokens,
            top_k,
            temperature,
            seed,
        } => {
            let args = rookery_train::flamingo_io::GenerateArgs {
                prompt,
                images,
                video,
                max_new: max_new_tokens,
                top_k,
                temperature,
                seed,
            };
            cmd::train::generate(&weights, &args)
        }
        Command::Embed(args) => cmd::embed::run(&args),
        Command::Plot { run_dir, out } => {
            let out = out.unwrap_or_else(|| run_dir.join("metrics.png"));
            rookery_train::plot::plot_run(&run_dir, &out)?;
            println!("wrote {}", out.display());
            Ok(())
        }
        Command::Bench {
            config,
            set,
            batch,
            steps,
            ranks,
            vocab,
        } => cmd::bench::bench(&config, &set, batch, steps, ranks, vocab),
        Command::Launch(args) => cmd::launch::run(&args),
        Command::Data { command } => cmd::data::run(command),
        Command::Doctor {
            parity,
            set,
            batch,
            json,
        } => {
            cmd::doctor::run()?;
            match parity {
                Some(config) => cmd::parity::run(&config, &set, batch, json.as_deref()),
                None => Ok(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// Fails when a mimalloc upgrade moves the option or its default, which would otherwise
    /// silently bring the page faults back.
    #[test]
    #[allow(unsafe_code)]
    fn freed_pages_are_kept() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return;
        }
        super::keep_freed_pages();
        // SAFETY: reads mimalloc's option table.
        let delay = unsafe { libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY) };
        assert_eq!(delay, -1);
    }
}
