"""HPSv2 / HPSv2.1 (Wu et al., 2023): human preference score, the cosine of OpenCLIP ViT-H-14 embeddings.

Official inference (``hpsv2/img_score.py`` in tgxs002/HPSv2): an OpenCLIP ``ViT-H-14`` whose *whole* state dict is
replaced by the checkpoint's ``state_dict`` (``HPS_v2_compressed.pt`` for v2.0, ``HPS_v2.1_compressed.pt`` for v2.1,
hub repo ``xswu/HPSv2``; the laion backbone the official code downloads first is entirely overwritten, so tc-lite
does not fetch it), the open_clip tokenizer (rebuilt offline from the BPE file open_clip ships, with open_clip's
text cleaning), and ``score = image_features @ text_features.T`` on L2-normalised
features (no logit scale): about 0.25-0.30 (the TextCraftor paper: SD1.5 0.2703 on Parti-Prompts).

Preprocessing (``image_transform(..., resize_longest_max=True)``, the val transform): ``ToTensor()`` (uint8 -> [0,1]
float), ``ResizeMaxSize``: longest side to 224 with torchvision's *tensor* bicubic resize (antialiased by default
since torchvision 0.17, no clamping of float tensors), zero-pad to a square (``pad // 2`` left/top), then normalise
with OpenAI CLIP's mean/std. Two corner cases differ on purpose: ResizeMaxSize skips resize *and* pad when the
longest side already is 224 (a non-square image then breaks the model; tc-lite pads it), and torchvision < 0.17
resized tensors without antialiasing.

open_clip cannot be imported here (it needs torchvision), so the checkpoint is converted to a transformers
``CLIPModel`` (``tc_lite.rewards.openclip``); the tests check that conversion against open_clip's own code.

TextCraftor's code multiplies this score by 100 (``loss_hps = -100 * weight * score``); here that belongs in the
weight (docs/rewards.md).
"""

from __future__ import annotations

from tc_lite.errors import UserError
from tc_lite.rewards.clip_score import OPEN_CLIP_TOKENIZER, ClipSimilarity, load_openclip_file, load_tokenizer
from tc_lite.rewards.loading import require

HUB_REPO = "xswu/HPSv2"
VERSIONS = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
DEFAULT_ARCH = "ViT-H-14"


class HPSv2Reward(ClipSimilarity):
    """HPSv2 score ``cos(image, prompt)`` per pair (~0.25-0.30; higher = preferred). ``version``: v2.0 | v2.1."""

    name = "hpsv2"
    mode = "pad"
    clamp = False  # the reference resizes a float tensor (ToTensor first), which does not clamp
    scale = 1.0
    open_clip_text = True  # the official tokenizer is open_clip's (HTML entities unescaped, ...)

    def __init__(
        self,
        version: str = "v2.1",
        checkpoint: str | None = None,
        tokenizer: str = OPEN_CLIP_TOKENIZER,
        arch: str | dict = DEFAULT_ARCH,
    ):
        require("transformers", reward=self.name, install="pip install transformers")
        if version not in VERSIONS:
            raise UserError(
                f"reward '{self.name}': version must be one of {sorted(VERSIONS)}, got {version!r} "
                f"(v2.1 is the newer model; the TextCraftor paper used v2.0)."
            )
        self.version = version
        spec = checkpoint if checkpoint is not None else f"{HUB_REPO}/{VERSIONS[version]}"
        self.tokenizer = load_tokenizer(tokenizer, reward=self.name)
        self._finish_model(load_openclip_file(spec, arch, reward=self.name, key="checkpoint"))
