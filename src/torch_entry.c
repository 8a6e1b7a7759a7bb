// Init of scdistill_torch.so (the Rust core and libtorch), called by the
// loader in entrypoint.c: registers the Rust routines for the package. The
// calls also keep the linker from dropping the Rust static library.
void R_init_scdistill_extendr(void *dll);
void register_extendr_panic_hook(void);

void scdistill_torch_init(void *dll) {
    register_extendr_panic_hook();
    R_init_scdistill_extendr(dll);
}
