"""Test setup: never touch the network, keep CPU threads modest, deterministic seeds."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("TC_LITE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "tc_lite"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models: thread overhead outweighs parallelism, and tests must not fight for cores


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_components():
    """The tiny pretrained SD1 pipeline (built once, cached on disk). Tests that modify it must deepcopy."""
    from tc_lite.models import build_tiny_components

    return build_tiny_components(seed=0, pretrain=True)


def prompt_encoder(components, lora_encoder=None):
    """A `PromptEncoder` for the tiny SD1 components whose `base` runs `lora_encoder`'s LoRA disabled (as the
    text-encoder LoRA adapter does), for tests that inject the LoRA themselves (with a fixed init seed, say)."""
    from tc_lite.adapters import AdapterSet
    from tc_lite.adapters.base import Adapter
    from tc_lite.conditioning import PromptEncoder
    from tc_lite.families import FAMILIES
    from tc_lite.lora import lora_disabled

    class _Injected(Adapter):
        key, kind = "te", "lora"

        def original(self):
            return lora_disabled(lora_encoder)

    adapters = AdapterSet([_Injected()]) if lora_encoder is not None else None
    return PromptEncoder(FAMILIES["sd1"], components, adapters)
