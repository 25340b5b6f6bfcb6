"""The method packages. Importing this package registers every recipe and component, and plugs in
the toy world (its model and data sources and lm-eval tasks).

`runner` never imports a recipe module by name; `runner.registry` imports this package on its first
lookup.
"""

import runner.toy  # noqa: F401  (the toy world's sources and tasks)
from recipes import (  # noqa: F401
    distill,
    merge,
    mtp_d,
    noise_eval,
    quantize,
    realign,
    sft,
    sft_mask,
    shadow_ft,
)
