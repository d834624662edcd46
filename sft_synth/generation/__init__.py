"""Local generation for SFT synthesis: KV-cached batched decoding, speculative sampling, FR-Spec drafts."""

from .chat_template import apply_chat_template
from .engine import Generation, GenerationEngine, GenerationStats, Request, SpeculativeConfig
from .frspec import FRSpecHead, TokenFrequencies
from .sampling import GenerationSettings, RowSampling
from .speculative import DraftLengthController, StepCost, Verification, verify_greedy, verify_sampling

__all__ = [
    "DraftLengthController",
    "FRSpecHead",
    "Generation",
    "GenerationEngine",
    "GenerationSettings",
    "GenerationStats",
    "Request",
    "RowSampling",
    "SpeculativeConfig",
    "StepCost",
    "TokenFrequencies",
    "Verification",
    "apply_chat_template",
    "verify_greedy",
    "verify_sampling",
]
