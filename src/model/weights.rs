//! Named tensors read from safetensors files (single or sharded), with the file each came from so
//! that errors can name it. bf16 tensors stay bf16 until a loader asks for them (f32, or as stored
//! for a frozen weight); other dtypes become f32 as they are read.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

pub struct NamedTensor {
    pub tensor: Tensor,
    pub source: PathBuf,
}

/// A bag of named tensors as found in a checkpoint. Loaders `take` what they need, then `leftover`
/// reports what nobody used.
#[derive(Default)]
pub struct WeightMap {
    tensors: BTreeMap<String, NamedTensor>,
}

impl WeightMap {
    pub fn insert(&mut self, name: String, tensor: Tensor, source: PathBuf) {
        self.tensors.insert(name, NamedTensor { tensor, source });
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    /// Removes the tensor `name`, checks its shape, and gives it in f32.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        Ok(self.take_stored(name, shape)?.to_dtype(DType::F32)?)
    }

    /// Removes the tensor `name` and checks its shape; bf16 if the file stores it so, else f32.
    pub fn take_stored(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let Some(nt) = self.tensors.remove(name) else {
            bail!("missing tensor `{name}` in the checkpoint");
        };
        if nt.tensor.dims() != shape {
            bail!(
                "tensor `{name}` in {} has shape {:?}, expected {:?} from the model config",
                nt.source.display(),
                nt.tensor.dims(),
                shape
            );
        }
        Ok(nt.tensor)
    }

    /// Removes the tensor `name`, in f32.
    pub fn remove(&mut self, name: &str) -> Option<Tensor> {
        let t = self.tensors.remove(name)?.tensor;
        Some(
            t.to_dtype(DType::F32)
                .expect("f32 widening of a CPU tensor"),
        )
    }

    pub fn leftover(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }
}

/// Reads every tensor of one safetensors file, converting f16/f64 to f32 (bf16 stays bf16).
pub fn read_safetensors(path: &Path, into: &mut WeightMap) -> Result<()> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: the file is opened read-only and the mapping lives only for this function; we copy
    // every tensor out before returning.
    let mmap = unsafe { memmap2::Mmap::map(&file) }
        .with_context(|| format!("cannot map {}", path.display()))?;
    let st = SafeTensors::deserialize(&mmap)
        .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file: {e}", path.display()))?;
    for (name, view) in st.tensors() {
        let shape = view.shape().to_vec();
        let data = view.data();
        let dtype = match view.dtype() {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            Dtype::F64 => DType::F64,
            other => bail!(
                "{}: tensor `{name}` has dtype {other:?}; only F32, F16, BF16 and F64 weights are supported",
                path.display()
            ),
        };
        let keep = if dtype == DType::BF16 {
            DType::BF16
        } else {
            DType::F32
        };
        let t = Tensor::from_raw_buffer(data, dtype, &shape, &Device::Cpu)
            .and_then(|t| t.to_dtype(keep))
            .with_context(|| format!("{}: cannot read tensor `{name}`", path.display()))?;
        if let Some(earlier) = into.tensors.get(&name) {
            bail!(
                "{}: tensor `{name}` is also in {}; a checkpoint holds each tensor once",
                path.display(),
                earlier.source.display()
            );
        }
        into.insert(name, t, path.to_path_buf());
    }
    Ok(())
}

/// Reads `model.safetensors` or the shards listed in `model.safetensors.index.json` of an HF dir.
pub fn read_hf_weights(dir: &Path) -> Result<WeightMap> {
    let mut map = WeightMap::default();
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    if single.exists() {
        read_safetensors(&single, &mut map)?;
    } else if index.exists() {
        let text = std::fs::read_to_string(&index)
            .with_context(|| format!("cannot read {}", index.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid JSON", index.display()))?;
        let weight_map = json
            .get("weight_map")
            .and_then(|w| w.as_object())
            .with_context(|| format!("{}: no `weight_map` object", index.display()))?;
        let mut shards: Vec<&str> = weight_map.values().filter_map(|v| v.as_str()).collect();
        shards.sort();
        shards.dedup();
        for shard in shards {
            // A shard is a file beside the index, never a path elsewhere.
            if shard.is_empty() || shard.contains(['/', '\\']) || shard == ".." || shard == "." {
                bail!(
                    "{}: shard name {shard:?} is not a file name",
                    index.display()
                );
            }
            let p = dir.join(shard);
            if !p.exists() {
                bail!("{}: shard {} is missing", index.display(), p.display());
            }
            read_safetensors(&p, &mut map)?;
        }
        let wanted: HashMap<&String, &serde_json::Value> = weight_map.iter().collect();
        for name in wanted.keys() {
            if !map.contains(name) {
                bail!(
                    "{}: tensor `{name}` is listed but not found in its shard",
                    index.display()
                );
            }
        }
    } else if dir.join("pytorch_model.bin").exists()
        || dir.join("pytorch_model.bin.index.json").exists()
    {
        bail!(
            "{}: only pickle weights (pytorch_model.bin) found; rlhf never loads pickle. Convert to safetensors first",
            dir.display()
        );
    } else {
        bail!(
            "{}: no model.safetensors or model.safetensors.index.json",
            dir.display()
        );
    }
    Ok(map)
}
