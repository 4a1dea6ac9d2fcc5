"""The embedded digits task: data, a small classifier, and sample-quality metrics.

Modules (import them directly; this package import stays light, no jax or torch here):

- `flowmap_jax.digits.data`: scikit-learn's bundled 8x8 digits, upsampled to 16x16, in [-1, 1],
  (N, 16, 16, 1), with a fixed seeded train / held-out split (numpy only).
- `flowmap_jax.digits.classifier`: a small Flax CNN returning logits and a 64-d feature vector.
- `flowmap_jax.digits.train_classifier`: `python -m flowmap_jax.digits.train_classifier`.
- `flowmap_jax.digits.quality`: Frechet distance in classifier-feature space against the held-out
  real digits, label accuracy, MSE to a reference, and `digits_quality_report`.

The teacher (a diffusers `UNet2DConditionModel` trained on these digits) lives in
`flowmap_jax/assets/digits_teacher/`; it is trained by `python -m torch_ref.train_digits_teacher`.
"""

import os

from flowmap_jax.data.teacher_folder import EMBEDDED_TEACHER_DIR as TEACHER_DIR  # noqa: F401 (the shipped teacher)

ASSETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
CLASSIFIER_DIR = os.path.join(ASSETS_DIR, "digits_classifier")
