//! Counts that stay on disk (HDF5: an AnnData `.h5ad` file, a 10x / TENx
//! `.h5` group, a dense HDF5 dataset), read in blocks of cells.
//!
//! Training streams them: the cells are cut into blocks of consecutive
//! cells (the unit of the train/validation split and of shuffling); each
//! epoch visits the training blocks in a seeded random order, in windows of
//! several blocks whose cells are shuffled together, while a reader thread
//! reads the next window (at most three windows are in memory at once).
//! Everything else reads the cells it is asked for, in runs of consecutive
//! cells. Only per-cell numbers (library sizes) and the sparse layout's row
//! offsets are held for the whole matrix.

use super::csr::Csr;
use super::h5::H5Reader;
use crate::error::{invalid, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};

/// Where the cells × genes matrix lies in the file.
#[derive(Debug, Clone, PartialEq)]
pub enum Layout {
    /// Row-compressed with cells as rows: AnnData's `csr_matrix`, or a 10x /
    /// TENx group (column-compressed genes × cells, the same arrays).
    Sparse { data: String, indices: String, indptr: String },
    /// A dense 2-D dataset whose rows are cells (HDF5Array's `HDF5Matrix`
    /// of genes × cells is stored this way).
    Dense { dataset: String },
}

/// The largest value a count may take (exact in an `f32`).
const MAX_EXACT_COUNT: f32 = 16_777_216.0;

/// Cells read at once when scanning the whole matrix.
const SCAN_CELLS: usize = 16_384;

/// Stored values a streamed window holds at most (beyond its 16 blocks):
/// 2^25 values, 256 MB as indices and counts.
const WINDOW_VALUES: usize = 1 << 25;

struct Inner {
    reader: H5Reader,
    layout: Layout,
    n_rows: usize,
    /// Genes in the file.
    n_file_cols: usize,
    /// Row offsets of the sparse layout (empty for a dense one).
    indptr: Vec<u64>,
    /// File columns kept, in their new order (None: all, as stored).
    keep: Option<Vec<usize>>,
    n_cols: usize,
}

/// Per-cell totals from one pass over the file.
#[derive(Debug, Clone, Default)]
pub struct Scan {
    pub row_sums: Vec<f64>,
    /// Σ log(x!) of each cell's counts (the likelihoods' constant).
    pub log_factorial: Vec<f32>,
    /// Cells in which each kept gene is detected.
    pub gene_cells: Vec<u64>,
    pub nnz: u64,
}

/// Cells on disk as a model reads them: the matrix, the file's gene names,
/// and the cells' covariates as in `models::Cells` (batch labels, further
/// categorical covariates in the model's order, continuous ones).
pub struct DiskCells {
    pub disk: DiskCsr,
    pub genes: Vec<String>,
    pub batch: Option<Vec<String>>,
    pub categorical: Vec<Option<Vec<String>>>,
    pub continuous: Vec<Vec<f32>>,
}

/// An on-disk count matrix, cells × genes.
pub struct DiskCsr {
    inner: Arc<Inner>,
    /// Cells per block.
    pub block: usize,
    /// Blocks per streamed window.
    pub window_blocks: usize,
    stream: Mutex<Option<Stream>>,
    /// The last rows `read_rows_cached` read, with their matrix.
    last: Mutex<Option<(Vec<usize>, Arc<Csr>)>>,
    /// The next epoch's first window, read ahead by the reader thread
    /// (its cells in order, and what the read gave).
    ahead: Mutex<Option<(Vec<usize>, Receiver<Result<Window>>)>>,
    /// The next epoch's plan, made for the read-ahead and kept for it.
    planned: Mutex<Option<Planned>>,
}

/// An epoch's plan (see `DiskCsr::plan`) with what it was made for.
struct Planned {
    rows: Vec<usize>,
    seed: u64,
    ranks: Option<(usize, usize)>,
    window_blocks: usize,
    order: Vec<usize>,
    windows: Vec<Vec<usize>>,
}

impl std::fmt::Debug for DiskCsr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DiskCsr({} x {}, '{}')", self.inner.n_rows, self.inner.n_cols, self.inner.reader.path())
    }
}

impl Inner {
    fn path(&self) -> &str {
        self.reader.path()
    }

