"""Helpers shared by the in-process node tests: run a V3 node as ComfyUI's executor does; the small sampler
settings."""
from __future__ import annotations

import inspect

SMALL = dict(resolution="0.06M", aspect_ratio="16:9", guidance_scale=34.0, apg_threshold=0.05, use_plain_cfg=False,
             tau_video=0.4, tau_image=1.0)


def run(node, _node_id: str | None = None, **inputs):
    """Execute a V3 node the way the executor does (class clone + normalised output); returns the result tuple.
    ``_node_id``: the node's id in the graph (its hidden ``unique_id``)."""
    from comfy_api.latest import io

    hidden = {io.Hidden.unique_id: _node_id} if _node_id is not None else {}
    if "v3_data" in inspect.signature(node.PREPARE_CLASS_CLONE).parameters:  # ComfyUI 0.4+: {"hidden_inputs": ...}
        hidden = {"hidden_inputs": hidden}
    clone = node.PREPARE_CLASS_CLONE(hidden)
    return clone.EXECUTE_NORMALIZED(**inputs).result
