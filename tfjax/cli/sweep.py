"""tfjax-sweep: train and evaluate every run of a sweep, then one table and plots.

  tfjax-sweep --config=configs/sweep_tiny.py --workdir=/tmp/sweep
  tfjax-sweep --config=configs/sweep_tiny.py --workdir=/tmp/sweep --list
  tfjax-sweep --config=configs/sweep_tiny.py --workdir=/tmp/sweep --only=chameleon-xs-300K
  tfjax-sweep --config=configs/sweep_tiny.py --workdir=/tmp/sweep --report_only

Writes WORKDIR/results.md, results.json and plots/METRIC.png (log-log metric
vs training FLOPs with power-law fits per family, the parity-FLOP ratios of
the sweep's `parity` pairs). Sweep configs: configs/sweep_tiny.py,
configs/ablations/*.py.
Finished runs are reused; an interrupted run resumes from its checkpoint.
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
flags.DEFINE_bool("list", False, "Print the planned runs (steps, tokens, FLOPs) and exit.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def _run(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  # Local: JAX loads after the flags parse (--help answers at once).
  from tfjax.jobs import sweep as runner
  quiet_orbax()
  if FLAGS.list:
    for r in runner.plan(FLAGS.config):
      print(f"{r.name:<40} steps={r.steps:<7} tokens={r.tokens:<11} N={r.params:<11} "
            f"flops={r.flops:.3g}")
    return
  check_workdir(FLAGS.workdir)
  with StopSignals(defer=False):  # a signal outside training stops at once (exit 75)
    report = runner.run_sweep(FLAGS.config, FLAGS.workdir, only=FLAGS.only,
                              report_only=FLAGS.report_only)
  logging.info("sweep: %d runs reported in %s/results.md; parity %s", len(report["runs"]),
               FLAGS.workdir, report["parity"])


def main():
  run(_run, __name__)


if __name__ == "__main__":
  main()
