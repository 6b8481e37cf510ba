"""Keep the libraries' repeated warnings out of the rank logs, so that they show the training's own
lines (`launcher logs RUN`, the tail printed on a crash).

Only other packages' warnings are filtered, by the module they are attributed to; ours and
Python's stay as they are. Errors are never filtered, and DeepSpeed keeps its WARNING level.
"""

from __future__ import annotations

import os
import warnings

# Packages whose FutureWarning/UserWarning/DeprecationWarning lines repeat at every import or
# step (torch deprecations raised inside DeepSpeed's ZeRO-3 hooks, transformers' own).
NOISY_MODULES = r"(torch|deepspeed|transformers|accelerate|ray|pydantic|tokenizers|datasets)(\.|$)"


def quiet_libraries(*, loaded: bool = False) -> None:
    """Call in each worker before the training libraries are imported, and again (`loaded`)
    after: transformers reads its verbosity when first imported, and is reset here if it was."""
    if not loaded:
        for category in (FutureWarning, UserWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", category=category, module=NOISY_MODULES)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        return
    import transformers

    transformers.logging.set_verbosity_error()
