"""ComfyUI V3 registration of the InfinityStar nodes."""
from comfy_api.latest import ComfyExtension, io

from . import paths
from .conditioning import InfinityStarTextEncode
from .interact import InfinityStarInteract, InfinityStarInteractStart
from .loaders import (
    InfinityStarDownloadModels,
    InfinityStarModelLoader,
    InfinityStarTextEncoderLoader,
    InfinityStarVAELoader,
)
from .sampling import InfinityStarSampler
from .tokens_io import InfinityStarLoadTokens, InfinityStarSaveTokens
from .video import InfinityStarDecode, InfinityStarEncode, InfinityStarExtend

NODES = [InfinityStarModelLoader, InfinityStarTextEncoderLoader, InfinityStarVAELoader, InfinityStarDownloadModels,
         InfinityStarTextEncode, InfinityStarSampler, InfinityStarDecode, InfinityStarEncode, InfinityStarExtend,
         InfinityStarSaveTokens, InfinityStarLoadTokens, InfinityStarInteractStart, InfinityStarInteract]


class InfinityStarExtension(ComfyExtension):
    async def on_load(self) -> None:
        paths.register()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> InfinityStarExtension:
    paths.register()
    return InfinityStarExtension()