    /// Rows `start..end`, with the kept columns, checked.
    fn read_range(&self, start: usize, end: usize) -> Result<Csr> {
        let n = end - start;
        let mut m = match &self.layout {
            Layout::Sparse { data, indices, indptr: _ } => {
                let (lo, hi) = (self.indptr[start], self.indptr[end]);
                let values: Vec<f32> = self.reader.read_1d(data, lo, hi - lo)?;
                let idx: Vec<u32> = self.reader.read_1d(indices, lo, hi - lo)?;
                let ptr: Vec<usize> = self.indptr[start..=end].iter().map(|&p| (p - lo) as usize).collect();
                let mut m = Csr { n_rows: n, n_cols: self.n_file_cols, indptr: ptr, indices: idx, values };
                self.tidy(&mut m, start)?;
                m
            }
            Layout::Dense { dataset } => {
                let g = self.n_file_cols;
                let dense: Vec<f32> = self.reader.read_rows_2d(dataset, start as u64, n as u64, g as u64)?;
                let rows: Vec<(Vec<u32>, Vec<f32>)> = (0..n)
                    .map(|r| {
                        let row = &dense[r * g..(r + 1) * g];
                        row.iter().enumerate().filter(|(_, &v)| v != 0.0).map(|(j, &v)| (j as u32, v)).unzip()
                    })
                    .collect();
                Csr::from_rows(rows, g)
            }
        };
        self.check_values(&m, start)?;
        if let Some(keep) = &self.keep {
            m = m.select_columns(keep);
        }
        Ok(m)
    }

    /// Column indices in range, ascending within each row (scipy allows
    /// unsorted ones: they are sorted; a duplicate is an error), explicit
    /// zeros dropped.
    fn tidy(&self, m: &mut Csr, first: usize) -> Result<()> {
        let g = self.n_file_cols as u32;
        if let Some(k) = m.indices.iter().position(|&j| j >= g) {
            let r = m.indptr.partition_point(|&p| p <= k) - 1;
            return invalid!(
                "'{}': cell {} has gene index {} but the matrix has {} genes; the file is damaged",
                self.path(),
                first + r + 1,
                m.indices[k],
                g
            );
        }
        let sorted = (0..m.n_rows).all(|r| m.row(r).0.windows(2).all(|w| w[0] < w[1]));
        let zeros = m.values.contains(&0.0);
        if sorted && !zeros {
            return Ok(());
        }
        let mut rows = Vec::with_capacity(m.n_rows);
        for r in 0..m.n_rows {
            let (idx, val) = m.row(r);
            let mut pairs: Vec<(u32, f32)> =
                idx.iter().copied().zip(val.iter().copied()).filter(|p| p.1 != 0.0).collect();
            pairs.sort_unstable_by_key(|p| p.0);
            if pairs.windows(2).any(|w| w[0].0 == w[1].0) {
                return invalid!("'{}': cell {} lists a gene twice; the file is damaged", self.path(), first + r + 1);
            }
            rows.push(pairs.into_iter().unzip());
        }
        *m = Csr::from_rows(rows, m.n_cols);
        Ok(())
    }

    /// The in-memory matrix's rules (finite, ≥ 0, whole, exact in f32),
    /// naming the file and the cell.
    fn check_values(&self, m: &Csr, first: usize) -> Result<()> {
        let rules: [(&dyn Fn(f32) -> bool, &str); 4] = [
            (&|v: f32| v.is_finite(), "an NA/NaN/Inf value; counts must be finite"),
            (&|v: f32| v >= 0.0, "a negative value; counts must be >= 0"),
            (&|v: f32| v.fract() == 0.0, "a non-integer value; pass raw counts, not normalized or log values"),
            (&|v: f32| v <= MAX_EXACT_COUNT, "a count above the supported maximum of 16,777,216"),
        ];
        for (ok, what) in rules {
            if let Some(k) = m.values.iter().position(|&v| !ok(v)) {
                let r = m.indptr.partition_point(|&p| p <= k) - 1;
                return invalid!("'{}': cell {} has {what} ({})", self.path(), first + r + 1, m.values[k]);
            }
        }
        Ok(())
    }
}

