//! Parallel loops on libtorch's own OpenMP threads.
//!
//! During training the thread that drives libtorch is the master of an
//! OpenMP team, and after every libtorch operation the team's other threads
//! keep spinning for a while, waiting for the next one. Host-side work done
//! between two operations (the fused likelihood kernel) cannot use those cores
//! from a rayon pool: its threads only fight the spinners for them (measured
//! slower than one thread on 2 cores). Handing the work to the same team, as
//! a `#pragma omp parallel` region would, lets the spinners pick it up at once.
//!
//! The team is reached through libgomp's entry point for parallel regions,
//! `GOMP_parallel`, looked up in the libgomp already loaded with libtorch.
//! Where there is none (libtorch built without OpenMP) or one thread is
//! asked for, the loop runs on the calling thread.

use std::ffi::{c_char, c_int, c_uint, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

type Region = unsafe extern "C" fn(unsafe extern "C" fn(*mut c_void), *mut c_void, c_uint, c_uint);
type Query = unsafe extern "C" fn() -> c_int;

struct Gomp {
    parallel: Region,
    thread_num: Query,
    num_threads: Query,
}

extern "C" {
    fn dlopen(filename: *const c_char, flag: c_int) -> *mut c_void;
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
}
const RTLD_NOW: c_int = 2;
const RTLD_NOLOAD: c_int = 4;

fn gomp() -> Option<&'static Gomp> {
    static GOMP: OnceLock<Option<Gomp>> = OnceLock::new();
    GOMP.get_or_init(|| {
        // The dlopen flag values below are glibc's.
        if !cfg!(target_os = "linux") {
            return None;
        }
        // SAFETY: dlopen with RTLD_NOLOAD only returns a library that is
        // already loaded; the symbols have the signatures of libgomp's ABI
        // (GOMP_parallel since GCC 4.9).
        unsafe {
            let lib = dlopen(c"libgomp.so.1".as_ptr(), RTLD_NOW | RTLD_NOLOAD);
            if lib.is_null() {
                return None;
            }
            let sym = |name: &std::ffi::CStr| {
                let p = dlsym(lib, name.as_ptr());
                (!p.is_null()).then_some(p)
            };
            Some(Gomp {
                parallel: std::mem::transmute::<*mut c_void, Region>(sym(c"GOMP_parallel")?),
                thread_num: std::mem::transmute::<*mut c_void, Query>(sym(c"omp_get_thread_num")?),
                num_threads: std::mem::transmute::<*mut c_void, Query>(sym(c"omp_get_num_threads")?),
            })
        }
    })
    .as_ref()
}

struct Task<'a> {
    body: &'a (dyn Fn(usize, usize) + Sync),
    gomp: &'static Gomp,
    panicked: AtomicBool,
}

unsafe extern "C" fn run_member(data: *mut c_void) {
    // SAFETY: `data` is the `Task` that `run` keeps alive across the region.
    let task = unsafe { &*(data as *const Task) };
    let (t, n) = unsafe { ((task.gomp.thread_num)() as usize, (task.gomp.num_threads)() as usize) };
    // A panic must not unwind into C: note it, re-raise after the region.
    if catch_unwind(AssertUnwindSafe(|| (task.body)(t, n.max(1)))).is_err() {
        task.panicked.store(true, Ordering::Relaxed);
    }
}

/// Runs `body(member, n_members)` once on each member of an OpenMP team of
/// up to `threads` threads (the calling thread is member 0); `n_members` is
/// the team's actual size. Returns after all have finished.
pub fn run(threads: usize, body: &(dyn Fn(usize, usize) + Sync)) {
    match gomp() {
        Some(g) if threads > 1 => {
            let task = Task { body, gomp: g, panicked: AtomicBool::new(false) };
            // SAFETY: GOMP_parallel runs `run_member(&task)` on every team
            // member and returns when all are done, while `task` is alive.
            unsafe { (g.parallel)(run_member, &task as *const Task as *mut c_void, threads as c_uint, 0) };
            if task.panicked.load(Ordering::Relaxed) {
                panic!("a parallel task panicked");
            }
        }
        _ => body(0, 1),
    }
}

/// `fill(first, rows, out)` over blocks of whole rows of `out` (`width`
/// values per row of `rows`; `first`: the block's first position in
/// `rows`), on the OpenMP team when more than one thread is set and `out`
/// has at least `min_len` values, else in one call. For work between two
/// libtorch operations that is cut by rows (a minibatch written densely, a
/// re-ranking per cell): each row's result must depend on the row alone.
pub fn on_row_blocks<T: Send>(
    rows: &[usize],
    out: &mut [T],
    width: usize,
    min_len: usize,
    fill: impl Fn(usize, &[usize], &mut [T]) + Sync,
) {
    let threads = (tch::get_num_threads().max(1) as usize).min(rows.len());
    if threads < 2 || width == 0 || out.len() < min_len {
        return fill(0, rows, out);
    }
    let per = rows.len().div_ceil(threads);
    let blocks: Vec<_> = rows
        .chunks(per)
        .zip(out.chunks_mut(per * width))
        .enumerate()
        .map(|(b, (rows, out))| std::sync::Mutex::new((b * per, rows, out)))
        .collect();
    run(threads, &|member, members| {
        for block in blocks.iter().skip(member).step_by(members) {
            let mut block = block.lock().unwrap_or_else(|e| e.into_inner());
            let (first, rows, out) = &mut *block;
            fill(*first, rows, out);
        }
    });
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn every_member_runs_once_and_the_work_is_covered() {
        let _turn = crate::models::TORCH.lock().unwrap_or_else(|e| e.into_inner());
        tch::set_num_threads(2); // loads libtorch, and with it libgomp
        let hits: Vec<AtomicUsize> = (0..100).map(|_| AtomicUsize::new(0)).collect();
        let members = AtomicUsize::new(0);
        super::run(2, &|t, n| {
            members.fetch_add(1, Ordering::Relaxed);
            for i in (t..100).step_by(n) {
                hits[i].fetch_add(1, Ordering::Relaxed);
            }
        });
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        assert!((1..=2).contains(&members.load(Ordering::Relaxed)));
        let one = AtomicUsize::new(0);
        super::run(1, &|t, n| {
            assert_eq!((t, n), (0, 1));
            one.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(one.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_panicking_member_becomes_a_panic_of_the_caller() {
        let _turn = crate::models::TORCH.lock().unwrap_or_else(|e| e.into_inner());
        tch::set_num_threads(2);
        let r = std::panic::catch_unwind(|| super::run(2, &|t, _| assert!(t > 5, "member {t}")));
        assert!(r.is_err());
    }
}
