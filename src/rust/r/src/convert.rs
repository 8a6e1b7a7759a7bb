//! R values ⇄ the core's types (mirrors R/convert.R): count matrices from
//! a dgCMatrix's slots, matrices between R's column-major and the core's
//! row-major order, and settings and descriptions through serde: an R list becomes JSON that
//! the core's settings structs deserialize from, and the core's
//! descriptions (JSON) become R lists. No field-by-field mappers.
//!
//! R → JSON: NULL → null; an atomic vector of length one → a scalar, longer
//! ones → arrays (the core reads "one or many" where a field is a vector);
//! whole doubles → integers (so `seed = 2^53` reaches a u64); NA → null; a
//! named list → an object; an unnamed list → an array.
//! JSON → R: objects → named lists; arrays of numbers, strings or booleans
//! → vectors; arrays of objects with the same scalar fields (records, such
//! as a training history) → a named list of columns; other arrays → lists.

use crate::{fail, int_slice, strings};
use extendr_api::prelude::*;
use extendr_api::Result;
use scdistill_core::data::{Categorical, CountMatrix, Csr};
use serde::de::DeserializeOwned;
use serde_json::{Map, Number, Value};

/// An R value as JSON.
pub(crate) fn to_json(x: &Robj) -> Result<Value> {
    if x.is_null() {
        return Ok(Value::Null);
    }
    if let Ok(list) = List::try_from(x.clone()) {
        let named = x.names().map(|n| n.collect::<Vec<_>>());
        return match named {
            Some(names) if names.iter().any(|n| !n.is_empty()) => {
                let mut map = Map::new();
                for (name, v) in names.into_iter().zip(list.values()) {
                    map.insert(name.to_string(), to_json(&v)?);
                }
                Ok(Value::Object(map))
            }
            _ => Ok(Value::Array(list.values().map(|v| to_json(&v)).collect::<Result<Vec<_>>>()?)),
        };
    }
    let values: Vec<Value> = if let Some(v) = x.as_logical_slice() {
        v.iter().map(|b| if b.is_na() { Value::Null } else { Value::Bool(b.is_true()) }).collect()
    } else if let Some(v) = x.as_integer_slice() {
        v.iter().map(|&i| if i == i32::MIN { Value::Null } else { Value::from(i) }).collect()
    } else if let Some(v) = x.as_real_slice() {
        v.iter().map(|&d| number(d)).collect()
    } else if let Some(v) = x.as_str_vector() {
        v.into_iter().map(|s| if s == "NA" && x.is_na() { Value::Null } else { Value::from(s) }).collect()
    } else {
        return Err(fail(format!("internal: cannot pass an R value of type {:?} to the core", x.rtype())));
    };
    Ok(if values.len() == 1 { values.into_iter().next().unwrap_or(Value::Null) } else { Value::Array(values) })
}

/// An R double as JSON: whole numbers as integers, NA/NaN as null.
fn number(d: f64) -> Value {
    if d.is_nan() {
        Value::Null
    } else if d.fract() == 0.0 && d >= 0.0 && d <= u64::MAX as f64 {
        Value::from(d as u64)
    } else if d.fract() == 0.0 && d < 0.0 && d >= i64::MIN as f64 {
        Value::from(d as i64)
    } else {
        Number::from_f64(d).map(Value::Number).unwrap_or(Value::Null)
    }
}

/// A core settings struct from an R list; the message names `what` and the field at fault.
pub(crate) fn from_r<T: DeserializeOwned>(x: &Robj, what: &str) -> Result<T> {
    let v = to_json(x)?;
    serde_json::from_value(v).map_err(|e| fail(format!("{what}: {e}")))
}

/// JSON as an R value.
pub(crate) fn to_r(v: &Value) -> Robj {
    match v {
        Value::Null => ().into(),
        Value::Bool(b) => (*b).into(),
        Value::Number(n) => number_to_r(n),
        Value::String(s) => s.as_str().into(),
        Value::Object(map) => List::from_pairs(map.iter().map(|(k, v)| (k.as_str(), to_r(v)))).into(),
        Value::Array(items) => array_to_r(items),
    }
}

fn number_to_r(n: &Number) -> Robj {
    match n.as_i64() {
        Some(i) if n.is_i64() || n.is_u64() => {
            if i.unsigned_abs() <= i32::MAX as u64 {
                (i as i32).into()
            } else {
                (i as f64).into()
            }
        }
        _ => n.as_f64().unwrap_or(f64::NAN).into(),
    }
}

