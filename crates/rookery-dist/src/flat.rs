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
    mut op: impl FnMut(Tensor<B, 1>) -> Result<Tensor<B, 1>, DistError>,
) -> Result<Vec<Tensor<B, 1>>, DistError> {
    let mut out = Vec::with_capacity(tensors.len());
    let mut bucket: Vec<Tensor<B, 1>> = Vec::new();
    let mut filled = 0;
    let mut flush = |bucket: &mut Vec<Tensor<B, 1>>, out: &mut Vec<Tensor<B, 1>>| {
        if bucket.is_empty() {
            return Ok(());
        }
        let lens: Vec<usize> = bucket.iter().map(|t| t.dims()[0]).collect();
        let reduced = op(Tensor::cat(std::mem::take(bucket), 0))?;
        let mut at = 0;
        for n in lens {
            out.push(reduced.clone().slice(at..at + n));
            at += n;
        }
        Ok(())
    };
    for t in tensors {
        let n = t.dims()[0];
        if filled > 0 && filled + n > bucket_elems {
            flush(&mut bucket, &mut out)?;
            filled = 0;
        }
        filled += n;
        bucket.push(t);
    }
    flush(&mut bucket, &mut out)?;
    Ok(out)
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