impl DiskCsr {
    /// Opens the matrix of `n_cells` × `n_genes` (as the caller read them
    /// from the file's metadata) and checks the layout against them.
    pub fn open(path: &str, layout: Layout, n_cells: usize, n_genes: usize) -> Result<DiskCsr> {
        let reader = H5Reader::open(path)?;
        let need = |ds: &str, what: &str| -> Result<Vec<u64>> {
            if !reader.exists(ds)? {
                return invalid!("'{path}' has no dataset '{ds}' ({what})");
            }
            let (dims, numeric) = reader.shape(ds)?;
            if !numeric {
                return invalid!("'{path}': '{ds}' ({what}) does not hold numbers");
            }
            Ok(dims)
        };
        let indptr = match &layout {
            Layout::Sparse { data, indices, indptr } => {
                let (d, i, p) =
                    (need(data, "the counts")?, need(indices, "the gene indices")?, need(indptr, "the cell offsets")?);
                if p != [n_cells as u64 + 1] {
                    return invalid!(
                        "'{path}': '{indptr}' has {p:?} entries for {n_cells} cells (expected {})",
                        n_cells + 1
                    );
                }
                if d.len() != 1 || d != i {
                    return invalid!("'{path}': '{data}' ({d:?}) and '{indices}' ({i:?}) differ in length");
                }
                let ptr: Vec<u64> = reader.read_1d(indptr, 0, n_cells as u64 + 1)?;
                if ptr[0] != 0 || ptr.windows(2).any(|w| w[0] > w[1]) || ptr[n_cells] != d[0] {
                    return invalid!("'{path}': '{indptr}' is not a valid offset array for {} stored values", d[0]);
                }
                ptr
            }
            Layout::Dense { dataset } => {
                let d = need(dataset, "the counts")?;
                if d != [n_cells as u64, n_genes as u64] {
                    return invalid!("'{path}': '{dataset}' is {d:?}; expected cells x genes = [{n_cells}, {n_genes}]");
                }
                vec![]
            }
        };
        if n_cells == 0 || n_genes == 0 {
            return invalid!("'{path}' holds a {n_cells} x {n_genes} matrix: there is nothing to fit");
        }
        let inner =
            Inner { reader, layout, n_rows: n_cells, n_file_cols: n_genes, indptr, keep: None, n_cols: n_genes };
        // Blocks: ~1,000 per data set, 16 to 1,024 cells each; windows of
        // about 32,768 cells (at least 16 blocks) are shuffled together, fewer
        // when the cells hold enough values (ATAC peaks; a dense layout reads
        // every gene) for a window to pass WINDOW_VALUES.
        let block = n_cells.div_ceil(1000).clamp(16, 1024);
        let per_cell = inner.indptr.last().map_or(n_genes as f64, |&nnz| nnz as f64 / n_cells as f64).max(1.0);
        let window_cells = ((WINDOW_VALUES as f64 / per_cell) as usize).min(32_768);
        let window_blocks = (window_cells / block).max(16);
        Ok(DiskCsr {
            inner: Arc::new(inner),
            block,
            window_blocks,
            stream: Mutex::new(None),
            last: Mutex::new(None),
            ahead: Mutex::new(None),
            planned: Mutex::new(None),
        })
    }

    /// Makes matrices of the same cells (the modalities of paired data)
    /// stream in step: the smallest window any of them has, for all.
    pub fn in_step(disks: &mut [DiskCsr]) -> Result<()> {
        let Some(first) = disks.first() else { return Ok(()) };
        let (n, block) = (first.n_rows(), first.block);
        if let Some(d) = disks.iter().find(|d| d.n_rows() != n) {
            return invalid!("'{}' has {} cells where '{}' has {n}", d.path(), d.n_rows(), first.path());
        }
        debug_assert!(disks.iter().all(|d| d.block == block), "blocks depend on the number of cells only");
        let w = disks.iter().map(|d| d.window_blocks).min().unwrap_or(16);
        disks.iter_mut().for_each(|d| d.window_blocks = w);
        Ok(())
    }

    /// Keeps only the columns `keep` (in that order) of the genes it has
    /// now (a second selection applies to the first's result).
    pub fn select_columns(mut self, keep: Vec<usize>) -> Result<DiskCsr> {
        let inner = Arc::get_mut(&mut self.inner).expect("no reader is running");
        if let Some(&bad) = keep.iter().find(|&&j| j >= inner.n_cols) {
            return invalid!("gene column {bad} is outside the {} genes", inner.n_cols);
        }
        let keep = match &inner.keep {
            Some(old) => keep.iter().map(|&j| old[j]).collect(),
            None => keep,
        };
        inner.n_cols = keep.len();
        inner.keep = Some(keep);
        *self.last.get_mut().unwrap_or_else(|e| e.into_inner()) = None;
        *self.ahead.get_mut().unwrap_or_else(|e| e.into_inner()) = None;
        *self.planned.get_mut().unwrap_or_else(|e| e.into_inner()) = None;
        Ok(self)
    }