fn array_to_r(items: &[Value]) -> Robj {
    if items.is_empty() {
        return List::new(0).into();
    }
    if items.iter().all(Value::is_string) {
        return items.iter().filter_map(Value::as_str).collect::<Vec<&str>>().into();
    }
    if items.iter().all(Value::is_boolean) {
        return items.iter().filter_map(Value::as_bool).collect::<Vec<bool>>().into();
    }
    // Numbers (non-finite ones are stored as null: R's NA).
    if items.iter().all(|v| v.is_number() || v.is_null()) && items.iter().any(Value::is_number) {
        let ints: Option<Vec<i32>> = items
            .iter()
            .map(|v| v.as_i64().filter(|i| i.unsigned_abs() <= i32::MAX as u64).map(|i| i as i32))
            .collect();
        return match ints {
            Some(v) => v.into(),
            None => items.iter().map(|v| v.as_f64().unwrap_or(f64::NAN)).collect::<Vec<f64>>().into(),
        };
    }
    if let Some(columns) = records(items) {
        return columns;
    }
    List::from_values(items.iter().map(to_r)).into()
}

/// Objects with the same scalar fields as a named list of columns.
fn records(items: &[Value]) -> Option<Robj> {
    let first = items.first()?.as_object()?;
    let keys: Vec<&String> = first.keys().collect();
    let same = items.iter().all(|v| {
        v.as_object().is_some_and(|o| {
            o.len() == keys.len() && o.iter().all(|(k, x)| first.contains_key(k) && !x.is_array() && !x.is_object())
        })
    });
    if !same {
        return None;
    }
    let columns = keys.iter().map(|k| {
        let col: Vec<Value> = items.iter().map(|v| v.get(k.as_str()).cloned().unwrap_or(Value::Null)).collect();
        // A column of whole numbers that also holds fractions stays double.
        let numeric = col.iter().all(|x| x.is_number() || x.is_null());
        let col_r = if numeric && col.iter().any(|x| x.is_f64() || x.is_null()) {
            col.iter().map(|x| x.as_f64().unwrap_or(f64::NAN)).collect::<Vec<f64>>().into()
        } else {
            array_to_r(&col)
        };
        (k.as_str(), col_r)
    });
    Some(List::from_pairs(columns).into())
}

/// The elements p, i, x, genes, cells of a counts list.
pub(crate) fn count_slots(counts: &List) -> Result<(Robj, Robj, Robj, Robj, Robj)> {
    let get = |name: &str| -> Result<Robj> {
        counts
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
            .ok_or_else(|| fail(format!("internal: the counts list has no `{name}`")))
    };
    Ok((get("p")?, get("i")?, get("x")?, get("genes")?, get("cells")?))
}

/// The validated count matrix from `list(p, i, x, genes, cells)`: the slots
/// and dimnames of a genes × cells dgCMatrix (R's `slots()`).
pub(crate) fn counts_from_r(counts: &List) -> Result<CountMatrix> {
    let (p, i, x, genes, cells) = count_slots(counts)?;
    let xs = x.as_real_slice().ok_or_else(|| fail("internal: `x` must be a double vector"))?;
    CountMatrix::from_csc_genes_by_cells(
        int_slice(&p, "p")?,
        int_slice(&i, "i")?,
        xs,
        strings(&genes, "genes")?,
        strings(&cells, "cells")?,
    )
    .map_err(fail)
}

/// A categorical covariate from 1-based R factor codes, or None for NULL.
pub(crate) fn categorical_from_r(
    name: &str,
    codes: &Robj,
    levels: &Robj,
    n_cells: usize,
) -> Result<Option<Categorical>> {
    categorical_from_r_min(name, codes, levels, n_cells, 2)
}

/// As [`categorical_from_r`], with the fewest cells a level must hold:
/// 0 for new cells, which may come from some of a model's levels only.
pub(crate) fn categorical_from_r_min(
    name: &str,
    codes: &Robj,
    levels: &Robj,
    n_cells: usize,
    min_cells: usize,
) -> Result<Option<Categorical>> {
    if codes.is_null() {
        return Ok(None);
    }
    let codes: Vec<u32> = int_slice(codes, name)?.iter().map(|&c| (c - 1).max(0) as u32).collect();
    Categorical::new(name, codes, strings(levels, "levels")?, n_cells, min_cells).map(Some).map_err(fail)
}

/// Visits every (cell i, column j) of an n × d matrix in tiles of cells:
/// a column at a time would miss the cache on every read of a large matrix
/// (e.g. 10^8 Harmony memberships at 10^6 cells).
fn for_each_in_tiles(n: usize, d: usize, mut f: impl FnMut(usize, usize)) {
    const TILE: usize = 256;
    for i0 in (0..n).step_by(TILE) {
        for j in 0..d {
            for i in i0..(i0 + TILE).min(n) {
                f(i, j);
            }
        }
    }
}

