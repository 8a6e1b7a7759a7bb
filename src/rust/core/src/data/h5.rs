//! The few HDF5 calls the package needs, on the system's libhdf5 (C API,
//! 1.10 or later): open a file, read a hyperslab of a 1-D or 2-D numeric
//! dataset, write an AnnData (`.h5ad`) file cell block by cell block, and
//! write a dense 2-D dataset (a result too large for memory) block by block.
//!
//! The serial HDF5 library is not thread-safe: every call made here holds
//! one process-wide lock (`LOCK`), so a prefetching reader thread and the
//! main thread never call into it at the same time.

use crate::error::{Error, Result};
use std::ffi::{c_char, c_int, c_uint, c_void, CString};
use std::sync::Mutex;

#[allow(non_camel_case_types)]
type hid_t = i64;
#[allow(non_camel_case_types)]
type herr_t = c_int;
#[allow(non_camel_case_types)]
type hsize_t = u64;

const H5P_DEFAULT: hid_t = 0;
const H5S_ALL: hid_t = 0;
const H5F_ACC_RDONLY: c_uint = 0;
const H5F_ACC_RDWR: c_uint = 1;
const H5F_ACC_TRUNC: c_uint = 2;
const H5F_ACC_EXCL: c_uint = 4;
const H5S_SELECT_SET: c_int = 0;
const H5S_SCALAR: c_int = 0;
const H5T_CSET_UTF8: c_int = 1;
const H5T_VARIABLE: usize = usize::MAX;
const H5S_UNLIMITED: hsize_t = u64::MAX;
const H5T_INTEGER: c_int = 0;
const H5T_FLOAT: c_int = 1;
const H5T_STRING: c_int = 3;

#[link(name = "hdf5")]
extern "C" {
    fn H5open() -> herr_t;
    fn H5Eget_auto2(stack: hid_t, func: *mut Option<ErrorFn>, data: *mut *mut c_void) -> herr_t;
    fn H5Eset_auto2(stack: hid_t, func: Option<ErrorFn>, data: *mut c_void) -> herr_t;
    fn H5Fopen(name: *const c_char, flags: c_uint, fapl: hid_t) -> hid_t;
    fn H5Fcreate(name: *const c_char, flags: c_uint, fcpl: hid_t, fapl: hid_t) -> hid_t;
    fn H5Fclose(id: hid_t) -> herr_t;
    fn H5Gcreate2(loc: hid_t, name: *const c_char, lcpl: hid_t, gcpl: hid_t, gapl: hid_t) -> hid_t;
    fn H5Gopen2(loc: hid_t, name: *const c_char, gapl: hid_t) -> hid_t;
    fn H5Gclose(id: hid_t) -> herr_t;
    fn H5Lexists(loc: hid_t, name: *const c_char, lapl: hid_t) -> c_int;
    fn H5Dopen2(loc: hid_t, name: *const c_char, dapl: hid_t) -> hid_t;
    fn H5Dcreate2(
        loc: hid_t,
        name: *const c_char,
        t: hid_t,
        space: hid_t,
        lcpl: hid_t,
        dcpl: hid_t,
        dapl: hid_t,
    ) -> hid_t;
    fn H5Dclose(id: hid_t) -> herr_t;
    fn H5Dget_space(id: hid_t) -> hid_t;
    fn H5Dget_type(id: hid_t) -> hid_t;
    fn H5Dread(id: hid_t, mem_t: hid_t, mem_space: hid_t, file_space: hid_t, xfer: hid_t, buf: *mut c_void) -> herr_t;
    fn H5Dwrite(
        id: hid_t,
        mem_t: hid_t,
        mem_space: hid_t,
        file_space: hid_t,
        xfer: hid_t,
        buf: *const c_void,
    ) -> herr_t;
    fn H5Dset_extent(id: hid_t, size: *const hsize_t) -> herr_t;
    fn H5Screate(class: c_int) -> hid_t;
    fn H5Screate_simple(rank: c_int, dims: *const hsize_t, maxdims: *const hsize_t) -> hid_t;
    fn H5Sclose(id: hid_t) -> herr_t;
    fn H5Sget_simple_extent_ndims(id: hid_t) -> c_int;
    fn H5Sget_simple_extent_dims(id: hid_t, dims: *mut hsize_t, maxdims: *mut hsize_t) -> c_int;
    fn H5Sselect_hyperslab(
        id: hid_t,
        op: c_int,
        start: *const hsize_t,
        stride: *const hsize_t,
        count: *const hsize_t,
        block: *const hsize_t,
    ) -> herr_t;
    fn H5Tget_class(id: hid_t) -> c_int;
    fn H5Tcopy(id: hid_t) -> hid_t;
    fn H5Tclose(id: hid_t) -> herr_t;
    fn H5Tset_size(id: hid_t, size: usize) -> herr_t;
    fn H5Tset_cset(id: hid_t, cset: c_int) -> herr_t;
    fn H5Acreate2(loc: hid_t, name: *const c_char, t: hid_t, space: hid_t, acpl: hid_t, aapl: hid_t) -> hid_t;
    fn H5Awrite(id: hid_t, t: hid_t, buf: *const c_void) -> herr_t;
    fn H5Aclose(id: hid_t) -> herr_t;
    fn H5Pcreate(class: hid_t) -> hid_t;
    fn H5Pset_chunk(id: hid_t, ndims: c_int, dims: *const hsize_t) -> herr_t;
    fn H5Pclose(id: hid_t) -> herr_t;
    fn H5Aexists_by_name(obj: hid_t, obj_name: *const c_char, attr: *const c_char, lapl: hid_t) -> c_int;
    fn H5Aopen_by_name(loc: hid_t, obj: *const c_char, attr: *const c_char, aapl: hid_t, lapl: hid_t) -> hid_t;
    fn H5Aget_type(id: hid_t) -> hid_t;
    fn H5Aget_space(id: hid_t) -> hid_t;
    fn H5Aread(id: hid_t, t: hid_t, buf: *mut c_void) -> herr_t;
    fn H5Tis_variable_str(id: hid_t) -> c_int;
    fn H5Tget_size(id: hid_t) -> usize;
    fn H5Tget_cset(id: hid_t) -> c_int;
    fn H5Dvlen_reclaim(t: hid_t, space: hid_t, xfer: hid_t, buf: *mut c_void) -> herr_t;
    fn H5Sget_simple_extent_npoints(id: hid_t) -> i64;

    static H5T_NATIVE_FLOAT_g: hid_t;
    static H5T_NATIVE_DOUBLE_g: hid_t;
    static H5T_NATIVE_INT32_g: hid_t;
    static H5T_NATIVE_UINT32_g: hid_t;
    static H5T_NATIVE_INT64_g: hid_t;
    static H5T_NATIVE_UINT64_g: hid_t;
    static H5T_NATIVE_INT8_g: hid_t;
    static H5T_C_S1_g: hid_t;
    static H5P_CLS_DATASET_CREATE_ID_g: hid_t;
}

