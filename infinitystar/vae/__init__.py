"""InfinityStar video tokenizer: config, model, chunked decode, pixel I/O and BSQ encode (spec §3, §6)."""
from .codec import (
    CROP_WARN_SHARE,
    FrameFit,
    cover_crop,
    cropped_share,
    encode_bits,
    first_frame_rule,
    fit_video,
    frames_to_float_images,
    frames_to_uint8,
    prepare_image,
    prepare_video,
)
from .config import VAE_PRESETS, VaeConfig, detect_vae_config
from .memory import estimate_decode_memory, estimate_encode_memory
from .model import VideoTokenizer, load_vae_state_dict

__all__ = [
    "CROP_WARN_SHARE", "FrameFit", "VAE_PRESETS", "VaeConfig", "VideoTokenizer", "cover_crop", "cropped_share", "detect_vae_config",
    "encode_bits", "fit_video", "estimate_decode_memory", "estimate_encode_memory", "first_frame_rule", "frames_to_float_images", "frames_to_uint8",
    "load_vae_state_dict", "prepare_image", "prepare_video",
]
