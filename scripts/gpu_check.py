"""The prepared GPU check (docs/gpu.md): the SD v1.4-shaped fixture at 512 px, generation against
diffusers' pipeline, the attack against a matmul, fine-tuning s/image and a small half-precision
audit, in one run; OUT/gpu_check.json.

    python scripts/gpu_check.py --output_dir runs/gpu_check

`python scripts/gpu_check.py --help` lists every flag with its default.
"""

from memtrain.commands import standalone
from memtrain.commands.bench import GPU_CHECK

main = standalone(GPU_CHECK)

if __name__ == "__main__":
    main()
