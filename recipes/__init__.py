"""The method packages. Importing this package registers every recipe and component.

`runner` never imports a recipe module by name; it imports this package and looks things up in
`runner.registry`.
"""

from recipes import (  # noqa: F401
    distill,
    merge,
    noise_eval,
    quantize,
    sft,
    sft_mask,
    shadow_ft,
)
