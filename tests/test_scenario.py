"""The scenario language: shipped scenarios resolve, every mistake is one line naming file and key path,
sweeps expand to their grid, the resolved form has every default, and the committed JSON Schema is current.

Memory arithmetic used below: a Mixtral-8x7B expert is 3 x 4096 x 14336 bf16 weights = 352,321,536 B, and
its 32 MoE layers x 8 experts hold 90.19 GB, more than the 80 GiB = 85.9 GB of an H100. An OLMoE expert is
3 x 2048 x 1024 x 2 B = 12,582,912 B; 16 layers x 64 experts hold 12.88 GB."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from sim.errors import ScenarioError
from sim.policies.specs import BatchingSpec
from sim.profile import shipped_profiles
from sim.scenario import (
    resolved_facts,
    Scenario,
    expand_sweep,
    expert_memory_bytes,
    json_schema,
    json_schema_text,
    load_scenario,
    parse_scenario,
    resolved_dict,
    shipped_scenarios,
    shipped_scenarios_dir,
)
from sim.spec import get_model

REPO = Path(__file__).resolve().parents[1]
SCHEMA_FILE = REPO / "scenarios" / "scenario.schema.json"
UNKNOWN_KEY = "unknown key (check the spelling; `moesim scenario schema` lists the valid keys)"
H100_BYTES = 80 * 2**30

# An inline model: 4 layers of 4 experts, each expert 3 x 256 x 512 bf16 = 786,432 B.
TOY_SPEC: dict[str, Any] = {
    "name": "toy", "hidden_size": 256, "num_layers": 4, "vocab_size": 1000, "attention_type": "gqa",
    "num_attention_heads": 8, "num_kv_heads": 2, "head_dim": 32, "num_experts": 4, "top_k": 2,
    "expert_ffn_size": 512,
}


def error_of(path: Path) -> str:
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    return str(info.value)


# ---------------------------------------------------------------- what ships


def test_there_is_a_shipped_scenario_and_it_is_the_checkout_folder():
    assert "mixtral-offload-h100" in shipped_scenarios()
    assert shipped_scenarios() == sorted(p.stem for p in (REPO / "scenarios").glob("*.yaml"))
    assert (shipped_scenarios_dir() / "mixtral-offload-h100.yaml").is_file()


@pytest.mark.parametrize("name", shipped_scenarios())
def test_shipped_scenario_validates_resolves_and_expands(name):
    by_name = load_scenario(name)
    by_path = load_scenario(REPO / "scenarios" / f"{name}.yaml")
    assert by_name.scenario == by_path.scenario
    assert by_name.model.name == by_path.model.name
    data = yaml.safe_load((REPO / "scenarios" / f"{name}.yaml").read_text(encoding="utf-8"))
    points = expand_sweep(data, name)
    assert len(points) >= 1
    assert all(isinstance(point, Scenario) for _, point in points)
    # The resolved form dumps to YAML (what `scenario show` prints).
    assert yaml.safe_load(yaml.safe_dump(resolved_dict(by_name)))["model"]["spec"]["name"] == by_name.model.name


def test_default_scenario_keeps_part_of_the_mixtral_experts():
    loaded = load_scenario("mixtral-offload-h100")
    assert loaded.model.name == "mixtral-8x7b"
    assert loaded.profile.name == "h100-80gb"
    experts = loaded.scenario.hardware.expert_memory.experts
    assert experts is not None and 0 < experts < 256
    assert expert_memory_bytes(loaded) == experts * 352_321_536


def test_tiny_scenario_resolves(write_scenario, tiny):
    loaded = load_scenario(write_scenario(tiny))
    assert loaded.model.name == "olmoe-1b-7b"
    assert expert_memory_bytes(loaded) == 16 * 64 * 12_582_912
    assert loaded.scenario.workload.max_requests == 5


# ---------------------------------------------------------------- unknown keys name the key path


@pytest.mark.parametrize(
    ("section", "value", "key_path"),
    [
        (("policies", "expert_cache"), {"name": "lru", "scop": "global"}, "policies.expert_cache.scop"),
        (("policies", "expert_cache"), {"name": "lfu", "scop": "global"}, "policies.expert_cache.scop"),
        (("policies", "batching"), {"max_num_seq": 8}, "policies.batching.max_num_seq"),
        (("hardware", "expert_memory"), {"all": True, "fractoin": 0.5}, "hardware.expert_memory.fractoin"),
        (("slo", "per_task"), {"code": {"ttft_p99": 1.0}}, "slo.per_task.code.ttft_p99"),
        (("model",), {"name": "olmoe-1b-7b", "wieght_dtype": "fp8"}, "model.wieght_dtype"),
        (("model",), {"spec": {**TOY_SPEC, "nmu_experts": 4}}, "model.spec.nmu_experts"),
    ],
)
def test_nested_typo_is_one_line_with_file_and_key_path(write_scenario, tiny, section, value, key_path):
    node = tiny
    for key in section[:-1]:
        node = node.setdefault(key, {})
    node[section[-1]] = value
    path = write_scenario(tiny)
    assert error_of(path) == f"{path}: {key_path}: {UNKNOWN_KEY}"


def test_typo_under_a_tagged_union_leaks_no_tag(write_scenario, tiny):
    """pydantic's location is workload.arrivals.poisson.prompt_tokens.fixed.tokns; the user wrote no 'poisson'."""
    tiny["workload"]["arrivals"]["prompt_tokens"] = {"dist": "fixed", "tokns": 16}
    path = write_scenario(tiny)
    message = error_of(path)
    # The typo also makes 'tokens' missing: one more problem, reported as a count, not a second line.
    assert message == f"{path}: workload.arrivals.prompt_tokens.tokns: {UNKNOWN_KEY} (and 1 more problem)"


