"""The named pipelines of the catalogue, registered with the engine when `passes` is imported.

A pipeline is an ordered list of pass names (see `archc passes`). `default` brings the graph to
the canonical form (shape guards, functional BatchNorm, in-place ops), removes no-op modules,
folds every eval-mode BatchNorm that can be folded exactly into a neighbouring conv or linear
layer, merges parallel linear branches into one conv, folds the BNs that followed those
sums, folds channel shuffles into a neighbouring dense conv, merges consecutive linear convs
where exact and no costlier, then deletes what became unused. `canonical` only brings a graph
to the canonical form, every rewrite exact: what `archc prune` runs on a model archc did not
build before its channel analysis (functional BatchNorm becomes a module, in-place ops and
shape guards go).
"""

PIPELINES: dict[str, list[str]] = {
    "default": ["remove_identity", "canonicalize", "fold_bn", "merge_parallel_branches", "fold_bn",
                "fold_channel_shuffle", "merge_sequential_convs", "eliminate_dead_code"],
    "canonical": ["remove_identity", "canonicalize", "eliminate_dead_code"],
    "none": [],
}
