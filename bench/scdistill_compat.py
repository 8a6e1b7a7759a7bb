"""Lets scDistill 0.3.1 (PyPI) run on harmonypy 2.1.0; imported by the peer scripts.

scDistill 0.3.1's HarmonyTeacher does `harmonypy.run_harmony(...).Z_corr.T`, assuming
harmonypy < 2's d x N layout; 2.x returns N x d. `patch_harmonypy_layout()` wraps
run_harmony (looked up on the module at call time) so that Z_corr comes back d x N.
"""
import numpy as np


class _OldLayout:
    def __init__(self, ho, n_cells):
        self._ho, self._n = ho, n_cells

    def __getattr__(self, name):
        return getattr(self._ho, name)

    @property
    def Z_corr(self):
        z = np.asarray(self._ho.Z_corr)
        return z.T if z.shape[0] == self._n else z


def patch_harmonypy_layout():
    import harmonypy

    if getattr(harmonypy.run_harmony, "_old_layout", False):
        return
    run = harmonypy.run_harmony

    def run_harmony_old_layout(data_mat, meta_data, *args, **kwargs):
        return _OldLayout(run(data_mat, meta_data, *args, **kwargs), meta_data.shape[0])

    run_harmony_old_layout._old_layout = True
    harmonypy.run_harmony = run_harmony_old_layout