    pub fn n_rows(&self) -> usize {
        self.inner.n_rows
    }

    pub fn n_cols(&self) -> usize {
        self.inner.n_cols
    }

    pub fn path(&self) -> &str {
        self.inner.path()
    }

    /// Rows `start..end`.
    pub fn read_range(&self, start: usize, end: usize) -> Result<Csr> {
        if start > end || end > self.inner.n_rows {
            return invalid!("cells {start}..{end} of {}", self.inner.n_rows);
        }
        self.inner.read_range(start, end)
    }

    /// The rows `rows` (any order, repeats allowed), read in runs of
    /// consecutive cells.
    pub fn read_rows(&self, rows: &[usize]) -> Result<Csr> {
        let mut sorted: Vec<usize> = rows.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        if let Some(&r) = sorted.last() {
            if r >= self.inner.n_rows {
                return invalid!("cell {r} of {}", self.inner.n_rows);
            }
        }
        // Runs of cells at most 32 apart are read as one range.
        let mut at: HashMap<usize, (usize, usize)> = HashMap::with_capacity(sorted.len());
        let mut parts = vec![];
        let mut k = 0;
        while k < sorted.len() {
            let mut e = k;
            while e + 1 < sorted.len() && sorted[e + 1] - sorted[e] <= 32 {
                e += 1;
            }
            let (start, end) = (sorted[k], sorted[e] + 1);
            let part = self.inner.read_range(start, end)?;
            for &r in &sorted[k..=e] {
                at.insert(r, (parts.len(), r - start));
            }
            parts.push(part);
            k = e + 1;
        }
        let out = rows
            .iter()
            .map(|r| {
                let (p, local) = at[r];
                let (i, v) = parts[p].row(local);
                (i.to_vec(), v.to_vec())
            })
            .collect();
        Ok(Csr::from_rows(out, self.inner.n_cols))
    }