def test_the_scop_message_has_no_union_tags(write_scenario, tiny):
    tiny["policies"]["expert_cache"] = {"name": "lru", "scop": "global"}
    message = error_of(write_scenario(tiny))
    assert "\n" not in message
    for tag in ("function-after", "LruCacheSpec", ".lru.", "lru.scop"):
        assert tag not in message


def test_typo_in_top_level_key(write_scenario, tiny):
    tiny["polices"] = tiny.pop("policies")
    path = write_scenario(tiny)
    assert error_of(path) == f"{path}: polices: {UNKNOWN_KEY}"


# ---------------------------------------------------------------- wrong types, wrong values, wrong choices


def test_wrong_type_names_key_and_expected_type(write_scenario, tiny):
    tiny["workload"]["max_requests"] = "five"
    path = write_scenario(tiny)
    message = error_of(path)
    assert message.startswith(f"{path}: workload.max_requests: ")
    assert "valid integer" in message


def test_a_number_where_a_mapping_belongs(write_scenario, tiny):
    tiny["hardware"] = 3
    path = write_scenario(tiny)
    message = error_of(path)
    assert message.startswith(f"{path}: hardware: ")
    assert "dictionary" in message


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("hardware", "gpu_memory_bytes", -1),
        ("hardware", "host_memory_bytes", -1.0e12),
        ("hardware", "expert_memory", {"bytes": -5}),
        ("hardware", "expert_memory", {"fraction": 0}),
    ],
)
def test_negative_or_zero_memory_is_an_error(write_scenario, tiny, section, key, value):
    tiny[section][key] = value
    path = write_scenario(tiny)
    sub = f".{next(iter(value))}" if isinstance(value, dict) else ""
    got = next(iter(value.values())) if isinstance(value, dict) else value
    assert error_of(path) == f"{path}: {section}.{key}{sub}: Input should be greater than 0 (got {got!r})"


def test_fraction_above_one_is_an_error(write_scenario, tiny):
    tiny["hardware"]["expert_memory"] = {"fraction": 1.5}
    path = write_scenario(tiny)
    assert error_of(path) == f"{path}: hardware.expert_memory.fraction: Input should be less than or equal to 1 (got 1.5)"


def test_model_level_rule_says_what_to_write_without_pydantic_prefix(write_scenario, tiny):
    tiny["hardware"]["expert_memory"] = {}
    path = write_scenario(tiny)
    assert error_of(path) == (
        f"{path}: hardware.expert_memory: give exactly one of 'fraction', 'bytes', 'experts' or 'all: true'"
    )


def test_gpus_must_fill_whole_nodes(write_scenario, tiny):
    tiny["hardware"].update(num_gpus=3, num_nodes=2)
    path = write_scenario(tiny)
    assert error_of(path) == f"{path}: hardware: num_gpus (3) must be a multiple of num_nodes (2)"


