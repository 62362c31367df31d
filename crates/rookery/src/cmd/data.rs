//! `rookery data synth|inspect|bench`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use rookery_data::loader::Mode;
use rookery_data::pages::{PageBatch, Pages};
use rookery_data::synth::SynthConfig;
use rookery_data::{DataConfig, Loader, TextTokenizer};

#[derive(Subcommand)]
pub enum DataCommand {
    /// Render the synthetic image-text world as webdataset shards (+ tokenizer.json).
    Synth {
        #[arg(long, default_value = "data/synth")]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = 64)]
        image_size: u32,
        #[arg(long, default_value_t = 16)]
        train_shards: usize,
        #[arg(long, default_value_t = 4000)]
        samples_per_shard: usize,
        #[arg(long, default_value_t = 1)]
        val_shards: usize,
        #[arg(long, default_value_t = 2000)]
        val_samples_per_shard: usize,
        /// Share of images written as PNG.
        #[arg(long, default_value_t = 0.25)]
        png_fraction: f64,
        /// Also write MMC4-style interleaved pages.
        #[arg(long)]
        interleaved: bool,
        #[arg(long, default_value_t = 8)]
        page_shards: usize,
        #[arg(long, default_value_t = 2000)]
        pages_per_shard: usize,
        /// Also write video pages (shapes that move, appear or disappear over 4-8 frames, with
        /// questions one frame cannot answer) under videos-train/ and videos-val/.
        #[arg(long)]
        video: bool,
        #[arg(long, default_value_t = 4)]
        video_shards: usize,
        #[arg(long, default_value_t = 1000)]
        video_pages_per_shard: usize,
    },
    /// Count shards, samples and extensions; image-size and caption-length stats; list bad samples.
    Inspect {
        /// Shard spec: brace pattern, glob, directory, list file, pipe:CMD; parts joined by ::.
        pattern: String,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Decode + augment throughput of the loader (samples/s total and per core).
    Bench {
        pattern: String,
        #[arg(long, default_value = "data/synth/tokenizer.json")]
        tokenizer: PathBuf,
        #[arg(long, default_value_t = 224)]
        image_size: u32,
        #[arg(long, default_value_t = 64)]
        batch_size: usize,
        /// Samples to time (after a warm-up batch).
        #[arg(long, default_value_t = 10_000)]
        samples: usize,
        /// Decode threads (0: one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// The shards hold interleaved or video pages (stage 2's loader) instead of pairs.
        #[arg(long)]
        pages: bool,
        /// With --pages: frames kept per video (data.interleaved.max_frames).
        #[arg(long, default_value_t = 4)]
        max_frames: usize,
    },
}

pub fn run(cmd: DataCommand) -> Result<()> {
    match cmd {
        DataCommand::Synth {
            out,
            seed,
            image_size,
            train_shards,
            samples_per_shard,
            val_shards,
            val_samples_per_shard,
            png_fraction,
            interleaved,
            page_shards,
            pages_per_shard,
            video,
            video_shards,
            video_pages_per_shard,
        } => {
            let cfg = SynthConfig {
                out,
                seed,
                image_size,
                train_shards,
                train_samples_per_shard: samples_per_shard,
                val_shards,
                val_samples_per_shard,
                png_fraction,
                interleaved,
                page_shards,
                pages_per_shard,
                video,
                video_shards,
                video_pages_per_shard,
                ..Default::default()
            };
            let t = Instant::now();
            let s = rookery_data::synth::generate(&cfg)?;
            println!(
                "wrote {} train + {} val samples ({} + {} pages, {} + {} video pages) to {} in {:.1} s; shards {}",
                s.train,
                s.val,
                s.pages_train,
                s.pages_val,
                s.videos_train,
                s.videos_val,
                cfg.out.display(),
                t.elapsed().as_secs_f64(),
                cfg.train_pattern()
            );
            Ok(())
        }
        DataCommand::Inspect { pattern, json } => {
            let shards = rookery_data::expand_shards(&pattern)?;
            let exts = DataConfig::default().image_exts;
            let r = rookery_data::inspect::inspect(&shards, &exts, "txt");
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
                return Ok(());
            }
            println!("shards: {}\nsamples: {}", r.shards, r.samples);
            println!("extensions: {:?}", r.extensions);
            println!("longest image side: {:?}", r.image_sides);
            let (w, c) = (r.caption_words, r.caption_chars);
            println!(
                "caption words: min {} mean {:.1} max {}; chars: min {} mean {:.1} max {}",
                w.min, w.mean, w.max, c.min, c.mean, c.max
            );
            println!("bad samples: {}", r.bad.len());
            for (shard, key, why) in &r.bad {
                println!("  {shard} {key}: {why}");
            }
            Ok(())
        }
        DataCommand::Bench {
            pattern,
            tokenizer,
            image_size,
            batch_size,
            samples,
            threads,
            pages,
            max_frames,
        } => {
            let b = Bench {
                tokenizer: &tokenizer,
                image_size,
                batch_size,
                samples,
                threads,
            };
            match pages {
                true => b.pages(&pattern, max_frames),
                false => b.pairs(&pattern),
            }
        }
    }
}

