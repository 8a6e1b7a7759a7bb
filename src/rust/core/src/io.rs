//! Model files: the weights as safetensors (readable by Python's
//! `safetensors`), with the model's description as JSON in the header's
//! `__metadata__` map under "scdistill".
//!
//! Layout (safetensors): 8-byte little-endian header length, the JSON header
//! (dtype, shape and byte range of every tensor), then the raw f32 data.

use crate::error::{invalid, Result};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use tch::{nn, Kind, Tensor};

/// Version of the JSON description; readers refuse newer files.
pub const FORMAT_VERSION: u64 = 1;
const MAGIC: &str = "scdistill-model";

/// Serializes every variable of `vs` (trainable and buffers) and the
/// description `meta` (it must carry "model", the model kind).
pub fn to_bytes(vs: &nn::VarStore, meta: Value) -> Result<Vec<u8>> {
    named_to_bytes(&vs.variables().into_iter().collect(), meta)
}

/// As `to_bytes`, from named tensors (a model of several variable stores).
pub fn named_to_bytes(vars: &BTreeMap<String, Tensor>, meta: Value) -> Result<Vec<u8>> {
    let mut header = Map::new();
    let mut data: Vec<u8> = Vec::new();
    for (name, t) in vars {
        let t = t.to_device(tch::Device::Cpu).to_kind(Kind::Float).contiguous();
        let v: Vec<f32> = Vec::try_from(t.flatten(0, -1))?;
        let start = data.len();
        for x in v {
            data.extend_from_slice(&x.to_le_bytes());
        }
        header.insert(name.clone(), json!({"dtype": "F32", "shape": t.size(), "data_offsets": [start, data.len()]}));
    }
    let mut meta_map = Map::new();
    meta_map.insert("format".into(), Value::String(MAGIC.into()));
    meta_map.insert(
        "scdistill".into(),
        Value::String(json!({"format_version": FORMAT_VERSION, "model": meta}).to_string()),
    );
    header.insert("__metadata__".into(), Value::Object(meta_map));
    let mut head = Value::Object(header).to_string().into_bytes();
    while !head.len().is_multiple_of(8) {
        head.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + head.len() + data.len());
    out.extend_from_slice(&(head.len() as u64).to_le_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(&data);
    Ok(out)
}

/// A parsed model file: its description and its tensors by name.
pub struct ModelFile {
    pub meta: Value,
    pub tensors: BTreeMap<String, Tensor>,
}

fn not_a_model() -> crate::Error {
    crate::Error::InvalidInput("this is not a scdistill model file (no scdistill header)".into())
}

/// Parses bytes written by `to_bytes`, checking the structure throughout.
pub fn from_bytes(bytes: &[u8]) -> Result<ModelFile> {
    if bytes.len() < 8 {
        return Err(not_a_model());
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    if n == 0 || n > bytes.len() - 8 {
        return Err(not_a_model());
    }
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).map_err(|_| not_a_model())?;
    let data = &bytes[8 + n..];
    let obj = header.as_object().ok_or_else(not_a_model)?;
    let meta = obj.get("__metadata__").and_then(Value::as_object).ok_or_else(not_a_model)?;
    if meta.get("format").and_then(Value::as_str) != Some(MAGIC) {
        return Err(not_a_model());
    }
    let desc: Value = meta
        .get("scdistill")
        .and_then(Value::as_str)
        .and_then(|s| serde_json::from_str(s).ok())
        .ok_or_else(not_a_model)?;
    let version = desc.get("format_version").and_then(Value::as_u64).unwrap_or(u64::MAX);
    if version > FORMAT_VERSION {
        return invalid!(
            "the model file has format version {version}, newer than this scdistill reads ({FORMAT_VERSION}); \
             update the package"
        );
    }
    let mut tensors = BTreeMap::new();
    for (name, spec) in obj.iter().filter(|(k, _)| *k != "__metadata__") {
        let bad = || crate::Error::InvalidInput(format!("the model file is damaged (tensor `{name}`)"));
        if spec.get("dtype").and_then(Value::as_str) != Some("F32") {
            return Err(bad());
        }
        let shape: Vec<i64> = spec
            .get("shape")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_i64).collect())
            .ok_or_else(bad)?;
        let offs: Vec<usize> = spec
            .get("data_offsets")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_u64).map(|v| v as usize).collect())
            .ok_or_else(bad)?;
        let numel: i64 = shape.iter().product();
        if offs.len() != 2 || offs[1] > data.len() || offs[1] < offs[0] || (offs[1] - offs[0]) as i64 != numel * 4 {
            return Err(bad());
        }
        let t = Tensor::from_data_size(&data[offs[0]..offs[1]], &shape, Kind::Float);
        tensors.insert(name.clone(), t);
    }
    Ok(ModelFile { meta: desc["model"].clone(), tensors })
}