def test_unknown_policy_lists_the_choices(write_scenario, tiny):
    tiny["policies"]["expert_cache"] = {"name": "lruu"}
    path = write_scenario(tiny)
    assert error_of(path) == (
        f"{path}: policies.expert_cache: unknown 'name' 'lruu'; expected one of 'all_resident', 'lru', 'lfu', 'emoe', 'static_hot', 'moe_infinity'"
    )


def test_policy_without_its_name_says_which_key_is_needed(write_scenario, tiny):
    tiny["policies"]["expert_cache"] = {"scope": "per_layer"}
    path = write_scenario(tiny)
    assert error_of(path) == f"{path}: policies.expert_cache: needs the key 'name' to say which kind"


def test_bad_literal_value(write_scenario, tiny):
    tiny["policies"]["expert_cache"] = {"name": "lru", "scope": "per_expert"}
    path = write_scenario(tiny)
    message = error_of(path)
    assert message.startswith(f"{path}: policies.expert_cache.scope: ")
    assert "'global'" in message and "'per_layer'" in message


# ---------------------------------------------------------------- models


def test_inline_model_spec_resolves(write_scenario, tiny):
    tiny["model"] = {"spec": TOY_SPEC}
    loaded = load_scenario(write_scenario(tiny))
    assert loaded.model.name == "toy"
    assert loaded.model.expert_bytes == 3 * 256 * 512 * 2
    assert expert_memory_bytes(loaded) == 4 * 4 * 3 * 256 * 512 * 2


def test_top_k_above_num_experts_in_inline_spec_names_the_key(write_scenario, tiny):
    tiny["model"] = {"spec": {**TOY_SPEC, "top_k": 8}}
    path = write_scenario(tiny)
    message = error_of(path)
    assert message == f"{path}: model.spec: top_k: 8 is more than num_experts (4)"


def test_incomplete_inline_spec_names_the_first_missing_field(write_scenario, tiny):
    spec = {k: v for k, v in TOY_SPEC.items() if k != "hidden_size"}
    tiny["model"] = {"spec": spec}
    path = write_scenario(tiny)
    assert error_of(path) == f"{path}: model.spec.hidden_size: required key is missing"


def test_model_mapping_needs_name_or_spec(write_scenario, tiny):
    tiny["model"] = {"weight_dtype": "fp8"}
    path = write_scenario(tiny)
    assert error_of(path) == f"{path}: model: give exactly one of 'name' (a catalog model) or 'spec' (an inline spec)"


def test_unknown_dtype_override_names_the_override_key(write_scenario, tiny):
    tiny["model"] = {"name": "olmoe-1b-7b", "weight_dtype": "fp9"}
    path = write_scenario(tiny)
    message = error_of(path)
    assert message.startswith(f"{path}: model.weight_dtype: unknown dtype 'fp9'; expected one of ")
    assert "'fp8'" in message and "'bf16'" in message


def test_dtype_override_reaches_the_resolved_model(write_scenario, tiny):
    """Mixtral with fp8 experts: 256 x 352,321,536 / 2 = 45.1 GB, which fits the H100 that bf16 does not."""
    tiny["model"] = {"name": "mixtral-8x7b", "weight_dtype": "fp8"}
    loaded = load_scenario(write_scenario(tiny))
    assert loaded.model.weight_dtype == "fp8"
    assert expert_memory_bytes(loaded) == 256 * 352_321_536 / 2


@pytest.mark.parametrize(("model", "key"), [("mixtral-8x7", "model"), ({"name": "mixtral-8x7"}, "model.name")])
def test_unknown_model_suggests_the_close_name(write_scenario, tiny, model, key):
    tiny["model"] = model
    path = write_scenario(tiny)
    message = error_of(path)
    assert message.startswith(f"{path}: {key}: unknown model 'mixtral-8x7'; did you mean 'mixtral-8x7b'? known: ")
    assert "olmoe-1b-7b" in message


# ---------------------------------------------------------------- hardware and memory


def test_unknown_profile_lists_the_shipped_ones(write_scenario, tiny):
    tiny["hardware"]["profile"] = "h100"
    path = write_scenario(tiny)
    assert error_of(path) == f"{path}: hardware.profile: unknown profile 'h100'; shipped profiles: " + ", ".join(
        shipped_profiles()
    )
    assert {"a100-40gb", "a100-80gb", "h100-80gb", "h200"} <= set(shipped_profiles())


