//! The text tower at clip-tiny's shape (width 128, 2 layers, 4 heads) on a batch of 128
//! captions of 6-17 tokens, forward + backward, one thread, with and without length buckets.
//! `cargo bench -p rookery-model --bench text`.

use burn::backend::{flex::Flex, Autodiff};
use burn::prelude::*;
use rookery_model::text::TextConfig;

mod common;

type AD = Autodiff<Flex>;

fn main() {
    common::setup();
    let device = Default::default();
    let (rows, eot) = (128usize, 3i64);
    // Lengths 6..=17 (start and end tokens included) in a fixed scramble; cut at the longest.
    let lens: Vec<usize> = (0..rows).map(|i| 6 + (i * 7 + i / 5) % 12).collect();
    let t = *lens.iter().max().unwrap();
    let ids: Vec<i64> = lens
        .iter()
        .flat_map(|&n| {
            (0..t).map(move |j| match j {
                0 => 1,
                j if j + 1 == n => eot,
                j if j < n => 4 + (j as i64 * 5) % 40,
                _ => 0,
            })
        })
        .collect();
    let tokens = Tensor::<AD, 2, Int>::from_data(TensorData::new(ids, [rows, t]), &device);
    common::on_one_thread(|| {
        for buckets in [1, 2, 4, 8] {
            let cfg = TextConfig {
                vocab_size: 64,
                width: 128,
                layers: 2,
                heads: 4,
                length_buckets: buckets,
                ..Default::default()
            };
            let tower = cfg.init::<AD>(128, &device);
            let ms = common::time(30, || {
                let y = tower.forward(tokens.clone());
                let _ = y.sum().backward();
            });
            println!("length_buckets {buckets}: forward + backward {ms:6.2} ms (best of 30)");
        }
    });
}
