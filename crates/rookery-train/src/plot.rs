//! `rookery plot`: draws a run's curves from `metrics.jsonl` (loss, lr, logit scale, recall,
//! samples/s, data-wait share, the first `[[eval.tasks]]` figures; perplexity and k-shot
//! accuracy for the text stages) into one PNG (or SVG, by the file extension).

use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;

use crate::metrics::read_metrics;

type Panel = (&'static str, &'static str, &'static str);

const CLIP_PANELS: [Panel; 6] = [
    ("train", "loss", "loss"),
    ("train", "lr", "learning rate"),
    ("train", "logit_scale", "logit scale (exp)"),
    ("eval", "i2t_r1", "held-out image->text R@1"),
    ("train", "samples_per_s", "samples/s"),
    ("train", "data_wait_share", "data-wait share of step"),
];

/// Stages "lm" and "flamingo": perplexity and 4-shot accuracy instead of CLIP's curves.
const TEXT_PANELS: [Panel; 6] = [
    ("train", "loss", "loss"),
    ("train", "lr", "learning rate"),
    ("train", "grad_norm", "gradient norm"),
    ("eval", "perplexity", "held-out perplexity"),
    ("eval", "vqa_accuracy_4shot", "held-out 4-shot VQA accuracy"),
    ("train", "samples_per_s", "samples/s"),
];

/// The headline figure of each `[[eval.tasks]]` set in the evaluations (`NAME/acc1`,
/// `NAME/image_retrieval_recall@1`), at most two: one panel each.
fn benchmark_keys(records: &[serde_json::Value]) -> Vec<String> {
    let mut keys: Vec<String> = records
        .iter()
        .filter(|r| r["kind"] == "eval")
        .filter_map(|r| r.as_object())
        .flat_map(|o| o.keys())
        .filter(|k| k.ends_with("/acc1") || k.ends_with("/image_retrieval_recall@1"))
        .cloned()
        .collect();
    keys.sort();
    keys.dedup();
    keys.truncate(2);
    keys
}

/// Draws the curves of the run in `run_dir` into `out`.
pub fn plot_run(run_dir: &Path, out: &Path) -> Result<()> {
    let records = read_metrics(run_dir)
        .with_context(|| format!("reading {}/metrics.jsonl", run_dir.display()))?;
    if out.extension().is_some_and(|e| e == "svg") {
        draw(
            SVGBackend::new(out, (1500, 800)).into_drawing_area(),
            &records,
        )
    } else {
        draw(
            BitMapBackend::new(out, (1500, 800)).into_drawing_area(),
            &records,
        )
    }
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    records: &[serde_json::Value],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let text = records.iter().any(|r| r.get("perplexity").is_some());
    let mut panels: Vec<(&str, String, String)> = if text { TEXT_PANELS } else { CLIP_PANELS }
        .iter()
        .map(|(kind, key, title)| (*kind, key.to_string(), title.to_string()))
        .collect();
    panels.extend(
        benchmark_keys(records)
            .into_iter()
            .map(|k| ("eval", k.clone(), k)),
    );
    let cols = panels.len().div_ceil(2);
    for ((kind, key, title), area) in panels.iter().zip(root.split_evenly((2, cols))) {
        let (kind, key) = (*kind, key.as_str());
        let pts: Vec<(f64, f64)> = records
            .iter()
            .filter(|r| r["kind"] == kind)
            .filter_map(|r| Some((r["step"].as_f64()?, r[key].as_f64()?)))
            .filter(|p| p.1.is_finite())
            .collect();
        let (x1, y0, y1) = pts
            .iter()
            .fold((1.0f64, f64::MAX, f64::MIN), |(x, lo, hi), p| {
                (x.max(p.0), lo.min(p.1), hi.max(p.1))
            });
        let (y0, y1) = if pts.is_empty() {
            (0.0, 1.0)
        } else if y1 > y0 {
            (y0, y1 + 0.05 * (y1 - y0))
        } else {
            (y0 - 0.5, y1 + 0.5)
        };
        let mut chart = ChartBuilder::on(&area)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..x1, y0..y1)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .draw()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), &BLUE))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if kind == "eval" {
            chart
                .draw_series(pts.iter().map(|p| Circle::new(*p, 3, BLUE.filled())))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
    }
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}
