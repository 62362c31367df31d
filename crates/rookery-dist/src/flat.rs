//! Flat buckets: many small tensors cross the wire as a few large messages (one collective per
//! parameter would pay the per-call latency hundreds of times a step).

use burn::prelude::*;

use crate::comm::DistError;

/// Applies `op` to `tensors` packed into consecutive buckets of at most `bucket_elems`
/// elements (a tensor larger than that is a bucket of its own), and returns the results split
/// back into the original lengths, in order.
pub fn bucketed<B: Backend>(
    tensors: Vec<Tensor<B, 1>>,
    bucket_elems: usize,
    op: impl FnMut(Tensor<B, 1>) -> Result<Tensor<B, 1>, DistError>,
) -> Result<Vec<Tensor<B, 1>>, DistError> {
    let (buckets, layout) = pack(tensors, bucket_elems);
    let done = buckets.into_iter().map(op).collect::<Result<Vec<_>, _>>()?;
    Ok(layout.unpack(done))
}

/// Where each tensor sits in the buckets of [`pack`]: its bucket's members' lengths.
pub struct BucketLayout(Vec<Vec<usize>>);

/// Packs `tensors` into consecutive buckets of at most `bucket_elems` elements (a tensor larger
/// than that is a bucket of its own).
pub fn pack<B: Backend>(
    tensors: Vec<Tensor<B, 1>>,
    bucket_elems: usize,
) -> (Vec<Tensor<B, 1>>, BucketLayout) {
    let (mut buckets, mut layout) = (Vec::new(), Vec::new());
    let mut bucket: Vec<Tensor<B, 1>> = Vec::new();
    let mut lens: Vec<usize> = Vec::new();
    let mut filled = 0;
    for t in tensors {
        let n = t.dims()[0];
        if filled > 0 && filled + n > bucket_elems {
            buckets.push(Tensor::cat(std::mem::take(&mut bucket), 0));
            layout.push(std::mem::take(&mut lens));
            filled = 0;
        }
        filled += n;
        lens.push(n);
        bucket.push(t);
    }
    if !bucket.is_empty() {
        buckets.push(Tensor::cat(bucket, 0));
        layout.push(lens);
    }
    (buckets, BucketLayout(layout))
}

impl BucketLayout {
    /// Splits buckets (as packed, or results of the same lengths) back into the tensors.
    pub fn unpack<B: Backend>(self, buckets: Vec<Tensor<B, 1>>) -> Vec<Tensor<B, 1>> {
        let mut out = Vec::new();
        for (bucket, lens) in buckets.into_iter().zip(self.0) {
            let mut at = 0;
            for n in lens {
                out.push(bucket.clone().slice(at..at + n));
                at += n;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn buckets_split_back_in_order() {
        let dev = Default::default();
        let ts: Vec<Tensor<Flex, 1>> = [3usize, 1, 5, 2]
            .iter()
            .enumerate()
            .map(|(i, &n)| Tensor::full([n], i as f32, &dev))
            .collect();
        let mut sizes = vec![];
        let out = bucketed(ts, 4, |b| {
            sizes.push(b.dims()[0]);
            Ok(b * 2.0)
        })
        .unwrap();
        assert_eq!(sizes, vec![4, 5, 2]);
        let got: Vec<Vec<f32>> = out
            .into_iter()
            .map(|t| t.into_data().to_vec().unwrap())
            .collect();
        assert_eq!(
            got,
            vec![vec![0.0; 3], vec![2.0], vec![4.0; 5], vec![6.0; 2]]
        );
    }
}
