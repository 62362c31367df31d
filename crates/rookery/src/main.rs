//! `rookery`: train CLIP and Flamingo-style vision-language models.

mod cmd;

/// Training and decoding allocate and free many large buffers per step; glibc returns each to
/// the OS (mmap/munmap), so every op pays page faults. mimalloc keeps freed pages for reuse.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    },
    /// Evaluate a checkpoint: held-out recall@1/5/10 and zero-shot accuracy.
    Eval {
        /// Checkpoint directory (or a run directory, meaning its latest checkpoint).
        checkpoint: PathBuf,
        /// Held-out shards (default: the checkpoint config's data.val).
        #[arg(long)]
        data: Option<String>,
    },
    /// Export a checkpoint's weights as safetensors with open_clip key names, plus config.json.
    Export {
        /// Checkpoint directory (or a run directory, meaning its latest checkpoint).
        checkpoint: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Weight dtype: f32 or bf16.
        #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
        dtype: String,
        /// Key names: open_clip, or hf (HF transformers CLIPModel; `from_pretrained(DIR)`).
        #[arg(long, default_value = "open_clip", value_parser = ["open_clip", "hf"])]
        format: String,
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
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Train {
            config,
            set,
            resume,
        } => cmd::train::run(&config, &set, resume),
        Command::Eval { checkpoint, data } => cmd::train::eval(&checkpoint, data),
        Command::Export {
            checkpoint,
            out,
            dtype,
            format,
        } => cmd::train::export(&checkpoint, &out, dtype == "bf16", format == "hf"),
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
            vocab,
        } => cmd::train::bench(&config, &set, batch, steps, vocab),
        Command::Launch(args) => cmd::launch::run(&args),
        Command::Data { command } => cmd::data::run(command),
    }
}
