//! `basalt-compute-vmm`: the VMM entry point on its own, for this crate's tests and
//! benchmarks (the `basalt` binary's `basalt vmm` subcommand calls the same
//! [`vmm_main`](basalt_compute::launch::vmm_main)).

fn main() {
    std::process::exit(basalt_compute::launch::vmm_main(
        std::env::args_os().skip(1),
    ));
}
