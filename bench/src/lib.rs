//! Side-by-side benchmarks of Basalt against the baselines (fio, tgt, nbdkit, ...).
