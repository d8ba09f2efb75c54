"""Dropdown values checked when a prompt is queued.

ComfyUI 0.3.x checks a dropdown's value only for inputs declared as Python lists, the V1 form; a V3 ``io.Combo``
reaches ``execute`` with whatever an API prompt or a hand-edited workflow holds, where it would end in a bare
KeyError or be taken silently as a default. Each node names its fixed-choice dropdowns in ``validate_inputs`` and
calls :func:`check_choices`. Only the named inputs leave ComfyUI's own checks (min/max stay on for the rest).
ComfyUI 0.8 checks V3 dropdowns itself, except the inputs a ``validate_inputs`` names: the same check, kept here.
"""
from __future__ import annotations

from collections.abc import Sequence

from comfy_api.latest import io


def check_choices(node: type[io.ComfyNode], **values) -> bool | str:
    """True, or what is wrong: the first value not among its dropdown's options. ``None`` (an input fed by a link,
    unknown until the graph runs, or an optional input left out) passes."""
    return check_values({i.id: i.options for i in node.define_schema().inputs if isinstance(i, io.Combo.Input)},
                        **values)


def check_values(options: dict[str, Sequence], **values) -> bool | str:
    """check_choices with the options given: for nodes whose schema lists model folders, which a check of their
    fixed dropdowns should not walk again."""
    for name, value in values.items():
        if value is None:
            continue
        allowed = list(options[name])
        if value not in allowed:
            shown = ", ".join(map(str, allowed)) if len(allowed) <= 30 else f"one of {len(allowed)} choices"
            return f"{name} is {value!r}, which this node does not offer; pick one of: {shown}"
    return True
