"""The named pipelines, and the modules whose passes register themselves in the registry.

A pipeline is an ordered list of pass names (see `archc passes`). `default` removes no-op
modules, folds every eval-mode BatchNorm that can be folded exactly into a neighbouring conv or
linear layer, merges parallel linear branches into one conv, folds the BNs that followed those
sums, folds channel shuffles into a neighbouring dense conv, merges consecutive linear convs
where exact and no costlier, then deletes what became unused.
"""

# Imported (in this order) the first time the pass registry is queried.
PASS_MODULES = (
    "passes.cleanup",
    "passes.bn_folding",
    "passes.branch_merging",
    "passes.sequential_merging",
    "passes.layout",
    "passes.channel_shuffle",
)

PIPELINES: dict[str, list[str]] = {
    "default": ["remove_identity", "fold_bn", "merge_parallel_branches", "fold_bn",
                "fold_channel_shuffle", "merge_sequential_convs", "eliminate_dead_code"],
    "none": [],
}
