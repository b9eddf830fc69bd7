"""The named pipelines, and the modules whose passes register themselves in the registry.

A pipeline is an ordered list of pass names (see `archc passes`). `default` removes no-op
modules, folds every eval-mode BatchNorm that can be folded exactly into a neighbouring conv or
linear layer, then deletes what became unused.
"""

# Imported (in this order) the first time the pass registry is queried.
PASS_MODULES = (
    "passes.cleanup",
    "passes.bn_folding",
)

PIPELINES: dict[str, list[str]] = {
    "default": ["remove_identity", "fold_bn", "eliminate_dead_code"],
    "none": [],
}
