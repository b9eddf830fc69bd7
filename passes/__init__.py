"""The rewrite catalogue: importing it registers every built-in pass and named pipeline with the
engine (`archc.rewrite.pipeline`). One module per family; `pipelines` names the pipelines."""

from archc.passes import (  # noqa: F401 - imported to register their passes
    bn_folding,
    branch_merging,
    canonical,
    channel_shuffle,
    cleanup,
    layout,
    sequential_merging,
)
from archc.passes.pipelines import PIPELINES
from archc.rewrite.pipeline import register_pipeline

for _name, _passes in PIPELINES.items():
    register_pipeline(_name, _passes)
