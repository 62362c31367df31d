//! Image decoding to packed RGB8: JPEG through zune-jpeg (the fast path), everything else
//! (PNG, WebP, ...) through the `image` crate.

use zune_jpeg::zune_core::colorspace::ColorSpace;
use zune_jpeg::zune_core::options::DecoderOptions;
use zune_jpeg::JpegDecoder;

/// Largest accepted image side: larger files are treated as bad samples (decompression bombs).
const MAX_SIDE: usize = 16_384;

/// A decoded image, packed RGB8, row-major.
#[derive(Clone, Debug)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    pub data: Vec<u8>,
}

/// Decodes an image member given its (lower-case) extension.
pub fn decode_rgb(ext: &str, bytes: &[u8]) -> Result<RgbImage, String> {
    if bytes.is_empty() {
        return Err("empty image".into());
    }
    let last = ext.rsplit('.').next().unwrap_or(ext);
    let img = if matches!(last, "jpg" | "jpeg") {
        decode_jpeg(bytes)?
    } else {
        let d = image::load_from_memory(bytes).map_err(|e| e.to_string())?;
        let rgb = d.to_rgb8();
        RgbImage {
            width: rgb.width(),
            height: rgb.height(),
            data: rgb.into_raw(),
        }
    };
    if img.width == 0 || img.height == 0 {
        return Err(format!("image has zero size {}x{}", img.width, img.height));
    }
    Ok(img)
}

fn decode_jpeg(bytes: &[u8]) -> Result<RgbImage, String> {
    let opts = DecoderOptions::default()
        .jpeg_set_out_colorspace(ColorSpace::RGB)
        .set_max_width(MAX_SIDE)
        .set_max_height(MAX_SIDE);
    let mut dec = JpegDecoder::new_with_options(bytes, opts);
    let data = dec.decode().map_err(|e| format!("jpeg: {e:?}"))?;
    let info = dec.info().ok_or("jpeg: no header")?;
    let (w, h) = (info.width as u32, info.height as u32);
    if data.len() != (w * h * 3) as usize {
        return Err(format!("jpeg: {} bytes for {w}x{h} RGB", data.len()));
    }
    Ok(RgbImage {
        width: w,
        height: h,
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(fmt: image::ImageFormat) -> Vec<u8> {
        let img = image::RgbImage::from_fn(20, 10, |x, y| {
            image::Rgb([(x * 12) as u8, (y * 25) as u8, 128])
        });
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, fmt).unwrap();
        out.into_inner()
    }

    #[test]
    fn decodes_png_exactly_and_jpeg_closely() {
        let png = decode_rgb("png", &encode(image::ImageFormat::Png)).unwrap();
        assert_eq!((png.width, png.height), (20, 10));
        assert_eq!(&png.data[(5 * 20 + 3) * 3..][..3], &[36, 125, 128]);
        let jpg = decode_rgb("jpg", &encode(image::ImageFormat::Jpeg)).unwrap();
        assert_eq!((jpg.width, jpg.height), (20, 10));
        let err: i32 = jpg
            .data
            .iter()
            .zip(&png.data)
            .map(|(a, b)| (*a as i32 - *b as i32).abs())
            .max()
            .unwrap();
        assert!(err < 40, "max jpeg error {err}");
    }

    #[test]
    fn rejects_garbage_truncated_and_empty() {
        assert!(decode_rgb("jpg", b"").is_err());
        assert!(decode_rgb("jpg", b"not a jpeg at all").is_err());
        assert!(decode_rgb("png", &encode(image::ImageFormat::Png)[..30]).is_err());
    }
}
