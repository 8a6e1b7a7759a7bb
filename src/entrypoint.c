// Registration of the Rust routines. The call into the Rust static library
// also keeps the linker from dropping it.
void R_init_scdistill_extendr(void *dll);
void register_extendr_panic_hook(void);

void R_init_scdistill(void *dll) {
    register_extendr_panic_hook();
    R_init_scdistill_extendr(dll);
}
