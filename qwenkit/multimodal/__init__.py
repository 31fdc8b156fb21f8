"""Images in prompts: decoding and checking them (`image`), the vision processor's pixels
(`image`), and the prompt they become (`inputs`): placeholder tokens expanded to the image's
token count, M-RoPE positions, and the content hash that keys the encoder and prefix caches."""

from qwenkit.multimodal.image import ImageError, ImageLimits, ImageProcessor, decode_image, load_image_source
from qwenkit.multimodal.inputs import ImageInput, MultimodalPrompt, build_multimodal_prompt

__all__ = [
    "ImageError", "ImageInput", "ImageLimits", "ImageProcessor", "MultimodalPrompt", "build_multimodal_prompt",
    "decode_image", "load_image_source",
]