/// The bytes of a model of kind `kind` ("vae", "distill"): the variables of
/// `vs` and the description `meta`, stored under the kind's own key.
pub fn model_to_bytes<T: serde::Serialize>(vs: &nn::VarStore, kind: &str, meta: &T) -> Result<Vec<u8>> {
    tensors_to_bytes(vs.variables().into_iter().collect(), kind, meta)
}

/// As `model_to_bytes`, from named tensors.
pub fn tensors_to_bytes<T: serde::Serialize>(vars: BTreeMap<String, Tensor>, kind: &str, meta: &T) -> Result<Vec<u8>> {
    let meta = serde_json::to_value(meta).map_err(|e| crate::Error::InvalidInput(e.to_string()))?;
    let mut desc = Map::new();
    desc.insert("kind".into(), Value::from(kind));
    desc.insert(kind.into(), meta);
    named_to_bytes(&vars, Value::Object(desc))
}

/// Reads a file written by `model_to_bytes` for kind `kind`: its
/// description and tensors. A file of another kind is refused, naming the
/// expected one as `what` ("a VAE").
pub fn model_from_bytes<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    kind: &str,
    what: &str,
) -> Result<(T, BTreeMap<String, Tensor>)> {
    let file = from_bytes(bytes)?;
    if file.meta.get("kind").and_then(|k| k.as_str()) != Some(kind) {
        return invalid!("this model file holds a different kind of model, not {what}");
    }
    let meta = serde_json::from_value(file.meta[kind].clone())
        .map_err(|e| crate::Error::InvalidInput(format!("the model file's description is damaged: {e}")))?;
    Ok((meta, file.tensors))
}

/// The kind of model a file holds ("vae", "distill", "multimodal"), from its header.
pub fn kind_of(bytes: &[u8]) -> Result<String> {
    let file = from_bytes(bytes)?;
    match file.meta.get("kind").and_then(Value::as_str) {
        Some(k) => Ok(k.to_string()),
        None => invalid!("the model file's description is damaged (no model kind)"),
    }
}

/// Refuses a description whose `what` has `got` entries where the
/// architecture stored beside it has `want` (a file edited or damaged).
pub fn check_meta(what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return invalid!(
            "the model file is inconsistent: its description lists {got} {what} where its architecture has {want}"
        );
    }
    Ok(())
}

/// Copies the file's tensors into `vs`, which must have exactly the same
/// variables and shapes (a file of another architecture is refused, naming
/// the tensors that differ).
pub fn load_into(vs: &nn::VarStore, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let vars = vs.variables();
    // A transposed first layer (`weight_t`) reads the [out, in] `weight` of
    // files written before it existed.
    let older = |name: &str| name.strip_suffix("weight_t").map(|p| format!("{p}weight"));
    let source = |name: &str| -> Option<(String, bool)> {
        if tensors.contains_key(name) {
            return Some((name.to_string(), false));
        }
        older(name).filter(|o| tensors.contains_key(o)).map(|o| (o, true))
    };
    let mut missing: Vec<&String> = vars.keys().filter(|k| source(k).is_none()).collect();
    missing.sort();
    if !missing.is_empty() {
        return invalid!(
            "the model file lacks tensor(s) {} ({} tensors in the file, {} in the model)",
            names(missing.into_iter()),
            tensors.len(),
            vars.len()
        );
    }
    let used: Vec<String> = vars.keys().filter_map(|k| source(k).map(|s| s.0)).collect();
    let extra: Vec<&String> = tensors.keys().filter(|k| !used.contains(k)).collect();
    if !extra.is_empty() {
        return invalid!(
            "the model file has tensor(s) the model does not: {} ({} tensors in the file, {} in the model)",
            names(extra.into_iter()),
            tensors.len(),
            vars.len()
        );
    }
    tch::no_grad(|| {
        for (name, mut v) in vars {
            let Some((key, transposed)) = source(&name) else { continue };
            let Some(t) = tensors.get(&key) else { continue };
            let src = if transposed { t.tr() } else { t.shallow_clone() };
            if src.size() != v.size() {
                return invalid!(
                    "tensor `{name}` has shape {:?} in the file but {:?} in the model",
                    src.size(),
                    v.size()
                );
            }
            v.f_copy_(&src)?;
        }
        Ok(())
    })
}

fn names<'a>(it: impl Iterator<Item = &'a String>) -> String {
    let v: Vec<String> = it.map(|n| format!("`{n}`")).collect();
    if v.len() > 5 {
        format!("{}, ... ({} in all)", v[..5].join(", "), v.len())
    } else {
        v.join(", ")
    }
}
