//! Image transforms as open_clip applies them: RandomResizedCrop for training, resize of the
//! shortest side + center crop for evaluation, then CLIP mean/std normalisation into CHW f32.
//!
//! Resizing is bicubic (Catmull-Rom) through `fast_image_resize`, which picks SIMD at run time.

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};

use crate::decode::RgbImage;
use crate::rng::Rng;

/// OpenAI CLIP normalisation constants.
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// A crop rectangle in source pixels.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CropBox {
    pub left: f64,
    pub top: f64,
    pub width: f64,
    pub height: f64,
}

/// torchvision's `RandomResizedCrop.get_params`: area fraction in `scale`, log-uniform aspect
/// ratio in `ratio`, ten tries, then a center crop clamped to the ratio range.
pub fn random_resized_crop(
    w: u32,
    h: u32,
    scale: (f64, f64),
    ratio: (f64, f64),
    rng: &mut Rng,
) -> CropBox {
    let (wf, hf) = (w as f64, h as f64);
    let area = wf * hf;
    let (lr0, lr1) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target = area * rng.uniform(scale.0, scale.1);
        let aspect = rng.uniform(lr0, lr1).exp();
        let cw = (target * aspect).sqrt().round();
        let ch = (target / aspect).sqrt().round();
        if cw > 0.0 && ch > 0.0 && cw <= wf && ch <= hf {
            let top = rng.below((hf - ch) as usize + 1) as f64;
            let left = rng.below((wf - cw) as usize + 1) as f64;
            return CropBox {
                left,
                top,
                width: cw,
                height: ch,
            };
        }
    }
    let in_ratio = wf / hf;
    let (cw, ch) = if in_ratio < ratio.0 {
        (wf, (wf / ratio.0).round())
    } else if in_ratio > ratio.1 {
        ((hf * ratio.1).round(), hf)
    } else {
        (wf, hf)
    };
    CropBox {
        left: ((wf - cw) / 2.0).floor(),
        top: ((hf - ch) / 2.0).floor(),
        width: cw,
        height: ch,
    }
}

/// The central square of the shortest side: resizing it to `size` equals "resize the shortest
/// side to `size`, then center crop", without the intermediate image.
pub fn center_square(w: u32, h: u32) -> CropBox {
    let s = w.min(h) as f64;
    CropBox {
        left: ((w as f64 - s) / 2.0).floor(),
        top: ((h as f64 - s) / 2.0).floor(),
        width: s,
        height: s,
    }
}

/// The whole image: resizing it to a square squashes it (SigLIP's processor resizes so).
pub fn whole(w: u32, h: u32) -> CropBox {
    CropBox {
        left: 0.0,
        top: 0.0,
        width: w as f64,
        height: h as f64,
    }
}

/// Per-channel mean and standard deviation images are normalised with.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Norm {
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// OpenAI CLIP's statistics (CLIP, open_clip, OpenFlamingo).
pub const CLIP_NORM: Norm = Norm {
    mean: CLIP_MEAN,
    std: CLIP_STD,
};

/// Resizes `crop` of `img` to `size`x`size` and writes CHW f32 normalised by `norm` into
/// `out` (length `3 * size * size`). `resizer` is reused across calls to keep its buffers.
pub fn crop_resize_normalize(
    img: &RgbImage,
    crop: CropBox,
    size: u32,
    norm: Norm,
    resizer: &mut Resizer,
    out: &mut [f32],
) -> Result<(), String> {
    let n = (size * size) as usize;
    assert_eq!(out.len(), 3 * n, "output slice must hold 3 x size x size");
    let src = ImageRef::new(img.width, img.height, &img.data, PixelType::U8x3)
        .map_err(|e| e.to_string())?;
    let mut dst = Image::new(size, size, PixelType::U8x3);
    let opts = ResizeOptions::new()
        .resize_alg(ResizeAlg::Convolution(FilterType::CatmullRom))
        .crop(crop.left, crop.top, crop.width, crop.height);
    resizer
        .resize(&src, &mut dst, &opts)
        .map_err(|e| e.to_string())?;
    let px = dst.buffer();
    let (r, rest) = out.split_at_mut(n);
    let (g, b) = rest.split_at_mut(n);
    let (m, sd) = (norm.mean, norm.std);
    for (i, p) in px.chunks_exact(3).enumerate() {
        r[i] = (p[0] as f32 / 255.0 - m[0]) / sd[0];
        g[i] = (p[1] as f32 / 255.0 - m[1]) / sd[1];
        b[i] = (p[2] as f32 / 255.0 - m[2]) / sd[2];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_resized_crop_stays_inside_and_respects_scale() {
        let mut rng = Rng::new(1);
        for _ in 0..1000 {
            let c = random_resized_crop(200, 100, (0.9, 1.0), (0.75, 4.0 / 3.0), &mut rng);
            assert!(
                c.left >= 0.0
                    && c.top >= 0.0
                    && c.left + c.width <= 200.0
                    && c.top + c.height <= 100.0,
                "{c:?}"
            );
            let frac = c.width * c.height / 20_000.0;
            // the fallback for this 2:1 image keeps the whole height at ratio 4/3
            assert!(frac > 0.6 && frac <= 1.0, "{frac}");
        }
    }

    #[test]
    fn center_square_is_centered() {
        assert_eq!(
            center_square(200, 100),
            CropBox {
                left: 50.0,
                top: 0.0,
                width: 100.0,
                height: 100.0
            }
        );
        assert_eq!(
            center_square(30, 41),
            CropBox {
                left: 0.0,
                top: 5.0,
                width: 30.0,
                height: 30.0
            }
        );
    }

    #[test]
    fn constant_image_normalises_to_known_values() {
        let img = RgbImage {
            width: 10,
            height: 7,
            data: [255u8, 0, 128].repeat(70),
        };
        let mut out = vec![0f32; 3 * 16];
        crop_resize_normalize(
            &img,
            center_square(10, 7),
            4,
            CLIP_NORM,
            &mut Resizer::new(),
            &mut out,
        )
        .unwrap();
        let want = [
            (1.0 - CLIP_MEAN[0]) / CLIP_STD[0],
            -CLIP_MEAN[1] / CLIP_STD[1],
            (128.0 / 255.0 - CLIP_MEAN[2]) / CLIP_STD[2],
        ];
        for c in 0..3 {
            for v in &out[c * 16..(c + 1) * 16] {
                assert!(
                    (v - want[c]).abs() < 1e-5,
                    "channel {c}: {v} vs {}",
                    want[c]
                );
            }
        }
    }

    #[test]
    fn crop_picks_the_right_region() {
        // left half black, right half white; a crop well inside each half (the bicubic kernel
        // reaches 5 source pixels past the crop edge when shrinking 10 -> 2) takes that color
        let data: Vec<u8> = (0..40 * 10)
            .flat_map(|i| if i % 40 >= 20 { [255u8; 3] } else { [0u8; 3] })
            .collect();
        let img = RgbImage {
            width: 40,
            height: 10,
            data,
        };
        let mut out = vec![0f32; 3 * 4];
        for (left, want) in [(25.0, 1.0), (5.0, 0.0)] {
            let crop = CropBox {
                left,
                top: 0.0,
                width: 10.0,
                height: 10.0,
            };
            crop_resize_normalize(&img, crop, 2, CLIP_NORM, &mut Resizer::new(), &mut out).unwrap();
            for v in &out[..4] {
                assert!(
                    (v - (want - CLIP_MEAN[0]) / CLIP_STD[0]).abs() < 1e-5,
                    "crop at {left}: {v}"
                );
            }
        }
    }
}