type ErrorFn = unsafe extern "C" fn(hid_t, *mut c_void) -> herr_t;
const H5E_DEFAULT: hid_t = 0;

static LOCK: Mutex<()> = Mutex::new(());

thread_local! {
    /// Whether this thread holds `LOCK` (ids dropped inside `locked` close
    /// without taking it again).
    static HELD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` holding the library lock, after `H5open()` (which sets the
/// type constants the calls use).
fn locked<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    if HELD.with(|h| h.get()) {
        return f();
    }
    let _turn = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    HELD.with(|h| h.set(true));
    struct Release;
    impl Drop for Release {
        fn drop(&mut self) {
            HELD.with(|h| h.set(false));
        }
    }
    let _release = Release;
    // SAFETY: initialises the library; idempotent.
    if unsafe { H5open() } < 0 {
        return Err(Error::InvalidInput("the HDF5 library could not be initialised".into()));
    }
    // HDF5 prints its error stack on every failed call; ours become
    // messages of their own, so printing is off while we call, and the
    // previous handler (R's rhdf5 may have set one) is put back after.
    let (mut func, mut data): (Option<ErrorFn>, *mut c_void) = (None, std::ptr::null_mut());
    // SAFETY: reads and sets the default stack's automatic error handler.
    unsafe {
        H5Eget_auto2(H5E_DEFAULT, &mut func, &mut data);
        H5Eset_auto2(H5E_DEFAULT, None, std::ptr::null_mut());
    }
    let out = f();
    unsafe { H5Eset_auto2(H5E_DEFAULT, func, data) };
    out
}

fn c_name(s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::InvalidInput(format!("HDF5 name {s:?} contains a NUL byte")))
}

/// An HDF5 object id closed on drop with its own close function.
struct Id(hid_t, unsafe extern "C" fn(hid_t) -> herr_t);

impl Drop for Id {
    fn drop(&mut self) {
        let _ = locked(|| {
            // SAFETY: a valid id of the kind its close function takes.
            unsafe { (self.1)(self.0) };
            Ok(())
        });
    }
}

fn id(raw: hid_t, close: unsafe extern "C" fn(hid_t) -> herr_t, what: impl FnOnce() -> String) -> Result<Id> {
    if raw < 0 {
        Err(Error::InvalidInput(what()))
    } else {
        Ok(Id(raw, close))
    }
}

fn check(status: herr_t, what: impl FnOnce() -> String) -> Result<()> {
    if status < 0 {
        Err(Error::InvalidInput(what()))
    } else {
        Ok(())
    }
}

/// Selects the block of `count` elements from `start` in `space` (one
/// hyperslab; HDF5 refuses a rank mismatch or a block out of range).
fn select(space: &Id, start: &[u64], count: &[u64], what: impl FnOnce() -> String) -> Result<()> {
    // SAFETY: an open dataspace; `start` and `count` hold one value per
    // dimension of the selection the caller reads or writes.
    check(
        unsafe {
            H5Sselect_hyperslab(
                space.0,
                H5S_SELECT_SET,
                start.as_ptr(),
                std::ptr::null(),
                count.as_ptr(),
                std::ptr::null(),
            )
        },
        what,
    )
}

/// The dimensions of a simple dataspace.
fn extent(space: &Id, what: impl Fn() -> String) -> Result<Vec<u64>> {
    // SAFETY: an open dataspace; `dims` is sized by the rank asked first.
    let rank = unsafe { H5Sget_simple_extent_ndims(space.0) };
    check(rank, &what)?;
    let mut dims = vec![0u64; rank as usize];
    check(unsafe { H5Sget_simple_extent_dims(space.0, dims.as_mut_ptr(), std::ptr::null_mut()) }, &what)?;
    Ok(dims)
}

/// Writes `values` into the block of `count` elements from `start` of the
/// open dataset `d` whose dataspace is `space` (HDF5 converts from `T`).
fn write_slab<T: H5Native>(
    d: &Id,
    space: &Id,
    start: &[u64],
    count: &[u64],
    values: &[T],
    what: impl Fn() -> String,
) -> Result<()> {
    debug_assert_eq!(count.iter().product::<u64>(), values.len() as u64);
    select(space, start, count, &what)?;
    // SAFETY: a memory space of exactly the selected elements, which
    // `values` holds.
    let mem = id(unsafe { H5Screate_simple(count.len() as c_int, count.as_ptr(), std::ptr::null()) }, H5Sclose, &what)?;
    check(unsafe { H5Dwrite(d.0, T::native(), mem.0, space.0, H5P_DEFAULT, values.as_ptr() as *const c_void) }, what)
}

/// Element types a dataset is read into (HDF5 converts from the stored type).
pub trait H5Native: Copy + Default {
    fn native() -> hid_t;
}
macro_rules! native {
    ($($t:ty => $g:ident),*) => {$(
        impl H5Native for $t {
            fn native() -> hid_t {
                // SAFETY: set by H5open(), which `locked` calls first.
                unsafe { $g }
            }
        }
    )*};
}
native!(f32 => H5T_NATIVE_FLOAT_g, f64 => H5T_NATIVE_DOUBLE_g, u32 => H5T_NATIVE_UINT32_g, i32 => H5T_NATIVE_INT32_g,
        u64 => H5T_NATIVE_UINT64_g, i64 => H5T_NATIVE_INT64_g, i8 => H5T_NATIVE_INT8_g);

/// A file open for reading. Datasets are opened by path for each read, so
/// the handle holds nothing else.
pub struct H5Reader {
    file: Id,
    path: String,
}

impl H5Reader {
    pub fn open(path: &str) -> Result<H5Reader> {
        if !std::path::Path::new(path).is_file() {
            return Err(Error::InvalidInput(format!("'{path}' does not exist or is not a file")));
        }
        let name = c_name(path)?;
        locked(|| {
            // SAFETY: a NUL-terminated name; default access properties.
            let raw = unsafe { H5Fopen(name.as_ptr(), H5F_ACC_RDONLY, H5P_DEFAULT) };
            let file = id(raw, H5Fclose, || format!("'{path}' is not an HDF5 file HDF5 can open"))?;
            Ok(H5Reader { file, path: path.to_string() })
        })
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// Whether `name` (a path such as "X/data") exists, checking each link.
    pub fn exists(&self, name: &str) -> Result<bool> {
        locked(|| {
            let mut prefix = String::new();
            for part in name.split('/').filter(|p| !p.is_empty()) {
                if !prefix.is_empty() {
                    prefix.push('/');
                }
                prefix.push_str(part);
                let c = c_name(&prefix)?;
                // SAFETY: an open file and a NUL-terminated link path.
                if unsafe { H5Lexists(self.file.0, c.as_ptr(), H5P_DEFAULT) } <= 0 {
                    return Ok(false);
                }
            }
            Ok(true)
        })
    }

    fn dataset(&self, name: &str) -> Result<Id> {
        let c = c_name(name)?;
        // SAFETY: an open file, a NUL-terminated path.
        let raw = unsafe { H5Dopen2(self.file.0, c.as_ptr(), H5P_DEFAULT) };
        id(raw, H5Dclose, || format!("'{}' has no dataset '{name}'", self.path))
    }

    /// The dimensions of dataset `name`, and whether it holds numbers.
    pub fn shape(&self, name: &str) -> Result<(Vec<u64>, bool)> {
        locked(|| {
            let d = self.dataset(name)?;
            // SAFETY: an open dataset; dims sized by the rank asked first.
            let space = id(unsafe { H5Dget_space(d.0) }, H5Sclose, || format!("dataspace of '{name}'"))?;
            let dims = extent(&space, || format!("dimensions of '{name}'"))?;
            let t = id(unsafe { H5Dget_type(d.0) }, H5Tclose, || format!("type of '{name}'"))?;
            let class = unsafe { H5Tget_class(t.0) };
            Ok((dims, class == H5T_INTEGER || class == H5T_FLOAT))
        })
    }

    /// The strings of dataset `name` (any shape, in storage order), fixed-
    /// or variable-length.
    pub fn strings(&self, name: &str) -> Result<Vec<String>> {
        locked(|| {
            let d = self.dataset(name)?;
            let what = || format!("reading strings '{name}' of '{}'", self.path);
            // SAFETY: an open dataset; its type and space.
            let t = id(unsafe { H5Dget_type(d.0) }, H5Tclose, what)?;
            let space = id(unsafe { H5Dget_space(d.0) }, H5Sclose, what)?;
            read_strings(t.0, space.0, what, |mem, buf| unsafe {
                H5Dread(d.0, mem, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf)
            })
        })
    }

    /// The value of attribute `attr` of object `obj` as strings (a scalar
    /// string: one), or None when there is no such attribute or it does
    /// not hold strings.
    pub fn attr_strings(&self, obj: &str, attr: &str) -> Result<Option<Vec<String>>> {
        let (co, ca) = (c_name(obj)?, c_name(attr)?);
        if !self.exists(obj)? && obj != "/" {
            return Ok(None);
        }
        locked(|| {
            // SAFETY: an open file; NUL-terminated names of an existing object.
            if unsafe { H5Aexists_by_name(self.file.0, co.as_ptr(), ca.as_ptr(), H5P_DEFAULT) } <= 0 {
                return Ok(None);
            }
            let what = || format!("reading attribute '{attr}' of '{obj}' in '{}'", self.path);
            let a = id(
                unsafe { H5Aopen_by_name(self.file.0, co.as_ptr(), ca.as_ptr(), H5P_DEFAULT, H5P_DEFAULT) },
                H5Aclose,
                what,
            )?;
            let t = id(unsafe { H5Aget_type(a.0) }, H5Tclose, what)?;
            if unsafe { H5Tget_class(t.0) } != H5T_STRING {
                return Ok(None);
            }
            let space = id(unsafe { H5Aget_space(a.0) }, H5Sclose, what)?;
            read_strings(t.0, space.0, what, |mem, buf| unsafe { H5Aread(a.0, mem, buf) }).map(Some)
        })
    }

    /// `count` elements of 1-D dataset `name` from `start`, converted to `T`.
    pub fn read_1d<T: H5Native>(&self, name: &str, start: u64, count: u64) -> Result<Vec<T>> {
        self.read_slab(name, &[start], &[count])
    }

    /// Rows `start..start + count` of 2-D dataset `name` (all columns), row-major.
    pub fn read_rows_2d<T: H5Native>(&self, name: &str, start: u64, count: u64, n_cols: u64) -> Result<Vec<T>> {
        self.read_slab(name, &[start, 0], &[count, n_cols])
    }

    fn read_slab<T: H5Native>(&self, name: &str, start: &[u64], count: &[u64]) -> Result<Vec<T>> {
        let n: u64 = count.iter().product();
        let mut out = vec![T::default(); n as usize];
        if n == 0 {
            return Ok(out);
        }
        locked(|| {
            let d = self.dataset(name)?;
            let rank = start.len() as c_int;
            let what = || format!("reading {count:?} elements of '{name}' at {start:?} from '{}'", self.path);
            // SAFETY: an open dataset; start/count arrays of its rank (the
            // selection call fails on a rank mismatch or out-of-range
            // block); `out` holds exactly the selected elements.
            let file_space = id(unsafe { H5Dget_space(d.0) }, H5Sclose, what)?;
            select(&file_space, start, count, what)?;
            let mem = id(unsafe { H5Screate_simple(rank, count.as_ptr(), std::ptr::null()) }, H5Sclose, what)?;
            check(
                unsafe { H5Dread(d.0, T::native(), mem.0, file_space.0, H5P_DEFAULT, out.as_mut_ptr() as *mut c_void) },
                what,
            )
        })?;
        Ok(out)
    }
}

/// Reads the strings of a dataset or attribute of type `file_type` and
/// space `space` with `read(memory type, buffer)`.
fn read_strings(
    file_type: hid_t,
    space: hid_t,
    what: impl Fn() -> String + Copy,
    read: impl FnOnce(hid_t, *mut c_void) -> herr_t,
) -> Result<Vec<String>> {
    // SAFETY: type queries on an open string type; the buffer holds `n`
    // pointers (variable-length, freed by H5Dvlen_reclaim) or `n · size`
    // bytes (fixed-length), as the memory type says.
    unsafe {
        if H5Tget_class(file_type) != H5T_STRING {
            return Err(Error::InvalidInput(format!("{}: not strings", what())));
        }
        let n = H5Sget_simple_extent_npoints(space).max(0) as usize;
        let mem = id(H5Tcopy(H5T_C_S1_g), H5Tclose, what)?;
        check(H5Tset_cset(mem.0, H5Tget_cset(file_type)), what)?;
        let text = |b: &[u8]| String::from_utf8_lossy(b).trim_end_matches(['\0', ' ']).to_string();
        if H5Tis_variable_str(file_type) > 0 {
            check(H5Tset_size(mem.0, H5T_VARIABLE), what)?;
            let mut ptrs: Vec<*mut c_char> = vec![std::ptr::null_mut(); n];
            check(read(mem.0, ptrs.as_mut_ptr() as *mut c_void), what)?;
            let out = ptrs
                .iter()
                .map(|&p| if p.is_null() { String::new() } else { text(std::ffi::CStr::from_ptr(p).to_bytes()) })
                .collect();
            H5Dvlen_reclaim(mem.0, space, H5P_DEFAULT, ptrs.as_mut_ptr() as *mut c_void);
            Ok(out)
        } else {
            // One byte more than the file's strings, for the terminator: a
            // null-padded string that fills its size (numpy's `S` type, as
            // Cell Ranger and rhdf5 write them) would lose its last
            // character in a memory type of the same size.
            let size = H5Tget_size(file_type).max(1) + 1;
            check(H5Tset_size(mem.0, size), what)?;
            let mut buf = vec![0u8; n * size];
            check(read(mem.0, buf.as_mut_ptr() as *mut c_void), what)?;
            Ok(buf.chunks(size).map(text).collect())
        }
    }
}

/// Writes an AnnData file (`.h5ad`, anndata's on-disk format 0.1/0.2):
/// `X` as a CSR matrix appended block by block, the cell and gene names,
/// and categorical cell columns. Readable by anndata/scanpy and by this
/// package's on-disk input.
pub struct H5adWriter {
    file: Id,
    path: String,
    x: [Id; 3],
    n_genes: u64,
    n_rows: u64,
    nnz: u64,
}

fn str_type() -> Result<Id> {
    // SAFETY: copies the C string type and makes it variable-length UTF-8.
    let t = id(unsafe { H5Tcopy(H5T_C_S1_g) }, H5Tclose, || "string type".into())?;
    check(unsafe { H5Tset_size(t.0, H5T_VARIABLE) }, || "string type".into())?;
    check(unsafe { H5Tset_cset(t.0, H5T_CSET_UTF8) }, || "string type".into())?;
    Ok(t)
}

fn group(loc: hid_t, name: &str) -> Result<Id> {
    let c = c_name(name)?;
    // SAFETY: an open location and a NUL-terminated name.
    id(unsafe { H5Gcreate2(loc, c.as_ptr(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT) }, H5Gclose, || {
        format!("creating group '{name}'")
    })
}

fn open_group(loc: hid_t, name: &str) -> Result<Id> {
    let c = c_name(name)?;
    // SAFETY: as above.
    id(unsafe { H5Gopen2(loc, c.as_ptr(), H5P_DEFAULT) }, H5Gclose, || format!("opening group '{name}'"))
}

/// A scalar UTF-8 string attribute.
fn attr_str(loc: hid_t, name: &str, value: &str) -> Result<()> {
    let (cn, cv) = (c_name(name)?, c_name(value)?);
    let t = str_type()?;
    // SAFETY: scalar space; the buffer is one pointer to a C string, as a
    // variable-length string attribute takes.
    let space = id(unsafe { H5Screate(H5S_SCALAR) }, H5Sclose, || "scalar space".into())?;
    let a = id(unsafe { H5Acreate2(loc, cn.as_ptr(), t.0, space.0, H5P_DEFAULT, H5P_DEFAULT) }, H5Aclose, || {
        format!("attribute '{name}'")
    })?;
    let p = cv.as_ptr();
    check(unsafe { H5Awrite(a.0, t.0, &p as *const *const c_char as *const c_void) }, || format!("attribute '{name}'"))
}

/// A 1-D string-array attribute (variable-length UTF-8).
fn attr_strs(loc: hid_t, name: &str, values: &[&str]) -> Result<()> {
    let cn = c_name(name)?;
    let cs: Vec<CString> = values.iter().map(|v| c_name(v)).collect::<Result<_>>()?;
    let ptrs: Vec<*const c_char> = cs.iter().map(|c| c.as_ptr()).collect();
    let t = str_type()?;
    let dims = [values.len() as hsize_t];
    // SAFETY: a 1-D space of `values.len()` pointers to C strings.
    let space = id(unsafe { H5Screate_simple(1, dims.as_ptr(), std::ptr::null()) }, H5Sclose, || "space".into())?;
    let a = id(unsafe { H5Acreate2(loc, cn.as_ptr(), t.0, space.0, H5P_DEFAULT, H5P_DEFAULT) }, H5Aclose, || {
        format!("attribute '{name}'")
    })?;
    check(unsafe { H5Awrite(a.0, t.0, ptrs.as_ptr() as *const c_void) }, || format!("attribute '{name}'"))
}

/// A 1-D int64 attribute.
fn attr_i64s(loc: hid_t, name: &str, values: &[i64]) -> Result<()> {
    let cn = c_name(name)?;
    let dims = [values.len() as hsize_t];
    // SAFETY: a 1-D space of `values.len()` int64s.
    let space = id(unsafe { H5Screate_simple(1, dims.as_ptr(), std::ptr::null()) }, H5Sclose, || "space".into())?;
    let t = unsafe { H5T_NATIVE_INT64_g };
    let a = id(unsafe { H5Acreate2(loc, cn.as_ptr(), t, space.0, H5P_DEFAULT, H5P_DEFAULT) }, H5Aclose, || {
        format!("attribute '{name}'")
    })?;
    check(unsafe { H5Awrite(a.0, t, values.as_ptr() as *const c_void) }, || format!("attribute '{name}'"))
}

fn encoding(loc: hid_t, kind: &str, version: &str) -> Result<()> {
    attr_str(loc, "encoding-type", kind)?;
    attr_str(loc, "encoding-version", version)
}

/// A 1-D dataset of `values`; `extendable` ones are chunked with an
/// unlimited size so that blocks can be appended.
fn dataset_1d<T: H5Native>(loc: hid_t, name: &str, values: &[T], extendable: bool) -> Result<Id> {
    let cn = c_name(name)?;
    let dims = [values.len() as hsize_t];
    let max = [if extendable { H5S_UNLIMITED } else { values.len() as hsize_t }];
    // SAFETY: a 1-D space; a chunked creation list when extendable (an
    // unlimited dataset must be chunked); `values` holds `dims[0]` elements.
    let space = id(unsafe { H5Screate_simple(1, dims.as_ptr(), max.as_ptr()) }, H5Sclose, || "space".into())?;
    let dcpl = id(unsafe { H5Pcreate(H5P_CLS_DATASET_CREATE_ID_g) }, H5Pclose, || "creation list".into())?;
    if extendable {
        let chunk = [1u64 << 16];
        check(unsafe { H5Pset_chunk(dcpl.0, 1, chunk.as_ptr()) }, || format!("chunking '{name}'"))?;
    }
    let d = id(
        unsafe { H5Dcreate2(loc, cn.as_ptr(), T::native(), space.0, H5P_DEFAULT, dcpl.0, H5P_DEFAULT) },
        H5Dclose,
        || format!("creating dataset '{name}'"),
    )?;
    if !values.is_empty() {
        check(
            unsafe { H5Dwrite(d.0, T::native(), H5S_ALL, H5S_ALL, H5P_DEFAULT, values.as_ptr() as *const c_void) },
            || format!("writing '{name}'"),
        )?;
    }
    Ok(d)
}

/// Appends `values` to an extendable 1-D dataset that holds `len` elements.
fn append_1d<T: H5Native>(d: &Id, len: u64, values: &[T], name: &str) -> Result<()> {
    if values.is_empty() {
        return Ok(());
    }
    let n = values.len() as u64;
    let new_len = [len + n];
    let what = || format!("appending to '{name}'");
    // SAFETY: extends the dataset, then selects its new tail and writes
    // `n` elements from `values` there.
    check(unsafe { H5Dset_extent(d.0, new_len.as_ptr()) }, what)?;
    let space = id(unsafe { H5Dget_space(d.0) }, H5Sclose, what)?;
    write_slab(d, &space, &[len], &[n], values, what)
}

/// A string-array dataset (anndata's "string-array" encoding).
fn string_array(loc: hid_t, name: &str, values: &[String]) -> Result<()> {
    let cn = c_name(name)?;
    let cs: Vec<CString> = values.iter().map(|v| c_name(v)).collect::<Result<_>>()?;
    let ptrs: Vec<*const c_char> = cs.iter().map(|c| c.as_ptr()).collect();
    let t = str_type()?;
    let dims = [values.len() as hsize_t];
    // SAFETY: a 1-D space of `values.len()` pointers to C strings.
    let space = id(unsafe { H5Screate_simple(1, dims.as_ptr(), std::ptr::null()) }, H5Sclose, || "space".into())?;
    let d = id(
        unsafe { H5Dcreate2(loc, cn.as_ptr(), t.0, space.0, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT) },
        H5Dclose,
        || format!("creating dataset '{name}'"),
    )?;
    if !values.is_empty() {
        check(unsafe { H5Dwrite(d.0, t.0, H5S_ALL, H5S_ALL, H5P_DEFAULT, ptrs.as_ptr() as *const c_void) }, || {
            format!("writing '{name}'")
        })?;
    }
    encoding(d.0, "string-array", "0.2.0")
}

impl H5adWriter {
    /// Creates (or overwrites) `path` for a matrix of `n_genes` genes; cells
    /// are appended with `append`.
    pub fn create(path: &str, n_genes: usize) -> Result<H5adWriter> {
        let name = c_name(path)?;
        locked(|| {
            // SAFETY: a NUL-terminated name; default properties.
            let raw = unsafe { H5Fcreate(name.as_ptr(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT) };
            let file = id(raw, H5Fclose, || format!("cannot create '{path}'"))?;
            encoding(file.0, "anndata", "0.1.0")?;
            let x = group(file.0, "X")?;
            encoding(x.0, "csr_matrix", "0.1.0")?;
            let data = dataset_1d::<f32>(x.0, "data", &[], true)?;
            let indices = dataset_1d::<i32>(x.0, "indices", &[], true)?;
            let indptr = dataset_1d::<i64>(x.0, "indptr", &[0], true)?;
            for g in ["layers", "obsm", "obsp", "varm", "varp", "uns"] {
                let g = group(file.0, g)?;
                encoding(g.0, "dict", "0.1.0")?;
            }
            Ok(H5adWriter {
                file,
                path: path.to_string(),
                x: [data, indices, indptr],
                n_genes: n_genes as u64,
                n_rows: 0,
                nnz: 0,
            })
        })
    }

    /// Opens a file that `create` made (and `append` may have written) to
    /// append more cells or finish it: where it stands is read back from
    /// the lengths of its datasets, so a caller can write block by block
    /// without keeping the file open in between.
    pub fn reopen(path: &str, n_genes: usize) -> Result<H5adWriter> {
        let name = c_name(path)?;
        locked(|| {
            // SAFETY: a NUL-terminated name; default properties.
            let raw = unsafe { H5Fopen(name.as_ptr(), H5F_ACC_RDWR, H5P_DEFAULT) };
            let file = id(raw, H5Fclose, || format!("cannot open '{path}' to write"))?;
            let x = open_group(file.0, "X")?;
            let open = |n: &str| -> Result<(Id, u64)> {
                let c = c_name(n)?;
                // SAFETY: an open group, a NUL-terminated name.
                let d = id(unsafe { H5Dopen2(x.0, c.as_ptr(), H5P_DEFAULT) }, H5Dclose, || {
                    format!("'{path}' has no dataset 'X/{n}': not a file this package is writing")
                })?;
                let space = id(unsafe { H5Dget_space(d.0) }, H5Sclose, || format!("dataspace of 'X/{n}'"))?;
                let len = extent(&space, || format!("length of 'X/{n}'"))?.first().copied().unwrap_or(0);
                Ok((d, len))
            };
            let (data, nnz) = open("data")?;
            let (indices, _) = open("indices")?;
            let (indptr, rows) = open("indptr")?;
            Ok(H5adWriter {
                file,
                path: path.to_string(),
                x: [data, indices, indptr],
                n_genes: n_genes as u64,
                n_rows: rows.saturating_sub(1),
                nnz,
            })
        })
    }

    /// Cells written so far.
    pub fn n_rows(&self) -> u64 {
        self.n_rows
    }

    /// Appends the cells of `block` (cells × genes).
    pub fn append(&mut self, block: &super::Csr) -> Result<()> {
        if block.n_cols as u64 != self.n_genes {
            return Err(Error::InvalidInput(format!(
                "a block of {} genes for a file of {}",
                block.n_cols, self.n_genes
            )));
        }
        let indices: Vec<i32> = block.indices.iter().map(|&j| j as i32).collect();
        let indptr: Vec<i64> = block.indptr[1..].iter().map(|&p| (self.nnz + p as u64) as i64).collect();
        locked(|| {
            append_1d(&self.x[0], self.nnz, &block.values, "X/data")?;
            append_1d(&self.x[1], self.nnz, &indices, "X/indices")?;
            append_1d(&self.x[2], self.n_rows + 1, &indptr, "X/indptr")
        })?;
        self.nnz += block.nnz() as u64;
        self.n_rows += block.n_rows as u64;
        Ok(())
    }

    /// Writes the names and cell columns and closes the file. `columns` are
    /// categorical: (name, codes 0-based, levels).
    pub fn finish(self, cells: &[String], genes: &[String], columns: &[(String, Vec<u32>, Vec<String>)]) -> Result<()> {
        if cells.len() as u64 != self.n_rows || genes.len() as u64 != self.n_genes {
            return Err(Error::InvalidInput(format!(
                "{} cell and {} gene names for a {} x {} matrix",
                cells.len(),
                genes.len(),
                self.n_rows,
                self.n_genes
            )));
        }
        locked(|| {
            let x = open_group(self.file.0, "X")?;
            attr_i64s(x.0, "shape", &[self.n_rows as i64, self.n_genes as i64])?;
            let frame = |name: &str, index: &[String], cols: &[(String, Vec<u32>, Vec<String>)]| -> Result<()> {
                let g = group(self.file.0, name)?;
                encoding(g.0, "dataframe", "0.2.0")?;
                attr_str(g.0, "_index", "_index")?;
                attr_strs(g.0, "column-order", &cols.iter().map(|c| c.0.as_str()).collect::<Vec<_>>())?;
                string_array(g.0, "_index", index)?;
                for (col, codes, levels) in cols {
                    let c = group(g.0, col)?;
                    encoding(c.0, "categorical", "0.2.0")?;
                    // anndata stores `ordered` as a boolean; an int8 0 reads as False.
                    let cn = c_name("ordered")?;
                    // SAFETY: a scalar int8 attribute.
                    let space = id(unsafe { H5Screate(H5S_SCALAR) }, H5Sclose, || "space".into())?;
                    let t = unsafe { H5T_NATIVE_INT8_g };
                    let a = id(
                        unsafe { H5Acreate2(c.0, cn.as_ptr(), t, space.0, H5P_DEFAULT, H5P_DEFAULT) },
                        H5Aclose,
                        || "attribute 'ordered'".to_string(),
                    )?;
                    let zero = 0i8;
                    check(unsafe { H5Awrite(a.0, t, &zero as *const i8 as *const c_void) }, || {
                        "attribute 'ordered'".into()
                    })?;
                    let codes: Vec<i32> = codes.iter().map(|&k| k as i32).collect();
                    dataset_1d(c.0, "codes", &codes, false)?;
                    string_array(c.0, "categories", levels)?;
                }
                Ok(())
            };
            frame("obs", cells, columns)?;
            frame("var", genes, &[])
        })
        .map_err(|e| Error::InvalidInput(format!("writing '{}': {e}", self.path)))
    }
}

/// Creates the chunked 2-D dataset `name` of `dims` and element type
/// `dtype()` in `path`: in a new file, or added to an existing HDF5 file; a
/// dataset already there is an error (nothing is overwritten).
fn create_2d(path: &str, name: &str, dims: [usize; 2], chunk: [usize; 2], dtype: fn() -> hid_t) -> Result<()> {
    if name.is_empty() || name.contains('/') {
        return Err(Error::InvalidInput(format!("the dataset name {name:?} must be non-empty, without '/'")));
    }
    if dims[0] == 0 || dims[1] == 0 {
        return Err(Error::InvalidInput(format!("a {} x {} dataset has nothing to write", dims[0], dims[1])));
    }
    let exists = std::path::Path::new(path).exists();
    if exists && H5Reader::open(path)?.exists(name)? {
        return Err(Error::InvalidInput(format!(
            "'{path}' already has a dataset '{name}': give another file or dataset name (nothing was overwritten)"
        )));
    }
    let (cpath, cn) = (c_name(path)?, c_name(name)?);
    locked(|| {
        // SAFETY: NUL-terminated names; default properties. A new file is
        // created exclusively (no race with one made meanwhile).
        let raw = unsafe {
            if exists {
                H5Fopen(cpath.as_ptr(), H5F_ACC_RDWR, H5P_DEFAULT)
            } else {
                H5Fcreate(cpath.as_ptr(), H5F_ACC_EXCL, H5P_DEFAULT, H5P_DEFAULT)
            }
        };
        let file = id(raw, H5Fclose, || format!("cannot open or create '{path}' for writing"))?;
        let dims = dims.map(|v| v as hsize_t);
        let chunk = chunk.map(|v| v as hsize_t);
        // SAFETY: a 2-D space and a chunked creation list of rank 2.
        let space = id(unsafe { H5Screate_simple(2, dims.as_ptr(), std::ptr::null()) }, H5Sclose, || "space".into())?;
        let dcpl = id(unsafe { H5Pcreate(H5P_CLS_DATASET_CREATE_ID_g) }, H5Pclose, || "creation list".into())?;
        check(unsafe { H5Pset_chunk(dcpl.0, 2, chunk.as_ptr()) }, || format!("chunking '{name}'"))?;
        id(
            unsafe { H5Dcreate2(file.0, cn.as_ptr(), dtype(), space.0, H5P_DEFAULT, dcpl.0, H5P_DEFAULT) },
            H5Dclose,
            || format!("creating dataset '{name}' in '{path}'"),
        )?;
        Ok(())
    })
}

/// A dense 2-D dataset of f32 written block of rows by block of rows: a
/// result with one row per cell (as HDF5Array stores an R matrix of
/// features × cells: the dimensions reversed, so a block of cells is a
/// block of rows). Each call opens the file and closes it again, so
/// nothing stays open between the blocks (the caller keeps no handle).
pub struct DenseH5;

impl DenseH5 {
    /// Creates dataset `name` of `n_rows` × `n_cols` f32 in `path`: in a new
    /// file, or added to an existing HDF5 file; a dataset already there is
    /// an error (nothing is overwritten). Chunks hold whole rows, about 2^20
    /// values each.
    pub fn create(path: &str, name: &str, n_rows: usize, n_cols: usize) -> Result<()> {
        let chunk = [((1usize << 20) / n_cols.max(1)).clamp(1, n_rows.max(1)), n_cols];
        // SAFETY: set by H5open(), which `locked` calls first.
        create_2d(path, name, [n_rows, n_cols], chunk, || unsafe { H5T_NATIVE_FLOAT_g })
    }

    /// Writes `values` (row-major, whole rows) into rows `start..` of
    /// dataset `name` of `path`, converting from f64.
    pub fn write_rows(path: &str, name: &str, start: usize, values: &[f64]) -> Result<()> {
        let (cpath, cn) = (c_name(path)?, c_name(name)?);
        locked(|| {
            let what = || format!("writing dataset '{name}' of '{path}'");
            // SAFETY: NUL-terminated names; an open file and dataset. The
            // block is checked against the dataset's extent before
            // `write_slab`.
            let file = id(unsafe { H5Fopen(cpath.as_ptr(), H5F_ACC_RDWR, H5P_DEFAULT) }, H5Fclose, what)?;
            let d = id(unsafe { H5Dopen2(file.0, cn.as_ptr(), H5P_DEFAULT) }, H5Dclose, what)?;
            let space = id(unsafe { H5Dget_space(d.0) }, H5Sclose, what)?;
            let dims = extent(&space, what)?;
            if dims.len() != 2 {
                return Err(Error::InvalidInput(format!("dataset '{name}' of '{path}' is not 2-D")));
            }
            let n_cols = dims[1] as usize;
            if values.is_empty() {
                return Ok(());
            }
            let rows = values.len() / n_cols;
            if rows * n_cols != values.len() || (start + rows) as u64 > dims[0] {
                return Err(Error::InvalidInput(format!(
                    "{} values from row {} do not fit dataset '{name}' ({} x {n_cols}) of '{path}'",
                    values.len(),
                    start + 1,
                    dims[0]
                )));
            }
            write_slab(&d, &space, &[start as u64, 0], &[rows as hsize_t, n_cols as hsize_t], values, what)
        })
    }
}

/// A cells × `d` matrix of f64 values in dataset `name` of an HDF5 file,
/// stored as HDF5Array stores an R matrix of cells × d (the dataset is
/// d × cells, so `HDF5Array::HDF5Array(path, name)` reads it back as the
/// cells × d matrix, no transpose), in chunks of whole cells. The values
/// are stored as f64, or as f32 (`single`) for values that are f32
/// already. Read and written a block of cells at a time, in the core's
/// row-major order; each call opens the file and closes it again.
#[derive(Debug, Clone, PartialEq)]
pub struct CellsH5 {
    pub path: String,
    pub name: String,
    pub n: usize,
    pub d: usize,
}

impl CellsH5 {
    /// Creates the dataset (see [`create_2d`]: nothing is overwritten).
    pub fn create(path: &str, name: &str, n: usize, d: usize, single: bool) -> Result<CellsH5> {
        let chunk = [d, ((1usize << 20) / d.max(1)).clamp(1, n.max(1))];
        // SAFETY (both): set by H5open(), which `locked` calls first.
        let dtype: fn() -> hid_t =
            if single { || unsafe { H5T_NATIVE_FLOAT_g } } else { || unsafe { H5T_NATIVE_DOUBLE_g } };
        create_2d(path, name, [d, n], chunk, dtype)?;
        Ok(CellsH5 { path: path.to_string(), name: name.to_string(), n, d })
    }

    /// An existing dataset of `n` cells in `d` dimensions; any other shape
    /// is an error naming it.
    pub fn open(path: &str, name: &str, n: usize, d: usize) -> Result<CellsH5> {
        let (dims, _) = H5Reader::open(path)?.shape(name)?;
        if dims != [d as u64, n as u64] {
            return Err(Error::InvalidInput(format!(
                "dataset '{name}' of '{path}' holds {dims:?} values, not {n} cells x {d} dimensions"
            )));
        }
        Ok(CellsH5 { path: path.to_string(), name: name.to_string(), n, d })
    }

    /// Writes `rows` (whole cells, row-major) as cells `start..`.
    pub fn write(&self, start: usize, rows: &[f64]) -> Result<()> {
        let d = self.d;
        let count = rows.len() / d.max(1);
        if count * d != rows.len() || start + count > self.n {
            return Err(Error::InvalidInput(format!(
                "{} values from cell {} do not fit dataset '{}' ({} cells x {d})",
                rows.len(),
                start + 1,
                self.name,
                self.n
            )));
        }
        if count == 0 {
            return Ok(());
        }
        // Dimension-major, as stored.
        let mut t = vec![0.0; rows.len()];
        for (i, row) in rows.chunks(d).enumerate() {
            row.iter().enumerate().for_each(|(j, &v)| t[j * count + i] = v);
        }
        let (cpath, cn) = (c_name(&self.path)?, c_name(&self.name)?);
        locked(|| {
            let what = || format!("writing dataset '{}' of '{}'", self.name, self.path);
            // SAFETY: NUL-terminated names; an open file and dataset whose
            // extent `open`/`create` checked; the block is inside it.
            let file = id(unsafe { H5Fopen(cpath.as_ptr(), H5F_ACC_RDWR, H5P_DEFAULT) }, H5Fclose, what)?;
            let ds = id(unsafe { H5Dopen2(file.0, cn.as_ptr(), H5P_DEFAULT) }, H5Dclose, what)?;
            let space = id(unsafe { H5Dget_space(ds.0) }, H5Sclose, what)?;
            write_slab(&ds, &space, &[0, start as u64], &[d as u64, count as u64], &t, what)
        })
    }

    /// Cells `start..start + count`, row-major.
    pub fn read(&self, start: usize, count: usize) -> Result<Vec<f64>> {
        let d = self.d;
        let t: Vec<f64> =
            H5Reader::open(&self.path)?.read_slab(&self.name, &[0, start as u64], &[d as u64, count as u64])?;
        let mut rows = vec![0.0; t.len()];
        for (j, dim) in t.chunks(count.max(1)).enumerate() {
            dim.iter().enumerate().for_each(|(i, &v)| rows[i * d + j] = v);
        }
        Ok(rows)
    }
}
