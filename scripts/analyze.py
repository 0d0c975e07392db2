"""Mechanism analyses with plots: paper 000's embedding interventions, paper 003's guidance
magnitude, paper 002's overestimation, paper 004's locality. Each writes OUT/<analysis>.json,
PNG plots and OUT/<analysis>.md; OUT/index.md links them.

    python scripts/analyze.py guidance overestimation          # the cached testbed, its recipe
    python scripts/analyze.py all --report_to wandb             # every analysis, plots to W&B too
    python scripts/analyze.py locality --model /path/to/sd-v1-4 --manifest M.jsonl --non_memorized N.jsonl
"""

import sys

from memtrain.core.cli import config_from_cli, run_main
from memtrain.eval.analyses.run import AnalyzeConfig, analyze
from memtrain.testbed.resolver import resolve_model


@run_main
def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    # the analyses come first, positionally: `analyze.py guidance overestimation --model M`
    names = []
    while argv and not argv[0].startswith("-"):
        names.append(argv.pop(0))
    if names:
        argv = ["--analysis", *names, *argv]
    cfg = config_from_cli(AnalyzeConfig, __doc__, argv)
    results = analyze(cfg, resolve_model(cfg.model, progress=cfg.progress))
    if cfg.runtime.plan:
        print(results["plan"]["plan_text"])
        return
    for name, doc in results.items():
        print(f"{name:<15} {doc['seconds']:.0f} s")
    if results:
        print(f"wrote {next(iter(results.values()))['output_dir']}")


if __name__ == "__main__":
    main()
