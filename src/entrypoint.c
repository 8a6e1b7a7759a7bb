// The package's own shared object is only a loader. The Rust core and
// libtorch live in scdistill_torch.so beside it, opened here with
// RTLD_DEEPBIND: libtorch carries its own BLAS (MKL) under the Fortran names
// (sgemm_, ...) that R's BLAS also exports, and without DEEPBIND libtorch's
// matrix products would bind to R's BLAS (on Debian the slow reference BLAS:
// training ten times slower). The routines are then registered for this
// package by the core's init function.
//
// Before that, the libtorch libraries named in SCDISTILL_LIBTORCH_LIB
// (colon-separated absolute paths, dependencies first; set by load_core() in
// R/libtorch.R) are opened, with the same flags. The core's references to
// libtorch (by soname: libtorch_cpu.so, libc10.so, ...) then bind to those
// already-loaded copies, whatever rpath the build recorded: a binary built on
// one machine runs against the libtorch install_libtorch() put on another.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>
#include <R.h>
#include <Rinternals.h>
#include <R_ext/Rdynload.h>

#ifndef RTLD_DEEPBIND
#define RTLD_DEEPBIND 0
#endif

static void preload_libtorch(void) {
    const char *list = getenv("SCDISTILL_LIBTORCH_LIB");
    if (!list || !*list) return;
    char path[4096];
    while (*list) {
        const char *end = strchr(list, ':');
        size_t len = end ? (size_t)(end - list) : strlen(list);
        if (len >= sizeof(path)) Rf_error("scdistill: libtorch path too long");
        memcpy(path, list, len);
        path[len] = '\0';
        if (len && !dlopen(path, RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND)) {
            Rf_error("scdistill: cannot load libtorch library %s: %s", path, dlerror());
        }
        list += len;
        if (*list == ':') list++;
    }
}

void R_init_scdistill(DllInfo *dll) {
    preload_libtorch();
    Dl_info self;
    if (!dladdr((void *)R_init_scdistill, &self) || !self.dli_fname) {
        Rf_error("scdistill: cannot locate its own shared object");
    }
    char path[4096];
    const char *slash = strrchr(self.dli_fname, '/');
    size_t dir_len = slash ? (size_t)(slash - self.dli_fname) : 0;
    if (dir_len + 32 > sizeof(path)) Rf_error("scdistill: installation path too long");
    memcpy(path, self.dli_fname, dir_len);
    snprintf(path + dir_len, sizeof(path) - dir_len, "%sscdistill_torch.so", dir_len ? "/" : "");
    void *core = dlopen(path, RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
    if (!core) Rf_error("scdistill: cannot load its libtorch core (%s): %s", path, dlerror());
    void (*init)(DllInfo *) = (void (*)(DllInfo *))dlsym(core, "scdistill_torch_init");
    if (!init) Rf_error("scdistill: %s has no init function", path);
    // The loader registers nothing itself (the core's init registers every
    // routine on this DllInfo); symbols are found by registration only.
    R_registerRoutines(dll, NULL, NULL, NULL, NULL);
    init(dll);
    R_useDynamicSymbols(dll, FALSE);
}
