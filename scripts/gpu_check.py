"""One prepared GPU check: on one CUDA GPU and no network, build the SD v1.4-shaped random-weight
fixture at 512 px and measure, in one run, generation against diffusers' pipeline (`ratio:`),
the attack's TFLOP/s against a large matmul, adversarial fine-tuning s/image and peak memory,
and a small audit (none pad_mask nemo, 4 targets x 4 seeds) in half precision. Writes
OUT/gpu_check.json (and OUT/logs/); see docs/gpu.md.

    python scripts/gpu_check.py --output_dir runs/gpu_check            # GPU: bf16 (fp16 without bf16)
    python scripts/gpu_check.py --device cpu --resolution 64 --output_dir OUT \\
        --steps 2 --attack_steps 1 --noise_samples 1 --finetune lora --finetune_steps 1 ...   # CPU try-out

The fixture (4 GB: SD's weights at any resolution) is built in OUT's scratch and deleted at the
end (--keep_work keeps it, --fixture DIR reuses a built one). Goals on an H100: ratio >= 1.3,
attack >= 40% of the matmul, all of it under 8 minutes.
"""

import argparse
import dataclasses

from memtrain.core.cli import add_dataclass_arguments, dataclass_from_namespace, run_main
from memtrain.core.runtime import RuntimeOptions
from memtrain.bench.gpu_check import CheckBudget, format_check, gpu_check


@run_main
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                argument_default=dataclasses.MISSING)
    p.add_argument("--output_dir", required=True, help="where gpu_check.json and logs/ go")
    p.add_argument("--overwrite", action="store_true", default=False, help="replace an existing output dir")
    p.add_argument("--fixture", default=None, help="an sd14 fixture folder built before (else one is built)")
    p.add_argument("--keep_work", action="store_true", default=False,
                   help="keep OUT/work (the fixture, the audit's output)")
    add_dataclass_arguments(p, RuntimeOptions, skip=("max_memory", "plan"))  # the check plans nothing
    for f in dataclasses.fields(CheckBudget):
        p.add_argument(f"--{f.name}", type=type(f.default), help=f"default {f.default}")
    a = vars(p.parse_args(argv))
    options = dataclass_from_namespace(RuntimeOptions, a)  # a bad --device/--dtype stops here
    budget = dataclass_from_namespace(CheckBudget, a)
    doc = gpu_check(a["output_dir"], options, budget, a["fixture"], a["overwrite"], a["keep_work"])
    print(format_check(doc))
    print(f"wrote {a['output_dir']}/gpu_check.json")


if __name__ == "__main__":
    main()
