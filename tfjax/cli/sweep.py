"""tfjax-sweep: train and evaluate every run of a sweep, then one table and plots.

  tfjax-sweep --config=configs/sweep_tiny.py --workdir=/tmp/sweep
  tfjax-sweep --config=configs/sweep_tiny.py --workdir=/tmp/sweep --list
  tfjax-sweep --config=configs/sweep_tiny.py --workdir=/tmp/sweep --only=chameleon-xs-300K
  tfjax-sweep --config=configs/sweep_tiny.py --workdir=/tmp/sweep --report_only
  tfjax-sweep --config=configs/science_gpu/compare.py --workdir=/tmp/compare --report_only \
      --results_dir=benchmarks/science_gpu/runs/compare

Writes WORKDIR/results.md, results.json and plots/METRIC.png (log-log metric
vs training FLOPs with power-law fits per family, the parity-FLOP ratios of
the sweep's `parity` pairs). Sweep configs: configs/sweep_tiny.py,
configs/ablations/*.py.
Each finished run is stored as RESULTS_DIR/RUN.json (default WORKDIR/results);
a stored run is not run again, and the report is built from stored runs
only. An interrupted run resumes from its checkpoint.
"""
from __future__ import annotations

import logging

from absl import flags
from ml_collections import config_flags

from tfjax.cli.common import check_workdir, quiet_orbax, run
from tfjax.train.preemption import StopSignals

config_flags.DEFINE_config_file("config", None, "Sweep config file (configs/sweep_*.py); "
                                "override keys with --config.key=value.", lock_config=False)
flags.DEFINE_string("workdir", None, "Sweep directory: runs/, shared/, results, plots.")
flags.DEFINE_list("only", [], "Run only these run names now (the report covers all finished).")
flags.DEFINE_bool("report_only", False, "Train nothing; rebuild the report from finished runs.")
flags.DEFINE_bool("list", False, "Print the planned runs (steps, tokens, FLOPs, estimated "
                  "seconds) and exit.")
flags.DEFINE_list("results_dir", [], "Directories of stored run results (RUN.json): new runs "
                  "are written to the first, runs stored in any are skipped. Default "
                  "WORKDIR/results.")
flags.DEFINE_float("time_budget_s", None, "Start no run after this many seconds, nor one whose "
                   "estimate (sweep key timing) does not fit in what is left.")
flags.DEFINE_bool("keep_going", False, "Log a run that fails and go on to the next (the "
                  "failed runs are listed at the end); default: the error ends the sweep.")
flags.DEFINE_float("reserve_s", 120.0, "With --time_budget_s: start no run once fewer seconds "
                   "than this are left.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def _run(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  # Local: JAX loads after the flags parse (--help answers at once).
  from tfjax.jobs import sweep as runner
  quiet_orbax()
  if FLAGS.list:
    runs = runner.plan(FLAGS.config)
    for r in runs:
      est = "-" if r.est_seconds is None else f"{r.est_seconds:.0f}"
      print(f"{r.name:<40} steps={r.steps:<7} tokens={r.tokens:<11} N={r.params:<11} "
            f"flops={r.flops:.3g} est_s={est}")
    known = [r.est_seconds for r in runs if r.est_seconds is not None]
    print(f"{len(runs)} runs; estimated seconds {sum(known):.0f} ({len(known)} estimated)")
    return
  check_workdir(FLAGS.workdir)
  with StopSignals(defer=False):  # a signal outside training stops at once (exit 75)
    report = runner.run_sweep(FLAGS.config, FLAGS.workdir, only=FLAGS.only,
                              report_only=FLAGS.report_only, results_dirs=FLAGS.results_dir,
                              time_budget_s=FLAGS.time_budget_s, reserve_s=FLAGS.reserve_s,
                              keep_going=FLAGS.keep_going)
  logging.info("sweep: %d runs reported in %s/results.md; parity %s", len(report["runs"]),
               FLAGS.workdir, report["parity"])
  if report["failed"]:
    raise SystemExit(f"sweep: runs failed: {report['failed']} (the log has their tracebacks)")


def main():
  run(_run, __name__)


if __name__ == "__main__":
  main()