/// R's column-major n × d matrix `v` as a row-major copy.
pub(crate) fn from_column_major(v: &[f64], n: usize, d: usize) -> Vec<f64> {
    let mut out = vec![0.0; n * d];
    for_each_in_tiles(n, d, |i, j| out[i * d + j] = v[j * n + i]);
    out
}

/// The row-major n × d matrix `v` as an R matrix, written in place.
pub(crate) fn r_matrix<T: Copy + Into<f64>>(v: &[T], n: usize, d: usize) -> RMatrix<f64> {
    let mut out = RMatrix::<f64>::new(n, d);
    if n * d > 0 {
        let o = out.data_mut();
        for_each_in_tiles(n, d, |i, j| o[j * n + i] = v[i * d + j].into());
    }
    out
}

/// Gives `x`, a double vector or matrix the glue has just returned, its
/// `dim` (NULL: keep its own) and `attributes` (a named list, with
/// `dimnames`) in place, and returns it. R's `matrix(x, dimnames =)`,
/// `dimnames<-` or `attr<-` on it would copy it: 400 MB at 10^6 cells and
/// 50 dimensions. Only for glue results that nothing else holds: every R
/// reference to `x` sees the change.
/// @noRd
#[extendr]
fn rs_shape_in_place(x: Robj, dim: Robj, attributes: List) -> Result<Robj> {
    // The type, not the values: reading an ALTREP wrapper's values would copy them.
    if x.rtype() != Rtype::Doubles {
        return Err(fail("internal: only a double vector is shaped in place"));
    }
    // `dim`: NULL or an integer vector (R's `as.integer()`).
    let given = if dim.is_null() { x.get_attrib("dim") } else { Some(dim.clone()) };
    let dims: Vec<usize> = given
        .as_ref()
        .and_then(|d| d.as_integer_slice())
        .map(|d| d.iter().map(|&v| v.max(0) as usize).collect())
        .unwrap_or_default();
    if dims.len() != 2 || dims[0] * dims[1] != x.len() {
        return Err(fail(format!("internal: {} values cannot be shaped as {dims:?}", x.len())));
    }
    if let Some(names) = attributes.iter().find(|(n, _)| *n == "dimnames").map(|(_, v)| v) {
        let parts: Vec<Robj> =
            List::try_from(names).map_err(|_| fail("internal: `dimnames` must be a list"))?.values().collect();
        if parts.len() != 2 {
            return Err(fail("internal: `dimnames` must be a list of two"));
        }
        for (k, p) in parts.iter().enumerate() {
            if !p.is_null() && (p.as_str_iter().is_none() || p.len() != dims[k]) {
                return Err(fail(format!("internal: the names of dimension {} must be {} strings", k + 1, dims[k])));
            }
        }
    }
    let mut x = x;
    if !dim.is_null() {
        x.set_attrib("dim", vec![dims[0] as i32, dims[1] as i32])?;
    }
    for (name, value) in attributes.iter() {
        if name.is_empty() || name == "dim" {
            return Err(fail("internal: attributes must be named, and not `dim`"));
        }
        x.set_attrib(name, value)?;
    }
    Ok(x)
}

/// Validates counts; returns c(n_genes, n_cells, nnz).
/// @noRd
#[extendr]
fn rs_validate_counts(counts: List) -> Result<Vec<f64>> {
    let (p, i, x, genes, cells) = count_slots(&counts)?;
    let xs = x.as_real_slice().ok_or_else(|| fail("internal: `x` must be a double vector"))?;
    let (genes, cells) = (strings(&genes, "genes")?, strings(&cells, "cells")?);
    CountMatrix::check_csc_genes_by_cells(int_slice(&p, "p")?, int_slice(&i, "i")?, xs, &genes, &cells)
        .map_err(fail)?;
    let nnz = xs.iter().filter(|&&v| v != 0.0).count();
    Ok(vec![genes.len() as f64, cells.len() as f64, nnz as f64])
}

/// A CSR matrix as `list(p, i, x)`: with cells as rows, the slots of a
/// genes × cells dgCMatrix. Written straight into R vectors, each Rust buffer
/// freed once copied: the data can be several GB.
pub(crate) fn csr_to_r(mut csr: Csr) -> List {
    let p = Integers::from_values(std::mem::take(&mut csr.indptr).into_iter().map(|v| v as i32));
    let i = Integers::from_values(std::mem::take(&mut csr.indices).into_iter().map(|v| v as i32));
    let x = Doubles::from_values(std::mem::take(&mut csr.values).into_iter().map(f64::from));
    list!(p = p, i = i, x = x)
}

extendr_module! {
    mod convert;
    fn rs_validate_counts;
    fn rs_shape_in_place;
}
