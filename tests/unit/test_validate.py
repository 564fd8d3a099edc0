"""Validation before traffic: synthetic adapters, hand-made safetensors headers, the bad table."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from adapters import validate
from adapters.errors import AdapterRejected
from adapters.safetensors_header import read_header
from adapters.tools import prepare
from adapters.validate import (
    BaseModelInfo,
    ValidationLimits,
    check_against_base,
    digest_adapter,
    inspect_adapter,
)
from server.errors import LoraplexError
from tests.adapter_factory import (
    OTHER_BASE_DIGEST,
    TINY_BASE_CONFIG,
    base_digest,
    lora_spec,
    make_adapter,
    write_base,
    write_safetensors,
)

REPO = Path(__file__).resolve().parents[2]
LIMITS = ValidationLimits(max_rank=16, max_adapter_bytes=1 << 20)


@pytest.fixture
def base(tmp_path: Path) -> BaseModelInfo:
    return BaseModelInfo.from_dir(write_base(tmp_path / "base"))


@pytest.fixture
def good(tmp_path: Path, base: BaseModelInfo) -> Path:
    return make_adapter(tmp_path / "good", base_digest=base.digest)


def code_of(fn: Callable[[], object]) -> str:
    with pytest.raises(LoraplexError) as info:
        fn()
    return info.value.error_code


def edit_config(adapter: Path, **changes: Any) -> None:
    path = adapter / validate.CONFIG
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


# ---- a good adapter ---------------------------------------------------------------------------


def test_good_adapter_facts_and_base_check(good: Path, base: BaseModelInfo) -> None:
    facts = inspect_adapter(good, LIMITS)
    assert facts.rank == 4
    assert facts.alpha == 8.0
    assert facts.target_modules == ("k_proj", "o_proj", "q_proj", "v_proj")
    assert facts.tensor_count == 2 * 4 * 2  # layers x modules x (A, B)
    assert facts.dtypes == ("F32",)
    assert facts.declared_base_digest == base.digest
    files = [good / "adapter_config.json", good / "adapter_model.safetensors"]
    assert facts.size_bytes == sum(f.stat().st_size for f in files)
    assert facts.digest == "sha256:" + prepare.sha256_files(*files)
    check_against_base(facts, base)


def test_digest_matches_prepare_and_ignores_the_sidecar(good: Path) -> None:
    files = [good / "adapter_config.json", good / "adapter_model.safetensors"]
    before = digest_adapter(good)
    assert before == "sha256:" + prepare.sha256_files(*files)
    (good / validate.SIDECAR).write_text(json.dumps({"base_digest": OTHER_BASE_DIGEST}))
    assert digest_adapter(good) == before
    edit_config(good, lora_alpha=16)
    assert digest_adapter(good) != before


def test_base_identity_matches_prepare(tmp_path: Path) -> None:
    root = write_base(tmp_path / "b")
    info = BaseModelInfo.from_dir(root)
    assert info.digest == base_digest(root)
    assert info.digest == "sha256:" + prepare.sha256_files(
        root / "config.json", root / "model.safetensors"
    )
    assert (info.head_dim, info.num_key_value_heads) == (16, 2)  # derived / from config


def test_base_shards_hashed_in_name_order(tmp_path: Path) -> None:
    root = tmp_path / "sharded"
    root.mkdir()
    (root / "config.json").write_text(json.dumps(TINY_BASE_CONFIG))
    for i in (2, 1):
        write_safetensors(root / f"model-0000{i}-of-00002.safetensors", {"w": ("F16", [i])})
    expected = validate.sha256_files(
        [root / "config.json", *(root / f"model-0000{i}-of-00002.safetensors" for i in (1, 2))]
    )
    assert BaseModelInfo.from_dir(root).digest == expected


def test_base_from_config_defaults_and_errors() -> None:
    digest = "sha256:" + "a" * 64
    cfg = {k: v for k, v in TINY_BASE_CONFIG.items() if k != "num_key_value_heads"}
    info = BaseModelInfo.from_config(digest, {"text_config": cfg})
    assert info.num_key_value_heads == info.num_attention_heads == 4
    assert info.module_dims("k_proj") == (64, 64)
    assert code_of(lambda: BaseModelInfo.from_config("md5:x", cfg)) == "base_model_invalid"
    broken = {**cfg, "hidden_size": "wide"}
    assert code_of(lambda: BaseModelInfo.from_config(digest, broken)) == "base_model_invalid"


def test_base_dir_without_safetensors_is_a_deployment_error(tmp_path: Path) -> None:
    root = tmp_path / "b"
    root.mkdir()
    (root / "config.json").write_text(json.dumps(TINY_BASE_CONFIG))
    (root / "pytorch_model.bin").write_bytes(b"\x80\x02")
    with pytest.raises(LoraplexError) as info:
        BaseModelInfo.from_dir(root)
    assert (info.value.status, info.value.error_code) == (500, "base_model_invalid")


def test_gqa_and_mlp_shapes(tmp_path: Path, base: BaseModelInfo) -> None:
    modules = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    d = make_adapter(tmp_path / "all", base_digest=base.digest, modules=modules, dtype="BF16")
    facts = inspect_adapter(d, LIMITS)
    assert facts.target_modules == tuple(sorted(modules))
    check_against_base(facts, base)
    k_a = next(t for t in facts.tensors if t.module == "k_proj" and t.kind == "lora_B")
    assert k_a.shape == (2 * 16, 4)  # kv heads x head_dim, rank


# ---- configuration rules (vLLM 0.32's peft_helper, plus ours) --------------------------------


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"peft_type": "PREFIX_TUNING"}, "adapter_not_lora"),
        ({"r": 0}, "adapter_config_invalid"),
        ({"r": True}, "adapter_config_invalid"),
        ({"lora_alpha": "8"}, "adapter_config_invalid"),
        ({"target_modules": 3}, "adapter_config_invalid"),
        ({"rank_pattern": {"q_proj": -1}}, "adapter_config_invalid"),
        ({"rank_pattern": {"(a+)+$": 4}}, "adapter_config_invalid"),
        ({"rank_pattern": {"[": 4}}, "adapter_config_invalid"),
        ({"use_dora": True}, "adapter_feature_unsupported"),
        ({"bias": "all"}, "adapter_feature_unsupported"),
        ({"lora_bias": True}, "adapter_feature_unsupported"),
        ({"modules_to_save": ["lm_head"]}, "adapter_feature_unsupported"),
        ({"init_lora_weights": "pissa"}, "adapter_feature_unsupported"),
        ({"layer_replication": [[0, 1]]}, "adapter_feature_unsupported"),
        ({"use_qalora": True}, "adapter_feature_unsupported"),
        ({"target_modules": ["q_proj", "embed_tokens"]}, "adapter_target_unsupported"),
        ({"r": 32}, "adapter_rank_too_high"),
        ({"rank_pattern": {"q_proj": 64}}, "adapter_rank_too_high"),
    ],
)
def test_config_rules(good: Path, changes: dict[str, Any], code: str) -> None:
    edit_config(good, **changes)
    assert code_of(lambda: inspect_adapter(good, LIMITS)) == code


def test_config_missing_required_key(good: Path) -> None:
    config = json.loads((good / validate.CONFIG).read_text())
    del config["lora_alpha"]
    (good / validate.CONFIG).write_text(json.dumps(config))
    assert code_of(lambda: inspect_adapter(good, LIMITS)) == "adapter_config_invalid"


def test_accepted_variants(good: Path, base: BaseModelInfo) -> None:
    """Regex target_modules, gaussian init and rsLoRA are plain LoRA to vLLM."""
    edit_config(
        good,
        target_modules=".*proj",
        init_lora_weights="gaussian",
        use_rslora=True,
        rank_pattern={},
    )
    facts = inspect_adapter(good, LIMITS)
    assert facts.use_rslora
    check_against_base(facts, base)


def test_rank_pattern_sets_per_module_rank(tmp_path: Path, base: BaseModelInfo) -> None:
    d = make_adapter(tmp_path / "rp", base_digest=base.digest, modules=("q_proj", "v_proj"))
    spec = lora_spec(TINY_BASE_CONFIG, 4, ("q_proj",)) | lora_spec(TINY_BASE_CONFIG, 8, ("v_proj",))
    write_safetensors(d / validate.WEIGHTS, spec)
    assert code_of(lambda: inspect_adapter(d, LIMITS)) == "adapter_shape_mismatch"
    edit_config(d, rank_pattern={"v_proj": 8})
    facts = inspect_adapter(d, LIMITS)
    assert facts.rank == 8
    check_against_base(facts, base)


def test_size_limit_is_inclusive(good: Path) -> None:
    size = inspect_adapter(good, LIMITS).size_bytes
    inspect_adapter(good, ValidationLimits(max_adapter_bytes=size))
    with pytest.raises(AdapterRejected) as info:
        inspect_adapter(good, ValidationLimits(max_adapter_bytes=size - 1))
    assert (info.value.status, info.value.error_code) == (413, "adapter_too_large")


def test_any_pickle_file_is_refused(good: Path) -> None:
    (good / "training_args.bin").write_bytes(b"\x80\x04K\x01.")
    assert code_of(lambda: inspect_adapter(good, LIMITS)) == "adapter_pickle_refused"


def test_torch_zip_disguised_as_safetensors(good: Path) -> None:
    (good / validate.WEIGHTS).write_bytes(b"PK\x03\x04" + bytes(100))
    assert code_of(lambda: inspect_adapter(good, LIMITS)) == "adapter_pickle_refused"


def test_sidecar_must_be_well_formed(good: Path) -> None:
    (good / validate.SIDECAR).write_text(json.dumps({"base_digest": "sha256:xyz"}))
    assert code_of(lambda: inspect_adapter(good, LIMITS)) == "adapter_config_invalid"
    (good / validate.SIDECAR).write_text("[1]")
    assert code_of(lambda: inspect_adapter(good, LIMITS)) == "adapter_config_invalid"


# ---- tensor names and shapes ------------------------------------------------------------------


def rewrite(adapter: Path, edit: Callable[[dict[str, tuple[str, list[int]]]], None]) -> None:
    spec = {t.name: (t.dtype, list(t.shape)) for t in read_header(adapter / validate.WEIGHTS)}
    edit(spec)
    write_safetensors(adapter / validate.WEIGHTS, spec)


Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    ("edit", "code"),
    [
        (lambda s: s.update({"base_model.model.lm_head.lora_A.weight": ("F32", [4, 64])}),
         "adapter_target_unsupported"),
        (lambda s: s.update({f"{Q0}.lora_magnitude_vector": ("F32", [64])}),
         "adapter_feature_unsupported"),
        (lambda s: s.update({"base_model.model.lm_head.weight": ("F32", [100, 64])}),
         "adapter_feature_unsupported"),
        (lambda s: s.update({f"{Q0}.lora_B.bias": ("F32", [64])}), "adapter_feature_unsupported"),
        (lambda s: s.pop(f"{Q0}.lora_B.weight"), "adapter_shape_mismatch"),
        (lambda s: s.update({f"{Q0}.lora_A.weight": ("F32", [2, 64])}), "adapter_shape_mismatch"),
        (lambda s: s.update({f"{Q0}.lora_A.weight": ("F32", [4, 8, 8])}),
         "adapter_shape_mismatch"),
        (lambda s: s.clear(), "adapter_weights_missing"),
    ],
)  # fmt: skip
def test_tensor_rules(
    good: Path, edit: Callable[[dict[str, tuple[str, list[int]]]], None], code: str
) -> None:
    rewrite(good, edit)
    assert code_of(lambda: inspect_adapter(good, LIMITS)) == code


def test_layer_beyond_base_is_a_shape_mismatch(good: Path, base: BaseModelInfo) -> None:
    name = "base_model.model.model.layers.7.self_attn.q_proj"
    rewrite(
        good,
        lambda s: s.update(
            {f"{name}.lora_A.weight": ("F32", [4, 64]), f"{name}.lora_B.weight": ("F32", [64, 4])}
        ),
    )
    facts = inspect_adapter(good, LIMITS)
    assert code_of(lambda: check_against_base(facts, base)) == "adapter_shape_mismatch"


def test_base_identity_rules(good: Path, base: BaseModelInfo) -> None:
    facts = inspect_adapter(good, LIMITS)
    check_against_base(facts, base, declared_base_digest=base.digest)
    conflict = lambda: check_against_base(facts, base, declared_base_digest=OTHER_BASE_DIGEST)  # noqa: E731
    assert code_of(conflict) == "adapter_base_mismatch"
    malformed = lambda: check_against_base(facts, base, declared_base_digest="sha256:1")  # noqa: E731
    assert code_of(malformed) == "adapter_config_invalid"
    (good / validate.SIDECAR).unlink()
    bare = inspect_adapter(good, LIMITS)
    assert code_of(lambda: check_against_base(bare, base)) == "adapter_base_unknown"
    check_against_base(bare, base, allow_unknown_base=True)
    check_against_base(bare, base, declared_base_digest=base.digest)
    wrong = lambda: check_against_base(bare, base, declared_base_digest=OTHER_BASE_DIGEST)  # noqa: E731
    assert code_of(wrong) == "adapter_base_mismatch"


# ---- safetensors headers, byte by byte --------------------------------------------------------


def raw_file(header: Any, data: bytes = b"", *, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


T = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"\x01\x00", "shorter than the length prefix"),
        (raw_file({"t": T}, bytes(8), length=0), "zero length"),
        (raw_file({"t": T}, bytes(8), length=10_000), "length past the end"),
        (raw_file(b"[1, 2]", bytes(0)), "not an object"),
        (raw_file(b"{\"t\": ", bytes(0)), "truncated JSON"),
        (raw_file(b"{\"a\": 1, \"a\": 2}"), "duplicate keys"),
        (raw_file(b"{\"t\": \"\xff\"}"), "not UTF-8"),
        (raw_file({"t": {**T, "dtype": "F13"}}, bytes(8)), "unknown dtype"),
        (raw_file({"t": {**T, "shape": [-2]}}, bytes(8)), "negative dim"),
        (raw_file({"t": {**T, "shape": "2"}}, bytes(8)), "shape not a list"),
        (raw_file({"t": {**T, "data_offsets": [8, 0]}}, bytes(8)), "reversed offsets"),
        (raw_file({"t": {**T, "data_offsets": [0, 4]}}, bytes(4)), "offsets vs shape x dtype"),
        (raw_file({"t": T}, bytes(4)), "data outside the file"),
        (raw_file({"t": T}, bytes(12)), "trailing bytes"),
        (raw_file({"t": {**T, "data_offsets": [4, 12]}}, bytes(12)), "gap at the start"),
        (raw_file({"a": T, "b": T}, bytes(8)), "overlapping tensors"),
        (raw_file({"t": T, "__metadata__": {"k": 1}}, bytes(8)), "metadata values not strings"),
        (raw_file({"t": "F32"}, bytes(8)), "entry not an object"),
        (raw_file({"t": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}, bytes(2)),
         "sub-byte dtype not filling bytes"),
    ],
)  # fmt: skip
def test_corrupt_headers(good: Path, content: bytes, why: str) -> None:
    (good / validate.WEIGHTS).write_bytes(content)
    assert code_of(lambda: inspect_adapter(good, LIMITS)) == "adapter_header_corrupt", why


def test_header_parser_accepts_padding_metadata_and_empty_tensors(tmp_path: Path) -> None:
    p = tmp_path / "x.safetensors"
    header = {
        "__metadata__": {"format": "pt"},
        "e": {"dtype": "BF16", "shape": [0, 4], "data_offsets": [0, 0]},
        "t": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]},
    }
    raw = json.dumps(header).encode() + b"    "
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(2))
    assert [(t.name, t.shape) for t in read_header(p)] == [("e", (0, 4)), ("t", (4,))]