def test_all_mixtral_experts_do_not_fit_an_h100(write_scenario, tiny):
    tiny["model"] = "mixtral-8x7b"
    path = write_scenario(tiny)
    assert error_of(path) == f"{path}: hardware.expert_memory: 90.2 GB of experts is more than the GPU's 85.9 GB"


def test_expert_bytes_above_gpu_memory(write_scenario, tiny):
    tiny["hardware"]["expert_memory"] = {"bytes": 1.0e11}
    path = write_scenario(tiny)
    assert error_of(path) == f"{path}: hardware.expert_memory: 100.0 GB of experts is more than the GPU's 85.9 GB"


def test_expert_count_above_a_smaller_gpu_memory_override(write_scenario, tiny):
    """1000 OLMoE experts = 12.58 GB > a 10 GB GPU."""
    tiny["hardware"].update(gpu_memory_bytes=1.0e10, expert_memory={"experts": 1000})
    path = write_scenario(tiny)
    assert error_of(path) == f"{path}: hardware.expert_memory: 12.6 GB of experts is more than the GPU's 10.0 GB"


def test_gpu_memory_override_cannot_exceed_the_profile(write_scenario, tiny):
    tiny["hardware"]["gpu_memory_bytes"] = 1.0e11
    path = write_scenario(tiny)
    assert error_of(path) == (
        f"{path}: hardware.gpu_memory_bytes: 100.0 GB is more than the 85.9 GB of profile 'h100-80gb'"
    )


def test_expert_memory_smaller_than_one_expert(write_scenario, tiny):
    tiny["hardware"]["expert_memory"] = {"bytes": 1.0e6}
    path = write_scenario(tiny)
    assert error_of(path) == f"{path}: hardware.expert_memory: 0.001 GB cannot hold even one expert of 0.013 GB"


def test_host_memory_must_hold_every_expert(write_scenario, tiny):
    tiny["hardware"]["host_memory_bytes"] = 1.0e10
    path = write_scenario(tiny)
    assert error_of(path) == (
        f"{path}: hardware.host_memory_bytes: 10.0 GB cannot hold the model's 12.9 GB of routed experts"
    )


def test_fraction_is_of_the_gpu_memory(write_scenario, tiny):
    tiny["hardware"]["expert_memory"] = {"fraction": 0.25}
    loaded = load_scenario(write_scenario(tiny))
    assert expert_memory_bytes(loaded) == 0.25 * H100_BYTES


# ---------------------------------------------------------------- files and YAML


def test_invalid_yaml_gives_file_line_and_column(write_scenario):
    # Line 4 is "   seed: 1"; its ':' is the 8th character.
    path = write_scenario("model: olmoe-1b-7b\nworkload:\n  max_requests: 5\n   seed: 1\n")
    assert error_of(path) == f"{path}:4:8: invalid YAML: mapping values are not allowed here"


def test_missing_required_section(write_scenario, tiny):
    del tiny["workload"]
    path = write_scenario(tiny)
    assert error_of(path) == f"{path}: workload: required key is missing"


def test_missing_required_nested_key(write_scenario, tiny):
    del tiny["workload"]["arrivals"]["rate_per_s"]
    path = write_scenario(tiny)
    assert error_of(path) == f"{path}: workload.arrivals.rate_per_s: required key is missing"


@pytest.mark.parametrize("text", ["", "- model\n- workload\n", "just a string\n"])
def test_a_file_that_is_not_a_mapping(write_scenario, text):
    path = write_scenario(text)
    assert error_of(path) == f"{path}: expected a mapping with keys model, hardware, workload, ..."


def test_missing_file_lists_shipped_scenarios(tmp_path):
    path = tmp_path / "nosuch.yaml"
    message = error_of(path)
    assert message.startswith(f"{path}: no such file, and not a shipped scenario (shipped: ")
    assert "mixtral-offload-h100" in message


# ---------------------------------------------------------------- sweeps


