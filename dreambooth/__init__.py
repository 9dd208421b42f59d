"""dreambooth-cluster: shared pieces (model loading, the tiny offline model, errors) and the `dreambooth` CLI."""

import logging

# transformers 5 warns, when diffusers' Stable Diffusion pipeline module first names CLIPImageProcessor (and a
# sibling), that torchvision is missing and a PIL fallback is used. Nothing here uses an image processor (no
# safety checker, no feature extractor): on every command and in every worker's log the warning is only noise.
logging.getLogger("transformers.utils.import_utils").addFilter(
    lambda record: "requires torchvision (not installed)" not in record.getMessage()
)
