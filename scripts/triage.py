"""Triage a release on a model: which prompts replicate their training image (max SSCD_Orig over
the seeds > 0.7)? Writes the evaluation (metrics.json, report.md, grids) plus
OUT/replicating.jsonl, OUT/non_replicating.jsonl, OUT/duplicates.json, OUT/triage.json, OUT/triage.md.

    python scripts/fetch_images.py sdv1_500_memorized.jsonl --output_dir wen500
    accelerate launch scripts/triage.py wen500 --model /path/to/sd-v1-4 --output_dir triage/wen500

RELEASE: a manifest with local images, or a fetch_images output folder. Resumable: a killed run
continues with --resume (same command line). Sampler overrides as in scripts/evaluate.py.
"""

import argparse
import dataclasses

from memtrain.core.cli import add_dataclass_arguments, dataclass_from_namespace, run_main
from memtrain.core.run import is_main_process
from memtrain.eval.evaluate import EvaluateConfig
from memtrain.eval.triage import release_manifest, triage
from memtrain.testbed.resolver import resolve_model


@run_main
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     argument_default=dataclasses.MISSING)
    parser.add_argument("release", help="manifest with local images, or a fetch_images.py output folder")
    parser.add_argument("--duplicate_threshold", type=float, default=None,
                        help="SSCD between two training images that flags them as near-duplicates (default: --threshold)")
    add_dataclass_arguments(parser, EvaluateConfig, skip=("manifest",))
    values = vars(parser.parse_args(argv))
    cfg = dataclass_from_namespace(EvaluateConfig, values)
    release_manifest(values["release"])  # a URL-only release fails now, before any model is built
    result = triage(cfg, values["release"], resolve_model(cfg.model, progress=cfg.progress),
                    duplicate_threshold=values["duplicate_threshold"])
    if is_main_process() and cfg.runtime.plan:
        print(result["plan_text"])
    elif is_main_process():
        print(f"{result['n_replicating']} of {result['n_evaluated']} prompts replicate; "
              f"manifests in {result['output_dir']}")


if __name__ == "__main__":
    main()
