"""How lmms-eval (>= 0.6) finds our model: the ``lmms_eval.models`` entry point names :func:`manifest`.

lmms-eval loads every entry point of that group when ``lmms_eval.models`` is imported and calls a callable
payload for its ``ModelManifest``. This module is kept free of torch and of the rest of the package, so that
discovery stays cheap and a problem in our model code cannot break lmms-eval's registry (one failing entry point
makes lmms-eval drop the plugins after it); the class itself is imported only when ``--model lightning_sp`` is used.
"""

from __future__ import annotations

MODEL_ID = "lightning_sp"
CLASS_PATH = "lightning_sp.lmms_adapter.LightningSP"


def manifest():
    """lmms-eval's manifest for ``--model lightning_sp`` (a "simple" model: it takes lmms-eval's formatted
    context string, not chat messages)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)