    /// `read_rows`, remembering the last answer: passes that ask for one
    /// chunk of cells several times in a row (a forward pass per decoding
    /// batch or per dropout draw) read it once.
    pub fn read_rows_cached(&self, rows: &[usize]) -> Result<Arc<Csr>> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((r, m)) = last.as_ref() {
            if r == rows {
                return Ok(m.clone());
            }
        }
        let m = Arc::new(self.read_rows(rows)?);
        *last = Some((rows.to_vec(), m.clone()));
        Ok(m)
    }

    /// One pass over every cell: library sizes, Σ log x!, detections per
    /// gene; values are checked on the way. `progress(done, total)` after
    /// each part; `interrupted()` stops the pass with an error.
    pub fn scan(&self, progress: &dyn Fn(usize, usize), interrupted: &dyn Fn() -> bool) -> Result<Scan> {
        let n = self.inner.n_rows;
        let mut s = Scan { gene_cells: vec![0; self.inner.n_cols], ..Default::default() };
        s.row_sums.reserve(n);
        s.log_factorial.reserve(n);
        for start in (0..n).step_by(SCAN_CELLS) {
            if interrupted() {
                return Err(crate::error::Error::Interrupted);
            }
            let part = self.inner.read_range(start, (start + SCAN_CELLS).min(n))?;
            s.row_sums.extend(part.row_sums());
            s.log_factorial.extend(crate::models::log_factorial(&part));
            for &j in &part.indices {
                s.gene_cells[j as usize] += 1;
            }
            s.nnz += part.nnz() as u64;
            progress((start + SCAN_CELLS).min(n), n);
        }
        Ok(s)
    }

    /// The block holding cell `r`.
    fn block_of(&self, r: usize) -> usize {
        r / self.block
    }

    /// The train/validation split by whole blocks (a seeded choice of
    /// `ceil(fraction · blocks)` blocks is held out), each side sorted.
    pub fn split(&self, validation_fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
        let n = self.inner.n_rows;
        let n_blocks = n.div_ceil(self.block);
        let (_, val_blocks) = super::train_validation_split(n_blocks, validation_fraction, seed);
        let mut held = vec![false; n_blocks];
        for b in val_blocks {
            held[b] = true;
        }
        (0..n).partition(|&r| !held[self.block_of(r)])
    }

    /// An epoch's order of `rows`: their blocks in a seeded random order,
    /// in windows of `window_blocks` blocks whose cells are shuffled
    /// together. Starts the reader thread on those windows.
    ///
    /// With `ranks = Some((rank, world))` (data-parallel training) the
    /// shuffled blocks are dealt to the ranks in turn, each rank's in its
    /// own windows, and the order deals the ranks' cells in turn (cell p to
    /// rank p mod world, as the training loop splits minibatches); a few
    /// cells move between ranks so that their shares differ by at most one.
    /// The order is the same on every rank; each reads only its own windows.
    ///
    /// While the last window of the epoch is trained on, the reader goes on
    /// to the first window of the next epoch (the same rows with seed + 1,
    /// as the training loop asks for them): an epoch need not wait for its
    /// first read.
    pub fn epoch_order(&self, rows: &[usize], seed: u64, ranks: Option<(usize, usize)>) -> Vec<usize> {
        let mut planned = self.planned.lock().unwrap_or_else(|e| e.into_inner());
        let made_for = |p: &Planned, seed: u64| {
            p.seed == seed && p.ranks == ranks && p.window_blocks == self.window_blocks && p.rows == rows
        };
        let (order, windows) = match planned.take() {
            Some(p) if made_for(&p, seed) => (p.order, p.windows),
            _ => self.plan(rows, seed, ranks),
        };
        let next_seed = seed.wrapping_add(1);
        let (next_order, next_windows) = self.plan(rows, next_seed, ranks);
        self.start_stream(windows, next_windows.first().cloned());
        *planned = Some(Planned {
            rows: rows.to_vec(),
            seed: next_seed,
            ranks,
            window_blocks: self.window_blocks,
            order: next_order,
            windows: next_windows,
        });
        order
    }

    /// An epoch's order of `rows` and this rank's windows of cells (see
    /// `epoch_order`).
    fn plan(&self, rows: &[usize], seed: u64, ranks: Option<(usize, usize)>) -> (Vec<usize>, Vec<Vec<usize>>) {
        let (rank, world) = ranks.unwrap_or((0, 1));
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut sorted = rows.to_vec();
        sorted.sort_unstable();
        let mut blocks: Vec<(usize, Vec<usize>)> = vec![];
        for &r in &sorted {
            let b = self.block_of(r);
            match blocks.last_mut() {
                Some((lb, v)) if *lb == b => v.push(r),
                _ => blocks.push((b, vec![r])),
            }
        }
        blocks.shuffle(&mut rng);
        let mut streams: Vec<Vec<usize>> = vec![Vec::new(); world];
        let mut windows: Vec<Vec<(usize, usize)>> = vec![Vec::new(); world];
        for r in 0..world {
            let mine: Vec<&(usize, Vec<usize>)> = blocks.iter().skip(r).step_by(world).collect();
            for w in mine.chunks(self.window_blocks) {
                let mut cells: Vec<usize> = w.iter().flat_map(|(_, v)| v.iter().copied()).collect();
                let start = streams[r].len();
                cells.shuffle(&mut rng);
                streams[r].extend_from_slice(&cells);
                windows[r].push((start, streams[r].len()));
            }
        }
        let cells_of = |order: &[usize], w: &[(usize, usize)]| -> Vec<Vec<usize>> {
            w.iter().map(|&(s, e)| order[s..e].to_vec()).collect()
        };
        if world == 1 {
            let order = streams.pop().unwrap_or_default();
            let windows = cells_of(&order, &windows[0]);
            return (order, windows);
        }
        // Even shares: the ends of the longer streams go to the shorter
        // (which read those cells directly, outside their windows).
        let n = rows.len();
        let share = |r: usize| n / world + usize::from(r < n % world);
        let mut moved = vec![];
        for (r, s) in streams.iter_mut().enumerate() {
            while s.len() > share(r) {
                moved.extend(s.pop());
            }
        }
        for (r, s) in streams.iter_mut().enumerate() {
            while s.len() < share(r) {
                s.extend(moved.pop());
            }
        }
        let mine = &streams[rank];
        let kept: Vec<(usize, usize)> =
            windows[rank].iter().map(|&(a, b)| (a, b.min(mine.len()))).filter(|&(a, b)| a < b).collect();
        let windows = cells_of(mine, &kept);
        ((0..n).map(|p| streams[p % world][p / world]).collect(), windows)
    }

    /// Starts the reader thread on `windows` (the cells of each, in order),
    /// then on `next`, the next epoch's first window, which it hands over
    /// through `ahead`. A first window read ahead is not read again.
    fn start_stream(&self, windows: Vec<Vec<usize>>, next: Option<Vec<usize>>) {
        let (tx, rx) = sync_channel::<Result<Window>>(1);
        let reader = DiskCsr {
            inner: Arc::clone(&self.inner),
            block: self.block,
            window_blocks: self.window_blocks,
            stream: Mutex::new(None),
            last: Mutex::new(None),
            ahead: Mutex::new(None),
            planned: Mutex::new(None),
        };
        let read = move |rows: &[usize]| {
            reader
                .read_rows(rows)
                .map(|m| Window { at: rows.iter().enumerate().map(|(k, &r)| (r, k)).collect(), rows: m })
        };
        // The previous epoch's read-ahead serves when it holds these cells
        // in this order (the same rows and seed); else it is dropped.
        let (ahead_tx, ahead_rx) = sync_channel::<Result<Window>>(1);
        let previous = {
            let mut slot = self.ahead.lock().unwrap_or_else(|e| e.into_inner());
            let previous = slot.take();
            *slot = next.as_ref().map(|cells| (cells.clone(), ahead_rx));
            previous
        };
        let ready = previous.and_then(|(cells, rx)| (Some(&cells) == windows.first()).then_some(rx));
        std::thread::spawn(move || {
            let mut windows = windows.into_iter();
            if let Some(Ok(w)) = ready.map(|rx| rx.recv()) {
                windows.next();
                if tx.send(w).is_err() {
                    return;
                }
            }
            for rows in windows {
                let got = read(&rows);
                let failed = got.is_err();
                // The receiver is gone when training stopped early.
                if tx.send(got).is_err() || failed {
                    return;
                }
            }
            if let Some(rows) = next {
                // Nobody waits when training has ended.
                let _ = ahead_tx.send(read(&rows));
            }
        });
        *self.lock_stream() = Some(Stream { rx, windows: vec![] });
    }

    fn lock_stream(&self) -> std::sync::MutexGuard<'_, Option<Stream>> {
        self.stream.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The rows `rows` of the current epoch's stream (in that order), taking
    /// windows from the reader as the order reaches them; rows outside the
    /// stream are read directly.
    pub fn fetch(&self, rows: &[usize]) -> Result<Csr> {
        let mut guard = self.lock_stream();
        let Some(stream) = guard.as_mut() else {
            drop(guard);
            return self.read_rows(rows);
        };
        let mut out = Vec::with_capacity(rows.len());
        for &r in rows {
            loop {
                if let Some((w, k)) = stream.windows.iter().find_map(|w| w.at.get(&r).map(|&k| (w, k))) {
                    let (i, v) = w.rows.row(k);
                    out.push((i.to_vec(), v.to_vec()));
                    break;
                }
                match stream.rx.recv() {
                    Ok(w) => {
                        // The order moves through windows one after another:
                        // two are enough to cover a minibatch that spans them.
                        if stream.windows.len() == 2 {
                            stream.windows.remove(0);
                        }
                        stream.windows.push(w?);
                    }
                    Err(_) => {
                        // Not in this epoch's stream: read it directly.
                        let m = self.read_rows(&[r])?;
                        let (i, v) = m.row(0);
                        out.push((i.to_vec(), v.to_vec()));
                        break;
                    }
                }
            }
        }
        Ok(Csr::from_rows(out, self.inner.n_cols))
    }

    /// Ends the current epoch's stream (the reader stops at its next send).
    pub fn end_stream(&self) {
        *self.lock_stream() = None;
        crate::device::release_free_memory();
    }
}

struct Window {
    /// Cell → its row in `rows`.
    at: HashMap<usize, usize>,
    rows: Csr,
}

struct Stream {
    rx: Receiver<Result<Window>>,
    windows: Vec<Window>,
}

/// Per-cell library sizes of an on-disk matrix as logs, as the in-memory
/// `VaeData` computes them.
pub fn log_libraries(scan: &Scan) -> Vec<f32> {
    scan.row_sums.par_iter().map(|&s| (s.max(1.0)).ln() as f32).collect()
}

#[cfg(test)]
#[path = "disk_tests.rs"]
mod tests;
