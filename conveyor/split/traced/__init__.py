"""The traced split: capture a model with torch.export on one micro-batch and cut its graph into stage modules.

The model is exported twice, in train and in eval mode, with dimension 0 (the
batch) of every tensor input dynamic, and the dimensions `dynamic_shapes`
marks (`capture.py`). The graph's nodes, in the
order they run, are cut at split points (``{"transformer.h.2": "beginning"}``,
matched against each node's ``nn_module_stack``), at ``pipe_split()``
markers, or at the boundaries of a block container (``num_stages`` /
``layers_per_stage``; `points.py`). Each stage runs the nodes between two cuts,
and a value made on stage i and used on stage j travels on the edge i->j of
the `StageGraph`, skipping the stages between (`plan.py`, gradients by
`flow.py`). Each stage holds only the parameters and buffers its nodes read,
under their names in the full model (`state.py`), and becomes a `TracedStage`
(`stage.py`) when `TracedSplit.build_stage` asks for it (`trace.py`). A stage
refuses inputs whose shapes break what export assumed (`guards.py`).
"""

from .capture import pipe_split
from .stage import TracedStage
from .trace import TracedSplit, trace_split

__all__ = ["TracedSplit", "TracedStage", "pipe_split", "trace_split"]