def test_sweep_expands_to_the_grid_in_order(tiny):
    tiny["hardware"]["expert_memory"] = {"fraction": 0.5}
    tiny["sweep"] = {"axes": {"hardware.expert_memory.fraction": [0.2, 0.4],
                              "policies.batching.max_num_seqs": [8, 16, 32]}}
    points = expand_sweep(tiny, "grid.yaml")
    assert [values for values, _ in points] == [
        {"hardware.expert_memory.fraction": f, "policies.batching.max_num_seqs": n}
        for f in (0.2, 0.4) for n in (8, 16, 32)
    ]
    for values, scenario in points:
        assert scenario.hardware.expert_memory.fraction == values["hardware.expert_memory.fraction"]
        assert scenario.policies.batching.max_num_seqs == values["policies.batching.max_num_seqs"]
        assert scenario.policies.batching.max_batch_tokens == 8192  # untouched keys keep their defaults
        assert scenario.sweep.axes == {}  # a point is one scenario, not another sweep


def test_sweep_variants_vary_several_keys_together_crossed_with_the_axes(tiny):
    tiny["hardware"]["expert_memory"] = {"experts": 2}
    tiny["sweep"] = {
        "axes": {"hardware.expert_memory.experts": [2, 4]},
        "variants": {"lru": {"policies.expert_cache": {"name": "lru"}},
                     "pre-gated": {"policies.expert_cache": {"name": "lfu"}, "policies.prefetch": {"name": "pre_gated"}}},
    }
    points = expand_sweep(tiny, "variants.yaml")
    assert [values for values, _ in points] == [
        {"hardware.expert_memory.experts": n, "variant": v} for n in (2, 4) for v in ("lru", "pre-gated")
    ]
    pre = points[1][1]
    assert (pre.policies.expert_cache.name, pre.policies.prefetch.name) == ("lfu", "pre_gated")
    assert points[0][1].policies.prefetch.name == "none"


def test_a_variant_that_breaks_a_rule_names_the_sweep_point(tiny):
    tiny["sweep"] = {"variants": {"bad": {"policies.expert_cache": {"name": "emoe"}, "policies.prefetch": {"name": "next_layer"}}}}
    with pytest.raises(ScenarioError, match=r"variants\.yaml: policies: expert_cache emoe brings its own loading.*\[sweep point variant=bad\]"):
        expand_sweep(tiny, "variants.yaml")


def test_no_sweep_is_one_point(tiny):
    points = expand_sweep(tiny, "one.yaml")
    assert len(points) == 1
    assert points[0][0] == {}
    assert points[0][1] == parse_scenario(tiny, "one.yaml")


def test_sweep_creates_sections_the_file_omitted(tiny):
    tiny["sweep"] = {"axes": {"slo.ttft_p99_s": [1.0, 2.0]}}
    points = expand_sweep(tiny, "slo.yaml")
    assert [p.slo.ttft_p99_s for _, p in points] == [1.0, 2.0]


def test_sweep_axis_with_misspelt_key_path_names_the_point(tiny):
    tiny["hardware"]["expert_memory"] = {"fraction": 0.5}
    tiny["sweep"] = {"axes": {"hardware.expert_memory.fractoin": [0.2, 0.4], "policies.batching.max_num_seqs": [8]}}
    with pytest.raises(ScenarioError) as info:
        expand_sweep(tiny, "grid.yaml")
    assert str(info.value) == (
        f"grid.yaml: hardware.expert_memory.fractoin: {UNKNOWN_KEY} "
        "[sweep point hardware.expert_memory.fractoin=0.2, policies.batching.max_num_seqs=8]"
    )


def test_sweep_value_out_of_range_names_that_point(tiny):
    tiny["hardware"]["expert_memory"] = {"fraction": 0.5}
    tiny["sweep"] = {"axes": {"hardware.expert_memory.fraction": [0.2, 2.0]}}
    with pytest.raises(ScenarioError) as info:
        expand_sweep(tiny, "grid.yaml")
    assert str(info.value) == (
        "grid.yaml: hardware.expert_memory.fraction: Input should be less than or equal to 1 (got 2.0) "
        "[sweep point hardware.expert_memory.fraction=2.0]"
    )


def test_sweep_inside_a_model_given_by_name_asks_for_a_mapping(tiny):
    tiny["sweep"] = {"axes": {"model.weight_dtype": ["bf16", "fp8"]}}
    with pytest.raises(ScenarioError) as info:
        expand_sweep(tiny, "grid.yaml")
    assert str(info.value) == "grid.yaml: sweep.axes.model.weight_dtype: write 'model' as a mapping to vary inside it"


