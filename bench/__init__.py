"""rlcore's benchmark suite: ``python -m bench`` from the repository root.

Modules, bottom up:
    shapes     the registry of LM heads (name -> H, V) and the token counts N run on each device
    env        device name and slug, versions, git commit, date: the metadata every result row carries
    harness    timing (CUDA: ``triton.testing.do_bench``; CPU: ``time.perf_counter``) and peak memory
    cases      what is measured ("fwd", "fwd_bwd", "loss_gspo", "loss_cispo", "loss_apo"): inputs, the call, its
               bare-GEMM floor, its float64 ground truth
    providers  who computes it ("reference", "compile", "rlcore-torch", "rlcore-1pass", "rlcore-triton",
               "gemm-floor"), each able to say why it is unavailable or does not apply to a case
    runner     the loop over cases x shapes x dtypes x N x providers, producing one row per measurement
    report     the terminal table, and the JSON and CSV files
    cli        the command line

Every row is self-describing (device, versions, commit, date, FLOP convention), so later tools (plots, a compare
script, peer providers) read the files without this package's state.
"""
