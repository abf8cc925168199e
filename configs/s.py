"""SwiftFormer-S on ImageNet-1k, the official recipe (paper: 78.5% top-1, 6.1M params, 1.0 GMACs).

  python main.py --config=configs/s.py --workdir=DIR --config.data_dir=TFDS_DIR

Differs from default.py (the shared recipe, which is already S's): no mixup/cutmix.
The official run distils from DeiT's RegNetY-160 (hard, alpha 0.5), the default teacher
`checkpoints/regnety_160` (default.py): download
https://dl.fbaipublicfiles.com/deit/regnety_160-a5fe301d.pth and import it once with
`python -m swiftformer_jax.convert import --checkpoint regnety_160-a5fe301d.pth --output
checkpoints/regnety_160`; or give another teacher (--config.distillation.teacher=PATH), or add
--config.distillation.kind=none (the paper's 78.5% is with distillation; expect somewhat less
without). 300 epochs at global batch 2048.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model.variant = "S"
    config.mixup.mixup_alpha = 0.0
    config.mixup.cutmix_alpha = 0.0
    return config