def test_sweep_over_whole_models(tiny):
    tiny["sweep"] = {"axes": {"model": ["olmoe-1b-7b", "qwen3-30b-a3b"]}}
    assert [p.model for _, p in expand_sweep(tiny, "models.yaml")] == ["olmoe-1b-7b", "qwen3-30b-a3b"]


# ---------------------------------------------------------------- the resolved form


def _assert_every_field_present(model_cls: type, dumped: dict[str, Any], where: str) -> None:
    assert set(model_cls.model_fields) <= set(dumped), f"{where}: missing {set(model_cls.model_fields) - set(dumped)}"


def test_resolved_dict_fills_every_default(write_scenario, tiny):
    loaded = load_scenario(write_scenario(tiny))
    out = resolved_dict(loaded)
    # The file gave no batching section at all; the resolved form has all of it.
    assert "batching" not in tiny["policies"]
    assert out["policies"]["batching"] == BatchingSpec().model_dump(mode="json")
    assert out["policies"]["batching"]["max_num_seqs"] == 256
    assert out["policies"]["scheduler"] == {"name": "fcfs"}
    assert out["policies"]["prefetch"] == {"name": "none"}
    assert out["workload"]["routing"] == {"kind": "uniform"}
    assert out["workload"]["seed"] == 0
    assert out["hardware"]["reserve_fraction"] == 0.05
    assert out["slo"]["attainment"] == 0.9
    for section in ("hardware", "workload", "policies", "slo", "sweep"):
        field = Scenario.model_fields[section].annotation
        _assert_every_field_present(field, out[section], section)
    _assert_every_field_present(Scenario, out, "top level")


def test_resolved_dict_expands_the_model_and_the_memory_split(write_scenario, tiny):
    tiny["hardware"]["expert_memory"] = {"fraction": 0.5}
    out = resolved_dict(load_scenario(write_scenario(tiny)))
    spec = get_model("olmoe-1b-7b")
    assert out["model"] == {"spec": spec.model_dump(mode="json")}
    facts = resolved_facts(load_scenario(write_scenario(tiny)))
    assert facts["profile_name"] == "h100-80gb"
    assert facts["profile_source"] == "datasheet"
    assert facts["gpu_memory_bytes"] == float(H100_BYTES)
    assert facts["expert_memory_bytes"] == 0.5 * H100_BYTES
    assert facts["expert_slots"] == int(0.5 * H100_BYTES // spec.expert_bytes)


def test_resolved_dict_is_itself_a_valid_scenario(write_scenario, tiny):
    """`scenario show` output (and a run folder's scenario.resolved.yaml) can be run again."""
    first = load_scenario(write_scenario(tiny))
    again = load_scenario(write_scenario(resolved_dict(first)))
    assert again.model == first.model
    assert resolved_dict(again) == resolved_dict(first)


# ---------------------------------------------------------------- JSON Schema


def test_committed_json_schema_is_current():
    assert SCHEMA_FILE.exists(), "generate it: moesim scenario schema --out scenarios/scenario.schema.json"
    assert SCHEMA_FILE.read_text(encoding="utf-8") == json_schema_text(), (
        "scenarios/scenario.schema.json is out of date with sim/scenario.py; regenerate it with\n"
        "    moesim scenario schema --out scenarios/scenario.schema.json"
    )


def test_json_schema_forbids_unknown_keys_and_requires_model_and_workload():
    schema = json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == {"model", "workload"}
    assert set(schema["properties"]) == set(Scenario.model_fields)
    for name, definition in schema["$defs"].items():
        if definition.get("type") == "object" and "properties" in definition and name != "SweepSpec":
            # Every section rejects typos, so an editor flags them as the loader does.
            assert definition.get("additionalProperties") is False, name
    # The discriminated unions reach the schema, so editors can complete policy names.
    cache = schema["$defs"]["PoliciesSpec"]["properties"]["expert_cache"]
    assert cache["discriminator"]["propertyName"] == "name"
    assert set(cache["discriminator"]["mapping"]) == {"all_resident", "lru", "lfu", "emoe", "static_hot", "moe_infinity"}
