"""Detection benchmark: the papers' memorization detectors (Wen's first-step magnitude and its mean
over all steps, Ren's attention entropy, NeMo's first-step SSIM, paper 003's transition point,
paper 002's overestimation) on memorized against non-memorized prompts. Writes OUT/detect.json (AUC, TPR at 1% FPR, seconds per prompt, every
score), OUT/detect.md, OUT/roc.png.

    python scripts/detect.py                      # the cached testbed: memorized vs unique prompts
    python scripts/detect.py --model /path/to/sd-v1-4 --memorized M.jsonl --non_memorized N.jsonl
"""

from memtrain.core.cli import config_from_cli, run_main
from memtrain.eval.detect_run import DetectConfig, detect
from memtrain.testbed.resolver import resolve_model


@run_main
def main(argv=None) -> None:
    cfg = config_from_cli(DetectConfig, __doc__, argv)
    doc = detect(cfg, resolve_model(cfg.model, progress=cfg.progress))
    if cfg.runtime.plan:
        print(doc["plan_text"])
        return
    for name, r in doc["detectors"].items():
        print(f"{name:<17} AUC {r['auc']:.3f}  TPR@1%FPR {r['tpr_at_1pct_fpr']:.2f}  {r['seconds_per_prompt']:.2f} s/prompt")
    print(f"wrote {doc['output_dir']}")


if __name__ == "__main__":
    main()