/// `rookery data bench`'s settings.
struct Bench<'a> {
    tokenizer: &'a Path,
    image_size: u32,
    batch_size: usize,
    samples: usize,
    threads: usize,
}

impl Bench<'_> {
    fn data(&self) -> DataConfig {
        DataConfig {
            image_size: self.image_size,
            batch_size: self.batch_size,
            decode_threads: self.threads,
            shuffle_buffer: 256,
            resampled: true,
            ..Default::default()
        }
    }

    fn cores(&self) -> usize {
        match self.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            t => t,
        }
    }

    /// Image-text pairs through stage 1's loader.
    fn pairs(&self, pattern: &str) -> Result<()> {
        let shards = rookery_data::expand_shards(pattern)?;
        let tk = Arc::new(TextTokenizer::from_file(self.tokenizer)?);
        let mut loader = Loader::new(&self.data(), tk, shards, 0, 1, Mode::Train, None)?;
        let (n, _, secs) = self.time(|| loader.next().map(|b| b.map(|b| (b.batch_size, 0))))?;
        self.report(n, "samples", secs, None);
        Ok(())
    }

    /// Interleaved or video pages through stage 2's loader, every frame decoded.
    fn pages(&self, pattern: &str, max_frames: usize) -> Result<()> {
        let shards = rookery_data::expand_shards(pattern)?;
        let tk = Arc::new(TextTokenizer::from_file(self.tokenizer)?);
        let mut cfg = self.data();
        cfg.interleaved.max_frames = max_frames;
        cfg.interleaved.max_video_frames = cfg.interleaved.max_video_frames.max(max_frames);
        let prep = Pages::new(&cfg, tk, Mode::Train).map_err(anyhow::Error::msg)?;
        let mut loader = Loader::start(&cfg, prep, shards, 0, 1, Mode::Train, None)?;
        let (n, frames, secs) = self.time(|| {
            let frames = |b: &PageBatch| -> usize {
                let n = b.max_images;
                (0..b.batch_size)
                    .map(|r| b.frames[r * n..r * n + b.n_images[r]].iter().sum::<usize>())
                    .sum()
            };
            loader.next().map(|b| b.map(|b| (b.batch_size, frames(&b))))
        })?;
        self.report(n, "pages", secs, Some(frames));
        Ok(())
    }

    /// Times batches from `next` (samples, frames) after a warm-up batch.
    fn time<E: Into<anyhow::Error>>(
        &self,
        mut next: impl FnMut() -> Option<Result<(usize, usize), E>>,
    ) -> Result<(usize, usize, f64)> {
        let mut next = || -> Result<(usize, usize)> {
            next()
                .ok_or_else(|| anyhow::anyhow!("stream ended"))?
                .map_err(Into::into)
        };
        next()?; // warm-up: fill the shuffle buffers and the prefetch queue
        let bar = ProgressBar::new(self.samples as u64);
        bar.set_style(ProgressStyle::with_template(
            "[{bar:30}] {pos}/{len} samples {per_sec} ETA {eta}",
        )?);
        let (t, mut n, mut frames) = (Instant::now(), 0usize, 0usize);
        while n < self.samples {
            let (k, f) = next()?;
            (n, frames) = (n + k, frames + f);
            bar.inc(k as u64);
        }
        bar.finish_and_clear();
        Ok((n, frames, t.elapsed().as_secs_f64()))
    }

    fn report(&self, n: usize, what: &str, secs: f64, frames: Option<usize>) {
        let (size, cores) = (self.image_size, self.cores());
        let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        let frames = frames.map_or(String::new(), |f| {
            format!(
                " ({f} images or frames: {:.0}/s, {:.0}/s per core)",
                f as f64 / secs,
                f as f64 / secs / cores as f64
            )
        });
        println!(
            "{n} {what} at {size}x{size} in {secs:.2} s: {:.0} {what}/s total, {:.0} {what}/s per core ({cores} decode threads){frames}; loadavg {}",
            n as f64 / secs, n as f64 / secs / cores as f64, loadavg.trim()
        );
    }
}
